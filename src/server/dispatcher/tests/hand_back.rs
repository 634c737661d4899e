//! A querier worker giving back a query it held and never started (`HandBack`).

use super::*;

fn hand_back(h: &mut Harness, stream: u64, query: QueryId) {
    h.d.handle(
        Command::HandBack {
            stream,
            worker: 0,
            query,
        },
        h.now,
    );
}

#[test]
fn a_query_given_back_goes_back_to_its_frontend_and_the_worker_asks_for_nothing_until_ready() {
    let mut h = harness();
    h.enqueue(1);
    let (w, mut w_rx) = h.busy_worker();
    h.enqueue(2);
    hand_back(&mut h, w, 1);
    assert!(matches!(
        h.frame(),
        Ok(SchedulerToFrontend::QueryError {
            query_id: 1,
            kind: QueryErrorKind::HandedBack,
            ..
        })
    ));
    assert!(
        w_rx.try_recv().is_err(),
        "a worker that gave back asks for nothing: query 2 waits"
    );
    assert_eq!(h.d.running.len(), 0);
    h.ready(w);
    assert!(matches!(
        w_rx.try_recv(),
        Ok(SchedulerToQuerier::Dispatch { dispatch, .. }) if dispatch.query_id == 2
    ));
    // Query 1 is its frontend's again: losing this worker says nothing about it.
    h.d.handle(Command::DequeueClosed { stream: w }, h.now);
    assert_eq!(h.failed_queries(), [2]);
}

#[test]
fn a_hand_back_refunds_the_tenant_what_the_dispatch_debited() {
    let mut h = harness();
    h.enqueue_for("a", 1);
    h.enqueue_for("a", 2);
    let (w, _w_rx) = h.busy_worker();
    let balance = |h: &Harness| {
        h.d.queue
            .tenant_stats(h.now)
            .iter()
            .find(|t| t.tenant == "a")
            .map(|t| t.balance)
    };
    let before = balance(&h).expect("query 2 is queued");
    hand_back(&mut h, w, 1);
    let after = balance(&h).expect("query 2 is queued");
    assert_eq!(after, before + 1, "the cost of query 1 (1) is refunded");
}

#[test]
fn a_query_cancelled_before_its_hand_back_is_answered_once() {
    let mut h = harness();
    h.enqueue(1);
    let (w, _w_rx) = h.busy_worker();
    let frontend = h.frontend;
    h.d.handle(Command::Cancel { frontend, query: 1 }, h.now);
    assert_eq!(h.frame().ok(), Some(SchedulerToFrontend::Cancelled { query_id: 1 }));
    hand_back(&mut h, w, 1);
    assert_eq!(h.frame().ok(), None, "Cancelled was its answer");
}

#[test]
fn a_hand_back_of_a_query_the_worker_does_not_run_closes_its_connection() {
    let mut h = harness();
    h.enqueue(1);
    let (w, _rx, cut) = h.worker_of("q");
    h.ready(w);
    hand_back(&mut h, w, 9);
    assert!(cut.violation.is_cancelled());
    assert_eq!(h.frame().ok(), None);
}
