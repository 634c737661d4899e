//! Every frame type survives encode → decode unchanged, however the bytes are split.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use sluice_protocol::*;

fn text() -> impl Strategy<Value = String> {
    // Mixes ASCII and multi-byte characters so UTF-8 handling is exercised.
    "[a-zA-Z0-9_\\-é漢🦀]{0,12}"
}

fn payload() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..300).prop_map(Bytes::from)
}

fn metadata() -> impl Strategy<Value = Metadata> {
    vec((text(), text()), 0..4)
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Frontend), Just(Role::Querier), Just(Role::Scheduler)]
}

fn stream_kind() -> impl Strategy<Value = StreamKind> {
    prop_oneof![
        Just(StreamKind::FrontendLoop),
        Just(StreamKind::DequeueLoop),
        Just(StreamKind::ShutdownNotice),
        Just(StreamKind::Result),
        Just(StreamKind::Results),
    ]
}

fn hello() -> impl Strategy<Value = Hello> {
    (role(), text(), stream_kind()).prop_map(|(role, id, stream)| Hello::new(role, id, stream))
}

fn hello_reply() -> impl Strategy<Value = HelloReply> {
    let code = prop_oneof![
        Just(RejectCode::UnsupportedVersion),
        Just(RejectCode::RoleNotAllowed),
        Just(RejectCode::InvalidHello),
        Just(RejectCode::ShuttingDown),
    ];
    prop_oneof![
        (text(), any::<u32>()).prop_map(|(id, max_frame_len)| HelloReply::Welcome { id, max_frame_len }),
        (code, text()).prop_map(|(code, message)| HelloReply::Rejected { code, message }),
    ]
}

fn enqueue() -> impl Strategy<Value = Enqueue> {
    (
        any::<u64>(),
        text(),
        vec(text(), 0..5),
        option::of(text()),
        option::of(any::<u8>()),
        option::of(any::<u32>()),
        option::of(any::<u64>()),
        (any::<u32>(), any::<u128>(), metadata()),
        payload(),
    )
        .prop_map(
            |(
                query_id,
                tenant,
                actors,
                component,
                priority,
                cost_hint,
                timeout_ms,
                (attempt, capability, metadata),
                payload,
            )| {
                Enqueue {
                    query_id,
                    tenant,
                    actors,
                    component,
                    priority,
                    cost_hint,
                    timeout_ms,
                    attempt,
                    capability,
                    metadata,
                    payload,
                }
            },
        )
}

fn frontend_to_scheduler() -> impl Strategy<Value = FrontendToScheduler> {
    prop_oneof![
        enqueue().prop_map(FrontendToScheduler::Enqueue),
        any::<u64>().prop_map(|query_id| FrontendToScheduler::Cancel { query_id }),
        (text(), text(), text(), any::<u32>()).prop_map(|(id, address, server_name, max_frame_len)| {
            FrontendToScheduler::ResultEndpoint(FrontendAddress {
                id,
                address,
                server_name,
                max_frame_len,
            })
        }),
    ]
}

fn enqueue_status() -> impl Strategy<Value = EnqueueStatus> {
    prop_oneof![
        Just(EnqueueStatus::Accepted),
        any::<u32>().prop_map(|limit| EnqueueStatus::TooManyOutstanding { limit }),
        Just(EnqueueStatus::QueueFull),
        any::<u64>().prop_map(|estimated_wait_ms| EnqueueStatus::WouldMissDeadline { estimated_wait_ms }),
        Just(EnqueueStatus::ShuttingDown),
        text().prop_map(|reason| EnqueueStatus::Invalid { reason }),
        text().prop_map(|message| EnqueueStatus::Error { message }),
    ]
}

fn error_kind() -> impl Strategy<Value = QueryErrorKind> {
    prop_oneof![
        Just(QueryErrorKind::QuerierFailed),
        Just(QueryErrorKind::DeadlineExceeded),
        Just(QueryErrorKind::HandedBack),
        Just(QueryErrorKind::Cancelled),
        Just(QueryErrorKind::Internal),
    ]
}

fn scheduler_to_frontend() -> impl Strategy<Value = SchedulerToFrontend> {
    prop_oneof![
        (
            any::<u64>(),
            enqueue_status(),
            any::<(u32, u32)>(),
            option::of(any::<u64>())
        )
            .prop_map(|(query_id, status, (queued, idle_workers), estimated_wait_ms)| {
                SchedulerToFrontend::EnqueueStatus {
                    query_id,
                    status,
                    load: LoadHint { queued, idle_workers },
                    estimated_wait_ms,
                }
            }),
        (any::<u64>(), error_kind(), text()).prop_map(|(query_id, kind, message)| SchedulerToFrontend::QueryError {
            query_id,
            kind,
            message
        }),
        Just(SchedulerToFrontend::ShuttingDown),
        vec(any::<u64>(), 0..40).prop_map(|query_ids| SchedulerToFrontend::Dispatched { query_ids }),
        any::<u64>().prop_map(|query_id| SchedulerToFrontend::Cancelled { query_id }),
    ]
}

