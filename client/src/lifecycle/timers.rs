//! The table's moments (deadlines, placement waits, confirmation graces), earliest first.
//!
//! Almost every query ends long before its deadline, so a moment is never removed when it
//! stops mattering: it stays until it is due or the heap is swept, and whoever pops it
//! checks it against the query (a query that ended, or whose moment moved, ignores it).
//! Adding is then a push that rarely moves (deadlines mostly grow), where an ordered set
//! paid a search to add and another to remove, under the frontend's lock, per query.
//!
//! Bounded: once the heap holds more than [`SWEEP_FACTOR`] moments per live query (plus
//! [`SWEEP_SLACK`]), the stale ones are swept, so it never holds much more than the live
//! queries' moments, and the sweeps cost a constant per moment added.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use sluice_protocol::QueryId;

/// Moments kept per live query before the stale ones are swept (a live query has at most
/// three at a time).
pub(super) const SWEEP_FACTOR: usize = 4;
/// Moments kept beyond that, so a table with few queries does not sweep at every add.
pub(super) const SWEEP_SLACK: usize = 64;

#[derive(Debug, Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, QueryId)>>,
    /// A moment was added before every one held (the waiter must wake earlier).
    earlier: bool,
}

impl Timers {
    /// Adds `id`'s moment `at`. `live` queries are in the table; `current` tells whether a
    /// moment still matters (used only when this add sweeps).
    pub(super) fn add(&mut self, at: Instant, id: QueryId, live: usize, current: impl Fn(Instant, QueryId) -> bool) {
        if self.heap.len() >= live.saturating_mul(SWEEP_FACTOR).saturating_add(SWEEP_SLACK) {
            self.heap.retain(|Reverse((at, id))| current(*at, *id));
        }
        if self.heap.peek().is_none_or(|Reverse((first, _))| at < *first) {
            self.earlier = true;
        }
        self.heap.push(Reverse((at, id)));
    }

    /// Whether a moment was added before every one held since the last call. Whoever
    /// waits for [`next`](Self::next) must then look again; otherwise the moment it waits
    /// for is still the earliest (or stale, which only wakes it early).
    pub(super) fn take_earlier(&mut self) -> bool {
        std::mem::take(&mut self.earlier)
    }

    /// The earliest moment that still matters; stale ones before it are dropped.
    pub(super) fn next(&mut self, current: impl Fn(Instant, QueryId) -> bool) -> Option<Instant> {
        while let Some(&Reverse((at, id))) = self.heap.peek() {
            if current(at, id) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// The earliest moment if it is due at `now` (it may be stale: check it).
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(Instant, QueryId)> {
        match self.heap.peek() {
            Some(&Reverse((at, id))) if at <= now => {
                self.heap.pop();
                Some((at, id))
            }
            _ => None,
        }
    }

    /// Moments held, stale ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn moments_come_earliest_first_and_stale_ones_are_skipped() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        let all = |_, _| true;
        for (s, id) in [(3, 1), (1, 2), (2, 3)] {
            t.add(t0 + Duration::from_secs(s), id, 3, all);
        }
        // Query 2 ended: its moment no longer matters.
        assert!(t.take_earlier(), "the first moment, then an earlier one");
        assert!(!t.take_earlier());
        t.add(t0 + Duration::from_secs(5), 4, 4, all);
        assert!(!t.take_earlier(), "not before the earliest");
        // Query 2 ended: its moment no longer matters.
        let current = |_, id| id != 2 && id != 4;
        assert_eq!(t.next(current), Some(t0 + Duration::from_secs(2)));
        assert_eq!(t.pop_due(t0 + Duration::from_secs(1)), None);
        assert_eq!(
            t.pop_due(t0 + Duration::from_secs(3)),
            Some((t0 + Duration::from_secs(2), 3))
        );
        assert_eq!(
            t.pop_due(t0 + Duration::from_secs(3)),
            Some((t0 + Duration::from_secs(3), 1))
        );
        assert_eq!(
            t.pop_due(t0 + Duration::from_secs(9)),
            Some((t0 + Duration::from_secs(5), 4))
        );
        assert_eq!(t.pop_due(t0 + Duration::from_secs(9)), None);
        assert_eq!(t.next(current), None);
    }

    #[test]
    fn ended_queries_moments_are_swept_within_the_bound() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        // One query live at a time, 10 000 of them in turn, each with a far deadline.
        for id in 0..10_000u64 {
            let current = |_, q| q == id;
            t.add(t0 + Duration::from_secs(60 + id), id, 1, current);
            assert!(t.len() <= SWEEP_FACTOR + SWEEP_SLACK + 1, "{} moments held", t.len());
        }
        assert_eq!(t.next(|_, q| q == 9_999), Some(t0 + Duration::from_secs(60 + 9_999)));
    }
}
