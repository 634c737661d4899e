//! A deterministic discrete-event simulation of queriers serving a [`TreeQueue`]: seeded
//! arrivals, fixed service times per component, a fake clock. It runs the real queue
//! code, so its figures describe the scheduler's policy, not a model of it.
//!
//! Used by the tests (the slow-component and noisy-neighbour properties) and by
//! `sluice simulate`, which prints the same tables for a person to read.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use crate::queue::{Dequeue, EnqueueOptions, QueryKey, QueueConfig, QueuePath, Queued, TreeQueue, WorkerId};

/// The load one tenant offers.
#[derive(Debug, Clone)]
pub struct TenantLoad {
    pub name: String,
    /// Mean arrivals per second (Poisson).
    pub rate: f64,
    /// Requests are spread over this many actors (users); 0 for none.
    pub actors: u32,
    /// `(component, share of this tenant's requests)`; shares are normalised.
    pub mix: Vec<(String, f64)>,
    /// Priority class of its requests.
    pub priority: u8,
}

/// A whole simulated run.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub label: String,
    pub queriers: u32,
    pub workers_per_querier: u32,
    /// Service time per component; components not listed take `default_service`.
    pub service: Vec<(String, Duration)>,
    pub default_service: Duration,
    pub tenants: Vec<TenantLoad>,
    /// Simulated time during which requests arrive.
    pub duration: Duration,
    /// Tag requests with their component (`true`) or queue them all in one component.
    pub component_aware: bool,
    pub max_queriers_per_tenant: u32,
    /// Give each request its service time in milliseconds as its cost hint (cost-aware
    /// deficit round robin); otherwise every request costs 1 (round robin by count).
    pub cost_aware: bool,
    /// Share of each querier's workers reserved for priority 1 and above.
    pub reserved_workers_percent: u8,
    /// Reserved workers with nothing of priority 1 or above take priority-0 requests
    /// costing at most this (0: never).
    pub lend_max_cost: u32,
    /// Each request's deadline after its arrival (queue wait plus service), if any.
    pub deadline: Option<Duration>,
    /// Refuse at enqueue what the queue expects to miss its deadline.
    pub deadline_admission: bool,
    pub seed: u64,
}

/// Queue-wait figures for one group of requests (a tenant or a component).
#[derive(Debug, Clone, PartialEq)]
pub struct WaitStats {
    pub name: String,
    pub served: u64,
    pub mean: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct SimReport {
    pub label: String,
    pub by_tenant: Vec<WaitStats>,
    pub by_component: Vec<WaitStats>,
    pub arrived: u64,
    pub dispatched: u64,
    pub rejected: u64,
    /// Still queued when arrivals stopped and the run was cut off.
    pub left_queued: u64,
    /// Share of the workers' time spent serving while arrivals went on.
    pub utilisation: f64,
    /// Refused at enqueue because they would have missed their deadline.
    pub refused_for_deadline: u64,
    /// Expired in the queue (never dispatched).
    pub expired: u64,
    /// Dispatched and served before their deadline (all dispatched ones when there is none).
    pub within_deadline: u64,
}

impl SimReport {
    /// The figures of the named tenant or component.
    pub fn tenant(&self, name: &str) -> Option<&WaitStats> {
        self.by_tenant.iter().find(|s| s.name == name)
    }

    pub fn component(&self, name: &str) -> Option<&WaitStats> {
        self.by_component.iter().find(|s| s.name == name)
    }
}

struct SimRequest {
    tenant: String,
    actors: Vec<String>,
    component: Option<String>,
    /// The true component, even when the queue is not told of it.
    kind: String,
}

impl Queued for SimRequest {
    fn path(&self) -> QueuePath<'_> {
        QueuePath {
            component: self.component.as_deref(),
            tenant: &self.tenant,
            actors: &self.actors,
        }
    }
    fn size_bytes(&self) -> u64 {
        0
    }
}

