//! A querier whose workers prefetch (`QuerierConfig::prefetch`), against a real scheduler
//! over QUIC on loopback: a worker holds one query while it runs another, never runs two
//! at once, never runs a held query that was cancelled or reached its deadline, and gives
//! back one held past its hold limit, which then runs elsewhere, once. A loop reserved for
//! high priorities keeps both its slots for them.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use sluice_client::*;
use tokio::sync::{Semaphore, mpsc};

/// Each query waits for one permit of `gate`, then answers with its payload; counts how
/// many times each query ran and the most handlers running at once.
#[derive(Clone)]
struct Gated {
    gate: Arc<Semaphore>,
    started: mpsc::UnboundedSender<(u64, Duration)>,
    runs: Arc<Mutex<Runs>>,
}

#[derive(Default)]
struct Runs {
    per_query: HashMap<u64, u32>,
    now: u32,
    most: u32,
}

impl Handler for Gated {
    async fn handle(&self, request: Request) -> Result<Response, HandlerError> {
        {
            let mut r = self.runs.lock().unwrap();
            *r.per_query.entry(request.query_id).or_default() += 1;
            r.now += 1;
            r.most = r.most.max(r.now);
        }
        let _ = self.started.send((request.query_id, request.queue_time));
        self.gate.acquire().await.unwrap().forget();
        self.runs.lock().unwrap().now -= 1;
        Ok(Response::ok(request.payload.clone()))
    }
}

fn gated() -> (Gated, mpsc::UnboundedReceiver<(u64, Duration)>) {
    let (tx, started) = mpsc::unbounded_channel();
    let h = Gated {
        gate: Arc::new(Semaphore::new(0)),
        started: tx,
        runs: Arc::default(),
    };
    (h, started)
}

struct Setup {
    t: TestServer,
    fe: Frontend,
    q: Querier,
    gate: Arc<Semaphore>,
    started: mpsc::UnboundedReceiver<(u64, Duration)>,
    runs: Arc<Mutex<Runs>>,
}

impl Setup {
    /// Submits `a`, waits until the worker runs it, then submits `b` and waits until it is
    /// dispatched to the same worker (held: the scheduler counts two running, none queued).
    async fn run_one_hold_one(&mut self, b: QueryRequest) -> (QueryHandle, QueryHandle) {
        let a = self.fe.submit(QueryRequest::new("t", "a")).await.unwrap();
        assert_eq!(wait("a started", self.started.recv()).await.unwrap().0, a.id());
        let b = self.fe.submit(b).await.unwrap();
        self.t
            .status_until("b dispatched and held", |st| st.running == 2 && st.queued == 0)
            .await;
        (a, b)
    }
}

/// A scheduler, a frontend and a querier with one prefetching worker that holds a query as
/// long as it takes.
async fn setup() -> Setup {
    holding(start(|_| {}).await, 1).await
}

/// A frontend and a querier of `workers` prefetching loops on `t`, each holding a query as
/// long as it takes, once every slot is registered.
async fn holding(t: TestServer, workers: usize) -> Setup {
    let fe = common::client::frontend_for(&[&t]).await;
    let (h, started) = gated();
    let (gate, runs) = (h.gate.clone(), h.runs.clone());
    let config = common::client::querier_config(&t, "querier-1")
        .with_concurrency(workers)
        .with_prefetch(true)
        .with_hold_limit(None);
    let q = Querier::start(config, h).unwrap();
    assert!(q.wait_connected(workers, WAIT).await, "every worker registered");
    t.status_until("two slots for each worker", |s| s.workers.len() == 2 * workers)
        .await;
    Setup {
        t,
        fe,
        q,
        gate,
        started,
        runs,
    }
}

