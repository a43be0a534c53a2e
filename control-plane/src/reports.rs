//! What the sidecars' `Discovery.Report` windows add up to: requests, successes and
//! latency per (service, route, backend) and caller over the last hour, for canary
//! analysis and `GET /v1/stats`; and what each route's mirror did since this process
//! started, for `GET /v1/shadows`. All in memory: a restart starts from nothing.
//!
//! Windows are filed by the time they arrive, in buckets: one second wide for the
//! last five minutes, then folded into one-minute buckets kept for an hour. A bucket
//! counts for a query when its newest report arrived at or after the query's `since`,
//! so a query may include up to one bucket width of older reports (a second, or a
//! minute for queries reaching further back than five minutes).
//!
//! Memory is bounded twice: by time (an hour) and by count. There are at most
//! `MAX_ENTRIES` (route, backend, caller) entries across all buckets, about 400 bytes
//! each, so some 80 MB at worst; past that the oldest buckets are dropped first, so the
//! recent past, which canaries judge by, is what stays. Shadow totals are kept for at
//! most `MAX_SHADOWS` route mirrors with `RECENT_MISMATCHES` mismatches each.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use trellis_api::discovery::v1::{ReportRequest, RouteStats, ShadowMismatch, ShadowStats};

/// Width of the recent buckets.
const FINE_WIDTH: Duration = Duration::from_secs(1);
/// How long reports stay in one-second buckets before they are folded into minutes.
const FINE_SPAN: Duration = Duration::from_secs(5 * 60);
/// Width of the older buckets.
const COARSE_WIDTH: Duration = Duration::from_secs(60);
/// How far back statistics reach.
pub(crate) const RETENTION: Duration = Duration::from_secs(3600);
/// (route, backend, caller) entries kept across all buckets.
const MAX_ENTRIES: usize = 200_000;
/// Route mirrors whose totals are kept; reports of others are ignored.
const MAX_SHADOWS: usize = 1000;
/// Mismatches kept per route mirror, the newest.
const RECENT_MISMATCHES: usize = 20;
/// Texts of a kept mismatch (method, path, digests) are cut to this many bytes.
const MAX_MISMATCH_TEXT: usize = 256;

/// Every report received in the last hour, and the mirrors' totals.
#[derive(Debug, Default)]
pub struct Reports {
    inner: Mutex<Inner>,
}

/// What one backend of a service served over a span of time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BackendStats {
    pub requests: u64,
    /// Responses that were not 5xx or mesh errors.
    pub successes: u64,
    /// The 99th percentile latency, estimated from the summed histogram as Prometheus'
    /// `histogram_quantile` does; `None` without requests.
    pub p99: Option<Duration>,
}

/// One row of `GET /v1/stats`: a (service, route, backend) over a window.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RouteRow {
    pub(crate) namespace: String,
    pub(crate) service: String,
    pub(crate) route: String,
    pub(crate) backend: String,
    pub(crate) stats: BackendStats,
}

/// Which rows `route_stats` returns; `None` matches everything.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StatsFilter<'a> {
    pub(crate) namespace: Option<&'a str>,
    pub(crate) service: Option<&'a str>,
    /// The calling service's name, in any namespace.
    pub(crate) caller: Option<&'a str>,
}

/// What one route's mirror did since the control plane started.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ShadowRow {
    pub(crate) namespace: String,
    pub(crate) service: String,
    pub(crate) route: String,
    pub(crate) shadow: String,
    pub(crate) totals: ShadowTotals,
    /// Oldest first.
    pub(crate) recent: Vec<ShadowMismatch>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ShadowTotals {
    pub(crate) mirrored: u64,
    pub(crate) matched: u64,
    pub(crate) status_mismatches: u64,
    pub(crate) body_mismatches: u64,
    pub(crate) shadow_errors: u64,
    pub(crate) dropped: u64,
    pub(crate) too_large: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// One second wide, oldest first.
    fine: VecDeque<Bucket>,
    /// One minute wide, oldest first, all older than `fine`.
    coarse: VecDeque<Bucket>,
    /// Entries across both.
    entries: usize,
    /// The latest arrival seen: the clock buckets age by.
    latest: Option<Instant>,
    shadows: HashMap<ShadowKey, Shadow>,
}

