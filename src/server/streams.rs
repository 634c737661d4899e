//! One task per stream: the hello, then the frontend loop, a querier's dequeue loop, or a
//! querier's shutdown notice. Each loop has a reader (frames → dispatcher commands) and
//! a writer task (dispatcher messages → frames, batched into one write when several wait).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use sluice_protocol::{
    FramedRead, FramedWrite, FrontendToScheduler, Hello, HelloReply, MAX_ID_LEN, Notice, NoticeReply,
    QuerierToScheduler, ReadError, RejectCode, Role, SchedulerToQuerier, StreamKind, close_code,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::dispatcher::{Command, OUTBOX_CAPACITY, Outbox};
use super::{ConnectionState, StreamLimits, may_open};

type Reader = FramedRead<quinn::RecvStream>;
type Writer = FramedWrite<quinn::SendStream>;

pub(crate) async fn serve_stream(
    conn: quinn::Connection,
    role: Role,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    commands: mpsc::Sender<Command>,
    limits: StreamLimits,
    connection: Arc<ConnectionState>,
) {
    let mut reader = FramedRead::new(recv, limits.limits.max_frame_len)
        .with_frame_timeout(limits.frame_timeout)
        .with_budget(connection.budget.clone());
    let mut writer = FramedWrite::new(send, limits.limits.max_frame_len);
    let hello = match tokio::time::timeout(limits.hello_timeout, reader.hello()).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return,
        Ok(Err(ReadError::Decode(sluice_protocol::DecodeError::UnsupportedVersion { got, supported }))) => {
            let message = format!("protocol version {got} is not supported; this scheduler speaks {supported}");
            reject(&mut writer, RejectCode::UnsupportedVersion, message).await;
            return;
        }
        Ok(Err(e)) => {
            protocol_error(&conn, &format!("bad hello: {e}"));
            return;
        }
        Err(_) => {
            writer.get_mut().reset(close_code::HELLO_TIMEOUT.into()).ok();
            return;
        }
    };
    if hello.role != role {
        let message = format!("hello claims role {:?} but the certificate says {:?}", hello.role, role);
        reject(&mut writer, RejectCode::RoleNotAllowed, message).await;
        return;
    }
    if !may_open(role, hello.stream) {
        let message = format!("a {role:?} may not open a {:?} stream on a scheduler", hello.stream);
        reject(&mut writer, RejectCode::RoleNotAllowed, message).await;
        return;
    }
    if hello.id.is_empty() || hello.id.len() > MAX_ID_LEN {
        let message = format!("the id must be 1 to {MAX_ID_LEN} bytes long");
        reject(&mut writer, RejectCode::InvalidHello, message).await;
        return;
    }
    match hello.stream {
        StreamKind::FrontendLoop if connection.frontend_loop_open.swap(true, Ordering::Relaxed) => {
            let message = "one frontend loop per connection".to_string();
            reject(&mut writer, RejectCode::InvalidHello, message).await;
            return;
        }
        StreamKind::DequeueLoop => {
            connection.querier_ids.lock().unwrap().insert(hello.id.clone());
        }
        StreamKind::ShutdownNotice if !connection.querier_ids.lock().unwrap().contains(&hello.id) => {
            // A querier speaks only for itself: the id of a worker on this connection.
            let message = format!("no worker of querier {} on this connection", hello.id);
            reject(&mut writer, RejectCode::InvalidHello, message).await;
            return;
        }
        _ => {}
    }
    let welcome = HelloReply::Welcome {
        id: limits.scheduler_id.clone(),
        max_frame_len: limits.limits.max_frame_len,
    };
    if writer.send(&welcome).await.is_err() {
        return;
    }
    let kind = hello.stream;
    let mut s = Opened {
        conn,
        hello,
        reader,
        writer,
        commands,
        writers: limits.writers.clone(),
    };
    match kind {
        StreamKind::FrontendLoop => frontend_loop(s).await,
        StreamKind::DequeueLoop => {
            if let Some((port, token)) = connection.lifeline
                && s.writer
                    .send(&SchedulerToQuerier::Lifeline { port, token })
                    .await
                    .is_err()
            {
                return;
            }
            worker_loop(s).await
        }
        StreamKind::ShutdownNotice => notice(s).await,
        StreamKind::Result | StreamKind::Results => {} // refused by may_open
    }
}

async fn reject(writer: &mut Writer, code: RejectCode, message: String) {
    warn!(?code, %message, "refusing stream");
    let _ = writer.send(&HelloReply::Rejected { code, message }).await;
    let _ = writer.get_mut().finish();
}

/// Closes the whole connection of a peer that broke the protocol; other peers are
/// unaffected.
fn protocol_error(conn: &quinn::Connection, reason: &str) {
    warn!(remote = %conn.remote_address(), %reason, "protocol error; closing the connection");
    conn.close(close_code::PROTOCOL_ERROR.into(), reason.as_bytes());
}

/// Closes the connection of a peer whose replies piled up unread.
fn not_reading(conn: &quinn::Connection) {
    warn!(remote = %conn.remote_address(), "peer stopped reading its replies; closing the connection");
    conn.close(close_code::NOT_READING.into(), b"replies not read");
}

/// Forwards messages from the dispatcher to the stream until either side ends. When the
/// dispatcher lets go of the outbox (at shutdown), what is left is sent, the stream is
/// finished, and the task waits (bounded) for the peer to acknowledge it, so the server
/// can wait on `writers` before closing the endpoint instead of sleeping.
fn spawn_writer<T: Serialize + Send + 'static>(
    writers: &TaskTracker,
    mut writer: Writer,
    mut rx: mpsc::Receiver<T>,
) -> tokio::task::JoinHandle<()> {
    writers.spawn(async move {
        if writer.pump(&mut rx).await.is_err() {
            return;
        }
        let stream = writer.get_mut();
        if stream.finish().is_ok() {
            let _ = tokio::time::timeout(FLUSH_WAIT, stream.stopped()).await;
        }
    })
}

