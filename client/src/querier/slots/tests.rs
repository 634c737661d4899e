//! The worker slots' state machine, driven through its transitions without I/O.

use super::*;

const GRACE: Duration = Duration::from_secs(1);
const CONFIRM: Duration = Duration::from_millis(100);

fn ready(worker: WorkerSlot, finished: Option<QueryId>) -> Action {
    Action::Send(QuerierToScheduler::Ready {
        worker,
        finished: finished.map(|query_id| Finished {
            query_id,
            measured_cost: None,
        }),
    })
}

fn open(n: usize) -> (Slots, Vec<Action>) {
    let mut s = Slots::new(GRACE, CONFIRM, false);
    let mut out = Vec::new();
    s.grow(n, Instant::now(), &mut out);
    assert!(out.is_empty(), "no stream: nobody asks");
    s.opened(&mut out);
    (s, out)
}

fn open_prefetching(workers: usize) -> Slots {
    let mut s = Slots::new(GRACE, CONFIRM, true);
    let mut out = Vec::new();
    s.grow(workers, Instant::now(), &mut out);
    s.opened(&mut out);
    assert_eq!(
        out[0],
        loop_slots(),
        "the scheduler hears first that the slots come in pairs"
    );
    assert_eq!(out.len(), 1 + workers * 2, "two slots per worker ask: {out:?}");
    s
}

fn loop_slots() -> Action {
    Action::Send(QuerierToScheduler::LoopSlots { slots_per_loop: 2 })
}

#[test]
fn with_prefetch_each_worker_holds_one_query_and_runs_one_at_a_time() {
    let mut s = open_prefetching(1);
    let now = Instant::now();
    let mut out = Vec::new();
    s.dispatched(0, 1, None, now, &mut out).unwrap();
    assert_eq!(out, vec![Action::Start(0)], "a free worker runs it at once");
    out.clear();
    s.dispatched(1, 2, None, now, &mut out).unwrap();
    assert!(out.is_empty(), "the only worker is busy: held, not started");
    assert!(matches!(s.state(1), Some(State::Held(_))));
    s.done(0, Some(10), None, Instant::now(), &mut out);
    assert_eq!(
        out,
        vec![Action::Start(1), ready(0, Some(1))],
        "the held query starts as the slot reports"
    );
    out.clear();
    s.dispatched(0, 3, None, now, &mut out).unwrap();
    assert!(out.is_empty(), "query 2 runs: query 3 is held");
    s.done(1, None, None, Instant::now(), &mut out);
    assert_eq!(out, vec![Action::Start(0), ready(1, Some(2))]);
}

#[test]
fn a_link_grows_by_whole_loops_and_held_queries_stay_with_their_own() {
    let mut s = open_prefetching(1);
    let now = Instant::now();
    let mut out = Vec::new();
    s.dispatched(0, 1, None, now, &mut out).unwrap();
    s.dispatched(1, 2, None, now, &mut out).unwrap();
    assert_eq!(out, vec![Action::Start(0)]);
    out.clear();
    s.grow(2, now, &mut out);
    assert_eq!(out, vec![ready(2, None), ready(3, None)], "loop 1's slots ask at once");
    assert!(matches!(s.state(1), Some(State::Held(_))), "query 2 waits for loop 0");
    assert_eq!((s.len(), s.workers()), (4, 2));
    out.clear();
    s.done(0, None, None, now, &mut out);
    assert_eq!(out, vec![Action::Start(1), ready(0, Some(1))]);
}

#[test]
fn every_new_stream_hears_first_that_the_slots_come_in_pairs() {
    let mut s = open_prefetching(1);
    let mut out = Vec::new();
    s.closed();
    s.opened(&mut out);
    assert_eq!(out, vec![loop_slots(), ready(0, None), ready(1, None)]);
}

