//! The fair tree queue: where every waiting sub-query sits, and which one each querier
//! worker gets next.
//!
//! A plain data structure and state machine: no I/O, no async, no clock of its own. Every
//! call that depends on time takes `now`, so tests drive it with a fake clock and get the
//! same answer every run. The server owns one `TreeQueue` and translates frames into
//! calls on it.
//!
//! A request is queued under the path `component / tenant / actor_1 / … / actor_n`:
//!
//! - **priority class** (a small integer; higher first): a worker takes from the highest
//!   class it can serve, except that a class passed over
//!   [`max_priority_skips`](QueueConfig::max_priority_skips) times in a row gets the next
//!   dispatch it can take, and workers reserved for high priorities
//!   ([`reserved_workers_percent`](QueueConfig::reserved_workers_percent)) never take from
//!   lower classes.
//! - **component** (the backend the request will hit; one unnamed component for requests
//!   that name none): a worker starts at component `slot mod n` of the components that
//!   have work, in name order, and moves on to the next when that one has nothing for it,
//!   so workers are spread across backends and none idles while it could work.
//! - **tenant**: tenants hold slots in one global rotation (a removed tenant's slot is
//!   reused by the next new one); each querier keeps its own position per component and
//!   takes the next tenant after it that has work *and* has that querier in its shuffle
//!   shard. Finding that tenant costs O(log tenants), whatever the sharding. Tenants are
//!   served by deficit round robin in cost units: each visit credits the tenant
//!   `weight × quantum`, each dispatch debits the request's cost, and the visit lasts
//!   while the balance is positive (see [`TreeQueue::charge`] for measured costs). The
//!   quantum is the largest cost now queued (at least
//!   [`cost_quantum`](QueueConfig::cost_quantum); costs are clamped to
//!   [`max_cost`](QueueConfig::max_cost)), so a visit always serves at least one request
//!   unless measured costs put the tenant in debt, a dequeue costs O(1) visits, and one
//!   expensive request weighs on the others only while it waits.
//! - **actors**, any depth: round robin among the children and the node's own FIFO at
//!   every level, so one user, dashboard or query cannot crowd out its siblings.
//!
//! Every request leaves exactly once, as dispatched, cancelled, expired or handed back
//! (see [`Counters`]); one that is refused at enqueue is returned to the caller.
//!
//! This file holds the API and [`TreeQueue::dequeue`], the walk that composes the levels;
//! each level's policy has a file of its own: `classes.rs` (priority, reserved workers,
//! starvation guard), `components.rs` (spreading workers over backends), `tenants.rs`
//! (the rotation, shuffle shards, deficit round robin) and `tree.rs` (actors). `stats.rs`
//! holds the figures the status page and metrics read.

mod classes;
pub mod cluster;
mod components;
mod config;
mod explain;
mod queriers;
mod shard;
mod slab;
mod stats;
mod tenants;
mod tree;
mod types;
mod wait;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// The hash map used on hot paths: foldhash, seeded per map.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::time::{Duration, Instant};

pub use config::{ConfigError, QueueConfig, TenantOverrides};
pub use explain::{Explain, ExplainNode, ExplainRequest, TenantPolicy};
pub use queriers::WorkerId;
pub(crate) use shard::mix as mix64;

pub use stats::{QuerierStats, TenantStats};
pub use types::{
    Counters, Dequeue, Dispatched, EnqueueOptions, Expired, QueryKey, QueuePath, Queued, RejectReason, Rejected,
};

use classes::Class;
use components::Component;
use queriers::{Membership, Queriers};
use slab::{Handle, Slab};
use tenants::{MAX_SKIPS, Tenant, activate, deactivate};
use tree::Nodes;

/// Deadlines are indexed in buckets of this many nanoseconds.
const DEADLINE_BUCKET_NS: u64 = 100_000_000;

struct Entry<R> {
    request: R,
    key: QueryKey,
    tenant: u32,
    component: u32,
    leaf: Handle,
    /// Nanoseconds since the queue's epoch.
    enqueued_at: u64,
    /// Nanoseconds since the epoch; 0: no deadline.
    deadline: u64,
    bytes: u64,
    /// Cost debited from the tenant at dispatch (at least 1).
    cost: u32,
}

