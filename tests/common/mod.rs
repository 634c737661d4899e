//! A scheduler started in-process on loopback, and raw protocol peers to drive it.
#![allow(dead_code)] // each test file uses a different part

pub mod client;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::path::Path;
use std::process::Stdio;

use serde::{Serialize, de::DeserializeOwned};
use sluice::config::Settings;
use sluice::server::{Server, Status};
use sluice::tls::{self, CertSet, Identity};
use sluice_protocol::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// How long any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// Awaits `f`, failing the test after [`WAIT`] with what was awaited.
pub async fn wait<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A query's whole body (bounded by [`WAIT`]).
pub async fn body_of(handle: sluice_client::QueryHandle) -> Result<Vec<u8>, sluice_client::QueryError> {
    wait("a response", async { handle.response().await?.body.collect().await }).await
}

pub struct TestServer {
    pub server: Server,
    pub certs: CertSet,
    _dir: Arc<tempfile::TempDir>,
}

/// Starts a scheduler on 127.0.0.1 (ephemeral port) with its own development CA.
pub async fn start(tweak: impl FnOnce(&mut Settings)) -> TestServer {
    start_in(Arc::new(tempfile::tempdir().unwrap()), tweak).await
}

/// Starts a scheduler whose development certificates live in `dir`: schedulers started
/// in the same directory share one CA, as the schedulers of one cluster do.
pub async fn start_in(dir: Arc<tempfile::TempDir>, tweak: impl FnOnce(&mut Settings)) -> TestServer {
    let mut settings = Settings {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: Some(dir.path().join("certs")),
        scheduler_id: Some("scheduler-test".into()),
        ..Settings::default()
    };
    tweak(&mut settings);
    // The lifeline takes the QUIC port number over TCP; when the system gave that number
    // to another process's TCP socket (tests run side by side), start again on another.
    let mut server = Server::start(settings.clone().resolve().unwrap()).await.unwrap();
    for _ in 0..10 {
        if server.has_lifeline() {
            break;
        }
        server.abort();
        server = Server::start(settings.clone().resolve().unwrap()).await.unwrap();
    }
    assert!(server.has_lifeline(), "no free TCP port for the lifeline in ten tries");
    let certs = server.dev_certs().unwrap().clone();
    TestServer {
        server,
        certs,
        _dir: dir,
    }
}

/// A directory for the certificates of several schedulers.
pub fn cluster_dir() -> Arc<tempfile::TempDir> {
    Arc::new(tempfile::tempdir().unwrap())
}

impl TestServer {
    pub async fn connect(&self, id: &Identity) -> Result<quinn::Connection, String> {
        connect(self.server.quic_addr(), id).await
    }

