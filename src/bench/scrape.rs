//! What the driven schedulers' admin endpoints report before and after the load (their CPU
//! time, the datagrams of their QUIC connections and their runtimes' task counts, summed
//! over the schedulers), and the datagrams of this process's frontends and queriers.

use std::net::SocketAddr;
use std::time::Duration;

use sluice_client::{Frontend, Querier, Role};

use crate::metrics::{self as m, RuntimeCounts};

/// UDP datagrams each way and the system calls that sent them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Datagrams {
    pub(super) sent: u64,
    pub(super) received: u64,
    pub(super) send_calls: u64,
}

impl Datagrams {
    fn add(self, o: Datagrams) -> Datagrams {
        Datagrams {
            sent: self.sent + o.sent,
            received: self.received + o.received,
            send_calls: self.send_calls + o.send_calls,
        }
    }

    /// What grew from `before` to `self`.
    pub(super) fn since(self, before: Datagrams) -> Datagrams {
        Datagrams {
            sent: self.sent.saturating_sub(before.sent),
            received: self.received.saturating_sub(before.received),
            send_calls: self.send_calls.saturating_sub(before.send_calls),
        }
    }

    /// Every connection of these frontends and queriers (this process's QUIC traffic).
    pub(super) fn of_clients(frontends: &[Frontend], queriers: &[Querier]) -> Datagrams {
        let totals = frontends
            .iter()
            .flat_map(|f| [f.quic_stats(Role::Scheduler), f.quic_stats(Role::Querier)])
            .chain(
                queriers
                    .iter()
                    .flat_map(|q| [q.quic_stats(Role::Scheduler), q.quic_stats(Role::Frontend)]),
            );
        totals.fold(Datagrams::default(), |d, t| {
            d.add(Datagrams {
                sent: t.datagrams_sent,
                received: t.datagrams_received,
                send_calls: t.send_calls,
            })
        })
    }
}

/// The figures of one or more schedulers' `/metrics`, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Scraped {
    pub(super) cpu_seconds: f64,
    pub(super) datagrams: Datagrams,
    pub(super) tasks: RuntimeCounts,
}

impl Scraped {
    /// Reads the figures from a Prometheus text exposition; `None` without the CPU time
    /// (a scheduler not on Linux).
    pub(super) fn parse(text: &str) -> Option<Scraped> {
        let mut d = Datagrams::default();
        let mut t = RuntimeCounts::default();
        let mut cpu = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            let whole = || value.parse::<u64>().unwrap_or(0);
            match name {
                m::PROCESS_CPU_SECONDS => cpu = value.parse::<f64>().ok(),
                m::QUIC_DATAGRAMS if series.contains("direction=\"sent\"") => d.sent += whole(),
                m::QUIC_DATAGRAMS if series.contains("direction=\"received\"") => d.received += whole(),
                m::QUIC_SEND_CALLS => d.send_calls += whole(),
                m::RUNTIME_TASK_POLLS => t.polls = Some(t.polls.unwrap_or(0) + whole()),
                m::RUNTIME_TASK_STEALS => t.steals = Some(t.steals.unwrap_or(0) + whole()),
                m::RUNTIME_THREAD_PARKS => t.parks += whole(),
                _ => {}
            }
        }
        Some(Scraped {
            cpu_seconds: cpu?,
            datagrams: d,
            tasks: t,
        })
    }

    fn add(self, o: Scraped) -> Scraped {
        Scraped {
            cpu_seconds: self.cpu_seconds + o.cpu_seconds,
            datagrams: self.datagrams.add(o.datagrams),
            tasks: self.tasks + o.tasks,
        }
    }

    /// What grew from `before` to `self`.
    pub(super) fn since(self, before: Scraped) -> Scraped {
        Scraped {
            cpu_seconds: self.cpu_seconds - before.cpu_seconds,
            datagrams: self.datagrams.since(before.datagrams),
            tasks: self.tasks.since(before.tasks),
        }
    }
}

/// One scheduler's `/metrics` now.
async fn scrape(admin: SocketAddr) -> Result<Scraped, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fail = |e: &dyn std::fmt::Display| format!("reading {admin}/metrics: {e}");
    let fetch = async {
        let mut socket = tokio::net::TcpStream::connect(admin).await.map_err(|e| fail(&e))?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await.map_err(|e| fail(&e))?;
        let mut text = String::new();
        socket.read_to_string(&mut text).await.map_err(|e| fail(&e))?;
        Scraped::parse(&text).ok_or_else(|| fail(&"no process_cpu_seconds_total (is it a Linux scheduler?)"))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| fail(&"timed out"))?
}

/// The schedulers at `admin` together; `None` when there are none to read.
pub(super) async fn schedulers(admin: &[SocketAddr]) -> Result<Option<Scraped>, String> {
    let mut total: Option<Scraped> = None;
    for &a in admin {
        let one = scrape(a).await?;
        total = Some(total.map_or(one, |t| t.add(one)));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_role_and_direction_and_ignores_the_rest() {
        let text = "# HELP process_cpu_seconds_total CPU.\n\
            process_cpu_seconds_total 12.5\n\
            sluice_query_scheduler_quic_datagrams_total{role=\"frontend\",direction=\"sent\"} 10\n\
            sluice_query_scheduler_quic_datagrams_total{role=\"querier\",direction=\"sent\"} 5\n\
            sluice_query_scheduler_quic_datagrams_total{role=\"querier\",direction=\"received\"} 7\n\
            sluice_query_scheduler_quic_send_calls_total{role=\"querier\"} 4\n\
            sluice_query_scheduler_quic_bytes_total{role=\"querier\",direction=\"sent\"} 9000\n\
            sluice_query_scheduler_runtime_task_polls_total 300\n\
            sluice_query_scheduler_runtime_thread_parks_total 20\n";
        let s = Scraped::parse(text).unwrap();
        assert_eq!(
            s,
            Scraped {
                cpu_seconds: 12.5,
                datagrams: Datagrams {
                    sent: 15,
                    received: 7,
                    send_calls: 4
                },
                tasks: RuntimeCounts {
                    polls: Some(300),
                    steals: None,
                    spawned: None,
                    parks: 20
                }
            }
        );
        assert_eq!(
            Scraped::parse("sluice_query_scheduler_quic_send_calls_total{role=\"querier\"} 4\n"),
            None
        );
    }

    #[test]
    fn two_schedulers_add_up_and_a_counter_one_lacks_is_unknown() {
        let with_polls = Scraped::parse(
            "process_cpu_seconds_total 1\n\
             sluice_query_scheduler_runtime_task_polls_total 300\n\
             sluice_query_scheduler_runtime_thread_parks_total 20\n",
        )
        .unwrap();
        let both = with_polls.add(with_polls);
        assert_eq!(
            (both.cpu_seconds, both.tasks.polls, both.tasks.parks),
            (2.0, Some(600), 40)
        );
        let without = Scraped::parse("process_cpu_seconds_total 1\n").unwrap();
        assert_eq!(with_polls.add(without).tasks.polls, None);
    }
}
