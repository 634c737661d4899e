//! The life of a query through real failures of the only scheduler: a `sluice serve`
//! process stopped (SIGTERM: drain) or killed (SIGKILL) while queries queue *and* run, then
//! started again at the same address. The frontend and the querier (the client crate, in
//! this process) must carry on by themselves: every query ends exactly once, and every
//! handler runs at most once per query; also with prefetch, where queries are held and
//! given back meanwhile. Loopback only; every child is killed.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use sluice_client::{
    Frontend, FrontendConfig, Handler, HandlerError, Querier, QuerierConfig, QueryRequest, Request, Response,
};

const SUBMITTERS: usize = 16;
const PER_SUBMITTER: usize = 15;
const WORKERS: usize = 4;

/// Counts how many times each query's handler ran; each run takes a few milliseconds, so
/// queries are running whenever the scheduler goes.
#[derive(Clone, Default)]
struct Counting {
    runs: Arc<Mutex<HashMap<String, u32>>>,
}

impl Handler for Counting {
    async fn handle(&self, request: Request) -> Result<Response, HandlerError> {
        let key = String::from_utf8_lossy(&request.payload).to_string();
        *self.runs.lock().unwrap().entry(key).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(15)).await;
        Ok(Response::ok(request.payload))
    }
}

/// A loopback port free for both UDP (QUIC) and TCP (the lifeline listener).
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Outcome {
    results: usize,
    errors: Vec<String>,
    /// Handler runs per query that ran at all.
    runs: HashMap<String, u32>,
    /// From the new process listening to every worker registered with it again.
    reconnect: Duration,
    requeued: u64,
}

/// Runs `SUBMITTERS × PER_SUBMITTER` queries (`SUBMITTERS` outstanding at a time, so most
/// queue while `WORKERS` run) against one scheduler process; once a third
/// have results, sends it `sig`, starts it again at the same address, and waits for every
/// query to end. With `prefetch`, each worker also holds a query, and gives it back when
/// held past the 10 ms hold limit (the handlers take 15 ms, so some are).
async fn restart_the_only_scheduler(sig: &str, prefetch: bool) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    // A drain too short for the backlog: some queued queries are handed back.
    let args = ["--listen", listen.as_str(), "--drain-timeout-ms", "20"];
    let mut first = spawn_scheduler(dir.path(), &args).await;
    let idle = Duration::from_secs(1);

    let handler = Counting::default();
    let mut qc = QuerierConfig::new("querier-1", first.certs.querier.clone(), vec![first.quic]);
    qc.concurrency = WORKERS;
    qc.prefetch = prefetch;
    qc.client.idle_timeout = idle;
    let querier = Querier::start(qc, handler.clone()).unwrap();
    assert!(querier.wait_connected(WORKERS, WAIT).await, "workers never registered");
    let mut fc = FrontendConfig::new("fe", first.certs.frontend.clone(), vec![first.quic]);
    fc.client.idle_timeout = idle;
    let fe = Frontend::connect(fc).await.unwrap();

    let results = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for s in 0..SUBMITTERS {
        let (fe, results, errors) = (fe.clone(), results.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_SUBMITTER {
                let payload = format!("{s}-{i}");
                let mut request = QueryRequest::new(format!("tenant-{}", s % 3), payload.clone());
                request.timeout = Some(Duration::from_secs(30));
                let outcome = async { fe.submit(request).await?.response().await?.body.collect().await }.await;
                match outcome {
                    Ok(body) => {
                        assert_eq!(body, payload.as_bytes());
                        results.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => errors.lock().unwrap().push(format!("{payload}: {e}")),
                }
            }
        }));
    }
    let third = SUBMITTERS * PER_SUBMITTER / 3;
    let by = Instant::now() + WAIT;
    while results.load(Ordering::SeqCst) < third {
        assert!(Instant::now() < by, "the load never got going");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    signal(&first.child, sig).await;
    let status = tokio::time::timeout(WAIT, first.child.wait())
        .await
        .expect("the scheduler exits")
        .unwrap();
    assert_eq!(
        status.success(),
        sig == "TERM",
        "exit status after SIG{sig}: {status:?}"
    );

    let second = spawn_scheduler(dir.path(), &args).await;
    assert_eq!(second.quic, first.quic);
    let listening = Instant::now();
    let slots = if prefetch { 2 * WORKERS } else { WORKERS };
    process_status_until(second.admin, Duration::from_secs(10), "the workers to come back", |s| {
        s["workers"].as_array().is_some_and(|w| w.len() == slots)
    })
    .await;
    let reconnect = listening.elapsed();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a query never ended")
            .unwrap();
    }
    let requeued = fe.stats().requeued;
    querier.shutdown().await;
    fe.close().await;
    drop(second);
    let runs = handler.runs.lock().unwrap().clone();
    let errors = errors.lock().unwrap().clone();
    Outcome {
        results: results.load(Ordering::SeqCst),
        errors,
        runs,
        reconnect,
        requeued,
    }
}

fn check(sig: &str, o: &Outcome) {
    let total = SUBMITTERS * PER_SUBMITTER;
    let twice: Vec<(&String, &u32)> = o.runs.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "SIG{sig}: {} results, {} errors, {} re-placed, {} handler runs for {} queries, {} run twice; \
         workers back {:?} after the new process listened",
        o.results,
        o.errors.len(),
        o.requeued,
        o.runs.values().sum::<u32>(),
        o.runs.len(),
        twice.len(),
        o.reconnect
    );
    assert_eq!(o.results + o.errors.len(), total, "every query ended once");
    assert!(o.errors.is_empty(), "no query lost: {:?}", o.errors);
    assert!(twice.is_empty(), "no query ran twice: {twice:?}");
    assert_eq!(o.runs.len(), total, "every query ran");
    assert!(o.reconnect < Duration::from_secs(3), "{:?}", o.reconnect);
}

#[tokio::test]
async fn the_only_scheduler_stopped_under_load_and_restarted_loses_and_repeats_nothing() {
    let o = restart_the_only_scheduler("TERM", false).await;
    check("TERM", &o);
}

#[tokio::test]
async fn the_only_scheduler_killed_under_load_and_restarted_loses_and_repeats_nothing() {
    let o = restart_the_only_scheduler("KILL", false).await;
    check("KILL", &o);
}

#[tokio::test]
async fn with_prefetch_the_only_scheduler_stopped_and_restarted_loses_and_repeats_nothing() {
    let o = restart_the_only_scheduler("TERM", true).await;
    check("TERM, prefetch", &o);
}

#[tokio::test]
async fn with_prefetch_the_only_scheduler_killed_and_restarted_loses_and_repeats_nothing() {
    let o = restart_the_only_scheduler("KILL", true).await;
    check("KILL, prefetch", &o);
}
