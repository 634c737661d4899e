//! SWIM gossip membership (foca) for schedulers and their clients.
//!
//! Every scheduler is a gossip member whose identity carries its id, role, QUIC address and
//! state (joining, active, leaving). Frontends and queriers may join as members of their
//! own role to learn the live schedulers; [`Gossip::members`] publishes the active members
//! whenever they change.
//!
//! foca is sans-IO: this module is its runtime: one task owns the UDP socket, the timer
//! queue (timers fire in the order they were scheduled) and the foca instance. Every
//! packet carries an HMAC-SHA256 tag over its bytes under the cluster's shared key; a
//! packet whose tag does not verify is counted and dropped before foca parses anything.
//!
//! Beside the membership, a member can publish a *report* (bytes it chooses, one packet at
//! most): the socket sends it straight to every scheduler member when it changes and every
//! [`RESEND_EVERY`], outside foca's dissemination (which would delay it by rounds). Reports
//! are tagged under a key derived from the cluster's, so neither kind of packet can pass
//! for the other. Schedulers share their tenants' queued counts this way.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use foca::{AccumulatingRuntime, Foca, Identity, PostcardCodec, Timer};
use rand::rngs::StdRng;
use ring::hmac;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::ClientError;

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
        let agent = Agent {
            foca,
            runtime: AccumulatingRuntime::new(),
            socket,
            key: hmac::Key::new(hmac::HMAC_SHA256, &config.key.0),
            report_key: report_key(&config.key),
            report,
            reports: reports_tx,
            seeds: config.seeds,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            publish,
            stats: stats.clone(),
        };
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

type Runtime = AccumulatingRuntime<Member>;

struct Agent {
    foca: Foca<Member, PostcardCodec, StdRng, foca::NoCustomBroadcast>,
    runtime: Runtime,
    socket: UdpSocket,
    key: hmac::Key,
    /// Tags reports (derived from the cluster key; see [`report_key`]).
    report_key: hmac::Key,
    /// This member's report, as last published.
    report: watch::Receiver<Option<Arc<[u8]>>>,
    reports: mpsc::Sender<Vec<u8>>,
    seeds: Vec<SocketAddr>,
    /// Timers by (due, order of scheduling): equal deadlines fire in submission order.
    timers: BinaryHeap<Reverse<(Instant, u64, TimerSlot)>>,
    timer_seq: u64,
    publish: watch::Sender<Vec<Member>>,
    stats: Arc<GossipStats>,
}

/// A foca timer in the heap (ordered by the heap key only).
struct TimerSlot(Timer<Member>);

impl PartialEq for TimerSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for TimerSlot {}
impl PartialOrd for TimerSlot {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerSlot {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

/// The key reports are tagged with: the cluster key's tag over a fixed label, so that a
/// report is never taken for a membership packet nor the other way round.
fn report_key(key: &GossipKey) -> hmac::Key {
    let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key.0), b"sluice gossip reports");
    hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
}

/// A seed as foca sees it before it answers: only its address matters.
fn placeholder(addr: SocketAddr) -> Member {
    Member {
        id: String::new(),
        role: MemberRole::Scheduler,
        gossip: addr,
        service: None,
        state: MemberState::Active,
        generation: 0,
    }
}

