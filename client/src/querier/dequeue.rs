//! One querier–scheduler link: a single dequeue stream carries every worker's `Ready`,
//! `Dispatch` and `Cancel` (one reader and one writer for all of them, so the frames of
//! several workers share wake-ups and writes). The link reconnects with backoff after any
//! loss until the querier stops or the scheduler is no longer served; running queries go
//! on across a loss and their results still reach their frontends. Which worker may do
//! what is decided by [`Slots`]; this file carries it out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_protocol::{
    Dispatch, FramedRead, FramedWrite, Hello, HelloReply, LIFELINE_MAGIC, Notice, NoticeReply, ReadError, Role,
    SchedulerToQuerier, StreamKind, WorkerSlot,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::running::{self, End, Runners};
use super::slots::{Action, Slots, Stream as SlotStream};
use super::{Handler, HandlerError, Link, Request, Response, Shared, Stream, batch, deliver};
use crate::FastMap;
use crate::backoff::Backoff;
use crate::trace::TraceParent;

/// A query dispatched to a slot: what its result needs, and its handler (once it runs).
struct Active {
    dispatch: Box<Dispatch>,
    deadline: Option<Instant>,
    cancelled: CancellationToken,
    /// The handler's request and span until it starts (at once, or when a worker is free
    /// for a held query).
    pending: Option<(Request, tracing::Span)>,
    dispatched_at: Instant,
    /// Its handler's run number, once it runs.
    run: Option<u64>,
    early: Option<deliver::Early>,
}

/// The open dequeue stream.
struct Session {
    conn: quinn::Connection,
    w: FramedWrite<quinn::SendStream>,
    r: FramedRead<quinn::RecvStream>,
}

type Connecting = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Session, String>> + Send>>;

