//! Queue limits and fairness settings, with per-tenant overrides.

use std::collections::HashMap;
use std::time::Duration;

use thiserror::Error;

/// Limits and fairness settings of a [`TreeQueue`](super::TreeQueue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Most requests one tenant may have queued (across all components). At least 1.
    pub max_outstanding_per_tenant: u32,
    /// Queriers serving each tenant (shuffle sharding); 0 means every querier.
    pub max_queriers_per_tenant: u32,
    /// Most requests queued in total, across tenants. At least 1.
    pub max_queued_requests: usize,
    /// Most payload bytes queued in total, across tenants. At least 1.
    pub max_queued_bytes: u64,
    /// How long a querier whose last worker disconnected keeps its place in the tenants'
    /// shards, so that a quick reconnect changes nothing. Ignored after a shutdown notice.
    pub querier_forget_delay: Duration,
    /// Least credit a tenant of weight 1 gets per visit, in cost units (at least 1); the
    /// queue raises it to the largest cost it has seen. With costs all 1 and a quantum of
    /// 1, a visit is `weight` requests: weighted round robin.
    pub cost_quantum: u32,
    /// Largest cost one request may count for (hints and measured costs above it are
    /// clamped), so that no request can buy a tenant more than this much service in one
    /// visit. At least `cost_quantum`.
    pub max_cost: u32,
    /// Share of each querier's connected workers (rounded down, so never all of them)
    /// that only take requests of priority `reserved_min_priority` or higher; 0–99.
    pub reserved_workers_percent: u8,
    /// The lowest priority reserved workers serve.
    pub reserved_min_priority: u8,
    /// Reserved capacity lent out: a reserved worker with no work of priority
    /// `reserved_min_priority` or higher for it takes a lower-priority request whose cost
    /// (hint, default 1) is at most this, so that it never idles beside a backlog while a
    /// high-priority arrival waits at most one such short request. 0: never lent.
    pub lend_max_cost: u32,
    /// Refuse at enqueue a request whose deadline its estimated wait would pass
    /// (`RejectReason::WouldMissDeadline`), instead of queueing it to expire. The estimate
    /// exists only for components that have been backlogged for a while.
    pub deadline_admission: bool,
    /// Starvation guard: a priority class with work is passed over by at most this many
    /// dispatches of unreserved workers in a row (plus one per other starving class)
    /// before a worker that may serve it takes from it. At least 1.
    pub max_priority_skips: u32,
    /// Per-tenant overrides, by tenant name.
    pub tenants: HashMap<String, TenantOverrides>,
}

/// Settings one tenant has instead of the defaults (a `[tenants.<name>]` table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantOverrides {
    /// Replaces [`QueueConfig::max_outstanding_per_tenant`].
    pub max_outstanding: Option<u32>,
    /// Replaces [`QueueConfig::max_queriers_per_tenant`].
    pub max_queriers: Option<u32>,
    /// Share of service relative to other tenants when all are backlogged (default 1): a
    /// visit credits the tenant `weight × cost_quantum` cost units.
    pub weight: Option<u32>,
    /// Priority class of the tenant's requests that name none (default 0).
    pub priority: Option<u8>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_outstanding_per_tenant: 100,
            max_queriers_per_tenant: 0,
            max_queued_requests: 1_000_000,
            max_queued_bytes: 1 << 30,
            querier_forget_delay: Duration::from_secs(30),
            cost_quantum: 1,
            max_cost: 1000,
            reserved_workers_percent: 0,
            reserved_min_priority: 1,
            lend_max_cost: 0,
            deadline_admission: true,
            max_priority_skips: 10,
            tenants: HashMap::new(),
        }
    }
}

/// A setting that cannot work, named by its configuration key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl QueueConfig {
    /// Checks every setting; the error names the key and what is wrong with it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, problem: &str| ConfigError {
            key: key.into(),
            problem: problem.into(),
        };
        if self.max_outstanding_per_tenant == 0 {
            return Err(err("max_outstanding_per_tenant", "must be at least 1"));
        }
        if self.max_queued_requests == 0 {
            return Err(err("max_queued_requests", "must be at least 1"));
        }
        if self.max_queued_bytes == 0 {
            return Err(err("max_queued_bytes", "must be at least 1"));
        }
        if self.cost_quantum == 0 {
            return Err(err("cost_quantum", "must be at least 1"));
        }
        if self.max_cost < self.cost_quantum {
            return Err(err("max_cost_hint", "must be at least cost_quantum"));
        }
        if self.reserved_workers_percent > 99 {
            return Err(err("reserved_workers_percent", "must be between 0 and 99"));
        }
        if self.max_priority_skips == 0 {
            return Err(err("max_priority_skips", "must be at least 1"));
        }
        for (tenant, o) in &self.tenants {
            if o.max_outstanding == Some(0) {
                return Err(err(&format!("tenants.{tenant}.max_outstanding"), "must be at least 1"));
            }
            if o.weight.is_some_and(|w| !(1..=1000).contains(&w)) {
                return Err(err(&format!("tenants.{tenant}.weight"), "must be between 1 and 1000"));
            }
        }
        Ok(())
    }

    /// The per-tenant request limit for `tenant`.
    pub fn max_outstanding(&self, tenant: &str) -> u32 {
        self.tenants
            .get(tenant)
            .and_then(|o| o.max_outstanding)
            .unwrap_or(self.max_outstanding_per_tenant)
    }

    /// The weight of `tenant` (1 unless overridden).
    pub fn weight(&self, tenant: &str) -> u32 {
        self.tenants.get(tenant).and_then(|o| o.weight).unwrap_or(1)
    }

    /// The priority class of `tenant`'s requests that name none (0 unless overridden).
    pub fn priority(&self, tenant: &str) -> u8 {
        self.tenants.get(tenant).and_then(|o| o.priority).unwrap_or(0)
    }

    /// The shuffle-shard size for `tenant` (0: every querier).
    pub fn max_queriers(&self, tenant: &str) -> u32 {
        self.tenants
            .get(tenant)
            .and_then(|o| o.max_queriers)
            .unwrap_or(self.max_queriers_per_tenant)
    }
}
