//! The shared results stream to one frontend: small whole results travel as one `Whole`
//! (or `Error`) frame each on one long-lived stream per frontend connection, instead of a
//! stream, a task on each side and a write each way per result. One task per frontend
//! address owns the stream: it writes every result waiting at that moment in one write and
//! hands each `ResultAck` (they come back in order) to the result's sender.
//!
//! The receipt goes straight to the link that ran the query (its [`Reply`] channel, which
//! the link's task already waits on): no task per result on this side either.
//!
//! If the stream cannot be opened or breaks, every result not yet acknowledged is given
//! back to its link as not carried, and the link sends it on a stream of its own (the
//! frontend refuses a second copy of a result it already has as `Duplicate`, so a result
//! whose acknowledgement was lost is never taken twice). The next result starts a new task.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use sluice_protocol::{
    Dispatch, FramedRead, FramedWrite, FrontendAddress, Hello, QueryId, ResultAck, ResultFrame, ResultReceipt, Role,
    StreamKind,
};
use tokio::sync::mpsc;
use tracing::debug;

use super::frontends::{FrontendSlot, connect};
use super::{HandlerError, Response, ResponseBody, Shared};
use crate::FastMap;
use crate::quic_stats::QuicStats;

/// Largest body (with its metadata) sent on the shared stream: a larger one would hold up the results behind
/// it, so it gets a stream of its own.
pub(super) const MAX_SHARED_BODY: usize = 16 * 1024;

/// A whole result for the shared stream, and who waits for its receipt.
pub(super) struct Whole {
    frame: ResultFrame,
    reply: Reply,
}

/// Where a result's outcome goes: the link's channel, with the number the link gave it.
pub(super) struct Reply {
    pub(super) to: mpsc::UnboundedSender<Settled>,
    pub(super) number: u64,
}

/// A result's outcome on the shared stream: the frontend's receipt, or the frame back when
/// the stream did not carry it (to be sent on a stream of its own).
pub(super) struct Settled {
    pub(super) number: u64,
    pub(super) outcome: Result<ResultReceipt, ResultFrame>,
}

impl Reply {
    fn send(self, outcome: Result<ResultReceipt, ResultFrame>) {
        // A link that is gone no longer waits.
        let _ = self.to.send(Settled {
            number: self.number,
            outcome,
        });
    }
}

/// The shared results streams' tasks, by frontend address, while they run.
#[derive(Default)]
pub(super) struct Batches(std::sync::Mutex<FastMap<String, mpsc::UnboundedSender<Whole>>>);

/// Addresses kept before those whose task ended are swept.
const SWEEP_ABOVE: usize = 64;

