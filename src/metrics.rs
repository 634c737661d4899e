//! Every metric the scheduler exports: names, help text, and the recorder they go to.
//!
//! Names follow Mimir's `cortex_query_scheduler_*` family under our prefix, so its
//! dashboards port with a rename (the mapping is in docs/operations.md). Each server owns
//! its recorder (no global one), so several servers can live in one process.

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use metrics_util::MetricKindMask;

/// Requests queued, per tenant (gauge; `tenant`).
pub const QUEUE_LENGTH: &str = "sluice_query_scheduler_queue_length";
/// Age of the oldest queued request, per tenant (gauge, seconds; `tenant`).
pub const OLDEST_QUEUED_AGE: &str = "sluice_query_scheduler_oldest_queued_age_seconds";
/// Most requests a tenant had queued at once since it last had none (gauge; `tenant`).
pub const PEAK_QUEUE_LENGTH: &str = "sluice_query_scheduler_peak_queue_length";
/// Time from enqueue to dispatch (histogram, seconds; `tenant`, `component`).
pub const QUEUE_DURATION: &str = "sluice_query_scheduler_queue_duration_seconds";
/// Time from receiving an enqueue frame to answering it (histogram, seconds).
pub const ENQUEUE_DURATION: &str = "sluice_query_scheduler_enqueue_duration_seconds";
/// Requests that ended without running (counter; `tenant`, `reason`: `too_many_outstanding`,
/// `queue_full`, `invalid`, `shutting_down`, `expired`, `handed_back`).
pub const DISCARDED_REQUESTS: &str = "sluice_query_scheduler_discarded_requests_total";
/// Requests cancelled by their frontend, queued or in flight (counter; `tenant`).
pub const CANCELLED_REQUESTS: &str = "sluice_query_scheduler_cancelled_requests_total";
/// Queries failed because their querier went away mid-query (counter).
pub const QUERIER_FAILURES: &str = "sluice_query_scheduler_querier_failures_total";
/// Queries a querier gave back unstarted, held behind a long one (counter): each is placed
/// again by its frontend.
pub const QUERIER_HAND_BACKS: &str = "sluice_query_scheduler_querier_hand_backs_total";
/// How requests left the queue (counter; `outcome`: `enqueued`, `dispatched`, `cancelled`,
/// `expired`, `handed_back`, `rejected`).
pub const REQUESTS: &str = "sluice_query_scheduler_requests_total";
/// Querier worker streams connected (gauge).
pub const CONNECTED_QUERIER_WORKERS: &str = "sluice_query_scheduler_connected_querier_workers";
/// Queriers known: connected, or inside their forget delay (gauge).
pub const CONNECTED_QUERIERS: &str = "sluice_query_scheduler_connected_queriers";
/// Frontend loops connected (gauge).
pub const CONNECTED_FRONTENDS: &str = "sluice_query_scheduler_connected_frontends";
/// Queries dispatched and not yet finished (gauge).
pub const INFLIGHT_REQUESTS: &str = "sluice_query_scheduler_inflight_requests";
/// Queries running, per component (gauge; `component`, `unknown` for none).
pub const QUERIER_INFLIGHT_REQUESTS: &str = "sluice_query_scheduler_querier_inflight_requests";
/// Cost of the queries that finished, per tenant: the querier's measured cost when it
/// reports one, the enqueue's cost hint otherwise (counter; `tenant`).
pub const SERVED_COST: &str = "sluice_query_scheduler_served_cost_total";
/// Deficit-round-robin balance of each queued tenant, in cost units (gauge; `tenant`).
pub const TENANT_BALANCE: &str = "sluice_query_scheduler_tenant_balance";
/// Requests queued per priority class (gauge; `priority`).
pub const CLASS_QUEUE_LENGTH: &str = "sluice_query_scheduler_priority_queue_length";
/// Live gossip members this scheduler knows, itself excluded (gauge; `role`, `state`).
pub const GOSSIP_MEMBERS: &str = "sluice_query_scheduler_gossip_members";
/// Gossip packets (counter; `outcome`: `received`, `rejected` for a bad tag, `sent`).
pub const GOSSIP_PACKETS: &str = "sluice_query_scheduler_gossip_packets_total";
/// Querier workers connected and waiting for work (gauge).
pub const IDLE_QUERIER_WORKERS: &str = "sluice_query_scheduler_idle_querier_workers";