/// Emptied actor nodes listed for the sweep before one runs without waiting for `expire`.
const PARKED_NODES_SWEEP: usize = 4096;

/// The fair tree queue. `R` is the caller's request type.
pub struct TreeQueue<R> {
    config: QueueConfig,
    epoch: Instant,
    requests: Slab<Entry<R>>,
    by_key: FastMap<QueryKey, Handle>,
    nodes: Nodes,
    tenants: Vec<Option<Tenant>>,
    tenant_by_name: FastMap<Box<str>, u32>,
    free_tenant_slots: BTreeSet<u32>,
    components: Vec<Option<Component>>,
    /// Classes with work, highest priority first.
    classes: Vec<Class>,
    queriers: Queriers,
    /// `(index, hash)` of the queriers shards are cut from; refreshed on membership change.
    shard_candidates: Vec<(u32, u64)>,
    /// Request handles by deadline bucket; entries of requests already gone are skipped.
    deadlines: BTreeMap<u64, Vec<Handle>>,
    expired: VecDeque<Expired<R>>,
    queued_bytes: u64,
    /// How many queued requests have each cost (clamped to [`QueueConfig::max_cost`]): the
    /// quantum is the largest, so one expensive (or lying) request lifts the tenants'
    /// credit only while it waits, and never above the configured maximum.
    queued_costs: BTreeMap<u32, u32>,
    counters: Counters,
}

impl<R: Queued> TreeQueue<R> {
    /// An empty queue. `epoch` is any instant not after the first `now` passed in.
    pub fn new(config: QueueConfig, epoch: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(TreeQueue {
            config,
            epoch,
            requests: Slab::default(),
            by_key: FastMap::default(),
            nodes: Nodes::default(),
            tenants: Vec::new(),
            tenant_by_name: FastMap::default(),
            free_tenant_slots: BTreeSet::new(),
            components: Vec::new(),
            classes: Vec::new(),
            queriers: Queriers::default(),
            shard_candidates: Vec::new(),
            deadlines: BTreeMap::new(),
            expired: VecDeque::new(),
            queued_bytes: 0,
            queued_costs: BTreeMap::new(),
            counters: Counters::default(),
        })
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
    }

    /// The settings in force.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Replaces the settings (for example after a reload). Limits apply to the next
    /// enqueue; shards are recomputed at once. Nothing queued is dropped, even by a lower
    /// limit.
    pub fn set_config(&mut self, config: QueueConfig) -> Result<(), ConfigError> {
        config.validate()?;
        for tenant in self.tenants.iter_mut().flatten() {
            tenant.max_outstanding = config.max_outstanding(&tenant.name);
            tenant.max_queriers = config.max_queriers(&tenant.name);
            tenant.weight = config.weight(&tenant.name);
            tenant.priority = config.priority(&tenant.name);
        }
        self.config = config;
        self.reshard();
        Ok(())
    }

    /// Queues `request` under its path, or refuses it (handing it back) if a limit is
    /// reached, its key is already queued, or it would miss its deadline.
    pub fn enqueue(
        &mut self,
        now: Instant,
        key: QueryKey,
        request: R,
        options: EnqueueOptions,
    ) -> Result<(), Rejected<R>> {
        self.enqueue_inner(now, key, request, options, false).map(|_| ())
    }

    /// As [`enqueue`](Self::enqueue), and returns the wait the request can expect before
    /// dispatch, when its component's rate is known (see [`estimated_wait`](Self::estimated_wait)).
    pub fn enqueue_estimated(
        &mut self,
        now: Instant,
        key: QueryKey,
        request: R,
        options: EnqueueOptions,
    ) -> Result<Option<Duration>, Rejected<R>> {
        self.enqueue_inner(now, key, request, options, true)
    }

