//! The client crate against real schedulers over QUIC on loopback: a frontend and
//! queriers as users write them.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use sluice_client::*;
use tokio::sync::mpsc;

/// Answers with the payload, after `delay`; panics on payload "panic"; waits for the
/// cancel on payload "hang" and reports it.
struct TestHandler {
    delay: Duration,
    cancelled: mpsc::UnboundedSender<u64>,
    started: mpsc::UnboundedSender<u64>,
}

impl Handler for TestHandler {
    async fn handle(&self, request: Request) -> Result<Response, HandlerError> {
        let _ = self.started.send(request.query_id);
        match &request.payload[..] {
            b"panic" => panic!("boom"),
            b"fail" => Err(HandlerError("no such metric".into())),
            b"hang" => {
                request.cancelled.cancelled().await;
                let _ = self.cancelled.send(request.query_id);
                Err(HandlerError("cancelled".into()))
            }
            b"deaf" => {
                // Sees its cancel but does not stop, as a handler stuck in a blocking call.
                let (token, tx, id) = (request.cancelled.clone(), self.cancelled.clone(), request.query_id);
                tokio::spawn(async move {
                    token.cancelled().await;
                    let _ = tx.send(id);
                });
                std::future::pending::<()>().await;
                unreachable!()
            }
            b"big" => {
                let (response, body) = Response::stream(200, 2);
                tokio::spawn(async move {
                    for i in 0..64u8 {
                        if body.send(Bytes::from(vec![i; 1 << 20])).await.is_err() {
                            return;
                        }
                    }
                    body.finish().await;
                });
                Ok(response)
            }
            b"breaks-midway" => {
                // The producer sends part of the body and then fails (here: it is dropped
                // without finishing, as a panicking producer task would be).
                let (response, body) = Response::stream(200, 4);
                tokio::spawn(async move {
                    let _ = body.send(Bytes::from_static(b"first half")).await;
                    drop(body);
                });
                Ok(response)
            }
            p if p.starts_with(b"cost:") => {
                let cost = std::str::from_utf8(&p[5..]).unwrap().parse().unwrap();
                Ok(Response::ok(request.payload.clone()).with_cost(cost))
            }
            _ => {
                tokio::time::sleep(self.delay).await;
                let mut r = Response::ok(request.payload.clone());
                r.metadata.push(("tenant".into(), request.tenant.clone()));
                Ok(r)
            }
        }
    }
}

struct Events {
    cancelled: mpsc::UnboundedReceiver<u64>,
    started: mpsc::UnboundedReceiver<u64>,
}

fn handler(delay: Duration) -> (TestHandler, Events) {
    let (ctx, crx) = mpsc::unbounded_channel();
    let (stx, srx) = mpsc::unbounded_channel();
    (
        TestHandler {
            delay,
            cancelled: ctx,
            started: stx,
        },
        Events {
            cancelled: crx,
            started: srx,
        },
    )
}

async fn frontend_for(servers: &[&TestServer]) -> Frontend {
    let config = FrontendConfig::new(
        "frontend-1",
        servers[0].certs.frontend.clone(),
        servers.iter().map(|t| t.server.quic_addr()).collect(),
    );
    Frontend::connect(config).await.unwrap()
}

fn querier_for(id: &str, servers: &[&TestServer], concurrency: usize, h: TestHandler) -> Querier {
    let mut config = QuerierConfig::new(
        id,
        servers[0].certs.querier.clone(),
        servers.iter().map(|t| t.server.quic_addr()).collect(),
    );
    config.concurrency = concurrency;
    Querier::start(config, h).unwrap()
}

