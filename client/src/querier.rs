//! The querier worker library: worker loops that pull queries from every scheduler, run
//! them through your [`Handler`], and send the results straight to the frontend that asked.
//!
//! The schedulers are a static list or the live members of the gossip
//! ([`QuerierConfig::gossip`]). A querier serves every scheduler it knows of: the ones in
//! use with `concurrency` workers, the others with one, so that nothing queued on a
//! scheduler outside the frontends' `max_used_instances` is stranded. A scheduler that
//! comes into use gets its full count at once; one that drops out of use keeps the
//! workers it has (stopping a worker that waits for work could lose a query dispatched to
//! it at that moment) until it leaves or dies.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use sluice_protocol::{
    Dispatch, Finished, FramedRead, FramedWrite, FrontendAddress, Hello, HelloReply, LIFELINE_MAGIC, Limits, Metadata,
    Notice, NoticeReply, QuerierToScheduler, ResultFrame, ResultReceipt, Role, SchedulerToQuerier, StreamKind,
    close_code,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::discovery::{Discovery, Target};
use crate::error::ClientError;
use crate::gossip::{GossipConfig, MemberRole};
use crate::tls::{self, Identity};

/// Settings of a [`Querier`].
#[derive(Debug, Clone)]
pub struct QuerierConfig {
    /// This querier's id: stable across restarts, so its shuffle shards are kept.
    pub id: String,
    /// Its certificate (role `querier`), key, and the CA.
    pub identity: Identity,
    /// Scheduler QUIC addresses; the querier serves all of them (a static list; leave it
    /// empty when `gossip` is set).
    pub schedulers: Vec<SocketAddr>,
    /// Learn the live schedulers by joining their gossip (as a `querier` member) instead
    /// of a static list.
    pub gossip: Option<GossipConfig>,
    /// The frontends' `max_used_instances` (0: all): schedulers beyond it get one worker.
    pub max_used_instances: usize,
    /// TLS name the schedulers' certificates are checked against.
    pub scheduler_server_name: String,
    /// Worker loops per scheduler (queries run at once, per scheduler).
    pub concurrency: usize,
    /// Result body bytes per chunk frame.
    pub chunk_size: usize,
    /// Attempts to deliver a result before giving up on it.
    pub delivery_attempts: u32,
    /// A scheduler or frontend silent for this long is taken as gone. Pings go out every
    /// fifth of it.
    pub idle_timeout: Duration,
    /// Largest frame sent or accepted.
    pub max_frame_len: u32,
}

impl QuerierConfig {
    /// Defaults: 4 workers per scheduler, 256 KiB chunks, 3 delivery attempts, TLS name
    /// `localhost` (as in the development certificates).
    pub fn new(id: impl Into<String>, identity: Identity, schedulers: Vec<SocketAddr>) -> Self {
        QuerierConfig {
            id: id.into(),
            identity,
            schedulers,
            gossip: None,
            max_used_instances: 0,
            scheduler_server_name: "localhost".into(),
            concurrency: 4,
            chunk_size: 256 * 1024,
            delivery_attempts: 3,
            idle_timeout: Duration::from_secs(5),
            max_frame_len: Limits::default().max_frame_len,
        }
    }
}

/// A query handed to the handler.
#[derive(Debug, Clone)]
pub struct Request {
    /// The query's id at its frontend.
    pub query_id: u64,
    /// The tenant it runs for.
    pub tenant: String,
    /// Its actor path below the tenant.
    pub actors: Vec<String>,
    /// The backend it was queued for, if any.
    pub component: Option<String>,
    /// The frontend's metadata (tracing headers…).
    pub metadata: Metadata,
    /// Time the query waited in the scheduler's queue.
    pub queue_time: Duration,
    /// Time left before its deadline, if it has one.
    pub timeout: Option<Duration>,
    /// The opaque request to execute.
    pub payload: Bytes,
    /// Fires when the frontend cancels the query: stop work and return.
    pub cancelled: CancellationToken,
}

