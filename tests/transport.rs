//! The QUIC transport settings every Sluice endpoint shares, as they behave on a connection.

mod common;

use std::sync::Arc;

use common::wait;
use sluice::tls;
use tokio::sync::mpsc;

/// Sends `messages` packets from a server to a client in lock step (each written only after the
/// client read the one before, so each arrives alone) and returns how many ACK frames the
/// client sent. Only the server's transport differs between runs: it is the side that asks.
async fn acks_sent_by_the_client(server_transport: quinn::TransportConfig, messages: usize) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let (set, _) = tls::ensure_dev_set(dir.path()).unwrap();
    let mut server_config = tls::quic_server(&set.scheduler).unwrap();
    server_config.transport_config(Arc::new(server_transport));
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(tls::quic_client(&set.frontend).unwrap());
    let connecting = client.connect(server.local_addr().unwrap(), "localhost").unwrap();

    let (read_tx, mut read_rx) = mpsc::channel::<()>(1);
    let sender = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let mut stream = conn.open_uni().await.unwrap();
        let message = [7u8; 1000];
        for _ in 0..messages {
            stream.write_all(&message).await.unwrap();
            read_rx.recv().await.unwrap();
        }
        stream.finish().unwrap();
        conn.closed().await;
    });
    let conn = wait("the handshake", connecting).await.unwrap();
    let mut stream = wait("the stream", conn.accept_uni()).await.unwrap();
    let mut message = [0u8; 1000];
    for _ in 0..messages {
        wait("a message", stream.read_exact(&mut message)).await.unwrap();
        read_tx.send(()).await.unwrap();
    }
    let acks = conn.stats().frame_tx.acks;
    conn.close(0u32.into(), b"done");
    wait("the sender", sender).await.unwrap();
    acks
}

#[tokio::test]
async fn peers_are_asked_to_acknowledge_every_tenth_packet_not_every_second() {
    let messages = 300;
    let default = acks_sent_by_the_client(quinn::TransportConfig::default(), messages).await;
    let mut fewer = quinn::TransportConfig::default();
    sluice_client::transport::fewer_acks(&mut fewer);
    let asked = acks_sent_by_the_client(fewer, messages).await;
    // By default every second packet is acknowledged at once (~150 here). Asked for every
    // tenth, the client sends ~30, plus one for each 5 ms in which fewer than ten arrived.
    eprintln!("acknowledgements: default {default}, asked for fewer {asked}");
    assert!(default >= messages as u64 / 3, "default acknowledgements: {default}");
    assert!(asked * 2 < default, "asked for fewer: {asked}, default: {default}");
}

/// What the kernel lets a socket buffer reach, as it reports it: twice `net.core.rmem_max` (or
/// `wmem_max`) on Linux.
fn kernel_buffer_cap(setting: &str) -> usize {
    std::fs::read_to_string(format!("/proc/sys/net/core/{setting}"))
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(usize::MAX, |max| 2 * max)
}

/// Sends `bytes` on one stream from a server to a client, both on Sluice's endpoints and
/// transport settings, as fast as the client reads; the client dials `via` (a relay) or the
/// server itself. Returns the sender's connection figures.
async fn bulk_transfer(bytes: usize, via: Option<Relay>) -> quinn::ConnectionStats {
    use sluice_client::transport;
    let dir = tempfile::tempdir().unwrap();
    let (set, _) = tls::ensure_dev_set(dir.path()).unwrap();
    let tuned = || {
        let mut t = quinn::TransportConfig::default();
        transport::tune(&mut t);
        Arc::new(t)
    };
    let mut server_config = tls::quic_server(&set.scheduler).unwrap();
    server_config.transport_config(tuned());
    let server = transport::endpoint("127.0.0.1:0".parse().unwrap(), Some(server_config)).unwrap();
    let mut client = transport::endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let mut client_config = tls::quic_client(&set.frontend).unwrap();
    client_config.transport_config(tuned());
    client.set_default_client_config(client_config);
    let server_addr = server.local_addr().unwrap();
    let dial = match via {
        Some(relay) => relay.start(server_addr).await,
        None => server_addr,
    };
    let connecting = client.connect(dial, "localhost").unwrap();

    let sender = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let mut stream = conn.open_uni().await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..bytes / chunk.len() {
            stream.write_all(&chunk).await.unwrap();
        }
        stream.finish().unwrap();
        conn.closed().await;
        conn.stats()
    });
    let conn = wait("the handshake", connecting).await.unwrap();
    let mut stream = wait("the stream", conn.accept_uni()).await.unwrap();
    let received = wait("the whole stream", stream.read_to_end(bytes)).await.unwrap();
    assert_eq!(received.len(), bytes);
    conn.close(0u32.into(), b"done");
    let sent = wait("the sender", sender).await.unwrap();
    eprintln!("sender: {:?}, {:?}", sent.path, sent.udp_tx);
    sent
}

