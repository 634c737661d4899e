//! Failures with real processes: a querier process killed with SIGKILL mid-query (also one
//! that holds a prefetched query), and schedulers killed or stopped under load.
//!
//! The test binary runs itself again as the querier process (selected by an environment
//! variable), so no other program is needed. Loopback only; every child is killed.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use sluice::tls::Identity;
use sluice_protocol::*;
use tokio::io::{AsyncBufReadExt, BufReader};

const ROLE_VAR: &str = "SLUICE_CHAOS_QUERIER";

/// SIGKILLs the querier child holding `queries` and returns how long until its frontend is
/// told `QuerierFailed` for every one of them (and nothing else).
async fn kill_and_await_querier_failed(
    mut child: tokio::process::Child,
    fe: &mut Peer,
    queries: &[QueryId],
) -> Duration {
    let killed = Instant::now();
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let mut failed = Vec::new();
    while failed.len() < queries.len() {
        match fe.next_from_scheduler().await {
            SchedulerToFrontend::QueryError { query_id, kind, .. } => {
                assert_eq!(kind, QueryErrorKind::QuerierFailed, "query {query_id}");
                failed.push(query_id);
            }
            other => panic!("expected querier-failed, got {other:?}"),
        }
    }
    failed.sort_unstable();
    assert_eq!(failed, queries);
    killed.elapsed()
}

/// Set (to anything) for a querier process whose worker prefetches.
const PREFETCH_VAR: &str = "SLUICE_CHAOS_PREFETCH";

/// Runs this test binary again as the querier process named by `test` (an ignored test)
/// against `t`, and returns once it holds query 1.
async fn querier_child(t: &TestServer, test: &str) -> tokio::process::Child {
    querier_child_with(t, test, &[]).await
}

/// [`querier_child`] with more environment for the child.
async fn querier_child_with(t: &TestServer, test: &str, env: &[(&str, &str)]) -> tokio::process::Child {
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .envs(env.iter().copied())
        .env(ROLE_VAR, t.server.quic_addr().to_string())
        .env("SLUICE_CHAOS_CA", &t.certs.querier.ca)
        .env("SLUICE_CHAOS_CERT", &t.certs.querier.cert)
        .env("SLUICE_CHAOS_KEY", &t.certs.querier.key)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap();
        if line.is_some_and(|l| l.contains("DISPATCHED 1")) {
            return child;
        }
    }
}

/// Holds every query it is given until killed, saying which one it holds.
struct Hang;

impl sluice_client::Handler for Hang {
    async fn handle(
        &self,
        request: sluice_client::Request,
    ) -> Result<sluice_client::Response, sluice_client::HandlerError> {
        println!("DISPATCHED {}", request.query_id);
        std::future::pending::<()>().await;
        unreachable!()
    }
}

/// A frontend peer on `t` with query 1 (tenant `t`) accepted, and the connection it runs
/// on (keep it while the peer is used).
async fn frontend_with_query_1(t: &TestServer) -> (quinn::Connection, Peer) {
    let conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut fe = frontend(&conn, "fe-1").await;
    accepted(&mut fe, 1, "t").await;
    (conn, fe)
}

/// The querier identity a test hands its child process in the environment.
fn child_identity() -> Identity {
    Identity {
        ca: std::env::var("SLUICE_CHAOS_CA").unwrap().into(),
        cert: std::env::var("SLUICE_CHAOS_CERT").unwrap().into(),
        key: std::env::var("SLUICE_CHAOS_KEY").unwrap().into(),
    }
}

