//! Property tests over random workloads, on the fake clock.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Enqueue {
        tenant: u8,
        actors: Vec<u8>,
        component: Option<u8>,
        deadline_ms: Option<u16>,
        priority: Option<u8>,
        cost: u32,
    },
    Charge {
        tenant: u8,
        delta: i32,
    },
    Dequeue {
        worker: u8,
    },
    Cancel {
        pick: u16,
    },
    CancelFrontend,
    Advance {
        ms: u16,
    },
    Expire,
    AddWorker {
        querier: u8,
        /// None: a lane of its own; some: shared with the querier's other workers in it.
        lane: Option<u8>,
    },
    RemoveWorker {
        pick: u8,
    },
    Shutdown {
        querier: u8,
    },
    Forget,
    Reconfigure {
        limit: u32,
        shard: u32,
        reserved: u8,
        skips: u32,
        quantum: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (
            (0u8..6, prop::collection::vec(0u8..3, 0..3), prop::option::of(0u8..3), prop::option::of(1u16..500)),
            (prop::option::of(0u8..3), 0u32..100),
        )
            .prop_map(|((tenant, actors, component, deadline_ms), (priority, cost))| Op::Enqueue {
                tenant, actors, component, deadline_ms, priority, cost,
            }),
        1 => (0u8..6, -500i32..500).prop_map(|(tenant, delta)| Op::Charge { tenant, delta }),
        6 => (0u8..16).prop_map(|worker| Op::Dequeue { worker }),
        2 => any::<u16>().prop_map(|pick| Op::Cancel { pick }),
        1 => Just(Op::CancelFrontend),
        2 => (0u16..300).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Expire),
        2 => (0u8..5, proptest::option::of(0u8..4)).prop_map(|(querier, lane)| Op::AddWorker { querier, lane }),
        1 => any::<u8>().prop_map(|pick| Op::RemoveWorker { pick }),
        1 => (0u8..5).prop_map(|querier| Op::Shutdown { querier }),
        1 => Just(Op::Forget),
        1 => (1u32..8, 0u32..4, 0u8..100, 1u32..4, 1u32..20)
            .prop_map(|(limit, shard, reserved, skips, quantum)| Op::Reconfigure { limit, shard, reserved, skips, quantum }),
    ]
}