/// splitmix64: a small, fast, seeded generator whose sequence never changes with a
/// library upgrade, so simulated figures stay reproducible.
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator whose sequence depends only on `seed`.
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(crate::queue::mix64(seed))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        crate::queue::mix64(self.0)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Exponentially distributed with the given rate (per second), in nanoseconds.
    pub(crate) fn exp_ns(&mut self, rate: f64) -> u64 {
        (-(1.0 - self.unit()).ln() / rate * 1e9) as u64
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrival { tenant: usize },
    WorkerFree { worker: usize },
}

/// Runs a scenario to the end of its arrivals plus a grace period of ten slowest
/// service times, and reports queue waits.
pub fn run(s: &Scenario) -> SimReport {
    let t0 = Instant::now();
    let config = QueueConfig {
        max_outstanding_per_tenant: u32::MAX,
        max_queued_requests: usize::MAX,
        max_queued_bytes: u64::MAX,
        max_queriers_per_tenant: s.max_queriers_per_tenant,
        querier_forget_delay: Duration::ZERO,
        reserved_workers_percent: s.reserved_workers_percent,
        reserved_min_priority: 1,
        lend_max_cost: s.lend_max_cost,
        deadline_admission: s.deadline_admission,
        ..QueueConfig::default()
    };
    let mut queue: TreeQueue<SimRequest> = TreeQueue::new(config, t0).expect("valid simulation config");
    let mut workers: Vec<WorkerId> = Vec::new();
    for w in 0..s.workers_per_querier {
        for q in 0..s.queriers {
            let _ = w;
            workers.push(queue.register_worker(t0, &format!("querier-{q}")));
        }
    }
    let service = |kind: &str| -> u64 {
        let d = s
            .service
            .iter()
            .find(|(c, _)| c == kind)
            .map_or(s.default_service, |(_, d)| *d);
        d.as_nanos() as u64
    };
    let slowest = s
        .service
        .iter()
        .map(|(_, d)| *d)
        .chain([s.default_service])
        .max()
        .unwrap_or_default();
    let end_ns = s.duration.as_nanos() as u64;
    let stop_ns = end_ns + 10 * slowest.as_nanos() as u64;

    // One random stream per tenant, so adding a tenant leaves the others' traffic as it was.
    let mut rngs: Vec<Rng> = (0..s.tenants.len() as u64)
        .map(|i| {
            Rng(crate::queue::mix64(
                s.seed ^ (i + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
            ))
        })
        .collect();
    let mut events: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |events: &mut BinaryHeap<Reverse<(u64, u64, Event)>>, at: u64, e: Event| {
        seq += 1;
        events.push(Reverse((at, seq, e)));
    };
    for (i, t) in s.tenants.iter().enumerate() {
        if t.rate > 0.0 {
            let at = rngs[i].exp_ns(t.rate);
            push(&mut events, at, Event::Arrival { tenant: i });
        }
    }
    let mut idle: VecDeque<usize> = (0..workers.len()).collect();
    let mut waits_by_tenant: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut waits_by_component: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let (mut arrived, mut rejected, mut next_key) = (0u64, 0u64, 0u64);
    // Worker time spent serving inside the arrival window.
    let mut busy_ns = 0u64;
    let (mut refused_for_deadline, mut expired, mut within_deadline) = (0u64, 0u64, 0u64);
    // What each worker serves: (component, class, dispatched at), to report its service time.
    let mut serving: Vec<Option<(String, u8, u64)>> = vec![None; workers.len()];

    while let Some(Reverse((now_ns, _, event))) = events.pop() {
        if now_ns > stop_ns {
            break;
        }
        let now = t0 + Duration::from_nanos(now_ns);
        match event {
            Event::Arrival { tenant } => {
                let load = &s.tenants[tenant];
                let rng = &mut rngs[tenant];
                let kind = pick(rng, &load.mix);
                let actors = if load.actors == 0 {
                    Vec::new()
                } else {
                    vec![format!("user-{}", rng.next_u64() % u64::from(load.actors))]
                };
                let r = SimRequest {
                    tenant: load.name.clone(),
                    actors,
                    component: s.component_aware.then(|| kind.clone()),
                    kind,
                };
                next_key += 1;
                arrived += 1;
                let key = QueryKey {
                    frontend: 0,
                    query: next_key,
                };
                let options = EnqueueOptions {
                    deadline: s.deadline.map(|d| now + d),
                    priority: Some(load.priority),
                    cost: if s.cost_aware {
                        u32::try_from(service(&r.kind) / 1_000_000).unwrap_or(u32::MAX)
                    } else {
                        1
                    },
                    allowance: None,
                };
                if let Err(e) = queue.enqueue(now, key, r, options) {
                    rejected += 1;
                    if matches!(e.reason, crate::queue::RejectReason::WouldMissDeadline { .. }) {
                        refused_for_deadline += 1;
                    }
                }
                let next = now_ns + rng.exp_ns(load.rate);
                if next <= end_ns {
                    push(&mut events, next, Event::Arrival { tenant });
                }
            }
            Event::WorkerFree { worker } => {
                if let Some((kind, priority, since)) = serving[worker].take() {
                    let component = s.component_aware.then_some(kind.as_str());
                    queue.record_service(component, priority, Duration::from_nanos(now_ns - since));
                }
                idle.push_back(worker);
            }
        }
        // Hand work to idle workers, longest idle first; one that finds nothing it may
        // take (sharding) stays idle.
        let mut still_idle = VecDeque::new();
        while let Some(w) = idle.pop_front() {
            if queue.is_empty() {
                still_idle.push_back(w);
                continue;
            }
            match queue.dequeue(now, workers[w]) {
                Dequeue::Dispatch(d) => {
                    let wait = d.queue_time.as_nanos() as u64;
                    waits_by_tenant.entry(d.request.tenant.clone()).or_default().push(wait);
                    waits_by_component.entry(d.request.kind.clone()).or_default().push(wait);
                    let done = now_ns + service(&d.request.kind);
                    busy_ns += done.min(end_ns).saturating_sub(now_ns);
                    if s.deadline
                        .is_none_or(|dl| d.queue_time + Duration::from_nanos(done - now_ns) <= dl)
                    {
                        within_deadline += 1;
                    }
                    serving[w] = Some((d.request.kind.clone(), d.priority, now_ns));
                    push(&mut events, done, Event::WorkerFree { worker: w });
                }
                _ => still_idle.push_back(w),
            }
        }
        idle = still_idle;
        while queue.poll_expired().is_some() {
            expired += 1;
        }
    }
    let dispatched = waits_by_tenant.values().map(|v| v.len() as u64).sum();
    SimReport {
        label: s.label.clone(),
        by_tenant: waits_by_tenant.into_iter().map(|(n, w)| stats(n, w)).collect(),
        by_component: waits_by_component.into_iter().map(|(n, w)| stats(n, w)).collect(),
        arrived,
        dispatched,
        rejected,
        left_queued: queue.len() as u64,
        utilisation: busy_ns as f64 / (workers.len() as f64 * end_ns as f64),
        refused_for_deadline,
        expired,
        within_deadline,
    }
}

fn pick(rng: &mut Rng, mix: &[(String, f64)]) -> String {
    let total: f64 = mix.iter().map(|(_, w)| w).sum();
    let mut x = rng.unit() * total;
    for (c, w) in mix {
        if x < *w {
            return c.clone();
        }
        x -= w;
    }
    mix.last().map(|(c, _)| c.clone()).unwrap_or_default()
}

fn stats(name: String, mut waits: Vec<u64>) -> WaitStats {
    waits.sort_unstable();
    let n = waits.len();
    let at = |q: f64| Duration::from_nanos(waits[((n as f64 * q) as usize).min(n - 1)]);
    WaitStats {
        name,
        served: n as u64,
        mean: Duration::from_nanos(waits.iter().sum::<u64>() / n as u64),
        p50: at(0.50),
        p99: at(0.99),
        max: Duration::from_nanos(waits[n - 1]),
    }
}

/// The slow-component scenario: 10 tenants send a mix of `ingester` and `store-gateway`
/// requests to 8 queriers × 8 workers with shuffle sharding (3 of 8 per tenant). The
/// arrival rate is sized so that, when both backends answer in 5 ms, the workers are
/// `utilisation` busy; then the store-gateway becomes `slowdown` times slower (a degraded
/// backend) while arrivals go on. `slow_share` of requests hit the store-gateway.
pub fn slow_component(
    slow_share: f64,
    utilisation: f64,
    slowdown: u32,
    component_aware: bool,
    duration: Duration,
    seed: u64,
) -> Scenario {
    let fast = Duration::from_millis(5);
    let total_rate = utilisation * 64.0 / fast.as_secs_f64();
    let tenants = 10;
    Scenario {
        label: format!(
            "{:.0}% store-gateway, {slowdown}× slower, {}",
            slow_share * 100.0,
            if component_aware {
                "component-aware"
            } else {
                "plain round robin"
            }
        ),
        queriers: 8,
        workers_per_querier: 8,
        service: vec![("ingester".into(), fast), ("store-gateway".into(), fast * slowdown)],
        default_service: fast,
        tenants: (0..tenants)
            .map(|t| TenantLoad {
                name: format!("tenant-{t}"),
                rate: total_rate / f64::from(tenants),
                actors: 4,
                mix: vec![
                    ("ingester".into(), 1.0 - slow_share),
                    ("store-gateway".into(), slow_share),
                ],
                priority: 0,
            })
            .collect(),
        duration,
        component_aware,
        max_queriers_per_tenant: 3,
        cost_aware: false,
        reserved_workers_percent: 0,
        lend_max_cost: 0,
        deadline: None,
        deadline_admission: false,
        seed,
    }
}

/// The noisy-neighbour scenario: nine quiet tenants and, if `noisy`, one tenant sending
/// `factor` times their rate, on 4 queriers × 4 workers serving 20 ms requests. The quiet
/// tenants together use `quiet_utilisation` of the workers; the noisy one alone would
/// overload them.
pub fn noisy_neighbour(noisy: bool, factor: f64, quiet_utilisation: f64, seed: u64) -> Scenario {
    let service = Duration::from_millis(20);
    let workers = 16.0;
    let quiet_rate = quiet_utilisation * workers / service.as_secs_f64() / 9.0;
    let mut tenants: Vec<TenantLoad> = (0..9)
        .map(|t| TenantLoad {
            name: format!("quiet-{t}"),
            rate: quiet_rate,
            actors: 2,
            mix: vec![("query".into(), 1.0)],
            priority: 0,
        })
        .collect();
    if noisy {
        tenants.push(TenantLoad {
            name: "noisy".into(),
            rate: quiet_rate * factor,
            actors: 2,
            mix: vec![("query".into(), 1.0)],
            priority: 0,
        });
    }
    Scenario {
        label: format!(
            "{} noisy tenant",
            if noisy {
                format!("with a {factor:.0}×")
            } else {
                "without the".into()
            }
        ),
        queriers: 4,
        workers_per_querier: 4,
        service: vec![],
        default_service: service,
        tenants,
        duration: Duration::from_secs(60),
        component_aware: true,
        max_queriers_per_tenant: 0,
        cost_aware: false,
        reserved_workers_percent: 0,
        lend_max_cost: 0,
        deadline: None,
        deadline_admission: false,
        seed,
    }
}

/// How the long-and-short scenario is scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongShortPolicy {
    /// Round robin by request count (every cost 1).
    RoundRobin,
    /// Deficit round robin on cost hints (the service time in ms).
    CostAware,
    /// Cost-aware, and the short tenant at priority 1 with one worker in four reserved
    /// for priority 1.
    CostAwareReserved,
}