/// Reports that arrived within one bucket's width of `start`.
#[derive(Debug)]
struct Bucket {
    start: Instant,
    /// The newest arrival in it.
    last: Instant,
    routes: HashMap<RouteKey, Counts>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RouteKey {
    namespace: String,
    service: String,
    route: String,
    backend: String,
    caller_namespace: String,
    caller: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ShadowKey {
    namespace: String,
    service: String,
    route: String,
    shadow: String,
}

#[derive(Debug, Default)]
struct Shadow {
    totals: ShadowTotals,
    recent: VecDeque<ShadowMismatch>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Counts {
    requests: u64,
    successes: u64,
    latency: Histogram,
}

/// Latency counts per bucket (not cumulative) by upper bound in seconds, ascending;
/// the last bound is +Inf and holds what was slower than every finite one.
#[derive(Debug, Clone, Default, PartialEq)]
struct Histogram {
    buckets: Vec<(f64, u64)>,
}

// === impl Reports ===

impl Reports {
    pub fn new() -> Self {
        Self::default()
    }

    /// One sidecar's window as received at `at` (already validated). `namespace` is
    /// the reporter's.
    pub fn add(&self, namespace: &str, report: &ReportRequest, at: Instant) {
        let mut inner = self.inner.lock();
        inner.advance(at);
        if !report.routes.is_empty() {
            let mut added = 0;
            if let Some(bucket) = inner.bucket_for(at) {
                for route in &report.routes {
                    let (dest_namespace, service) = destination(namespace, &route.destination);
                    let key = RouteKey {
                        namespace: dest_namespace.to_string(),
                        service: service.to_string(),
                        route: route.route.clone(),
                        backend: route.backend.clone(),
                        caller_namespace: namespace.to_string(),
                        caller: report.service.clone(),
                    };
                    let counts = Counts::from_report(route);
                    match bucket.routes.get_mut(&key) {
                        Some(existing) => existing.merge(&counts),
                        None => {
                            bucket.routes.insert(key, counts);
                            added += 1;
                        }
                    }
                }
            }
            inner.entries += added;
            inner.enforce_cap();
        }
        for stats in &report.shadows {
            inner.add_shadow(namespace, stats);
        }
    }

    /// Requests to `service` in `namespace` served by `backend` (subset name, or
    /// service name for a whole-service backend), all routes and callers, reported
    /// since `since`.
    pub fn backend_stats(
        &self,
        namespace: &str,
        service: &str,
        backend: &str,
        since: Instant,
    ) -> BackendStats {
        let inner = self.inner.lock();
        let mut sum = Counts::default();
        for bucket in inner.since(Some(since)) {
            for (key, counts) in &bucket.routes {
                if key.namespace == namespace && key.service == service && key.backend == backend {
                    sum.merge(counts);
                }
            }
        }
        sum.stats()
    }

    /// Every (namespace, service, route, backend) that `filter` lets through, over the
    /// reports since `since` (`None`: all kept), sorted.
    pub(crate) fn route_stats(
        &self,
        filter: StatsFilter<'_>,
        since: Option<Instant>,
    ) -> Vec<RouteRow> {
        let mut sums: HashMap<(&str, &str, &str, &str), Counts> = HashMap::new();
        let inner = self.inner.lock();
        for bucket in inner.since(since) {
            for (key, counts) in &bucket.routes {
                let wanted = filter.namespace.is_none_or(|ns| key.namespace == ns)
                    && filter.service.is_none_or(|s| key.service == s)
                    && filter.caller.is_none_or(|c| key.caller == c);
                if wanted {
                    sums.entry((&key.namespace, &key.service, &key.route, &key.backend))
                        .or_default()
                        .merge(counts);
                }
            }
        }
        let mut rows: Vec<RouteRow> = sums
            .into_iter()
            .map(|((namespace, service, route, backend), counts)| RouteRow {
                namespace: namespace.to_string(),
                service: service.to_string(),
                route: route.to_string(),
                backend: backend.to_string(),
                stats: counts.stats(),
            })
            .collect();
        drop(inner);
        rows.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.route, &a.backend).cmp(&(
                &b.namespace,
                &b.service,
                &b.route,
                &b.backend,
            ))
        });
        rows
    }

