//! Deterministic anchors of the policies beyond plain round robin: cost-aware deficit
//! round robin, measured-cost corrections, priority classes, the starvation guard and
//! reserved workers.

use super::*;

fn config() -> QueueConfig {
    QueueConfig {
        max_outstanding_per_tenant: 100_000,
        ..no_forget()
    }
}

/// The tenants of the next `n` dispatches to `w`.
fn tenants(f: &mut Fixture, w: WorkerId, n: usize) -> Vec<String> {
    (0..n).map(|_| f.next_tenant(w).expect("work queued")).collect()
}

#[test]
fn tenants_are_served_in_cost_not_in_requests() {
    let mut f = Fixture::new(config());
    let w = f.worker("q");
    for _ in 0..30 {
        f.push(costing("heavy", 10));
        f.push(costing("light", 1));
    }
    // The quantum follows the largest cost (10): a visit to heavy serves one request, a
    // visit to light ten.
    let order = tenants(&mut f, w, 23);
    let heavy: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, t)| *t == "heavy")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        heavy,
        [0, 11, 22],
        "ten light requests between two heavy ones: {order:?}"
    );
    f.assert_ok();
}

#[test]
fn with_unit_costs_deficit_round_robin_is_plain_round_robin() {
    let mut f = Fixture::new(config());
    let w = f.worker("q");
    for _ in 0..3 {
        for t in ["a", "b", "c"] {
            f.push(req(t, &[], ""));
        }
    }
    assert_eq!(tenants(&mut f, w, 9), ["a", "b", "c", "a", "b", "c", "a", "b", "c"]);
}

#[test]
fn debts_from_measured_costs_are_fast_forwarded_in_one_dequeue() {
    let mut f = Fixture::new(config());
    let w = f.worker("q");
    for _ in 0..10 {
        f.push(req("a", &[], ""));
        f.push(req("b", &[], ""));
    }
    assert_eq!(tenants(&mut f, w, 2), ["a", "b"]);
    // Both ran far longer than hinted: a owes 3 visits, b 5.
    f.q.charge("a", 3);
    f.q.charge("b", 5);
    // a is back in credit two visits before b: it is served three times first.
    assert_eq!(tenants(&mut f, w, 5), ["a", "a", "a", "b", "a"]);
    f.assert_ok();
}

#[test]
fn a_larger_quantum_serves_cheap_requests_in_runs() {
    let mut f = Fixture::new(QueueConfig {
        cost_quantum: 4,
        ..config()
    });
    let w = f.worker("q");
    for _ in 0..8 {
        f.push(costing("a", 1));
        f.push(costing("b", 2));
    }
    assert_eq!(tenants(&mut f, w, 6), ["a", "a", "a", "a", "b", "b"]);
}

#[test]
fn a_measured_cost_above_the_hint_is_repaid_over_later_visits() {
    let mut f = Fixture::new(config());
    let w = f.worker("q");
    for _ in 0..20 {
        f.push(req("a", &[], ""));
        f.push(req("b", &[], ""));
    }
    assert_eq!(tenants(&mut f, w, 2), ["a", "b"]);
    // a's last query really cost 6, not 1: it owes 5 more, so b is served five times
    // before a comes back.
    assert!(f.q.charge("a", 5));
    assert_eq!(f.q.tenant_stats(f.now)[0].balance, -5);
    assert_eq!(tenants(&mut f, w, 7), ["b", "b", "b", "b", "b", "a", "b"]);
    assert!(!f.q.charge("nobody", 5), "a tenant with nothing queued has no account");
    f.assert_ok();
}

#[test]
fn a_refund_never_lifts_a_balance_above_one_visit() {
    let mut f = Fixture::new(config());
    f.push(req("a", &[], ""));
    f.q.charge("a", -1000);
    assert_eq!(f.q.tenant_stats(f.now)[0].balance, 1);
}

