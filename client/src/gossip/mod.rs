//! SWIM gossip membership (foca) for schedulers and their clients.
//!
//! Every scheduler is a gossip member whose identity carries its id, role, QUIC address and
//! state (joining, active, leaving). Frontends and queriers may join as members of their
//! own role to learn the live schedulers; [`Gossip::members`] publishes the active members
//! whenever they change.
//!
//! foca is sans-IO: `agent.rs` is its runtime: one task owns the UDP socket, the timer
//! queue (timers fire in the order they were scheduled) and the foca instance. Every
//! packet carries an HMAC-SHA256 tag over its bytes under the cluster's shared key; a
//! packet whose tag does not verify is counted and dropped before foca parses anything.
//!
//! Beside the membership, a member can publish a *report* (bytes it chooses, one packet at
//! most): the socket sends it straight to every scheduler member when it changes and every
//! [`RESEND_EVERY`], outside foca's dissemination (which would delay it by rounds). Reports
//! are tagged under a key derived from the cluster's, so neither kind of packet can pass
//! for the other. Schedulers share their tenants' queued counts this way.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use foca::{Foca, Identity, PostcardCodec};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::info;

use crate::ClientError;

mod agent;
use agent::Agent;

/// What a gossip member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MemberRole {
    /// A scheduler: clients connect to its service address.
    Scheduler,
    /// A frontend client, listening to learn the schedulers.
    Frontend,
    /// A querier, listening to learn the schedulers.
    Querier,
}

/// Where a member is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MemberState {
    /// Starting: not serving yet.
    Joining,
    /// Serving.
    Active,
    /// Draining before it exits: send it no new work, but let it finish what it has.
    Leaving,
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemberState::Joining => "joining",
            MemberState::Active => "active",
            MemberState::Leaving => "leaving",
        })
    }
}

impl fmt::Display for MemberRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemberRole::Scheduler => "scheduler",
            MemberRole::Frontend => "frontend",
            MemberRole::Querier => "querier",
        })
    }
}

/// A member's identity as gossiped: who it is, where to reach it, and its state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// Its id (a scheduler's `scheduler_id`, a client's id).
    pub id: String,
    /// What it is.
    pub role: MemberRole,
    /// Its gossip (UDP) address: its unique address in the cluster.
    pub gossip: SocketAddr,
    /// The address clients connect to (a scheduler's QUIC address); `None` for clients.
    pub service: Option<SocketAddr>,
    /// Its state.
    pub state: MemberState,
    /// Orders the identities of one address: a restart (a later start time) or a state
    /// change (one more) wins over what was known before.
    pub generation: u64,
}

impl Identity for Member {
    type Addr = SocketAddr;

    /// A member wrongly declared down rejoins at once with a newer identity.
    fn renew(&self) -> Option<Self> {
        Some(Member {
            generation: self.generation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.gossip
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// The cluster's shared secret; every packet is authenticated with it. At least 16 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct GossipKey(Vec<u8>);

impl GossipKey {
    /// A key from its bytes; refused when shorter than 16 bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<GossipKey, ClientError> {
        let bytes = bytes.into();
        if bytes.len() < 16 {
            return Err(ClientError::Config("the gossip key must be at least 16 bytes".into()));
        }
        Ok(GossipKey(bytes))
    }
}

impl fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GossipKey({} bytes, redacted)", self.0.len())
    }
}

/// How to take part in the gossip.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GossipConfig {
    /// UDP address to bind.
    pub bind: SocketAddr,
    /// The address other members reach this one at (default: the bound address, which
    /// must then not be unspecified).
    pub advertise: Option<SocketAddr>,
    /// Gossip addresses of members to join through (any live one is enough). Announced to
    /// every second while this member knows no other, every 30 s after that.
    pub seeds: Vec<SocketAddr>,
    /// The cluster's shared key.
    pub key: GossipKey,
    /// How often a random member is probed. With the defaults (500 ms probes, 200 ms
    /// round trip, 1.5 s suspicion) a dead member is declared down in about 2–3 s.
    pub probe_period: Duration,
    /// How long a direct probe waits before asking others to probe indirectly.
    pub probe_rtt: Duration,
    /// How long a suspected member has to refute before it is declared down.
    pub suspect_to_down: Duration,
}