/// The querier process: the client crate's querier with one worker that takes a query and
/// hangs, as a querier stuck in a long query would, until it is killed. With
/// [`PREFETCH_VAR`], the worker also holds the next query.
#[tokio::test]
#[ignore = "not a test: the querier process that the test below starts and kills"]
async fn querier_process() {
    let addr = std::env::var(ROLE_VAR).expect("run by a_querier_killed_mid_query_is_reported_at_once");
    let id = child_identity();
    let mut config = sluice_client::QuerierConfig::new("doomed-querier", id, vec![addr.parse().unwrap()]);
    config.concurrency = 1;
    config.prefetch = std::env::var_os(PREFETCH_VAR).is_some();
    config.hold_limit = None;
    let _querier = sluice_client::Querier::start(config, Hang).unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test]
async fn a_querier_killed_mid_query_is_reported_at_once() {
    // The default idle timeout (5 s) stays: the lifeline must make it irrelevant.
    let t = start(|_| {}).await;
    let (_fe_conn, mut fe) = frontend_with_query_1(&t).await;

    let child = querier_child(&t, "querier_process").await;
    let took = kill_and_await_querier_failed(child, &mut fe, &[1]).await;
    println!("querier SIGKILL → frontend error: {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}; the idle timeout is 5 s");
}

/// A prefetching querier killed while it runs one query and holds the next: both end at
/// once, as failed on their querier (the scheduler cannot know that the held one never
/// started), and neither is left waiting for a deadline.
#[tokio::test]
async fn a_prefetching_querier_killed_mid_query_fails_its_running_and_held_queries_at_once() {
    let t = start(|_| {}).await;
    let (_fe_conn, mut fe) = frontend_with_query_1(&t).await;
    let child = querier_child_with(&t, "querier_process", &[(PREFETCH_VAR, "1")]).await;
    accepted(&mut fe, 2, "t").await;
    t.status_until("2 held beside the running 1", |s| s.running == 2 && s.queued == 0)
        .await;

    let took = kill_and_await_querier_failed(child, &mut fe, &[1, 2]).await;
    println!("prefetching querier SIGKILL → both queries failed: {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}; the idle timeout is 5 s");
    let s = t.status_until("nothing left", |s| s.running == 0).await;
    assert_eq!(s.queued, 0);
}

/// Without a lifeline, as when a whole host is lost, a killed querier is noticed at the
/// idle timeout. The child here is a raw protocol peer that ignores the lifeline offer.
#[tokio::test]
async fn without_a_lifeline_a_killed_querier_is_noticed_at_the_idle_timeout() {
    let idle = Duration::from_millis(1500);
    let t = start(|s| s.idle_timeout_ms = Some(idle.as_millis() as u64)).await;
    let (_fe_conn, mut fe) = frontend_with_query_1(&t).await;
    let child = querier_child(&t, "raw_querier_process").await;
    let took = kill_and_await_querier_failed(child, &mut fe, &[1]).await;
    println!("querier without lifeline SIGKILL → frontend error: {took:?} (idle timeout {idle:?})");
    assert!(
        took >= idle / 2 && took <= idle + Duration::from_secs(1),
        "took {took:?}"
    );
}

/// A raw querier peer that takes one query and hangs, never opening its lifeline.
#[tokio::test]
#[ignore = "not a test: the querier process that the test above starts and kills"]
async fn raw_querier_process() {
    let addr =
        std::env::var(ROLE_VAR).expect("run by without_a_lifeline_a_killed_querier_is_noticed_at_the_idle_timeout");
    let id = child_identity();
    let conn = connect(addr.parse().unwrap(), &id).await.unwrap();
    let mut w = ready_worker(&conn, "raw-querier").await;
    let d = dispatched(&mut w).await;
    println!("DISPATCHED {}", d.query_id);
    tokio::time::sleep(Duration::from_secs(600)).await;
}

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sluice_client::{
    Frontend, FrontendConfig, Handler, HandlerError, Querier, QuerierConfig, QueryRequest, Request, Response,
};

struct Echo;

impl Handler for Echo {
    async fn handle(&self, request: Request) -> Result<Response, HandlerError> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok(Response::ok(request.payload))
    }
}

const SUBMITTERS: usize = 20;
const PER_SUBMITTER: usize = 30;

