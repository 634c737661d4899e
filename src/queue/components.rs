//! The component level: the backends a class's requests will hit, in name order. A
//! worker starts at component `lane mod n` (its lane: usually its slot) and moves on when that one has nothing for it,
//! so workers spread over backends; a component that empties is parked until the sweep.

use std::collections::{BTreeMap, BTreeSet};

use super::classes::Class;
use super::wait::DispatchRate;
use super::{FastMap, Queued, TreeQueue, tree};

pub(super) struct Component {
    pub(super) name: Box<str>,
    /// The priority class it belongs to: the same backend in two classes is two components.
    pub(super) priority: u8,
    pub(super) queued: u32,
    /// Tenants' parked roots here: the component is not freed while any remain.
    pub(super) parked_roots: u32,
    /// Tenant slots with work here that every querier may serve.
    pub(super) unsharded: BTreeSet<u32>,
    /// Tenant slots with work here, per querier index in their shard.
    pub(super) by_querier: Vec<BTreeSet<u32>>,
    /// Each querier's position in the tenant rotation: the tenant it is visiting (served
    /// last). The visit goes on while that tenant's balance is positive.
    pub(super) cursors: Vec<Option<u32>>,
    /// Tenants with work here.
    pub(super) active: u32,
    /// Dispatches per second while backlogged (the wait estimate's rate).
    pub(super) rate: DispatchRate,
}

impl<R: Queued> TreeQueue<R> {
    /// The component `name` of class `priority`, creating both if needed, and in its
    /// class's rotation (a parked one is put back).
    pub(super) fn component_slot(&mut self, priority: u8, name: &str) -> u32 {
        let k = match self.classes.iter().position(|k| k.priority <= priority) {
            Some(k) if self.classes[k].priority == priority => k,
            at => {
                let k = at.unwrap_or(self.classes.len());
                self.classes.insert(
                    k,
                    Class {
                        priority,
                        order: Vec::new(),
                        by_name: FastMap::default(),
                        passed: 0,
                    },
                );
                k
            }
        };
        let c = match self.classes[k].by_name.get(name) {
            Some(&c)
                if self.components[c as usize]
                    .as_ref()
                    .expect("named component is live")
                    .queued
                    > 0 =>
            {
                return c;
            }
            Some(&c) => c, // parked
            None => {
                let comp = Component {
                    name: name.into(),
                    priority,
                    queued: 0,
                    parked_roots: 0,
                    unsharded: BTreeSet::new(),
                    by_querier: Vec::new(),
                    cursors: Vec::new(),
                    active: 0,
                    rate: DispatchRate::default(),
                };
                let c = match self.components.iter().position(Option::is_none) {
                    Some(i) => {
                        self.components[i] = Some(comp);
                        i as u32
                    }
                    None => {
                        self.components.push(Some(comp));
                        (self.components.len() - 1) as u32
                    }
                };
                self.classes[k].by_name.insert(name.into(), c);
                c
            }
        };
        let components = &self.components;
        let class = &mut self.classes[k];
        let at = class.order.partition_point(|&o| {
            components[o as usize]
                .as_ref()
                .expect("ordered component is live")
                .name
                .as_ref()
                < name
        });
        class.order.insert(at, c);
        c
    }

    /// Frees the components that emptied (parked, so that a component that empties and
    /// refills request by request costs no allocation) and the classes left with none.
    pub(super) fn sweep_parked(&mut self) {
        for slot in &mut self.components {
            if slot
                .as_ref()
                .is_some_and(|comp| comp.queued == 0 && comp.parked_roots == 0)
            {
                let comp = slot.take().expect("checked above");
                let class = self
                    .classes
                    .iter_mut()
                    .find(|k| k.priority == comp.priority)
                    .expect("component's class is live");
                class.by_name.remove(&comp.name);
            }
        }
        self.classes.retain(|k| !k.by_name.is_empty());
    }

    /// Picks the (component, tenant) a worker of querier index `q` in lane `lane` is
    /// served from next within class `k`, and whether that continues the querier's visit
    /// to the tenant.
    ///
    /// `max_cost`: only a pick whose next request costs at most this (a reserved worker
    /// lent to a lower class); the tenant the rotation names is then taken or passed, never
    /// replaced by another, so lending changes no tenant's turn.
    pub(super) fn select_in(&self, k: usize, q: u32, lane: u16, max_cost: Option<u32>) -> Option<(u32, u32, bool)> {
        let order = &self.classes[k].order;
        let n = order.len();
        if n == 0 {
            return None;
        }
        let start = usize::from(lane) % n;
        let cheap_enough = |c: u32, t: u32| max_cost.is_none_or(|max| self.next_cost(c, t).is_some_and(|x| x <= max));
        (0..n).find_map(|i| {
            let c = order[(start + i) % n];
            let comp = self.components[c as usize].as_ref().expect("ordered component is live");
            if let Some(t) = comp.cursors.get(q as usize).copied().flatten()
                && comp.eligible(q, t)
                && self.tenants[t as usize].as_ref().is_some_and(|t| t.balance > 0)
            {
                return cheap_enough(c, t).then_some((c, t, true));
            }
            comp.next_tenant(q)
                .filter(|&t| cheap_enough(c, t))
                .map(|t| (c, t, false))
        })
    }

    /// The cost of the request tenant `t` would be served next in component `c`.
    fn next_cost(&self, c: u32, t: u32) -> Option<u32> {
        let tenant = self.tenants[t as usize].as_ref()?;
        let &(_, root) = tenant.roots.iter().find(|(x, _)| *x == c)?;
        let h = tree::peek(&self.nodes, root, |h| self.requests.contains(h))?;
        self.requests.get(h).map(|e| e.cost)
    }

    /// Requests queued per component (summed over priority classes), by name; the
    /// unnamed component is `""`.
    pub fn component_lengths(&self) -> Vec<(String, u32)> {
        let mut by_name: BTreeMap<&str, u32> = BTreeMap::new();
        for comp in self.components.iter().flatten().filter(|comp| comp.queued > 0) {
            *by_name.entry(&comp.name).or_default() += comp.queued;
        }
        by_name.into_iter().map(|(name, n)| (name.to_string(), n)).collect()
    }
}