/// Waits until the frontend is connected to `n` schedulers.
async fn wait_connected(fe: &Frontend, n: usize) {
    wait("scheduler connections", async {
        while fe.connected_schedulers() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_measured_cost_reaches_the_schedulers_account() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let (h, _events) = handler(Duration::ZERO);
    let q = querier_for("querier-1", &[&t], 1, h);
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

#[tokio::test]
async fn request_to_result() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let (h, _events) = handler(Duration::ZERO);
    let q = querier_for("querier-1", &[&t], 2, h);
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
    let fe = frontend_for(&[&t]).await;
    let (h, _events) = handler(Duration::from_millis(1));
    let q = querier_for("querier-1", &[&t], 8, h);
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

/// Awaits every future, concurrently.
async fn futures_join<T: Send + 'static>(
    futs: impl Iterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let tasks: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(wait("a query", t).await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_64_mib_result_streams_in_chunks() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let (h, _events) = handler(Duration::ZERO);
    let q = querier_for("querier-1", &[&t], 1, h);
    let handle = fe.submit(QueryRequest::new("t", "big")).await.unwrap();
    let mut response = wait("response", handle.response()).await.unwrap();
    let (mut total, mut chunks, mut largest) = (0usize, 0usize, 0usize);
    while let Some(chunk) = wait("a chunk", response.body.chunk()).await {
        let chunk = chunk.unwrap();
        assert!(chunk.iter().all(|&b| b == (total >> 20) as u8), "bytes in order");
        total += chunk.len();
        largest = largest.max(chunk.len());
        chunks += 1;
    }
    assert_eq!(total, 64 << 20);
    assert!(largest <= 256 * 1024, "sent in chunks, not whole");
    assert!(chunks >= 256);
    q.shutdown().await;
}

#[tokio::test]
async fn a_worker_takes_its_next_query_while_a_result_is_still_delivered_and_keeps_only_one_in_flight() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let (h, mut events) = handler(Duration::ZERO);
    let q = querier_for("querier-1", &[&t], 1, h);
    // A 64 MiB body that nobody reads yet: its delivery stalls on flow control.
    let big = fe.submit(QueryRequest::new("t", "big")).await.unwrap();
    let big_id = big.id();
    let mut big = wait("big's head", big.response()).await.unwrap();
    assert_eq!(wait("big started", events.started.recv()).await, Some(big_id));
    // The only worker is free again: the next query runs meanwhile...
    let small = fe.submit(QueryRequest::new("t", "small")).await.unwrap();
    let small_id = small.id();
    assert_eq!(wait("small started", events.started.recv()).await, Some(small_id));
    // ...but it takes no third query while two results are on their way.
    let third = fe.submit(QueryRequest::new("t", "third")).await.unwrap();
    let third_id = third.id();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.started.recv())
            .await
            .is_err(),
        "a third query ran while the first result was still undelivered"
    );
    let mut total = 0;
    while let Some(chunk) = wait("a chunk", big.body.chunk()).await {
        total += chunk.unwrap().len();
    }
    assert_eq!(total, 64 << 20);
    assert_eq!(body_of(small).await.unwrap(), b"small");
    assert_eq!(wait("third started", events.started.recv()).await, Some(third_id));
    assert_eq!(body_of(third).await.unwrap(), b"third");
    q.shutdown().await;
}

#[tokio::test]
async fn dropping_a_handle_cancels_a_queued_query() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let handle = fe.submit(QueryRequest::new("t", "q")).await.unwrap();
    drop(handle);
    let s = t.status_until("cancelled", |s| s.counters.cancelled == 1).await;
    assert_eq!(s.queued, 0);
    assert_eq!(fe.outstanding(), 0);
}

#[tokio::test]
async fn dropping_a_handle_cancels_a_running_query() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let (h, mut events) = handler(Duration::ZERO);
    let q = querier_for("querier-1", &[&t], 1, h);
    let handle = fe.submit(QueryRequest::new("t", "hang")).await.unwrap();
    let id = wait("started", events.started.recv()).await.unwrap();
    drop(handle);
    assert_eq!(wait("handler saw the cancel", events.cancelled.recv()).await, Some(id));
    // The worker is free again.
    let handle = fe.submit(QueryRequest::new("t", "after")).await.unwrap();
    assert_eq!(body_of(handle).await.unwrap(), b"after");
    q.shutdown().await;
}

#[tokio::test]
async fn handler_errors_and_panics_fail_the_query_not_the_worker() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let (h, _events) = handler(Duration::ZERO);
    let q = querier_for("querier-1", &[&t], 1, h);
    let err = body_of(fe.submit(QueryRequest::new("t", "fail")).await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(err, QueryError::Failed("no such metric".into()));
    let err = body_of(fe.submit(QueryRequest::new("t", "panic")).await.unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QueryError::Failed(m) if m.contains("panicked") && m.contains("boom")),
        "{err:?}"
    );
    // Same single worker, still alive.
    assert_eq!(
        body_of(fe.submit(QueryRequest::new("t", "ok")).await.unwrap())
            .await
            .unwrap(),
        b"ok"
    );
    q.shutdown().await;
}

#[tokio::test]
async fn a_querier_killed_mid_query_fails_the_query_promptly() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let (h, mut events) = handler(Duration::ZERO);
    let q = querier_for("querier-1", &[&t], 1, h);
    let handle = fe.submit(QueryRequest::new("t", "hang")).await.unwrap();
    wait("started", events.started.recv()).await;
    let killed = Instant::now();
    q.abort();
    let err = wait("the error", handle.response()).await.unwrap_err();
    let took = killed.elapsed();
    assert!(matches!(err, QueryError::QuerierFailed(_)), "{err:?}");
    println!("querier aborted → frontend error: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[tokio::test]
async fn a_deadline_passed_in_the_queue_is_an_error() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let mut req = QueryRequest::new("t", "q");
    req.timeout = Some(Duration::from_millis(30));
    let err = body_of(fe.submit(req).await.unwrap()).await.unwrap_err();
    assert!(matches!(err, QueryError::DeadlineExceeded(_)), "{err:?}");
}