impl Agent {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut announce = tokio::time::interval(Duration::from_secs(1));
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        let mut resend = tokio::time::interval(RESEND_EVERY);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => self.receive(&buf[..n], from),
                    Err(e) => debug!(error = %e, "gossip receive failed"),
                },
                _ = sleep_until(next_timer) => {
                    let now = Instant::now();
                    while let Some(Reverse((at, _, _))) = self.timers.peek() {
                        if *at > now {
                            break;
                        }
                        let Reverse((_, _, TimerSlot(timer))) = self.timers.pop().expect("peeked");
                        if let Err(e) = self.foca.handle_timer(timer, &mut self.runtime) {
                            debug!(error = %e, "gossip timer");
                        }
                    }
                }
                _ = announce.tick() => {
                    // Join (or rejoin after a partition) through the seeds: every second while
                    // alone, every 30 s otherwise.
                    if self.foca.num_members() == 0 || ticks.is_multiple_of(30) {
                        for &seed in &self.seeds {
                            if seed != self.foca.identity().gossip
                                && let Err(e) = self.foca.announce(placeholder(seed), &mut self.runtime)
                            {
                                debug!(%seed, error = %e, "gossip announce");
                            }
                        }
                    }
                    ticks += 1;
                }
                Ok(()) = self.report.changed() => self.send_report().await,
                _ = resend.tick() => self.send_report().await,
                cmd = commands.recv() => match cmd {
                    Some(Command::SetState(state, done)) => {
                        let me = self.foca.identity().clone();
                        let next = Member { state, generation: me.generation + 1, ..me };
                        if let Err(e) = self.foca.change_identity(next, &mut self.runtime) {
                            warn!(error = %e, "gossip state change");
                        }
                        self.flush().await;
                        let _ = done.send(());
                    }
                    Some(Command::Leave(done)) => {
                        if let Err(e) = self.foca.leave_cluster(&mut self.runtime) {
                            warn!(error = %e, "leaving the gossip");
                        }
                        self.flush().await;
                        self.publish.send_replace(Vec::new());
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                },
            }
            self.flush().await;
        }
    }

    /// Sends this member's report, if it has one, to every other scheduler member.
    async fn send_report(&mut self) {
        let Some(report) = self.report.borrow_and_update().clone() else {
            return;
        };
        let tag = hmac::sign(&self.report_key, &report);
        let mut packet = Vec::with_capacity(TAG_LEN + report.len());
        packet.extend_from_slice(tag.as_ref());
        packet.extend_from_slice(&report);
        let me = self.foca.identity().gossip;
        let to: Vec<SocketAddr> = self
            .foca
            .iter_members()
            .map(|m| m.id())
            .filter(|m| m.role == MemberRole::Scheduler && m.gossip != me)
            .map(|m| m.gossip)
            .collect();
        for addr in to {
            match self.socket.send_to(&packet, addr).await {
                Ok(_) => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => debug!(to = %addr, error = %e, "gossip report not sent"),
            }
        }
    }

    /// Checks the tag and hands the packet to foca (or, tagged as a report, to whoever
    /// takes reports); drops it unread if neither tag verifies.
    fn receive(&mut self, packet: &[u8], from: SocketAddr) {
        if packet.len() <= TAG_LEN {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (tag, data) = packet.split_at(TAG_LEN);
        if hmac::verify(&self.key, data, tag).is_err() {
            if hmac::verify(&self.report_key, data, tag).is_ok() {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                // Full or nobody listening: dropped; the sender resends its latest.
                let _ = self.reports.try_send(data.to_vec());
                return;
            }
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            debug!(%from, len = packet.len(), "gossip packet with a bad tag dropped");
            return;
        }
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.foca.handle_data(data, &mut self.runtime) {
            debug!(%from, error = %e, "gossip packet refused");
        }
    }

    /// Sends what foca wrote, queues its timers, and publishes the members if they changed.
    async fn flush(&mut self) {
        while let Some((to, data)) = self.runtime.to_send() {
            let tag = hmac::sign(&self.key, &data);
            let mut packet = Vec::with_capacity(TAG_LEN + data.len());
            packet.extend_from_slice(tag.as_ref());
            packet.extend_from_slice(&data);
            match self.socket.send_to(&packet, to.gossip).await {
                Ok(_) => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => debug!(to = %to.gossip, error = %e, "gossip send failed"),
            }
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timer_seq += 1;
            self.timers
                .push(Reverse((Instant::now() + after, self.timer_seq, TimerSlot(timer))));
        }
        let mut changed = false;
        while let Some(n) = self.runtime.to_notify() {
            changed = true;
            debug!(notification = ?n, "gossip");
        }
        if changed {
            let mut members: Vec<Member> = self.foca.iter_members().map(|m| m.id().clone()).collect();
            members.sort_by(|a, b| (a.role, &a.id, a.gossip).cmp(&(b.role, &b.id, b.gossip)));
            self.publish.send_if_modified(|current| {
                if *current == members {
                    false
                } else {
                    *current = members;
                    true
                }
            });
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

/// The gossip packet path, for the fuzzer and its seeds. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    use rand::SeedableRng;

    const KEY: &[u8] = b"fuzzing key, sixteen bytes or more";

    fn member(port: u16) -> Member {
        Member {
            id: format!("m{port}"),
            role: MemberRole::Scheduler,
            gossip: SocketAddr::from(([127, 0, 0, 1], port)),
            service: Some(SocketAddr::from(([127, 0, 0, 1], port + 1))),
            state: MemberState::Active,
            generation: 1,
        }
    }

    fn instance(port: u16) -> Foca<Member, PostcardCodec, StdRng, foca::NoCustomBroadcast> {
        let mut config = foca::Config::new_lan(NonZeroU32::new(16).expect("non-zero"));
        config.max_packet_size = (MAX_PACKET - TAG_LEN).try_into().expect("non-zero");
        Foca::new(member(port), config, StdRng::seed_from_u64(7), PostcardCodec)
    }

    /// Runs `packet` through a member's receive path: the tag check, then (if `sign` is
    /// set, the packet is first tagged with the key, so that the bytes reach foca's
    /// decoder) foca itself. Returns whether foca accepted it; never panics.
    pub fn receive(packet: &[u8], sign: bool) -> bool {
        let key = hmac::Key::new(hmac::HMAC_SHA256, KEY);
        let tagged;
        let packet = if sign {
            let mut p = hmac::sign(&key, packet).as_ref().to_vec();
            p.extend_from_slice(packet);
            tagged = p;
            &tagged[..]
        } else {
            packet
        };
        if packet.len() <= TAG_LEN || hmac::verify(&key, &packet[TAG_LEN..], &packet[..TAG_LEN]).is_err() {
            return false;
        }
        // A third member, so that every sample comes from someone else.
        let mut foca = instance(7200);
        let mut runtime = AccumulatingRuntime::new();
        let accepted = foca.handle_data(&packet[TAG_LEN..], &mut runtime).is_ok();
        while runtime.to_send().is_some() {}
        accepted
    }

    /// Untagged packets foca writes in a small exchange (announce, feed, probes, gossip):
    /// the seeds of the fuzzer's corpus.
    pub fn sample_packets() -> Vec<Vec<u8>> {
        let (mut a, mut b) = (instance(7000), instance(7100));
        let (mut ra, mut rb) = (AccumulatingRuntime::new(), AccumulatingRuntime::new());
        let mut out = Vec::new();
        a.announce(member(7100), &mut ra).expect("announce");
        for _ in 0..4 {
            while let Some((_, data)) = ra.to_send() {
                out.push(data.to_vec());
                let _ = b.handle_data(&data, &mut rb);
            }
            while let Some((_, data)) = rb.to_send() {
                out.push(data.to_vec());
                let _ = a.handle_data(&data, &mut ra);
            }
            let _ = a.gossip(&mut ra);
        }
        let _ = b.leave_cluster(&mut rb);
        while let Some((_, data)) = rb.to_send() {
            out.push(data.to_vec());
        }
        out
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn samples_are_accepted_and_garbage_is_not() {
            let samples = super::sample_packets();
            assert!(samples.len() >= 3, "{} samples", samples.len());
            assert!(samples.iter().all(|p| super::receive(p, true)));
            assert!(!super::receive(&samples[0], false), "an untagged packet is dropped");
            assert!(!super::receive(b"\xff\xff\xff garbage", true));
        }
    }
}
