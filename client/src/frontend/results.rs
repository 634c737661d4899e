//! The frontend's result endpoint: queriers (querier certificates only) open one stream
//! per result, or carry many small whole results on one shared stream per connection; the
//! query table decides whether a result is taken; a streamed body goes to the caller
//! through a bounded channel, so a slow reader slows the querier, not memory.

use std::sync::{Arc, Mutex};

use sluice_protocol::{
    DecodeError, FramedRead, FramedWrite, QueryId, ReadError, ReceiveBudget, RefuseReason, ResultAck, ResultFrame,
    ResultReceipt, Role, StreamKind, close_code,
};
use tokio::sync::mpsc;
use tracing::warn;

use super::{Body, Claim, QueryResponse, Shared};
use crate::error::QueryError;
use crate::lifecycle::{Event, Now};
use crate::tls;

/// Chunks buffered between the result stream and the caller's body reader.
const BODY_BUFFER: usize = 16;
/// A querier connection's streams may buffer this many whole frames together: room for
/// many results streaming at once (each holds at most one chunk frame), but not for a
/// querier that starts a large frame on every stream and parks it.
const FRAMES_PER_CONNECTION: usize = 4;

pub(super) async fn endpoint_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            match tls::peer_role(&conn) {
                Ok(Role::Querier) => {}
                other => {
                    warn!(remote = %conn.remote_address(), ?other, "refusing a result connection from a non-querier");
                    conn.close(
                        close_code::ROLE_NOT_ALLOWED.into(),
                        b"only queriers may deliver results",
                    );
                    return;
                }
            }
            shared.quic.track(Role::Querier, &conn);
            // Whatever one querier connection's streams buffer, together.
            let budget = ReceiveBudget::new(shared.config.client.max_frame_len as usize * FRAMES_PER_CONNECTION);
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(receive_result(shared.clone(), conn.clone(), budget.clone(), send, recv));
            }
        });
    }
}

/// Reads one result stream and hands it to the waiting query.
async fn receive_result(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    budget: ReceiveBudget,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let max = shared.config.client.max_frame_len;
    let mut reader = FramedRead::new(recv, max)
        .with_budget(budget)
        .with_frame_timeout(shared.config.client.idle_timeout);
    let mut writer = FramedWrite::new(send, max);
    // The hello is not answered: the result follows it at once. A querier whose hello
    // cannot be accepted loses its connection, with the reason.
    let refusal = match tokio::time::timeout(shared.config.client.idle_timeout, reader.hello()).await {
        Ok(Ok(Some(h))) if h.role == Role::Querier && h.stream == StreamKind::Result => None,
        Ok(Ok(Some(h))) if h.role == Role::Querier && h.stream == StreamKind::Results => {
            return receive_results(&shared, &conn, reader, writer).await;
        }
        Ok(Err(ReadError::Decode(DecodeError::UnsupportedVersion { got, supported }))) => Some(format!(
            "protocol version {got} is not supported; this frontend speaks {supported}"
        )),
        Ok(Ok(None)) => return,
        _ => Some("expected a result hello".to_string()),
    };
    if let Some(reason) = refusal {
        warn!(remote = %conn.remote_address(), %reason, "refusing a result stream; closing the connection");
        conn.close(close_code::PROTOCOL_ERROR.into(), reason.as_bytes());
        return;
    }
    let Some(receipt) = deliver(&shared, &mut reader).await else {
        // The deadline ended the query while its body streamed: stop the querier's sending.
        let _ = reader.get_mut().stop(close_code::DONE.into());
        return;
    };
    let _ = writer.send(&receipt).await;
    let _ = writer.get_mut().finish();
}

