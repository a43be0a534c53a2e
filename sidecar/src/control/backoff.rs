//! Jittered exponential backoff for talking to the control plane: many sidecars
//! losing it at once must not come back in lockstep.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

// === impl Backoff ===

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The next delay, drawn from the upper half of the current step ("equal
    /// jitter"): spread out, yet never close to zero, so a flapping control plane is
    /// not hammered.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(fastrand::f64())
    }

    /// `unit` in `[0, 1)` picks where in the step's upper half the delay falls.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let step = self.step();
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// After a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    fn step(&self) -> Duration {
        // 2^20 steps is past any sane max; stop doubling before the arithmetic cares.
        let factor = 1u32 << self.attempt.min(20);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut backoff = Backoff::new(100 * MS, 5000 * MS);
        let lows: Vec<_> = (0..8).map(|_| backoff.next_with(0.0)).collect();
        assert_eq!(
            lows,
            [50, 100, 200, 400, 800, 1600, 2500, 2500].map(|n| n * MS)
        );
        backoff.reset();
        let highs: Vec<_> = (0..8).map(|_| backoff.next_with(1.0)).collect();
        assert_eq!(
            highs,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000].map(|n| n * MS)
        );
    }

    #[test]
    fn random_delays_stay_in_bounds_and_reset_starts_over() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..100 {
            let delay = backoff.next_delay();
            assert!(delay >= Duration::from_millis(500), "{delay:?}");
            assert!(delay <= Duration::from_secs(30), "{delay:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(1));
    }
}