    /// `estimate`: the caller wants the estimated wait (otherwise it is looked up only
    /// for deadline admission).
    fn enqueue_inner(
        &mut self,
        now: Instant,
        key: QueryKey,
        request: R,
        options: EnqueueOptions,
        estimate: bool,
    ) -> Result<Option<Duration>, Rejected<R>> {
        let admitted = self
            .admit_deadline(now, request.path(), options.priority, options.deadline, estimate)
            .map_err(|estimated_wait| RejectReason::WouldMissDeadline { estimated_wait })
            .and_then(|estimate| self.admit(key, &request, options.allowance).map(|()| estimate));
        let estimate = match admitted {
            Ok(estimate) => estimate,
            Err(reason) => {
                self.counters.rejected += 1;
                return Err(Rejected { reason, request });
            }
        };
        let bytes = request.size_bytes();
        let path = request.path();
        let t = self.tenant_slot(path.tenant);
        let priority = options
            .priority
            .unwrap_or_else(|| self.tenants[t as usize].as_ref().expect("tenant slot is live").priority);
        let c = self.component_slot(priority, path.component.unwrap_or(""));
        let root = self.tenant_root(c, t);
        let leaf = tree::attach_path(&mut self.nodes, root, path.actors);

        let enqueued_at = self.nanos(now);
        let deadline = options.deadline.map_or(0, |d| self.nanos(d).max(1));
        let cost = options.cost.clamp(1, self.config.max_cost);
        let h = self.requests.insert(Entry {
            request,
            key,
            tenant: t,
            component: c,
            leaf,
            enqueued_at,
            deadline,
            bytes,
            cost,
        });
        *self.queued_costs.entry(cost).or_default() += 1;
        tree::push_request(&mut self.nodes, leaf, h);
        self.by_key.insert(key, h);
        if deadline != 0 {
            self.deadlines.entry(deadline / DEADLINE_BUCKET_NS).or_default().push(h);
        }
        let tenant = self.tenants[t as usize].as_mut().expect("tenant slot is live");
        tenant.queued += 1;
        tenant.bytes += bytes;
        tenant.peak = tenant.peak.max(tenant.queued);
        let comp = self.components[c as usize].as_mut().expect("component is live");
        if comp.queued == 0 {
            comp.rate.backlog_starts(enqueued_at);
        }
        comp.queued += 1;
        self.queued_bytes += bytes;
        self.counters.enqueued += 1;
        Ok(estimate)
    }

    fn admit(&self, key: QueryKey, request: &R, allowance: Option<u32>) -> Result<(), RejectReason> {
        if self.by_key.contains_key(&key) {
            return Err(RejectReason::Duplicate);
        }
        if self.requests.len() >= self.config.max_queued_requests {
            return Err(RejectReason::QueueFull {
                limit: self.config.max_queued_requests,
            });
        }
        if self.queued_bytes.saturating_add(request.size_bytes()) > self.config.max_queued_bytes {
            return Err(RejectReason::QueueBytesFull {
                limit: self.config.max_queued_bytes,
            });
        }
        let tenant = request.path().tenant;
        let limit = match self.tenant_by_name.get(tenant) {
            Some(&t) => {
                let tenant = self.tenants[t as usize].as_ref().expect("tenant slot is live");
                let most = allowance.map_or(tenant.max_outstanding, |a| a.min(tenant.max_outstanding));
                (tenant.queued >= most).then_some(tenant.max_outstanding)
            }
            // Nothing queued here: only the others' share can refuse it.
            None => (allowance == Some(0)).then(|| self.config.max_outstanding(tenant)),
        };
        match limit {
            Some(limit) => Err(RejectReason::TooManyOutstanding { limit }),
            None => Ok(()),
        }
    }

    /// The tenant's root node in component `c`, creating it (or unparking it) and entering
    /// the tenant into the component's rotation if needed.
    fn tenant_root(&mut self, c: u32, t: u32) -> Handle {
        let tenant = self.tenants[t as usize].as_mut().expect("tenant slot is live");
        let comp = self.components[c as usize].as_mut().expect("component is live");
        if let Some(&(_, root)) = tenant.roots.iter().find(|(x, _)| *x == c) {
            if self.nodes[root].live == 0 {
                comp.parked_roots -= 1;
                activate(comp, t, &tenant.shard);
            }
            return root;
        }
        let root = self.nodes.insert(None, &tenant.name);
        tenant.roots.push((c, root));
        activate(comp, t, &tenant.shard);
        root
    }