/// Reads a shared results stream: each frame a whole result, each answered by an ack in
/// order; acks written together when no further result is waiting to be read. The results
/// that arrived together go to the query table together, under one lock of it.
async fn receive_results(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    mut reader: FramedRead<quinn::RecvStream>,
    mut writer: FramedWrite<quinn::SendStream>,
) {
    // Per result read: its query, and its response if it is a whole result (`None`: the
    // querier's failure report).
    let mut read: Vec<(QueryId, Option<QueryResponse>)> = Vec::new();
    let (mut events, mut claims) = (Vec::new(), Vec::new());
    loop {
        let mut next = tokio::select! {
            biased;
            frame = reader.next::<ResultFrame>() => frame,
            () = std::future::ready(()), if writer.buffered() > 0 => {
                if writer.flush().await.is_err() {
                    return;
                }
                continue;
            }
        };
        // `Some(true)`: the stream ended cleanly; `Some(false)`: it broke the protocol.
        let ended = loop {
            match next {
                Ok(Some(ResultFrame::Whole {
                    query_id,
                    tenant,
                    capability,
                    status,
                    metadata,
                    body,
                })) => {
                    events.push(Event::ResultWhole {
                        id: query_id,
                        tenant,
                        capability,
                    });
                    let response = QueryResponse {
                        status,
                        metadata,
                        body: Body::whole(body),
                    };
                    read.push((query_id, Some(response)));
                }
                Ok(Some(ResultFrame::Error {
                    query_id,
                    tenant,
                    capability,
                    message,
                })) => {
                    events.push(Event::ResultError {
                        id: query_id,
                        tenant,
                        capability,
                        message,
                    });
                    read.push((query_id, None));
                }
                Ok(None) => break Some(true),
                Ok(Some(_)) | Err(_) => break Some(false),
            }
            next = match reader.try_next::<ResultFrame>() {
                Ok(None) => break None,
                more => more,
            };
        };
        shared.events(&mut events, Some(&mut claims));
        // Every taken result reaches its caller, even if an ack could not be written.
        let mut acked = true;
        for ((query_id, response), claim) in read.drain(..).zip(claims.drain(..)) {
            let receipt = answer(response, claim);
            acked = acked && writer.buffer(&ResultAck { query_id, receipt }).is_ok();
        }
        if !acked {
            return;
        }
        match ended {
            None => {}
            Some(true) => {
                let _ = writer.flush().await;
                let _ = writer.get_mut().finish();
                return;
            }
            Some(false) => {
                warn!(remote = %conn.remote_address(), "a shared results stream broke the protocol; closing the connection");
                conn.close(
                    close_code::PROTOCOL_ERROR.into(),
                    b"a shared results stream carries whole results only",
                );
                return;
            }
        }
    }
}

/// Hands a querier's failure report to its query; the receipt to send back.
fn take_error(
    shared: &Arc<Shared>,
    id: QueryId,
    tenant: String,
    capability: sluice_protocol::Capability,
    message: String,
) -> ResultReceipt {
    let event = Event::ResultError {
        id,
        tenant,
        capability,
        message,
    };
    answer(None, shared.event_with(event, None, Now::lazy()))
}

/// What the table's `claim` on a result means: a whole result (`response`) goes to its
/// caller if taken; the receipt to send back. A failure report (`response` `None`) for a
/// query that already ended is acknowledged: there is nothing to retry.
fn answer(response: Option<QueryResponse>, claim: Option<Claim>) -> ResultReceipt {
    match (response, claim) {
        (Some(response), Some(Claim::Whole { done })) => {
            let _ = done.send(Ok(response));
            ResultReceipt::Delivered
        }
        (_, Some(Claim::Refused(reason))) => ResultReceipt::Refused { reason },
        (Some(_), _) => ResultReceipt::Refused {
            reason: RefuseReason::UnknownQuery,
        },
        (None, _) => ResultReceipt::Delivered,
    }
}

