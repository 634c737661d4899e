//! The tenant level: tenants' slots in one global rotation, each querier's position in it
//! per component (shuffle shards respected), and deficit round robin in cost units
//! (weights, the quantum, measured-cost corrections, fast-forward over tenants in debt).

use std::collections::BTreeSet;
use std::ops::Bound;

use super::components::Component;
use super::slab::Handle;
use super::{Queued, TreeQueue, shard};

pub(super) struct Tenant {
    pub(super) name: Box<str>,
    pub(super) hash: u64,
    pub(super) queued: u32,
    pub(super) bytes: u64,
    pub(super) peak: u32,
    pub(super) max_outstanding: u32,
    pub(super) max_queriers: u32,
    /// Credit per visit, in multiples of the cost quantum.
    pub(super) weight: u32,
    /// Class of its requests that name none.
    pub(super) priority: u8,
    /// Deficit-round-robin balance in cost units (see [`super::TenantStats::balance`]).
    pub(super) balance: i64,
    /// Querier indexes allowed to serve it; `None`: all.
    pub(super) shard: Option<Vec<u32>>,
    /// Its root node in each component where it has (or had) work: (component, root). A
    /// root that empties is parked (kept, out of the rotation sets) until the tenant goes,
    /// so a class or component that drains and refills per request allocates nothing.
    pub(super) roots: Vec<(u32, Handle)>,
}

impl Tenant {
    /// Its credit per visit: `weight × quantum` (at most 1000 × u32::MAX, so it fits).
    pub(super) fn quantum(&self, quantum: u32) -> u64 {
        u64::from(self.weight) * u64::from(quantum)
    }
}

/// Tenants a worker may skip (for want of balance) in one dequeue before the rounds are
/// fast-forwarded; bounds the work of a dequeue when many tenants are in debt.
pub(super) const MAX_SKIPS: usize = 32;

impl Component {
    /// The first tenant slot after the querier's position (wrapping) that it may serve.
    pub(super) fn next_tenant(&self, querier: u32) -> Option<u32> {
        let q = querier as usize;
        let cursor = self.cursors.get(q).copied().flatten();
        let sharded = self.by_querier.get(q);
        let after = |set: &BTreeSet<u32>| match cursor {
            Some(c) => set.range((Bound::Excluded(c), Bound::Unbounded)).next().copied(),
            None => set.first().copied(),
        };
        let first = |set: &BTreeSet<u32>| set.first().copied();
        min_some(after(&self.unsharded), sharded.and_then(after))
            .or_else(|| min_some(first(&self.unsharded), sharded.and_then(first)))
    }

    /// Whether the querier may be served tenant `t` here (it has work and the querier is
    /// in its shard).
    pub(super) fn eligible(&self, querier: u32, t: u32) -> bool {
        self.unsharded.contains(&t) || self.by_querier.get(querier as usize).is_some_and(|s| s.contains(&t))
    }
}

/// Puts tenant `t` into the rotation sets of component `comp` for its shard.
pub(super) fn activate(comp: &mut Component, t: u32, shard: &Option<Vec<u32>>) {
    comp.active += 1;
    match shard {
        None => {
            comp.unsharded.insert(t);
        }
        Some(queriers) => {
            for &q in queriers {
                let q = q as usize;
                if comp.by_querier.len() <= q {
                    comp.by_querier.resize_with(q + 1, BTreeSet::new);
                }
                comp.by_querier[q].insert(t);
            }
        }
    }
}

pub(super) fn deactivate(comp: &mut Component, t: u32, shard: &Option<Vec<u32>>) {
    comp.active -= 1;
    match shard {
        None => {
            comp.unsharded.remove(&t);
        }
        Some(queriers) => {
            for &q in queriers {
                if let Some(set) = comp.by_querier.get_mut(q as usize) {
                    set.remove(&t);
                }
            }
        }
    }
}

