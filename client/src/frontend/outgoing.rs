//! What a link's writer task sends to its scheduler. An enqueue is sent as the request the
//! frontend keeps (shared, not copied) and the few figures of this placement; it is
//! encoded straight from there, exactly as a [`FrontendToScheduler::Enqueue`] would be,
//! so placing a query (again) copies none of its strings, lists or payload.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::ser::{SerializeStruct, Serializer};
use sluice_protocol::{Capability, FrontendToScheduler, QueryId, enqueue_len_bound, fits_frame};

use super::QueryRequest;

/// One message for the writer task.
#[derive(Debug)]
pub(super) enum Outgoing {
    /// Any frame, as it is.
    Frame(FrontendToScheduler),
    /// An [`Enqueue`](sluice_protocol::Enqueue) of `request`.
    Enqueue(Placing),
}

/// One placement of a query: its request and what this placement says of it.
#[derive(Debug)]
pub(super) struct Placing {
    pub(super) id: QueryId,
    pub(super) request: Arc<QueryRequest>,
    pub(super) capability: Capability,
    /// The budget left, sent as `timeout_ms`.
    pub(super) timeout: Option<Duration>,
    pub(super) attempt: u32,
}

impl Placing {
    /// The budget in whole milliseconds, rounded up: 0.4 ms must not read as "already
    /// expired".
    fn timeout_ms(&self) -> Option<u64> {
        self.timeout
            .map(|t| u64::try_from(t.as_micros().div_ceil(1000)).unwrap_or(u64::MAX))
    }

    fn view(&self) -> EnqueueOf<'_> {
        EnqueueOf {
            id: self.id,
            request: &self.request,
            capability: self.capability,
            timeout_ms: self.timeout_ms(),
            attempt: self.attempt,
        }
    }
}

/// An upper bound of the body length of an `Enqueue` of `request`, quick to count.
pub(super) fn len_bound(request: &QueryRequest) -> usize {
    let r = request;
    enqueue_len_bound(
        &r.tenant,
        &r.actors,
        r.component.as_deref(),
        &r.metadata,
        r.payload.len(),
    )
}

/// Err(its length) when an `Enqueue` of `request` could exceed a frame of `max_frame_len`
/// bytes in some placement (its figures at their largest); `bound` is its [`len_bound`].
/// Counted exactly only when the bound is above the limit.
pub(super) fn fits(request: &QueryRequest, bound: usize, max_frame_len: u32) -> Result<(), usize> {
    let worst = EnqueueOf {
        id: QueryId::MAX,
        request,
        capability: Capability::MAX,
        timeout_ms: Some(u64::MAX),
        attempt: u32::MAX,
    };
    fits_frame(&AsFrame(&worst), bound, 0, max_frame_len)
}

/// Why a request of `len` bytes as an enqueue is refused, for a frame limit of `max`
/// (`whose`: this frontend's, or the scheduler's it would go to).
pub(super) fn too_large(len: usize, max: u32, whose: &str) -> String {
    format!(
        "the request takes {len} bytes as an enqueue frame, above {whose} frame limit of {max} bytes \
         (max_frame_len); send less in one query"
    )
}

/// An `Enqueue` frame's fields, borrowed.
struct EnqueueOf<'a> {
    id: QueryId,
    request: &'a QueryRequest,
    capability: Capability,
    timeout_ms: Option<u64>,
    attempt: u32,
}

/// An [`EnqueueOf`] as the `FrontendToScheduler::Enqueue` variant.
struct AsFrame<'a, 'b>(&'b EnqueueOf<'a>);

impl Serialize for Outgoing {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Outgoing::Frame(frame) => frame.serialize(serializer),
            Outgoing::Enqueue(p) => AsFrame(&p.view()).serialize(serializer),
        }
    }
}

impl Serialize for AsFrame<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Variant 0 of `FrontendToScheduler`, fields in `Enqueue`'s order: the tests hold
        // the bytes to those of the real frame.
        serializer.serialize_newtype_variant("FrontendToScheduler", 0, "Enqueue", self.0)
    }
}

