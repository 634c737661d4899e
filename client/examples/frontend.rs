//! A frontend that sends a few queries for two tenants and prints the results.
//!
//! With `sluice serve` and the `querier` example running in the same directory:
//!
//! ```sh
//! cargo run -p sluice-client --example frontend
//! cargo run -p sluice-client --example frontend -- 127.0.0.1:9095 sluice-data
//! ```
//!
//! Against a gossiping cluster (see the README), set `SLUICE_GOSSIP_SEEDS` and
//! `SLUICE_GOSSIP_KEY` (and optionally `SLUICE_MAX_USED_INSTANCES`): the frontend then uses
//! the live schedulers and ignores the address argument.

use std::time::{Duration, Instant};

use sluice_client::gossip::GossipConfig;
use sluice_client::tls::Identity;
use sluice_client::{Frontend, FrontendConfig, QueryRequest, Role};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let scheduler = args.next().unwrap_or_else(|| "127.0.0.1:9095".into()).parse()?;
    let certs = args.next().unwrap_or_else(|| "sluice-data".into());

    let mut config = FrontendConfig::new("frontend-1", Identity::in_dir(&certs, Role::Frontend), vec![scheduler]);
    if let Some(gossip) = GossipConfig::from_env()? {
        config = config.with_gossip(gossip);
        if let Ok(n) = std::env::var("SLUICE_MAX_USED_INSTANCES") {
            config.client.max_used_instances = n.parse()?;
        }
    }
    let frontend = Frontend::connect(config).await?;
    println!(
        "using {} scheduler(s): {:?}",
        frontend.connected_schedulers(),
        frontend.scheduler_addresses()
    );

    let mut handles = Vec::new();
    for i in 0..6 {
        let tenant = if i % 3 == 0 { "tenant-b" } else { "tenant-a" };
        let mut request = QueryRequest::new(tenant, format!("sum(rate(requests_total[{i}m]))"));
        request.actors = vec![format!("user-{}", i % 2)];
        request.timeout = Some(Duration::from_secs(10));
        handles.push((i, Instant::now(), frontend.submit(request).await?));
    }
    for (i, started, handle) in handles {
        match handle.response().await {
            Ok(response) => {
                let status = response.status;
                let body = response.body.collect().await?;
                println!(
                    "query {i}: {status} {:?} in {:?}",
                    String::from_utf8_lossy(&body),
                    started.elapsed()
                );
            }
            Err(e) => println!("query {i}: failed: {e}"),
        }
    }
    frontend.close().await;
    Ok(())
}