#[test]
fn higher_priorities_are_served_first() {
    let mut f = Fixture::new(config());
    let w = f.worker("q");
    f.push(at_priority("t", 0));
    f.push(at_priority("t", 5));
    f.push(at_priority("u", 2));
    let labels: Vec<String> = (0..3).map(|_| f.next(w).unwrap()).collect();
    assert_eq!(labels, ["5", "2", "0"]);
    assert_eq!(f.q.class_lengths(), []);
    f.assert_ok();
}

#[test]
fn a_tenant_priority_applies_to_requests_that_name_none() {
    let mut c = config();
    c.tenants.insert(
        "vip".into(),
        TenantOverrides {
            priority: Some(3),
            ..TenantOverrides::default()
        },
    );
    let mut f = Fixture::new(c);
    let w = f.worker("q");
    f.push(req("plain", &[], "plain"));
    f.push(req("vip", &[], "vip"));
    f.push(at_priority("vip", 0)); // a request's own priority wins
    assert_eq!(f.q.class_lengths(), [(3, 1), (0, 2)]);
    assert_eq!(f.next(w).as_deref(), Some("vip"));
    assert_eq!(
        f.q.tenant_stats(f.now)
            .iter()
            .find(|t| t.tenant == "vip")
            .unwrap()
            .priority,
        3
    );
}

#[test]
fn a_lower_class_is_passed_over_at_most_the_skip_limit() {
    let mut f = Fixture::new(QueueConfig {
        max_priority_skips: 3,
        ..config()
    });
    let w = f.worker("q");
    for _ in 0..10 {
        f.push(at_priority("a", 1));
        f.push(at_priority("b", 0));
    }
    let labels: Vec<String> = (0..8).map(|_| f.next(w).unwrap()).collect();
    assert_eq!(labels, ["1", "1", "1", "0", "1", "1", "1", "0"]);
}

#[test]
fn reserved_workers_take_only_high_priorities() {
    let mut f = Fixture::new(QueueConfig {
        reserved_workers_percent: 50,
        reserved_min_priority: 2,
        ..config()
    });
    let ws: Vec<WorkerId> = (0..4).map(|_| f.worker("q")).collect();
    for _ in 0..10 {
        f.push(at_priority("bulk", 0));
    }
    // Slots 0 and 1 are the reserved half: they leave the bulk work alone.
    assert_eq!(f.next(ws[0]), None);
    assert_eq!(f.next(ws[1]), None);
    assert_eq!(f.next(ws[2]).as_deref(), Some("0"));
    f.push(at_priority("alerts", 2));
    f.push(at_priority("alerts", 1));
    assert_eq!(f.next(ws[0]).as_deref(), Some("2"));
    assert_eq!(f.next(ws[1]), None, "priority 1 is below the reserved floor");
    assert_eq!(f.next(ws[3]).as_deref(), Some("1"));
    f.assert_ok();
}

#[test]
fn a_lanes_workers_are_reserved_together() {
    let mut f = Fixture::new(QueueConfig {
        reserved_workers_percent: 50,
        reserved_min_priority: 2,
        ..config()
    });
    // Three worker loops of two slots each: half of three lanes is one, lane 0, both its
    // slots (half of six slots would have been three: a loop split in two).
    let ws: Vec<WorkerId> = [0, 0, 1, 1, 2, 2]
        .into_iter()
        .map(|lane| f.worker_in_lane("q", lane))
        .collect();
    for _ in 0..10 {
        f.push(at_priority("bulk", 0));
    }
    assert_eq!(f.next(ws[0]), None);
    assert_eq!(f.next(ws[1]), None, "a reserved loop's second slot is reserved too");
    for &w in &ws[2..] {
        assert_eq!(f.next(w).as_deref(), Some("0"), "lanes 1 and 2 are not reserved");
    }
    f.push(at_priority("alerts", 2));
    assert_eq!(f.next(ws[1]).as_deref(), Some("2"));
    // The loop's first slot going leaves its lane reserved, by its second slot.
    f.q.unregister_worker(f.now, ws[0]);
    assert_eq!(f.next(ws[1]), None);
    // With lane 2 gone as well, half of two lanes is still lane 0.
    f.q.unregister_worker(f.now, ws[4]);
    f.q.unregister_worker(f.now, ws[5]);
    assert_eq!(f.next(ws[1]), None);
    assert_eq!(f.next(ws[2]).as_deref(), Some("0"));
    f.assert_ok();
}

