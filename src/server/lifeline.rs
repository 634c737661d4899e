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
use tracing::{debug, info};

use super::accept::AcceptErrors;

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

/// Sockets that have not presented a token yet, at most: a flood of them is refused as it
/// arrives and cannot displace a querier's authenticated lifeline.
pub(crate) const MAX_UNAUTHENTICATED: u32 = 64;
/// Longest wait for a socket's token.
pub(crate) const TOKEN_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts lifeline sockets until `stop`. Authenticated lifelines are bounded by the
/// querier connections (one token each); sockets without a token yet by
/// [`MAX_UNAUTHENTICATED`], each for at most [`TOKEN_TIMEOUT`] (or `hello_timeout` if
/// shorter). Failed accepts back off.
pub(crate) async fn serve(
    listener: TcpListener,
    lifelines: Arc<Lifelines>,
    hello_timeout: Duration,
    stop: CancellationToken,
) {
    let unauthenticated = Arc::new(AtomicU32::new(0));
    let token_timeout = hello_timeout.min(TOKEN_TIMEOUT);
    let mut errors = AcceptErrors::new("lifeline");
    loop {
        let (socket, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    errors.succeeded();
                    a
                }
                Err(e) => {
                    errors.failed(&e).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        if unauthenticated.fetch_add(1, Ordering::Relaxed) >= MAX_UNAUTHENTICATED {
            unauthenticated.fetch_sub(1, Ordering::Relaxed);
            continue; // dropped: closed at once
        }
        let (lifelines, unauthenticated, stop) = (lifelines.clone(), unauthenticated.clone(), stop.clone());
        tokio::spawn(async move {
            hold(socket, &lifelines, token_timeout, &unauthenticated, &stop).await;
            debug!(%remote, "lifeline socket done");
        });
    }
}

/// Reads the preamble (counted as unauthenticated until then), then waits for the socket
/// (or the QUIC connection) to end.
async fn hold(
    mut socket: TcpStream,
    lifelines: &Lifelines,
    token_timeout: Duration,
    unauthenticated: &AtomicU32,
    stop: &CancellationToken,
) {
    let mut preamble = [0u8; 20];
    let read = tokio::time::timeout(token_timeout, socket.read_exact(&mut preamble)).await;
    unauthenticated.fetch_sub(1, Ordering::Relaxed);
    match read {
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
