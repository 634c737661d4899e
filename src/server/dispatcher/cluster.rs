//! Tenant limits for the cluster: the dispatcher's side of sharing queued counts with the
//! other schedulers (the rule is in [`crate::queue::cluster`]).
//!
//! Out: after a batch that may have changed a count, at most every [`REPORT_EVERY`], the
//! dispatcher lists its tenants nearest their limit in a [`LoadReport`] and hands it to the
//! gossip, which sends it to every scheduler at once and again every 100 ms. In: a task
//! per scheduler ([`forward`]) decodes the reports the gossip receives and tells the
//! dispatcher, and tells it which schedulers the gossip declared gone.
//!
//! Deferred enqueues: an enqueue refused only because the others have not yet seen this
//! scheduler's latest admissions (the rule's unseen share), while the cluster as last
//! reported still has room for it, waits for the next reports instead of being refused at
//! once, at most [`DEFER_FOR`]: a burst faster than the reports' round trip is then slowed,
//! not refused. Each deferred enqueue gets its one status when it is tried again (accepted,
//! or refused as it would have been), and none if it is cancelled or its frontend leaves.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_client::gossip::{MAX_REPORT_LEN, Member, MemberRole, RESEND_EVERY, Reporter};
use sluice_protocol::{Enqueue, LoadReport};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::debug;

use super::{Command, Dispatcher};
use crate::queue::QueryKey;
use crate::queue::cluster::{self, ClusterLoad};

/// Longest a change to the queued counts waits before it is reported: the cluster's total
/// can pass a tenant's limit by what arrives in this long (plus the packet's trip).
pub(crate) const REPORT_EVERY: Duration = Duration::from_millis(2);

/// Longest an enqueue is deferred before its refusal is sent: a report is due from every
/// other scheduler within milliseconds of a change, and at the latest at the gossip's
/// 100 ms resend.
pub(crate) const DEFER_FOR: Duration = Duration::from_millis(100);

/// Most enqueues deferred at once, and most bytes of them (as the queue counts a queued
/// request's); past either an enqueue is refused at once, as without deferring.
pub(crate) const MAX_DEFERRED: usize = 4_096;
pub(crate) const MAX_DEFERRED_BYTES: u64 = 64 << 20;

/// An enqueue waiting for the other schedulers' next reports.
pub(super) struct Deferred {
    /// When its refusal is sent if it was not admitted before.
    pub(super) until: Instant,
    pub(super) frontend: u64,
    pub(super) enqueue: Box<Enqueue>,
    pub(super) received: Instant,
    pub(super) bytes: u64,
}

/// The deferred enqueues, oldest first (so the first is due first), with what they weigh
/// in all and how many each tenant has.
#[derive(Default)]
struct DeferredList {
    list: VecDeque<Deferred>,
    bytes: u64,
    per_tenant: HashMap<String, u32>,
}

impl DeferredList {
    fn push(&mut self, d: Deferred) {
        self.bytes += d.bytes;
        *self.per_tenant.entry(d.enqueue.tenant.clone()).or_default() += 1;
        self.list.push_back(d);
    }

    fn of(&self, tenant: &str) -> u32 {
        self.per_tenant.get(tenant).copied().unwrap_or(0)
    }

    fn take(&mut self) -> VecDeque<Deferred> {
        self.bytes = 0;
        self.per_tenant.clear();
        std::mem::take(&mut self.list)
    }

    /// Drops those `gone` picks; returns the tenants of the dropped ones.
    fn drop_where(&mut self, gone: impl Fn(&Deferred) -> bool) -> Vec<String> {
        let (dropped, kept): (Vec<_>, Vec<_>) = self.take().into_iter().partition(|d| gone(d));
        kept.into_iter().for_each(|d| self.push(d));
        dropped.into_iter().map(|d| d.enqueue.tenant).collect()
    }
}

/// Sharing queued counts with the other schedulers.
pub(super) struct Sharing {
    pub(super) load: ClusterLoad,
    /// Where reports go (none in the dispatcher's unit tests, which read `load` instead).
    reporter: Option<Reporter>,
    /// Something happened since the last report that may have changed a count or an
    /// acknowledgement.
    dirty: bool,
    last_sent: Option<Instant>,
    /// When the acknowledgements' next turn is due, while they take turns (more schedulers
    /// than one report holds): sent on the gossip's resend period, changed or not.
    next_turn: Option<Instant>,
    /// Least time between two reports: `REPORT_EVERY`, or 20 times what building the last
    /// one took, whichever is longer (with many tenants queued a report scans them all; this
    /// keeps reporting under 5% of the dispatcher's time).
    gap: Duration,
    /// Enqueues waiting for the next reports.
    deferred: DeferredList,
}