#[test]
fn a_held_query_cancelled_or_past_its_deadline_never_runs_and_is_reported_at_once() {
    let mut s = open_prefetching(1);
    let t0 = Instant::now();
    let mut out = Vec::new();
    s.dispatched(0, 1, None, t0, &mut out).unwrap();
    s.dispatched(1, 2, None, t0, &mut out).unwrap();
    out.clear();
    s.cancel(1, 9, t0, &mut out);
    assert!(out.is_empty(), "another query's cancel");
    s.cancel(1, 2, t0, &mut out);
    assert_eq!(out, vec![Action::Drop(1), ready(1, Some(2))]);
    out.clear();
    s.dispatched(1, 3, Some(Duration::from_millis(500)), t0, &mut out)
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
    s.done(0, None, None, Instant::now(), &mut out);
    assert_eq!(out, vec![ready(0, Some(1))], "nothing held is left to start");
}

#[test]
fn a_draining_link_runs_its_held_queries_before_it_is_idle() {
    let mut s = open_prefetching(1);
    let now = Instant::now();
    let mut out = Vec::new();
    s.dispatched(0, 1, None, now, &mut out).unwrap();
    s.dispatched(1, 2, None, now, &mut out).unwrap();
    s.draining();
    out.clear();
    s.done(0, None, None, Instant::now(), &mut out);
    assert_eq!(out, vec![Action::Start(1), ready(0, Some(1))]);
    assert!(s.busy(), "query 2 runs");
    out.clear();
    s.done(1, None, None, Instant::now(), &mut out);
    assert_eq!(out, vec![ready(1, Some(2))]);
    assert!(!s.busy());
}

#[test]
fn every_free_worker_asks_once_a_stream_opens_and_new_workers_ask_at_once() {
    let (mut s, out) = open(2);
    assert_eq!(out, vec![ready(0, None), ready(1, None)]);
    let mut out = Vec::new();
    s.grow(3, Instant::now(), &mut out);
    assert_eq!(out, vec![ready(2, None)]);
}

#[test]
fn a_dispatch_to_a_worker_that_did_not_ask_is_refused() {
    let (mut s, _) = open(1);
    let now = Instant::now();
    s.dispatched(0, 1, None, now, &mut Vec::new()).unwrap();
    assert!(s.dispatched(0, 2, None, now, &mut Vec::new()).is_err(), "busy");
    assert!(
        s.dispatched(7, 2, None, now, &mut Vec::new()).is_err(),
        "no such worker"
    );
}

#[test]
fn a_finished_query_is_reported_only_once_its_previous_delivery_is_settled() {
    let (mut s, _) = open(1);
    let now = Instant::now();
    let mut out = Vec::new();
    s.dispatched(0, 1, None, now, &mut Vec::new()).unwrap();
    s.done(0, Some(10), None, Instant::now(), &mut out);
    assert_eq!(out, vec![ready(0, Some(1))], "only the newest delivery in flight");
    out.clear();
    s.dispatched(0, 2, None, now, &mut Vec::new()).unwrap();
    s.done(0, Some(11), None, Instant::now(), &mut out);
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
    s.dispatched(0, 1, Some(Duration::from_millis(500)), t0, &mut Vec::new())
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
    s.dispatched(0, 1, Some(Duration::from_millis(30)), t0, &mut Vec::new())
        .unwrap();
    s.dispatched(1, 2, None, t0, &mut Vec::new()).unwrap();
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
    s.dispatched(0, 1, None, now, &mut Vec::new()).unwrap();
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
    s.dispatched(0, 1, None, now, &mut Vec::new()).unwrap();
    s.dispatched(1, 2, None, now, &mut Vec::new()).unwrap();
    s.draining();
    assert_eq!(s.state(2), Some(&State::Idle));
    let mut out = Vec::new();
    s.done(0, Some(1), None, Instant::now(), &mut out);
    s.done(1, None, None, Instant::now(), &mut out);
    assert_eq!(out, vec![ready(0, Some(1)), ready(1, Some(2))]);
    assert!(!s.busy());
    assert!(s.delivering(), "delivery 1 goes on");
}

#[test]
fn queries_run_on_across_a_lost_stream_and_their_workers_ask_on_the_next() {
    let (mut s, _) = open(2);
    let now = Instant::now();
    s.dispatched(0, 1, None, now, &mut Vec::new()).unwrap();
    s.closed();
    assert_eq!(s.state(1), Some(&State::Idle));
    let mut out = Vec::new();
    s.done(0, Some(5), None, Instant::now(), &mut out);
    assert!(out.is_empty(), "no stream to report on");
    s.opened(&mut out);
    assert_eq!(out, vec![ready(0, None), ready(1, None)]);
}

