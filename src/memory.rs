//! How the `sluice` binary (scheduler, bench, demo) takes memory from the OS.

/// The allocator. Every query allocates frames and buffers on one runtime thread and frees
/// them on another; glibc's malloc then spends about a quarter of the client side's CPU in
/// its arena locks. mimalloc: 33% more queries per second, 25–30% less CPU per query on both
/// sides, for ~20 MB more resident memory (docs/benchmarks.md). The libraries leave the
/// choice to their users.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP=1` asks to
/// keep them. mimalloc asks the kernel for 2 MiB pages on its arenas; the first touch of
/// each one zeroes 2 MiB while the faulting runtime thread waits, and where fresh memory is
/// slow to come by (on the virtual machines measured, 15–60 ms per page) every query on that
/// thread waits too. With 4 KiB pages the same memory arrives a little at a time: at 25 000
/// queries/s the scheduler's queue-wait p99 went from about a millisecond to 54 µs
/// (docs/benchmarks.md, "Huge pages"). Called first thing in `main`: only the few MiB
/// touched before it are in huge pages.
pub fn prefer_small_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none_or(|v| v != "1") {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
        let failed = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0;
        if failed {
            // A kernel before 3.15, or a sandbox that forbids it: worth a note, not a stop.
            eprintln!(
                "note: could not turn transparent huge pages off: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
