//! The operations kit in `ops/`: the Grafana dashboard parses, and every metric the
//! dashboard and the alerting rules read is one the scheduler exports (a renamed metric
//! would otherwise leave an empty panel or an alert that never fires). The rules' syntax
//! is checked by `promtool check rules` in CI.

use std::collections::BTreeSet;

const DASHBOARD: &str = include_str!("../ops/grafana/sluice-scheduler.json");
const ALERTS: &str = include_str!("../ops/prometheus/sluice-alerts.yml");

/// Metric names that appear in a PromQL text: our own family and the process metrics,
/// with a histogram's series suffixes taken off.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["sluice_", "process_"] {
        let mut rest = promql;
        while let Some(at) = rest.find(prefix) {
            let word: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + word.len()..];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(&word);
            names.insert(base.to_string());
        }
    }
    names
}

fn exported() -> BTreeSet<&'static str> {
    sluice::metrics::ALL.iter().map(|(name, _)| *name).collect()
}

#[test]
fn the_dashboard_parses_and_reads_only_exported_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a dashboard with {} panels", panels.len());
    let exported = exported();
    let mut read = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel {} reads no metric: {expr}", panel["title"]);
            for name in names {
                assert!(
                    exported.contains(name.as_str()),
                    "panel {} reads {name}, which is not exported",
                    panel["title"]
                );
                read.insert(name);
            }
        }
    }
    // The panels that operators look at first are there.
    for must in [
        "sluice_query_scheduler_queue_length",
        "sluice_query_scheduler_queue_duration_seconds",
        "sluice_query_scheduler_discarded_requests_total",
        "sluice_query_scheduler_connected_querier_workers",
    ] {
        assert!(read.contains(must), "no panel reads {must}");
    }
}

#[test]
fn the_alerting_rules_cover_the_failures_operators_page_for_and_read_exported_metrics() {
    let exported = exported();
    for name in metric_names(ALERTS) {
        assert!(
            exported.contains(name.as_str()),
            "a rule reads {name}, which is not exported"
        );
    }
    for alert in [
        "SluiceSchedulerDown",
        "SluiceNoQuerierConnected",
        "SluiceQueueTooOld",
        "SluiceRequestsRejected",
        "SluiceGossipMembersMissing",
    ] {
        assert!(ALERTS.contains(&format!("alert: {alert}\n")), "no {alert} rule");
    }
}
