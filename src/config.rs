//! `sluice serve` configuration: a TOML file, every key of which is also a command-line
//! flag (`--max-outstanding-per-tenant`) and an environment variable
//! (`SLUICE_MAX_OUTSTANDING_PER_TENANT`). Flags and variables win over the file; the file
//! wins over defaults. Per-tenant overrides (`[tenants.<name>]`) live in the file only and
//! are reloaded on SIGHUP.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use sluice_protocol::{HARD_MAX_FRAME_LEN, MIN_FRAME_LEN};
use thiserror::Error;

use crate::queue::{QueueConfig, TenantOverrides};
use crate::tls::Identity;
use sluice_client::gossip::{GossipConfig, GossipKey};

/// Settings as given by flags, environment or file; anything unset takes its default.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// QUIC address to serve frontends and queriers on.
    #[arg(long, env = "SLUICE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HTTP address of /metrics, /ready and /status.
    #[arg(long, env = "SLUICE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// The QUIC address clients are told to connect to (gossip); default: `listen`.
    #[arg(long, env = "SLUICE_ADVERTISE")]
    pub advertise: Option<SocketAddr>,
    /// UDP address for SWIM gossip with the other schedulers and clients; unset: no gossip.
    #[arg(long, env = "SLUICE_GOSSIP_LISTEN")]
    pub gossip_listen: Option<SocketAddr>,
    /// The gossip address others reach this scheduler at; default: `gossip_listen`.
    #[arg(long, env = "SLUICE_GOSSIP_ADVERTISE")]
    pub gossip_advertise: Option<SocketAddr>,
    /// Gossip addresses of members to join through (comma-separated).
    #[arg(long, env = "SLUICE_GOSSIP_SEEDS", value_delimiter = ',')]
    pub gossip_seeds: Option<Vec<SocketAddr>>,
    /// The cluster's shared gossip key (at least 16 bytes); or `gossip_key_file`.
    #[arg(long, env = "SLUICE_GOSSIP_KEY", hide_env_values = true)]
    pub gossip_key: Option<String>,
    /// A file holding the gossip key (surrounding whitespace ignored).
    #[arg(long, env = "SLUICE_GOSSIP_KEY_FILE")]
    pub gossip_key_file: Option<PathBuf>,
    /// How often a random gossip member is probed, in milliseconds.
    #[arg(long, env = "SLUICE_GOSSIP_PROBE_PERIOD_MS")]
    pub gossip_probe_period_ms: Option<u64>,
    /// How long a suspected member has to answer before it is declared down, in ms.
    #[arg(long, env = "SLUICE_GOSSIP_SUSPECT_MS")]
    pub gossip_suspect_ms: Option<u64>,
    /// This scheduler's id, as reported to peers.
    #[arg(long, env = "SLUICE_SCHEDULER_ID")]
    pub scheduler_id: Option<String>,
    /// Directory for generated development certificates (used when no TLS files are given).
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// CA certificate (PEM) that signs every peer; with tls_cert and tls_key.
    #[arg(long, env = "SLUICE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This scheduler's certificate chain (PEM).
    #[arg(long, env = "SLUICE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This scheduler's private key (PEM).
    #[arg(long, env = "SLUICE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Most requests one tenant may have queued.
    #[arg(long, env = "SLUICE_MAX_OUTSTANDING_PER_TENANT")]
    pub max_outstanding_per_tenant: Option<u32>,
    /// Queriers per tenant (shuffle sharding); 0 = all.
    #[arg(long, env = "SLUICE_MAX_QUERIERS_PER_TENANT")]
    pub max_queriers_per_tenant: Option<u32>,
    /// Most requests queued in total.
    #[arg(long, env = "SLUICE_MAX_QUEUED_REQUESTS")]
    pub max_queued_requests: Option<usize>,
    /// Most payload bytes queued in total.
    #[arg(long, env = "SLUICE_MAX_QUEUED_BYTES")]
    pub max_queued_bytes: Option<u64>,
    /// How long a querier with no worker keeps its shards, in milliseconds.
    #[arg(long, env = "SLUICE_QUERIER_FORGET_DELAY_MS")]
    pub querier_forget_delay_ms: Option<u64>,
    /// Largest frame accepted, in bytes.
    #[arg(long, env = "SLUICE_MAX_FRAME_LEN")]
    pub max_frame_len: Option<u32>,
    /// Runtime threads (default 1). One thread is the cheapest per query: every hand-off
    /// between the connections and the dispatcher stays on it, with no wake-up of another
    /// thread. Raise it when the process uses a whole core.
    #[arg(long, env = "SLUICE_THREADS")]
    pub threads: Option<u16>,
    /// Most simultaneous QUIC connections.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,
    /// Most simultaneous streams a peer may open on one connection.
    #[arg(long, env = "SLUICE_MAX_STREAMS_PER_CONNECTION")]
    pub max_streams_per_connection: Option<u32>,
    /// A connection silent for this long is closed, in milliseconds. It bounds how long a
    /// querier that died without closing (kill -9, lost host) goes unnoticed.
    #[arg(long, env = "SLUICE_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// A stream must send its hello within this many milliseconds.
    #[arg(long, env = "SLUICE_HELLO_TIMEOUT_MS")]
    pub hello_timeout_ms: Option<u64>,
    /// A frame that has started to arrive must be complete within this many milliseconds.
    #[arg(long, env = "SLUICE_FRAME_TIMEOUT_MS")]
    pub frame_timeout_ms: Option<u64>,
    /// Bytes all streams of one connection may buffer together, partial frames included
    /// (default: max_frame_len + 1 MiB).
    #[arg(long, env = "SLUICE_CONNECTION_RECEIVE_BUDGET")]
    pub connection_receive_budget: Option<u64>,
    /// Credit per tenant visit in cost units (deficit round robin on cost hints).
    #[arg(long, env = "SLUICE_COST_QUANTUM")]
    pub cost_quantum: Option<u32>,
    /// Largest cost a request may count for; larger hints and measured costs are clamped.
    #[arg(long, env = "SLUICE_MAX_COST_HINT")]
    pub max_cost_hint: Option<u32>,
    /// Percentage of each querier's workers reserved for high-priority requests (0-99).
    #[arg(long, env = "SLUICE_RESERVED_WORKERS_PERCENT")]
    pub reserved_workers_percent: Option<u8>,
    /// The lowest priority that reserved workers serve.
    #[arg(long, env = "SLUICE_RESERVED_MIN_PRIORITY")]
    pub reserved_min_priority: Option<u8>,
    /// Reserved workers with nothing to do take lower-priority requests costing at most
    /// this (0: never).
    #[arg(long, env = "SLUICE_LEND_MAX_COST")]
    pub lend_max_cost: Option<u32>,
    /// Refuse at enqueue a query whose estimated wait would pass its deadline (default
    /// true).
    #[arg(long, env = "SLUICE_DEADLINE_ADMISSION")]
    pub deadline_admission: Option<bool>,
    /// A priority class with work is passed over at most this many times in a row.
    #[arg(long, env = "SLUICE_MAX_PRIORITY_SKIPS")]
    pub max_priority_skips: Option<u32>,
    /// On SIGTERM, how long queued work keeps dispatching before the rest is handed back.
    #[arg(long, env = "SLUICE_DRAIN_TIMEOUT_MS")]
    pub drain_timeout_ms: Option<u64>,
    /// Per-tenant overrides (file only).
    #[arg(skip)]
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantSettings>,
}

