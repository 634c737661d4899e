//! Several schedulers on loopback that find each other by gossip, and clients that follow
//! the live set: joining, a crash, a restart, a graceful leave, a wrong key, and
//! `max_used_instances`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sluice::server::Status;
use sluice_client::gossip::{GossipConfig, GossipKey, MemberRole, MemberState};
use sluice_client::*;

const KEY: &str = "membership-test-key";
/// Gossip convergence and failure detection are slower than one protocol step: bound
/// them more loosely than [`WAIT`] (the target for detection is 5 s).
const CONVERGE: Duration = Duration::from_secs(15);

async fn gossiping(dir: &Arc<tempfile::TempDir>, id: &str, seeds: &[SocketAddr], key: &str) -> TestServer {
    let (quic, gossip): (SocketAddr, SocketAddr) = ("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap());
    let (id, seeds, key) = (id.to_string(), seeds.to_vec(), key.to_string());
    start_in(dir.clone(), move |s| {
        s.scheduler_id = Some(id);
        s.listen = Some(quic);
        s.gossip_listen = Some(gossip);
        s.gossip_seeds = Some(seeds);
        s.gossip_key = Some(key);
    })
    .await
}

fn gossip_addr(t: &TestServer) -> SocketAddr {
    t.server.gossip_addr().expect("gossip on")
}

/// The ids of the schedulers `s` sees as active.
fn active_schedulers(s: &Status) -> Vec<String> {
    let mut ids: Vec<String> = s
        .gossip
        .as_ref()
        .map(|g| {
            g.members
                .iter()
                .filter(|m| m.role == MemberRole::Scheduler && m.state == MemberState::Active)
                .map(|m| m.id.clone())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

async fn until<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < CONVERGE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn client_gossip(seed: SocketAddr) -> GossipConfig {
    GossipConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        vec![seed],
        GossipKey::new(KEY.as_bytes().to_vec()).unwrap(),
    )
}

struct Slow;

impl Handler for Slow {
    async fn handle(&self, request: Request) -> Result<Response, HandlerError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(Response::ok(request.payload))
    }
}

/// `sluice serve` as a child process in the cluster (so that SIGKILL is a real crash: no
/// QUIC close, no gossip leave), at the given addresses.
async fn gossiping_process(
    dir: &Arc<tempfile::TempDir>,
    id: &str,
    seed: SocketAddr,
    quic: &str,
    gossip: &str,
) -> Running {
    let certs = dir.path().join("certs");
    let seed = seed.to_string();
    spawn_scheduler(
        dir.path(),
        &[
            "--scheduler-id",
            id,
            "--data-dir",
            certs.to_str().unwrap(),
            "--listen",
            quic,
            "--gossip-listen",
            gossip,
            "--gossip-seeds",
            &seed,
            "--gossip-key",
            KEY,
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_follow_the_live_schedulers_through_a_crash_a_restart_and_a_leave() {
    let dir = cluster_dir();
    let s1 = gossiping(&dir, "s1", &[], KEY).await;
    let seed = gossip_addr(&s1);
    let s2 = gossiping_process(&dir, "s2", seed, "127.0.0.1:0", "127.0.0.1:0").await;
    let s3 = gossiping(&dir, "s3", &[seed], KEY).await;
    for (t, others) in [(&s1, ["s2", "s3"]), (&s3, ["s1", "s2"])] {
        until("every scheduler to see the other two", async || {
            (active_schedulers(&t.server.status().await.unwrap()) == others).then_some(())
        })
        .await;
    }

    let mut fc = FrontendConfig::new("frontend-1", s1.certs.frontend.clone(), vec![]);
    fc = fc.with_gossip(client_gossip(seed));
    // Far above the detection target: only the gossip can drop a killed scheduler in time.
    fc.client.idle_timeout = Duration::from_secs(30);
    let frontend = Frontend::connect(fc).await.unwrap();
    let mut qc = QuerierConfig::new("querier-1", s1.certs.querier.clone(), vec![]);
    qc = qc.with_gossip(client_gossip(seed));
    qc.client.idle_timeout = Duration::from_secs(30);
    let querier = Querier::start(qc, Slow).unwrap();
    let all = {
        let mut v = vec![s1.server.quic_addr(), s2.quic, s3.server.quic_addr()];
        v.sort();
        v
    };
    until("the frontend to use all three", async || {
        (frontend.scheduler_addresses() == all).then_some(())
    })
    .await;
    until("the querier to serve all three", async || {
        (querier.schedulers().iter().map(|s| s.0).collect::<Vec<_>>() == all).then_some(())
    })
    .await;
    // And the schedulers see the clients as members too.
    until("s1 to see both clients", async || {
        let s = s1.server.status().await.unwrap();
        let roles: Vec<MemberRole> = s.gossip.unwrap().members.iter().map(|m| m.role).collect();
        (roles.contains(&MemberRole::Frontend) && roles.contains(&MemberRole::Querier)).then_some(())
    })
    .await;

    // Load across the crash: every query is answered, some after a re-enqueue.
    let mut handles = Vec::new();
    for i in 0..90 {
        let request = QueryRequest::new(format!("tenant-{}", i % 3), format!("q{i}"));
        handles.push(frontend.submit(request).await.unwrap());
    }
    let (s2_quic, s2_gossip) = (s2.quic, s2.gossip.expect("printed"));
    signal(&s2.child, "KILL").await;
    let (_, detected) = until("the frontend to drop the killed scheduler", async || {
        (!frontend.scheduler_addresses().contains(&s2_quic)).then_some(())
    })
    .await;
    eprintln!("killed scheduler dropped by the frontend after {detected:?}");
    assert!(detected < Duration::from_secs(5), "detection took {detected:?}");
    for (i, h) in handles.into_iter().enumerate() {
        let response = tokio::time::timeout(CONVERGE, h.response())
            .await
            .expect("answered in time")
            .unwrap_or_else(|e| panic!("query {i} lost: {e}"));
        assert_eq!(response.body.collect().await.unwrap(), format!("q{i}").as_bytes());
    }
    until("the querier to stop serving it", async || {
        (!querier.schedulers().iter().any(|s| s.0 == s2_quic)).then_some(())
    })
    .await;

    // Restarted at the same addresses: it wins over its old identity and is used again.
    let s2 = gossiping_process(&dir, "s2", seed, &s2_quic.to_string(), &s2_gossip.to_string()).await;
    until("the frontend to use the restarted scheduler", async || {
        (frontend.scheduler_addresses() == all).then_some(())
    })
    .await;
    until("the querier to serve it again", async || {
        (querier.schedulers().iter().map(|s| s.0).collect::<Vec<_>>() == all).then_some(())
    })
    .await;
    let answered = frontend.submit(QueryRequest::new("tenant-0", "after")).await.unwrap();
    assert_eq!(
        answered.response().await.unwrap().body.collect().await.unwrap(),
        b"after"
    );

    // A graceful shutdown leaves the gossip: the others know at once, not by probing.
    let s3_quic = s3.server.quic_addr();
    s3.server.shutdown().await;
    let (_, gone) = until("s1 to forget s3", async || {
        (active_schedulers(&s1.server.status().await.unwrap()) == ["s2"]).then_some(())
    })
    .await;
    assert!(gone < Duration::from_secs(2), "a leave took {gone:?}");
    until("the frontend to stop using s3", async || {
        (!frontend.scheduler_addresses().contains(&s3_quic)).then_some(())
    })
    .await;

    frontend.close().await;
    querier.shutdown().await;
    signal(&s2.child, "TERM").await;
    s1.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_with_the_wrong_key_is_never_admitted() {
    let dir = cluster_dir();
    let good = gossiping(&dir, "good", &[], KEY).await;
    let peer = gossiping(&dir, "peer", &[gossip_addr(&good)], KEY).await;
    let bad = gossiping(&dir, "bad", &[gossip_addr(&good)], "not-the-cluster-key").await;
    until("good to see peer", async || {
        (active_schedulers(&good.server.status().await.unwrap()) == ["peer"]).then_some(())
    })
    .await;
    // The intruder announces itself every second; each packet is dropped unread.
    until("three packets of the intruder to be rejected", async || {
        let g = good.server.status().await.unwrap().gossip.unwrap();
        (g.rejected >= 3).then_some(())
    })
    .await;
    assert_eq!(active_schedulers(&good.server.status().await.unwrap()), ["peer"]);
    assert_eq!(active_schedulers(&peer.server.status().await.unwrap()), ["good"]);
    assert!(bad.server.status().await.unwrap().gossip.unwrap().members.is_empty());
    let (_, status) = get(good.server.admin_addr(), "/status").await;
    assert!(
        status.contains("\"id\":\"peer\"") && !status.contains("\"id\":\"bad\""),
        "{status}"
    );
    let (_, page) = get(good.server.admin_addr(), "/").await;
    assert!(page.contains("<h2>Gossip</h2>") && page.contains("peer"), "{page}");
    let (_, metrics) = get(good.server.admin_addr(), "/metrics").await;
    assert!(
        metrics.contains("sluice_query_scheduler_gossip_packets_total{outcome=\"rejected\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontends_use_the_first_max_used_instances_and_queriers_keep_one_worker_on_the_rest() {
    let dir = cluster_dir();
    let a = gossiping(&dir, "a", &[], KEY).await;
    let seed = gossip_addr(&a);
    let b = gossiping(&dir, "b", &[seed], KEY).await;
    let c = gossiping(&dir, "c", &[seed], KEY).await;
    // The clients join once the seed knows every scheduler, so that their first view has
    // all three: a querier keeps the workers it gave a scheduler that later drops out of
    // use, so a partial first view (c before a or b) would legitimately give c four.
    a.status_until("a to see b and c", |s| active_schedulers(s).len() == 2)
        .await;
    let mut fc = FrontendConfig::new("frontend-1", a.certs.frontend.clone(), vec![]);
    fc = fc.with_gossip(client_gossip(seed));
    fc.client.max_used_instances = 2;
    let frontend = Frontend::connect(fc).await.unwrap();
    let mut first_two = vec![a.server.quic_addr(), b.server.quic_addr()];
    first_two.sort();
    until("the frontend to use a and b", async || {
        (frontend.scheduler_addresses() == first_two).then_some(())
    })
    .await;
    let mut qc = QuerierConfig::new("querier-1", a.certs.querier.clone(), vec![]);
    qc = qc.with_gossip(client_gossip(seed));
    qc.client.max_used_instances = 2;
    let querier = Querier::start(qc, Slow).unwrap();
    let mut want = vec![
        (a.server.quic_addr(), 4),
        (b.server.quic_addr(), 4),
        (c.server.quic_addr(), 1),
    ];
    want.sort();
    until("the querier to give c one worker", async || {
        (querier.schedulers() == want).then_some(())
    })
    .await;
    c.status_until("c to have the querier's single worker", |s| s.workers.len() == 1)
        .await;
    frontend.close().await;
    querier.shutdown().await;
}

#[test]
fn gossip_settings_are_checked() {
    use sluice::config::Settings;
    let check = |s: Settings, key: &str| {
        let err = s.resolve().unwrap_err().to_string();
        assert!(err.starts_with(key), "{err}");
    };
    check(
        Settings {
            gossip_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Settings::default()
        },
        "gossip_key: required",
    );
    check(
        Settings {
            gossip_listen: Some("127.0.0.1:0".parse().unwrap()),
            gossip_key: Some("short".into()),
            ..Settings::default()
        },
        "gossip_key: must be at least 16 bytes",
    );
    check(
        Settings {
            gossip_seeds: Some(vec!["127.0.0.1:1".parse().unwrap()]),
            ..Settings::default()
        },
        "gossip_seeds: has no effect without gossip_listen",
    );
    check(
        Settings {
            listen: Some("0.0.0.0:9095".parse().unwrap()),
            gossip_listen: Some("127.0.0.1:0".parse().unwrap()),
            gossip_key: Some(KEY.into()),
            ..Settings::default()
        },
        "advertise:",
    );
}
