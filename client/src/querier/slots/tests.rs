//! The worker slots' state machine, driven through its transitions without I/O.

use super::*;

const GRACE: Duration = Duration::from_secs(1);
const CONFIRM: Duration = Duration::from_millis(100);

fn ready(worker: WorkerSlot, finished: Option<QueryId>) -> Action {
    Action::Send(QuerierToScheduler::Ready {
        worker,
        finished: finished.map(|query_id| Finished {
            frontend_id: "fe".into(),
            query_id,
            measured_cost: None,
        }),
    })
}

fn open(n: usize) -> (Slots, Vec<Action>) {
    let mut s = Slots::new(GRACE, CONFIRM, false);
    let mut out = Vec::new();
    s.grow(n, &mut out);
    assert!(out.is_empty(), "no stream: nobody asks");
    s.opened(&mut out);
    (s, out)
}

fn open_prefetching(workers: usize) -> Slots {
    let mut s = Slots::new(GRACE, CONFIRM, true);
    let mut out = Vec::new();
    s.grow(workers, &mut out);
    s.opened(&mut out);
    assert_eq!(out.len(), workers * 2, "two slots per worker ask: {out:?}");
    s
}

#[test]
fn with_prefetch_each_worker_holds_one_query_and_runs_one_at_a_time() {
    let mut s = open_prefetching(1);
    let now = Instant::now();
    let mut out = Vec::new();
    s.dispatched(0, 1, "fe", None, now, &mut out).unwrap();
    assert_eq!(out, vec![Action::Start(0)], "a free worker runs it at once");
    out.clear();
    s.dispatched(1, 2, "fe", None, now, &mut out).unwrap();
    assert!(out.is_empty(), "the only worker is busy: held, not started");
    assert!(matches!(s.state(1), Some(State::Held(_))));
    s.done(0, Some(10), None, &mut out);
    assert_eq!(
        out,
        vec![Action::Start(1), ready(0, Some(1))],
        "the held query starts as the slot reports"
    );
    out.clear();
    s.dispatched(0, 3, "fe", None, now, &mut out).unwrap();
    assert!(out.is_empty(), "query 2 runs: query 3 is held");
    s.done(1, None, None, &mut out);
    assert_eq!(out, vec![Action::Start(0), ready(1, Some(2))]);
}

#[test]
fn held_queries_start_oldest_first_and_new_workers_take_them() {
    let mut s = open_prefetching(2);
    let now = Instant::now();
    let mut out = Vec::new();
    for (slot, query) in [(0, 1), (1, 2), (3, 3), (2, 4)] {
        s.dispatched(slot, query, "fe", None, now, &mut out).unwrap();
    }
    assert_eq!(out, vec![Action::Start(0), Action::Start(1)]);
    out.clear();
    s.done(1, None, None, &mut out);
    assert_eq!(out[0], Action::Start(3), "query 3 was held first");
    out.clear();
    s.grow(3, &mut out);
    assert_eq!(out[0], Action::Start(2), "a new worker runs the other held query");
    assert_eq!(s.len(), 6);
    assert_eq!(s.workers(), 3);
}

#[test]
fn a_held_query_cancelled_or_past_its_deadline_never_runs_and_is_reported_at_once() {
    let mut s = open_prefetching(1);
    let t0 = Instant::now();
    let mut out = Vec::new();
    s.dispatched(0, 1, "fe", None, t0, &mut out).unwrap();
    s.dispatched(1, 2, "fe", None, t0, &mut out).unwrap();
    out.clear();
    s.cancel(1, 9, t0, &mut out);
    assert!(out.is_empty(), "another query's cancel");
    s.cancel(1, 2, t0, &mut out);
    assert_eq!(out, vec![Action::Drop(1), ready(1, Some(2))]);
    out.clear();
    s.dispatched(1, 3, "fe", Some(Duration::from_millis(500)), t0, &mut out)
        .unwrap();
    assert!(out.is_empty(), "held");
    s.tick(t0 + CONFIRM, &mut out);
    assert_eq!(
        out,
        vec![Action::Confirm(0), Action::Confirm(1)],
        "held queries are confirmed too"
    );
    out.clear();
    assert_eq!(s.next_moment(), Some(t0 + Duration::from_millis(500)));
    s.tick(t0 + Duration::from_millis(500), &mut out);
    assert_eq!(
        out,
        vec![Action::Drop(1), ready(1, Some(3))],
        "its deadline passed while held"
    );
    out.clear();
    s.done(0, None, None, &mut out);
    assert_eq!(out, vec![ready(0, Some(1))], "nothing held is left to start");
}

#[test]
fn a_draining_link_runs_its_held_queries_before_it_is_idle() {
    let mut s = open_prefetching(1);
    let now = Instant::now();
    let mut out = Vec::new();
    s.dispatched(0, 1, "fe", None, now, &mut out).unwrap();
    s.dispatched(1, 2, "fe", None, now, &mut out).unwrap();
    s.draining();
    out.clear();
    s.done(0, None, None, &mut out);
    assert_eq!(out, vec![Action::Start(1), ready(0, Some(1))]);
    assert!(s.busy(), "query 2 runs");
    out.clear();
    s.done(1, None, None, &mut out);
    assert_eq!(out, vec![ready(1, Some(2))]);
    assert!(!s.busy());
}

#[test]
fn every_free_worker_asks_once_a_stream_opens_and_new_workers_ask_at_once() {
    let (mut s, out) = open(2);
    assert_eq!(out, vec![ready(0, None), ready(1, None)]);
    let mut out = Vec::new();
    s.grow(3, &mut out);
    assert_eq!(out, vec![ready(2, None)]);
}

