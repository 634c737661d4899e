//! Every query ends exactly once, through real schedulers and queriers on loopback: cancels,
//! deadlines, failing handlers, and schedulers or queriers that crash, drain or shut down.

mod common;

use std::time::{Duration, Instant};

use common::client::*;
use common::*;
use sluice_client::*;

#[tokio::test]
async fn a_client_given_no_scheduler_is_refused_at_start() {
    let t = start(|_| {}).await;
    let fe = Frontend::connect(FrontendConfig::new("fe", t.certs.frontend.clone(), Vec::new())).await;
    assert!(matches!(fe, Err(ClientError::NoSchedulers)), "{:?}", fe.err());
    let (h, _events) = handler(Duration::ZERO);
    let q = Querier::start(QuerierConfig::new("q", t.certs.querier.clone(), Vec::new()), h);
    assert!(matches!(q, Err(ClientError::NoSchedulers)), "{:?}", q.err());
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
    let (fe, q, mut events) = frontend_and_querier(&t, 1, Duration::ZERO).await;
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
    let (fe, q, _events) = frontend_and_querier(&t, 1, Duration::ZERO).await;
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
    let (fe, q, mut events) = frontend_and_querier(&t, 1, Duration::ZERO).await;
    let handle = fe.submit(QueryRequest::new("t", "hang")).await.unwrap();
    wait("started", events.started.recv()).await;
    let killed = Instant::now();
    q.abort();
    let err = wait("the error", handle.response()).await.unwrap_err();
    let took = killed.elapsed();
    assert!(matches!(err, QueryError::QuerierFailed(_)), "{err:?}");
    println!("querier aborted → frontend error: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // The crash took the running handler with it (its future was dropped, not left to run).
    wait("the handler dropped", events.ended.recv()).await;
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

/// `Frontend::query` is `submit` and `response` in one call: it answers, fails as `submit`
/// would when every scheduler refuses, and cancels the query when its future is dropped.
#[tokio::test]
async fn query_answers_in_one_call_fails_as_submit_would_and_cancels_when_dropped() {
    let t = start(|s| s.max_outstanding_per_tenant = Some(1)).await;
    let (fe, q, mut events) = frontend_and_querier(&t, 1, Duration::ZERO).await;
    let response = wait("answer", fe.query(QueryRequest::new("t", "one"))).await.unwrap();
    assert_eq!(response.body.collect().await.unwrap(), b"one");
    wait("one started", events.started.recv()).await.unwrap();

    // The one worker runs `hang` until it is cancelled.
    let running = tokio::spawn({
        let fe = fe.clone();
        async move { fe.query(QueryRequest::new("u", "hang")).await }
    });
    let id = wait("hang started", events.started.recv()).await.unwrap();
    // Tenant `t` at its limit (one queued): refused, as `submit` is.
    let queued = fe.submit(QueryRequest::new("t", "queued")).await.unwrap();
    let err = fe.query(QueryRequest::new("t", "two")).await.unwrap_err();
    assert_eq!(err, QueryError::TooManyOutstanding { limit: 1 });
    drop(queued);

    // Dropping the waiting future cancels the running query, and the worker is free again.
    assert!(!running.is_finished());
    running.abort();
    assert_eq!(wait("handler saw the cancel", events.cancelled.recv()).await, Some(id));
    // (The queue counts the queued one as cancelled; the running one was dispatched.)
    t.status_until("both gone", |s| {
        s.counters.cancelled == 1 && s.running == 0 && s.queued == 0
    })
    .await;
    let response = wait("after", fe.query(QueryRequest::new("t", "after"))).await.unwrap();
    assert_eq!(response.body.collect().await.unwrap(), b"after");
    assert_eq!(fe.outstanding(), 0);
    q.shutdown().await;
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
    let (a, b, fe) = two_schedulers_and_a_frontend().await;
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
async fn a_body_that_fails_midway_ends_in_an_error_not_a_shorter_success() {
    let t = start(|_| {}).await;
    let (fe, q, _events) = frontend_and_querier(&t, 1, Duration::ZERO).await;
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
    let mut config = querier_config(&t, "querier-1");
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
    let mut config = querier_config(&t, "querier-2");
    config.concurrency = 1;
    let q2 = Querier::start(config, Attempt).unwrap();
    assert!(q2.wait_connected(1, WAIT).await);
    q1.abort();
    assert_eq!(body_of(handle).await.unwrap(), b"attempt 2");
    assert_eq!(fe.stats().redelivered, 1);
    q2.shutdown().await;
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