/// A request of `tenant` at `priority` costing `cost`, labelled `priority/cost`.
fn priced(tenant: &str, priority: u8, cost: u32) -> Req {
    Req {
        priority: Some(priority),
        cost,
        ..req(tenant, &[], &format!("{priority}/{cost}"))
    }
}

#[test]
fn reserved_workers_are_lent_short_lower_priority_work_and_keep_their_first_call() {
    let mut f = Fixture::new(QueueConfig {
        reserved_workers_percent: 50,
        reserved_min_priority: 2,
        lend_max_cost: 5,
        ..config()
    });
    let ws: Vec<WorkerId> = (0..4).map(|_| f.worker("q")).collect();
    f.push(priced("bulk", 0, 20));
    f.push(priced("bulk", 0, 3));
    // The bulk tenant's next request costs 20: not lent (its turn is not skipped for the
    // cheap one behind it); an unreserved worker takes it, and then the cheap one is lent.
    assert_eq!(f.next(ws[0]), None);
    assert_eq!(f.next(ws[2]).as_deref(), Some("0/20"));
    assert_eq!(f.next(ws[0]).as_deref(), Some("0/3"));
    // Priority 1 is lent too (below the floor of 2), higher classes first.
    f.push(priced("bulk", 0, 1));
    f.push(priced("mid", 1, 1));
    assert_eq!(f.next(ws[1]).as_deref(), Some("1/1"));
    // Work the reserved workers are for comes before any lending.
    f.push(priced("alerts", 2, 50));
    assert_eq!(f.next(ws[1]).as_deref(), Some("2/50"));
    assert_eq!(f.next(ws[0]).as_deref(), Some("0/1"));
    f.assert_ok();
}

#[test]
fn without_lend_max_cost_reserved_workers_are_never_lent() {
    let mut f = Fixture::new(QueueConfig {
        reserved_workers_percent: 50,
        ..config()
    });
    let ws: Vec<WorkerId> = (0..2).map(|_| f.worker("q")).collect();
    f.push(priced("bulk", 0, 1));
    assert_eq!(f.next(ws[0]), None, "the default lends nothing");
    assert_eq!(f.next(ws[1]).as_deref(), Some("0/1"));
}

#[test]
fn a_querier_with_one_worker_has_none_reserved() {
    let mut f = Fixture::new(QueueConfig {
        reserved_workers_percent: 99,
        ..config()
    });
    let w = f.worker("q");
    f.push(at_priority("bulk", 0));
    assert_eq!(f.next(w).as_deref(), Some("0"));
}

#[test]
fn policy_settings_must_be_sane() {
    for (config, message) in [
        (
            QueueConfig {
                cost_quantum: 0,
                ..config()
            },
            "cost_quantum: must be at least 1",
        ),
        (
            QueueConfig {
                reserved_workers_percent: 100,
                ..config()
            },
            "reserved_workers_percent: must be between 0 and 99",
        ),
        (
            QueueConfig {
                max_priority_skips: 0,
                ..config()
            },
            "max_priority_skips: must be at least 1",
        ),
    ] {
        let err = TreeQueue::<Req>::new(config, std::time::Instant::now()).err().unwrap();
        assert_eq!(err.to_string(), message);
    }
}

