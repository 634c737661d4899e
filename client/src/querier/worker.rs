//! One worker against one scheduler: the dequeue loop (Ready → Dispatch → run → Ready),
//! reconnecting after any loss until the querier stops, and the run of one query under its
//! cancel and deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_protocol::{
    Dispatch, Finished, FramedRead, FramedWrite, Hello, HelloReply, LIFELINE_MAGIC, Notice, NoticeReply,
    QuerierToScheduler, Role, SchedulerToQuerier, StreamKind,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{Instrument, debug, warn};

use crate::trace::TraceParent;

use super::deliver::{self, Delivery};
use super::{Counted, Handler, HandlerError, Link, Request, Shared, Stream};
use crate::backoff::Backoff;
use tokio_util::sync::CancellationToken;

/// Why a dequeue loop on one stream ended.
enum Ended {
    /// The querier stops, or the scheduler is no longer served: the worker ends.
    Stop,
    /// The scheduler is draining (or went away): reconnect once it is back.
    Reconnect(String),
}

/// One worker against one scheduler: reconnects with backoff after any loss, until the
/// querier stops or the scheduler is no longer served. `_alive` counts it while it runs.
pub(super) async fn worker_loop<H: Handler>(
    shared: Arc<Shared>,
    link: Arc<Link>,
    handler: Arc<H>,
    _alive: Counted,
    seed: u64,
) {
    let mut backoff = Backoff::new(seed ^ u64::from(link.addr.port()) << 16);
    // The last result handed to its sender, until it is settled (kept across reconnects:
    // a result goes to its frontend whatever became of the scheduler).
    let mut pending: Option<Delivery> = None;
    loop {
        match serve(&shared, &link, &handler, &mut backoff, &mut pending).await {
            Ended::Stop => {
                // The querier waits for its workers: let the last result arrive.
                if let Some(delivery) = pending.take() {
                    let _ = delivery.await;
                }
                return;
            }
            Ended::Reconnect(why) => debug!(scheduler = %link.addr, %why, "worker reconnects"),
        }
        if shared.stopping.is_cancelled() || link.stop.is_cancelled() {
            if let Some(delivery) = pending.take() {
                let _ = delivery.await;
            }
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shared.stopping.cancelled() => return,
            _ = link.stop.cancelled() => return,
        }
    }
}

async fn scheduler_connection(shared: &Shared, link: &Link) -> Result<quinn::Connection, String> {
    let mut slot = link.conn.lock().await;
    if let Some(c) = slot.as_ref()
        && c.close_reason().is_none()
    {
        return Ok(c.clone());
    }
    let conn = shared
        .endpoint
        .connect(link.addr, &shared.config.scheduler_server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    crate::tls::expect_peer_role(&conn, Role::Scheduler)?;
    *slot = Some(conn.clone());
    Ok(conn)
}

/// Forgets `conn` as the link's connection if it still is, so the next worker dials anew
/// (the scheduler behind it is draining).
async fn drop_connection(link: &Link, conn: &quinn::Connection) {
    let mut slot = link.conn.lock().await;
    if slot.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
        *slot = None;
    }
}

/// Opens a stream of `kind` and says hello, waiting for the answer no longer than the
/// idle timeout.
pub(super) async fn open(shared: &Shared, conn: &quinn::Connection, kind: StreamKind) -> Result<Stream, String> {
    let setup = async {
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let max = shared.config.max_frame_len;
        let (mut w, mut r) = (FramedWrite::new(send, max), FramedRead::new(recv, max));
        w.send(&Hello::new(Role::Querier, &shared.config.id, kind))
            .await
            .map_err(|e| e.to_string())?;
        match r.next::<HelloReply>().await.map_err(|e| e.to_string())? {
            Some(HelloReply::Welcome { .. }) => Ok((w, r)),
            Some(HelloReply::Rejected { code, message }) => Err(format!("refused ({code:?}): {message}")),
            None => Err("closed before the hello reply".into()),
        }
    };
    tokio::time::timeout(shared.config.idle_timeout, setup)
        .await
        .map_err(|_| "no hello reply in time".to_string())?
}

pub(super) async fn notify_shutdown(shared: &Shared, link: &Link) -> Result<(), String> {
    let conn = link.conn.lock().await.clone().ok_or("not connected")?;
    let (mut w, mut r) = open(shared, &conn, StreamKind::ShutdownNotice).await?;
    w.send(&Notice::QuerierShuttingDown).await.map_err(|e| e.to_string())?;
    match r.next::<NoticeReply>().await.map_err(|e| e.to_string())? {
        Some(NoticeReply::Acknowledged) => Ok(()),
        None => Err("closed before acknowledging".into()),
    }
}

