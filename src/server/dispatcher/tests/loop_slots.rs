//! A prefetching querier's worker loops (`LoopSlots`): a loop's slots share one lane of
//! the queue.

use super::*;
use sluice_protocol::MAX_SLOTS_PER_LOOP;

fn loop_slots(h: &mut Harness, stream: u64, slots_per_loop: u8) {
    h.d.handle(Command::LoopSlots { stream, slots_per_loop }, h.now);
}

/// The queue lanes of `stream`'s workers 0..4, after each said `Ready`.
fn lanes(h: &mut Harness, stream: u64) -> Vec<u16> {
    (0..4).for_each(|slot| h.ready_slot(stream, slot));
    let s = &h.d.streams[&stream];
    (0..4).map(|slot| s.workers[&slot].lane).collect()
}

#[test]
fn a_loops_slots_share_a_lane_and_without_loop_slots_each_has_its_own() {
    let mut h = harness();
    let (paired, _rx, cut) = h.worker_of("q1");
    loop_slots(&mut h, paired, 2);
    assert_eq!(lanes(&mut h, paired), [0, 0, 1, 1]);
    assert!(!cut.violation.is_cancelled());
    let (single, _rx, _cut) = h.worker_of("q2");
    assert_eq!(lanes(&mut h, single), [0, 1, 2, 3]);
}

#[test]
fn loop_slots_out_of_bounds_repeated_or_late_close_the_connection() {
    let mut h = harness();
    for (what, n) in [("none", 0), ("too many", MAX_SLOTS_PER_LOOP + 1)] {
        let (w, _rx, cut) = h.worker_of("q");
        loop_slots(&mut h, w, n);
        assert!(cut.violation.is_cancelled(), "{what}");
    }
    let (w, _rx, cut) = h.worker_of("q");
    loop_slots(&mut h, w, MAX_SLOTS_PER_LOOP);
    assert!(!cut.violation.is_cancelled(), "the largest group is allowed");
    loop_slots(&mut h, w, 2);
    assert!(cut.violation.is_cancelled(), "a second LoopSlots");
    let (w, _rx, cut) = h.worker_of("q");
    h.ready(w);
    loop_slots(&mut h, w, 2);
    assert!(cut.violation.is_cancelled(), "LoopSlots after a worker registered");
}
