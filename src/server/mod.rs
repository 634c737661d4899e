//! The broker's I/O shell: a QUIC endpoint (quinn, mutual TLS), one task per connection
//! and per stream, and the [`dispatcher`] task that owns the queue. Nothing here decides
//! who runs what; it translates frames into dispatcher commands and back.

mod accept;
mod admin;
mod dispatcher;
mod lifeline;
pub mod status;
mod streams;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use std::collections::HashSet;

use sluice_protocol::{Limits, ReceiveBudget, Role, close_code};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{ServeConfig, TlsSource};
use crate::metrics::Metrics;
use crate::queue::QueueConfig;
use crate::tls::{self, CertError, CertSet, Identity, TlsError};
use sluice_client::gossip::{Gossip, MemberRole, MemberState};
use sluice_client::quic_stats::QuicStats;

use status::GossipView;
pub use status::{ClusterStatus, GossipStatus, Status, WorkerStatus};

use dispatcher::{Command, Dispatcher};

/// Why the server could not start or stopped.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Certs(#[from] CertError),
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("gossip: {0}")]
    Gossip(String),
    #[error("invalid queue configuration: {0}")]
    Queue(String),
    #[error("the dispatcher has stopped")]
    DispatcherGone,
}

/// Bytes quinn may buffer for one stream before the scheduler reads them.
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;
/// Bytes the scheduler may have in flight, unacknowledged, on one connection.
pub const SEND_WINDOW: u64 = 4 * 1024 * 1024;

/// A running scheduler.
pub struct Server {
    quic_addr: SocketAddr,
    admin_addr: SocketAddr,
    draining: Arc<AtomicBool>,
    admin_task: JoinHandle<()>,
    lifeline_task: Option<JoinHandle<()>>,
    identity: Identity,
    dev_certs: Option<CertSet>,
    commands: mpsc::Sender<Command>,
    drain_timeout: Duration,
    stop_accepting: CancellationToken,
    endpoint: quinn::Endpoint,
    accept_task: JoinHandle<()>,
    dispatcher_task: JoinHandle<()>,
    writers: TaskTracker,
    scheduler_id: String,
    gossip: Option<Gossip>,
    gossip_view: Option<GossipView>,
}

/// Runtime limits the connection tasks need.
#[derive(Debug, Clone)]
pub(crate) struct StreamLimits {
    pub(crate) limits: Limits,
    pub(crate) hello_timeout: Duration,
    pub(crate) scheduler_id: String,
    /// Every stream writer task, for the shutdown to wait on.
    pub(crate) writers: TaskTracker,
    /// A frame that started to arrive must be complete within this long.
    pub(crate) frame_timeout: Duration,
    /// Bytes the streams of one connection may buffer together.
    pub(crate) connection_receive_budget: usize,
}

/// What the streams of one connection share.
#[derive(Debug)]
pub(crate) struct ConnectionState {
    /// Their read buffers, together.
    pub(crate) budget: ReceiveBudget,
    /// A frontend connection carries one frontend loop.
    pub(crate) frontend_loop_open: AtomicBool,
    /// Querier ids that opened dequeue loops here: a shutdown notice may speak only for them.
    pub(crate) querier_ids: std::sync::Mutex<HashSet<String>>,
    /// A querier connection's lifeline (TCP port, token), offered on each dequeue loop.
    pub(crate) lifeline: Option<(u16, u128)>,
}

