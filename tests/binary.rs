//! The `sluice` binary as an operator runs it: no files needed, clear errors, SIGHUP
//! reload, SIGTERM exit. Each test starts its own process on loopback ports chosen by
//! the OS and stops it.

mod common;

use std::time::Duration;

use common::*;
use sluice_protocol::*;
use tokio::process::Command;

#[tokio::test]
async fn serve_needs_no_files_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spawn_scheduler(dir.path(), &[]).await;
    assert!(s.certs.is_complete(), "development certificates were written");
    let fe_conn = connect(s.quic, &s.certs.frontend).await.unwrap();
    let q_conn = connect(s.quic, &s.certs.querier).await.unwrap();
    let mut fe = frontend(&fe_conn, "fe").await;
    let mut w = worker(&q_conn, "q").await;
    accepted(&mut fe, 1, "t").await;
    w.ready(0).await;
    assert_eq!(dispatched(&mut w).await.query_id, 1);

    signal(&s.child, "TERM").await;
    let status = tokio::time::timeout(WAIT, s.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    // A restart reuses the same certificates.
    let before = std::fs::read(&s.certs.ca_cert).unwrap();
    let mut again = spawn_scheduler(dir.path(), &[]).await;
    assert_eq!(std::fs::read(&again.certs.ca_cert).unwrap(), before);
    signal(&again.child, "TERM").await;
    tokio::time::timeout(WAIT, again.child.wait()).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_bad_configuration_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sluice.toml"), "max_queriers_per_tenant = -1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .current_dir(dir.path())
        .args(["serve", "--config", "sluice.toml"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sluice.toml") && err.contains("max_queriers_per_tenant"),
        "{err}"
    );
    assert!(!err.contains("backtrace"), "{err}");
}

#[tokio::test]
async fn sighup_reloads_tenant_limits() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, "max_outstanding_per_tenant = 1\n").unwrap();
    let mut s = spawn_scheduler(dir.path(), &["--config", "sluice.toml", "--drain-timeout-ms", "100"]).await;
    let conn = connect(s.quic, &s.certs.frontend).await.unwrap();
    let mut fe = frontend(&conn, "fe").await;
    accepted(&mut fe, 1, "big").await;
    fe.send(&enqueue(2, "big")).await;
    assert_eq!(
        status_of(&mut fe, 2).await,
        EnqueueStatus::TooManyOutstanding { limit: 1 }
    );

    std::fs::write(
        &config,
        "max_outstanding_per_tenant = 1\n[tenants.big]\nmax_outstanding = 3\n",
    )
    .unwrap();
    signal(&s.child, "HUP").await;
    // The reload is asynchronous: retry (bounded) until the new limit answers.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut query = 10;
    loop {
        query += 1;
        fe.send(&enqueue(query, "big")).await;
        match status_of(&mut fe, query).await {
            EnqueueStatus::Accepted => break,
            EnqueueStatus::TooManyOutstanding { limit: 1 } => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "reload never took effect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&s.child, "TERM").await;
    tokio::time::timeout(WAIT, s.child.wait()).await.unwrap().unwrap();
}

#[tokio::test]
async fn demo_runs_with_no_files_and_shows_fairness() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .current_dir(dir.path())
            .args(["demo", "--seconds", "3"])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.rsplit("sluice demo").next().unwrap();
    // Quiet tenants: nothing refused, nothing failed. The noisy one: refused at its limit.
    for line in last.lines().filter(|l| l.starts_with("quiet-")) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((cols[3], cols[5]), ("0", "0"), "{line}");
    }
    let noisy: Vec<&str> = last
        .lines()
        .find(|l| l.starts_with("noisy"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert!(
        noisy[3].parse::<u64>().unwrap() > 0,
        "the noisy tenant is refused beyond its limit"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "no files left behind"
    );
}

#[tokio::test]
async fn bench_reports_every_outcome_and_draws_the_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .current_dir(dir.path())
            .args([
                "bench",
                "--seconds",
                "2",
                "--tenants",
                "5",
                "--queriers",
                "2",
                "--workers",
                "2",
                "--result-bytes",
                "700",
            ])
            .args([
                "--rate",
                "300",
                "--noisy-factor",
                "10",
                "--json",
                "report.json",
                "--plot",
                "wait.svg",
            ])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    let o = &report["outcomes"];
    assert_eq!((o["lost"].as_u64(), o["errors"].as_u64()), (Some(0), Some(0)), "{o}");
    assert!(o["results"].as_u64().unwrap() > 100, "{o}");
    assert_eq!(o["results"], o["dispatched_by_schedulers"]);
    assert_eq!(
        o["result_bytes_received"].as_u64(),
        o["results"].as_u64().map(|r| r * 700),
        "every result carried --result-bytes"
    );
    assert_eq!(report["tenants"].as_array().unwrap().len(), 5);
    // Open loop: the generator says how late it submitted against its schedule.
    let late = &report["generator_lateness_ms"];
    let q = |k: &str| late[k].as_f64().unwrap_or_else(|| panic!("{k} in {late}"));
    assert!(
        0.0 <= q("p50") && q("p50") <= q("p99") && q("p99") <= q("max"),
        "{late}"
    );
    // The timeline: every served query in one bucket of 100 ms, in order, within the run.
    let timeline = report["timeline_100ms"].as_array().unwrap();
    let served: u64 = timeline.iter().map(|b| b["served"].as_u64().unwrap()).sum();
    let all: u64 = report["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["served"].as_u64().unwrap())
        .sum();
    assert_eq!(served, all);
    let from: Vec<u64> = timeline.iter().map(|b| b["from_ms"].as_u64().unwrap()).collect();
    assert!(
        from.windows(2).all(|w| w[0] < w[1] && (w[1] - w[0]) % 100 == 0),
        "{from:?}"
    );
    assert!(from.len() >= 15 && *from.last().unwrap() < 3_000, "{from:?}");
    for b in timeline {
        let w = &b["queue_wait_us"];
        assert!(w["p99"].as_u64().unwrap() <= w["max"].as_u64().unwrap(), "{b}");
    }
    let svg = std::fs::read_to_string(dir.path().join("wait.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("tenant-0 (noisy)"));
}

#[tokio::test]
async fn bench_drives_a_running_scheduler() {
    let t = start(|_| {}).await;
    let addr = t.server.quic_addr().to_string();
    let certs = t.certs.dir.to_str().unwrap().to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "bench",
                "--seconds",
                "1",
                "--warm-up-seconds",
                "0",
                "--tenants",
                "3",
                "--queriers",
                "2",
                "--workers",
                "2",
            ])
            .args(["--rate", "200", "--connect", &addr, "--certs", &certs])
            .args(["--admin", &t.server.admin_addr().to_string()])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let o = &report["outcomes"];
    assert_eq!((o["lost"].as_u64(), o["errors"].as_u64()), (Some(0), Some(0)), "{o}");
    assert!(o["dispatched_by_schedulers"].is_null(), "{o}");
    // CPU per query, of this process and of the driven scheduler (here: the test's
    // process, read through its admin endpoint).
    let cpu = &report["cpu"];
    assert!(
        cpu["this_process_us_per_query"].as_f64().is_some_and(|x| x > 0.0),
        "{cpu}"
    );
    if cfg!(target_os = "linux") {
        assert!(
            cpu["schedulers_us_per_query"].as_f64().is_some_and(|x| x >= 0.0),
            "{cpu}"
        );
    }
    // The hops between tasks per query (polls and spawns need `--cfg tokio_unstable`,
    // which .cargo/config.toml sets).
    let tasks = &report["tasks_per_query"];
    for side in ["this_process", "schedulers"] {
        let t = &tasks[side];
        assert!(t["parks"].as_f64().is_some(), "{tasks}");
        assert!(
            t["polls"].is_null() || t["polls"].as_f64().is_some_and(|x| x >= 1.0),
            "{tasks}"
        );
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("queries/s"));
    // The queries went through our scheduler: its own count has them (and the warm-up).
    let dispatched = t.server.status().await.unwrap().counters.dispatched;
    assert_eq!(dispatched, o["results"].as_u64().unwrap() + 2, "{o}");
}

#[tokio::test]
async fn schedulers_on_os_chosen_ports_get_distinct_ids() {
    let dir = tempfile::tempdir().unwrap();
    let a = spawn_scheduler(dir.path(), &[]).await;
    let b = spawn_scheduler(dir.path(), &[]).await;
    let id = |admin| async move {
        let status = process_status_until(admin, WAIT, "a status", |_| true).await;
        status["scheduler_id"].as_str().unwrap().to_string()
    };
    let (id_a, id_b) = (id(a.admin).await, id(b.admin).await);
    assert_eq!(id_a, format!("scheduler-{}", a.quic.port()));
    assert_eq!(id_b, format!("scheduler-{}", b.quic.port()));
}

#[tokio::test]
async fn serve_writes_a_ready_file_and_logs_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready.json");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--log-format", "json", "--ready-file"])
        .arg(&ready)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped());
    let (child, printed) = spawn_serve(command).await;
    // Written before the process prints that it listens.
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    assert_eq!(report["quic"], printed.quic.to_string());
    assert_eq!(report["admin"], printed.admin.to_string());
    assert_eq!(report["scheduler_id"], format!("scheduler-{}", printed.quic.port()));
    assert_eq!(get(printed.admin, "/ready").await.0, 200);
    signal(&child, "TERM").await;
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty(), "something is logged at shutdown");
    for line in lines {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(entry["level"].is_string(), "{line}");
        assert!(!line.contains('\u{1b}'), "no ANSI colours: {line}");
    }
}

/// `sluice serve` turns transparent huge pages off for itself (the first touch of a fresh
/// 2 MiB page stalls the runtime thread that makes it), unless `MIMALLOC_ALLOW_THP=1` keeps
/// them.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn serve_runs_without_transparent_huge_pages_unless_asked() {
    fn thp_enabled(pid: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("THP_enabled:"));
        line.expect("THP_enabled in /proc/PID/status (Linux 5.0+)")
            .trim()
            .to_string()
    }
    // What a process that leaves the setting alone gets from this kernel.
    let kernel_default = thp_enabled("self");
    for (allow, expected) in [(None, "0"), (Some("1"), kernel_default.as_str())] {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command
            .current_dir(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env_remove("MIMALLOC_ALLOW_THP");
        if let Some(value) = allow {
            command.env("MIMALLOC_ALLOW_THP", value);
        }
        let (child, _) = spawn_serve(command).await;
        let pid = child.id().unwrap().to_string();
        assert_eq!(thp_enabled(&pid), expected, "MIMALLOC_ALLOW_THP={allow:?}");
        signal(&child, "TERM").await;
        tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
    }
}