/// A result body: all at once, or streamed as the handler produces it.
#[derive(Debug)]
pub enum ResponseBody {
    /// The whole body at once (sent in chunks of `chunk_size`).
    Bytes(Bytes),
    /// Pieces as the handler produces them; the body ends when the sender is dropped.
    Stream(mpsc::Receiver<Bytes>),
}

/// What the handler returns for a query.
#[derive(Debug)]
pub struct Response {
    /// HTTP-style status (200 = success).
    pub status: u16,
    /// Key/value pairs for the frontend.
    pub metadata: Metadata,
    /// The result body.
    pub body: ResponseBody,
    /// What the query really cost, in the units of the frontend's cost hints (for
    /// example milliseconds of CPU); reported to the scheduler, which corrects the
    /// tenant's fair-share account. `None`: the hint stands.
    pub measured_cost: Option<u32>,
}

impl Response {
    /// A 200 response with a body held in memory.
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Response {
            status: 200,
            metadata: Vec::new(),
            body: ResponseBody::Bytes(body.into()),
            measured_cost: None,
        }
    }

    /// A response whose body is sent as the handler produces it.
    pub fn stream(status: u16, body: mpsc::Receiver<Bytes>) -> Self {
        Response {
            status,
            metadata: Vec::new(),
            body: ResponseBody::Stream(body),
            measured_cost: None,
        }
    }

    /// This response, reporting the query's measured cost.
    pub fn with_cost(mut self, cost: u32) -> Self {
        self.measured_cost = Some(cost);
        self
    }
}

/// A handler's failure; sent to the frontend as the query's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError(pub String);

impl<T: std::fmt::Display> From<T> for HandlerError {
    fn from(e: T) -> Self {
        HandlerError(e.to_string())
    }
}

/// What a querier runs for each query. Implement it with an `async fn`.
pub trait Handler: Send + Sync + 'static {
    /// Runs one query. Return promptly once `request.cancelled` fires.
    fn handle(&self, request: Request) -> impl Future<Output = Result<Response, HandlerError>> + Send;
}

/// A running querier.
pub struct Querier {
    shared: Arc<Shared>,
    discovery: Discovery,
    /// Follows discovery's changes of the scheduler set.
    follower: JoinHandle<()>,
}

/// One scheduler this querier serves. Links are only appended; one no longer wanted (its
/// scheduler left or died) is stopped, and a scheduler that comes back gets a new one.
struct Link {
    addr: SocketAddr,
    conn: Mutex<Option<quinn::Connection>>,
    /// Worker loops started against it.
    workers: AtomicUsize,
    stop: CancellationToken,
}

struct Shared {
    config: QuerierConfig,
    endpoint: quinn::Endpoint,
    links: std::sync::Mutex<Vec<Arc<Link>>>,
    /// Every worker loop started, for the shutdown to wait on.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    frontends: Mutex<HashMap<String, quinn::Connection>>,
    /// TCP lifelines to schedulers, by token; held until the querier stops.
    lifelines: Mutex<HashMap<u128, JoinHandle<()>>>,
    /// Stop asking for work (graceful shutdown: after the current query).
    stopping: CancellationToken,
}