#[tokio::test]
async fn too_many_outstanding_is_retried_on_another_scheduler() {
    let dir = cluster_dir();
    let a = start_in(dir.clone(), |s| s.max_outstanding_per_tenant = Some(1)).await;
    let b = start_in(dir, |s| s.max_outstanding_per_tenant = Some(1)).await;
    // One scheduler: the second query is refused.
    let alone = frontend_for(&[&a]).await;
    let _first = alone.submit(QueryRequest::new("t", "1")).await.unwrap();
    let err = alone.submit(QueryRequest::new("t", "2")).await.unwrap_err();
    assert_eq!(err, QueryError::TooManyOutstanding { limit: 1 });
    // Two schedulers: whichever is full, the other takes it; a third finds both full.
    let both = frontend_for(&[&b, &a]).await;
    wait_connected(&both, 2).await;
    let _second = both.submit(QueryRequest::new("t", "2")).await.unwrap();
    let err = both.submit(QueryRequest::new("t", "3")).await.unwrap_err();
    assert_eq!(err, QueryError::TooManyOutstanding { limit: 1 });
    let (sa, sb) = (a.server.status().await.unwrap(), b.server.status().await.unwrap());
    assert_eq!((sa.queued, sb.queued), (1, 1));
}

#[tokio::test]
async fn queries_on_a_crashed_scheduler_complete_on_the_other() {
    let dir = cluster_dir();
    let a = start_in(dir.clone(), |s| s.max_outstanding_per_tenant = Some(1000)).await;
    let b = start_in(dir, |s| s.max_outstanding_per_tenant = Some(1000)).await;
    let fe = frontend_for(&[&a, &b]).await;
    wait_connected(&fe, 2).await;
    let mut handles = Vec::new();
    for i in 0..40 {
        handles.push((i, fe.submit(QueryRequest::new("t", format!("q{i}"))).await.unwrap()));
    }
    let on_a = a.server.status().await.unwrap().queued;
    assert!(on_a > 0, "both schedulers got work");
    a.server.abort();
    let (h, _events) = handler(Duration::ZERO);
    let q = querier_for("querier-1", &[&b], 4, h);
    for (i, handle) in handles {
        assert_eq!(body_of(handle).await.unwrap(), format!("q{i}").as_bytes(), "query {i}");
    }
    assert_eq!(fe.stats().requeued as usize, on_a);
    q.shutdown().await;
}

#[tokio::test]
async fn a_draining_scheduler_hands_queries_back_to_be_run_elsewhere() {
    let dir = cluster_dir();
    let a = start_in(dir.clone(), |s| s.drain_timeout_ms = Some(50)).await;
    let b = start_in(dir, |_| {}).await;
    let fe = frontend_for(&[&a, &b]).await;
    wait_connected(&fe, 2).await;
    let mut handles = Vec::new();
    for i in 0..20 {
        handles.push((i, fe.submit(QueryRequest::new("t", format!("q{i}"))).await.unwrap()));
    }
    wait("drain", a.server.shutdown()).await;
    let (h, _events) = handler(Duration::ZERO);
    let q = querier_for("querier-1", &[&b], 2, h);
    for (i, handle) in handles {
        assert_eq!(body_of(handle).await.unwrap(), format!("q{i}").as_bytes());
    }
    q.shutdown().await;
}

