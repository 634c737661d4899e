//! Deterministic tests of each behaviour, including ports of the reference schedulers'
//! anchor behaviours (written from their descriptions).

use std::time::Duration;

use super::*;

#[test]
fn two_queriers_round_robin_over_tenants_with_independent_positions() {
    let mut f = Fixture::new(no_forget());
    let q1 = f.worker("querier-1");
    let q2 = f.worker("querier-2");
    for i in 0..3 {
        for t in ["a", "b", "c"] {
            f.push(req(t, &[], &format!("{t}{i}")));
        }
    }
    // q1 starts the rotation; q2 has its own position, so it also starts at "a".
    assert_eq!(f.next_tenant(q1).as_deref(), Some("a"));
    assert_eq!(f.next_tenant(q1).as_deref(), Some("b"));
    assert_eq!(f.next_tenant(q2).as_deref(), Some("a"));
    assert_eq!(f.next_tenant(q1).as_deref(), Some("c"));
    assert_eq!(f.next_tenant(q2).as_deref(), Some("b"));
    assert_eq!(f.next_tenant(q1).as_deref(), Some("a"));
    assert_eq!(f.next_tenant(q2).as_deref(), Some("c"));
    let rest: Vec<_> = std::iter::from_fn(|| f.next_tenant(q1)).collect();
    assert_eq!(rest, ["b", "c"]);
    f.assert_ok();
}

#[test]
fn fifo_within_a_tenant() {
    let mut f = Fixture::new(no_forget());
    let w = f.worker("q");
    for i in 0..5 {
        f.push(req("a", &[], &i.to_string()));
    }
    let got: Vec<_> = std::iter::from_fn(|| f.next(w)).collect();
    assert_eq!(got, ["0", "1", "2", "3", "4"]);
}

#[test]
fn removed_tenants_slot_is_reused_by_the_next_new_tenant() {
    let mut f = Fixture::new(no_forget());
    let w = f.worker("q");
    f.push(req("a", &[], "a"));
    f.push(req("b", &[], "b"));
    f.push(req("c", &[], "c"));
    assert_eq!(f.next(w).as_deref(), Some("a")); // "a" empties: slot 0 freed
    f.push(req("d", &[], "d")); // takes slot 0, not the end of the rotation
    f.push(req("e", &[], "e")); // appended after "c"
    assert_eq!(f.q.tenants[0].as_ref().map(|t| &*t.name), Some("d"));
    let order: Vec<_> = std::iter::from_fn(|| f.next(w)).collect();
    // Position is after slot 0, so b, c, e come before the wrap to d.
    assert_eq!(order, ["b", "c", "e", "d"]);
    f.assert_ok();
}

#[test]
fn new_tenant_is_served_within_one_rotation_not_first() {
    let mut f = Fixture::new(no_forget());
    let w = f.worker("q");
    for t in ["a", "b", "c"] {
        for i in 0..3 {
            f.push(req(t, &[], &format!("{t}{i}")));
        }
    }
    assert_eq!(f.next_tenant(w).as_deref(), Some("a"));
    f.push(req("new", &[], "new0"));
    let order: Vec<_> = (0..4).map(|_| f.next_tenant(w).unwrap()).collect();
    assert_eq!(order, ["b", "c", "new", "a"]);
}

#[test]
fn actors_take_turns_at_every_level() {
    let mut f = Fixture::new(no_forget());
    let w = f.worker("q");
    // u1 floods with two dashboards; u2 sends little; one request has no actor at all.
    for i in 0..4 {
        f.push(req("t", &["u1", "d1"], &format!("u1d1-{i}")));
        f.push(req("t", &["u1", "d2"], &format!("u1d2-{i}")));
    }
    f.push(req("t", &["u2"], "u2-0"));
    f.push(req("t", &["u2"], "u2-1"));
    f.push(req("t", &[], "own-0"));
    let order: Vec<_> = std::iter::from_fn(|| f.next(w)).collect();
    assert_eq!(
        order,
        [
            "u1d1-0", "u2-0", "own-0", // u1, u2, the tenant's own FIFO
            "u1d2-0", "u2-1", // u1 (its next dashboard), u2
            "u1d1-1", "u1d2-1", "u1d1-2", "u1d2-2", "u1d1-3", "u1d2-3",
        ]
    );
    f.assert_ok();
}

