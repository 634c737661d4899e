//! `sluice bench`: a load generator for the whole system. It starts schedulers in this
//! process (development TLS in a temporary directory), or targets schedulers already
//! running (a static list or their gossip, with certificates from a directory), and drives
//! them with frontends and queriers built on the real client crate, over real QUIC, for a
//! bounded time.
//!
//! Two modes:
//! - closed loop (default): `concurrency` submitters per frontend, each sending its next
//!   query when the last one returns; measures sustained throughput;
//! - open loop (`rate`): Poisson arrivals at a fixed total rate; measures latency at that
//!   load.
//!
//! Tenant demand is equal, except one optional noisy tenant with `noisy_factor` times the
//! share of the others.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_client::gossip::GossipConfig;
use sluice_client::{
    Frontend, FrontendConfig, Handler, HandlerError, Querier, QuerierConfig, QueryError, QueryRequest, Request,
    Response, SchedulerSource,
};

use crate::config::Settings;
use crate::queue::FastMap;
use crate::server::Server;
use crate::tls::CertSet;

mod arrivals;
mod report;
mod scrape;
use report::{Cpu, Measured, plot_waits, report};
use scrape::Datagrams;

/// Schedulers that are already running, to drive instead of starting our own.
#[derive(Debug, Clone)]
pub struct Target {
    /// Their QUIC addresses, or empty with `gossip`.
    pub schedulers: Vec<SocketAddr>,
    /// Follow their gossip instead of a static list.
    pub gossip: Option<GossipConfig>,
    /// Directory with the CA and the frontend and querier certificates (as `sluice certs
    /// init` or a development `sluice serve` writes them).
    pub certs: std::path::PathBuf,
    /// Admin addresses of the driven schedulers: their CPU time and QUIC datagrams are read from
    /// `/metrics` before and after the load, and reported per query.
    pub admin: Vec<SocketAddr>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Schedulers to start in this process (ignored with `target`).
    pub schedulers: usize,
    /// Drive these running schedulers instead.
    pub target: Option<Target>,
    pub frontends: usize,
    pub tenants: usize,
    /// Demand of tenant-0 relative to every other tenant (1 = no noisy tenant).
    pub noisy_factor: f64,
    /// Actors (users) per tenant.
    pub users: usize,
    pub queriers: usize,
    pub workers: usize,
    /// Each worker holds one prefetched query (`QuerierConfig::prefetch`).
    pub prefetch: bool,
    /// How long a prefetched query may be held (`QuerierConfig::hold_limit`).
    pub hold_limit: Option<Duration>,
    /// Time the querier handler spends per query.
    pub service: Duration,
    /// Share of queries (0–1) for the slow component (`store-gateway`); the rest go to
    /// `ingester`. 0: no components.
    pub slow_share: f64,
    /// Time the handler spends on a slow-component query.
    pub slow_service: Duration,
    pub duration: Duration,
    /// Load before the measured `duration`, recorded nowhere: every connection has been
    /// opened and its windows have grown, so the figures are the steady state's.
    pub warm_up: Duration,
    /// Open loop: total arrivals per second. `None`: closed loop.
    pub rate: Option<f64>,
    /// Closed loop: submitters per frontend.
    pub concurrency: usize,
    pub payload_bytes: usize,
    /// Bytes of each result body (a real workload's are ~500 B).
    pub result_bytes: usize,
    pub seed: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            schedulers: 1,
            target: None,
            frontends: 2,
            tenants: 100,
            noisy_factor: 1.0,
            users: 4,
            queriers: 16,
            workers: 4,
            prefetch: false,
            hold_limit: Some(Duration::from_millis(10)),
            service: Duration::ZERO,
            slow_share: 0.0,
            slow_service: Duration::ZERO,
            duration: Duration::from_secs(10),
            warm_up: Duration::from_secs(1),
            rate: None,
            concurrency: 128,
            payload_bytes: 1024,
            result_bytes: 2,
            seed: 7,
        }
    }
}

