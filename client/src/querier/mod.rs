//! The querier worker library: worker loops that pull queries from every scheduler, run
//! them through your [`Handler`], and send the results straight to the frontend that asked.
//!
//! The schedulers are a static list or the live members of the gossip
//! ([`SchedulerSource`](crate::SchedulerSource)). A querier serves every scheduler it knows of: the ones in
//! use with `concurrency` workers, the others with one, so that nothing queued on a
//! scheduler outside the frontends' `max_used_instances` is stranded. A scheduler that
//! comes into use gets its full count at once; one that drops out of use keeps the
//! workers it has (stopping a worker that waits for work could lose a query dispatched to
//! it at that moment) until it leaves or dies.
//!
//! Workers live as long as the [`Querier`]: a scheduler that drains, restarts, dies or is
//! cut off is reconnected to with capped, jittered backoff (about a second at most once it
//! is back). Only [`Querier::shutdown`], [`Querier::abort`] or discovery dropping the
//! scheduler stop them.

mod batch;
mod deliver;
mod dequeue;
mod frontends;
mod running;
mod slots;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use sluice_protocol::{FramedRead, FramedWrite, Metadata, Role, close_code};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::{ClientConfig, SchedulerSource};
use crate::discovery::{Discovery, Target};
use crate::error::ClientError;
use crate::gossip::{GossipConfig, MemberRole};
use crate::quic_stats::{QuicStats, QuicTotals};
use crate::tls::Identity;

/// A bidirectional stream with its framing: a dequeue loop, a shutdown notice, or a
/// result stream.
type Stream = (FramedWrite<quinn::SendStream>, FramedRead<quinn::RecvStream>);

/// Bytes a chunk frame takes beyond its chunk: the frame's tag and the chunk's length.
const CHUNK_FRAME_OVERHEAD: usize = 16;

/// Settings of a [`Querier`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QuerierConfig {
    /// Its id (stable across restarts, so its shuffle shards are kept), certificate (role
    /// `querier`), schedulers, and how it talks to them and to frontends. It serves every
    /// scheduler it knows of; those beyond the frontends' `max_used_instances` get one
    /// worker each.
    pub client: ClientConfig,
    /// Worker loops per scheduler (queries run at once, per scheduler).
    pub concurrency: usize,
    /// Each worker holds one more query, dispatched while it runs one and started when
    /// it is done, so a worker does not wait a round trip to the scheduler between
    /// queries. The scheduler sees two workers per worker loop (loop `k` has slots `2k` and
    /// `2k + 1`) and places them as one. Off by default: it pays for short queries only (docs/queue.md).
    pub prefetch: bool,
    /// With prefetch: a query held this long (its worker loop runs a longer one) is given
    /// back to its scheduler unstarted and placed again by its frontend, and the slot that
    /// held it rests until a handler of its loop returns within this limit. `None`: a held
    /// query waits however long the query before it runs. Must be under `confirm_after`.
    pub hold_limit: Option<Duration>,
    /// Result body bytes per chunk frame; a chunk frame must fit in `max_frame_len`. A
    /// frontend that reads smaller frames (its address says) gets smaller chunks.
    pub chunk_size: usize,
    /// Attempts to deliver a result before giving up on it.
    pub delivery_attempts: u32,
    /// A query still running after this long is confirmed to its frontend (its result
    /// stream opens early with `Started`), so that the frontend knows it is not lost if
    /// the scheduler that dispatched it dies. Keep it well under the frontends'
    /// `confirm_grace`.
    pub confirm_after: Duration,
    /// How long a handler may go on after its query was cancelled or its deadline passed
    /// before it is aborted: its future dropped where it waits (so a handler that ignores
    /// cancellation cannot hold a worker forever).
    pub cancel_grace: Duration,
}

impl QuerierConfig {
    /// Sets the worker loops per scheduler.
    pub fn with_concurrency(mut self, workers: usize) -> Self {
        self.concurrency = workers;
        self
    }

    /// Lets each worker hold one prefetched query (see [`prefetch`](Self::prefetch)).
    pub fn with_prefetch(mut self, prefetch: bool) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets how long a prefetched query may be held (see [`hold_limit`](Self::hold_limit)).
    pub fn with_hold_limit(mut self, limit: Option<Duration>) -> Self {
        self.hold_limit = limit;
        self
    }

    /// Follows the schedulers' gossip instead of a static list.
    pub fn with_gossip(mut self, gossip: GossipConfig) -> Self {
        self.client.schedulers = SchedulerSource::Gossip(gossip);
        self
    }

