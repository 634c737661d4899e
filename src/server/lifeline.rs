//! Querier lifelines: one TCP connection per querier QUIC connection, authenticated by a
//! random token the scheduler sent over QUIC. The kernel closes a dead process's TCP
//! sockets (QUIC over UDP has nothing like it), so when a lifeline closes the scheduler
//! closes that querier's QUIC connection at once and its running queries fail over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_protocol::{LIFELINE_MAGIC, close_code};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Tokens of live querier connections.
#[derive(Debug, Default)]
pub(crate) struct Lifelines {
    port: Option<u16>,
    tokens: Mutex<HashMap<u128, quinn::Connection>>,
}

impl Lifelines {
    pub(crate) fn new(port: Option<u16>) -> Self {
        Lifelines {
            port,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh token for `conn`, or `None` when no lifeline listener runs.
    pub(crate) fn register(&self, conn: &quinn::Connection) -> Option<(u16, u128)> {
        let port = self.port?;
        let token: u128 = rand::random();
        self.tokens.lock().unwrap().insert(token, conn.clone());
        Some((port, token))
    }

    pub(crate) fn unregister(&self, token: u128) {
        self.tokens.lock().unwrap().remove(&token);
    }

    fn lookup(&self, token: u128) -> Option<quinn::Connection> {
        self.tokens.lock().unwrap().get(&token).cloned()
    }
}

/// Accepts lifeline sockets until `stop`; at most `max` at once.
pub(crate) async fn serve(
    listener: TcpListener,
    lifelines: Arc<Lifelines>,
    hello_timeout: Duration,
    max: u32,
    stop: CancellationToken,
) {
    let open = Arc::new(AtomicU32::new(0));
    loop {
        let (socket, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "lifeline accept failed");
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        if open.load(Ordering::Relaxed) >= max {
            continue; // dropped: closed at once
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (lifelines, open, stop) = (lifelines.clone(), open.clone(), stop.clone());
        tokio::spawn(async move {
            hold(socket, &lifelines, hello_timeout, &stop).await;
            debug!(%remote, "lifeline socket done");
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Reads the preamble, then waits for the socket (or the QUIC connection) to end.
async fn hold(mut socket: TcpStream, lifelines: &Lifelines, hello_timeout: Duration, stop: &CancellationToken) {
    let mut preamble = [0u8; 20];
    match tokio::time::timeout(hello_timeout, socket.read_exact(&mut preamble)).await {
        Ok(Ok(_)) if preamble[..4] == LIFELINE_MAGIC => {}
        _ => return,
    }
    let token = u128::from_be_bytes(preamble[4..].try_into().expect("16 bytes"));
    let Some(conn) = lifelines.lookup(token) else {
        return;
    };
    let mut scratch = [0u8; 64];
    let lost = loop {
        tokio::select! {
            read = socket.read(&mut scratch) => match read {
                Ok(0) | Err(_) => break true,
                Ok(_) => {} // nothing is expected; ignore
            },
            _ = conn.closed() => break false,
            _ = stop.cancelled() => break false,
        }
    };
    if lost && conn.close_reason().is_none() {
        info!(remote = %conn.remote_address(), "querier lifeline closed: failing its running queries");
        conn.close(close_code::LIFELINE_LOST.into(), b"querier lifeline closed");
    }
}
