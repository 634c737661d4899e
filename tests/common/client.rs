//! A frontend and queriers as users write them, with a handler whose payload says what to do.

use std::time::Duration;

use bytes::Bytes;
use sluice_client::*;
use tokio::sync::mpsc;

use super::{TestServer, wait};

/// Answers with the payload, after `delay`; panics on payload "panic"; waits for the
/// cancel on payload "hang" and reports it. Reports each run's start, and its end however
/// it ends (returned, panicked, or its future dropped).
pub struct TestHandler {
    pub delay: Duration,
    pub cancelled: mpsc::UnboundedSender<u64>,
    pub started: mpsc::UnboundedSender<u64>,
    pub ended: mpsc::UnboundedSender<u64>,
}

/// Reports a run's end when dropped.
struct EndOfRun(u64, mpsc::UnboundedSender<u64>);

impl Drop for EndOfRun {
    fn drop(&mut self) {
        let _ = self.1.send(self.0);
    }
}

impl Handler for TestHandler {
    async fn handle(&self, request: Request) -> Result<Response, HandlerError> {
        let _ = self.started.send(request.query_id);
        let _end = EndOfRun(request.query_id, self.ended.clone());
        match &request.payload[..] {
            b"panic" => panic!("boom"),
            b"fail" => Err(HandlerError("no such metric".into())),
            b"hang" => {
                request.cancelled.cancelled().await;
                let _ = self.cancelled.send(request.query_id);
                Err(HandlerError("cancelled".into()))
            }
            b"deaf" => {
                // Sees its cancel but does not stop, as a handler stuck in a blocking call.
                let (token, tx, id) = (request.cancelled.clone(), self.cancelled.clone(), request.query_id);
                tokio::spawn(async move {
                    token.cancelled().await;
                    let _ = tx.send(id);
                });
                std::future::pending::<()>().await;
                unreachable!()
            }
            b"big" => {
                let (response, body) = Response::stream(200, 2);
                tokio::spawn(async move {
                    for i in 0..64u8 {
                        if body.send(Bytes::from(vec![i; 1 << 20])).await.is_err() {
                            return;
                        }
                    }
                    body.finish().await;
                });
                Ok(response)
            }
            b"breaks-midway" => {
                // The producer sends part of the body and then fails (here: it is dropped
                // without finishing, as a panicking producer task would be).
                let (response, body) = Response::stream(200, 4);
                tokio::spawn(async move {
                    let _ = body.send(Bytes::from_static(b"first half")).await;
                    drop(body);
                });
                Ok(response)
            }
            p if p.starts_with(b"cost:") => {
                let cost = std::str::from_utf8(&p[5..]).unwrap().parse().unwrap();
                Ok(Response::ok(request.payload.clone()).with_cost(cost))
            }
            _ => {
                tokio::time::sleep(self.delay).await;
                let mut r = Response::ok(request.payload.clone());
                r.metadata.push(("tenant".into(), request.tenant.clone()));
                Ok(r)
            }
        }
    }
}

pub struct Events {
    pub cancelled: mpsc::UnboundedReceiver<u64>,
    pub started: mpsc::UnboundedReceiver<u64>,
    pub ended: mpsc::UnboundedReceiver<u64>,
}

pub fn handler(delay: Duration) -> (TestHandler, Events) {
    let (ctx, crx) = mpsc::unbounded_channel();
    let (stx, srx) = mpsc::unbounded_channel();
    let (etx, erx) = mpsc::unbounded_channel();
    (
        TestHandler {
            delay,
            cancelled: ctx,
            started: stx,
            ended: etx,
        },
        Events {
            cancelled: crx,
            started: srx,
            ended: erx,
        },
    )
}

/// A querier's settings with the test certificates, dialing the one scheduler `t`.
pub fn querier_config(t: &TestServer, id: &str) -> QuerierConfig {
    QuerierConfig::new(id, t.certs.querier.clone(), vec![t.server.quic_addr()])
}

/// A frontend's settings with the test certificates, dialing the one scheduler `t`.
pub fn frontend_config(t: &TestServer, id: &str) -> FrontendConfig {
    FrontendConfig::new(id, t.certs.frontend.clone(), vec![t.server.quic_addr()])
}

pub async fn frontend_for(servers: &[&TestServer]) -> Frontend {
    let config = FrontendConfig::new(
        "frontend-1",
        servers[0].certs.frontend.clone(),
        servers.iter().map(|t| t.server.quic_addr()).collect(),
    );
    Frontend::connect(config).await.unwrap()
}

pub fn querier_for(id: &str, servers: &[&TestServer], concurrency: usize, h: TestHandler) -> Querier {
    let mut config = QuerierConfig::new(
        id,
        servers[0].certs.querier.clone(),
        servers.iter().map(|t| t.server.quic_addr()).collect(),
    );
    config.concurrency = concurrency;
    Querier::start(config, h).unwrap()
}

/// A frontend and one querier (`querier-1`, `workers` workers, the test handler answering
/// after `delay`) on the one scheduler `t`.
pub async fn frontend_and_querier(t: &TestServer, workers: usize, delay: Duration) -> (Frontend, Querier, Events) {
    let fe = frontend_for(&[t]).await;
    let (h, events) = handler(delay);
    (fe, querier_for("querier-1", &[t], workers, h), events)
}

/// Two schedulers of one cluster (1 000 outstanding queries per tenant each) and a frontend
/// connected to both.
pub async fn two_schedulers_and_a_frontend() -> (TestServer, TestServer, Frontend) {
    let dir = super::cluster_dir();
    let a = super::start_in(dir.clone(), |s| s.max_outstanding_per_tenant = Some(1000)).await;
    let b = super::start_in(dir, |s| s.max_outstanding_per_tenant = Some(1000)).await;
    let fe = frontend_for(&[&a, &b]).await;
    wait_connected(&fe, 2).await;
    (a, b, fe)
}

/// Waits until the frontend is connected to `n` schedulers.
pub async fn wait_connected(fe: &Frontend, n: usize) {
    wait("scheduler connections", async {
        while fe.connected_schedulers() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Awaits every future, concurrently.
pub async fn futures_join<T: Send + 'static>(
    futs: impl Iterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let tasks: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(wait("a query", t).await.unwrap());
    }
    out
}