impl Server {
    /// Binds the QUIC endpoint and starts serving. With no TLS files configured, a
    /// development CA and certificates are created in (or reused from) the data directory.
    pub async fn start(mut config: ServeConfig) -> Result<Server, ServerError> {
        let (identity, dev_certs) = match &config.tls {
            TlsSource::Files(id) => (id.clone(), None),
            TlsSource::Development(dir) => {
                let (set, created) = tls::ensure_dev_set(dir)?;
                if created {
                    info!(dir = %dir.display(), "generated development certificates");
                }
                (set.scheduler.clone(), Some(set))
            }
        };
        let tls_config = tls::server_tls(&identity)?;
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls_config).map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        sluice_client::transport::tune(&mut transport)
            .max_concurrent_bidi_streams(config.max_streams_per_connection.into())
            .max_concurrent_uni_streams(0u8.into())
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(config.idle_timeout)
                    .map_err(|_| ServerError::Queue("idle_timeout_ms too large".into()))?,
            ))
            .keep_alive_interval(Some(config.idle_timeout / 5))
            // What quinn may hold for one connection before we read it: a stream's worth of
            // frames, at most the connection's receive budget in all. Sends are bounded
            // likewise. No datagrams are used.
            .stream_receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW))
            .receive_window(
                quinn::VarInt::from_u64(config.connection_receive_budget as u64).unwrap_or(quinn::VarInt::MAX),
            )
            .send_window(SEND_WINDOW)
            .datagram_receive_buffer_size(None);
        server_config.transport_config(Arc::new(transport));
        let (endpoint, socket_buffers) =
            sluice_client::transport::endpoint_and_buffers(config.listen, Some(server_config)).map_err(|error| {
                ServerError::Bind {
                    addr: config.listen,
                    error,
                }
            })?;
        let quic_addr = endpoint.local_addr().map_err(|error| ServerError::Bind {
            addr: config.listen,
            error,
        })?;

        if config.scheduler_id.is_empty() {
            config.scheduler_id = format!("scheduler-{}", quic_addr.port());
        }
        let limits = Limits {
            max_frame_len: config.max_frame_len,
            ..Limits::default()
        };
        let metrics = Arc::new(Metrics::new(Duration::from_secs(300)));
        metrics.set_socket_buffers(socket_buffers);
        let mut dispatcher = Dispatcher::new(
            config.scheduler_id.clone(),
            config.queue.clone(),
            limits,
            metrics.clone(),
        )
        .map_err(ServerError::Queue)?;
        let (commands, rx) = mpsc::channel(4096);
        let stop_accepting = CancellationToken::new();
        let admin_listener = admin::bind(config.admin_listen)
            .await
            .map_err(|error| ServerError::Bind {
                addr: config.admin_listen,
                error,
            })?;
        let admin_addr = admin_listener.local_addr().map_err(|error| ServerError::Bind {
            addr: config.admin_listen,
            error,
        })?;
        // The lifeline listener takes the QUIC port number over TCP.
        let lifeline_addr = SocketAddr::new(config.listen.ip(), quic_addr.port());
        let (lifelines, lifeline_task) = match tokio::net::TcpListener::bind(lifeline_addr).await {
            Ok(listener) => {
                let lifelines = Arc::new(lifeline::Lifelines::new(Some(quic_addr.port())));
                let task = tokio::spawn(lifeline::serve(
                    listener,
                    lifelines.clone(),
                    config.hello_timeout,
                    stop_accepting.clone(),
                ));
                (lifelines, Some(task))
            }
            Err(e) => {
                warn!(addr = %lifeline_addr, error = %e, "no querier lifelines: a killed querier is noticed at the idle timeout");
                (Arc::new(lifeline::Lifelines::new(None)), None)
            }
        };
        // Join the gossip as `joining`; `active` once the endpoint accepts.
        let advertised = SocketAddr::new(
            config.advertise.ip(),
            match config.advertise.port() {
                0 => quic_addr.port(),
                p => p,
            },
        );
        let gossip = match &config.gossip {
            Some(g) => Some(
                Gossip::start(
                    config.scheduler_id.clone(),
                    MemberRole::Scheduler,
                    Some(advertised),
                    MemberState::Joining,
                    g.clone(),
                )
                .map_err(|e| ServerError::Gossip(e.to_string()))?,
            ),
            None => None,
        };
        // Tenant limits hold for the cluster: queued counts go out and come in by gossip.
        // The forwarding task ends with the gossip (its reports' channel closes).
        let mut gossip = gossip;
        if let Some(g) = gossip.as_mut()
            && let Some(reports) = g.take_reports()
        {
            dispatcher.share_load(g.reporter());
            drop(dispatcher::forward_load_reports(reports, g.members(), commands.clone()));
        }
        let dispatcher_task = tokio::spawn(dispatcher.run(rx));
        let gossip_view = gossip.as_ref().map(|g| GossipView {
            address: g.local_addr(),
            members: g.members(),
            stats: g.stats(),
        });
        let draining = Arc::new(AtomicBool::new(false));
        let quic = Arc::new(QuicStats::default());
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            admin::AdminState {
                commands: commands.clone(),
                metrics,
                draining: draining.clone(),
                gossip: gossip_view.clone(),
                quic: quic.clone(),
            },
            stop_accepting.clone(),
        ));
        let writers = TaskTracker::new();
        let stream_limits = StreamLimits {
            limits,
            hello_timeout: config.hello_timeout,
            scheduler_id: config.scheduler_id.clone(),
            writers: writers.clone(),
            frame_timeout: config.frame_timeout,
            connection_receive_budget: config.connection_receive_budget,
        };
        let accept_task = tokio::spawn(accept_loop(
            endpoint.clone(),
            commands.clone(),
            stream_limits,
            config.max_connections,
            lifelines,
            quic,
            stop_accepting.clone(),
        ));
        if let Some(g) = &gossip {
            g.set_state(MemberState::Active).await;
        }
        info!(%quic_addr, %admin_addr, scheduler = %config.scheduler_id, "serving");
        Ok(Server {
            quic_addr,
            admin_addr,
            draining,
            admin_task,
            lifeline_task,
            identity,
            dev_certs,
            commands,
            drain_timeout: config.drain_timeout,
            stop_accepting,
            endpoint,
            accept_task,
            dispatcher_task,
            writers,
            scheduler_id: config.scheduler_id.clone(),
            gossip,
            gossip_view,
        })
    }

    /// This scheduler's id (given, or `scheduler-<port>`).
    pub fn scheduler_id(&self) -> &str {
        &self.scheduler_id
    }

    /// The gossip (UDP) address, when this scheduler gossips.
    pub fn gossip_addr(&self) -> Option<SocketAddr> {
        self.gossip_view.as_ref().map(|g| g.address)
    }

    /// The address QUIC clients connect to.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The address of the admin HTTP listener (/metrics, /ready, /status).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Whether the querier lifeline listener is up (it takes the QUIC port number over TCP;
    /// without it a killed querier is noticed only at the idle timeout).
    pub fn has_lifeline(&self) -> bool {
        self.lifeline_task.is_some()
    }

    /// The scheduler's own TLS files.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The development certificate set, when the server made (or reused) one.
    pub fn dev_certs(&self) -> Option<&CertSet> {
        self.dev_certs.as_ref()
    }

    /// A snapshot of queues, tenants, queriers and counters.
    pub async fn status(&self) -> Result<Status, ServerError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Status { reply })
            .await
            .map_err(|_| ServerError::DispatcherGone)?;
        let mut status = rx.await.map_err(|_| ServerError::DispatcherGone)?;
        status.gossip = self.gossip_view.as_ref().map(GossipView::snapshot);
        Ok(status)
    }

    /// Replaces limits and per-tenant overrides without a restart.
    pub async fn set_queue_config(&self, config: QueueConfig) -> Result<(), ServerError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::SetQueueConfig { config, reply })
            .await
            .map_err(|_| ServerError::DispatcherGone)?;
        rx.await
            .map_err(|_| ServerError::DispatcherGone)?
            .map_err(ServerError::Queue)
    }

    /// Stops at once, as a crash would: connections are closed without a drain or a
    /// hand-back (peers see the connection die). For tests and chaos experiments.
    pub fn abort(self) {
        if let Some(g) = &self.gossip {
            g.abort();
        }
        self.stop_accepting.cancel();
        self.endpoint
            .close(close_code::SHUTTING_DOWN.into(), b"scheduler aborted");
        self.accept_task.abort();
        self.admin_task.abort();
        if let Some(t) = &self.lifeline_task {
            t.abort();
        }
        self.dispatcher_task.abort();
    }

    /// Graceful shutdown: the gossip is told this scheduler is leaving (clients stop
    /// sending it work), new enqueues are answered `ShuttingDown`, queued work keeps
    /// dispatching for up to the drain timeout, whatever is still queued then is handed
    /// back to its frontend with an explicit error, the scheduler leaves the gossip, every
    /// stream's last frames are flushed and acknowledged (bounded wait), and the endpoint
    /// closes.
    pub async fn shutdown(self) {
        if let Some(g) = &self.gossip {
            g.set_state(MemberState::Leaving).await;
        }
        self.draining.store(true, Ordering::Relaxed);
        let (done, drained) = oneshot::channel();
        let drain_timeout = self.drain_timeout;
        if self
            .commands
            .send(Command::Shutdown { drain_timeout, done })
            .await
            .is_ok()
        {
            let _ = drained.await;
        }
        if let Some(g) = &self.gossip {
            g.leave().await;
        }
        self.stop_accepting.cancel();
        // The dispatcher lets go of every outbox; each writer sends what is left, finishes
        // its stream and waits for the peer's acknowledgement (bounded by FLUSH_WAIT).
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Close { done }).await.is_ok() {
            let _ = closed.await;
        }
        self.writers.close();
        if tokio::time::timeout(streams::FLUSH_WAIT + Duration::from_millis(500), self.writers.wait())
            .await
            .is_err()
        {
            warn!("some streams' last frames were not acknowledged before closing");
        }
        self.endpoint
            .close(close_code::SHUTTING_DOWN.into(), b"scheduler shutting down");
        let _ = self.accept_task.await;
        let _ = self.admin_task.await;
        if let Some(t) = self.lifeline_task {
            let _ = t.await;
        }
        drop(self.commands);
        self.endpoint.wait_idle().await;
        self.dispatcher_task.abort();
        info!("stopped");
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    commands: mpsc::Sender<Command>,
    limits: StreamLimits,
    max_connections: u32,
    lifelines: Arc<lifeline::Lifelines>,
    quic: Arc<QuicStats>,
    stop: CancellationToken,
) {
    let open = Arc::new(AtomicU32::new(0));
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        if open.load(Ordering::Relaxed) >= max_connections {
            warn!(remote = %incoming.remote_address(), max_connections, "refusing connection: too many");
            incoming.refuse();
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (commands, limits, open, stop, lifelines, quic) = (
            commands.clone(),
            limits.clone(),
            open.clone(),
            stop.clone(),
            lifelines.clone(),
            quic.clone(),
        );
        tokio::spawn(async move {
            handle_connection(incoming, commands, limits, lifelines, &quic, stop).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn handle_connection(
    incoming: quinn::Incoming,
    commands: mpsc::Sender<Command>,
    limits: StreamLimits,
    lifelines: Arc<lifeline::Lifelines>,
    quic: &QuicStats,
    stop: CancellationToken,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // Unknown CA, no client certificate, wrong ALPN…: rustls reports it to the peer.
            warn!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    let role = match tls::peer_role(&conn) {
        Ok(r) => r,
        Err(e) => {
            warn!(%remote, error = %e, "refusing connection");
            conn.close(close_code::ROLE_NOT_ALLOWED.into(), e.to_string().as_bytes());
            return;
        }
    };
    debug!(%remote, ?role, "connected");
    quic.track(role, &conn);
    let lifeline = if role == Role::Querier {
        lifelines.register(&conn)
    } else {
        None
    };
    let state = Arc::new(ConnectionState {
        budget: ReceiveBudget::new(limits.connection_receive_budget),
        frontend_loop_open: AtomicBool::new(false),
        querier_ids: std::sync::Mutex::new(HashSet::new()),
        lifeline,
    });
    loop {
        let stream = tokio::select! {
            s = conn.accept_bi() => s,
            _ = stop.cancelled() => break,
        };
        match stream {
            Ok((send, recv)) => {
                let (conn, commands, limits, state) = (conn.clone(), commands.clone(), limits.clone(), state.clone());
                tokio::spawn(streams::serve_stream(conn, role, send, recv, commands, limits, state));
            }
            Err(e) => {
                debug!(%remote, error = %e, "connection ended");
                break;
            }
        }
    }
    if let Some((_, token)) = lifeline {
        lifelines.unregister(token);
    }
}

/// Which streams a role may open.
pub(crate) fn may_open(role: Role, stream: sluice_protocol::StreamKind) -> bool {
    use sluice_protocol::StreamKind::*;
    matches!(
        (role, stream),
        (Role::Frontend, FrontendLoop) | (Role::Querier, DequeueLoop) | (Role::Querier, ShutdownNotice)
    )
}
