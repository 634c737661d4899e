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

mod config;
mod explain;
mod queriers;
mod shard;
mod slab;
mod tree;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// The hash map used on hot paths: foldhash, seeded per map.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::ops::Bound;
use std::time::{Duration, Instant};

use thiserror::Error;

pub use config::{ConfigError, QueueConfig, TenantOverrides};
pub use explain::{Explain, ExplainNode, ExplainRequest, TenantPolicy};
pub use queriers::WorkerId;
pub(crate) use shard::mix as mix64;

use queriers::{Membership, Queriers};
use slab::{Handle, Slab};
use tree::Nodes;

/// Identifies a queued request: the frontend connection that sent it and its id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueryKey {
    pub frontend: u64,
    pub query: u64,
}

/// Where a request is queued.
#[derive(Debug, Clone, Copy)]
pub struct QueuePath<'a> {
    pub component: Option<&'a str>,
    pub tenant: &'a str,
    pub actors: &'a [String],
}

/// What the queue needs to know of a request it holds.
pub trait Queued {
    /// The request's place in the tree.
    fn path(&self) -> QueuePath<'_>;
    /// Bytes the request occupies, counted against the global byte limit.
    fn size_bytes(&self) -> u64;
}

/// Per-request scheduling inputs besides the path.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnqueueOptions {
    /// Past this instant the request is never dispatched: it comes out as [`Expired`].
    pub deadline: Option<Instant>,
    /// Priority class; `None`: the tenant's configured priority.
    pub priority: Option<u8>,
    /// Expected cost in the operator's units, debited from the tenant's balance at
    /// dispatch; 0 counts as 1.
    pub cost: u32,
}

/// Why an enqueue was refused. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RejectReason {
    #[error("the tenant already has {limit} requests queued, its limit")]
    TooManyOutstanding { limit: u32 },
    #[error("the queue holds {limit} requests, its limit")]
    QueueFull { limit: usize },
    #[error("queued payloads would exceed {limit} bytes, the limit")]
    QueueBytesFull { limit: u64 },
    #[error("a request with this key is already queued")]
    Duplicate,
}

/// A refused request, handed back with the reason so it is never lost.
#[derive(Debug)]
pub struct Rejected<R> {
    pub reason: RejectReason,
    pub request: R,
}

/// The answer to a worker asking for work.
#[derive(Debug)]
pub enum Dequeue<R> {
    /// Run this request.
    Dispatch(Dispatched<R>),
    /// Nothing this worker may take is queued; ask again when something is enqueued.
    Empty,
    /// The worker's querier announced shutdown: it gets no more work.
    ShuttingDown,
    /// The worker is not registered (it was unregistered, or its querier forgotten).
    UnknownWorker,
}

/// A request handed to a worker.
#[derive(Debug)]
pub struct Dispatched<R> {
    pub key: QueryKey,
    pub request: R,
    /// Time from enqueue to this dispatch.
    pub queue_time: Duration,
    pub deadline: Option<Instant>,
}

/// A request whose deadline passed while it was queued; its frontend must be told.
#[derive(Debug)]
pub struct Expired<R> {
    pub key: QueryKey,
    pub request: R,
    pub queue_time: Duration,
}

/// How every request that entered the queue left it. At all times
/// `enqueued == dispatched + cancelled + expired + handed_back + queued`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub enqueued: u64,
    pub dispatched: u64,
    pub cancelled: u64,
    pub expired: u64,
    pub handed_back: u64,
    /// Refused at enqueue (never entered, so not part of the equation above).
    pub rejected: u64,
}

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

