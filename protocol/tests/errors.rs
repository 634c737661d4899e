//! One test per decode, encode and validation error: each bad input gets its typed error.

use bytes::{BufMut, Bytes, BytesMut};
use sluice_protocol::*;

const MAX: u32 = 1024;

fn frame(body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(body.len() as u32);
    b.extend_from_slice(body);
    b
}

fn body_of<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    encode_to_vec(msg, MAX).unwrap()[LENGTH_PREFIX_LEN..].to_vec()
}

fn sample_enqueue() -> Enqueue {
    Enqueue {
        query_id: 7,
        tenant: "tenant-a".into(),
        actors: vec!["user-1".into(), "dashboard-9".into()],
        component: Some("ingester".into()),
        priority: None,
        cost_hint: Some(3),
        timeout_ms: Some(30_000),
        attempt: 1,
        capability: 0x5eed,
        metadata: vec![("traceparent".into(), "00-abc-def-01".into())],
        payload: Bytes::from_static(b"sum(rate(x[5m]))"),
    }
}

#[test]
fn partial_length_prefix_needs_more() {
    let d = FrameDecoder::new(MAX);
    let mut buf = BytesMut::from(&[0u8, 0][..]);
    assert_eq!(d.decode::<Notice>(&mut buf), Ok(None));
    assert_eq!(buf.len(), 2, "nothing consumed while waiting");
}

#[test]
fn partial_body_needs_more_and_reserves_only_the_frame() {
    let d = FrameDecoder::new(MAX);
    let whole = encode_to_vec(&FrontendToScheduler::Enqueue(sample_enqueue()), MAX).unwrap();
    let mut buf = BytesMut::from(&whole[..whole.len() - 1]);
    assert_eq!(d.decode::<FrontendToScheduler>(&mut buf), Ok(None));
    assert!(buf.capacity() >= whole.len());
    buf.extend_from_slice(&whole[whole.len() - 1..]);
    assert_eq!(
        d.decode::<FrontendToScheduler>(&mut buf),
        Ok(Some(FrontendToScheduler::Enqueue(sample_enqueue())))
    );
}

#[test]
fn oversized_length_is_refused_before_allocation() {
    let d = FrameDecoder::new(MAX);
    let mut buf = BytesMut::new();
    buf.put_u32(u32::MAX);
    let cap_before = buf.capacity();
    assert_eq!(
        d.decode::<Notice>(&mut buf),
        Err(DecodeError::FrameTooLarge {
            len: u64::from(u32::MAX),
            max: MAX
        })
    );
    assert_eq!(
        buf.capacity(),
        cap_before,
        "no room was reserved for the oversized frame"
    );
}

#[test]
fn a_bare_length_prefix_does_not_reserve_the_whole_frame() {
    let d = FrameDecoder::new(HARD_MAX_FRAME_LEN);
    let mut buf = BytesMut::new();
    buf.put_u32(HARD_MAX_FRAME_LEN); // 64 MiB announced, 4 bytes sent
    assert_eq!(d.decode::<Notice>(&mut buf), Ok(None));
    assert!(buf.capacity() <= 128 * 1024, "reserved {} bytes", buf.capacity());
}

#[test]
fn configured_maximum_is_clamped_to_the_hard_limit() {
    assert_eq!(FrameDecoder::new(u32::MAX).max_frame_len(), HARD_MAX_FRAME_LEN);
}

#[test]
fn zero_length_frame_is_an_error() {
    let d = FrameDecoder::new(MAX);
    assert_eq!(d.decode::<Notice>(&mut frame(&[])), Err(DecodeError::EmptyFrame));
}

#[test]
fn truncated_message_inside_a_complete_frame() {
    let body = body_of(&FrontendToScheduler::Enqueue(sample_enqueue()));
    let d = FrameDecoder::new(MAX);
    let mut buf = frame(&body[..body.len() - 3]);
    assert_eq!(d.decode::<FrontendToScheduler>(&mut buf), Err(DecodeError::Truncated));
    assert!(buf.is_empty(), "the bad frame is consumed");
}