/// One link's workers against its scheduler, until the querier stops or the scheduler
/// is no longer served, and every result handed over has been delivered.
pub(super) async fn link_loop<H: Handler>(shared: Arc<Shared>, link: Arc<Link>, handler: Arc<H>, seed: u64) {
    let mut wanted = link.wanted.subscribe();
    let (receipts, mut settled) = tokio::sync::mpsc::unbounded_channel();
    let (ends, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let mut d = Driver {
        receipts,
        runners: running::Runners::new(handler, ends.clone()),
        ends,
        next_run: 0,
        on_shared: FastMap::default(),
        slots: Slots::new(
            shared.config.cancel_grace,
            shared.config.confirm_after,
            shared.config.prefetch,
        )
        .with_hold_limit(shared.config.hold_limit),
        active: Vec::new(),
        deliveries: FastMap::default(),
        next_delivery: 0,
        session: None,
        out: Vec::new(),
        turn_now: None,
        shared,
        link,
    };
    let mut backoff = Backoff::new(seed ^ u64::from(d.link.addr.port()) << 16);
    let mut connecting: Option<Connecting> = None;
    let mut retry: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut timer_at: Option<Instant> = None;
    // Waited on by every turn of the loop, registered once (not once per turn).
    let link_stop = d.link.stop.clone().cancelled_owned();
    let querier_stop = d.shared.stopping.clone().cancelled_owned();
    tokio::pin!(link_stop, querier_stop);
    d.grow(*wanted.borrow_and_update());
    loop {
        d.carry_out().await;
        let link_stopped = d.link.stop.is_cancelled();
        let querier_stopping = d.shared.stopping.is_cancelled();
        let stopping = querier_stopping || link_stopped;
        // A link that stops asks for nothing more; its running queries are reported.
        if link_stopped && d.slots.stream() == SlotStream::Open {
            d.slots.draining();
            continue;
        }
        // A draining stream ends once every query on it is reported; when this querier
        // stops, also once their results have arrived (the scheduler would otherwise tell
        // their frontends that the querier failed while delivering them).
        if d.slots.stream() == SlotStream::Draining && !d.slots.busy() && !(stopping && d.slots.delivering()) {
            if let Some(mut s) = d.end_session() {
                // The last `Ready`s must reach the scheduler before the connection may
                // close (a querier that stops closes it next): finish the stream and wait
                // (bounded) for the scheduler to acknowledge it.
                let stream = s.w.get_mut();
                if stream.finish().is_ok() {
                    let _ = tokio::time::timeout(d.shared.config.client.idle_timeout, stream.stopped()).await;
                }
                drop_connection(&d.link, &s.conn).await;
            }
            if !stopping {
                debug!(scheduler = %d.link.addr, "the scheduler is draining; reconnecting once it is back");
                retry = Some(Box::pin(tokio::time::sleep(backoff.next_delay())));
            }
        }
        if d.session.is_none() {
            if stopping {
                connecting = None;
                retry = None;
                if !d.slots.busy() && !d.slots.delivering() {
                    return;
                }
            } else if connecting.is_none() && retry.is_none() {
                connecting = Some(Box::pin(connect(d.shared.clone(), d.link.clone())));
            }
        }
        // One timer for every running query's next moment (confirm, deadline, abort):
        // moved earlier when a new moment is earlier; looked for among all workers only
        // once it fired. A timer that fires early finds nothing to do.
        let fresh = d.slots.take_fresh();
        let next = if timer_at.is_none() {
            d.slots.next_moment()
        } else {
            fresh
        };
        if let Some(next) = next
            && timer_at.is_none_or(|at| next < at)
        {
            timer.as_mut().reset(next);
            timer_at = Some(next);
        }
        tokio::select! {
            biased;
            // Every end and receipt already waiting is taken in one turn: their `Ready`s
            // leave in one write, and the loop waits (registering its wakers) once.
            Some(end) = ended.recv() => {
                d.ended(end);
                while let Ok(end) = ended.try_recv() {
                    d.ended(end);
                }
            }
            Some(s) = settled.recv() => {
                d.settled_shared(s);
                while let Ok(s) = settled.try_recv() {
                    d.settled_shared(s);
                }
            }
            next = read(&mut d.session) => d.frame(next).await,
            opened = poll_opt(&mut connecting) => {
                connecting = None;
                match opened {
                    Ok(session) => {
                        backoff.reset();
                        d.session = Some(session);
                        d.slots.opened(&mut d.out);
                        d.count_connected();
                    }
                    Err(e) => {
                        debug!(scheduler = %d.link.addr, error = %e, "dequeue stream not opened; retrying");
                        retry = Some(Box::pin(tokio::time::sleep(backoff.next_delay())));
                    }
                }
            }
            _ = poll_opt(&mut retry) => retry = None,
            _ = &mut timer, if timer_at.is_some() => {
                timer_at = None;
                d.slots.tick(Instant::now(), &mut d.out);
            }
            Ok(()) = wanted.changed() => {
                let n = *wanted.borrow_and_update();
                d.grow(n);
            }
            _ = &mut link_stop, if !link_stopped => {}
            _ = &mut querier_stop, if !querier_stopping => {}
        }
    }
}

struct Driver<H: Handler> {
    shared: Arc<Shared>,
    link: Arc<Link>,
    slots: Slots,
    /// Per slot, the query it runs or holds.
    active: Vec<Option<Active>>,
    /// Where the link's tasks (handlers, deliveries) report their ends, what runs the
    /// handlers, and the next handler run's number.
    ends: tokio::sync::mpsc::UnboundedSender<End>,
    runners: Runners<H>,
    next_run: u64,
    /// Results on streams of their own, by delivery number, while their tasks run.
    deliveries: FastMap<u64, AbortHandle>,
    /// Where the shared results streams send this link's receipts.
    receipts: tokio::sync::mpsc::UnboundedSender<batch::Settled>,
    /// Results on a shared results stream, by delivery number: their worker, and what a
    /// stream of their own would need if the shared one does not carry them.
    on_shared: FastMap<u64, (WorkerSlot, Box<Dispatch>, Option<Instant>)>,
    next_delivery: u64,
    session: Option<Session>,
    /// What `slots` asked for and is not done yet.
    out: Vec<Action>,
    /// The clock as read by this turn's events (a dispatch, a handler's end), until the
    /// turn's actions are carried out: a query started by them was held until then, and
    /// that is measured without reading the clock again.
    turn_now: Option<Instant>,
}

/// Opens the link's connection (or reuses it) and its dequeue stream.
async fn connect(shared: Arc<Shared>, link: Arc<Link>) -> Result<Session, String> {
    let conn = scheduler_connection(&shared, &link).await?;
    let (w, r) = open(&shared, &conn, StreamKind::DequeueLoop).await?;
    Ok(Session { conn, w, r })
}

async fn read(session: &mut Option<Session>) -> Result<Option<SchedulerToQuerier>, ReadError> {
    match session {
        Some(s) => s.r.next().await,
        None => std::future::pending().await,
    }
}

async fn poll_opt<F: std::future::Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

impl<H: Handler> Driver<H> {
    fn grow(&mut self, n: usize) {
        self.slots.grow(n, Instant::now(), &mut self.out);
        while self.active.len() < self.slots.len() {
            self.active.push(None);
        }
        self.count_connected();
    }

    /// Registered workers: those that run handlers (a prefetch slot is not one).
    fn count_connected(&self) {
        let n = if self.session.is_some() {
            self.slots.workers()
        } else {
            0
        };
        if self.link.connected.swap(n, Ordering::Relaxed) != n {
            self.shared.registration.send_replace(());
        }
    }

    /// The stream ends (lost, or the scheduler drained): waiting workers wait no more.
    fn end_session(&mut self) -> Option<Session> {
        self.slots.closed();
        let session = self.session.take();
        self.count_connected();
        session
    }

    fn lost(&mut self, why: &str) {
        debug!(scheduler = %self.link.addr, %why, "dequeue stream lost; reconnecting");
        self.end_session();
    }

    /// Does what the slots asked for: frames into the stream's buffer (written at once,
    /// all together), cancels, aborts and confirmations.
    async fn carry_out(&mut self) {
        let mut actions = std::mem::take(&mut self.out);
        for action in actions.drain(..) {
            match action {
                Action::Send(frame) => {
                    if let Some(s) = &mut self.session
                        && let Err(e) = s.w.buffer(&frame)
                    {
                        warn!(error = %e, "a Ready frame could not be encoded");
                    }
                }
                Action::Cancel(slot) => {
                    if let Some(a) = &self.active[usize::from(slot)] {
                        a.cancelled.cancel();
                    }
                }
                Action::Abort(slot) => {
                    if let Some(a) = &self.active[usize::from(slot)]
                        && let Some(run) = a.run
                    {
                        warn!(query = a.dispatch.query_id, grace = ?self.shared.config.cancel_grace, "handler ignored its cancel; aborting it");
                        self.runners.abort(slot, run);
                    }
                }
                Action::Start(slot) => self.run(slot),
                Action::Drop(slot) => {
                    if let Some(a) = self.active[usize::from(slot)].take() {
                        if let Some(early) = a.early {
                            early.abort();
                        }
                        debug!(
                            query = a.dispatch.query_id,
                            "held query cancelled, past its deadline or given back; never run"
                        );
                    }
                }
                Action::Confirm(slot) => {
                    if let Some(a) = &mut self.active[usize::from(slot)] {
                        a.early = Some(deliver::confirm(&self.shared, &a.dispatch));
                    }
                }
            }
        }
        self.turn_now = None;
        // The list goes back, emptied, for its capacity: no allocation on the next turn.
        if self.out.is_empty() {
            self.out = actions;
        }
        if let Some(s) = &mut self.session
            && s.w.buffered() > 0
            && let Err(e) = s.w.flush().await
        {
            self.lost(&e.to_string());
        }
    }

    async fn frame(&mut self, next: Result<Option<SchedulerToQuerier>, ReadError>) {
        let msg = match next {
            Ok(Some(msg)) => msg,
            Ok(None) => return self.lost("the scheduler closed the stream"),
            Err(e) => return self.lost(&e.to_string()),
        };
        match msg {
            SchedulerToQuerier::Dispatch { worker, dispatch } => {
                let timeout = dispatch.timeout_ms.map(Duration::from_millis);
                let now = Instant::now();
                self.turn_now = Some(now);
                match self
                    .slots
                    .dispatched(worker, dispatch.query_id, timeout, now, &mut self.out)
                {
                    Ok(()) => self.accept(worker, dispatch, now),
                    Err(e) => {
                        warn!(scheduler = %self.link.addr, error = %e, "the scheduler broke the dequeue protocol");
                        self.lost(&e);
                    }
                }
            }
            SchedulerToQuerier::Cancel { worker, query_id } => {
                self.slots.cancel(worker, query_id, Instant::now(), &mut self.out)
            }
            SchedulerToQuerier::Lifeline { port, token } => hold_lifeline(&self.shared, &self.link, port, token).await,
            SchedulerToQuerier::ShuttingDown => self.slots.draining(),
        }
    }

    /// Takes a dispatched query in: its handler starts when the slots say so.
    fn accept(&mut self, slot: WorkerSlot, mut d: Box<Dispatch>, now: Instant) {
        let cancelled = CancellationToken::new();
        // The handler runs in a `query` span with the query's trace id, and sees a trace
        // context naming this hop.
        let span =
            tracing::debug_span!("query", query = d.query_id, tenant = %d.tenant, trace_id = tracing::field::Empty);
        if let Some(trace) = TraceParent::of(&d.metadata) {
            if !span.is_disabled() {
                span.record("trace_id", trace.trace_id_hex());
            }
            trace.child().set(&mut d.metadata);
        }
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
            scheduler: self.link.addr,
            payload: std::mem::take(&mut d.payload),
            cancelled: cancelled.clone(),
        };
        self.active[usize::from(slot)] = Some(Active {
            deadline: d.timeout_ms.map(|ms| now + Duration::from_millis(ms)),
            dispatch: d,
            cancelled,
            pending: Some((request, span)),
            dispatched_at: now,
            run: None,
            early: None,
        });
    }

    /// Runs a query's handler on its slot's runner (a panic becomes an error result, and a
    /// handler that ignores its cancel can be aborted). A held query's wait on this
    /// querier counts in its `queue_time`.
    fn run(&mut self, slot: WorkerSlot) {
        let Some(a) = &mut self.active[usize::from(slot)] else {
            return;
        };
        let Some((mut request, span)) = a.pending.take() else {
            return;
        };
        let now = self.turn_now.unwrap_or_else(Instant::now);
        request.queue_time += now.saturating_duration_since(a.dispatched_at);
        let run = self.next_run;
        self.next_run += 1;
        self.runners.start(slot, run, request, span);
        a.run = Some(run);
    }

    /// One of the link's tasks ended.
    fn ended(&mut self, end: End) {
        match end {
            End::Handler { run, slot, outcome } => self.handler_done(run, slot, outcome),
            End::Delivery { slot, number } => {
                self.deliveries.remove(&number);
                self.slots.settled(slot, number, &mut self.out);
            }
        }
    }

    /// A handler returned, panicked or was aborted: its result goes to a sender task and
    /// the worker is reported free once its previous delivery is settled.
    fn handler_done(&mut self, run: u64, slot: WorkerSlot, outcome: Option<Result<Response, HandlerError>>) {
        let entry = self.active.get_mut(usize::from(slot));
        // Only the end of the slot's current run (an earlier one's has been dealt with).
        let Some(mut active) = entry.and_then(|a| a.take_if(|a| a.run == Some(run))) else {
            return;
        };
        let measured_cost = outcome
            .as_ref()
            .and_then(|o| o.as_ref().ok())
            .and_then(|r| r.measured_cost);
        let delivery = match outcome {
            // Cancelled (by the frontend, or its deadline, at which the frontend fails the
            // query itself): nothing to send; an early stream is dropped (reset).
            _ if self.slots.is_cancelled(slot) => {
                if let Some(task) = active.early {
                    task.abort();
                }
                debug!(query = active.dispatch.query_id, "cancelled; no result sent");
                None
            }
            None => None,
            Some(outcome) => {
                let limit = deliver::result_frame_len(&self.shared, &active.dispatch.frontend);
                let outcome = deliver::fit_to_frame(outcome, limit);
                let number = self.next_delivery;
                self.next_delivery += 1;
                // A small whole result rides the frontend's shared results stream, its
                // receipt coming back here; anything else gets a sender of its own.
                let outcome = match active.early {
                    Some(_) => Err(outcome),
                    None => batch::whole(&mut active.dispatch, outcome),
                };
                match outcome {
                    Ok(frame) => {
                        let reply = batch::Reply {
                            to: self.receipts.clone(),
                            number,
                        };
                        batch::send(&self.shared, &active.dispatch.frontend, frame, reply);
                        self.on_shared.insert(number, (slot, active.dispatch, active.deadline));
                    }
                    Err(outcome) => self.own_stream(
                        slot,
                        number,
                        active.dispatch,
                        outcome,
                        active.deadline,
                        active.early,
                        false,
                    ),
                }
                Some(number)
            }
        };
        let now = *self.turn_now.get_or_insert_with(Instant::now);
        self.slots.done(slot, delivery, measured_cost, now, &mut self.out);
    }

    /// Sends a result on a stream of its own, from a task of its own (`again`: a copy may
    /// have reached the frontend on the shared stream).
    #[allow(clippy::too_many_arguments)]
    fn own_stream(
        &mut self,
        slot: WorkerSlot,
        number: u64,
        dispatch: Box<Dispatch>,
        outcome: Result<Response, HandlerError>,
        deadline: Option<Instant>,
        early: Option<deliver::Early>,
        again: bool,
    ) {
        let send = deliver::hand_off(&self.shared, dispatch, outcome, deadline, early, again);
        let task = running::delivery(send, slot, number, self.ends.clone());
        self.deliveries.insert(number, task);
    }

    /// A shared results stream settled a result: delivered or refused, or given back to
    /// go on a stream of its own.
    fn settled_shared(&mut self, s: batch::Settled) {
        let Some((slot, mut dispatch, deadline)) = self.on_shared.remove(&s.number) else {
            return;
        };
        match s.outcome {
            Ok(receipt) => {
                if let sluice_protocol::ResultReceipt::Refused { reason } = receipt {
                    warn!(query = dispatch.query_id, frontend = %dispatch.frontend.address, ?reason, "result not delivered: the frontend refused it");
                }
                self.slots.settled(slot, s.number, &mut self.out);
            }
            Err(frame) => {
                debug!(
                    query = dispatch.query_id,
                    "the shared results stream did not carry it; sending it on its own"
                );
                let outcome = batch::unwhole(frame, &mut dispatch);
                self.own_stream(slot, s.number, dispatch, outcome, deadline, None, true);
            }
        }
    }
}

