//! Raw bytes into the streaming decoder, cut into pieces the input itself chooses, for
//! every message type. Any input must give messages, "need more" or a typed error:
//! never a panic, never a read past what was buffered.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use sluice_protocol::*;

/// Feeds `data` in pieces of `piece` bytes; stops at the first error, as a connection would.
fn feed<T: DeserializeOwned>(data: &[u8], piece: usize, hello_first: bool) {
    let decoder = FrameDecoder::new(4096);
    let mut buf = BytesMut::new();
    let mut need_hello = hello_first;
    for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            let step = if need_hello {
                decoder.decode_hello(&mut buf).map(|h| h.map(|_| need_hello = false))
            } else {
                decoder.decode::<T>(&mut buf).map(|m| m.map(drop))
            };
            match step {
                Ok(Some(())) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.len() <= data.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(selector >> 3) + 1;
    match selector & 7 {
        0 => feed::<FrontendToScheduler>(rest, piece, true),
        1 => feed::<SchedulerToFrontend>(rest, piece, false),
        2 => feed::<QuerierToScheduler>(rest, piece, true),
        3 => feed::<SchedulerToQuerier>(rest, piece, false),
        4 => feed::<ResultFrame>(rest, piece, true),
        5 => feed::<HelloReply>(rest, piece, false),
        6 => feed::<Notice>(rest, piece, true),
        _ => feed::<ResultReceipt>(rest, piece, false),
    }
});