impl Querier {
    /// Starts `concurrency` worker loops against every scheduler.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// use sluice_client::{Handler, HandlerError, Querier, QuerierConfig, Request, Response, tls::Identity};
    ///
    /// struct Echo;
    /// impl Handler for Echo {
    ///     async fn handle(&self, request: Request) -> Result<Response, HandlerError> {
    ///         Ok(Response::ok(request.payload))
    ///     }
    /// }
    ///
    /// let identity = Identity {
    ///     ca: "sluice-data/ca.pem".into(),
    ///     cert: "sluice-data/querier.pem".into(),
    ///     key: "sluice-data/querier-key.pem".into(),
    /// };
    /// let querier = Querier::start(QuerierConfig::new("querier-1", identity, vec!["127.0.0.1:9095".parse()?]), Echo)?;
    /// // … until it is time to stop:
    /// querier.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn start<H: Handler>(config: QuerierConfig, handler: H) -> Result<Querier, ClientError> {
        if config.concurrency == 0 || config.chunk_size == 0 || config.delivery_attempts == 0 {
            return Err(ClientError::Config(
                "concurrency, chunk_size and delivery_attempts must be at least 1".into(),
            ));
        }
        let bind: SocketAddr = "0.0.0.0:0".parse().expect("valid address");
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|error| ClientError::Bind { addr: bind, error })?;
        let mut client = tls::quic_client(&config.identity)?;
        client.transport_config(Arc::new(crate::frontend::transport_with_idle(config.idle_timeout)?));
        endpoint.set_default_client_config(client);
        let discovery = Discovery::start(
            &config.id,
            MemberRole::Querier,
            &config.schedulers,
            config.gossip.as_ref(),
            config.max_used_instances,
        )?;
        let shared = Arc::new(Shared {
            config,
            endpoint,
            links: std::sync::Mutex::new(Vec::new()),
            tasks: std::sync::Mutex::new(Vec::new()),
            frontends: Mutex::new(HashMap::new()),
            lifelines: Mutex::new(HashMap::new()),
            stopping: CancellationToken::new(),
        });
        let handler = Arc::new(handler);
        let follower = {
            let shared = shared.clone();
            discovery.follow(shared.stopping.clone(), move |targets| {
                shared.reconcile(targets, &handler)
            })
        };
        Ok(Querier {
            shared,
            discovery,
            follower,
        })
    }

    /// The QUIC addresses of the schedulers served and how many workers each has, sorted.
    pub fn schedulers(&self) -> Vec<(SocketAddr, usize)> {
        let mut out: Vec<(SocketAddr, usize)> = self
            .shared
            .live_links()
            .iter()
            .map(|l| (l.addr, l.workers.load(Ordering::Relaxed)))
            .collect();
        out.sort();
        out
    }

    /// Graceful shutdown: tells every scheduler this querier is leaving, lets running
    /// queries finish and their results reach their frontends, then closes.
    pub async fn shutdown(self) {
        self.shared.stopping.cancel();
        self.follower.abort();
        let bound = self.shared.config.idle_timeout;
        for link in self.shared.live_links() {
            // A scheduler that is gone cannot be told; wait no longer than it takes to
            // notice that.
            let addr = link.addr;
            match tokio::time::timeout(bound, notify_shutdown(&self.shared, &link)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(scheduler = %addr, error = %e, "shutdown notice not delivered"),
                Err(_) => debug!(scheduler = %addr, "shutdown notice timed out"),
            }
        }
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.shared.tasks.lock().unwrap());
        for w in tasks {
            let _ = w.await;
        }
        self.discovery.leave().await;
        self.shared
            .endpoint
            .close(close_code::DONE.into(), b"querier shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.endpoint.wait_idle()).await;
        for (_, lifeline) in self.shared.lifelines.lock().await.drain() {
            lifeline.abort();
        }
    }

    /// Stops at once, as a crash would (in-flight queries fail at their frontends).
    pub fn abort(self) {
        self.follower.abort();
        for w in self.shared.tasks.lock().unwrap().iter() {
            w.abort();
        }
        if let Ok(mut lifelines) = self.shared.lifelines.try_lock() {
            for (_, lifeline) in lifelines.drain() {
                lifeline.abort();
            }
        }
        self.shared.endpoint.close(close_code::DONE.into(), b"querier aborted");
    }
}

impl Shared {
    fn live_links(&self) -> Vec<Arc<Link>> {
        let links = self.links.lock().unwrap();
        links.iter().filter(|l| !l.stop.is_cancelled()).cloned().collect()
    }

