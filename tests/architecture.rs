//! The boundaries ARCHITECTURE.md promises, checked on the source so that they hold by
//! construction, not by discipline: the queue core does no I/O, keeps no clock and runs
//! nothing async; the wire format holds no sockets; the modules every peer shares (the
//! broker included) know nothing of the frontend or the querier.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, recursively, except those under a `tests` directory
/// (unit tests may build their fake clock from a real instant).
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "tests") {
                out.extend(sources(&path));
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The lines of `files` that mention any of `forbidden` outside comments, as
/// `file:line: text`.
fn offending(files: &[PathBuf], forbidden: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        let mut in_tests = false;
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            // A file's own `#[cfg(test)] mod tests` is test code too.
            if line.trim_start().starts_with("#[cfg(test)]") {
                in_tests = true;
            }
            if in_tests {
                continue;
            }
            if let Some(word) = forbidden.iter().find(|w| code.contains(*w)) {
                out.push(format!("{}:{}: `{word}` in: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    out
}

#[test]
fn the_queue_core_does_no_io_keeps_no_clock_and_runs_nothing_async() {
    let files = sources(&root().join("src/queue"));
    assert!(files.len() >= 10, "the queue core's files were found: {files:?}");
    let found = offending(
        &files,
        &[
            "tokio",
            "quinn",
            "std::net",
            "std::fs",
            "std::thread",
            "async ",
            ".await",
            "Instant::now",
            "SystemTime",
            "sluice_client",
            "crate::server",
        ],
    );
    assert!(
        found.is_empty(),
        "the queue core must stay a pure state machine:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_wire_format_holds_no_sockets_and_needs_tokio_only_for_its_framed_io() {
    let files = sources(&root().join("protocol/src"));
    let found = offending(&files, &["quinn", "std::net", "rustls"]);
    assert!(found.is_empty(), "{}", found.join("\n"));
    let async_outside_io: Vec<String> = offending(&files, &["tokio::", ".await"])
        .into_iter()
        .filter(|l| !l.contains("io.rs:"))
        .collect();
    assert!(async_outside_io.is_empty(), "{}", async_outside_io.join("\n"));
}

#[test]
fn the_modules_every_peer_shares_know_nothing_of_frontends_and_queriers() {
    let client = root().join("client/src");
    let shared: Vec<PathBuf> = [
        "gossip/mod.rs",
        "gossip/agent.rs",
        "gossip/fuzzing.rs",
        "tls.rs",
        "trace.rs",
        "transport.rs",
        "quic_stats.rs",
        "backoff.rs",
    ]
    .iter()
    .map(|f| client.join(f))
    .collect();
    let found = offending(
        &shared,
        &[
            "crate::frontend",
            "crate::querier",
            "crate::lifecycle",
            "crate::discovery",
        ],
    );
    assert!(found.is_empty(), "{}", found.join("\n"));
}
