//! Tenant limits that hold for the cluster, not per scheduler.
//!
//! `max_outstanding` bounds a tenant's queued requests. With several schedulers each one
//! holds part of them, so each must know what the others hold: every scheduler reports
//! the tenants it holds most of (by gossip, see `server::dispatcher::cluster`), and this
//! module, the sans-IO state of that exchange, turns the reports received into the most
//! this scheduler may hold of a tenant, its *allowance*. Time comes in as `now`.
//!
//! The rule, for a tenant with limit `L`, `N` schedulers reporting (this one included):
//! - the **room** is `L` minus what the others last reported holding;
//! - what this scheduler admitted since the report the others have all seen is
//!   *invisible* to them; it may keep at most `1 / N` of the room it saw then (rounded up)
//!   invisible. Every report carries, for each other scheduler, the version of that
//!   scheduler's report it has seen, so each one knows what is visible.
//!
//! Why the second part: "admit while the cluster's total is under `L`" alone is exact when
//! the reports are current, but during a burst spread over every scheduler each one admits
//! what arrives before it hears of the others' admissions, and the total passes `L` by the
//! arrivals of one report's delay, however short (measured: +25% with 2 ms reports on
//! loopback). With the invisible part bounded, the schedulers together keep at most the
//! room invisible, whatever the delay; a delay only slows the filling (each step waits for
//! the others to see the last one: one report's round trip). Bounds and the contrast are
//! tested below (`a_burst_…`, `stale_views_…`) and with processes in `tests/cluster.rs`.
//!
//! A scheduler whose reports stop (crashed, cut off) stops counting after
//! [`PEER_FRESH_FOR`]; one the gossip declares gone is forgotten at once. A tenant a report
//! does not list counts as nothing held there: reports list the tenants nearest their
//! limit first, as many as fit one packet.
//!
//! Acknowledgements take at most half of a report. With more schedulers than that holds
//! (about 25 with 14-byte ids), each report carries a turn of them, the next ids after the
//! last turn's, and says so with an entry named [`ACKS_TAKE_TURNS`]; a scheduler missing
//! from such a report keeps the acknowledgement it had (versions only grow, so an older one
//! is still true, only more cautious). A missing scheduler in a report without that entry
//! has seen nothing.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a scheduler's last report counts. Reports go out at least every 100 ms (the
/// gossip's resend) and within milliseconds of a change; four missed resends and the
/// scheduler no longer counts.
pub const PEER_FRESH_FOR: Duration = Duration::from_millis(400);

/// This scheduler's reports kept to know what the others have seen: at a report every
/// 2 ms, the last quarter second. A scheduler not heard acknowledging a kept one counts
/// everything held here as unseen (the cautious side: admissions slow, the limit holds).
const KEPT_REPORTS: usize = 128;

/// Most other schedulers counted at once: a report from one more (a member holding the
/// cluster key, but still) is ignored until one of them stops counting.
pub const MAX_PEERS: usize = 256;

/// The name of the entry that says a report's acknowledgements take turns (see the
/// module's documentation). No scheduler is named so (`scheduler_id` may not be empty).
pub const ACKS_TAKE_TURNS: &str = "";

/// Bytes an acknowledgement costs beyond its scheduler's id, at most (postcard: the id's
/// length and the version as variable-length integers).
pub const ACK_OVERHEAD: usize = 2 + 10;

/// The cluster's load as this scheduler knows it: the others' last reports, and its own
/// recent ones.
#[derive(Debug)]
pub struct ClusterLoad {
    peers: HashMap<String, Peer>,
    /// This scheduler's reports by version, oldest first, with what each listed.
    mine: VecDeque<(u64, HashMap<String, u32>)>,
    version: u64,
    seq: u64,
    /// The acknowledgements the last report carried.
    acks_sent: Vec<(String, u64)>,
    /// When acknowledgements take turns: the id of the last one sent.
    last_turn: Option<String>,
}

