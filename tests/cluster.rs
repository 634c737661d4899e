//! Tenant limits that hold for the cluster: one to four `sluice serve` processes gossiping
//! their queued counts, and a burst from one tenant through a frontend that uses them all.
//! No querier runs, so whatever is accepted stays queued and each process's `/status`
//! says what it holds.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sluice_client::*;

const KEY: &str = "cluster-limit-test-key";
const LIMIT: u64 = 300;
const TENANT: &str = "burst";
/// Reports go out within milliseconds and a silent scheduler stops counting after 400 ms:
/// the bound for both is one second.
const CONVERGE: Duration = Duration::from_secs(1);

/// `n` schedulers in one directory (one development CA), gossiping with each other, each
/// with `LIMIT` as every tenant's limit; returns once each counts the others' reports.
async fn cluster(dir: &tempfile::TempDir, n: usize) -> Vec<Running> {
    let limit = LIMIT.to_string();
    let mut running: Vec<Running> = Vec::new();
    for i in 0..n {
        // The first seeds itself (nobody to join yet); the rest join through it.
        let seed = running
            .first()
            .and_then(|r| r.gossip)
            .map_or("127.0.0.1:9".to_string(), |a| a.to_string());
        let id = format!("s{i}");
        running.push(
            spawn_scheduler(
                dir.path(),
                &[
                    "--scheduler-id",
                    &id,
                    "--gossip-listen",
                    "127.0.0.1:0",
                    "--gossip-seeds",
                    &seed,
                    "--gossip-key",
                    KEY,
                    "--max-outstanding-per-tenant",
                    &limit,
                ],
            )
            .await,
        );
    }
    for r in &running {
        process_status_until(
            r.admin,
            Duration::from_secs(15),
            "every scheduler to count the others",
            |s| n == 1 || s["cluster"]["peers"].as_array().is_some_and(|p| p.len() == n - 1),
        )
        .await;
    }
    running
}