impl GossipConfig {
    /// The defaults for a LAN.
    pub fn new(bind: SocketAddr, seeds: Vec<SocketAddr>, key: GossipKey) -> GossipConfig {
        GossipConfig {
            bind,
            advertise: None,
            seeds,
            key,
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(200),
            suspect_to_down: Duration::from_millis(1500),
        }
    }
}

impl GossipConfig {
    /// Gossip settings from the environment, as `sluice serve` reads its own:
    /// `SLUICE_GOSSIP_SEEDS` (comma-separated, required), `SLUICE_GOSSIP_KEY` (required),
    /// `SLUICE_GOSSIP_LISTEN` (default `127.0.0.1:0`). `None` when no seeds are set.
    pub fn from_env() -> Result<Option<GossipConfig>, ClientError> {
        let Ok(seeds) = std::env::var("SLUICE_GOSSIP_SEEDS") else {
            return Ok(None);
        };
        let seeds = seeds
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|e| ClientError::Config(format!("SLUICE_GOSSIP_SEEDS: {s:?}: {e}")))
            })
            .collect::<Result<Vec<SocketAddr>, _>>()?;
        let key = std::env::var("SLUICE_GOSSIP_KEY")
            .map_err(|_| ClientError::Config("SLUICE_GOSSIP_KEY is required with SLUICE_GOSSIP_SEEDS".into()))?;
        let bind = match std::env::var("SLUICE_GOSSIP_LISTEN") {
            Ok(b) => b
                .parse()
                .map_err(|e| ClientError::Config(format!("SLUICE_GOSSIP_LISTEN: {b:?}: {e}")))?,
            Err(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        Ok(Some(GossipConfig::new(bind, seeds, GossipKey::new(key.into_bytes())?)))
    }
}

/// Packet counters of a gossip member.
#[derive(Debug, Default)]
pub struct GossipStats {
    received: AtomicU64,
    rejected: AtomicU64,
    sent: AtomicU64,
}

impl GossipStats {
    /// Packets received with a valid tag.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    /// Packets dropped unread: a wrong or missing tag (wrong key, or not ours).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
    /// Packets sent.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

enum Command {
    SetState(MemberState, oneshot::Sender<()>),
    Leave(oneshot::Sender<()>),
}

/// How often the latest report is sent again when it does not change.
pub const RESEND_EVERY: Duration = Duration::from_millis(100);

/// Largest report, in bytes: one packet with its tag.
pub const MAX_REPORT_LEN: usize = MAX_PACKET - TAG_LEN;

/// Reports received and not yet taken are dropped past this many (the next resend brings
/// the sender's latest again).
const REPORTS_QUEUED: usize = 256;

/// Publishes this member's report (see the module's documentation). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Reporter(Arc<watch::Sender<Option<Arc<[u8]>>>>);

impl Reporter {
    /// Replaces the report: sent to every scheduler at once and every [`RESEND_EVERY`]
    /// after. A report longer than [`MAX_REPORT_LEN`] is refused (and the last one stays).
    pub fn publish(&self, report: Vec<u8>) -> Result<(), ClientError> {
        if report.len() > MAX_REPORT_LEN {
            return Err(ClientError::Config(format!(
                "a gossip report of {} bytes is over the {MAX_REPORT_LEN}-byte packet",
                report.len()
            )));
        }
        self.0.send_replace(Some(report.into()));
        Ok(())
    }
}

/// A running gossip member.
pub struct Gossip {
    commands: mpsc::Sender<Command>,
    members: watch::Receiver<Vec<Member>>,
    reporter: Reporter,
    reports: Option<mpsc::Receiver<Vec<u8>>>,
    stats: Arc<GossipStats>,
    local: SocketAddr,
    task: JoinHandle<()>,
}

impl fmt::Debug for Gossip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gossip").field("local", &self.local).finish()
    }
}

/// Bytes of the HMAC-SHA256 tag in front of every packet.
const TAG_LEN: usize = 32;
/// Largest UDP payload sent (tag included): fits a 1500-byte MTU with room for headers.
const MAX_PACKET: usize = 1400;