    /// The mirrors of `namespace`'s `service` (`None`: every one), sorted.
    pub(crate) fn shadows(&self, namespace: Option<&str>, service: Option<&str>) -> Vec<ShadowRow> {
        let inner = self.inner.lock();
        let mut rows: Vec<ShadowRow> = inner
            .shadows
            .iter()
            .filter(|(key, _)| {
                namespace.is_none_or(|ns| key.namespace == ns)
                    && service.is_none_or(|s| key.service == s)
            })
            .map(|(key, shadow)| ShadowRow {
                namespace: key.namespace.clone(),
                service: key.service.clone(),
                route: key.route.clone(),
                shadow: key.shadow.clone(),
                totals: shadow.totals,
                recent: shadow.recent.iter().cloned().collect(),
            })
            .collect();
        drop(inner);
        for row in &mut rows {
            // Reporters' windows interleave: order by when each mismatch happened.
            row.recent.sort_by_key(|m| m.unix_ms);
        }
        rows.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.route, &a.shadow).cmp(&(
                &b.namespace,
                &b.service,
                &b.route,
                &b.shadow,
            ))
        });
        rows
    }
}

/// The (namespace, service) a sidecar's config key names: `svc` in the reporter's own
/// namespace, `svc.ns` in another. Service names are DNS labels, without dots.
fn destination<'a>(reporter_namespace: &'a str, destination: &'a str) -> (&'a str, &'a str) {
    match destination.split_once('.') {
        Some((service, namespace)) => (namespace, service),
        None => (reporter_namespace, destination),
    }
}

// === impl Inner ===

impl Inner {
    /// Moves the clock to `at` (never back): folds one-second buckets older than five
    /// minutes into minutes, and drops minutes older than an hour.
    fn advance(&mut self, at: Instant) {
        let latest = match self.latest {
            Some(latest) if latest >= at => latest,
            _ => at,
        };
        self.latest = Some(latest);
        while self
            .fine
            .front()
            .is_some_and(|b| latest.saturating_duration_since(b.start) >= FINE_SPAN)
        {
            let Some(old) = self.fine.pop_front() else {
                break;
            };
            self.fold(old);
        }
        while self
            .coarse
            .front()
            .is_some_and(|b| latest.saturating_duration_since(b.last) >= RETENTION)
        {
            if let Some(gone) = self.coarse.pop_front() {
                self.entries -= gone.routes.len();
            }
        }
    }

    /// Adds a one-second bucket to the minute it falls in.
    fn fold(&mut self, fine: Bucket) {
        match self.coarse.back_mut() {
            Some(minute) if fine.start < minute.start + COARSE_WIDTH => {
                minute.last = minute.last.max(fine.last);
                for (key, counts) in fine.routes {
                    match minute.routes.get_mut(&key) {
                        Some(existing) => {
                            existing.merge(&counts);
                            self.entries -= 1;
                        }
                        None => {
                            minute.routes.insert(key, counts);
                        }
                    }
                }
            }
            _ => self.coarse.push_back(fine),
        }
    }

