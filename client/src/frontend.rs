//! The frontend client: enqueue sub-queries on the schedulers, receive their results.
//!
//! A [`Frontend`] keeps one connection per scheduler in use (reconnecting with backoff; the
//! set is static or follows the gossip, see [`FrontendConfig::gossip`]) and runs
//! a QUIC *result endpoint* that queriers send results to directly. Only querier
//! certificates may deliver results, and only for queries this frontend has outstanding,
//! for the same tenant.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use sluice_protocol::{
    Enqueue, EnqueueStatus, FramedRead, FramedWrite, FrontendAddress, FrontendToScheduler, Hello, HelloReply, Limits,
    Metadata, QueryErrorKind, QueryId, RefuseReason, ResultFrame, ResultReceipt, Role, SchedulerToFrontend, StreamKind,
    close_code,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::discovery::{Discovery, Target};
use crate::error::{ClientError, QueryError};
use crate::gossip::{GossipConfig, MemberRole};
use crate::tls::{self, Identity};

/// Settings of a [`Frontend`].
#[derive(Debug, Clone)]
pub struct FrontendConfig {
    /// This frontend's id, unique among frontends.
    pub id: String,
    /// Its certificate (role `frontend`), key, and the CA.
    pub identity: Identity,
    /// Scheduler QUIC addresses (a static list; leave it empty when `gossip` is set).
    pub schedulers: Vec<SocketAddr>,
    /// Learn the live schedulers by joining their gossip (as a `frontend` member) instead
    /// of a static list: schedulers that die or leave stop being used, new or restarted
    /// ones are used as they appear.
    pub gossip: Option<GossipConfig>,
    /// Use only the first N active schedulers, in a stable order (by scheduler id), as
    /// Mimir's `max_used_instances`; 0: all. Applies to gossip discovery.
    pub max_used_instances: usize,
    /// TLS name the schedulers' certificates are checked against.
    pub scheduler_server_name: String,
    /// Where the result endpoint listens.
    pub result_listen: SocketAddr,
    /// `host:port` queriers dial for results; defaults to the bound address.
    pub result_advertise: Option<String>,
    /// TLS name queriers check this frontend's certificate against.
    pub result_server_name: String,
    /// How long `submit` waits for a scheduler to become available.
    pub enqueue_wait: Duration,
    /// A scheduler silent for this long is taken as gone (its queued queries go
    /// elsewhere). Pings go out every fifth of it.
    pub idle_timeout: Duration,
    /// Largest frame sent or accepted.
    pub max_frame_len: u32,
}

impl FrontendConfig {
    /// Defaults for a frontend on this host: result endpoint on 127.0.0.1 (any port),
    /// TLS names `localhost` (as in the development certificates).
    pub fn new(id: impl Into<String>, identity: Identity, schedulers: Vec<SocketAddr>) -> Self {
        FrontendConfig {
            id: id.into(),
            identity,
            schedulers,
            gossip: None,
            max_used_instances: 0,
            scheduler_server_name: "localhost".into(),
            result_listen: "127.0.0.1:0".parse().expect("valid address"),
            result_advertise: None,
            result_server_name: "localhost".into(),
            enqueue_wait: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            max_frame_len: Limits::default().max_frame_len,
        }
    }
}

/// One sub-query to run.
#[derive(Debug, Clone, Default)]
pub struct QueryRequest {
    /// The tenant the query runs for.
    pub tenant: String,
    /// Actor path below the tenant (user, dashboard…), outermost first.
    pub actors: Vec<String>,
    /// The backend the query hits, if known.
    pub component: Option<String>,
    /// Priority class; higher is served first (`None`: the tenant's default).
    pub priority: Option<u8>,
    /// Expected cost in arbitrary units, for cost-aware fairness.
    pub cost_hint: Option<u32>,
    /// Time the query may take from enqueue; `None`: no deadline.
    pub timeout: Option<Duration>,
    /// Tracing headers and other key/value pairs passed to the querier.
    pub metadata: Metadata,
    /// The opaque request the querier executes.
    pub payload: Bytes,
}

