//! The frontend client: enqueue sub-queries on the schedulers, receive their results.
//!
//! A [`Frontend`] keeps one connection per scheduler in use (reconnecting with backoff; the
//! set is static or follows the gossip, see [`SchedulerSource`](crate::SchedulerSource)) and runs
//! a QUIC *result endpoint* that queriers send results to directly. Only querier
//! certificates may deliver results, and only for queries this frontend has outstanding,
//! for the same tenant.
//!
//! What happens to each query is decided by the pure [`QueryTable`](crate::lifecycle)
//! state machine; this module is its shell: it turns frames, connection changes, caller
//! actions and timers into events, and carries out the actions the table returns.

mod link;
mod outgoing;
mod results;
mod shared;
mod types;

use shared::{Claim, Entry, Inner, Link, Shared};
pub use types::{
    Body, CancelOutcome, FrontendConfig, FrontendStats, Placement, QueryRequest, QueryResponse, Readiness, Stage,
};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sluice_protocol::{Capability, FrontendAddress, QueryId, Role, close_code};
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::FastMap;
use crate::trace::TraceParent;

use crate::discovery::Discovery;
use crate::error::{ClientError, QueryError};
use crate::gossip::MemberRole;
use crate::lifecycle::{Event, Now, Policy, QueryTable, SchedulerIx, State};
use crate::quic_stats::{QuicStats, QuicTotals};
use crate::tls;

/// An accepted query. Await [`response`](Self::response); dropping the handle before the
/// response starts cancels the query (removed if queued, stopped if running).
#[derive(Debug)]
pub struct QueryHandle {
    id: QueryId,
    shared: Arc<Shared>,
    rx: Option<oneshot::Receiver<Result<QueryResponse, QueryError>>>,
    /// Whether dropping the handle cancels the query (until it is answered).
    armed: bool,
    /// The query's span (debug level), with its trace id.
    span: tracing::Span,
    trace: TraceParent,
}

impl QueryHandle {
    /// This query's id at this frontend.
    pub fn id(&self) -> QueryId {
        self.id
    }

    /// Where the query is now; `None` once it has ended (answered, failed or cancelled).
    pub fn placement(&self) -> Option<Placement> {
        let (state, holder, attempt, estimated_wait) = self.shared.inner.lock().unwrap().table.placement(self.id)?;
        let stage = match state {
            State::Waiting => Stage::WaitingForScheduler,
            State::Placing(_) => Stage::Placing,
            State::Queued(_) => Stage::Queued,
            State::Dispatched(_) => Stage::Dispatched,
            State::Started => Stage::Started,
            State::Receiving => Stage::Receiving,
        };
        let scheduler = holder.map(|s| self.shared.link(s).addr);
        Some(Placement {
            stage,
            scheduler,
            attempt,
            estimated_wait,
        })
    }

    /// Waits for the result to start (or for the query to fail). Bounded by the query's
    /// deadline.
    pub async fn response(mut self) -> Result<QueryResponse, QueryError> {
        let rx = self.rx.take().expect("response is called once");
        let outcome = rx
            .await
            .unwrap_or_else(|_| Err(QueryError::Cancelled("the frontend client stopped".into())));
        // Answered: nothing left to cancel.
        self.armed = false;
        self.span.in_scope(|| match &outcome {
            Ok(r) => debug!(status = r.status, "answered"),
            Err(e) => debug!(error = %e, "failed"),
        });
        outcome
    }

