//! The dispatcher without a network: commands in, channel messages out, explicit time.

use super::*;
use bytes::Bytes;

struct Harness {
    d: Dispatcher,
    now: Instant,
    fe_rx: mpsc::Receiver<SchedulerToFrontend>,
    frontend: u64,
    /// Queries the frontend was told were dispatched, in order.
    dispatched: Vec<QueryId>,
}

fn harness() -> Harness {
    let now = Instant::now();
    let metrics = Arc::new(Metrics::new(Duration::from_secs(60)));
    let mut d = Dispatcher::new("s".into(), QueueConfig::default(), Limits::default(), metrics).unwrap();
    let (tx, fe_rx, _) = Outbox::new(64);
    let (reply, mut id) = oneshot::channel();
    d.handle(
        Command::FrontendOpened {
            name: "fe".into(),
            tx,
            reply,
        },
        now,
    );
    let frontend = id.try_recv().unwrap();
    let address = FrontendAddress {
        id: "fe".into(),
        address: "127.0.0.1:1".into(),
        server_name: "localhost".into(),
    };
    d.handle(Command::ResultEndpoint { frontend, address }, now);
    Harness {
        d,
        now,
        fe_rx,
        frontend,
        dispatched: Vec::new(),
    }
}

impl Harness {
    /// The frontend's next frame other than dispatch notes (which are collected in
    /// `dispatched`).
    fn frame(&mut self) -> Result<SchedulerToFrontend, mpsc::error::TryRecvError> {
        loop {
            match self.fe_rx.try_recv()? {
                SchedulerToFrontend::Dispatched { query_ids } => self.dispatched.extend(query_ids),
                other => return Ok(other),
            }
        }
    }

    fn enqueue(&mut self, query_id: u64) {
        self.enqueue_for("t", query_id);
    }

    fn enqueue_for(&mut self, tenant: &str, query_id: u64) {
        let enqueue = Box::new(Enqueue {
            query_id,
            tenant: tenant.into(),
            actors: vec![],
            component: None,
            priority: None,
            cost_hint: None,
            timeout_ms: None,
            attempt: 1,
            metadata: vec![],
            payload: Bytes::from_static(b"q"),
        });
        let (frontend, now) = (self.frontend, self.now);
        self.d.handle(
            Command::Enqueue {
                frontend,
                enqueue,
                received: now,
            },
            now,
        );
        assert!(matches!(
            self.frame(),
            Ok(SchedulerToFrontend::EnqueueStatus {
                status: EnqueueStatus::Accepted,
                ..
            })
        ));
    }

    /// A worker that asked for work and was handed the queued query.
    fn busy_worker(&mut self) -> (WorkerId, mpsc::Receiver<SchedulerToQuerier>) {
        let (w, mut rx) = self.worker();
        self.d.handle(
            Command::Ready {
                worker: w,
                finished: None,
            },
            self.now,
        );
        assert!(matches!(rx.try_recv(), Ok(SchedulerToQuerier::Dispatch(_))));
        (w, rx)
    }

    fn worker(&mut self) -> (WorkerId, mpsc::Receiver<SchedulerToQuerier>) {
        let (tx, rx, _) = Outbox::new(64);
        let (reply, mut id) = oneshot::channel();
        self.d.handle(
            Command::WorkerOpened {
                querier: "q".into(),
                tx,
                reply,
            },
            self.now,
        );
        (id.try_recv().unwrap(), rx)
    }
}

/// The next query `w` is handed after saying Ready with `finished`.
fn next_after(
    h: &mut Harness,
    w: WorkerId,
    rx: &mut mpsc::Receiver<SchedulerToQuerier>,
    finished: Option<Finished>,
) -> u64 {
    h.d.handle(Command::Ready { worker: w, finished }, h.now);
    match rx.try_recv() {
        Ok(SchedulerToQuerier::Dispatch(d)) => d.query_id,
        other => panic!("expected a dispatch, got {other:?}"),
    }
}

