//! Failures with real processes: a querier process killed with SIGKILL mid-query.
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

/// The querier process: one worker that takes a query and then hangs, as a querier
/// stuck in a long query would, until it is killed.
#[tokio::test]
#[ignore = "not a test: the querier process that the test below starts and kills"]
async fn querier_process() {
    let addr = std::env::var(ROLE_VAR).expect("run by a_querier_killed_mid_query_is_reported_within_the_idle_timeout");
    let id = Identity {
        ca: std::env::var("SLUICE_CHAOS_CA").unwrap().into(),
        cert: std::env::var("SLUICE_CHAOS_CERT").unwrap().into(),
        key: std::env::var("SLUICE_CHAOS_KEY").unwrap().into(),
    };
    let conn = connect(addr.parse().unwrap(), &id).await.unwrap();
    let mut w = worker(&conn, "doomed-querier").await;
    w.send(&QuerierToScheduler::Ready { finished: None }).await;
    let d = dispatched(&mut w).await;
    println!("DISPATCHED {}", d.query_id);
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test]
async fn a_querier_killed_mid_query_is_reported_within_the_idle_timeout() {
    let idle = Duration::from_millis(1500);
    let t = start(|s| s.idle_timeout_ms = Some(idle.as_millis() as u64)).await;
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    fe.send(&enqueue(1, "t")).await;
    assert_eq!(status_of(&mut fe, 1).await, EnqueueStatus::Accepted);

    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "querier_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
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
            break;
        }
    }
    let killed = Instant::now();
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    match fe.recv::<SchedulerToFrontend>().await {
        SchedulerToFrontend::QueryError { query_id: 1, kind, .. } => assert_eq!(kind, QueryErrorKind::QuerierFailed),
        other => panic!("expected querier-failed, got {other:?}"),
    }
    let took = killed.elapsed();
    println!("querier SIGKILL → frontend error: {took:?} (idle timeout {idle:?})");
    assert!(took <= idle + Duration::from_secs(1), "took {took:?}");
}