impl QueryRequest {
    /// A request for `tenant` with `payload` and nothing else set.
    pub fn new(tenant: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        QueryRequest {
            tenant: tenant.into(),
            payload: payload.into(),
            ..QueryRequest::default()
        }
    }
}

/// A result as it starts to arrive: status and metadata now, the body as it streams.
#[derive(Debug)]
pub struct QueryResponse {
    /// The querier's status, HTTP style (200 = success).
    pub status: u16,
    /// The querier's metadata.
    pub metadata: Metadata,
    /// The result body, streaming in.
    pub body: Body,
}

/// A result body, received chunk by chunk (never all held in memory by the client).
#[derive(Debug)]
pub struct Body {
    rx: mpsc::Receiver<Result<Bytes, QueryError>>,
}

impl Body {
    /// The next chunk; `None` once the body is complete.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, QueryError>> {
        self.rx.recv().await
    }

    /// The whole body in one buffer.
    pub async fn collect(mut self) -> Result<Vec<u8>, QueryError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.chunk().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }
}

/// An accepted query. Await [`response`](Self::response); dropping the handle before the
/// response starts cancels the query (removed if queued, stopped if running).
#[derive(Debug)]
pub struct QueryHandle {
    id: QueryId,
    shared: Arc<Shared>,
    rx: Option<oneshot::Receiver<Result<QueryResponse, QueryError>>>,
    /// Whether dropping the handle cancels the query (until it is answered).
    armed: bool,
}

impl QueryHandle {
    /// This query's id at this frontend.
    pub fn id(&self) -> QueryId {
        self.id
    }

    /// Waits for the result to start (or for the query to fail).
    pub async fn response(mut self) -> Result<QueryResponse, QueryError> {
        let rx = self.rx.take().expect("response is called once");
        let outcome = rx
            .await
            .unwrap_or_else(|_| Err(QueryError::Cancelled("the frontend client stopped".into())));
        // Answered: nothing left to cancel.
        self.armed = false;
        outcome
    }
}

impl Drop for QueryHandle {
    fn drop(&mut self) {
        if self.armed {
            self.shared.cancel(self.id);
        }
    }
}

/// Counters of what the result endpoint refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontendStats {
    /// Results for a query that already had one (ignored).
    pub duplicate_results: u64,
    /// Results for queries this frontend does not have outstanding.
    pub unknown_results: u64,
    /// Queries re-enqueued on another scheduler after theirs shut down or was lost.
    pub requeued: u64,
}

/// The frontend client. Cheap to clone; all clones share connections and queries.
#[derive(Debug, Clone)]
pub struct Frontend {
    shared: Arc<Shared>,
    background: Arc<Background>,
}

/// Discovery and the task that follows it; stopped when the last clone goes.
struct Background {
    discovery: Discovery,
    follower: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Background")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

#[derive(Debug)]
enum Phase {
    /// Being enqueued; the scheduler's answer goes to the sender.
    Placing(Option<oneshot::Sender<EnqueueStatus>>),
    Queued,
    /// The result's head arrived: no more re-enqueueing or cancelling.
    Started,
}

#[derive(Debug)]
struct Outstanding {
    request: QueryRequest,
    scheduler: Option<usize>,
    phase: Phase,
    done: Option<oneshot::Sender<Result<QueryResponse, QueryError>>>,
}

#[derive(Debug, Default)]
struct SchedulerSlot {
    tx: Option<mpsc::UnboundedSender<FrontendToScheduler>>,
    draining: bool,
    queued: u32,
}

/// One scheduler this frontend connects to. Links are only ever appended, so a link's
/// index names it for as long as the frontend lives; a link that is no longer wanted is
/// stopped, and a scheduler that comes back gets a new one.
#[derive(Debug)]
struct Link {
    addr: SocketAddr,
    slot: Mutex<SchedulerSlot>,
    /// Send new work here (among the schedulers in use).
    in_use: AtomicBool,
    stop: CancellationToken,
}

impl Link {
    fn new(addr: SocketAddr, in_use: bool) -> Link {
        Link {
            addr,
            slot: Mutex::default(),
            in_use: AtomicBool::new(in_use),
            stop: CancellationToken::new(),
        }
    }