    /// Removes a request's entry and updates every count above its leaf; frees the
    /// tenant's root, the component and the tenant when they empty. The leaf's own
    /// bookkeeping (`tree::pop` or `tree::detach`) must already be done.
    fn take_entry(&mut self, h: Handle) -> Entry<R> {
        let e = self.requests.remove(h).expect("queued request");
        if let Some(n) = self.queued_costs.get_mut(&e.cost) {
            *n -= 1;
            if *n == 0 {
                self.queued_costs.remove(&e.cost);
            }
        }
        self.by_key.remove(&e.key);
        self.queued_bytes -= e.bytes;
        let (t, c) = (e.tenant, e.component);
        let tenant = self.tenants[t as usize].as_mut().expect("tenant slot is live");
        tenant.queued -= 1;
        tenant.bytes -= e.bytes;
        let comp = self.components[c as usize].as_mut().expect("component is live");
        comp.queued -= 1;
        let &(_, root) = tenant
            .roots
            .iter()
            .find(|(x, _)| *x == c)
            .expect("tenant has a root here");
        if self.nodes[root].live == 0 {
            comp.parked_roots += 1;
            deactivate(comp, t, &tenant.shard);
        }
        if comp.queued == 0 {
            // Parked: out of the rotation, freed by the next sweep unless it refills.
            let priority = comp.priority;
            let class = self
                .classes
                .iter_mut()
                .find(|k| k.priority == priority)
                .expect("component's class is live");
            class.order.retain(|&x| x != c);
            if class.order.is_empty() {
                class.passed = 0;
            }
        }
        if tenant.queued == 0 {
            let tenant = self.tenants[t as usize].take().expect("tenant slot is live");
            self.tenant_by_name.remove(&tenant.name);
            self.free_tenant_slots.insert(t);
            for (c, root) in tenant.roots {
                self.nodes.free_subtree(root);
                self.components[c as usize]
                    .as_mut()
                    .expect("a component with parked roots is kept")
                    .parked_roots -= 1;
            }
        }
        if self.nodes.parked_len() >= PARKED_NODES_SWEEP {
            // Bounds the parked list for callers that do not call `expire` often.
            self.nodes.sweep();
        }
        e
    }

    /// Hands `worker` its next request: fairly chosen, within its querier's shards, never
    /// one past its deadline (those go to [`poll_expired`](Self::poll_expired)).
    pub fn dequeue(&mut self, now: Instant, worker: WorkerId) -> Dequeue<R> {
        let Some(q) = self.queriers.slab.get(worker.querier) else {
            return Dequeue::UnknownWorker;
        };
        if q.workers.get(worker.slot as usize).copied().flatten().is_none() {
            return Dequeue::UnknownWorker;
        }
        if q.shutting_down {
            return Dequeue::ShuttingDown;
        }
        let qi = worker.querier.idx;
        let reserved = self.is_reserved(worker);
        let now_ns = self.nanos(now);
        let mut skipped: Vec<(u32, u32)> = Vec::new();
        loop {
            let Some((k, (c, t, continued))) = self.select(qi, worker.lane, reserved) else {
                return Dequeue::Empty;
            };
            let (c, t) = if continued {
                (c, t)
            } else if skipped.contains(&(c, t)) || skipped.len() >= MAX_SKIPS {
                self.fast_forward(&skipped)
            } else {
                let quantum = self.quantum();
                let tenant = self.tenants[t as usize].as_mut().expect("selected tenant is live");
                tenant.balance = tenant.balance.saturating_add(tenant.quantum(quantum) as i64);
                if tenant.balance <= 0 {
                    skipped.push((c, t));
                    self.set_cursor(c, qi, t);
                    continue;
                }
                (c, t)
            };
            self.set_cursor(c, qi, t);
            let priority = self.classes[k].priority;
            let tenant = self.tenants[t as usize].as_ref().expect("selected tenant is live");
            let root = tenant
                .roots
                .iter()
                .find(|(x, _)| *x == c)
                .expect("tenant has a root here")
                .1;
            let requests = &self.requests;
            let h = tree::pop(&mut self.nodes, root, |h| requests.contains(h)).expect("active tenant has work");
            let e = self.take_entry(h);
            let queue_time = Duration::from_nanos(now_ns.saturating_sub(e.enqueued_at));
            if e.deadline != 0 && e.deadline <= now_ns {
                self.counters.expired += 1;
                self.expired.push_back(Expired {
                    key: e.key,
                    request: e.request,
                    queue_time,
                });
                skipped.clear(); // the skipped tenants may have changed; start afresh
                continue;
            }
            if let Some(tenant) = self.tenants[t as usize].as_mut() {
                tenant.balance = tenant.balance.saturating_sub(i64::from(e.cost));
            }
            if let Some(comp) = self.components[c as usize].as_mut() {
                let left = comp.queued;
                comp.rate.dispatched(now_ns, left);
            }
            self.note_served(priority, reserved);
            self.counters.dispatched += 1;
            return Dequeue::Dispatch(Dispatched {
                key: e.key,
                request: e.request,
                queue_time,
                deadline: (e.deadline != 0).then(|| self.instant(e.deadline)),
                priority,
            });
        }
    }

