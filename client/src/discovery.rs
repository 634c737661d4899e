//! Which schedulers a client talks to: a static list, or the live schedulers of the gossip.

use std::net::SocketAddr;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ClientError;
use crate::gossip::{Gossip, GossipConfig, Member, MemberRole, MemberState, schedulers_in_use};

/// A scheduler a client should be connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    /// Among the schedulers in use (frontends send work only to these; queriers run all
    /// their workers against them, one worker against the others).
    pub(crate) in_use: bool,
    /// Draining before it exits: no new work, but what it holds still runs.
    pub(crate) leaving: bool,
}

/// The running discovery of one client.
pub(crate) struct Discovery {
    targets: watch::Receiver<Vec<Target>>,
    gossip: Option<Gossip>,
    task: Option<JoinHandle<()>>,
}

impl Discovery {
    /// A static list: every address in use, for good.
    pub(crate) fn fixed(schedulers: &[SocketAddr]) -> Discovery {
        let targets = schedulers
            .iter()
            .map(|&addr| Target {
                addr,
                in_use: true,
                leaving: false,
            })
            .collect();
        let (_, targets) = watch::channel(targets);
        Discovery {
            targets,
            gossip: None,
            task: None,
        }
    }

    /// A gossip member of `role` following the live schedulers, the first `max_used` of
    /// them in use (0: all).
    pub(crate) fn gossip(
        id: &str,
        role: MemberRole,
        config: &GossipConfig,
        max_used: usize,
    ) -> Result<Discovery, ClientError> {
        let gossip = Gossip::start(id, role, None, MemberState::Active, config.clone())?;
        let mut members = gossip.members();
        let (tx, targets) = watch::channel(targets_of(&members.borrow_and_update(), max_used));
        let task = tokio::spawn(async move {
            while members.changed().await.is_ok() {
                let next = targets_of(&members.borrow_and_update(), max_used);
                tx.send_if_modified(|current| {
                    let changed = *current != next;
                    *current = next;
                    changed
                });
            }
        });
        Ok(Discovery {
            targets,
            gossip: Some(gossip),
            task: Some(task),
        })
    }

    /// Applies the current set at once, then every change, until `stop`; the returned
    /// task is the follower.
    pub(crate) fn follow(
        &self,
        stop: CancellationToken,
        mut apply: impl FnMut(&[Target]) + Send + 'static,
    ) -> JoinHandle<()> {
        let mut targets = self.targets.clone();
        apply(&targets.borrow_and_update());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = targets.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        apply(&targets.borrow_and_update());
                    }
                    _ = stop.cancelled() => return,
                }
            }
        })
    }

    /// Leaves the gossip, if this client joined it.
    pub(crate) async fn leave(&self) {
        if let Some(g) = &self.gossip {
            g.leave().await;
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Every active or leaving scheduler, marked in use if it is among the first `max_used`
/// active ones in the stable order of [`schedulers_in_use`].
pub(crate) fn targets_of(members: &[Member], max_used: usize) -> Vec<Target> {
    let in_use: Vec<SocketAddr> = schedulers_in_use(members, max_used)
        .iter()
        .filter_map(|m| m.service)
        .collect();
    let mut targets: Vec<Target> = members
        .iter()
        .filter(|m| m.role == MemberRole::Scheduler && m.state != MemberState::Joining)
        .filter_map(|m| {
            let addr = m.service?;
            Some(Target {
                addr,
                in_use: in_use.contains(&addr),
                leaving: m.state == MemberState::Leaving,
            })
        })
        .collect();
    targets.sort_by_key(|t| t.addr);
    targets.dedup_by_key(|t| t.addr);
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(id: &str, port: u16, state: MemberState) -> Member {
        Member {
            id: id.into(),
            role: MemberRole::Scheduler,
            gossip: SocketAddr::from(([127, 0, 0, 1], port + 1000)),
            service: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            state,
            generation: 1,
        }
    }

    #[test]
    fn the_first_active_schedulers_by_id_are_in_use() {
        let members = vec![
            scheduler("c", 3, MemberState::Active),
            scheduler("a", 1, MemberState::Leaving),
            scheduler("b", 2, MemberState::Active),
            scheduler("d", 4, MemberState::Active),
            scheduler("e", 5, MemberState::Joining),
            Member {
                role: MemberRole::Querier,
                service: None,
                ..scheduler("q", 6, MemberState::Active)
            },
        ];
        let t = targets_of(&members, 2);
        let summary: Vec<(u16, bool, bool)> = t.iter().map(|t| (t.addr.port(), t.in_use, t.leaving)).collect();
        // a is leaving (kept, not in use), b and c are the first two active by id, d is
        // active but beyond max_used, e is not serving yet, q is no scheduler.
        assert_eq!(
            summary,
            [(1, false, true), (2, true, false), (3, true, false), (4, false, false)]
        );
        assert!(targets_of(&members, 0).iter().filter(|t| t.in_use).count() == 3);
    }
}