fn querier_to_scheduler() -> impl Strategy<Value = QuerierToScheduler> {
    prop_oneof![
        (any::<u16>(), option::of((any::<u64>(), option::of(any::<u32>()))),).prop_map(|(worker, finished)| {
            QuerierToScheduler::Ready {
                worker,
                finished: finished.map(|(query_id, measured_cost)| Finished {
                    query_id,
                    measured_cost,
                }),
            }
        }),
        (any::<u16>(), any::<u64>()).prop_map(|(worker, query_id)| QuerierToScheduler::HandBack { worker, query_id }),
        any::<u8>().prop_map(|slots_per_loop| QuerierToScheduler::LoopSlots { slots_per_loop }),
    ]
}

fn dispatch() -> impl Strategy<Value = Dispatch> {
    (
        any::<u64>(),
        (text(), text(), text(), any::<u32>()),
        text(),
        vec(text(), 0..5),
        option::of(text()),
        metadata(),
        any::<u64>(),
        (option::of(any::<u64>()), any::<u32>(), any::<u128>()),
        payload(),
    )
        .prop_map(
            |(
                query_id,
                (id, address, server_name, max_frame_len),
                tenant,
                actors,
                component,
                metadata,
                queue_time_us,
                (timeout_ms, attempt, capability),
                payload,
            )| {
                Dispatch {
                    query_id,
                    frontend: std::sync::Arc::new(FrontendAddress {
                        id,
                        address,
                        server_name,
                        max_frame_len,
                    }),
                    tenant,
                    actors,
                    component,
                    metadata,
                    queue_time_us,
                    timeout_ms,
                    attempt,
                    capability,
                    payload,
                }
            },
        )
}

fn scheduler_to_querier() -> impl Strategy<Value = SchedulerToQuerier> {
    prop_oneof![
        (any::<u16>(), dispatch()).prop_map(|(worker, d)| SchedulerToQuerier::Dispatch {
            worker,
            dispatch: Box::new(d)
        }),
        (any::<u16>(), any::<u64>()).prop_map(|(worker, query_id)| SchedulerToQuerier::Cancel { worker, query_id }),
        Just(SchedulerToQuerier::ShuttingDown),
        (any::<u16>(), any::<u128>()).prop_map(|(port, token)| SchedulerToQuerier::Lifeline { port, token }),
    ]
}

fn result_frame() -> impl Strategy<Value = ResultFrame> {
    prop_oneof![
        (any::<u64>(), text(), any::<u128>(), any::<u16>(), metadata()).prop_map(
            |(query_id, tenant, capability, status, metadata)| ResultFrame::Head {
                query_id,
                tenant,
                capability,
                status,
                metadata,
            }
        ),
        payload().prop_map(ResultFrame::Chunk),
        any::<u64>().prop_map(|total_len| ResultFrame::End { total_len }),
        (any::<u64>(), text(), any::<u128>(), text()).prop_map(|(query_id, tenant, capability, message)| {
            ResultFrame::Error {
                query_id,
                tenant,
                capability,
                message,
            }
        }),
        text().prop_map(|message| ResultFrame::Abort { message }),
        (any::<u64>(), text(), any::<u128>()).prop_map(|(query_id, tenant, capability)| ResultFrame::Started {
            query_id,
            tenant,
            capability
        }),
        (any::<u64>(), text(), any::<u128>(), any::<u16>(), metadata(), payload()).prop_map(
            |(query_id, tenant, capability, status, metadata, body)| ResultFrame::Whole {
                query_id,
                tenant,
                capability,
                status,
                metadata,
                body,
            }
        ),
    ]
}

fn result_receipt() -> impl Strategy<Value = ResultReceipt> {
    prop_oneof![
        Just(ResultReceipt::Delivered),
        prop_oneof![
            Just(RefuseReason::UnknownQuery),
            Just(RefuseReason::TenantMismatch),
            Just(RefuseReason::Duplicate),
            Just(RefuseReason::Malformed),
        ]
        .prop_map(|reason| ResultReceipt::Refused { reason }),
    ]
}

/// Encodes `msgs` back to back, feeds the bytes to a decoder in pieces of `piece` bytes,
/// and checks that exactly the same messages come out, with `Ok(None)` in between.
fn assert_stream_roundtrip<T>(msgs: &[T], piece: usize)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let max = Limits::default().max_frame_len;
    let mut wire = BytesMut::new();
    for m in msgs {
        encode(m, &mut wire, max).expect("encodes");
    }
    let decoder = FrameDecoder::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in wire.chunks(piece.max(1)) {
        buf.extend_from_slice(chunk);
        while let Some(m) = decoder.decode::<T>(&mut buf).expect("decodes") {
            out.push(m);
        }
    }
    assert!(buf.is_empty(), "bytes left over: {}", buf.len());
    assert_eq!(out.as_slice(), msgs);
}

