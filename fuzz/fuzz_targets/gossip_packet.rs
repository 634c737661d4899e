//! Raw bytes as a gossip packet from the network, through the member's receive path: the
//! HMAC check, then (with the first byte odd, the rest tagged with the cluster key, so the
//! bytes reach foca's decoder of our `Member` identities) foca itself. Any input must be
//! accepted or refused: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_client::gossip::fuzzing::receive;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, packet)) = data.split_first() else {
        return;
    };
    let _ = receive(packet, mode & 1 == 1);
});