/// Per tenant, `(milliseconds since the start, queue wait in microseconds)` of every query,
/// as the queriers saw it.
pub(crate) type QueueTimes = Arc<Mutex<Waits>>;

/// The queue times the handlers saw, as (ms since the clock's start, µs waited), per tenant
/// and per component. One lock per query, and a name seen before costs a hash lookup, not
/// an allocation: the load generator's own cost counts in the bench process's CPU per query.
#[derive(Default)]
pub(crate) struct Waits {
    pub(crate) by_tenant: FastMap<String, Vec<(u64, u64)>>,
    pub(crate) by_component: FastMap<String, Vec<(u64, u64)>>,
}

impl Waits {
    fn record(&mut self, tenant: &str, component: &str, point: (u64, u64)) {
        for (map, key) in [(&mut self.by_tenant, tenant), (&mut self.by_component, component)] {
            match map.get_mut(key) {
                Some(points) => points.push(point),
                None => {
                    map.insert(key.to_string(), vec![point]);
                }
            }
        }
    }

    fn clear(&mut self) {
        self.by_tenant.clear();
        self.by_component.clear();
    }
}

/// A querier handler that records each query's queue time per tenant, then waits
/// `service` and answers with `result`.
pub(crate) struct BenchHandler {
    /// The result body every query gets.
    pub(crate) result: bytes::Bytes,
    pub(crate) service: Duration,
    /// Service time of `store-gateway` queries.
    pub(crate) slow_service: Duration,
    /// Per tenant and per component (`unknown` for none).
    pub(crate) waits: QueueTimes,
    pub(crate) started: Instant,
}

impl Handler for BenchHandler {
    async fn handle(&self, request: Request) -> Result<Response, HandlerError> {
        let micros = u64::try_from(request.queue_time.as_micros()).unwrap_or(u64::MAX);
        let at = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.waits.lock().unwrap().record(
            &request.tenant,
            request.component.as_deref().unwrap_or("unknown"),
            (at, micros),
        );
        let service = match request.component.as_deref() {
            Some("store-gateway") => self.slow_service,
            _ => self.service,
        };
        if !service.is_zero() {
            tokio::time::sleep(service).await;
        }
        Ok(Response::ok(self.result.clone()))
    }
}

#[derive(Default)]
struct Outcomes {
    submitted: AtomicU64,
    results: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    error_kinds: Mutex<BTreeMap<String, u64>>,
    /// The results' figures, under one lock (one lock taken per result).
    timings: Mutex<Timings>,
    /// Open loop: microseconds each submit came after its scheduled arrival (the load
    /// generator's own lateness; a late arrival is a burst the system did not cause).
    lateness: Mutex<Vec<u64>>,
    /// Open loop: CPU seconds the generator's own thread used (sleeping, waking, handing
    /// arrivals to the runtime).
    generator_cpu: Mutex<Option<f64>>,
}

#[derive(Default)]
struct Timings {
    /// Microseconds from submit to result, and from submit to acceptance.
    latencies: Vec<u64>,
    accepted: Vec<u64>,
    /// Result body bytes received.
    result_bytes: u64,
}

impl Outcomes {
    fn record(&self, outcome: Result<Timing, QueryError>) {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        match outcome {
            Ok(t) => {
                self.results.fetch_add(1, Ordering::Relaxed);
                let mut timings = self.timings.lock().unwrap();
                timings.result_bytes += t.bytes as u64;
                timings.latencies.push(micros(t.total));
                timings.accepted.push(micros(t.accepted));
            }
            Err(QueryError::TooManyOutstanding { .. } | QueryError::QueueFull) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                *self.error_kinds.lock().unwrap().entry(e.to_string()).or_default() += 1;
            }
        }
    }
}