#[test]
fn per_tenant_limit_counts_every_component() {
    let mut f = Fixture::new(QueueConfig {
        max_outstanding_per_tenant: 3,
        ..no_forget()
    });
    f.push(in_component(req("a", &[], "1"), "ingester"));
    f.push(in_component(req("a", &[], "2"), "store-gateway"));
    f.push(req("a", &[], "3"));
    let key = f.key();
    let now = f.now;
    let err =
        f.q.enqueue(
            now,
            key,
            in_component(req("a", &[], "4"), "ingester"),
            EnqueueOptions::default(),
        )
        .unwrap_err();
    assert_eq!(err.reason, RejectReason::TooManyOutstanding { limit: 3 });
    assert_eq!(err.request.label, "4", "the refused request is handed back");
    f.push(req("b", &[], "other tenant unaffected"));
    assert_eq!(f.q.counters().rejected, 1);
    f.assert_ok();
}

#[test]
fn an_allowance_under_the_limit_refuses_sooner_and_names_the_limit() {
    let mut f = Fixture::new(QueueConfig {
        max_outstanding_per_tenant: 10,
        ..no_forget()
    });
    let allow = |n| EnqueueOptions {
        allowance: Some(n),
        ..EnqueueOptions::default()
    };
    let (now, key) = (f.now, f.key());
    // Nothing queued here and no room in the cluster: refused all the same.
    let err = f.q.enqueue(now, key, req("a", &[], "0"), allow(0)).unwrap_err();
    assert_eq!(err.reason, RejectReason::TooManyOutstanding { limit: 10 });
    for i in 0..2 {
        let key = f.key();
        f.q.enqueue(now, key, req("a", &[], &i.to_string()), allow(2)).unwrap();
    }
    let key = f.key();
    let err = f.q.enqueue(now, key, req("a", &[], "2"), allow(2)).unwrap_err();
    assert_eq!(err.reason, RejectReason::TooManyOutstanding { limit: 10 });
    // An allowance above the limit does not lift it.
    for i in 2..10 {
        let key = f.key();
        f.q.enqueue(now, key, req("a", &[], &i.to_string()), allow(50)).unwrap();
    }
    let key = f.key();
    assert!(f.q.enqueue(now, key, req("a", &[], "10"), allow(50)).is_err());
    f.assert_ok();
}

#[test]
fn per_tenant_override_and_reload() {
    let mut config = no_forget();
    config.max_outstanding_per_tenant = 1;
    config.tenants.insert(
        "big".into(),
        TenantOverrides {
            max_outstanding: Some(2),
            ..TenantOverrides::default()
        },
    );
    let mut f = Fixture::new(config.clone());
    f.push(req("big", &[], "1"));
    f.push(req("big", &[], "2"));
    f.push(req("small", &[], "1"));
    let (k, now) = (f.key(), f.now);
    assert!(
        f.q.enqueue(now, k, req("small", &[], "2"), EnqueueOptions::default())
            .is_err()
    );
    config.max_outstanding_per_tenant = 5;
    f.q.set_config(config).unwrap();
    f.push(req("small", &[], "2"));
    f.assert_ok();
}

#[test]
fn cancel_frees_the_limit_slot_at_once() {
    let mut f = Fixture::new(QueueConfig {
        max_outstanding_per_tenant: 2,
        ..no_forget()
    });
    let k1 = f.push(req("a", &["u"], "1"));
    f.push(req("a", &["u"], "2"));
    let (k, now) = (f.key(), f.now);
    assert!(
        f.q.enqueue(now, k, req("a", &[], "3"), EnqueueOptions::default())
            .is_err()
    );
    assert_eq!(f.q.cancel(k1).map(|r| r.label), Some("1".into()));
    assert_eq!(f.q.cancel(k1), None, "cancelled once only");
    f.push(req("a", &[], "3"));
    let w = f.worker("q");
    let got: Vec<_> = std::iter::from_fn(|| f.next(w)).collect();
    assert_eq!(got, ["2", "3"], "the cancelled request is never dispatched");
    assert_eq!(f.q.counters().cancelled, 1);
    f.assert_ok();
}

#[test]
fn cancelling_the_only_request_of_an_actor_keeps_rotation_fair() {
    let mut f = Fixture::new(no_forget());
    let w = f.worker("q");
    let gone = f.push(req("t", &["x"], "x0"));
    f.push(req("t", &["y"], "y0"));
    f.push(req("t", &["y"], "y1"));
    f.q.cancel(gone);
    f.assert_ok();
    f.push(req("t", &["x"], "x1")); // "x" is a new node now, behind "y"
    let got: Vec<_> = std::iter::from_fn(|| f.next(w)).collect();
    assert_eq!(got, ["y0", "x1", "y1"]);
    f.assert_ok();
}

