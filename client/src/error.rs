//! Errors the client crate returns: one for setting up, one per query.

use thiserror::Error;

use crate::tls::TlsError;

/// Why a frontend client or querier could not start.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Certificates or keys could not be loaded, or TLS refused them.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A local UDP socket could not be bound.
    #[error("cannot bind {addr}: {error}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The configuration lists no scheduler.
    #[error("no scheduler address given")]
    NoSchedulers,
    /// A setting is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The frontend's readiness was not reached in time.
    #[error("not ready ({readiness:?}): {connected} scheduler(s) connected and accepting work of {known} known")]
    NotReady {
        /// What was waited for.
        readiness: crate::Readiness,
        /// Schedulers connected and accepting work at the end of the wait.
        connected: usize,
        /// Schedulers discovery wanted used.
        known: usize,
    },
}

/// How a query ended without a result. [`is_retryable`](Self::is_retryable) says whether
/// the same request may succeed if submitted again.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QueryError {
    /// Every scheduler tried already holds the tenant's maximum of queued queries.
    #[error("the tenant has too many queries queued (limit {limit})")]
    TooManyOutstanding {
        /// The scheduler's per-tenant limit.
        limit: u32,
    },
    /// Every scheduler tried is full.
    #[error("every scheduler's queue is full")]
    QueueFull,
    /// Every scheduler tried expects the query to wait past its deadline (the last one's
    /// estimate is given): refused at once instead of failing at the deadline.
    #[error("the query would wait about {estimated_wait:?} for a querier, past its deadline")]
    WouldMissDeadline {
        /// The last scheduler's estimate of the wait.
        estimated_wait: std::time::Duration,
    },
    /// The request breaks a limit (the scheduler's, or the frame limit: refused by the
    /// frontend before sending); retrying will not help.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No scheduler is connected and accepting work.
    #[error("no scheduler is available (all shutting down or unreachable)")]
    NoScheduler,
    /// The querier running the query went away.
    #[error("the querier failed: {0}")]
    QuerierFailed(String),
    /// A retriable query's querier died on every attempt it was allowed.
    #[error("the querier failed on all {attempts} attempts; last: {last}")]
    RetriesExhausted {
        /// Runs started.
        attempts: u32,
        /// Why the last one failed.
        last: String,
    },
    /// The query's deadline passed (queued, running, or while its result streamed).
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The querier's handler returned an error (or panicked).
    #[error("the query failed: {0}")]
    Failed(String),
    /// The query was cancelled (by the scheduler, or the client is shutting down).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl QueryError {
    /// Whether submitting the same request again (later, or once a scheduler or querier is
    /// back) may succeed: load refusals, no scheduler, a querier that died. A request that is
    /// invalid, failed in its handler, ran out of time or retries, or was cancelled, will not.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            QueryError::TooManyOutstanding { .. }
                | QueryError::QueueFull
                | QueryError::WouldMissDeadline { .. }
                | QueryError::NoScheduler
                | QueryError::QuerierFailed(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_and_availability_are_retryable_the_rest_is_not() {
        let retryable = [
            QueryError::TooManyOutstanding { limit: 1 },
            QueryError::QueueFull,
            QueryError::WouldMissDeadline {
                estimated_wait: std::time::Duration::from_secs(1),
            },
            QueryError::NoScheduler,
            QueryError::QuerierFailed("gone".into()),
        ];
        let final_ = [
            QueryError::Invalid("x".into()),
            QueryError::Failed("x".into()),
            QueryError::DeadlineExceeded("x".into()),
            QueryError::RetriesExhausted {
                attempts: 2,
                last: "x".into(),
            },
            QueryError::Cancelled("x".into()),
            QueryError::Protocol("x".into()),
        ];
        assert!(retryable.iter().all(QueryError::is_retryable));
        assert!(!final_.iter().any(QueryError::is_retryable));
    }
}
