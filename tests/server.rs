//! The broker over real QUIC on loopback, driven with raw protocol frames.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sluice_protocol::*;

#[tokio::test]
async fn enqueue_dispatch_ready_cycle() {
    let t = start(|_| {}).await;
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    let mut w = worker(&q_conn, "querier-1").await;

    accepted(&mut fe, 1, "tenant-a").await;
    w.ready(0).await;
    let d = dispatched(&mut w).await;
    assert_eq!((d.query_id, d.tenant.as_str()), (1, "tenant-a"));
    assert_eq!(d.frontend.id, "fe-1");
    assert_eq!(d.frontend.address, "127.0.0.1:7777");
    assert_eq!(d.actors, ["user-1"]);
    assert_eq!(&d.payload[..], b"query 1");
    assert_eq!(d.metadata, [("traceparent".to_string(), "00-1-2-01".to_string())]);

    // The worker waits for more; an enqueue now reaches it at once.
    w.send(&QuerierToScheduler::Ready {
        worker: 0,
        finished: Some(Finished {
            query_id: 1,
            measured_cost: None,
        }),
    })
    .await;
    accepted(&mut fe, 2, "tenant-b").await;
    assert_eq!(dispatched(&mut w).await.query_id, 2);

    let s = t.status_until("two dispatched", |s| s.counters.dispatched == 2).await;
    assert_eq!((s.queued, s.running, s.frontends.len(), s.workers.len()), (0, 1, 1, 1));
}

#[tokio::test]
async fn tenants_take_turns_across_the_network() {
    let t = start(|_| {}).await;
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    // A flood from one tenant, then one query from another.
    for q in 0..5 {
        accepted(&mut fe, q, "noisy").await;
    }
    accepted(&mut fe, 100, "quiet").await;
    let mut w = worker(&q_conn, "querier-1").await;
    let mut order = Vec::new();
    for _ in 0..3 {
        w.ready(0).await;
        order.push(dispatched(&mut w).await.tenant);
    }
    assert_eq!(order, ["noisy", "quiet", "noisy"]);
}

#[tokio::test]
async fn cancel_removes_a_queued_query() {
    let t = start(|_| {}).await;
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    accepted(&mut fe, 1, "t").await;
    fe.send(&FrontendToScheduler::Cancel { query_id: 1 }).await;
    // Acknowledged once done: by then it is out of the queue.
    assert_eq!(
        fe.next_from_scheduler().await,
        SchedulerToFrontend::Cancelled { query_id: 1 }
    );
    let s = t.server.status().await.unwrap();
    assert_eq!((s.counters.cancelled, s.queued), (1, 0));
    accepted(&mut fe, 2, "t").await;
    let mut w = ready_worker(&q_conn, "q").await;
    assert_eq!(dispatched(&mut w).await.query_id, 2, "the cancelled query is never run");
}

#[tokio::test]
async fn cancel_in_flight_tells_the_querier_and_keeps_its_stream() {
    let t = start(|_| {}).await;
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    let mut w = worker(&q_conn, "q").await;
    accepted(&mut fe, 1, "t").await;
    w.ready(0).await;
    assert_eq!(dispatched(&mut w).await.query_id, 1);
    fe.send(&FrontendToScheduler::Cancel { query_id: 1 }).await;
    assert_eq!(
        w.recv::<SchedulerToQuerier>().await,
        SchedulerToQuerier::Cancel { worker: 0, query_id: 1 }
    );
    assert_eq!(
        fe.next_from_scheduler().await,
        SchedulerToFrontend::Cancelled { query_id: 1 }
    );
    // Same stream, next query.
    w.ready(0).await;
    accepted(&mut fe, 2, "t").await;
    assert_eq!(dispatched(&mut w).await.query_id, 2);
}

/// A frontend and a querier worker on connections of their own, query 1 running on the
/// worker.
struct OneRunning {
    _fe_conn: quinn::Connection,
    fe: Peer,
    q_conn: quinn::Connection,
    w: Peer,
}

async fn one_running(t: &TestServer, querier: &str) -> OneRunning {
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    let mut w = worker(&q_conn, querier).await;
    accepted(&mut fe, 1, "t").await;
    w.ready(0).await;
    assert_eq!(dispatched(&mut w).await.query_id, 1);
    OneRunning {
        _fe_conn: fe_conn,
        fe,
        q_conn,
        w,
    }
}

/// Expects the frontend to be told its query 1 failed with its querier.
async fn querier_failed(fe: &mut Peer) {
    assert!(matches!(
        fe.next_from_scheduler().await,
        SchedulerToFrontend::QueryError {
            query_id: 1,
            kind: QueryErrorKind::QuerierFailed,
            ..
        }
    ));
}