    /// Defaults: 4 workers per scheduler, no prefetch (a 10 ms hold limit when it is
    /// turned on), 256 KiB chunks, 3 delivery attempts, 1 s grace after a cancel, TLS name
    /// `localhost` (as in the development certificates).
    pub fn new(id: impl Into<String>, identity: Identity, schedulers: Vec<SocketAddr>) -> Self {
        QuerierConfig {
            client: ClientConfig::new(id, identity, schedulers),
            concurrency: 4,
            prefetch: false,
            hold_limit: Some(Duration::from_millis(10)),
            chunk_size: 256 * 1024,
            delivery_attempts: 3,
            confirm_after: Duration::from_millis(100),
            cancel_grace: Duration::from_secs(1),
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
    /// Time the query waited in the scheduler's queue (and, prefetched, on this querier
    /// for its worker).
    pub queue_time: Duration,
    /// Time left before its deadline, when it was dispatched. At the deadline
    /// `cancelled` fires.
    pub timeout: Option<Duration>,
    /// Which run of the query this is: 1, or more when a retriable query is redelivered
    /// after its querier died.
    pub attempt: u32,
    /// The QUIC address of the scheduler that dispatched it.
    pub scheduler: SocketAddr,
    /// The opaque request to execute.
    pub payload: Bytes,
    /// Fires when the frontend cancels the query or its deadline passes: stop work and
    /// return (the handler's future is dropped after `cancel_grace`).
    pub cancelled: CancellationToken,
}

/// A result body: all at once, or streamed as the handler produces it.
#[derive(Debug)]
pub enum ResponseBody {
    /// The whole body at once (sent in chunks of `chunk_size`).
    Bytes(Bytes),
    /// Pieces as the handler produces them, through a [`BodySender`].
    Stream(BodyStream),
}

/// One piece of a streamed body.
#[derive(Debug)]
enum BodyPart {
    Chunk(Bytes),
    End,
    Abort(String),
}

/// The producing side of a streamed body. Call [`finish`](Self::finish) when the body is
/// complete: a sender dropped without it (the producer failed or panicked) or given up with
/// [`abort`](Self::abort) makes the frontend's body end in an error, never in a shorter
/// success.
#[derive(Debug)]
pub struct BodySender {
    tx: mpsc::Sender<BodyPart>,
}

/// The body was no longer wanted (the query was cancelled or its frontend is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyClosed;

impl BodySender {
    /// Sends the next piece; waits while the frontend is slower than the producer.
    pub async fn send(&self, bytes: impl Into<Bytes>) -> Result<(), BodyClosed> {
        self.tx
            .send(BodyPart::Chunk(bytes.into()))
            .await
            .map_err(|_| BodyClosed)
    }

    /// The body is complete.
    pub async fn finish(self) {
        let _ = self.tx.send(BodyPart::End).await;
    }

    /// The body failed midway; the frontend's reader gets `message` as its error.
    pub async fn abort(self, message: impl Into<String>) {
        let _ = self.tx.send(BodyPart::Abort(message.into())).await;
    }
}

/// The querier's side of a streamed body.
#[derive(Debug)]
pub struct BodyStream {
    rx: mpsc::Receiver<BodyPart>,
}

impl BodyStream {
    /// The next piece: `Ok(Some)` a chunk, `Ok(None)` the end, `Err` an abort (explicit, or
    /// the sender dropped without finishing).
    async fn next(&mut self) -> Result<Option<Bytes>, String> {
        match self.rx.recv().await {
            Some(BodyPart::Chunk(bytes)) => Ok(Some(bytes)),
            Some(BodyPart::End) => Ok(None),
            Some(BodyPart::Abort(message)) => Err(message),
            None => Err("the body's producer stopped without finishing".into()),
        }
    }
}

/// What the handler returns for a query.
#[derive(Debug)]
pub struct Response {
    /// HTTP-style status (200 = success).
    pub status: u16,
    /// Key/value pairs for the frontend. They travel in one frame with the result's head:
    /// metadata that cannot fit in `max_frame_len` fails the query, saying so.
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

    /// A response whose body is sent as the handler produces it through the returned
    /// sender (`buffer` pieces may wait between producer and network).
    pub fn stream(status: u16, buffer: usize) -> (Self, BodySender) {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let response = Response {
            status,
            metadata: Vec::new(),
            body: ResponseBody::Stream(BodyStream { rx }),
            measured_cost: None,
        };
        (response, BodySender { tx })
    }

    /// This response, reporting the query's measured cost.
    pub fn with_cost(mut self, cost: u32) -> Self {
        self.measured_cost = Some(cost);
        self
    }
}

/// A handler's failure; sent to the frontend as the query's error (a message longer than
/// 16 KiB is cut, saying how much).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError(pub String);

impl<T: std::fmt::Display> From<T> for HandlerError {
    fn from(e: T) -> Self {
        HandlerError(e.to_string())
    }
}

/// What a querier runs for each query. Implement it with an `async fn`.
///
/// Each worker runs its queries one after another on a task that lives as long as its link
/// to a scheduler, so handlers of different workers run concurrently (on any of the
/// runtime's threads). A panic becomes an error result for that query; a handler still
/// running `cancel_grace` after its query was cancelled is dropped where it waits.
pub trait Handler: Send + Sync + 'static {
    /// Runs one query. Return promptly once `request.cancelled` fires.
    fn handle(&self, request: Request) -> impl Future<Output = Result<Response, HandlerError>> + Send;
}

/// A [`Handler`] made from an async closure; see [`handler_fn`].
#[derive(Debug, Clone)]
pub struct HandlerFn<F>(F);

/// A handler from an async closure, for handlers that need no type of their own:
///
/// ```
/// use sluice_client::{Response, handler_fn};
/// let echo = handler_fn(|request| async move { Ok(Response::ok(request.payload)) });
/// # fn is_handler(_: impl sluice_client::Handler) {}
/// # is_handler(echo);
/// ```
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, HandlerError>> + Send + 'static,
{
    HandlerFn(f)
}

impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, HandlerError>> + Send + 'static,
{
    fn handle(&self, request: Request) -> impl Future<Output = Result<Response, HandlerError>> + Send {
        (self.0)(request)
    }
}

/// The boxed future a [`DynHandler`] returns.
pub type BoxedResponse<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Response, HandlerError>> + Send + 'a>>;

/// [`Handler`] in a form that can live behind `Arc<dyn DynHandler>` (chosen at run time,
/// shared by several queriers). Every `Handler` is one; `Arc<dyn DynHandler>` is a
/// `Handler` again, at the cost of one boxed future per query.
pub trait DynHandler: Send + Sync + 'static {
    /// Runs one query, as [`Handler::handle`].
    fn handle_boxed(&self, request: Request) -> BoxedResponse<'_>;
}

