//! The `sluice` binary.

mod cli;
mod memory;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sluice::config::{self, Settings};
use sluice::server::Server;
use sluice::sim::{self, SimReport, WaitStats};
use tracing::{error, info, warn};

use cli::{CertsAction, Cli, Command, LogFormat};

fn certs(action: CertsAction) -> anyhow::Result<()> {
    use sluice::tls;
    match action {
        CertsAction::Init { dir, dns, ips, days } => {
            if tls::CertSet::in_dir(&dir).ca_cert.exists() {
                anyhow::bail!("{} already holds a CA; refusing to overwrite it", dir.display());
            }
            let set = tls::generate_set(&dir, &dns, &ips, Duration::from_secs(days * 24 * 3600))?;
            println!("CA and role certificates written to {}:", set.dir.display());
            println!("  CA:        {} (key {})", set.ca_cert.display(), set.ca_key.display());
            for (role, id) in [
                ("scheduler", &set.scheduler),
                ("frontend", &set.frontend),
                ("querier", &set.querier),
            ] {
                println!("  {role:<10} {} + {}", id.cert.display(), id.key.display());
            }
            println!("Keep ca-key.pem offline once every certificate is issued.");
        }
        CertsAction::Issue {
            ca_dir,
            role,
            name,
            out,
            dns,
            ips,
            days,
        } => {
            let set = tls::CertSet::in_dir(&ca_dir);
            let issuer = tls::load_issuer(&set.ca_cert, &set.ca_key)?;
            let role = match role.as_str() {
                "frontend" => sluice_protocol::Role::Frontend,
                "querier" => sluice_protocol::Role::Querier,
                _ => sluice_protocol::Role::Scheduler,
            };
            let (cert, key) = tls::issue(&issuer, role, &name, &dns, &ips, Duration::from_secs(days * 24 * 3600))?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let (cert_path, key_path) = (out.join(format!("{name}.pem")), out.join(format!("{name}-key.pem")));
            tls::write_file(&cert_path, cert.as_bytes(), false)?;
            tls::write_file(&key_path, key.as_bytes(), true)?;
            println!(
                "{} certificate {} + {}",
                tls::role_name(role),
                cert_path.display(),
                key_path.display()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    memory::prefer_small_pages();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            ready_file,
            log_format,
            settings,
        } => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let log = tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(filter);
            match log_format {
                LogFormat::Json => log.json().init(),
                LogFormat::Text => log
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .init(),
            }
            let resolved = load(config.as_ref(), (*settings).clone())?;
            let runtime = runtime_with(Some(resolved.threads))?;
            runtime.block_on(serve(resolved, config, ready_file, *settings))?;
        }
        Command::Certs { action } => certs(action)?,
        Command::Demo { seconds } => {
            let runtime = runtime()?;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let ctrl_c = stop.clone();
            let interactive = std::io::IsTerminal::is_terminal(&std::io::stdout());
            let table = runtime.block_on(async move {
                tokio::spawn(async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        ctrl_c.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                });
                sluice::demo::run(seconds.map(Duration::from_secs), stop, |table| {
                    if interactive {
                        print!("\x1b[2J\x1b[H{table}"); // clear the screen, then the table
                    } else {
                        println!("{table}");
                    }
                })
                .await
            });
            let table = table.map_err(anyhow::Error::msg)?;
            if interactive {
                println!("\nstopped; last table above.");
            } else {
                let _ = table;
            }
        }
        Command::Bench {
            seconds,
            warm_up_seconds,
            schedulers,
            frontends,
            tenants,
            noisy_factor,
            queriers,
            workers,
            service_ms,
            users,
            slow_share,
            slow_service_ms,
            rate,
            prefetch,
            hold_limit_ms,
            concurrency,
            payload_bytes,
            result_bytes,
            json,
            plot,
            connect,
            gossip_seeds,
            certs,
            admin,
        } => {
            if !admin.is_empty() && connect.is_empty() && gossip_seeds.is_empty() {
                anyhow::bail!(
                    "--admin goes with --connect or --gossip-seeds (schedulers in this process are measured as part of it)"
                );
            }
            if !(noisy_factor.is_finite() && noisy_factor > 0.0) {
                anyhow::bail!("--noisy-factor must be a positive number");
            }
            if !(0.0..=1.0).contains(&slow_share) {
                anyhow::bail!("--slow-share must be between 0 and 1");
            }
            if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                anyhow::bail!("--rate must be a positive number");
            }
            let target = if !gossip_seeds.is_empty() {
                let key = std::env::var("SLUICE_GOSSIP_KEY")
                    .map_err(|_| anyhow::anyhow!("--gossip-seeds needs the key in SLUICE_GOSSIP_KEY"))?;
                let key = sluice_client::gossip::GossipKey::new(key.into_bytes())?;
                let gossip =
                    sluice_client::gossip::GossipConfig::new("127.0.0.1:0".parse().expect("valid"), gossip_seeds, key);
                Some(sluice::bench::Target {
                    schedulers: Vec::new(),
                    gossip: Some(gossip),
                    certs,
                    admin,
                })
            } else if !connect.is_empty() {
                Some(sluice::bench::Target {
                    schedulers: connect,
                    gossip: None,
                    certs,
                    admin,
                })
            } else {
                None
            };
            let config = sluice::bench::BenchConfig {
                schedulers: schedulers as usize,
                target,
                frontends: frontends as usize,
                tenants: tenants as usize,
                noisy_factor,
                users: users as usize,
                queriers: queriers as usize,
                workers: workers as usize,
                prefetch,
                hold_limit: (hold_limit_ms > 0).then(|| Duration::from_millis(hold_limit_ms)),
                service: Duration::from_millis(service_ms),
                slow_share,
                slow_service: Duration::from_millis(slow_service_ms),
                duration: Duration::from_secs(seconds),
                warm_up: Duration::from_secs(warm_up_seconds),
                rate,
                concurrency: concurrency as usize,
                payload_bytes,
                result_bytes,
                seed: 7,
            };
            let runtime = runtime()?;
            // Drawn on stderr, and only on a terminal (indicatif hides it otherwise).
            let bar = indicatif::ProgressBar::new(seconds * 10);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
                    .expect("valid progress template"),
            );
            let report = runtime
                .block_on(sluice::bench::run(config, plot.as_deref(), |secs, results| {
                    bar.set_position((secs * 10.0) as u64);
                    bar.set_message(format!("{results} results, {:.0}/s", results as f64 / secs.max(1e-9)));
                }))
                .map_err(anyhow::Error::msg)?;
            bar.finish_and_clear();
            let text = serde_json::to_string_pretty(&report)?;
            if let Some(path) = json {
                std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
            }
            println!("{text}");
            eprintln!("{}", bench_summary(&report));
        }
        Command::Simulate { seconds, seed } => simulate(Duration::from_secs(seconds), seed),
        Command::Info => {
            let limits = sluice_protocol::Limits::default();
            println!(
                "sluice {} — protocol version {}, max frame {} bytes",
                env!("CARGO_PKG_VERSION"),
                sluice_protocol::PROTOCOL_VERSION,
                limits.max_frame_len
            );
        }
    }
    Ok(())
}