    /// Moves every queued request whose deadline is at or before `now` to the expired
    /// outbox; returns how many. Call it periodically (every 100 ms is plenty): it also
    /// frees the components that emptied since the last call.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.sweep_parked();
        self.nodes.sweep();
        let now_ns = self.nanos(now);
        let last_bucket = now_ns / DEADLINE_BUCKET_NS;
        let mut not_yet = Vec::new();
        let mut count = 0;
        while let Some(bucket) = self.deadlines.first_entry() {
            if *bucket.key() > last_bucket {
                break;
            }
            for h in bucket.remove() {
                match self.requests.get(h) {
                    Some(e) if e.deadline <= now_ns => {
                        let leaf = e.leaf;
                        tree::detach(&mut self.nodes, leaf);
                        let e = self.take_entry(h);
                        self.counters.expired += 1;
                        self.expired.push_back(Expired {
                            key: e.key,
                            request: e.request,
                            queue_time: Duration::from_nanos(now_ns.saturating_sub(e.enqueued_at)),
                        });
                        count += 1;
                    }
                    Some(_) => not_yet.push(h),
                    None => {} // already dispatched or cancelled
                }
            }
        }
        if !not_yet.is_empty() {
            self.deadlines.insert(last_bucket, not_yet);
        }
        count
    }

    /// The next request that expired while queued, oldest first.
    pub fn poll_expired(&mut self) -> Option<Expired<R>> {
        self.expired.pop_front()
    }

    /// Removes a queued request at once, freeing its place under the tenant's limit.
    /// `None` if it is not queued (already dispatched, expired, or unknown).
    pub fn cancel(&mut self, key: QueryKey) -> Option<R> {
        let &h = self.by_key.get(&key)?;
        let leaf = self.requests[h].leaf;
        tree::detach(&mut self.nodes, leaf);
        let e = self.take_entry(h);
        self.counters.cancelled += 1;
        Some(e.request)
    }

    /// Cancels every request queued by `frontend` (its connection closed), in key order.
    pub fn cancel_frontend(&mut self, frontend: u64) -> Vec<(QueryKey, R)> {
        let mut keys: Vec<QueryKey> = self.by_key.keys().filter(|k| k.frontend == frontend).copied().collect();
        keys.sort_unstable();
        keys.into_iter()
            .filter_map(|k| self.cancel(k).map(|r| (k, r)))
            .collect()
    }

    /// Empties the queue at shutdown, handing every request back, oldest first, so its
    /// frontend can enqueue it elsewhere.
    pub fn drain(&mut self) -> Vec<(QueryKey, R)> {
        let mut entries = self.requests.drain();
        entries.sort_by_key(|e| e.enqueued_at);
        self.counters.handed_back += entries.len() as u64;
        self.by_key.clear();
        self.nodes = Nodes::default();
        self.tenants.clear();
        self.tenant_by_name.clear();
        self.free_tenant_slots.clear();
        self.components.clear();
        self.classes.clear();
        self.deadlines.clear();
        self.queued_bytes = 0;
        self.queued_costs.clear();
        entries.into_iter().map(|e| (e.key, e.request)).collect()
    }

    /// Registers a worker of querier `querier` (a new querier joins the shards; one
    /// inside its forget delay gets its old place back), in a lane of its own.
    pub fn register_worker(&mut self, now: Instant, querier: &str) -> WorkerId {
        self.register(now, querier, None)
    }

    /// Registers a worker of querier `querier` in `lane`: the workers of one lane take
    /// turns on one handler (a prefetching worker loop's slots), so they start at the same
    /// component and are reserved for high priorities together ([`WorkerId::lane`]).
    pub fn register_worker_in_lane(&mut self, now: Instant, querier: &str, lane: u16) -> WorkerId {
        self.register(now, querier, Some(lane))
    }

    fn register(&mut self, _now: Instant, querier: &str, lane: Option<u16>) -> WorkerId {
        let (w, membership) = self.queriers.register(querier, lane);
        if membership == Membership::Changed {
            self.reshard();
        }
        w
    }

    /// Unregisters a worker. When its querier's last worker goes, the querier is
    /// forgotten at once if it announced shutdown or the forget delay is zero, otherwise
    /// after the delay (see [`forget_disconnected_queriers`](Self::forget_disconnected_queriers)).
    pub fn unregister_worker(&mut self, now: Instant, worker: WorkerId) {
        let now_ns = self.nanos(now);
        let immediately = self.config.querier_forget_delay.is_zero();
        if self.queriers.unregister(worker, now_ns, immediately) == Membership::Changed {
            self.reshard();
        }
    }

    /// Marks a querier as shutting down: its workers get [`Dequeue::ShuttingDown`], and it
    /// is forgotten as soon as its last worker goes. Returns whether it was known.
    pub fn notify_querier_shutdown(&mut self, _now: Instant, querier: &str) -> bool {
        let (known, membership) = self.queriers.shutting_down(querier);
        if membership == Membership::Changed {
            self.reshard();
        }
        known
    }

    /// Forgets queriers that have had no worker for the forget delay; returns how many.
    /// Call it periodically.
    pub fn forget_disconnected_queriers(&mut self, now: Instant) -> usize {
        let delay = u64::try_from(self.config.querier_forget_delay.as_nanos()).unwrap_or(u64::MAX);
        let n = self.queriers.forget_disconnected(self.nanos(now), delay);
        if n > 0 {
            self.reshard();
        }
        n
    }

    /// Recomputes every queued tenant's shard from the current queriers, moving only the
    /// tenants whose shard changed.
    fn reshard(&mut self) {
        self.shard_candidates = self.queriers.shard_candidates();
        for (t, slot) in self.tenants.iter_mut().enumerate() {
            let Some(tenant) = slot else { continue };
            let shard = shard::select(tenant.hash, tenant.max_queriers, &self.shard_candidates);
            if shard == tenant.shard {
                continue;
            }
            for &(c, root) in &tenant.roots {
                if self.nodes[root].live == 0 {
                    continue; // parked: in no rotation set
                }
                let comp = self.components[c as usize]
                    .as_mut()
                    .expect("tenant's component is live");
                deactivate(comp, t as u32, &tenant.shard);
                activate(comp, t as u32, &shard);
            }
            tenant.shard = shard;
        }
    }

    /// Requests queued.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.requests.len() == 0
    }

    /// Payload bytes queued.
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    /// How requests have left the queue so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Checks every internal invariant, walking the whole structure (O(size)); for tests
    /// and debugging. Returns the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        invariants::check(self)
    }
}

mod invariants;
