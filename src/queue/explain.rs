//! A bounded dump of the queue tree for operators (the admin `/explain` endpoint), in the
//! spirit of Kubernetes API Priority and Fairness's debug dumps: every node down the tree
//! with its length and oldest request, each tenant's class, weight and deficit balance, and
//! the waiting requests with their path and age.
//!
//! The walk stops at its bounds (nodes and requests shown), so its cost is bounded
//! whatever is queued: the dispatcher runs it between commands, and a dump of a queue
//! holding 100 000 requests must not hold dispatch up.

use std::time::{Duration, Instant};

use super::slab::Handle;
use super::{QueryKey, Queued, TreeQueue};

/// What [`TreeQueue::explain`] shows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Explain {
    /// Requests queued in all (shown or not).
    pub queued: usize,
    /// Nodes, depth first: each tenant's root in a component, then its actor nodes.
    pub nodes: Vec<ExplainNode>,
    /// Waiting requests in the walk's order, oldest first within each node.
    pub requests: Vec<ExplainRequest>,
    /// The walk stopped at a bound: more nodes or requests exist than are shown.
    pub truncated: bool,
}

/// One node of the tree. Nodes form a tree in the list: a node names its parent by index
/// (so the dispatcher copies one name per node, and [`Explain::path`] rebuilds paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainNode {
    /// The parent's index in [`Explain::nodes`]; `None` for a tenant's root.
    pub parent: Option<usize>,
    /// The tenant's name for a root, the actor's below.
    pub name: String,
    /// For a root: the component its requests are for (empty: none).
    pub component: Option<String>,
    /// Requests queued in this node's subtree.
    pub queued: u32,
    /// Requests in this node's own FIFO.
    pub local: u32,
    /// Age of the oldest request in its own FIFO.
    pub oldest: Option<Duration>,
    /// For a tenant's root: its priority class, weight and deficit balance.
    pub tenant: Option<TenantPolicy>,
}

/// A tenant's policy figures, on its root nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantPolicy {
    pub priority: u8,
    pub weight: u32,
    /// Deficit-round-robin balance in cost units.
    pub balance: i64,
    /// Queriers in its shard; `None`: every querier.
    pub shard_size: Option<usize>,
}

/// One waiting request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainRequest {
    /// The node whose FIFO holds it, by index in [`Explain::nodes`].
    pub node: usize,
    pub key: QueryKey,
    pub age: Duration,
    /// The cost it will be charged (its hint, clamped).
    pub cost: u32,
    /// Time left before its deadline, if it has one.
    pub deadline_in: Option<Duration>,
}

impl Explain {
    /// The path of node `node`: component (empty: none), tenant, then the actors.
    pub fn path(&self, node: usize) -> Vec<&str> {
        let mut path = Vec::new();
        let mut at = Some(node);
        while let Some(i) = at {
            let n = &self.nodes[i];
            path.push(n.name.as_str());
            if let Some(component) = &n.component {
                path.push(component.as_str());
            }
            at = n.parent;
        }
        path.reverse();
        path
    }
}

impl<R: Queued> TreeQueue<R> {
    /// The queue tree as of `now`, showing at most `max_nodes` nodes and `max_requests`
    /// requests (work is bounded by them, plus stale entries skipped on the way).
    pub fn explain(&self, now: Instant, max_nodes: usize, max_requests: usize) -> Explain {
        let now_ns = self.nanos(now);
        let age = |at: u64| Duration::from_nanos(now_ns.saturating_sub(at));
        let mut out = Explain {
            queued: self.len(),
            ..Explain::default()
        };
        let mut stack: Vec<(Handle, Option<usize>)> = Vec::new();
        'tenants: for tenant in self.tenants.iter().flatten().filter(|t| t.queued > 0) {
            for &(component, root) in &tenant.roots {
                stack.clear();
                stack.push((root, None));
                while let Some((id, parent)) = stack.pop() {
                    let node = &self.nodes[id];
                    if node.live == 0 {
                        continue; // parked
                    }
                    if out.nodes.len() >= max_nodes {
                        out.truncated = true;
                        break 'tenants;
                    }
                    let index = out.nodes.len();
                    let mut live = node.fifo.iter().filter_map(|&h| self.requests.get(h)).peekable();
                    let oldest = live.peek().map(|e| age(e.enqueued_at));
                    for e in live {
                        if out.requests.len() >= max_requests {
                            out.truncated = true;
                            break;
                        }
                        out.requests.push(ExplainRequest {
                            node: index,
                            key: e.key,
                            age: age(e.enqueued_at),
                            cost: e.cost,
                            deadline_in: (e.deadline != 0)
                                .then(|| Duration::from_nanos(e.deadline.saturating_sub(now_ns))),
                        });
                    }
                    let is_root = parent.is_none();
                    out.nodes.push(ExplainNode {
                        parent,
                        name: if is_root {
                            tenant.name.to_string()
                        } else {
                            node.name.to_string()
                        },
                        component: is_root.then(|| {
                            self.components[component as usize]
                                .as_ref()
                                .map_or(String::new(), |c| c.name.to_string())
                        }),
                        queued: node.live,
                        local: node.live_local,
                        oldest,
                        tenant: is_root.then(|| TenantPolicy {
                            priority: tenant.priority,
                            weight: tenant.weight,
                            balance: tenant.balance,
                            shard_size: tenant.shard.as_ref().map(Vec::len),
                        }),
                    });
                    // As many children as could still be shown (a node may have very many).
                    let room = max_nodes.saturating_sub(out.nodes.len() + stack.len());
                    if node.children.len() > room {
                        out.truncated = true;
                    }
                    stack.extend(node.children.values().take(room).map(|&child| (child, Some(index))));
                }
            }
        }
        out
    }
}