impl<H: Handler> DynHandler for H {
    fn handle_boxed(&self, request: Request) -> BoxedResponse<'_> {
        Box::pin(self.handle(request))
    }
}

impl Handler for Arc<dyn DynHandler> {
    fn handle(&self, request: Request) -> impl Future<Output = Result<Response, HandlerError>> + Send {
        self.as_ref().handle_boxed(request)
    }
}

/// A running querier.
pub struct Querier {
    shared: Arc<Shared>,
    discovery: Discovery,
    /// Follows discovery's changes of the scheduler set.
    follower: JoinHandle<()>,
}

/// One scheduler this querier serves, by one task and one dequeue stream for all its
/// workers. Links are only appended; one no longer wanted (its scheduler left or died) is
/// stopped, and a scheduler that comes back gets a new one.
struct Link {
    addr: SocketAddr,
    conn: Mutex<Option<quinn::Connection>>,
    /// Workers wanted against it (only ever raised).
    wanted: watch::Sender<usize>,
    /// Of those, the ones on an open dequeue stream now.
    connected: AtomicUsize,
    stop: CancellationToken,
}

struct Shared {
    config: QuerierConfig,
    endpoint: quinn::Endpoint,
    links: std::sync::Mutex<Vec<Arc<Link>>>,
    /// Every link's task, for the shutdown to wait on.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    frontends: frontends::Connections,
    /// The shared results streams to frontends.
    batches: batch::Batches,
    /// TCP lifelines to schedulers, by token; held until the querier stops.
    lifelines: Mutex<HashMap<u128, JoinHandle<()>>>,
    /// Told whenever a link's dequeue stream opens, grows or is lost.
    registration: watch::Sender<()>,
    /// Stop asking for work (graceful shutdown: after the current query).
    stopping: CancellationToken,
    /// The QUIC figures of its connections to schedulers and frontends.
    quic: Arc<QuicStats>,
}

/// Workers of one scheduler, as [`Querier::workers`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SchedulerWorkers {
    /// The scheduler's QUIC address.
    pub scheduler: SocketAddr,
    /// Workers serving it (connected or reconnecting).
    pub workers: usize,
    /// Of those, the ones registered with it now.
    pub connected: usize,
}