/// Runs the dequeue loop on one stream until it ends.
async fn serve<H: Handler>(
    shared: &Arc<Shared>,
    link: &Link,
    handler: &Arc<H>,
    backoff: &mut Backoff,
    pending: &mut Option<Delivery>,
) -> Ended {
    // Nothing runs yet: a shutdown need not wait for a (re)connection to finish.
    let setup = async {
        let conn = scheduler_connection(shared, link).await?;
        let stream = open(shared, &conn, StreamKind::DequeueLoop).await?;
        Ok::<_, String>((conn, stream))
    };
    let (conn, (mut w, mut r)) = tokio::select! {
        stream = setup => match stream {
            Ok(s) => s,
            Err(e) => return Ended::Reconnect(e),
        },
        _ = shared.stopping.cancelled() => return Ended::Stop,
        _ = link.stop.cancelled() => return Ended::Stop,
    };
    backoff.reset();
    let _registered = Counted::new(&link.connected, Some(&shared.registration));
    let mut finished = None;
    loop {
        if let Err(e) = w
            .send(&QuerierToScheduler::Ready {
                finished: finished.take(),
            })
            .await
        {
            return Ended::Reconnect(e.to_string());
        }
        let dispatch = loop {
            // The link stops only when its scheduler left or died: nothing can be
            // dispatched to this stream any more.
            let next = tokio::select! {
                next = r.next::<SchedulerToQuerier>() => next,
                _ = link.stop.cancelled() => return Ended::Stop,
            };
            match next {
                Ok(Some(SchedulerToQuerier::Dispatch(d))) => break *d,
                Ok(Some(SchedulerToQuerier::Cancel { .. })) => {} // for a query already done
                Ok(Some(SchedulerToQuerier::Lifeline { port, token })) => {
                    hold_lifeline(shared, link, port, token).await
                }
                Ok(Some(SchedulerToQuerier::ShuttingDown)) => return draining(shared, link, &conn).await,
                Ok(None) => return Ended::Reconnect("the scheduler closed the stream".into()),
                Err(e) => return Ended::Reconnect(e.to_string()),
            }
        };
        let (frontend_id, query_id) = (dispatch.frontend.id.clone(), dispatch.query_id);
        let ran = run(shared, handler, dispatch, link.addr, &mut r).await;
        // At most one delivery in flight besides the new one: the previous result is
        // settled before `Ready` reports this one (the scheduler counts on it).
        if let Some(previous) = std::mem::replace(pending, ran.delivery) {
            let _ = previous.await;
        }
        finished = Some(Finished {
            frontend_id,
            query_id,
            measured_cost: ran.measured_cost,
        });
        match ran.stream {
            StreamAfter::Open => {}
            StreamAfter::Draining => {
                let _ = w
                    .send(&QuerierToScheduler::Ready {
                        finished: finished.take(),
                    })
                    .await;
                return draining(shared, link, &conn).await;
            }
            StreamAfter::Lost(why) => return Ended::Reconnect(why),
        }
    }
}

/// The scheduler said `ShuttingDown`: this querier stops if it is the one shutting down;
/// otherwise the scheduler is draining, and the worker comes back once it (or its
/// successor at the same address) listens again.
async fn draining(shared: &Shared, link: &Link, conn: &quinn::Connection) -> Ended {
    if shared.stopping.is_cancelled() {
        return Ended::Stop;
    }
    drop_connection(link, conn).await;
    Ended::Reconnect("the scheduler is draining".into())
}

/// The dequeue stream's state after a query ran.
enum StreamAfter {
    Open,
    /// The scheduler said `ShuttingDown` meanwhile.
    Draining,
    /// The stream broke meanwhile.
    Lost(String),
}

struct Ran {
    stream: StreamAfter,
    measured_cost: Option<u32>,
    /// The result, handed to its sender (none for a cancelled or aborted query).
    delivery: Option<Delivery>,
}