#[test]
fn global_request_and_byte_caps_refuse_and_hand_back() {
    let mut f = Fixture::new(QueueConfig {
        max_queued_requests: 2,
        max_queued_bytes: 25,
        ..no_forget()
    });
    f.push(req("a", &[], "1")); // 10 bytes
    let mut big = req("b", &[], "big");
    big.bytes = 16;
    let (k, now) = (f.key(), f.now);
    let err = f.q.enqueue(now, k, big, EnqueueOptions::default()).unwrap_err();
    assert_eq!(err.reason, RejectReason::QueueBytesFull { limit: 25 });
    f.push(req("b", &[], "2"));
    let (k, now) = (f.key(), f.now);
    let err =
        f.q.enqueue(now, k, req("c", &[], "3"), EnqueueOptions::default())
            .unwrap_err();
    assert_eq!(err.reason, RejectReason::QueueFull { limit: 2 });
    assert_eq!(f.q.len(), 2);
    assert_eq!(f.q.queued_bytes(), 20);
}

#[test]
fn duplicate_key_is_refused() {
    let mut f = Fixture::new(no_forget());
    let k = f.push(req("a", &[], "1"));
    let now = f.now;
    let err =
        f.q.enqueue(now, k, req("a", &[], "again"), EnqueueOptions::default())
            .unwrap_err();
    assert_eq!(err.reason, RejectReason::Duplicate);
    assert_eq!(f.q.len(), 1);
}

#[test]
fn expired_requests_are_never_dispatched() {
    let mut f = Fixture::new(no_forget());
    let w = f.worker("q");
    let late = f.push_with_deadline(req("a", &[], "late"), Duration::from_millis(50));
    f.push_with_deadline(req("a", &[], "fine"), Duration::from_secs(10));
    f.advance(Duration::from_millis(50));
    assert_eq!(f.next(w).as_deref(), Some("fine"));
    let e = f.q.poll_expired().expect("the late one expired");
    assert_eq!(e.key, late);
    assert_eq!(e.queue_time, Duration::from_millis(50));
    assert!(f.q.poll_expired().is_none());
    assert_eq!(f.q.counters().expired, 1);
    f.assert_ok();
}

#[test]
fn expire_sweeps_requests_nobody_dequeues() {
    let mut f = Fixture::new(no_forget());
    f.push_with_deadline(req("a", &["u"], "1"), Duration::from_millis(120));
    f.push_with_deadline(req("b", &[], "2"), Duration::from_millis(500));
    f.push(req("c", &[], "3"));
    f.advance(Duration::from_millis(119));
    assert_eq!(f.q.expire(f.now), 0);
    f.advance(Duration::from_millis(1));
    assert_eq!(f.q.expire(f.now), 1);
    assert_eq!(f.q.poll_expired().unwrap().request.label, "1");
    f.assert_ok();
    f.advance(Duration::from_secs(1));
    assert_eq!(f.q.expire(f.now), 1);
    assert_eq!(f.q.len(), 1);
    f.assert_ok();
}

#[test]
fn shutting_down_querier_is_refused_while_others_continue() {
    let mut f = Fixture::new(no_forget());
    let a = f.worker("querier-a");
    let b = f.worker("querier-b");
    f.push(req("t", &[], "1"));
    f.push(req("t", &[], "2"));
    assert!(f.q.notify_querier_shutdown(f.now, "querier-a"));
    assert!(matches!(f.q.dequeue(f.now, a), Dequeue::ShuttingDown));
    assert_eq!(f.next(b).as_deref(), Some("1"));
    f.q.unregister_worker(f.now, a);
    assert_eq!(f.q.querier_count(), 1, "forgotten as its last worker left");
    assert!(matches!(f.q.dequeue(f.now, a), Dequeue::UnknownWorker));
    assert_eq!(f.next(b).as_deref(), Some("2"));
}

#[test]
fn worker_slots_reuse_the_lowest_free_one() {
    let mut f = Fixture::new(no_forget());
    let w0 = f.worker("q");
    let w1 = f.worker("q");
    let w2 = f.worker("q");
    assert_eq!((w0.slot, w1.slot, w2.slot), (0, 1, 2));
    f.q.unregister_worker(f.now, w1);
    assert_eq!(f.worker("q").slot, 1);
    assert_eq!(f.worker("q").slot, 3);
}

