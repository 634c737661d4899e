//! A peer can harm only itself: each finding of the probing that led to the budgets, tried
//! again through a real scheduler (in this process, or a `sluice serve` process where the
//! finding was about the process: its file descriptors, its memory, its log). Loopback
//! only; every child is killed.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use common::*;
use sluice_protocol::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Reads a whole TCP socket to its end, bounded by `within`; the bytes read.
async fn read_to_close(socket: &mut tokio::net::TcpStream, within: Duration) -> Option<usize> {
    let mut sink = Vec::new();
    tokio::time::timeout(within, socket.read_to_end(&mut sink))
        .await
        .ok()
        .map(|_| sink.len())
}

/// Peak resident memory of process `pid`, from its own accounting (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// CPU seconds process `pid` has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// A `sluice serve` process started under `sh -c 'ulimit -n FDS; exec …'`, with its log
/// lines counted as they come.
struct Limited {
    child: tokio::process::Child,
    quic: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    log_lines: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _dir: tempfile::TempDir,
}

async fn spawn_limited(fds: u32) -> Limited {
    let dir = tempfile::tempdir().unwrap();
    let script = format!("ulimit -n {fds} && exec \"$0\" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0");
    let mut command = tokio::process::Command::new("sh");
    command
        .args(["-c", &script, env!("CARGO_BIN_EXE_sluice")])
        .current_dir(dir.path())
        .stderr(Stdio::piped());
    let (mut child, printed) = spawn_serve(command).await;
    let (quic, admin) = (printed.quic, printed.admin);
    let log_lines = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut errs = BufReader::new(child.stderr.take().unwrap()).lines();
    let counter = log_lines.clone();
    tokio::spawn(async move {
        while let Ok(Some(_)) = errs.next_line().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    Limited {
        child,
        quic,
        admin,
        log_lines,
        _dir: dir,
    }
}

#[tokio::test]
async fn running_out_of_file_descriptors_costs_neither_a_core_nor_the_log_and_is_survived() {
    let s = spawn_limited(100).await;
    let pid = s.child.id().unwrap();
    // More idle connections than the process has descriptors: each listener keeps at most
    // 64 (admin, and lifeline sockets without a token), which together with the process's
    // own descriptors is past 100.
    let mut held = Vec::new();
    for target in [s.admin, s.quic] {
        for _ in 0..150 {
            match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(target)).await {
                Ok(Ok(c)) => held.push(c),
                _ => break,
            }
        }
    }
    // The accept loops hit EMFILE now; watch for a second.
    let (cpu0, logs0, t0) = (
        cpu_seconds(pid),
        s.log_lines.load(std::sync::atomic::Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    let logs = s.log_lines.load(std::sync::atomic::Ordering::Relaxed) - logs0;
    println!(
        "at EMFILE: {:.0}% of a core, {logs} log lines in a second, {} connections held",
        cpu * 100.0,
        held.len()
    );
    assert!(cpu < 0.25, "the accept loops spin: {:.0}% of a core", cpu * 100.0);
    assert!(logs <= 5, "{logs} log lines in a second");
    let total = s.log_lines.load(std::sync::atomic::Ordering::Relaxed);
    assert!(total >= 1, "the accept loops never ran out of descriptors");
    drop(held);
    // Descriptors come back: the admin endpoint answers again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(s.admin)).await
        {
            let req = "GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
            if c.write_all(req.as_bytes()).await.is_ok() {
                let mut out = Vec::new();
                if tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut out))
                    .await
                    .is_ok()
                    && String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200")
                {
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "the scheduler did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_admin_endpoint_caps_connections_and_closes_silent_ones() {
    let t = start(|_| {}).await;
    let admin = t.server.admin_addr();
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    // The cap is reached as the server accepts these; one more is closed at once.
    let mut extra = tokio::net::TcpStream::connect(admin).await.unwrap();
    assert_eq!(
        read_to_close(&mut extra, WAIT).await,
        Some(0),
        "over the cap: closed unread"
    );
    // A connection that never finishes its headers is closed after the header timeout.
    let started = Instant::now();
    idle[0].write_all(b"GET /status HTTP/1.1\r\nHost:").await.unwrap();
    assert!(read_to_close(&mut idle[0], Duration::from_secs(10)).await.is_some());
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "{took:?}");
}

#[tokio::test]
async fn a_lifeline_flood_is_refused_as_it_arrives_and_timed_out() {
    let t = start(|_| {}).await;
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(tokio::net::TcpStream::connect(t.server.quic_addr()).await.unwrap());
    }
    // Past the unauthenticated budget, sockets are closed at once; the rest at the token
    // timeout (2 s), not the 10 s hello timeout.
    let started = Instant::now();
    for socket in &mut flood {
        assert!(read_to_close(socket, Duration::from_secs(5)).await.is_some(), "closed");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "{took:?}");
}

/// A frontend connection that has said hello on a frontend loop.
async fn frontend_loop(t: &TestServer) -> (quinn::Connection, Peer) {
    let conn = t.connect(&t.certs.frontend).await.unwrap();
    let fe = frontend(&conn, "fe-1").await;
    (conn, fe)
}

async fn closed_with(conn: &quinn::Connection) -> u64 {
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the connection is closed")
    {
        quinn::ConnectionError::ApplicationClosed(c) => c.error_code.into_inner(),
        other => panic!("closed otherwise: {other:?}"),
    }
}

#[tokio::test]
async fn half_frames_are_held_to_the_connections_budget_and_the_frame_deadline() {
    let t = start(|s| {
        s.frame_timeout_ms = Some(300);
    })
    .await;
    // Many streams each start a large frame and stop: together past the budget
    // (max_frame_len + 1 MiB = 9 MiB), the connection is closed.
    // (Before its hello, a stream may not even start a frame over 1 KiB.)
    let conn = t.connect(&t.certs.querier).await.unwrap();
    let mut workers = Vec::new();
    for _ in 0..12 {
        let Ok(Ok(mut w)) = tokio::time::timeout(WAIT, async {
            let (send, recv) = conn.open_bi().await?;
            Ok::<_, quinn::ConnectionError>((send, recv))
        })
        .await
        else {
            break; // closed already
        };
        let mut part = BytesMut::new();
        part.put_u32(8 << 20);
        part.extend_from_slice(&vec![0u8; 900 * 1024]);
        let mut hello = encode_to_vec(&Hello::new(Role::Querier, "q", StreamKind::DequeueLoop), 1024).unwrap();
        hello.extend_from_slice(&part);
        let _ = w.0.write_all(&hello).await;
        workers.push(w);
    }
    let code = closed_with(&conn).await;
    assert_eq!(code, u64::from(close_code::PROTOCOL_ERROR), "refused");
    // A frontend loop that starts a frame and parks it is closed at the frame deadline.
    let (conn, mut fe) = frontend_loop(&t).await;
    let started = Instant::now();
    fe.writer.get_mut().write_all(&[0, 0, 1, 0, 1, 2, 3]).await.unwrap();
    let code = closed_with(&conn).await;
    assert_eq!(code, u64::from(close_code::PROTOCOL_ERROR));
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    // Others are unaffected.
    let (_conn, mut fe) = frontend_loop(&t).await;
    accepted(&mut fe, 1, "t").await;
}

#[tokio::test]
async fn ids_are_bounded_at_the_hello() {
    let t = start(|_| {}).await;
    let conn = t.connect(&t.certs.querier).await.unwrap();
    let rejected = open(
        &conn,
        Hello::new(Role::Querier, "q".repeat(MAX_ID_LEN + 1), StreamKind::DequeueLoop),
    )
    .await;
    assert!(
        matches!(
            &rejected,
            Err(HelloReply::Rejected {
                code: RejectCode::InvalidHello,
                ..
            })
        ),
        "{:?}",
        rejected.err()
    );
    // A 4 MiB id does not even fit a hello frame: the connection is closed at its length.
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let mut frame = BytesMut::new();
    frame.put_u32(4 << 20);
    send.write_all(&frame).await.unwrap();
    assert_eq!(closed_with(&conn).await, u64::from(close_code::PROTOCOL_ERROR));
}

#[tokio::test]
async fn a_result_endpoint_with_a_frame_limit_out_of_range_closes_its_frontends_connection() {
    let t = start(|_| {}).await;
    for max_frame_len in [0, MIN_FRAME_LEN - 1, HARD_MAX_FRAME_LEN + 1, u32::MAX] {
        let conn = t.connect(&t.certs.frontend).await.unwrap();
        let mut fe = open(&conn, Hello::new(Role::Frontend, "fe-bad", StreamKind::FrontendLoop))
            .await
            .expect("welcome");
        fe.send(&FrontendToScheduler::ResultEndpoint(FrontendAddress {
            id: "fe-bad".into(),
            address: "127.0.0.1:7777".into(),
            server_name: "localhost".into(),
            max_frame_len,
        }))
        .await;
        assert_eq!(
            closed_with(&conn).await,
            u64::from(close_code::PROTOCOL_ERROR),
            "{max_frame_len}"
        );
    }
    // The limits themselves are taken.
    let (_conn, mut fe) = frontend_loop(&t).await;
    accepted(&mut fe, 1, "t").await;
}

#[tokio::test]
async fn a_querier_may_announce_shutdown_only_for_itself() {
    let t = start(|_| {}).await;
    let victim_conn = t.connect(&t.certs.querier).await.unwrap();
    let mut victim = worker(&victim_conn, "victim").await;
    victim.ready(0).await;
    let other = t.connect(&t.certs.querier).await.unwrap();
    let refused = open(&other, Hello::new(Role::Querier, "victim", StreamKind::ShutdownNotice)).await;
    assert!(
        matches!(&refused, Err(HelloReply::Rejected { code: RejectCode::InvalidHello, message }) if message.contains("no worker")),
        "{:?}",
        refused.err()
    );
    // The victim still gets work.
    let (_fe_conn, mut fe) = frontend_loop(&t).await;
    accepted(&mut fe, 1, "t").await;
    assert_eq!(dispatched(&mut victim).await.query_id, 1);
}

#[tokio::test]
async fn refused_input_never_becomes_a_metric_label() {
    let t = start(|s| s.max_queued_requests = Some(1)).await;
    let (_conn, mut fe) = frontend_loop(&t).await;
    let long = "x".repeat(2048);
    let FrontendToScheduler::Enqueue(mut e) = enqueue(1, "t") else {
        unreachable!()
    };
    e.tenant = long.clone();
    fe.send(&FrontendToScheduler::Enqueue(e)).await;
    assert!(matches!(status_of(&mut fe, 1).await, EnqueueStatus::Invalid { .. }));
    accepted(&mut fe, 2, "t").await;
    fe.send(&enqueue(3, "never-queued")).await;
    assert_eq!(status_of(&mut fe, 3).await, EnqueueStatus::QueueFull);
    let (_, metrics) = get(t.server.admin_addr(), "/metrics").await;
    assert!(!metrics.contains(&long[..64]), "a refused tenant became a label");
    assert!(!metrics.contains("never-queued"), "a refused tenant became a label");
    assert!(metrics.contains("tenant=\"__other__\""), "{metrics}");
}

#[tokio::test]
async fn an_amplifying_enqueue_is_refused_while_decoding_without_the_memory() {
    // One 8 MiB enqueue of eight million empty actors, sent to a scheduler process: it
    // would cost ~190 MiB decoded; it is refused at its announced length.
    let dir = tempfile::tempdir().unwrap();
    let s = spawn_scheduler(dir.path(), &[]).await;
    let pid = s.child.id().unwrap();
    let before = peak_rss_kib(pid);
    let conn = connect(s.quic, &s.certs.frontend).await.unwrap();
    let mut fe = frontend(&conn, "fe-1").await;
    let FrontendToScheduler::Enqueue(mut e) = enqueue(1, "t") else {
        unreachable!()
    };
    e.actors = vec![String::new(); 8_000_000];
    let frame = encode_to_vec(&FrontendToScheduler::Enqueue(e), HARD_MAX_FRAME_LEN).unwrap();
    assert!(frame.len() <= 8 << 20, "{}", frame.len());
    fe.writer.get_mut().write_all(&frame).await.unwrap();
    assert_eq!(closed_with(&conn).await, u64::from(close_code::PROTOCOL_ERROR));
    let after = peak_rss_kib(pid);
    println!("scheduler peak RSS {before} KiB -> {after} KiB");
    assert!(after < before + 64 * 1024, "peak RSS grew by {} KiB", after - before);
}

#[tokio::test]
async fn every_number_of_an_enqueue_at_its_largest_is_served_and_the_scheduler_carries_on() {
    let t = start(|_| {}).await;
    let (_conn, mut fe) = frontend_loop(&t).await;
    let FrontendToScheduler::Enqueue(base) = enqueue(u64::MAX, "t") else {
        unreachable!()
    };
    let largest = Enqueue {
        priority: Some(u8::MAX),
        cost_hint: Some(u32::MAX),
        timeout_ms: Some(u64::MAX),
        attempt: u32::MAX,
        capability: u128::MAX,
        ..base.clone()
    };
    fe.send(&FrontendToScheduler::Enqueue(largest)).await;
    assert_eq!(status_of(&mut fe, u64::MAX).await, EnqueueStatus::Accepted);
    // It is dispatched with every figure as sent, its deadline held as far as the queue's
    // clock reaches (centuries); then an ordinary query after it.
    let qconn = t.connect(&t.certs.querier).await.unwrap();
    let mut worker = ready_worker(&qconn, "querier-1").await;
    let d = dispatched(&mut worker).await;
    assert_eq!((d.query_id, d.attempt, d.capability), (u64::MAX, u32::MAX, u128::MAX));
    let century_ms = 100 * 365 * 24 * 3600 * 1000;
    assert!(d.timeout_ms.is_some_and(|ms| ms > century_ms), "{:?}", d.timeout_ms);
    accepted(&mut fe, 1, "t").await;
    let (_, status) = get(t.server.admin_addr(), "/ready").await;
    assert!(status.contains("ready"), "{status}");
}

/// Not a check: measures what an idle QUIC connection costs a scheduler process (for
/// docs/operations.md). Run with
/// `cargo test --release --test hardening -- --ignored --nocapture idle_connection_cost`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, run by hand"]
async fn idle_connection_cost() {
    let dir = tempfile::tempdir().unwrap();
    let extra: Vec<String> = std::env::var("SLUICE_SERVE_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let s = spawn_scheduler(dir.path(), &extra).await;
    let pid = s.child.id().unwrap();
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().to_string();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut config = sluice::tls::quic_client(&s.certs.frontend).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    config.transport_config(std::sync::Arc::new(transport));
    endpoint.set_default_client_config(config);
    let n = 2000;
    let before = rss();
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(endpoint.connect(s.quic, "localhost").unwrap().await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss();
    println!(
        "{n} idle connections: scheduler RSS {before} KiB -> {after} KiB, {:.1} KiB each",
        (after - before) as f64 / n as f64
    );
}

/// A frontend (client crate) whose result endpoint a raw querier connection probes.
async fn probed_frontend(
    t: &TestServer,
    max_frame_len: u32,
    idle: Duration,
) -> (sluice_client::Frontend, quinn::Connection) {
    let mut config = common::client::frontend_config(t, "fe-probed");
    config.client.max_frame_len = max_frame_len;
    config.client.idle_timeout = idle;
    let fe = sluice_client::Frontend::connect(config).await.unwrap();
    let addr: std::net::SocketAddr = fe.result_address().address.parse().unwrap();
    let conn = connect(addr, &t.certs.querier).await.unwrap();
    (fe, conn)
}

/// Opens a result stream, says hello, and starts a frame of `announced` bytes with `sent`
/// of them.
async fn park_half_a_result(conn: &quinn::Connection, announced: u32, sent: usize) -> Peer {
    let mut peer = open_result(conn, "q").await;
    let mut part = BytesMut::new();
    part.put_u32(announced);
    part.extend_from_slice(&vec![0u8; sent]);
    peer.writer.get_mut().write_all(&part).await.unwrap();
    peer
}

#[tokio::test]
async fn a_querier_cannot_park_half_results_at_a_frontend() {
    let t = start(|_| {}).await;
    // A frontend accepting 1 MiB frames: its querier connections may buffer 4 MiB together.
    let (_fe, conn) = probed_frontend(&t, 1 << 20, Duration::from_secs(30)).await;
    let mut parked = Vec::new();
    for _ in 0..5 {
        parked.push(park_half_a_result(&conn, 1 << 20, 900 * 1024).await);
    }
    // Past the budget, a stream is refused instead of buffered.
    let mut refused = 0;
    for peer in &mut parked {
        if let Ok(Ok(Some(ResultReceipt::Refused { .. }))) =
            tokio::time::timeout(Duration::from_millis(500), peer.reader.next::<ResultReceipt>()).await
        {
            refused += 1;
        }
    }
    assert!(refused >= 1, "4.5 MiB of half frames were all buffered");
    // A single half frame is refused when it does not finish in time.
    let (_fe, conn) = probed_frontend(&t, 1 << 20, Duration::from_secs(1)).await;
    let mut peer = park_half_a_result(&conn, 1000, 10).await;
    let receipt = tokio::time::timeout(WAIT, peer.reader.next::<ResultReceipt>())
        .await
        .expect("answered in time");
    assert!(
        matches!(receipt, Ok(Some(ResultReceipt::Refused { .. }))),
        "{receipt:?}"
    );
}
