//! Admission: an enqueue checked (phase, limits, fields, memory) and queued, answered with
//! exactly one status (or deferred, see `cluster.rs`, and answered when tried again); what a
//! queued query costs in memory.

use std::time::{Duration, Instant};

use metrics::counter;
use sluice_client::trace::TraceParent;
use sluice_protocol::{Enqueue, EnqueueStatus, FrontendAddress, SchedulerToFrontend, enqueue_len_bound, fits_frame};
use tracing::debug;

use super::cluster::{DEFER_FOR, Deferred};
use super::{Dispatcher, OTHER_TENANT, f_name};
use crate::metrics as m;
use crate::queue::{EnqueueOptions, QueryKey, QueuePath, Queued, RejectReason};

/// Bytes a queued request costs beyond its fields: its queue entry, the boxed frame, the
/// key index, its place in a leaf FIFO and a deadline bucket (an estimate, rounded up).
pub(crate) const REQUEST_OVERHEAD: usize = 512;

/// Bytes one actor level may cost in the tree: the node, its rotation and child index.
pub(crate) const NODE_OVERHEAD: usize = 256;

/// Bytes a `String` costs beyond its text.
const STRING_OVERHEAD: usize = 24;

/// A queued query, as the queue core holds it.
/// A queued query, as the queue core holds it.
pub(super) struct Pending {
    pub(super) enqueue: Box<Enqueue>,
}

impl Queued for Pending {
    fn path(&self) -> QueuePath<'_> {
        QueuePath {
            component: self.enqueue.component.as_deref(),
            tenant: &self.enqueue.tenant,
            actors: &self.enqueue.actors,
        }
    }

    /// What the request costs in memory while queued, as `max_queued_bytes` counts it:
    /// payload, metadata and names (actor names twice: in the request and in the tree
    /// node each level may need), plus fixed estimates for the request's bookkeeping and
    /// each tree level.
    fn size_bytes(&self) -> u64 {
        let e = &self.enqueue;
        let meta: usize = e
            .metadata
            .iter()
            .map(|(k, v)| k.len() + v.len() + STRING_OVERHEAD * 2)
            .sum();
        let actors: usize = e
            .actors
            .iter()
            .map(|a| 2 * a.len() + STRING_OVERHEAD + NODE_OVERHEAD)
            .sum();
        let names = e.tenant.len() + e.component.as_ref().map_or(0, String::len);
        (e.payload.len() + meta + actors + names + REQUEST_OVERHEAD) as u64
    }
}

/// Bytes a `Dispatch` frame may take beyond its enqueue's fields and the frontend's
/// address: the frame's tags, the worker, the queue time (dropping the priority and cost
/// hint only makes it shorter).
const DISPATCH_EXTRA: usize = 16;

/// Bytes a frontend's address takes in a frame, at most: three strings with their
/// lengths, and its frame limit.
fn address_len(a: &FrontendAddress) -> usize {
    a.id.len() + a.address.len() + a.server_name.len() + 3 * 10 + 5
}

/// Err(its length, at most) when `enqueue` could not be dispatched in one frame of
/// `max_frame_len` bytes: its querier's stream would fail on it and take the querier's
/// other queries down, so it is refused instead. Counted only for a request that comes
/// near the limit.
fn dispatch_fits(enqueue: &Enqueue, address_len: usize, max_frame_len: u32) -> Result<(), usize> {
    let e = enqueue;
    let bound = enqueue_len_bound(
        &e.tenant,
        &e.actors,
        e.component.as_deref(),
        &e.metadata,
        e.payload.len(),
    );
    fits_frame(enqueue, bound, address_len + DISPATCH_EXTRA, max_frame_len)
}

/// Why an enqueue was not queued now.
enum Refusal {
    /// Answered with this status (the tenant moved out of the request, for its metric).
    Answer(EnqueueStatus, String),
    /// Deferred until the other schedulers' next reports (`cluster.rs`).
    Defer(Deferred),
}

impl Dispatcher {
    pub(super) fn enqueue(&mut self, now: Instant, frontend: u64, enqueue: Box<Enqueue>, received: Instant) {
        self.enqueue_until(now, frontend, enqueue, received, now + DEFER_FOR);
    }

