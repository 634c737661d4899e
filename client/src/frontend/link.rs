//! One scheduler connection of the frontend: connect, say hello, announce the result
//! endpoint, then move frames between the frontend loop stream and the query table until
//! the connection ends; reconnect with capped, jittered backoff while the link is wanted.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sluice_protocol::{
    FramedRead, FramedWrite, FrontendToScheduler, Hello, HelloReply, Role, SchedulerToFrontend, StreamKind, close_code,
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::outgoing::Outgoing;
use super::{Link, Shared};
use crate::backoff::Backoff;
use crate::lifecycle::{Event, SchedulerIx};
use crate::tls;

/// Keeps one scheduler connected until the frontend closes or the link is no longer
/// wanted.
pub(super) async fn scheduler_loop(shared: Arc<Shared>, s: SchedulerIx, link: Arc<Link>, endpoint: quinn::Endpoint) {
    let mut backoff = Backoff::new(s as u64 ^ u64::from(link.addr.port()));
    let addr = link.addr;
    while !shared.stop.is_cancelled() && !link.stop.is_cancelled() {
        match serve_scheduler(&shared, s, &link, &endpoint, &mut backoff).await {
            Ok(()) => debug!(%addr, "scheduler connection closed"),
            Err(e) => warn!(%addr, error = %e, "cannot reach scheduler"),
        }
        *link.tx.lock().unwrap() = None;
        shared.event(Event::SchedulerDown { scheduler: s });
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shared.stop.cancelled() => break,
            _ = link.stop.cancelled() => break,
        }
    }
}

async fn serve_scheduler(
    shared: &Arc<Shared>,
    s: SchedulerIx,
    link: &Link,
    endpoint: &quinn::Endpoint,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let connecting = endpoint
        .connect(link.addr, &shared.config.client.scheduler_server_name)
        .map_err(|e| e.to_string())?;
    let conn = tokio::select! {
        conn = connecting => conn.map_err(|e| e.to_string())?,
        _ = link.stop.cancelled() => return Ok(()),
    };
    tls::expect_peer_role(&conn, Role::Scheduler)?;
    shared.quic.track(Role::Scheduler, &conn);
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let max = shared.config.client.max_frame_len;
    let mut writer = FramedWrite::new(send, max);
    let mut reader = FramedRead::new(recv, max);
    writer
        .send(&Hello::new(
            Role::Frontend,
            &shared.config.client.id,
            StreamKind::FrontendLoop,
        ))
        .await
        .map_err(|e| e.to_string())?;
    match reader.next::<HelloReply>().await.map_err(|e| e.to_string())? {
        Some(HelloReply::Welcome { max_frame_len, .. }) => link.max_frame_len.store(max_frame_len, Ordering::Relaxed),
        Some(HelloReply::Rejected { code, message }) => return Err(format!("refused ({code:?}): {message}")),
        None => return Err("closed before the hello reply".into()),
    }
    writer
        .send(&FrontendToScheduler::ResultEndpoint(shared.address.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    *link.tx.lock().unwrap() = Some(tx);
    backoff.reset();
    shared.event(Event::SchedulerUp {
        scheduler: s,
        in_use: link.in_use.load(Ordering::Relaxed),
    });
    let writer_task = tokio::spawn(async move {
        let _ = writer.pump(&mut rx).await;
    });
    // Waited on by every turn of the loop, registered once (not once per frame).
    let frontend_stop = shared.stop.cancelled();
    let link_stop = link.stop.cancelled();
    tokio::pin!(frontend_stop, link_stop);
    let mut events = Vec::new();
    let result = loop {
        tokio::select! {
            msg = reader.next::<SchedulerToFrontend>() => match msg {
                Ok(Some(m)) => {
                    // The frames that arrived with it go to the table with it, under one
                    // lock of the table.
                    let mut next = Ok(Some(m));
                    while let Ok(Some(m)) = next {
                        match event_of(s, m) {
                            Ok(event) => events.push(event),
                            Err(cancelled) => {
                                // In order: what came before it first.
                                shared.events(&mut events, None);
                                shared.cancel_acknowledged(cancelled);
                            }
                        }
                        next = reader.try_next::<SchedulerToFrontend>();
                    }
                    shared.events(&mut events, None);
                    if let Err(e) = next {
                        break Err(e.to_string());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.to_string()),
            },
            _ = &mut frontend_stop => {
                conn.close(close_code::DONE.into(), b"frontend closing");
                break Ok(());
            }
            _ = &mut link_stop => {
                conn.close(close_code::DONE.into(), b"scheduler no longer in use");
                break Ok(());
            }
        }
    };
    writer_task.abort();
    result
}

/// The table's event for a frame from scheduler `s`, or the query whose cancel it
/// acknowledges (which only wakes a waiting `QueryHandle::cancel`).
fn event_of(s: SchedulerIx, msg: SchedulerToFrontend) -> Result<Event, sluice_protocol::QueryId> {
    Ok(match msg {
        SchedulerToFrontend::EnqueueStatus {
            query_id,
            status,
            load,
            estimated_wait_ms,
        } => Event::Status {
            scheduler: s,
            id: query_id,
            status,
            queued: load.queued,
            estimated_wait: estimated_wait_ms.map(std::time::Duration::from_millis),
        },
        SchedulerToFrontend::QueryError {
            query_id,
            kind,
            message,
        } => Event::SchedulerError {
            scheduler: s,
            id: query_id,
            kind,
            message,
        },
        SchedulerToFrontend::ShuttingDown => Event::SchedulerDraining { scheduler: s },
        SchedulerToFrontend::Dispatched { query_ids } => Event::Dispatched {
            scheduler: s,
            ids: query_ids,
        },
        SchedulerToFrontend::Cancelled { query_id } => return Err(query_id),
    })
}