/// A `[tenants.<name>]` table: the queue's per-tenant overrides, as written in the file.
pub type TenantSettings = TenantOverrides;

/// Longest timeout accepted, in milliseconds: one hour.
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// A configuration that cannot be used; says which key (or file) and why.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// Where the scheduler's TLS identity comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// Files given by the operator.
    Files(Identity),
    /// A development set generated (or reused) in this directory.
    Development(PathBuf),
}

/// The complete, validated configuration of `sluice serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// This scheduler's id; empty: `scheduler-<bound port>` once the port is bound.
    pub scheduler_id: String,
    pub tls: TlsSource,
    pub queue: QueueConfig,
    pub max_frame_len: u32,
    /// Runtime worker threads.
    pub threads: usize,
    pub max_connections: u32,
    pub max_streams_per_connection: u32,
    pub idle_timeout: Duration,
    pub hello_timeout: Duration,
    pub frame_timeout: Duration,
    pub connection_receive_budget: usize,
    pub drain_timeout: Duration,
    /// The QUIC address clients are told (a port of 0 means the bound port).
    pub advertise: SocketAddr,
    /// Gossip membership; `None`: this scheduler does not gossip.
    pub gossip: Option<GossipConfig>,
}

/// Reads a TOML settings file.
pub fn read_file(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}