    /// Cancels the query and returns once it is nowhere any more: at once if no
    /// scheduler holds it (it waited for one, or its result was streaming), otherwise when
    /// the scheduler that held it acknowledges (it removed the query from its queue or
    /// told the querier running it to stop). [`CancelOutcome::Unacknowledged`] if that
    /// scheduler did not answer within the frontend's `idle_timeout` (it is then taken as
    /// gone; the query is cancelled here either way). Dropping the handle cancels too,
    /// without waiting.
    pub async fn cancel(mut self) -> CancelOutcome {
        self.armed = false;
        let Some(placement) = self.placement() else {
            return CancelOutcome::AlreadyEnded;
        };
        let held = placement.scheduler.is_some() && placement.stage != Stage::Receiving;
        let ack = held.then(|| {
            let (tx, rx) = oneshot::channel();
            self.shared.cancels.lock().unwrap().insert(self.id, tx);
            rx
        });
        self.shared.event(Event::Cancel { id: self.id });
        let Some(ack) = ack else {
            return CancelOutcome::Cancelled;
        };
        let outcome = match tokio::time::timeout(self.shared.config.client.idle_timeout, ack).await {
            Ok(Ok(())) => CancelOutcome::Acknowledged,
            _ => CancelOutcome::Unacknowledged,
        };
        self.shared.cancels.lock().unwrap().remove(&self.id);
        outcome
    }

    /// The W3C trace context the query travels with (from the request's `traceparent`, or
    /// started by this frontend): its trace id finds it in every process's log.
    pub fn trace(&self) -> TraceParent {
        self.trace
    }
}

impl Drop for QueryHandle {
    fn drop(&mut self) {
        if self.armed {
            self.shared.event(Event::Cancel { id: self.id });
        }
    }
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

impl Frontend {
    /// Starts the result endpoint and the scheduler connections, and waits (up to
    /// `enqueue_wait`) for the configured [`Readiness`] (by default: one scheduler connected
    /// and accepting work). Fails with [`ClientError::NotReady`] if it is not reached in
    /// time; with [`Readiness::Nothing`] it returns at once.
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
        config.client.validate()?;
        if config.max_attempts == 0 || config.default_timeout.is_zero() {
            return Err(ClientError::Config(
                "max_attempts and default_timeout must be above zero".into(),
            ));
        }
        let discovery = config.client.discovery(MemberRole::Frontend)?;
        let mut server_config = tls::quic_server(&config.client.identity)?;
        let mut transport = quinn::TransportConfig::default();
        crate::transport::tune(&mut transport).max_concurrent_bidi_streams(1024u32.into());
        server_config.transport_config(Arc::new(transport));
        let mut result_endpoint =
            crate::transport::endpoint(config.result_listen, Some(server_config)).map_err(|error| {
                ClientError::Bind {
                    addr: config.result_listen,
                    error,
                }
            })?;
        result_endpoint.set_default_client_config(config.client.quic_client()?);
        let bound = result_endpoint.local_addr().map_err(|error| ClientError::Bind {
            addr: config.result_listen,
            error,
        })?;
        let address = FrontendAddress {
            id: config.client.id.clone(),
            address: config.result_advertise.clone().unwrap_or_else(|| bound.to_string()),
            server_name: config.result_server_name.clone(),
            max_frame_len: config.client.max_frame_len,
        };
        let (available, _) = watch::channel(0);
        let policy = Policy {
            placement_wait: config.enqueue_wait,
            max_attempts: config.max_attempts,
            confirm_grace: config.confirm_grace,
        };
        let seed = u64::from(std::process::id()) ^ (bound.port() as u64) << 32;
        let shared = Arc::new(Shared {
            schedulers: RwLock::new(Vec::new()),
            config,
            address,
            inner: Mutex::new(Inner {
                table: QueryTable::new(policy, seed),
                entries: FastMap::default(),
                actions: Vec::new(),
            }),
            available,
            next_id: AtomicU64::new(1),
            timer: Notify::new(),
            stop: CancellationToken::new(),
            result_endpoint: result_endpoint.clone(),
            cancels: Mutex::new(HashMap::new()),
            quic: QuicStats::default(),
        });
        tokio::spawn(results::endpoint_loop(shared.clone(), result_endpoint.clone()));
        tokio::spawn(timer_loop(shared.clone()));
        let follower = {
            let shared = shared.clone();
            discovery.follow(shared.stop.clone(), move |targets| shared.reconcile(targets))
        };
        let frontend = Frontend {
            shared,
            background: Arc::new(Background { discovery, follower }),
        };
        let (readiness, wait) = (frontend.shared.config.readiness, frontend.shared.config.enqueue_wait);
        if let Err(e) = frontend.ready(readiness, wait).await {
            frontend.close().await;
            return Err(e);
        }
        Ok(frontend)
    }

