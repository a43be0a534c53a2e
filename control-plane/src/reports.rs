//! What the sidecars' `Discovery.Report` windows add up to: requests, successes and
//! latency per (service, route, backend) and caller over the last hour, for canary
//! analysis and `GET /v1/stats` (per route and backend, or per caller → service
//! edge); and what each route's mirror did since this process
//! started, for `GET /v1/shadows`. All in memory: a restart starts from nothing.
//!
//! Windows are filed by the time they arrive, in buckets: one second wide for the
//! last five minutes, then folded into one-minute buckets kept for an hour. A bucket
//! counts for a query when its newest report arrived at or after the query's `since`,
//! so a query may include up to one bucket width of older reports (a second, or a
//! minute for queries reaching further back than five minutes).
//!
//! Memory is bounded by time (an hour) and by count, and nothing already kept is
//! dropped to make room. At most `MAX_KEYS` (service, route, backend, caller) keys are
//! held; a report that would add a key beyond that is refused whole (`StatsFull`), and
//! keys free up as their last bucket ages out. Each key's names are stored once, shared
//! by the buckets it is in; an entry in a bucket is a fixed-size `Counts` (160 bytes
//! with its key pointer, up to twice that in a hash table just grown). A key is in at
//! most 61 minute buckets, and one-second buckets hold at most `MAX_FINE_ENTRIES`
//! entries in all: past that the oldest seconds are folded into their minute early,
//! losing precision, not data. So at worst some 5,000 × 1.7 KiB of names + 100,000 ×
//! 370 B + 5,000 × 61 × 370 B ≈ 160 MB. Shadow totals are kept for at most
//! `MAX_SHADOWS` route mirrors with `RECENT_MISMATCHES` mismatches each.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use trellis_api::{
    LATENCY_BOUNDS_SECONDS,
    discovery::v1::{ReportRequest, RouteStats, ShadowMismatch, ShadowStats},
};

/// Width of the recent buckets.
const FINE_WIDTH: Duration = Duration::from_secs(1);
/// How long reports stay in one-second buckets before they are folded into minutes.
const FINE_SPAN: Duration = Duration::from_secs(5 * 60);
/// Width of the older buckets.
const COARSE_WIDTH: Duration = Duration::from_secs(60);
/// How far back statistics reach.
pub(crate) const RETENTION: Duration = Duration::from_secs(3600);
/// (service, route, backend, caller) keys held across all buckets.
const MAX_KEYS: usize = 5_000;
/// Entries in the one-second buckets, all together; beyond, the oldest are folded early.
const MAX_FINE_ENTRIES: usize = 100_000;
/// Latency buckets: one per bound, and one for what was slower than every bound.
const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_SECONDS.len() + 1;
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
    /// Where the earliest window in the sums began: the counts cover from here to the
    /// latest report.
    pub(crate) covers_from: Instant,
}

/// One row of `GET /v1/stats?by=edge`: what one calling service sent to a service,
/// all routes and backends together, over a window.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EdgeRow {
    pub(crate) caller_namespace: String,
    pub(crate) caller: String,
    pub(crate) namespace: String,
    pub(crate) service: String,
    pub(crate) stats: BackendStats,
    /// As `RouteRow::covers_from`.
    pub(crate) covers_from: Instant,
}

/// One service as all its callers reported it over a window: every route, backend and
/// caller together, with the median as well (the dashboard's golden metrics).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServiceRow {
    pub(crate) namespace: String,
    pub(crate) service: String,
    pub(crate) stats: BackendStats,
    /// Estimated as `p99` is; `None` without requests.
    pub(crate) p50: Option<Duration>,
    /// As `RouteRow::covers_from`.
    pub(crate) covers_from: Instant,
}