/// How long a finished stream's writer waits for the peer to acknowledge what was sent.
pub(crate) const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Whether a read error means the peer closed its connection on purpose (code `DONE`),
/// as a frontend client does when it closes.
fn closed_on_purpose(e: &ReadError) -> bool {
    let ReadError::Io(io) = e else { return false };
    let Some(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(close))) =
        io.get_ref().and_then(|inner| inner.downcast_ref::<quinn::ReadError>())
    else {
        return false;
    };
    close.error_code == close_code::DONE.into()
}

/// A stream past its hello, with everything its loop needs.
struct Opened {
    conn: quinn::Connection,
    hello: Hello,
    reader: Reader,
    writer: Writer,
    commands: mpsc::Sender<Command>,
    writers: TaskTracker,
}

/// What the frontend and dequeue loops share: register with the dispatcher (which hands
/// back an id) and give it the connection's outbox, run the writer, turn each frame into a
/// command until the stream ends, the peer breaks the protocol or stops reading its
/// replies, then tell the dispatcher the peer is gone (and whether it left on purpose).
async fn conversation<In, Out, Id>(
    s: Opened,
    what: &str,
    open: impl FnOnce(Outbox<Out>, oneshot::Sender<Id>) -> Command,
    to_command: impl Fn(Id, In) -> Command,
    closed: impl FnOnce(Id, bool) -> Command,
) where
    In: serde::de::DeserializeOwned,
    Out: Serialize + Send + 'static,
    Id: Copy,
{
    let Opened {
        conn,
        hello,
        mut reader,
        writer,
        commands,
        writers,
    } = s;
    let (tx, rx, cut) = Outbox::new(OUTBOX_CAPACITY);
    let (reply, id) = oneshot::channel();
    if commands.send(open(tx, reply)).await.is_err() {
        return;
    }
    let Ok(id) = id.await else { return };
    let writer_task = spawn_writer(&writers, writer, rx);
    let mut graceful = false;
    // Made once, not per frame.
    let overflow = cut.overflow.cancelled();
    let violation = cut.violation.cancelled();
    tokio::pin!(overflow, violation);
    loop {
        let next = tokio::select! {
            biased;
            next = reader.next::<In>() => next,
            _ = &mut overflow => {
                not_reading(&conn);
                break;
            }
            _ = &mut violation => {
                protocol_error(&conn, &format!("{what}: a frame out of turn"));
                break;
            }
        };
        let msg = match next {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                graceful = true;
                break;
            }
            Err(e @ (ReadError::Decode(_) | ReadError::FrameTimeout { .. } | ReadError::BudgetExceeded { .. })) => {
                protocol_error(&conn, &format!("{what}: {e}"));
                break;
            }
            Err(e) => {
                graceful = closed_on_purpose(&e);
                debug!(peer = %hello.id, error = %e, graceful, "{what} ended");
                break;
            }
        };
        if commands.send(to_command(id, msg)).await.is_err() {
            break;
        }
    }
    let _ = commands.send(closed(id, graceful)).await;
    writer_task.abort();
}

async fn frontend_loop(s: Opened) {
    let name = s.hello.id.clone();
    conversation(
        s,
        "frontend loop",
        |tx, reply| Command::FrontendOpened { name, tx, reply },
        |frontend, msg| match msg {
            FrontendToScheduler::Enqueue(enqueue) => Command::Enqueue {
                frontend,
                enqueue: Box::new(enqueue),
                received: Instant::now(),
            },
            FrontendToScheduler::Cancel { query_id } => Command::Cancel {
                frontend,
                query: query_id,
            },
            FrontendToScheduler::ResultEndpoint(address) => Command::ResultEndpoint { frontend, address },
        },
        |frontend, graceful| Command::FrontendClosed { frontend, graceful },
    )
    .await
}

async fn worker_loop(s: Opened) {
    let querier = s.hello.id.clone();
    conversation(
        s,
        "dequeue loop",
        |tx, reply| Command::DequeueOpened { querier, tx, reply },
        |stream, msg| match msg {
            QuerierToScheduler::Ready { worker, finished } => Command::Ready {
                stream,
                worker,
                finished,
            },
            QuerierToScheduler::HandBack { worker, query_id } => Command::HandBack {
                stream,
                worker,
                query: query_id,
            },
            QuerierToScheduler::LoopSlots { slots_per_loop } => Command::LoopSlots { stream, slots_per_loop },
        },
        |stream, _| Command::DequeueClosed { stream },
    )
    .await
}

async fn notice(s: Opened) {
    let Opened {
        conn,
        hello,
        mut reader,
        mut writer,
        commands,
        ..
    } = s;
    match reader.next::<Notice>().await {
        Ok(Some(Notice::QuerierShuttingDown)) => {
            let (reply, done) = oneshot::channel();
            let cmd = Command::QuerierShuttingDown {
                querier: hello.id,
                reply,
            };
            if commands.send(cmd).await.is_ok() && done.await.is_ok() {
                let _ = writer.send(&NoticeReply::Acknowledged).await;
                let _ = writer.get_mut().finish();
            }
        }
        Ok(None) => {}
        Err(e) => protocol_error(&conn, &format!("shutdown notice: {e}")),
    }
}
