//! Gossip membership on loopback: joining, failure detection, leaving, and the key.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice_client::gossip::{
    Gossip, GossipConfig, GossipKey, MAX_REPORT_LEN, Member, MemberRole, MemberState, RESEND_EVERY,
};
use tokio::sync::watch;

fn key(k: &str) -> GossipKey {
    GossipKey::new(k.as_bytes().to_vec()).unwrap()
}

async fn member(id: &str, seeds: Vec<SocketAddr>, k: &str) -> Gossip {
    let config = GossipConfig::new("127.0.0.1:0".parse().unwrap(), seeds, key(k));
    let service = Some("127.0.0.1:9".parse().unwrap());
    Gossip::start(id, MemberRole::Scheduler, service, MemberState::Active, config).unwrap()
}

/// Waits (bounded) until the member list satisfies `f`; returns how long it took.
async fn until(rx: &mut watch::Receiver<Vec<Member>>, within: Duration, f: impl Fn(&[Member]) -> bool) -> Duration {
    let start = Instant::now();
    let matched = tokio::time::timeout(within, rx.wait_for(|m| f(m))).await.is_ok();
    assert!(matched, "membership never matched; last {:?}", *rx.borrow());
    start.elapsed()
}

fn ids(m: &[Member]) -> Vec<&str> {
    m.iter().map(|m| m.id.as_str()).collect()
}

#[tokio::test]
async fn members_find_each_other_detect_a_crash_and_see_a_leave() {
    let a = member("a", vec![], "a shared secret key").await;
    let seed = a.local_addr();
    let b = member("b", vec![seed], "a shared secret key").await;
    let c = member("c", vec![seed], "a shared secret key").await;
    let mut on_a = a.members();
    let mut on_c = c.members();
    until(&mut on_a, Duration::from_secs(10), |m| ids(m) == ["b", "c"]).await;
    until(&mut on_c, Duration::from_secs(10), |m| ids(m) == ["a", "b"]).await;

    // A state change reaches the others.
    b.set_state(MemberState::Leaving).await;
    until(&mut on_a, Duration::from_secs(10), |m| {
        m.iter().any(|m| m.id == "b" && m.state == MemberState::Leaving)
    })
    .await;

    // A crash is detected by probing.
    c.abort();
    let took = until(&mut on_a, Duration::from_secs(10), |m| ids(m) == ["b"]).await;
    eprintln!("crashed member dropped after {took:?}");

    // A clean leave is known at once.
    b.leave().await;
    let took = until(&mut on_a, Duration::from_secs(10), |m| m.is_empty()).await;
    assert!(took < Duration::from_secs(1), "a leave took {took:?}");
}

#[tokio::test]
async fn a_member_with_the_wrong_key_is_never_admitted() {
    let a = member("a", vec![], "the right key, 16+").await;
    let b = member("b", vec![a.local_addr()], "the right key, 16+").await;
    let intruder = member("x", vec![a.local_addr(), b.local_addr()], "a wrong key, 16 b+").await;
    let mut on_a = a.members();
    until(&mut on_a, Duration::from_secs(10), |m| ids(m) == ["b"]).await;
    // The intruder's announces arrive (every second while it is alone) and are dropped.
    let start = Instant::now();
    while a.stats().rejected() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no packet from the intruder arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ids(&a.members().borrow()), ["b"]);
    assert_eq!(ids(&b.members().borrow()), ["a"]);
    assert!(intruder.members().borrow().is_empty());
}

#[test]
fn short_keys_are_refused() {
    assert!(GossipKey::new(b"short".to_vec()).is_err());
}

#[tokio::test]
async fn reports_reach_the_schedulers_at_once_and_again_and_forged_ones_do_not() {
    let mut a = member("a", vec![], "the report test key").await;
    let b = member("b", vec![a.local_addr()], "the report test key").await;
    let mut on_b = b.members();
    until(&mut on_b, Duration::from_secs(10), |m| ids(m) == ["a"]).await;
    let mut reports = a.take_reports().expect("taken once");
    assert!(a.take_reports().is_none());

    b.reporter().publish(b"first".to_vec()).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(1), reports.recv())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"first"[..]));
    // Unchanged, it comes again (the resend keeps the receivers' view fresh).
    let again = tokio::time::timeout(RESEND_EVERY * 3, reports.recv()).await.unwrap();
    assert_eq!(again.as_deref(), Some(&b"first"[..]));
    b.reporter().publish(b"second".to_vec()).unwrap();
    let start = Instant::now();
    loop {
        let got = tokio::time::timeout(Duration::from_secs(1), reports.recv())
            .await
            .unwrap()
            .unwrap();
        if got == b"second" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(1), "the change never came");
    }
    // One packet at most.
    assert!(b.reporter().publish(vec![0; MAX_REPORT_LEN + 1]).is_err());

    // A packet under no key (a forged tag) is dropped unread, not taken for a report.
    let forger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let rejected = a.stats().rejected();
    let mut forged = vec![7u8; 32];
    forged.extend_from_slice(b"forged");
    forger.send_to(&forged, a.local_addr()).unwrap();
    let start = Instant::now();
    while a.stats().rejected() == rejected {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the forged packet never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while let Ok(got) = reports.try_recv() {
        assert_ne!(got, b"forged");
    }
}
