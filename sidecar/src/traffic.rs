//! What this proxy's outbound side did since its last report to the control plane:
//! requests per destination, route and backend with a latency histogram, and what each
//! route's mirror did. The control plane's canary analysis and `trellisctl get shadow`
//! are built from these windows, so they are deltas: `take` empties the ledger.
//!
//! Kept apart from the Prometheus recorder on purpose: metrics are cumulative and
//! scraped by others; this is drained by the reporter alone.

use std::{
    borrow::Borrow,
    collections::{HashMap, VecDeque},
    hash::{Hash, Hasher},
    sync::LazyLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use parking_lot::Mutex;
/// Upper bounds of the reported latency buckets, in seconds: the ones the control
/// plane accepts, so windows from every proxy add up bucket by bucket.
pub use trellis_api::LATENCY_BOUNDS_SECONDS;
use trellis_api::discovery::v1::{RouteStats, ShadowMismatch, ShadowStats};

/// Mismatches kept per route mirror, for reports and the admin `/shadow` page.
pub const RECENT_MISMATCHES: usize = 8;

/// What became of one mirrored (or not mirrored) request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShadowOutcome {
    /// Sent; the route does not compare, or the comparison is still to come.
    Mirrored,
    Matched,
    StatusMismatch(Mismatch),
    BodyMismatch(Mismatch),
    /// Sent, but the shadow did not answer (connect failure, reset, timeout).
    ShadowError,
    /// Not sent: the shadow's pool was full.
    Dropped,
    /// Not sent: the request body was over the mirror's limit.
    TooLarge,
}

/// One request whose shadow answered differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub method: String,
    pub path: String,
    pub primary_status: u16,
    pub shadow_status: u16,
    /// Hex SHA-256 of each compared body.
    pub primary_digest: String,
    pub shadow_digest: String,
}

/// Requests and shadows since the last `take`.
#[derive(Debug, Default)]
pub struct Ledger {
    window: Mutex<Window>,
    /// Every mirror's outcomes since the process started, never drained: the admin
    /// `/shadow` page reads it without taking the reporter's window away.
    shadow_history: Mutex<HashMap<RouteKey, ShadowCounts>>,
}

#[derive(Debug, Default)]
struct Window {
    routes: HashMap<RouteKey, RouteCounts>,
    shadows: HashMap<RouteKey, ShadowCounts>,
}

/// (destination, route, backend or shadow), as the maps own it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteKey {
    destination: String,
    route: String,
    target: String,
}

/// A key's three names, owned or borrowed: the maps are searched with a request's
/// `&str`s, so only a key they do not hold yet costs allocations.
pub(crate) trait RouteNames {
    fn names(&self) -> (&str, &str, &str);
}

impl RouteNames for RouteKey {
    fn names(&self) -> (&str, &str, &str) {
        (&self.destination, &self.route, &self.target)
    }
}

impl RouteNames for (&str, &str, &str) {
    fn names(&self) -> (&str, &str, &str) {
        *self
    }
}

impl RouteKey {
    pub(crate) fn new((destination, route, target): (&str, &str, &str)) -> Self {
        Self {
            destination: destination.to_owned(),
            route: route.to_owned(),
            target: target.to_owned(),
        }
    }
}

// Owned and borrowed keys must hash alike: both hash their names.
impl Hash for RouteKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.names().hash(state);
    }
}

impl Hash for dyn RouteNames + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.names().hash(state);
    }
}

impl PartialEq for dyn RouteNames + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.names() == other.names()
    }
}

impl Eq for dyn RouteNames + '_ {}

impl<'a> Borrow<dyn RouteNames + 'a> for RouteKey {
    fn borrow(&self) -> &(dyn RouteNames + 'a) {
        self
    }
}

#[derive(Debug, Default)]
struct RouteCounts {
    requests: u64,
    successes: u64,
    /// Per bucket, not cumulative; one more than the bounds for the slower ones.
    buckets: [u64; LATENCY_BOUNDS_SECONDS.len() + 1],
}

impl RouteCounts {
    fn add(&mut self, success: bool, bucket: usize) {
        self.requests = self.requests.saturating_add(1);
        self.successes = self.successes.saturating_add(u64::from(success));
        if let Some(count) = self.buckets.get_mut(bucket) {
            *count = count.saturating_add(1);
        }
    }
}

#[derive(Debug, Default)]
struct ShadowCounts {
    stats: ShadowStats,
    recent: VecDeque<ShadowMismatch>,
}

static GLOBAL: LazyLock<Ledger> = LazyLock::new(Ledger::default);

