//! The nodes below a tenant: one node per actor path prefix, each with a FIFO of its own
//! requests and a round-robin rotation over its members (its own FIFO and its children).
//!
//! Invariants (checked by `TreeQueue::check_invariants`):
//! - a node with nothing queued in its subtree (`live == 0`) is *parked*: kept, with its
//!   buffers and its place in its parent's `children`, so that an actor path that empties
//!   and refills request by request allocates nothing; [`Nodes::sweep`] frees parked
//!   children (the tenant root is parked and freed by its owner, see `Tenant::roots`);
//! - a child has at most one `Member::Child` entry in its parent's rotation, and has one
//!   iff `has_turn`; every live child has its turn;
//! - `local_in_rotation` is set iff `Member::Local` is in the rotation, and it is set
//!   whenever `live_local > 0`;
//! - rotations and FIFOs may also hold stale entries (a child freed by a cancel, a
//!   cancelled request): they are skipped and dropped when reached, so a cancel is O(depth).
//!
//! Round robin is the level policy today. Weighted and cost-aware policies (deficit round
//! robin) replace `rotation` with a policy enum chosen per level; `pop` is the only reader.

use std::collections::VecDeque;

use super::FastMap;
use super::slab::Handle;
use super::slab::Slab;

/// A member of a node's rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Member {
    /// The node's own FIFO.
    Local,
    /// A child node.
    Child(Handle),
}

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) parent: Option<Handle>,
    pub(crate) name: Box<str>,
    pub(crate) children: FastMap<Box<str>, Handle>,
    pub(crate) rotation: VecDeque<Member>,
    /// Request handles, oldest first; may include stale (removed) ones.
    pub(crate) fifo: VecDeque<Handle>,
    /// Requests queued in `fifo` (excluding stale entries).
    pub(crate) live_local: u32,
    /// Requests queued in this subtree.
    pub(crate) live: u32,
    pub(crate) local_in_rotation: bool,
    /// Whether an entry for this node is in its parent's rotation (kept by a cancel that
    /// emptied it; dropped when reached while it is empty).
    pub(crate) has_turn: bool,
}

/// Freed nodes kept for reuse, so that actors that come and go do not cost an
/// allocation of maps and queues every time.
const SPARE_NODES: usize = 4096;
/// A freed node whose buffers grew beyond this many entries is dropped, not kept.
const SPARE_CAPACITY: usize = 64;

/// The node arena: a slab plus spare nodes whose buffers are reused.
#[derive(Debug, Default)]
pub(crate) struct Nodes {
    slab: Slab<Node>,
    spare: Vec<Node>,
    /// Children parked since the last sweep (some may have refilled or been freed since).
    parked: Vec<Handle>,
}

impl Nodes {
    pub(crate) fn insert(&mut self, parent: Option<Handle>, name: &str) -> Handle {
        let node = match self.spare.pop() {
            Some(mut n) => {
                n.parent = parent;
                n.name = name.into();
                n
            }
            None => Node {
                parent,
                name: name.into(),
                children: FastMap::default(),
                rotation: VecDeque::new(),
                fifo: VecDeque::new(),
                live_local: 0,
                live: 0,
                local_in_rotation: false,
                has_turn: false,
            },
        };
        self.slab.insert(node)
    }

