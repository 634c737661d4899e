//! The `sluice` command line: its subcommands and their flags, as clap reads them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sluice::config::Settings;

#[derive(Parser)]
#[command(name = "sluice", version, about = "A fair, multi-tenant query scheduler")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// How `sluice serve` writes its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Serve frontends and queriers over QUIC. With no TLS files, a development CA and
    /// certificates are generated in the data directory (reused on restart).
    Serve {
        /// TOML configuration file; flags and SLUICE_* variables override its keys.
        #[arg(long, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        /// Once listening, write the bound addresses and the scheduler id here as one JSON
        /// object (written whole: a reader never sees half of it), for scripts and tests.
        #[arg(long, env = "SLUICE_READY_FILE")]
        ready_file: Option<PathBuf>,
        /// Log format on stderr: `text` (colours only on a terminal) or `json` (one object a line).
        #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Create certificates for a real deployment: a CA and role certificates.
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Run the deterministic simulations of the queue core (a degraded backend, a noisy
    /// tenant) and print queue waits: the scheduler's fairness, without a network.
    Simulate {
        /// Simulated seconds of arrivals per run.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        seconds: u64,
        /// Seed of the arrival streams.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Load-test the whole system: schedulers, frontends and queriers in this process over
    /// real QUIC on loopback, for a bounded time; prints a JSON report.
    Bench {
        /// Seconds of load.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        seconds: u64,
        /// Seconds of the same load before the measured ones, recorded nowhere (connections
        /// opened, windows grown: the report is the steady state's).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=600))]
        warm_up_seconds: u64,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
        schedulers: u64,
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
        frontends: u64,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        tenants: u64,
        /// Demand of one tenant relative to each other tenant (1: none is noisy).
        #[arg(long, default_value_t = 1.0)]
        noisy_factor: f64,
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
        queriers: u64,
        /// Worker loops per querier and scheduler.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
        workers: u64,
        /// Handler time per query, in milliseconds (0: a no-op handler).
        #[arg(long, default_value_t = 0)]
        service_ms: u64,
        /// Actors (users) per tenant.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        users: u64,
        /// Share of queries (0–1) for a slow component, `store-gateway`; the rest are `ingester`.
        #[arg(long, default_value_t = 0.0)]
        slow_share: f64,
        /// Handler time of a slow-component query, in milliseconds.
        #[arg(long, default_value_t = 0)]
        slow_service_ms: u64,
        /// Open loop at this many queries per second in total; without it, closed loop.
        #[arg(long)]
        rate: Option<f64>,
        /// Each querier worker holds one prefetched query while it runs one.
        #[arg(long)]
        prefetch: bool,
        /// With --prefetch: a query held this long is given back unstarted (0: never).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=60_000))]
        hold_limit_ms: u64,
        /// Closed loop: submitters per frontend.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        concurrency: u64,
        #[arg(long, default_value_t = 1024)]
        payload_bytes: usize,
        /// Bytes of each result body the queriers send back.
        #[arg(long, default_value_t = 2)]
        result_bytes: usize,
        /// Also write the JSON report to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Draw queue wait p99 per second (noisy tenant against the others) as SVG here.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Drive schedulers already running at these QUIC addresses (comma-separated)
        /// instead of starting our own.
        #[arg(long, value_delimiter = ',', conflicts_with = "gossip_seeds")]
        connect: Vec<std::net::SocketAddr>,
        /// Drive the schedulers of a running gossip cluster, joined through these seeds
        /// (the key from SLUICE_GOSSIP_KEY).
        #[arg(long, value_delimiter = ',')]
        gossip_seeds: Vec<std::net::SocketAddr>,
        /// With --connect or --gossip-seeds: the directory holding ca.pem and the frontend
        /// and querier certificates and keys.
        #[arg(long, default_value = "sluice-data")]
        certs: PathBuf,
        /// With --connect or --gossip-seeds: the driven schedulers' admin addresses
        /// (comma-separated), to report their CPU time and QUIC datagrams per query.
        #[arg(long, value_delimiter = ',')]
        admin: Vec<std::net::SocketAddr>,
    },
    /// Watch fairness happen: a scheduler, queriers and a frontend with one noisy tenant,
    /// in this process, with a live table. No files needed; Ctrl-C stops it.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        seconds: Option<u64>,
    },
    /// Print the protocol version and frame limits this build speaks.
    Info,
}

#[derive(Subcommand)]
pub(crate) enum CertsAction {
    /// Create a new CA plus scheduler, frontend and querier certificates in DIR.
    Init {
        /// Directory to write into (created, owner-only).
        #[arg(long)]
        dir: PathBuf,
        /// DNS names the scheduler and frontend certificates are valid for (repeatable).
        #[arg(long = "dns", default_value = "localhost")]
        dns: Vec<String>,
        /// IP addresses they are valid for (repeatable).
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
    },
    /// Issue one more role certificate from an existing CA (one per instance, say).
    Issue {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        ca_dir: PathBuf,
        /// frontend, querier or scheduler.
        #[arg(long, value_parser = ["frontend", "querier", "scheduler"])]
        role: String,
        /// Name of the certificate files (NAME.pem, NAME-key.pem) and its common name.
        #[arg(long)]
        name: String,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        #[arg(long = "dns")]
        dns: Vec<String>,
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
    },
}
