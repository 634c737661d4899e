//! QUIC transport settings every Sluice endpoint shares: frontends, queriers and schedulers.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::warn;

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
    tune(&mut t);
    Ok(t)
}

/// The largest UDP payload a Sluice endpoint sends or accepts, in bytes.
///
/// Connections start at QUIC's 1 200 bytes and MTU discovery raises them to what the path
/// carries, up to this: 1 452 on Ethernet, this on loopback or a jumbo-frame network. Under
/// load the frames of many queries share each datagram and fill it, so the datagrams, and with
/// them the packets quinn seals, acknowledges and tracks, fall with their size: 2.5–3× fewer on
/// loopback than at 1 452 (docs/benchmarks.md, "Larger datagrams").
///
/// Not above 6 550: quinn hands the kernel up to [`DATAGRAMS_PER_SEND_CALL`] datagrams in one
/// segmentation-offload call, the kernel refuses a call above 64 KiB, and quinn-udp drops a
/// refused call without a word. At jumbo-frame sizes a bulk result lost every full batch.
pub const MAX_UDP_PAYLOAD: u16 = 6_500;

/// The most datagrams quinn (0.11) gives the kernel in one send call.
pub const DATAGRAMS_PER_SEND_CALL: usize = 10;

/// One full send call of the largest datagrams, with their IPv4 and UDP headers, fits the
/// 64 KiB the kernel takes.
const _: () = assert!(MAX_UDP_PAYLOAD as usize * DATAGRAMS_PER_SEND_CALL + 28 <= u16::MAX as usize);

/// The kernel buffer each endpoint's UDP socket asks for, each way.
///
/// The default (208 KiB on most Linux hosts) overflows when a burst arrives while the
/// endpoint's task waits for a core: a 64 MiB result lost ~300 packets to it on loopback, each
/// loss a retransmission and a congestion window cut; with this, none. The kernel grants at
/// most `net.core.rmem_max` and `net.core.wmem_max`; below this, the process warns once and
/// runs with what it got (docs/operations.md, "UDP socket buffers and datagram size").
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Applies the settings every Sluice transport shares: [`fewer_acks`] and datagrams up to
/// [`MAX_UDP_PAYLOAD`].
pub fn tune(transport: &mut quinn::TransportConfig) -> &mut quinn::TransportConfig {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    fewer_acks(transport).mtu_discovery_config(Some(mtu))
}

/// The socket buffers the kernel granted, in bytes, each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    /// Receive buffer.
    pub receive: usize,
    /// Send buffer.
    pub send: usize,
}

/// What the kernel reports for a socket buffer of [`SOCKET_BUFFER_BYTES`]: Linux reports twice
/// the size asked for (it counts its own bookkeeping in it).
pub const SOCKET_BUFFER_REPORTED: usize = if cfg!(target_os = "linux") {
    2 * SOCKET_BUFFER_BYTES
} else {
    SOCKET_BUFFER_BYTES
};

/// Binds a UDP socket at `addr` for a QUIC endpoint and asks for [`SOCKET_BUFFER_BYTES`] each
/// way. Returns the socket and what the kernel granted, as it reports it (compare with
/// [`SOCKET_BUFFER_REPORTED`]).
pub fn bind_udp(addr: SocketAddr) -> io::Result<(std::net::UdpSocket, SocketBuffers)> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // A refusal is not fatal: the endpoint works with the default, and the sizes read back
    // below tell.
    let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
    let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
    let granted = SocketBuffers {
        receive: state.recv_buffer_size((&socket).into())?,
        send: state.send_buffer_size((&socket).into())?,
    };
    Ok((socket, granted))
}

/// A quinn endpoint on a socket from [`bind_udp`] that accepts datagrams up to
/// [`MAX_UDP_PAYLOAD`]; a server when `server` is given. Warns, once per process, when the
/// kernel granted less buffer than asked for, naming the setting that caps it.
pub fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> io::Result<quinn::Endpoint> {
    endpoint_and_buffers(addr, server).map(|(endpoint, _)| endpoint)
}

/// [`endpoint`], and the socket buffers the kernel granted it (for a gauge).
pub fn endpoint_and_buffers(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> io::Result<(quinn::Endpoint, SocketBuffers)> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let (socket, granted) = bind_udp(addr)?;
    let short = granted.receive < SOCKET_BUFFER_REPORTED || granted.send < SOCKET_BUFFER_REPORTED;
    if short && !WARNED.swap(true, Ordering::Relaxed) {
        warn!(
            %addr,
            receive = granted.receive,
            send = granted.send,
            wanted = SOCKET_BUFFER_REPORTED,
            "UDP socket buffers are below what was asked for; bursts may be dropped and sent again. \
             Raise net.core.rmem_max and net.core.wmem_max (docs/operations.md, \"UDP socket buffers and datagram size\")"
        );
    }
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|error| io::Error::other(error.to_string()))?;
    let endpoint = quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))?;
    Ok((endpoint, granted))
}