    /// Nodes allocated (live and parked).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slab.len()
    }

    /// Children parked since the last sweep.
    pub(crate) fn parked_len(&self) -> usize {
        self.parked.len()
    }

    /// Frees the children parked since the last sweep that are still empty; returns how
    /// many. A parent freed by its owner first has its subtree freed with it.
    pub(crate) fn sweep(&mut self) -> usize {
        let mut freed = 0;
        for h in std::mem::take(&mut self.parked) {
            let Some(node) = self.slab.get(h) else { continue };
            if node.live > 0 || !node.children.is_empty() {
                continue; // refilled, or its own parked children go first (they follow in the list)
            }
            let parent = node.parent.expect("only children are listed");
            let name = self.remove(h);
            self.slab[parent].children.remove(&name);
            // Its rotation entry, if any, is stale now and dropped when reached.
            freed += 1;
        }
        freed
    }

    /// Frees `root` and everything below it (all parked: its owner frees it empty).
    pub(crate) fn free_subtree(&mut self, root: Handle) {
        let mut stack = vec![root];
        while let Some(h) = stack.pop() {
            stack.extend(self.slab[h].children.values().copied());
            self.remove(h);
        }
    }

    /// Frees a node, keeping its buffers for reuse when they are small. Returns its name.
    pub(crate) fn remove(&mut self, h: Handle) -> Box<str> {
        let mut n = self.slab.remove(h).expect("live node");
        let name = std::mem::take(&mut n.name);
        let small = n.children.capacity() <= SPARE_CAPACITY
            && n.rotation.capacity() <= SPARE_CAPACITY
            && n.fifo.capacity() <= SPARE_CAPACITY;
        if small && self.spare.len() < SPARE_NODES {
            n.children.clear();
            n.rotation.clear();
            n.fifo.clear();
            n.live_local = 0;
            n.live = 0;
            n.local_in_rotation = false;
            n.has_turn = false;
            self.spare.push(n);
        }
        name
    }

    pub(crate) fn get(&self, h: Handle) -> Option<&Node> {
        self.slab.get(h)
    }
}

impl std::ops::Index<Handle> for Nodes {
    type Output = Node;
    fn index(&self, h: Handle) -> &Node {
        &self.slab[h]
    }
}

impl std::ops::IndexMut<Handle> for Nodes {
    fn index_mut(&mut self, h: Handle) -> &mut Node {
        &mut self.slab[h]
    }
}

/// Walks from `root` down `actors`, creating the missing nodes (or unparking them), and
/// counts one more request on every node of the path; returns the leaf, where
/// [`push_request`] must put the request next. A new (or refilled) child joins the back of
/// its parent's rotation: it is served soon, but not ahead of the members already waiting.
pub(crate) fn attach_path(nodes: &mut Nodes, root: Handle, actors: &[String]) -> Handle {
    let mut cur = root;
    nodes[cur].live += 1;
    for actor in actors {
        let existing = nodes[cur].children.get(actor.as_str()).copied();
        let child = match existing {
            Some(c) => c,
            None => {
                let c = nodes.insert(Some(cur), actor);
                nodes[cur].children.insert(actor.as_str().into(), c);
                c
            }
        };
        let node = &mut nodes[child];
        node.live += 1;
        if node.live == 1 {
            let had_turn = std::mem::replace(&mut node.has_turn, true);
            let rotation = &mut nodes[cur].rotation;
            if had_turn {
                // A cancel emptied it and left its entry: give up that place.
                rotation.retain(|m| *m != Member::Child(child));
            }
            rotation.push_back(Member::Child(child));
        }
        cur = child;
    }
    cur
}

/// Appends `request` to `leaf`'s FIFO (after [`attach_path`] counted it).
pub(crate) fn push_request(nodes: &mut Nodes, leaf: Handle, request: Handle) {
    let leaf = &mut nodes[leaf];
    leaf.fifo.push_back(request);
    leaf.live_local += 1;
    if !leaf.local_in_rotation {
        leaf.rotation.push_back(Member::Local);
        leaf.local_in_rotation = true;
    }
}