/// QUIC connections open, per peer role (gauge; `role`: `frontend`, `querier`).
pub const QUIC_CONNECTIONS: &str = "sluice_query_scheduler_quic_connections";
/// UDP datagrams of the scheduler's QUIC connections (counter; `role`: `frontend`,
/// `querier`; `direction`: `sent`, `received`).
pub const QUIC_DATAGRAMS: &str = "sluice_query_scheduler_quic_datagrams_total";
/// Bytes in those datagrams (counter; `role`, `direction`).
pub const QUIC_BYTES: &str = "sluice_query_scheduler_quic_bytes_total";
/// System calls that sent them: fewer than the datagrams sent when several go in one
/// (counter; `role`).
pub const QUIC_SEND_CALLS: &str = "sluice_query_scheduler_quic_send_calls_total";
/// Packets QUIC declared lost and sent again (counter; `role`).
pub const QUIC_LOST_PACKETS: &str = "sluice_query_scheduler_quic_lost_packets_total";
/// Times a connection's congestion window was cut (counter; `role`).
pub const QUIC_CONGESTION_EVENTS: &str = "sluice_query_scheduler_quic_congestion_events_total";
/// The QUIC endpoint's UDP socket buffers, as the kernel granted and reports them (gauge;
/// `direction`: `receive`, `send`). Linux reports twice what it grants; below twice
/// `transport::SOCKET_BUFFER_BYTES` the kernel capped it (docs/operations.md).
pub const UDP_SOCKET_BUFFER: &str = "sluice_query_scheduler_udp_socket_buffer_bytes";

/// Polls of this process's async tasks: a task woken and run (counter; read at scrape
/// time; needs `--cfg tokio_unstable`, set in .cargo/config.toml).
pub const RUNTIME_TASK_POLLS: &str = "sluice_query_scheduler_runtime_task_polls_total";
/// Tasks one runtime thread took from another's queue (counter; as above).
pub const RUNTIME_TASK_STEALS: &str = "sluice_query_scheduler_runtime_task_steals_total";
/// Times a runtime thread went to sleep for want of work: each one is woken again by an
/// event (counter; read at scrape time).
pub const RUNTIME_THREAD_PARKS: &str = "sluice_query_scheduler_runtime_thread_parks_total";

/// CPU time this process has used, user and system (seconds, only growing; exported as a
/// gauge because `metrics` counters are integers; Linux only). The name is Prometheus's
/// standard process metric.
pub const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds_total";
/// Resident memory of this process (gauge, bytes; Linux only).
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";

