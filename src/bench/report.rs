//! What `sluice bench` prints: the JSON report (throughput, latency, queue waits, fairness,
//! CPU per query) and the queue-wait plot.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use super::scrape::{Datagrams, Scraped};
use super::{BenchConfig, Outcomes, Waits};
use crate::metrics::RuntimeCounts;
use crate::queue::FastMap;

/// CPU seconds used during the load.
pub(super) struct Cpu {
    /// By this process: frontends, queriers and the load generator (and the schedulers
    /// when they run in it).
    pub(super) own: Option<f64>,
    /// By the driven schedulers, read from their admin endpoints (with their QUIC
    /// datagrams).
    pub(super) schedulers: Option<Scraped>,
    /// This process's frontends' and queriers' datagrams.
    pub(super) own_datagrams: Datagrams,
    /// This process's runtime: task polls, steals, spawns and thread sleeps.
    pub(super) own_tasks: RuntimeCounts,
    pub(super) in_process: bool,
    /// Open loop: by the load generator's own thread (part of `own`).
    pub(super) generator: Option<f64>,
}

/// `count` per query, of `results` queries.
fn per(count: u64, results: u64) -> f64 {
    count as f64 / results.max(1) as f64
}

impl Cpu {
    fn report(&self, results: u64) -> Value {
        let per_query = |s: Option<f64>| s.map(|s| s * 1e6 / results.max(1) as f64);
        json!({
            "this_process_seconds": self.own,
            "this_process_us_per_query": per_query(self.own),
            "this_process_holds": if self.in_process {
                "schedulers, frontends, queriers and the load generator"
            } else {
                "frontends, queriers and the load generator"
            },
            "generator_thread_seconds": self.generator,
            "generator_thread_us_per_query": per_query(self.generator),
            "schedulers_seconds": self.schedulers.map(|s| s.cpu_seconds),
            "schedulers_us_per_query": per_query(self.schedulers.map(|s| s.cpu_seconds)),
        })
    }

    /// UDP datagrams per query each way, and the system calls that sent them, of this
    /// process's frontends and queriers and of the driven schedulers: every datagram costs
    /// a system call and a wake-up on each side.
    fn datagrams(&self, results: u64) -> Value {
        let n = |v| per(v, results);
        let per_query =
            |d: Datagrams| json!({ "sent": n(d.sent), "received": n(d.received), "send_calls": n(d.send_calls) });
        json!({
            "this_process_clients": per_query(self.own_datagrams),
            "schedulers": self.schedulers.map(|s| per_query(s.datagrams)),
        })
    }

    /// The async runtimes' task polls, steals, spawns and thread sleeps per query, of this
    /// process and of the driven schedulers: the hops between tasks.
    fn tasks(&self, results: u64) -> Value {
        let n = |v| per(v, results);
        let per_query = |t: RuntimeCounts| {
            json!({
                "polls": t.polls.map(n), "steals": t.steals.map(n),
                "spawned": t.spawned.map(n), "parks": n(t.parks),
            })
        };
        json!({
            "this_process": per_query(self.own_tasks),
            "schedulers": self.schedulers.map(|s| per_query(s.tasks)),
        })
    }
}

/// The waits (µs) of the queries served in each `width_ms` from `offset_ms`, sorted, by
/// bucket number.
fn buckets<'a>(points: impl Iterator<Item = &'a (u64, u64)>, offset_ms: u64, width_ms: u64) -> BTreeMap<u64, Vec<u64>> {
    let mut buckets: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for &(at, wait) in points {
        buckets
            .entry(at.saturating_sub(offset_ms) / width_ms)
            .or_default()
            .push(wait);
    }
    buckets.values_mut().for_each(|w| w.sort_unstable());
    buckets
}

/// p99 of the waits (µs) in each one-second bucket, in milliseconds.
fn p99_per_second<'a>(points: impl Iterator<Item = &'a (u64, u64)>, offset_ms: u64) -> Vec<(f64, f64)> {
    buckets(points, offset_ms, 1000)
        .into_iter()
        .map(|(second, waits)| (second as f64 + 0.5, ms(percentile(&waits, 0.99))))
        .collect()
}

/// Width of the report's timeline buckets.
const TIMELINE_MS: u64 = 100;

