//! The shared results stream to one frontend: small whole results travel as one `Whole`
//! (or `Error`) frame each on one long-lived stream per frontend connection, instead of a
//! stream, a task on each side and a write each way per result. One task per frontend
//! address owns the stream: it writes every result waiting at that moment in one write and
//! hands each `ResultAck` (they come back in order) to the result's sender.
//!
//! If the stream cannot be opened or breaks, every result not yet acknowledged is given
//! back to its sender as not carried, and the sender sends it on a stream of its own (the
//! frontend refuses a second copy of a result it already has as `Duplicate`, so a result
//! whose acknowledgement was lost is never taken twice). The next result starts a new task.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};

use sluice_protocol::{
    FramedRead, FramedWrite, FrontendAddress, Hello, QueryId, ResultAck, ResultFrame, ResultReceipt, Role, StreamKind,
};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::Shared;
use super::deliver::{FrontendSlot, connect};

/// Largest body sent on the shared stream: a larger one would hold up the results behind
/// it, so it gets a stream of its own.
pub(super) const MAX_SHARED_BODY: usize = 16 * 1024;

/// A whole result for the shared stream, and who waits for its receipt.
pub(super) struct Whole {
    frame: ResultFrame,
    reply: oneshot::Sender<ResultReceipt>,
}

/// Sends `frame` (`Whole` or `Error`) on the shared results stream to `to`. Returns the
/// frontend's receipt, or `None` when the stream did not carry it (the caller then sends
/// it on a stream of its own).
pub(super) async fn send(shared: &Shared, to: &FrontendAddress, frame: ResultFrame) -> Option<ResultReceipt> {
    let slot = shared.frontends.slot(&to.address);
    let (reply, receipt) = oneshot::channel();
    let whole = Whole { frame, reply };
    {
        let mut batch = slot.batch.lock().unwrap();
        let whole = match batch.as_ref() {
            Some(tx) => tx.send(whole).err().map(|mpsc::error::SendError(whole)| whole),
            None => Some(whole),
        };
        if let Some(whole) = whole {
            // No task, or its stream ended: a new one.
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(whole);
            *batch = Some(tx);
            let hello = Hello::new(Role::Querier, &shared.config.id, StreamKind::Results);
            let task = Task {
                endpoint: shared.endpoint.clone(),
                slot: Arc::downgrade(&slot),
                to: to.clone(),
                max_frame_len: shared.config.max_frame_len,
            };
            tokio::spawn(task.run(hello, rx));
        }
    }
    receipt.await.ok()
}

struct Task {
    endpoint: quinn::Endpoint,
    /// Weak: the task ends when the querier lets go of its connections (the channel closes).
    slot: Weak<FrontendSlot>,
    to: FrontendAddress,
    max_frame_len: u32,
}

impl Task {
    async fn run(self, hello: Hello, mut results: mpsc::UnboundedReceiver<Whole>) {
        let opened = async {
            let slot = self.slot.upgrade().ok_or("the querier stopped")?;
            let conn = connect(&self.endpoint, &slot, &self.to).await?;
            let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let mut w = FramedWrite::new(send, self.max_frame_len);
            w.buffer(&hello).map_err(|e| e.to_string())?;
            Ok::<_, String>((w, FramedRead::new(recv, self.max_frame_len)))
        };
        let (mut w, mut r) = match opened.await {
            Ok(stream) => stream,
            Err(e) => {
                debug!(frontend = %self.to.address, error = %e, "no shared results stream");
                return; // dropping `results` gives every waiting result back
            }
        };
        let mut waiting: HashMap<QueryId, VecDeque<oneshot::Sender<ResultReceipt>>> = HashMap::new();
        let mut next = None;
        let mut open = true;
        loop {
            while let Some(whole) = next.take().or_else(|| results.try_recv().ok()) {
                let id = match &whole.frame {
                    ResultFrame::Whole { query_id, .. } | ResultFrame::Error { query_id, .. } => *query_id,
                    _ => continue, // only whole results are sent here; the sender retries
                };
                if w.buffer(&whole.frame).is_ok() {
                    waiting.entry(id).or_default().push_back(whole.reply);
                }
            }
            if w.buffered() > 0
                && let Err(e) = w.flush().await
            {
                debug!(frontend = %self.to.address, error = %e, "shared results stream broken");
                return;
            }
            if !open && waiting.is_empty() {
                break;
            }
            tokio::select! {
                whole = results.recv(), if open => match whole {
                    Some(whole) => next = Some(whole),
                    None => open = false,
                },
                ack = r.next::<ResultAck>() => match ack {
                    Ok(Some(ack)) => {
                        let reply = waiting.get_mut(&ack.query_id).and_then(VecDeque::pop_front);
                        if waiting.get(&ack.query_id).is_some_and(VecDeque::is_empty) {
                            waiting.remove(&ack.query_id);
                        }
                        match reply {
                            Some(reply) => { let _ = reply.send(ack.receipt); }
                            None => {
                                debug!(frontend = %self.to.address, query = ack.query_id, "acknowledgement of nothing sent");
                                return;
                            }
                        }
                    }
                    other => {
                        debug!(frontend = %self.to.address, ?other, "shared results stream ended");
                        return;
                    }
                },
            }
        }
        let _ = w.get_mut().finish();
    }
}