/// (name, help) of every metric, for `describe_*` and the docs.
pub const ALL: &[(&str, &str)] = &[
    (QUEUE_LENGTH, "Requests queued, per tenant."),
    (
        OLDEST_QUEUED_AGE,
        "Age in seconds of the oldest queued request, per tenant.",
    ),
    (
        PEAK_QUEUE_LENGTH,
        "Most requests queued at once since the tenant last had none.",
    ),
    (QUEUE_DURATION, "Seconds from enqueue to dispatch."),
    (ENQUEUE_DURATION, "Seconds from receiving an enqueue to answering it."),
    (DISCARDED_REQUESTS, "Requests that ended without running, by reason."),
    (CANCELLED_REQUESTS, "Requests cancelled by their frontend."),
    (
        QUERIER_FAILURES,
        "Queries failed because their querier went away mid-query.",
    ),
    (
        QUERIER_HAND_BACKS,
        "Queries a querier gave back unstarted, to be placed again.",
    ),
    (REQUESTS, "Requests by how they left the queue."),
    (
        SERVED_COST,
        "Cost of finished queries per tenant (measured, else the hint).",
    ),
    (
        TENANT_BALANCE,
        "Deficit round robin balance of each queued tenant, in cost units.",
    ),
    (CLASS_QUEUE_LENGTH, "Requests queued per priority class."),
    (GOSSIP_MEMBERS, "Live gossip members known, by role and state."),
    (GOSSIP_PACKETS, "Gossip packets received, rejected (bad tag) and sent."),
    (CONNECTED_QUERIER_WORKERS, "Querier worker streams connected."),
    (
        CONNECTED_QUERIERS,
        "Queriers known (connected or inside the forget delay).",
    ),
    (CONNECTED_FRONTENDS, "Frontend loops connected."),
    (INFLIGHT_REQUESTS, "Queries dispatched and not yet finished."),
    (QUERIER_INFLIGHT_REQUESTS, "Queries running, per component."),
    (IDLE_QUERIER_WORKERS, "Querier workers waiting for work."),
    (QUIC_CONNECTIONS, "QUIC connections open, by peer role."),
    (
        QUIC_DATAGRAMS,
        "UDP datagrams of the QUIC connections, by peer role and direction.",
    ),
    (QUIC_BYTES, "Bytes in those datagrams, by peer role and direction."),
    (QUIC_SEND_CALLS, "System calls that sent the datagrams, by peer role."),
    (QUIC_LOST_PACKETS, "Packets QUIC declared lost, by peer role."),
    (
        UDP_SOCKET_BUFFER,
        "The QUIC endpoint's UDP socket buffers as the kernel reports them, by direction.",
    ),
    (
        QUIC_CONGESTION_EVENTS,
        "Congestion window cuts of the QUIC connections, by peer role.",
    ),
    (
        PROCESS_CPU_SECONDS,
        "User and system CPU time of this process, in seconds.",
    ),
    (PROCESS_RESIDENT_MEMORY, "Resident memory of this process, in bytes."),
    (RUNTIME_TASK_POLLS, "Polls of this process's async tasks."),
    (
        RUNTIME_TASK_STEALS,
        "Async tasks a runtime thread took from another's queue.",
    ),
    (
        RUNTIME_THREAD_PARKS,
        "Times a runtime thread went to sleep for want of work.",
    ),
];

/// The async runtime's counters so far, summed over its worker threads: the hops between
/// tasks that datagrams and system calls do not show. Polls, steals and spawns need
/// `--cfg tokio_unstable` (.cargo/config.toml sets it); without it they are `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeCounts {
    /// Task polls: a task woken and run.
    pub polls: Option<u64>,
    /// Tasks taken from another thread's queue.
    pub steals: Option<u64>,
    /// Tasks spawned.
    pub spawned: Option<u64>,
    /// Times a thread went to sleep for want of work.
    pub parks: u64,
}

/// Two runtimes' counters together (a counter is known only if both know it).
impl std::ops::Add for RuntimeCounts {
    type Output = RuntimeCounts;

    fn add(self, o: RuntimeCounts) -> RuntimeCounts {
        let sum = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| a + b);
        RuntimeCounts {
            polls: sum(self.polls, o.polls),
            steals: sum(self.steals, o.steals),
            spawned: sum(self.spawned, o.spawned),
            parks: self.parks + o.parks,
        }
    }
}

impl RuntimeCounts {
    /// The counters of the runtime this is called on; `None` outside one.
    pub fn now() -> Option<RuntimeCounts> {
        let m = tokio::runtime::Handle::try_current().ok()?.metrics();
        let workers = 0..m.num_workers();
        #[cfg(tokio_unstable)]
        let (polls, steals, spawned) = (
            Some(workers.clone().map(|w| m.worker_poll_count(w)).sum()),
            Some(workers.clone().map(|w| m.worker_steal_count(w)).sum()),
            Some(m.spawned_tasks_count()),
        );
        #[cfg(not(tokio_unstable))]
        let (polls, steals, spawned) = (None, None, None);
        Some(RuntimeCounts {
            polls,
            steals,
            spawned,
            parks: workers.map(|w| m.worker_park_count(w)).sum(),
        })
    }

