//! Length-prefixed postcard framing.
//!
//! A frame is a 4-byte big-endian body length followed by the postcard encoding of one
//! message. Decoding happens in two steps, as in tokio's mini-redis: "is a whole frame
//! buffered?" (if not, `Ok(None)`: read more), then "parse it". The length is checked
//! against the maximum before anything is allocated, and no input makes the decoder
//! panic (it is fuzzed: see `fuzz/`).

use bytes::{Buf, BufMut, BytesMut};
use serde::{Serialize, de::DeserializeOwned};

use crate::{DecodeError, EncodeError, HARD_MAX_FRAME_LEN, Hello, PROTOCOL_VERSION};

/// Largest [`Hello`] frame: a version, a role, an id of at most
/// [`MAX_ID_LEN`](crate::MAX_ID_LEN) bytes and a stream kind fit many times over.
pub const HELLO_MAX_FRAME_LEN: u32 = 1024;

/// Bytes in the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Most room reserved ahead for a frame still arriving: the buffer grows with the bytes
/// that actually come, so a peer cannot make us reserve megabytes with a 4-byte prefix.
const RESERVE_AHEAD: usize = 64 * 1024;

/// Appends one frame holding `msg` to `dst`. On error `dst` is left as it was.
pub fn encode<T: Serialize>(msg: &T, dst: &mut BytesMut, max_frame_len: u32) -> Result<(), EncodeError> {
    let start = dst.len();
    dst.put_u32(0);
    if let Err(e) = postcard::serialize_with_flavor(msg, BytesMutFlavor(dst)) {
        dst.truncate(start);
        return Err(EncodeError::Serialize(e.to_string()));
    }
    let len = dst.len() - start - LENGTH_PREFIX_LEN;
    if len > max_frame_len as usize {
        dst.truncate(start);
        return Err(EncodeError::FrameTooLarge {
            len,
            max: max_frame_len,
        });
    }
    // `len` fits in u32: it is at most `max_frame_len`.
    dst[start..start + LENGTH_PREFIX_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// The length of `msg`'s frame body (what [`encode`] checks against the frame limit),
/// counted without encoding it.
pub fn body_len<T: Serialize>(msg: &T) -> Result<usize, EncodeError> {
    postcard::serialize_with_flavor(msg, postcard::ser_flavors::Size::default())
        .map_err(|e| EncodeError::Serialize(e.to_string()))
}

/// Longest varint postcard writes: a length or a `u64`.
const MAX_VARINT: usize = 10;

/// An upper bound of the bytes `metadata` takes in a frame: every length prefix at its
/// longest.
pub fn metadata_len_bound(metadata: &crate::Metadata) -> usize {
    MAX_VARINT
        + metadata
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2 * MAX_VARINT)
            .sum::<usize>()
}

/// An upper bound of the body length of an [`Enqueue`](crate::Enqueue) with these
/// fields, counted without encoding them: every length prefix and number at its longest
/// varint, and the fixed fields with room to spare. See [`fits_frame`].
pub fn enqueue_len_bound(
    tenant: &str,
    actors: &[String],
    component: Option<&str>,
    metadata: &crate::Metadata,
    payload: usize,
) -> usize {
    /// The tags, id, priority, cost hint, timeout, attempt and capability at their longest.
    const FIXED_FIELDS_MAX: usize = 96;
    // The tenant's, actor list's, component's and payload's length prefixes, and each actor's.
    let prefixes = actors.len() + 4;
    payload
        + tenant.len()
        + actors.iter().map(String::len).sum::<usize>()
        + component.map_or(0, str::len)
        + metadata_len_bound(metadata)
        + MAX_VARINT * prefixes
        + FIXED_FIELDS_MAX
}

/// Whether `msg`, and `extra` bytes its frame will carry beside it, fit in a frame of
/// `max_frame_len` bytes. `bound` is an upper bound of `msg`'s body length: when it fits,
/// that is the answer at once (the common case, nothing walked); otherwise `msg` is
/// counted exactly ([`body_len`]). Err: the length, `extra` included.
pub fn fits_frame<T: Serialize>(msg: &T, bound: usize, extra: usize, max_frame_len: u32) -> Result<(), usize> {
    let max = max_frame_len as usize;
    if bound.saturating_add(extra) <= max {
        return Ok(());
    }
    let len = body_len(msg).unwrap_or(usize::MAX).saturating_add(extra);
    if len > max { Err(len) } else { Ok(()) }
}

/// Encodes `msg` as one frame in a new buffer.
pub fn encode_to_vec<T: Serialize>(msg: &T, max_frame_len: u32) -> Result<BytesMut, EncodeError> {
    let mut buf = BytesMut::new();
    encode(msg, &mut buf, max_frame_len)?;
    Ok(buf)
}

/// Decodes one complete message body (the bytes after the length prefix). Every byte
/// must belong to the message.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    crate::bounded::take_refusal(); // nothing stale from an earlier decode on this thread
    let (msg, rest) = postcard::take_from_bytes::<T>(body).map_err(map_postcard)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { extra: rest.len() });
    }
    Ok(msg)
}

