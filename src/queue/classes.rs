//! The priority level: classes with work, highest first; workers reserved for high
//! priorities; the starvation guard that serves a class passed over too often.

use super::{FastMap, Queued, TreeQueue, WorkerId};

/// One priority class with work: its components, and how long it has been passed over.
pub(super) struct Class {
    pub(super) priority: u8,
    /// Its components with work, in name order: the order workers are spread over.
    pub(super) order: Vec<u32>,
    pub(super) by_name: FastMap<Box<str>, u32>,
    /// Dispatches by unreserved workers that went to a higher class since this class was
    /// last served.
    pub(super) passed: u32,
}

impl<R: Queued> TreeQueue<R> {
    /// Picks the class a worker is served from: the highest it may serve that has work
    /// for it, unless a lower one it may serve has been passed over too often (the lowest
    /// index, i.e. highest priority, of those wins). Returns the class index and the pick
    /// in it.
    ///
    /// A reserved worker with nothing it is reserved for may be lent to the lower classes,
    /// highest first, for requests costing at most `lend_max_cost`.
    pub(super) fn select(&self, q: u32, lane: u16, reserved: bool) -> Option<(usize, (u32, u32, bool))> {
        let floor = if reserved { self.config.reserved_min_priority } else { 0 };
        let allowed = self.classes.iter().take_while(|k| k.priority >= floor).count();
        let Some((first, pick)) = (0..allowed).find_map(|k| self.select_in(k, q, lane, None).map(|p| (k, p))) else {
            let lend = self.config.lend_max_cost;
            if !reserved || lend == 0 {
                return None;
            }
            return (allowed..self.classes.len()).find_map(|k| self.select_in(k, q, lane, Some(lend)).map(|p| (k, p)));
        };
        if !reserved {
            let limit = self.config.max_priority_skips;
            for k in first + 1..allowed {
                if self.classes[k].passed >= limit
                    && let Some(p) = self.select_in(k, q, lane, None)
                {
                    return Some((k, p));
                }
            }
        }
        Some((first, pick))
    }

    /// Whether `worker` is one of its querier's workers reserved for high priorities: those
    /// in the lowest `reserved_workers_percent` of its connected lanes, rounded down (one
    /// lane per worker unless a worker loop's slots share one).
    pub(super) fn is_reserved(&self, worker: WorkerId) -> bool {
        let pct = u32::from(self.config.reserved_workers_percent);
        if pct == 0 {
            return false;
        }
        let q = &self.queriers.slab[worker.querier];
        let reserved = q.lanes_connected * pct / 100;
        let below = q.lanes.get(..usize::from(worker.lane)).unwrap_or(&q.lanes);
        let rank = below.iter().filter(|&&n| n > 0).count() as u32;
        rank < reserved
    }

    /// Bookkeeping of the starvation guard after a dispatch from class `priority` (which
    /// may have emptied and gone since).
    pub(super) fn note_served(&mut self, priority: u8, reserved: bool) {
        for class in &mut self.classes {
            if class.priority == priority {
                class.passed = 0;
            } else if class.priority < priority && !reserved && !class.order.is_empty() {
                class.passed = class.passed.saturating_add(1);
            }
        }
    }

    /// Requests queued per priority class, highest first.
    pub fn class_lengths(&self) -> Vec<(u8, u32)> {
        self.classes
            .iter()
            .filter(|k| !k.order.is_empty())
            .map(|k| {
                let n = k
                    .order
                    .iter()
                    .filter_map(|&c| self.components[c as usize].as_ref())
                    .map(|comp| comp.queued)
                    .sum();
                (k.priority, n)
            })
            .collect()
    }
}