/// A UDP relay between one client and one server that drops every datagram above `max`
/// bytes, as a path with a smaller MTU and no ICMP would; counts what it dropped.
struct Relay {
    max: usize,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    /// Starts relaying to `server`; returns the address clients dial.
    async fn start(self, server: std::net::SocketAddr) -> std::net::SocketAddr {
        use std::sync::atomic::Ordering;
        use tokio::net::UdpSocket;
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(server).await.unwrap();
        let addr = front.local_addr().unwrap();
        let (client_tx, mut client_rx) = tokio::sync::watch::channel(None);
        let (f, b, max, dropped) = (front.clone(), back.clone(), self.max, self.dropped.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                client_tx.send_replace(Some(from));
                if n > max {
                    dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    let _ = b.send(&buf[..n]).await;
                }
            }
        });
        let dropped = self.dropped;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back.recv(&mut buf).await {
                let Some(client) = *client_rx.borrow_and_update() else {
                    continue;
                };
                if n > max {
                    dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    let _ = front.send_to(&buf[..n], client).await;
                }
            }
        });
        addr
    }
}

#[tokio::test]
async fn a_bulk_stream_crosses_loopback_in_large_datagrams_without_a_packet_lost() {
    use sluice_client::transport::{self, MAX_UDP_PAYLOAD, SOCKET_BUFFER_REPORTED};
    const BYTES: usize = 16 << 20;
    let sent = bulk_transfer(BYTES, None).await;

    // MTU discovery went past Ethernet's 1 452 bytes, as far as the ceiling, and the data
    // went in datagrams of about that size: a sixth of the datagrams 1 452 bytes would take.
    assert!(
        sent.path.current_mtu > 1452 && sent.path.current_mtu <= MAX_UDP_PAYLOAD,
        "MTU {}",
        sent.path.current_mtu
    );
    assert!(sent.udp_tx.datagrams < (BYTES / 1452 / 3) as u64, "{:?}", sent.udp_tx);
    // A full send call of them fits what the kernel takes (at 8 952 bytes quinn-udp dropped
    // every full call), and the socket buffers hold what the windows let through (at the
    // kernel's default, ~40 packets were lost): nothing was lost, so no window was cut. A
    // kernel that caps the buffers below the ask (net.core.rmem_max) may drop bursts.
    let (_, granted) = transport::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
    if granted.receive >= SOCKET_BUFFER_REPORTED {
        assert_eq!(sent.path.lost_packets, 0, "{:?}", sent.path);
        assert_eq!(sent.path.congestion_events, 0, "{:?}", sent.path);
    } else {
        assert_eq!(sent.path.black_holes_detected, 0, "{:?}", sent.path);
        eprintln!("socket buffers capped at {granted:?}: losses not checked");
    }
}

#[tokio::test]
async fn a_path_that_drops_large_datagrams_without_a_word_settles_below_them() {
    use std::sync::atomic::Ordering;
    // An Ethernet path (1 500-byte MTU) that says nothing when a datagram is too large.
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let relay = Relay {
        max: 1452,
        dropped: dropped.clone(),
    };
    let sent = bulk_transfer(4 << 20, Some(relay)).await;
    // Every byte arrived (in `bulk_transfer`). Discovery probed above the path's limit, the
    // probes were lost, and the connection kept to what the path carries. (The relay, on
    // plain sockets with the kernel's default buffers, may drop bursts too: those are sent
    // again like any loss.)
    eprintln!("relay dropped {}", dropped.load(Ordering::Relaxed));
    assert!(
        dropped.load(Ordering::Relaxed) > 0,
        "no datagram above 1 452 bytes was tried"
    );
    assert!(sent.path.lost_plpmtud_probes > 0, "{:?}", sent.path);
    assert!(sent.path.current_mtu <= 1452, "MTU {}", sent.path.current_mtu);
}

#[test]
fn endpoint_sockets_get_the_buffers_asked_for_as_far_as_the_kernel_allows() {
    use sluice_client::transport::{SOCKET_BUFFER_REPORTED, bind_udp};
    let (_socket, granted) = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
    // Without asking, Linux gives 208 KiB (reported as 416 KiB) at most by default.
    assert_eq!(
        granted.receive,
        SOCKET_BUFFER_REPORTED.min(kernel_buffer_cap("rmem_max"))
    );
    assert_eq!(granted.send, SOCKET_BUFFER_REPORTED.min(kernel_buffer_cap("wmem_max")));
}

#[tokio::test]
async fn the_scheduler_reports_the_socket_buffers_its_endpoint_was_granted() {
    use sluice_client::transport::SOCKET_BUFFER_REPORTED;
    let t = common::start(|_| {}).await;
    let (status, metrics) = common::get(t.server.admin_addr(), "/metrics").await;
    assert_eq!(status, 200);
    for (direction, setting) in [("receive", "rmem_max"), ("send", "wmem_max")] {
        let series = format!("sluice_query_scheduler_udp_socket_buffer_bytes{{direction=\"{direction}\"}}");
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"));
        assert_eq!(
            value as usize,
            SOCKET_BUFFER_REPORTED.min(kernel_buffer_cap(setting)),
            "{direction}"
        );
    }
}