impl Sharing {
    pub(super) fn new(reporter: Option<Reporter>) -> Sharing {
        // Reports of a restarted scheduler must be newer than its last life's.
        let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Sharing {
            load: ClusterLoad::new(u64::try_from(started.as_micros()).unwrap_or(u64::MAX / 2)),
            reporter,
            dirty: true,
            last_sent: None,
            next_turn: None,
            gap: REPORT_EVERY,
            deferred: DeferredList::default(),
        }
    }

    /// When the dispatcher must act next for the cluster: a report due (a change waits to
    /// be reported, or the acknowledgements' next turn), never before the least gap after
    /// the last one allows it, or the first deferred enqueue's refusal.
    pub(super) fn due(&self) -> Option<Instant> {
        let allowed = self.last_sent.map_or_else(Instant::now, |t| t + self.gap);
        let report = if self.dirty {
            Some(allowed)
        } else {
            self.next_turn.map(|t| t.max(allowed))
        };
        let deferred = self.deferred.list.front().map(|d| d.until);
        report.into_iter().chain(deferred).min()
    }

    /// Enqueues deferred now.
    pub(super) fn deferred(&self) -> usize {
        self.deferred.list.len()
    }

    pub(super) fn touch(&mut self) {
        self.dirty = true;
    }
}

impl Dispatcher {
    /// Reports the tenants nearest their limit, if a change waits and the last report is
    /// old enough.
    pub(super) fn report_load(&mut self, now: Instant) {
        let Some(report) = self.next_report(now) else { return };
        if let Some(reporter) = self.sharing.as_ref().and_then(|s| s.reporter.as_ref())
            && let Err(e) = reporter.publish(report.encode())
        {
            debug!(error = %e, "load report not published");
        }
    }

    /// The report due now, if any: at most one packet.
    pub(super) fn next_report(&mut self, now: Instant) -> Option<LoadReport> {
        let sharing = self.sharing.as_mut()?;
        let turn_due = sharing.next_turn.is_some_and(|t| now >= t);
        if !(sharing.dirty || turn_due) || sharing.last_sent.is_some_and(|t| now < t + sharing.gap) {
            return None;
        }
        sharing.dirty = false;
        sharing.last_sent = Some(now);
        // Around the lists: the id, seq, version and the lists' lengths. The
        // acknowledgements (an id and a version per other scheduler) take up to half of
        // the rest, and turns past that; the tenants the rest.
        let room = MAX_REPORT_LEN.saturating_sub(self.scheduler_id.len() + 2 + 10 + 10 + 3 + 3);
        let ack_room = sharing.load.ack_bytes().min(room / 2);
        let tenants = cluster::hottest(self.queue.tenant_loads(), room - ack_room);
        sharing.gap = REPORT_EVERY.max(now.elapsed() * 20);
        let Some(out) = sharing.load.report(tenants, ack_room) else {
            sharing.next_turn = None;
            return None;
        };
        sharing.next_turn = out.turns.then(|| now + RESEND_EVERY);
        Some(LoadReport {
            scheduler: self.scheduler_id.clone(),
            seq: out.seq,
            version: out.version,
            tenants: out.tenants,
            seen: out.seen,
        })
    }

    pub(super) fn peer_report(&mut self, report: LoadReport, now: Instant) {
        let Some(sharing) = &mut self.sharing else { return };
        if report.scheduler != self.scheduler_id {
            let r = report;
            sharing.load.receive(
                &self.scheduler_id,
                &r.scheduler,
                r.seq,
                r.version,
                r.tenants,
                &r.seen,
                now,
            );
        }
    }

    pub(super) fn peers_gone(&mut self, schedulers: Vec<String>) {
        let Some(sharing) = &mut self.sharing else { return };
        for s in schedulers {
            debug!(scheduler = %s, "no longer counted in tenant limits");
            sharing.load.forget(&s);
        }
    }