#[derive(Debug)]
struct Peer {
    seen: Instant,
    /// Its reports' order: an older report than the last is ignored.
    seq: u64,
    /// The version of its counts (changes only when they do); acknowledged in ours.
    version: u64,
    tenants: HashMap<String, u32>,
    /// The version of this scheduler's report it says it has seen.
    acked: u64,
}

/// A report to send: this scheduler's counts and what it has seen of the others'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub seq: u64,
    pub version: u64,
    pub tenants: Vec<(String, u32)>,
    /// (scheduler, version of its report seen here), sorted.
    pub seen: Vec<(String, u64)>,
    /// `seen` is one turn of them: the next report should follow within the gossip's
    /// resend period, whether anything changes or not, with the next turn.
    pub turns: bool,
}

impl ClusterLoad {
    /// An empty view; `start` orders this life's reports after any earlier life's (a
    /// restart must not look older), e.g. the start time in microseconds.
    pub fn new(start: u64) -> ClusterLoad {
        ClusterLoad {
            peers: HashMap::new(),
            mine: VecDeque::new(),
            version: start,
            seq: start,
            acks_sent: Vec::new(),
            last_turn: None,
        }
    }

    /// Takes `scheduler`'s report (`me`: this scheduler's id, to find its acknowledgement).
    /// The same report again (a resend) says the scheduler is alive and nothing changed.
    /// Returns whether it was taken (not older than the last one).
    #[allow(clippy::too_many_arguments)]
    pub fn receive(
        &mut self,
        me: &str,
        scheduler: &str,
        seq: u64,
        version: u64,
        tenants: impl IntoIterator<Item = (String, u32)>,
        seen: &[(String, u64)],
        now: Instant,
    ) -> bool {
        let acked = seen.iter().find(|(s, _)| s == me).map(|&(_, v)| v);
        let turns = seen.iter().any(|(s, _)| s == ACKS_TAKE_TURNS);
        let full = self.peers.len() >= MAX_PEERS;
        match self.peers.get_mut(scheduler) {
            Some(p) if seq < p.seq => false,
            Some(p) => {
                p.seen = now;
                if seq > p.seq {
                    p.seq = seq;
                    p.acked = match acked {
                        Some(v) => v,
                        None if turns => p.acked,
                        None => 0,
                    };
                    if version != p.version {
                        p.version = version;
                        p.tenants.clear();
                        p.tenants.extend(tenants);
                    }
                }
                true
            }
            None if full => false,
            None => {
                let tenants = tenants.into_iter().collect();
                let peer = Peer {
                    seen: now,
                    seq,
                    version,
                    tenants,
                    acked: acked.unwrap_or(0),
                };
                self.peers.insert(scheduler.to_string(), peer);
                true
            }
        }
    }

    /// Forgets a scheduler at once (the gossip says it left or died).
    pub fn forget(&mut self, scheduler: &str) {
        self.peers.remove(scheduler);
    }

