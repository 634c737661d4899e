//! The query table without a network: events in, actions out, explicit time.

use super::*;

const S0: SchedulerIx = 0;
const S1: SchedulerIx = 1;
/// The capability every query here draws.
const CAP: Capability = 0xfeed;

fn table() -> QueryTable {
    QueryTable::new(
        Policy {
            placement_wait: Duration::from_secs(5),
            max_attempts: 2,
            confirm_grace: Duration::from_secs(2),
        },
        42,
    )
}

struct T {
    table: QueryTable,
    t0: Instant,
    now: Instant,
}

impl T {
    fn new(schedulers: &[SchedulerIx]) -> T {
        let now = Instant::now();
        let mut t = T {
            table: table(),
            t0: now,
            now,
        };
        for &s in schedulers {
            t.on(Event::SchedulerUp {
                scheduler: s,
                in_use: true,
            });
        }
        t
    }

    fn on(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        self.table.handle(event, &Now::at(self.now), &mut out);
        out
    }

    fn at(&mut self, after_start: Duration, event: Event) -> Vec<Action> {
        self.now = self.t0 + after_start;
        self.on(event)
    }

    fn submit(&mut self, id: QueryId, timeout: Option<Duration>, retriable: bool) -> Vec<Action> {
        let deadline = timeout.map(|t| self.now + t);
        self.on(Event::Submit {
            id,
            tenant: "t".into(),
            capability: CAP,
            deadline,
            retriable,
        })
    }

    /// Submits `id` and has the scheduler it went to accept it; returns that scheduler.
    fn queued(&mut self, id: QueryId, timeout: Option<Duration>, retriable: bool) -> SchedulerIx {
        let out = self.submit(id, timeout, retriable);
        let s = enqueued_at(&out, id).expect("an enqueue");
        let out = self.on(accepted(s, id));
        assert_eq!(out, [Action::Placed { id }]);
        s
    }
}

fn accepted(scheduler: SchedulerIx, id: QueryId) -> Event {
    status(scheduler, id, EnqueueStatus::Accepted)
}

/// `scheduler`'s answer to the enqueue of `id` (no load, no estimate).
fn status(scheduler: SchedulerIx, id: QueryId, status: EnqueueStatus) -> Event {
    Event::Status {
        scheduler,
        id,
        status,
        queued: 0,
        estimated_wait: None,
    }
}

/// `scheduler`'s note that it dispatched `id`.
fn dispatched(scheduler: SchedulerIx, id: QueryId) -> Event {
    Event::Dispatched {
        scheduler,
        ids: vec![id],
    }
}

fn enqueued_at(out: &[Action], id: QueryId) -> Option<SchedulerIx> {
    out.iter().find_map(|a| match a {
        Action::Enqueue { scheduler, id: i, .. } if *i == id => Some(*scheduler),
        _ => None,
    })
}

fn error(scheduler: SchedulerIx, id: QueryId, kind: QueryErrorKind) -> Event {
    Event::SchedulerError {
        scheduler,
        id,
        kind,
        message: "m".into(),
    }
}

#[test]
fn a_query_is_placed_dispatched_and_ends_with_its_result() {
    let mut t = T::new(&[S0]);
    let s = t.queued(1, None, false);
    t.on(dispatched(s, 1));
    assert_eq!(t.table.state(1), Some(State::Dispatched(s)));
    let out = t.on(Event::ResultHead {
        id: 1,
        tenant: "t".into(),
        capability: CAP,
    });
    assert_eq!(out, [Action::Accept { id: 1, whole: false }]);
    assert_eq!(t.on(Event::ResultEnd { id: 1 }), [Action::Done { id: 1 }]);
    assert_eq!(t.table.len(), 0);
}

#[test]
fn a_query_accepted_dispatched_and_answered_reads_no_clock() {
    let mut t = T::new(&[S0]);
    let out = t.submit(1, Some(Duration::from_secs(1)), false);
    let s = enqueued_at(&out, 1).expect("an enqueue");
    let lazily = |table: &mut QueryTable, event: Event| {
        let (now, mut out) = (Now::lazy(), Vec::new());
        table.handle(event, &now, &mut out);
        (now.was_read(), out)
    };
    assert_eq!(
        lazily(&mut t.table, accepted(s, 1)),
        (false, vec![Action::Placed { id: 1 }])
    );
    assert_eq!(lazily(&mut t.table, dispatched(s, 1)), (false, vec![]));
    let whole = Event::ResultWhole {
        id: 1,
        tenant: "t".into(),
        capability: CAP,
    };
    let ends = vec![Action::Accept { id: 1, whole: true }, Action::Done { id: 1 }];
    assert_eq!(lazily(&mut t.table, whole), (false, ends));
    // A refusal places the query again, and that needs the time (what is left of its deadline).
    t.submit(2, Some(Duration::from_secs(1)), false);
    let refused = status(S0, 2, EnqueueStatus::QueueFull);
    assert!(lazily(&mut t.table, refused).0);
}

