//! The Sluice wire protocol: every frame exchanged between frontends, schedulers and
//! queriers, and the length-prefixed postcard framing that carries them.
//!
//! This crate does no I/O. A connection owns a [`bytes::BytesMut`] read buffer, appends
//! what arrives, and asks a [`FrameDecoder`] for whole messages; replies are appended to a
//! write buffer with [`encode`].
//!
//! ```
//! use bytes::BytesMut;
//! use sluice_protocol::*;
//!
//! let limits = Limits::default();
//! let mut wire = BytesMut::new();
//! encode(&Hello::new(Role::Querier, "querier-1", StreamKind::DequeueLoop), &mut wire, limits.max_frame_len)?;
//! encode(&QuerierToScheduler::Ready { worker: 0, finished: None }, &mut wire, limits.max_frame_len)?;
//!
//! let decoder = FrameDecoder::new(limits.max_frame_len);
//! let hello = decoder.decode_hello(&mut wire)?.expect("a whole frame");
//! assert_eq!(hello.id, "querier-1");
//! let ready: Option<QuerierToScheduler> = decoder.decode(&mut wire)?;
//! assert_eq!(ready, Some(QuerierToScheduler::Ready { worker: 0, finished: None }));
//! assert_eq!(decoder.decode::<QuerierToScheduler>(&mut wire)?, None); // need more bytes
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bounded;
mod codec;
mod error;
mod frame;
mod intern;
#[cfg(feature = "tokio")]
mod io;
mod limits;

pub use codec::{
    FrameDecoder, HELLO_MAX_FRAME_LEN, LENGTH_PREFIX_LEN, body_len, decode_body, decode_hello_body, encode,
    encode_to_vec, enqueue_len_bound, fits_frame, metadata_len_bound,
};
pub use error::{DecodeError, EncodeError, InvalidRequest};
pub use frame::*;
#[cfg(feature = "tokio")]
pub use io::{FrameSource, FramedRead, FramedWrite, ReadError, ReceiveBudget, WriteError};
pub use limits::{
    HARD_MAX_FRAME_LEN, Limits, MAX_ID_LEN, MAX_SLOTS_PER_LOOP, MAX_WORKERS_PER_STREAM, MIN_FRAME_LEN,
    frame_limit_allowed,
};
