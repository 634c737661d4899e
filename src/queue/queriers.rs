//! Queriers and their worker slots: who may dequeue, and which queriers count for
//! shuffle sharding (connected ones, plus disconnected ones inside the forget delay).

use super::FastMap;
use super::shard::stable_hash;
use super::slab::{Handle, Slab};

/// One connected querier worker, as the queue knows it. Returned by
/// [`TreeQueue::register_worker`](super::TreeQueue::register_worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkerId {
    pub(crate) querier: Handle,
    /// The worker's slot within its querier: the lowest free one when it registered.
    pub slot: u32,
}

#[derive(Debug)]
pub(crate) struct Querier {
    pub(crate) id: Box<str>,
    pub(crate) hash: u64,
    /// Worker slots in use.
    pub(crate) workers: Vec<bool>,
    pub(crate) connected: u32,
    pub(crate) shutting_down: bool,
    /// When the last worker left (queue nanoseconds), if none is connected.
    pub(crate) disconnected_at: Option<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Queriers {
    pub(crate) slab: Slab<Querier>,
    pub(crate) by_id: FastMap<Box<str>, Handle>,
}

/// What a registration or removal did to the set of queriers that shards are cut from.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Membership {
    Unchanged,
    Changed,
}

impl Queriers {
    /// Adds a worker for querier `id`, creating the querier if it is new. A querier that
    /// had announced shutdown and registers a new worker is taken to have restarted.
    pub(crate) fn register(&mut self, id: &str) -> (WorkerId, Membership) {
        let (h, membership) = match self.by_id.get(id) {
            Some(&h) => (h, Membership::Unchanged),
            None => {
                let h = self.slab.insert(Querier {
                    id: id.into(),
                    hash: stable_hash(id),
                    workers: Vec::new(),
                    connected: 0,
                    shutting_down: false,
                    disconnected_at: None,
                });
                self.by_id.insert(id.into(), h);
                (h, Membership::Changed)
            }
        };
        let q = &mut self.slab[h];
        q.disconnected_at = None;
        q.shutting_down = false;
        q.connected += 1;
        let slot = match q.workers.iter().position(|used| !used) {
            Some(i) => {
                q.workers[i] = true;
                i
            }
            None => {
                q.workers.push(true);
                q.workers.len() - 1
            }
        };
        (
            WorkerId {
                querier: h,
                slot: slot as u32,
            },
            membership,
        )
    }

    /// Releases a worker slot. The querier goes at once if it announced shutdown or the
    /// forget delay is zero; otherwise it is marked disconnected at `now`.
    pub(crate) fn unregister(&mut self, w: WorkerId, now: u64, forget_immediately: bool) -> Membership {
        let Some(q) = self.slab.get_mut(w.querier) else {
            return Membership::Unchanged;
        };
        match q.workers.get_mut(w.slot as usize) {
            Some(used) if *used => *used = false,
            _ => return Membership::Unchanged,
        }
        q.connected -= 1;
        if q.connected > 0 {
            return Membership::Unchanged;
        }
        if q.shutting_down || forget_immediately {
            self.remove(w.querier);
            return Membership::Changed;
        }
        q.disconnected_at = Some(now);
        Membership::Unchanged
    }

    /// Marks querier `id` as shutting down; removes it at once if no worker is connected.
    /// Returns whether the querier was known, and the membership effect.
    pub(crate) fn shutting_down(&mut self, id: &str) -> (bool, Membership) {
        let Some(&h) = self.by_id.get(id) else {
            return (false, Membership::Unchanged);
        };
        let q = &mut self.slab[h];
        q.shutting_down = true;
        if q.connected == 0 {
            self.remove(h);
            return (true, Membership::Changed);
        }
        (true, Membership::Unchanged)
    }

    /// Forgets the queriers disconnected for at least `delay` nanoseconds at `now`.
    pub(crate) fn forget_disconnected(&mut self, now: u64, delay: u64) -> usize {
        let gone: Vec<Handle> = self
            .slab
            .iter()
            .filter(|(_, q)| q.disconnected_at.is_some_and(|t| now.saturating_sub(t) >= delay))
            .map(|(h, _)| h)
            .collect();
        for &h in &gone {
            self.remove(h);
        }
        gone.len()
    }

    fn remove(&mut self, h: Handle) {
        if let Some(q) = self.slab.remove(h) {
            self.by_id.remove(&q.id);
        }
    }

    /// `(index, hash)` of every querier that shards are cut from.
    pub(crate) fn shard_candidates(&self) -> Vec<(u32, u64)> {
        self.slab.iter().map(|(h, q)| (h.idx, q.hash)).collect()
    }
}