/// Queries served and their queue waits per [`TIMELINE_MS`] of the run: a stall or a backlog
/// that the run's percentiles hide shows as a bucket with few served and long waits.
fn timeline(queue_times: &FastMap<String, Vec<(u64, u64)>>, offset_ms: u64) -> Vec<Value> {
    buckets(queue_times.values().flatten(), offset_ms, TIMELINE_MS)
        .into_iter()
        .map(|(n, waits)| {
            json!({
                "from_ms": n * TIMELINE_MS,
                "served": waits.len(),
                "queue_wait_us": { "p99": percentile(&waits, 0.99), "max": waits.last() },
            })
        })
        .collect()
}

/// Draws queue wait p99 per second: the noisy tenant (if any) against all the others.
pub(super) fn plot_waits(
    path: &std::path::Path,
    c: &BenchConfig,
    waits: &FastMap<String, Vec<(u64, u64)>>,
    offset_ms: u64,
) -> Result<(), String> {
    use plotters::prelude::*;
    let noisy = c.noisy_factor != 1.0;
    let others = p99_per_second(
        waits
            .iter()
            .filter(|(t, _)| !noisy || t.as_str() != "tenant-0")
            .flat_map(|(_, v)| v.iter()),
        offset_ms,
    );
    let noisy_series = if noisy {
        p99_per_second(waits.get("tenant-0").into_iter().flatten(), offset_ms)
    } else {
        Vec::new()
    };
    let x_max = c.duration.as_secs_f64().max(1.0);
    // Log scale, floored at 10 µs so that idle seconds (0 wait) still show.
    const FLOOR: f64 = 0.01;
    let clip = |series: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
        series
            .into_iter()
            .filter(|p| p.0 <= x_max)
            .map(|(x, y)| (x, y.max(FLOOR)))
            .collect()
    };
    let (others, noisy_series) = (clip(others), clip(noisy_series));
    let y_max = others.iter().chain(&noisy_series).map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!(
        "queue wait p99 per second — {} tenants{}, {} workers",
        c.tenants,
        if noisy {
            format!(", tenant-0 at {}×", c.noisy_factor)
        } else {
            String::new()
        },
        c.queriers * c.workers
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, (FLOOR..y_max).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("queue wait p99 (ms, log scale)")
        .draw()
        .map_err(|e| err(&e))?;
    let label = if noisy { "other tenants" } else { "all tenants" };
    chart
        .draw_series(LineSeries::new(others, &BLUE))
        .map_err(|e| err(&e))?
        .label(label)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if noisy {
        chart
            .draw_series(LineSeries::new(noisy_series, &RED))
            .map_err(|e| err(&e))?
            .label("tenant-0 (noisy)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// The `q` quantile of sorted microsecond values, in microseconds.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// What the bench measured around the load, beside the outcomes.
pub(super) struct Measured {
    pub(super) elapsed: Duration,
    /// What the schedulers dispatched in the measured seconds, when they run in this process.
    pub(super) dispatched: Option<u64>,
    /// Queries the frontends placed again unstarted (handed back by a scheduler or, with
    /// prefetch, by a querier) and ran again after their querier died, in the measured seconds.
    pub(super) requeued: u64,
    pub(super) redelivered: u64,
    pub(super) cpu: Cpu,
    /// When the measured seconds began, on the clock of the queue times.
    pub(super) offset_ms: u64,
}

pub(super) fn report(c: &BenchConfig, m: &Measured, o: &Outcomes, waits: &Waits) -> Value {
    let (submitted, results, rejected, errors) = (
        o.submitted.load(Ordering::Relaxed),
        o.results.load(Ordering::Relaxed),
        o.rejected.load(Ordering::Relaxed),
        o.errors.load(Ordering::Relaxed),
    );
    let (mut latencies, mut accepted, result_bytes) = {
        let t = o.timings.lock().unwrap();
        (t.latencies.clone(), t.accepted.clone(), t.result_bytes)
    };
    latencies.sort_unstable();
    accepted.sort_unstable();
    let mut lateness = o.lateness.lock().unwrap().clone();
    lateness.sort_unstable();
    let queue_times = &waits.by_tenant;
    let mut all_waits: Vec<u64> = queue_times.values().flatten().map(|p| p.1).collect();
    all_waits.sort_unstable();
    let mut tenants = Vec::new();
    let mut quiet_served = Vec::new();
    // By name, as the report lists them.
    let by_name: BTreeMap<&String, &Vec<(u64, u64)>> = queue_times.iter().collect();
    for (tenant, waits) in by_name {
        let mut w: Vec<u64> = waits.iter().map(|p| p.1).collect();
        w.sort_unstable();
        if tenant != "tenant-0" || c.noisy_factor == 1.0 {
            quiet_served.push(w.len() as f64);
        }
        tenants.push(json!({
            "tenant": tenant,
            "served": w.len(),
            "queue_wait_us": { "p50": percentile(&w, 0.5), "p99": percentile(&w, 0.99) },
        }));
    }
    let served_total: u64 = queue_times.values().map(|v| v.len() as u64).sum();
    let noisy_share = queue_times
        .get("tenant-0")
        .map_or(0.0, |v| v.len() as f64 / served_total.max(1) as f64);
    let sum: f64 = quiet_served.iter().sum();
    let sq: f64 = quiet_served.iter().map(|x| x * x).sum();
    let jain = if sq > 0.0 {
        sum * sum / (quiet_served.len() as f64 * sq)
    } else {
        1.0
    };
    let components: Vec<Value> = BTreeMap::from_iter(&waits.by_component)
        .into_iter()
        .map(|(component, points)| {
            let mut w: Vec<u64> = points.iter().map(|p| p.1).collect();
            w.sort_unstable();
            json!({
                "component": component,
                "served": w.len(),
                "queue_wait_us": { "p50": percentile(&w, 0.5), "p99": percentile(&w, 0.99) },
            })
        })
        .collect();
    json!({
        "config": {
            "schedulers": match &c.target {
                None => json!(c.schedulers),
                Some(t) if t.gossip.is_some() => json!("gossip"),
                Some(t) => json!(t.schedulers.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
            },
            "frontends": c.frontends, "tenants": c.tenants,
            "noisy_factor": c.noisy_factor, "users_per_tenant": c.users, "queriers": c.queriers,
            "workers_per_querier": c.workers, "prefetch": c.prefetch, "service_ms": c.service.as_secs_f64() * 1e3,
            "slow_share": c.slow_share, "slow_service_ms": c.slow_service.as_secs_f64() * 1e3,
            "seconds": c.duration.as_secs_f64(), "warm_up_seconds": c.warm_up.as_secs_f64(), "rate": c.rate,
            "concurrency_per_frontend": c.concurrency, "payload_bytes": c.payload_bytes,
            "result_bytes": c.result_bytes,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        },
        "elapsed_seconds": m.elapsed.as_secs_f64(),
        "throughput_per_second": results as f64 / m.elapsed.as_secs_f64(),
        "latency_ms": {
            "p50": ms(percentile(&latencies, 0.5)), "p99": ms(percentile(&latencies, 0.99)),
            "p999": ms(percentile(&latencies, 0.999)),
        },
        // The enqueue's round trip: submit until a scheduler accepted the query.
        "accepted_ms": {
            "p50": ms(percentile(&accepted, 0.5)), "p99": ms(percentile(&accepted, 0.99)),
            "p999": ms(percentile(&accepted, 0.999)),
        },
        // Open loop: how late the load generator submitted against its schedule.
        "generator_lateness_ms": (!lateness.is_empty()).then(|| json!({
            "p50": ms(percentile(&lateness, 0.5)), "p99": ms(percentile(&lateness, 0.99)),
            "max": ms(lateness.last().copied().unwrap_or(0)),
        })),
        "queue_wait_us": {
            "p50": percentile(&all_waits, 0.5), "p99": percentile(&all_waits, 0.99),
            "p999": percentile(&all_waits, 0.999),
        },
        "outcomes": {
            "submitted": submitted, "results": results, "rejected": rejected, "errors": errors,
            "lost": submitted.saturating_sub(results + rejected + errors),
            "result_bytes_received": result_bytes,
            "dispatched_by_schedulers": m.dispatched,
            "placed_again_unstarted": m.requeued, "redelivered": m.redelivered,
            "error_kinds": *o.error_kinds.lock().unwrap(),
        },
        "cpu": m.cpu.report(results),
        "datagrams_per_query": m.cpu.datagrams(results),
        "tasks_per_query": m.cpu.tasks(results),
        "fairness": { "jain_index_equal_tenants": jain, "noisy_tenant_share": noisy_share },
        "components": components,
        "tenants": tenants,
        "timeline_100ms": timeline(queue_times, m.offset_ms),
    })
}
