//! The admin HTTP listener: `/metrics` (Prometheus text), `/ready` (200 while serving,
//! 503 while draining), `/status` (JSON) and `/` (the same as a page a person can read).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use metrics::{counter, gauge};
use sluice_client::gossip::{MemberRole, MemberState};
use sluice_client::quic_stats::QuicStats;
use sluice_protocol::Role;

use super::accept::AcceptErrors;
use super::dispatcher::Command;
use super::status::{GossipView, Status};
use crate::metrics::{self as m, Metrics};

#[derive(Clone)]
pub(crate) struct AdminState {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) draining: Arc<AtomicBool>,
    pub(crate) gossip: Option<GossipView>,
    pub(crate) quic: Arc<QuicStats>,
}

/// Admin connections served at once; more are closed as they arrive.
pub(crate) const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this long.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// An admin connection is closed after this long, whatever it is doing (a slow reader of
/// a large `/status` included); Prometheus opens a new one per scrape if it must.
pub(crate) const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Serves the admin endpoints on `listener` until `stop` is cancelled: at most
/// [`MAX_ADMIN_CONNECTIONS`] at once, each bounded by [`HEADER_TIMEOUT`] and
/// [`CONNECTION_LIFETIME`]; failed accepts back off.
pub(crate) async fn serve(listener: tokio::net::TcpListener, state: AdminState, stop: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .route("/status", get(status_json))
        .route("/explain", get(explain))
        .route("/", get(status_html))
        .with_state(state);
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let mut errors = AcceptErrors::new("admin");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
        };
        let socket = match accepted {
            Ok((socket, _)) => {
                errors.succeeded();
                socket
            }
            Err(e) => {
                errors.failed(&e).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // over the cap: closed at once
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(socket), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_LIFETIME, connection) => {}
                _ = stop.cancelled() => {}
            }
            drop(slot);
        });
    }
}

/// Binds the admin listener.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn metrics(State(s): State<AdminState>) -> Response {
    if let Some(view) = &s.gossip {
        let g = view.snapshot();
        s.metrics.record(|| {
            for role in [MemberRole::Scheduler, MemberRole::Frontend, MemberRole::Querier] {
                for state in [MemberState::Joining, MemberState::Active, MemberState::Leaving] {
                    let n = g.members.iter().filter(|m| m.role == role && m.state == state).count();
                    gauge!(m::GOSSIP_MEMBERS, "role" => role.to_string(), "state" => state.to_string()).set(n as f64);
                }
            }
            for (outcome, v) in [("received", g.received), ("rejected", g.rejected), ("sent", g.sent)] {
                counter!(m::GOSSIP_PACKETS, "outcome" => outcome).absolute(v);
            }
        });
    }
    s.metrics.record(|| {
        for (r, role) in [(Role::Frontend, "frontend"), (Role::Querier, "querier")] {
            let t = s.quic.totals(r);
            for (direction, datagrams, bytes) in [
                ("sent", t.datagrams_sent, t.bytes_sent),
                ("received", t.datagrams_received, t.bytes_received),
            ] {
                counter!(m::QUIC_DATAGRAMS, "role" => role, "direction" => direction).absolute(datagrams);
                counter!(m::QUIC_BYTES, "role" => role, "direction" => direction).absolute(bytes);
            }
            gauge!(m::QUIC_CONNECTIONS, "role" => role).set(t.connections as f64);
            counter!(m::QUIC_SEND_CALLS, "role" => role).absolute(t.send_calls);
            counter!(m::QUIC_LOST_PACKETS, "role" => role).absolute(t.lost_packets);
            counter!(m::QUIC_CONGESTION_EVENTS, "role" => role).absolute(t.congestion_events);
        }
    });
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(),
    )
        .into_response()
}