/// Two tenants on 2 queriers × 4 workers: `long` sends 60 s queries at 0.2/s (more than
/// the 8 workers can serve, so it stays backlogged) and `short` sends 10 ms queries at
/// 10/s, for 10 minutes of arrivals.
pub fn long_and_short(policy: LongShortPolicy, seed: u64) -> Scenario {
    let tenant = |name: &str, rate: f64, priority: u8| TenantLoad {
        name: name.into(),
        rate,
        actors: 0,
        mix: vec![(name.into(), 1.0)],
        priority,
    };
    let reserved = policy == LongShortPolicy::CostAwareReserved;
    Scenario {
        label: format!("long and short, {policy:?}"),
        queriers: 2,
        workers_per_querier: 4,
        service: vec![
            ("long".into(), Duration::from_secs(60)),
            ("short".into(), Duration::from_millis(10)),
        ],
        default_service: Duration::from_millis(10),
        tenants: vec![tenant("long", 0.2, 0), tenant("short", 10.0, u8::from(reserved))],
        duration: Duration::from_secs(600),
        // One component, so that only the tenant level decides.
        component_aware: false,
        max_queriers_per_tenant: 0,
        cost_aware: policy != LongShortPolicy::RoundRobin,
        reserved_workers_percent: if reserved { 25 } else { 0 },
        lend_max_cost: 0,
        deadline: None,
        deadline_admission: false,
        seed,
    }
}

