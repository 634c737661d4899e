//! A link's tasks (query handlers, and results sent on streams of their own), each of which
//! reports how it ended on the link's channel exactly once: what it returned, or, if it
//! panicked or was aborted, what its spawner said to report then.
//!
//! A channel rather than a `JoinSet`: each task costs one lock-free push, where a set
//! allocates an entry and takes its lock on insert, on completion and on join, moves the
//! output once more through the join handle, and leaves a panicked or aborted task to be
//! found again by its id.

use std::any::Any;
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::task::Poll;

use sluice_protocol::WorkerSlot;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::Instrument;

use super::{HandlerError, Response};

/// How one of a link's tasks ended.
#[derive(Debug)]
pub(super) enum End {
    /// A handler's run (`run` numbers a slot's runs: the next must not take this one's end).
    Handler {
        run: u64,
        slot: WorkerSlot,
        /// `None`: the task was aborted before the handler returned.
        outcome: Option<Result<Response, HandlerError>>,
    },
    /// The result numbered `number` was settled on a stream of its own (delivered, refused
    /// or given up; or its task panicked or was aborted).
    Delivery { slot: WorkerSlot, number: u64 },
}

/// Runs `handler` (run `run` of `slot`) in a task in `span`; its [`End::Handler`] comes
/// through `to`, a panic as an error result. The returned handle aborts it.
pub(super) fn handler<F>(
    handler: F,
    run: u64,
    slot: WorkerSlot,
    to: mpsc::UnboundedSender<End>,
    span: tracing::Span,
) -> AbortHandle
where
    F: Future<Output = Result<Response, HandlerError>> + Send + 'static,
{
    let task = async move {
        let mut handler = pin!(handler);
        // A panic is caught where the handler is polled, so that its message is kept.
        let outcome = poll_fn(
            |cx| match catch_unwind(AssertUnwindSafe(|| handler.as_mut().poll(cx))) {
                Ok(Poll::Pending) => Poll::Pending,
                Ok(Poll::Ready(outcome)) => Poll::Ready(outcome),
                Err(panic) => Poll::Ready(Err(HandlerError(format!(
                    "handler panicked: {}",
                    panic_message(panic.as_ref())
                )))),
            },
        )
        .await;
        End::Handler {
            run,
            slot,
            outcome: Some(outcome),
        }
    };
    let aborted = End::Handler {
        run,
        slot,
        outcome: None,
    };
    spawn(task.instrument(span), to, aborted)
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
struct Report {
    to: mpsc::UnboundedSender<End>,
    if_dropped: Option<End>,
}

impl Report {
    fn send(&mut self, end: End) {
        self.if_dropped = None;
        // A link that is gone waits for nothing.
        let _ = self.to.send(end);
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if let Some(end) = self.if_dropped.take() {
            let _ = self.to.send(end);
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

    #[tokio::test]
    async fn a_returned_handler_reports_its_outcome_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        handler(
            async { Err(HandlerError("no".into())) },
            7,
            3,
            tx,
            tracing::Span::none(),
        );
        let end = ended(&mut rx).await;
        assert!(
            matches!(&end, End::Handler { run: 7, slot: 3, outcome: Some(Err(HandlerError(m))) } if m == "no"),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn a_panic_becomes_an_error_result() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let panics = async {
            if true {
                panic!("boom");
            }
            Err(HandlerError("unreachable".into()))
        };
        handler(panics, 1, 0, tx, tracing::Span::none());
        let end = ended(&mut rx).await;
        assert!(
            matches!(&end, End::Handler { outcome: Some(Err(HandlerError(m))), .. } if m == "handler panicked: boom"),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn an_aborted_run_reports_no_outcome() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let never = std::future::pending::<Result<Response, HandlerError>>();
        handler(never, 2, 1, tx, tracing::Span::none()).abort();
        let end = ended(&mut rx).await;
        assert!(
            matches!(
                end,
                End::Handler {
                    run: 2,
                    slot: 1,
                    outcome: None
                }
            ),
            "{end:?}"
        );
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