/// The process's ledger: what the outbound side records and the reporter drains.
pub fn global() -> &'static Ledger {
    &GLOBAL
}

impl Ledger {
    /// One request through `route` of `destination`, answered by `backend` (a subset
    /// or service name). `success`: not a 5xx and not a mesh error.
    pub fn record_route(
        &self,
        destination: &str,
        route: &str,
        backend: &str,
        success: bool,
        elapsed: Duration,
    ) {
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BOUNDS_SECONDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BOUNDS_SECONDS.len());
        let names = (destination, route, backend);
        let mut window = self.window.lock();
        match window.routes.get_mut(&names as &dyn RouteNames) {
            Some(counts) => counts.add(success, bucket),
            None => window
                .routes
                .entry(RouteKey::new(names))
                .or_default()
                .add(success, bucket),
        }
    }

    /// What the mirror of `route` of `destination` to `shadow` did with one request.
    /// A compared copy is recorded twice: `Mirrored` when sent, then its result.
    pub fn record_shadow(
        &self,
        destination: &str,
        route: &str,
        shadow: &str,
        outcome: ShadowOutcome,
    ) {
        let key = RouteKey::new((destination, route, shadow));
        let at = unix_ms(SystemTime::now());
        count_shadow(
            self.shadow_history.lock().entry(key.clone()).or_default(),
            outcome.clone(),
            at,
        );
        count_shadow(
            self.window.lock().shadows.entry(key).or_default(),
            outcome,
            at,
        );
    }

    /// Every mirror's totals and latest mismatches since the process started, by
    /// destination, route and shadow; nothing is drained.
    pub fn shadow_history(&self) -> Vec<ShadowStats> {
        let mut history: Vec<ShadowStats> = self
            .shadow_history
            .lock()
            .iter()
            .map(|(key, counts)| ShadowStats {
                destination: key.destination.clone(),
                route: key.route.clone(),
                shadow: key.target.clone(),
                recent: counts.recent.iter().cloned().collect(),
                ..counts.stats.clone()
            })
            .collect();
        history.sort_by(|a, b| {
            (&a.destination, &a.route, &a.shadow).cmp(&(&b.destination, &b.route, &b.shadow))
        });
        history
    }

    /// Everything since the last call, as the report carries it; the ledger starts over.
    pub fn take(&self) -> (Vec<RouteStats>, Vec<ShadowStats>) {
        let window = std::mem::take(&mut *self.window.lock());
        let routes = window
            .routes
            .into_iter()
            .map(|(key, counts)| {
                let mut below = 0u64;
                let latency_bucket_counts = counts.buckets[..LATENCY_BOUNDS_SECONDS.len()]
                    .iter()
                    .map(|n| {
                        below = below.saturating_add(*n);
                        below
                    })
                    .collect();
                RouteStats {
                    destination: key.destination,
                    route: key.route,
                    backend: key.target,
                    requests: counts.requests,
                    successes: counts.successes,
                    latency_bounds_seconds: LATENCY_BOUNDS_SECONDS.to_vec(),
                    latency_bucket_counts,
                }
            })
            .collect();
        let shadows = window
            .shadows
            .into_iter()
            .map(|(key, counts)| ShadowStats {
                destination: key.destination,
                route: key.route,
                shadow: key.target,
                recent: counts.recent.into(),
                ..counts.stats
            })
            .collect();
        (routes, shadows)
    }
}