    /// Connected, in use and not draining: may be sent new work.
    fn accepting(&self) -> Option<(u32, mpsc::UnboundedSender<FrontendToScheduler>)> {
        if !self.in_use.load(Ordering::Relaxed) || self.stop.is_cancelled() {
            return None;
        }
        let s = self.slot.lock().unwrap();
        match (&s.tx, s.draining) {
            (Some(tx), false) => Some((s.queued, tx.clone())),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Shared {
    config: FrontendConfig,
    address: FrontendAddress,
    queries: Mutex<HashMap<QueryId, Outstanding>>,
    schedulers: RwLock<Vec<Arc<Link>>>,
    available: watch::Sender<usize>,
    next_id: AtomicU64,
    pick_seed: AtomicU64,
    stats: Mutex<FrontendStats>,
    stop: CancellationToken,
    result_endpoint: quinn::Endpoint,
}

impl Frontend {
    /// Starts the result endpoint and the scheduler connections, and waits (up to
    /// `enqueue_wait`) until at least one scheduler is connected.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// use sluice_client::{Frontend, FrontendConfig, QueryRequest, tls::Identity};
    ///
    /// let identity = Identity {
    ///     ca: "sluice-data/ca.pem".into(),
    ///     cert: "sluice-data/frontend.pem".into(),
    ///     key: "sluice-data/frontend-key.pem".into(),
    /// };
    /// let frontend = Frontend::connect(FrontendConfig::new("frontend-1", identity, vec!["127.0.0.1:9095".parse()?])).await?;
    /// let handle = frontend.submit(QueryRequest::new("tenant-a", "sum(rate(x[5m]))")).await?;
    /// let response = handle.response().await?;
    /// let body = response.body.collect().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(config: FrontendConfig) -> Result<Frontend, ClientError> {
        let discovery = Discovery::start(
            &config.id,
            MemberRole::Frontend,
            &config.schedulers,
            config.gossip.as_ref(),
            config.max_used_instances,
        )?;
        let mut server_config = tls::quic_server(&config.identity)?;
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(4096u32.into());
        server_config.transport_config(Arc::new(transport));
        let mut result_endpoint =
            quinn::Endpoint::server(server_config, config.result_listen).map_err(|error| ClientError::Bind {
                addr: config.result_listen,
                error,
            })?;
        let mut client_config = tls::quic_client(&config.identity)?;
        client_config.transport_config(Arc::new(transport_with_idle(config.idle_timeout)?));
        result_endpoint.set_default_client_config(client_config);
        let bound = result_endpoint.local_addr().map_err(|error| ClientError::Bind {
            addr: config.result_listen,
            error,
        })?;
        let address = FrontendAddress {
            id: config.id.clone(),
            address: config.result_advertise.clone().unwrap_or_else(|| bound.to_string()),
            server_name: config.result_server_name.clone(),
        };
        let (available, mut ready) = watch::channel(0);
        let shared = Arc::new(Shared {
            schedulers: RwLock::new(Vec::new()),
            config,
            address,
            queries: Mutex::new(HashMap::new()),
            available,
            next_id: AtomicU64::new(1),
            pick_seed: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            stats: Mutex::default(),
            stop: CancellationToken::new(),
            result_endpoint: result_endpoint.clone(),
        });
        tokio::spawn(result_endpoint_loop(shared.clone(), result_endpoint.clone()));
        let follower = {
            let shared = shared.clone();
            discovery.follow(shared.stop.clone(), move |targets| shared.reconcile(targets))
        };
        let wait = shared.config.enqueue_wait;
        let _ = tokio::time::timeout(wait, ready.wait_for(|n| *n > 0)).await;
        Ok(Frontend {
            shared,
            background: Arc::new(Background { discovery, follower }),
        })
    }

    /// Enqueues a query and returns once a scheduler accepted it. A scheduler that is full
    /// for the tenant or shutting down is skipped for another; the error is returned only
    /// when every scheduler refused.
    pub async fn submit(&self, request: QueryRequest) -> Result<QueryHandle, QueryError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = oneshot::channel();
        self.shared.queries.lock().unwrap().insert(
            id,
            Outstanding {
                request,
                scheduler: None,
                phase: Phase::Placing(None),
                done: Some(done),
            },
        );
        let mut handle = QueryHandle {
            id,
            shared: self.shared.clone(),
            rx: Some(rx),
            armed: true,
        };
        match self.shared.place(id, &HashSet::new()).await {
            Ok(()) => Ok(handle),
            Err(e) => {
                self.shared.queries.lock().unwrap().remove(&id);
                handle.armed = false;
                Err(e)
            }
        }
    }

    /// The address queriers send results to.
    pub fn result_address(&self) -> &FrontendAddress {
        &self.shared.address
    }

    /// Queries submitted and not finished.
    pub fn outstanding(&self) -> usize {
        self.shared.queries.lock().unwrap().len()
    }

    /// Schedulers connected and accepting work.
    pub fn connected_schedulers(&self) -> usize {
        *self.shared.available.borrow()
    }

    /// The QUIC addresses of the schedulers connected and accepting work, sorted.
    pub fn scheduler_addresses(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> = self
            .shared
            .links()
            .iter()
            .filter(|l| l.accepting().is_some())
            .map(|l| l.addr)
            .collect();
        addrs.sort();
        addrs
    }

    /// A receiver that sees the number of schedulers accepting work change.
    pub fn watch_schedulers(&self) -> watch::Receiver<usize> {
        self.shared.available.subscribe()
    }

    /// Counters of refused results and re-enqueued queries.
    pub fn stats(&self) -> FrontendStats {
        *self.shared.stats.lock().unwrap()
    }

    /// Stops every connection and the result endpoint; outstanding queries fail as
    /// cancelled (and are cancelled at their schedulers, whose connections close). Waits
    /// up to a second for the peers to be told.
    pub async fn close(&self) {
        self.shared.stop.cancel();
        self.background.follower.abort();
        self.background.discovery.leave().await;
        self.shared
            .result_endpoint
            .close(close_code::DONE.into(), b"frontend closing");
        let queries: Vec<_> = self.shared.queries.lock().unwrap().drain().collect();
        for (_, mut q) in queries {
            if let Some(done) = q.done.take() {
                let _ = done.send(Err(QueryError::Cancelled("the frontend client closed".into())));
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.result_endpoint.wait_idle()).await;
    }
}

/// Transport settings with `idle` as the idle timeout and pings every fifth of it.
pub(crate) fn transport_with_idle(idle: Duration) -> Result<quinn::TransportConfig, ClientError> {
    if idle.is_zero() {
        return Err(ClientError::Config("idle timeout must be above zero".into()));
    }
    let timeout = quinn::IdleTimeout::try_from(idle)
        .map_err(|_| ClientError::Config(format!("idle timeout {idle:?} is too large")))?;
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(idle / 5));
    t.max_idle_timeout(Some(timeout));
    Ok(t)
}

impl Shared {
    /// Picks the less loaded of two schedulers (by their last load hint) among those
    /// connected, not draining and not in `skip`.
    fn pick(&self, skip: &HashSet<usize>) -> Option<(usize, mpsc::UnboundedSender<FrontendToScheduler>)> {
        let candidates: Vec<(usize, u32, mpsc::UnboundedSender<FrontendToScheduler>)> = self
            .links()
            .iter()
            .enumerate()
            .filter(|(i, _)| !skip.contains(i))
            .filter_map(|(i, link)| link.accepting().map(|(queued, tx)| (i, queued, tx)))
            .collect();
        let n = candidates.len() as u64;
        if n == 0 {
            return None;
        }
        let seed = mix(self.pick_seed.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed));
        let a = &candidates[(seed % n) as usize];
        let b = &candidates[((seed >> 32) % n) as usize];
        let best = if b.1 < a.1 { b } else { a };
        Some((best.0, best.2.clone()))
    }