/// Tenant `i`'s share of demand.
fn weight(c: &BenchConfig, i: usize) -> f64 {
    if i == 0 { c.noisy_factor } else { 1.0 }
}

/// How one query went.
pub(crate) struct Timing {
    /// From submit until a scheduler accepted it (the enqueue's round trip).
    pub(crate) accepted: Duration,
    /// From submit to the last byte of its result.
    pub(crate) total: Duration,
    /// Result body bytes.
    pub(crate) bytes: usize,
}

/// One query from submit to the last byte of its result; `started` is the caller's clock
/// read when it submits (a read the caller may use for its own needs too).
pub(crate) async fn one_query(
    frontend: &Frontend,
    request: QueryRequest,
    started: Instant,
) -> Result<Timing, QueryError> {
    let handle = frontend.submit(request).await?;
    let accepted = started.elapsed();
    let response = handle.response().await?;
    // As bytes: a lone chunk is taken as received, not copied (the caller's cost counts).
    let body = response.body.collect_bytes().await?;
    Ok(Timing {
        accepted,
        total: started.elapsed(),
        bytes: body.len(),
    })
}

/// The load generator's queries. Tenant and user names are made once: formatting them
/// for every query cost the generator about as much as a frame's decoding.
#[derive(Clone)]
pub(super) struct Requests(Arc<RequestsInner>);

struct RequestsInner {
    tenants: Vec<String>,
    /// The first users' names (the rest, if a run asks for more, are formatted as needed).
    users: Vec<String>,
    user_count: u64,
    slow_share: f64,
    payload: bytes::Bytes,
}

/// Users whose names are made in advance.
const NAMED_USERS: u64 = 1024;

impl Requests {
    pub(super) fn new(c: &BenchConfig, payload: &bytes::Bytes) -> Self {
        let user_count = (c.users as u64).max(1);
        Requests(Arc::new(RequestsInner {
            tenants: (0..c.tenants).map(|t| format!("tenant-{t}")).collect(),
            users: (0..user_count.min(NAMED_USERS)).map(|u| format!("user-{u}")).collect(),
            user_count,
            slow_share: c.slow_share,
            payload: payload.clone(),
        }))
    }

    /// Query `n` of `tenant`.
    pub(super) fn make(&self, tenant: usize, n: u64) -> QueryRequest {
        let r = &*self.0;
        let user = n % r.user_count;
        let user = match r.users.get(user as usize) {
            Some(name) => name.clone(),
            None => format!("user-{user}"),
        };
        let mut q = QueryRequest::new(r.tenants[tenant].clone(), r.payload.clone()).with_actors([user]);
        if r.slow_share > 0.0 {
            // Spread deterministically: query n of a tenant is slow when its fractional
            // position falls under the share.
            let slow =
                (crate::queue::mix64(n ^ ((tenant as u64) << 40)) >> 11) as f64 / (1u64 << 53) as f64 <= r.slow_share;
            q.component = Some(if slow { "store-gateway" } else { "ingester" }.into());
        }
        q
    }
}

/// Starts the load generator's tasks, submitting until `until` and recording in `outcomes`:
/// closed loop (submitters per frontend, spread over tenants by weight) or open loop
/// (Poisson arrivals per tenant, `arrivals`).
fn spawn_load(
    c: &BenchConfig,
    frontends: &[Frontend],
    outcomes: &Arc<Outcomes>,
    payload: &bytes::Bytes,
    until: Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    let total_weight: f64 = (0..c.tenants).map(|i| weight(c, i)).sum();
    let requests = Requests::new(c, payload);
    let mut tasks = Vec::new();
    match c.rate {
        None => {
            // Submitters per frontend, spread over tenants by weight (at least one each).
            for fe in frontends {
                let mut tenant_of = Vec::new();
                for t in 0..c.tenants {
                    let n = ((c.concurrency as f64 * weight(c, t) / total_weight).round() as usize).max(1);
                    tenant_of.extend(std::iter::repeat_n(t, n));
                }
                for (k, t) in tenant_of.into_iter().enumerate() {
                    let (fe, outcomes, requests) = (fe.clone(), outcomes.clone(), requests.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut n = k as u64;
                        // One clock read says both whether to go on and when the query started.
                        loop {
                            let started = Instant::now();
                            if started >= until {
                                break;
                            }
                            outcomes.submitted.fetch_add(1, Ordering::Relaxed);
                            outcomes.record(one_query(&fe, requests.make(t, n), started).await);
                            n += 1;
                        }
                    }));
                }
            }
        }
        Some(rate) => tasks.push(arrivals::spawn(c, rate, frontends, outcomes, &requests, until)),
    }
    tasks
}