const HOLD: Duration = Duration::from_millis(10);

fn hand_back(worker: WorkerSlot, query_id: QueryId) -> Action {
    Action::Send(QuerierToScheduler::HandBack { worker, query_id })
}

/// One worker with prefetch and a hold limit: query 1 runs on slot 0, query 2 is held on
/// slot 1, from `t0`.
fn one_running_one_held(t0: Instant) -> Slots {
    let mut s = Slots::new(GRACE, CONFIRM, true).with_hold_limit(Some(HOLD));
    let mut out = Vec::new();
    s.grow(1, t0, &mut out);
    s.opened(&mut out);
    out.clear();
    s.dispatched(0, 1, None, t0, &mut out).unwrap();
    s.dispatched(1, 2, None, t0, &mut out).unwrap();
    assert_eq!(out, vec![Action::Start(0)]);
    s
}

#[test]
fn a_query_held_past_the_hold_limit_is_given_back_and_its_slot_rests_until_a_short_handler_returns() {
    let t0 = Instant::now();
    let mut s = one_running_one_held(t0);
    let mut out = Vec::new();
    assert_eq!(s.next_moment(), Some(t0 + HOLD), "the hold limit is the first moment");
    s.tick(t0 + HOLD - Duration::from_millis(1), &mut out);
    assert!(out.is_empty(), "{out:?}");
    s.tick(t0 + HOLD, &mut out);
    assert_eq!(
        out,
        vec![hand_back(1, 2), Action::Drop(1)],
        "given back unstarted, never confirmed"
    );
    assert_eq!(s.state(1), Some(&State::Resting { woken: false }));
    out.clear();
    // Query 1 ran long: the slot keeps resting, so no query waits behind the next long one.
    s.done(0, None, None, t0 + Duration::from_millis(200), &mut out);
    assert_eq!(out, vec![ready(0, Some(1))]);
    out.clear();
    let t1 = t0 + Duration::from_millis(200);
    s.dispatched(0, 3, None, t1, &mut out).unwrap();
    assert_eq!(out, vec![Action::Start(0)], "the worker is free: it runs at once");
    out.clear();
    // Query 3 ran within the limit: short queries again, so prefetch resumes.
    s.done(0, None, None, t1 + Duration::from_millis(3), &mut out);
    assert_eq!(
        out,
        vec![
            ready(0, Some(3)),
            Action::Send(QuerierToScheduler::Ready {
                worker: 1,
                finished: None
            })
        ]
    );
    assert_eq!(s.state(1), Some(&State::Waiting));
}

#[test]
fn a_woken_slot_asks_only_once_its_last_delivery_is_settled() {
    let t0 = Instant::now();
    let mut s = one_running_one_held(t0);
    let mut out = Vec::new();
    // Query 2 runs on slot 1 and its result is on its way (delivery 11) as slot 1 asks again.
    s.done(0, Some(10), None, t0, &mut out);
    s.done(1, Some(11), None, t0, &mut out);
    s.settled(0, 10, &mut out);
    out.clear();
    s.dispatched(0, 3, None, t0, &mut out).unwrap();
    s.dispatched(1, 4, None, t0, &mut out).unwrap();
    s.tick(t0 + HOLD, &mut out);
    assert_eq!(out, vec![Action::Start(0), hand_back(1, 4), Action::Drop(1)]);
    out.clear();
    // Query 3 ran long; query 5 runs within the limit and wakes slot 1.
    s.done(0, None, None, t0 + HOLD, &mut out);
    s.dispatched(0, 5, None, t0 + HOLD, &mut out).unwrap();
    assert_eq!(out, vec![ready(0, Some(3)), Action::Start(0)]);
    out.clear();
    s.done(0, None, None, t0 + HOLD + Duration::from_millis(1), &mut out);
    assert_eq!(
        out,
        vec![ready(0, Some(5))],
        "woken, but its delivery is in flight: {out:?}"
    );
    assert_eq!(s.state(1), Some(&State::Resting { woken: true }));
    out.clear();
    s.settled(1, 11, &mut out);
    assert_eq!(
        out,
        vec![Action::Send(QuerierToScheduler::Ready {
            worker: 1,
            finished: None
        })],
        "its Ready says delivery 11 is settled"
    );
}