/// A report refused because it would take the statistics past `MAX_KEYS` keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "statistics are full: they hold at most {MAX_KEYS} (service, route, backend, caller) \
     keys over the last hour and this report would add {new} more; keys free up as their \
     reports age out"
)]
pub struct StatsFull {
    /// Keys the report would have added.
    pub new: usize,
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
    /// Every key some bucket holds; a key whose only other holder is gone is removed.
    keys: HashSet<Arc<RouteKey>>,
    /// Whether the last report with new keys was refused, so that is logged once.
    full: bool,
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
    /// Where the earliest window in it began (arrival less the window's length).
    covers_from: Instant,
    routes: HashMap<Arc<RouteKey>, Counts>,
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

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    requests: u64,
    successes: u64,
    /// Per bucket of `LATENCY_BOUNDS_SECONDS` (not cumulative), then what was slower
    /// than every bound.
    latency: [u64; LATENCY_BUCKETS],
}

// === impl Reports ===

impl Reports {
    pub fn new() -> Self {
        Self::default()
    }

    /// One sidecar's window as received at `at` (already validated). `namespace` is
    /// the reporter's. Refused whole, changing nothing, when it would add keys past
    /// `MAX_KEYS`.
    pub fn add(
        &self,
        namespace: &str,
        report: &ReportRequest,
        at: Instant,
    ) -> Result<(), StatsFull> {
        let mut inner = self.inner.lock();
        inner.advance(at);
        if !report.routes.is_empty() && !inner.too_old(at) {
            let keys: Vec<RouteKey> = report
                .routes
                .iter()
                .map(|route| RouteKey::of(namespace, &report.service, route))
                .collect();
            let new = keys
                .iter()
                .filter(|key| !inner.keys.contains(*key))
                .collect::<HashSet<_>>()
                .len();
            if inner.keys.len() + new > MAX_KEYS {
                if !inner.full {
                    inner.full = true;
                    tracing::warn!(
                        held = inner.keys.len(),
                        new,
                        service = report.service,
                        namespace,
                        "statistics are full: reports with new keys are refused until older \
                         ones age out"
                    );
                }
                return Err(StatsFull { new });
            }
            if new > 0 {
                inner.full = false;
            }
            let keys: Vec<Arc<RouteKey>> = keys.into_iter().map(|key| inner.intern(key)).collect();
            let window = Duration::from_millis(u64::from(report.window_ms));
            let covers_from = at.checked_sub(window).unwrap_or(at);
            match inner.bucket_for(at) {
                Some(bucket) => {
                    bucket.covers_from = bucket.covers_from.min(covers_from);
                    for (key, route) in keys.into_iter().zip(&report.routes) {
                        let counts = Counts::from_report(route);
                        bucket
                            .routes
                            .entry(key)
                            .and_modify(|existing| existing.merge(&counts))
                            .or_insert(counts);
                    }
                }
                None => {
                    drop(keys);
                    inner.forget_unheld_keys();
                }
            }
            inner.enforce_fine_cap();
        }
        for stats in &report.shadows {
            inner.add_shadow(namespace, stats);
        }
        Ok(())
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
        let mut sums: HashMap<(&str, &str, &str, &str), (Counts, Instant)> = HashMap::new();
        let inner = self.inner.lock();
        for bucket in inner.since(since) {
            for (key, counts) in &bucket.routes {
                if filter.wants(key) {
                    let (sum, covers_from) = sums
                        .entry((&key.namespace, &key.service, &key.route, &key.backend))
                        .or_insert((Counts::default(), bucket.covers_from));
                    sum.merge(counts);
                    *covers_from = (*covers_from).min(bucket.covers_from);
                }
            }
        }
        let mut rows: Vec<RouteRow> = sums
            .into_iter()
            .map(
                |((namespace, service, route, backend), (counts, covers_from))| RouteRow {
                    namespace: namespace.to_string(),
                    service: service.to_string(),
                    route: route.to_string(),
                    backend: backend.to_string(),
                    stats: counts.stats(),
                    covers_from,
                },
            )
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

    /// Every caller → service edge that `filter` lets through, over the reports since
    /// `since` (`None`: all kept), summed over routes and backends, sorted by service
    /// then caller.
    pub(crate) fn edge_stats(
        &self,
        filter: StatsFilter<'_>,
        since: Option<Instant>,
    ) -> Vec<EdgeRow> {
        let mut sums: HashMap<(&str, &str, &str, &str), (Counts, Instant)> = HashMap::new();
        let inner = self.inner.lock();
        for bucket in inner.since(since) {
            for (key, counts) in &bucket.routes {
                if filter.wants(key) {
                    let (sum, covers_from) = sums
                        .entry((
                            &key.namespace,
                            &key.service,
                            &key.caller_namespace,
                            &key.caller,
                        ))
                        .or_insert((Counts::default(), bucket.covers_from));
                    sum.merge(counts);
                    *covers_from = (*covers_from).min(bucket.covers_from);
                }
            }
        }
        let mut rows: Vec<EdgeRow> = sums
            .into_iter()
            .map(
                |((namespace, service, caller_namespace, caller), (counts, covers_from))| EdgeRow {
                    caller_namespace: caller_namespace.to_string(),
                    caller: caller.to_string(),
                    namespace: namespace.to_string(),
                    service: service.to_string(),
                    stats: counts.stats(),
                    covers_from,
                },
            )
            .collect();
        drop(inner);
        rows.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.caller_namespace, &a.caller).cmp(&(
                &b.namespace,
                &b.service,
                &b.caller_namespace,
                &b.caller,
            ))
        });
        rows
    }

    /// Every service `filter` lets through, over the reports since `since` (`None`: all
    /// kept), summed over routes, backends and callers, sorted.
    pub(crate) fn service_stats(
        &self,
        filter: StatsFilter<'_>,
        since: Option<Instant>,
    ) -> Vec<ServiceRow> {
        let mut sums: HashMap<(&str, &str), (Counts, Instant)> = HashMap::new();
        let inner = self.inner.lock();
        for bucket in inner.since(since) {
            for (key, counts) in &bucket.routes {
                if filter.wants(key) {
                    let (sum, covers_from) = sums
                        .entry((&key.namespace, &key.service))
                        .or_insert((Counts::default(), bucket.covers_from));
                    sum.merge(counts);
                    *covers_from = (*covers_from).min(bucket.covers_from);
                }
            }
        }
        let mut rows: Vec<ServiceRow> = sums
            .into_iter()
            .map(|((namespace, service), (counts, covers_from))| ServiceRow {
                namespace: namespace.to_string(),
                service: service.to_string(),
                stats: counts.stats(),
                p50: counts.latency_quantile(0.5),
                covers_from,
            })
            .collect();
        drop(inner);
        rows.sort_by(|a, b| (&a.namespace, &a.service).cmp(&(&b.namespace, &b.service)));
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

impl StatsFilter<'_> {
    fn wants(&self, key: &RouteKey) -> bool {
        self.namespace.is_none_or(|ns| key.namespace == ns)
            && self.service.is_none_or(|s| key.service == s)
            && self.caller.is_none_or(|c| key.caller == c)
    }
}