    /// Enqueues query `id` on some scheduler not in `skip`; retries the others on
    /// refusals that another scheduler may not give.
    async fn place(self: &Arc<Self>, id: QueryId, skip: &HashSet<usize>) -> Result<(), QueryError> {
        let mut tried = skip.clone();
        let mut last = QueryError::NoScheduler;
        let deadline = tokio::time::Instant::now() + self.config.enqueue_wait;
        loop {
            let Some((s, tx)) = self.pick(&tried) else {
                // Nobody to ask: wait for a (re)connection, unless everyone already refused.
                if tried.len() > skip.len() || tokio::time::Instant::now() >= deadline {
                    return Err(last);
                }
                let mut ready = self.available.subscribe();
                let _ = tokio::time::timeout_at(deadline, ready.changed()).await;
                continue;
            };
            tried.insert(s);
            let (status_tx, status_rx) = oneshot::channel();
            let frame = {
                let mut queries = self.queries.lock().unwrap();
                let Some(q) = queries.get_mut(&id) else {
                    return Err(QueryError::Cancelled("cancelled while being enqueued".into()));
                };
                q.scheduler = Some(s);
                q.phase = Phase::Placing(Some(status_tx));
                enqueue_frame(id, &q.request)
            };
            if tx.send(frame).is_err() {
                continue;
            }
            let status = match status_rx.await {
                Ok(status) => status,
                Err(_) => continue, // that scheduler's connection dropped: try another
            };
            match status {
                EnqueueStatus::Accepted => {
                    if let Some(q) = self.queries.lock().unwrap().get_mut(&id)
                        && matches!(q.phase, Phase::Placing(_))
                    {
                        q.phase = Phase::Queued;
                    }
                    return Ok(());
                }
                EnqueueStatus::TooManyOutstanding { limit } => last = QueryError::TooManyOutstanding { limit },
                EnqueueStatus::QueueFull => last = QueryError::QueueFull,
                EnqueueStatus::ShuttingDown => last = QueryError::NoScheduler,
                EnqueueStatus::Invalid { reason } => return Err(QueryError::Invalid(reason)),
                EnqueueStatus::Error { message } => last = QueryError::Protocol(message),
            }
        }
    }

