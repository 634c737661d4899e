//! What every accept loop does when accepting fails (out of file descriptors, most
//! often): back off instead of spinning, and log once a second with a count instead of
//! once per failure, so a flood of connections costs neither a core nor the disk.

use std::time::{Duration, Instant};

use tracing::warn;

/// First pause after a failed accept.
const FIRST: Duration = Duration::from_millis(5);
/// Longest pause.
const LONGEST: Duration = Duration::from_secs(1);
/// At most one log line per this long.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// An accept loop's failure state.
#[derive(Debug)]
pub(crate) struct AcceptErrors {
    what: &'static str,
    pause: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    pub(crate) fn new(what: &'static str) -> Self {
        AcceptErrors {
            what,
            pause: FIRST,
            last_log: None,
            suppressed: 0,
        }
    }

    /// Accepting failed: logs (rate-limited) and waits before the next try, a little
    /// longer each time it fails again.
    pub(crate) async fn failed(&mut self, error: &std::io::Error) {
        let now = Instant::now();
        if self.last_log.is_none_or(|at| now.duration_since(at) >= LOG_EVERY) {
            warn!(listener = self.what, %error, suppressed = self.suppressed, pause = ?self.pause, "accept failed; backing off");
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(LONGEST);
    }

    /// Accepting works again.
    pub(crate) fn succeeded(&mut self) {
        self.pause = FIRST;
    }
}
