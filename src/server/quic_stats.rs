//! What QUIC does on the scheduler's connections, per peer role: connections open,
//! datagrams, bytes and send calls each way, packets lost and congestion events. Summed at scrape time over the live
//! connections, plus what the closed ones had, so every figure only grows.

use std::sync::Mutex;

use sluice_protocol::Role;

use crate::queue::FastMap;

/// The roles that connect to a scheduler and their metric labels, in the order of
/// [`QuicStats::totals`].
pub(crate) const ROLES: [(Role, &str); 2] = [(Role::Frontend, "frontend"), (Role::Querier, "querier")];

/// One role's connections, summed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Connections open now.
    pub(crate) connections: u64,
    pub(crate) datagrams_sent: u64,
    pub(crate) datagrams_received: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    /// System calls that sent datagrams (fewer than the datagrams when several go in one).
    pub(crate) send_calls: u64,
    pub(crate) lost_packets: u64,
    pub(crate) congestion_events: u64,
}

impl Totals {
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

/// The live connections (as many as the server's connection limit allows) and the totals
/// of the closed ones, per role.
#[derive(Default)]
pub(crate) struct QuicStats {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    live: FastMap<usize, (usize, quinn::Connection)>,
    closed: [Totals; ROLES.len()],
}

fn index(role: Role) -> Option<usize> {
    ROLES.iter().position(|&(r, _)| r == role)
}

impl QuicStats {
    /// Counts `conn` of a peer of `role` until the returned guard drops; then its figures
    /// at that moment join the closed connections'. A role that never connects to a
    /// scheduler is not counted.
    pub(crate) fn track<'a>(&'a self, role: Role, conn: &quinn::Connection) -> Option<Tracked<'a>> {
        let role = index(role)?;
        let id = conn.stable_id();
        self.inner.lock().unwrap().live.insert(id, (role, conn.clone()));
        Some(Tracked { stats: self, id })
    }

    /// Per role of [`ROLES`], live and closed connections together.
    pub(crate) fn totals(&self) -> [Totals; ROLES.len()] {
        let inner = self.inner.lock().unwrap();
        let mut totals = inner.closed;
        for (role, conn) in inner.live.values() {
            totals[*role].add(&conn.stats());
            totals[*role].connections += 1;
        }
        totals
    }
}

/// A connection being counted (see [`QuicStats::track`]).
pub(crate) struct Tracked<'a> {
    stats: &'a QuicStats,
    id: usize,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        let mut inner = self.stats.inner.lock().unwrap();
        if let Some((role, conn)) = inner.live.remove(&self.id) {
            inner.closed[role].add(&conn.stats());
        }
    }
}
