//! No frame body may cost much more memory decoded than it has bytes: every allocation made
//! while decoding is counted, and the total must stay within a fixed allowance plus a small
//! multiple of the body's length. A list of empty strings without a decode-time bound (one
//! byte each on the wire, 24 in memory) fails this at once.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use sluice_protocol::*;

/// Bytes allocated so far (never decremented: growth counts every time).
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What any body may cost decoded beyond four times its length.
const ALLOWANCE: usize = 64 * 1024;

fn check<T: DeserializeOwned>(body: &[u8]) {
    let before = ALLOCATED.load(Ordering::Relaxed);
    let decoded = decode_body::<T>(body);
    let used = ALLOCATED.load(Ordering::Relaxed) - before;
    drop(decoded);
    assert!(
        used <= ALLOWANCE + 4 * body.len(),
        "{} body bytes cost {used} bytes decoded",
        body.len()
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 9 {
        0 => check::<Hello>(body),
        1 => check::<FrontendToScheduler>(body),
        2 => check::<SchedulerToFrontend>(body),
        3 => check::<QuerierToScheduler>(body),
        4 => check::<SchedulerToQuerier>(body),
        5 => check::<ResultFrame>(body),
        6 => check::<ResultReceipt>(body),
        7 => check::<HelloReply>(body),
        _ => check::<LoadReport>(body),
    }
});
