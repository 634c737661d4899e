//! The operators' dump of the queue tree: what it shows and that it stays within bounds.

use super::*;

#[test]
fn the_dump_shows_each_node_its_oldest_request_and_each_waiting_request_with_its_path() {
    let mut f = Fixture::new(QueueConfig::default());
    let a1 = f.push(req("acme", &["ann"], "a1"));
    f.advance(Duration::from_secs(2));
    f.push_with_deadline(
        in_component(req("acme", &[], "a2"), "store-gateway"),
        Duration::from_secs(10),
    );
    f.push(req("bolt", &["bob", "dash"], "b1"));
    f.advance(Duration::from_secs(1));
    let e = f.q.explain(f.now, 100, 100);
    assert_eq!(e.queued, 3);
    assert!(!e.truncated);
    let index = |p: &[&str]| {
        (0..e.nodes.len())
            .find(|&i| e.path(i) == p)
            .unwrap_or_else(|| panic!("no {p:?} in {:?}", e.nodes))
    };
    let node = |p: &[&str]| &e.nodes[index(p)];
    // acme's root without a component holds ann's request below it.
    let root = node(&["", "acme"]);
    assert_eq!((root.queued, root.local), (1, 0));
    let policy = root.tenant.expect("a root shows its tenant's policy");
    assert_eq!((policy.weight, policy.priority, policy.shard_size), (1, 0, None));
    let ann = node(&["", "acme", "ann"]);
    assert_eq!(
        (ann.queued, ann.local, ann.oldest),
        (1, 1, Some(Duration::from_secs(3)))
    );
    assert!(ann.tenant.is_none());
    assert_eq!(node(&["store-gateway", "acme"]).oldest, Some(Duration::from_secs(1)));
    assert_eq!(node(&["", "bolt", "bob", "dash"]).queued, 1);
    // The requests, with path, age and what is left of their deadline.
    let r = e.requests.iter().find(|r| r.key == a1).unwrap();
    assert_eq!(
        (e.path(r.node), r.age, r.deadline_in),
        (vec!["", "acme", "ann"], Duration::from_secs(3), None)
    );
    let a2 = e
        .requests
        .iter()
        .find(|r| r.node == index(&["store-gateway", "acme"]))
        .unwrap();
    assert_eq!(a2.deadline_in, Some(Duration::from_secs(9)));
    assert_eq!(e.requests.len(), 3);
}

#[test]
fn the_dump_stops_at_its_bounds_and_says_so() {
    let mut f = Fixture::new(QueueConfig {
        max_outstanding_per_tenant: 100_000,
        ..QueueConfig::default()
    });
    for t in 0..200 {
        for a in 0..5 {
            f.push(req(&format!("t{t}"), &[&format!("a{a}")], ""));
        }
    }
    let e = f.q.explain(f.now, 50, 20);
    assert_eq!(e.queued, 1000);
    assert!(e.truncated);
    assert!(e.nodes.len() <= 50, "{}", e.nodes.len());
    assert_eq!(e.requests.len(), 20);
    // Everything fits in larger bounds.
    let e = f.q.explain(f.now, 10_000, 10_000);
    assert!(!e.truncated);
    assert_eq!((e.nodes.len(), e.requests.len()), (200 * 6, 1000));
}