fn min_some(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

impl<R: Queued> TreeQueue<R> {
    /// The tenant's slot, creating the tenant (in the lowest free slot) if it is new.
    pub(super) fn tenant_slot(&mut self, name: &str) -> u32 {
        if let Some(&t) = self.tenant_by_name.get(name) {
            return t;
        }
        let hash = shard::stable_hash(name);
        let max_queriers = self.config.max_queriers(name);
        let tenant = Tenant {
            name: name.into(),
            hash,
            queued: 0,
            bytes: 0,
            peak: 0,
            max_outstanding: self.config.max_outstanding(name),
            max_queriers,
            weight: self.config.weight(name),
            priority: self.config.priority(name),
            balance: 0,
            shard: shard::select(hash, max_queriers, &self.shard_candidates),
            roots: Vec::new(),
        };
        let t = match self.free_tenant_slots.pop_first() {
            Some(t) => {
                self.tenants[t as usize] = Some(tenant);
                t
            }
            None => {
                self.tenants.push(Some(tenant));
                (self.tenants.len() - 1) as u32
            }
        };
        self.tenant_by_name.insert(name.into(), t);
        t
    }

    /// A weight-1 tenant's credit per visit, in cost units: the configured quantum, or the
    /// largest cost now queued if that is more.
    pub(super) fn quantum(&self) -> u32 {
        let largest = self.queued_costs.last_key_value().map_or(1, |(cost, _)| *cost);
        self.config.cost_quantum.max(largest)
    }

    pub(super) fn set_cursor(&mut self, c: u32, q: u32, t: u32) {
        let comp = self.components[c as usize]
            .as_mut()
            .expect("selected component is live");
        if comp.cursors.len() <= q as usize {
            comp.cursors.resize(q as usize + 1, None);
        }
        comp.cursors[q as usize] = Some(t);
    }

    /// Every tenant a worker skipped is in debt: plays the rounds of visits, in the order
    /// they were skipped, until one is back in credit, crediting each tenant its quantum
    /// per visit as deficit round robin would; returns that one. The tenants after it in
    /// the order have had one visit fewer when it comes round.
    pub(super) fn fast_forward(&mut self, skipped: &[(u32, u32)]) -> (u32, u32) {
        let quantum = self.quantum();
        let needs: Vec<u64> = skipped
            .iter()
            .map(|&(_, t)| {
                let tenant = self.tenants[t as usize].as_ref().expect("skipped tenant is live");
                // A skipped tenant's balance is at most 0, so the debt is at least 1.
                let debt = 1u64.saturating_add(tenant.balance.unsigned_abs());
                debt.div_ceil(tenant.quantum(quantum))
            })
            .collect();
        let rounds = *needs.iter().min().expect("a fast-forward follows a skip");
        let winner = needs.iter().position(|&n| n == rounds).expect("the minimum is there");
        for (i, &(_, t)) in skipped.iter().enumerate() {
            let visits = if i <= winner { rounds } else { rounds - 1 };
            let tenant = self.tenants[t as usize].as_mut().expect("skipped tenant is live");
            let credit = visits.saturating_mul(tenant.quantum(quantum));
            tenant.balance = tenant.balance.saturating_add(i64::try_from(credit).unwrap_or(i64::MAX));
        }
        skipped[winner]
    }

    /// Corrects a tenant's balance once a query's real cost is known: `delta` is the
    /// measured cost minus the cost debited at dispatch. A positive delta is repaid over
    /// the tenant's next visits; a refund never lifts the balance above one visit's
    /// credit. Returns false if the tenant has nothing queued (its balance, like deficit
    /// round robin's, started afresh when it emptied).
    pub fn charge(&mut self, tenant: &str, delta: i64) -> bool {
        let Some(&t) = self.tenant_by_name.get(tenant) else {
            return false;
        };
        let quantum = self.quantum();
        let max = i64::from(self.config.max_cost);
        let delta = delta.clamp(-max, max);
        let tenant = self.tenants[t as usize].as_mut().expect("tenant slot is live");
        let cap = tenant.quantum(quantum) as i64;
        tenant.balance = tenant.balance.saturating_sub(delta).min(cap.max(tenant.balance));
        true
    }
}
