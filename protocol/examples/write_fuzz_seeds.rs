//! Writes the fuzzers' seed corpus: one valid stream per message type, so the fuzzers
//! start from real frames. Run from the repository root:
//! `cargo run -p sluice-protocol --example write_fuzz_seeds`.

use std::fs;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use sluice_protocol::*;

const MAX: u32 = 1 << 20;

fn frames<T: Serialize>(msgs: &[T]) -> BytesMut {
    let mut out = BytesMut::new();
    for m in msgs {
        encode(m, &mut out, MAX).expect("seed encodes");
    }
    out
}

fn body<T: Serialize>(msg: &T) -> Vec<u8> {
    encode_to_vec(msg, MAX).expect("seed encodes")[LENGTH_PREFIX_LEN..].to_vec()
}

fn write(dir: &Path, name: &str, selector: u8, bytes: &[u8]) {
    let mut data = vec![selector];
    data.extend_from_slice(bytes);
    fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
}

fn main() {
    let enqueue = Enqueue {
        query_id: 42,
        tenant: "tenant-a".into(),
        actors: vec!["user-1".into(), "dash-7".into()],
        component: Some("store-gateway".into()),
        priority: Some(2),
        cost_hint: Some(5),
        timeout_ms: Some(60_000),
        attempt: 1,
        capability: 0x5eed,
        metadata: vec![("traceparent".into(), "00-4bf92f-00f067-01".into())],
        payload: Bytes::from_static(b"{\"query\":\"sum(rate(http_requests_total[5m]))\"}"),
    };
    let dispatch = Dispatch {
        query_id: 42,
        frontend: std::sync::Arc::new(FrontendAddress {
            id: "fe-1".into(),
            address: "127.0.0.1:9095".into(),
            server_name: "localhost".into(),
            max_frame_len: 8 << 20,
        }),
        tenant: "tenant-a".into(),
        actors: vec!["user-1".into()],
        component: None,
        metadata: vec![],
        queue_time_us: 1234,
        timeout_ms: Some(59_000),
        attempt: 1,
        capability: 0x5eed,
        payload: Bytes::from_static(b"q"),
    };
    let hello = |role, stream| Hello::new(role, "peer-1", stream);

    let stream_dir = Path::new("fuzz/corpus/decode_stream");
    let rt_dir = Path::new("fuzz/corpus/roundtrip");
    fs::create_dir_all(stream_dir).unwrap();
    fs::create_dir_all(rt_dir).unwrap();

    // decode_stream: selector low 3 bits pick the type, high bits the piece size.
    let mut fe = frames(&[hello(Role::Frontend, StreamKind::FrontendLoop)]);
    fe.extend_from_slice(&frames(&[
        FrontendToScheduler::ResultEndpoint(FrontendAddress {
            id: "fe-1".into(),
            address: "127.0.0.1:9095".into(),
            server_name: "localhost".into(),
            max_frame_len: 8 << 20,
        }),
        FrontendToScheduler::Enqueue(enqueue.clone()),
        FrontendToScheduler::Cancel { query_id: 42 },
    ]));
    write(stream_dir, "frontend", 7 << 3, &fe); // type 0
    let sf = frames(&[
        SchedulerToFrontend::EnqueueStatus {
            query_id: 42,
            status: EnqueueStatus::TooManyOutstanding { limit: 100 },
            load: LoadHint {
                queued: 12,
                idle_workers: 3,
            },
            estimated_wait_ms: Some(u64::MAX),
        },
        SchedulerToFrontend::QueryError {
            query_id: 42,
            kind: QueryErrorKind::QuerierFailed,
            message: "querier q-1 disconnected".into(),
        },
        SchedulerToFrontend::Dispatched {
            query_ids: vec![40, 41, 42],
        },
        SchedulerToFrontend::Cancelled { query_id: 42 },
    ]);
    write(stream_dir, "to-frontend", 1 | (3 << 3), &sf);
    let mut q = frames(&[hello(Role::Querier, StreamKind::DequeueLoop)]);
    q.extend_from_slice(&frames(&[
        QuerierToScheduler::LoopSlots { slots_per_loop: 2 },
        QuerierToScheduler::Ready {
            worker: 3,
            finished: Some(Finished {
                query_id: 41,
                measured_cost: Some(9),
            }),
        },
        QuerierToScheduler::HandBack {
            worker: 4,
            query_id: 43,
        },
    ]));
    write(stream_dir, "querier", 2, &q);
    let sq = frames(&[
        SchedulerToQuerier::Dispatch {
            worker: 3,
            dispatch: Box::new(dispatch.clone()),
        },
        SchedulerToQuerier::Cancel {
            worker: 3,
            query_id: 42,
        },
        SchedulerToQuerier::ShuttingDown,
    ]);
    write(stream_dir, "to-querier", 3 | (15 << 3), &sq);
    let mut r = frames(&[hello(Role::Querier, StreamKind::Result)]);
    r.extend_from_slice(&frames(&[
        ResultFrame::Started {
            query_id: 42,
            tenant: "tenant-a".into(),
            capability: 0x5eed,
        },
        ResultFrame::Head {
            query_id: 42,
            tenant: "tenant-a".into(),
            capability: 0x5eed,
            status: 200,
            metadata: vec![],
        },
        ResultFrame::Chunk(Bytes::from_static(b"partial result bytes")),
        ResultFrame::End { total_len: 20 },
        ResultFrame::Abort {
            message: "body producer failed".into(),
        },
    ]));
    write(stream_dir, "result", 4 | (1 << 3), &r);

    // roundtrip: selector % 12 picks the type; the rest is one message body.
    write(
        rt_dir,
        "hello",
        0,
        &body(&hello(Role::Frontend, StreamKind::FrontendLoop)),
    );
    write(
        rt_dir,
        "enqueue",
        2,
        &body(&FrontendToScheduler::Enqueue(enqueue.clone())),
    );
    write(
        rt_dir,
        "dispatch",
        5,
        &body(&SchedulerToQuerier::Dispatch {
            worker: 0,
            dispatch: Box::new(dispatch.clone()),
        }),
    );

    // decode_amplification: selector % 9 picks the type; lists near their hard maximum.
    let amp_dir = Path::new("fuzz/corpus/decode_amplification");
    fs::create_dir_all(amp_dir).unwrap();
    let mut wide = enqueue;
    wide.actors = vec![String::new(); bounded::HARD_MAX_ACTORS];
    wide.metadata = vec![(String::new(), String::new()); 64];
    write(amp_dir, "enqueue", 1, &body(&FrontendToScheduler::Enqueue(wide)));
    write(
        amp_dir,
        "dispatched",
        2,
        &body(&SchedulerToFrontend::Dispatched {
            query_ids: vec![0; 512],
        }),
    );
    write(
        amp_dir,
        "dispatch",
        4,
        &body(&SchedulerToQuerier::Dispatch {
            worker: u16::MAX,
            dispatch: Box::new(dispatch),
        }),
    );
    write(
        rt_dir,
        "result-error",
        6,
        &body(&ResultFrame::Error {
            query_id: 1,
            tenant: "t".into(),
            capability: 0x5eed,
            message: "handler panicked".into(),
        }),
    );
    // A scheduler's load report (gossip), with many tenants and acknowledgements.
    let report = LoadReport {
        scheduler: "scheduler-1".into(),
        seq: u64::MAX,
        version: u64::MAX - 1,
        tenants: (0..40).map(|i| (format!("tenant-{i}"), u32::MAX - i)).collect(),
        seen: vec![("scheduler-2".into(), u64::MAX)],
    };
    write(rt_dir, "load-report", 10, &report.encode());
    write(amp_dir, "load-report", 8, &report.encode());
    // The shared results stream: a whole result and its ack.
    write(
        rt_dir,
        "result-whole",
        6,
        &body(&ResultFrame::Whole {
            query_id: u64::MAX,
            tenant: "t".into(),
            capability: u128::MAX,
            status: 200,
            metadata: vec![("k".into(), "v".into())],
            body: Bytes::from_static(b"a whole small result"),
        }),
    );
    write(
        rt_dir,
        "result-ack",
        11,
        &body(&ResultAck {
            query_id: 7,
            receipt: ResultReceipt::Refused {
                reason: RefuseReason::Duplicate,
            },
        }),
    );
    println!("seeds written under fuzz/corpus/");
}