#[test]
fn a_query_too_large_for_its_scheduler_fails_once_and_a_late_word_changes_nothing() {
    let mut t = T::new(&[S0]);
    let out = t.submit(1, None, false);
    let s = enqueued_at(&out, 1).expect("an enqueue");
    let too_large = || Event::TooLarge {
        scheduler: s,
        id: 1,
        reason: "too large".into(),
    };
    assert_eq!(
        t.on(too_large()),
        [Action::Fail {
            id: 1,
            error: QueryError::Invalid("too large".into())
        }]
    );
    assert_eq!(t.table.len(), 0);
    assert_eq!(t.on(too_large()), []);
    // Only a query still being placed there is failed by it.
    let s = t.queued(2, None, false);
    let out = t.on(Event::TooLarge {
        scheduler: s,
        id: 2,
        reason: "late".into(),
    });
    assert_eq!(out, []);
    assert_eq!(t.table.state(2), Some(State::Queued(s)));
}

#[test]
fn a_whole_result_is_taken_and_ends_its_query_in_one_step_once() {
    let mut t = T::new(&[S0]);
    let s = t.queued(1, None, false);
    t.on(dispatched(s, 1));
    let whole = |capability| Event::ResultWhole {
        id: 1,
        tenant: "t".into(),
        capability,
    };
    // A forged one is refused and changes nothing.
    let out = t.on(whole(CAP + 1));
    assert!(matches!(out[..], [Action::Refuse { .. }]), "{out:?}");
    assert_eq!(t.table.state(1), Some(State::Dispatched(s)));
    assert_eq!(
        t.on(whole(CAP)),
        [Action::Accept { id: 1, whole: true }, Action::Done { id: 1 }]
    );
    assert_eq!(t.table.len(), 0);
    let again = t.on(whole(CAP));
    assert!(matches!(again[..], [Action::Refuse { .. }]), "{again:?}");
}

#[test]
fn a_handed_back_query_is_placed_again_with_what_is_left_of_its_budget() {
    let mut t = T::new(&[S0, S1]);
    let s = t.queued(1, Some(Duration::from_secs(2)), false);
    let out = t.at(Duration::from_millis(500), error(s, 1, QueryErrorKind::HandedBack));
    let Some(Action::Enqueue { timeout, attempt, .. }) = out.first() else {
        panic!("placed again: {out:?}")
    };
    assert_eq!(*timeout, Some(Duration::from_millis(1500)), "the deadline is absolute");
    assert_eq!(*attempt, 1, "never started: the same attempt");
    assert_eq!(t.table.counters().requeued, 1);
}

#[test]
fn a_dispatched_query_given_back_unstarted_is_placed_again_and_its_next_querier_confirms_it() {
    let mut t = T::new(&[S0]);
    t.queued(1, Some(Duration::from_secs(2)), false);
    t.on(dispatched(S0, 1));
    // Its querier held it behind a long query and gave it back: the scheduler says so.
    let out = t.at(Duration::from_millis(300), error(S0, 1, QueryErrorKind::HandedBack));
    let Some(Action::Enqueue {
        scheduler,
        timeout,
        attempt,
        ..
    }) = out.first()
    else {
        panic!("placed again: {out:?}")
    };
    assert_eq!(
        (*scheduler, *timeout, *attempt),
        (S0, Some(Duration::from_millis(1700)), 1)
    );
    assert_eq!(t.table.state(1), Some(State::Placing(S0)));
    assert_eq!(t.table.counters().requeued, 1);
    assert_eq!(t.on(accepted(S0, 1)), [], "placed once already");
    t.on(dispatched(S0, 1));
    let started = Event::ResultStarted {
        id: 1,
        tenant: "t".into(),
        capability: CAP,
    };
    assert_eq!(
        t.on(started),
        [Action::Confirmed { id: 1 }],
        "the second querier's confirmation"
    );
    let whole = Event::ResultWhole {
        id: 1,
        tenant: "t".into(),
        capability: CAP,
    };
    assert_eq!(
        t.on(whole),
        [Action::Accept { id: 1, whole: true }, Action::Done { id: 1 }]
    );
}

