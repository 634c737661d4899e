//! What the dispatcher reports: the gauges it sets once a second and the `/status`
//! snapshot.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use metrics::{counter, gauge};

use super::Dispatcher;
use crate::metrics as m;
use crate::server::status::{Status, WorkerStatus};

impl Dispatcher {
    /// Sets every gauge from the queue's current figures (once a second).
    pub(super) fn export_gauges(&mut self, now: Instant) {
        let tenants = self.queue.tenant_stats(now);
        let counters = self.queue.counters();
        let mut by_component: HashMap<&str, usize> = HashMap::new();
        for r in self.running.values() {
            *by_component
                .entry(r.component.as_deref().unwrap_or("unknown"))
                .or_default() += 1;
        }
        let current: BTreeSet<String> = tenants.iter().map(|t| t.tenant.clone()).collect();
        let gone: Vec<String> = self.reported_tenants.difference(&current).cloned().collect();
        self.metrics.record(|| {
            for t in &tenants {
                let tenant = t.tenant.clone();
                gauge!(m::QUEUE_LENGTH, "tenant" => tenant.clone()).set(f64::from(t.queued));
                gauge!(m::OLDEST_QUEUED_AGE, "tenant" => tenant.clone()).set(t.oldest.as_secs_f64());
                gauge!(m::PEAK_QUEUE_LENGTH, "tenant" => tenant.clone()).set(f64::from(t.peak));
                gauge!(m::TENANT_BALANCE, "tenant" => tenant).set(t.balance as f64);
            }
            // Zeroed once; the recorder drops them after its idle timeout.
            for tenant in gone {
                gauge!(m::QUEUE_LENGTH, "tenant" => tenant.clone()).set(0.0);
                gauge!(m::OLDEST_QUEUED_AGE, "tenant" => tenant.clone()).set(0.0);
                gauge!(m::TENANT_BALANCE, "tenant" => tenant).set(0.0);
            }
            let classes = self.queue.class_lengths();
            for priority in self.reported_classes.difference(&classes.iter().map(|c| c.0).collect()) {
                gauge!(m::CLASS_QUEUE_LENGTH, "priority" => priority.to_string()).set(0.0);
            }
            for (priority, n) in &classes {
                gauge!(m::CLASS_QUEUE_LENGTH, "priority" => priority.to_string()).set(f64::from(*n));
            }
            gauge!(m::CONNECTED_QUERIER_WORKERS).set(self.workers.len() as f64);
            gauge!(m::CONNECTED_QUERIERS).set(self.queue.querier_count() as f64);
            gauge!(m::CONNECTED_FRONTENDS).set(self.frontends.len() as f64);
            gauge!(m::INFLIGHT_REQUESTS).set(self.running.len() as f64);
            gauge!(m::IDLE_QUERIER_WORKERS).set(self.waiting.len() as f64);
            for (component, n) in &by_component {
                gauge!(m::QUERIER_INFLIGHT_REQUESTS, "component" => component.to_string()).set(*n as f64);
            }
            for (outcome, v) in [
                ("enqueued", counters.enqueued),
                ("dispatched", counters.dispatched),
                ("cancelled", counters.cancelled),
                ("expired", counters.expired),
                ("handed_back", counters.handed_back),
                ("rejected", counters.rejected),
            ] {
                counter!(m::REQUESTS, "outcome" => outcome).absolute(v);
            }
        });
        self.reported_tenants = current;
        self.reported_classes = self.queue.class_lengths().into_iter().map(|c| c.0).collect();
    }

    pub(super) fn status(&self, now: Instant) -> Status {
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .iter()
            .map(|(id, w)| WorkerStatus {
                querier: w.querier.clone(),
                slot: id.slot,
                busy: w.running.is_some(),
            })
            .collect();
        workers.sort_by(|a, b| (&a.querier, a.slot).cmp(&(&b.querier, b.slot)));
        let mut frontends: Vec<String> = self.frontends.values().map(|f| f.name.clone()).collect();
        frontends.sort();
        let tenants = self.queue.tenant_stats(now);
        let shards = tenants
            .iter()
            .filter(|t| t.shard_size.is_some())
            .filter_map(|t| Some((t.tenant.clone(), self.queue.tenant_shard(&t.tenant)?)))
            .collect();
        Status {
            scheduler_id: self.scheduler_id.clone(),
            uptime: now.saturating_duration_since(self.started),
            draining: !self.serving(),
            queued: self.queue.len(),
            queued_bytes: self.queue.queued_bytes(),
            running: self.running.len(),
            counters: self.queue.counters(),
            tenants,
            shards,
            components: self.queue.component_lengths(),
            classes: self.queue.class_lengths(),
            queriers: self.queue.querier_stats(now),
            workers,
            frontends,
            gossip: None,
            cluster: self.sharing.as_ref().map(|sh| crate::server::status::ClusterStatus {
                peers: sh.load.peer_ids(now),
                held_elsewhere: sh.load.all_held_elsewhere(now),
                deferred: sh.deferred(),
            }),
        }
    }
}