    /// Re-enqueues a query that had not started on another scheduler, in the background.
    fn requeue(self: &Arc<Self>, id: QueryId, away_from: usize) {
        let shared = self.clone();
        self.stats.lock().unwrap().requeued += 1;
        tokio::spawn(async move {
            let skip = HashSet::from([away_from]);
            if let Err(e) = shared.place(id, &skip).await {
                shared.finish(id, Err(e));
            }
        });
    }

    /// Ends a query with `outcome` and forgets it.
    fn finish(&self, id: QueryId, outcome: Result<QueryResponse, QueryError>) {
        if let Some(mut q) = self.queries.lock().unwrap().remove(&id)
            && let Some(done) = q.done.take()
        {
            let _ = done.send(outcome);
        }
    }

    /// Withdraws a query whose handle was dropped.
    fn cancel(&self, id: QueryId) {
        let Some(q) = self.queries.lock().unwrap().remove(&id) else {
            return;
        };
        if matches!(q.phase, Phase::Started) {
            return;
        }
        if let Some(s) = q.scheduler
            && let Some(tx) = &self.link(s).slot.lock().unwrap().tx
        {
            let _ = tx.send(FrontendToScheduler::Cancel { query_id: id });
        }
    }

    fn set_available(&self) {
        let n = self.links().iter().filter(|l| l.accepting().is_some()).count();
        self.available.send_if_modified(|current| {
            let changed = *current != n;
            *current = n;
            changed
        });
    }

    /// A snapshot of every link (stopped ones included: indexes stay stable).
    fn links(&self) -> Vec<Arc<Link>> {
        self.schedulers.read().unwrap().clone()
    }

    fn link(&self, s: usize) -> Arc<Link> {
        self.schedulers.read().unwrap()[s].clone()
    }

    /// Connects to the schedulers discovery wants (those in use, and leaving ones whose
    /// queued work may still run) and stops the links to the others; their queries that
    /// had not started are re-enqueued elsewhere.
    fn reconcile(self: &Arc<Self>, targets: &[Target]) {
        let wanted = |t: &&Target| t.in_use || t.leaving;
        let mut links = self.schedulers.write().unwrap();
        for link in links.iter().filter(|l| !l.stop.is_cancelled()) {
            match targets.iter().filter(wanted).find(|t| t.addr == link.addr) {
                Some(t) => link.in_use.store(t.in_use, Ordering::Relaxed),
                None => {
                    debug!(addr = %link.addr, "scheduler no longer in use");
                    link.stop.cancel();
                }
            }
        }
        for t in targets.iter().filter(wanted) {
            if !links.iter().any(|l| l.addr == t.addr && !l.stop.is_cancelled()) {
                let link = Arc::new(Link::new(t.addr, t.in_use));
                links.push(link.clone());
                let s = links.len() - 1;
                tokio::spawn(scheduler_loop(self.clone(), s, link, self.result_endpoint.clone()));
            }
        }
        drop(links);
        self.set_available();
    }