/// How a request the model saw accepted has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Dispatched,
    Cancelled,
    Expired,
    HandedBack,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever happens, every accepted request ends exactly once, nothing expired is
    /// dispatched, shards are respected, and the internal invariants hold throughout.
    #[test]
    fn every_request_ends_exactly_once(ops in prop::collection::vec(op(), 1..300)) {
        let mut f = Fixture::new(QueueConfig {
            max_outstanding_per_tenant: 6,
            max_queued_requests: 40,
            max_queriers_per_tenant: 2,
            querier_forget_delay: Duration::from_millis(200),
            ..QueueConfig::default()
        });
        let mut workers: Vec<(WorkerId, String)> = Vec::new();
        let mut deadlines: HashMap<QueryKey, Instant> = HashMap::new();
        let mut queued: Vec<QueryKey> = Vec::new();
        let mut ends: HashMap<QueryKey, End> = HashMap::new();
        let end = |ends: &mut HashMap<QueryKey, End>, k: QueryKey, e: End| {
            prop_assert!(ends.insert(k, e).is_none(), "{k:?} ended twice");
            Ok(())
        };
        let mut frontend = 1;
        for op in ops {
            match op {
                Op::Enqueue { tenant, actors, component, deadline_ms, priority, cost } => {
                    let mut r = Req { priority, cost, ..req(&format!("t{tenant}"), &[], "") };
                    r.actors = actors.iter().map(|a| format!("a{a}")).collect();
                    r.component = component.map(|c| format!("c{c}"));
                    frontend = 1 + (tenant as u64 % 2);
                    let key = QueryKey { frontend, query: f.q.counters().enqueued + f.q.counters().rejected + 1 };
                    let deadline = deadline_ms.map(|ms| f.now + Duration::from_millis(ms.into()));
                    let options = options_of(&r, deadline);
                    if f.q.enqueue(f.now, key, r, options).is_ok() {
                        queued.push(key);
                        if let Some(d) = deadline { deadlines.insert(key, d); }
                    }
                }
                Op::Dequeue { worker } => {
                    if workers.is_empty() { continue; }
                    let (w, querier) = workers[worker as usize % workers.len()].clone();
                    let shards: HashMap<String, Option<Vec<String>>> = (0..6)
                        .map(|t| (format!("t{t}"), f.q.tenant_shard(&format!("t{t}"))))
                        .collect();
                    if let Dequeue::Dispatch(d) = f.q.dequeue(f.now, w) {
                        if let Some(Some(shard)) = shards.get(&d.request.tenant) {
                            prop_assert!(shard.contains(&querier), "{querier} served {} outside its shard", d.request.tenant);
                        }
                        if let Some(&dl) = deadlines.get(&d.key) {
                            prop_assert!(dl > f.now, "expired request dispatched");
                        }
                        end(&mut ends, d.key, End::Dispatched)?;
                    }
                }
                Op::Cancel { pick } => {
                    if queued.is_empty() { continue; }
                    let k = queued[pick as usize % queued.len()];
                    if f.q.cancel(k).is_some() { end(&mut ends, k, End::Cancelled)?; }
                }
                Op::CancelFrontend => {
                    for (k, _) in f.q.cancel_frontend(frontend) { end(&mut ends, k, End::Cancelled)?; }
                }
                Op::Charge { tenant, delta } => {
                    f.q.charge(&format!("t{tenant}"), delta.into());
                }
                Op::Advance { ms } => f.advance(Duration::from_millis(ms.into())),
                Op::Expire => { f.q.expire(f.now); }
                Op::AddWorker { querier, lane } => {
                    let id = format!("q{querier}");
                    let w = match lane {
                        Some(lane) => f.worker_in_lane(&id, lane.into()),
                        None => f.worker(&id),
                    };
                    workers.push((w, id));
                }
                Op::RemoveWorker { pick } => {
                    if workers.is_empty() { continue; }
                    let (w, _) = workers.remove(pick as usize % workers.len());
                    f.q.unregister_worker(f.now, w);
                }
                Op::Shutdown { querier } => { f.q.notify_querier_shutdown(f.now, &format!("q{querier}")); }
                Op::Forget => { f.q.forget_disconnected_queriers(f.now); }
                Op::Reconfigure { limit, shard, reserved, skips, quantum } => {
                    let mut c = f.q.config().clone();
                    c.max_outstanding_per_tenant = limit;
                    c.max_queriers_per_tenant = shard;
                    c.reserved_workers_percent = reserved;
                    c.max_priority_skips = skips;
                    c.cost_quantum = quantum;
                    f.q.set_config(c).unwrap();
                }
            }
            while let Some(e) = f.q.poll_expired() {
                prop_assert!(deadlines[&e.key] <= f.now, "expired early");
                end(&mut ends, e.key, End::Expired)?;
            }
            if let Err(e) = f.q.check_invariants() { prop_assert!(false, "{e}"); }
        }
        for (k, _) in f.q.drain() { end(&mut ends, k, End::HandedBack)?; }
        let c = f.q.counters();
        prop_assert_eq!(ends.len() as u64, c.enqueued);
        prop_assert_eq!(queued.len() as u64, c.enqueued);
        let count = |e: End| ends.values().filter(|&&x| x == e).count() as u64;
        prop_assert_eq!((count(End::Dispatched), count(End::Cancelled), count(End::Expired), count(End::HandedBack)),
            (c.dispatched, c.cancelled, c.expired, c.handed_back));
        prop_assert!(f.q.is_empty());
        if let Err(e) = f.q.check_invariants() { prop_assert!(false, "{e}"); }
    }

    /// No starvation: once a request is at the head of its leaf FIFO, it is dispatched
    /// within `tenants × (fan-out + 1)^depth` dequeues, however the others arrive.
    #[test]
    fn heads_are_served_within_a_bounded_number_of_dequeues(
        arrivals in prop::collection::vec((0u8..4, prop::collection::vec(0u8..3, 0..=2), 0u8..3), 1..400),
    ) {
        const TENANTS: usize = 4;
        const FANOUT: usize = 3;
        let bound = TENANTS * (FANOUT + 1).pow(2);
        let mut f = Fixture::new(QueueConfig { max_outstanding_per_tenant: 10_000, ..no_forget() });
        let w = f.worker("q");
        // The model: FIFO per leaf path, and when each request became its leaf's head.
        let mut leaves: BTreeMap<String, VecDeque<String>> = BTreeMap::new();
        let mut head_since: HashMap<String, u64> = HashMap::new();
        let mut dequeues: u64 = 0;
        let mut n = 0;
        let step = |f: &mut Fixture, leaves: &mut BTreeMap<String, VecDeque<String>>, head_since: &mut HashMap<String, u64>, dequeues: &mut u64| -> Result<(), TestCaseError> {
            *dequeues += 1;
            let Some(label) = f.next(w) else { return Ok(()) };
            let leaf = label.rsplit_once('#').unwrap().0.to_string();
            let fifo = leaves.get_mut(&leaf).unwrap();
            let head = fifo.pop_front();
            prop_assert_eq!(head.as_ref(), Some(&label), "FIFO order within a leaf");
            let waited = *dequeues - head_since.remove(&label).unwrap();
            prop_assert!(waited as usize <= bound, "{label} waited {waited} dequeues at the head (bound {bound})");
            if let Some(next) = fifo.front() { head_since.insert(next.clone(), *dequeues); }
            Ok(())
        };
        for (tenant, actors, dequeue_after) in arrivals {
            let actors: Vec<String> = actors.iter().map(|a| format!("a{a}")).collect();
            let leaf = format!("t{tenant}/{}", actors.join("/"));
            n += 1;
            let label = format!("{leaf}#{n}");
            let mut r = req(&format!("t{tenant}"), &[], &label);
            r.actors = actors;
            f.push(r);
            let fifo = leaves.entry(leaf).or_default();
            if fifo.is_empty() { head_since.insert(label.clone(), dequeues); }
            fifo.push_back(label);
            for _ in 0..dequeue_after { step(&mut f, &mut leaves, &mut head_since, &mut dequeues)?; }
        }
        while !f.q.is_empty() { step(&mut f, &mut leaves, &mut head_since, &mut dequeues)?; }
    }

    /// Backlogged tenants with equal demand get equal service (Jain's index ≥ 0.99),
    /// whatever their actor trees and however several queriers' workers interleave.
    #[test]
    fn equal_demand_gets_equal_shares(
        tenants in 2usize..20,
        actor_shapes in prop::collection::vec(prop::collection::vec(0u8..4, 0..=2), 20),
        queriers in 1usize..5,
        order in prop::collection::vec(any::<u8>(), 64),
    ) {
        const BACKLOG: usize = 200;
        let mut f = Fixture::new(QueueConfig { max_outstanding_per_tenant: 10_000, ..no_forget() });
        let workers: Vec<WorkerId> = (0..queriers).flat_map(|q| (0..3).map(move |_| q)).map(|q| f.worker(&format!("q{q}"))).collect();
        for i in 0..BACKLOG {
            for (t, shape) in actor_shapes.iter().enumerate().take(tenants) {
                let mut r = req(&format!("t{t}"), &[], "");
                // Each tenant spreads its requests over its own actor shape.
                r.actors = shape.iter().enumerate().map(|(lvl, &fan)| format!("l{lvl}-{}", i % (fan as usize + 1))).collect();
                f.push(r);
            }
        }
        let mut served: HashMap<String, f64> = HashMap::new();
        for i in 0..BACKLOG * tenants / 2 {
            let w = workers[order[i % order.len()] as usize % workers.len()];
            let t = f.next_tenant(w).expect("backlogged");
            *served.entry(t).or_default() += 1.0;
        }
        let shares: Vec<f64> = (0..tenants).map(|t| served.get(&format!("t{t}")).copied().unwrap_or(0.0)).collect();
        let j = jain(&shares);
        prop_assert!(j >= 0.99, "Jain's index {j:.4} for {shares:?}");
    }

    /// One actor flooding its tenant does not change what its siblings get by more
    /// than 5%, compared with the same run without the flood.
    #[test]
    fn a_flooding_actor_does_not_crowd_out_its_siblings(
        siblings in 2usize..6,
        per_sibling in 20usize..60,
        flood_factor in 10usize..100,
    ) {
        let run = |flood: usize| -> Vec<f64> {
            let mut f = Fixture::new(QueueConfig { max_outstanding_per_tenant: 100_000, ..no_forget() });
            let w = f.worker("q");
            for i in 0..per_sibling * flood {
                f.push(req("t", &["flooder"], &format!("flooder#{i}")));
            }
            for s in 0..siblings {
                for i in 0..per_sibling {
                    f.push(req("t", &[&format!("user{s}")], &format!("user{s}#{i}")));
                }
            }
            // Serve as many as the siblings' demand, while they are all still backlogged.
            let mut counts = vec![0.0; siblings];
            for _ in 0..per_sibling * siblings / 2 {
                let label = f.next(w).unwrap();
                if let Some(s) = label.strip_prefix("user") {
                    counts[s.split('#').next().unwrap().parse::<usize>().unwrap()] += 1.0;
                }
            }
            counts
        };
        let calm = run(1);
        let flooded = run(flood_factor);
        for (c, fl) in calm.iter().zip(&flooded) {
            prop_assert!((c - fl).abs() <= 0.05 * c.max(1.0), "sibling share {c} without flood vs {fl} with");
        }
        // And the flooder itself gets no more than one sibling's share.
        let flood_served = (per_sibling * siblings / 2) as f64 - flooded.iter().sum::<f64>();
        prop_assert!(flood_served <= flooded[0] + 1.0);
    }
}

