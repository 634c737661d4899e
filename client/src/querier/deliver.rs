//! Sending a result straight to its frontend: one cached QUIC connection per frontend
//! address ([`frontends`]). A small whole result (body ≤ 16 KiB, no early stream) becomes
//! one `Whole` frame that the link's task queues on the connection's shared results stream
//! (`batch`). Anything else — a streamed or large body, a result whose stream opened early,
//! or one the shared stream did not carry — has a stream of its own, sent by a task of its
//! own ([`hand_off`]), which needs no round trip before its result (the hello goes with the
//! first frames). Either way the worker takes its next query at once; the sender waits for
//! the frontend's receipt and retries on a new stream if the transport failed.

use std::sync::Arc;
use std::time::Duration;

use sluice_protocol::{
    Dispatch, FramedRead, FramedWrite, FrontendAddress, Hello, MIN_FRAME_LEN, RefuseReason, ResultFrame, ResultReceipt,
    Role, StreamKind, WriteError, metadata_len_bound,
};

use super::{CHUNK_FRAME_OVERHEAD, HandlerError, Response, ResponseBody, Shared, Stream, frontends};

/// Longest handler error message sent; a longer one is cut at a character boundary and
/// says how much was cut.
pub(super) const MAX_ERROR_MESSAGE: usize = 16 * 1024;

/// Room in a result's head frame for all but its metadata (ids, tenant, capability, status).
const HEAD_ROOM: usize = 4 * 1024;

/// The handler's outcome made sendable: an error message cut to [`MAX_ERROR_MESSAGE`], and
/// a response whose metadata cannot fit in a frame of `max_frame_len` turned into an error
/// that says so. Either would otherwise fail to encode, and its query would end only at
/// its deadline, as if the querier had never answered.
pub(super) fn fit_to_frame(
    outcome: Result<Response, HandlerError>,
    max_frame_len: u32,
) -> Result<Response, HandlerError> {
    match outcome {
        Err(HandlerError(mut message)) if message.len() > MAX_ERROR_MESSAGE => {
            let mut end = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            let cut = message.len() - end;
            message.truncate(end);
            message.push_str(&format!("… ({cut} more bytes cut)"));
            Err(HandlerError(message))
        }
        Ok(r) if metadata_len_bound(&r.metadata) + HEAD_ROOM > max_frame_len as usize => Err(HandlerError(format!(
            "the handler's response metadata takes {} bytes; a result's head must fit in one frame of \
             {max_frame_len} bytes (max_frame_len)",
            metadata_len_bound(&r.metadata)
        ))),
        other => other,
    }
}

/// The largest frame a result to `to` may take: the smaller of this querier's limit and
/// the one the frontend announced (never below the protocol's floor, whatever it says).
pub(super) fn result_frame_len(shared: &Shared, to: &FrontendAddress) -> u32 {
    shared
        .config
        .client
        .max_frame_len
        .min(to.max_frame_len.max(MIN_FRAME_LEN))
}

async fn frontend_connection(shared: &Shared, to: &FrontendAddress) -> Result<quinn::Connection, String> {
    frontends::connect(&shared.endpoint, &shared.frontends.slot(&to.address), to, &shared.quic).await
}

/// Opens a result stream to `to` on `conn` with its hello buffered (not sent): it leaves
/// with the stream's first frames. The frontend sends nothing back but the receipt.
async fn open_result(shared: &Shared, conn: &quinn::Connection, to: &FrontendAddress) -> Result<Stream, String> {
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let (mut w, r) = (
        FramedWrite::new(send, result_frame_len(shared, to)),
        FramedRead::new(recv, shared.config.client.max_frame_len),
    );
    w.buffer(&Hello::new(Role::Querier, &shared.config.client.id, StreamKind::Result))
        .map_err(|e| e.to_string())?;
    Ok((w, r))
}

/// A result stream opened before the result is ready, after the `Started` frame.
pub(super) type Early = tokio::task::JoinHandle<Result<Stream, String>>;

/// Opens the query's result stream now and says `Started`: the frontend learns that this
/// querier runs the query (so it cannot have been lost with its scheduler). The result
/// follows on the same stream.
pub(super) fn confirm(shared: &Arc<Shared>, d: &Dispatch) -> Early {
    let (shared, frontend) = (shared.clone(), d.frontend.clone());
    let started = ResultFrame::Started {
        query_id: d.query_id,
        tenant: d.tenant.clone(),
        capability: d.capability,
    };
    tokio::spawn(async move {
        let conn = frontend_connection(&shared, &frontend).await?;
        let (mut w, r) = open_result(&shared, &conn, &frontend).await?;
        w.send(&started).await.map_err(|e| e.to_string())?;
        Ok((w, r))
    })
}

/// The sending of one result, to run as a task of its own (the dequeue driver spawns it
/// and aborts it if the querier is aborted), so the worker can take its next query while
/// the result travels and its receipt comes back.
pub(super) fn hand_off(
    shared: &Arc<Shared>,
    d: Box<Dispatch>,
    outcome: Result<Response, HandlerError>,
    deadline: Option<tokio::time::Instant>,
    early: Option<Early>,
    again: bool,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let shared = shared.clone();
    async move {
        if let Err(e) = deliver(&shared, &d, outcome, deadline, early, again).await {
            tracing::warn!(query = d.query_id, frontend = %d.frontend.address, error = %e, "result not delivered");
        }
    }
}

