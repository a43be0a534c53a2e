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
    let now = Instant::now();
    p2c_where(items, |item| load(item).cost(now), |_| true)
}

/// Power of two choices among the items `eligible` admits, by `cost`, without
/// allocating: two distinct eligible items drawn uniformly, the cheaper wins.
/// `eligible` may be asked more than once per item, so it must only look, not take.
pub fn p2c_where<T>(
    items: &[T],
    cost: impl Fn(&T) -> f64,
    eligible: impl Fn(&T) -> bool,
) -> Option<&T> {
    let cheaper = |x, y| if cost(x) <= cost(y) { x } else { y };
    if items.len() >= 2 {
        // Usually every item is eligible: one draw settles it.
        let (a, b) = two_of(items.len());
        if eligible(&items[a]) && eligible(&items[b]) {
            return Some(cheaper(&items[a], &items[b]));
        }
    }
    let count = items.iter().filter(|i| eligible(i)).count();
    if count < 2 {
        return items.iter().find(|i| eligible(i));
    }
    // By rank among the eligible, kept in draw order: ties go to the first drawn,
    // which must not always be the lower index.
    let (a, b) = two_of(count);
    let (mut x, mut y) = (None, None);
    for (rank, item) in items.iter().filter(|i| eligible(i)).enumerate() {
        if rank == a {
            x = Some(item);
        } else if rank == b {
            y = Some(item);
        }
        if x.is_some() && y.is_some() {
            break;
        }
    }
    // The set may shrink between the count and this walk (an ejection elsewhere):
    // then take what is left.
    match (x, y) {
        (Some(x), Some(y)) => Some(cheaper(x, y)),
        (Some(one), None) | (None, Some(one)) => Some(one),
        (None, None) => items.iter().find(|i| eligible(i)),
    }
}

/// Two distinct indexes below `n` (at least 2), uniformly.
fn two_of(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    (a, b)
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

    #[test]
    fn p2c_where_draws_only_among_the_eligible() {
        let cost = |l: &Arc<PeakEwma>| l.cost(Instant::now());
        // Never observed: exactly equal costs.
        let items: Vec<_> = (0..6).map(|_| Arc::new(PeakEwma::default())).collect();
        let index = |picked: &Arc<PeakEwma>| items.iter().position(|i| Arc::ptr_eq(i, picked));
        let mut seen = [0; 6];
        for _ in 0..3000 {
            let picked = p2c_where(&items, cost, |l| index(l).is_some_and(|i| i % 2 == 0));
            seen[index(picked.unwrap()).unwrap()] += 1;
        }
        assert_eq!([seen[1], seen[3], seen[5]], [0, 0, 0]);
        // Equal costs: ties go either way, so the eligible share evenly.
        assert!(seen.iter().step_by(2).all(|&n| n > 800), "{seen:?}");

        let only = |l: &Arc<PeakEwma>| index(l) == Some(4);
        for _ in 0..100 {
            assert!(Arc::ptr_eq(
                p2c_where(&items, cost, only).unwrap(),
                &items[4]
            ));
        }
        assert!(p2c_where(&items, cost, |_| false).is_none());
        assert!(p2c_where::<Arc<PeakEwma>>(&[], cost, |_| true).is_none());

        // The cheaper of the two eligible wins every time.
        let two = [observed(20), observed(50), observed(1)];
        for _ in 0..100 {
            let picked = p2c_where(&two, cost, |l| !Arc::ptr_eq(l, &two[2])).unwrap();
            assert!(Arc::ptr_eq(picked, &two[0]));
        }
    }
}
