//! Frontend addresses decoded once, not once per dispatch.
//!
//! Every [`Dispatch`](crate::Dispatch) names the frontend its result goes to, and a querier
//! sees the same few frontends over and over. Decoding the address afresh would allocate its
//! three strings for every query; instead each thread keeps the addresses it decoded last,
//! and a dispatch naming one of them shares it. The wire format is unchanged: only what a
//! decoded address costs.
//!
//! The cache is small and bounded whatever a peer sends: at most [`CACHED`] addresses per
//! thread, none longer than [`LARGEST_CACHED`] bytes (a longer one is decoded as before and
//! not kept).

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::FrontendAddress;

/// Addresses each thread keeps: more frontends than a querier usually serves at once.
pub const CACHED: usize = 16;
/// The longest address kept, in bytes of its three strings together.
pub const LARGEST_CACHED: usize = 1024;

/// The wire form of a [`FrontendAddress`], read in place.
#[derive(Deserialize)]
struct View<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    address: Cow<'a, str>,
    #[serde(borrow)]
    server_name: Cow<'a, str>,
    max_frame_len: u32,
}

impl View<'_> {
    fn names(&self, a: &FrontendAddress) -> bool {
        a.max_frame_len == self.max_frame_len
            && a.id == self.id
            && a.address == self.address
            && a.server_name == self.server_name
    }

    fn len(&self) -> usize {
        self.id.len() + self.address.len() + self.server_name.len()
    }

    fn into_owned(self) -> FrontendAddress {
        FrontendAddress {
            id: self.id.into_owned(),
            address: self.address.into_owned(),
            server_name: self.server_name.into_owned(),
            max_frame_len: self.max_frame_len,
        }
    }
}

#[derive(Default)]
struct Recent {
    kept: Vec<Arc<FrontendAddress>>,
    /// Where the next new address goes once `kept` is full (oldest first).
    next: usize,
}

thread_local! {
    static RECENT: RefCell<Recent> = RefCell::default();
}

/// Deserializes a frontend address, sharing this thread's copy when it has one.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Arc<FrontendAddress>, D::Error> {
    let view = View::deserialize(deserializer)?;
    if view.len() > LARGEST_CACHED {
        return Ok(Arc::new(view.into_owned()));
    }
    Ok(RECENT.with_borrow_mut(|recent| {
        if let Some(kept) = recent.kept.iter().find(|a| view.names(a)) {
            return kept.clone();
        }
        let fresh = Arc::new(view.into_owned());
        if recent.kept.len() < CACHED {
            recent.kept.push(fresh.clone());
        } else {
            let at = recent.next;
            recent.kept[at] = fresh.clone();
            recent.next = (at + 1) % CACHED;
        }
        fresh
    }))
}

/// Serializes the address as a plain [`FrontendAddress`].
pub(crate) fn serialize<S: Serializer>(address: &Arc<FrontendAddress>, serializer: S) -> Result<S::Ok, S::Error> {
    FrontendAddress::serialize(address, serializer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dispatch, FrameDecoder, SchedulerToQuerier, encode};
    use bytes::{Bytes, BytesMut};

    fn address(id: &str, len: usize) -> FrontendAddress {
        FrontendAddress {
            id: id.to_string(),
            address: "127.0.0.1:7700".to_string(),
            server_name: "x".repeat(len),
            max_frame_len: 1 << 20,
        }
    }

    fn roundtrip(frontend: FrontendAddress) -> Arc<FrontendAddress> {
        let msg = SchedulerToQuerier::Dispatch {
            worker: 0,
            dispatch: Box::new(Dispatch {
                query_id: 1,
                frontend: Arc::new(frontend),
                tenant: "t".into(),
                actors: vec![],
                component: None,
                metadata: vec![],
                queue_time_us: 0,
                timeout_ms: None,
                attempt: 1,
                capability: 7,
                payload: Bytes::from_static(b"p"),
            }),
        };
        let mut wire = BytesMut::new();
        encode(&msg, &mut wire, 1 << 20).unwrap();
        match FrameDecoder::new(1 << 20).decode(&mut wire).unwrap() {
            Some(SchedulerToQuerier::Dispatch { dispatch, .. }) => dispatch.frontend,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_frontend_named_again_is_shared_and_a_different_one_is_not() {
        let first = roundtrip(address("fe-a", 9));
        let again = roundtrip(address("fe-a", 9));
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(*again, address("fe-a", 9));
        let other = roundtrip(address("fe-b", 9));
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(*other, address("fe-b", 9));
        // Same strings, another frame limit: another address.
        let mut limit = address("fe-a", 9);
        limit.max_frame_len = 1 << 16;
        let changed = roundtrip(limit.clone());
        assert!(!Arc::ptr_eq(&first, &changed));
        assert_eq!(*changed, limit);
    }

    #[test]
    fn the_cache_keeps_a_bounded_number_of_small_addresses() {
        let huge = roundtrip(address("fe-huge", LARGEST_CACHED + 1));
        let huge_again = roundtrip(address("fe-huge", LARGEST_CACHED + 1));
        assert!(!Arc::ptr_eq(&huge, &huge_again), "too long to keep");
        assert_eq!(*huge_again, address("fe-huge", LARGEST_CACHED + 1));
        for i in 0..3 * CACHED {
            roundtrip(address(&format!("fe-{i}"), 9));
        }
        RECENT.with_borrow(|r| {
            assert_eq!(r.kept.len(), CACHED);
            assert!(r.kept.iter().all(|a| a.server_name.len() == 9));
        });
        // The most recent are kept; the first was pushed out.
        let last = roundtrip(address(&format!("fe-{}", 3 * CACHED - 1), 9));
        let last_again = roundtrip(address(&format!("fe-{}", 3 * CACHED - 1), 9));
        assert!(Arc::ptr_eq(&last, &last_again));
        assert!(RECENT.with_borrow(|r| !r.kept.iter().any(|a| a.id == "fe-0")));
    }
}