/// The multi-threaded runtime every command runs on. Without its LIFO slot: a task woken
/// by another (quinn's connection driver, woken by each stream write) then waits its turn
/// instead of running next, so the writes of several tasks leave in shared datagrams.
/// Measured: 20–25% more queries per second and as much less CPU per query on both sides
/// (docs/benchmarks.md). The switch needs `--cfg tokio_unstable` (.cargo/config.toml).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

/// [`runtime`] with `threads` worker threads (`None`: tokio's default, one per core or
/// `TOKIO_WORKER_THREADS`).
fn runtime_with(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build().context("starting the async runtime")
}

/// One line for a person: throughput, latency and CPU per query.
fn bench_summary(report: &serde_json::Value) -> String {
    let f = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
    let g = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    let d = &report["datagrams_per_query"];
    let generator = report["cpu"]["generator_thread_us_per_query"]
        .as_f64()
        .map_or(String::new(), |g| format!(", the generator's thread {g:.1} µs of it"));
    format!(
        "{:.0} queries/s, p99 {} ms; CPU per query: schedulers {} µs, this process {} µs ({}{generator}); \
         datagrams per query: this process {} sent, {} received; schedulers {} sent, {} received; \
         task polls per query: this process {}, schedulers {}",
        report["throughput_per_second"].as_f64().unwrap_or(0.0),
        f(&report["latency_ms"]["p99"]),
        f(&report["cpu"]["schedulers_us_per_query"]),
        f(&report["cpu"]["this_process_us_per_query"]),
        report["cpu"]["this_process_holds"].as_str().unwrap_or(""),
        g(&d["this_process_clients"]["sent"]),
        g(&d["this_process_clients"]["received"]),
        g(&d["schedulers"]["sent"]),
        g(&d["schedulers"]["received"]),
        g(&report["tasks_per_query"]["this_process"]["polls"]),
        g(&report["tasks_per_query"]["schedulers"]["polls"]),
    )
}