    /// A scheduler connection ended: queries it held that had not started go elsewhere.
    fn scheduler_lost(self: &Arc<Self>, s: usize) {
        self.link(s).slot.lock().unwrap().tx = None;
        self.set_available();
        let mut requeue = Vec::new();
        {
            let mut queries = self.queries.lock().unwrap();
            for (&id, q) in queries.iter_mut() {
                if q.scheduler != Some(s) {
                    continue;
                }
                match &mut q.phase {
                    Phase::Placing(waiter) => drop(waiter.take()), // `place` moves on
                    Phase::Queued => requeue.push(id),
                    Phase::Started => {}
                }
            }
        }
        for id in requeue {
            self.requeue(id, s);
        }
    }

    fn on_message(self: &Arc<Self>, s: usize, msg: SchedulerToFrontend) {
        match msg {
            SchedulerToFrontend::EnqueueStatus { query_id, status, load } => {
                self.link(s).slot.lock().unwrap().queued = load.queued;
                if let Some(q) = self.queries.lock().unwrap().get_mut(&query_id)
                    && let Phase::Placing(waiter) = &mut q.phase
                    && let Some(w) = waiter.take()
                {
                    let _ = w.send(status);
                }
            }
            SchedulerToFrontend::QueryError {
                query_id,
                kind,
                message,
            } => {
                let started = self
                    .queries
                    .lock()
                    .unwrap()
                    .get(&query_id)
                    .map(|q| matches!(q.phase, Phase::Started));
                match (started, kind) {
                    (None, _) | (Some(true), _) => {} // finished, or the result stream decides
                    (Some(false), QueryErrorKind::HandedBack) => self.requeue(query_id, s),
                    (Some(false), kind) => {
                        let e = match kind {
                            QueryErrorKind::QuerierFailed => QueryError::QuerierFailed(message),
                            QueryErrorKind::DeadlineExceeded => QueryError::DeadlineExceeded(message),
                            QueryErrorKind::Cancelled | QueryErrorKind::HandedBack => QueryError::Cancelled(message),
                            QueryErrorKind::Internal => QueryError::Protocol(message),
                        };
                        self.finish(query_id, Err(e));
                    }
                }
            }
            SchedulerToFrontend::ShuttingDown => {
                self.link(s).slot.lock().unwrap().draining = true;
                self.set_available();
            }
        }
    }
}

fn enqueue_frame(id: QueryId, r: &QueryRequest) -> FrontendToScheduler {
    FrontendToScheduler::Enqueue(Enqueue {
        query_id: id,
        tenant: r.tenant.clone(),
        actors: r.actors.clone(),
        component: r.component.clone(),
        priority: r.priority,
        cost_hint: r.cost_hint,
        timeout_ms: r.timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        metadata: r.metadata.clone(),
        payload: r.payload.clone(),
    })
}

/// splitmix64's finaliser, for picking two schedulers at random.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Keeps one scheduler connected, reconnecting with backoff (50 ms doubling to 5 s),
/// until the frontend closes or the link is no longer wanted.
async fn scheduler_loop(shared: Arc<Shared>, s: usize, link: Arc<Link>, endpoint: quinn::Endpoint) {
    let mut backoff = Duration::from_millis(50);
    let addr = link.addr;
    while !shared.stop.is_cancelled() && !link.stop.is_cancelled() {
        match serve_scheduler(&shared, s, &link, &endpoint, &mut backoff).await {
            Ok(()) => debug!(%addr, "scheduler connection closed"),
            Err(e) => warn!(%addr, error = %e, retry_in = ?backoff, "cannot reach scheduler"),
        }
        shared.scheduler_lost(s);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shared.stop.cancelled() => break,
            _ = link.stop.cancelled() => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn serve_scheduler(
    shared: &Arc<Shared>,
    s: usize,
    link: &Link,
    endpoint: &quinn::Endpoint,
    backoff: &mut Duration,
) -> Result<(), String> {
    let connecting = endpoint
        .connect(link.addr, &shared.config.scheduler_server_name)
        .map_err(|e| e.to_string())?;
    let conn = tokio::select! {
        conn = connecting => conn.map_err(|e| e.to_string())?,
        _ = link.stop.cancelled() => return Ok(()),
    };
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let max = shared.config.max_frame_len;
    let mut writer = FramedWrite::new(send, max);
    let mut reader = FramedRead::new(recv, max);
    writer
        .send(&Hello::new(Role::Frontend, &shared.config.id, StreamKind::FrontendLoop))
        .await
        .map_err(|e| e.to_string())?;
    match reader.next::<HelloReply>().await.map_err(|e| e.to_string())? {
        Some(HelloReply::Welcome { .. }) => {}
        Some(HelloReply::Rejected { code, message }) => return Err(format!("refused ({code:?}): {message}")),
        None => return Err("closed before the hello reply".into()),
    }
    writer
        .send(&FrontendToScheduler::ResultEndpoint(shared.address.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let (tx, mut rx) = mpsc::unbounded_channel::<FrontendToScheduler>();
    {
        let mut slot = link.slot.lock().unwrap();
        slot.tx = Some(tx);
        slot.draining = false;
    }
    shared.set_available();
    *backoff = Duration::from_millis(50);
    let writer_task = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(m) = next.take().or_else(|| rx.try_recv().ok()) {
                if writer.buffer(&m).is_err() {
                    return;
                }
            }
            if writer.flush().await.is_err() {
                return;
            }
        }
    });
    let result = loop {
        tokio::select! {
            msg = reader.next::<SchedulerToFrontend>() => match msg {
                Ok(Some(m)) => shared.on_message(s, m),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.to_string()),
            },
            _ = shared.stop.cancelled() => {
                conn.close(close_code::DONE.into(), b"frontend closing");
                break Ok(());
            }
            _ = link.stop.cancelled() => {
                conn.close(close_code::DONE.into(), b"scheduler no longer in use");
                break Ok(());
            }
        }
    };
    writer_task.abort();
    result
}

async fn result_endpoint_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            match tls::peer_role(&conn) {
                Ok(Role::Querier) => {}
                other => {
                    warn!(remote = %conn.remote_address(), ?other, "refusing a result connection from a non-querier");
                    conn.close(
                        close_code::ROLE_NOT_ALLOWED.into(),
                        b"only queriers may deliver results",
                    );
                    return;
                }
            }
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(receive_result(shared.clone(), conn.clone(), send, recv));
            }
        });
    }
}