    /// What grew from `before` to `self`.
    pub fn since(self, before: RuntimeCounts) -> RuntimeCounts {
        let d = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| a.saturating_sub(b));
        RuntimeCounts {
            polls: d(self.polls, before.polls),
            steals: d(self.steals, before.steals),
            spawned: d(self.spawned, before.spawned),
            parks: self.parks.saturating_sub(before.parks),
        }
    }
}

/// This process's CPU time so far (user + system), from `/proc/self/stat`; `None` where
/// there is no procfs.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces, so split after its `)`):
    // utime and stime are the 14th and 15th fields, in clock ticks of 1/100 s (USER_HZ,
    // fixed at 100 in the procfs interface).
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The calling thread's CPU time so far, from `/proc/thread-self/schedstat` (nanoseconds,
/// unlike the process's clock ticks); `None` where there is no procfs.
pub fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_ascii_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// This process's resident memory, from `/proc/self/status`; `None` where there is no
/// procfs.
pub fn process_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Seconds buckets for the duration histograms: 100 µs to 2 min.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
];

/// A server's own recorder and the handle that renders it.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Set once the endpoint is bound; rendered at every scrape (a gauge set once would
    /// go idle and be dropped).
    socket_buffers: std::sync::OnceLock<sluice_client::transport::SocketBuffers>,
}