#[test]
fn a_measured_cost_corrects_the_tenants_account() {
    let mut h = harness();
    h.enqueue_for("a", 1);
    let (w, mut rx) = h.busy_worker();
    h.enqueue_for("a", 2);
    for q in 3..=6 {
        h.enqueue_for("b", q);
    }
    // Query 1 was hinted at 1 and really cost 5: a owes 4 visits, so b's queries go
    // first (plain round robin would alternate: 3, 2, 4).
    let finished = Finished {
        frontend_id: "fe".into(),
        query_id: 1,
        measured_cost: Some(5),
    };
    let order: Vec<u64> = std::iter::once(next_after(&mut h, w, &mut rx, Some(finished)))
        .chain((0..2).map(|_| next_after(&mut h, w, &mut rx, None)))
        .collect();
    assert_eq!(order, [3, 4, 5]);
    let metrics = h.d.metrics.render();
    assert!(
        metrics.contains(&format!("{}{{tenant=\"a\"}} 5", m::SERVED_COST)),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("{}{{tenant=\"b\"}} 2", m::SERVED_COST)),
        "{metrics}"
    );
}

#[test]
fn waiting_workers_are_served_longest_waiting_first() {
    let mut h = harness();
    let workers: Vec<_> = (0..3).map(|_| h.worker()).collect();
    for (w, _) in &workers {
        h.d.handle(
            Command::Ready {
                worker: *w,
                finished: None,
            },
            h.now,
        );
    }
    let mut rxs: Vec<_> = workers.into_iter().map(|(_, rx)| rx).collect();
    for (i, query) in [(0usize, 1u64), (1, 2), (2, 3)] {
        h.enqueue(query);
        match rxs[i].try_recv() {
            Ok(SchedulerToQuerier::Dispatch(d)) => assert_eq!(d.query_id, query),
            other => panic!("worker {i} expected query {query}, got {other:?}"),
        }
        for (j, rx) in rxs.iter_mut().enumerate() {
            assert!(j == i || rx.try_recv().is_err(), "worker {j} got a second dispatch");
        }
    }
}

#[test]
fn a_peer_that_stops_reading_is_cut_off() {
    let (outbox, _rx, cut) = Outbox::new(2);
    assert!(outbox.send(1) && outbox.send(2));
    assert!(!cut.overflow.is_cancelled());
    assert!(!outbox.send(3), "full");
    assert!(cut.overflow.is_cancelled(), "the connection is to be closed");
    assert!(!cut.violation.is_cancelled());
}

#[test]
fn a_worker_lost_mid_query_fails_the_query() {
    let mut h = harness();
    h.enqueue(1);
    let (w, _w_rx) = h.busy_worker();
    h.d.handle(Command::WorkerClosed { worker: w }, h.now);
    assert!(matches!(
        h.frame(),
        Ok(SchedulerToFrontend::QueryError {
            query_id: 1,
            kind: QueryErrorKind::QuerierFailed,
            ..
        })
    ));
}

#[test]
fn worker_streams_closed_by_our_own_shutdown_do_not_fail_their_queries() {
    let mut h = harness();
    h.enqueue(1);
    let (w, _w_rx) = h.busy_worker();
    let (done, mut drained) = oneshot::channel();
    h.d.handle(
        Command::Shutdown {
            drain_timeout: Duration::from_millis(10),
            done,
        },
        h.now,
    );
    assert_eq!(h.frame().ok(), Some(SchedulerToFrontend::ShuttingDown));
    assert!(drained.try_recv().is_ok(), "nothing queued: the drain ends at once");
    // The server now closes every connection; the querier is still running query 1
    // and will deliver its result to the frontend directly.
    h.d.handle(Command::WorkerClosed { worker: w }, h.now);
    assert!(h.frame().is_err(), "no error may be reported for query 1");
}

#[test]
fn drain_hands_back_what_no_worker_took_in_time() {
    let mut h = harness();
    h.enqueue(1);
    h.enqueue(2);
    let (done, mut drained) = oneshot::channel();
    h.d.handle(
        Command::Shutdown {
            drain_timeout: Duration::from_secs(5),
            done,
        },
        h.now,
    );
    assert_eq!(h.frame().ok(), Some(SchedulerToFrontend::ShuttingDown));
    h.d.tick(h.now + Duration::from_secs(4));
    assert!(drained.try_recv().is_err(), "still draining");
    h.d.tick(h.now + Duration::from_secs(5));
    assert!(drained.try_recv().is_ok());
    for q in [1, 2] {
        assert!(matches!(
            h.frame(),
            Ok(SchedulerToFrontend::QueryError { query_id, kind: QueryErrorKind::HandedBack, .. }) if query_id == q
        ));
    }
}