#[tokio::test]
async fn a_worker_holds_one_query_runs_one_at_a_time_and_never_runs_a_cancelled_held_one() {
    let mut s = setup().await;
    // The worker runs `a`; `b` is dispatched to it anyway (held), `c` stays queued.
    let (a, b) = s.run_one_hold_one(QueryRequest::new("t", "b")).await;
    let a_id = a.id();
    let c = s.fe.submit(QueryRequest::new("t", "c")).await.unwrap();
    let c_id = c.id();
    s.t.status_until("c queued", |st| st.queued == 1).await;
    assert!(s.started.try_recv().is_err(), "b must not run beside a");
    // Cancelling the held `b` frees its slot at once (a still runs): `c` takes it.
    let b_id = b.id();
    drop(b);
    s.t.status_until("b cancelled, c dispatched", |st| {
        st.counters.dispatched == 3 && st.queued == 0 && st.running == 2
    })
    .await;
    // `c` is held for at least this long before its worker is free.
    const HELD: Duration = Duration::from_millis(300);
    tokio::time::sleep(HELD).await;
    s.gate.add_permits(1);
    assert_eq!(body_of(a).await.unwrap(), b"a");
    let (next, queue_time) = wait("c started", s.started.recv()).await.unwrap();
    assert_eq!(next, c_id, "the held c runs next, never the cancelled b");
    assert!(
        queue_time >= HELD,
        "c's queue time counts its wait on the querier: {queue_time:?}"
    );
    s.gate.add_permits(1);
    assert_eq!(body_of(c).await.unwrap(), b"c");
    {
        let r = s.runs.lock().unwrap();
        assert_eq!(r.per_query.get(&b_id), None, "the cancelled held query never ran");
        assert_eq!(r.per_query.get(&a_id), Some(&1));
        assert_eq!(r.per_query.get(&c_id), Some(&1));
        assert_eq!(r.most, 1, "one worker runs one handler at a time");
    }
    s.q.shutdown().await;
}

#[tokio::test]
async fn more_slots_than_a_dequeue_stream_takes_or_too_long_a_hold_limit_are_refused_at_start() {
    let t = start(|_| {}).await;
    let config = |workers| {
        common::client::querier_config(&t, "querier-1")
            .with_concurrency(workers)
            .with_prefetch(true)
    };
    let err = Querier::start(config(513), gated().0)
        .err()
        .expect("2 × 513 slots > 1 024");
    assert!(
        matches!(&err, ClientError::Config(m) if m.contains("prefetch")),
        "{err}"
    );
    Querier::start(config(512), gated().0).unwrap().abort();
    // A held query is confirmed to its frontend at `confirm_after`; one confirmed cannot be
    // placed again, so it must be given back before.
    let err = Querier::start(config(1).with_hold_limit(Some(Duration::from_millis(100))), gated().0)
        .err()
        .expect("the hold limit must be under confirm_after (100 ms)");
    assert!(
        matches!(&err, ClientError::Config(m) if m.contains("hold_limit")),
        "{err}"
    );
}

