//! Reconnect delays: capped exponential backoff with jitter, so that the clients of a
//! restarted scheduler do not all come back in the same instant.

use std::time::Duration;

/// First delay after a failure.
pub(crate) const INITIAL: Duration = Duration::from_millis(50);
/// Longest delay: a scheduler that is back is found again within about this long.
pub(crate) const CAP: Duration = Duration::from_secs(1);

/// Delays between reconnection attempts: each one drawn from the upper half of a ceiling
/// that doubles from [`INITIAL`] to [`CAP`]; [`reset`](Self::reset) once connected.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    ceiling: Duration,
    state: u64,
}

impl Backoff {
    /// A backoff whose jitter is seeded by `seed` (any value; distinct per caller).
    pub(crate) fn new(seed: u64) -> Self {
        Backoff {
            ceiling: INITIAL,
            state: seed ^ 0x2545_f491_4f6c_dd1d,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        // xorshift64*: enough for jitter.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let r = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(CAP);
        let half = ceiling / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_nanos(r % nanos)
    }

    /// Connected: the next failure starts from [`INITIAL`] again.
    pub(crate) fn reset(&mut self) {
        self.ceiling = INITIAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter_and_reset() {
        let mut b = Backoff::new(7);
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= INITIAL / 2 && delays[0] <= INITIAL);
        for d in &delays {
            assert!(*d <= CAP, "{d:?} above the cap");
        }
        assert!(delays[9] >= CAP / 2, "reaches the cap: {delays:?}");
        let mut other = Backoff::new(8);
        let others: Vec<Duration> = (0..10).map(|_| other.next_delay()).collect();
        assert_ne!(delays, others, "jittered per seed");
        b.reset();
        assert!(b.next_delay() <= INITIAL);
    }
}
