//! W3C trace context for one query across frontend, scheduler and querier.
//!
//! A query carries a `traceparent` entry in its metadata (the [W3C Trace Context] header,
//! `00-<trace id>-<parent id>-<flags>`). The frontend keeps the caller's trace id or starts
//! a trace, and sends its own span id as the parent; the scheduler logs the trace id with
//! the query's enqueue and dispatch (at debug level); the querier runs the handler in a
//! `query` span carrying the trace id, and hands the handler a `traceparent` naming the
//! querier's span, for the calls the handler makes. So one query can be followed through
//! the three processes' logs, or linked in any tracing backend fed from them.
//!
//! [W3C Trace Context]: https://www.w3.org/TR/trace-context/

use sluice_protocol::Metadata;

/// The metadata key of the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A parsed `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace every hop of the query shares.
    pub trace_id: u128,
    /// The span of the hop that sent it.
    pub parent_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// A new trace, sampled.
    pub fn root() -> Self {
        TraceParent {
            trace_id: nonzero(rand::random()),
            parent_id: nonzero(rand::random()),
            flags: 1,
        }
    }

    /// The same trace, with a new span of ours as the parent of what follows.
    pub fn child(&self) -> Self {
        TraceParent {
            parent_id: nonzero(rand::random()),
            ..*self
        }
    }

    /// Parses a `traceparent` header value; `None` unless it is well formed (version 00,
    /// lowercase hex, ids not all zero). One pass over the 55 bytes: a querier parses one
    /// for every query.
    pub fn parse(value: &str) -> Option<Self> {
        let b = value.as_bytes();
        if b.len() != HEADER_LEN || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let tp = TraceParent {
            trace_id: u128::from(hex64(&b[3..19])?) << 64 | u128::from(hex64(&b[19..35])?),
            parent_id: hex64(&b[36..52])?,
            flags: u8::try_from(hex64(&b[53..55])?).ok()?,
        };
        (tp.trace_id != 0 && tp.parent_id != 0).then_some(tp)
    }

    /// The trace context in `metadata`, if there is a well-formed one.
    pub fn of(metadata: &Metadata) -> Option<Self> {
        metadata
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(TRACEPARENT))
            .and_then(|(_, v)| Self::parse(v))
    }

    /// Sets `metadata`'s trace context to this one (replacing any other).
    /// An entry already there is rewritten in place (no allocation: a querier does this
    /// for every query).
    pub fn set(&self, metadata: &mut Metadata) {
        let mut found = false;
        metadata.retain_mut(|(k, v)| {
            if !k.eq_ignore_ascii_case(TRACEPARENT) {
                return true;
            }
            if found {
                return false;
            }
            found = true;
            if k != TRACEPARENT {
                *k = TRACEPARENT.to_string();
            }
            v.clear();
            self.write_header(v);
            true
        });
        if !found {
            metadata.push((TRACEPARENT.to_string(), self.header()));
        }
    }

    /// The trace id as 32 hex digits, as logged.
    pub fn trace_id_hex(&self) -> String {
        let mut b = [0; 32];
        hex_into(&mut b, &self.trace_id.to_be_bytes());
        String::from_utf8(b.to_vec()).expect("hex digits are ASCII")
    }

    /// The `traceparent` header value (written by hand: it is made for every query, and
    /// the formatting machinery costs several times more).
    fn header(&self) -> String {
        let mut out = String::with_capacity(HEADER_LEN);
        self.write_header(&mut out);
        out
    }

    /// Appends the header value to `out`: filled in a buffer on the stack, then appended at
    /// once (a `push` per digit checked the capacity 53 times).
    fn write_header(&self, out: &mut String) {
        let mut b = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex_into(&mut b[3..35], &self.trace_id.to_be_bytes());
        hex_into(&mut b[36..52], &self.parent_id.to_be_bytes());
        hex_into(&mut b[53..55], &[self.flags]);
        out.push_str(std::str::from_utf8(&b).expect("hex digits are ASCII"));
    }
}

/// Length of a version-00 `traceparent` value.
const HEADER_LEN: usize = 55;

/// Each byte's value as a lowercase hex digit; `INVALID` for every other byte.
const NIBBLE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 16 {
        table[b"0123456789abcdef"[i] as usize] = i as u8;
        i += 1;
    }
    table
};
const INVALID: u8 = 0xff;

/// The value of at most 16 lowercase hex digits; `None` at any other byte. No branch per
/// digit: a bad byte sets high bits that are checked once at the end.
fn hex64(digits: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    let mut seen = 0u8;
    for &d in digits {
        let nibble = NIBBLE[usize::from(d)];
        seen |= nibble;
        value = value << 4 | u64::from(nibble & 0x0f);
    }
    (seen & 0xf0 == 0).then_some(value)
}

/// Writes `bytes` as lowercase hex into `out` (twice their length).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.header())
    }
}

fn nonzero<T: PartialEq + From<u8>>(x: T) -> T {
    if x == T::from(0) { T::from(1) } else { x }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_w3c_example_parses_and_prints_back() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(value).unwrap();
        assert_eq!(tp.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(tp.parent_id, 0x00f067aa0ba902b7);
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_string(), value);
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = tp.child();
        assert_eq!(child.trace_id, tp.trace_id);
        assert_ne!(child.parent_id, tp.parent_id);
    }

    #[test]
    fn malformed_values_are_ignored() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736+00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn every_context_prints_and_parses_back(trace_id in 1u128.., parent_id in 1u64.., flags: u8) {
            let tp = TraceParent { trace_id, parent_id, flags };
            proptest::prop_assert_eq!(TraceParent::parse(&tp.to_string()), Some(tp));
        }
    }

    proptest::proptest! {
        #[test]
        fn a_byte_that_belongs_nowhere_in_a_context_spoils_it(
            trace_id in 1u128..,
            parent_id in 1u64..,
            at in 0usize..HEADER_LEN,
            bad in proptest::sample::select(vec![b'g', b'A', b'F', b'+', b' ', b'_']),
        ) {
            let mut value = TraceParent { trace_id, parent_id, flags: 1 }.to_string().into_bytes();
            value[at] = bad;
            let value = String::from_utf8(value).unwrap();
            proptest::prop_assert_eq!(TraceParent::parse(&value), None);
        }
    }

    #[test]
    fn setting_replaces_any_earlier_context() {
        let mut metadata = vec![
            ("Traceparent".to_string(), "junk".to_string()),
            ("user".to_string(), "ann".to_string()),
        ];
        let tp = TraceParent::root();
        tp.set(&mut metadata);
        assert_eq!(TraceParent::of(&metadata), Some(tp));
        assert_eq!(metadata.len(), 2);
        assert_eq!(metadata[0], (TRACEPARENT.to_string(), tp.to_string()));
    }

    #[test]
    fn setting_keeps_one_context_and_the_other_entries() {
        let mut metadata = vec![
            ("traceparent".to_string(), "junk".to_string()),
            ("user".to_string(), "ann".to_string()),
            ("TRACEPARENT".to_string(), "more junk".to_string()),
        ];
        let tp = TraceParent::root();
        tp.child().set(&mut metadata);
        let child = TraceParent::of(&metadata).unwrap();
        assert_eq!(child.trace_id, tp.trace_id);
        assert_eq!(metadata.len(), 2);
        assert_eq!(metadata[1], ("user".to_string(), "ann".to_string()));
        let mut empty = Vec::new();
        tp.set(&mut empty);
        assert_eq!(empty, vec![(TRACEPARENT.to_string(), tp.to_string())]);
    }
}
