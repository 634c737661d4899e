//! The metric handles the per-query path records into, looked up once per tenant (and
//! component) instead of on every query: a labelled lookup hashes and compares every label
//! and allocates the label strings, ~5% of the scheduler's CPU under load. Forgotten every
//! second (with the recorder's upkeep), so a tenant that goes costs nothing here and a
//! series the exporter dropped as idle is looked up again.

use metrics::{Counter, Histogram, counter, histogram};

use crate::metrics::{self as m, Metrics};
use crate::queue::FastMap;

#[derive(Default)]
pub(super) struct Handles {
    enqueue_duration: Option<Histogram>,
    tenants: FastMap<String, TenantHandles>,
}

struct TenantHandles {
    served_cost: Counter,
    /// Queue time per component (few per tenant: a scan beats a second map).
    queue_duration: Vec<(Option<String>, Histogram)>,
}

impl Handles {
    pub(super) fn enqueue_duration(&mut self, metrics: &Metrics) -> &Histogram {
        self.enqueue_duration
            .get_or_insert_with(|| metrics.record(|| histogram!(m::ENQUEUE_DURATION)))
    }

    fn tenant(&mut self, metrics: &Metrics, tenant: &str) -> &mut TenantHandles {
        if !self.tenants.contains_key(tenant) {
            let served_cost = metrics.record(|| counter!(m::SERVED_COST, "tenant" => tenant.to_string()));
            let handles = TenantHandles {
                served_cost,
                queue_duration: Vec::new(),
            };
            self.tenants.insert(tenant.to_string(), handles);
        }
        self.tenants.get_mut(tenant).expect("inserted above")
    }

    pub(super) fn served_cost(&mut self, metrics: &Metrics, tenant: &str) -> &Counter {
        &self.tenant(metrics, tenant).served_cost
    }

    pub(super) fn queue_duration(&mut self, metrics: &Metrics, tenant: &str, component: Option<&str>) -> &Histogram {
        let t = self.tenant(metrics, tenant);
        let at = match t.queue_duration.iter().position(|(c, _)| c.as_deref() == component) {
            Some(at) => at,
            None => {
                let c = component.unwrap_or("unknown").to_string();
                let h =
                    metrics.record(|| histogram!(m::QUEUE_DURATION, "tenant" => tenant.to_string(), "component" => c));
                t.queue_duration.push((component.map(str::to_string), h));
                t.queue_duration.len() - 1
            }
        };
        &t.queue_duration[at].1
    }

    pub(super) fn clear(&mut self) {
        self.enqueue_duration = None;
        self.tenants.clear();
    }
}
