//! Shuffle sharding: which queriers serve a tenant, how evenly the shards spread, and what
//! happens to them when queriers join, crash, come back or shut down.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::*;

fn shard_config(k: u32, forget: Duration) -> QueueConfig {
    QueueConfig {
        max_queriers_per_tenant: k,
        querier_forget_delay: forget,
        max_outstanding_per_tenant: 10_000,
        ..QueueConfig::default()
    }
}

/// Largest relative distance of the per-querier tenant counts from their mean, for
/// `queriers` queriers and `tenants` tenants with shards of `k`, names made from `prefix`.
fn shard_imbalance(prefix: &str, queriers: usize, tenants: usize, k: u32) -> (f64, Vec<usize>) {
    let candidates: Vec<(u32, u64)> = (0..queriers)
        .map(|i| (i as u32, shard::stable_hash(&format!("{prefix}querier-{i}"))))
        .collect();
    let mut counts = vec![0usize; queriers];
    for t in 0..tenants {
        let shard = shard::select(shard::stable_hash(&format!("{prefix}tenant-{t}")), k, &candidates).unwrap();
        assert_eq!(shard.len(), k as usize);
        for q in shard {
            counts[q as usize] += 1;
        }
    }
    let mean = (tenants * k as usize) as f64 / queriers as f64;
    let worst = counts
        .iter()
        .map(|&c| (c as f64 - mean).abs() / mean)
        .fold(0.0, f64::max);
    (worst, counts)
}

#[test]
fn shard_distribution_is_exact_and_even() {
    let mut f = Fixture::new(shard_config(5, Duration::ZERO));
    for i in 0..30 {
        f.worker(&format!("querier-{i}"));
    }
    for t in 0..1000 {
        f.push(req(&format!("tenant-{t}"), &[], ""));
    }
    let mut per_querier: BTreeMap<String, usize> = BTreeMap::new();
    for t in 0..1000 {
        let shard = f.q.tenant_shard(&format!("tenant-{t}")).expect("sharded");
        assert_eq!(shard.len(), 5, "every tenant has exactly k queriers");
        for q in shard {
            *per_querier.entry(q).or_default() += 1;
        }
    }
    assert_eq!(per_querier.len(), 30, "every querier serves someone");
    assert_eq!(per_querier.values().sum::<usize>(), 5000);
    // Each tenant's shard is independent of the others' (that is what keeps movement
    // minimal), so per-querier counts are binomial: sd ≈ 7% of the mean here. See
    // `shard_balance_matches_ideal_random_assignment` for the statistics over many names.
    let (worst, counts) = shard_imbalance("", 30, 1000, 5);
    assert!(
        worst <= 0.25,
        "worst querier {:.0}% off the mean: {counts:?}",
        worst * 100.0
    );
    f.assert_ok();
}

#[test]
fn shard_balance_matches_ideal_random_assignment() {
    // For 30 queriers, 1000 tenants, k = 5, a perfectly random assignment has a median
    // worst-querier deviation of ~16% and exceeds 20% for ~15% of name sets. The hash
    // must do as well: no bias, no correlation between names.
    let mut worst: Vec<f64> = (0..60)
        .map(|s| shard_imbalance(&format!("set{s}-"), 30, 1000, 5).0)
        .collect();
    worst.sort_by(f64::total_cmp);
    let median = worst[worst.len() / 2];
    let within_20 = worst.iter().filter(|&&w| w <= 0.20).count();
    assert!(median <= 0.18, "median worst deviation {:.1}%", median * 100.0);
    assert!(within_20 >= 45, "only {within_20} of 60 name sets within 20%");
    assert!(
        worst[worst.len() - 1] <= 0.30,
        "worst of all {:.1}%",
        worst[worst.len() - 1] * 100.0
    );
}

#[test]
fn tenants_outside_a_queriers_shard_are_never_handed_to_it() {
    let mut f = Fixture::new(shard_config(2, Duration::ZERO));
    let workers: Vec<_> = (0..6).map(|i| f.worker(&format!("q{i}"))).collect();
    for t in 0..20 {
        for i in 0..5 {
            f.push(req(&format!("t{t}"), &[], &i.to_string()));
        }
    }
    let shards: BTreeMap<String, Vec<String>> = (0..20)
        .map(|t| (format!("t{t}"), f.q.tenant_shard(&format!("t{t}")).unwrap()))
        .collect();
    let mut served = 0;
    for round in 0..200 {
        let i = round % 6;
        if let Some(t) = f.next_tenant(workers[i]) {
            assert!(shards[&t].contains(&format!("q{i}")), "q{i} got {t}");
            served += 1;
        }
    }
    assert_eq!(served, 100, "every request was served by someone in its shard");
}