/// Delivers the result on `reader` to its query; `None` when the query's deadline cut
/// the body short. The stream may open with the querier's confirmation (`Started`), the
/// result following on it when the handler is done.
async fn deliver(shared: &Arc<Shared>, reader: &mut FramedRead<quinn::RecvStream>) -> Option<ResultReceipt> {
    let refused = |reason| Some(ResultReceipt::Refused { reason });
    let mut first = reader.next::<ResultFrame>().await;
    let mut confirmed = None;
    if let Ok(Some(ResultFrame::Started {
        query_id,
        tenant,
        capability,
    })) = first
    {
        let event = Event::ResultStarted {
            id: query_id,
            tenant,
            capability,
        };
        match shared.event_with(event, None, Now::lazy()) {
            Some(Claim::Confirmed) => {}
            Some(Claim::Refused(reason)) => return refused(reason),
            _ => return refused(RefuseReason::UnknownQuery),
        }
        confirmed = Some(query_id);
        first = reader.next::<ResultFrame>().await;
    }
    let (query_id, tenant, capability, status, metadata) = match first {
        Ok(Some(ResultFrame::Head {
            query_id,
            tenant,
            capability,
            status,
            metadata,
        })) if confirmed.is_none_or(|c| c == query_id) => (query_id, tenant, capability, status, metadata),
        Ok(Some(ResultFrame::Error {
            query_id,
            tenant,
            capability,
            message,
        })) if confirmed.is_none_or(|c| c == query_id) => {
            return Some(take_error(shared, query_id, tenant, capability, message));
        }
        // A confirmed query whose stream broke before its result stays confirmed: its
        // querier delivers on a new stream, or its scheduler reports the querier gone.
        _ => return refused(RefuseReason::Malformed),
    };
    let head = Event::ResultHead {
        id: query_id,
        tenant,
        capability,
    };
    let (done, mut abort) = match shared.event_with(head, None, Now::lazy()) {
        Some(Claim::Accepted { done, abort }) => (done, abort),
        Some(Claim::Refused(reason)) => return refused(reason),
        _ => return refused(RefuseReason::UnknownQuery),
    };
    let (body_tx, rx) = mpsc::channel(BODY_BUFFER);
    let failure = Arc::new(Mutex::new(None));
    let _ = done.send(Ok(QueryResponse {
        status,
        metadata,
        body: Body::streamed(rx, failure.clone()),
    }));
    let (outcome, error) = tokio::select! {
        (receipt, error) = stream_body(reader, &body_tx) => (Some(receipt), error),
        error = &mut abort => (None, error.ok()),
    };
    // The error is in place before the sender goes, so the reader sees it after the
    // chunks it already has, never a clean end.
    *failure.lock().unwrap() = error;
    drop(body_tx);
    finish(shared, query_id);
    outcome
}

/// Copies chunks into the caller's body until the result ends; returns the receipt and,
/// for a body that did not end cleanly, its error.
async fn stream_body(
    reader: &mut FramedRead<quinn::RecvStream>,
    body: &mpsc::Sender<bytes::Bytes>,
) -> (ResultReceipt, Option<QueryError>) {
    let mut received: u64 = 0;
    let malformed = ResultReceipt::Refused {
        reason: RefuseReason::Malformed,
    };
    loop {
        match reader.next::<ResultFrame>().await {
            Ok(Some(ResultFrame::Chunk(bytes))) => {
                received += bytes.len() as u64;
                if body.send(bytes).await.is_err() {
                    return (ResultReceipt::Delivered, None); // the caller stopped reading
                }
            }
            Ok(Some(ResultFrame::End { total_len })) if total_len == received => {
                return (ResultReceipt::Delivered, None);
            }
            Ok(Some(ResultFrame::Abort { message })) => {
                return (ResultReceipt::Delivered, Some(QueryError::Failed(message)));
            }
            Ok(Some(_)) => return (malformed, Some(QueryError::Protocol("malformed result stream".into()))),
            Ok(None) | Err(_) => {
                return (
                    malformed,
                    Some(QueryError::QuerierFailed("result stream broken".into())),
                );
            }
        }
    }
}

fn finish(shared: &Shared, id: QueryId) {
    shared.event(Event::ResultEnd { id });
}
