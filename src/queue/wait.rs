//! How long a new request would wait: each component's measured dispatch rate while it is
//! backlogged, and the request's place under fair sharing. Admission refuses a request
//! whose deadline the estimate says it would miss (see [`QueueConfig::deadline_admission`]).
//!
//! The rate is counted only in windows during which the component stayed backlogged, so
//! it measures what the workers serving it can take, not what arrived; a component that
//! has not been backlogged for a whole window has no estimate, and nothing is refused for
//! it. A new request of tenant `t` in a component with `n` tenants that have work (counting
//! `t`) and `queued` requests, `t` having `mine` of them, waits about
//! `min(queued + 1, (mine + 1) × n) / rate`: round robin gives `t` one dispatch in `n`.
//! Admission adds the component's mean service time, as reported by the caller when a
//! dispatched request finishes ([`TreeQueue::record_service`]): a request must be served,
//! not only dispatched, before its deadline.

use std::time::{Duration, Instant};

#[cfg(doc)]
use super::QueueConfig;
use super::{QueuePath, Queued, TreeQueue};

/// Length of a measuring window.
const WINDOW_NS: u64 = 500_000_000;
/// Weight of the newest window in the rate.
const NEWEST: f64 = 0.3;
/// Admission counts the estimated wait this many times over: at the edge of a backlog the
/// rate wavers, and a request admitted right at its deadline is as good as lost.
const WAIT_MARGIN: f64 = 1.1;

/// A component's dispatch rate while backlogged.
#[derive(Debug, Clone, Default)]
pub(super) struct DispatchRate {
    window_start: u64,
    dispatched: u32,
    /// Dispatches per second; 0 until one backlogged window was measured.
    per_sec: f64,
    /// Mean service time in seconds (moving average); 0 until one was reported.
    service: f64,
}

impl DispatchRate {
    /// The component's backlog starts (its first request queued): a window opens.
    pub(super) fn backlog_starts(&mut self, now_ns: u64) {
        self.window_start = now_ns;
        self.dispatched = 0;
    }

    /// One request dispatched at `now_ns`, leaving `queued` behind. A window in which
    /// the backlog ran out measures nothing.
    pub(super) fn dispatched(&mut self, now_ns: u64, queued: u32) {
        if queued == 0 {
            self.backlog_starts(now_ns);
            return;
        }
        self.dispatched += 1;
        let elapsed = now_ns.saturating_sub(self.window_start);
        if elapsed >= WINDOW_NS {
            let rate = f64::from(self.dispatched) * 1e9 / elapsed as f64;
            self.per_sec = if self.per_sec == 0.0 {
                rate
            } else {
                (1.0 - NEWEST) * self.per_sec + NEWEST * rate
            };
            self.backlog_starts(now_ns);
        }
    }

    pub(super) fn per_sec(&self) -> Option<f64> {
        (self.per_sec > 0.0).then_some(self.per_sec)
    }

    fn served(&mut self, took: Duration) {
        let s = took.as_secs_f64();
        self.service = if self.service == 0.0 {
            s
        } else {
            (1.0 - SERVICE_NEWEST) * self.service + SERVICE_NEWEST * s
        };
    }
}

/// Weight of the newest service time in the mean.
const SERVICE_NEWEST: f64 = 0.05;

impl<R: Queued> TreeQueue<R> {
    /// How long a request of `path` at `priority` (`None`: the tenant's) enqueued now
    /// would wait before dispatch, if its component's rate is known; `Some(ZERO)` when
    /// nothing is queued ahead of it.
    pub fn estimated_wait(&self, path: QueuePath<'_>, priority: Option<u8>) -> Option<Duration> {
        self.wait_and_service(path, priority).map(|(wait, _)| wait)
    }

    /// The estimated wait (as [`estimated_wait`](Self::estimated_wait)) and the mean
    /// service time of the request's component (zero until one was reported): one lookup
    /// for both, as admission needs them.
    pub(super) fn wait_and_service(&self, path: QueuePath<'_>, priority: Option<u8>) -> Option<(Duration, Duration)> {
        let tenant = self
            .tenant_by_name
            .get(path.tenant)
            .and_then(|&t| self.tenants[t as usize].as_ref());
        let priority = priority
            .or_else(|| tenant.map(|x| x.priority))
            .unwrap_or_else(|| self.config.priority(path.tenant));
        let c = self.component_of(path.component, priority)?;
        let comp = self.components[c as usize].as_ref()?;
        let service = Duration::from_secs_f64(comp.rate.service);
        if comp.queued == 0 {
            return Some((Duration::ZERO, service));
        }
        let rate = comp.rate.per_sec()?;
        let (mine, active) = match tenant.and_then(|x| x.roots.iter().find(|(x, _)| *x == c)) {
            Some(&(_, root)) if self.nodes[root].live > 0 => (self.nodes[root].live, comp.active),
            _ => (0, comp.active + 1),
        };
        let ahead = (u64::from(comp.queued) + 1).min((u64::from(mine) + 1) * u64::from(active));
        Some((Duration::from_secs_f64(ahead as f64 / rate), service))
    }

    /// The slot of component `name` (`None`: the unnamed one) in class `priority`.
    fn component_of(&self, name: Option<&str>, priority: u8) -> Option<u32> {
        let class = self.classes.iter().find(|k| k.priority == priority)?;
        class.by_name.get(name.unwrap_or("")).copied()
    }

    /// A dispatched request of `component` (at `priority`, as [`Dispatched::priority`]
    /// says) finished after `took`: the service time admission adds to the wait. Ignored
    /// if the component has emptied and gone meanwhile.
    ///
    /// [`Dispatched::priority`]: super::Dispatched::priority
    pub fn record_service(&mut self, component: Option<&str>, priority: u8, took: Duration) {
        if let Some(c) = self.component_of(component, priority)
            && let Some(comp) = self.components[c as usize].as_mut()
        {
            comp.rate.served(took);
        }
    }

    /// Admission's verdict on a request with `deadline` enqueued at `now`: `Err` with the
    /// estimated wait if it and the mean service time would reach past the deadline, else
    /// the estimate if `estimate` asks for it (nothing is looked up when neither needs it).
    pub(super) fn admit_deadline(
        &self,
        now: Instant,
        path: QueuePath<'_>,
        priority: Option<u8>,
        deadline: Option<Instant>,
        estimate: bool,
    ) -> Result<Option<Duration>, Duration> {
        let deadline = deadline.filter(|_| self.config.deadline_admission);
        if deadline.is_none() && !estimate {
            return Ok(None);
        }
        let Some((wait, service)) = self.wait_and_service(path, priority) else {
            return Ok(None);
        };
        match deadline {
            Some(deadline) if now + wait.mul_f64(WAIT_MARGIN) + service > deadline => Err(wait),
            _ => Ok(Some(wait)),
        }
    }
}
