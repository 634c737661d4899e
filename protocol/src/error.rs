//! Errors of the protocol crate: one enum for encoding, one for decoding, one for
//! requests that decode but break a [`Limits`](crate::Limits) rule.

use thiserror::Error;

/// Why bytes could not be turned into a frame. After any of these the stream is in an
/// unknown state and must be closed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The length prefix announces more bytes than the configured maximum; nothing was
    /// allocated for it.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: u64, max: u32 },
    /// A length prefix of zero: no message is empty.
    #[error("empty frame (length prefix 0)")]
    EmptyFrame,
    /// The frame ended in the middle of a message.
    #[error("frame truncated: the message needs more bytes than the frame holds")]
    Truncated,
    /// The message ended before the frame did.
    #[error("{extra} trailing bytes after the message inside the frame")]
    TrailingBytes { extra: usize },
    /// An enum discriminant this protocol version does not define.
    #[error("unknown message or field variant")]
    UnknownVariant,
    /// A string field is not valid UTF-8.
    #[error("string field is not valid UTF-8")]
    InvalidUtf8,
    /// A [`Hello`](crate::Hello) with a protocol version this crate does not speak.
    #[error("unsupported protocol version {got} (this side speaks {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },
    /// A list longer than the protocol's hard maximum for it (see
    /// [`bounded`](crate::bounded)); refused before its elements were allocated.
    #[error("a list of {len} elements exceeds the maximum of {max}")]
    TooMany { len: usize, max: usize },
    /// Any other malformed encoding (bad varint, bool or option tag).
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The encoded message is larger than the configured maximum frame length; nothing
    /// was left in the output buffer.
    #[error("encoded message of {len} bytes exceeds the maximum frame length of {max} bytes")]
    FrameTooLarge { len: usize, max: u32 },
    /// The serializer failed (does not happen for this crate's types).
    #[error("serialization failed: {0}")]
    Serialize(String),
}

/// Why a well-formed [`Enqueue`](crate::Enqueue) is refused as invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidRequest {
    #[error("tenant is empty")]
    EmptyTenant,
    #[error("tenant is {len} bytes long, the limit is {max}")]
    TenantTooLong { len: usize, max: usize },
    #[error("actor path has {depth} levels, the limit is {max}")]
    ActorPathTooDeep { depth: usize, max: usize },
    #[error("actor at level {level} is empty")]
    EmptyActor { level: usize },
    #[error("actor at level {level} is {len} bytes long, the limit is {max}")]
    ActorTooLong { level: usize, len: usize, max: usize },
    #[error("component is empty (omit it instead)")]
    EmptyComponent,
    #[error("component is {len} bytes long, the limit is {max}")]
    ComponentTooLong { len: usize, max: usize },
    #[error("metadata has {entries} entries, the limit is {max}")]
    TooMuchMetadata { entries: usize, max: usize },
    #[error("cost hint must be at least 1")]
    ZeroCost,
}