    /// An enqueue (new, or deferred before), which may be deferred until `defer_until`.
    pub(super) fn enqueue_until(
        &mut self,
        now: Instant,
        frontend: u64,
        enqueue: Box<Enqueue>,
        received: Instant,
        defer_until: Instant,
    ) {
        let Some(f) = self.frontends.get(&frontend) else {
            return; // its connection already closed
        };
        let query_id = enqueue.query_id;
        let address_len = f.address.as_deref().map(address_len);
        // The query's trace id in the scheduler's log (only looked up when logging it).
        let trace = tracing::enabled!(tracing::Level::DEBUG)
            .then(|| TraceParent::of(&enqueue.metadata).map(|t| t.trace_id_hex()))
            .flatten();
        let outcome = match self.admit(now, frontend, enqueue, received, address_len, defer_until) {
            Ok(wait) => Ok(wait),
            Err(Refusal::Answer(status, tenant)) => Err((status, tenant)),
            Err(Refusal::Defer(d)) => {
                if let Some(trace_id) = trace {
                    debug!(query = query_id, frontend = %f_name(&self.frontends, frontend), %trace_id, "enqueue deferred until the other schedulers' next reports");
                }
                self.defer(d);
                return;
            }
        };
        if let Some(trace_id) = trace {
            debug!(query = query_id, frontend = %f_name(&self.frontends, frontend), %trace_id, accepted = outcome.is_ok(), "enqueue");
        }
        let (status, estimated_wait) = match &outcome {
            Ok(wait) => (EnqueueStatus::Accepted, *wait),
            Err((status, _)) => (status.clone(), None),
        };
        let estimated_wait_ms = estimated_wait.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX));
        self.handles
            .enqueue_duration(&self.metrics)
            .record(now.saturating_duration_since(received).as_secs_f64());
        self.metrics.record(|| {
            if let Err((status, tenant)) = outcome {
                // Refused input never becomes a label: only a tenant that has queries
                // queued (so passed validation) is named.
                let tenant = if self.queue.has_tenant(&tenant) {
                    tenant
                } else {
                    OTHER_TENANT.to_string()
                };
                let reason = match status {
                    EnqueueStatus::TooManyOutstanding { .. } => "too_many_outstanding",
                    EnqueueStatus::QueueFull => "queue_full",
                    EnqueueStatus::ShuttingDown => "shutting_down",
                    EnqueueStatus::WouldMissDeadline { .. } => "would_miss_deadline",
                    _ => "invalid",
                };
                counter!(m::DISCARDED_REQUESTS, "tenant" => tenant, "reason" => reason).increment(1);
            }
        });
        let accepted = status == EnqueueStatus::Accepted;
        let load = self.load();
        let status = SchedulerToFrontend::EnqueueStatus {
            query_id,
            status,
            load,
            estimated_wait_ms,
        };
        self.tell_frontend(frontend, status);
        if accepted {
            self.serve_waiting(now);
        }
    }

    /// Queues an enqueue (with its estimated wait, if the queue has one), defers it (a
    /// refusal by the cluster's unseen share only, before `defer_until`), or says why not
    /// together with its tenant (moved out of the refused request, so an accepted enqueue
    /// costs no copy of it).
    fn admit(
        &mut self,
        now: Instant,
        frontend: u64,
        enqueue: Box<Enqueue>,
        received: Instant,
        address_len: Option<usize>,
        defer_until: Instant,
    ) -> Result<Option<Duration>, Refusal> {
        let refuse = |status, enqueue: Box<Enqueue>| Err(Refusal::Answer(status, enqueue.tenant));
        if !self.serving() {
            return refuse(EnqueueStatus::ShuttingDown, enqueue);
        }
        let Some(address_len) = address_len else {
            let reason = "the result endpoint must be announced before the first enqueue".into();
            return refuse(EnqueueStatus::Invalid { reason }, enqueue);
        };
        if let Err(e) = enqueue.validate(&self.limits) {
            return refuse(EnqueueStatus::Invalid { reason: e.to_string() }, enqueue);
        }
        if let Err(len) = dispatch_fits(&enqueue, address_len, self.limits.max_frame_len) {
            let reason = format!(
                "the query would take {len} bytes as a dispatch to a querier (the enqueue and where \
                 to send the result), above the frame limit of {} bytes (max_frame_len)",
                self.limits.max_frame_len
            );
            return refuse(EnqueueStatus::Invalid { reason }, enqueue);
        }
        let options = EnqueueOptions {
            deadline: enqueue.timeout_ms.map(|ms| received + Duration::from_millis(ms)),
            priority: enqueue.priority,
            cost: enqueue.cost_hint.unwrap_or(1),
            allowance: self.allowance(&enqueue.tenant, now),
        };
        let query = enqueue.query_id;
        let key = QueryKey { frontend, query };
        if self.running.contains_key(&key) {
            let reason = format!("query {query} is already running");
            return refuse(EnqueueStatus::Invalid { reason }, enqueue);
        }
        // Placed again: a failure of its earlier delivery is no longer news.
        self.delivering.remove(&key);
        let deferrable = options.allowance.is_some() && now < defer_until;
        let rejected = match self.queue.enqueue_estimated(now, key, Pending { enqueue }, options) {
            Ok(wait) => return Ok(wait),
            Err(rejected) => rejected,
        };
        let status = match rejected.reason {
            RejectReason::TooManyOutstanding { .. }
                if deferrable && {
                    let bytes = rejected.request.size_bytes();
                    self.may_defer(&rejected.request.enqueue.tenant, bytes, now)
                } =>
            {
                return Err(Refusal::Defer(Deferred {
                    until: defer_until,
                    frontend,
                    bytes: rejected.request.size_bytes(),
                    enqueue: rejected.request.enqueue,
                    received,
                }));
            }
            RejectReason::TooManyOutstanding { limit } => EnqueueStatus::TooManyOutstanding { limit },
            RejectReason::QueueFull { .. } | RejectReason::QueueBytesFull { .. } => EnqueueStatus::QueueFull,
            RejectReason::Duplicate => EnqueueStatus::Invalid {
                reason: format!("query {query} is already queued"),
            },
            RejectReason::WouldMissDeadline { estimated_wait } => EnqueueStatus::WouldMissDeadline {
                estimated_wait_ms: u64::try_from(estimated_wait.as_millis()).unwrap_or(u64::MAX),
            },
        };
        refuse(status, rejected.request.enqueue)
    }
}
