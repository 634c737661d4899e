//! What the driven schedulers' admin endpoints report before and after the load: their CPU
//! time and the datagrams of their QUIC connections, summed over the schedulers.

use std::net::SocketAddr;
use std::time::Duration;

use crate::metrics as m;

/// The figures of one or more schedulers' `/metrics`, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Scraped {
    pub(super) cpu_seconds: f64,
    pub(super) datagrams_sent: u64,
    pub(super) datagrams_received: u64,
    pub(super) send_calls: u64,
}

impl Scraped {
    /// Reads the figures from a Prometheus text exposition; `None` without the CPU time
    /// (a scheduler not on Linux).
    pub(super) fn parse(text: &str) -> Option<Scraped> {
        let mut s = Scraped::default();
        let mut cpu = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            let whole = || value.parse::<u64>().unwrap_or(0);
            match name {
                m::PROCESS_CPU_SECONDS => cpu = value.parse::<f64>().ok(),
                m::QUIC_DATAGRAMS if series.contains("direction=\"sent\"") => s.datagrams_sent += whole(),
                m::QUIC_DATAGRAMS if series.contains("direction=\"received\"") => s.datagrams_received += whole(),
                m::QUIC_SEND_CALLS => s.send_calls += whole(),
                _ => {}
            }
        }
        s.cpu_seconds = cpu?;
        Some(s)
    }

    fn add(self, o: Scraped) -> Scraped {
        Scraped {
            cpu_seconds: self.cpu_seconds + o.cpu_seconds,
            datagrams_sent: self.datagrams_sent + o.datagrams_sent,
            datagrams_received: self.datagrams_received + o.datagrams_received,
            send_calls: self.send_calls + o.send_calls,
        }
    }

    /// What grew from `before` to `self`.
    pub(super) fn since(self, before: Scraped) -> Scraped {
        Scraped {
            cpu_seconds: self.cpu_seconds - before.cpu_seconds,
            datagrams_sent: self.datagrams_sent.saturating_sub(before.datagrams_sent),
            datagrams_received: self.datagrams_received.saturating_sub(before.datagrams_received),
            send_calls: self.send_calls.saturating_sub(before.send_calls),
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
    if admin.is_empty() {
        return Ok(None);
    }
    let mut total = Scraped::default();
    for &a in admin {
        total = total.add(scrape(a).await?);
    }
    Ok(Some(total))
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
            sluice_query_scheduler_quic_bytes_total{role=\"querier\",direction=\"sent\"} 9000\n";
        let s = Scraped::parse(text).unwrap();
        assert_eq!(
            s,
            Scraped {
                cpu_seconds: 12.5,
                datagrams_sent: 15,
                datagrams_received: 7,
                send_calls: 4
            }
        );
        assert_eq!(
            Scraped::parse("sluice_query_scheduler_quic_send_calls_total{role=\"querier\"} 4\n"),
            None
        );
    }
}
