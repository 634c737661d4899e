//! A link's tasks, each of which reports how it ended on the link's channel exactly once:
//! what it returned, or, if it panicked or was aborted, what its spawner said to report then.
//!
//! Handlers run on [`Runners`]: one long-lived task per worker slot that runs the slot's
//! queries one after another, so that a query costs a message to a task that already
//! exists, not a task of its own (allocated, registered with the runtime and torn down
//! again). Results sent on streams of their own get a task each ([`delivery`]).
//!
//! A channel rather than a `JoinSet`: each end costs one lock-free push, where a set
//! allocates an entry and takes its lock on insert, on completion and on join, moves the
//! output once more through the join handle, and leaves a panicked or aborted task to be
//! found again by its id.

use std::any::Any;
use std::borrow::Borrow;
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use atomic_waker::AtomicWaker;
use sluice_protocol::WorkerSlot;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::Instrument;

use super::{Handler, HandlerError, Request, Response};

/// How one of a link's tasks ended.
#[derive(Debug)]
pub(super) enum End {
    /// A handler's run (`run` numbers a link's runs: a slot's next must not take this one's end).
    Handler {
        run: u64,
        slot: WorkerSlot,
        /// `None`: the run was aborted before the handler returned.
        outcome: Option<Result<Response, HandlerError>>,
    },
    /// The result numbered `number` was settled on a stream of its own (delivered, refused
    /// or given up; or its task panicked or was aborted).
    Delivery { slot: WorkerSlot, number: u64 },
}

/// A link's handler runners, one per worker slot, started on the slot's first run and
/// aborted (with whatever they run) when dropped.
pub(super) struct Runners<H> {
    handler: Arc<H>,
    to: mpsc::UnboundedSender<End>,
    by_slot: Vec<Option<Runner>>,
}

/// One slot's runner: its queue of runs and its abort signal.
struct Runner {
    /// At most two: the slots start a slot's next run only once its previous one ended
    /// or was aborted (so the aborted one and the next may wait together).
    runs: mpsc::UnboundedSender<Run>,
    abort: Arc<Abort>,
    task: AbortHandle,
}

/// A run for a slot's runner.
struct Run {
    run: u64,
    request: Request,
    span: tracing::Span,
}

/// Tells a runner to drop the handler of every run numbered below `below`.
#[derive(Default)]
struct Abort {
    below: AtomicU64,
    waker: AtomicWaker,
}

impl Abort {
    fn aborts(&self, run: u64) -> bool {
        run < self.below.load(Ordering::Acquire)
    }
}

impl<H: Handler> Runners<H> {
    /// Runners of `handler` whose runs end on `to`.
    pub(super) fn new(handler: Arc<H>, to: mpsc::UnboundedSender<End>) -> Self {
        Runners {
            handler,
            to,
            by_slot: Vec::new(),
        }
    }

    /// Runs `request` (run `run` of `slot`, numbered above any of the slot's earlier runs)
    /// in the slot's runner, within `span`; its [`End::Handler`] comes through the link's
    /// channel, a panic as an error result.
    pub(super) fn start(&mut self, slot: WorkerSlot, run: u64, request: Request, span: tracing::Span) {
        let i = usize::from(slot);
        if self.by_slot.len() <= i {
            self.by_slot.resize_with(i + 1, || None);
        }
        let mut next = Run { run, request, span };
        for _ in 0..2 {
            let runner =
                self.by_slot[i].get_or_insert_with(|| spawn_runner(self.handler.clone(), slot, self.to.clone()));
            match runner.runs.send(next) {
                Ok(()) => return,
                // Its task is gone (a handler's drop panicked): a new one takes the run.
                Err(mpsc::error::SendError(run)) => {
                    next = run;
                    self.by_slot[i] = None;
                }
            }
        }
        // The new runner's task is gone too: the runtime is shutting down. The run still ends.
        let _ = self.to.send(End::Handler {
            run: next.run,
            slot,
            outcome: None,
        });
    }

