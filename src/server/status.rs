//! What the status page and `/status` show: a snapshot taken by the dispatcher.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_client::gossip::{GossipStats, Member};
use tokio::sync::watch;

use crate::queue::{Counters, QuerierStats, TenantStats};

/// A point-in-time view of the scheduler.
#[derive(Debug, Clone)]
pub struct Status {
    pub scheduler_id: String,
    pub uptime: Duration,
    pub draining: bool,
    pub queued: usize,
    pub queued_bytes: u64,
    /// Queries dispatched and not yet finished.
    pub running: usize,
    pub counters: Counters,
    pub tenants: Vec<TenantStats>,
    /// The queriers in each sharded tenant's shard, by id (tenants that may use every
    /// querier are not listed).
    pub shards: std::collections::BTreeMap<String, Vec<String>>,
    pub components: Vec<(String, u32)>,
    /// Requests queued per priority class, highest first.
    pub classes: Vec<(u8, u32)>,
    pub queriers: Vec<QuerierStats>,
    pub workers: Vec<WorkerStatus>,
    pub frontends: Vec<String>,
    /// Gossip membership, when this scheduler gossips.
    pub gossip: Option<GossipStatus>,
    /// What the other schedulers hold, when tenant limits are shared (gossiping).
    pub cluster: Option<ClusterStatus>,
}

/// Tenant limits for the cluster, as this scheduler counts them now.
#[derive(Debug, Clone, Default)]
pub struct ClusterStatus {
    /// The other schedulers whose reports count (fresh), by id.
    pub peers: Vec<String>,
    /// Requests the other schedulers hold, per tenant they reported.
    pub held_elsewhere: std::collections::BTreeMap<String, u64>,
    /// Enqueues deferred until the others' next reports.
    pub deferred: usize,
}

/// This scheduler's view of the gossip.
#[derive(Debug, Clone)]
pub struct GossipStatus {
    /// Its own gossip (UDP) address.
    pub address: SocketAddr,
    /// The other live members (schedulers, frontends, queriers) and their states.
    pub members: Vec<Member>,
    /// Packets received with a valid tag.
    pub received: u64,
    /// Packets dropped for a bad tag (a wrong key, or not ours).
    pub rejected: u64,
    pub sent: u64,
}

/// What the admin listener and the status call need to describe the gossip.
#[derive(Debug, Clone)]
pub(crate) struct GossipView {
    pub(crate) address: SocketAddr,
    pub(crate) members: watch::Receiver<Vec<Member>>,
    pub(crate) stats: Arc<GossipStats>,
}

impl GossipView {
    pub(crate) fn snapshot(&self) -> GossipStatus {
        GossipStatus {
            address: self.address,
            members: self.members.borrow().clone(),
            received: self.stats.received(),
            rejected: self.stats.rejected(),
            sent: self.stats.sent(),
        }
    }
}

/// One connected querier worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    pub querier: String,
    pub slot: u32,
    pub busy: bool,
}