#[test]
fn a_dispatch_to_a_worker_that_did_not_ask_is_refused() {
    let (mut s, _) = open(1);
    let now = Instant::now();
    s.dispatched(0, 1, "fe", None, now, &mut Vec::new()).unwrap();
    assert!(s.dispatched(0, 2, "fe", None, now, &mut Vec::new()).is_err(), "busy");
    assert!(
        s.dispatched(7, 2, "fe", None, now, &mut Vec::new()).is_err(),
        "no such worker"
    );
}

#[test]
fn a_finished_query_is_reported_only_once_its_previous_delivery_is_settled() {
    let (mut s, _) = open(1);
    let now = Instant::now();
    let mut out = Vec::new();
    s.dispatched(0, 1, "fe", None, now, &mut Vec::new()).unwrap();
    s.done(0, Some(10), None, &mut out);
    assert_eq!(out, vec![ready(0, Some(1))], "only the newest delivery in flight");
    out.clear();
    s.dispatched(0, 2, "fe", None, now, &mut Vec::new()).unwrap();
    s.done(0, Some(11), None, &mut out);
    assert!(out.is_empty(), "delivery 10 is still in flight");
    assert!(matches!(s.state(0), Some(State::Settling { .. })));
    s.settled(0, 11, &mut out);
    assert!(out.is_empty(), "the newer settling first is not enough");
    s.settled(0, 10, &mut out);
    assert_eq!(out, vec![ready(0, Some(2))]);
    assert!(!s.delivering());
}

#[test]
fn deadline_cancels_then_the_grace_aborts_and_confirmation_comes_once() {
    let (mut s, _) = open(1);
    let t0 = Instant::now();
    s.dispatched(0, 1, "fe", Some(Duration::from_millis(500)), t0, &mut Vec::new())
        .unwrap();
    assert_eq!(s.next_moment(), Some(t0 + CONFIRM));
    let mut out = Vec::new();
    s.tick(t0 + CONFIRM, &mut out);
    assert_eq!(out, vec![Action::Confirm(0)]);
    out.clear();
    s.tick(t0 + CONFIRM, &mut out);
    assert!(out.is_empty(), "confirmed once");
    assert_eq!(s.next_moment(), Some(t0 + Duration::from_millis(500)));
    s.tick(t0 + Duration::from_millis(500), &mut out);
    assert_eq!(out, vec![Action::Cancel(0)]);
    assert!(s.is_cancelled(0));
    out.clear();
    s.tick(t0 + Duration::from_millis(500) + GRACE, &mut out);
    assert_eq!(out, vec![Action::Abort(0)]);
    out.clear();
    s.tick(t0 + Duration::from_millis(500) + GRACE * 2, &mut out);
    assert!(out.is_empty(), "aborted once");
}

#[test]
fn new_moments_are_handed_out_once_earliest_first() {
    let (mut s, _) = open(2);
    let t0 = Instant::now();
    assert_eq!(s.take_fresh(), None);
    s.dispatched(0, 1, "fe", Some(Duration::from_millis(30)), t0, &mut Vec::new())
        .unwrap();
    s.dispatched(1, 2, "fe", None, t0, &mut Vec::new()).unwrap();
    assert_eq!(
        s.take_fresh(),
        Some(t0 + Duration::from_millis(30)),
        "the deadline, before confirmation"
    );
    assert_eq!(s.take_fresh(), None, "taken");
    let mut out = Vec::new();
    s.cancel(1, 2, t0, &mut out);
    assert_eq!(s.take_fresh(), Some(t0 + GRACE));
}

#[test]
fn a_cancel_for_another_query_or_a_free_worker_is_ignored() {
    let (mut s, _) = open(2);
    let now = Instant::now();
    let mut out = Vec::new();
    s.dispatched(0, 1, "fe", None, now, &mut Vec::new()).unwrap();
    s.cancel(0, 9, now, &mut out);
    s.cancel(1, 1, now, &mut out);
    assert!(out.is_empty());
    s.cancel(0, 1, now, &mut out);
    s.cancel(0, 1, now, &mut out);
    assert_eq!(out, vec![Action::Cancel(0)], "once");
}

#[test]
fn a_draining_stream_gets_one_last_ready_per_running_query_and_no_more_asks() {
    let (mut s, _) = open(3);
    let now = Instant::now();
    s.dispatched(0, 1, "fe", None, now, &mut Vec::new()).unwrap();
    s.dispatched(1, 2, "fe", None, now, &mut Vec::new()).unwrap();
    s.draining();
    assert_eq!(s.state(2), Some(&State::Idle));
    let mut out = Vec::new();
    s.done(0, Some(1), None, &mut out);
    s.done(1, None, None, &mut out);
    assert_eq!(out, vec![ready(0, Some(1)), ready(1, Some(2))]);
    assert!(!s.busy());
    assert!(s.delivering(), "delivery 1 goes on");
}

#[test]
fn queries_run_on_across_a_lost_stream_and_their_workers_ask_on_the_next() {
    let (mut s, _) = open(2);
    let now = Instant::now();
    s.dispatched(0, 1, "fe", None, now, &mut Vec::new()).unwrap();
    s.closed();
    assert_eq!(s.state(1), Some(&State::Idle));
    let mut out = Vec::new();
    s.done(0, Some(5), None, &mut out);
    assert!(out.is_empty(), "no stream to report on");
    s.opened(&mut out);
    assert_eq!(out, vec![ready(0, None), ready(1, None)]);
}
