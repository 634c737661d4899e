//! The frontend's public types: its configuration and readiness, a query's request,
//! response and streamed body, where a query is, and the frontend's counters.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sluice_protocol::Metadata;
use tokio::sync::mpsc;

use crate::config::{ClientConfig, SchedulerSource};
use crate::error::QueryError;
use crate::gossip::GossipConfig;
use crate::tls::Identity;

/// Settings of a [`Frontend`](super::Frontend).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FrontendConfig {
    /// Its id (unique among frontends), certificate (role `frontend`), schedulers, and how
    /// it talks to them (a silent scheduler's queued queries go elsewhere).
    pub client: ClientConfig,
    /// Where the result endpoint listens.
    pub result_listen: SocketAddr,
    /// `host:port` queriers dial for results; defaults to the bound address.
    pub result_advertise: Option<String>,
    /// TLS name queriers check this frontend's certificate against.
    pub result_server_name: String,
    /// How long a query may wait for a scheduler to take it (at `submit`, and again after
    /// its scheduler handed it back or was lost), within its deadline; also how long
    /// [`Frontend::connect`](super::Frontend::connect) waits for `readiness`.
    pub enqueue_wait: Duration,
    /// What [`Frontend::connect`](super::Frontend::connect) waits for before it returns.
    pub readiness: Readiness,
    /// The deadline of a query whose request sets none: no query waits forever, even if
    /// its scheduler and its querier both vanish.
    pub default_timeout: Duration,
    /// How many times a [`QueryRequest::retriable`] query may run when its querier dies
    /// mid-query (at least 1; 1 turns redelivery off).
    pub max_attempts: u32,
    /// When a scheduler is lost right after dispatching a query, how long to wait for the
    /// querier to confirm it (queriers confirm within their `confirm_after`) before taking
    /// the dispatch as lost with the scheduler and placing the query again.
    pub confirm_grace: Duration,
}

impl FrontendConfig {
    /// Follows the schedulers' gossip instead of a static list.
    pub fn with_gossip(mut self, gossip: GossipConfig) -> Self {
        self.client.schedulers = SchedulerSource::Gossip(gossip);
        self
    }

    /// Sets what [`Frontend::connect`](super::Frontend::connect) waits for.
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// Sets the deadline of queries whose request sets none.
    pub fn with_default_timeout(mut self, timeout: Duration) -> Self {
        self.default_timeout = timeout;
        self
    }

    /// Sets where the result endpoint listens and the address queriers are told.
    pub fn with_result_endpoint(mut self, listen: SocketAddr, advertise: Option<String>) -> Self {
        self.result_listen = listen;
        self.result_advertise = advertise;
        self
    }

    /// Defaults for a frontend on this host: [`ClientConfig::new`]'s, result endpoint on
    /// 127.0.0.1 (any port), TLS name `localhost` (as in the development certificates), queries time out
    /// after 2 minutes unless they say otherwise, retriable queries run at most twice.
    pub fn new(id: impl Into<String>, identity: Identity, schedulers: Vec<SocketAddr>) -> Self {
        FrontendConfig {
            client: ClientConfig::new(id, identity, schedulers),
            result_listen: "127.0.0.1:0".parse().expect("valid address"),
            result_advertise: None,
            result_server_name: "localhost".into(),
            enqueue_wait: Duration::from_secs(5),
            readiness: Readiness::AtLeastOne,
            default_timeout: Duration::from_secs(120),
            max_attempts: 2,
            confirm_grace: Duration::from_secs(2),
        }
    }
}

/// What a frontend counts as ready: see [`Frontend::connect`](super::Frontend::connect) and [`Frontend::ready`](super::Frontend::ready).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Readiness {
    /// Nothing: return at once; queries wait (up to `enqueue_wait`) for a scheduler.
    Nothing,
    /// At least one scheduler connected and accepting work.
    #[default]
    AtLeastOne,
    /// Every scheduler known now (the static list, or the gossip's members in use), and at
    /// least one.
    AllKnown,
}

/// One sub-query to run.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
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
    /// Time the query may take from `submit`, wherever it is by then (queued, running,
    /// or streaming its result); `None`: the frontend's `default_timeout`.
    pub timeout: Option<Duration>,
    /// The query may run again if its querier dies mid-query (read-only sub-queries may),
    /// up to the frontend's `max_attempts`.
    pub retriable: bool,
    /// Tracing headers and other key/value pairs passed to the querier.
    pub metadata: Metadata,
    /// The opaque request the querier executes.
    pub payload: Bytes,
}