    /// The bucket a report arriving at `at` goes to; `None` when `at` is older than
    /// everything kept.
    fn bucket_for(&mut self, at: Instant) -> Option<&mut Bucket> {
        let latest = self.latest.unwrap_or(at);
        if latest.saturating_duration_since(at) >= RETENTION {
            return None;
        }
        let newest_start = self.fine.back().map(|b| b.start);
        match newest_start {
            Some(start) if at >= start + FINE_WIDTH => {}
            None => {}
            // Before the newest bucket closed, or a report that raced a later one:
            // the newest bucket that had started by then takes it.
            Some(_) => {
                let bucket = match self.fine.iter().rposition(|b| b.start <= at) {
                    Some(i) => self.fine.get_mut(i),
                    None => match self.coarse.iter().rposition(|b| b.start <= at) {
                        Some(i) => self.coarse.get_mut(i),
                        // Older than every bucket, yet within the hour: the oldest.
                        None if self.coarse.is_empty() => self.fine.front_mut(),
                        None => self.coarse.front_mut(),
                    },
                };
                if let Some(bucket) = bucket {
                    bucket.last = bucket.last.max(at);
                    return Some(bucket);
                }
                return None;
            }
        }
        self.fine.push_back(Bucket {
            start: at,
            last: at,
            routes: HashMap::new(),
        });
        self.fine.back_mut()
    }

    /// Drops the oldest buckets while there are too many entries; the newest bucket
    /// always stays.
    fn enforce_cap(&mut self) {
        while self.entries > MAX_ENTRIES && self.coarse.len() + self.fine.len() > 1 {
            let gone = match self.coarse.pop_front() {
                Some(gone) => gone,
                None => match self.fine.pop_front() {
                    Some(gone) => gone,
                    None => return,
                },
            };
            self.entries -= gone.routes.len();
        }
    }

    /// Buckets with a report that arrived at or after `since`; all without it.
    fn since(&self, since: Option<Instant>) -> impl Iterator<Item = &Bucket> {
        self.coarse
            .iter()
            .chain(&self.fine)
            .filter(move |b| since.is_none_or(|since| b.last >= since))
    }

    fn add_shadow(&mut self, reporter_namespace: &str, stats: &ShadowStats) {
        let (namespace, service) = destination(reporter_namespace, &stats.destination);
        let key = ShadowKey {
            namespace: namespace.to_string(),
            service: service.to_string(),
            route: stats.route.clone(),
            shadow: stats.shadow.clone(),
        };
        let full = self.shadows.len() >= MAX_SHADOWS;
        let shadow = match self.shadows.get_mut(&key) {
            Some(shadow) => shadow,
            None if full => {
                tracing::debug!(
                    ?key,
                    "shadow totals are full; a report of a new mirror is ignored"
                );
                return;
            }
            None => self.shadows.entry(key).or_default(),
        };
        let t = &mut shadow.totals;
        t.mirrored = t.mirrored.saturating_add(stats.mirrored);
        t.matched = t.matched.saturating_add(stats.matched);
        t.status_mismatches = t.status_mismatches.saturating_add(stats.status_mismatches);
        t.body_mismatches = t.body_mismatches.saturating_add(stats.body_mismatches);
        t.shadow_errors = t.shadow_errors.saturating_add(stats.shadow_errors);
        t.dropped = t.dropped.saturating_add(stats.dropped);
        t.too_large = t.too_large.saturating_add(stats.too_large);
        for mismatch in &stats.recent {
            if shadow.recent.len() == RECENT_MISMATCHES {
                shadow.recent.pop_front();
            }
            shadow.recent.push_back(ShadowMismatch {
                unix_ms: mismatch.unix_ms,
                method: cut(&mismatch.method),
                path: cut(&mismatch.path),
                primary_status: mismatch.primary_status,
                shadow_status: mismatch.shadow_status,
                primary_digest: cut(&mismatch.primary_digest),
                shadow_digest: cut(&mismatch.shadow_digest),
            });
        }
    }
}