/// Adds one outcome to `counts`, keeping the latest `RECENT_MISMATCHES` mismatches.
fn count_shadow(counts: &mut ShadowCounts, outcome: ShadowOutcome, unix_ms: i64) {
    let stats = &mut counts.stats;
    let mismatch = match outcome {
        ShadowOutcome::Mirrored => {
            stats.mirrored += 1;
            None
        }
        ShadowOutcome::Matched => {
            stats.matched += 1;
            None
        }
        ShadowOutcome::StatusMismatch(m) => {
            stats.status_mismatches += 1;
            Some(m)
        }
        ShadowOutcome::BodyMismatch(m) => {
            stats.body_mismatches += 1;
            Some(m)
        }
        ShadowOutcome::ShadowError => {
            stats.shadow_errors += 1;
            None
        }
        ShadowOutcome::Dropped => {
            stats.dropped += 1;
            None
        }
        ShadowOutcome::TooLarge => {
            stats.too_large += 1;
            None
        }
    };
    if let Some(m) = mismatch {
        if counts.recent.len() == RECENT_MISMATCHES {
            counts.recent.pop_front();
        }
        counts.recent.push_back(ShadowMismatch {
            unix_ms,
            method: m.method,
            path: m.path,
            primary_status: u32::from(m.primary_status),
            shadow_status: u32::from(m.shadow_status),
            primary_digest: m.primary_digest,
            shadow_digest: m.shadow_digest,
        });
    }
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_requests_by_route_and_backend_and_starts_over() {
        let ledger = Ledger::default();
        let ms = Duration::from_millis;
        ledger.record_route("web", "canary", "v1", true, ms(3));
        ledger.record_route("web", "canary", "v1", false, ms(40));
        ledger.record_route("web", "canary", "v2", true, Duration::from_secs(400));
        let (mut routes, shadows) = ledger.take();
        assert!(shadows.is_empty());
        routes.sort_by(|a, b| a.backend.cmp(&b.backend));
        let [v1, v2] = &routes[..] else {
            panic!("two backends expected: {routes:?}")
        };
        assert_eq!((v1.requests, v1.successes), (2, 1));
        // Cumulative: nothing at 1 ms, one by 5 ms, both by 50 ms.
        assert_eq!(v1.latency_bucket_counts[0], 0);
        assert_eq!(v1.latency_bucket_counts[2], 1);
        assert_eq!(v1.latency_bucket_counts[5], 2);
        assert_eq!(v1.latency_bucket_counts.last(), Some(&2));
        // Slower than the last bound: counted in requests, in no bucket.
        assert_eq!(v2.requests, 1);
        assert_eq!(v2.latency_bucket_counts.last(), Some(&0));
        assert_eq!(ledger.take(), (vec![], vec![]));
    }

    #[test]
    fn shadow_outcomes_are_counted_and_only_the_latest_mismatches_kept() {
        let ledger = Ledger::default();
        let mismatch = |path: &str| Mismatch {
            method: "GET".into(),
            path: path.into(),
            primary_status: 200,
            shadow_status: 500,
            primary_digest: "aa".into(),
            shadow_digest: "bb".into(),
        };
        for i in 0..RECENT_MISMATCHES + 2 {
            ledger.record_shadow(
                "pay",
                "0",
                "v2",
                ShadowOutcome::StatusMismatch(mismatch(&format!("/{i}"))),
            );
        }
        for outcome in [
            ShadowOutcome::Mirrored,
            ShadowOutcome::Matched,
            ShadowOutcome::ShadowError,
            ShadowOutcome::Dropped,
            ShadowOutcome::TooLarge,
        ] {
            ledger.record_shadow("pay", "0", "v2", outcome);
        }
        let (_, shadows) = ledger.take();
        let [stats] = &shadows[..] else {
            panic!("one shadow expected: {shadows:?}")
        };
        assert_eq!(stats.status_mismatches, 10);
        assert_eq!(
            (stats.mirrored, stats.matched, stats.shadow_errors),
            (1, 1, 1)
        );
        assert_eq!((stats.dropped, stats.too_large), (1, 1));
        let paths: Vec<_> = stats.recent.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths.first(), Some(&"/2"));
        assert_eq!(paths.last(), Some(&"/9"));
        assert_eq!(paths.len(), RECENT_MISMATCHES);
    }

    #[test]
    fn the_shadow_history_outlives_the_reports_windows() {
        let ledger = Ledger::default();
        let mismatch = Mismatch {
            method: "POST".into(),
            path: "/orders".into(),
            primary_status: 200,
            shadow_status: 200,
            primary_digest: "aa".into(),
            shadow_digest: "bb".into(),
        };
        ledger.record_shadow("web", "r", "v2", ShadowOutcome::Mirrored);
        ledger.record_shadow("web", "r", "v2", ShadowOutcome::BodyMismatch(mismatch));
        assert_eq!(ledger.take().1.len(), 1);
        ledger.record_shadow("web", "r", "v2", ShadowOutcome::Mirrored);
        ledger.record_shadow("api", "r", "api-next", ShadowOutcome::TooLarge);
        let history = ledger.shadow_history();
        let keys: Vec<_> = history.iter().map(|s| s.destination.as_str()).collect();
        assert_eq!(keys, ["api", "web"], "sorted");
        let web = &history[1];
        assert_eq!((web.mirrored, web.body_mismatches), (2, 1));
        assert_eq!(web.recent[0].path, "/orders");
        assert_eq!(ledger.shadow_history(), history, "reading drains nothing");
        let (_, window) = ledger.take();
        assert_eq!(window.iter().map(|s| s.mirrored).sum::<u64>(), 1);
    }
}