impl Querier {
    /// Starts `concurrency` workers against every scheduler.
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
    /// querier.wait_connected(4, std::time::Duration::from_secs(5)).await;
    /// // … until it is time to stop:
    /// querier.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn start<H: Handler>(config: QuerierConfig, handler: H) -> Result<Querier, ClientError> {
        config.client.validate()?;
        if config.concurrency == 0 || config.chunk_size == 0 || config.delivery_attempts == 0 {
            return Err(ClientError::Config(
                "concurrency, chunk_size and delivery_attempts must be at least 1".into(),
            ));
        }
        let largest_chunk = config.client.max_frame_len as usize - CHUNK_FRAME_OVERHEAD;
        if config.chunk_size > largest_chunk {
            return Err(ClientError::Config(format!(
                "chunk_size is {} bytes; a chunk frame must fit in max_frame_len ({} bytes): at most {largest_chunk}",
                config.chunk_size, config.client.max_frame_len
            )));
        }
        if let Some(limit) = config.hold_limit
            && limit >= config.confirm_after
        {
            // A held query is confirmed to its frontend at `confirm_after`, and a confirmed
            // query cannot be placed again.
            return Err(ClientError::Config(format!(
                "hold_limit ({limit:?}) must be under confirm_after ({:?})",
                config.confirm_after
            )));
        }
        // The scheduler sees a worker per slot: two per worker loop with prefetch.
        let slots = usize::from(slots::slots_per_loop(config.prefetch));
        let with = if config.prefetch { " with prefetch" } else { "" };
        let max = usize::from(sluice_protocol::MAX_WORKERS_PER_STREAM) / slots;
        if config.concurrency > max {
            return Err(ClientError::Config(format!(
                "concurrency is {}{with}; at most {max} workers per scheduler",
                config.concurrency
            )));
        }
        let bind: SocketAddr = "0.0.0.0:0".parse().expect("valid address");
        let mut endpoint =
            crate::transport::endpoint(bind, None).map_err(|error| ClientError::Bind { addr: bind, error })?;
        endpoint.set_default_client_config(config.client.quic_client()?);
        let discovery = config.client.discovery(MemberRole::Querier)?;
        let shared = Arc::new(Shared {
            config,
            endpoint,
            links: std::sync::Mutex::new(Vec::new()),
            tasks: std::sync::Mutex::new(Vec::new()),
            frontends: frontends::Connections::default(),
            batches: batch::Batches::default(),
            lifelines: Mutex::new(HashMap::new()),
            quic: Arc::default(),
            registration: watch::channel(()).0,
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

    /// The QUIC addresses of the schedulers served and how many worker loops each has,
    /// sorted.
    pub fn schedulers(&self) -> Vec<(SocketAddr, usize)> {
        self.workers().iter().map(|w| (w.scheduler, w.workers)).collect()
    }

    /// The QUIC figures of this querier's connections to peers of `role`
    /// ([`Role::Scheduler`] for the dequeue loops, [`Role::Frontend`] for the results),
    /// closed ones included.
    pub fn quic_stats(&self, role: Role) -> QuicTotals {
        self.shared.quic.totals(role)
    }

    /// Per scheduler served: worker loops and how many of them are registered now, sorted
    /// by address.
    pub fn workers(&self) -> Vec<SchedulerWorkers> {
        let mut out: Vec<SchedulerWorkers> = self
            .shared
            .live_links()
            .iter()
            .map(|l| SchedulerWorkers {
                scheduler: l.addr,
                workers: *l.wanted.borrow(),
                connected: l.connected.load(Ordering::Relaxed),
            })
            .collect();
        out.sort();
        out
    }

    /// Waits until at least `workers` workers are registered with schedulers (all
    /// together), or `timeout` passes; true if they are.
    pub async fn wait_connected(&self, workers: usize, timeout: Duration) -> bool {
        let mut changed = self.shared.registration.subscribe();
        let count = || self.workers().iter().map(|w| w.connected).sum::<usize>();
        let wait = async {
            while count() < workers {
                if changed.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        count() >= workers
    }

    /// Graceful shutdown: tells every scheduler this querier is leaving, lets running
    /// queries finish and their results reach their frontends, then closes.
    pub async fn shutdown(self) {
        self.shared.stopping.cancel();
        self.follower.abort();
        let bound = self.shared.config.client.idle_timeout;
        for link in self.shared.live_links() {
            // A scheduler that is gone cannot be told; wait no longer than it takes to
            // notice that.
            let addr = link.addr;
            match tokio::time::timeout(bound, dequeue::notify_shutdown(&self.shared, &link)).await {
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
                        wanted: watch::channel(0).0,
                        connected: AtomicUsize::new(0),
                        stop: CancellationToken::new(),
                    });
                    links.push(link.clone());
                    let seed = tasks.len() as u64;
                    tasks.push(tokio::spawn(dequeue::link_loop(
                        self.clone(),
                        link.clone(),
                        handler.clone(),
                        seed,
                    )));
                    link
                }
            };
            let wanted = if t.in_use || t.leaving {
                self.config.concurrency
            } else {
                1
            };
            link.wanted.send_if_modified(|n| {
                let raise = wanted > *n;
                if raise {
                    *n = wanted;
                }
                raise
            });
        }
    }
}