    /// Aborts run `run` of `slot` (and any earlier one): its handler is dropped, and its
    /// end comes with no outcome.
    pub(super) fn abort(&self, slot: WorkerSlot, run: u64) {
        if let Some(Some(runner)) = self.by_slot.get(usize::from(slot)) {
            runner.abort.below.fetch_max(run + 1, Ordering::AcqRel);
            runner.abort.waker.wake();
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spawn_runner<H: Handler>(handler: Arc<H>, slot: WorkerSlot, to: mpsc::UnboundedSender<End>) -> Runner {
    let (runs, queued) = mpsc::unbounded_channel();
    let abort = Arc::new(Abort::default());
    let mut inbox = Inbox { queued, to, slot };
    let signal = abort.clone();
    let task = tokio::spawn(async move {
        while let Some(Run { run, request, span }) = inbox.queued.recv().await {
            // Reported once, as a delivery's end is: its outcome, or none if the task
            // goes first.
            let no_outcome = End::Handler {
                run,
                slot,
                outcome: None,
            };
            // Borrows the runner's sender: a run costs no sender of its own.
            let mut report = Report {
                to: &inbox.to,
                if_dropped: Some(no_outcome),
            };
            let outcome = run_one(&*handler, request, span, run, &signal).await;
            report.send(End::Handler { run, slot, outcome });
        }
    })
    .abort_handle();
    Runner { runs, abort, task }
}

/// Runs one handler to its end: its outcome (a panic as an error), or `None` if the run
/// was aborted first. The handler is dropped before this returns.
async fn run_one<H: Handler>(
    handler: &H,
    request: Request,
    span: tracing::Span,
    run: u64,
    abort: &Abort,
) -> Option<Result<Response, HandlerError>> {
    // `handle` is called at the first poll, so a panic in it is caught too.
    let mut running = pin!(async move { handler.handle(request).await }.instrument(span));
    poll_fn(|cx| {
        if abort.aborts(run) {
            return Poll::Ready(None);
        }
        abort.waker.register(cx.waker());
        if abort.aborts(run) {
            return Poll::Ready(None);
        }
        // A panic is caught where the handler is polled, so that its message is kept.
        match catch_unwind(AssertUnwindSafe(|| running.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(outcome)) => Poll::Ready(Some(outcome)),
            Err(panic) => Poll::Ready(Some(Err(HandlerError(format!(
                "handler panicked: {}",
                panic_message(panic.as_ref())
            ))))),
        }
    })
    .await
}

/// A runner's side of its queue. Dropped with runs still queued (its task aborted, or a
/// handler's drop panicked), it reports them as ended with no outcome (the run under way
/// has its own [`Report`]).
struct Inbox {
    queued: mpsc::UnboundedReceiver<Run>,
    to: mpsc::UnboundedSender<End>,
    slot: WorkerSlot,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.queued.close();
        while let Ok(queued) = self.queued.try_recv() {
            let _ = self.to.send(End::Handler {
                run: queued.run,
                slot: self.slot,
                outcome: None,
            });
        }
    }
}

/// Runs `send` (result `number` of `slot`, on a stream of its own) in a task; its
/// [`End::Delivery`] comes through `to` however it ends. The returned handle aborts it.
pub(super) fn delivery<F>(send: F, slot: WorkerSlot, number: u64, to: mpsc::UnboundedSender<End>) -> AbortHandle
where
    F: Future<Output = ()> + Send + 'static,
{
    let task = async move {
        send.await;
        End::Delivery { slot, number }
    };
    spawn(task, to, End::Delivery { slot, number })
}

/// Spawns `task`; what it returns goes to `to`, or `if_dropped` if it never returns
/// (a panic unwinds through it, or it is aborted).
fn spawn<F>(task: F, to: mpsc::UnboundedSender<End>, if_dropped: End) -> AbortHandle
where
    F: Future<Output = End> + Send + 'static,
{
    // Owns its sender: a task aborted before its first poll drops the report unstarted,
    // and the report must still send.
    let mut report = Report {
        to,
        if_dropped: Some(if_dropped),
    };
    tokio::spawn(async move {
        let end = task.await;
        report.send(end);
    })
    .abort_handle()
}

/// Sends a task's end once: what it returned, or when dropped unsent, `if_dropped`.
/// `S` is the link's sender, owned or borrowed.
struct Report<S: Borrow<mpsc::UnboundedSender<End>>> {
    to: S,
    if_dropped: Option<End>,
}

impl<S: Borrow<mpsc::UnboundedSender<End>>> Report<S> {
    fn send(&mut self, end: End) {
        self.if_dropped = None;
        // A link that is gone waits for nothing.
        let _ = self.to.borrow().send(end);
    }
}

impl<S: Borrow<mpsc::UnboundedSender<End>>> Drop for Report<S> {
    fn drop(&mut self) {
        if let Some(end) = self.if_dropped.take() {
            let _ = self.to.borrow().send(end);
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("unknown panic")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn ended(rx: &mut mpsc::UnboundedReceiver<End>) -> End {
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the task reports its end")
            .expect("open");
        // The sender went with the task: nothing more comes.
        let after = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(matches!(after, Ok(None)), "reported once");
        end
    }

    fn request(query_id: u64) -> Request {
        Request {
            query_id,
            tenant: "t".into(),
            actors: Vec::new(),
            component: None,
            metadata: Default::default(),
            queue_time: Duration::ZERO,
            timeout: None,
            attempt: 1,
            scheduler: "127.0.0.1:1".parse().unwrap(),
            payload: bytes::Bytes::new(),
            cancelled: Default::default(),
        }
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<End>) -> (u64, WorkerSlot, Option<Result<Response, HandlerError>>) {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(End::Handler { run, slot, outcome })) => (run, slot, outcome),
            other => panic!("expected a handler's end, got {other:?}"),
        }
    }

    /// A handler for the tests: query 0 never returns (and counts its drops), 1 panics,
    /// 2 panics when dropped, others echo their id; every call is counted.
    struct Probe {
        calls: std::sync::atomic::AtomicUsize,
        dropped: Arc<std::sync::atomic::AtomicUsize>,
    }

    struct CountDrop(Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for CountDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct PanicOnDrop;
    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            panic!("the handler's drop panicked");
        }
    }

    impl Handler for Probe {
        async fn handle(&self, request: Request) -> Result<Response, HandlerError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match request.query_id {
                0 => {
                    let _guard = CountDrop(self.dropped.clone());
                    std::future::pending().await
                }
                1 => panic!("boom"),
                2 => {
                    let _guard = PanicOnDrop;
                    std::future::pending().await
                }
                n => Err(HandlerError(n.to_string())),
            }
        }
    }

