//! What the status page, `/explain` and the metrics read: per-tenant and per-querier
//! figures.

use std::time::{Duration, Instant};

use super::{Queued, TreeQueue, tree};

/// What the status page and metrics show per tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantStats {
    pub tenant: String,
    pub queued: u32,
    pub queued_bytes: u64,
    /// Most requests queued at once since the tenant last had none.
    pub peak: u32,
    /// Age of its oldest queued request.
    pub oldest: Duration,
    /// Queriers in its shard; `None`: every querier.
    pub shard_size: Option<usize>,
    /// Share of service relative to other tenants when all are backlogged.
    pub weight: u32,
    /// Priority class of its requests that name none.
    pub priority: u8,
    /// Its deficit-round-robin balance in cost units: positive, credit left in the
    /// current visit; negative, cost served beyond its share, repaid over later visits.
    pub balance: i64,
}

/// What the status page shows per querier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuerierStats {
    pub querier: String,
    pub workers: u32,
    pub shutting_down: bool,
    /// How long it has had no worker, if it has none (it is forgotten after the delay).
    pub disconnected_for: Option<Duration>,
}

impl<R: Queued> TreeQueue<R> {
    /// Tenants with queued requests.
    pub fn tenant_count(&self) -> usize {
        self.tenant_by_name.len()
    }

    /// Every tenant with requests queued: (name, queued, its limit), in no order.
    pub fn tenant_loads(&self) -> impl Iterator<Item = (&str, u32, u32)> {
        self.tenants
            .iter()
            .flatten()
            .map(|t| (&*t.name, t.queued, t.max_outstanding))
    }

    /// Requests of `tenant` queued (0 for a tenant with none).
    pub fn queued_of(&self, tenant: &str) -> u32 {
        self.tenant_by_name
            .get(tenant)
            .and_then(|&t| self.tenants[t as usize].as_ref())
            .map_or(0, |t| t.queued)
    }

    /// Whether `tenant` has requests queued.
    pub fn has_tenant(&self, tenant: &str) -> bool {
        self.tenant_by_name.contains_key(tenant)
    }

    /// Known queriers (connected, or disconnected inside the forget delay).
    pub fn querier_count(&self) -> usize {
        self.queriers.by_id.len()
    }

    /// The queriers in `tenant`'s shard, by id; `None` if it may use every querier or
    /// has nothing queued.
    pub fn tenant_shard(&self, tenant: &str) -> Option<Vec<String>> {
        let &t = self.tenant_by_name.get(tenant)?;
        let shard = self.tenants[t as usize].as_ref()?.shard.as_ref()?;
        let mut ids: Vec<String> = self
            .queriers
            .slab
            .iter()
            .filter(|(h, _)| shard.contains(&h.idx))
            .map(|(_, q)| q.id.to_string())
            .collect();
        ids.sort();
        Some(ids)
    }

    /// Per-tenant figures, sorted by tenant. Costs O(nodes) for the oldest ages.
    pub fn tenant_stats(&self, now: Instant) -> Vec<TenantStats> {
        let now_ns = self.nanos(now);
        let mut out: Vec<TenantStats> = self
            .tenants
            .iter()
            .filter_map(|slot| {
                let tenant = slot.as_ref()?;
                let oldest = tenant
                    .roots
                    .iter()
                    .filter_map(|&(_, root)| {
                        tree::oldest(&self.nodes, root, |h| self.requests.get(h).map(|e| e.enqueued_at))
                    })
                    .min()
                    .unwrap_or(now_ns);
                Some(TenantStats {
                    tenant: tenant.name.to_string(),
                    queued: tenant.queued,
                    queued_bytes: tenant.bytes,
                    peak: tenant.peak,
                    oldest: Duration::from_nanos(now_ns.saturating_sub(oldest)),
                    shard_size: tenant.shard.as_ref().map(Vec::len),
                    weight: tenant.weight,
                    priority: tenant.priority,
                    balance: tenant.balance,
                })
            })
            .collect();
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }

    /// Per-querier figures, sorted by querier id.
    pub fn querier_stats(&self, now: Instant) -> Vec<QuerierStats> {
        let now_ns = self.nanos(now);
        let mut out: Vec<QuerierStats> = self
            .queriers
            .slab
            .iter()
            .map(|(_, q)| QuerierStats {
                querier: q.id.to_string(),
                workers: q.connected,
                shutting_down: q.shutting_down,
                disconnected_for: q
                    .disconnected_at
                    .map(|t| Duration::from_nanos(now_ns.saturating_sub(t))),
            })
            .collect();
        out.sort_by(|a, b| a.querier.cmp(&b.querier));
        out
    }
}