#[test]
fn one_huge_cost_hint_weighs_on_the_others_only_while_it_waits_and_only_up_to_the_maximum() {
    let mut f = Fixture::new(config());
    let w = f.worker("q");
    for _ in 0..2000 {
        f.push(req("a", &[], ""));
        f.push(req("b", &[], ""));
    }
    assert_eq!(tenants(&mut f, w, 4), ["a", "b", "a", "b"]);
    // A request claiming the largest cost there is, cancelled at once: nothing changes.
    let poison = f.push(costing("c", u32::MAX));
    f.q.cancel(poison).expect("queued");
    assert_eq!(tenants(&mut f, w, 4), ["a", "b", "a", "b"]);
    // While one waits, its cost counts only up to `max_cost`: a visit serves at most that
    // many unit requests before the other tenant's turn.
    let poison = f.push(costing("c", u32::MAX));
    let run = tenants(&mut f, w, 1100);
    let first_b = run.iter().position(|t| t == "b").expect("b is served");
    assert!(first_b <= config().max_cost as usize, "a ran {first_b} times in a row");
    let _ = f.q.cancel(poison); // if it was not served meanwhile
    let next = tenants(&mut f, w, 4);
    assert!(next.windows(2).all(|p| p[0] != p[1]), "back to alternation: {next:?}");
    f.assert_ok();
}

/// A backlogged component drained at a steady 100 dispatches a second (10 ms apart) for
/// one second; `n` tenants' requests queued besides.
fn measured_backlog(config: QueueConfig) -> (Fixture, WorkerId) {
    let mut f = Fixture::new(config);
    let w = f.worker("q");
    for _ in 0..300 {
        f.push(req("busy", &[], ""));
    }
    for _ in 0..100 {
        assert!(f.take(w).is_some());
        f.advance(Duration::from_millis(10));
    }
    (f, w)
}

#[test]
fn the_wait_is_estimated_from_the_backlogged_rate_and_the_tenants_place() {
    let mut f = Fixture::new(config());
    let w = f.worker("q");
    f.push(req("busy", &[], ""));
    assert_eq!(
        f.q.estimated_wait(req("new", &[], "").path(), None),
        None,
        "no backlogged window measured yet"
    );
    assert!(f.take(w).is_some());
    assert_eq!(
        f.q.estimated_wait(req("new", &[], "").path(), None),
        Some(Duration::ZERO),
        "nothing queued: no wait"
    );
    let (f, _) = measured_backlog(config());
    // 200 of `busy` queued at 100/s. A new tenant is served every other dispatch: two
    // dispatches (its own and one of `busy`'s), 20 ms; `busy` itself waits for all 200.
    let new = f.q.estimated_wait(req("new", &[], "").path(), None).unwrap();
    let busy = f.q.estimated_wait(req("busy", &[], "").path(), None).unwrap();
    assert!((new.as_secs_f64() - 0.02).abs() < 0.002, "{new:?}");
    assert!((busy.as_secs_f64() - 2.01).abs() < 0.05, "{busy:?}");
    f.assert_ok();
}

#[test]
fn a_request_that_would_miss_its_deadline_is_refused_at_enqueue_with_the_estimate() {
    let (mut f, _) = measured_backlog(config());
    match f.try_push_with_deadline(req("busy", &[], ""), Duration::from_secs(1)) {
        Err(RejectReason::WouldMissDeadline { estimated_wait }) => {
            assert!(estimated_wait > Duration::from_millis(1900), "{estimated_wait:?}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Room enough: accepted. So is another tenant's, served in turn.
    assert!(
        f.try_push_with_deadline(req("busy", &[], ""), Duration::from_secs(3))
            .is_ok()
    );
    assert!(
        f.try_push_with_deadline(req("other", &[], ""), Duration::from_millis(100))
            .is_ok()
    );
    // Without a deadline nothing is refused.
    f.push(req("busy", &[], ""));
    assert_eq!(f.q.counters().rejected, 1);
    f.assert_ok();
}

#[test]
fn deadline_admission_can_be_turned_off() {
    let (mut f, _) = measured_backlog(QueueConfig {
        deadline_admission: false,
        ..config()
    });
    assert!(
        f.try_push_with_deadline(req("busy", &[], ""), Duration::from_millis(1))
            .is_ok()
    );
}