    /// Waits until the handler has been called `n` times.
    async fn running(h: &Probe, n: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while h.calls.load(Ordering::SeqCst) < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the handlers start");
    }

    /// Runners of a fresh [`Probe`], and where their runs end.
    fn runners() -> (Runners<Probe>, Arc<Probe>, mpsc::UnboundedReceiver<End>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let h = Arc::new(Probe {
            calls: Default::default(),
            dropped: Default::default(),
        });
        (Runners::new(h.clone(), tx), h, rx)
    }

    #[tokio::test]
    async fn a_slots_runs_end_once_each_on_one_task() {
        let (mut runners, h, mut rx) = runners();
        for run in 0..3 {
            runners.start(3, run, request(7 + run), tracing::Span::none());
            let (r, slot, outcome) = next(&mut rx).await;
            assert_eq!((r, slot), (run, 3));
            assert!(matches!(outcome, Some(Err(HandlerError(m))) if m == (7 + run).to_string()));
        }
        assert_eq!(runners.by_slot.iter().flatten().count(), 1, "one runner for the slot");
        assert_eq!(h.calls.load(Ordering::SeqCst), 3, "each run called the handler once");
        assert!(rx.try_recv().is_err(), "nothing more");
    }

    #[tokio::test]
    async fn a_panic_becomes_an_error_result_and_the_runner_goes_on() {
        let (mut runners, _, mut rx) = runners();
        runners.start(0, 1, request(1), tracing::Span::none());
        let (run, _, outcome) = next(&mut rx).await;
        assert_eq!(run, 1);
        assert!(
            matches!(&outcome, Some(Err(HandlerError(m))) if m == "handler panicked: boom"),
            "{outcome:?}"
        );
        runners.start(0, 2, request(9), tracing::Span::none());
        assert!(matches!(next(&mut rx).await, (2, 0, Some(Err(_)))));
    }