/// The time a row's counts cover, for a rate: from where its earliest window began to
/// `now`, at most the `window` asked for (a bucket may reach a little further back),
/// and never zero.
pub(crate) fn covered_span(covers_from: Instant, now: Instant, window: Duration) -> Duration {
    now.saturating_duration_since(covers_from)
        .min(window)
        .max(Duration::from_millis(1))
}

/// The (namespace, service) a sidecar's config key names: `svc` in the reporter's own
/// namespace, `svc.ns` in another. Service names are DNS labels, without dots.
fn destination<'a>(reporter_namespace: &'a str, destination: &'a str) -> (&'a str, &'a str) {
    match destination.split_once('.') {
        Some((service, namespace)) => (namespace, service),
        None => (reporter_namespace, destination),
    }
}

// === impl RouteKey ===

impl RouteKey {
    /// The key `route` of a report by `caller` in `caller_namespace` counts under.
    fn of(caller_namespace: &str, caller: &str, route: &RouteStats) -> Self {
        let (namespace, service) = destination(caller_namespace, &route.destination);
        Self {
            namespace: namespace.to_string(),
            service: service.to_string(),
            route: route.route.clone(),
            backend: route.backend.clone(),
            caller_namespace: caller_namespace.to_string(),
            caller: caller.to_string(),
        }
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
                self.release(gone);
            }
        }
    }

    /// Whether a report arriving at `at` is older than everything kept.
    fn too_old(&self, at: Instant) -> bool {
        self.latest
            .is_some_and(|latest| latest.saturating_duration_since(at) >= RETENTION)
    }

    /// The shared copy of `key`, made the first time it is seen.
    fn intern(&mut self, key: RouteKey) -> Arc<RouteKey> {
        if let Some(held) = self.keys.get(&key) {
            return held.clone();
        }
        let key = Arc::new(key);
        self.keys.insert(key.clone());
        key
    }

    /// Drops a bucket, and the keys no other bucket holds.
    fn release(&mut self, gone: Bucket) {
        for key in gone.routes.into_keys() {
            // This bucket's and the set's: no other bucket holds it.
            if Arc::strong_count(&key) == 2 {
                self.keys.remove(&*key);
            }
        }
    }

    /// Removes keys no bucket holds (interned for a report that found no bucket).
    fn forget_unheld_keys(&mut self) {
        self.keys.retain(|key| Arc::strong_count(key) > 1);
    }

    /// Adds a one-second bucket to the minute it falls in.
    fn fold(&mut self, fine: Bucket) {
        match self.coarse.back_mut() {
            Some(minute) if fine.start < minute.start + COARSE_WIDTH => {
                minute.last = minute.last.max(fine.last);
                minute.covers_from = minute.covers_from.min(fine.covers_from);
                for (key, counts) in fine.routes {
                    minute
                        .routes
                        .entry(key)
                        .and_modify(|existing| existing.merge(&counts))
                        .or_insert(counts);
                }
            }
            _ => self.coarse.push_back(fine),
        }
    }

    /// The bucket a report arriving at `at` goes to; `None` when `at` is older than
    /// everything kept.
    fn bucket_for(&mut self, at: Instant) -> Option<&mut Bucket> {
        if self.too_old(at) {
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
            covers_from: at,
            routes: HashMap::new(),
        });
        self.fine.back_mut()
    }

    /// Folds the oldest one-second buckets into their minutes while the seconds hold
    /// more than `MAX_FINE_ENTRIES` entries: older counts lose precision, nothing is
    /// dropped. The newest second always stays.
    fn enforce_fine_cap(&mut self) {
        let mut fine_entries: usize = self.fine.iter().map(|b| b.routes.len()).sum();
        while fine_entries > MAX_FINE_ENTRIES && self.fine.len() > 1 {
            let Some(oldest) = self.fine.pop_front() else {
                return;
            };
            fine_entries -= oldest.routes.len();
            self.fold(oldest);
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
    /// From a report's cumulative counts (its bounds are `LATENCY_BOUNDS_SECONDS`, as
    /// checked on arrival); what `requests` has beyond the last count was slower than
    /// every bound.
    fn from_report(route: &RouteStats) -> Self {
        let mut latency = [0u64; LATENCY_BUCKETS];
        let mut below = 0u64;
        for (bucket, &cumulative) in latency.iter_mut().zip(&route.latency_bucket_counts) {
            *bucket = cumulative.saturating_sub(below);
            below = below.max(cumulative);
        }
        latency[LATENCY_BUCKETS - 1] = route.requests.saturating_sub(below);
        Self {
            requests: route.requests,
            successes: route.successes,
            latency,
        }
    }

    fn merge(&mut self, other: &Counts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.successes = self.successes.saturating_add(other.successes);
        for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
            *mine = mine.saturating_add(*theirs);
        }
    }

    fn stats(&self) -> BackendStats {
        BackendStats {
            requests: self.requests,
            successes: self.successes,
            p99: self.latency_quantile(0.99),
        }
    }

    /// The `q` latency quantile; `None` without requests.
    fn latency_quantile(&self, q: f64) -> Option<Duration> {
        if self.requests == 0 {
            return None;
        }
        quantile(&self.latency, q).and_then(|s| Duration::try_from_secs_f64(s).ok())
    }
}

