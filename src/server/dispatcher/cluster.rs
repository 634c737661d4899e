//! Tenant limits for the cluster: the dispatcher's side of sharing queued counts with the
//! other schedulers (the rule is in [`crate::queue::cluster`]).
//!
//! Out: after a batch that may have changed a count, at most every [`REPORT_EVERY`], the
//! dispatcher lists its tenants nearest their limit in a [`LoadReport`] and hands it to the
//! gossip, which sends it to every scheduler at once and again every 100 ms. In: a task
//! per scheduler ([`forward`]) decodes the reports the gossip receives and tells the
//! dispatcher, and tells it which schedulers the gossip declared gone.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_client::gossip::{MAX_REPORT_LEN, Member, MemberRole, Reporter};
use sluice_protocol::LoadReport;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::debug;

use super::{Command, Dispatcher};
use crate::queue::cluster::{self, ClusterLoad};

/// Longest a change to the queued counts waits before it is reported: the cluster's total
/// can pass a tenant's limit by what arrives in this long (plus the packet's trip).
pub(crate) const REPORT_EVERY: Duration = Duration::from_millis(2);

/// Sharing queued counts with the other schedulers.
pub(super) struct Sharing {
    pub(super) load: ClusterLoad,
    reporter: Reporter,
    /// Something happened since the last report that may have changed a count or an
    /// acknowledgement.
    dirty: bool,
    last_sent: Option<Instant>,
    /// Least time between two reports: `REPORT_EVERY`, or 20 times what building the last
    /// one took, whichever is longer (with many tenants queued a report scans them all; this
    /// keeps reporting under 5% of the dispatcher's time).
    gap: Duration,
}

impl Sharing {
    pub(super) fn new(reporter: Reporter) -> Sharing {
        // Reports of a restarted scheduler must be newer than its last life's.
        let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Sharing {
            load: ClusterLoad::new(u64::try_from(started.as_micros()).unwrap_or(u64::MAX / 2)),
            reporter,
            dirty: true,
            last_sent: None,
            gap: REPORT_EVERY,
        }
    }

    /// When the next report is due, if a change waits to be reported.
    pub(super) fn due(&self) -> Option<Instant> {
        self.dirty
            .then(|| self.last_sent.map_or_else(Instant::now, |t| t + REPORT_EVERY))
    }

    pub(super) fn touch(&mut self) {
        self.dirty = true;
    }
}

impl Dispatcher {
    /// Reports the tenants nearest their limit, if a change waits and the last report is
    /// old enough.
    pub(super) fn report_load(&mut self, now: Instant) {
        let Some(sharing) = &mut self.sharing else { return };
        if !sharing.dirty || sharing.last_sent.is_some_and(|t| now < t + sharing.gap) {
            return;
        }
        sharing.dirty = false;
        sharing.last_sent = Some(now);
        // Around the tenants: the id, seq, version, the lists' lengths, and an
        // acknowledgement per other scheduler (its id and a version).
        let frame = self.scheduler_id.len() + 2 + 10 + 10 + 3 + 3 + sharing.load.ack_bytes();
        let tenants = cluster::hottest(self.queue.tenant_loads(), MAX_REPORT_LEN.saturating_sub(frame));
        sharing.gap = REPORT_EVERY.max(now.elapsed() * 20);
        let Some(out) = sharing.load.report(tenants) else {
            return;
        };
        let report = LoadReport {
            scheduler: self.scheduler_id.clone(),
            seq: out.seq,
            version: out.version,
            tenants: out.tenants,
            seen: out.seen,
        };
        if let Err(e) = sharing.reporter.publish(report.encode()) {
            debug!(error = %e, "load report not published");
        }
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