proptest! {
    /// Backlogged tenants are served in the ratio of their weights, within 5%, with one
    /// querier or several interleaving.
    #[test]
    fn weights_are_respected_within_five_percent(
        weights in prop::collection::vec(1u32..=4, 2..6),
        queriers in 1usize..4,
        order in prop::collection::vec(any::<u8>(), 64),
    ) {
        let mut config = QueueConfig { max_outstanding_per_tenant: 100_000, ..no_forget() };
        for (t, &w) in weights.iter().enumerate() {
            config.tenants.insert(format!("t{t}"), TenantOverrides { weight: Some(w), ..TenantOverrides::default() });
        }
        let mut f = Fixture::new(config);
        let workers: Vec<WorkerId> = (0..queriers).map(|q| f.worker(&format!("q{q}"))).collect();
        let total: u32 = weights.iter().sum();
        let rounds = 60;
        for _ in 0..(total * rounds * 2) {
            for t in 0..weights.len() {
                f.push(req(&format!("t{t}"), &[], ""));
            }
        }
        let mut served: HashMap<String, f64> = HashMap::new();
        for i in 0..(total * rounds) as usize {
            let w = workers[order[i % order.len()] as usize % workers.len()];
            *served.entry(f.next_tenant(w).expect("backlogged")).or_default() += 1.0;
        }
        for (t, &w) in weights.iter().enumerate() {
            let got = served.get(&format!("t{t}")).copied().unwrap_or(0.0) / f64::from(total * rounds);
            let want = f64::from(w) / f64::from(total);
            prop_assert!((got - want).abs() <= 0.05 * want, "t{t} weight {w}: share {got:.4}, want {want:.4}");
        }
    }
}