/// The `q` quantile in seconds of per-bucket `counts`, as Prometheus'
/// `histogram_quantile`: linear within the bucket the rank falls in (from 0 for the
/// first), and the last bound when it falls beyond it. `None` without observations.
/// Summed in `u128`, so no count, however large, overflows.
fn quantile(counts: &[u64; LATENCY_BUCKETS], q: f64) -> Option<f64> {
    let total: u128 = counts.iter().map(|&n| u128::from(n)).sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u128;
    let mut lower = 0.0;
    for (&count, &bound) in counts.iter().zip(&LATENCY_BOUNDS_SECONDS) {
        let upto = below + u128::from(count);
        if count > 0 && upto as f64 >= rank {
            // Rounding at huge counts may put the rank a hair outside the bucket.
            let within = ((rank - below as f64) / count as f64).clamp(0.0, 1.0);
            return Some(lower + (bound - lower) * within);
        }
        below = upto;
        lower = bound;
    }
    LATENCY_BOUNDS_SECONDS.last().copied()
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

    const BOUNDS: [f64; 16] = LATENCY_BOUNDS_SECONDS;

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
        reports
            .add(
                "shop",
                &report(
                    "web",
                    vec![
                        route("pay", "v1", 90, 90, &[0.002]),
                        route("pay", "v2", 10, 9, &[0.002]),
                    ],
                ),
                t0,
            )
            .unwrap();
        let mut other_route = route("pay", "v2", 30, 30, &[0.002]);
        other_route.route = "testers".into();
        reports
            .add("shop", &report("order", vec![other_route]), t0 + S / 2)
            .unwrap();
        reports
            .add(
                "shop",
                &report("web", vec![route("pay", "v2", 5, 5, &[0.002])]),
                t0 + 3 * S,
            )
            .unwrap();

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
    fn edges_sum_every_route_and_backend_per_caller() {
        let reports = Reports::new();
        let t0 = Instant::now();
        let mut testers = route("pay", "v2", 30, 27, &[0.08]);
        testers.route = "testers".into();
        reports
            .add(
                "shop",
                &report(
                    "web",
                    vec![
                        route("pay", "v1", 90, 90, &[0.002]),
                        route("pay", "v2", 10, 9, &[0.002]),
                    ],
                ),
                t0,
            )
            .unwrap();
        reports
            .add("shop", &report("order", vec![testers]), t0 + S)
            .unwrap();
        reports
            .add(
                "billing",
                &report("ledger", vec![route("pay.shop", "v1", 4, 4, &[0.002])]),
                t0 + S,
            )
            .unwrap();
        reports
            .add(
                "shop",
                &report("web", vec![route("cart", "v1", 7, 7, &[0.002])]),
                t0 + 2 * S,
            )
            .unwrap();

        let edges = reports.edge_stats(StatsFilter::default(), Some(t0));
        let summary: Vec<_> = edges
            .iter()
            .map(|e| {
                (
                    format!("{}/{}", e.caller_namespace, e.caller),
                    format!("{}/{}", e.namespace, e.service),
                    e.stats.requests,
                    e.stats.successes,
                )
            })
            .collect();
        let edge = |from: &str, to: &str, requests, successes| {
            (from.to_string(), to.to_string(), requests, successes)
        };
        assert_eq!(
            summary,
            [
                edge("shop/web", "shop/cart", 7, 7),
                edge("billing/ledger", "shop/pay", 4, 4),
                edge("shop/order", "shop/pay", 30, 27),
                edge("shop/web", "shop/pay", 100, 99),
            ]
        );
        // order's calls were all slow: its p99 is its own, not diluted by web's.
        let order = &edges[2];
        assert!(
            order.stats.p99.unwrap() > Duration::from_millis(50),
            "{order:?}"
        );
        assert!(edges[3].stats.p99.unwrap() < Duration::from_millis(5));

        let to_pay_from_web = reports.edge_stats(
            StatsFilter {
                service: Some("pay"),
                caller: Some("web"),
                ..StatsFilter::default()
            },
            Some(t0),
        );
        assert_eq!(to_pay_from_web.len(), 1);
        assert_eq!(to_pay_from_web[0].stats.requests, 100);
        assert!(
            reports
                .edge_stats(StatsFilter::default(), Some(t0 + 3 * S))
                .is_empty()
        );
    }

    #[test]
    fn only_reports_since_the_given_time_count() {
        let reports = Reports::new();
        let t0 = Instant::now();
        reports
            .add(
                "shop",
                &report("web", vec![route("pay", "v2", 100, 0, &[0.002])]),
                t0,
            )
            .unwrap();
        reports
            .add(
                "shop",
                &report("web", vec![route("pay", "v2", 7, 7, &[0.002])]),
                t0 + 5 * S,
            )
            .unwrap();
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
        reports
            .add(
                "shop",
                &report("web", vec![route("pay", "v1", 100, 100, &latencies)]),
                t0,
            )
            .unwrap();
        let p99 = reports.backend_stats("shop", "pay", "v1", t0).p99.unwrap();
        assert!((p99.as_secs_f64() - 0.075).abs() < 1e-9, "{p99:?}");

        // All within the first bucket: from 0 to 1 ms, at 99%.
        reports
            .add(
                "shop",
                &report("web", vec![route("cart", "v1", 10, 10, &[0.0001])]),
                t0,
            )
            .unwrap();
        let p99 = reports.backend_stats("shop", "cart", "v1", t0).p99.unwrap();
        assert!((p99.as_secs_f64() - 0.00099).abs() < 1e-9, "{p99:?}");

        // Slower than the last bound: the last bound.
        reports
            .add(
                "shop",
                &report("web", vec![route("slow", "v1", 10, 10, &[400.0])]),
                t0,
            )
            .unwrap();
        let p99 = reports.backend_stats("shop", "slow", "v1", t0).p99.unwrap();
        assert_eq!(p99, Duration::from_secs(300));
    }

    #[test]
    fn counts_near_u64_max_saturate_and_still_give_a_p99() {
        let reports = Reports::new();
        let t0 = Instant::now();
        // Every bucket full: the histogram's total is 17 × u64::MAX, and two windows
        // of it add up to the same.
        let mut full = route("pay", "v1", 0, 0, &[0.0]);
        full.requests = u64::MAX;
        full.successes = u64::MAX;
        full.latency_bucket_counts = vec![u64::MAX; BOUNDS.len()];
        reports
            .add("shop", &report("web", vec![full.clone()]), t0)
            .unwrap();
        reports.add("shop", &report("web", vec![full]), t0).unwrap();
        let stats = reports.backend_stats("shop", "pay", "v1", t0);
        assert_eq!((stats.requests, stats.successes), (u64::MAX, u64::MAX));
        assert_eq!(stats.success_rate(), Some(100.0));
        // All in the first bucket: 99% of the way to 1 ms.
        let p99 = stats.p99.unwrap().as_secs_f64();
        assert!((p99 - 0.00099).abs() < 1e-9, "{p99}");

        let mut counts = [0u64; LATENCY_BUCKETS];
        counts[3] = u64::MAX;
        counts[16] = u64::MAX;
        // Half beyond the last bound: the last bound.
        assert_eq!(quantile(&counts, 0.99), Some(300.0));
        // The median is the last of the (5 ms, 10 ms] bucket.
        let median = quantile(&counts, 0.5).unwrap();
        assert!((median - 0.01).abs() < 1e-9, "{median}");
        assert_eq!(quantile(&[0; LATENCY_BUCKETS], 0.99), None);
    }

    #[test]
    fn old_buckets_are_folded_then_dropped_after_an_hour() {
        let reports = Reports::new();
        let t0 = Instant::now();
        for minute in 0..10u32 {
            let at = t0 + Duration::from_secs(60 * u64::from(minute));
            reports
                .add(
                    "shop",
                    &report("web", vec![route("pay", "v1", 1, 1, &[0.002])]),
                    at,
                )
                .unwrap();
        }
        {
            let inner = reports.inner.lock();
            assert!(inner.coarse.len() >= 4, "older than 5 min is in minutes");
            assert!(inner.fine.len() <= 6);
            assert_eq!(entries(&inner), 10);
            assert_eq!(inner.keys.len(), 1, "one key, shared by every bucket");
        }
        assert_eq!(reports.backend_stats("shop", "pay", "v1", t0).requests, 10);

        // An hour after the first report it is gone; the later ones are not.
        let later = t0 + RETENTION + Duration::from_secs(30);
        reports
            .add(
                "shop",
                &report("web", vec![route("cart", "v1", 1, 1, &[0.002])]),
                later,
            )
            .unwrap();
        assert_eq!(reports.backend_stats("shop", "pay", "v1", t0).requests, 9);
        // An hour after that, everything but the newest report is.
        let much_later = later + RETENTION;
        reports
            .add(
                "shop",
                &report("web", vec![route("cart", "v1", 1, 1, &[0.002])]),
                much_later,
            )
            .unwrap();
        assert_eq!(reports.backend_stats("shop", "pay", "v1", t0).requests, 0);
        assert_eq!(reports.backend_stats("shop", "cart", "v1", t0).requests, 1);
        assert_eq!(entries(&reports.inner.lock()), 1);
        assert_eq!(
            reports.inner.lock().keys.len(),
            1,
            "pay's key left with its buckets"
        );
        // A report that arrives stamped before the retained hour is ignored.
        reports
            .add(
                "shop",
                &report("web", vec![route("pay", "v1", 1, 1, &[0.002])]),
                t0,
            )
            .unwrap();
        assert_eq!(reports.backend_stats("shop", "pay", "v1", t0).requests, 0);
    }

    /// Entries across all buckets.
    fn entries(inner: &Inner) -> usize {
        inner
            .coarse
            .iter()
            .chain(&inner.fine)
            .map(|b| b.routes.len())
            .sum()
    }

    /// A report with one route to each of `services`, from `caller`.
    fn spread(caller: &str, services: std::ops::Range<usize>) -> ReportRequest {
        let routes = services
            .map(|i| route(&format!("svc{i}"), "v1", 1, 1, &[0.002]))
            .collect();
        report(caller, routes)
    }

    #[test]
    fn past_the_key_cap_new_keys_are_refused_and_what_is_kept_stays() {
        let reports = Reports::new();
        let t0 = Instant::now();
        reports
            .add("shop", &spread("web", 0..MAX_KEYS - 1), t0)
            .unwrap();
        // Two new keys where one fits: refused whole, nothing of it kept.
        let refused = reports
            .add("shop", &spread("order", 0..2), t0 + S)
            .unwrap_err();
        assert_eq!(refused, StatsFull { new: 2 });
        assert!(refused.to_string().contains("at most 5000"), "{refused}");
        assert_eq!(reports.inner.lock().keys.len(), MAX_KEYS - 1);
        assert_eq!(
            reports.route_stats(
                StatsFilter {
                    caller: Some("order"),
                    ..StatsFilter::default()
                },
                None,
            ),
            []
        );
        // One fits; after it, known keys are still counted, and the oldest data is whole.
        reports.add("shop", &spread("order", 0..1), t0 + S).unwrap();
        reports
            .add("shop", &spread("web", 0..MAX_KEYS - 1), t0 + 2 * S)
            .unwrap();
        assert_eq!(
            reports.add("shop", &spread("cart", 0..1), t0 + 3 * S),
            Err(StatsFull { new: 1 })
        );
        assert_eq!(reports.backend_stats("shop", "svc0", "v1", t0).requests, 3);
        assert_eq!(
            reports.backend_stats("shop", "svc4998", "v1", t0).requests,
            2
        );

        // Keys free up as their buckets age out.
        let later = t0 + RETENTION + 10 * S;
        reports.add("shop", &spread("cart", 0..1), later).unwrap();
        assert_eq!(reports.inner.lock().keys.len(), 1);
    }

    #[test]
    fn a_bucket_entry_is_as_small_as_the_memory_estimate_says() {
        // docs/control-plane.md's worst case is built on these.
        assert_eq!(size_of::<(Arc<RouteKey>, Counts)>(), 160);
        assert_eq!(size_of::<RouteKey>(), 6 * size_of::<String>());
    }

    #[test]
    fn too_many_one_second_entries_fold_early_into_minutes_losing_nothing() {
        let reports = Reports::new();
        let t0 = Instant::now();
        let per_report = 2_000;
        let seconds = MAX_FINE_ENTRIES / per_report + 5;
        for n in 0..seconds {
            reports
                .add("shop", &spread("web", 0..per_report), t0 + S * n as u32)
                .unwrap();
        }
        let inner = reports.inner.lock();
        let fine: usize = inner.fine.iter().map(|b| b.routes.len()).sum();
        assert!(fine <= MAX_FINE_ENTRIES, "{fine}");
        assert!(!inner.coarse.is_empty(), "the oldest seconds were folded");
        drop(inner);
        let all = reports.backend_stats("shop", "svc0", "v1", t0).requests;
        assert_eq!(all, seconds as u64, "nothing dropped");
    }

    #[test]
    fn a_rows_covered_span_starts_with_its_earliest_window_and_fits_the_query() {
        let reports = Reports::new();
        let t0 = Instant::now();
        let with_window = |routes, window_ms| ReportRequest {
            window_ms,
            ..report("web", routes)
        };
        // v1 reported twice, its first window 10 s long; v2 only later, over 2 s.
        let v1 = || vec![route("pay", "v1", 10, 10, &[0.002])];
        reports
            .add("shop", &with_window(v1(), 10_000), t0 + 10 * S)
            .unwrap();
        reports
            .add("shop", &with_window(v1(), 10_000), t0 + 20 * S)
            .unwrap();
        let v2 = vec![route("pay", "v2", 10, 10, &[0.002])];
        reports
            .add("shop", &with_window(v2, 2_000), t0 + 25 * S)
            .unwrap();
        let rows = reports.route_stats(StatsFilter::default(), None);
        let from: Vec<_> = rows.iter().map(|r| r.covers_from).collect();
        assert_eq!(from, [t0, t0 + 23 * S]);

        let now = t0 + 25 * S;
        let minute = Duration::from_secs(60);
        assert_eq!(covered_span(from[0], now, minute), 25 * S);
        assert_eq!(covered_span(from[1], now, minute), 2 * S);
        // A bucket reaching back past the window counts as the window.
        assert_eq!(covered_span(from[0], now, 5 * S), 5 * S);
        assert_eq!(covered_span(now, now, minute), Duration::from_millis(1));
    }

    #[test]
    fn destinations_map_to_namespaces_by_the_reporters_own() {
        assert_eq!(destination("shop", "pay"), ("shop", "pay"));
        assert_eq!(destination("shop", "ledger.finance"), ("finance", "ledger"));
        let reports = Reports::new();
        let t0 = Instant::now();
        reports
            .add(
                "shop",
                &report(
                    "web",
                    vec![
                        route("pay", "v1", 3, 3, &[0.002]),
                        route("pay.billing", "v1", 4, 4, &[0.002]),
                    ],
                ),
                t0,
            )
            .unwrap();
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
            reports.add("shop", &report, t0).unwrap();
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
        assert_eq!(entries(&reports.inner.lock()), 0);
    }

    #[test]
    fn long_mismatch_texts_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MISMATCH_TEXT);
        let kept = cut(&long);
        assert!(kept.len() <= MAX_MISMATCH_TEXT && long.starts_with(&kept));
        assert_eq!(cut("/pay"), "/pay");
    }
}