    /// Waits until `readiness` holds, at most `timeout`; returns the number of schedulers
    /// connected and accepting work. [`ClientError::NotReady`] says how many were, and how
    /// many are known, when it did not hold in time.
    pub async fn ready(&self, readiness: Readiness, timeout: Duration) -> Result<usize, ClientError> {
        let mut available = self.shared.available.subscribe();
        let met = |connected: usize| match readiness {
            Readiness::Nothing => true,
            Readiness::AtLeastOne => connected >= 1,
            Readiness::AllKnown => connected >= self.shared.known_schedulers().max(1),
        };
        let wait = async {
            loop {
                if met(*available.borrow_and_update()) {
                    return;
                }
                // A scheduler that joins the known set without connecting changes nothing
                // here; the next connection re-checks.
                if available.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        let connected = *self.shared.available.borrow();
        if met(connected) {
            Ok(connected)
        } else {
            Err(ClientError::NotReady {
                readiness,
                connected,
                known: self.shared.known_schedulers(),
            })
        }
    }

    /// Enqueues a query and returns once a scheduler accepted it. A scheduler that is full
    /// for the tenant or shutting down is skipped for another; the error is returned only
    /// when every scheduler refused, or none could be reached within `enqueue_wait`. A
    /// request too large for one frame (`max_frame_len`) fails at once with
    /// [`QueryError::Invalid`], before anything is sent.
    /// Dropping the returned future withdraws the query.
    pub async fn submit(&self, request: QueryRequest) -> Result<QueryHandle, QueryError> {
        let (placed, placed_rx) = oneshot::channel();
        let mut handle = self.enqueue(request, Some(placed));
        match placed_rx.await {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                handle.armed = false;
                Err(e)
            }
            Err(_) => {
                handle.armed = false;
                Err(QueryError::Cancelled("the frontend client stopped".into()))
            }
        }
    }

    /// Enqueues a query and waits for its response: [`submit`](Self::submit), then
    /// [`QueryHandle::response`], without waking the caller in between, when a scheduler
    /// accepts the query. It fails as they would (every scheduler refused, none reached
    /// within `enqueue_wait`, the deadline). Dropping the future cancels the query.
    pub async fn query(&self, request: QueryRequest) -> Result<QueryResponse, QueryError> {
        self.enqueue(request, None).response().await
    }

    /// Records a new query and sends it to a scheduler; `placed` hears when one accepts
    /// it (without it, a failure before that goes to the response).
    fn enqueue(
        &self,
        mut request: QueryRequest,
        placed: Option<oneshot::Sender<Result<(), QueryError>>>,
    ) -> QueryHandle {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Continue the caller's trace (or start one), with this frontend as the parent of
        // the scheduler's and querier's hops.
        let trace = TraceParent::of(&request.metadata).map_or_else(TraceParent::root, |t| t.child());
        trace.set(&mut request.metadata);
        let span =
            tracing::debug_span!("query", query = id, tenant = %request.tenant, trace_id = tracing::field::Empty);
        if !span.is_disabled() {
            span.record("trace_id", trace.trace_id_hex());
        }
        span.in_scope(|| debug!("submitted"));
        let (done, rx) = oneshot::channel();
        let max_frame_len = self.shared.config.client.max_frame_len;
        let len_bound = outgoing::len_bound(&request);
        let refused = outgoing::fits(&request, len_bound, max_frame_len)
            .err()
            .map(|len| QueryError::Invalid(outgoing::too_large(len, max_frame_len, "this frontend's")));
        // Armed (a dropped handle cancels the query) unless refused: nothing to cancel then.
        let handle = QueryHandle {
            id,
            shared: self.shared.clone(),
            rx: Some(rx),
            armed: refused.is_none(),
            span,
            trace,
        };
        if let Some(error) = refused {
            // Refused before it is recorded: it ends here, at once, and alone.
            handle.span.in_scope(|| debug!(%error, "refused"));
            if let Some(placed) = placed {
                let _ = placed.send(Err(error.clone()));
            }
            let _ = done.send(Err(error));
            return handle;
        }
        let timeout = request.timeout.unwrap_or(self.shared.config.default_timeout);
        let now = Instant::now();
        let deadline = now.checked_add(timeout);
        let capability: Capability = rand::random();
        let event = Event::Submit {
            id,
            tenant: request.tenant.clone(),
            capability,
            deadline,
            retriable: request.retriable,
        };
        let entry = Entry {
            request: Arc::new(request),
            len_bound,
            capability,
            placed,
            done: Some(done),
            abort: None,
        };
        // The handle is armed before anything is sent.
        self.shared.event_with(event, Some((id, entry)), Now::at(now));
        handle
    }

    /// The address queriers send results to.
    pub fn result_address(&self) -> &FrontendAddress {
        &self.shared.address
    }

    /// Queries submitted and not finished.
    pub fn outstanding(&self) -> usize {
        self.shared.inner.lock().unwrap().table.len()
    }

    /// Schedulers connected and accepting work.
    pub fn connected_schedulers(&self) -> usize {
        *self.shared.available.borrow()
    }

    /// The QUIC addresses of the schedulers connected and accepting work, sorted.
    pub fn scheduler_addresses(&self) -> Vec<SocketAddr> {
        let accepting: Vec<SchedulerIx> = self.shared.inner.lock().unwrap().table.accepting().collect();
        let links = self.shared.links();
        let mut addrs: Vec<SocketAddr> = accepting.into_iter().map(|s| links[s].addr).collect();
        addrs.sort();
        addrs
    }

    /// A receiver that sees the number of schedulers accepting work change.
    pub fn watch_schedulers(&self) -> watch::Receiver<usize> {
        self.shared.available.subscribe()
    }

    /// Counters of refused results, re-placed and redelivered queries.
    pub fn stats(&self) -> FrontendStats {
        let c = self.shared.inner.lock().unwrap().table.counters();
        FrontendStats {
            duplicate_results: c.duplicate_results,
            unknown_results: c.unknown_results,
            forged_results: c.forged_results,
            requeued: c.requeued,
            redelivered: c.redelivered,
        }
    }

    /// The QUIC figures of this frontend's connections to peers of `role`
    /// ([`Role::Scheduler`] for the enqueue loops, [`Role::Querier`] for the results),
    /// closed ones included.
    pub fn quic_stats(&self, role: Role) -> QuicTotals {
        self.shared.quic.totals(role)
    }

    /// Stops every connection and the result endpoint; outstanding queries fail as
    /// cancelled (and are cancelled at their schedulers, whose connections close). Waits
    /// up to a second for the peers to be told.
    pub async fn close(&self) {
        self.shared.event(Event::Close);
        self.shared.stop.cancel();
        self.background.follower.abort();
        self.background.discovery.leave().await;
        self.shared
            .result_endpoint
            .close(close_code::DONE.into(), b"frontend closing");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.result_endpoint.wait_idle()).await;
    }
}

/// Fires [`Event::Tick`] at the table's next deadline or placement wait.
async fn timer_loop(shared: Arc<Shared>) {
    loop {
        let next = shared.inner.lock().unwrap().table.next_timer();
        let sleep = match next {
            Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)),
            None => tokio::time::sleep(Duration::from_secs(3600)),
        };
        tokio::select! {
            _ = sleep => shared.event(Event::Tick),
            _ = shared.timer.notified() => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}