    /// Drops the schedulers whose reports stopped; returns how many still count.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.peers
            .retain(|_, p| now.saturating_duration_since(p.seen) < PEER_FRESH_FOR);
        self.peers.len()
    }

    /// The report to send now, given what this scheduler holds (from [`hottest`]) and the
    /// bytes its acknowledgements may take; `None` when it would tell the others nothing
    /// new (same counts, same acknowledgements, all of them).
    pub fn report(&mut self, tenants: Vec<(String, u32)>, ack_room: usize) -> Option<Outgoing> {
        let changed = match self.mine.back() {
            Some((_, last)) => last.len() != tenants.len() || tenants.iter().any(|(t, n)| last.get(t) != Some(n)),
            None => true,
        };
        if changed {
            self.version += 1;
            if self.mine.len() == KEPT_REPORTS {
                self.mine.pop_front();
            }
            self.mine.push_back((self.version, tenants.iter().cloned().collect()));
        }
        let mut seen: Vec<(String, u64)> = self.peers.iter().map(|(s, p)| (s.clone(), p.version)).collect();
        seen.sort();
        let turns = self.ack_bytes() > ack_room;
        if turns {
            seen = self.next_turn(seen, ack_room);
        } else {
            self.last_turn = None;
        }
        if !changed && !turns && seen == self.acks_sent {
            return None;
        }
        self.acks_sent.clone_from(&seen);
        self.seq += 1;
        Some(Outgoing {
            seq: self.seq,
            version: self.version,
            tenants,
            seen,
            turns,
        })
    }

    /// The acknowledgements after the last turn's (in id order, wrapping around), as many
    /// as `room` bytes hold and at least one, with the entry that says they take turns.
    fn next_turn(&mut self, all: Vec<(String, u64)>, room: usize) -> Vec<(String, u64)> {
        let start = self
            .last_turn
            .as_ref()
            .map_or(0, |last| all.partition_point(|(id, _)| id <= last));
        let mut left = room.saturating_sub(ACKS_TAKE_TURNS.len() + ACK_OVERHEAD);
        let mut turn = vec![(ACKS_TAKE_TURNS.to_string(), 0)];
        for (id, version) in all.iter().cycle().skip(start).take(all.len()) {
            let cost = id.len() + ACK_OVERHEAD;
            if cost > left && turn.len() > 1 {
                break;
            }
            left = left.saturating_sub(cost);
            turn.push((id.clone(), *version));
        }
        self.last_turn = turn.last().map(|(id, _)| id.clone());
        turn.sort();
        turn
    }

    /// The version of this scheduler's counts, as its last report gave it.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The other schedulers that count at `now`.
    pub fn peers(&self, now: Instant) -> usize {
        self.live(now).count()
    }

    /// The other schedulers that count at `now`, by id, sorted.
    pub fn peer_ids(&self, now: Instant) -> Vec<String> {
        let mut ids: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.seen) < PEER_FRESH_FOR)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Bytes the acknowledgements of a report take at most: each peer's id, its length and
    /// a version (variable-length integers).
    pub fn ack_bytes(&self) -> usize {
        self.peers.keys().map(|id| id.len() + ACK_OVERHEAD).sum()
    }

    /// Every tenant the other schedulers that count hold some of, with what they hold.
    pub fn all_held_elsewhere(&self, now: Instant) -> std::collections::BTreeMap<String, u64> {
        let mut held = std::collections::BTreeMap::new();
        for p in self.live(now) {
            for (tenant, &n) in &p.tenants {
                *held.entry(tenant.clone()).or_insert(0) += u64::from(n);
            }
        }
        held
    }

    /// What the other schedulers that count hold of `tenant`.
    pub fn held_elsewhere(&self, tenant: &str, now: Instant) -> u64 {
        self.live(now)
            .map(|p| u64::from(p.tenants.get(tenant).copied().unwrap_or(0)))
            .sum()
    }

    /// The most of `tenant` (limit `limit`) this scheduler may hold at `now`; `None` when
    /// no other scheduler counts (the limit alone applies). See the module's rule.
    pub fn allowance(&self, tenant: &str, limit: u32, now: Instant) -> Option<u32> {
        let mut n = 1u64;
        let mut elsewhere = 0u64;
        let mut acked = u64::MAX;
        for p in self.live(now) {
            n += 1;
            elsewhere += u64::from(p.tenants.get(tenant).copied().unwrap_or(0));
            acked = acked.min(p.acked);
        }
        if n == 1 {
            return None;
        }
        // What every other scheduler has seen this one hold.
        let visible = self
            .mine
            .iter()
            .rev()
            .find(|(v, _)| *v <= acked)
            .filter(|(v, _)| *v == acked)
            .map_or(0, |(_, counts)| u64::from(counts.get(tenant).copied().unwrap_or(0)));
        let room = u64::from(limit).saturating_sub(elsewhere);
        let step = room.saturating_sub(visible).div_ceil(n);
        Some(u32::try_from(room.min(visible + step)).unwrap_or(u32::MAX))
    }

    fn live(&self, now: Instant) -> impl Iterator<Item = &Peer> {
        self.peers
            .values()
            .filter(move |p| now.saturating_duration_since(p.seen) < PEER_FRESH_FOR)
    }
}

