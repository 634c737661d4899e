//! The queue's internal invariants, checked by walking everything. Used by tests after
//! random operation sequences; not on any hot path.

use std::collections::{BTreeSet, HashMap};

use super::tree::Member;
use super::{Queued, TreeQueue};

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

pub(super) fn check<R: Queued>(q: &TreeQueue<R>) -> Result<(), String> {
    let c = q.counters;
    ensure!(
        c.enqueued == c.dispatched + c.cancelled + c.expired + c.handed_back + q.requests.len() as u64,
        "accounting: {c:?} with {} queued",
        q.requests.len()
    );
    ensure!(q.by_key.len() == q.requests.len(), "key index size");

    // Queriers: connected workers and their lanes counted.
    for (_, querier) in q.queriers.slab.iter() {
        let lanes: Vec<u16> = querier.workers.iter().flatten().copied().collect();
        ensure!(
            querier.connected as usize == lanes.len(),
            "{}: connected count",
            querier.id
        );
        for (l, &n) in querier.lanes.iter().enumerate() {
            let want = lanes.iter().filter(|&&x| usize::from(x) == l).count();
            ensure!(n as usize == want, "{}: lane {l} counts {n}, has {want}", querier.id);
        }
        let live = querier.lanes.iter().filter(|&&n| n > 0).count();
        ensure!(
            querier.lanes_connected as usize == live,
            "{}: lanes connected",
            querier.id
        );
    }

    // Requests: indexed, counted per tenant/component, present in their leaf's FIFO.
    let mut per_tenant: HashMap<u32, (u32, u64)> = HashMap::new();
    let mut per_component: HashMap<u32, u32> = HashMap::new();
    let mut bytes = 0;
    let mut costs: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
    for (h, e) in q.requests.iter() {
        *costs.entry(e.cost).or_default() += 1;
        ensure!(e.cost >= 1, "cost {} below 1", e.cost);
        ensure!(q.by_key.get(&e.key) == Some(&h), "key index for {:?}", e.key);
        let leaf = q
            .nodes
            .get(e.leaf)
            .ok_or_else(|| format!("leaf of {:?} freed", e.key))?;
        ensure!(leaf.fifo.contains(&h), "{:?} missing from its leaf FIFO", e.key);
        let t = per_tenant.entry(e.tenant).or_default();
        t.0 += 1;
        t.1 += e.bytes;
        *per_component.entry(e.component).or_default() += 1;
        bytes += e.bytes;
        ensure!(
            e.request.path().tenant == &*q.tenants[e.tenant as usize].as_ref().unwrap().name,
            "tenant slot"
        );
    }
    ensure!(bytes == q.queued_bytes, "queued bytes {} vs {}", q.queued_bytes, bytes);
    ensure!(
        costs == q.queued_costs,
        "queued costs {:?} vs {:?}",
        q.queued_costs,
        costs
    );

    // Tenants: exactly those with requests, counts right, shard current.
    for (t, slot) in q.tenants.iter().enumerate() {
        let t = t as u32;
        match slot {
            None => ensure!(q.free_tenant_slots.contains(&t), "empty tenant slot {t} not free"),
            Some(tenant) => {
                ensure!(
                    per_tenant.get(&t) == Some(&(tenant.queued, tenant.bytes)),
                    "tenant {} counts",
                    tenant.name
                );
                ensure!(q.tenant_by_name.get(&tenant.name) == Some(&t), "tenant name index");
                let want = super::shard::select(tenant.hash, tenant.max_queriers, &q.shard_candidates);
                ensure!(want == tenant.shard, "tenant {} shard stale", tenant.name);
                ensure!(tenant.peak >= tenant.queued, "peak below queued");
                for &(c, _) in &tenant.roots {
                    ensure!(
                        q.components.get(c as usize).is_some_and(Option::is_some),
                        "root in freed component"
                    );
                }
                let mut comps: Vec<u32> = tenant.roots.iter().map(|r| r.0).collect();
                comps.sort_unstable();
                comps.dedup();
                ensure!(comps.len() == tenant.roots.len(), "two roots in one component");
            }
        }
    }
    ensure!(
        per_tenant.len() == q.tenant_by_name.len(),
        "tenants without requests remain"
    );

    // Components and the tenant rotation sets.
    for pair in q.classes.windows(2) {
        ensure!(pair[0].priority > pair[1].priority, "classes out of order");
    }
    for class in &q.classes {
        ensure!(
            !class.by_name.is_empty(),
            "class {} kept without components",
            class.priority
        );
        for (name, &c) in &class.by_name {
            let comp = q.components[c as usize].as_ref().ok_or("named component freed")?;
            ensure!(*comp.name == **name, "component {name} name index");
            let parked = comp.queued == 0;
            ensure!(
                parked != class.order.contains(&c),
                "component {name} parked yet ordered, or the reverse"
            );
            if parked {
                ensure!(
                    comp.unsharded.is_empty() && comp.by_querier.iter().all(BTreeSet::is_empty),
                    "parked component {name} has tenants"
                );
            }
        }
        let mut order_names = Vec::new();
        for &c in &class.order {
            let comp = q.components[c as usize].as_ref().ok_or("ordered component freed")?;
            ensure!(
                comp.priority == class.priority,
                "component {} in the wrong class",
                comp.name
            );
            ensure!(
                class.by_name.get(&comp.name) == Some(&c),
                "component {} name index",
                comp.name
            );
            order_names.push(comp.name.clone());
            ensure!(
                per_component.get(&c) == Some(&comp.queued),
                "component {} count",
                comp.name
            );
            let mut sharded_members: BTreeSet<(usize, u32)> = BTreeSet::new();
            for (qi, set) in comp.by_querier.iter().enumerate() {
                sharded_members.extend(set.iter().map(|&t| (qi, t)));
            }
            let mut expected_sharded = BTreeSet::new();
            let mut expected_unsharded = BTreeSet::new();
            let mut live_sum = 0;
            let roots = q.tenants.iter().enumerate().filter_map(|(t, slot)| {
                let tenant = slot.as_ref()?;
                let &(_, root) = tenant.roots.iter().find(|(x, _)| *x == c)?;
                // A parked root is in no rotation set.
                (q.nodes.get(root)?.live > 0).then_some((t as u32, tenant, root))
            });
            let mut active = 0;
            for (t, tenant, root) in roots {
                active += 1;
                match &tenant.shard {
                    None => {
                        expected_unsharded.insert(t);
                    }
                    Some(qs) => expected_sharded.extend(qs.iter().map(|&qi| (qi as usize, t))),
                }
                live_sum += check_subtree(q, root)?;
            }
            ensure!(live_sum == comp.queued, "component {} node counts", comp.name);
            ensure!(
                active == comp.active,
                "component {} counts {} active tenants, not {active}",
                comp.name,
                comp.active
            );
            ensure!(
                expected_unsharded == comp.unsharded,
                "component {} unsharded set",
                comp.name
            );
            ensure!(
                expected_sharded == sharded_members,
                "component {} sharded sets",
                comp.name
            );
        }
        let mut sorted = order_names.clone();
        sorted.sort();
        ensure!(sorted == order_names, "component order");
    }
    // Parked roots: empty, and counted by their component.
    let mut parked: HashMap<u32, u32> = HashMap::new();
    for tenant in q.tenants.iter().flatten() {
        for &(c, root) in &tenant.roots {
            let node = q.nodes.get(root).ok_or("tenant root freed")?;
            if node.live == 0 {
                ensure!(node.live_local == 0, "parked root {} not empty", tenant.name);
                check_subtree(q, root)?;
                *parked.entry(c).or_default() += 1;
            }
        }
    }
    for (c, comp) in q.components.iter().enumerate() {
        if let Some(comp) = comp {
            let want = parked.get(&(c as u32)).copied().unwrap_or(0);
            ensure!(
                comp.parked_roots == want,
                "component {} parked roots {} vs {want}",
                comp.name,
                comp.parked_roots
            );
        }
    }
    let named: usize = q.classes.iter().map(|k| k.by_name.len()).sum();
    ensure!(
        q.components.iter().flatten().count() == named,
        "component outside its class"
    );
    Ok(())
}