proptest! {
    #[test]
    fn hello_roundtrips(msgs in vec(hello(), 1..4), piece in 1usize..64) {
        // Hello has its own decoding entry point; check it too.
        let max = Limits::default().max_frame_len;
        for m in &msgs {
            let mut wire = encode_to_vec(m, max).unwrap();
            let got = FrameDecoder::new(max).decode_hello(&mut wire).unwrap();
            prop_assert_eq!(got.as_ref(), Some(m));
        }
        assert_stream_roundtrip(&msgs, piece);
    }

    #[test]
    fn hello_reply_roundtrips(msgs in vec(hello_reply(), 1..4), piece in 1usize..64) {
        assert_stream_roundtrip(&msgs, piece);
    }

    #[test]
    fn an_enqueue_never_takes_more_than_its_length_bound(e in enqueue()) {
        let exact = body_len(&e).unwrap();
        prop_assert_eq!(exact, encode_to_vec(&e, u32::MAX).unwrap().len() - LENGTH_PREFIX_LEN);
        let bound = enqueue_len_bound(&e.tenant, &e.actors, e.component.as_deref(), &e.metadata, e.payload.len());
        prop_assert!(exact <= bound, "{} > {}", exact, bound);
        prop_assert!(body_len(&e.metadata).unwrap() <= metadata_len_bound(&e.metadata));
        // As the variant of `FrontendToScheduler` it is sent in, too.
        prop_assert!(body_len(&FrontendToScheduler::Enqueue(e)).unwrap() <= bound);
    }

    #[test]
    fn frontend_to_scheduler_roundtrips(msgs in vec(frontend_to_scheduler(), 1..6), piece in 1usize..512) {
        assert_stream_roundtrip(&msgs, piece);
    }

    #[test]
    fn scheduler_to_frontend_roundtrips(msgs in vec(scheduler_to_frontend(), 1..6), piece in 1usize..64) {
        assert_stream_roundtrip(&msgs, piece);
    }

    #[test]
    fn querier_to_scheduler_roundtrips(msgs in vec(querier_to_scheduler(), 1..6), piece in 1usize..64) {
        assert_stream_roundtrip(&msgs, piece);
    }

    #[test]
    fn scheduler_to_querier_roundtrips(msgs in vec(scheduler_to_querier(), 1..6), piece in 1usize..512) {
        assert_stream_roundtrip(&msgs, piece);
    }

    #[test]
    fn notice_and_reply_roundtrip(piece in 1usize..8) {
        assert_stream_roundtrip(&[Notice::QuerierShuttingDown, Notice::QuerierShuttingDown], piece);
        assert_stream_roundtrip(&[NoticeReply::Acknowledged], piece);
    }

    #[test]
    fn result_frames_roundtrip(msgs in vec(result_frame(), 1..6), piece in 1usize..512) {
        assert_stream_roundtrip(&msgs, piece);
    }

    #[test]
    fn result_receipt_roundtrips(msgs in vec(result_receipt(), 1..4), piece in 1usize..16) {
        assert_stream_roundtrip(&msgs, piece);
    }

    #[test]
    fn result_acks_roundtrip(acks in vec((any::<u64>(), result_receipt()), 1..8), piece in 1usize..16) {
        let msgs: Vec<ResultAck> = acks.into_iter().map(|(query_id, receipt)| ResultAck { query_id, receipt }).collect();
        assert_stream_roundtrip(&msgs, piece);
    }

    #[test]
    fn load_reports_roundtrip(
        scheduler in text(),
        seq in any::<u64>(),
        version in any::<u64>(),
        tenants in vec((text(), any::<u32>()), 0..40),
        seen in vec((text(), any::<u64>()), 0..4),
    ) {
        let report = LoadReport { scheduler, seq, version, tenants, seen };
        prop_assert_eq!(LoadReport::decode(&report.encode()).unwrap(), report);
    }

    /// Any byte string is either decoded or refused with an error; never a panic, and a
    /// decoded message re-encodes to something that decodes to the same message.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..200)) {
        let decoder = FrameDecoder::new(1024);
        let mut buf = BytesMut::from(&bytes[..]);
        if let Ok(Some(m)) = decoder.decode::<FrontendToScheduler>(&mut buf) {
            let mut again = encode_to_vec(&m, 1 << 20).unwrap();
            prop_assert_eq!(decoder.decode::<FrontendToScheduler>(&mut again).unwrap(), Some(m));
        }
    }
}