impl Metrics {
    /// A recorder whose series are dropped after `idle` without an update (so per-tenant
    /// series of tenants gone quiet disappear).
    pub fn new(idle: Duration) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("bucket list is not empty")
            .idle_timeout(MetricKindMask::ALL, Some(idle))
            .build_recorder();
        let handle = recorder.handle();
        let m = Metrics {
            recorder,
            handle,
            socket_buffers: std::sync::OnceLock::new(),
        };
        m.record(|| {
            for &(name, help) in ALL {
                metrics::describe_counter!(name, help);
                metrics::describe_gauge!(name, help);
                metrics::describe_histogram!(name, help);
            }
        });
        m
    }

    /// Records the socket buffers the QUIC endpoint was granted.
    pub fn set_socket_buffers(&self, granted: sluice_client::transport::SocketBuffers) {
        let _ = self.socket_buffers.set(granted);
    }

    /// Runs `f` with this recorder as the one the `metrics` macros write to.
    pub fn record<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// Folds buffered histogram samples into their buckets and drops idle series; the
    /// dispatcher runs it every second, so memory does not grow when nobody scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition of every live series, with the process's CPU,
    /// memory and runtime counters read now.
    pub fn render(&self) -> String {
        self.record(|| {
            if let Some(cpu) = process_cpu_seconds() {
                // A gauge: `metrics` counters hold whole numbers.
                metrics::gauge!(PROCESS_CPU_SECONDS).set(cpu);
            }
            if let Some(rss) = process_resident_bytes() {
                metrics::gauge!(PROCESS_RESIDENT_MEMORY).set(rss as f64);
            }
            if let Some(b) = self.socket_buffers.get() {
                metrics::gauge!(UDP_SOCKET_BUFFER, "direction" => "receive").set(b.receive as f64);
                metrics::gauge!(UDP_SOCKET_BUFFER, "direction" => "send").set(b.send as f64);
            }
            if let Some(r) = RuntimeCounts::now() {
                metrics::counter!(RUNTIME_THREAD_PARKS).absolute(r.parks);
                if let (Some(polls), Some(steals)) = (r.polls, r.steals) {
                    metrics::counter!(RUNTIME_TASK_POLLS).absolute(polls);
                    metrics::counter!(RUNTIME_TASK_STEALS).absolute(steals);
                }
            }
        });
        self.handle.run_upkeep();
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Burns this thread's CPU until its clock moved by `seconds` (bounded in wall time).
    #[cfg(target_os = "linux")]
    fn burn(seconds: f64) {
        let start = thread_cpu_seconds().expect("procfs");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        while thread_cpu_seconds().expect("procfs") - start < seconds {
            for i in 0..10_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            assert!(std::time::Instant::now() < deadline, "the thread's clock did not move");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_threads_cpu_counts_its_own_work_and_not_another_threads() {
        let before = thread_cpu_seconds().expect("procfs");
        // Another thread's 50 ms of work while this one waits for it.
        std::thread::spawn(|| burn(0.05)).join().unwrap();
        let waited = thread_cpu_seconds().unwrap() - before;
        assert!(waited < 0.05, "another thread's work was counted: {waited} s");
        burn(0.02);
        let worked = thread_cpu_seconds().unwrap() - before;
        assert!(worked >= 0.02, "this thread's work was not counted: {worked} s");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runtime_counts_grow_with_the_tasks_run() {
        let before = RuntimeCounts::now().expect("on a runtime");
        for _ in 0..100 {
            tokio::spawn(async {}).await.unwrap();
        }
        if cfg!(tokio_unstable) {
            // A runtime thread hands its counts over in batches (when it parks, at the
            // latest): wait for them, bounded.
            let d = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let d = RuntimeCounts::now().unwrap().since(before);
                    if d.polls.is_some_and(|n| n >= 100) {
                        return d;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("100 polls counted");
            assert!(d.spawned.is_some_and(|n| n >= 100), "{d:?}");
        } else {
            let d = RuntimeCounts::now().unwrap().since(before);
            assert_eq!((d.polls, d.spawned), (None, None));
        }
        let (more, fewer) = (
            RuntimeCounts {
                parks: 7,
                polls: Some(9),
                ..RuntimeCounts::default()
            },
            RuntimeCounts {
                parks: 5,
                ..RuntimeCounts::default()
            },
        );
        assert_eq!(fewer.since(more).parks, 0, "never below zero");
        assert_eq!((more + fewer).parks, 12);
        assert_eq!((more + fewer).polls, None, "unknown on one side");
        let text = Metrics::new(Duration::from_secs(60)).render();
        assert!(text.contains(RUNTIME_THREAD_PARKS), "{text}");
        assert_eq!(text.contains(RUNTIME_TASK_POLLS), cfg!(tokio_unstable), "{text}");
    }

    #[test]
    fn no_runtime_counts_outside_a_runtime() {
        assert_eq!(RuntimeCounts::now(), None);
        let text = Metrics::new(Duration::from_secs(60)).render();
        assert!(!text.contains(RUNTIME_THREAD_PARKS), "{text}");
    }

    #[test]
    fn series_of_an_idle_tenant_disappear() {
        let m = Metrics::new(Duration::from_millis(100));
        m.record(|| {
            metrics::gauge!(QUEUE_LENGTH, "tenant" => "busy").set(3.0);
            metrics::gauge!(QUEUE_LENGTH, "tenant" => "quiet").set(1.0);
        });
        assert!(m.render().contains("tenant=\"quiet\""));
        // Keep "busy" fresh; "quiet" is never updated again and must go.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            m.record(|| metrics::gauge!(QUEUE_LENGTH, "tenant" => "busy").set(3.0));
            let text = m.render();
            if !text.contains("tenant=\"quiet\"") {
                assert!(text.contains("tenant=\"busy\""));
                break;
            }
            assert!(std::time::Instant::now() < deadline, "idle series kept:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn every_metric_has_the_prefix_and_help() {
        for (name, help) in ALL {
            // The process metrics keep Prometheus's standard names.
            let standard = [PROCESS_CPU_SECONDS, PROCESS_RESIDENT_MEMORY].contains(name);
            assert!(standard || name.starts_with("sluice_query_scheduler_"), "{name}");
            assert!(!help.is_empty());
        }
    }
}
