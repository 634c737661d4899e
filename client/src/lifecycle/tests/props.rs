//! The query table under random orders of events: every query ends exactly once, and one a
//! querier may have started is placed again only when allowed.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Step {
    Submit { timeout_ms: Option<u64>, retriable: bool },
    Status { s: usize, q: usize, status: u8 },
    Dispatched { s: usize, q: usize },
    Error { s: usize, q: usize, kind: u8 },
    Up { s: usize },
    Draining { s: usize },
    Down { s: usize },
    Head { q: usize, same_tenant: bool, forged: bool },
    Whole { q: usize, forged: bool },
    Started { q: usize },
    ResultError { q: usize },
    End { q: usize },
    Cancel { q: usize },
    Advance { ms: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    let s = 0..3usize;
    let q = 0..6usize;
    prop_oneof![
        3 => (proptest::option::of(1..3_000u64), any::<bool>())
            .prop_map(|(timeout_ms, retriable)| Step::Submit { timeout_ms, retriable }),
        4 => (s.clone(), q.clone(), 0..5u8).prop_map(|(s, q, status)| Step::Status { s, q, status }),
        3 => (s.clone(), q.clone()).prop_map(|(s, q)| Step::Dispatched { s, q }),
        3 => (s.clone(), q.clone(), 0..5u8).prop_map(|(s, q, kind)| Step::Error { s, q, kind }),
        2 => s.clone().prop_map(|s| Step::Up { s }),
        1 => s.clone().prop_map(|s| Step::Draining { s }),
        1 => s.prop_map(|s| Step::Down { s }),
        2 => (q.clone(), any::<bool>(), proptest::bool::weighted(0.2))
            .prop_map(|(q, same_tenant, forged)| Step::Head { q, same_tenant, forged }),
        1 => q.clone().prop_map(|q| Step::ResultError { q }),
        2 => (q.clone(), proptest::bool::weighted(0.2)).prop_map(|(q, forged)| Step::Whole { q, forged }),
        1 => q.clone().prop_map(|q| Step::Started { q }),
        2 => q.clone().prop_map(|q| Step::End { q }),
        1 => q.prop_map(|q| Step::Cancel { q }),
        2 => (0..2_000u64).prop_map(|ms| Step::Advance { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_query_ends_exactly_once_and_runs_again_only_when_redelivered(
        steps in proptest::collection::vec(step(), 1..120),
    ) {
        let mut t = T::new(&[0, 1]);
        let mut submitted: Vec<QueryId> = Vec::new();
        let mut retriable: HashMap<QueryId, bool> = HashMap::new();
        let mut ends: HashMap<QueryId, u32> = HashMap::new();
        // Queries a scheduler dispatched since their last placement.
        let mut started: HashSet<QueryId> = HashSet::new();
        // Queries a querier confirmed (or answered): never placed again but to redeliver.
        let mut confirmed: HashSet<QueryId> = HashSet::new();
        // Dispatched queries whose scheduler was lost.
        let mut orphaned: HashSet<QueryId> = HashSet::new();
        let pick = |submitted: &[QueryId], q: usize| submitted.get(q % submitted.len().max(1)).copied();
        for step in steps {
            let mut redelivery_allowed = None;
            let event = match step {
                Step::Submit { timeout_ms, retriable: r } => {
                    let id = submitted.len() as QueryId + 1;
                    submitted.push(id);
                    retriable.insert(id, r);
                    Event::Submit {
                        id,
                        tenant: "t".into(),
                        capability: CAP,
                        deadline: timeout_ms.map(|ms| t.now + Duration::from_millis(ms)),
                        retriable: r,
                    }
                }
                Step::Advance { ms } => {
                    t.now += Duration::from_millis(ms);
                    Event::Tick
                }
                Step::Up { s } => Event::SchedulerUp { scheduler: s, in_use: true },
                Step::Draining { s } => Event::SchedulerDraining { scheduler: s },
                Step::Down { s } => {
                    for &id in &submitted {
                        if t.table.state(id) == Some(State::Dispatched(s)) {
                            orphaned.insert(id);
                        }
                    }
                    Event::SchedulerDown { scheduler: s }
                }
                other => {
                    let q = match &other {
                        Step::Status { q, .. } | Step::Dispatched { q, .. } | Step::Error { q, .. }
                        | Step::Head { q, .. } | Step::Whole { q, .. } | Step::ResultError { q } | Step::End { q } | Step::Started { q }
                        | Step::Cancel { q } => *q,
                        _ => unreachable!(),
                    };
                    let Some(id) = pick(&submitted, q) else { continue };
                    match other {
                        Step::Status { s, status, .. } => Event::Status {
                            scheduler: s,
                            id,
                            status: match status {
                                0 | 1 => EnqueueStatus::Accepted,
                                2 => EnqueueStatus::TooManyOutstanding { limit: 1 },
                                3 => EnqueueStatus::ShuttingDown,
                                _ => EnqueueStatus::QueueFull,
                            },
                            queued: 0,
                            estimated_wait: None,
                        },
                        Step::Dispatched { s, .. } => Event::Dispatched { scheduler: s, ids: vec![id] },
                        Step::Error { s, kind, .. } => {
                            let kind = match kind {
                                0 => QueryErrorKind::QuerierFailed,
                                1 => QueryErrorKind::HandedBack,
                                2 => QueryErrorKind::DeadlineExceeded,
                                3 => QueryErrorKind::Cancelled,
                                _ => QueryErrorKind::Internal,
                            };
                            if kind == QueryErrorKind::QuerierFailed
                                && matches!(t.table.state(id), Some(State::Dispatched(_) | State::Started))
                                && retriable[&id]
                            {
                                redelivery_allowed = Some(id);
                            }
                            // Its scheduler's word that its querier gave it back unstarted.
                            if kind == QueryErrorKind::HandedBack && matches!(t.table.state(id), Some(State::Dispatched(_))) {
                                redelivery_allowed = Some(id);
                            }
                            Event::SchedulerError { scheduler: s, id, kind, message: "m".into() }
                        }
                        Step::Head { same_tenant, forged, .. } => Event::ResultHead {
                            id,
                            tenant: if same_tenant { "t".into() } else { "u".into() },
                            capability: if forged { CAP + 1 } else { CAP },
                        },
                        Step::Whole { forged, .. } => Event::ResultWhole {
                            id,
                            tenant: "t".into(),
                            capability: if forged { CAP + 1 } else { CAP },
                        },
                        Step::ResultError { .. } => Event::ResultError {
                            id,
                            tenant: "t".into(),
                            capability: CAP,
                            message: "m".into(),
                        },
                        Step::End { .. } => Event::ResultEnd { id },
                        Step::Started { .. } => Event::ResultStarted { id, tenant: "t".into(), capability: CAP },
                        Step::Cancel { .. } => {
                            if t.table.state(id).is_some() {
                                *ends.entry(id).or_default() += 1; // the caller ended it
                            }
                            Event::Cancel { id }
                        }
                        _ => unreachable!(),
                    }
                }
            };
            let tick = event == Event::Tick;
            let out = t.on(event);
            for action in &out {
                match action {
                    Action::Fail { id, .. } | Action::Failed { id, .. } | Action::Done { id } => {
                        *ends.entry(*id).or_default() += 1;
                        prop_assert!(t.table.state(*id).is_none(), "ended but still held: {id}");
                    }
                    Action::Enqueue { id, .. } => {
                        let lost_with_scheduler = tick && orphaned.contains(id) && !confirmed.contains(id);
                        prop_assert!(
                            !started.contains(id) || redelivery_allowed == Some(*id) || lost_with_scheduler,
                            "query {id} placed again after a querier started it"
                        );
                        started.remove(id);
                        orphaned.remove(id);
                        if redelivery_allowed == Some(*id) {
                            confirmed.remove(id);
                        }
                    }
                    _ => {}
                }
            }
            for &id in &submitted {
                match t.table.state(id) {
                    // The grace ran out for a dispatch lost with its scheduler: placed again
                    // (now, or when a scheduler comes).
                    Some(State::Waiting | State::Placing(_))
                        if tick && orphaned.contains(&id) && !confirmed.contains(&id) =>
                    {
                        started.remove(&id);
                        orphaned.remove(&id);
                    }
                    // Redelivered after its querier died (now, or when a scheduler comes).
                    Some(State::Waiting | State::Placing(_)) if redelivery_allowed == Some(id) => {
                        started.remove(&id);
                        orphaned.remove(&id);
                        confirmed.remove(&id);
                    }
                    Some(State::Dispatched(_)) => {
                        started.insert(id);
                    }
                    Some(State::Started | State::Receiving) => {
                        started.insert(id);
                        confirmed.insert(id);
                    }
                    _ => {}
                }
            }
            for (id, n) in &ends {
                prop_assert!(*n <= 1, "query {id} ended {n} times");
            }
        }
        // Whatever is left ends when the frontend closes.
        for action in t.on(Event::Close) {
            if let Action::Fail { id, .. } = action {
                *ends.entry(id).or_default() += 1;
            }
        }
        prop_assert_eq!(t.table.len(), 0);
        for id in submitted {
            prop_assert_eq!(ends.get(&id).copied(), Some(1), "query {} did not end exactly once", id);
        }
    }
}