#[tokio::test]
async fn a_held_query_past_its_deadline_fails_at_its_deadline_and_never_runs() {
    let mut s = setup().await;
    let a = s.fe.submit(QueryRequest::new("t", "a")).await.unwrap();
    assert_eq!(wait("a started", s.started.recv()).await.unwrap().0, a.id());
    let mut req = QueryRequest::new("t", "b");
    req.timeout = Some(Duration::from_millis(500));
    let submitted = Instant::now();
    let b = s.fe.submit(req).await.unwrap();
    let b_id = b.id();
    s.t.status_until("b dispatched and held", |st| st.running == 2 && st.queued == 0)
        .await;
    let err = wait("b's deadline", b.response()).await.unwrap_err();
    let took = submitted.elapsed();
    assert!(matches!(err, QueryError::DeadlineExceeded(_)), "{err:?}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    // The held slot reported it: the scheduler no longer counts it as running.
    s.t.status_until("b ended on the scheduler", |st| st.running == 1).await;
    s.gate.add_permits(2);
    assert_eq!(body_of(a).await.unwrap(), b"a");
    let after = s.fe.submit(QueryRequest::new("t", "after")).await.unwrap();
    assert_eq!(body_of(after).await.unwrap(), b"after");
    assert_eq!(s.runs.lock().unwrap().per_query.get(&b_id), None, "b never ran");
    s.q.shutdown().await;
}

#[tokio::test]
async fn a_querier_shutting_down_runs_its_held_query_once_and_delivers_both() {
    let mut s = setup().await;
    let (a, b) = s.run_one_hold_one(QueryRequest::new("t", "b")).await;
    let (a_id, b_id) = (a.id(), b.id());
    let shutdown = tokio::spawn(s.q.shutdown());
    s.gate.add_permits(1);
    assert_eq!(body_of(a).await.unwrap(), b"a");
    assert_eq!(wait("b started", s.started.recv()).await.unwrap().0, b_id);
    s.gate.add_permits(1);
    assert_eq!(body_of(b).await.unwrap(), b"b");
    wait("the querier's shutdown", shutdown).await.unwrap();
    let r = s.runs.lock().unwrap();
    assert_eq!((r.per_query.get(&a_id), r.per_query.get(&b_id)), (Some(&1), Some(&1)));
    assert_eq!(r.most, 1);
}

#[tokio::test]
async fn a_query_held_behind_a_long_one_is_given_back_and_runs_once_on_another_querier() {
    const HOLD: Duration = Duration::from_millis(50);
    let t = start(|_| {}).await;
    let fe = common::client::frontend_for(&[&t]).await;
    let (h, mut started) = gated();
    let (gate, runs) = (h.gate.clone(), h.runs.clone());
    let config = |id: &str| common::client::querier_config(&t, id).with_concurrency(1);
    let a = Querier::start(
        config("querier-a").with_prefetch(true).with_hold_limit(Some(HOLD)),
        h.clone(),
    )
    .unwrap();
    t.status_until("a's two slots", |s| s.workers.len() == 2).await;
    // `long` runs on querier a; `short` is dispatched to a's other slot and held.
    let long = fe.submit(QueryRequest::new("t", "long")).await.unwrap();
    assert_eq!(wait("long started", started.recv()).await.unwrap().0, long.id());
    let submitted = Instant::now();
    let short = fe.submit(QueryRequest::new("t", "short")).await.unwrap();
    let short_id = short.id();
    t.status_until("short dispatched and held", |st| st.running == 2 && st.queued == 0)
        .await;
    // Querier b joins: the only worker free when `short` comes back.
    let b = Querier::start(config("querier-b"), h).unwrap();
    t.status_until("b's worker", |s| s.workers.len() == 3).await;
    let (ran, _) = wait("short started on b", started.recv()).await.unwrap();
    assert_eq!(ran, short_id);
    assert!(
        submitted.elapsed() >= HOLD,
        "held for the hold limit first: {:?}",
        submitted.elapsed()
    );
    // `short` started while `long` still runs: it did not wait behind it.
    gate.add_permits(2);
    assert_eq!(wait("short", body_of(short)).await.unwrap(), b"short");
    assert_eq!(wait("long", body_of(long)).await.unwrap(), b"long");
    let st = t.status_until("both reported", |s| s.running == 0).await;
    assert_eq!(st.counters.dispatched, 3, "long once, short twice (held, then run)");
    {
        let r = runs.lock().unwrap();
        assert_eq!(
            r.per_query.values().copied().collect::<Vec<_>>(),
            [1, 1],
            "each handler ran once: {:?}",
            r.per_query
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Two prefetching worker loops, half of them reserved for high priorities: the reserved
/// loop's two slots are one lane and are reserved together. A low-priority backlog fills
/// the other loop (one running, one held) and then waits, though the reserved loop's slots
/// are free; a high-priority query starts on the reserved loop at once, and the next one is
/// held there, not queued.
#[tokio::test]
async fn a_reserved_worker_loop_keeps_both_its_slots_for_high_priorities() {
    let t = start(|s| {
        s.reserved_workers_percent = Some(50);
        s.reserved_min_priority = Some(1);
        s.lend_max_cost = Some(0);
    })
    .await;
    let Setup {
        t,
        fe,
        q,
        gate,
        mut started,
        runs,
    } = holding(t, 2).await;
    let low = |body: &'static str| QueryRequest::new("low", body);
    let high = |body: &'static str| QueryRequest::new("high", body).with_priority(1);

    let a = fe.submit(low("a")).await.unwrap();
    assert_eq!(wait("a started", started.recv()).await.unwrap().0, a.id());
    let b = fe.submit(low("b")).await.unwrap();
    t.status_until("b held beside a", |st| st.running == 2 && st.queued == 0)
        .await;
    let c = fe.submit(low("c")).await.unwrap();
    let st = t.status_until("c placed", |st| st.running + st.queued == 3).await;
    assert_eq!(
        (st.running, st.queued),
        (2, 1),
        "no reserved slot takes a low-priority query"
    );

    let h1 = fe.submit(high("h1")).await.unwrap();
    assert_eq!(wait("h1 started", started.recv()).await.unwrap().0, h1.id());
    let h2 = fe.submit(high("h2")).await.unwrap();
    t.status_until("h2 held on the reserved loop", |st| st.running == 4 && st.queued == 1)
        .await;
    assert!(started.try_recv().is_err(), "one handler per loop");

    gate.add_permits(5);
    for (handle, body) in [(a, "a"), (b, "b"), (c, "c"), (h1, "h1"), (h2, "h2")] {
        assert_eq!(wait(body, body_of(handle)).await.unwrap(), body.as_bytes());
    }
    {
        let r = runs.lock().unwrap();
        assert!(
            r.per_query.values().all(|&n| n == 1),
            "each ran once: {:?}",
            r.per_query
        );
        assert_eq!(r.per_query.len(), 5);
        assert_eq!(r.most, 2, "two loops, one handler each");
    }
    q.shutdown().await;
}