/// Flags over file over defaults, validated.
fn load(config: Option<&PathBuf>, settings: Settings) -> anyhow::Result<config::ServeConfig> {
    let file = match config {
        Some(path) => config::read_file(path)?,
        None => Settings::default(),
    };
    Ok(settings.over(file).resolve()?)
}

/// Runs the scheduler resolved from `settings` over the file at `config_path` until a
/// signal; SIGHUP reads both again.
async fn serve(
    config: config::ServeConfig,
    config_path: Option<PathBuf>,
    ready_file: Option<PathBuf>,
    settings: Settings,
) -> anyhow::Result<()> {
    let server = Server::start(config).await?;
    if let Some(path) = &ready_file {
        write_ready_file(path, &server).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("sluice scheduler listening");
    println!("  QUIC address:     {}", server.quic_addr());
    if let Some(gossip) = server.gossip_addr() {
        println!("  gossip address:   {gossip} (UDP)");
    }
    println!(
        "  admin HTTP:       http://{}/  (/metrics, /ready, /status)",
        server.admin_addr()
    );
    if let Some(certs) = server.dev_certs() {
        println!(
            "  development certificates in {} (mutual TLS; roles in SAN URIs):",
            certs.dir.display()
        );
        println!("    CA:        {}", certs.ca_cert.display());
        println!(
            "    frontend:  {} + {}",
            certs.frontend.cert.display(),
            certs.frontend.key.display()
        );
        println!(
            "    querier:   {} + {}",
            certs.querier.cert.display(),
            certs.querier.key.display()
        );
    }
    println!("  stop with Ctrl-C or SIGTERM (queued work drains, the rest is handed back)");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                // Reload limits and per-tenant overrides; addresses and TLS need a restart.
                match load(config_path.as_ref(), settings.clone()) {
                    Ok(c) => match server.set_queue_config(c.queue).await {
                        Ok(()) => info!("configuration reloaded"),
                        Err(e) => error!(error = %e, "reload refused"),
                    },
                    Err(e) => warn!(error = %e, "reload failed; keeping the running configuration"),
                }
            }
        }
    }
    info!("shutting down");
    server.shutdown().await;
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Milliseconds below a second, seconds above.
fn short_or_long(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        ms(d)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn simulate(duration: Duration, seed: u64) {
    println!("Sluice queue simulations: the real queue core, a fake clock, seeded arrivals (seed {seed}).\n");
    println!(
        "1. A degraded backend. 10 tenants, 8 queriers × 8 workers, shuffle sharding 3 of 8. Arrivals are\n   \
         sized for 50% load when both backends answer in 5 ms; then the store-gateway becomes 100× slower\n   \
         ({}s of arrivals). Queue wait of the fast (ingester) requests:\n",
        duration.as_secs()
    );
    println!(
        "   {:<14} {:>28} {:>28} {:>12}",
        "store-gateway", "component-aware mean / p99", "plain round robin mean / p99", "mean ratio"
    );
    for share in [0.05, 0.10, 0.25, 0.50] {
        let aware = sim::run(&sim::slow_component(share, 0.5, 100, true, duration, seed));
        let plain = sim::run(&sim::slow_component(share, 0.5, 100, false, duration, seed));
        let (a, p) = (fast(&aware), fast(&plain));
        println!(
            "   {:<14} {:>28} {:>28} {:>11.0}×",
            format!("{:.0}% of requests", share * 100.0),
            format!("{} / {}", ms(a.mean), ms(a.p99)),
            format!("{} / {}", ms(p.mean), ms(p.p99)),
            p.mean.as_secs_f64() / a.mean.as_secs_f64().max(1e-9)
        );
    }

    println!(
        "\n2. A noisy neighbour. 9 quiet tenants use 50% of 4 queriers × 4 workers (20 ms requests); then a\n   \
         tenant sending 100× a quiet tenant's rate joins and saturates every worker:\n"
    );
    let calm = sim::run(&sim::noisy_neighbour(false, 100.0, 0.5, seed));
    let noisy = sim::run(&sim::noisy_neighbour(true, 100.0, 0.5, seed));
    println!(
        "   {:<10} {:>14} {:>26} {:>26}",
        "tenant", "served", "wait mean / p99, alone", "wait mean / p99, with it"
    );
    for t in &noisy.by_tenant {
        let alone = calm.tenant(&t.name);
        println!(
            "   {:<10} {:>14} {:>26} {:>26}",
            t.name,
            t.served,
            alone.map_or("-".into(), |a| format!("{} / {}", ms(a.mean), ms(a.p99))),
            format!("{} / {}", ms(t.mean), ms(t.p99))
        );
    }
    println!(
        "\n   The noisy tenant took every worker the quiet ones left free and still has {} requests queued;\n   \
         each quiet request waited for the next free worker, never behind the noisy backlog.",
        noisy.left_queued
    );

    println!(
        "\n3. Long and short queries. 2 queriers × 4 workers; tenant `long` sends 60 s queries at 0.2/s (always\n   \
         backlogged), tenant `short` sends 10 ms queries at 10/s, for 600 s. Queue wait of `short`:\n"
    );
    println!(
        "   {:<48} {:>8} {:>12} {:>12} {:>12}",
        "policy", "served", "mean", "p99", "max"
    );
    for (policy, label) in [
        (sim::LongShortPolicy::RoundRobin, "round robin by request count"),
        (
            sim::LongShortPolicy::CostAware,
            "deficit round robin on cost (hint = ms)",
        ),
        (
            sim::LongShortPolicy::CostAwareReserved,
            "cost-aware + short at priority 1, 25% reserved",
        ),
    ] {
        let r = sim::run(&sim::long_and_short(policy, seed));
        let s = r.tenant("short").expect("the scenario has a short tenant");
        println!(
            "   {:<48} {:>8} {:>12} {:>12} {:>12}",
            label,
            s.served,
            short_or_long(s.mean),
            short_or_long(s.p99),
            short_or_long(s.max)
        );
    }

    println!(
        "\n4. Reserved capacity. 2 queriers × 8 workers, 25% reserved for priority 1; ten priority-0 tenants\n   \
         offer 1.5 × capacity in 10 ms requests (or 20% of them 200 ms); tenant `urgent` (priority 1)\n   \
         sends 10 ms requests at 5/s; 60 s. Lent: reserved workers take priority-0 requests costing ≤ 10.\n"
    );
    println!(
        "   {:<44} {:>12} {:>12} {:>12} {:>12}",
        "setting", "utilisation", "urgent p50", "urgent p99", "urgent max"
    );
    for (lend, long_share) in [(false, 0.0), (true, 0.0), (false, 0.2), (true, 0.2)] {
        let r = sim::run(&sim::reserved_capacity(lend, long_share, 5.0, seed));
        let u = r.tenant("urgent").expect("the scenario has an urgent tenant");
        println!(
            "   {:<44} {:>11.1}% {:>12} {:>12} {:>12}",
            format!(
                "{}, {:.0}% long bulk requests",
                if lend { "lent" } else { "not lent" },
                long_share * 100.0
            ),
            r.utilisation * 100.0,
            short_or_long(u.p50),
            short_or_long(u.p99),
            short_or_long(u.max)
        );
    }

    println!(
        "\n5. Deadline-aware admission. 2 queriers × 8 workers, 10 ms requests, ten tenants offering 2 × capacity,\n   \
         each request due 500 ms after it arrives (wait and service); 30 s.\n"
    );
    println!(
        "   {:<14} {:>9} {:>9} {:>9} {:>9} {:>14} {:>16}",
        "admission", "arrived", "refused", "expired", "served", "in deadline", "share of served"
    );
    for admission in [false, true] {
        let r = sim::run(&sim::deadline_overload(admission, seed));
        println!(
            "   {:<14} {:>9} {:>9} {:>9} {:>9} {:>14} {:>15.1}%",
            if admission { "on" } else { "off" },
            r.arrived,
            r.refused_for_deadline,
            r.expired,
            r.dispatched,
            r.within_deadline,
            100.0 * r.within_deadline as f64 / r.dispatched.max(1) as f64
        );
    }
}

fn fast(r: &SimReport) -> &WaitStats {
    r.component("ingester").expect("the scenario sends ingester requests")
}

/// Writes the bound addresses as one JSON object, through a temporary file and a rename so a
/// reader sees all of it or nothing.
fn write_ready_file(path: &std::path::Path, server: &Server) -> std::io::Result<()> {
    let ready = serde_json::json!({
        "scheduler_id": server.scheduler_id(),
        "quic": server.quic_addr().to_string(),
        "admin": server.admin_addr().to_string(),
        "gossip": server.gossip_addr().map(|a| a.to_string()),
        "pid": std::process::id(),
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{ready}\n"))?;
    std::fs::rename(&tmp, path)
}
