//! QUIC transport settings every Sluice endpoint shares: frontends, queriers and schedulers.

use std::time::Duration;

use crate::ClientError;

/// How many ack-eliciting packets a peer may receive before it must acknowledge them.
///
/// QUIC's default acknowledges every second packet. One query's frames cross three connections
/// (frontend–scheduler, scheduler–querier, querier–frontend), and with that default about 30%
/// of the datagrams of a loaded system carried nothing but acknowledgements, each one system
/// call to send and one wake-up to receive. docs/benchmarks.md ("Fewer acknowledgements") has
/// the measurement.
pub const ACK_ELICITING_THRESHOLD: u32 = 10;

/// The longest a peer may hold an acknowledgement back when fewer packets than the threshold
/// arrived: short against the idle timeout and loss detection, long against the gap between
/// two queries' frames on a busy connection.
pub const MAX_ACK_DELAY: Duration = Duration::from_millis(5);

/// Asks this endpoint's peers to acknowledge less often ([`ACK_ELICITING_THRESHOLD`] packets,
/// at most [`MAX_ACK_DELAY`] late), through QUIC's acknowledgement frequency extension.
///
/// Data frames are never delayed by this, only the acknowledgements of them. A packet that
/// arrives out of order is still acknowledged at once (quinn's default reordering threshold),
/// so loss detection stays as prompt as without it. A peer without the extension keeps its own
/// pace.
pub fn fewer_acks(transport: &mut quinn::TransportConfig) -> &mut quinn::TransportConfig {
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into())
        .max_ack_delay(Some(MAX_ACK_DELAY));
    transport.ack_frequency_config(Some(acks))
}

/// A client transport with `idle` as the idle timeout, pings every fifth of it, and
/// [`fewer_acks`].
pub(crate) fn with_idle(idle: Duration) -> Result<quinn::TransportConfig, ClientError> {
    if idle.is_zero() {
        return Err(ClientError::Config("idle timeout must be above zero".into()));
    }
    let timeout = quinn::IdleTimeout::try_from(idle)
        .map_err(|_| ClientError::Config(format!("idle timeout {idle:?} is too large")))?;
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(idle / 5));
    t.max_idle_timeout(Some(timeout));
    fewer_acks(&mut t);
    Ok(t)
}
