//! Structured round trip: whatever message a body decodes to must encode again and
//! decode to the very same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};
use sluice_protocol::*;

fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(body: &[u8]) {
    let Ok(msg) = decode_body::<T>(body) else {
        return;
    };
    let frame = encode_to_vec(&msg, HARD_MAX_FRAME_LEN).expect("a decoded message re-encodes");
    let again = decode_body::<T>(&frame[LENGTH_PREFIX_LEN..]).expect("a re-encoded message decodes");
    assert_eq!(msg, again);
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 12 {
        0 => roundtrip::<Hello>(body),
        1 => roundtrip::<HelloReply>(body),
        2 => roundtrip::<FrontendToScheduler>(body),
        3 => roundtrip::<SchedulerToFrontend>(body),
        4 => roundtrip::<QuerierToScheduler>(body),
        5 => roundtrip::<SchedulerToQuerier>(body),
        6 => roundtrip::<ResultFrame>(body),
        7 => roundtrip::<ResultReceipt>(body),
        8 => roundtrip::<Notice>(body),
        9 => roundtrip::<NoticeReply>(body),
        10 => roundtrip::<LoadReport>(body),
        _ => roundtrip::<ResultAck>(body),
    }
});