macro_rules! overlay {
    ($top:expr, $base:expr, $($field:ident),+ $(,)?) => {
        Settings {
            $($field: $top.$field.or($base.$field),)+
            tenants: $base.tenants,
        }
    };
}

impl Settings {
    /// These settings, with `file`'s filling whatever these leave unset. Per-tenant
    /// overrides come from the file.
    pub fn over(self, file: Settings) -> Settings {
        overlay!(
            self,
            file,
            listen,
            admin_listen,
            advertise,
            gossip_listen,
            gossip_advertise,
            gossip_seeds,
            gossip_key,
            gossip_key_file,
            gossip_probe_period_ms,
            gossip_suspect_ms,
            scheduler_id,
            data_dir,
            tls_ca,
            tls_cert,
            tls_key,
            max_outstanding_per_tenant,
            max_queriers_per_tenant,
            max_queued_requests,
            max_queued_bytes,
            querier_forget_delay_ms,
            cost_quantum,
            max_cost_hint,
            reserved_workers_percent,
            reserved_min_priority,
            lend_max_cost,
            deadline_admission,
            max_priority_skips,
            max_frame_len,
            threads,
            max_connections,
            max_streams_per_connection,
            idle_timeout_ms,
            hello_timeout_ms,
            frame_timeout_ms,
            connection_receive_budget,
            drain_timeout_ms,
        )
    }

