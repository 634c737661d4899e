//! Encode and decode throughput of the two frames that dominate traffic: an enqueue with
//! a ~1 KiB payload and the tiny ready frame. Run: `cargo bench -p sluice-protocol`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_protocol::*;

fn enqueue_1k() -> FrontendToScheduler {
    FrontendToScheduler::Enqueue(Enqueue {
        query_id: 123_456_789,
        tenant: "tenant-0042".into(),
        actors: vec!["user-17".into(), "dashboard-3".into()],
        component: Some("store-gateway".into()),
        priority: None,
        cost_hint: Some(4),
        timeout_ms: Some(120_000),
        attempt: 1,
        capability: 0x5eed,
        metadata: vec![(
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        )],
        payload: Bytes::from(vec![b'x'; 1024]),
    })
}

fn bench_frame<T>(c: &mut Criterion, name: &str, msg: T)
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let max = Limits::default().max_frame_len;
    let decoder = FrameDecoder::new(max);
    // 64 frames per iteration, as a busy stream would batch them.
    const BATCH: usize = 64;
    let mut wire = BytesMut::new();
    for _ in 0..BATCH {
        encode(&msg, &mut wire, max).unwrap();
    }
    let wire = wire.freeze();

    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut out = BytesMut::with_capacity(wire.len());
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            for _ in 0..BATCH {
                encode(black_box(&msg), &mut out, max).unwrap();
            }
            black_box(out.len())
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let mut n = 0;
            while let Some(m) = decoder.decode::<T>(&mut buf).unwrap() {
                black_box(m);
                n += 1;
            }
            assert_eq!(n, BATCH);
        })
    });
    g.finish();
}

fn codec(c: &mut Criterion) {
    bench_frame(c, "enqueue_1KiB", enqueue_1k());
    bench_frame(
        c,
        "ready",
        QuerierToScheduler::Ready {
            worker: 0,
            finished: None,
        },
    );
}

criterion_group!(benches, codec);
criterion_main!(benches);
