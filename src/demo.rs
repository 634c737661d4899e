//! `sluice demo`: watch fairness happen. One scheduler, four queriers and a frontend in
//! this process (development TLS in a temporary directory), five quiet tenants and one
//! sending a hundred times their rate, and a table refreshed every second.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_client::{Frontend, FrontendConfig, Querier, QuerierConfig, QueryError, QueryRequest};

use crate::bench::{BenchHandler, QueueTimes, one_query};
use crate::config::Settings;
use crate::server::Server;

const QUIET: usize = 5;
const QUIET_RATE: f64 = 40.0;
const NOISY_FACTOR: f64 = 100.0;
const SERVICE: Duration = Duration::from_millis(20);
const QUERIERS: usize = 4;
const WORKERS: usize = 4;

#[derive(Default, Clone, Copy)]
struct Tally {
    sent: u64,
    served: u64,
    refused: u64,
    failed: u64,
}

/// Runs until `stop` is set (or `limit` passes), printing the table each second through
/// `show`. Returns the final table.
pub async fn run(limit: Option<Duration>, stop: Arc<AtomicBool>, show: impl Fn(&str)) -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let settings = Settings {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: Some(dir.clone()),
        scheduler_id: Some("demo".into()),
        drain_timeout_ms: Some(500),
        ..Settings::default()
    };
    let server = Server::start(settings.resolve().map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    let certs = server.dev_certs().cloned().ok_or("no development certificates")?;
    let addr = server.quic_addr();
    let queue_times: QueueTimes = Arc::default();
    let mut queriers = Vec::new();
    for q in 0..QUERIERS {
        let mut config = QuerierConfig::new(format!("querier-{q}"), certs.querier.clone(), vec![addr]);
        config.concurrency = WORKERS;
        let handler = BenchHandler {
            result: bytes::Bytes::from_static(b"ok"),
            service: SERVICE,
            slow_service: SERVICE,
            waits: queue_times.clone(),
            started: Instant::now(),
        };
        queriers.push(Querier::start(config, handler).map_err(|e| e.to_string())?);
    }
    let frontend = Frontend::connect(FrontendConfig::new("demo-frontend", certs.frontend.clone(), vec![addr]))
        .await
        .map_err(|e| e.to_string())?;

    let tallies: Arc<Mutex<BTreeMap<String, Tally>>> = Arc::default();
    let started = Instant::now();
    let mut drivers = Vec::new();
    let tenants: Vec<(String, f64)> = std::iter::once(("noisy".to_string(), QUIET_RATE * NOISY_FACTOR))
        .chain((0..QUIET).map(|i| (format!("quiet-{i}"), QUIET_RATE)))
        .collect();
    for (i, (tenant, rate)) in tenants.iter().cloned().enumerate() {
        let (fe, tallies, stop) = (frontend.clone(), tallies.clone(), stop.clone());
        drivers.push(tokio::spawn(async move {
            let mut rng = crate::sim::Rng::new(i as u64 + 1);
            let mut next = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && limit.is_none_or(|l| started.elapsed() < l) {
                next += Duration::from_nanos(rng.exp_ns(rate));
                tokio::time::sleep_until(next.into()).await;
                tallies.lock().unwrap().entry(tenant.clone()).or_default().sent += 1;
                let mut request = QueryRequest::new(tenant.clone(), "demo");
                request.actors = vec![format!("user-{}", n % 3)];
                n += 1;
                let (fe, tallies, tenant) = (fe.clone(), tallies.clone(), tenant.clone());
                tokio::spawn(async move {
                    let outcome = one_query(&fe, request, Instant::now()).await;
                    let mut t = tallies.lock().unwrap();
                    let t = t.entry(tenant).or_default();
                    match outcome {
                        Ok(_) => t.served += 1,
                        Err(QueryError::TooManyOutstanding { .. } | QueryError::QueueFull) => t.refused += 1,
                        Err(_) => t.failed += 1,
                    }
                });
            }
        }));
    }

    let mut previous: BTreeMap<String, Tally> = BTreeMap::new();
    let mut table = String::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while !stop.load(Ordering::Relaxed) && limit.is_none_or(|l| started.elapsed() < l) {
        tick.tick().await;
        let now: BTreeMap<String, Tally> = tallies.lock().unwrap().clone();
        let waits: BTreeMap<String, Vec<u64>> = std::mem::take(&mut queue_times.lock().unwrap().by_tenant)
            .into_iter()
            .map(|(tenant, points)| (tenant, points.into_iter().map(|p| p.1).collect()))
            .collect();
        let status = server.status().await.map_err(|e| e.to_string())?;
        table = render(started.elapsed(), &tenants, &now, &previous, &waits, &status);
        show(&table);
        previous = now;
    }
    stop.store(true, Ordering::Relaxed);
    for d in drivers {
        let _ = d.await;
    }
    for q in queriers {
        q.shutdown().await;
    }
    frontend.close().await;
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(table)
}

fn render(
    elapsed: Duration,
    tenants: &[(String, f64)],
    now: &BTreeMap<String, Tally>,
    before: &BTreeMap<String, Tally>,
    waits: &BTreeMap<String, Vec<u64>>,
    status: &crate::server::Status,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "sluice demo — {:.0} s — {} queriers × {} workers, {} ms per query (capacity ≈ {:.0}/s); Ctrl-C to stop\n",
        elapsed.as_secs_f64(),
        QUERIERS,
        WORKERS,
        SERVICE.as_millis(),
        (QUERIERS * WORKERS) as f64 / SERVICE.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<9} {:>9} {:>9} {:>10} {:>8} {:>10} {:>14}",
        "tenant", "sent/s", "served/s", "refused/s", "queued", "failed", "wait p99 (ms)"
    );
    for (tenant, _) in tenants {
        let (n, b) = (
            now.get(tenant).copied().unwrap_or_default(),
            before.get(tenant).copied().unwrap_or_default(),
        );
        let queued = status
            .tenants
            .iter()
            .find(|t| &t.tenant == tenant)
            .map_or(0, |t| t.queued);
        let p99 = waits.get(tenant).map_or(0.0, |w| {
            let mut w = w.clone();
            w.sort_unstable();
            w[((w.len() as f64 * 0.99) as usize).min(w.len() - 1)] as f64 / 1000.0
        });
        let _ = writeln!(
            out,
            "{:<9} {:>9} {:>9} {:>10} {:>8} {:>10} {:>14.1}",
            tenant,
            n.sent - b.sent,
            n.served - b.served,
            n.refused - b.refused,
            queued,
            n.failed,
            p99
        );
    }
    let _ = writeln!(
        out,
        "\nThe noisy tenant asks for {NOISY_FACTOR:.0}× a quiet tenant's rate, far beyond capacity: it gets every\n\
         worker the others leave free, its excess is refused at its queue limit (100), and each quiet\n\
         tenant is still served all it asks for, waiting about one service time."
    );
    out
}