    /// Fills in defaults and checks every value.
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let defaults = QueueConfig::default();
        let listen = self.listen.unwrap_or_else(|| "127.0.0.1:9095".parse().unwrap());
        let admin_listen = self.admin_listen.unwrap_or_else(|| "127.0.0.1:9096".parse().unwrap());
        if listen == admin_listen && listen.port() != 0 {
            return Err(invalid("admin_listen", "must differ from listen"));
        }
        let advertise = self.advertise.unwrap_or(listen);
        let gossip = self.gossip_settings(advertise)?;
        let tls = match (self.tls_ca, self.tls_cert, self.tls_key) {
            (None, None, None) => TlsSource::Development(self.data_dir.unwrap_or_else(|| PathBuf::from("sluice-data"))),
            (Some(ca), Some(cert), Some(key)) => TlsSource::Files(Identity { ca, cert, key }),
            _ => {
                return Err(invalid(
                    "tls_ca",
                    "tls_ca, tls_cert and tls_key go together: give all three or none",
                ));
            }
        };
        let queue = QueueConfig {
            max_outstanding_per_tenant: self
                .max_outstanding_per_tenant
                .unwrap_or(defaults.max_outstanding_per_tenant),
            max_queriers_per_tenant: self.max_queriers_per_tenant.unwrap_or(defaults.max_queriers_per_tenant),
            max_queued_requests: self.max_queued_requests.unwrap_or(defaults.max_queued_requests),
            max_queued_bytes: self.max_queued_bytes.unwrap_or(defaults.max_queued_bytes),
            querier_forget_delay: self
                .querier_forget_delay_ms
                .map_or(defaults.querier_forget_delay, Duration::from_millis),
            cost_quantum: self.cost_quantum.unwrap_or(defaults.cost_quantum),
            max_cost: self.max_cost_hint.unwrap_or(defaults.max_cost),
            reserved_workers_percent: self
                .reserved_workers_percent
                .unwrap_or(defaults.reserved_workers_percent),
            reserved_min_priority: self.reserved_min_priority.unwrap_or(defaults.reserved_min_priority),
            lend_max_cost: self.lend_max_cost.unwrap_or(defaults.lend_max_cost),
            deadline_admission: self.deadline_admission.unwrap_or(defaults.deadline_admission),
            max_priority_skips: self.max_priority_skips.unwrap_or(defaults.max_priority_skips),
            tenants: self.tenants.into_iter().collect::<HashMap<_, _>>(),
        };
        queue.validate().map_err(|e| invalid(&e.key, e.problem))?;
        let max_frame_len = self.max_frame_len.unwrap_or(8 * 1024 * 1024);
        if !sluice_protocol::frame_limit_allowed(max_frame_len) {
            return Err(invalid(
                "max_frame_len",
                format!("must be between {MIN_FRAME_LEN} and {HARD_MAX_FRAME_LEN} bytes"),
            ));
        }
        // A timeout of hours is a timeout turned off: refused, with the key named.
        let positive = |key: &str, v: Option<u64>, default: u64| -> Result<Duration, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(invalid(key, "must be at least 1")),
                ms if ms > MAX_TIMEOUT_MS => Err(invalid(
                    key,
                    format!("must be at most {MAX_TIMEOUT_MS} (one hour): a larger value turns a safety timeout off"),
                )),
                ms => Ok(Duration::from_millis(ms)),
            }
        };
        let min_budget = u64::from(max_frame_len) + 64 * 1024;
        let connection_receive_budget = self
            .connection_receive_budget
            .unwrap_or(u64::from(max_frame_len) + 1024 * 1024);
        if connection_receive_budget < min_budget || connection_receive_budget > 1 << 34 {
            return Err(invalid(
                "connection_receive_budget",
                format!("must be between max_frame_len + 64 KiB ({min_budget}) and 16 GiB"),
            ));
        }
        let threads = self.threads.unwrap_or(1);
        if threads == 0 {
            return Err(invalid("threads", "must be at least 1"));
        }
        let max_connections = self.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        let max_streams_per_connection = self.max_streams_per_connection.unwrap_or(128);
        if max_streams_per_connection == 0 {
            return Err(invalid("max_streams_per_connection", "must be at least 1"));
        }
        if self.scheduler_id.as_deref() == Some("") {
            // Other schedulers find their acknowledgements by it.
            return Err(invalid("scheduler_id", "must not be empty"));
        }
        Ok(ServeConfig {
            listen,
            admin_listen,
            // With an OS-chosen port (0), the server names itself after the port it gets.
            scheduler_id: self.scheduler_id.unwrap_or_else(|| match listen.port() {
                0 => String::new(),
                port => format!("scheduler-{port}"),
            }),
            tls,
            queue,
            max_frame_len,
            threads: usize::from(threads),
            max_connections,
            max_streams_per_connection,
            idle_timeout: positive("idle_timeout_ms", self.idle_timeout_ms, 5_000)?,
            hello_timeout: positive("hello_timeout_ms", self.hello_timeout_ms, 10_000)?,
            frame_timeout: positive("frame_timeout_ms", self.frame_timeout_ms, 10_000)?,
            connection_receive_budget: usize::try_from(connection_receive_budget).unwrap_or(usize::MAX),
            drain_timeout: positive("drain_timeout_ms", self.drain_timeout_ms, 30_000)?,
            advertise,
            gossip,
        })
    }

    /// The gossip configuration, if `gossip_listen` is set; every gossip key without it
    /// is an error, as is a missing or short key.
    fn gossip_settings(&self, advertise: SocketAddr) -> Result<Option<GossipConfig>, ConfigError> {
        let Some(bind) = self.gossip_listen else {
            let stray = [
                ("gossip_seeds", self.gossip_seeds.is_some()),
                ("gossip_key", self.gossip_key.is_some()),
                ("gossip_key_file", self.gossip_key_file.is_some()),
                ("gossip_advertise", self.gossip_advertise.is_some()),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(invalid(key, "has no effect without gossip_listen"));
            }
            return Ok(None);
        };
        let key = match (&self.gossip_key, &self.gossip_key_file) {
            (Some(k), None) => k.clone().into_bytes(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| invalid("gossip_key_file", format!("{}: {e}", path.display())))?
                .trim()
                .as_bytes()
                .to_vec(),
            (Some(_), Some(_)) => return Err(invalid("gossip_key", "give gossip_key or gossip_key_file, not both")),
            (None, None) => {
                return Err(invalid(
                    "gossip_key",
                    "required with gossip_listen (every gossip packet is authenticated with it)",
                ));
            }
        };
        let key = GossipKey::new(key).map_err(|_| invalid("gossip_key", "must be at least 16 bytes"))?;
        if advertise.ip().is_unspecified() {
            return Err(invalid(
                "advertise",
                format!("listen is {advertise}: give the address clients should connect to"),
            ));
        }
        let mut config = GossipConfig::new(bind, self.gossip_seeds.clone().unwrap_or_default(), key);
        config.advertise = self.gossip_advertise;
        if let Some(ms) = self.gossip_probe_period_ms {
            config.probe_period = Duration::from_millis(ms);
            config.probe_rtt = config.probe_rtt.min(config.probe_period * 2 / 5);
        }
        if let Some(ms) = self.gossip_suspect_ms {
            config.suspect_to_down = Duration::from_millis(ms);
        }
        if config.probe_rtt.is_zero() || config.suspect_to_down.is_zero() {
            return Err(invalid(
                "gossip_probe_period_ms",
                "gossip_probe_period_ms must be at least 3 and gossip_suspect_ms at least 1",
            ));
        }
        Ok(Some(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_sane_and_local() {
        let c = Settings::default().resolve().unwrap();
        assert!(c.listen.ip().is_loopback() && c.admin_listen.ip().is_loopback());
        assert_eq!(c.tls, TlsSource::Development(PathBuf::from("sluice-data")));
        assert_eq!(c.queue.max_outstanding_per_tenant, 100);
        assert_eq!(c.threads, 1);
    }

    #[test]
    fn flags_win_over_the_file_and_tenants_come_from_the_file() {
        let file =
            parse("max_outstanding_per_tenant = 5\nmax_queriers_per_tenant = 3\n[tenants.big]\nmax_outstanding = 50\n")
                .unwrap();
        let flags = Settings {
            max_outstanding_per_tenant: Some(7),
            ..Settings::default()
        };
        let c = flags.over(file).resolve().unwrap();
        assert_eq!(c.queue.max_outstanding_per_tenant, 7);
        assert_eq!(c.queue.max_queriers_per_tenant, 3);
        assert_eq!(c.queue.max_outstanding("big"), 50);
    }

    #[test]
    fn reserved_capacity_is_lent_only_when_asked() {
        let c = parse("reserved_workers_percent = 25\nlend_max_cost = 10\n")
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!((c.queue.reserved_workers_percent, c.queue.lend_max_cost), (25, 10));
        assert_eq!(Settings::default().resolve().unwrap().queue.lend_max_cost, 0);
    }

    #[test]
    fn unknown_keys_and_bad_types_are_named() {
        let err = parse("max_outstanding_per_tenantt = 5").unwrap_err();
        assert!(err.contains("max_outstanding_per_tenantt"), "{err}");
        let err = parse("max_queued_bytes = \"lots\"").unwrap_err();
        assert!(err.contains("max_queued_bytes"), "{err}");
        let err = parse("[tenants.a]\nmax_outstandin = 1").unwrap_err();
        assert!(err.contains("max_outstandin"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let check = |s: Settings, key: &str| {
            let err = s.resolve().unwrap_err().to_string();
            assert!(err.starts_with(key), "{err}");
        };
        check(
            Settings {
                max_outstanding_per_tenant: Some(0),
                ..Settings::default()
            },
            "max_outstanding_per_tenant:",
        );
        check(
            Settings {
                threads: Some(0),
                ..Settings::default()
            },
            "threads:",
        );
        check(
            Settings {
                scheduler_id: Some(String::new()),
                ..Settings::default()
            },
            "scheduler_id:",
        );
        check(
            Settings {
                max_frame_len: Some(MIN_FRAME_LEN - 1),
                ..Settings::default()
            },
            "max_frame_len:",
        );
        check(
            Settings {
                drain_timeout_ms: Some(0),
                ..Settings::default()
            },
            "drain_timeout_ms:",
        );
        check(
            Settings {
                tls_cert: Some("x".into()),
                ..Settings::default()
            },
            "tls_ca:",
        );
        // Values that would turn a safety timeout or budget off.
        for (s, key) in [
            (
                Settings {
                    hello_timeout_ms: Some(u64::MAX),
                    ..Settings::default()
                },
                "hello_timeout_ms:",
            ),
            (
                Settings {
                    drain_timeout_ms: Some(u64::MAX),
                    ..Settings::default()
                },
                "drain_timeout_ms:",
            ),
            (
                Settings {
                    idle_timeout_ms: Some(MAX_TIMEOUT_MS + 1),
                    ..Settings::default()
                },
                "idle_timeout_ms:",
            ),
            (
                Settings {
                    frame_timeout_ms: Some(u64::MAX),
                    ..Settings::default()
                },
                "frame_timeout_ms:",
            ),
            (
                Settings {
                    connection_receive_budget: Some(u64::MAX),
                    ..Settings::default()
                },
                "connection_receive_budget:",
            ),
            (
                Settings {
                    connection_receive_budget: Some(1024),
                    ..Settings::default()
                },
                "connection_receive_budget:",
            ),
        ] {
            check(s, key);
        }
        let mut tenants = BTreeMap::new();
        tenants.insert(
            "t".to_string(),
            TenantSettings {
                max_outstanding: Some(0),
                ..TenantSettings::default()
            },
        );
        check(
            Settings {
                tenants,
                ..Settings::default()
            },
            "tenants.t.max_outstanding:",
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_file(Path::new("/nonexistent/sluice.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/nonexistent/sluice.toml"), "{err}");
    }
}