#[tokio::test]
async fn a_querier_that_resets_its_stream_mid_query_fails_the_query_at_once() {
    let t = start(|_| {}).await;
    let OneRunning { mut fe, mut w, .. } = one_running(&t, "querier-9").await;

    let reset_at = Instant::now();
    w.writer.get_mut().reset(0u32.into()).unwrap();
    match fe.next_from_scheduler().await {
        SchedulerToFrontend::QueryError {
            query_id,
            kind,
            message,
        } => {
            assert_eq!((query_id, kind), (1, QueryErrorKind::QuerierFailed));
            assert!(message.contains("querier-9"), "{message}");
        }
        other => panic!("expected a query error, got {other:?}"),
    }
    let elapsed = reset_at.elapsed();
    println!("querier reset → frontend error: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
}

#[tokio::test]
async fn a_querier_connection_closing_mid_query_fails_the_query() {
    let t = start(|_| {}).await;
    let OneRunning {
        mut fe,
        q_conn,
        w: _worker,
        ..
    } = one_running(&t, "q").await;
    q_conn.close(0u32.into(), b"bye");
    querier_failed(&mut fe).await;
}

#[tokio::test]
async fn an_expired_query_is_reported_not_run() {
    let t = start(|_| {}).await;
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    let FrontendToScheduler::Enqueue(mut e) = enqueue(1, "t") else {
        unreachable!()
    };
    e.timeout_ms = Some(20);
    fe.send(&FrontendToScheduler::Enqueue(e)).await;
    assert_eq!(status_of(&mut fe, 1).await, EnqueueStatus::Accepted);
    // No querier: the deadline sweep reports it.
    assert!(matches!(
        fe.next_from_scheduler().await,
        SchedulerToFrontend::QueryError {
            query_id: 1,
            kind: QueryErrorKind::DeadlineExceeded,
            ..
        }
    ));
    let s = t.status_until("expiry counted", |s| s.counters.expired == 1).await;
    assert_eq!(s.queued, 0);
}

#[tokio::test]
async fn per_tenant_limit_answers_too_many_outstanding() {
    let t = start(|s| s.max_outstanding_per_tenant = Some(2)).await;
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    for q in 0..2 {
        accepted(&mut fe, q, "t").await;
    }
    fe.send(&enqueue(2, "t")).await;
    assert_eq!(
        status_of(&mut fe, 2).await,
        EnqueueStatus::TooManyOutstanding { limit: 2 }
    );
    accepted(&mut fe, 3, "other").await;
}

#[tokio::test]
async fn invalid_enqueues_are_answered_not_dropped() {
    let t = start(|_| {}).await;
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    // Before the result endpoint is announced.
    let mut fe = open(&fe_conn, Hello::new(Role::Frontend, "fe-1", StreamKind::FrontendLoop))
        .await
        .unwrap();
    fe.send(&enqueue(1, "t")).await;
    assert!(
        matches!(status_of(&mut fe, 1).await, EnqueueStatus::Invalid { reason } if reason.contains("result endpoint"))
    );
    // One frontend loop per connection: a second is refused.
    let second = open(&fe_conn, Hello::new(Role::Frontend, "fe-2", StreamKind::FrontendLoop)).await;
    assert!(
        matches!(&second, Err(HelloReply::Rejected { code: RejectCode::InvalidHello, message }) if message.contains("one frontend loop")),
        "{:?}",
        second.err()
    );
    // A field over its limit.
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-2").await;
    let FrontendToScheduler::Enqueue(mut e) = enqueue(2, "t") else {
        unreachable!()
    };
    e.actors = vec!["a".into(); 20];
    fe.send(&FrontendToScheduler::Enqueue(e)).await;
    assert!(matches!(status_of(&mut fe, 2).await, EnqueueStatus::Invalid { reason } if reason.contains("actor path")));
    // A duplicate id.
    accepted(&mut fe, 3, "t").await;
    fe.send(&enqueue(3, "t")).await;
    assert!(
        matches!(status_of(&mut fe, 3).await, EnqueueStatus::Invalid { reason } if reason.contains("already queued"))
    );
}

#[tokio::test]
async fn a_closed_frontend_loses_its_queued_queries() {
    let t = start(|_| {}).await;
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    for q in 0..3 {
        accepted(&mut fe, q, "t").await;
    }
    fe_conn.close(0u32.into(), b"gone");
    let s = t.status_until("queue emptied", |s| s.queued == 0).await;
    assert_eq!(s.counters.cancelled, 3);
    assert!(s.frontends.is_empty());
}

#[tokio::test]
async fn shutdown_drains_then_hands_back_what_is_left() {
    let t = start(|s| s.drain_timeout_ms = Some(300)).await;
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    for q in 0..3 {
        accepted(&mut fe, q, "t").await;
    }
    let mut w = worker(&q_conn, "q").await;
    let shutdown = tokio::spawn(t.server.shutdown());
    assert_eq!(fe.next_from_scheduler().await, SchedulerToFrontend::ShuttingDown);
    // New work is refused…
    fe.send(&enqueue(9, "t")).await;
    assert_eq!(status_of(&mut fe, 9).await, EnqueueStatus::ShuttingDown);
    // …queued work still dispatches during the drain…
    w.ready(0).await;
    assert_eq!(dispatched(&mut w).await.query_id, 0);
    // …and what is left is handed back, each query explicitly.
    let mut handed_back = Vec::new();
    while handed_back.len() < 2 {
        match fe.next_from_scheduler().await {
            SchedulerToFrontend::QueryError {
                query_id,
                kind: QueryErrorKind::HandedBack,
                ..
            } => handed_back.push(query_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    handed_back.sort();
    assert_eq!(handed_back, [1, 2]);
    tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
}

#[tokio::test]
async fn querier_shutdown_notice_stops_its_workers() {
    let t = start(|_| {}).await;
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut w = ready_worker(&q_conn, "q-1").await;
    t.status_until("worker waiting", |s| s.workers.len() == 1).await;
    let mut notice = open(&q_conn, Hello::new(Role::Querier, "q-1", StreamKind::ShutdownNotice))
        .await
        .unwrap();
    notice.send(&Notice::QuerierShuttingDown).await;
    assert_eq!(notice.recv::<NoticeReply>().await, NoticeReply::Acknowledged);
    assert_eq!(w.recv::<SchedulerToQuerier>().await, SchedulerToQuerier::ShuttingDown);
}

#[tokio::test]
async fn roles_come_from_certificates() {
    let t = start(|_| {}).await;
    // A querier certificate may not open a frontend loop (so it cannot enqueue)…
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let refused = open(&q_conn, Hello::new(Role::Querier, "q", StreamKind::FrontendLoop)).await;
    assert!(matches!(
        refused,
        Err(HelloReply::Rejected {
            code: RejectCode::RoleNotAllowed,
            ..
        })
    ));
    // …nor claim to be a frontend.
    let refused = open(&q_conn, Hello::new(Role::Frontend, "q", StreamKind::FrontendLoop)).await;
    assert!(
        matches!(refused, Err(HelloReply::Rejected { code: RejectCode::RoleNotAllowed, message }) if message.contains("certificate"))
    );
    // A frontend certificate may not dequeue.
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let refused = open(&fe_conn, Hello::new(Role::Frontend, "fe", StreamKind::DequeueLoop)).await;
    assert!(matches!(
        refused,
        Err(HelloReply::Rejected {
            code: RejectCode::RoleNotAllowed,
            ..
        })
    ));
    // The connection itself stays usable for what the role may do.
    let mut fe = frontend(&fe_conn, "fe").await;
    accepted(&mut fe, 1, "t").await;
}

#[tokio::test]
async fn a_certificate_from_an_unknown_ca_is_refused() {
    let t = start(|_| {}).await;
    let other = tempfile::tempdir().unwrap();
    let (foreign, _) = sluice::tls::ensure_dev_set(other.path()).unwrap();
    // Trust the real CA but present a certificate signed by another one.
    let id = sluice::tls::Identity {
        ca: t.certs.ca_cert.clone(),
        ..foreign.frontend.clone()
    };
    // TLS 1.3 lets the client finish its handshake before the server checks its
    // certificate, so the refusal may show at connect or on the first stream.
    match t.connect(&id).await {
        Err(e) => assert!(e.to_lowercase().contains("certificate") || e.contains("alert"), "{e}"),
        Ok(conn) => {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let hello = encode_to_vec(&Hello::new(Role::Frontend, "x", StreamKind::FrontendLoop), 1024).unwrap();
            let _ = send.write_all(&hello).await;
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(WAIT, recv.read(&mut buf)).await.unwrap();
            assert!(
                read.is_err(),
                "a stream on a refused connection must fail, got {read:?}"
            );
        }
    }
    let s = t.server.status().await.unwrap();
    assert!(s.frontends.is_empty());
}

#[tokio::test]
async fn a_malformed_frame_closes_only_that_connection() {
    let t = start(|_| {}).await;
    let bad_conn = t.connect(&t.certs.frontend).await.unwrap();
    let good_conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut good = frontend(&good_conn, "good").await;
    let mut bad = frontend(&bad_conn, "bad").await;
    // A frame whose body is an unknown variant.
    bad.writer.get_mut().write_all(&[0, 0, 0, 1, 0x7f]).await.unwrap();
    let reason = tokio::time::timeout(WAIT, bad_conn.closed()).await.unwrap();
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, close_code::PROTOCOL_ERROR.into());
            assert!(String::from_utf8_lossy(&c.reason).contains("unknown"), "{c:?}");
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    accepted(&mut good, 1, "t").await;
}

#[tokio::test]
async fn an_oversized_frame_is_refused_before_it_is_read() {
    let t = start(|s| s.max_frame_len = Some(sluice_protocol::MIN_FRAME_LEN)).await;
    let conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut fe = frontend(&conn, "fe").await;
    fe.writer.get_mut().write_all(&[0x00, 0x10, 0x00, 0x00]).await.unwrap(); // 1 MiB announced
    match tokio::time::timeout(WAIT, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, close_code::PROTOCOL_ERROR.into());
            assert!(
                String::from_utf8_lossy(&c.reason).contains("exceeds the maximum"),
                "{c:?}"
            );
        }
        other => panic!("expected an application close, got {other:?}"),
    }
}

#[tokio::test]
async fn a_newer_protocol_version_is_told_what_is_spoken() {
    let t = start(|_| {}).await;
    let conn = t.connect(&t.certs.frontend).await.unwrap();
    let mut hello = Hello::new(Role::Frontend, "fe", StreamKind::FrontendLoop);
    hello.version = PROTOCOL_VERSION + 1;
    match open(&conn, hello).await {
        Err(HelloReply::Rejected {
            code: RejectCode::UnsupportedVersion,
            message,
        }) => assert!(message.contains(&format!("speaks {PROTOCOL_VERSION}")), "{message}"),
        Err(other) => panic!("unexpected {other:?}"),
        Ok(_) => panic!("a newer version was welcomed"),
    }
}

#[tokio::test]
async fn too_many_connections_are_refused() {
    let t = start(|s| s.max_connections = Some(1)).await;
    let _first = t.connect(&t.certs.frontend).await.unwrap();
    t.status_until("first connection registered", |_| true).await;
    let second = t.connect(&t.certs.frontend).await;
    assert!(second.is_err(), "a second connection was accepted");
}

#[tokio::test]
async fn a_lifeline_with_an_unknown_token_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = start(|_| {}).await;
    let mut socket = tokio::net::TcpStream::connect(t.server.quic_addr()).await.unwrap();
    let mut preamble = LIFELINE_MAGIC.to_vec();
    preamble.extend_from_slice(&42u128.to_be_bytes());
    socket.write_all(&preamble).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(WAIT, socket.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a word");
    // Garbage is closed too.
    let mut socket = tokio::net::TcpStream::connect(t.server.quic_addr()).await.unwrap();
    socket.write_all(&[0xff; 20]).await.unwrap();
    let n = tokio::time::timeout(WAIT, socket.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_ready_out_of_turn_closes_the_querier_connection_and_fails_its_running_query() {
    let t = start(|_| {}).await;
    let OneRunning {
        mut fe,
        q_conn,
        w: _busy,
        ..
    } = one_running(&t, "querier-7").await;
    // Another worker of the same querier says Ready twice without being given anything.
    let mut rogue = worker(&q_conn, "querier-7").await;
    rogue.ready(0).await;
    rogue.ready(0).await;
    let reason = tokio::time::timeout(WAIT, q_conn.closed())
        .await
        .expect("the connection is closed");
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, close_code::PROTOCOL_ERROR.into());
        }
        other => panic!("expected a protocol-error close, got {other:?}"),
    }
    // The query it was running fails cleanly at its frontend.
    querier_failed(&mut fe).await;
}