#[tokio::test]
async fn querier_graceful_shutdown_loses_nothing() {
    let t = start(|s| s.max_outstanding_per_tenant = Some(1000)).await;
    let fe = frontend_for(&[&t]).await;
    let (h, mut events) = handler(Duration::from_millis(100));
    let first = querier_for("querier-1", &[&t], 2, h);
    let mut handles = Vec::new();
    for i in 0..10 {
        handles.push((i, fe.submit(QueryRequest::new("t", format!("q{i}"))).await.unwrap()));
    }
    wait("two running", async {
        events.started.recv().await;
        events.started.recv().await;
    })
    .await;
    // Shut down while two queries run and eight wait; a second querier takes over.
    let shutdown = tokio::spawn(first.shutdown());
    let (h2, _events2) = handler(Duration::ZERO);
    let second = querier_for("querier-2", &[&t], 2, h2);
    for (i, handle) in handles {
        assert_eq!(body_of(handle).await.unwrap(), format!("q{i}").as_bytes());
    }
    wait("shutdown", shutdown).await.unwrap();
    let s = t.server.status().await.unwrap();
    assert_eq!((s.counters.dispatched, s.queued), (10, 0));
    second.shutdown().await;
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
async fn results_are_accepted_only_with_their_capability_for_outstanding_queries_of_the_same_tenant() {
    use sluice_protocol::*;
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let handle = fe.submit(QueryRequest::new("tenant-a", "q")).await.unwrap();
    // A raw querier worker takes the query and learns its capability from the dispatch.
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut w = worker(&q_conn, "q").await;
    w.send(&QuerierToScheduler::Ready {
        worker: 0,
        finished: None,
    })
    .await;
    let capability = dispatched(&mut w).await.capability;
    let addr: std::net::SocketAddr = fe.result_address().address.parse().unwrap();
    let send = move |id: sluice_client::tls::Identity, query_id: u64, tenant: &'static str, forged: bool| async move {
        let conn = connect(addr, &id).await?;
        let mut peer = open_result(&conn, "q").await;
        peer.send(&ResultFrame::Head {
            query_id,
            tenant: tenant.into(),
            capability: if forged { capability ^ 1 } else { capability },
            status: 200,
            metadata: vec![],
        })
        .await;
        peer.send(&ResultFrame::Chunk(Bytes::from_static(b"x"))).await;
        peer.send(&ResultFrame::End { total_len: 1 }).await;
        Ok::<ResultReceipt, String>(peer.recv::<ResultReceipt>().await)
    };
    let querier_id = t.certs.querier.clone();
    // Wrong tenant, unknown query: refused.
    assert_eq!(
        send(querier_id.clone(), handle.id(), "tenant-b", false).await.unwrap(),
        ResultReceipt::Refused {
            reason: RefuseReason::TenantMismatch
        }
    );
    assert_eq!(
        send(querier_id.clone(), 999, "tenant-a", false).await.unwrap(),
        ResultReceipt::Refused {
            reason: RefuseReason::UnknownQuery
        }
    );
    // A frontend certificate may not deliver results at all: the connection is closed.
    let conn = connect(addr, &t.certs.frontend).await.unwrap();
    match tokio::time::timeout(WAIT, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(c.error_code, close_code::ROLE_NOT_ALLOWED.into()),
        other => panic!("{other:?}"),
    }
    // Any querier certificate, the right query and tenant, but not the query's capability:
    // a querier that was never given the query cannot answer it.
    let id = handle.id();
    assert_eq!(
        send(querier_id.clone(), id, "tenant-a", true).await.unwrap(),
        ResultReceipt::Refused {
            reason: RefuseReason::WrongCapability
        }
    );
    assert_eq!(fe.stats().forged_results, 1);
    // The right one is delivered; a second copy is refused and counted.
    assert_eq!(
        send(querier_id.clone(), id, "tenant-a", false).await.unwrap(),
        ResultReceipt::Delivered
    );
    assert_eq!(body_of(handle).await.unwrap(), b"x");
    assert_eq!(
        send(querier_id, id, "tenant-a", false).await.unwrap(),
        ResultReceipt::Refused {
            reason: RefuseReason::UnknownQuery
        }
    );
    assert_eq!(fe.stats().unknown_results, 2);
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
    let dir = cluster_dir();
    let a = start_in(dir.clone(), |s| s.max_outstanding_per_tenant = Some(1000)).await;
    let b = start_in(dir, |s| s.max_outstanding_per_tenant = Some(1000)).await;
    let fe = frontend_for(&[&a, &b]).await;
    wait_connected(&fe, 2).await;
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

/// A result can overtake its own enqueue acknowledgement (they travel on different
/// connections). A fake scheduler forces that order: the query must still succeed.
#[tokio::test]
async fn a_result_that_overtakes_its_enqueue_ack_is_delivered() {
    use sluice_protocol::*;
    let dir = tempfile::tempdir().unwrap();
    let (certs, _) = sluice::tls::ensure_dev_set(dir.path()).unwrap();
    let endpoint = quinn::Endpoint::server(
        sluice::tls::quic_server(&certs.scheduler).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let scheduler_addr = endpoint.local_addr().unwrap();
    let querier_identity = certs.querier.clone();
    let fake = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (send, recv) = conn.accept_bi().await.unwrap();
        let mut peer = Peer {
            reader: FramedRead::new(recv, 1 << 20),
            writer: FramedWrite::new(send, 1 << 20),
        };
        peer.reader.hello().await.unwrap().unwrap();
        peer.send(&HelloReply::Welcome { id: "fake".into() }).await;
        let FrontendToScheduler::ResultEndpoint(result_at) = peer.recv::<FrontendToScheduler>().await else {
            panic!("expected the result endpoint first")
        };
        let FrontendToScheduler::Enqueue(e) = peer.recv::<FrontendToScheduler>().await else {
            panic!("expected an enqueue")
        };
        // Deliver the result as a querier would, before acknowledging the enqueue.
        let to_frontend = connect(result_at.address.parse().unwrap(), &querier_identity)
            .await
            .unwrap();
        let mut result = open_result(&to_frontend, "q").await;
        result
            .send(&ResultFrame::Head {
                query_id: e.query_id,
                tenant: e.tenant.clone(),
                capability: e.capability,
                status: 200,
                metadata: vec![],
            })
            .await;
        result.send(&ResultFrame::Chunk(Bytes::from_static(b"early"))).await;
        result.send(&ResultFrame::End { total_len: 5 }).await;
        assert_eq!(result.recv::<ResultReceipt>().await, ResultReceipt::Delivered);
        peer.send(&SchedulerToFrontend::EnqueueStatus {
            query_id: e.query_id,
            status: EnqueueStatus::Accepted,
            load: LoadHint::default(),
            estimated_wait_ms: None,
        })
        .await;
        // Keep the connection until the test is done.
        tokio::time::sleep(WAIT).await;
    });
    let fe = Frontend::connect(FrontendConfig::new("fe", certs.frontend.clone(), vec![scheduler_addr]))
        .await
        .unwrap();
    let handle = wait("submit", fe.submit(QueryRequest::new("t", "q"))).await.unwrap();
    assert_eq!(body_of(handle).await.unwrap(), b"early");
    fake.abort();
}

