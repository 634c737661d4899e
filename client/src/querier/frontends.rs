//! Connections to frontends' result endpoints: one cached QUIC connection per advertised
//! address, dialled under that address's own lock, so one unreachable frontend stalls only
//! its own results. Used by both ways a result travels: a stream of its own (`deliver`) and
//! the shared results stream (`batch`).

use std::sync::Arc;

use sluice_protocol::{FrontendAddress, Role};
use tokio::sync::Mutex;

use crate::FastMap;
use crate::quic_stats::QuicStats;

/// Frontend addresses kept before closed connections are swept from the cache.
const SWEEP_ABOVE: usize = 64;

/// Connections to frontends' result endpoints, by advertised address.
#[derive(Default)]
pub(super) struct Connections {
    slots: std::sync::Mutex<FastMap<String, Arc<FrontendSlot>>>,
}

/// One frontend address's connection (dialled under this lock: an unreachable frontend
/// stalls only its own results).
#[derive(Default)]
pub(super) struct FrontendSlot {
    conn: Mutex<Option<quinn::Connection>>,
}

impl Connections {
    pub(super) fn slot(&self, address: &str) -> Arc<FrontendSlot> {
        let mut slots = self.slots.lock().unwrap();
        if let Some(slot) = slots.get(address) {
            return slot.clone();
        }
        if slots.len() >= SWEEP_ABOVE {
            slots.retain(|_, slot| {
                slot.conn
                    .try_lock()
                    .map_or(true, |c| c.as_ref().is_some_and(|c| c.close_reason().is_none()))
            });
        }
        slots.entry(address.to_string()).or_default().clone()
    }
}

/// The slot's connection, dialled if it has none (or a closed one).
pub(super) async fn connect(
    endpoint: &quinn::Endpoint,
    slot: &FrontendSlot,
    to: &FrontendAddress,
    quic: &QuicStats,
) -> Result<quinn::Connection, String> {
    let mut slot = slot.conn.lock().await;
    if let Some(c) = slot.as_ref()
        && c.close_reason().is_none()
    {
        return Ok(c.clone());
    }
    let addr = tokio::net::lookup_host(&to.address)
        .await
        .map_err(|e| format!("{}: {e}", to.address))?
        .next()
        .ok_or_else(|| format!("{}: no address", to.address))?;
    let conn = endpoint
        .connect(addr, &to.server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    crate::tls::expect_peer_role(&conn, Role::Frontend)?;
    quic.track(Role::Frontend, &conn);
    *slot = Some(conn.clone());
    Ok(conn)
}