/// Sends a result to its frontend (on the early stream if one was opened), retrying
/// transport failures while the body can be sent again (a streamed body is sent once),
/// never past the query's deadline. `again`: an earlier copy may have reached the frontend
/// (the shared stream broke before its ack); a `Duplicate` refusal then means it did.
async fn deliver(
    shared: &Shared,
    d: &Dispatch,
    outcome: Result<Response, HandlerError>,
    deadline: Option<tokio::time::Instant>,
    mut early: Option<Early>,
    mut again: bool,
) -> Result<(), String> {
    let attempts = async {
        let (head, mut body) = match outcome {
            Ok(resp) => (
                ResultFrame::Head {
                    query_id: d.query_id,
                    tenant: d.tenant.clone(),
                    capability: d.capability,
                    status: resp.status,
                    metadata: resp.metadata,
                },
                Some(resp.body),
            ),
            Err(HandlerError(message)) => (
                ResultFrame::Error {
                    query_id: d.query_id,
                    tenant: d.tenant.clone(),
                    capability: d.capability,
                    message,
                },
                None,
            ),
        };
        let mut last = String::new();
        for attempt in 1..=shared.config.delivery_attempts {
            let opened = match early.take() {
                Some(task) => task.await.unwrap_or_else(|e| Err(e.to_string())),
                None => Err(String::new()),
            };
            let stream = match opened {
                Ok(stream) => stream,
                Err(_) => {
                    let opened = async {
                        let conn = frontend_connection(shared, &d.frontend).await?;
                        open_result(shared, &conn, &d.frontend).await
                    };
                    match opened.await {
                        Ok(stream) => stream,
                        Err(e) => {
                            last = e;
                            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                            continue;
                        }
                    }
                }
            };
            let streamed = matches!(body, Some(ResponseBody::Stream(_)));
            match send_result(shared, stream, &head, &mut body).await {
                Ok(ResultReceipt::Delivered) => return Ok(()),
                Ok(ResultReceipt::Refused {
                    reason: RefuseReason::Duplicate,
                }) if again => {
                    tracing::debug!(query = d.query_id, "an earlier copy of the result was delivered");
                    return Ok(());
                }
                Ok(ResultReceipt::Refused { reason }) => {
                    return Err(format!("frontend refused the result: {reason:?}"));
                }
                Err(e) if streamed => return Err(format!("streamed result broken: {e}")),
                Err(e) => {
                    // Sent, perhaps taken, and the receipt lost.
                    last = e;
                    again = true;
                }
            }
        }
        Err(last)
    };
    match deadline {
        Some(at) => tokio::time::timeout_at(at, attempts)
            .await
            .map_err(|_| "the query's deadline passed while delivering".to_string())?,
        None => attempts.await,
    }
}

async fn send_result(
    shared: &Shared,
    (mut w, mut r): Stream,
    head: &ResultFrame,
    body: &mut Option<ResponseBody>,
) -> Result<ResultReceipt, String> {
    let io = |e: WriteError| e.to_string();
    let encode = |e: sluice_protocol::EncodeError| e.to_string();
    // Chunk frames fit the frame limit the stream was opened with (the frontend's, when
    // it reads smaller frames than this querier's chunks).
    let chunk = shared
        .config
        .chunk_size
        .min(w.max_frame_len() as usize - CHUNK_FRAME_OVERHEAD);
    // Frames are buffered and written when a chunk's worth is waiting, so a small result
    // (head, body, end) leaves in one write.
    w.buffer(head).map_err(encode)?;
    if let Some(b) = body {
        let mut total: u64 = 0;
        match b {
            ResponseBody::Bytes(bytes) => {
                let mut rest = bytes.clone();
                while !rest.is_empty() {
                    let piece = rest.split_to(chunk.min(rest.len()));
                    total += piece.len() as u64;
                    w.buffer(&ResultFrame::Chunk(piece)).map_err(encode)?;
                    if w.buffered() >= chunk {
                        w.flush().await.map_err(io)?;
                    }
                }
                w.buffer(&ResultFrame::End { total_len: total }).map_err(encode)?;
            }
            ResponseBody::Stream(stream) => {
                // Whatever is buffered goes out before waiting on the producer.
                w.flush().await.map_err(io)?;
                let end = loop {
                    match stream.next().await {
                        Ok(Some(mut bytes)) => {
                            while !bytes.is_empty() {
                                let piece = bytes.split_to(chunk.min(bytes.len()));
                                total += piece.len() as u64;
                                w.send(&ResultFrame::Chunk(piece)).await.map_err(io)?;
                            }
                        }
                        Ok(None) => break ResultFrame::End { total_len: total },
                        Err(message) => break ResultFrame::Abort { message },
                    }
                };
                w.buffer(&end).map_err(encode)?;
            }
        }
    }
    w.flush().await.map_err(io)?;
    let _ = w.get_mut().finish();
    r.next::<ResultReceipt>()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "frontend closed without a receipt".into())
}
