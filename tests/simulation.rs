//! Deterministic simulations on the real queue core (fake clock, seeded arrivals).

use std::time::Duration;

use sluice::sim::{SimReport, noisy_neighbour, run, slow_component};

/// Fast-component queue wait, component-aware versus plain round robin, when the
/// store-gateway becomes 100× slower under a load sized for a healthy system.
#[test]
fn component_aware_queue_protects_the_fast_backend_from_a_slow_one() {
    for share in [0.05, 0.10, 0.25, 0.50] {
        let aware = run(&slow_component(share, 0.5, 100, true, Duration::from_secs(10), 7));
        let plain = run(&slow_component(share, 0.5, 100, false, Duration::from_secs(10), 7));
        let (a, p) = (
            aware.component("ingester").unwrap(),
            plain.component("ingester").unwrap(),
        );
        let ratio = p.mean.as_secs_f64() / a.mean.as_secs_f64();
        assert!(
            ratio >= 5.0,
            "{:.0}% slow: fast mean wait {:?} aware vs {:?} plain ({ratio:.1}×)",
            share * 100.0,
            a.mean,
            p.mean
        );
        // More fast requests are served, not just served sooner.
        assert!(a.served > p.served);
    }
}

#[test]
fn a_healthy_backend_makes_both_policies_alike() {
    // With no slowdown there is nothing to protect; the component-aware policy costs
    // nothing either.
    let aware = run(&slow_component(0.25, 0.5, 1, true, Duration::from_secs(5), 7));
    let plain = run(&slow_component(0.25, 0.5, 1, false, Duration::from_secs(5), 7));
    assert_eq!(aware.dispatched, plain.dispatched);
    assert_eq!(aware.left_queued, 0);
    assert!(aware.component("ingester").unwrap().p99 <= Duration::from_millis(5));
}

fn quiet(r: &SimReport) -> impl Iterator<Item = &sluice::sim::WaitStats> {
    r.by_tenant.iter().filter(|t| t.name.starts_with("quiet"))
}

#[test]
fn a_100x_noisy_neighbour_takes_only_its_share() {
    let calm = run(&noisy_neighbour(false, 100.0, 0.5, 3));
    let noisy = run(&noisy_neighbour(true, 100.0, 0.5, 3));
    // Every quiet request is still served: the noisy tenant's backlog is its own.
    let served = |r: &SimReport| quiet(r).map(|t| t.served).sum::<u64>();
    assert_eq!(served(&noisy), served(&calm));
    assert!(noisy.left_queued > 0, "the noisy tenant is backlogged");
    // A quiet request waits for the next free worker, not behind the noisy backlog:
    // under one service time (20 ms) at p99.
    for t in quiet(&noisy) {
        assert!(t.p99 < Duration::from_millis(20), "{} p99 {:?}", t.name, t.p99);
    }
}

/// A tenant of 60 s queries and one of 10 ms queries: by request count the short tenant
/// gets one query per long one and its queue grows for the whole run; in cost it is served
/// whenever a worker frees, and a reserved worker serves it at once.
#[test]
fn cost_aware_fairness_keeps_short_queries_short() {
    use sluice::sim::{LongShortPolicy, long_and_short};
    let runs = [
        LongShortPolicy::RoundRobin,
        LongShortPolicy::CostAware,
        LongShortPolicy::CostAwareReserved,
    ]
    .map(|p| run(&long_and_short(p, 11)));
    let short = |r: &SimReport| r.tenant("short").unwrap().clone();
    let (rr, drr, reserved) = (short(&runs[0]), short(&runs[1]), short(&runs[2]));
    // Both unreserved runs serve every query in the end; the difference is the wait. (With
    // a quarter of the workers reserved, the long tenant has fewer and is not done yet.)
    for r in &runs[..2] {
        assert_eq!(r.left_queued, 0, "{}", r.label);
        assert_eq!(r.dispatched, r.arrived, "{}", r.label);
    }
    assert!(rr.mean > Duration::from_secs(300), "{rr:?}");
    assert!(drr.mean * 10 < rr.mean, "{drr:?} vs {rr:?}");
    // At most until the next worker frees: one long query (the 60 s queries started
    // together, so they end together).
    assert!(drr.max < Duration::from_secs(60), "{drr:?}");
    // A reserved worker takes them as they come: at most one short query's wait.
    assert!(reserved.max <= Duration::from_millis(10), "{reserved:?}");
    // The long tenant is served as much either way.
    let long = |r: &SimReport| r.tenant("long").unwrap().served;
    assert_eq!(long(&runs[1]), long(&runs[0]));
}

/// A quarter of the workers reserved for priority 1 beside a priority-0 flood of short
/// requests: not lent, they idle (utilisation 75%); lent, the workers are all busy and an
/// urgent request still waits at most one short request (10 ms). With a fifth of the
/// flood ten times longer than the loan limit, lending still adds most of the idle share
/// and never makes an urgent request wait a long one.
#[test]
fn lent_reserved_workers_never_idle_beside_a_backlog_and_urgent_work_waits_one_short_request() {
    use sluice::sim::reserved_capacity;
    let short = Duration::from_millis(10);
    let not_lent = run(&reserved_capacity(false, 0.0, 5.0, 5));
    let lent = run(&reserved_capacity(true, 0.0, 5.0, 5));
    assert!(not_lent.utilisation < 0.80, "{}", not_lent.utilisation);
    assert!(lent.utilisation >= 0.98, "{}", lent.utilisation);
    let urgent = lent.tenant("urgent").unwrap();
    assert!(urgent.served > 200, "{urgent:?}");
    assert!(urgent.p99 <= short, "{urgent:?}");
    let mixed = run(&reserved_capacity(true, 0.2, 5.0, 5));
    assert!(mixed.utilisation > not_lent.utilisation + 0.1, "{}", mixed.utilisation);
    assert!(
        mixed.tenant("urgent").unwrap().max <= short,
        "{:?}",
        mixed.tenant("urgent")
    );
}

/// Twice the work the workers can do, every request due 500 ms after arrival: without
/// admission most of the queue expires and most of what is served is served late; with
/// it, what cannot make it is refused at once, nearly everything served is in time, and
/// the workers serve as much.
#[test]
fn deadline_aware_admission_keeps_served_work_within_its_deadline_under_2x_overload() {
    use sluice::sim::deadline_overload;
    let off = run(&deadline_overload(false, 3));
    let on = run(&deadline_overload(true, 3));
    let share = |r: &SimReport| r.within_deadline as f64 / r.dispatched as f64;
    assert!(share(&off) < 0.5, "{}", share(&off));
    assert!(share(&on) >= 0.9, "{}", share(&on));
    assert!(on.refused_for_deadline > on.arrived / 3, "{}", on.refused_for_deadline);
    assert!(on.expired * 100 < on.arrived, "{} expired", on.expired);
    assert!(
        on.dispatched * 100 >= off.dispatched * 99,
        "{} vs {}",
        on.dispatched,
        off.dispatched
    );
}
