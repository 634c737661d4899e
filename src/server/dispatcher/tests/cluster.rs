//! Tenant limits for the cluster at the dispatcher: enqueues refused only by the unseen
//! share wait for the other schedulers' next reports, and every one still ends with one
//! answer.

use super::*;
use crate::server::dispatcher::cluster::{DEFER_FOR, MAX_DEFERRED};
use sluice_protocol::LoadReport;

const LIMIT: u32 = 10;

/// A dispatcher sharing counts with one other scheduler, `p`, which holds nothing of `t`
/// and has seen none of this scheduler's reports: the allowance is half the room, 5.
fn with_peer() -> Harness {
    let config = QueueConfig {
        max_outstanding_per_tenant: LIMIT,
        ..QueueConfig::default()
    };
    let mut h = harness_with(config);
    h.d.share_load_unsent();
    peer_reports(&mut h, 1, 0, None);
    for q in 1..=5 {
        h.enqueue(q);
    }
    h
}

/// `p` reports (its `seq`-th report) holding `held` of `t`, having seen this scheduler's
/// counts as of `acked`.
fn peer_reports(h: &mut Harness, seq: u64, held: u32, acked: Option<u64>) {
    let report = LoadReport {
        scheduler: "p".into(),
        seq,
        version: seq,
        tenants: if held > 0 { vec![("t".into(), held)] } else { vec![] },
        seen: acked.map(|v| vec![("s".to_string(), v)]).unwrap_or_default(),
    };
    h.d.handle(Command::PeerReport(Box::new(report)), h.now);
}

/// This scheduler reports its counts; returns the version `p` acknowledges to have seen it.
fn report(h: &mut Harness) -> u64 {
    h.d.report_load(h.now);
    h.d.sharing.as_ref().unwrap().load.version()
}

fn deferred(h: &Harness) -> usize {
    h.d.sharing.as_ref().unwrap().deferred()
}

#[test]
fn an_enqueue_over_the_unseen_share_waits_for_the_next_report_instead_of_being_refused() {
    let mut h = with_peer();
    h.send_enqueue("t", 6);
    assert!(
        h.frame().is_err(),
        "no answer yet: the cluster has room, p has not seen the 5"
    );
    assert_eq!(deferred(&h), 1);

    // p acknowledges this scheduler's 5: room 10, 5 visible, a third of the rest may go
    // unseen: the deferred query is taken.
    let version = report(&mut h);
    peer_reports(&mut h, 2, 0, Some(version));
    assert!(matches!(
        h.frame(),
        Ok(SchedulerToFrontend::EnqueueStatus {
            query_id: 6,
            status: EnqueueStatus::Accepted,
            ..
        })
    ));
    assert_eq!((deferred(&h), h.d.queue.len()), (0, 6));
}

#[test]
fn a_deferred_enqueue_is_refused_when_no_report_comes_in_time() {
    let mut h = with_peer();
    h.send_enqueue("t", 6);
    h.now += DEFER_FOR - Duration::from_millis(1);
    h.d.tick(h.now);
    assert!(h.frame().is_err(), "still waiting");
    h.now += Duration::from_millis(1);
    h.d.tick(h.now);
    assert_eq!(
        h.frame().ok(),
        Some(SchedulerToFrontend::EnqueueStatus {
            query_id: 6,
            status: EnqueueStatus::TooManyOutstanding { limit: LIMIT },
            load: LoadHint {
                queued: 5,
                idle_workers: 0
            },
            estimated_wait_ms: None,
        })
    );
    assert_eq!(deferred(&h), 0);
    assert!(h.frame().is_err(), "one answer");
}

#[test]
fn a_cluster_without_room_refuses_at_once() {
    let mut h = with_peer();
    // p holds the other 5: nothing more fits anywhere.
    let version = report(&mut h);
    peer_reports(&mut h, 2, 5, Some(version));
    assert_eq!(h.enqueue_status(6), EnqueueStatus::TooManyOutstanding { limit: LIMIT });
    assert_eq!(deferred(&h), 0);
}

#[test]
fn no_more_is_deferred_than_the_cluster_has_room_for() {
    let mut h = with_peer();
    // Room for 5 more in the cluster: 5 wait, the sixth is refused at once.
    for q in 6..=10 {
        h.send_enqueue("t", q);
    }
    assert!(h.frame().is_err());
    assert_eq!(h.enqueue_status(11), EnqueueStatus::TooManyOutstanding { limit: LIMIT });
    assert_eq!(deferred(&h), 5);
}