/// Queues `frame` (`Whole` or `Error`) for the shared results stream to `to`; its outcome
/// comes back through `reply`, exactly once.
pub(super) fn send(shared: &Shared, to: &FrontendAddress, frame: ResultFrame, reply: Reply) {
    let mut batches = shared.batches.0.lock().unwrap();
    let whole = Whole { frame, reply };
    let whole = match batches.get(&to.address) {
        Some(tx) => match tx.send(whole) {
            Ok(()) => return,
            Err(mpsc::error::SendError(whole)) => whole,
        },
        None => whole,
    };
    // No task, or its stream ended: a new one.
    if batches.len() >= SWEEP_ABOVE {
        batches.retain(|_, tx| !tx.is_closed());
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(whole);
    batches.insert(to.address.clone(), tx);
    let hello = Hello::new(Role::Querier, &shared.config.client.id, StreamKind::Results);
    let task = Task {
        endpoint: shared.endpoint.clone(),
        quic: shared.quic.clone(),
        slot: Arc::downgrade(&shared.frontends.slot(&to.address)),
        to: to.clone(),
        max_frame_len: super::deliver::result_frame_len(shared, to),
        stalled_after: shared.config.client.idle_timeout,
    };
    tokio::spawn(task.run(hello, rx));
}

/// The result as one frame for the shared stream when it is small and whole (`Ok`), or
/// the outcome back (`Err`) for a stream of its own. The frame takes the dispatch's tenant
/// (no copy per query); [`unwhole`] gives it back if the frame comes back.
pub(super) fn whole(
    d: &mut Dispatch,
    outcome: Result<Response, HandlerError>,
) -> Result<ResultFrame, Result<Response, HandlerError>> {
    match outcome {
        Err(HandlerError(message)) => Ok(ResultFrame::Error {
            query_id: d.query_id,
            tenant: std::mem::take(&mut d.tenant),
            capability: d.capability,
            message,
        }),
        Ok(Response {
            status,
            metadata,
            body: ResponseBody::Bytes(body),
            ..
        }) if body.len() + sluice_protocol::metadata_len_bound(&metadata) <= MAX_SHARED_BODY => {
            Ok(ResultFrame::Whole {
                query_id: d.query_id,
                tenant: std::mem::take(&mut d.tenant),
                capability: d.capability,
                status,
                metadata,
                body,
            })
        }
        other => Err(other),
    }
}

/// The outcome a shared-stream frame carried, to send it on a stream of its own; the
/// tenant [`whole`] took goes back to `d`.
pub(super) fn unwhole(frame: ResultFrame, d: &mut Dispatch) -> Result<Response, HandlerError> {
    match frame {
        ResultFrame::Whole {
            status,
            metadata,
            body,
            tenant,
            ..
        } => {
            d.tenant = tenant;
            Ok(Response {
                status,
                metadata,
                body: ResponseBody::Bytes(body),
                measured_cost: None,
            })
        }
        ResultFrame::Error { message, tenant, .. } => {
            d.tenant = tenant;
            Err(HandlerError(message))
        }
        other => Err(HandlerError(format!("not a whole result: {other:?}"))),
    }
}

struct Task {
    endpoint: quinn::Endpoint,
    quic: Arc<QuicStats>,
    /// Weak: the task ends when the querier lets go of its connections (the channel closes).
    slot: Weak<FrontendSlot>,
    to: FrontendAddress,
    max_frame_len: u32,
    /// A stream with results waiting and no ack for this long is given up (a frontend
    /// alive but not reading): its results go on streams of their own, each bounded by its
    /// query's deadline.
    stalled_after: std::time::Duration,
}

impl Task {
    async fn run(self, hello: Hello, mut results: mpsc::UnboundedReceiver<Whole>) {
        let mut waiting = VecDeque::new();
        let ended = self.carry(hello, &mut results, &mut waiting).await;
        if let Err(e) = ended {
            debug!(frontend = %self.to.address, error = %e, "shared results stream ended");
        }
        // Whatever was not acknowledged, or not even written, goes back to its link.
        results.close();
        for (_, reply, frame) in waiting {
            reply.send(Err(frame));
        }
        while let Ok(whole) = results.try_recv() {
            whole.reply.send(Err(whole.frame));
        }
    }

    /// Writes results and matches acks until the stream breaks (`Err`) or the querier lets
    /// go and every result is acknowledged (`Ok`). `waiting`: the results written and not
    /// yet acknowledged, in the order written, which is the order their acks come in.
    async fn carry(
        &self,
        hello: Hello,
        results: &mut mpsc::UnboundedReceiver<Whole>,
        waiting: &mut VecDeque<(QueryId, Reply, ResultFrame)>,
    ) -> Result<(), String> {
        let slot = self.slot.upgrade().ok_or("the querier stopped")?;
        let conn = connect(&self.endpoint, &slot, &self.to, &self.quic).await?;
        drop(slot);
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let (mut w, mut r) = (
            FramedWrite::new(send, self.max_frame_len),
            FramedRead::new(recv, self.max_frame_len),
        );
        w.buffer(&hello).map_err(|e| e.to_string())?;
        let (mut open, mut next) = (true, None);
        let mut progress = tokio::time::Instant::now();
        // Armed once and moved on only when it fires early: progress is a clock read, not a
        // timer registered and dropped for every result.
        let stall = tokio::time::sleep(self.stalled_after);
        tokio::pin!(stall);
        loop {
            // `next` is always taken here, before anything that can fail.
            while let Some(whole) = next.take().or_else(|| results.try_recv().ok()) {
                let id = match &whole.frame {
                    ResultFrame::Whole { query_id, .. } | ResultFrame::Error { query_id, .. } => *query_id,
                    _ => {
                        whole.reply.send(Err(whole.frame));
                        continue;
                    }
                };
                if w.buffer(&whole.frame).is_ok() {
                    if waiting.is_empty() {
                        progress = tokio::time::Instant::now();
                    }
                    waiting.push_back((id, whole.reply, whole.frame));
                } else {
                    whole.reply.send(Err(whole.frame));
                }
            }
            if w.buffered() > 0 {
                w.flush().await.map_err(|e| e.to_string())?;
            }
            if !open && waiting.is_empty() {
                let _ = w.get_mut().finish();
                return Ok(());
            }
            tokio::select! {
                whole = results.recv(), if open => match whole {
                    Some(whole) => next = Some(whole),
                    None => open = false,
                },
                ack = r.next::<ResultAck>() => {
                    let ack = ack.map_err(|e| e.to_string())?.ok_or("the frontend closed it")?;
                    match waiting.front() {
                        Some((id, ..)) if *id == ack.query_id => {}
                        Some(_) => return Err("an ack out of order".into()),
                        None => return Err("an ack of nothing sent".into()),
                    }
                    let (_, reply, _) = waiting.pop_front().expect("checked above");
                    reply.send(Ok(ack.receipt));
                    progress = tokio::time::Instant::now();
                }
                () = &mut stall, if !waiting.is_empty() => {
                    let due = progress + self.stalled_after;
                    if tokio::time::Instant::now() >= due {
                        return Err(format!("no acknowledgement for {:?}", self.stalled_after));
                    }
                    stall.as_mut().reset(due);
                }
            }
        }
    }
}