/// Decodes a [`Hello`] body, reporting a version mismatch before anything else so that a
/// newer peer gets a precise error even if the rest of its hello changed shape.
pub fn decode_hello_body(body: &[u8]) -> Result<Hello, DecodeError> {
    let (version, _) = postcard::take_from_bytes::<u16>(body).map_err(map_postcard)?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            got: version,
            supported: PROTOCOL_VERSION,
        });
    }
    decode_body(body)
}

/// Splits frames off a byte stream that arrives in arbitrary pieces.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame_len: u32,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_frame_len` (clamped to
    /// [`HARD_MAX_FRAME_LEN`]).
    pub fn new(max_frame_len: u32) -> Self {
        FrameDecoder {
            max_frame_len: max_frame_len.min(HARD_MAX_FRAME_LEN),
        }
    }

    /// The largest body this decoder accepts.
    pub fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// Takes the next whole frame's body out of `src`: `Ok(None)` if `src` holds only part
    /// of one (read more, then call again). Reserves room in `src` for the rest of a
    /// partly received frame, at most 64 KiB ahead of what arrived.
    pub fn next_body(&self, src: &mut BytesMut) -> Result<Option<BytesMut>, DecodeError> {
        self.next_body_within(src, self.max_frame_len)
    }

    fn next_body_within(&self, src: &mut BytesMut, max: u32) -> Result<Option<BytesMut>, DecodeError> {
        if src.len() < LENGTH_PREFIX_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        if len > max {
            return Err(DecodeError::FrameTooLarge {
                len: u64::from(len),
                max,
            });
        }
        if len == 0 {
            return Err(DecodeError::EmptyFrame);
        }
        let total = LENGTH_PREFIX_LEN + len as usize;
        if src.len() < total {
            src.reserve((total - src.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX_LEN);
        Ok(Some(src.split_to(len as usize)))
    }

    /// Decodes the next message of type `T` from `src`, or `Ok(None)` if it is not all
    /// here yet. The frame is consumed even when its body fails to decode.
    pub fn decode<T: DeserializeOwned>(&self, src: &mut BytesMut) -> Result<Option<T>, DecodeError> {
        match self.next_body(src)? {
            Some(body) => decode_body(&body).map(Some),
            None => Ok(None),
        }
    }

    /// Like [`decode`](Self::decode) for the [`Hello`] that opens every stream, with the
    /// version checked first and the frame held to [`HELLO_MAX_FRAME_LEN`]: a peer that has
    /// not said who it is may not make us buffer more.
    pub fn decode_hello(&self, src: &mut BytesMut) -> Result<Option<Hello>, DecodeError> {
        match self.next_body_within(src, self.max_frame_len.min(HELLO_MAX_FRAME_LEN))? {
            Some(body) => decode_hello_body(&body).map(Some),
            None => Ok(None),
        }
    }
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(crate::Limits::default().max_frame_len)
    }
}

fn map_postcard(e: postcard::Error) -> DecodeError {
    use postcard::Error as P;
    match e {
        P::DeserializeUnexpectedEnd => DecodeError::Truncated,
        P::DeserializeBadUtf8 => DecodeError::InvalidUtf8,
        // serde's derive rejects an out-of-range variant index through a custom error,
        // which postcard reports without its text; our types have no other such check.
        P::SerdeDeCustom if let Some((len, max)) = crate::bounded::take_refusal() => DecodeError::TooMany { len, max },
        P::DeserializeBadEnum | P::SerdeDeCustom => DecodeError::UnknownVariant,
        P::DeserializeBadVarint => DecodeError::Malformed("bad varint"),
        P::DeserializeBadBool => DecodeError::Malformed("bad bool"),
        P::DeserializeBadChar => DecodeError::Malformed("bad char"),
        P::DeserializeBadOption => DecodeError::Malformed("bad option tag"),
        _ => DecodeError::Malformed("unexpected encoding"),
    }
}

/// Lets postcard write straight into a `BytesMut`, slices at a time.
struct BytesMutFlavor<'a>(&'a mut BytesMut);

impl postcard::ser_flavors::Flavor for BytesMutFlavor<'_> {
    type Output = ();

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.put_u8(byte);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}
