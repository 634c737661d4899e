//! What the status page and `/status` show: a snapshot taken by the dispatcher.

use std::time::Duration;

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
    pub components: Vec<(String, u32)>,
    /// Requests queued per priority class, highest first.
    pub classes: Vec<(u8, u32)>,
    pub queriers: Vec<QuerierStats>,
    pub workers: Vec<WorkerStatus>,
    pub frontends: Vec<String>,
}

/// One connected querier worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    pub querier: String,
    pub slot: u32,
    pub busy: bool,
}