#[test]
fn trailing_bytes_inside_a_frame() {
    let mut body = body_of(&QuerierToScheduler::Ready {
        worker: 0,
        finished: None,
    });
    body.extend_from_slice(&[1, 2, 3]);
    let d = FrameDecoder::new(MAX);
    assert_eq!(
        d.decode::<QuerierToScheduler>(&mut frame(&body)),
        Err(DecodeError::TrailingBytes { extra: 3 })
    );
}

#[test]
fn unknown_variant() {
    // SchedulerToQuerier has three variants; index 9 is not one of them.
    let d = FrameDecoder::new(MAX);
    assert_eq!(
        d.decode::<SchedulerToQuerier>(&mut frame(&[9])),
        Err(DecodeError::UnknownVariant)
    );
}

#[test]
fn invalid_utf8_in_a_string() {
    // FrontendToScheduler::Cancel is variant 1; use Enqueue (0) and corrupt the tenant.
    let mut e = sample_enqueue();
    e.tenant = "ab".into();
    let mut body = body_of(&FrontendToScheduler::Enqueue(e));
    let at = body.windows(2).position(|w| w == b"ab").unwrap();
    body[at] = 0xff;
    let d = FrameDecoder::new(MAX);
    assert_eq!(
        d.decode::<FrontendToScheduler>(&mut frame(&body)),
        Err(DecodeError::InvalidUtf8)
    );
}

#[test]
fn malformed_varint_and_option_tag() {
    let d = FrameDecoder::new(MAX);
    // Variant index as a varint that never ends within 5 bytes.
    assert_eq!(
        d.decode::<SchedulerToQuerier>(&mut frame(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01])),
        Err(DecodeError::Malformed("bad varint"))
    );
    // Ready { worker: 0, finished: Option<_> } with option tag 7.
    assert_eq!(
        d.decode::<QuerierToScheduler>(&mut frame(&[0, 0, 7])),
        Err(DecodeError::Malformed("bad option tag"))
    );
}

#[test]
fn wrong_protocol_version_is_reported_first() {
    let mut hello = Hello::new(Role::Frontend, "fe-1", StreamKind::FrontendLoop);
    hello.version = PROTOCOL_VERSION + 1;
    let d = FrameDecoder::new(MAX);
    assert_eq!(
        d.decode_hello(&mut encode_to_vec(&hello, MAX).unwrap()),
        Err(DecodeError::UnsupportedVersion {
            got: PROTOCOL_VERSION + 1,
            supported: PROTOCOL_VERSION
        })
    );
    // A future hello whose remaining fields changed shape still reports the version.
    let mut future = BytesMut::new();
    future.put_u8(0x7f); // version 127 as a postcard varint
    future.extend_from_slice(&[0xde, 0xad]);
    assert_eq!(
        d.decode_hello(&mut frame(&future)),
        Err(DecodeError::UnsupportedVersion {
            got: 127,
            supported: PROTOCOL_VERSION
        })
    );
}

#[test]
fn encode_refuses_a_message_over_the_maximum_and_leaves_the_buffer_alone() {
    let mut e = sample_enqueue();
    e.payload = Bytes::from(vec![0u8; 2000]);
    let mut buf = BytesMut::from(&b"keep"[..]);
    let err = encode(&FrontendToScheduler::Enqueue(e), &mut buf, MAX).unwrap_err();
    assert!(matches!(err, EncodeError::FrameTooLarge { max: MAX, len } if len > 2000));
    assert_eq!(&buf[..], b"keep");
}

#[test]
fn validate_accepts_a_normal_request() {
    assert_eq!(sample_enqueue().validate(&Limits::default()), Ok(()));
}