/// Reads one result stream and hands it to the waiting query.
async fn receive_result(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let max = shared.config.max_frame_len;
    let mut reader = FramedRead::new(recv, max);
    let mut writer = FramedWrite::new(send, max);
    match reader.hello().await {
        Ok(Some(h)) if h.role == Role::Querier && h.stream == StreamKind::Result => {}
        _ => {
            conn.close(close_code::PROTOCOL_ERROR.into(), b"expected a result hello");
            return;
        }
    }
    let welcome = HelloReply::Welcome {
        id: shared.config.id.clone(),
    };
    if writer.send(&welcome).await.is_err() {
        return;
    }
    let receipt = deliver(&shared, &mut reader).await;
    if let ResultReceipt::Refused { reason } = &receipt {
        let mut stats = shared.stats.lock().unwrap();
        match reason {
            RefuseReason::Duplicate => stats.duplicate_results += 1,
            RefuseReason::UnknownQuery => stats.unknown_results += 1,
            _ => {}
        }
    }
    let _ = writer.send(&receipt).await;
    let _ = writer.get_mut().finish();
}

async fn deliver(shared: &Arc<Shared>, reader: &mut FramedRead<quinn::RecvStream>) -> ResultReceipt {
    let refused = |reason| ResultReceipt::Refused { reason };
    enum First {
        Head { status: u16, metadata: Metadata },
        Failed(String),
    }
    let (query_id, tenant, first) = match reader.next::<ResultFrame>().await {
        Ok(Some(ResultFrame::Head {
            query_id,
            tenant,
            status,
            metadata,
        })) => (query_id, tenant, First::Head { status, metadata }),
        Ok(Some(ResultFrame::Error {
            query_id,
            tenant,
            message,
        })) => (query_id, tenant, First::Failed(message)),
        _ => return refused(RefuseReason::Malformed),
    };
    // Claim the query: it must be outstanding, for this tenant, and not started yet.
    let done = {
        let mut queries = shared.queries.lock().unwrap();
        let Some(q) = queries.get_mut(&query_id) else {
            return refused(RefuseReason::UnknownQuery);
        };
        if q.request.tenant != tenant {
            return refused(RefuseReason::TenantMismatch);
        }
        if matches!(q.phase, Phase::Started) || q.done.is_none() {
            return refused(RefuseReason::Duplicate);
        }
        // A result can overtake its own enqueue acknowledgement (another connection):
        // it proves the query was accepted.
        if let Phase::Placing(waiter) = &mut q.phase
            && let Some(w) = waiter.take()
        {
            let _ = w.send(EnqueueStatus::Accepted);
        }
        q.phase = Phase::Started;
        q.done.take().expect("checked above")
    };
    let (status, metadata) = match first {
        First::Head { status, metadata } => (status, metadata),
        First::Failed(message) => {
            shared.queries.lock().unwrap().remove(&query_id);
            let _ = done.send(Err(QueryError::Failed(message)));
            return ResultReceipt::Delivered;
        }
    };
    let (body_tx, rx) = mpsc::channel(16);
    let _ = done.send(Ok(QueryResponse {
        status,
        metadata,
        body: Body { rx },
    }));
    let mut received: u64 = 0;
    let receipt = loop {
        match reader.next::<ResultFrame>().await {
            Ok(Some(ResultFrame::Chunk(bytes))) => {
                received += bytes.len() as u64;
                if body_tx.send(Ok(bytes)).await.is_err() {
                    break ResultReceipt::Delivered; // the caller stopped reading
                }
            }
            Ok(Some(ResultFrame::End { total_len })) if total_len == received => break ResultReceipt::Delivered,
            Ok(Some(_)) => {
                let _ = body_tx
                    .send(Err(QueryError::Protocol("malformed result stream".into())))
                    .await;
                break refused(RefuseReason::Malformed);
            }
            Ok(None) | Err(_) => {
                let _ = body_tx
                    .send(Err(QueryError::QuerierFailed("result stream broken".into())))
                    .await;
                break refused(RefuseReason::Malformed);
            }
        }
    };
    shared.queries.lock().unwrap().remove(&query_id);
    receipt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answered_handle_lets_go_of_the_client() {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let identity = Identity {
            ca: "unused".into(),
            cert: "unused".into(),
            key: "unused".into(),
        };
        let config = FrontendConfig::new("fe", identity, vec!["127.0.0.1:1".parse().unwrap()]);
        let shared = Arc::new(Shared {
            schedulers: RwLock::new(vec![Arc::new(Link::new("127.0.0.1:1".parse().unwrap(), true))]),
            address: FrontendAddress {
                id: "fe".into(),
                address: "127.0.0.1:2".into(),
                server_name: "localhost".into(),
            },
            config,
            queries: Mutex::new(HashMap::new()),
            available: watch::channel(0).0,
            next_id: AtomicU64::new(1),
            pick_seed: AtomicU64::new(1),
            stats: Mutex::default(),
            stop: CancellationToken::new(),
            result_endpoint: endpoint,
        });
        for answered in [true, false] {
            let (tx, rx) = oneshot::channel();
            let handle = QueryHandle {
                id: 1,
                shared: shared.clone(),
                rx: Some(rx),
                armed: true,
            };
            if answered {
                tx.send(Err(QueryError::Failed("x".into()))).unwrap();
                assert!(handle.response().await.is_err());
            } else {
                drop(handle); // cancels: nothing outstanding, nothing to send
            }
            assert_eq!(Arc::strong_count(&shared), 1, "answered: {answered}");
        }
    }
}