async fn status(r: &Running) -> Value {
    let (code, body) = get(r.admin, "/status").await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

/// What one scheduler holds of the tenant.
fn held(status: &Value) -> u64 {
    status["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == TENANT)
        .map_or(0, |t| t["queued"].as_u64().unwrap())
}

/// What one scheduler believes the others hold of the tenant.
fn held_elsewhere(status: &Value) -> u64 {
    status["cluster"]["held_elsewhere"][TENANT].as_u64().unwrap_or(0)
}

async fn frontend(certs: &sluice::tls::CertSet, schedulers: Vec<SocketAddr>) -> Frontend {
    let n = schedulers.len();
    let mut config = FrontendConfig::new("burst-frontend", certs.frontend.clone(), schedulers);
    // A killed scheduler is noticed by its silence.
    config.client.idle_timeout = Duration::from_secs(1);
    let f = Frontend::connect(config).await.unwrap();
    f.ready(Readiness::AllKnown, WAIT).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while f.connected_schedulers() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("connected to every scheduler");
    f
}

/// Submits `count` queries of the tenant at once; returns the accepted ones' handles and
/// how many every scheduler refused (as too many outstanding: anything else fails).
async fn burst(frontend: &Frontend, count: usize) -> (Vec<QueryHandle>, usize) {
    let mut submits = tokio::task::JoinSet::new();
    for i in 0..count {
        let (f, request) = (
            frontend.clone(),
            QueryRequest::new(TENANT, format!("q{i}")).with_timeout(Duration::from_secs(120)),
        );
        submits.spawn(async move { f.submit(request).await });
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    for outcome in submits.join_all().await {
        match outcome {
            Ok(handle) => accepted.push(handle),
            Err(QueryError::TooManyOutstanding { limit }) => {
                assert_eq!(u64::from(limit), LIMIT);
                refused += 1;
            }
            Err(e) => panic!("refused for another reason: {e}"),
        }
    }
    (accepted, refused)
}

/// Waits until every scheduler's count of the others matches what they hold; returns how
/// long that took and what each holds.
async fn converged(running: &[&Running]) -> (Duration, Vec<u64>) {
    let start = Instant::now();
    loop {
        let mut statuses = Vec::new();
        for r in running {
            statuses.push(status(r).await);
        }
        let holds: Vec<u64> = statuses.iter().map(held).collect();
        let total: u64 = holds.iter().sum();
        if statuses
            .iter()
            .zip(&holds)
            .all(|(s, &mine)| held_elsewhere(s) == total - mine)
        {
            return (start.elapsed(), holds);
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never converged: {holds:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn within_ten_percent(total: u64) -> bool {
    total * 10 >= LIMIT * 9 && total * 10 <= LIMIT * 11
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_limit_holds_for_one_to_four_schedulers() {
    for n in 1..=4 {
        let dir = tempfile::tempdir().unwrap();
        let running = cluster(&dir, n).await;
        let f = frontend(&running[0].certs, running.iter().map(|r| r.quic).collect()).await;

        let (accepted, refused) = burst(&f, 3 * LIMIT as usize).await;
        let (took, holds) = converged(&running.iter().collect::<Vec<_>>()).await;
        let total: u64 = holds.iter().sum();
        eprintln!(
            "{n} schedulers: {} accepted, {refused} refused, held {holds:?}, views agreed after {took:?}",
            accepted.len()
        );
        assert_eq!(total, accepted.len() as u64, "every accepted query is held somewhere");
        assert!(
            within_ten_percent(total),
            "{n} schedulers hold {total} of a limit of {LIMIT}"
        );
        assert!(took < CONVERGE, "views agreed after {took:?}");
        if n > 1 {
            assert!(
                holds.iter().filter(|&&h| h > 0).count() > 1,
                "the burst was spread: {holds:?}"
            );
        }

        // Room freed anywhere is room for everyone: withdraw a third, and a second burst
        // fills the limit again without a refusal while there is room.
        let withdrawn = accepted.len() / 3;
        let mut kept = accepted;
        for h in kept.drain(..withdrawn) {
            drop(h);
        }
        let withdrawn_at = Instant::now();
        loop {
            let (_, holds) = converged(&running.iter().collect::<Vec<_>>()).await;
            if holds.iter().sum::<u64>() == kept.len() as u64 {
                break;
            }
            assert!(withdrawn_at.elapsed() < WAIT, "withdrawn queries still held: {holds:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The room is what the limit leaves beside the kept queries: when the first burst
        // overshot (within ten percent), less than was withdrawn.
        let room = (LIMIT as usize).saturating_sub(kept.len());
        let (again, _) = burst(&f, LIMIT as usize).await;
        let (_, holds) = converged(&running.iter().collect::<Vec<_>>()).await;
        let total: u64 = holds.iter().sum();
        assert_eq!(
            total,
            (kept.len() + again.len()) as u64,
            "{n} schedulers: every query accepted and not withdrawn is held somewhere"
        );
        assert!(
            again.len() * 10 >= room * 9,
            "{n} schedulers: {} places taken again, of {room} left free by {withdrawn} withdrawn",
            again.len()
        );
        assert!(within_ten_percent(total), "{n} schedulers, second burst: {total}");
        f.close().await;
        for r in &running {
            signal(&r.child, "KILL").await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_scheduler_stops_counting_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let running = cluster(&dir, 3).await;
    let f = frontend(&running[0].certs, running.iter().map(|r| r.quic).collect()).await;
    let (accepted, _) = burst(&f, 2 * LIMIT as usize).await;
    let (_, holds) = converged(&running.iter().collect::<Vec<_>>()).await;
    assert!(within_ten_percent(holds.iter().sum()), "{holds:?}");
    assert!(holds[2] > 0, "the one to be killed holds some: {holds:?}");

    let killed = Instant::now();
    signal(&running[2].child, "KILL").await;
    let survivors = [&running[0], &running[1]];
    loop {
        let mut counted = false;
        for r in survivors {
            let s = status(r).await;
            counted |= s["cluster"]["peers"].as_array().unwrap().iter().any(|p| p == "s2");
        }
        if !counted {
            break;
        }
        assert!(
            killed.elapsed() < CONVERGE,
            "s2 still counted {:?} after its death",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("a killed scheduler stopped counting after {:?}", killed.elapsed());

    // Its queries come back to the survivors (the frontend places them again), and new
    // ones fill what is left: the two hold the limit, within 10%.
    tokio::time::timeout(Duration::from_secs(10), async {
        while f.connected_schedulers() > 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the frontend notices the killed scheduler");
    let (more, _) = burst(&f, LIMIT as usize).await;
    let (_, holds) = converged(&survivors).await;
    let total: u64 = holds.iter().sum();
    eprintln!("after the kill: {} more accepted, survivors hold {holds:?}", more.len());
    assert!(within_ten_percent(total), "the survivors hold {total}");
    drop((accepted, more));
    f.close().await;
}