    /// Serves the schedulers discovery reports: starts workers up to the wanted count
    /// (`concurrency` for schedulers in use or leaving, one for the others), and stops the
    /// links to schedulers no longer reported.
    fn reconcile<H: Handler>(self: &Arc<Self>, targets: &[Target], handler: &Arc<H>) {
        if self.stopping.is_cancelled() {
            return;
        }
        let mut links = self.links.lock().unwrap();
        for link in links.iter().filter(|l| !l.stop.is_cancelled()) {
            if !targets.iter().any(|t| t.addr == link.addr) {
                debug!(scheduler = %link.addr, "scheduler gone; its workers stop");
                link.stop.cancel();
            }
        }
        let mut tasks = self.tasks.lock().unwrap();
        tasks.retain(|t| !t.is_finished());
        for t in targets {
            let link = match links.iter().find(|l| l.addr == t.addr && !l.stop.is_cancelled()) {
                Some(link) => link.clone(),
                None => {
                    let link = Arc::new(Link {
                        addr: t.addr,
                        conn: Mutex::new(None),
                        workers: AtomicUsize::new(0),
                        stop: CancellationToken::new(),
                    });
                    links.push(link.clone());
                    link
                }
            };
            let wanted = if t.in_use || t.leaving {
                self.config.concurrency
            } else {
                1
            };
            while link.workers.load(Ordering::Relaxed) < wanted {
                link.workers.fetch_add(1, Ordering::Relaxed);
                tasks.push(tokio::spawn(worker_loop(self.clone(), link.clone(), handler.clone())));
            }
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
    let addr = link.addr;
    let conn = shared
        .endpoint
        .connect(addr, &shared.config.scheduler_server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    *slot = Some(conn.clone());
    Ok(conn)
}

type Stream = (FramedWrite<quinn::SendStream>, FramedRead<quinn::RecvStream>);

async fn open(shared: &Shared, conn: &quinn::Connection, stream: StreamKind) -> Result<Stream, String> {
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let max = shared.config.max_frame_len;
    let (mut w, mut r) = (FramedWrite::new(send, max), FramedRead::new(recv, max));
    w.send(&Hello::new(Role::Querier, &shared.config.id, stream))
        .await
        .map_err(|e| e.to_string())?;
    match r.next::<HelloReply>().await.map_err(|e| e.to_string())? {
        Some(HelloReply::Welcome { .. }) => Ok((w, r)),
        Some(HelloReply::Rejected { code, message }) => Err(format!("refused ({code:?}): {message}")),
        None => Err("closed before the hello reply".into()),
    }
}

async fn notify_shutdown(shared: &Shared, link: &Link) -> Result<(), String> {
    let conn = link.conn.lock().await.clone().ok_or("not connected")?;
    let (mut w, mut r) = open(shared, &conn, StreamKind::ShutdownNotice).await?;
    w.send(&Notice::QuerierShuttingDown).await.map_err(|e| e.to_string())?;
    match r.next::<NoticeReply>().await.map_err(|e| e.to_string())? {
        Some(NoticeReply::Acknowledged) => Ok(()),
        None => Err("closed before acknowledging".into()),
    }
}

/// One worker against one scheduler: reconnects with backoff until the querier stops.
async fn worker_loop<H: Handler>(shared: Arc<Shared>, link: Arc<Link>, handler: Arc<H>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match serve(&shared, &link, &handler, &mut backoff).await {
            Ok(()) => return, // told to stop
            Err(e) => debug!(scheduler = %link.addr, error = %e, "worker stream lost"),
        }
        if shared.stopping.is_cancelled() || link.stop.is_cancelled() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shared.stopping.cancelled() => return,
            _ = link.stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Runs the dequeue loop on one stream; `Ok` when the scheduler says to stop or is no
/// longer served.
async fn serve<H: Handler>(
    shared: &Arc<Shared>,
    link: &Link,
    handler: &Arc<H>,
    backoff: &mut Duration,
) -> Result<(), String> {
    // Nothing runs yet: a shutdown need not wait for a (re)connection to finish.
    let setup = async {
        let conn = scheduler_connection(shared, link).await?;
        open(shared, &conn, StreamKind::DequeueLoop).await
    };
    let (mut w, mut r) = tokio::select! {
        stream = setup => stream?,
        _ = shared.stopping.cancelled() => return Ok(()),
        _ = link.stop.cancelled() => return Ok(()),
    };
    *backoff = Duration::from_millis(50);
    let mut finished = None;
    loop {
        w.send(&QuerierToScheduler::Ready {
            finished: finished.take(),
        })
        .await
        .map_err(|e| e.to_string())?;
        let dispatch = loop {
            // The link stops only when its scheduler left or died: nothing can be
            // dispatched to this stream any more.
            let next = tokio::select! {
                next = r.next::<SchedulerToQuerier>() => next.map_err(|e| e.to_string())?,
                _ = link.stop.cancelled() => return Ok(()),
            };
            match next {
                Some(SchedulerToQuerier::Dispatch(d)) => break *d,
                Some(SchedulerToQuerier::Cancel { .. }) => {} // for a query already done
                Some(SchedulerToQuerier::Lifeline { port, token }) => hold_lifeline(shared, link, port, token).await,
                Some(SchedulerToQuerier::ShuttingDown) => return Ok(()),
                None => return Err("scheduler closed the stream".into()),
            }
        };
        let (frontend_id, query_id) = (dispatch.frontend.id.clone(), dispatch.query_id);
        let (stop_after, measured_cost) = run(shared, handler, dispatch, &mut r).await?;
        finished = Some(Finished {
            frontend_id,
            query_id,
            measured_cost,
        });
        if stop_after {
            let _ = w
                .send(&QuerierToScheduler::Ready {
                    finished: finished.take(),
                })
                .await;
            return Ok(());
        }
    }
}

/// Runs one query while watching the stream for its cancel; delivers the result.
/// Returns whether the scheduler said to stop meanwhile.
async fn run<H: Handler>(
    shared: &Arc<Shared>,
    handler: &Arc<H>,
    d: Dispatch,
    r: &mut FramedRead<quinn::RecvStream>,
) -> Result<(bool, Option<u32>), String> {
    let cancelled = CancellationToken::new();
    let request = Request {
        query_id: d.query_id,
        tenant: d.tenant.clone(),
        actors: d.actors.clone(),
        component: d.component.clone(),
        metadata: d.metadata.clone(),
        queue_time: Duration::from_micros(d.queue_time_us),
        timeout: d.timeout_ms.map(Duration::from_millis),
        payload: d.payload.clone(),
        cancelled: cancelled.clone(),
    };
    let h = handler.clone();
    // A task of its own, so a panic becomes an error result instead of a dead worker.
    let mut task = tokio::spawn(async move { h.handle(request).await });
    let mut stop_after = false;
    let outcome = loop {
        tokio::select! {
            joined = &mut task => break match joined {
                Ok(outcome) => outcome,
                Err(e) if e.is_panic() => Err(HandlerError(format!("handler panicked: {}", panic_message(e)))),
                Err(e) => Err(HandlerError(format!("handler task failed: {e}"))),
            },
            msg = r.next::<SchedulerToQuerier>(), if !stop_after => match msg {
                Ok(Some(SchedulerToQuerier::Cancel { query_id })) if query_id == d.query_id => cancelled.cancel(),
                Ok(Some(SchedulerToQuerier::ShuttingDown)) => stop_after = true,
                Ok(Some(_)) => {}
                // The scheduler is gone; the result still goes to the frontend.
                Ok(None) | Err(_) => stop_after = true,
            },
        }
    };
    if cancelled.is_cancelled() {
        debug!(query = d.query_id, "cancelled; no result sent");
        return Ok((stop_after, None));
    }
    let measured_cost = outcome.as_ref().ok().and_then(|r| r.measured_cost);
    if let Err(e) = deliver(shared, &d, outcome).await {
        warn!(query = d.query_id, frontend = %d.frontend.address, error = %e, "result not delivered");
    }
    Ok((stop_after, measured_cost))
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

async fn frontend_connection(shared: &Shared, to: &FrontendAddress) -> Result<quinn::Connection, String> {
    let mut cache = shared.frontends.lock().await;
    if let Some(c) = cache.get(&to.address)
        && c.close_reason().is_none()
    {
        return Ok(c.clone());
    }
    let addr = tokio::net::lookup_host(&to.address)
        .await
        .map_err(|e| format!("{}: {e}", to.address))?
        .next()
        .ok_or_else(|| format!("{}: no address", to.address))?;
    let conn = shared
        .endpoint
        .connect(addr, &to.server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    cache.insert(to.address.clone(), conn.clone());
    Ok(conn)
}

/// Sends a result to its frontend, retrying transport failures while the body can be
/// sent again (a streamed body is sent once).
async fn deliver(shared: &Shared, d: &Dispatch, outcome: Result<Response, HandlerError>) -> Result<(), String> {
    let (head, mut body) = match outcome {
        Ok(resp) => (
            ResultFrame::Head {
                query_id: d.query_id,
                tenant: d.tenant.clone(),
                status: resp.status,
                metadata: resp.metadata,
            },
            Some(resp.body),
        ),
        Err(HandlerError(message)) => (
            ResultFrame::Error {
                query_id: d.query_id,
                tenant: d.tenant.clone(),
                message,
            },
            None,
        ),
    };
    let mut last = String::new();
    for attempt in 1..=shared.config.delivery_attempts {
        let conn = match frontend_connection(shared, &d.frontend).await {
            Ok(c) => c,
            Err(e) => {
                last = e;
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                continue;
            }
        };
        let streamed = matches!(body, Some(ResponseBody::Stream(_)));
        match send_result(shared, &conn, &head, &mut body).await {
            Ok(ResultReceipt::Delivered) => return Ok(()),
            Ok(ResultReceipt::Refused { reason }) => return Err(format!("frontend refused the result: {reason:?}")),
            Err(e) if streamed => return Err(format!("streamed result broken: {e}")),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn send_result(
    shared: &Shared,
    conn: &quinn::Connection,
    head: &ResultFrame,
    body: &mut Option<ResponseBody>,
) -> Result<ResultReceipt, String> {
    let (mut w, mut r) = open(shared, conn, StreamKind::Result).await?;
    let io = |e: sluice_protocol::WriteError| e.to_string();
    w.send(head).await.map_err(io)?;
    if let Some(b) = body {
        let chunk = shared.config.chunk_size;
        let mut total: u64 = 0;
        match b {
            ResponseBody::Bytes(bytes) => {
                let mut rest = bytes.clone();
                while !rest.is_empty() {
                    let piece = rest.split_to(chunk.min(rest.len()));
                    total += piece.len() as u64;
                    w.send(&ResultFrame::Chunk(piece)).await.map_err(io)?;
                }
            }
            ResponseBody::Stream(rx) => {
                while let Some(mut bytes) = rx.recv().await {
                    while !bytes.is_empty() {
                        let piece = bytes.split_to(chunk.min(bytes.len()));
                        total += piece.len() as u64;
                        w.send(&ResultFrame::Chunk(piece)).await.map_err(io)?;
                    }
                }
            }
        }
        w.send(&ResultFrame::End { total_len: total }).await.map_err(io)?;
    }
    let _ = w.get_mut().finish();
    r.next::<ResultReceipt>()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "frontend closed without a receipt".into())
}
