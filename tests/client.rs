//! The client crate against real schedulers over QUIC on loopback: a frontend and
//! queriers as users write them, and what they promise when everything works. Failures are in
//! `client_failures.rs`, the result path in `results.rs`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::client::*;
use common::*;
use sluice_client::*;
use tokio::sync::mpsc;

#[tokio::test]
async fn a_measured_cost_reaches_the_schedulers_account() {
    let t = start(|_| {}).await;
    let (fe, q, _events) = frontend_and_querier(&t, 1, Duration::ZERO).await;
    let mut req = QueryRequest::new("tenant-c", "cost:9");
    req.cost_hint = Some(2);
    assert_eq!(body_of(fe.submit(req).await.unwrap()).await.unwrap(), b"cost:9");
    // The querier reports the cost with its next Ready; the scheduler counts it (not the hint).
    let needle = "sluice_query_scheduler_served_cost_total{tenant=\"tenant-c\"} 9";
    wait("the measured cost in the metrics", async {
        loop {
            let (_, metrics) = get(t.server.admin_addr(), "/metrics").await;
            if metrics.contains(needle) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    q.shutdown().await;
}

/// Runs `n` queries through `fe`, each answered with its own query text.
async fn echo_queries(fe: &Frontend, n: usize) {
    for i in 0..n {
        let q = format!("q{i}");
        let answer = body_of(fe.submit(QueryRequest::new("t", q.clone())).await.unwrap()).await;
        assert_eq!(answer.unwrap(), q.as_bytes());
    }
}

/// The value of the metric line that starts with `series` (name and labels), if any.
fn metric(metrics: &str, series: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn the_schedulers_quic_traffic_is_counted_per_role_and_outlives_its_connections() {
    let t = start(|_| {}).await;
    let (fe, q, _events) = frontend_and_querier(&t, 2, Duration::ZERO).await;
    echo_queries(&fe, 20).await;
    let series = |role: &str, what: &str| match what {
        "send_calls" => format!("sluice_query_scheduler_quic_send_calls_total{{role=\"{role}\"}}"),
        direction => {
            format!("sluice_query_scheduler_quic_datagrams_total{{role=\"{role}\",direction=\"{direction}\"}}")
        }
    };
    let (_, before) = get(t.server.admin_addr(), "/metrics").await;
    let querier_sent = metric(&before, &series("querier", "sent")).expect("querier datagrams sent");
    for role in ["frontend", "querier"] {
        let sent = metric(&before, &series(role, "sent")).unwrap();
        let received = metric(&before, &series(role, "received")).unwrap();
        let calls = metric(&before, &series(role, "send_calls")).unwrap();
        // 20 queries each way at least took some datagrams; a send call carries one or more.
        assert!(sent > 0 && received > 0, "{role}: {sent} sent, {received} received");
        assert!(
            (1..=sent).contains(&calls),
            "{role}: {calls} send calls for {sent} datagrams"
        );
    }
    // The querier's connection closes and another querier runs one query: what the first
    // carried still counts beside the second's (not only the larger of the two).
    q.shutdown().await;
    let open = "sluice_query_scheduler_quic_connections{role=\"querier\"}";
    assert_eq!(metric(&before, open), Some(1));
    wait("the querier's connection closed", async {
        loop {
            let (_, m) = get(t.server.admin_addr(), "/metrics").await;
            if metric(&m, open) == Some(0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let (h, _events) = handler(Duration::ZERO);
    let q2 = querier_for("querier-2", &[&t], 1, h);
    assert_eq!(
        body_of(fe.submit(QueryRequest::new("t", "last")).await.unwrap())
            .await
            .unwrap(),
        b"last"
    );
    let (_, after) = get(t.server.admin_addr(), "/metrics").await;
    assert_eq!(metric(&after, open), Some(1));
    assert!(
        metric(&after, &series("querier", "sent")).unwrap() > querier_sent,
        "{after}"
    );
    q2.shutdown().await;
}

#[tokio::test]
async fn clients_count_their_quic_traffic_per_peer_and_it_matches_what_the_peers_counted() {
    let t = start(|_| {}).await;
    let (fe, q, _events) = frontend_and_querier(&t, 2, Duration::ZERO).await;
    echo_queries(&fe, 20).await;
    let fe_to_scheduler = fe.quic_stats(Role::Scheduler);
    let fe_from_queriers = fe.quic_stats(Role::Querier);
    let q_to_scheduler = q.quic_stats(Role::Scheduler);
    let q_to_frontends = q.quic_stats(Role::Frontend);
    for (what, s) in [
        ("frontend-scheduler", fe_to_scheduler),
        ("frontend-queriers", fe_from_queriers),
        ("querier-scheduler", q_to_scheduler),
        ("querier-frontends", q_to_frontends),
    ] {
        assert_eq!(s.connections, 1, "{what}: {s:?}");
        assert!(s.datagrams_sent > 0 && s.datagrams_received > 0, "{what}: {s:?}");
        assert!((1..=s.datagrams_sent).contains(&s.send_calls), "{what}: {s:?}");
    }
    // A frontend has no connections to other frontends: nothing to report for that role.
    assert_eq!(fe.quic_stats(Role::Frontend), QuicTotals::default());
    // The two ends of one connection agree, give or take what is still in flight (loopback
    // loses nothing): the querier's datagrams to frontends are the frontend's from queriers.
    let (sent, received) = (q_to_frontends.datagrams_sent, fe_from_queriers.datagrams_received);
    assert!(
        received <= sent + 2 && sent <= received + 16,
        "querier sent {sent}, frontend received {received}"
    );
    q.shutdown().await;
}

#[tokio::test]
async fn request_to_result() {
    let t = start(|_| {}).await;
    let (fe, q, _events) = frontend_and_querier(&t, 2, Duration::ZERO).await;
    let mut req = QueryRequest::new("tenant-a", "sum(rate(x[5m]))");
    req.actors = vec!["user-1".into()];
    let handle = fe.submit(req).await.unwrap();
    let response = wait("response", handle.response()).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.metadata, [("tenant".to_string(), "tenant-a".to_string())]);
    assert_eq!(response.body.collect().await.unwrap(), b"sum(rate(x[5m]))");
    assert_eq!(fe.outstanding(), 0);
    q.shutdown().await;
}

#[tokio::test]
async fn many_concurrent_queries_all_come_back_right() {
    let t = start(|s| s.max_outstanding_per_tenant = Some(1000)).await;
    let (fe, q, _events) = frontend_and_querier(&t, 8, Duration::from_millis(1)).await;
    let mut handles = Vec::new();
    for i in 0..300 {
        let req = QueryRequest::new(format!("tenant-{}", i % 7), format!("query {i}"));
        handles.push((i, fe.submit(req).await.unwrap()));
    }
    let results = futures_join(handles.into_iter().map(|(i, h)| async move { (i, body_of(h).await) })).await;
    for (i, body) in results {
        assert_eq!(body.unwrap(), format!("query {i}").as_bytes());
    }
    q.shutdown().await;
}

#[tokio::test]
async fn a_flooding_tenant_does_not_stop_a_quiet_one() {
    let t = start(|s| s.max_outstanding_per_tenant = Some(1000)).await;
    let fe = frontend_for(&[&t]).await;
    let mut handles = Vec::new();
    for i in 0..100 {
        handles.push((
            "noisy",
            fe.submit(QueryRequest::new("noisy", format!("n{i}"))).await.unwrap(),
        ));
    }
    for i in 0..10 {
        handles.push((
            "quiet",
            fe.submit(QueryRequest::new("quiet", format!("q{i}"))).await.unwrap(),
        ));
    }
    // The order the single worker is handed queries is the scheduler's dispatch order.
    let tenant_of: HashMap<u64, &str> = handles.iter().map(|(tenant, h)| (h.id(), *tenant)).collect();
    let (h, mut events) = handler(Duration::ZERO);
    let q = querier_for("querier-1", &[&t], 1, h);
    let mut first_twenty: HashMap<&str, usize> = HashMap::new();
    for _ in 0..20 {
        let id = wait("a dispatch", events.started.recv()).await.unwrap();
        *first_twenty.entry(tenant_of[&id]).or_default() += 1;
    }
    for (_, handle) in handles {
        body_of(handle).await.unwrap();
    }
    // Round robin: the quiet tenant's ten queries are among the first twenty served.
    assert!(first_twenty.get("quiet").copied().unwrap_or(0) >= 9, "{first_twenty:?}");
    q.shutdown().await;
}

#[tokio::test]
async fn closing_a_frontend_tells_the_scheduler_at_once() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let _queued = fe.submit(QueryRequest::new("t", "q")).await.unwrap();
    fe.close().await;
    // Well inside the 5 s idle timeout: the scheduler heard the close.
    let s = t.status_until("frontend gone", |s| s.frontends.is_empty()).await;
    assert_eq!((s.queued, s.counters.cancelled), (0, 1));
}

#[tokio::test]
async fn enqueues_are_spread_over_schedulers() {
    let (a, b, fe) = two_schedulers_and_a_frontend().await;
    let mut handles = Vec::new();
    for i in 0..200 {
        handles.push(fe.submit(QueryRequest::new("t", format!("{i}"))).await.unwrap());
    }
    let (qa, qb) = (
        a.server.status().await.unwrap().queued,
        b.server.status().await.unwrap().queued,
    );
    assert_eq!(qa + qb, 200);
    // The less loaded of two random choices, by the load hints: close to even.
    assert!(qa.abs_diff(qb) <= 20, "{qa} vs {qb}");
}

#[tokio::test]
async fn handlers_from_closures_and_behind_arc_dyn_serve_queries() {
    use sluice_client::{DynHandler, handler_fn};
    use std::sync::Arc;
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let config = |id: &str| {
        let mut c = querier_config(&t, id);
        c.concurrency = 1;
        c
    };
    let closure = handler_fn(|request: Request| async move {
        Ok(Response::ok(format!(
            "closure: {}",
            String::from_utf8_lossy(&request.payload)
        )))
    });
    let q1 = Querier::start(config("querier-closure"), closure).unwrap();
    assert!(q1.wait_connected(1, WAIT).await);
    let body = body_of(fe.submit(QueryRequest::new("t", "a")).await.unwrap())
        .await
        .unwrap();
    assert_eq!(body, b"closure: a");
    q1.shutdown().await;
    // Chosen at run time, behind Arc<dyn DynHandler>.
    let shared: Arc<dyn DynHandler> = Arc::new(handler_fn(|_request: Request| async { Ok(Response::ok("dyn")) }));
    let q2 = Querier::start(config("querier-dyn"), shared).unwrap();
    assert!(q2.wait_connected(1, WAIT).await);
    let body = body_of(fe.submit(QueryRequest::new("t", "b")).await.unwrap())
        .await
        .unwrap();
    assert_eq!(body, b"dyn");
    q2.shutdown().await;
}

#[tokio::test]
async fn connect_waits_for_its_readiness_and_says_what_was_missing() {
    let t = start(|_| {}).await;
    // A second scheduler address where nothing answers (held, so no one else takes it).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let nobody = silent.local_addr().unwrap();
    let config = |id: &str, schedulers: Vec<std::net::SocketAddr>, readiness| {
        let mut c = FrontendConfig::new(id, t.certs.frontend.clone(), schedulers);
        c.readiness = readiness;
        c.enqueue_wait = Duration::from_millis(500);
        c
    };
    let both = vec![t.server.quic_addr(), nobody];
    match Frontend::connect(config("fe-all", both.clone(), Readiness::AllKnown)).await {
        Err(ClientError::NotReady {
            readiness: Readiness::AllKnown,
            connected: 1,
            known: 2,
        }) => {}
        other => panic!("{:?}", other.map(|fe| fe.connected_schedulers())),
    }
    let fe = Frontend::connect(config("fe-one", both, Readiness::AtLeastOne))
        .await
        .unwrap();
    assert_eq!(fe.connected_schedulers(), 1);
    assert_eq!(fe.ready(Readiness::AtLeastOne, WAIT).await.unwrap(), 1);
    assert!(matches!(
        fe.ready(Readiness::AllKnown, Duration::from_millis(200)).await,
        Err(ClientError::NotReady {
            connected: 1,
            known: 2,
            ..
        })
    ));
    // `Nothing` returns at once, with no scheduler reachable at all; queries would wait.
    let started = Instant::now();
    let lone = Frontend::connect(config("fe-none", vec![nobody], Readiness::Nothing))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(lone.connected_schedulers(), 0);
    assert!(matches!(
        lone.ready(Readiness::AtLeastOne, Duration::from_millis(200)).await,
        Err(ClientError::NotReady {
            connected: 0,
            known: 1,
            ..
        })
    ));
    lone.close().await;
    fe.close().await;
}

#[tokio::test]
async fn a_handle_shows_where_its_query_is_and_the_handler_sees_which_scheduler_dispatched_it() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let handle = fe.submit(QueryRequest::new("t", "q")).await.unwrap();
    // No querier yet: queued at the one scheduler, first run.
    let placement = handle.placement().unwrap();
    assert_eq!(placement.stage, Stage::Queued);
    assert_eq!(placement.scheduler, Some(t.server.quic_addr()));
    assert_eq!(placement.attempt, 1);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let handler = handler_fn(move |request: Request| {
        let (seen_tx, mut release) = (seen_tx.clone(), release.clone());
        async move {
            let _ = seen_tx.send((request.scheduler, request.attempt));
            let _ = release.wait_for(|go| *go).await;
            Ok(Response::ok(request.payload))
        }
    });
    let mut config = querier_config(&t, "querier-1");
    config.concurrency = 1;
    let q = Querier::start(config, handler).unwrap();
    assert_eq!(wait("the handler", seen.recv()).await, Some((t.server.quic_addr(), 1)));
    // Running: dispatched (or already confirmed by its querier), by the same scheduler.
    wait("the dispatch note", async {
        while handle.placement().unwrap().stage == Stage::Queued {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let placement = handle.placement().unwrap();
    assert!(
        matches!(placement.stage, Stage::Dispatched | Stage::Started),
        "{placement:?}"
    );
    assert_eq!(placement.scheduler, Some(t.server.quic_addr()));
    release_tx.send(true).unwrap();
    assert_eq!(body_of(handle).await.unwrap(), b"q");
    q.shutdown().await;
}

#[tokio::test]
async fn a_query_carries_its_trace_context_to_the_handler_one_hop_further_each_time() {
    use sluice_client::trace::TraceParent;
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let handler = handler_fn(move |request: Request| {
        let seen_tx = seen_tx.clone();
        async move {
            let _ = seen_tx.send(TraceParent::of(&request.metadata));
            Ok(Response::ok(request.payload))
        }
    });
    let q = Querier::start(querier_config(&t, "querier-1"), handler).unwrap();
    // The caller's trace continues: same trace id, a new parent at every hop.
    let caller = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    let mut request = QueryRequest::new("t", "q");
    caller.set(&mut request.metadata);
    let handle = fe.submit(request).await.unwrap();
    let at_frontend = handle.trace();
    assert_eq!(at_frontend.trace_id, caller.trace_id);
    assert_ne!(at_frontend.parent_id, caller.parent_id);
    body_of(handle).await.unwrap();
    let at_handler = wait("the handler", seen.recv())
        .await
        .unwrap()
        .expect("a trace context");
    assert_eq!(at_handler.trace_id, caller.trace_id);
    assert!(![caller.parent_id, at_frontend.parent_id].contains(&at_handler.parent_id));
    // A request without one gets a new trace, the same at the frontend and the handler.
    let handle = fe.submit(QueryRequest::new("t", "q")).await.unwrap();
    let started = handle.trace();
    assert_ne!(started.trace_id, caller.trace_id);
    body_of(handle).await.unwrap();
    let at_handler = wait("the handler", seen.recv())
        .await
        .unwrap()
        .expect("a trace context");
    assert_eq!(at_handler.trace_id, started.trace_id);
    q.shutdown().await;
}

#[tokio::test]
async fn a_querier_with_more_workers_than_a_stream_carries_is_refused_at_start() {
    let t = start(|_| {}).await;
    let (h, _events) = handler(Duration::ZERO);
    let config = querier_config(&t, "q").with_concurrency(usize::from(sluice_protocol::MAX_WORKERS_PER_STREAM) + 1);
    match Querier::start(config, h) {
        Err(ClientError::Config(message)) => assert!(message.contains("at most 1024"), "{message}"),
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("started with too many workers"),
    }
}

#[tokio::test]
async fn a_querier_whose_chunks_would_not_fit_a_frame_is_refused_at_start_and_the_largest_that_fit_stream() {
    let t = start(|_| {}).await;
    let config = |chunk_size: usize| {
        let mut c = querier_config(&t, "q");
        c.chunk_size = chunk_size;
        c
    };
    let max = sluice_protocol::Limits::default().max_frame_len as usize;
    let (h, _events) = handler(Duration::ZERO);
    match Querier::start(config(max), h) {
        Err(ClientError::Config(message)) => assert!(message.contains("max_frame_len"), "{message}"),
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("started with chunks larger than a frame"),
    }
    // The largest chunk allowed: a result of two such chunks arrives whole.
    let largest = max - 16;
    let body = vec![b'r'; 2 * largest];
    let reply = body.clone();
    let h = handler_fn(move |_request: Request| {
        let reply = reply.clone();
        async move { Ok(Response::ok(reply)) }
    });
    let q = Querier::start(config(largest), h).unwrap();
    let fe = frontend_for(&[&t]).await;
    let answer = body_of(fe.submit(QueryRequest::new("t", "big")).await.unwrap()).await;
    assert_eq!(answer.unwrap().len(), body.len());
    q.shutdown().await;
}

#[tokio::test]
async fn a_frame_limit_the_protocol_does_not_allow_is_refused_at_start() {
    let t = start(|_| {}).await;
    for max_frame_len in [
        0,
        16,
        sluice_protocol::MIN_FRAME_LEN - 1,
        sluice_protocol::HARD_MAX_FRAME_LEN + 1,
    ] {
        let mut f = frontend_config(&t, "fe");
        f.client.max_frame_len = max_frame_len;
        match Frontend::connect(f).await {
            Err(ClientError::Config(message)) => assert!(message.contains("max_frame_len"), "{message}"),
            Err(other) => panic!("expected a config error, got {other}"),
            Ok(_) => panic!("a frontend started with max_frame_len {max_frame_len}"),
        }
        let mut q = querier_config(&t, "q");
        q.client.max_frame_len = max_frame_len;
        q.chunk_size = 1;
        let (h, _events) = handler(Duration::ZERO);
        match Querier::start(q, h) {
            Err(ClientError::Config(message)) => assert!(message.contains("max_frame_len"), "{message}"),
            Err(other) => panic!("expected a config error, got {other}"),
            Ok(_) => panic!("a querier started with max_frame_len {max_frame_len}"),
        }
    }
}

#[tokio::test]
async fn the_largest_querier_serves_with_every_worker_on_one_stream() {
    let t = start(|_| {}).await;
    let (h, _events) = handler(Duration::ZERO);
    let max = usize::from(sluice_protocol::MAX_WORKERS_PER_STREAM);
    let q = querier_for("q", &[&t], max, h);
    assert!(q.wait_connected(max, WAIT).await);
    let s = t
        .status_until("every worker registered", |s| s.workers.len() == max)
        .await;
    assert!(s.workers.iter().all(|w| w.querier == "q" && !w.busy));
    let fe = frontend_for(&[&t]).await;
    wait_connected(&fe, 1).await;
    let handle = fe.submit(QueryRequest::new("t", "x")).await.unwrap();
    assert_eq!(body_of(handle).await.unwrap(), b"x".as_slice());
    q.shutdown().await;
}

#[tokio::test]
async fn a_request_larger_than_a_frame_fails_at_once_and_alone() {
    let t = start(|_| {}).await;
    // One worker, 300 ms a query: the first runs and the others wait in the queue while
    // the oversized request comes.
    let (fe, q, events) = frontend_and_querier(&t, 1, Duration::from_millis(300)).await;
    let mut waiting = Vec::new();
    for i in 0..4 {
        waiting.push(fe.submit(QueryRequest::new("t", format!("q{i}"))).await.unwrap());
    }
    let max = sluice_protocol::Limits::default().max_frame_len as usize;
    let huge = || QueryRequest::new("t", vec![b'x'; max]).with_timeout(Duration::from_secs(60));
    let started = Instant::now();
    let refused = wait("the oversized query's answer", fe.query(huge())).await;
    let Err(QueryError::Invalid(message)) = refused else {
        panic!("an oversized request got {:?}", refused.map(|r| r.status));
    };
    assert!(message.contains("max_frame_len"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused after {:?}",
        started.elapsed()
    );
    assert!(matches!(fe.submit(huge()).await, Err(QueryError::Invalid(_))));
    // The queries around it were not disturbed: each answered once, none placed again.
    for (i, handle) in waiting.into_iter().enumerate() {
        assert_eq!(body_of(handle).await.unwrap(), format!("q{i}").as_bytes());
    }
    assert_eq!(fe.stats().requeued, 0);
    assert_eq!(fe.outstanding(), 0);
    drop(events);
    q.shutdown().await;
}

#[tokio::test]
async fn a_result_too_large_for_a_frame_fails_its_query_at_once_and_big_metadata_that_fits_arrives() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let mut c = querier_config(&t, "querier-big");
    c.concurrency = 2;
    let max = sluice_protocol::Limits::default().max_frame_len as usize;
    let h = handler_fn(move |request: Request| async move {
        let with_metadata = |len: usize| {
            let mut r = Response::ok("m");
            r.metadata.push(("big".into(), "m".repeat(len)));
            Ok(r)
        };
        match &request.payload[..] {
            b"error" => Err(HandlerError("€".repeat(max / 3))), // 3 bytes each: the cut falls inside one
            b"too much metadata" => with_metadata(max),
            b"1 MiB of metadata" => with_metadata(1 << 20),
            b"20 KiB of metadata" => with_metadata(20 << 10),
            p => Ok(Response::ok(p.to_vec())),
        }
    });
    let q = Querier::start(c, h).unwrap();
    assert!(q.wait_connected(1, WAIT).await);
    let run = |what: &'static str| {
        let fe = fe.clone();
        async move {
            let started = Instant::now();
            let outcome = fe
                .query(QueryRequest::new("t", what).with_timeout(Duration::from_secs(60)))
                .await;
            // Answered, not left to its deadline.
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{what}: {:?}",
                started.elapsed()
            );
            outcome
        }
    };
    let Err(QueryError::Failed(message)) = run("error").await else {
        panic!("a huge handler error did not fail its query");
    };
    assert!(
        message.starts_with("€€") && message.ends_with("more bytes cut)"),
        "{}",
        &message[..60]
    );
    assert!(message.len() < 17 * 1024, "{} bytes", message.len());
    let Err(QueryError::Failed(message)) = run("too much metadata").await else {
        panic!("metadata beyond a frame did not fail its query");
    };
    assert!(message.contains("max_frame_len"), "{message}");
    for (what, len) in [("1 MiB of metadata", 1 << 20), ("20 KiB of metadata", 20 << 10)] {
        let response = run(what).await.unwrap();
        assert_eq!(response.metadata, vec![("big".to_string(), "m".repeat(len))], "{what}");
        assert_eq!(response.body.collect().await.unwrap(), b"m");
    }
    echo_queries(&fe, 2).await;
    q.shutdown().await;
}

#[tokio::test]
async fn a_query_too_large_to_dispatch_is_refused_and_the_largest_that_fits_runs() {
    let t = start(|_| {}).await;
    let (fe, q, _events) = frontend_and_querier(&t, 2, Duration::from_millis(300)).await;
    // A query running on the querier the whole time.
    let running = fe.submit(QueryRequest::new("t", "running")).await.unwrap();
    let max = sluice_protocol::Limits::default().max_frame_len as usize;
    let request = |payload: usize| QueryRequest::new("t", vec![b'x'; payload]).with_timeout(Duration::from_secs(30));
    // Payloads from the frame limit down: refused by the frontend as an enqueue, then by
    // the scheduler as a dispatch (its address and queue time added), then run.
    let mut refused_as_dispatch = 0;
    let mut largest = None;
    for payload in (max - 400..max - 60).rev() {
        match fe.query(request(payload)).await {
            Err(QueryError::Invalid(m)) if m.contains("as an enqueue frame") => assert_eq!(refused_as_dispatch, 0),
            Err(QueryError::Invalid(m)) if m.contains("as a dispatch") => refused_as_dispatch += 1,
            Ok(response) => {
                assert_eq!(response.body.collect().await.unwrap().len(), payload);
                largest = Some(payload);
                break;
            }
            Err(e) => panic!("a {payload}-byte payload: {e}"),
        }
    }
    assert!(
        refused_as_dispatch > 0 && largest.is_some(),
        "{refused_as_dispatch} refused, ran {largest:?}"
    );
    // Nothing of this reached the querier's other query.
    assert_eq!(body_of(running).await.unwrap(), b"running");
    assert_eq!(fe.stats().redelivered, 0);
    q.shutdown().await;
}

#[tokio::test]
async fn a_request_with_every_field_at_its_largest_runs() {
    let t = start(|_| {}).await;
    let (fe, q, _events) = frontend_and_querier(&t, 1, Duration::ZERO).await;
    let limits = sluice_protocol::Limits::default();
    let request = QueryRequest::new("t".repeat(limits.max_tenant_len), "largest")
        .with_actors((0..limits.max_actor_depth).map(|i| format!("{i}").repeat(limits.max_actor_len)))
        .with_component("c".repeat(limits.max_component_len))
        .with_priority(u8::MAX)
        .with_cost_hint(u32::MAX)
        .with_timeout(Duration::MAX);
    let request = (1..limits.max_metadata_entries).fold(request, |r, i| r.with_metadata(format!("k{i}"), "v"));
    let handle = fe.submit(request).await.unwrap();
    assert_eq!(body_of(handle).await.unwrap(), b"largest");
    echo_queries(&fe, 2).await;
    q.shutdown().await;
}

#[tokio::test]
async fn a_query_too_large_for_its_schedulers_smaller_frames_fails_at_once_and_alone() {
    // The scheduler reads frames of at most 1 MiB; the frontend would send up to 8 MiB.
    let t = start(|s| s.max_frame_len = Some(1 << 20)).await;
    let (fe, q, _events) = frontend_and_querier(&t, 1, Duration::from_millis(300)).await;
    let mut waiting = Vec::new();
    for i in 0..3 {
        waiting.push(fe.submit(QueryRequest::new("t", format!("q{i}"))).await.unwrap());
    }
    let started = Instant::now();
    let big = QueryRequest::new("t", vec![b'x'; 2 << 20]).with_timeout(Duration::from_secs(30));
    let Err(QueryError::Invalid(message)) = wait("the big query's answer", fe.query(big)).await else {
        panic!("a query too large for the scheduler was not refused");
    };
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "after {:?}",
        started.elapsed()
    );
    assert!(message.contains("the scheduler's frame limit of 1048576"), "{message}");
    // Its link was never closed: the others ran once each, none placed again.
    for (i, handle) in waiting.into_iter().enumerate() {
        assert_eq!(body_of(handle).await.unwrap(), format!("q{i}").as_bytes());
    }
    assert_eq!(fe.stats().requeued, 0);
    q.shutdown().await;
}

#[tokio::test]
async fn a_querier_configured_for_smaller_frames_than_its_scheduler_runs_a_large_query_beside_others() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let (h, _events) = handler(Duration::from_millis(300));
    let mut c = querier_config(&t, "querier-small");
    c.concurrency = 2;
    c.client.max_frame_len = 1 << 20;
    let q = Querier::start(c, h).unwrap();
    assert!(q.wait_connected(1, WAIT).await);
    let other = fe.submit(QueryRequest::new("t", "other")).await.unwrap();
    // A 2 MiB dispatch, twice the querier's own frame limit, within the scheduler's.
    let big = vec![b'x'; 2 << 20];
    let response = wait("the large query", fe.query(QueryRequest::new("t", big.clone()))).await;
    assert_eq!(response.unwrap().body.collect().await.unwrap(), big);
    assert_eq!(body_of(other).await.unwrap(), b"other");
    q.shutdown().await;
}
