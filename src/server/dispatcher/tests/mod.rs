//! The dispatcher without a network: commands in, channel messages out, explicit time.

use super::admission::{NODE_OVERHEAD, REQUEST_OVERHEAD};
use super::outbox::Cut;
use super::*;
use bytes::Bytes;
use sluice_protocol::{Enqueue, EnqueueStatus, Finished};

mod cluster;
mod hand_back;
mod loop_slots;

struct Harness {
    d: Dispatcher,
    now: Instant,
    fe_rx: mpsc::Receiver<SchedulerToFrontend>,
    frontend: u64,
    /// Queries the frontend was told were dispatched, in order.
    dispatched: Vec<QueryId>,
}

fn harness() -> Harness {
    harness_with(QueueConfig::default())
}

fn harness_with(config: QueueConfig) -> Harness {
    let now = Instant::now();
    let metrics = Arc::new(Metrics::new(Duration::from_secs(60)));
    let mut d = Dispatcher::new("s".into(), config, Limits::default(), metrics).unwrap();
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
        max_frame_len: sluice_protocol::MIN_FRAME_LEN,
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
        assert_eq!(self.enqueue_status_for(tenant, query_id), EnqueueStatus::Accepted);
    }

    /// A worker that asked for work and was handed the queued query.
    fn busy_worker(&mut self) -> (u64, mpsc::Receiver<SchedulerToQuerier>) {
        let (w, mut rx) = self.worker();
        self.ready(w);
        assert!(matches!(rx.try_recv(), Ok(SchedulerToQuerier::Dispatch { .. })));
        (w, rx)
    }

    fn worker(&mut self) -> (u64, mpsc::Receiver<SchedulerToQuerier>) {
        let (w, rx, _) = self.worker_of("q");
        (w, rx)
    }

    /// The one worker (slot 0) on a new dequeue stream of `querier`, named by the stream,
    /// with the tokens that would close its connection.
    fn worker_of(&mut self, querier: &str) -> (u64, mpsc::Receiver<SchedulerToQuerier>, Cut) {
        let (tx, rx, cut) = Outbox::new(64);
        let (reply, mut id) = oneshot::channel();
        self.d.handle(
            Command::DequeueOpened {
                querier: querier.into(),
                tx,
                reply,
            },
            self.now,
        );
        (id.try_recv().unwrap(), rx, cut)
    }

    /// The queries the frontend has been told failed, in order, from the frames waiting.
    fn failed_queries(&mut self) -> Vec<u64> {
        std::iter::from_fn(|| self.frame().ok())
            .filter_map(|f| match f {
                SchedulerToFrontend::QueryError { query_id, .. } => Some(query_id),
                _ => None,
            })
            .collect()
    }

    /// Slot 0 of dequeue stream `worker` asks for work.
    fn ready(&mut self, worker: u64) {
        self.ready_slot(worker, 0);
    }

    /// Slot `worker` of dequeue stream `stream` asks for work, with nothing finished.
    fn ready_slot(&mut self, stream: u64, worker: WorkerSlot) {
        self.d.handle(
            Command::Ready {
                stream,
                worker,
                finished: None,
            },
            self.now,
        );
    }

    fn enqueue_status(&mut self, query_id: u64) -> EnqueueStatus {
        self.enqueue_status_for("t", query_id)
    }

    fn enqueue_status_for(&mut self, tenant: &str, query_id: u64) -> EnqueueStatus {
        self.send_enqueue(tenant, query_id);
        match self.frame() {
            Ok(SchedulerToFrontend::EnqueueStatus { status, .. }) => status,
            other => panic!("expected a status, got {other:?}"),
        }
    }

    /// Starts the drain; the receiver hears when it ends.
    fn shutdown(&mut self, drain_timeout: Duration) -> oneshot::Receiver<()> {
        let (done, drained) = oneshot::channel();
        self.d.handle(Command::Shutdown { drain_timeout, done }, self.now);
        drained
    }

    /// Sends an enqueue of `tenant`; its status, if any yet, is left waiting.
    fn send_enqueue(&mut self, tenant: &str, query_id: u64) {
        let enqueue = Box::new(Enqueue {
            query_id,
            tenant: tenant.into(),
            actors: vec![],
            component: None,
            priority: None,
            cost_hint: None,
            timeout_ms: None,
            attempt: 1,
            capability: 0x5eed,
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
    }
}

fn dispatched_id(rx: &mut mpsc::Receiver<SchedulerToQuerier>) -> Option<u64> {
    match rx.try_recv() {
        Ok(SchedulerToQuerier::Dispatch { dispatch: d, .. }) => Some(d.query_id),
        _ => None,
    }
}

/// The next query `w` is handed after saying Ready with `finished`.
fn next_after(h: &mut Harness, w: u64, rx: &mut mpsc::Receiver<SchedulerToQuerier>, finished: Option<Finished>) -> u64 {
    h.d.handle(
        Command::Ready {
            stream: w,
            worker: 0,
            finished,
        },
        h.now,
    );
    match rx.try_recv() {
        Ok(SchedulerToQuerier::Dispatch { dispatch: d, .. }) => d.query_id,
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
        h.ready(*w);
    }
    let mut rxs: Vec<_> = workers.into_iter().map(|(_, rx)| rx).collect();
    for (i, query) in [(0usize, 1u64), (1, 2), (2, 3)] {
        h.enqueue(query);
        match rxs[i].try_recv() {
            Ok(SchedulerToQuerier::Dispatch { dispatch: d, .. }) => assert_eq!(d.query_id, query),
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
    h.d.handle(Command::DequeueClosed { stream: w }, h.now);
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
fn a_cancelled_query_whose_worker_is_lost_before_its_next_ready_is_answered_once() {
    let mut h = harness();
    h.enqueue(1);
    let (w, mut w_rx) = h.busy_worker();
    let frontend = h.frontend;
    h.d.handle(Command::Cancel { frontend, query: 1 }, h.now);
    assert!(matches!(
        w_rx.try_recv(),
        Ok(SchedulerToQuerier::Cancel { query_id: 1, .. })
    ));
    assert_eq!(h.frame().ok(), Some(SchedulerToFrontend::Cancelled { query_id: 1 }));
    h.d.handle(Command::DequeueClosed { stream: w }, h.now);
    assert_eq!(h.frame().ok(), None, "no QuerierFailed after Cancelled");
}

#[test]
fn a_worker_lost_while_its_result_is_delivered_fails_the_query_until_the_next_ready_settles_it() {
    let mut h = harness();
    h.enqueue(1);
    let (w, _w_rx) = h.busy_worker();
    // Query 1's result is handed to the querier's sender; the worker waits for work.
    h.ready(w);
    h.d.handle(Command::DequeueClosed { stream: w }, h.now);
    assert!(matches!(
        h.frame(),
        Ok(SchedulerToFrontend::QueryError {
            query_id: 1,
            kind: QueryErrorKind::QuerierFailed,
            ..
        })
    ));
    // A worker's next `Ready` settles its previous delivery: losing it later says nothing
    // about query 2, whose result was settled.
    h.enqueue(2);
    h.enqueue(3);
    let (w, mut w_rx) = h.busy_worker();
    h.ready(w); // query 2 delivering, query 3 dispatched
    assert_eq!(dispatched_id(&mut w_rx), Some(3));
    h.ready(w); // query 2 settled, query 3 delivering
    h.d.handle(Command::DequeueClosed { stream: w }, h.now);
    let failed = h.failed_queries();
    assert_eq!(failed, vec![3]);
}

#[test]
fn a_query_cancelled_while_its_result_is_delivered_is_answered_once() {
    let mut h = harness();
    h.enqueue(1);
    let (w, _w_rx) = h.busy_worker();
    h.ready(w); // query 1 delivering
    let frontend = h.frontend;
    h.d.handle(Command::Cancel { frontend, query: 1 }, h.now);
    assert_eq!(h.frame().ok(), Some(SchedulerToFrontend::Cancelled { query_id: 1 }));
    h.d.handle(Command::DequeueClosed { stream: w }, h.now);
    assert_eq!(h.frame().ok(), None, "no QuerierFailed after Cancelled");
}

#[test]
fn a_query_placed_again_is_not_failed_by_its_earlier_delivery() {
    let mut h = harness();
    h.enqueue(1);
    h.enqueue(2);
    let (w, mut w_rx) = h.busy_worker();
    h.ready(w); // query 1 delivering, query 2 running
    assert_eq!(dispatched_id(&mut w_rx), Some(2));
    // The frontend placed query 1 again (its earlier result never came); it is queued.
    h.enqueue(1);
    h.d.handle(Command::DequeueClosed { stream: w }, h.now);
    let failed = h.failed_queries();
    assert_eq!(
        failed,
        vec![2],
        "only the running query fails; query 1's new placement stands"
    );
}

#[test]
fn a_settled_delivery_does_not_forget_the_same_query_delivering_through_another_worker() {
    let mut h = harness();
    h.enqueue(1);
    h.enqueue(2);
    let (first, mut first_rx) = h.busy_worker();
    h.ready(first); // query 1 delivering through `first`, which runs query 2
    assert_eq!(dispatched_id(&mut first_rx), Some(2));
    // The frontend placed query 1 again; another worker runs it and hands its result over.
    h.enqueue(1);
    let (second, _second_rx) = h.busy_worker();
    h.ready(second); // query 1 delivering through `second`
    h.ready(first); // `first`'s delivery of query 1 is settled
    h.d.handle(Command::DequeueClosed { stream: second }, h.now);
    assert_eq!(
        h.failed_queries(),
        vec![1],
        "the second delivery of query 1 is still the second worker's"
    );
}

#[test]
fn worker_streams_closed_by_our_own_shutdown_do_not_fail_their_queries() {
    let mut h = harness();
    h.enqueue(1);
    let (w, _w_rx) = h.busy_worker();
    let mut drained = h.shutdown(Duration::from_millis(10));
    assert_eq!(h.frame().ok(), Some(SchedulerToFrontend::ShuttingDown));
    assert!(drained.try_recv().is_ok(), "nothing queued: the drain ends at once");
    // The server now closes every connection; the querier is still running query 1
    // and will deliver its result to the frontend directly.
    h.d.handle(Command::DequeueClosed { stream: w }, h.now);
    assert!(h.frame().is_err(), "no error may be reported for query 1");
}

#[test]
fn drain_hands_back_what_no_worker_took_in_time() {
    let mut h = harness();
    h.enqueue(1);
    h.enqueue(2);
    let mut drained = h.shutdown(Duration::from_secs(5));
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

#[test]
fn a_second_ready_from_a_waiting_worker_closes_its_connection() {
    let mut h = harness();
    let (w, mut rx, cut) = h.worker_of("q");
    h.ready(w);
    assert!(!cut.violation.is_cancelled());
    h.ready(w);
    assert!(cut.violation.is_cancelled(), "the connection is to be closed");
    // It is no longer offered work.
    h.enqueue(1);
    assert_eq!(dispatched_id(&mut rx), None);
}

#[test]
fn a_running_query_cannot_be_enqueued_again() {
    let mut h = harness();
    h.enqueue(1);
    let (_w, _rx) = h.busy_worker();
    assert!(matches!(h.enqueue_status(1), EnqueueStatus::Invalid { reason } if reason.contains("running")));
}

#[test]
fn admission_never_reopens_after_the_drain() {
    let mut h = harness();
    let mut drained = h.shutdown(Duration::from_secs(1));
    assert!(drained.try_recv().is_ok(), "nothing queued: drained at once");
    h.d.tick(h.now + Duration::from_secs(2));
    let _drained = h.shutdown(Duration::from_secs(1));
    assert_eq!(h.frame().ok(), Some(SchedulerToFrontend::ShuttingDown));
    assert_eq!(h.enqueue_status(1), EnqueueStatus::ShuttingDown);
}

#[test]
fn a_frontend_hears_that_a_query_was_dispatched_before_anything_else_about_it() {
    let mut h = harness();
    h.enqueue(1);
    let (w, _rx) = h.busy_worker();
    // Same batch: the worker goes before the batch ends.
    h.d.handle(Command::DequeueClosed { stream: w }, h.now);
    assert_eq!(
        h.fe_rx.try_recv().ok(),
        Some(SchedulerToFrontend::Dispatched { query_ids: vec![1] })
    );
    assert!(matches!(
        h.fe_rx.try_recv(),
        Ok(SchedulerToFrontend::QueryError {
            query_id: 1,
            kind: QueryErrorKind::QuerierFailed,
            ..
        })
    ));
    // Otherwise the notes of a batch leave together at its end.
    h.enqueue(2);
    h.enqueue(3);
    let (_a, _) = h.busy_worker();
    let (_b, _) = h.busy_worker();
    assert!(h.fe_rx.try_recv().is_err(), "held until the batch ends");
    h.d.end_batch();
    assert_eq!(
        h.fe_rx.try_recv().ok(),
        Some(SchedulerToFrontend::Dispatched { query_ids: vec![2, 3] })
    );
}

/// Two queriers, each with one waiting worker, tenant `t` sharded to one of them, whose
/// worker is busy with query 1 while query 2 waits: the other querier's worker may not take
/// it. Returns (in-shard querier and worker, the other worker and its outbox).
fn sharded() -> (Harness, &'static str, u64, u64, mpsc::Receiver<SchedulerToQuerier>) {
    let mut h = harness_with(QueueConfig {
        max_queriers_per_tenant: 1,
        querier_forget_delay: Duration::from_secs(10),
        ..QueueConfig::default()
    });
    let (a, mut a_rx, _) = h.worker_of("qa");
    let (b, mut b_rx, _) = h.worker_of("qb");
    h.ready(a);
    h.ready(b);
    h.enqueue(1);
    let (inside, inside_w, other_w, other_rx) = match (dispatched_id(&mut a_rx), dispatched_id(&mut b_rx)) {
        (Some(1), None) => ("qa", a, b, b_rx),
        (None, Some(1)) => ("qb", b, a, a_rx),
        other => panic!("query 1 goes to exactly one querier: {other:?}"),
    };
    let mut other_rx = other_rx;
    h.enqueue(2);
    assert_eq!(dispatched_id(&mut other_rx), None, "outside the tenant's shard");
    (h, inside, inside_w, other_w, other_rx)
}

#[test]
fn a_forgotten_querier_offers_queued_work_to_waiting_workers_at_once() {
    let (mut h, _, inside_w, _, mut other_rx) = sharded();
    h.d.handle(Command::DequeueClosed { stream: inside_w }, h.now);
    h.d.tick(h.now + Duration::from_secs(5));
    assert_eq!(
        dispatched_id(&mut other_rx),
        None,
        "kept its shard within the forget delay"
    );
    h.d.tick(h.now + Duration::from_secs(11));
    assert_eq!(dispatched_id(&mut other_rx), Some(2));
}

#[test]
fn a_reload_offers_queued_work_to_waiting_workers_at_once() {
    let (mut h, _, _, _, mut other_rx) = sharded();
    let (reply, _) = oneshot::channel();
    let config = QueueConfig {
        max_queriers_per_tenant: 0,
        ..QueueConfig::default()
    };
    h.d.handle(Command::SetQueueConfig { config, reply }, h.now);
    assert_eq!(dispatched_id(&mut other_rx), Some(2));
}

#[test]
fn the_last_worker_of_a_querier_that_said_goodbye_hands_its_shard_on_at_once() {
    let (mut h, inside, inside_w, _, mut other_rx) = sharded();
    // The querier announced shutdown while its only worker was busy: it keeps its shard
    // until that worker leaves, then (no forget delay after a notice) hands it on at once.
    let (reply, _) = oneshot::channel();
    h.d.handle(
        Command::QuerierShuttingDown {
            querier: inside.into(),
            reply,
        },
        h.now,
    );
    assert_eq!(dispatched_id(&mut other_rx), None);
    h.d.handle(Command::DequeueClosed { stream: inside_w }, h.now);
    assert_eq!(dispatched_id(&mut other_rx), Some(2));
}

#[test]
fn a_stream_hears_shutting_down_once_however_many_workers_ask_after_it() {
    let mut h = harness();
    let (stream, mut rx) = h.worker();
    for q in 1..=3 {
        h.enqueue(q);
        h.ready_slot(stream, q as WorkerSlot - 1);
    }
    let (reply, _) = oneshot::channel();
    h.d.handle(
        Command::QuerierShuttingDown {
            querier: "q".into(),
            reply,
        },
        h.now,
    );
    // Each busy worker finishes and asks again with work queued: the queue turns each away.
    h.enqueue(4);
    for worker in 0..3 {
        h.ready_slot(stream, worker);
    }
    let _drained = h.shutdown(Duration::ZERO);
    h.d.tick(h.now);
    let frames: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
        .filter(|f| !matches!(f, SchedulerToQuerier::Dispatch { .. }))
        .collect();
    assert_eq!(frames, vec![SchedulerToQuerier::ShuttingDown]);
}

#[test]
fn queued_bytes_count_names_and_tree_levels_not_only_the_payload() {
    let mut h = harness();
    let enqueue = Box::new(Enqueue {
        query_id: 1,
        tenant: "t".into(),
        actors: vec!["a".repeat(251); 8],
        component: None,
        priority: None,
        cost_hint: None,
        timeout_ms: None,
        attempt: 1,
        capability: 0,
        metadata: vec![],
        payload: Bytes::new(),
    });
    let (frontend, now) = (h.frontend, h.now);
    h.d.handle(
        Command::Enqueue {
            frontend,
            enqueue,
            received: now,
        },
        now,
    );
    let bytes = h.d.queue.queued_bytes();
    // An empty payload, but eight long actor levels: each name twice plus a tree node.
    assert!(
        bytes >= 8 * (2 * 251 + NODE_OVERHEAD as u64) + REQUEST_OVERHEAD as u64,
        "{bytes}"
    );
}
