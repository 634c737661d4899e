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
    /// Its place among its querier's workers: it starts at component `lane mod n`, and the
    /// lowest lanes are reserved for high priorities. Workers that take turns on one
    /// handler (a prefetching worker loop's slots) share a lane.
    pub lane: u16,
}

#[derive(Debug)]
pub(crate) struct Querier {
    pub(crate) id: Box<str>,
    pub(crate) hash: u64,
    /// Worker slots: the lane of each one in use.
    pub(crate) workers: Vec<Option<u16>>,
    pub(crate) connected: u32,
    /// Connected workers per lane.
    pub(crate) lanes: Vec<u32>,
    /// Lanes with a connected worker.
    pub(crate) lanes_connected: u32,
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
    /// Adds a worker for querier `id` in `lane` (None: its own lane, numbered like its
    /// slot), creating the querier if it is new. A querier that had announced shutdown and
    /// registers a new worker is taken to have restarted.
    pub(crate) fn register(&mut self, id: &str, lane: Option<u16>) -> (WorkerId, Membership) {
        let (h, membership) = match self.by_id.get(id) {
            Some(&h) => (h, Membership::Unchanged),
            None => {
                let h = self.slab.insert(Querier {
                    id: id.into(),
                    hash: stable_hash(id),
                    workers: Vec::new(),
                    connected: 0,
                    lanes: Vec::new(),
                    lanes_connected: 0,
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
        let free = q.workers.iter().position(Option::is_none);
        let slot = free.unwrap_or(q.workers.len());
        // Slots are bounded by the workers a querier registers, which its streams bound.
        let lane = lane.unwrap_or(u16::try_from(slot).unwrap_or(u16::MAX));
        if free.is_some() {
            q.workers[slot] = Some(lane);
        } else {
            q.workers.push(Some(lane));
        }
        let l = usize::from(lane);
        if q.lanes.len() <= l {
            q.lanes.resize(l + 1, 0);
        }
        if q.lanes[l] == 0 {
            q.lanes_connected += 1;
        }
        q.lanes[l] += 1;
        (
            WorkerId {
                querier: h,
                slot: slot as u32,
                lane,
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
        let Some(lane) = q.workers.get_mut(w.slot as usize).and_then(Option::take) else {
            return Membership::Unchanged;
        };
        q.connected -= 1;
        let n = &mut q.lanes[usize::from(lane)];
        *n -= 1;
        if *n == 0 {
            q.lanes_connected -= 1;
        }
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