impl QueryRequest {
    /// A request for `tenant` with `payload` and nothing else set; the `with_` methods set
    /// the rest:
    ///
    /// ```
    /// use std::time::Duration;
    /// use sluice_client::QueryRequest;
    ///
    /// let request = QueryRequest::new("tenant-a", "sum(rate(x[5m]))")
    ///     .with_actors(["dashboard-7"])
    ///     .with_component("store-gateway")
    ///     .with_priority(2)
    ///     .with_cost_hint(40)
    ///     .with_timeout(Duration::from_secs(30))
    ///     .with_metadata("request-id", "r-1234")
    ///     .retriable();
    /// assert_eq!(request.actors, ["dashboard-7"]);
    /// assert!(request.retriable);
    /// ```
    pub fn new(tenant: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        QueryRequest {
            tenant: tenant.into(),
            payload: payload.into(),
            ..QueryRequest::default()
        }
    }

    /// Sets the actor path below the tenant, outermost first.
    pub fn with_actors<S: Into<String>>(mut self, actors: impl IntoIterator<Item = S>) -> Self {
        self.actors = actors.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the backend the query hits.
    pub fn with_component(mut self, component: impl Into<String>) -> Self {
        self.component = Some(component.into());
        self
    }

    /// Sets the priority class (higher first).
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Sets the expected cost, for cost-aware fairness.
    pub fn with_cost_hint(mut self, cost: u32) -> Self {
        self.cost_hint = Some(cost);
        self
    }

    /// Sets the time the query may take from `submit`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Adds a metadata entry (a caller's correlation id, say), passed to the querier.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// Lets the query run again if its querier dies mid-query.
    pub fn retriable(mut self) -> Self {
        self.retriable = true;
        self
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

/// A result body, received chunk by chunk (never all held in memory by the client). A
/// body that failed midway (the querier's producer gave up, the stream broke, or the
/// deadline passed) ends with an error, never as a shorter success.
#[derive(Debug)]
pub struct Body {
    source: Source,
}

/// Where a body's chunks come from.
#[derive(Debug)]
enum Source {
    /// A small result that came in one frame: its one chunk (`None` once taken, or for an
    /// empty body). No channel: most results are this.
    Whole(Option<Bytes>),
    /// A result streamed in as it arrives.
    Streamed {
        rx: mpsc::Receiver<Bytes>,
        /// Set before the sender goes when the body did not end cleanly.
        failure: Arc<Mutex<Option<QueryError>>>,
    },
}

impl Body {
    /// A body that arrived whole.
    pub(super) fn whole(bytes: Bytes) -> Self {
        Body {
            source: Source::Whole((!bytes.is_empty()).then_some(bytes)),
        }
    }

    /// A body streamed through `rx`; `failure` is set before the sender goes when it
    /// did not end cleanly.
    pub(super) fn streamed(rx: mpsc::Receiver<Bytes>, failure: Arc<Mutex<Option<QueryError>>>) -> Self {
        Body {
            source: Source::Streamed { rx, failure },
        }
    }

    /// The next chunk; `None` once the body is complete. After an error, `None`.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, QueryError>> {
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// The next chunk, polled: what [`chunk`](Self::chunk) returns, for the
    /// [`Stream`](futures_core::Stream) implementation.
    fn poll_chunk(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<Bytes, QueryError>>> {
        match &mut self.source {
            Source::Whole(chunk) => std::task::Poll::Ready(chunk.take().map(Ok)),
            Source::Streamed { rx, failure } => match rx.poll_recv(cx) {
                std::task::Poll::Ready(Some(bytes)) => std::task::Poll::Ready(Some(Ok(bytes))),
                std::task::Poll::Ready(None) => std::task::Poll::Ready(failure.lock().unwrap().take().map(Err)),
                std::task::Poll::Pending => std::task::Poll::Pending,
            },
        }
    }

    /// The whole body in one buffer.
    pub async fn collect(self) -> Result<Vec<u8>, QueryError> {
        // A buffer this body holds alone becomes the `Vec` without a new allocation.
        self.collect_bytes().await.map(Vec::from)
    }

    /// The whole body as [`Bytes`]: a body that came in one chunk (nearly every small
    /// result) is that chunk as it was received, neither copied nor allocated again; a
    /// longer one is joined into one buffer, as [`collect`](Self::collect) does.
    pub async fn collect_bytes(mut self) -> Result<Bytes, QueryError> {
        let Some(first) = self.chunk().await.transpose()? else {
            return Ok(Bytes::new());
        };
        let Some(second) = self.chunk().await.transpose()? else {
            return Ok(first);
        };
        let mut out = bytes::BytesMut::with_capacity(first.len() + second.len());
        out.extend_from_slice(&first);
        out.extend_from_slice(&second);
        while let Some(chunk) = self.chunk().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out.freeze())
    }
}

/// Where a query is now, as its frontend knows it ([`QueryHandle::placement`](super::QueryHandle::placement)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Placement {
    /// What the query waits for.
    pub stage: Stage,
    /// The scheduler that holds it or dispatched it; `None` while it waits for one, and
    /// once its result streams in.
    pub scheduler: Option<SocketAddr>,
    /// Which run this is: 1, more after its querier died and it was redelivered.
    pub attempt: u32,
    /// How long the scheduler that accepted it expected it to wait before dispatch, when
    /// it could tell (its backend's queue had been backlogged long enough to measure).
    pub estimated_wait: Option<std::time::Duration>,
}

/// The stages of [`Placement`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// No scheduler accepts work now; it waits (up to `enqueue_wait`) for one.
    WaitingForScheduler,
    /// Sent to a scheduler, not yet accepted.
    Placing,
    /// Queued at a scheduler.
    Queued,
    /// Handed to a querier worker.
    Dispatched,
    /// Its querier confirmed that it runs.
    Started,
    /// Its result is streaming in.
    Receiving,
}

/// The body as a stream of chunks (`futures::StreamExt` and friends work on it): the same
/// items as [`Body::chunk`], ending after the error if the body broke.
impl futures_core::Stream for Body {
    type Item = Result<Bytes, QueryError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.poll_chunk(cx)
    }
}