/// Takes the next request under `root`: at every level the member at the front of the
/// rotation is chosen and, if it still has work, goes to the back. Empty non-root nodes
/// are freed. `is_queued` tells live request handles from stale ones.
/// Returns `None` only if `root` has nothing queued.
pub(crate) fn pop(nodes: &mut Nodes, root: Handle, is_queued: impl Fn(Handle) -> bool) -> Option<Handle> {
    if nodes.get(root).is_none_or(|n| n.live == 0) {
        return None;
    }
    let mut cur = root;
    let request = loop {
        let node = &mut nodes[cur];
        let member = node
            .rotation
            .pop_front()
            .expect("a node with live requests has a live member");
        match member {
            Member::Local if node.live_local == 0 => node.local_in_rotation = false,
            Member::Local => {
                break loop {
                    let h = node.fifo.pop_front().expect("live_local counts queued FIFO entries");
                    if is_queued(h) {
                        break h;
                    }
                };
            }
            Member::Child(c) if nodes.get(c).is_some_and(|n| n.live > 0) => cur = c,
            Member::Child(c) => {
                // Emptied by a cancel (parked: drop its turn) or freed since: a stale entry.
                if let Some(n) = nodes.slab.get_mut(c) {
                    n.has_turn = false;
                }
            }
        }
    };
    // Bookkeeping at the leaf, then on the way up, re-queueing each member we took.
    let leaf = &mut nodes[cur];
    leaf.live_local -= 1;
    if leaf.live_local > 0 {
        leaf.rotation.push_back(Member::Local);
    } else {
        leaf.local_in_rotation = false;
        leaf.fifo.clear();
    }
    uncount_upwards(nodes, cur, Turn::Requeue);
    Some(request)
}

/// The request [`pop`] would take next under `root`, without taking it (stale entries
/// are looked past, as `pop` would drop them). O(depth + stale entries at the front).
pub(crate) fn peek(nodes: &Nodes, root: Handle, is_queued: impl Fn(Handle) -> bool) -> Option<Handle> {
    let mut cur = root;
    'descend: loop {
        let node = nodes.get(cur).filter(|n| n.live > 0)?;
        for member in &node.rotation {
            match *member {
                Member::Local if node.live_local > 0 => {
                    return node.fifo.iter().copied().find(|&h| is_queued(h));
                }
                Member::Child(c) if nodes.get(c).is_some_and(|n| n.live > 0) => {
                    cur = c;
                    continue 'descend;
                }
                _ => {} // stale: `pop` would drop it and look at the next
            }
        }
        return None;
    }
}

/// Whether the members on a path took their turn (and go to the back of their
/// parent's rotation) or keep their place.
#[derive(PartialEq, Eq)]
enum Turn {
    Requeue,
    Keep,
}

/// Counts one request less on `from` and every ancestor, parking the non-root nodes
/// that empty.
fn uncount_upwards(nodes: &mut Nodes, from: Handle, turn: Turn) {
    let mut id = from;
    loop {
        let node = &mut nodes[id];
        node.live -= 1;
        let alive = node.live > 0;
        let Some(parent) = node.parent else { break };
        if turn == Turn::Requeue {
            // `pop` took this node's entry from the front of its parent's rotation.
            node.has_turn = alive;
            if alive {
                nodes[parent].rotation.push_back(Member::Child(id));
            }
        }
        if !alive {
            nodes.parked.push(id);
        }
        id = parent;
    }
}

/// Un-counts one request queued at `leaf` that was removed out of turn (cancelled or
/// expired). Its FIFO entry and any rotation entries of freed nodes stay behind as stale.
pub(crate) fn detach(nodes: &mut Nodes, leaf: Handle) {
    let node = &mut nodes[leaf];
    node.live_local -= 1;
    if node.live_local == 0 {
        node.fifo.clear();
    }
    uncount_upwards(nodes, leaf, Turn::Keep);
}

/// The enqueue time of the oldest request under `root`, found by looking at the front of
/// every FIFO in the subtree (FIFOs are in arrival order). O(nodes in the subtree).
pub(crate) fn oldest(nodes: &Nodes, root: Handle, enqueued_at: impl Fn(Handle) -> Option<u64>) -> Option<u64> {
    let mut stack = vec![root];
    let mut best: Option<u64> = None;
    while let Some(id) = stack.pop() {
        let node = &nodes[id];
        if let Some(t) = node.fifo.iter().find_map(|&h| enqueued_at(h)) {
            best = Some(best.map_or(t, |b| b.min(t)));
        }
        stack.extend(node.children.values().copied());
    }
    best
}