#[tokio::test]
async fn a_body_that_fails_midway_ends_in_an_error_not_a_shorter_success() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let (h, _events) = handler(Duration::ZERO);
    let q = querier_for("querier-1", &[&t], 1, h);
    let handle = fe.submit(QueryRequest::new("t", "breaks-midway")).await.unwrap();
    let mut body = wait("a response", handle.response()).await.unwrap().body;
    assert_eq!(
        wait("the first chunk", body.chunk()).await.unwrap().unwrap(),
        "first half"
    );
    let end = wait("the end", body.chunk()).await;
    assert!(
        matches!(&end, Some(Err(QueryError::Failed(m))) if m.contains("without finishing")),
        "{end:?}"
    );
    assert!(body.chunk().await.is_none());
    q.shutdown().await;
}

#[tokio::test]
async fn a_hung_handler_is_cancelled_at_the_deadline_and_its_worker_freed() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let (h, mut events) = handler(Duration::ZERO);
    let mut config = QuerierConfig::new("querier-1", t.certs.querier.clone(), vec![t.server.quic_addr()]);
    config.concurrency = 1;
    config.cancel_grace = Duration::from_millis(200);
    let q = Querier::start(config, h).unwrap();
    let mut req = QueryRequest::new("t", "deaf");
    req.timeout = Some(Duration::from_secs(1));
    let submitted = Instant::now();
    let handle = fe.submit(req).await.unwrap();
    let id = wait("started", events.started.recv()).await.unwrap();
    let err = wait("the deadline", handle.response()).await.unwrap_err();
    let took = submitted.elapsed();
    assert!(matches!(err, QueryError::DeadlineExceeded(_)), "{err:?}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(1800),
        "{took:?}"
    );
    assert_eq!(wait("the handler's cancel", events.cancelled.recv()).await, Some(id));
    // The only worker is free again: the handler that ignored its cancel was aborted.
    let handle = fe.submit(QueryRequest::new("t", "after")).await.unwrap();
    assert_eq!(body_of(handle).await.unwrap(), b"after");
    q.shutdown().await;
}

