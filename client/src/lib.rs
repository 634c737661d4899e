//! Sluice client library: the frontend client and the querier worker library.
//!
//! - [`Frontend`]: enqueue sub-queries on one or more schedulers and receive their results,
//!   streamed, on a QUIC result endpoint of its own.
//! - [`Querier`]: run worker loops against every scheduler, execute what they are handed
//!   with your [`Handler`], and send results straight to the frontend that asked.
//! - [`gossip`]: SWIM membership of schedulers; either client can follow the live schedulers
//!   through it ([`SchedulerSource::Gossip`] in its [`ClientConfig`]) instead of a static list.
//!
//! # A query's life, as a caller sees it
//!
//! [`Frontend::connect`] returns once its [`Readiness`] holds (by default one scheduler
//! connected), or fails with [`ClientError::NotReady`]. [`Frontend::submit`] returns a
//! [`QueryHandle`] once a scheduler accepted the [`QueryRequest`] (built with its `with_`
//! methods); [`QueryHandle::placement`] says where it is, [`QueryHandle::response`] waits for
//! the [`QueryResponse`] whose [`Body`] streams in (also as a `futures` `Stream`), and
//! [`QueryHandle::cancel`] (or dropping the handle) cancels it. [`Frontend::query`] does both
//! steps in one call (dropping its future cancels). Every query ends exactly once,
//! by its deadline at the latest: with its result or a typed [`QueryError`], whose
//! [`is_retryable`](QueryError::is_retryable) says whether submitting it again may help.
//!
//! On the querier side, a [`Handler`] (or [`handler_fn`]) gets each [`Request`] with its
//! tenant, path, deadline, the scheduler that dispatched it and a [`CancellationToken`]
//! that fires on a cancel or at the deadline; it answers with a [`Response`], whole or
//! streamed through a [`BodySender`].
//!
//! Each query carries a W3C `traceparent` in its metadata ([`trace`]): the caller's,
//! continued, or one the frontend starts; the querier runs the handler in a `query` span
//! with its trace id.
//!
//! # Runtime
//!
//! Both clients run their tasks on the tokio runtime they are started from. A process that
//! does little besides (a frontend that only splits, a querier with light handlers) can use
//! a one-thread runtime: a frontend and eight queriers in one process then spent 9% less CPU
//! per query (no task moves between threads) and peaked 7% lower, its one thread being the
//! limit (the repository's docs/benchmarks.md, "One runtime thread for the bench process").
//! Handlers that compute want a thread per core.

#![warn(missing_docs)]

mod backoff;
mod config;
mod discovery;
mod error;
mod frontend;
pub mod gossip;
mod lifecycle;
mod querier;
pub mod quic_stats;
pub mod tls;
pub mod trace;
pub mod transport;

pub use config::{ClientConfig, SchedulerSource};
pub use error::{ClientError, QueryError};
pub use frontend::{
    Body, CancelOutcome, Frontend, FrontendConfig, FrontendStats, Placement, QueryHandle, QueryRequest, QueryResponse,
    Readiness, Stage,
};
pub use querier::{
    BodyClosed, BodySender, BodyStream, BoxedResponse, DynHandler, Handler, HandlerError, HandlerFn, Querier,
    QuerierConfig, Request, Response, ResponseBody, SchedulerWorkers, handler_fn,
};
pub use quic_stats::QuicTotals;
pub use sluice_protocol::{FrontendAddress, Metadata, QueryId, Role};
/// The token in [`Request::cancelled`] (from `tokio-util`).
pub use tokio_util::sync::CancellationToken;

/// The hash map of the per-query paths (queries by id, result batches, frontends): foldhash,
/// seeded per map, as the scheduler's.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