#[test]
fn workers_spread_over_components_and_move_on_when_theirs_is_empty() {
    let mut f = Fixture::new(no_forget());
    let w0 = f.worker("q"); // slot 0
    let w1 = f.worker("q"); // slot 1
    for i in 0..3 {
        f.push(in_component(req("t", &[], &format!("ing{i}")), "ingester"));
        f.push(in_component(req("t", &[], &format!("sg{i}")), "store-gateway"));
    }
    // Components in name order: ingester (0), store-gateway (1).
    assert_eq!(f.next(w0).as_deref(), Some("ing0"));
    assert_eq!(f.next(w1).as_deref(), Some("sg0"));
    assert_eq!(f.next(w0).as_deref(), Some("ing1"));
    assert_eq!(f.next(w1).as_deref(), Some("sg1"));
    assert_eq!(f.next(w0).as_deref(), Some("ing2"));
    // The ingester queue is empty: w0 moves on instead of idling.
    assert_eq!(f.next(w0).as_deref(), Some("sg2"));
    assert_eq!(f.next(w1), None);
    assert!(f.q.component_lengths().is_empty(), "empty components disappear");
    f.assert_ok();
}

#[test]
fn workers_of_one_lane_start_at_the_same_component_whatever_the_component_count() {
    let mut f = Fixture::new(no_forget());
    // Four worker loops of two slots each (prefetch), three components: loop k's slots
    // are in lane k, so both start at component k mod 3.
    let ws: Vec<(u16, WorkerId)> = (0..4u16)
        .flat_map(|lane| [lane, lane])
        .map(|lane| (lane, f.worker_in_lane("q", lane)))
        .collect();
    let names = ["a", "b", "c"];
    for i in 0..8 {
        for name in names {
            f.push(in_component(req("t", &[], &format!("{name}{i}")), name));
        }
    }
    for &(lane, w) in &ws {
        let got = f.next(w).expect("every component has work");
        assert!(
            got.starts_with(names[usize::from(lane) % 3]),
            "a worker of lane {lane} started at {got}"
        );
    }
    f.assert_ok();
}

#[test]
fn cancel_frontend_removes_only_its_requests() {
    let mut f = Fixture::new(no_forget());
    f.push(req("a", &[], "mine"));
    let now = f.now;
    f.q.enqueue(
        now,
        QueryKey { frontend: 2, query: 1 },
        req("a", &[], "theirs"),
        EnqueueOptions::default(),
    )
    .unwrap();
    let gone = f.q.cancel_frontend(1);
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].1.label, "mine");
    assert_eq!(f.q.len(), 1);
    f.assert_ok();
}

#[test]
fn drain_hands_everything_back_oldest_first() {
    let mut f = Fixture::new(no_forget());
    f.push(req("b", &["u"], "first"));
    f.advance(Duration::from_millis(1));
    f.push_with_deadline(req("a", &[], "second"), Duration::from_secs(1));
    f.advance(Duration::from_millis(1));
    f.push(in_component(req("a", &[], "third"), "x"));
    let labels: Vec<_> = f.q.drain().into_iter().map(|(_, r)| r.label).collect();
    assert_eq!(labels, ["first", "second", "third"]);
    let c = f.q.counters();
    assert_eq!((c.enqueued, c.handed_back), (3, 3));
    f.assert_ok();
    // The queue still works afterwards.
    let w = f.worker("q");
    f.push(req("a", &[], "after"));
    assert_eq!(f.next(w).as_deref(), Some("after"));
    f.advance(Duration::from_secs(5));
    assert_eq!(f.q.expire(f.now), 0, "drained deadlines are gone");
}

#[test]
fn tenant_stats_report_length_oldest_age_and_peak() {
    let mut f = Fixture::new(no_forget());
    let w = f.worker("q");
    f.push(req("a", &["u1"], "1"));
    f.advance(Duration::from_millis(5));
    f.push(in_component(req("a", &["u2"], "2"), "c"));
    f.push(req("a", &[], "3"));
    f.advance(Duration::from_millis(10));
    let stats = f.q.tenant_stats(f.now);
    assert_eq!(stats.len(), 1);
    assert_eq!((stats[0].queued, stats[0].queued_bytes, stats[0].peak), (3, 30, 3));
    assert_eq!(stats[0].oldest, Duration::from_millis(15));
    // The unnamed component ("") sorts first, so slot 0 starts there.
    assert_eq!(f.next(w).as_deref(), Some("1"));
}

#[test]
fn invalid_config_names_the_key() {
    let err = TreeQueue::<Req>::new(
        QueueConfig {
            max_outstanding_per_tenant: 0,
            ..QueueConfig::default()
        },
        std::time::Instant::now(),
    )
    .err()
    .unwrap();
    assert_eq!(err.to_string(), "max_outstanding_per_tenant: must be at least 1");
}