#[test]
fn a_started_query_is_not_placed_again_when_handed_back() {
    let mut t = T::new(&[S0]);
    t.queued(1, None, true);
    t.on(dispatched(S0, 1));
    t.on(Event::ResultStarted {
        id: 1,
        tenant: "t".into(),
        capability: CAP,
    });
    let out = t.on(error(S0, 1, QueryErrorKind::HandedBack));
    assert!(
        matches!(
            out[..],
            [Action::Fail {
                id: 1,
                error: QueryError::Cancelled(_)
            }]
        ),
        "it may have run: it ends, never runs twice: {out:?}"
    );
}

#[test]
fn a_query_handed_back_by_the_only_scheduler_waits_for_it_to_come_back() {
    let mut t = T::new(&[S0]);
    t.queued(1, None, false);
    t.on(Event::SchedulerDraining { scheduler: S0 });
    assert_eq!(t.on(error(S0, 1, QueryErrorKind::HandedBack)), []);
    assert_eq!(t.table.state(1), Some(State::Waiting));
    t.on(Event::SchedulerDown { scheduler: S0 });
    let out = t.at(
        Duration::from_secs(1),
        Event::SchedulerUp {
            scheduler: S0,
            in_use: true,
        },
    );
    assert_eq!(enqueued_at(&out, 1), Some(S0), "the restarted scheduler takes it");
}

#[test]
fn a_lost_scheduler_changes_nothing_for_a_dispatched_query() {
    let mut t = T::new(&[S0, S1]);
    let s = t.queued(1, None, false);
    t.on(dispatched(s, 1));
    assert_eq!(t.on(Event::SchedulerDown { scheduler: s }), []);
    assert_eq!(t.table.state(1), Some(State::Dispatched(s)));
    // Its querier still answers the frontend directly.
    assert_eq!(
        t.on(Event::ResultHead {
            id: 1,
            tenant: "t".into(),
            capability: CAP,
        }),
        [Action::Accept { id: 1, whole: false }]
    );
}

#[test]
fn a_dispatch_its_lost_scheduler_left_unconfirmed_is_placed_again_after_the_grace() {
    let mut t = T::new(&[S0, S1]);
    let s = t.queued(1, None, false);
    let other = 1 - s;
    let s2 = t.queued(2, None, false);
    t.on(dispatched(s, 1));
    t.on(dispatched(s2, 2));
    // Query 2's querier confirms it; then query 1's scheduler (and 2's, if the same) dies.
    let out = t.on(Event::ResultStarted {
        id: 2,
        tenant: "t".into(),
        capability: CAP,
    });
    assert_eq!(out, [Action::Confirmed { id: 2 }]);
    assert_eq!(t.on(Event::SchedulerDown { scheduler: s }), []);
    assert_eq!(t.on(Event::SchedulerDown { scheduler: s2 }), []);
    assert_eq!(t.at(Duration::from_millis(1999), Event::Tick), []);
    // Two seconds without a word from a querier: the dispatch never reached one.
    t.on(Event::SchedulerUp {
        scheduler: other,
        in_use: true,
    });
    let out = t.at(Duration::from_secs(2), Event::Tick);
    assert_eq!(enqueued_at(&out, 1), Some(other), "{out:?}");
    assert_eq!(enqueued_at(&out, 2), None, "a confirmed query is never placed again");
    assert_eq!(t.table.state(2), Some(State::Started));
    // Its result still ends it.
    let out = t.on(Event::ResultHead {
        id: 2,
        tenant: "t".into(),
        capability: CAP,
    });
    assert_eq!(out, [Action::Accept { id: 2, whole: false }]);
}

#[test]
fn a_lost_scheduler_places_its_undispatched_queries_once() {
    let mut t = T::new(&[S0, S1]);
    let s = t.queued(1, None, false);
    let other = 1 - s;
    // The drain's end: hand-back and link loss at once; placed again once.
    t.on(Event::SchedulerDraining { scheduler: s });
    let first = t.on(error(s, 1, QueryErrorKind::HandedBack));
    let second = t.on(Event::SchedulerDown { scheduler: s });
    assert_eq!(enqueued_at(&first, 1), Some(other));
    assert_eq!(second, [], "the loss of the old holder is stale for this query");
    assert_eq!(t.table.counters().requeued, 1);
}

