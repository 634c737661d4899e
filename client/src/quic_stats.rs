//! What QUIC does on an endpoint's connections, per peer role: connections open, datagrams,
//! bytes and send calls each way, packets lost and congestion events. Shared by the
//! scheduler (its `/metrics`), the [`Frontend`](crate::Frontend) and the
//! [`Querier`](crate::Querier) (their `quic_stats`).
//!
//! A connection is registered once, when it is established; the figures are read from quinn
//! when asked for. A closed connection's last figures join its role's closed totals at the
//! sweep, so every figure only grows. A sweep runs at every reading and after as many
//! registrations as there were open connections at the last one (at least 16), so the
//! closed connections kept are never more than the open ones, or 16.

use std::sync::Mutex;

use sluice_protocol::Role;

use crate::FastMap;

/// One role's connections, summed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuicTotals {
    /// Connections open now.
    pub connections: u64,
    /// UDP datagrams sent.
    pub datagrams_sent: u64,
    /// UDP datagrams received.
    pub datagrams_received: u64,
    /// Bytes in the datagrams sent.
    pub bytes_sent: u64,
    /// Bytes in the datagrams received.
    pub bytes_received: u64,
    /// System calls that sent the datagrams (fewer than the datagrams when several go in
    /// one, with segmentation offload).
    pub send_calls: u64,
    /// Packets QUIC declared lost (and sent again).
    pub lost_packets: u64,
    /// Times a connection's congestion window was cut.
    pub congestion_events: u64,
}

impl QuicTotals {
    fn add(&mut self, s: &quinn::ConnectionStats) {
        self.datagrams_sent += s.udp_tx.datagrams;
        self.datagrams_received += s.udp_rx.datagrams;
        self.bytes_sent += s.udp_tx.bytes;
        self.bytes_received += s.udp_rx.bytes;
        self.send_calls += s.udp_tx.ios;
        self.lost_packets += s.path.lost_packets;
        self.congestion_events += s.path.congestion_events;
    }
}

/// The registered connections of one endpoint (or several), by peer role.
#[derive(Default)]
pub struct QuicStats {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    live: FastMap<usize, (Role, quinn::Connection)>,
    closed: FastMap<Role, QuicTotals>,
    /// Registrations left before closed connections are swept out of `live`.
    until_sweep: usize,
}

impl Inner {
    /// Moves the closed connections' figures to their roles' totals.
    fn sweep(&mut self) {
        let closed = &mut self.closed;
        self.live.retain(|_, (role, conn)| {
            if conn.close_reason().is_none() {
                return true;
            }
            closed.entry(*role).or_default().add(&conn.stats());
            false
        });
        self.until_sweep = self.live.len().max(16);
    }
}

impl std::fmt::Debug for QuicStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicStats").finish_non_exhaustive()
    }
}

impl QuicStats {
    /// Counts `conn`, a connection to or from a peer of `role`, from now on.
    pub fn track(&self, role: Role, conn: &quinn::Connection) {
        let mut inner = self.inner.lock().unwrap();
        if inner.until_sweep == 0 {
            inner.sweep();
        }
        inner.until_sweep -= 1;
        inner.live.insert(conn.stable_id(), (role, conn.clone()));
    }

    /// The figures of `role`'s connections, open and closed.
    pub fn totals(&self, role: Role) -> QuicTotals {
        let mut inner = self.inner.lock().unwrap();
        inner.sweep();
        let mut totals = inner.closed.get(&role).copied().unwrap_or_default();
        for (_, conn) in inner.live.values().filter(|(r, _)| *r == role) {
            totals.add(&conn.stats());
            totals.connections += 1;
        }
        totals
    }
}