/// Counters of what the frontend decided about its queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontendStats {
    /// Results for a query that already had one (ignored).
    pub duplicate_results: u64,
    /// Results for queries this frontend does not have outstanding.
    pub unknown_results: u64,
    /// Results refused for not carrying their query's capability (from a querier the query
    /// was not dispatched to).
    pub forged_results: u64,
    /// Queries placed again, on another scheduler or the same one restarted, after theirs
    /// handed them back or was lost before dispatching them.
    pub requeued: u64,
    /// Retriable queries run again after their querier died mid-query.
    pub redelivered: u64,
}

/// How [`QueryHandle::cancel`](super::QueryHandle::cancel) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The scheduler holding the query acted on the cancel.
    Acknowledged,
    /// No scheduler held the query (it waited for one, or its result was streaming in):
    /// cancelled here.
    Cancelled,
    /// The query had already ended (answered, failed or cancelled).
    AlreadyEnded,
    /// The scheduler holding it did not answer in time (it is taken as gone).
    Unacknowledged,
}

#[cfg(test)]
mod body_tests {
    use super::*;
    use futures_core::Stream;

    #[tokio::test]
    async fn a_whole_body_gives_its_one_chunk_then_ends() {
        let mut body = Body::whole(Bytes::from_static(b"all of it"));
        assert_eq!(body.chunk().await, Some(Ok(Bytes::from_static(b"all of it"))));
        assert_eq!(body.chunk().await, None);
        assert_eq!(body.chunk().await, None);
        let mut empty = Body::whole(Bytes::new());
        assert_eq!(empty.chunk().await, None);
        assert_eq!(
            Body::whole(Bytes::from_static(b"xy")).collect().await,
            Ok(b"xy".to_vec())
        );
    }

    #[tokio::test]
    async fn collecting_as_bytes_shares_a_lone_chunk_and_joins_several() {
        // One chunk: the very bytes received, not a copy.
        let received = Bytes::from(b"the whole result".to_vec());
        let collected = Body::whole(received.clone()).collect_bytes().await.unwrap();
        assert_eq!(collected, received);
        assert_eq!(
            collected.as_ptr(),
            received.as_ptr(),
            "a lone chunk is shared, not copied"
        );
        assert_eq!(Body::whole(Bytes::new()).collect_bytes().await, Ok(Bytes::new()));

        // Several chunks are joined, in order.
        let (tx, rx) = mpsc::channel(4);
        for part in [&b"a"[..], b"bc", b"def"] {
            tx.send(Bytes::copy_from_slice(part)).await.unwrap();
        }
        drop(tx);
        let body = Body::streamed(rx, Arc::new(Mutex::new(None)));
        assert_eq!(body.collect_bytes().await, Ok(Bytes::from_static(b"abcdef")));

        // A body that broke, after one chunk or after several, is an error, not a shorter body.
        for sent in [1, 3] {
            let (tx, rx) = mpsc::channel(4);
            let failure = Arc::new(Mutex::new(None));
            for _ in 0..sent {
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
            *failure.lock().unwrap() = Some(QueryError::Failed("stream broke".into()));
            drop(tx);
            let body = Body::streamed(rx, failure);
            assert_eq!(
                body.collect_bytes().await,
                Err(QueryError::Failed("stream broke".into())),
                "{sent} chunk(s) before the break"
            );
        }
    }

    #[tokio::test]
    async fn a_body_streams_its_chunks_then_the_error_it_broke_with_then_ends() {
        let (tx, rx) = mpsc::channel(4);
        let failure = Arc::new(Mutex::new(None));
        let mut body = Body::streamed(rx, failure.clone());
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        *failure.lock().unwrap() = Some(QueryError::Failed("disk gone".into()));
        drop(tx);
        let mut items = Vec::new();
        while let Some(item) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_next(cx)).await {
            items.push(item);
        }
        assert_eq!(
            items,
            vec![
                Ok(Bytes::from_static(b"a")),
                Ok(Bytes::from_static(b"b")),
                Err(QueryError::Failed("disk gone".into()))
            ]
        );
    }
}
