//! Tests of the queue core, all driven by a fake clock (`t0 + offsets`).

mod anchors;
mod explain;
mod policies;
mod props;
mod shards;

use std::time::{Duration, Instant};

use super::*;

/// A request as the tests see it: its path, a size, and a label to recognise it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Req {
    pub tenant: String,
    pub actors: Vec<String>,
    pub component: Option<String>,
    pub bytes: u64,
    pub label: String,
    /// Passed as the enqueue's cost (0: the default, 1).
    pub cost: u32,
    /// Passed as the enqueue's priority.
    pub priority: Option<u8>,
}

impl Queued for Req {
    fn path(&self) -> QueuePath<'_> {
        QueuePath {
            component: self.component.as_deref(),
            tenant: &self.tenant,
            actors: &self.actors,
        }
    }
    fn size_bytes(&self) -> u64 {
        self.bytes
    }
}

pub(super) fn req(tenant: &str, actors: &[&str], label: &str) -> Req {
    Req {
        tenant: tenant.into(),
        actors: actors.iter().map(|a| a.to_string()).collect(),
        component: None,
        bytes: 10,
        label: label.into(),
        cost: 0,
        priority: None,
    }
}

pub(super) fn in_component(mut r: Req, component: &str) -> Req {
    r.component = Some(component.into());
    r
}

/// A queue plus a fake clock and a key counter.
pub(super) struct Fixture {
    pub q: TreeQueue<Req>,

    pub now: Instant,
    next_key: u64,
}

impl Fixture {
    pub fn new(config: QueueConfig) -> Self {
        let t0 = Instant::now();
        Fixture {
            q: TreeQueue::new(config, t0).expect("valid config"),

            now: t0,
            next_key: 0,
        }
    }

    pub fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    pub fn key(&mut self) -> QueryKey {
        self.next_key += 1;
        QueryKey {
            frontend: 1,
            query: self.next_key,
        }
    }

    /// Enqueues (with the request's cost and priority) and returns the key; panics if
    /// refused.
    pub fn push(&mut self, r: Req) -> QueryKey {
        self.push_until(r, None)
    }

    pub fn push_with_deadline(&mut self, r: Req, after: Duration) -> QueryKey {
        let deadline = self.now + after;
        self.push_until(r, Some(deadline))
    }

    fn push_until(&mut self, r: Req, deadline: Option<Instant>) -> QueryKey {
        self.try_push_until(r, deadline).expect("accepted")
    }

    /// Enqueues with a deadline `after` from now; the reason if refused.
    pub fn try_push_with_deadline(&mut self, r: Req, after: Duration) -> Result<QueryKey, RejectReason> {
        let deadline = self.now + after;
        self.try_push_until(r, Some(deadline))
    }

    fn try_push_until(&mut self, r: Req, deadline: Option<Instant>) -> Result<QueryKey, RejectReason> {
        let key = self.key();
        let options = options_of(&r, deadline);
        let now = self.now;
        self.q.enqueue(now, key, r, options).map(|()| key).map_err(|e| e.reason)
    }

    pub fn worker(&mut self, querier: &str) -> WorkerId {
        let now = self.now;
        self.q.register_worker(now, querier)
    }

    /// A worker of `querier` in `lane` (a prefetching worker loop's slots share one).
    pub fn worker_in_lane(&mut self, querier: &str, lane: u16) -> WorkerId {
        let now = self.now;
        self.q.register_worker_in_lane(now, querier, lane)
    }

    /// What `w` gets next, or `None` if nothing; panics on any other answer.
    pub fn take(&mut self, w: WorkerId) -> Option<Req> {
        let now = self.now;
        match self.q.dequeue(now, w) {
            Dequeue::Dispatch(d) => Some(d.request),
            Dequeue::Empty => None,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The label of what `w` gets next.
    pub fn next(&mut self, w: WorkerId) -> Option<String> {
        self.take(w).map(|r| r.label)
    }

    /// The tenant of what `w` gets next.
    pub fn next_tenant(&mut self, w: WorkerId) -> Option<String> {
        self.take(w).map(|r| r.tenant)
    }

    pub fn assert_ok(&self) {
        if let Err(e) = self.q.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }
}

/// The enqueue options a test request carries.
pub(super) fn options_of(r: &Req, deadline: Option<Instant>) -> EnqueueOptions {
    EnqueueOptions {
        deadline,
        priority: r.priority,
        cost: r.cost,
        allowance: None,
    }
}

/// A request of tenant `tenant` with the given cost.
pub(super) fn costing(tenant: &str, cost: u32) -> Req {
    Req {
        cost,
        ..req(tenant, &[], "")
    }
}

/// A request of tenant `tenant` at priority `priority`, labelled with it.
pub(super) fn at_priority(tenant: &str, priority: u8) -> Req {
    Req {
        priority: Some(priority),
        ..req(tenant, &[], &priority.to_string())
    }
}

pub(super) fn no_forget() -> QueueConfig {
    QueueConfig {
        querier_forget_delay: Duration::ZERO,
        ..QueueConfig::default()
    }
}

/// Jain's fairness index of the shares: 1 when all equal, 1/n when one takes everything.
pub(super) fn jain(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let sq: f64 = shares.iter().map(|x| x * x).sum();
    if sq == 0.0 {
        return 1.0;
    }
    sum * sum / (shares.len() as f64 * sq)
}