/// Runs one query while watching the stream for its cancel and the clock for its
/// deadline; hands the result to its sender (it goes straight to the frontend, even if
/// the scheduler went away meanwhile).
async fn run<H: Handler>(
    shared: &Arc<Shared>,
    handler: &Arc<H>,
    mut d: Dispatch,
    scheduler: SocketAddr,
    r: &mut FramedRead<quinn::RecvStream>,
) -> Ran {
    let cancelled = CancellationToken::new();
    // The handler runs in a `query` span with the query's trace id, and sees a trace
    // context naming this hop.
    let span = tracing::debug_span!("query", query = d.query_id, tenant = %d.tenant, trace_id = tracing::field::Empty);
    if let Some(trace) = TraceParent::of(&d.metadata) {
        span.record("trace_id", trace.trace_id_hex());
        trace.child().set(&mut d.metadata);
    }
    let deadline = d
        .timeout_ms
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let request = Request {
        query_id: d.query_id,
        tenant: d.tenant.clone(),
        // Moved, not copied: the result needs only the ids, tenant and frontend.
        actors: std::mem::take(&mut d.actors),
        component: d.component.take(),
        metadata: std::mem::take(&mut d.metadata),
        queue_time: Duration::from_micros(d.queue_time_us),
        timeout: d.timeout_ms.map(Duration::from_millis),
        attempt: d.attempt,
        scheduler,
        payload: std::mem::take(&mut d.payload),
        cancelled: cancelled.clone(),
    };
    let h = handler.clone();
    // A task of its own, so a panic becomes an error result instead of a dead worker, and
    // a handler that ignores its cancel can be aborted.
    let mut task = tokio::spawn(async move { h.handle(request).await }.instrument(span));
    let mut stream = StreamAfter::Open;
    // When the handler is aborted if it has not returned (set once cancelled).
    let mut abort_at: Option<tokio::time::Instant> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    // A query still running after `confirm_after` is confirmed to its frontend.
    let confirm_at = tokio::time::Instant::now() + shared.config.confirm_after;
    let mut early: Option<deliver::Early> = None;
    // One timer for the three moments that matter (confirm, deadline, abort), polled only
    // while the handler has not finished: a quick query registers none.
    let timer = tokio::time::sleep_until(far);
    tokio::pin!(timer);
    let mut timer_at = far;
    let outcome = loop {
        let reading = matches!(stream, StreamAfter::Open);
        let next = [
            early.is_none().then_some(confirm_at),
            (!cancelled.is_cancelled()).then_some(deadline).flatten(),
            abort_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(far);
        if next != timer_at {
            timer.as_mut().reset(next);
            timer_at = next;
        }
        tokio::select! {
            biased;
            joined = &mut task => break match joined {
                Ok(outcome) => Some(outcome),
                Err(e) if e.is_panic() => Some(Err(HandlerError(format!("handler panicked: {}", panic_message(e))))),
                Err(_) => None, // aborted after its grace
            },
            msg = r.next::<SchedulerToQuerier>(), if reading => match msg {
                Ok(Some(SchedulerToQuerier::Cancel { query_id })) if query_id == d.query_id => {
                    cancelled.cancel();
                    abort_at = Some(tokio::time::Instant::now() + shared.config.cancel_grace);
                }
                Ok(Some(SchedulerToQuerier::ShuttingDown)) => stream = StreamAfter::Draining,
                Ok(Some(_)) => {}
                Ok(None) => stream = StreamAfter::Lost("the scheduler closed the stream".into()),
                Err(e) => stream = StreamAfter::Lost(e.to_string()),
            },
            _ = &mut timer, if timer_at < far => {
                let now = tokio::time::Instant::now();
                if abort_at.is_some_and(|at| at <= now) {
                    warn!(query = d.query_id, grace = ?shared.config.cancel_grace, "handler ignored its cancel; aborting it");
                    task.abort();
                    abort_at = None;
                } else if !cancelled.is_cancelled() && deadline.is_some_and(|at| at <= now) {
                    debug!(query = d.query_id, "deadline passed; cancelling the handler");
                    cancelled.cancel();
                    abort_at = Some(now + shared.config.cancel_grace);
                } else if early.is_none() && confirm_at <= now {
                    early = Some(deliver::confirm(shared, &d));
                }
                timer_at = far; // fired: set again at the top
                timer.as_mut().reset(far);
            }
        }
    };
    let measured_cost = outcome
        .as_ref()
        .and_then(|o| o.as_ref().ok())
        .and_then(|r| r.measured_cost);
    let delivery = match outcome {
        // Cancelled (by the frontend, or its deadline, at which the frontend fails the
        // query itself): nothing to send; an early stream is dropped (reset).
        _ if cancelled.is_cancelled() => {
            if let Some(task) = early {
                task.abort();
            }
            debug!(query = d.query_id, "cancelled; no result sent");
            None
        }
        None => None,
        Some(outcome) => Some(deliver::hand_off(shared, d, outcome, deadline, early)),
    };
    Ran {
        stream,
        measured_cost,
        delivery,
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Opens (once per token) the TCP lifeline the scheduler asked for and holds it, so that
/// if this process dies the kernel's closing of the socket tells the scheduler at once.
async fn hold_lifeline(shared: &Shared, link: &Link, port: u16, token: u128) {
    let mut lifelines = shared.lifelines.lock().await;
    lifelines.retain(|_, task| !task.is_finished());
    if lifelines.contains_key(&token) {
        return;
    }
    let addr = SocketAddr::new(link.addr.ip(), port);
    let timeout = shared.config.idle_timeout;
    let task = tokio::spawn(async move {
        let mut socket = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(socket)) => socket,
            Ok(Err(e)) => return warn!(%addr, error = %e, "no lifeline to the scheduler"),
            Err(_) => return warn!(%addr, "no lifeline to the scheduler: connect timed out"),
        };
        let mut preamble = LIFELINE_MAGIC.to_vec();
        preamble.extend_from_slice(&token.to_be_bytes());
        if socket.write_all(&preamble).await.is_err() {
            return;
        }
        // Nothing comes back; the scheduler closes it when the QUIC connection ends.
        let mut scratch = [0u8; 64];
        while let Ok(n) = socket.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    });
    lifelines.insert(token, task);
}