async fn ready(State(s): State<AdminState>) -> Response {
    if s.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn snapshot(s: &AdminState) -> Option<Status> {
    let (reply, rx) = oneshot::channel();
    s.commands.send(Command::Status { reply }).await.ok()?;
    let mut status = rx.await.ok()?;
    status.gossip = s.gossip.as_ref().map(GossipView::snapshot);
    Some(status)
}

/// The queue tree as JSON: nodes (path, length, own FIFO, oldest age; a tenant's class,
/// weight, balance and shard size on its roots) and waiting requests (path, age, cost,
/// deadline), bounded; `truncated` says whether more exist.
async fn explain(State(s): State<AdminState>) -> Response {
    let (reply, rx) = oneshot::channel();
    if s.commands.send(Command::Explain { reply }).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response();
    }
    let Ok(e) = rx.await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response();
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let body = json!({
        "queued": e.queued,
        "truncated": e.truncated,
        "nodes": (0..e.nodes.len()).map(|i| {
            let n = &e.nodes[i];
            json!({
                "path": e.path(i),
                "queued": n.queued,
                "own": n.local,
                "oldest_ms": n.oldest.map(ms),
                "tenant": n.tenant.map(|t| json!({
                    "priority": t.priority, "weight": t.weight, "balance": t.balance, "shard_size": t.shard_size,
                })),
            })
        }).collect::<Vec<_>>(),
        "requests": e.requests.iter().map(|r| json!({
            "path": e.path(r.node),
            "frontend": r.key.frontend,
            "query": r.key.query,
            "age_ms": ms(r.age),
            "cost": r.cost,
            "deadline_in_ms": r.deadline_in.map(ms),
        })).collect::<Vec<_>>(),
    });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn status_json(State(s): State<AdminState>) -> Response {
    match snapshot(&s).await {
        Some(st) => ([(header::CONTENT_TYPE, "application/json")], to_json(&st).to_string()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response(),
    }
}

async fn status_html(State(s): State<AdminState>) -> Response {
    match snapshot(&s).await {
        Some(st) => Html(to_html(&st)).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response(),
    }
}

/// The status as JSON; durations in seconds.
pub(crate) fn to_json(s: &Status) -> serde_json::Value {
    let c = s.counters;
    json!({
        "scheduler_id": s.scheduler_id,
        "uptime_seconds": s.uptime.as_secs_f64(),
        "draining": s.draining,
        "queued": s.queued,
        "queued_bytes": s.queued_bytes,
        "running": s.running,
        "requests": {
            "enqueued": c.enqueued, "dispatched": c.dispatched, "cancelled": c.cancelled,
            "expired": c.expired, "handed_back": c.handed_back, "rejected": c.rejected,
        },
        "components": s.components.iter().map(|(name, queued)| json!({
            "component": if name.is_empty() { "unknown" } else { name.as_str() },
            "queued": queued,
        })).collect::<Vec<_>>(),
        "priority_classes": s.classes.iter().map(|(priority, queued)| json!({
            "priority": priority,
            "queued": queued,
        })).collect::<Vec<_>>(),
        "tenants": s.tenants.iter().map(|t| json!({
            "tenant": t.tenant,
            "queued": t.queued,
            "queued_bytes": t.queued_bytes,
            "peak": t.peak,
            "oldest_seconds": t.oldest.as_secs_f64(),
            "shard_size": t.shard_size,
            "shard": s.shards.get(&t.tenant),
            "weight": t.weight,
            "priority": t.priority,
            "balance": t.balance,
        })).collect::<Vec<_>>(),
        "queriers": s.queriers.iter().map(|q| json!({
            "querier": q.querier,
            "workers": q.workers,
            "shutting_down": q.shutting_down,
            "disconnected_seconds": q.disconnected_for.map(|d| d.as_secs_f64()),
        })).collect::<Vec<_>>(),
        "workers": s.workers.iter().map(|w| json!({
            "querier": w.querier, "slot": w.slot, "busy": w.busy,
        })).collect::<Vec<_>>(),
        "frontends": s.frontends,
        "cluster": s.cluster.as_ref().map(|c| json!({
            "peers": c.peers,
            "held_elsewhere": c.held_elsewhere,
            "deferred": c.deferred,
        })),
        "gossip": s.gossip.as_ref().map(|g| json!({
            "address": g.address.to_string(),
            "packets": {"received": g.received, "rejected": g.rejected, "sent": g.sent},
            "members": g.members.iter().map(|m| json!({
                "id": m.id,
                "role": m.role.to_string(),
                "state": m.state.to_string(),
                "gossip": m.gossip.to_string(),
                "service": m.service.map(|a| a.to_string()),
            })).collect::<Vec<_>>(),
        })),
    })
}

fn escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#39;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// The status as a small page: counters, components, tenants, queriers, frontends.
pub(crate) fn to_html(s: &Status) -> String {
    let c = s.counters;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>sluice {id}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1.5em}}\
         td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}th{{background:#eee}}\
         td:first-child,th:first-child{{text-align:left}}</style></head><body>\
         <h1>sluice scheduler {id}</h1><p>{state} · up {up:.0} s · {queued} queued ({bytes} bytes) · {running} running</p>\
         <table><tr><th>requests</th><th>enqueued</th><th>dispatched</th><th>cancelled</th><th>expired</th>\
         <th>handed back</th><th>rejected</th></tr><tr><td></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
        c.enqueued,
        c.dispatched,
        c.cancelled,
        c.expired,
        c.handed_back,
        c.rejected,
        id = escape(&s.scheduler_id),
        state = if s.draining { "draining" } else { "serving" },
        up = s.uptime.as_secs_f64(),
        queued = s.queued,
        bytes = s.queued_bytes,
        running = s.running,
    );
    h.push_str("<h2>Components</h2><table><tr><th>component</th><th>queued</th></tr>");
    for (name, queued) in &s.components {
        let name = if name.is_empty() { "unknown" } else { name };
        let _ = write!(h, "<tr><td>{}</td><td>{queued}</td></tr>", escape(name));
    }
    h.push_str("</table><h2>Priority classes</h2><table><tr><th>priority</th><th>queued</th></tr>");
    for (priority, queued) in &s.classes {
        let _ = write!(h, "<tr><td>{priority}</td><td>{queued}</td></tr>");
    }
    h.push_str(
        "</table><h2>Tenants</h2><table><tr><th>tenant</th><th>queued</th><th>bytes</th><th>peak</th>\
         <th>oldest (s)</th><th>shard</th><th>weight</th><th>priority</th><th>balance</th></tr>",
    );
    for t in &s.tenants {
        let shard = match s.shards.get(&t.tenant) {
            Some(ids) => escape(&ids.join(", ")),
            None => "all".to_string(),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{shard}</td><td>{}</td>\
             <td>{}</td><td>{}</td></tr>",
            escape(&t.tenant),
            t.queued,
            t.queued_bytes,
            t.peak,
            t.oldest.as_secs_f64(),
            t.weight,
            t.priority,
            t.balance
        );
    }
    h.push_str("</table><h2>Queriers</h2><table><tr><th>querier</th><th>workers</th><th>busy</th><th>state</th></tr>");
    for q in &s.queriers {
        let busy = s.workers.iter().filter(|w| w.querier == q.querier && w.busy).count();
        let state = match (q.shutting_down, q.disconnected_for) {
            (true, _) => "shutting down".to_string(),
            (false, Some(d)) => format!("disconnected {:.0} s", d.as_secs_f64()),
            (false, None) => "connected".to_string(),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{busy}</td><td>{state}</td></tr>",
            escape(&q.querier),
            q.workers
        );
    }
    if let Some(g) = &s.gossip {
        let _ = write!(
            h,
            "</table><h2>Gossip</h2><p>{} · packets received {}, rejected (bad tag) {}, sent {}</p>\
             <table><tr><th>member</th><th>role</th><th>state</th><th>gossip</th><th>service</th></tr>",
            escape(&g.address.to_string()),
            g.received,
            g.rejected,
            g.sent
        );
        for m in &g.members {
            let service = m.service.map_or("-".to_string(), |a| a.to_string());
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&m.id),
                m.role,
                m.state,
                m.gossip,
                escape(&service)
            );
        }
    }
    h.push_str("</table><h2>Frontends</h2><table><tr><th>frontend</th></tr>");
    for f in &s.frontends {
        let _ = write!(h, "<tr><td>{}</td></tr>", escape(f));
    }
    h.push_str("</table><p><a href=\"/status\">JSON</a> · <a href=\"/metrics\">metrics</a></p></body></html>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_in_the_page() {
        assert_eq!(escape("<script>&\"'"), "&lt;script&gt;&amp;&quot;&#39;");
    }
}