struct Tenant {
    name: Box<str>,
    hash: u64,
    queued: u32,
    bytes: u64,
    peak: u32,
    max_outstanding: u32,
    max_queriers: u32,
    /// Credit per visit, in multiples of the cost quantum.
    weight: u32,
    /// Class of its requests that name none.
    priority: u8,
    /// Deficit-round-robin balance in cost units (see [`TenantStats::balance`]).
    balance: i64,
    /// Querier indexes allowed to serve it; `None`: all.
    shard: Option<Vec<u32>>,
    /// Its root node in each component where it has (or had) work: (component, root). A
    /// root that empties is parked (kept, out of the rotation sets) until the tenant goes,
    /// so a class or component that drains and refills per request allocates nothing.
    roots: Vec<(u32, Handle)>,
}

impl Tenant {
    /// Its credit per visit: `weight × quantum` (at most 1000 × u32::MAX, so it fits).
    fn quantum(&self, quantum: u32) -> u64 {
        u64::from(self.weight) * u64::from(quantum)
    }
}

struct Component {
    name: Box<str>,
    /// The priority class it belongs to: the same backend in two classes is two components.
    priority: u8,
    queued: u32,
    /// Tenants' parked roots here: the component is not freed while any remain.
    parked_roots: u32,
    /// Tenant slots with work here that every querier may serve.
    unsharded: BTreeSet<u32>,
    /// Tenant slots with work here, per querier index in their shard.
    by_querier: Vec<BTreeSet<u32>>,
    /// Each querier's position in the tenant rotation: the tenant it is visiting (served
    /// last). The visit goes on while that tenant's balance is positive.
    cursors: Vec<Option<u32>>,
}

/// One priority class with work: its components, and how long it has been passed over.
struct Class {
    priority: u8,
    /// Its components with work, in name order: the order workers are spread over.
    order: Vec<u32>,
    by_name: FastMap<Box<str>, u32>,
    /// Dispatches by unreserved workers that went to a higher class since this class was
    /// last served.
    passed: u32,
}

/// Emptied actor nodes listed for the sweep before one runs without waiting for `expire`.
const PARKED_NODES_SWEEP: usize = 4096;

/// Tenants a worker may skip (for want of balance) in one dequeue before the rounds are
/// fast-forwarded; bounds the work of a dequeue when many tenants are in debt.
const MAX_SKIPS: usize = 32;

