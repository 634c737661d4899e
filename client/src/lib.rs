//! Sluice client library: the frontend client and the querier worker library.
//!
//! - [`Frontend`]: enqueue sub-queries on one or more schedulers and receive their results,
//!   streamed, on a QUIC result endpoint of its own.
//! - [`Querier`]: run worker loops against every scheduler, execute what they are handed
//!   with your [`Handler`], and send results straight to the frontend that asked.
//! - [`gossip`]: SWIM membership of schedulers; either client can follow the live schedulers
//!   through it (`gossip` in its config) instead of a static list.

#![warn(missing_docs)]

mod backoff;
mod discovery;
mod error;
mod frontend;
pub mod gossip;
mod lifecycle;
mod querier;
pub mod tls;
pub mod trace;

pub use error::{ClientError, QueryError};
pub use frontend::{
    Body, CancelOutcome, Frontend, FrontendConfig, FrontendStats, Placement, QueryHandle, QueryRequest, QueryResponse,
    Readiness, Stage,
};
pub use querier::{
    BodyClosed, BodySender, BodyStream, BoxedResponse, DynHandler, Handler, HandlerError, HandlerFn, Querier,
    QuerierConfig, Request, Response, ResponseBody, SchedulerWorkers, handler_fn,
};
pub use sluice_protocol::{FrontendAddress, Metadata, QueryId, Role};