    /// Whether an enqueue of `tenant` (`bytes` as queued) that its allowance refused may be
    /// deferred: the cluster, as last reported, has room for it beside what is queued and
    /// deferred here, and the deferring budget is not spent.
    pub(super) fn may_defer(&self, tenant: &str, bytes: u64, now: Instant) -> bool {
        let Some(s) = &self.sharing else { return false };
        let d = &s.deferred;
        if d.list.len() >= MAX_DEFERRED || d.bytes.saturating_add(bytes) > MAX_DEFERRED_BYTES {
            return false;
        }
        let limit = u64::from(self.queue.config().max_outstanding(tenant));
        let room = limit.saturating_sub(s.load.held_elsewhere(tenant, now));
        u64::from(self.queue.queued_of(tenant)) + u64::from(d.of(tenant)) < room
    }

    pub(super) fn defer(&mut self, d: Deferred) {
        let s = self.sharing.as_mut().expect("only deferred when sharing");
        s.deferred.push(d);
    }

    /// Tries every deferred enqueue again, oldest first (reports arrived, time passed, the
    /// scheduler drains): each is admitted, deferred on, or refused now.
    pub(super) fn retry_deferred(&mut self, now: Instant) {
        let Some(s) = &mut self.sharing else { return };
        if s.deferred.list.is_empty() {
            return;
        }
        for d in s.deferred.take() {
            self.enqueue_until(now, d.frontend, d.enqueue, d.received, d.until);
        }
    }

    /// Withdraws a deferred enqueue (cancelled: it gets no status); its tenant, if it was one.
    pub(super) fn withdraw_deferred(&mut self, key: QueryKey) -> Option<String> {
        self.drop_deferred(|d| d.frontend == key.frontend && d.enqueue.query_id == key.query)
            .pop()
    }

    /// Drops the deferred enqueues `gone` picks; returns their tenants.
    pub(super) fn drop_deferred(&mut self, gone: impl Fn(&Deferred) -> bool) -> Vec<String> {
        match &mut self.sharing {
            Some(s) if !s.deferred.list.is_empty() => s.deferred.drop_where(gone),
            _ => Vec::new(),
        }
    }

    /// The most of `tenant` this scheduler may hold now, given what the others hold.
    pub(super) fn allowance(&self, tenant: &str, now: Instant) -> Option<u32> {
        let sharing = self.sharing.as_ref()?;
        sharing
            .load
            .allowance(tenant, self.queue.config().max_outstanding(tenant), now)
    }
}

/// Forwards the reports the gossip receives, and the schedulers it declares gone, to the
/// dispatcher, until either side ends.
pub(crate) fn forward(
    mut reports: mpsc::Receiver<Vec<u8>>,
    mut members: watch::Receiver<Vec<Member>>,
    commands: mpsc::Sender<Command>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let schedulers = |m: &[Member]| -> HashSet<String> {
            m.iter()
                .filter(|m| m.role == MemberRole::Scheduler)
                .map(|m| m.id.clone())
                .collect()
        };
        let mut known = schedulers(&members.borrow_and_update());
        loop {
            let command = tokio::select! {
                report = reports.recv() => {
                    let Some(bytes) = report else { return };
                    match LoadReport::decode(&bytes) {
                        Ok(report) => Command::PeerReport(Box::new(report)),
                        Err(e) => {
                            debug!(error = %e, "undecodable load report dropped");
                            continue;
                        }
                    }
                }
                changed = members.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = schedulers(&members.borrow_and_update());
                    let gone: Vec<String> = known.difference(&now).cloned().collect();
                    known = now;
                    if gone.is_empty() {
                        continue;
                    }
                    Command::PeersGone(gone)
                }
            };
            if commands.send(command).await.is_err() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_due_no_sooner_than_its_gap_allows() {
        let mut s = Sharing::new(None);
        let sent = Instant::now();
        (s.last_sent, s.gap, s.dirty) = (Some(sent), Duration::from_millis(40), true);
        // Waking earlier would find nothing to send, and wake again at once.
        assert_eq!(s.due(), Some(sent + Duration::from_millis(40)));
        s.dirty = false;
        assert_eq!(s.due(), None);
        s.next_turn = Some(sent + RESEND_EVERY);
        assert_eq!(s.due(), Some(sent + RESEND_EVERY));
        s.gap = RESEND_EVERY * 2;
        assert_eq!(s.due(), Some(sent + RESEND_EVERY * 2));
    }
}