/// The tenants a report lists, nearest their limit first, as many as `budget` bytes of
/// names allow (each entry costs its name plus `ENTRY_OVERHEAD`). `held` gives each tenant
/// with something queued: (name, queued, limit). A tenant left out counts as nothing held
/// here for the others: the limit can be passed by what those tenants hold, which is less,
/// relative to their limits, than what any listed tenant holds.
pub fn hottest<'a>(held: impl Iterator<Item = (&'a str, u32, u32)>, budget: usize) -> Vec<(String, u32)> {
    let mut hot: Vec<(&str, u32, u32)> = held.filter(|&(_, queued, _)| queued > 0).collect();
    // Nearest the limit first: queued / limit, compared without division.
    let nearest = |a: &(&str, u32, u32), b: &(&str, u32, u32)| {
        (u64::from(b.1) * u64::from(a.2)).cmp(&(u64::from(a.1) * u64::from(b.2)))
    };
    // No more can fit than the budget holds of the shortest entries: select those in linear
    // time, then sort only them.
    let most = budget / ENTRY_OVERHEAD + 1;
    if hot.len() > most {
        hot.select_nth_unstable_by(most, nearest);
        hot.truncate(most);
    }
    hot.sort_unstable_by(nearest);
    let mut left = budget;
    let mut out = Vec::new();
    for (name, queued, _) in hot {
        let cost = name.len() + ENTRY_OVERHEAD;
        if cost > left {
            break;
        }
        left -= cost;
        out.push((name.to_string(), queued));
    }
    out
}

