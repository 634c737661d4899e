//! Cost of one enqueue + one dequeue in steady state, and memory per queued request.
//!
//! Run: `cargo bench --bench queue` (add `-- --quick` for a fast pass). Each iteration
//! dequeues one request for the next worker and enqueues it again, so the queue keeps
//! its size and the harness allocates nothing; what is measured is the queue alone.
//! `policies=on` rows add every policy beyond round robin: costs 1–100 per request, three
//! priority classes, a quarter of the workers reserved, weights 1–4 (see docs/queue.md);
//! `policies=one-class` rows the same with every request in one priority class.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use sluice::queue::{Dequeue, EnqueueOptions, QueryKey, QueueConfig, QueuePath, Queued, TreeQueue, WorkerId};

struct Counting;
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Req {
    tenant: String,
    actors: Vec<String>,
}

impl Queued for Req {
    fn path(&self) -> QueuePath<'_> {
        QueuePath {
            component: None,
            tenant: &self.tenant,
            actors: &self.actors,
        }
    }
    fn size_bytes(&self) -> u64 {
        0
    }
}

fn requests(tenants: usize, per_tenant: usize, depth: usize) -> Vec<Req> {
    let mut out = Vec::with_capacity(tenants * per_tenant);
    for i in 0..per_tenant {
        for t in 0..tenants {
            out.push(Req {
                tenant: format!("tenant-{t}"),
                actors: (0..depth).map(|l| format!("actor-{l}-{}", i % 4)).collect(),
            });
        }
    }
    out
}

struct Setup {
    queue: TreeQueue<Req>,
    workers: Vec<WorkerId>,
    next_key: u64,
    now: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policies {
    Off,
    On,
    OneClass,
}

impl Policies {
    fn label(self) -> &'static str {
        match self {
            Policies::Off => "off",
            Policies::On => "on",
            Policies::OneClass => "one-class",
        }
    }
}

/// The enqueue options of request `key`: none, or with policies a cost of 1–100 and one
/// of three priority classes (or always class 1).
fn options(policies: Policies, key: u64) -> EnqueueOptions {
    let mix = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    let priority = match policies {
        Policies::Off => return EnqueueOptions::default(),
        Policies::On => (mix % 3) as u8,
        Policies::OneClass => 1,
    };
    EnqueueOptions {
        deadline: None,
        priority: Some(priority),
        cost: 1 + (mix % 100) as u32,
        allowance: None,
    }
}

fn setup(tenants: usize, depth: usize, sharded: bool, policies: Policies) -> Setup {
    let now = Instant::now();
    let mut config = QueueConfig {
        max_outstanding_per_tenant: 1_000,
        max_queriers_per_tenant: if sharded { 5 } else { 0 },
        max_queued_requests: 10_000_000,
        ..QueueConfig::default()
    };
    if policies != Policies::Off {
        config.reserved_workers_percent = 25;
        for t in (0..tenants).step_by(2) {
            let weight = Some(1 + (t % 4) as u32);
            config.tenants.insert(
                format!("tenant-{t}"),
                sluice::queue::TenantOverrides {
                    weight,
                    ..Default::default()
                },
            );
        }
    }
    let mut queue = TreeQueue::new(config, now).unwrap();
    // 100 queriers × 4 workers, so sharding has something to choose from.
    let mut workers = Vec::new();
    for w in 0..4 {
        for q in 0..100 {
            let _ = w;
            workers.push(queue.register_worker(now, &format!("querier-{q}")));
        }
    }
    // Enough backlog that every tenant stays queued: at least 4 each, 200k in all at most.
    let per_tenant = (200_000 / tenants).clamp(4, 1000);
    let mut next_key = 0;
    for r in requests(tenants, per_tenant, depth) {
        next_key += 1;
        let key = QueryKey {
            frontend: 0,
            query: next_key,
        };
        queue.enqueue(now, key, r, options(policies, next_key)).ok().unwrap();
    }
    Setup {
        queue,
        workers,
        next_key,
        now,
    }
}

fn enqueue_dequeue(c: &mut Criterion) {
    let mut g = c.benchmark_group("enqueue+dequeue");
    g.throughput(Throughput::Elements(1));
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    for (sharded, policies) in [false, true]
        .into_iter()
        .flat_map(|sharded| [Policies::Off, Policies::On, Policies::OneClass].map(|p| (sharded, p)))
    {
        for &depth in &[0usize, 2] {
            for &tenants in &[1usize, 10, 1_000, 100_000] {
                let id = format!(
                    "tenants={tenants}/depth={depth}/shard={}/policies={}",
                    if sharded { "5of100" } else { "off" },
                    policies.label()
                );
                let mut s = setup(tenants, depth, sharded, policies);
                let mut w = 0usize;
                g.bench_function(BenchmarkId::from_parameter(id), |b| {
                    b.iter(|| {
                        // Find a worker with something in its shard (always the first try
                        // unless sharding leaves this querier without queued tenants).
                        let d = loop {
                            w = (w + 1) % s.workers.len();
                            if let Dequeue::Dispatch(d) = s.queue.dequeue(s.now, s.workers[w]) {
                                break d;
                            }
                        };
                        s.next_key += 1;
                        let key = QueryKey {
                            frontend: 0,
                            query: s.next_key,
                        };
                        s.queue
                            .enqueue(s.now, key, d.request, options(policies, s.next_key))
                            .ok()
                            .unwrap();
                        black_box(&s.queue);
                    })
                });
            }
        }
    }
    g.finish();
}

/// Bytes the queue allocates per queued request, beyond the requests themselves.
fn memory_report() {
    for &(tenants, depth) in &[(1_000usize, 0usize), (1_000, 2), (100_000, 0)] {
        let n = 200_000;
        let reqs = requests(tenants, n / tenants, depth);
        let before = ALLOCATED.load(Ordering::Relaxed);
        let now = Instant::now();
        let mut q = TreeQueue::new(
            QueueConfig {
                max_outstanding_per_tenant: 1_000_000,
                max_queued_requests: 10_000_000,
                ..QueueConfig::default()
            },
            now,
        )
        .unwrap();
        for (i, r) in reqs.into_iter().enumerate() {
            let key = QueryKey {
                frontend: 0,
                query: i as u64,
            };
            q.enqueue(now, key, r, EnqueueOptions::default()).ok().unwrap();
        }
        let after = ALLOCATED.load(Ordering::Relaxed);
        // The requests' own strings were allocated before `before`; the slab moves the
        // `Req` structs (48 bytes each) into its storage, so subtract those too.
        let overhead = (after - before) as f64 / n as f64 - std::mem::size_of::<Req>() as f64;
        println!(
            "memory: tenants={tenants} depth={depth}: {overhead:.0} bytes of queue overhead per queued request ({n} queued)"
        );
        black_box(&q);
    }
}

/// The operators' dump (`/explain`) with the admin endpoint's bounds (2 000 nodes, 1 000
/// requests), over queues of 100 000 requests: the dispatcher runs it between commands.
fn explain(c: &mut Criterion) {
    let mut group = c.benchmark_group("explain");
    for (tenants, depth) in [(1_000, 2), (100_000, 0)] {
        let s = setup(tenants, depth, false, Policies::Off);
        group.bench_function(
            format!("queued={}/tenants={tenants}/depth={depth}", s.queue.len()),
            |b| b.iter(|| black_box(s.queue.explain(s.now, 2_000, 1_000))),
        );
    }
    group.finish();
}

fn main() {
    memory_report();
    let mut c = Criterion::default().configure_from_args();
    enqueue_dequeue(&mut c);
    explain(&mut c);
    c.final_summary();
}