impl Serialize for EnqueueOf<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let r = self.request;
        let mut s = serializer.serialize_struct("Enqueue", 11)?;
        s.serialize_field("query_id", &self.id)?;
        s.serialize_field("tenant", &r.tenant)?;
        s.serialize_field("actors", &r.actors)?;
        s.serialize_field("component", &r.component)?;
        s.serialize_field("priority", &r.priority)?;
        s.serialize_field("cost_hint", &r.cost_hint)?;
        s.serialize_field("timeout_ms", &self.timeout_ms)?;
        s.serialize_field("attempt", &self.attempt)?;
        s.serialize_field("capability", &self.capability)?;
        s.serialize_field("metadata", &r.metadata)?;
        s.serialize_field("payload", &r.payload)?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;
    use sluice_protocol::{Enqueue, decode_body, encode_to_vec};

    use super::*;

    /// The frame the frontend would send if it built one.
    fn frame(p: &Placing) -> FrontendToScheduler {
        let r = &p.request;
        FrontendToScheduler::Enqueue(Enqueue {
            query_id: p.id,
            tenant: r.tenant.clone(),
            actors: r.actors.clone(),
            component: r.component.clone(),
            priority: r.priority,
            cost_hint: r.cost_hint,
            timeout_ms: p.timeout_ms(),
            attempt: p.attempt,
            capability: p.capability,
            metadata: r.metadata.clone(),
            payload: r.payload.clone(),
        })
    }

    fn bytes(msg: &impl Serialize) -> Vec<u8> {
        encode_to_vec(msg, u32::MAX).unwrap().to_vec()
    }

    proptest! {
        #[test]
        fn a_placement_encodes_as_the_enqueue_frame_would(
            id: u64,
            tenant in ".{0,20}",
            actors in proptest::collection::vec(".{0,8}", 0..4),
            component in proptest::option::of("[a-z]{0,8}"),
            priority: Option<u8>,
            cost_hint: Option<u32>,
            timeout_us in proptest::option::of(any::<u64>()),
            attempt: u32,
            capability: u128,
            metadata in proptest::collection::vec((".{0,8}", ".{0,8}"), 0..3),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let p = Placing {
                id,
                request: Arc::new(QueryRequest {
                    tenant,
                    actors,
                    component,
                    priority,
                    cost_hint,
                    metadata,
                    payload: Bytes::from(payload),
                    ..QueryRequest::default()
                }),
                capability,
                timeout: timeout_us.map(Duration::from_micros),
                attempt,
            };
            let expected = frame(&p);
            let sent = bytes(&Outgoing::Enqueue(p));
            prop_assert_eq!(&sent, &bytes(&expected));
            prop_assert_eq!(decode_body::<FrontendToScheduler>(&sent[4..]).unwrap(), expected);
        }
    }

    /// The worst-case body length of an enqueue of `request`, counted by encoding it.
    fn worst_len(request: &QueryRequest) -> usize {
        let worst = Placing {
            id: QueryId::MAX,
            request: Arc::new(request.clone()),
            capability: Capability::MAX,
            timeout: Some(Duration::MAX),
            attempt: u32::MAX,
        };
        bytes(&Outgoing::Enqueue(worst)).len() - 4
    }

    #[test]
    fn a_request_fits_up_to_the_frame_limit_and_not_a_byte_beyond() {
        let limit = 64 * 1024;
        let mut request = QueryRequest::new("tenant", Bytes::new())
            .with_actors(["user", "dashboard"])
            .with_component("store-gateway");
        request.metadata.push(("traceparent".into(), "x".repeat(55)));
        let overhead = worst_len(&request);
        // The largest payload that fits, whatever the placement's figures.
        // (`overhead` has the empty payload's 1-byte length; this one's takes 3.)
        request.payload = Bytes::from(vec![7; limit - overhead - 2]);
        assert_eq!(worst_len(&request), limit);
        let fits = |r: &QueryRequest, max: usize| fits(r, len_bound(r), max as u32);
        assert_eq!(fits(&request, limit), Ok(()));
        request.payload = Bytes::from(vec![7; limit - overhead - 1]);
        assert_eq!(fits(&request, limit), Err(limit + 1));
        // The bound is never below the exact count, and answers alone far from the limit.
        assert!(len_bound(&request) > limit);
        assert_eq!(fits(&QueryRequest::new("t", "q"), 64), Ok(()));
        assert!(fits(&QueryRequest::new("t", vec![0; 100]), 64).is_err());
    }

    #[test]
    fn other_frames_encode_as_themselves() {
        let cancel = FrontendToScheduler::Cancel { query_id: 7 };
        assert_eq!(bytes(&Outgoing::Frame(cancel.clone())), bytes(&cancel));
    }
}