    #[tokio::test]
    async fn an_aborted_run_drops_its_handler_reports_no_outcome_and_the_next_run_runs() {
        let (mut runners, h, mut rx) = runners();
        runners.start(1, 5, request(0), tracing::Span::none());
        // Queued behind the stuck run, as a slot's next run is after an abort.
        runners.start(1, 6, request(11), tracing::Span::none());
        running(&h, 1).await;
        runners.abort(1, 5);
        assert!(matches!(next(&mut rx).await, (5, 1, None)));
        assert_eq!(h.dropped.load(Ordering::SeqCst), 1, "the handler was dropped");
        assert!(matches!(next(&mut rx).await, (6, 1, Some(Err(HandlerError(m)))) if m == "11"));
        // An abort of a finished run touches no later one.
        runners.abort(1, 6);
        runners.start(1, 7, request(12), tracing::Span::none());
        assert!(matches!(next(&mut rx).await, (7, 1, Some(Err(_)))));
    }

    #[tokio::test]
    async fn a_runner_that_dies_reports_its_runs_and_is_replaced() {
        let (mut runners, h, mut rx) = runners();
        runners.start(2, 1, request(2), tracing::Span::none());
        runners.start(2, 2, request(13), tracing::Span::none());
        running(&h, 1).await;
        // The abort drops a handler whose drop panics: the runner's task dies with it.
        runners.abort(2, 1);
        assert!(matches!(next(&mut rx).await, (1, 2, None)));
        assert!(matches!(next(&mut rx).await, (2, 2, None)), "the queued run ends too");
        // The slot's next run gets a new runner.
        runners.start(2, 3, request(14), tracing::Span::none());
        assert!(matches!(next(&mut rx).await, (3, 2, Some(Err(HandlerError(m)))) if m == "14"));
    }

    #[tokio::test]
    async fn dropped_runners_drop_their_handlers_and_report_no_outcome() {
        let (mut runners, h, mut rx) = runners();
        runners.start(0, 1, request(0), tracing::Span::none());
        runners.start(1, 2, request(0), tracing::Span::none());
        running(&h, 2).await;
        drop(runners);
        let mut ended = [next(&mut rx).await, next(&mut rx).await].map(|(run, _, outcome)| (run, outcome.is_none()));
        ended.sort();
        assert_eq!(ended, [(1, true), (2, true)]);
        assert_eq!(h.dropped.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_delivery_reports_its_end_whether_it_returns_panics_or_is_aborted() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        delivery(async {}, 4, 40, tx);
        assert!(matches!(ended(&mut rx).await, End::Delivery { slot: 4, number: 40 }));

        let (tx, mut rx) = mpsc::unbounded_channel();
        delivery(
            async {
                if true {
                    panic!("the sender broke");
                }
            },
            5,
            50,
            tx,
        );
        assert!(matches!(ended(&mut rx).await, End::Delivery { slot: 5, number: 50 }));

        let (tx, mut rx) = mpsc::unbounded_channel();
        delivery(std::future::pending(), 6, 60, tx).abort();
        assert!(matches!(ended(&mut rx).await, End::Delivery { slot: 6, number: 60 }));
    }
}
