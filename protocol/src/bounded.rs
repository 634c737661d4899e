//! Counts enforced while decoding, before anything is allocated for them.
//!
//! A list of empty strings costs one byte per element on the wire and 24 in memory, so a
//! frame within the size limit could still cost twenty times its size once decoded. Every
//! list a peer sends is therefore read through [`seq`], which refuses more than its
//! hard maximum as soon as the announced length is read. These maxima are far above the
//! configurable [`Limits`](crate::Limits), which still apply (with a clear answer) after
//! decoding.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

/// Most actor levels any frame may carry.
pub const HARD_MAX_ACTORS: usize = 64;
/// Most metadata entries any frame may carry.
pub const HARD_MAX_METADATA: usize = 256;
/// Most query ids one `Dispatched` note may carry.
pub const HARD_MAX_DISPATCHED_IDS: usize = 4096;
/// Most tenants one scheduler's load report may list (it fits one datagram).
pub const HARD_MAX_REPORTED_TENANTS: usize = 1024;

thread_local! {
    /// The last list refused on this thread, for the error: postcard reports serde's
    /// custom errors without their text.
    static REFUSED: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
}

/// Takes (and clears) the refusal recorded by the last failed [`seq`] on this thread.
pub(crate) fn take_refusal() -> Option<(usize, usize)> {
    REFUSED.with(Cell::take)
}

/// Deserializes a list of at most `MAX` elements; longer lists are refused before any
/// element is read (when the length is announced, as postcard does) or as soon as one too
/// many arrives.
pub fn seq<'de, D, T, const MAX: usize>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_seq(Bounded::<T, MAX>(PhantomData))
}

struct Bounded<T, const MAX: usize>(PhantomData<T>);

fn refuse<E: Error>(len: usize, max: usize) -> E {
    REFUSED.with(|r| r.set(Some((len, max))));
    E::invalid_length(len, &"a shorter list")
}

impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for Bounded<T, MAX> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a list of at most {MAX} elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let announced = seq.size_hint();
        if let Some(n) = announced
            && n > MAX
        {
            return Err(refuse(n, MAX));
        }
        let mut out = Vec::with_capacity(announced.unwrap_or(0).min(MAX));
        while let Some(x) = seq.next_element()? {
            if out.len() == MAX {
                return Err(refuse(MAX + 1, MAX));
            }
            out.push(x);
        }
        Ok(out)
    }
}