#[test]
fn distinct_queriers_see_distinct_tenant_sets_under_sharding() {
    // A sanity check that sharded rotation sets are per querier: with k = 1 each tenant
    // is served by exactly one of two queriers.
    let mut f = Fixture::new(QueueConfig {
        max_queriers_per_tenant: 1,
        ..no_forget()
    });
    let a = f.worker("qa");
    let b = f.worker("qb");
    for t in 0..20 {
        f.push(req(&format!("t{t}"), &[], ""));
    }
    let from_a: HashSet<String> = std::iter::from_fn(|| f.next_tenant(a)).collect();
    let from_b: HashSet<String> = std::iter::from_fn(|| f.next_tenant(b)).collect();
    assert!(from_a.is_disjoint(&from_b));
    assert_eq!(from_a.len() + from_b.len(), 20);
    assert!(!from_a.is_empty() && !from_b.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// With equal weights and mixed costs (each tenant its own range, a few tenants with
    /// costs 50× others'), backlogged tenants get the same served cost within 5%.
    #[test]
    fn equal_weights_get_equal_served_cost_within_five_percent(
        ranges in prop::collection::vec((1u32..=50, 0u32..=10), 2..5),
        quantum in 1u32..=20,
        queriers in 1usize..3,
        seed in any::<u64>(),
    ) {
        let mut f = Fixture::new(QueueConfig { max_outstanding_per_tenant: u32::MAX, cost_quantum: quantum, ..no_forget() });
        let workers: Vec<WorkerId> = (0..queriers).map(|q| f.worker(&format!("q{q}"))).collect();
        let n = ranges.len() as u64;
        // Enough for each tenant to stay backlogged until the others have been served
        // 400 of the largest cost each.
        let target = 400 * 60 * n;
        let mut rng = crate::sim::Rng::new(seed);
        for (t, &(lo, spread)) in ranges.iter().enumerate() {
            let mut queued = 0u64;
            while queued < target {
                let cost = lo + (rng.next_u64() % u64::from(spread + 1)) as u32;
                f.push(costing(&format!("t{t}"), cost));
                queued += u64::from(cost);
            }
        }
        let mut served: HashMap<String, u64> = HashMap::new();
        let mut total = 0u64;
        let mut i = 0usize;
        while total < target {
            let r = f.take(workers[i % workers.len()]).expect("backlogged");
            *served.entry(r.tenant).or_default() += u64::from(r.cost);
            total += u64::from(r.cost);
            i += 1;
        }
        let fair = total as f64 / n as f64;
        for (t, range) in ranges.iter().enumerate() {
            let got = served.get(&format!("t{t}")).copied().unwrap_or(0) as f64;
            prop_assert!((got - fair).abs() <= 0.05 * fair, "t{t} {range:?}: served {got}, fair {fair:.0}");
        }
        f.assert_ok();
    }

    /// Whatever arrives and in whatever order workers ask, the lower classes never hold
    /// the reserved share of a querier's workers.
    #[test]
    fn reserved_workers_are_never_all_taken_by_lower_classes(
        workers in 2u32..9,
        percent in 1u8..100,
        ops in prop::collection::vec((0u8..4, 0u8..3, 0u32..16), 1..300),
    ) {
        let mut f = Fixture::new(QueueConfig {
            reserved_workers_percent: percent,
            reserved_min_priority: 2,
            max_outstanding_per_tenant: 1000,
            ..no_forget()
        });
        let ws: Vec<WorkerId> = (0..workers).map(|_| f.worker("q")).collect();
        let reserved = workers * u32::from(percent) / 100;
        // What each worker is running: the priority of its request, if any.
        let mut running: Vec<Option<u8>> = vec![None; workers as usize];
        for (kind, priority, pick) in ops {
            let i = (pick % workers) as usize;
            match kind {
                0 => { f.push(at_priority("t", priority)); }
                1 | 2 => if running[i].is_none() {
                    running[i] = f.take(ws[i]).map(|r| r.priority.expect("set"));
                }
                _ => running[i] = None, // finished
            }
            let low = running.iter().filter(|p| p.is_some_and(|p| p < 2)).count() as u32;
            prop_assert!(low <= workers - reserved, "{low} low-priority runs with {reserved} of {workers} reserved");
        }
        // And an idle reserved worker takes high-priority work at once.
        if let Some(i) = (0..reserved as usize).find(|&i| running[i].is_none()) {
            f.push(at_priority("urgent", 2));
            prop_assert!(f.take(ws[i]).is_some());
        }
        f.assert_ok();
    }

    /// With lending, reserved workers run lower-priority work only when it costs at most
    /// `lend_max_cost`, whatever arrives and in whatever order workers ask.
    #[test]
    fn lent_reserved_workers_only_run_short_lower_priority_work(
        workers in 2u32..9,
        percent in 1u8..100,
        lend in 1u32..6,
        ops in prop::collection::vec((0u8..4, 0u8..3, 0u32..16, 1u32..10), 1..300),
    ) {
        let mut f = Fixture::new(QueueConfig {
            reserved_workers_percent: percent,
            reserved_min_priority: 2,
            lend_max_cost: lend,
            max_outstanding_per_tenant: 1000,
            ..no_forget()
        });
        let ws: Vec<WorkerId> = (0..workers).map(|_| f.worker("q")).collect();
        let reserved = (workers * u32::from(percent) / 100) as usize;
        for (kind, priority, pick, cost) in ops {
            let i = (pick % workers) as usize;
            match kind {
                0 => { f.push(Req { priority: Some(priority), cost, ..req("t", &[], "") }); }
                _ => if let Some(r) = f.take(ws[i])
                    && i < reserved
                    && r.priority.expect("set") < 2
                {
                    prop_assert!(r.cost <= lend, "lent a request costing {} (max {lend})", r.cost);
                },
            }
        }
        f.assert_ok();
    }

    /// Under strict priority every backlogged class is still served: between two of its
    /// dispatches, at most `max_priority_skips + classes - 1` go to other classes.
    #[test]
    fn no_class_waits_beyond_the_starvation_bound(
        classes in 2u8..5,
        skips in 1u32..8,
        queriers in 1usize..3,
        order in prop::collection::vec(any::<u8>(), 64),
    ) {
        let mut f = Fixture::new(QueueConfig { max_priority_skips: skips, max_outstanding_per_tenant: u32::MAX, ..no_forget() });
        let workers: Vec<WorkerId> = (0..queriers).map(|q| f.worker(&format!("q{q}"))).collect();
        for p in 0..classes {
            for _ in 0..2000 {
                f.push(at_priority(&format!("t{p}"), p));
            }
        }
        let bound = skips + u32::from(classes) - 1;
        let mut since: Vec<u32> = vec![0; classes as usize];
        let mut served: Vec<u32> = vec![0; classes as usize];
        for i in 0..1500 {
            let w = workers[order[i % order.len()] as usize % workers.len()];
            let p = f.take(w).expect("backlogged").priority.expect("set");
            served[p as usize] += 1;
            for (c, n) in since.iter_mut().enumerate() {
                *n = if c == p as usize { 0 } else { *n + 1 };
                prop_assert!(*n <= bound, "class {c} passed over {n} times (bound {bound})");
            }
        }
        // Otherwise priority holds: the top class is served at least as often as any other.
        let top = served[classes as usize - 1];
        prop_assert!(served.iter().all(|&n| n <= top), "served per class {served:?}");
        f.assert_ok();
    }
}