#[test]
fn a_result_that_overtakes_a_replacement_withdraws_the_second_copy() {
    let mut t = T::new(&[S0, S1]);
    let s = t.queued(1, None, true);
    t.on(dispatched(s, 1));
    let out = t.on(error(s, 1, QueryErrorKind::QuerierFailed));
    let again = enqueued_at(&out, 1).expect("redelivered");
    // The first querier's result arrives after all (it was only cut off from its scheduler).
    let out = t.on(Event::ResultHead {
        id: 1,
        tenant: "t".into(),
        capability: CAP,
    });
    assert_eq!(
        out,
        [
            Action::Cancel {
                scheduler: again,
                id: 1
            },
            Action::Accept { id: 1, whole: false }
        ]
    );
}

#[test]
fn refusals_are_tried_elsewhere_then_the_last_is_returned() {
    let mut t = T::new(&[S0, S1]);
    let out = t.submit(1, None, false);
    let first = enqueued_at(&out, 1).unwrap();
    let out = t.on(status(first, 1, EnqueueStatus::TooManyOutstanding { limit: 3 }));
    let second = enqueued_at(&out, 1).unwrap();
    assert_ne!(first, second);
    let out = t.on(status(second, 1, EnqueueStatus::QueueFull));
    assert_eq!(
        out,
        [Action::Fail {
            id: 1,
            error: QueryError::QueueFull
        }]
    );
}

#[test]
fn a_query_every_scheduler_expects_to_miss_its_deadline_fails_at_once_with_the_estimate() {
    let mut t = T::new(&[S0, S1]);
    let out = t.submit(1, Some(Duration::from_secs(1)), false);
    let first = enqueued_at(&out, 1).unwrap();
    let out = t.on(status(
        first,
        1,
        EnqueueStatus::WouldMissDeadline {
            estimated_wait_ms: 4_000,
        },
    ));
    // Another scheduler may be less loaded: it is asked next.
    let second = enqueued_at(&out, 1).unwrap();
    assert_ne!(first, second);
    let out = t.on(status(
        second,
        1,
        EnqueueStatus::WouldMissDeadline {
            estimated_wait_ms: 3_000,
        },
    ));
    assert_eq!(
        out,
        [Action::Fail {
            id: 1,
            error: QueryError::WouldMissDeadline {
                estimated_wait: Duration::from_secs(3)
            }
        }]
    );
}

#[test]
fn with_no_scheduler_a_query_waits_then_gives_up() {
    let mut t = T::new(&[]);
    assert_eq!(t.submit(1, None, false), []);
    assert_eq!(t.table.next_timer(), Some(t.t0 + Duration::from_secs(5)));
    assert_eq!(t.at(Duration::from_secs(4), Event::Tick), []);
    assert_eq!(
        t.at(Duration::from_secs(5), Event::Tick),
        [Action::Fail {
            id: 1,
            error: QueryError::NoScheduler
        }]
    );
}

#[test]
fn the_deadline_ends_a_query_wherever_it_is_even_if_nobody_answers() {
    let mut t = T::new(&[S0]);
    let s = t.queued(1, Some(Duration::from_secs(2)), false);
    t.on(dispatched(s, 1));
    assert_eq!(t.at(Duration::from_millis(1999), Event::Tick), []);
    let out = t.at(Duration::from_secs(2), Event::Tick);
    assert_eq!(out[0], Action::Cancel { scheduler: s, id: 1 });
    assert!(matches!(
        out[1],
        Action::Fail {
            id: 1,
            error: QueryError::DeadlineExceeded(_)
        }
    ));
    // While its result streams, too.
    let mut t = T::new(&[S0]);
    t.queued(2, Some(Duration::from_secs(1)), false);
    t.on(Event::ResultHead {
        id: 2,
        tenant: "t".into(),
        capability: CAP,
    });
    let out = t.at(Duration::from_secs(1), Event::Tick);
    assert!(matches!(
        out[..],
        [Action::Fail {
            id: 2,
            error: QueryError::DeadlineExceeded(_)
        }]
    ));
    assert_eq!(t.on(Event::ResultEnd { id: 2 }), [], "ended once");
}