#[tokio::test]
async fn the_deadline_holds_across_a_hand_back() {
    let t = start(|s| s.drain_timeout_ms = Some(10)).await;
    let fe = frontend_for(&[&t]).await;
    let mut req = QueryRequest::new("t", "q");
    req.timeout = Some(Duration::from_secs(2));
    let submitted = Instant::now();
    let handle = fe.submit(req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // the scheduler drains at 0.5 s
    wait("drain", t.server.shutdown()).await;
    // Handed back with 1.5 s left; no scheduler to take it: it ends at its deadline, not
    // 2 s after the hand-back and not at the frontend's enqueue wait (5 s).
    let err = wait("the deadline", handle.response()).await.unwrap_err();
    let took = submitted.elapsed();
    assert!(matches!(err, QueryError::DeadlineExceeded(_)), "{err:?}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(2600),
        "{took:?}"
    );
    assert_eq!(fe.stats().requeued, 1);
}

#[tokio::test]
async fn a_retriable_query_whose_querier_dies_runs_again_elsewhere() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let (h1, mut events) = handler(Duration::ZERO);
    let q1 = querier_for("querier-1", &[&t], 1, h1);
    let mut req = QueryRequest::new("t", "hang");
    req.retriable = true;
    let handle = fe.submit(req).await.unwrap();
    wait("started on querier-1", events.started.recv()).await;
    // A second querier that answers with the attempt number, then the first one dies.
    struct Attempt;
    impl Handler for Attempt {
        async fn handle(&self, request: Request) -> Result<Response, HandlerError> {
            Ok(Response::ok(format!("attempt {}", request.attempt)))
        }
    }
    let mut config = QuerierConfig::new("querier-2", t.certs.querier.clone(), vec![t.server.quic_addr()]);
    config.concurrency = 1;
    let q2 = Querier::start(config, Attempt).unwrap();
    assert!(q2.wait_connected(1, WAIT).await);
    q1.abort();
    assert_eq!(body_of(handle).await.unwrap(), b"attempt 2");
    assert_eq!(fe.stats().redelivered, 1);
    q2.shutdown().await;
}