#[test]
fn validate_names_each_broken_rule() {
    let limits = Limits::default();
    let check = |f: &dyn Fn(&mut Enqueue), want: InvalidRequest| {
        let mut e = sample_enqueue();
        f(&mut e);
        assert_eq!(e.validate(&limits), Err(want));
    };
    check(&|e| e.tenant.clear(), InvalidRequest::EmptyTenant);
    check(
        &|e| e.tenant = "t".repeat(300),
        InvalidRequest::TenantTooLong { len: 300, max: 256 },
    );
    check(
        &|e| e.actors = vec!["a".into(); 9],
        InvalidRequest::ActorPathTooDeep { depth: 9, max: 8 },
    );
    check(&|e| e.actors[1].clear(), InvalidRequest::EmptyActor { level: 1 });
    check(
        &|e| e.actors[0] = "u".repeat(257),
        InvalidRequest::ActorTooLong {
            level: 0,
            len: 257,
            max: 256,
        },
    );
    check(&|e| e.component = Some(String::new()), InvalidRequest::EmptyComponent);
    check(
        &|e| e.component = Some("c".repeat(65)),
        InvalidRequest::ComponentTooLong { len: 65, max: 64 },
    );
    check(
        &|e| e.metadata = vec![(String::new(), String::new()); 65],
        InvalidRequest::TooMuchMetadata { entries: 65, max: 64 },
    );
    check(&|e| e.cost_hint = Some(0), InvalidRequest::ZeroCost);
}

#[test]
fn errors_read_well() {
    assert_eq!(
        DecodeError::FrameTooLarge { len: 10, max: 5 }.to_string(),
        "frame of 10 bytes exceeds the maximum of 5 bytes"
    );
    assert_eq!(
        InvalidRequest::TenantTooLong { len: 300, max: 256 }.to_string(),
        "tenant is 300 bytes long, the limit is 256"
    );
}

#[test]
fn a_list_over_its_hard_maximum_is_refused_while_decoding() {
    // Millions of empty actors cost one byte each on the wire and 24 in memory: the count
    // is refused as soon as it is read, before any element exists.
    let mut enqueue = sample_enqueue();
    enqueue.actors = vec![String::new(); 1_000_000];
    let big = 4 << 20;
    let body = encode_to_vec(&FrontendToScheduler::Enqueue(enqueue), big).unwrap();
    let d = FrameDecoder::new(big);
    let mut buf = body;
    assert_eq!(
        d.decode::<FrontendToScheduler>(&mut buf),
        Err(DecodeError::TooMany {
            len: 1_000_000,
            max: bounded::HARD_MAX_ACTORS
        })
    );
    // At the maximum it decodes (the configurable limits then answer with a reason).
    let mut enqueue = sample_enqueue();
    enqueue.actors = vec!["a".into(); bounded::HARD_MAX_ACTORS];
    enqueue.metadata = vec![(String::new(), String::new()); bounded::HARD_MAX_METADATA];
    let mut buf = encode_to_vec(&FrontendToScheduler::Enqueue(enqueue.clone()), big).unwrap();
    assert_eq!(
        d.decode::<FrontendToScheduler>(&mut buf),
        Ok(Some(FrontendToScheduler::Enqueue(enqueue)))
    );
    // Likewise metadata, and the dispatch notes a frontend receives.
    let note = SchedulerToFrontend::Dispatched {
        query_ids: vec![0; bounded::HARD_MAX_DISPATCHED_IDS + 1],
    };
    let mut buf = encode_to_vec(&note, big).unwrap();
    assert!(matches!(
        d.decode::<SchedulerToFrontend>(&mut buf),
        Err(DecodeError::TooMany { .. })
    ));
    // The refusal does not leak into the next, unrelated error.
    let mut bad = frame(&[9]);
    assert_eq!(
        d.decode::<FrontendToScheduler>(&mut bad),
        Err(DecodeError::UnknownVariant)
    );
}

#[test]
fn a_hello_larger_than_a_hello_needs_is_refused_before_it_is_buffered() {
    let d = FrameDecoder::new(8 << 20);
    let mut buf = BytesMut::new();
    buf.put_u32(HELLO_MAX_FRAME_LEN + 1);
    assert_eq!(
        d.decode_hello(&mut buf),
        Err(DecodeError::FrameTooLarge {
            len: u64::from(HELLO_MAX_FRAME_LEN) + 1,
            max: HELLO_MAX_FRAME_LEN
        })
    );
    let hello = Hello::new(Role::Querier, "q".repeat(MAX_ID_LEN), StreamKind::DequeueLoop);
    let mut buf = encode_to_vec(&hello, 8 << 20).unwrap();
    assert_eq!(d.decode_hello(&mut buf), Ok(Some(hello)), "the longest valid id fits");
}
