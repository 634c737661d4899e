//! The gossip runtime: one task owns the UDP socket, the timer queue and the foca
//! instance; it checks every packet's tag, sends and takes reports, and publishes the
//! membership.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use foca::{AccumulatingRuntime, Foca, PostcardCodec, Timer};
use rand::rngs::StdRng;
use ring::hmac;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Command, GossipConfig, GossipKey, GossipStats, Member, MemberRole, MemberState, RESEND_EVERY, TAG_LEN};

type Runtime = AccumulatingRuntime<Member>;

pub(super) struct Agent {
    foca: Foca<Member, PostcardCodec, StdRng, foca::NoCustomBroadcast>,
    runtime: Runtime,
    socket: UdpSocket,
    key: hmac::Key,
    /// Tags reports (derived from the cluster key; see [`report_key`]).
    report_key: hmac::Key,
    /// This member's report, as last published.
    report: watch::Receiver<Option<Arc<[u8]>>>,
    reports: mpsc::Sender<Vec<u8>>,
    seeds: Vec<SocketAddr>,
    /// Timers by (due, order of scheduling): equal deadlines fire in submission order.
    timers: BinaryHeap<Reverse<(Instant, u64, TimerSlot)>>,
    timer_seq: u64,
    publish: watch::Sender<Vec<Member>>,
    stats: Arc<GossipStats>,
}

/// A foca timer in the heap (ordered by the heap key only).
struct TimerSlot(Timer<Member>);

impl PartialEq for TimerSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for TimerSlot {}
impl PartialOrd for TimerSlot {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerSlot {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

/// The key reports are tagged with: the cluster key's tag over a fixed label, so that a
/// report is never taken for a membership packet nor the other way round.
fn report_key(key: &GossipKey) -> hmac::Key {
    let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key.0), b"sluice gossip reports");
    hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
}

/// A seed as foca sees it before it answers: only its address matters.
fn placeholder(addr: SocketAddr) -> Member {
    Member {
        id: String::new(),
        role: MemberRole::Scheduler,
        gossip: addr,
        service: None,
        state: MemberState::Active,
        generation: 0,
    }
}