#[test]
fn joining_querier_moves_only_the_tenants_it_enters() {
    let mut f = Fixture::new(shard_config(3, Duration::ZERO));
    for i in 0..10 {
        f.worker(&format!("q{i}"));
    }
    let tenants: Vec<String> = (0..300).map(|t| format!("t{t}")).collect();
    for t in &tenants {
        f.push(req(t, &[], ""));
    }
    let before: Vec<_> = tenants.iter().map(|t| f.q.tenant_shard(t).unwrap()).collect();
    let joined = f.worker("q-new");
    let after: Vec<_> = tenants.iter().map(|t| f.q.tenant_shard(t).unwrap()).collect();
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            moved += 1;
            assert!(
                a.contains(&"q-new".to_string()),
                "a tenant changed shard without gaining the newcomer"
            );
            let kept: BTreeSet<_> = b.iter().filter(|q| a.contains(q)).collect();
            assert_eq!(kept.len(), 2, "exactly one querier swapped for the newcomer");
        }
    }
    // Expected share: k/(n+1) = 3/11 of the tenants.
    assert!((50..=115).contains(&moved), "{moved} of 300 tenants moved");
    // And leaving again restores every shard exactly.
    f.q.unregister_worker(f.now, joined);
    let restored: Vec<_> = tenants.iter().map(|t| f.q.tenant_shard(t).unwrap()).collect();
    assert_eq!(restored, before);
    f.assert_ok();
}

#[test]
fn forget_delay_keeps_shards_for_a_crashed_querier_and_restores_on_reconnect() {
    let delay = Duration::from_secs(30);
    let mut f = Fixture::new(shard_config(2, delay));
    let ws: Vec<_> = (0..5).map(|i| f.worker(&format!("q{i}"))).collect();
    let tenants: Vec<String> = (0..50).map(|t| format!("t{t}")).collect();
    for t in &tenants {
        f.push(req(t, &[], ""));
    }
    let shards = |f: &Fixture| -> Vec<_> { tenants.iter().map(|t| f.q.tenant_shard(t).unwrap()).collect() };
    let before = shards(&f);

    // Crash: the last worker of q0 goes without a notice.
    f.q.unregister_worker(f.now, ws[0]);
    assert_eq!(shards(&f), before, "shards kept during the delay");
    f.advance(delay - Duration::from_secs(1));
    assert_eq!(f.q.forget_disconnected_queriers(f.now), 0);
    // Reconnect inside the delay: nothing changes, and it is no longer pending.
    f.worker("q0");
    f.advance(Duration::from_secs(5));
    assert_eq!(f.q.forget_disconnected_queriers(f.now), 0);
    assert_eq!(shards(&f), before);

    // Crash for good: forgotten after the delay, its tenants reshard.
    let w = f.q.querier_stats(f.now);
    assert_eq!(w.iter().find(|s| s.querier == "q0").unwrap().workers, 1);
    let q0 = f.worker("q0"); // a second worker, then both go
    f.q.unregister_worker(f.now, q0);
    f.q.unregister_worker(
        f.now,
        WorkerId {
            querier: q0.querier,
            slot: 0,
            lane: 0,
        },
    );
    f.advance(delay);
    assert_eq!(f.q.forget_disconnected_queriers(f.now), 1);
    let after = shards(&f);
    assert!(after.iter().all(|s| !s.contains(&"q0".to_string())));
    assert_ne!(after, before);
    f.assert_ok();
}

#[test]
fn graceful_shutdown_reshards_at_once_despite_the_delay() {
    let mut f = Fixture::new(shard_config(2, Duration::from_secs(30)));
    let ws: Vec<_> = (0..4).map(|i| f.worker(&format!("q{i}"))).collect();
    for t in 0..40 {
        f.push(req(&format!("t{t}"), &[], ""));
    }
    f.q.notify_querier_shutdown(f.now, "q1");
    f.q.unregister_worker(f.now, ws[1]);
    assert_eq!(f.q.querier_count(), 3);
    for t in 0..40 {
        assert!(!f.q.tenant_shard(&format!("t{t}")).unwrap().contains(&"q1".to_string()));
    }
    f.assert_ok();
}