/// `text`, at most `MAX_MISMATCH_TEXT` bytes of it, on a character boundary.
fn cut(text: &str) -> String {
    let mut end = text.len().min(MAX_MISMATCH_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

// === impl Counts ===

impl Counts {
    fn from_report(route: &RouteStats) -> Self {
        Self {
            requests: route.requests,
            successes: route.successes,
            latency: Histogram::from_cumulative(
                &route.latency_bounds_seconds,
                &route.latency_bucket_counts,
                route.requests,
            ),
        }
    }

    fn merge(&mut self, other: &Counts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.successes = self.successes.saturating_add(other.successes);
        self.latency.merge(&other.latency);
    }

    fn stats(&self) -> BackendStats {
        BackendStats {
            requests: self.requests,
            successes: self.successes,
            p99: if self.requests == 0 {
                None
            } else {
                self.latency
                    .quantile(0.99)
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
            },
        }
    }
}

// === impl Histogram ===

impl Histogram {
    /// From a report's bounds and cumulative counts; what `requests` has beyond the
    /// last count was slower than every bound.
    fn from_cumulative(bounds: &[f64], cumulative: &[u64], requests: u64) -> Self {
        let mut buckets = Vec::with_capacity(bounds.len() + 1);
        let mut below = 0u64;
        for (bound, count) in bounds.iter().zip(cumulative) {
            buckets.push((*bound, count.saturating_sub(below)));
            below = below.max(*count);
        }
        buckets.push((f64::INFINITY, requests.saturating_sub(below)));
        Self { buckets }
    }

    fn merge(&mut self, other: &Histogram) {
        let same_bounds = self.buckets.len() == other.buckets.len()
            && self
                .buckets
                .iter()
                .zip(&other.buckets)
                .all(|(a, b)| a.0 == b.0);
        if same_bounds {
            for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
                mine.1 = mine.1.saturating_add(theirs.1);
            }
            return;
        }
        // Sidecars of other builds may bucket differently: the union of the bounds,
        // each count staying under its own upper bound.
        let mut merged = Vec::with_capacity(self.buckets.len() + other.buckets.len());
        let (mut a, mut b) = (
            self.buckets.iter().peekable(),
            other.buckets.iter().peekable(),
        );
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => match x.0.total_cmp(&y.0) {
                    std::cmp::Ordering::Less => a.next().copied(),
                    std::cmp::Ordering::Greater => b.next().copied(),
                    std::cmp::Ordering::Equal => {
                        let (x, y) = (*x, *y);
                        a.next();
                        b.next();
                        Some((x.0, x.1.saturating_add(y.1)))
                    }
                },
                (Some(_), None) => a.next().copied(),
                (None, Some(_)) => b.next().copied(),
                (None, None) => None,
            };
            match next {
                Some(bucket) => merged.push(bucket),
                None => break,
            }
        }
        self.buckets = merged;
    }

    /// The `q` quantile in seconds, as Prometheus' `histogram_quantile`: linear within
    /// the bucket the rank falls in (from 0 for the first), and the last finite bound
    /// when it falls beyond it. `None` without observations or finite bounds.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().map(|b| b.1).sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut below = 0u64;
        let mut lower = 0.0;
        for &(bound, count) in &self.buckets {
            let upto = below + count;
            if upto as f64 >= rank && count > 0 {
                if bound.is_infinite() {
                    break;
                }
                let within = (rank - below as f64) / count as f64;
                return Some(lower + (bound - lower) * within);
            }
            below = upto;
            if bound.is_finite() {
                lower = bound;
            }
        }
        self.buckets
            .iter()
            .rev()
            .map(|b| b.0)
            .find(|bound| bound.is_finite())
    }
}

// === impl BackendStats ===

