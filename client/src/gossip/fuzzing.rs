//! The gossip packet path, for the fuzzer and its seeds. Not part of the API.

use std::net::SocketAddr;
use std::num::NonZeroU32;

use foca::{AccumulatingRuntime, Foca, PostcardCodec};
use rand::SeedableRng;
use rand::rngs::StdRng;
use ring::hmac;

use super::{MAX_PACKET, Member, MemberRole, MemberState, TAG_LEN};

const KEY: &[u8] = b"fuzzing key, sixteen bytes or more";

fn member(port: u16) -> Member {
    Member {
        id: format!("m{port}"),
        role: MemberRole::Scheduler,
        gossip: SocketAddr::from(([127, 0, 0, 1], port)),
        service: Some(SocketAddr::from(([127, 0, 0, 1], port + 1))),
        state: MemberState::Active,
        generation: 1,
    }
}

fn instance(port: u16) -> Foca<Member, PostcardCodec, StdRng, foca::NoCustomBroadcast> {
    let mut config = foca::Config::new_lan(NonZeroU32::new(16).expect("non-zero"));
    config.max_packet_size = (MAX_PACKET - TAG_LEN).try_into().expect("non-zero");
    Foca::new(member(port), config, StdRng::seed_from_u64(7), PostcardCodec)
}

/// Runs `packet` through a member's receive path: the tag check, then (if `sign` is
/// set, the packet is first tagged with the key, so that the bytes reach foca's
/// decoder) foca itself. Returns whether foca accepted it; never panics.
pub fn receive(packet: &[u8], sign: bool) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, KEY);
    let tagged;
    let packet = if sign {
        let mut p = hmac::sign(&key, packet).as_ref().to_vec();
        p.extend_from_slice(packet);
        tagged = p;
        &tagged[..]
    } else {
        packet
    };
    if packet.len() <= TAG_LEN || hmac::verify(&key, &packet[TAG_LEN..], &packet[..TAG_LEN]).is_err() {
        return false;
    }
    // A third member, so that every sample comes from someone else.
    let mut foca = instance(7200);
    let mut runtime = AccumulatingRuntime::new();
    let accepted = foca.handle_data(&packet[TAG_LEN..], &mut runtime).is_ok();
    while runtime.to_send().is_some() {}
    accepted
}

/// Untagged packets foca writes in a small exchange (announce, feed, probes, gossip):
/// the seeds of the fuzzer's corpus.
pub fn sample_packets() -> Vec<Vec<u8>> {
    let (mut a, mut b) = (instance(7000), instance(7100));
    let (mut ra, mut rb) = (AccumulatingRuntime::new(), AccumulatingRuntime::new());
    let mut out = Vec::new();
    a.announce(member(7100), &mut ra).expect("announce");
    for _ in 0..4 {
        while let Some((_, data)) = ra.to_send() {
            out.push(data.to_vec());
            let _ = b.handle_data(&data, &mut rb);
        }
        while let Some((_, data)) = rb.to_send() {
            out.push(data.to_vec());
            let _ = a.handle_data(&data, &mut ra);
        }
        let _ = a.gossip(&mut ra);
    }
    let _ = b.leave_cluster(&mut rb);
    while let Some((_, data)) = rb.to_send() {
        out.push(data.to_vec());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_are_accepted_and_garbage_is_not() {
        let samples = super::sample_packets();
        assert!(samples.len() >= 3, "{} samples", samples.len());
        assert!(samples.iter().all(|p| super::receive(p, true)));
        assert!(!super::receive(&samples[0], false), "an untagged packet is dropped");
        assert!(!super::receive(b"\xff\xff\xff garbage", true));
    }
}