impl Agent {
    pub(super) fn new(
        foca: Foca<Member, PostcardCodec, StdRng, foca::NoCustomBroadcast>,
        socket: UdpSocket,
        config: &GossipConfig,
        report: watch::Receiver<Option<Arc<[u8]>>>,
        reports: mpsc::Sender<Vec<u8>>,
        publish: watch::Sender<Vec<Member>>,
        stats: Arc<GossipStats>,
    ) -> Agent {
        Agent {
            foca,
            runtime: AccumulatingRuntime::new(),
            socket,
            key: hmac::Key::new(hmac::HMAC_SHA256, &config.key.0),
            report_key: report_key(&config.key),
            report,
            reports,
            seeds: config.seeds.clone(),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            publish,
            stats,
        }
    }

    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut announce = tokio::time::interval(Duration::from_secs(1));
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        let mut resend = tokio::time::interval(RESEND_EVERY);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => self.receive(&buf[..n], from),
                    Err(e) => debug!(error = %e, "gossip receive failed"),
                },
                _ = sleep_until(next_timer) => {
                    let now = Instant::now();
                    while let Some(Reverse((at, _, _))) = self.timers.peek() {
                        if *at > now {
                            break;
                        }
                        let Reverse((_, _, TimerSlot(timer))) = self.timers.pop().expect("peeked");
                        if let Err(e) = self.foca.handle_timer(timer, &mut self.runtime) {
                            debug!(error = %e, "gossip timer");
                        }
                    }
                }
                _ = announce.tick() => {
                    // Join (or rejoin after a partition) through the seeds: every second while
                    // alone, every 30 s otherwise.
                    if self.foca.num_members() == 0 || ticks.is_multiple_of(30) {
                        for &seed in &self.seeds {
                            if seed != self.foca.identity().gossip
                                && let Err(e) = self.foca.announce(placeholder(seed), &mut self.runtime)
                            {
                                debug!(%seed, error = %e, "gossip announce");
                            }
                        }
                    }
                    ticks += 1;
                }
                Ok(()) = self.report.changed() => self.send_report().await,
                _ = resend.tick() => self.send_report().await,
                cmd = commands.recv() => match cmd {
                    Some(Command::SetState(state, done)) => {
                        let me = self.foca.identity().clone();
                        let next = Member { state, generation: me.generation + 1, ..me };
                        if let Err(e) = self.foca.change_identity(next, &mut self.runtime) {
                            warn!(error = %e, "gossip state change");
                        }
                        self.flush().await;
                        let _ = done.send(());
                    }
                    Some(Command::Leave(done)) => {
                        if let Err(e) = self.foca.leave_cluster(&mut self.runtime) {
                            warn!(error = %e, "leaving the gossip");
                        }
                        self.flush().await;
                        self.publish.send_replace(Vec::new());
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                },
            }
            self.flush().await;
        }
    }

    /// Sends this member's report, if it has one, to every other scheduler member.
    async fn send_report(&mut self) {
        let Some(report) = self.report.borrow_and_update().clone() else {
            return;
        };
        let tag = hmac::sign(&self.report_key, &report);
        let mut packet = Vec::with_capacity(TAG_LEN + report.len());
        packet.extend_from_slice(tag.as_ref());
        packet.extend_from_slice(&report);
        let me = self.foca.identity().gossip;
        let to: Vec<SocketAddr> = self
            .foca
            .iter_members()
            .map(|m| m.id())
            .filter(|m| m.role == MemberRole::Scheduler && m.gossip != me)
            .map(|m| m.gossip)
            .collect();
        for addr in to {
            match self.socket.send_to(&packet, addr).await {
                Ok(_) => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => debug!(to = %addr, error = %e, "gossip report not sent"),
            }
        }
    }

    /// Checks the tag and hands the packet to foca (or, tagged as a report, to whoever
    /// takes reports); drops it unread if neither tag verifies.
    fn receive(&mut self, packet: &[u8], from: SocketAddr) {
        if packet.len() <= TAG_LEN {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (tag, data) = packet.split_at(TAG_LEN);
        if hmac::verify(&self.key, data, tag).is_err() {
            if hmac::verify(&self.report_key, data, tag).is_ok() {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                // Full or nobody listening: dropped; the sender resends its latest.
                let _ = self.reports.try_send(data.to_vec());
                return;
            }
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            debug!(%from, len = packet.len(), "gossip packet with a bad tag dropped");
            return;
        }
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.foca.handle_data(data, &mut self.runtime) {
            debug!(%from, error = %e, "gossip packet refused");
        }
    }

    /// Sends what foca wrote, queues its timers, and publishes the members if they changed.
    async fn flush(&mut self) {
        while let Some((to, data)) = self.runtime.to_send() {
            let tag = hmac::sign(&self.key, &data);
            let mut packet = Vec::with_capacity(TAG_LEN + data.len());
            packet.extend_from_slice(tag.as_ref());
            packet.extend_from_slice(&data);
            match self.socket.send_to(&packet, to.gossip).await {
                Ok(_) => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => debug!(to = %to.gossip, error = %e, "gossip send failed"),
            }
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timer_seq += 1;
            self.timers
                .push(Reverse((Instant::now() + after, self.timer_seq, TimerSlot(timer))));
        }
        let mut changed = false;
        while let Some(n) = self.runtime.to_notify() {
            changed = true;
            debug!(notification = ?n, "gossip");
        }
        if changed {
            let mut members: Vec<Member> = self.foca.iter_members().map(|m| m.id().clone()).collect();
            members.sort_by(|a, b| (a.role, &a.id, a.gossip).cmp(&(b.role, &b.id, b.gossip)));
            self.publish.send_if_modified(|current| {
                if *current == members {
                    false
                } else {
                    *current = members;
                    true
                }
            });
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