#[test]
fn a_retriable_query_runs_at_most_max_attempts_times() {
    let mut t = T::new(&[S0]);
    let s = t.queued(1, None, true);
    t.on(dispatched(s, 1));
    let out = t.on(error(s, 1, QueryErrorKind::QuerierFailed));
    assert!(matches!(out[..], [Action::Enqueue { attempt: 2, .. }]));
    assert_eq!(t.table.attempt(1), Some(2));
    t.on(accepted(S0, 1));
    t.on(dispatched(S0, 1));
    let out = t.on(error(S0, 1, QueryErrorKind::QuerierFailed));
    assert!(matches!(
        out[..],
        [Action::Fail {
            id: 1,
            error: QueryError::RetriesExhausted { attempts: 2, .. }
        }]
    ));
    assert_eq!(t.table.counters().redelivered, 1);
}

#[test]
fn a_query_that_is_not_retriable_fails_with_its_querier() {
    let mut t = T::new(&[S0]);
    let s = t.queued(1, None, false);
    t.on(dispatched(s, 1));
    assert!(matches!(
        t.on(error(s, 1, QueryErrorKind::QuerierFailed))[..],
        [Action::Fail {
            id: 1,
            error: QueryError::QuerierFailed(_)
        }]
    ));
}

#[test]
fn a_result_without_the_querys_capability_is_refused() {
    let mut t = T::new(&[S0]);
    t.queued(1, None, false);
    let out = t.on(Event::ResultHead {
        id: 1,
        tenant: "t".into(),
        capability: CAP ^ 0x8000_0000_0000_0000,
    });
    assert_eq!(
        out,
        [Action::Refuse {
            id: 1,
            reason: RefuseReason::WrongCapability
        }]
    );
    assert_eq!(t.table.counters().forged_results, 1);
    assert_eq!(
        t.table.state(1),
        Some(State::Queued(S0)),
        "the real result may still come"
    );
}

#[test]
fn results_are_refused_for_unknown_queries_other_tenants_and_duplicates() {
    let mut t = T::new(&[S0]);
    t.queued(1, None, false);
    let head = |tenant: &str| Event::ResultHead {
        id: 1,
        tenant: tenant.into(),
        capability: CAP,
    };
    assert_eq!(
        t.on(head("other")),
        [Action::Refuse {
            id: 1,
            reason: RefuseReason::TenantMismatch
        }]
    );
    assert_eq!(t.on(head("t")), [Action::Accept { id: 1, whole: false }]);
    assert_eq!(
        t.on(head("t")),
        [Action::Refuse {
            id: 1,
            reason: RefuseReason::Duplicate
        }]
    );
    t.on(Event::ResultEnd { id: 1 });
    assert_eq!(
        t.on(head("t")),
        [Action::Refuse {
            id: 1,
            reason: RefuseReason::UnknownQuery
        }]
    );
    assert_eq!(t.table.counters().duplicate_results, 1);
    assert_eq!(t.table.counters().unknown_results, 1);
}

// ---------------------------------------------------------------------------
// Property: every submitted query ends exactly once; none is placed again after a
// querier started it, unless it is retriable and that querier died.
// ---------------------------------------------------------------------------

mod props;

/// Moments are not removed when their query ends, only skipped: however many queries come
/// and go, the table holds a bounded number of them, and a live query's deadline still fires.
#[test]
fn moments_of_ended_queries_do_not_pile_up() {
    let mut t = T::new(&[S0]);
    let hour = Some(Duration::from_secs(3600));
    t.queued(0, Some(Duration::from_secs(60)), false);
    for id in 1..=10_000 {
        let s = t.queued(id, hour, false);
        t.on(dispatched(s, id));
        let out = t.on(Event::ResultWhole {
            id,
            tenant: "t".into(),
            capability: CAP,
        });
        assert_eq!(out, [Action::Accept { id, whole: true }, Action::Done { id }]);
        let held = t.table.timers.len();
        assert!(
            held <= 2 * timers::SWEEP_FACTOR + timers::SWEEP_SLACK + 1,
            "{held} moments held"
        );
    }
    assert_eq!(t.table.len(), 1);
    assert_eq!(t.table.next_timer(), Some(t.t0 + Duration::from_secs(60)));
    let out = t.at(Duration::from_secs(60), Event::Tick);
    assert!(
        matches!(out[..], [Action::Cancel { id: 0, .. }, Action::Fail { id: 0, .. }]),
        "{out:?}"
    );
    assert_eq!(t.table.next_timer(), None);
}
