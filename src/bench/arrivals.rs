//! The open loop's arrivals: each tenant a Poisson process of its share of the rate, all of
//! them released by one thread that sleeps on the operating system's timer. The runtime's
//! timer ticks once a millisecond: arrivals paced by it left in bursts of a millisecond's
//! worth (48 at once at 48 000/s), and the last of each burst waited behind the others, a
//! queue the system did not cause.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sluice_client::Frontend;
use tokio::task::{JoinHandle, JoinSet};

use super::{BenchConfig, Outcomes, Requests, one_query, weight};
use crate::sim::Rng;

/// The generator wakes at most once per grain and releases every arrival then due: the
/// most an arrival waits for it, beside the timer's own slack, at a bounded cost in wake-ups
/// (10 000 a second at most).
const GRAIN: Duration = Duration::from_micros(100);

/// Starts releasing arrivals at `rate` per second in all, until `until`; the task ends when
/// the last query released has ended.
pub(super) fn spawn(
    c: &BenchConfig,
    rate: f64,
    frontends: &[Frontend],
    outcomes: &Arc<Outcomes>,
    requests: &Requests,
    until: Instant,
) -> JoinHandle<()> {
    let runtime = tokio::runtime::Handle::current();
    let total_weight: f64 = (0..c.tenants).map(|i| weight(c, i)).sum();
    let (c, frontends, outcomes, requests) = (c.clone(), frontends.to_vec(), outcomes.clone(), requests.clone());
    let generator = tokio::task::spawn_blocking(move || {
        let cpu_start = crate::metrics::thread_cpu_seconds();
        let start = Instant::now();
        // Per tenant: its random stream, its rate and the number of its next query.
        let mut tenants: Vec<(Rng, f64, u64)> = (0..c.tenants)
            .map(|t| {
                (
                    Rng::new(c.seed ^ (t as u64 + 1)),
                    rate * weight(&c, t) / total_weight,
                    0,
                )
            })
            .collect();
        let mut next = BinaryHeap::new();
        for (t, (rng, tenant_rate, _)) in tenants.iter_mut().enumerate() {
            next.push(Reverse((start + Duration::from_nanos(rng.exp_ns(*tenant_rate)), t)));
        }
        // Finished queries are reaped as the run goes: a task kept until the end holds
        // its memory, and the heap growing by a page at a time stalled this process for
        // tens of milliseconds per fresh huge page.
        let mut inflight = JoinSet::new();
        let mut lateness = Vec::new();
        let mut woke = start;
        while let Some(&Reverse((at, _))) = next.peek() {
            if at >= until {
                break;
            }
            let wake = at.max(woke + GRAIN);
            let now = Instant::now();
            if wake > now {
                std::thread::sleep(wake - now);
            }
            woke = Instant::now();
            while let Some(&Reverse((at, t))) = next.peek() {
                if at > woke || at >= until {
                    break;
                }
                next.pop();
                lateness.push(u64::try_from(woke.duration_since(at).as_micros()).unwrap_or(u64::MAX));
                outcomes.submitted.fetch_add(1, Ordering::Relaxed);
                let (rng, tenant_rate, n) = &mut tenants[t];
                let (fe, outcomes, req) = (
                    frontends[t % frontends.len()].clone(),
                    outcomes.clone(),
                    requests.make(t, *n),
                );
                inflight.spawn_on(
                    async move { outcomes.record(one_query(&fe, req, Instant::now()).await) },
                    &runtime,
                );
                *n += 1;
                next.push(Reverse((at + Duration::from_nanos(rng.exp_ns(*tenant_rate)), t)));
            }
            while inflight.try_join_next().is_some() {}
        }
        outcomes.lateness.lock().unwrap().extend(lateness);
        *outcomes.generator_cpu.lock().unwrap() =
            cpu_start.zip(crate::metrics::thread_cpu_seconds()).map(|(a, b)| b - a);
        inflight
    });
    tokio::spawn(async move {
        let mut inflight = generator.await.expect("the arrival generator panicked");
        while inflight.join_next().await.is_some() {}
    })
}
