//! The result path, querier to frontend: large and streamed results, the shared stream of whole
//! results and its acknowledgements, capabilities, ordering against the enqueue's answer.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::client::*;
use common::*;
use sluice_client::*;
use tokio::sync::mpsc;

#[tokio::test]
async fn a_64_mib_result_streams_in_chunks() {
    let t = start(|_| {}).await;
    let (fe, q, _events) = frontend_and_querier(&t, 1, Duration::ZERO).await;
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
    let (fe, q, mut events) = frontend_and_querier(&t, 1, Duration::ZERO).await;
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
async fn results_are_accepted_only_with_their_capability_for_outstanding_queries_of_the_same_tenant() {
    use sluice_protocol::*;
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let handle = fe.submit(QueryRequest::new("tenant-a", "q")).await.unwrap();
    // A raw querier worker takes the query and learns its capability from the dispatch.
    let q_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut w = ready_worker(&q_conn, "q").await;
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
        peer.send(&HelloReply::Welcome {
            id: "fake".into(),
            max_frame_len: 1 << 20,
        })
        .await;
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
        w.ready(worker).await;
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

/// Results read together are handed to the query table together: a frame that breaks the
/// shared stream's protocol, arriving in the same write as a whole result, still lets that
/// result reach its caller before the connection is closed.
#[tokio::test]
async fn a_result_written_with_a_protocol_breaking_frame_still_reaches_its_caller() {
    use sluice_protocol::*;
    let t = start(|_| {}).await;
    let fe = frontend_for(&[&t]).await;
    let submitted = fe.submit(QueryRequest::new("t", "one")).await.unwrap();
    let sched = t.connect(&t.certs.querier).await.unwrap();
    let mut w = worker(&sched, "raw-querier").await;
    w.ready(0).await;
    let d = dispatched(&mut w).await;

    let addr: std::net::SocketAddr = fe.result_address().address.parse().unwrap();
    let conn = connect(addr, &t.certs.querier).await.unwrap();
    let (send, _recv) = conn.open_bi().await.unwrap();
    let mut writer = FramedWrite::new(send, 1 << 20);
    writer
        .buffer(&Hello::new(Role::Querier, "raw-querier", StreamKind::Results))
        .unwrap();
    writer
        .buffer(&ResultFrame::Whole {
            query_id: d.query_id,
            tenant: d.tenant.clone(),
            capability: d.capability,
            status: 200,
            metadata: Vec::new(),
            body: Bytes::from_static(b"taken"),
        })
        .unwrap();
    writer.buffer(&ResultFrame::End { total_len: 0 }).unwrap();
    writer.flush().await.unwrap();

    let response = wait("the response", submitted.response()).await.unwrap();
    assert_eq!(response.body.collect().await.unwrap(), b"taken");
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
    shared_stream_fails(Failure::Broken).await;
}

#[tokio::test]
async fn a_shared_stream_that_is_never_acknowledged_is_given_up() {
    shared_stream_fails(Failure::Silent).await;
}

/// Acks come back in the order results were written: one out of order breaks the stream,
/// and both results go again on streams of their own (each handler still ran once).
#[tokio::test]
async fn an_ack_out_of_order_sends_the_shared_streams_results_on_their_own_streams() {
    shared_stream_fails(Failure::OutOfOrder).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Failure {
    /// The frontend reads the result, then resets the stream.
    Broken,
    /// It reads the result and never answers.
    Silent,
    /// It reads two results and acknowledges the second first.
    OutOfOrder,
}

async fn shared_stream_fails(failure: Failure) {
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
                    if failure == Failure::OutOfOrder {
                        let second: ResultFrame = peer.recv().await;
                        let _ = seen_tx.send((hello.stream, second.clone()));
                        let ResultFrame::Whole { query_id, .. } = second else {
                            panic!("{second:?}")
                        };
                        let receipt = ResultReceipt::Delivered;
                        peer.send(&ResultAck { query_id, receipt }).await;
                        tokio::time::sleep(WAIT * 2).await;
                        return;
                    }
                    // Read, then broken or silent: no acknowledgement ever comes.
                    if failure == Failure::Silent {
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
        max_frame_len: sluice_protocol::Limits::default().max_frame_len,
    }))
    .await;
    let queries = if failure == Failure::OutOfOrder { 2 } else { 1 };
    for id in 1..=queries {
        accepted(&mut fe, id, "t").await;
    }

    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let handler = handler_fn(move |request: Request| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { Ok(Response::ok(request.payload)) }
    });
    let mut config = querier_config(&t, "querier-1");
    config.concurrency = queries as usize;
    // How long a shared stream may leave a result unacknowledged.
    config.client.idle_timeout = Duration::from_secs(1);
    let q = Querier::start(config, handler).unwrap();
    // What the fake frontend saw, in order: each query's result on the shared stream (the
    // first frame of each stream), then each on a stream of its own.
    let mut firsts = Vec::new();
    for _ in 0..2 * queries {
        firsts.push(wait("the next stream's frame", seen.recv()).await.unwrap());
    }
    let ids = |seen: &[(StreamKind, ResultFrame)], want: StreamKind| {
        let mut ids: Vec<u64> = seen
            .iter()
            .map(|(kind, frame)| match (kind, frame) {
                // The copy on a stream of its own still names the query's tenant.
                (k, ResultFrame::Whole { query_id, tenant, .. } | ResultFrame::Head { query_id, tenant, .. })
                    if *k == want && tenant == "t" =>
                {
                    *query_id
                }
                other => panic!("{other:?}"),
            })
            .collect();
        ids.sort();
        ids
    };
    let (on_shared, on_own) = firsts.split_at(queries as usize);
    let (on_shared, on_own) = (ids(on_shared, StreamKind::Results), ids(on_own, StreamKind::Result));
    let all: Vec<u64> = (1..=queries).collect();
    assert_eq!((on_shared, on_own), (all.clone(), all));
    assert_eq!(runs.load(Ordering::SeqCst), queries as usize, "each handler ran once");
    // Shutting down waits for deliveries: nothing more was sent.
    q.shutdown().await;
    fake.abort();
    if let Ok(extra) = seen.try_recv() {
        panic!("a result sent again: {extra:?}");
    }
}

#[tokio::test]
async fn a_frontend_reading_smaller_frames_than_a_queriers_chunks_gets_its_large_result_beside_others() {
    let t = start(|_| {}).await;
    // The frontend reads frames of at most 64 KiB; the querier's chunks are 256 KiB.
    let mut c = frontend_config(&t, "frontend-small");
    c.client.max_frame_len = 64 << 10;
    let fe = Frontend::connect(c).await.unwrap();
    let body = Bytes::from(vec![b'r'; 1 << 20]);
    let reply = body.clone();
    let h = handler_fn(move |request: Request| {
        let reply = reply.clone();
        async move {
            if &request.payload[..] == b"slow" {
                tokio::time::sleep(Duration::from_millis(300)).await;
                return Ok(Response::ok(Bytes::from_static(b"slow")));
            }
            Ok(Response::ok(reply))
        }
    });
    let mut qc = querier_config(&t, "querier-1");
    qc.concurrency = 2;
    let q = Querier::start(qc, h).unwrap();
    assert!(q.wait_connected(2, WAIT).await);
    let other = fe.submit(QueryRequest::new("t", "slow")).await.unwrap();
    let large = wait("the large result", fe.query(QueryRequest::new("t", "large"))).await;
    assert_eq!(large.unwrap().body.collect().await.unwrap(), body);
    assert_eq!(body_of(other).await.unwrap(), b"slow".as_slice());
    q.shutdown().await;
}