/// Reserved capacity under a low-priority flood: 2 queriers × 8 workers, a quarter of
/// them reserved for priority 1. Ten `bulk` tenants at priority 0 offer 1.5 × what all
/// 16 workers can serve, in 10 ms requests (cost hint 10), or with `long_share` of them
/// 200 ms (cost 200); an `urgent` tenant at priority 1 sends 10 ms requests at
/// `urgent_rate` per second. Reserved workers are lent requests costing at most 10 when
/// `lend` is set. One minute of arrivals.
pub fn reserved_capacity(lend: bool, long_share: f64, urgent_rate: f64, seed: u64) -> Scenario {
    let mut mix = vec![("short".to_string(), 1.0 - long_share)];
    if long_share > 0.0 {
        mix.push(("long".into(), long_share));
    }
    // Mean service per bulk request, and the rate that is 1.5 × the 16 workers' capacity.
    let mean_ms = 10.0 * (1.0 - long_share) + 200.0 * long_share;
    let bulk_rate = 1.5 * 16.0 * 1000.0 / mean_ms / 10.0;
    let mut tenants: Vec<TenantLoad> = (0..10)
        .map(|i| TenantLoad {
            name: format!("bulk-{i}"),
            rate: bulk_rate,
            actors: 0,
            mix: mix.clone(),
            priority: 0,
        })
        .collect();
    tenants.push(TenantLoad {
        name: "urgent".into(),
        rate: urgent_rate,
        actors: 0,
        mix: vec![("short".into(), 1.0)],
        priority: 1,
    });
    Scenario {
        label: format!(
            "reserved capacity, {}lent, {:.0}% long bulk requests",
            if lend { "" } else { "not " },
            long_share * 100.0
        ),
        queriers: 2,
        workers_per_querier: 8,
        service: vec![
            ("short".into(), Duration::from_millis(10)),
            ("long".into(), Duration::from_millis(200)),
        ],
        default_service: Duration::from_millis(10),
        tenants,
        duration: Duration::from_secs(60),
        component_aware: false,
        max_queriers_per_tenant: 0,
        cost_aware: true,
        reserved_workers_percent: 25,
        lend_max_cost: if lend { 10 } else { 0 },
        deadline: None,
        deadline_admission: false,
        seed,
    }
}

/// Twice as much work as the workers can do, every request with a deadline: 2 queriers ×
/// 8 workers, one component of 10 ms requests, ten tenants offering together 2 × the
/// 1 600/s the workers serve, each request due 500 ms after it arrives; 30 s of arrivals.
/// With `admission` the queue refuses at enqueue what it expects to miss its deadline.
pub fn deadline_overload(admission: bool, seed: u64) -> Scenario {
    let tenants = (0..10)
        .map(|i| TenantLoad {
            name: format!("t{i}"),
            rate: 320.0,
            actors: 0,
            mix: vec![("q".into(), 1.0)],
            priority: 0,
        })
        .collect();
    Scenario {
        label: format!(
            "2x overload with deadlines, admission {}",
            if admission { "on" } else { "off" }
        ),
        queriers: 2,
        workers_per_querier: 8,
        service: vec![("q".into(), Duration::from_millis(10))],
        default_service: Duration::from_millis(10),
        tenants,
        duration: Duration::from_secs(30),
        component_aware: false,
        max_queriers_per_tenant: 0,
        cost_aware: false,
        reserved_workers_percent: 0,
        lend_max_cost: 0,
        deadline: Some(Duration::from_millis(500)),
        deadline_admission: admission,
        seed,
    }
}
