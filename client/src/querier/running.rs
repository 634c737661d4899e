//! A query's handler in a task of its own, which reports how it ended on its link's
//! channel exactly once: it returned, it panicked (an error result), or it was aborted
//! (nothing to send).
//!
//! A channel rather than a `JoinSet`: each query costs one lock-free push, where a set
//! allocates an entry and takes its lock on insert, on completion and on join, and the
//! output is moved once more through the join handle.

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

/// How a handler's run ended.
#[derive(Debug)]
pub(super) struct Ended {
    /// The run's number (a slot's next run must not take this one's end for its own).
    pub(super) run: u64,
    pub(super) slot: WorkerSlot,
    /// `None`: the task was aborted before the handler returned.
    pub(super) outcome: Option<Result<Response, HandlerError>>,
}

/// Runs `handler` (run `run` of `slot`) in a task in `span`; its [`Ended`] comes through
/// `to`. The returned handle aborts it.
pub(super) fn spawn<F>(
    handler: F,
    run: u64,
    slot: WorkerSlot,
    to: mpsc::UnboundedSender<Ended>,
    span: tracing::Span,
) -> AbortHandle
where
    F: Future<Output = Result<Response, HandlerError>> + Send + 'static,
{
    let mut report = Report {
        to,
        run,
        slot,
        sent: false,
    };
    let task = async move {
        let mut handler = pin!(handler);
        // A panic is caught where the handler is polled: the task itself ends normally.
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
        report.send(Some(outcome));
    };
    tokio::spawn(task.instrument(span)).abort_handle()
}

/// Sends the run's end; if dropped unsent (the task was aborted), sends that.
struct Report {
    to: mpsc::UnboundedSender<Ended>,
    run: u64,
    slot: WorkerSlot,
    sent: bool,
}

impl Report {
    fn send(&mut self, outcome: Option<Result<Response, HandlerError>>) {
        self.sent = true;
        // A link that is gone waits for nothing.
        let _ = self.to.send(Ended {
            run: self.run,
            slot: self.slot,
            outcome,
        });
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if !self.sent {
            self.send(None);
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

    async fn ended(rx: &mut mpsc::UnboundedReceiver<Ended>) -> Ended {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the run reports its end")
            .expect("open")
    }

    #[tokio::test]
    async fn a_returned_handler_reports_its_outcome_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn(
            async { Err(HandlerError("no".into())) },
            7,
            3,
            tx,
            tracing::Span::none(),
        );
        let e = ended(&mut rx).await;
        assert_eq!((e.run, e.slot), (7, 3));
        assert!(matches!(e.outcome, Some(Err(HandlerError(m))) if m == "no"));
        // The sender is gone with the task: nothing more comes.
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_panic_becomes_an_error_result() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn(
            async {
                if true {
                    panic!("boom");
                }
                Err(HandlerError("unreachable".into()))
            },
            1,
            0,
            tx,
            tracing::Span::none(),
        );
        let e = ended(&mut rx).await;
        assert!(
            matches!(&e.outcome, Some(Err(HandlerError(m))) if m == "handler panicked: boom"),
            "{e:?}"
        );
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn an_aborted_run_reports_no_outcome() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = spawn(
            std::future::pending::<Result<Response, HandlerError>>(),
            2,
            1,
            tx,
            tracing::Span::none(),
        );
        task.abort();
        let e = ended(&mut rx).await;
        assert_eq!((e.run, e.slot), (2, 1));
        assert!(e.outcome.is_none());
        assert!(rx.recv().await.is_none());
    }
}