/// Bytes an entry of a report costs beyond its name, at most (postcard: the name's length
/// and the count as variable-length integers).
pub const ENTRY_OVERHEAD: usize = 2 + 5;

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        // A fixed base: the tests only compare instants derived from it.
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *BASE.get_or_init(Instant::now) + Duration::from_millis(ms)
    }

    /// `from`'s report number `seq` (its version too), having seen `acked` of "me".
    fn report(view: &mut ClusterLoad, from: &str, seq: u64, tenants: &[(&str, u32)], acked: u64, now: Instant) {
        let tenants = tenants.iter().map(|&(t, n)| (t.to_string(), n));
        view.receive("me", from, seq, seq, tenants, &[("me".to_string(), acked)], now);
    }

    #[test]
    fn alone_the_limit_alone_applies() {
        let view = ClusterLoad::new(0);
        assert_eq!(view.allowance("a", 100, at(0)), None);
    }

    #[test]
    fn what_the_others_hold_is_theirs_and_a_step_waits_to_be_seen() {
        let mut view = ClusterLoad::new(0);
        report(&mut view, "s2", 1, &[], 0, at(0));
        report(&mut view, "s3", 1, &[("b", 90)], 0, at(0));
        // Nothing of this scheduler seen yet: a third of the room may go unseen.
        assert_eq!(view.allowance("a", 100, at(1)), Some(34));
        assert_eq!(view.allowance("b", 100, at(1)), Some(4));
        // It reports holding 34; once both have seen that, the next step.
        let sent = view.report(vec![("a".into(), 34)], usize::MAX).expect("news");
        assert_eq!(sent.seen, vec![("s2".into(), 1), ("s3".into(), 1)]);
        assert!(view.report(vec![("a".into(), 34)], usize::MAX).is_none(), "nothing new");
        report(&mut view, "s2", 2, &[], sent.version, at(2));
        assert_eq!(view.allowance("a", 100, at(3)), Some(34), "s3 has not seen it");
        report(&mut view, "s3", 2, &[("b", 90)], sent.version, at(3));
        assert_eq!(view.allowance("a", 100, at(4)), Some(34 + 22));
        // Over the limit together: nothing.
        report(&mut view, "s2", 3, &[("b", 30)], sent.version, at(5));
        assert_eq!(view.held_elsewhere("b", at(5)), 120);
        assert_eq!(view.allowance("b", 100, at(6)), Some(0));
    }

    #[test]
    fn an_old_report_is_ignored_and_a_silent_peer_stops_counting() {
        let mut view = ClusterLoad::new(0);
        report(&mut view, "s2", 5, &[("a", 80)], 0, at(0));
        assert!(!view.receive("me", "s2", 4, 4, [("a".to_string(), 0)], &[], at(1)));
        assert_eq!(view.held_elsewhere("a", at(1)), 80);
        let just_before = at(0) + PEER_FRESH_FOR - Duration::from_millis(1);
        assert_eq!(view.allowance("a", 100, just_before), Some(10));
        // A resend keeps it counting.
        report(&mut view, "s2", 5, &[("a", 80)], 0, just_before);
        assert_eq!(view.allowance("a", 100, at(0) + PEER_FRESH_FOR), Some(10));
        assert_eq!(view.expire(just_before + PEER_FRESH_FOR), 0);
        report(&mut view, "s2", 6, &[("a", 80)], 0, at(900));
        view.forget("s2");
        assert_eq!(view.allowance("a", 100, at(901)), None);
    }

    #[test]
    fn no_more_than_max_peers_are_counted() {
        let mut view = ClusterLoad::new(0);
        for i in 0..MAX_PEERS {
            report(&mut view, &format!("s{i}"), 1, &[("a", 0)], 0, at(0));
        }
        assert!(!view.receive("me", "one-more", 1, 1, [("a".to_string(), 50)], &[], at(0)));
        assert_eq!(view.peers(at(0)), MAX_PEERS);
        assert_eq!(view.held_elsewhere("a", at(0)), 0);
        view.forget("s0");
        assert!(view.receive("me", "one-more", 1, 1, [("a".to_string(), 50)], &[], at(0)));
    }

    #[test]
    fn with_too_many_schedulers_for_one_report_acknowledgements_take_turns() {
        let mut view = ClusterLoad::new(0);
        let ids: Vec<String> = (0..MAX_PEERS).map(|i| format!("scheduler-eu-west-1-{i:03}")).collect();
        for (i, id) in ids.iter().enumerate() {
            view.receive("me", id, 1, 100 + i as u64, [], &[], at(0));
        }
        let room = 600;
        let mut acked = std::collections::BTreeMap::new();
        let mut turns = 0;
        while acked.len() < ids.len() {
            let sent = view.report(vec![], room).expect("every turn is sent");
            assert!(sent.turns);
            assert_eq!(sent.seen[0], (ACKS_TAKE_TURNS.to_string(), 0), "says so, first");
            let bytes: usize = sent.seen.iter().map(|(id, _)| id.len() + ACK_OVERHEAD).sum();
            assert!(bytes <= room, "{bytes} bytes");
            for (id, version) in &sent.seen[1..] {
                assert_eq!(acked.insert(id.clone(), *version), None, "{id} again before the others");
            }
            turns += 1;
            assert!(turns <= ids.len(), "every scheduler is acknowledged in turn");
        }
        let expected: std::collections::BTreeMap<String, u64> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), 100 + i as u64))
            .collect();
        assert_eq!(acked, expected);
        assert_eq!(
            turns,
            ids.len()
                .div_ceil((room - ACK_OVERHEAD) / (ids[0].len() + ACK_OVERHEAD))
        );
        // Room for all of them again: one report with every acknowledgement, and no turns.
        let all = view.report(vec![], usize::MAX).expect("news: all of them");
        assert!(!all.turns);
        assert_eq!(all.seen.len(), ids.len());
        assert!(view.report(vec![], usize::MAX).is_none(), "nothing new");
    }

    #[test]
    fn a_scheduler_left_out_of_a_turn_keeps_its_acknowledgement_and_not_otherwise() {
        let mut view = ClusterLoad::new(0);
        let (turn, me) = ((ACKS_TAKE_TURNS.to_string(), 0), ("me".to_string(), 7));
        view.receive("me", "s2", 1, 1, [], std::slice::from_ref(&me), at(0));
        let version = view.report(vec![("a".into(), 10)], usize::MAX).unwrap().version;
        let acked = |view: &mut ClusterLoad, seq: u64, seen: &[(String, u64)]| {
            view.receive("me", "s2", seq, 1, [], seen, at(1));
            view.allowance("a", 100, at(1)).unwrap()
        };
        let me_now = ("me".to_string(), version);
        // Seen: 10 visible, then half of the other 90 may go unseen.
        assert_eq!(acked(&mut view, 2, std::slice::from_ref(&me_now)), 10 + 45);
        assert_eq!(acked(&mut view, 3, &[turn.clone(), ("s9".into(), 1)]), 55, "kept");
        assert_eq!(acked(&mut view, 4, &[("s9".into(), 1)]), 50, "nothing seen");
        assert_eq!(acked(&mut view, 5, &[turn, me_now]), 55);
    }

    #[test]
    fn a_restarted_scheduler_reports_after_its_earlier_life() {
        let mut old = ClusterLoad::new(1_000);
        let mut new = ClusterLoad::new(2_000);
        let (a, b) = (
            old.report(vec![], usize::MAX).unwrap(),
            new.report(vec![], usize::MAX).unwrap(),
        );
        assert!(b.seq > a.seq && b.version > a.version);
    }

    #[test]
    fn reports_list_the_tenants_nearest_their_limit_within_the_budget() {
        let held = [
            ("cold", 2, 100),
            ("half", 50, 100),
            ("full", 10, 10),
            ("tiny", 1, 1000),
            ("none", 0, 5),
        ];
        let listed = hottest(held.iter().copied(), 4 + ENTRY_OVERHEAD + 4 + ENTRY_OVERHEAD);
        assert_eq!(listed, vec![("full".to_string(), 10), ("half".to_string(), 50)]);
        let all = hottest(held.iter().copied(), 1_000);
        let names: Vec<&str> = all.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            names,
            ["full", "half", "cold", "tiny"],
            "nothing queued, nothing listed"
        );
    }

    #[test]
    fn among_many_tenants_a_report_lists_the_nearest_their_limit_in_order() {
        let names: Vec<String> = (0..10_000).map(|i| format!("t{i}")).collect();
        // Tenant i holds i of 10 000, except every tenth, whose limit is 5 000 (twice as near).
        let held = names.iter().enumerate().map(|(i, n)| {
            let limit = if i % 10 == 0 { 5_000 } else { 10_000 };
            (n.as_str(), i as u32, limit)
        });
        let listed = hottest(held, 1_200);
        assert!(listed.len() > 50, "{}", listed.len());
        assert_eq!(listed[0], ("t9990".to_string(), 9_990));
        let rank = |(t, n): &(String, u32)| {
            let limit = if t[1..].parse::<u32>().unwrap().is_multiple_of(10) {
                5_000.0
            } else {
                10_000.0
            };
            f64::from(*n) / limit
        };
        assert!(listed.windows(2).all(|w| rank(&w[0]) >= rank(&w[1])), "in order");
        // Nothing left out is nearer its limit than the last one listed.
        let last = rank(listed.last().unwrap());
        assert!(last >= 0.99, "{last}");
    }

    /// Several schedulers admitting one tenant's burst, each knowing the others only
    /// through reports that arrive `lag` arrivals late: one whenever a report has news,
    /// and every scheduler's again every 50 arrivals (the resend). With `plain`, the
    /// schedulers admit while the total they know of is under the limit (the rule
    /// without bounded unseen admissions). Returns what they hold in all.
    fn burst(n: usize, limit: u32, arrivals: usize, lag: usize, plain: bool, spread: impl Fn(usize) -> usize) -> u64 {
        let ids: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let mut views: Vec<ClusterLoad> = (0..n).map(|_| ClusterLoad::new(0)).collect();
        let mut held = vec![0u32; n];
        let mut last: Vec<Option<Outgoing>> = vec![None; n];
        let mut sent: Vec<(usize, usize, Outgoing)> = Vec::new(); // (due arrival, from, report)
        let now = at(0);
        let publish = |s: usize,
                       k: usize,
                       views: &mut Vec<ClusterLoad>,
                       held: &[u32],
                       sent: &mut Vec<_>,
                       last: &mut Vec<Option<Outgoing>>| {
            let tenants = if held[s] > 0 {
                vec![("t".to_string(), held[s])]
            } else {
                vec![]
            };
            if let Some(r) = views[s].report(tenants, usize::MAX) {
                sent.push((k + lag, s, r.clone()));
                last[s] = Some(r);
            }
        };
        for s in 0..n {
            publish(s, 0, &mut views, &held, &mut sent, &mut last);
        }
        for k in 0..arrivals {
            if k % 50 == 0 {
                for (s, r) in last.iter().enumerate() {
                    if let Some(r) = r {
                        sent.push((k + lag, s, r.clone()));
                    }
                }
            }
            let due: Vec<(usize, Outgoing)> = sent
                .iter()
                .filter(|(d, ..)| *d == k)
                .map(|(_, f, r)| (*f, r.clone()))
                .collect();
            sent.retain(|(d, ..)| *d > k);
            for (from, r) in due {
                for i in (0..n).filter(|&i| i != from) {
                    views[i].receive(&ids[i], &ids[from], r.seq, r.version, r.tenants.clone(), &r.seen, now);
                }
            }
            // The frontend tries each scheduler once, starting with the one it spreads to.
            let first = spread(k);
            for attempt in 0..n {
                let s = (first + attempt) % n;
                let allowance = if plain {
                    u32::try_from(u64::from(limit).saturating_sub(views[s].held_elsewhere("t", now))).unwrap()
                } else {
                    views[s].allowance("t", limit, now).unwrap_or(limit)
                };
                if held[s] < allowance {
                    held[s] += 1;
                    break;
                }
            }
            for s in 0..n {
                publish(s, k, &mut views, &held, &mut sent, &mut last);
            }
        }
        held.iter().map(|&h| u64::from(h)).sum()
    }

    #[test]
    fn a_burst_spread_over_every_scheduler_stays_within_the_limit() {
        for n in 1..=4 {
            for lag in [0, 5, 20, 100, 400] {
                let total = burst(n, 1_000, 4_000, lag, false, |k| k % n);
                assert!(
                    (950..=1_000 + n as u64 - 1).contains(&total),
                    "{n} schedulers, lag {lag}: {total}"
                );
            }
        }
    }

    #[test]
    fn a_burst_through_one_scheduler_still_fills_the_limit() {
        for n in 2..=4 {
            for lag in [0, 5, 100] {
                let total = burst(n, 1_000, 4_000, lag, false, |_| 0);
                assert!(
                    (950..=1_000 + n as u64 - 1).contains(&total),
                    "{n} schedulers, lag {lag}: {total}"
                );
            }
        }
    }

    #[test]
    fn stale_views_overshoot_by_what_was_in_flight_without_the_bound() {
        for lag in [100, 400] {
            let plain = burst(4, 1_000, 4_000, lag, true, |k| k % 4);
            assert!(plain > 1_000 + lag as u64 / 2, "lag {lag}: {plain}");
            let bounded = burst(4, 1_000, 4_000, lag, false, |k| k % 4);
            assert!(bounded <= 1_000, "lag {lag}: {bounded}");
        }
    }
}