impl BackendStats {
    /// Successes in percent, 0 to 100; `None` without requests.
    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.successes as f64 * 100.0 / self.requests as f64)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is a failed test

    use super::*;

    /// The sidecar's bounds (trellis-proxy's traffic ledger).
    const BOUNDS: [f64; 16] = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        300.0,
    ];

    /// `requests` to `destination` via `backend`, `successes` of them fine, each taking
    /// one of `latencies` (seconds) in turn.
    fn route(
        destination: &str,
        backend: &str,
        requests: u64,
        successes: u64,
        latencies: &[f64],
    ) -> RouteStats {
        let mut cumulative = [0u64; BOUNDS.len()];
        for i in 0..requests {
            let latency = latencies[i as usize % latencies.len()];
            for (count, bound) in cumulative.iter_mut().zip(BOUNDS) {
                *count += u64::from(latency <= bound);
            }
        }
        RouteStats {
            destination: destination.into(),
            route: "default".into(),
            backend: backend.into(),
            requests,
            successes,
            latency_bounds_seconds: BOUNDS.to_vec(),
            latency_bucket_counts: cumulative.to_vec(),
        }
    }

    fn report(service: &str, routes: Vec<RouteStats>) -> ReportRequest {
        ReportRequest {
            service: service.into(),
            namespace: "shop".into(),
            instance: format!("{service}-1"),
            routes,
            ..ReportRequest::default()
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn windows_from_several_callers_and_routes_add_up_per_backend() {
        let reports = Reports::new();
        let t0 = Instant::now();
        reports.add(
            "shop",
            &report(
                "web",
                vec![
                    route("pay", "v1", 90, 90, &[0.002]),
                    route("pay", "v2", 10, 9, &[0.002]),
                ],
            ),
            t0,
        );
        let mut other_route = route("pay", "v2", 30, 30, &[0.002]);
        other_route.route = "testers".into();
        reports.add("shop", &report("order", vec![other_route]), t0 + S / 2);
        reports.add(
            "shop",
            &report("web", vec![route("pay", "v2", 5, 5, &[0.002])]),
            t0 + 3 * S,
        );

        let v2 = reports.backend_stats("shop", "pay", "v2", t0);
        assert_eq!((v2.requests, v2.successes), (45, 44));
        assert!((v2.success_rate().unwrap() - 97.777).abs() < 0.01, "{v2:?}");
        let v1 = reports.backend_stats("shop", "pay", "v1", t0);
        assert_eq!((v1.requests, v1.successes), (90, 90));
        assert_eq!(v1.success_rate(), Some(100.0));
        let none = reports.backend_stats("shop", "pay", "v3", t0);
        assert_eq!(none, BackendStats::default());
        assert_eq!(none.success_rate(), None);

        let rows = reports.route_stats(StatsFilter::default(), Some(t0));
        let summary: Vec<_> = rows
            .iter()
            .map(|r| (r.route.as_str(), r.backend.as_str(), r.stats.requests))
            .collect();
        assert_eq!(
            summary,
            [
                ("default", "v1", 90),
                ("default", "v2", 15),
                ("testers", "v2", 30)
            ]
        );
        let from_order = reports.route_stats(
            StatsFilter {
                caller: Some("order"),
                ..StatsFilter::default()
            },
            Some(t0),
        );
        assert_eq!(from_order.len(), 1);
        assert_eq!(from_order[0].route, "testers");
    }

    #[test]
    fn only_reports_since_the_given_time_count() {
        let reports = Reports::new();
        let t0 = Instant::now();
        reports.add(
            "shop",
            &report("web", vec![route("pay", "v2", 100, 0, &[0.002])]),
            t0,
        );
        reports.add(
            "shop",
            &report("web", vec![route("pay", "v2", 7, 7, &[0.002])]),
            t0 + 5 * S,
        );
        let recent = reports.backend_stats("shop", "pay", "v2", t0 + 2 * S);
        assert_eq!((recent.requests, recent.successes), (7, 7));
        let all = reports.backend_stats("shop", "pay", "v2", t0);
        assert_eq!(all.requests, 107);
        let none = reports.backend_stats("shop", "pay", "v2", t0 + 6 * S);
        assert_eq!(none, BackendStats::default());
    }

    #[test]
    fn p99_is_interpolated_within_its_bucket_as_prometheus_does() {
        let reports = Reports::new();
        let t0 = Instant::now();
        // 98 fast (≤1 ms) and 2 in (50 ms, 100 ms]: rank 99 is the first of the two,
        // halfway into that bucket: 75 ms.
        let mut latencies = vec![0.0005; 98];
        latencies.extend([0.08, 0.08]);
        reports.add(
            "shop",
            &report("web", vec![route("pay", "v1", 100, 100, &latencies)]),
            t0,
        );
        let p99 = reports.backend_stats("shop", "pay", "v1", t0).p99.unwrap();
        assert!((p99.as_secs_f64() - 0.075).abs() < 1e-9, "{p99:?}");

        // All within the first bucket: from 0 to 1 ms, at 99%.
        reports.add(
            "shop",
            &report("web", vec![route("cart", "v1", 10, 10, &[0.0001])]),
            t0,
        );
        let p99 = reports.backend_stats("shop", "cart", "v1", t0).p99.unwrap();
        assert!((p99.as_secs_f64() - 0.00099).abs() < 1e-9, "{p99:?}");

        // Slower than the last bound: the last bound.
        reports.add(
            "shop",
            &report("web", vec![route("slow", "v1", 10, 10, &[400.0])]),
            t0,
        );
        let p99 = reports.backend_stats("shop", "slow", "v1", t0).p99.unwrap();
        assert_eq!(p99, Duration::from_secs(300));

        // Windows with other bounds still add up.
        let mut coarse = route("pay", "v1", 100, 100, &[0.0005]);
        coarse.latency_bounds_seconds = vec![0.002, 0.2];
        coarse.latency_bucket_counts = vec![100, 100];
        reports.add("shop", &report("web", vec![coarse]), t0);
        // Rank 198 of 200 is the last of the 2 ms bucket (1 ms..2 ms, by the union).
        let stats = reports.backend_stats("shop", "pay", "v1", t0);
        assert_eq!(stats.requests, 200);
        assert!(
            (stats.p99.unwrap().as_secs_f64() - 0.002).abs() < 1e-9,
            "{stats:?}"
        );
    }

    #[test]
    fn old_buckets_are_folded_then_dropped_after_an_hour() {
        let reports = Reports::new();
        let t0 = Instant::now();
        for minute in 0..10u32 {
            let at = t0 + Duration::from_secs(60 * u64::from(minute));
            reports.add(
                "shop",
                &report("web", vec![route("pay", "v1", 1, 1, &[0.002])]),
                at,
            );
        }
        {
            let inner = reports.inner.lock();
            assert!(inner.coarse.len() >= 4, "older than 5 min is in minutes");
            assert!(inner.fine.len() <= 6);
            assert_eq!(inner.entries, 10);
        }
        assert_eq!(reports.backend_stats("shop", "pay", "v1", t0).requests, 10);

        // An hour after the first report it is gone; the later ones are not.
        let later = t0 + RETENTION + Duration::from_secs(30);
        reports.add(
            "shop",
            &report("web", vec![route("cart", "v1", 1, 1, &[0.002])]),
            later,
        );
        assert_eq!(reports.backend_stats("shop", "pay", "v1", t0).requests, 9);
        // An hour after that, everything but the newest report is.
        let much_later = later + RETENTION;
        reports.add(
            "shop",
            &report("web", vec![route("cart", "v1", 1, 1, &[0.002])]),
            much_later,
        );
        assert_eq!(reports.backend_stats("shop", "pay", "v1", t0).requests, 0);
        assert_eq!(reports.backend_stats("shop", "cart", "v1", t0).requests, 1);
        assert_eq!(reports.inner.lock().entries, 1);
        // A report that arrives stamped before the retained hour is ignored.
        reports.add(
            "shop",
            &report("web", vec![route("pay", "v1", 1, 1, &[0.002])]),
            t0,
        );
        assert_eq!(reports.backend_stats("shop", "pay", "v1", t0).requests, 0);
    }

    #[test]
    fn too_many_entries_drop_the_oldest_buckets() {
        let reports = Reports::new();
        let t0 = Instant::now();
        let per_report = 10_000;
        let reports_needed = MAX_ENTRIES / per_report + 2;
        for n in 0..reports_needed {
            let routes = (0..per_report)
                .map(|i| route(&format!("svc{i}"), "v1", 1, 1, &[0.002]))
                .collect();
            reports.add("shop", &report("web", routes), t0 + 2 * S * n as u32);
        }
        let inner = reports.inner.lock();
        assert!(inner.entries <= MAX_ENTRIES, "{}", inner.entries);
        let kept: usize = inner.fine.iter().map(|b| b.routes.len()).sum();
        assert_eq!(kept, inner.entries);
        drop(inner);
        // The oldest windows are gone; the newest is whole.
        let oldest = reports.backend_stats("shop", "svc0", "v1", t0).requests;
        assert!(oldest < reports_needed as u64, "{oldest}");
        // The newest report is whole.
        let newest = t0 + 2 * S * (reports_needed as u32 - 1);
        assert_eq!(
            reports
                .backend_stats("shop", "svc9999", "v1", newest)
                .requests,
            1
        );
    }

    #[test]
    fn destinations_map_to_namespaces_by_the_reporters_own() {
        assert_eq!(destination("shop", "pay"), ("shop", "pay"));
        assert_eq!(destination("shop", "ledger.finance"), ("finance", "ledger"));
        let reports = Reports::new();
        let t0 = Instant::now();
        reports.add(
            "shop",
            &report(
                "web",
                vec![
                    route("pay", "v1", 3, 3, &[0.002]),
                    route("pay.billing", "v1", 4, 4, &[0.002]),
                ],
            ),
            t0,
        );
        assert_eq!(reports.backend_stats("shop", "pay", "v1", t0).requests, 3);
        assert_eq!(
            reports.backend_stats("billing", "pay", "v1", t0).requests,
            4
        );
        let billing = reports.route_stats(
            StatsFilter {
                namespace: Some("billing"),
                ..StatsFilter::default()
            },
            Some(t0),
        );
        assert_eq!(billing.len(), 1);
        assert_eq!(
            (billing[0].namespace.as_str(), billing[0].service.as_str()),
            ("billing", "pay")
        );
    }

    fn mismatch(unix_ms: i64, path: &str) -> ShadowMismatch {
        ShadowMismatch {
            unix_ms,
            method: "POST".into(),
            path: path.into(),
            primary_status: 200,
            shadow_status: 500,
            primary_digest: "aa".repeat(32),
            shadow_digest: "bb".repeat(32),
        }
    }

    #[test]
    fn shadow_totals_run_since_start_and_keep_the_latest_mismatches() {
        let reports = Reports::new();
        let t0 = Instant::now();
        for window in 0..3i64 {
            let stats = ShadowStats {
                destination: "pay".into(),
                route: "pay".into(),
                shadow: "v2".into(),
                mirrored: 10,
                matched: 2,
                status_mismatches: 8,
                dropped: 1,
                recent: (0..8)
                    .map(|i| mismatch(window * 100 + i, &format!("/{window}/{i}")))
                    .collect(),
                ..ShadowStats::default()
            };
            let report = ReportRequest {
                shadows: vec![stats],
                ..report("web", vec![])
            };
            reports.add("shop", &report, t0);
        }
        let rows = reports.shadows(Some("shop"), Some("pay"));
        let [row] = &rows[..] else {
            panic!("one mirror expected: {rows:?}")
        };
        assert_eq!(row.totals.mirrored, 30);
        assert_eq!(row.totals.status_mismatches, 24);
        assert_eq!(row.totals.dropped, 3);
        assert_eq!(row.recent.len(), RECENT_MISMATCHES);
        assert_eq!(row.recent.first().unwrap().path, "/0/4");
        assert_eq!(row.recent.last().unwrap().path, "/2/7");
        assert!(reports.shadows(Some("billing"), None).is_empty());
        // No route windows were sent: no buckets.
        assert_eq!(reports.inner.lock().entries, 0);
    }

    #[test]
    fn long_mismatch_texts_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MISMATCH_TEXT);
        let kept = cut(&long);
        assert!(kept.len() <= MAX_MISMATCH_TEXT && long.starts_with(&kept));
        assert_eq!(cut("/pay"), "/pay");
    }
}
