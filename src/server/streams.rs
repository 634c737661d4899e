//! One task per stream: the hello, then the frontend loop, a worker's dequeue loop, or a
//! querier's shutdown notice. Each loop has a reader (frames → dispatcher commands) and
//! a writer task (dispatcher messages → frames, batched into one write when several wait).

use std::time::Instant;

use serde::Serialize;
use sluice_protocol::{
    FramedRead, FramedWrite, FrontendToScheduler, Hello, HelloReply, Notice, NoticeReply, QuerierToScheduler,
    ReadError, RejectCode, Role, SchedulerToQuerier, StreamKind, close_code,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::dispatcher::{Command, OUTBOX_CAPACITY, Outbox};
use super::{StreamLimits, may_open};

type Reader = FramedRead<quinn::RecvStream>;
type Writer = FramedWrite<quinn::SendStream>;

pub(crate) async fn serve_stream(
    conn: quinn::Connection,
    role: Role,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    commands: mpsc::Sender<Command>,
    limits: StreamLimits,
    lifeline: Option<(u16, u128)>,
) {
    let mut reader = FramedRead::new(recv, limits.limits.max_frame_len);
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
    if hello.id.is_empty() {
        reject(&mut writer, RejectCode::InvalidHello, "empty id".into()).await;
        return;
    }
    let welcome = HelloReply::Welcome {
        id: limits.scheduler_id.clone(),
    };
    if writer.send(&welcome).await.is_err() {
        return;
    }
    match hello.stream {
        StreamKind::FrontendLoop => frontend_loop(conn, hello, reader, writer, commands).await,
        StreamKind::DequeueLoop => {
            let mut writer = writer;
            if let Some((port, token)) = lifeline
                && writer
                    .send(&SchedulerToQuerier::Lifeline { port, token })
                    .await
                    .is_err()
            {
                return;
            }
            worker_loop(conn, hello, reader, writer, commands).await
        }
        StreamKind::ShutdownNotice => notice(conn, hello, reader, writer, commands).await,
        StreamKind::Result => {} // refused by may_open
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

/// Forwards messages from the dispatcher to the stream until either side ends.
fn spawn_writer<T: Serialize + Send + 'static>(
    mut writer: Writer,
    mut rx: mpsc::Receiver<T>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = Some(first);
            while let Some(m) = batch.take().or_else(|| rx.try_recv().ok()) {
                if writer.buffer(&m).is_err() {
                    return;
                }
            }
            if writer.flush().await.is_err() {
                return;
            }
        }
        let _ = writer.get_mut().finish();
    })
}

async fn frontend_loop(
    conn: quinn::Connection,
    hello: Hello,
    mut reader: Reader,
    writer: Writer,
    commands: mpsc::Sender<Command>,
) {
    let (tx, rx, overflow) = Outbox::new(OUTBOX_CAPACITY);
    let (reply, id) = oneshot::channel();
    let opened = Command::FrontendOpened {
        name: hello.id.clone(),
        tx,
        reply,
    };
    if commands.send(opened).await.is_err() {
        return;
    }
    let Ok(frontend) = id.await else { return };
    let writer_task = spawn_writer(writer, rx);
    loop {
        let next = tokio::select! {
            next = reader.next::<FrontendToScheduler>() => next,
            _ = overflow.cancelled() => {
                not_reading(&conn);
                break;
            }
        };
        let cmd = match next {
            Ok(Some(FrontendToScheduler::Enqueue(enqueue))) => Command::Enqueue {
                frontend,
                enqueue: Box::new(enqueue),
                received: Instant::now(),
            },
            Ok(Some(FrontendToScheduler::Cancel { query_id })) => Command::Cancel {
                frontend,
                query: query_id,
            },
            Ok(Some(FrontendToScheduler::ResultEndpoint(address))) => Command::ResultEndpoint { frontend, address },
            Ok(None) => break,
            Err(ReadError::Decode(e)) => {
                protocol_error(&conn, &format!("frontend loop: {e}"));
                break;
            }
            Err(e) => {
                debug!(frontend = %hello.id, error = %e, "frontend stream ended");
                break;
            }
        };
        if commands.send(cmd).await.is_err() {
            break;
        }
    }
    let _ = commands.send(Command::FrontendClosed { frontend }).await;
    writer_task.abort();
}

async fn worker_loop(
    conn: quinn::Connection,
    hello: Hello,
    mut reader: Reader,
    writer: Writer,
    commands: mpsc::Sender<Command>,
) {
    let (tx, rx, overflow) = Outbox::new(OUTBOX_CAPACITY);
    let (reply, id) = oneshot::channel();
    let opened = Command::WorkerOpened {
        querier: hello.id.clone(),
        tx,
        reply,
    };
    if commands.send(opened).await.is_err() {
        return;
    }
    let Ok(worker) = id.await else { return };
    let writer_task = spawn_writer(writer, rx);
    loop {
        let next = tokio::select! {
            next = reader.next::<QuerierToScheduler>() => next,
            _ = overflow.cancelled() => {
                not_reading(&conn);
                break;
            }
        };
        let cmd = match next {
            Ok(Some(QuerierToScheduler::Ready { finished })) => Command::Ready { worker, finished },
            Ok(None) => break,
            Err(ReadError::Decode(e)) => {
                protocol_error(&conn, &format!("dequeue loop: {e}"));
                break;
            }
            Err(e) => {
                debug!(querier = %hello.id, error = %e, "worker stream ended");
                break;
            }
        };
        if commands.send(cmd).await.is_err() {
            break;
        }
    }
    let _ = commands.send(Command::WorkerClosed { worker }).await;
    writer_task.abort();
}

async fn notice(
    conn: quinn::Connection,
    hello: Hello,
    mut reader: Reader,
    mut writer: Writer,
    commands: mpsc::Sender<Command>,
) {
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