#[test]
fn past_the_deferring_budget_an_enqueue_is_refused_at_once() {
    let mut h = with_peer();
    // Every tenant has room for 5 more in the cluster: tenants enough to pass the budget.
    let tenants = MAX_DEFERRED / 5 + 1;
    let mut query = 100;
    for t in 0..tenants {
        let tenant = format!("t{t}");
        for _ in 0..5 {
            query += 1;
            h.enqueue_for(&tenant, query);
        }
        for _ in 0..5 {
            query += 1;
            h.send_enqueue(&tenant, query);
            if deferred(&h) < MAX_DEFERRED {
                assert!(h.frame().is_err(), "deferred, not answered");
            }
        }
    }
    assert_eq!(deferred(&h), MAX_DEFERRED);
    let refused_at_once: Vec<_> = std::iter::from_fn(|| h.frame().ok()).collect();
    assert_eq!(refused_at_once.len(), tenants * 5 - MAX_DEFERRED);
    assert!(refused_at_once.iter().all(|f| matches!(
        f,
        SchedulerToFrontend::EnqueueStatus {
            status: EnqueueStatus::TooManyOutstanding { .. },
            ..
        }
    )));
}

#[test]
fn a_cancelled_or_orphaned_deferred_enqueue_is_never_queued_later() {
    let mut h = with_peer();
    h.send_enqueue("t", 6);
    let frontend = h.frontend;
    h.d.handle(Command::Cancel { frontend, query: 6 }, h.now);
    assert_eq!(h.frame().ok(), Some(SchedulerToFrontend::Cancelled { query_id: 6 }));
    assert_eq!(deferred(&h), 0);

    h.send_enqueue("t", 7);
    h.d.handle(
        Command::FrontendClosed {
            frontend,
            graceful: true,
        },
        h.now,
    );
    assert_eq!(deferred(&h), 0);

    let version = report(&mut h);
    peer_reports(&mut h, 2, 0, Some(version));
    assert!(h.frame().is_err(), "nothing answered for either");
    assert!(h.d.queue.is_empty(), "the frontend's queries went with it");
}

#[test]
fn a_deferred_enqueue_hears_shutting_down_when_the_drain_starts() {
    let mut h = with_peer();
    h.send_enqueue("t", 6);
    let _drained = h.shutdown(Duration::from_secs(5));
    assert_eq!(h.frame().ok(), Some(SchedulerToFrontend::ShuttingDown));
    assert!(matches!(
        h.frame(),
        Ok(SchedulerToFrontend::EnqueueStatus {
            query_id: 6,
            status: EnqueueStatus::ShuttingDown,
            ..
        })
    ));
}

#[test]
fn with_the_most_schedulers_every_report_fits_a_packet_and_acknowledges_each_in_turn() {
    use crate::queue::cluster::{ACKS_TAKE_TURNS, MAX_PEERS};
    use sluice_client::gossip::{MAX_REPORT_LEN, RESEND_EVERY};
    let mut h = with_peer();
    let mut peers = vec![("p".to_string(), 1)];
    for i in 1..MAX_PEERS {
        let report = LoadReport {
            scheduler: format!("sluice-scheduler-eu-west-1-{i:05}"),
            seq: 1,
            version: 1_000 + i as u64,
            tenants: vec![],
            seen: vec![],
        };
        peers.push((report.scheduler.clone(), report.version));
        h.d.handle(Command::PeerReport(Box::new(report)), h.now);
    }
    let mut acked = std::collections::BTreeMap::new();
    for _ in 0..peers.len() {
        h.now += RESEND_EVERY;
        let r = h.d.next_report(h.now).expect("the next turn is due");
        assert!(r.encode().len() <= MAX_REPORT_LEN, "{} bytes", r.encode().len());
        assert_eq!(r.tenants, vec![("t".to_string(), 5)], "the tenants still go");
        assert_eq!(r.seen[0].0, ACKS_TAKE_TURNS);
        acked.extend(r.seen[1..].iter().cloned());
        if acked.len() == peers.len() {
            break;
        }
    }
    assert_eq!(acked, peers.into_iter().collect(), "every scheduler acknowledged");
    assert_eq!(
        h.d.next_report(h.now + RESEND_EVERY - Duration::from_millis(1)),
        None,
        "turns follow the gossip's resend period"
    );
}