fn weighted(weights: &[(&str, u32)]) -> QueueConfig {
    let mut config = QueueConfig {
        max_outstanding_per_tenant: 100_000,
        ..no_forget()
    };
    for (tenant, w) in weights {
        config.tenants.insert(
            tenant.to_string(),
            TenantOverrides {
                weight: Some(*w),
                ..TenantOverrides::default()
            },
        );
    }
    config
}

#[test]
fn a_heavier_tenant_gets_that_many_turns_in_a_row() {
    let mut f = Fixture::new(weighted(&[("heavy", 3)]));
    let w = f.worker("q");
    for i in 0..9 {
        f.push(req("heavy", &[], &format!("h{i}")));
        f.push(req("light", &[], &format!("l{i}")));
    }
    let order: Vec<_> = (0..8).map(|_| f.next_tenant(w).unwrap()).collect();
    assert_eq!(
        order,
        ["heavy", "heavy", "heavy", "light", "heavy", "heavy", "heavy", "light"]
    );
    f.assert_ok();
}

#[test]
fn a_weight_reload_applies_to_the_next_visit() {
    let mut f = Fixture::new(weighted(&[]));
    let w = f.worker("q");
    for i in 0..6 {
        f.push(req("a", &[], &format!("a{i}")));
        f.push(req("b", &[], &format!("b{i}")));
    }
    assert_eq!(f.next_tenant(w).as_deref(), Some("a"));
    f.q.set_config(weighted(&[("b", 2)])).unwrap();
    let order: Vec<_> = (0..5).map(|_| f.next_tenant(w).unwrap()).collect();
    assert_eq!(order, ["b", "b", "a", "b", "b"]);
    assert_eq!(
        f.q.tenant_stats(f.now).iter().find(|t| t.tenant == "b").unwrap().weight,
        2
    );
}

#[test]
fn weights_must_be_sane() {
    let err = TreeQueue::<Req>::new(weighted(&[("t", 0)]), std::time::Instant::now())
        .err()
        .unwrap();
    assert_eq!(err.to_string(), "tenants.t.weight: must be between 1 and 1000");
}

#[test]
fn an_actor_that_empties_and_refills_rejoins_at_the_back() {
    let mut f = Fixture::new(no_forget());
    let w = f.worker("q");
    for a in ["a", "b", "c"] {
        f.push(req("t", &[a], &format!("{a}1")));
    }
    assert_eq!(f.next(w).as_deref(), Some("a1")); // a empties (its node is parked)
    f.push(req("t", &["a"], "a2"));
    let order: Vec<String> = (0..3).map(|_| f.next(w).unwrap()).collect();
    assert_eq!(order, ["b1", "c1", "a2"]);
    f.assert_ok();
}

#[test]
fn an_actor_emptied_by_a_cancel_gives_up_its_place() {
    let mut f = Fixture::new(no_forget());
    let w = f.worker("q");
    let a1 = f.push(req("t", &["a"], "a1"));
    f.push(req("t", &["b"], "b1"));
    f.push(req("t", &["c"], "c1"));
    assert!(f.q.cancel(a1).is_some()); // a's turn at the front is left behind
    f.assert_ok();
    f.push(req("t", &["a"], "a2"));
    let order: Vec<String> = (0..3).map(|_| f.next(w).unwrap()).collect();
    assert_eq!(order, ["b1", "c1", "a2"]);
    f.assert_ok();
}

#[test]
fn emptied_nodes_are_kept_until_the_sweep_and_then_freed() {
    let mut f = Fixture::new(no_forget());
    let w = f.worker("q");
    for label in ["k1", "k2", "k3"] {
        f.push(req("t", &[], label)); // the tenant stays queued throughout
    }
    f.push(req("t", &["u", "v"], "1"));
    assert_eq!(f.q.nodes.len(), 3, "root, u, v");
    assert_eq!(f.next(w).as_deref(), Some("k1"));
    assert_eq!(f.next(w).as_deref(), Some("1")); // u and v empty: parked, not freed
    assert_eq!(f.q.nodes.len(), 3);
    f.push(req("t", &["u", "v"], "2"));
    assert_eq!(f.q.nodes.len(), 3, "refilling a parked path allocates no node");
    assert_eq!(f.next(w).as_deref(), Some("k2"));
    assert_eq!(f.next(w).as_deref(), Some("2"));
    f.assert_ok();
    let now = f.now;
    f.q.expire(now);
    assert_eq!(f.q.nodes.len(), 1, "the sweep frees the parked u and v");
    f.assert_ok();
    assert_eq!(f.next(w).as_deref(), Some("k3"));
    assert_eq!(f.q.nodes.len(), 0, "a tenant that empties goes with its root");
}