    /// Polls the status until `ok` holds (bounded by [`WAIT`]).
    pub async fn status_until(&self, what: &str, ok: impl Fn(&Status) -> bool) -> Status {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let s = self.server.status().await.unwrap();
            if ok(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {s:#?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

pub async fn connect(addr: SocketAddr, id: &Identity) -> Result<quinn::Connection, String> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut config = tls::quic_client(id).map_err(|e| e.to_string())?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    config.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(config);
    let connecting = endpoint.connect(addr, "localhost").map_err(|e| e.to_string())?;
    tokio::time::timeout(WAIT, connecting)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// One bidirectional stream, after a successful hello.
pub struct Peer {
    pub reader: FramedRead<quinn::RecvStream>,
    pub writer: FramedWrite<quinn::SendStream>,
}

impl Peer {
    pub async fn send<T: Serialize>(&mut self, msg: &T) {
        self.writer.send(msg).await.expect("send");
    }

    /// The next message, failing the test after [`WAIT`].
    /// A querier worker's `Ready` for `worker`, with nothing finished.
    pub async fn ready(&mut self, worker: WorkerSlot) {
        self.send(&QuerierToScheduler::Ready { worker, finished: None }).await;
    }

    pub async fn recv<T: DeserializeOwned>(&mut self) -> T {
        tokio::time::timeout(WAIT, self.reader.next::<T>())
            .await
            .expect("timed out waiting for a frame")
            .expect("read")
            .expect("stream ended")
    }

    /// The next frame a scheduler sends a frontend, skipping `Dispatched` notes.
    pub async fn next_from_scheduler(&mut self) -> SchedulerToFrontend {
        loop {
            match self.recv::<SchedulerToFrontend>().await {
                SchedulerToFrontend::Dispatched { .. } => continue,
                other => return other,
            }
        }
    }

    /// Whatever the stream yields next, with no timeout interpretation.
    pub async fn try_recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ReadError> {
        tokio::time::timeout(WAIT, self.reader.next::<T>())
            .await
            .expect("timed out waiting for the stream")
    }
}

/// Opens a stream and says hello; returns the peer or the rejection.
pub async fn open(conn: &quinn::Connection, hello: Hello) -> Result<Peer, HelloReply> {
    let (send, recv) = conn.open_bi().await.expect("open stream");
    let mut peer = Peer {
        reader: FramedRead::new(recv, 1 << 20),
        writer: FramedWrite::new(send, 1 << 20),
    };
    peer.send(&hello).await;
    match peer.recv::<HelloReply>().await {
        HelloReply::Welcome { .. } => Ok(peer),
        rejected => Err(rejected),
    }
}

/// A result stream to a frontend: the hello is sent and the result follows at once (a
/// frontend answers nothing but the receipt).
pub async fn open_result(conn: &quinn::Connection, querier_id: &str) -> Peer {
    let (send, recv) = conn.open_bi().await.expect("open stream");
    let mut peer = Peer {
        reader: FramedRead::new(recv, 1 << 20),
        writer: FramedWrite::new(send, 1 << 20),
    };
    peer.send(&Hello::new(Role::Querier, querier_id, StreamKind::Result))
        .await;
    peer
}

/// A frontend loop that announced its result endpoint.
pub async fn frontend(conn: &quinn::Connection, id: &str) -> Peer {
    let mut peer = open(conn, Hello::new(Role::Frontend, id, StreamKind::FrontendLoop))
        .await
        .expect("welcome");
    peer.send(&FrontendToScheduler::ResultEndpoint(FrontendAddress {
        id: id.into(),
        address: "127.0.0.1:7777".into(),
        server_name: "localhost".into(),
        max_frame_len: sluice_protocol::Limits::default().max_frame_len,
    }))
    .await;
    peer
}

/// A querier worker's dequeue loop, past its hello and lifeline offer (this raw peer
/// does not open the lifeline).
pub async fn worker(conn: &quinn::Connection, querier: &str) -> Peer {
    let mut peer = open(conn, Hello::new(Role::Querier, querier, StreamKind::DequeueLoop))
        .await
        .expect("welcome");
    match peer.recv::<SchedulerToQuerier>().await {
        SchedulerToQuerier::Lifeline { .. } => peer,
        other => panic!("expected the lifeline offer first, got {other:?}"),
    }
}

/// [`worker`], with its worker 0 already `Ready` for a query.
pub async fn ready_worker(conn: &quinn::Connection, querier: &str) -> Peer {
    let mut peer = worker(conn, querier).await;
    peer.ready(0).await;
    peer
}

pub fn enqueue(query_id: u64, tenant: &str) -> FrontendToScheduler {
    FrontendToScheduler::Enqueue(Enqueue {
        query_id,
        tenant: tenant.into(),
        actors: vec!["user-1".into()],
        component: None,
        priority: None,
        cost_hint: None,
        timeout_ms: None,
        attempt: 1,
        capability: 0x5eed,
        metadata: vec![("traceparent".into(), "00-1-2-01".into())],
        payload: bytes::Bytes::from(format!("query {query_id}")),
    })
}

/// Expects the enqueue status of `query_id`.
pub async fn status_of(frontend: &mut Peer, query_id: u64) -> EnqueueStatus {
    match frontend.next_from_scheduler().await {
        SchedulerToFrontend::EnqueueStatus {
            query_id: q, status, ..
        } if q == query_id => status,
        other => panic!("expected the status of {query_id}, got {other:?}"),
    }
}

/// Enqueues `query_id` for `tenant` and expects it accepted.
pub async fn accepted(frontend: &mut Peer, query_id: u64, tenant: &str) {
    frontend.send(&enqueue(query_id, tenant)).await;
    assert_eq!(status_of(frontend, query_id).await, EnqueueStatus::Accepted);
}

/// Expects a dispatch on a worker stream.
pub async fn dispatched(worker: &mut Peer) -> Dispatch {
    match worker.recv::<SchedulerToQuerier>().await {
        SchedulerToQuerier::Dispatch { dispatch, .. } => *dispatch,
        other => panic!("expected a dispatch, got {other:?}"),
    }
}

/// A `sluice serve` process.
pub struct Running {
    pub child: Child,
    pub quic: std::net::SocketAddr,
    /// Its gossip address, when it gossips.
    pub gossip: Option<std::net::SocketAddr>,
    /// Its admin HTTP address (/status, /metrics).
    pub admin: std::net::SocketAddr,
    pub certs: CertSet,
}

/// Starts `sluice serve` in `dir` (loopback, OS-chosen ports unless `extra` gives
/// `--listen`) and reads the addresses it prints. Processes started in one directory share
/// its development CA.
pub async fn spawn_scheduler(dir: &Path, extra: &[&str]) -> Running {
    let listen: &[&str] = if extra.contains(&"--listen") {
        &[]
    } else {
        &["--listen", "127.0.0.1:0"]
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .current_dir(dir)
        .args(["serve", "--admin-listen", "127.0.0.1:0"])
        .args(listen)
        .args(extra)
        .stderr(Stdio::inherit());
    let (child, printed) = spawn_serve(command).await;
    Running {
        child,
        quic: printed.quic,
        gossip: printed.gossip,
        admin: printed.admin,
        certs: CertSet::in_dir(&dir.join("sluice-data")),
    }
}

/// The addresses a `sluice serve` process prints when it listens.
pub struct Printed {
    pub quic: SocketAddr,
    pub gossip: Option<SocketAddr>,
    pub admin: SocketAddr,
}

/// Starts `command` (a `sluice serve`, however wrapped) with its standard output read until
/// it says it listens, and returns the addresses it printed.
pub async fn spawn_serve(mut command: Command) -> (Child, Printed) {
    if !command.as_std().get_envs().any(|(k, _)| k == "RUST_LOG") {
        command.env("RUST_LOG", "warn");
    }
    let mut child = command.stdout(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut quic, mut gossip, mut admin) = (None, None, None);
    while let Some(line) = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap() {
        let line = line.trim();
        if let Some(addr) = line.strip_prefix("QUIC address:") {
            quic = Some(addr.trim().parse().unwrap());
        }
        if let Some(rest) = line.strip_prefix("admin HTTP:") {
            admin = rest
                .trim()
                .strip_prefix("http://")
                .and_then(|r| r.split('/').next())
                .map(|a| a.parse().unwrap());
        }
        if let Some(addr) = line.strip_prefix("gossip address:") {
            gossip = addr.split_whitespace().next().map(|a| a.parse().unwrap());
        }
        if line.contains("stop with") {
            break;
        }
    }
    let printed = Printed {
        quic: quic.expect("the QUIC address is printed"),
        gossip,
        admin: admin.expect("the admin address is printed"),
    };
    (child, printed)
}

/// Sends signal `name` (TERM, KILL, HUP…) to a child process.
pub async fn signal(child: &Child, name: &str) {
    let pid = child.id().unwrap().to_string();
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

/// GET `path` with HTTP/1.1; returns (status code, body).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// Polls a scheduler process's `/status` until `ok` holds for its JSON (bounded by `within`).
pub async fn process_status_until(
    admin: SocketAddr,
    within: Duration,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (code, body) = get(admin, "/status").await;
        if code == 200 {
            let status: serde_json::Value = serde_json::from_str(&body).expect("JSON status");
            if ok(&status) {
                return status;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