impl<H: Handler> Drop for Driver<H> {
    /// A link dropped with queries running (the querier aborted) takes their deliveries
    /// with it (and, as `runners` goes, their handlers).
    fn drop(&mut self) {
        for task in self.deliveries.values() {
            task.abort();
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
        .connect(link.addr, &shared.config.client.scheduler_server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    crate::tls::expect_peer_role(&conn, Role::Scheduler)?;
    shared.quic.track(Role::Scheduler, &conn);
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
        let max = shared.config.client.max_frame_len;
        let (mut w, mut r) = (FramedWrite::new(send, max), FramedRead::new(recv, max));
        w.send(&Hello::new(Role::Querier, &shared.config.client.id, kind))
            .await
            .map_err(|e| e.to_string())?;
        match r.next::<HelloReply>().await.map_err(|e| e.to_string())? {
            Some(HelloReply::Welcome { max_frame_len, .. }) => {
                // A dispatch may be as large as the scheduler reads (it carries what a
                // frontend sent there): refusing it would drop the stream and every query
                // on it, so take frames up to that, whatever this querier's own limit.
                r.set_max_frame_len(max.max(max_frame_len));
                Ok((w, r))
            }
            Some(HelloReply::Rejected { code, message }) => Err(format!("refused ({code:?}): {message}")),
            None => Err("closed before the hello reply".into()),
        }
    };
    tokio::time::timeout(shared.config.client.idle_timeout, setup)
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

/// Opens (once per token) the TCP lifeline the scheduler asked for and holds it, so that
/// if this process dies the kernel's closing of the socket tells the scheduler at once.
async fn hold_lifeline(shared: &Shared, link: &Link, port: u16, token: u128) {
    let mut lifelines = shared.lifelines.lock().await;
    lifelines.retain(|_, task| !task.is_finished());
    if lifelines.contains_key(&token) {
        return;
    }
    let addr = SocketAddr::new(link.addr.ip(), port);
    let timeout = shared.config.client.idle_timeout;
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