/// Two scheduler processes sharing a CA, a frontend and a querier on both, and
/// `SUBMITTERS` tasks sending `PER_SUBMITTER` queries each. Once `disrupt_after` results
/// are in, `disrupt` is sent to the first scheduler. Returns (results, errors, results
/// after the disruption); panics if any query is still unanswered after the bound.
async fn load_through_a_disruption(disrupt: &str, extra: &[&str]) -> (usize, usize, usize, Running) {
    let dir = tempfile::tempdir().unwrap();
    let a = spawn_scheduler(dir.path(), extra).await;
    let b = spawn_scheduler(dir.path(), &[]).await;
    let idle = Duration::from_millis(800);
    let mut fc = FrontendConfig::new("fe", a.certs.frontend.clone(), vec![a.quic, b.quic]);
    fc.client.idle_timeout = idle;
    let fe = Frontend::connect(fc).await.unwrap();
    let connected_by = Instant::now() + WAIT;
    while fe.connected_schedulers() < 2 {
        assert!(Instant::now() < connected_by, "frontend never reached both schedulers");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut qc = QuerierConfig::new("querier-1", a.certs.querier.clone(), vec![a.quic, b.quic]);
    qc.client.idle_timeout = idle;
    qc.concurrency = 4;
    let querier = Querier::start(qc, Echo).unwrap();

    let (results, errors, after) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let disrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for s in 0..SUBMITTERS {
        let (fe, results, errors, after, disrupted) = (
            fe.clone(),
            results.clone(),
            errors.clone(),
            after.clone(),
            disrupted.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_SUBMITTER {
                let payload = format!("{s}-{i}");
                let outcome = async {
                    let handle = fe
                        .submit(QueryRequest::new(format!("tenant-{}", s % 4), payload.clone()))
                        .await?;
                    handle.response().await?.body.collect().await
                }
                .await;
                match outcome {
                    Ok(body) => {
                        assert_eq!(body, payload.as_bytes());
                        results.fetch_add(1, Ordering::SeqCst);
                        if disrupted.load(Ordering::SeqCst) {
                            after.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) => {
                        eprintln!("query {payload}: {e}");
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    let third = SUBMITTERS * PER_SUBMITTER / 3;
    let disrupt_by = Instant::now() + WAIT;
    while results.load(Ordering::SeqCst) < third {
        assert!(Instant::now() < disrupt_by, "load never got going");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    signal(&a.child, disrupt).await;
    disrupted.store(true, Ordering::SeqCst);
    for t in tasks {
        // Bounded: detection takes the idle timeout, the rest is ordinary work.
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a query was never answered")
            .unwrap();
    }
    querier.shutdown().await;
    fe.close().await;
    let mut b = b;
    signal(&b.child, "TERM").await;
    tokio::time::timeout(WAIT, b.child.wait()).await.unwrap().unwrap();
    (
        results.load(Ordering::SeqCst),
        errors.load(Ordering::SeqCst),
        after.load(Ordering::SeqCst),
        a,
    )
}

#[tokio::test]
async fn a_scheduler_killed_under_load_loses_no_query() {
    let (results, errors, after, mut a) = load_through_a_disruption("KILL", &[]).await;
    assert_eq!((results, errors), (SUBMITTERS * PER_SUBMITTER, 0));
    assert!(after > 0, "the survivor took the load");
    let status = a.child.wait().await.unwrap();
    assert!(!status.success(), "the first scheduler was killed");
}

#[tokio::test]
async fn a_scheduler_stopped_under_load_drains_hands_back_and_exits_cleanly() {
    let (results, errors, after, mut a) = load_through_a_disruption("TERM", &["--drain-timeout-ms", "200"]).await;
    assert_eq!((results, errors), (SUBMITTERS * PER_SUBMITTER, 0));
    assert!(after > 0, "the survivor took the load");
    let status = tokio::time::timeout(WAIT, a.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "SIGTERM ends in exit 0: {status:?}");
}
