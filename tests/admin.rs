//! The admin HTTP endpoints reflect what happened on the QUIC side.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use sluice_protocol::*;

/// Polls /metrics until `needle` shows up (gauges are exported once a second).
async fn metrics_with(addr: SocketAddr, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        if body.contains(needle) {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "no {needle} in:\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_ready_and_status_reflect_traffic() {
    let t = start(|s| s.max_outstanding_per_tenant = Some(2)).await;
    let admin = t.server.admin_addr();
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    // Two queued for a tenant whose name needs escaping, one refused, one dispatched.
    for q in 0..2 {
        accepted(&mut fe, q, "<acme>").await;
    }
    fe.send(&enqueue(2, "<acme>")).await;
    assert_eq!(
        status_of(&mut fe, 2).await,
        EnqueueStatus::TooManyOutstanding { limit: 2 }
    );
    let mut w = ready_worker(&q_conn, "querier-1").await;
    dispatched(&mut w).await;

    assert_eq!(get(admin, "/ready").await, (200, "ready\n".into()));

    let body = metrics_with(admin, "sluice_query_scheduler_queue_length{tenant=\"<acme>\"} 1").await;
    for needle in [
        "sluice_query_scheduler_discarded_requests_total{tenant=\"<acme>\",reason=\"too_many_outstanding\"} 1",
        "sluice_query_scheduler_queue_duration_seconds_bucket{tenant=\"<acme>\",component=\"unknown\"",
        "sluice_query_scheduler_connected_querier_workers 1",
        "sluice_query_scheduler_connected_frontends 1",
        "sluice_query_scheduler_inflight_requests 1",
        "sluice_query_scheduler_querier_inflight_requests{component=\"unknown\"} 1",
        "sluice_query_scheduler_requests_total{outcome=\"dispatched\"} 1",
        "# HELP sluice_query_scheduler_queue_length Requests queued, per tenant.",
    ] {
        assert!(body.contains(needle), "missing {needle} in:\n{body}");
    }
    if cfg!(target_os = "linux") {
        // Read at scrape time, so load generators can take CPU per query from two scrapes.
        let value = |name: &str| -> f64 {
            let line = body
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name}"));
            line[name.len()..].trim().parse().unwrap()
        };
        assert!(value("process_cpu_seconds_total") > 0.0);
        assert!(value("process_resident_memory_bytes") > 1e6);
    }

    let (code, json) = get(admin, "/status").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["queued"], 1);
    assert_eq!(v["running"], 1);
    assert_eq!(v["requests"]["rejected"], 1);
    assert_eq!(v["tenants"][0]["tenant"], "<acme>");
    assert_eq!(v["queriers"][0]["querier"], "querier-1");
    assert_eq!(v["workers"][0]["busy"], true);
    assert_eq!(v["frontends"][0], "fe-1");

    let (code, html) = get(admin, "/").await;
    assert_eq!(code, 200);
    assert!(html.contains("&lt;acme&gt;") && !html.contains("<acme>"), "{html}");
    assert!(html.contains("querier-1"));
}

#[tokio::test]
async fn ready_turns_503_while_draining() {
    let t = start(|s| s.drain_timeout_ms = Some(60_000)).await;
    let admin = t.server.admin_addr();
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    accepted(&mut fe, 1, "t").await;
    // With work queued and no querier, the drain lasts; /ready must say so meanwhile.
    let shutdown = tokio::spawn(t.server.shutdown());
    assert_eq!(fe.next_from_scheduler().await, SchedulerToFrontend::ShuttingDown);
    assert_eq!(get(admin, "/ready").await, (503, "draining\n".into()));
    // Cancelling the last queued query ends the drain early.
    fe.send(&FrontendToScheduler::Cancel { query_id: 1 }).await;
    tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
}

#[tokio::test]
async fn status_names_the_queriers_in_each_sharded_tenants_shard() {
    let t = start(|s| s.max_queriers_per_tenant = Some(1)).await;
    let admin = t.server.admin_addr();
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    // Two queriers with one worker each; the tenant's one querier runs query 1 and query 2
    // waits for it (the other querier is outside the shard).
    let mut workers = Vec::new();
    for id in ["querier-a", "querier-b"] {
        let conn = t.connect(&t.certs.querier).await.unwrap();
        workers.push((ready_worker(&conn, id).await, conn));
    }
    t.status_until("two queriers", |s| s.queriers.len() == 2).await;
    accepted(&mut fe, 1, "acme").await;
    accepted(&mut fe, 2, "acme").await;
    t.status_until("query 2 queued", |s| s.queued == 1).await;
    let (code, json) = get(admin, "/status").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let tenant = &v["tenants"][0];
    assert_eq!(tenant["shard_size"], 1);
    let shard: Vec<String> = serde_json::from_value(tenant["shard"].clone()).unwrap();
    assert_eq!(shard.len(), 1);
    assert!(["querier-a", "querier-b"].contains(&shard[0].as_str()), "{shard:?}");
    let (_, html) = get(admin, "/").await;
    assert!(html.contains(&format!("<td>{}</td>", shard[0])), "{html}");
}

#[tokio::test]
async fn explain_dumps_the_queue_tree_with_paths_ages_and_balances() {
    let t = start(|_| {}).await;
    let admin = t.server.admin_addr();
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    let FrontendToScheduler::Enqueue(mut e) = enqueue(7, "acme") else {
        unreachable!()
    };
    e.actors = vec!["ann".into()];
    e.timeout_ms = Some(60_000);
    fe.send(&FrontendToScheduler::Enqueue(e)).await;
    assert_eq!(status_of(&mut fe, 7).await, EnqueueStatus::Accepted);
    let (code, json) = get(admin, "/explain").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((v["queued"].as_u64(), v["truncated"].as_bool()), (Some(1), Some(false)));
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{json}");
    assert_eq!(nodes[0]["path"], serde_json::json!(["", "acme"]));
    assert_eq!(nodes[0]["tenant"]["weight"], 1);
    assert_eq!(nodes[1]["path"], serde_json::json!(["", "acme", "ann"]));
    assert_eq!(nodes[1]["own"], 1);
    let request = &v["requests"][0];
    assert_eq!(request["query"], 7);
    assert_eq!(request["path"], serde_json::json!(["", "acme", "ann"]));
    let left = request["deadline_in_ms"].as_f64().unwrap();
    assert!(left > 50_000.0 && left <= 60_000.0, "{left}");
}