impl Gossip {
    /// Binds the socket and joins through the seeds. `service` is the address clients
    /// connect to (schedulers only). Must be called inside a Tokio runtime.
    pub fn start(
        id: impl Into<String>,
        role: MemberRole,
        service: Option<SocketAddr>,
        state: MemberState,
        config: GossipConfig,
    ) -> Result<Gossip, ClientError> {
        let bind_error = |error| ClientError::Bind {
            addr: config.bind,
            error,
        };
        let socket = std::net::UdpSocket::bind(config.bind).map_err(bind_error)?;
        socket.set_nonblocking(true).map_err(bind_error)?;
        let socket = UdpSocket::from_std(socket).map_err(bind_error)?;
        let bound = socket.local_addr().map_err(bind_error)?;
        let advertise = config.advertise.unwrap_or(bound);
        if advertise.ip().is_unspecified() {
            return Err(ClientError::Config(format!(
                "gossip bound to {bound}: give an advertise address other members can reach"
            )));
        }
        if config.probe_rtt >= config.probe_period || config.probe_rtt.is_zero() {
            return Err(ClientError::Config(
                "gossip probe_rtt must be above zero and below probe_period".into(),
            ));
        }
        let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let me = Member {
            id: id.into(),
            role,
            gossip: advertise,
            service,
            state,
            // Microseconds since the epoch: a restart always wins over the identity before it.
            generation: u64::try_from(started.as_micros()).unwrap_or(u64::MAX),
        };
        let mut foca_config = foca::Config::new_lan(NonZeroU32::new(16).expect("non-zero"));
        foca_config.probe_period = config.probe_period;
        foca_config.probe_rtt = config.probe_rtt;
        foca_config.suspect_to_down_after = config.suspect_to_down;
        foca_config.max_packet_size = (MAX_PACKET - TAG_LEN).try_into().expect("non-zero");
        let foca = Foca::new(me.clone(), foca_config, rand::make_rng::<StdRng>(), PostcardCodec);
        let (commands, rx) = mpsc::channel(16);
        let (publish, members) = watch::channel(Vec::new());
        let stats = Arc::new(GossipStats::default());
        let (reporter, report) = watch::channel(None);
        let (reports_tx, reports) = mpsc::channel(REPORTS_QUEUED);
        let agent = Agent::new(foca, socket, &config, report, reports_tx, publish, stats.clone());
        info!(id = %me.id, %role, gossip = %advertise, "joining the gossip");
        let task = tokio::spawn(agent.run(rx));
        Ok(Gossip {
            commands,
            members,
            reporter: Reporter(Arc::new(reporter)),
            reports: Some(reports),
            stats,
            local: bound,
            task,
        })
    }

    /// The other active members (alive or suspected), one identity per address, updated
    /// as they change.
    pub fn members(&self) -> watch::Receiver<Vec<Member>> {
        self.members.clone()
    }

    /// Publishes this member's report to the schedulers.
    pub fn reporter(&self) -> Reporter {
        self.reporter.clone()
    }

    /// The reports other members send, each as its bytes (the first call takes them;
    /// later calls get `None`). Nobody taking them costs nothing: they are dropped.
    pub fn take_reports(&mut self) -> Option<mpsc::Receiver<Vec<u8>>> {
        self.reports.take()
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Packet counters (shared: they keep counting after this call).
    pub fn stats(&self) -> Arc<GossipStats> {
        self.stats.clone()
    }

    /// Tells the cluster this member's new state.
    pub async fn set_state(&self, state: MemberState) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::SetState(state, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Leaves the cluster (the others learn it at once, not by failure detection) and
    /// stops.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Leave(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops without a word, as a crash would.
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The schedulers clients should send work to, in a stable order: the active ones,
/// sorted by id, the first `max_used` of them (0: all).
pub fn schedulers_in_use(members: &[Member], max_used: usize) -> Vec<&Member> {
    let mut active: Vec<&Member> = members
        .iter()
        .filter(|m| m.role == MemberRole::Scheduler && m.state == MemberState::Active && m.service.is_some())
        .collect();
    active.sort_by(|a, b| (&a.id, a.service).cmp(&(&b.id, b.service)));
    if max_used > 0 {
        active.truncate(max_used);
    }
    active
}

#[doc(hidden)]
pub mod fuzzing;