/// Runs the benchmark and returns its report as JSON; `progress` is told the seconds
/// elapsed and the results so far, about once a second. With `plot`, also writes an SVG of
/// queue wait over time.
pub async fn run(c: BenchConfig, plot: Option<&std::path::Path>, progress: impl Fn(f64, u64)) -> Result<Value, String> {
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}-{}", std::process::id(), c.seed));
    let _ = std::fs::remove_dir_all(&dir);
    let mut servers = Vec::new();
    let own = if c.target.is_some() { 0 } else { c.schedulers };
    for i in 0..own {
        let settings = Settings {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            admin_listen: Some("127.0.0.1:0".parse().unwrap()),
            data_dir: Some(dir.clone()),
            scheduler_id: Some(format!("bench-scheduler-{i}")),
            max_outstanding_per_tenant: Some(1_000_000),
            ..Settings::default()
        };
        let config = settings.resolve().map_err(|e| e.to_string())?;
        servers.push(Server::start(config).await.map_err(|e| e.to_string())?);
    }
    let (certs, schedulers) = match &c.target {
        None => (
            servers[0].dev_certs().cloned().ok_or("no development certificates")?,
            SchedulerSource::Static(servers.iter().map(Server::quic_addr).collect()),
        ),
        Some(t) => (
            CertSet::in_dir(&t.certs),
            match &t.gossip {
                Some(g) => SchedulerSource::Gossip(g.clone()),
                None => SchedulerSource::Static(t.schedulers.clone()),
            },
        ),
    };

    let waits: QueueTimes = Arc::default();
    let clock = Instant::now();
    let mut queriers = Vec::new();
    for q in 0..c.queriers {
        let mut config = QuerierConfig::new(format!("bench-querier-{q}"), certs.querier.clone(), Vec::new());
        config.client.schedulers = schedulers.clone();
        config.concurrency = c.workers;
        config.prefetch = c.prefetch;
        config.hold_limit = c.hold_limit;
        let handler = BenchHandler {
            result: bytes::Bytes::from(vec![b'r'; c.result_bytes]),
            service: c.service,
            slow_service: c.slow_service,
            waits: waits.clone(),
            started: clock,
        };
        queriers.push(Querier::start(config, handler).map_err(|e| e.to_string())?);
    }
    let mut frontends = Vec::new();
    for f in 0..c.frontends {
        let mut config = FrontendConfig::new(format!("bench-frontend-{f}"), certs.frontend.clone(), Vec::new());
        config.client.schedulers = schedulers.clone();
        frontends.push(Frontend::connect(config).await.map_err(|e| e.to_string())?);
    }
    if c.target.is_some() {
        // Running schedulers: one query through each frontend shows that the path works.
        for fe in &frontends {
            one_query(fe, QueryRequest::new("bench-warm-up", "warm-up"), Instant::now())
                .await
                .map_err(|e| format!("warm-up query failed: {e}"))?;
        }
    }
    // Let every querier worker of our own schedulers connect before the clock starts.
    // (The schedulers see two workers per worker loop with prefetch.)
    let want = c.queriers * c.workers * if c.prefetch { 2 } else { 1 } * servers.len();
    let ready_by = Instant::now() + Duration::from_secs(10);
    loop {
        let mut connected = 0;
        for s in &servers {
            connected += s.status().await.map_err(|e| e.to_string())?.workers.len();
        }
        if connected >= want || Instant::now() > ready_by {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let payload = bytes::Bytes::from(vec![b'q'; c.payload_bytes]);
    if !c.warm_up.is_zero() {
        let until = Instant::now() + c.warm_up;
        let tasks = spawn_load(&c, &frontends, &Arc::new(Outcomes::default()), &payload, until);
        for task in tasks {
            let _ = task.await;
        }
    }
    let outcomes = Arc::new(Outcomes::default());
    // What our own schedulers dispatched before the measured seconds (the warm-up).
    let mut dispatched_before = 0;
    for s in &servers {
        dispatched_before += s.status().await.map_err(|e| e.to_string())?.counters.dispatched;
    }
    let placed_again = |frontends: &[Frontend]| {
        frontends
            .iter()
            .map(|fe| fe.stats())
            .fold((0, 0), |(r, d), s| (r + s.requeued, d + s.redelivered))
    };
    let placed_before = placed_again(&frontends);
    let admin = c.target.as_ref().map_or(&[][..], |t| &t.admin[..]);
    let cpu_before = (crate::metrics::process_cpu_seconds(), scrape::schedulers(admin).await?);
    let datagrams_before = Datagrams::of_clients(&frontends, &queriers);
    let tasks_before = crate::metrics::RuntimeCounts::now().unwrap_or_default();
    waits.lock().unwrap().clear(); // warm-up queries
    let started = Instant::now();
    let offset_ms = u64::try_from(started.duration_since(clock).as_millis()).unwrap_or(0);
    let tasks = spawn_load(&c, &frontends, &outcomes, &payload, started + c.duration);
    let mut last_report = Instant::now();
    for task in tasks {
        // Every task ends within the duration plus the time its last queries take.
        while !task.is_finished() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if last_report.elapsed() >= Duration::from_millis(500) {
                last_report = Instant::now();
                progress(
                    started.elapsed().as_secs_f64(),
                    outcomes.results.load(Ordering::Relaxed),
                );
            }
        }
        let _ = task.await;
    }
    let elapsed = started.elapsed();
    let placed_after = placed_again(&frontends);
    let cpu_after = (crate::metrics::process_cpu_seconds(), scrape::schedulers(admin).await?);
    let own_tasks = crate::metrics::RuntimeCounts::now()
        .unwrap_or_default()
        .since(tasks_before);
    let own_datagrams = Datagrams::of_clients(&frontends, &queriers).since(datagrams_before);
    let cpu = Cpu {
        own: cpu_before.0.zip(cpu_after.0).map(|(a, b)| b - a),
        schedulers: cpu_before.1.zip(cpu_after.1).map(|(a, b)| b.since(a)),
        own_datagrams,
        own_tasks,
        in_process: c.target.is_none(),
        generator: *outcomes.generator_cpu.lock().unwrap(),
    };

    for q in queriers {
        q.shutdown().await;
    }
    for fe in &frontends {
        fe.close().await;
    }
    let mut counters = Vec::new();
    let own = !servers.is_empty();
    for s in servers {
        counters.push(s.status().await.map_err(|e| e.to_string())?.counters);
        s.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(path) = plot {
        plot_waits(path, &c, &waits.lock().unwrap().by_tenant, offset_ms)?;
    }
    let measured = Measured {
        elapsed,
        dispatched: own.then(|| counters.iter().map(|k| k.dispatched).sum::<u64>() - dispatched_before),
        requeued: placed_after.0 - placed_before.0,
        redelivered: placed_after.1 - placed_before.1,
        cpu,
        offset_ms,
    };
    Ok(report(&c, &measured, &outcomes, &waits.lock().unwrap()))
}
