//! A querier that answers every query with its payload upper-cased, after a pause.
//!
//! With `sluice serve` running in the same directory (its development certificates are in
//! `sluice-data/`):
//!
//! ```sh
//! cargo run -p sluice-client --example querier            # Ctrl-C shuts it down gracefully
//! cargo run -p sluice-client --example querier -- 127.0.0.1:9095 sluice-data querier-2
//! ```
//!
//! Against a gossiping cluster (see the README), set `SLUICE_GOSSIP_SEEDS` and
//! `SLUICE_GOSSIP_KEY`: the querier then serves every live scheduler and ignores the
//! address argument.

use std::time::Duration;

use sluice_client::gossip::GossipConfig;
use sluice_client::tls::Identity;
use sluice_client::{Handler, HandlerError, Querier, QuerierConfig, Request, Response, Role};

struct Upper;

impl Handler for Upper {
    async fn handle(&self, request: Request) -> Result<Response, HandlerError> {
        // Simulated work that stops early if the frontend cancels.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = request.cancelled.cancelled() => return Err(HandlerError("cancelled".into())),
        }
        let text = String::from_utf8_lossy(&request.payload).to_uppercase();
        println!(
            "query {} for {} (queued {:?}): {text}",
            request.query_id, request.tenant, request.queue_time
        );
        Ok(Response::ok(text))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let scheduler = args.next().unwrap_or_else(|| "127.0.0.1:9095".into()).parse()?;
    let certs = args.next().unwrap_or_else(|| "sluice-data".into());
    let id = args.next().unwrap_or_else(|| "querier-1".into());

    let mut config = QuerierConfig::new(id, Identity::in_dir(&certs, Role::Querier), vec![scheduler]);
    if let Some(gossip) = GossipConfig::from_env()? {
        println!("querier following the gossip through {:?}", gossip.seeds);
        config = config.with_gossip(gossip);
    } else {
        println!("querier running against {scheduler}");
    }
    let querier = Querier::start(config, Upper)?;
    println!("Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    println!("shutting down: finishing running queries");
    querier.shutdown().await;
    Ok(())
}