#[tokio::test]
async fn the_frontend_is_told_which_queries_were_dispatched() {
    let t = start(|_| {}).await;
    let OneRunning { mut fe, .. } = one_running(&t, "q").await;
    assert_eq!(
        fe.recv::<SchedulerToFrontend>().await,
        SchedulerToFrontend::Dispatched { query_ids: vec![1] }
    );
}

/// A frontend whose connection is lost still waits for its running queries (their results
/// go straight to it), so they keep running; one that closes on purpose wants nothing more.
#[tokio::test]
async fn running_queries_are_cancelled_only_when_their_frontend_closes_on_purpose() {
    let t = start(|_| {}).await;
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut w = ready_worker(&q_conn, "q").await;
    let mut next_query = 1;
    for (code, cancelled) in [(close_code::PROTOCOL_ERROR, false), (close_code::DONE, true)] {
        let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
        let mut fe = frontend(&fe_conn, "fe-1").await;
        let running = next_query;
        accepted(&mut fe, running, "t").await;
        assert_eq!(dispatched(&mut w).await.query_id, running);
        fe_conn.close(code.into(), b"bye");
        t.status_until("the frontend gone", |s| s.frontends.is_empty()).await;
        // Anything the scheduler sent the worker about the running query comes before
        // the next dispatch.
        if cancelled {
            assert_eq!(
                w.recv::<SchedulerToQuerier>().await,
                SchedulerToQuerier::Cancel {
                    worker: 0,
                    query_id: running
                }
            );
        }
        w.ready(0).await;
        let other = t.connect(&t.certs.frontend).await.unwrap();
        let mut fe2 = frontend(&other, "fe-2").await;
        accepted(&mut fe2, running + 1, "t").await;
        assert_eq!(dispatched(&mut w).await.query_id, running + 1, "close code {code}");
        w.ready(0).await;
        other.close(close_code::DONE.into(), b"bye");
        t.status_until("the second frontend gone", |s| s.frontends.is_empty())
            .await;
        next_query += 2;
    }
}

