//! Power of two choices over peak-EWMA latency: pick two endpoints at random and
//! send to the one with the lower `latency x (in-flight + 1)`. Peak-EWMA jumps up at
//! once on a slow response and decays slowly, so a slowing endpoint sheds load
//! quickly, and an idle one decays back toward zero so it is tried again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How fast old latency is forgotten.
const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint with no response yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// What a failed request counts as: an endpoint that refuses or drops requests must
/// look slow, not fast, or P2C would pour traffic into it. It decays like any sample,
/// so the endpoint is tried again once the penalty has faded.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Load estimate of one endpoint. Lock-free; a lost race between two updates loses
/// one sample, which an estimate can afford.
#[derive(Debug)]
pub struct PeakEwma {
    epoch: Instant,
    /// f64 nanoseconds, as bits; 0 until the first response.
    rtt_ns: AtomicU64,
    /// Nanoseconds since `epoch` of the last update.
    stamp_ns: AtomicU64,
    pending: AtomicU64,
}

/// Counts a request as in flight until it is dropped or finished.
#[derive(Debug)]
pub struct InFlight {
    load: Arc<PeakEwma>,
    start: Instant,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            rtt_ns: AtomicU64::new(0),
            stamp_ns: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        }
    }
}

// === impl PeakEwma ===

impl PeakEwma {
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            start: Instant::now(),
        }
    }

    pub fn cost(&self, now: Instant) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let rtt = if rtt == 0.0 {
            DEFAULT_RTT.as_nanos() as f64
        } else {
            rtt * self.decay(now)
        };
        rtt * (pending + 1.0)
    }

    /// The current estimate, for `/config`.
    pub fn rtt(&self) -> Duration {
        Duration::from_nanos(f64::from_bits(self.rtt_ns.load(Ordering::Relaxed)) as u64)
    }

    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    fn decay(&self, now: Instant) -> f64 {
        let stamp = Duration::from_nanos(self.stamp_ns.load(Ordering::Relaxed));
        let elapsed = now.saturating_duration_since(self.epoch + stamp);
        (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let previous = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let next = if previous == 0.0 || sample > previous {
            sample
        } else {
            let w = self.decay(now);
            previous * w + sample * (1.0 - w)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        let stamp = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.stamp_ns.store(stamp, Ordering::Relaxed);
    }
}

// === impl InFlight ===

impl InFlight {
    /// The response arrived: count its latency.
    pub fn finish(self) {
        let now = Instant::now();
        self.load.observe(now - self.start, now);
    }

    /// The request failed without a response.
    pub fn fail(self) {
        let now = Instant::now();
        self.load
            .observe(FAILURE_PENALTY.max(now - self.start), now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks among `items` with power of two choices; `load` gives each one's estimate.
pub fn p2c<T>(items: &[T], load: impl Fn(&T) -> &PeakEwma) -> Option<&T> {
    match items {
        [] => None,
        [only] => Some(only),
        _ => {
            let a = fastrand::usize(..items.len());
            // A second index that differs from the first, uniformly.
            let b = (a + 1 + fastrand::usize(..items.len() - 1)) % items.len();
            let now = Instant::now();
            let (x, y) = (&items[a], &items[b]);
            Some(if load(x).cost(now) <= load(y).cost(now) {
                x
            } else {
                y
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(ms: u64) -> Arc<PeakEwma> {
        let load = Arc::new(PeakEwma::default());
        load.observe(Duration::from_millis(ms), Instant::now());
        load
    }

    #[test]
    fn peak_jumps_up_at_once_and_decays_down() {
        let load = observed(1);
        let now = Instant::now();
        load.observe(Duration::from_millis(50), now);
        assert_eq!(load.rtt(), Duration::from_millis(50));
        // A fast sample soon after barely moves it down...
        load.observe(Duration::from_millis(1), now + Duration::from_millis(10));
        assert!(load.rtt() > Duration::from_millis(49));
        // ...but one long after mostly replaces it.
        load.observe(Duration::from_millis(1), now + Duration::from_secs(60));
        assert!(load.rtt() < Duration::from_millis(2), "{:?}", load.rtt());
    }

    #[test]
    fn a_failing_endpoint_loses_to_a_slow_one() {
        let failing = Arc::new(PeakEwma::default());
        failing.start().fail();
        let slow = observed(50);
        let items = [failing, slow];
        let picks = (0..100)
            .filter(|_| Arc::ptr_eq(p2c(&items, |l| l).unwrap(), &items[1]))
            .count();
        assert_eq!(picks, 100);
    }

    #[test]
    fn in_flight_requests_raise_the_cost() {
        let load = observed(10);
        let idle = load.cost(Instant::now());
        let guard = load.start();
        assert!(load.cost(Instant::now()) > idle * 1.5);
        drop(guard);
        assert_eq!(load.pending(), 0);
    }

    #[test]
    fn p2c_prefers_the_cheaper_endpoint() {
        let items = [observed(1), observed(20)];
        let picks = (0..1000)
            .filter(|_| Arc::ptr_eq(p2c(&items, |l| l).unwrap(), &items[0]))
            .count();
        assert_eq!(
            picks, 1000,
            "with two endpoints both are compared every time"
        );

        let three = [observed(1), observed(20), observed(20)];
        let fast = (0..3000)
            .filter(|_| Arc::ptr_eq(p2c(&three, |l| l).unwrap(), &three[0]))
            .count();
        // The fast one wins whenever it is drawn: 2 of 3 draws.
        assert!((1800..2200).contains(&fast), "{fast}");
        assert!(p2c::<Arc<PeakEwma>>(&[], |l| l).is_none());
    }
}