/// Checks the node invariants under `root`; returns its live count.
fn check_subtree<R: Queued>(q: &TreeQueue<R>, root: super::Handle) -> Result<u32, String> {
    let node = q.nodes.get(root).ok_or("freed node reachable")?;
    let live_local = node
        .fifo
        .iter()
        .filter(|&&h| q.requests.get(h).is_some_and(|e| e.leaf == root))
        .count();
    ensure!(live_local as u32 == node.live_local, "node {} live_local", node.name);
    if node.live_local > 0 {
        ensure!(node.local_in_rotation, "node {} has requests but no turn", node.name);
    }
    let locals = node.rotation.iter().filter(|m| **m == Member::Local).count();
    ensure!(
        locals == usize::from(node.local_in_rotation),
        "node {} Local entries",
        node.name
    );
    let mut live = node.live_local;
    for (name, &child) in &node.children {
        let c = q.nodes.get(child).ok_or("freed child in children map")?;
        ensure!(*c.name == **name && c.parent == Some(root), "child {name} links");
        let turns = node.rotation.iter().filter(|m| **m == Member::Child(child)).count();
        ensure!(
            turns == usize::from(c.has_turn),
            "child {name} has {turns} turns (has_turn {})",
            c.has_turn
        );
        ensure!(c.live == 0 || c.has_turn, "live child {name} without a turn");
        live += check_subtree(q, child)?;
    }
    ensure!(live == node.live, "node {} live {} vs {}", node.name, node.live, live);
    Ok(live)
}