#[tokio::test]
async fn workers_share_one_dequeue_stream_each_taking_its_own_turns() {
    let t = start(|_| {}).await;
    let fe_conn = t.connect(&t.certs.frontend).await.unwrap();
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe-1").await;
    let mut w = worker(&q_conn, "querier-1").await;
    for worker in [3, 0] {
        w.ready(worker).await;
    }
    t.status_until("two workers", |s| s.workers.len() == 2).await;
    accepted(&mut fe, 1, "t").await;
    accepted(&mut fe, 2, "t").await;
    // Longest waiting first: worker 3 asked first.
    let mut got = Vec::new();
    for _ in 0..2 {
        match w.recv::<SchedulerToQuerier>().await {
            SchedulerToQuerier::Dispatch { worker, dispatch } => got.push((worker, dispatch.query_id)),
            other => panic!("expected a dispatch, got {other:?}"),
        }
    }
    assert_eq!(got, [(3, 1), (0, 2)]);
    // A cancel names the worker that runs the query.
    fe.send(&FrontendToScheduler::Cancel { query_id: 2 }).await;
    assert_eq!(
        w.recv::<SchedulerToQuerier>().await,
        SchedulerToQuerier::Cancel { worker: 0, query_id: 2 }
    );
    assert_eq!(
        fe.next_from_scheduler().await,
        SchedulerToFrontend::Cancelled { query_id: 2 }
    );
    // Worker 0 reports and asks again; worker 3 still runs query 1.
    w.ready(0).await;
    accepted(&mut fe, 3, "t").await;
    assert_eq!(dispatched(&mut w).await.query_id, 3);
    let s = t.status_until("two running", |s| s.running == 2).await;
    assert_eq!(s.workers.iter().filter(|w| w.busy).count(), 2);
    // The stream ends: both its workers' queries fail at their frontend.
    drop(w);
    q_conn.close(0u32.into(), b"");
    // (Query 2 is reported too: the scheduler cannot know that its worker sent nothing
    // after the cancel; the frontend, done with it, ignores the report.)
    let mut failed = std::collections::BTreeSet::new();
    while !(failed.contains(&1) && failed.contains(&3)) {
        if let SchedulerToFrontend::QueryError { query_id, kind, .. } = fe.recv::<SchedulerToFrontend>().await {
            assert_eq!(kind, QueryErrorKind::QuerierFailed);
            failed.insert(query_id);
        }
    }
}

#[tokio::test]
async fn a_worker_numbered_beyond_the_bound_closes_the_querier_connection() {
    let t = start(|_| {}).await;
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut w = worker(&q_conn, "querier-1").await;
    w.ready(MAX_WORKERS_PER_STREAM).await;
    match tokio::time::timeout(WAIT, q_conn.closed()).await.expect("closed") {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, close_code::PROTOCOL_ERROR.into())
        }
        other => panic!("expected a protocol-error close, got {other:?}"),
    }
    let s = t.server.status().await.unwrap();
    assert!(s.workers.is_empty(), "nothing registered: {:?}", s.workers);
}
