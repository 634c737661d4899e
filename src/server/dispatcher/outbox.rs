//! The dispatcher's way out: a bounded channel per connection, drained by that
//! connection's writer task. The dispatcher never waits on it: a full outbox means the
//! peer stopped reading, and its connection is cut.

use sluice_protocol::{SchedulerToFrontend, SchedulerToQuerier};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Messages waiting for one connection's writer: bounded, so that a peer that stops
/// reading is cut off (its connection closed) instead of growing the scheduler's memory.
#[derive(Debug)]
pub(crate) struct Outbox<T> {
    tx: mpsc::Sender<T>,
    cut: Cut,
}

/// Why a connection must be closed, as its stream task watches for it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cut {
    /// The peer stopped reading: its outbox is full.
    pub(crate) overflow: CancellationToken,
    /// The peer broke the protocol's turn-taking (a querier's second `Ready` while waiting).
    pub(crate) violation: CancellationToken,
}

/// Messages an outbox holds before its peer counts as not reading.
pub(crate) const OUTBOX_CAPACITY: usize = 16 * 1024;

impl<T> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        Outbox {
            tx: self.tx.clone(),
            cut: self.cut.clone(),
        }
    }
}

impl<T> Outbox<T> {
    /// An outbox, the receiver its writer drains, and the tokens that cut the connection.
    pub(crate) fn new(capacity: usize) -> (Self, mpsc::Receiver<T>, Cut) {
        let (tx, rx) = mpsc::channel(capacity);
        let cut = Cut::default();
        (Outbox { tx, cut: cut.clone() }, rx, cut)
    }

    /// Has the peer's connection closed for breaking the protocol.
    pub(crate) fn protocol_violation(&self) {
        self.cut.violation.cancel();
    }

    /// Queues `msg`; false if the connection is gone or has stopped reading (it is then
    /// cut off).
    pub(crate) fn send(&self, msg: T) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.cut.overflow.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Outbound messages to one frontend connection.
pub(crate) type FrontendTx = Outbox<SchedulerToFrontend>;

/// Outbound messages to one querier connection's dequeue stream (all its workers).
pub(crate) type WorkerTx = Outbox<SchedulerToQuerier>;
