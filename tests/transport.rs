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
