//! What a frontend and a querier are both configured with: who they are, which schedulers
//! they use, and how they talk to them.

use std::net::SocketAddr;
use std::time::Duration;

use sluice_protocol::{HARD_MAX_FRAME_LEN, Limits, MIN_FRAME_LEN};

use crate::discovery::Discovery;
use crate::error::ClientError;
use crate::gossip::{GossipConfig, MemberRole};
use crate::tls::{self, Identity};

/// Where a client learns which schedulers there are.
#[derive(Debug, Clone)]
pub enum SchedulerSource {
    /// A static list of scheduler QUIC addresses (at least one).
    Static(Vec<SocketAddr>),
    /// The live schedulers of the gossip, joined as a member of the client's role:
    /// schedulers that die or leave stop being used, new or restarted ones are used as
    /// they appear.
    Gossip(GossipConfig),
}

/// The settings a [`FrontendConfig`](crate::FrontendConfig) and a
/// [`QuerierConfig`](crate::QuerierConfig) share (their `client` field).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// This client's id, unique among clients of its role; a querier's should be stable
    /// across restarts, so its shuffle shards are kept.
    pub id: String,
    /// Its certificate (role `frontend` or `querier`), key, and the CA.
    pub identity: Identity,
    /// The schedulers: a static list, or the gossip's live members.
    pub schedulers: SchedulerSource,
    /// Use only the first N active schedulers, in a stable order (by scheduler id), as
    /// Mimir's `max_used_instances`; 0: all. Applies to gossip discovery. A querier gives
    /// the schedulers beyond it one worker each, so nothing queued there is stranded; give
    /// frontends and queriers the same value.
    pub max_used_instances: usize,
    /// TLS name the schedulers' certificates are checked against.
    pub scheduler_server_name: String,
    /// A peer silent for this long is taken as gone (a frontend's queued queries go to
    /// other schedulers). Pings go out every fifth of it.
    pub idle_timeout: Duration,
    /// Largest frame sent or accepted, 64 KiB to 64 MiB. A querier takes dispatches as large as its
    /// scheduler reads (the scheduler's `Welcome` says), since they carry what frontends
    /// sent there; a frontend sends a scheduler nothing larger than that scheduler reads.
    pub max_frame_len: u32,
}

impl ClientConfig {
    /// Defaults: the schedulers at `schedulers`, all of them used, TLS name `localhost`
    /// (as in the development certificates), 5 s idle timeout, the protocol's default
    /// frame limit.
    pub fn new(id: impl Into<String>, identity: Identity, schedulers: Vec<SocketAddr>) -> Self {
        ClientConfig {
            id: id.into(),
            identity,
            schedulers: SchedulerSource::Static(schedulers),
            max_used_instances: 0,
            scheduler_server_name: "localhost".into(),
            idle_timeout: Duration::from_secs(5),
            max_frame_len: Limits::default().max_frame_len,
        }
    }

    /// Checks what both a frontend and a querier need: a frame limit the protocol allows.
    pub(crate) fn validate(&self) -> Result<(), ClientError> {
        if !sluice_protocol::frame_limit_allowed(self.max_frame_len) {
            return Err(ClientError::Config(format!(
                "max_frame_len is {} bytes; it must be between {MIN_FRAME_LEN} and {HARD_MAX_FRAME_LEN}",
                self.max_frame_len
            )));
        }
        Ok(())
    }

    /// Starts following the schedulers, as a gossip member of `role` if it gossips.
    pub(crate) fn discovery(&self, role: MemberRole) -> Result<Discovery, ClientError> {
        match &self.schedulers {
            SchedulerSource::Static(list) if list.is_empty() => Err(ClientError::NoSchedulers),
            SchedulerSource::Static(list) => Ok(Discovery::fixed(list)),
            SchedulerSource::Gossip(gossip) => Discovery::gossip(&self.id, role, gossip, self.max_used_instances),
        }
    }

    /// The QUIC client configuration this client dials schedulers (and a querier,
    /// frontends) with: its identity, the idle timeout and its pings.
    pub(crate) fn quic_client(&self) -> Result<quinn::ClientConfig, ClientError> {
        let mut client = tls::quic_client(&self.identity)?;
        client.transport_config(std::sync::Arc::new(crate::transport::with_idle(self.idle_timeout)?));
        Ok(client)
    }
}