#[test]
fn a_held_query_is_not_given_back_once_its_stream_is_gone_and_is_confirmed_instead() {
    let t0 = Instant::now();
    for end in ["closed", "draining"] {
        let mut s = one_running_one_held(t0);
        let mut out = Vec::new();
        if end == "closed" {
            s.closed();
        } else {
            s.draining();
        }
        s.tick(t0 + HOLD, &mut out);
        assert!(
            out.is_empty(),
            "{end}: the next stream's scheduler does not know it: {out:?}"
        );
        s.tick(t0 + CONFIRM, &mut out);
        assert_eq!(out, vec![Action::Confirm(0), Action::Confirm(1)], "{end}");
        assert!(
            matches!(s.state(1), Some(State::Held(_))),
            "{end}: it starts when the worker is free"
        );
    }
}

#[test]
fn a_held_query_waits_for_its_own_worker_loop() {
    // Two workers: loop 0 has slots 0 and 1, loop 1 slots 2 and 3 (the scheduler, told
    // `LoopSlots`, starts each loop's two slots at the same component).
    let mut s = open_prefetching(2);
    let now = Instant::now();
    let mut out = Vec::new();
    for (slot, query) in [(0, 1), (2, 2), (1, 3), (3, 4)] {
        s.dispatched(slot, query, None, now, &mut out).unwrap();
    }
    assert_eq!(out, vec![Action::Start(0), Action::Start(2)], "3 and 4 are held");
    out.clear();
    s.done(2, None, None, now, &mut out);
    assert_eq!(
        out[0],
        Action::Start(3),
        "loop 1 freed: its own held query 4, not the older 3"
    );
    assert!(matches!(s.state(1), Some(State::Held(_))), "3 waits for loop 0");
    out.clear();
    s.done(0, None, None, now, &mut out);
    assert_eq!(out[0], Action::Start(1));
}

#[test]
fn a_resting_slot_is_woken_only_by_a_short_handler_of_its_own_loop() {
    let t0 = Instant::now();
    let mut s = Slots::new(GRACE, CONFIRM, true).with_hold_limit(Some(HOLD));
    let mut out = Vec::new();
    s.grow(2, t0, &mut out);
    s.opened(&mut out);
    out.clear();
    // Loop 0 (slots 0 and 1) runs query 1 and holds query 2 until the limit.
    s.dispatched(0, 1, None, t0, &mut out).unwrap();
    s.dispatched(1, 2, None, t0, &mut out).unwrap();
    s.tick(t0 + HOLD, &mut out);
    assert_eq!(out, vec![Action::Start(0), hand_back(1, 2), Action::Drop(1)]);
    out.clear();
    // A short query on loop 1 says nothing about loop 0.
    let t1 = t0 + HOLD;
    s.dispatched(2, 3, None, t1, &mut out).unwrap();
    s.done(2, None, None, t1 + Duration::from_millis(1), &mut out);
    assert_eq!(out, vec![Action::Start(2), ready(2, Some(3))]);
    assert_eq!(s.state(1), Some(&State::Resting { woken: false }));
    out.clear();
    // Loop 0's long query ends, then a short one: now slot 1 asks again.
    s.done(0, None, None, t0 + Duration::from_millis(200), &mut out);
    let t2 = t0 + Duration::from_millis(200);
    s.dispatched(0, 4, None, t2, &mut out).unwrap();
    s.done(0, None, None, t2 + Duration::from_millis(1), &mut out);
    assert_eq!(
        out,
        vec![
            ready(0, Some(1)),
            Action::Start(0),
            ready(0, Some(4)),
            Action::Send(QuerierToScheduler::Ready {
                worker: 1,
                finished: None
            })
        ]
    );
}