#[tokio::test]
async fn handlers_from_closures_and_behind_arc_dyn_serve_queries() {
    use sluice_client::{DynHandler, handler_fn};
    use std::sync::Arc;
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let config = |id: &str| {
        let mut c = QuerierConfig::new(id, t.certs.querier.clone(), vec![t.server.quic_addr()]);
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
async fn a_result_stream_from_another_protocol_version_closes_the_querier_connection_with_the_reason() {
    use sluice_protocol::*;
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let addr: std::net::SocketAddr = fe.result_address().address.parse().unwrap();
    let conn = connect(addr, &t.certs.querier).await.unwrap();
    let (send, _recv) = conn.open_bi().await.unwrap();
    let mut writer = FramedWrite::new(send, 1 << 20);
    let mut hello = Hello::new(Role::Querier, "q", StreamKind::Result);
    hello.version = PROTOCOL_VERSION + 1;
    writer.send(&hello).await.unwrap();
    match tokio::time::timeout(WAIT, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, close_code::PROTOCOL_ERROR.into());
            let reason = String::from_utf8_lossy(&c.reason);
            assert!(reason.contains("not supported"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
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
    let mut config = QuerierConfig::new("querier-1", t.certs.querier.clone(), vec![t.server.quic_addr()]);
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
    let q = Querier::start(
        QuerierConfig::new("querier-1", t.certs.querier.clone(), vec![t.server.quic_addr()]),
        handler,
    )
    .unwrap();
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
async fn cancel_returns_once_the_scheduler_acted_on_it_queued_or_running() {
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    // Queued (no querier yet): acknowledged, and by then it is out of the queue.
    let queued = fe.submit(QueryRequest::new("t", "q")).await.unwrap();
    assert_eq!(wait("the cancel", queued.cancel()).await, CancelOutcome::Acknowledged);
    let s = t.server.status().await.unwrap();
    assert_eq!((s.queued, s.counters.cancelled), (0, 1));
    // Running: acknowledged once the querier was told; the handler sees its cancel.
    let (h, mut events) = handler(Duration::ZERO);
    let q = querier_for("querier-1", &[&t], 1, h);
    let running = fe.submit(QueryRequest::new("t", "hang")).await.unwrap();
    let id = running.id();
    assert_eq!(wait("the handler", events.started.recv()).await, Some(id));
    assert_eq!(wait("the cancel", running.cancel()).await, CancelOutcome::Acknowledged);
    assert_eq!(wait("the handler's cancel", events.cancelled.recv()).await, Some(id));
    // Answered but not read: nothing left to cancel.
    let done = fe.submit(QueryRequest::new("t", "fast")).await.unwrap();
    wait("the answer", async {
        while done.placement().is_some() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(done.cancel().await, CancelOutcome::AlreadyEnded);
    assert_eq!(fe.outstanding(), 0);
    q.shutdown().await;
}

#[tokio::test]
async fn a_querier_with_more_workers_than_a_stream_carries_is_refused_at_start() {
    let t = start(|_| {}).await;
    let (h, _events) = handler(Duration::ZERO);
    let config = QuerierConfig::new("q", t.certs.querier.clone(), vec![t.server.quic_addr()])
        .with_concurrency(usize::from(sluice_protocol::MAX_WORKERS_PER_STREAM) + 1);
    match Querier::start(config, h) {
        Err(ClientError::Config(message)) => assert!(message.contains("at most 1024"), "{message}"),
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("started with too many workers"),
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
async fn a_query_the_scheduler_expects_to_miss_its_deadline_is_refused_at_once() {
    let t = start(|s| s.max_outstanding_per_tenant = Some(1000)).await;
    let fe = frontend_for(&[&t]).await;
    let (h, _events) = handler(Duration::from_millis(20));
    let q = querier_for("q", &[&t], 2, h);
    assert!(q.wait_connected(2, WAIT).await);
    // A backlog of about two seconds: 200 queries of 20 ms on 2 workers.
    let mut backlog = Vec::new();
    for i in 0..200 {
        let query = QueryRequest::new("t", format!("q{i}")).with_timeout(Duration::from_secs(30));
        backlog.push(fe.submit(query).await.unwrap());
    }
    // Once the scheduler has measured the backlog's rate (half a second of it), a query
    // due in 100 ms is refused at enqueue with the estimate, instead of expiring queued.
    let refused = wait("a refusal", async {
        loop {
            let probe = QueryRequest::new("t", "probe").with_timeout(Duration::from_millis(100));
            let started = Instant::now();
            let outcome = match fe.submit(probe).await {
                Ok(handle) => body_of(handle).await,
                Err(refused) => Err(refused),
            };
            match outcome {
                Err(QueryError::WouldMissDeadline { estimated_wait }) => break (estimated_wait, started.elapsed()),
                Err(QueryError::DeadlineExceeded(_)) => {} // not measured yet: queued, expired
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert!(refused.0 > Duration::from_millis(100), "{refused:?}");
    assert!(refused.1 < Duration::from_millis(100), "refused at once: {refused:?}");
    // One with time enough is accepted and told how long it should wait.
    let patient = QueryRequest::new("t", "patient").with_timeout(Duration::from_secs(30));
    let handle = fe.submit(patient).await.unwrap();
    let estimate = handle.placement().and_then(|p| p.estimated_wait);
    assert!(estimate.is_some_and(|w| w > Duration::from_millis(100)), "{estimate:?}");
    assert_eq!(body_of(handle).await.unwrap(), b"patient".as_slice());
    for (i, handle) in backlog.into_iter().enumerate() {
        assert_eq!(body_of(handle).await.unwrap(), format!("q{i}").as_bytes());
    }
    q.shutdown().await;
}

#[tokio::test]
async fn whole_results_share_one_stream_and_are_acknowledged_in_order() {
    use sluice_protocol::*;
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let submitted = [
        fe.submit(QueryRequest::new("t", "one")).await.unwrap(),
        fe.submit(QueryRequest::new("t", "two")).await.unwrap(),
    ];
    // A raw querier takes both.
    let sched = t.connect(&t.certs.querier).await.unwrap();
    let mut w = worker(&sched, "raw-querier").await;
    let mut dispatches = Vec::new();
    for worker in 0..2 {
        w.send(&QuerierToScheduler::Ready { worker, finished: None }).await;
        dispatches.push(dispatched(&mut w).await);
    }
    dispatches.sort_by_key(|d| d.query_id);
    let (one, two) = (&dispatches[0], &dispatches[1]);
    let whole = |d: &Dispatch, body: &'static str| ResultFrame::Whole {
        query_id: d.query_id,
        tenant: d.tenant.clone(),
        capability: d.capability,
        status: 200,
        metadata: vec![("k".into(), "v".into())],
        body: bytes::Bytes::from_static(body.as_bytes()),
    };

    // Three results in one write: one taken, one for no such query, one failure.
    let addr: std::net::SocketAddr = fe.result_address().address.parse().unwrap();
    let conn = connect(addr, &t.certs.querier).await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let (mut writer, mut reader) = (FramedWrite::new(send, 1 << 20), FramedRead::new(recv, 1 << 20));
    writer
        .buffer(&Hello::new(Role::Querier, "raw-querier", StreamKind::Results))
        .unwrap();
    writer.buffer(&whole(one, "the first")).unwrap();
    let mut stranger = whole(one, "nobody asked");
    if let ResultFrame::Whole { query_id, .. } = &mut stranger {
        *query_id = 999_999;
    }
    writer.buffer(&stranger).unwrap();
    writer
        .buffer(&ResultFrame::Error {
            query_id: two.query_id,
            tenant: two.tenant.clone(),
            capability: two.capability,
            message: "it broke".into(),
        })
        .unwrap();
    writer.flush().await.unwrap();
    let mut acks = Vec::new();
    for _ in 0..3 {
        let ack: ResultAck = wait("an ack", async { reader.next().await.unwrap().unwrap() }).await;
        acks.push(ack);
    }
    assert_eq!(
        acks,
        [
            ResultAck {
                query_id: one.query_id,
                receipt: ResultReceipt::Delivered
            },
            ResultAck {
                query_id: 999_999,
                receipt: ResultReceipt::Refused {
                    reason: RefuseReason::UnknownQuery
                }
            },
            ResultAck {
                query_id: two.query_id,
                receipt: ResultReceipt::Delivered
            },
        ]
    );
    let [first, second] = submitted;
    let response = first.response().await.unwrap();
    assert_eq!(response.metadata, vec![("k".to_string(), "v".to_string())]);
    assert_eq!(response.body.collect().await.unwrap(), b"the first");
    assert!(matches!(second.response().await, Err(QueryError::Failed(m)) if m == "it broke"));

    // The same result again is not taken twice.
    writer.send(&whole(one, "again")).await.unwrap();
    let ack: ResultAck = reader.next().await.unwrap().unwrap();
    assert!(matches!(ack.receipt, ResultReceipt::Refused { .. }), "{ack:?}");

    // Anything but a whole result breaks the protocol of this stream.
    writer.send(&ResultFrame::End { total_len: 0 }).await.unwrap();
    match tokio::time::timeout(WAIT, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(c.error_code, close_code::PROTOCOL_ERROR.into()),
        other => panic!("{other:?}"),
    }
}

/// A frontend whose shared results stream breaks before its acknowledgement (a fake one:
/// it reads the result, then resets the stream), or that never acknowledges it (alive, not
/// reading): the querier sends the result again on a stream of its own, and its handler
/// ran once.
#[tokio::test]
async fn a_result_the_shared_stream_did_not_carry_goes_on_its_own_stream() {
    shared_stream_fails(false).await;
}

#[tokio::test]
async fn a_shared_stream_that_is_never_acknowledged_is_given_up() {
    shared_stream_fails(true).await;
}

async fn shared_stream_fails(silent: bool) {
    use sluice_protocol::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let t = start(|_| {}).await;
    let endpoint = quinn::Endpoint::server(
        sluice::tls::quic_server(&t.certs.frontend).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let result_at = endpoint.local_addr().unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(StreamKind, ResultFrame)>();
    let fake = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        while let Ok((send, recv)) = conn.accept_bi().await {
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let mut peer = Peer {
                    reader: FramedRead::new(recv, 1 << 20),
                    writer: FramedWrite::new(send, 1 << 20),
                };
                let hello = peer.reader.hello().await.unwrap().unwrap();
                let first: ResultFrame = peer.recv().await;
                let _ = seen_tx.send((hello.stream, first.clone()));
                if hello.stream == StreamKind::Results {
                    // Read, then broken or silent: no acknowledgement ever comes.
                    if silent {
                        tokio::time::sleep(WAIT * 2).await;
                    }
                    let _ = peer.writer.get_mut().reset(0u32.into());
                    let _ = peer.reader.get_mut().stop(0u32.into());
                    return;
                }
                loop {
                    if let ResultFrame::End { .. } = peer.recv::<ResultFrame>().await {
                        break;
                    }
                }
                peer.send(&ResultReceipt::Delivered).await;
                tokio::time::sleep(WAIT).await;
            });
        }
    });

    // A raw frontend whose results go to the fake endpoint.
    let conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut fe = open(
        &conn,
        Hello::new(Role::Frontend, "raw-frontend", StreamKind::FrontendLoop),
    )
    .await
    .expect("welcome");
    fe.send(&FrontendToScheduler::ResultEndpoint(FrontendAddress {
        id: "raw-frontend".into(),
        address: result_at.to_string(),
        server_name: "localhost".into(),
    }))
    .await;
    accepted(&mut fe, 1, "t").await;

    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let handler = handler_fn(move |request: Request| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { Ok(Response::ok(request.payload)) }
    });
    let mut config = QuerierConfig::new("querier-1", t.certs.querier.clone(), vec![t.server.quic_addr()]);
    config.concurrency = 1;
    // How long a shared stream may leave a result unacknowledged.
    config.idle_timeout = Duration::from_secs(1);
    let q = Querier::start(config, handler).unwrap();
    let (kind, frame) = wait("the shared stream", seen.recv()).await.unwrap();
    assert_eq!(kind, StreamKind::Results);
    assert!(matches!(frame, ResultFrame::Whole { query_id: 1, .. }), "{frame:?}");
    let (kind, frame) = wait("its own stream", seen.recv()).await.unwrap();
    assert_eq!(kind, StreamKind::Result);
    assert!(matches!(frame, ResultFrame::Head { query_id: 1, .. }), "{frame:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    q.shutdown().await;
    fake.abort();
}