impl Component {
    /// The first tenant slot after the querier's position (wrapping) that it may serve.
    fn next_tenant(&self, querier: u32) -> Option<u32> {
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
    fn eligible(&self, querier: u32, t: u32) -> bool {
        self.unsharded.contains(&t) || self.by_querier.get(querier as usize).is_some_and(|s| s.contains(&t))
    }
}

fn min_some(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// Puts tenant `t` into the rotation sets of component `comp` for its shard.
fn activate(comp: &mut Component, t: u32, shard: &Option<Vec<u32>>) {
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

fn deactivate(comp: &mut Component, t: u32, shard: &Option<Vec<u32>>) {
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
    /// reached or its key is already queued.
    pub fn enqueue(
        &mut self,
        now: Instant,
        key: QueryKey,
        request: R,
        options: EnqueueOptions,
    ) -> Result<(), Rejected<R>> {
        if let Err(reason) = self.admit(key, &request) {
            self.counters.rejected += 1;
            return Err(Rejected { reason, request });
        }
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
        self.components[c as usize].as_mut().expect("component is live").queued += 1;
        self.queued_bytes += bytes;
        self.counters.enqueued += 1;
        Ok(())
    }

    fn admit(&self, key: QueryKey, request: &R) -> Result<(), RejectReason> {
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
                (tenant.queued >= tenant.max_outstanding).then_some(tenant.max_outstanding)
            }
            None => None,
        };
        match limit {
            Some(limit) => Err(RejectReason::TooManyOutstanding { limit }),
            None => Ok(()),
        }
    }

    /// The tenant's slot, creating the tenant (in the lowest free slot) if it is new.
    fn tenant_slot(&mut self, name: &str) -> u32 {
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

    /// The component `name` of class `priority`, creating both if needed, and in its
    /// class's rotation (a parked one is put back).
    fn component_slot(&mut self, priority: u8, name: &str) -> u32 {
        let k = match self.classes.iter().position(|k| k.priority <= priority) {
            Some(k) if self.classes[k].priority == priority => k,
            at => {
                let k = at.unwrap_or(self.classes.len());
                self.classes.insert(
                    k,
                    Class {
                        priority,
                        order: Vec::new(),
                        by_name: FastMap::default(),
                        passed: 0,
                    },
                );
                k
            }
        };
        let c = match self.classes[k].by_name.get(name) {
            Some(&c)
                if self.components[c as usize]
                    .as_ref()
                    .expect("named component is live")
                    .queued
                    > 0 =>
            {
                return c;
            }
            Some(&c) => c, // parked
            None => {
                let comp = Component {
                    name: name.into(),
                    priority,
                    queued: 0,
                    parked_roots: 0,
                    unsharded: BTreeSet::new(),
                    by_querier: Vec::new(),
                    cursors: Vec::new(),
                };
                let c = match self.components.iter().position(Option::is_none) {
                    Some(i) => {
                        self.components[i] = Some(comp);
                        i as u32
                    }
                    None => {
                        self.components.push(Some(comp));
                        (self.components.len() - 1) as u32
                    }
                };
                self.classes[k].by_name.insert(name.into(), c);
                c
            }
        };
        let components = &self.components;
        let class = &mut self.classes[k];
        let at = class.order.partition_point(|&o| {
            components[o as usize]
                .as_ref()
                .expect("ordered component is live")
                .name
                .as_ref()
                < name
        });
        class.order.insert(at, c);
        c
    }

    /// Frees the components that emptied (parked, so that a component that empties and
    /// refills request by request costs no allocation) and the classes left with none.
    fn sweep_parked(&mut self) {
        for slot in &mut self.components {
            if slot
                .as_ref()
                .is_some_and(|comp| comp.queued == 0 && comp.parked_roots == 0)
            {
                let comp = slot.take().expect("checked above");
                let class = self
                    .classes
                    .iter_mut()
                    .find(|k| k.priority == comp.priority)
                    .expect("component's class is live");
                class.by_name.remove(&comp.name);
            }
        }
        self.classes.retain(|k| !k.by_name.is_empty());
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

    /// Picks the (component, tenant) a worker of querier index `q` with slot `slot` is
    /// served from next within class `k`, and whether that continues the querier's visit
    /// to the tenant.
    fn select_in(&self, k: usize, q: u32, slot: u32) -> Option<(u32, u32, bool)> {
        let order = &self.classes[k].order;
        let n = order.len();
        if n == 0 {
            return None;
        }
        let start = slot as usize % n;
        (0..n).find_map(|i| {
            let c = order[(start + i) % n];
            let comp = self.components[c as usize].as_ref().expect("ordered component is live");
            if let Some(t) = comp.cursors.get(q as usize).copied().flatten()
                && comp.eligible(q, t)
                && self.tenants[t as usize].as_ref().is_some_and(|t| t.balance > 0)
            {
                return Some((c, t, true));
            }
            comp.next_tenant(q).map(|t| (c, t, false))
        })
    }

    /// Picks the class a worker is served from: the highest it may serve that has work
    /// for it, unless a lower one it may serve has been passed over too often (the lowest
    /// index, i.e. highest priority, of those wins). Returns the class index and the pick
    /// in it.
    fn select(&self, q: u32, slot: u32, reserved: bool) -> Option<(usize, (u32, u32, bool))> {
        let floor = if reserved { self.config.reserved_min_priority } else { 0 };
        let allowed = self.classes.iter().take_while(|k| k.priority >= floor).count();
        let (first, pick) = (0..allowed).find_map(|k| self.select_in(k, q, slot).map(|p| (k, p)))?;
        if !reserved {
            let limit = self.config.max_priority_skips;
            for k in first + 1..allowed {
                if self.classes[k].passed >= limit
                    && let Some(p) = self.select_in(k, q, slot)
                {
                    return Some((k, p));
                }
            }
        }
        Some((first, pick))
    }

    /// Whether `worker` is one of its querier's workers reserved for high priorities: the
    /// lowest-numbered `reserved_workers_percent` of its connected workers, rounded down.
    fn is_reserved(&self, worker: WorkerId) -> bool {
        let pct = u32::from(self.config.reserved_workers_percent);
        if pct == 0 {
            return false;
        }
        let q = &self.queriers.slab[worker.querier];
        let reserved = q.connected * pct / 100;
        let rank = q.workers[..worker.slot as usize].iter().filter(|&&used| used).count() as u32;
        rank < reserved
    }

    /// Hands `worker` its next request: fairly chosen, within its querier's shards, never
    /// one past its deadline (those go to [`poll_expired`](Self::poll_expired)).
    pub fn dequeue(&mut self, now: Instant, worker: WorkerId) -> Dequeue<R> {
        let Some(q) = self.queriers.slab.get(worker.querier) else {
            return Dequeue::UnknownWorker;
        };
        if !q.workers.get(worker.slot as usize).copied().unwrap_or(false) {
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
            let Some((k, (c, t, continued))) = self.select(qi, worker.slot, reserved) else {
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
            self.note_served(priority, reserved);
            self.counters.dispatched += 1;
            return Dequeue::Dispatch(Dispatched {
                key: e.key,
                request: e.request,
                queue_time,
                deadline: (e.deadline != 0).then(|| self.instant(e.deadline)),
            });
        }
    }

    /// A weight-1 tenant's credit per visit, in cost units: the configured quantum, or the
    /// largest cost now queued if that is more.
    fn quantum(&self) -> u32 {
        let largest = self.queued_costs.last_key_value().map_or(1, |(cost, _)| *cost);
        self.config.cost_quantum.max(largest)
    }

    fn set_cursor(&mut self, c: u32, q: u32, t: u32) {
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
    fn fast_forward(&mut self, skipped: &[(u32, u32)]) -> (u32, u32) {
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

    /// Bookkeeping of the starvation guard after a dispatch from class `priority` (which
    /// may have emptied and gone since).
    fn note_served(&mut self, priority: u8, reserved: bool) {
        for class in &mut self.classes {
            if class.priority == priority {
                class.passed = 0;
            } else if class.priority < priority && !reserved && !class.order.is_empty() {
                class.passed = class.passed.saturating_add(1);
            }
        }
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
    /// inside its forget delay gets its old place back).
    pub fn register_worker(&mut self, _now: Instant, querier: &str) -> WorkerId {
        let (w, membership) = self.queriers.register(querier);
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

    /// Tenants with queued requests.
    pub fn tenant_count(&self) -> usize {
        self.tenant_by_name.len()
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

    /// Requests queued per component (summed over priority classes), by name; the
    /// unnamed component is `""`.
    pub fn component_lengths(&self) -> Vec<(String, u32)> {
        let mut by_name: BTreeMap<&str, u32> = BTreeMap::new();
        for comp in self.components.iter().flatten().filter(|comp| comp.queued > 0) {
            *by_name.entry(&comp.name).or_default() += comp.queued;
        }
        by_name.into_iter().map(|(name, n)| (name.to_string(), n)).collect()
    }

    /// Requests queued per priority class, highest first.
    pub fn class_lengths(&self) -> Vec<(u8, u32)> {
        self.classes
            .iter()
            .filter(|k| !k.order.is_empty())
            .map(|k| {
                let n = k
                    .order
                    .iter()
                    .filter_map(|&c| self.components[c as usize].as_ref())
                    .map(|comp| comp.queued)
                    .sum();
                (k.priority, n)
            })
            .collect()
    }

    /// Checks every internal invariant, walking the whole structure (O(size)); for tests
    /// and debugging. Returns the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        invariants::check(self)
    }
}

mod invariants;
