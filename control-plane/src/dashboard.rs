//! The web dashboard on `--dashboard-addr` (docs/observability.md): a service graph of
//! the mesh, golden metrics per service, the canaries' weight and analysis over time,
//! shadow comparisons, endpoints, ejections and bulkheads. Read-only; loopback by
//! default, with no authentication of its own.
//!
//! One collector task builds a JSON snapshot every second from the same aggregations
//! the operator API serves (`Reports::edge_stats`, `service_stats`, `shadows`), the
//! registry, the canaries' stored statuses and the sidecars' own `/metrics` (ejected
//! endpoints and bulkhead pools are not in the reports; the registry knows each
//! sidecar's admin address). Every page reads that one snapshot, `GET /api/snapshot`,
//! or is pushed each new one over server-sent events on `/events`, so the cost does not
//! grow with the number of open pages.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use trellis_crds::{
    AnalysisResult, CanaryEvent, CanaryPhase, CanarySpec, CanaryStatus, DestinationPolicySpec,
};

use crate::{
    registry::{EndpointView, Registry},
    reports::{self, Reports, StatsFilter},
    source::ConfigSource,
    store::StoreError,
};

/// Points of weight and analysis kept per canary: six minutes at one a second.
pub const HISTORY_POINTS: usize = 360;
/// Canaries whose history is kept; more are shown without one.
const MAX_CANARY_HISTORIES: usize = 100;
/// How often a new snapshot is built and pushed.
const TICK: Duration = Duration::from_secs(1);
/// The window of the graph's and the table's numbers: short, so the page is live.
pub const WINDOW: Duration = Duration::from_secs(10);
/// How often the sidecars' `/metrics` are read.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(2);
/// How long one sidecar's `/metrics` may take before it counts as unreachable.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);
/// Sidecars read at once.
const SCRAPE_PARALLEL: usize = 32;
/// Sidecars read per round at most; a larger mesh shows the first ones, and says so.
const MAX_SCRAPED: usize = 500;
/// A `/metrics` page larger than this is not read.
const MAX_METRICS_BYTES: usize = 8 * 1024 * 1024;
/// Pages following `/events` at once; more are refused with 503.
const MAX_EVENT_CLIENTS: usize = 64;
/// Rows of ejected endpoints and bulkhead pools shown at most.
const MAX_ROWS: usize = 200;

const INDEX_HTML: &str = include_str!("../dashboard/index.html");
const APP_JS: &str = include_str!("../dashboard/app.js");
const STYLE_CSS: &str = include_str!("../dashboard/style.css");

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The collector's inputs and its latest snapshot.
pub struct Dashboard {
    reports: Arc<Reports>,
    registry: Arc<Registry>,
    source: Arc<dyn ConfigSource>,
    history: Mutex<CanaryHistory>,
    breakers: Mutex<Breakers>,
    /// The canaries as of the latest good read.
    canaries: Mutex<Vec<CanaryInfo>>,
    /// The DestinationPolicies as of the latest read, for bulkhead limits.
    policies: Mutex<Vec<(String, DestinationPolicySpec)>>,
    latest: watch::Sender<Bytes>,
    event_clients: AtomicUsize,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard").finish_non_exhaustive()
    }
}

// === the snapshot ===

/// Everything the page shows, as one JSON document.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Snapshot {
    pub(crate) generated_unix_ms: i64,
    pub(crate) window_seconds: f64,
    pub(crate) nodes: Vec<Node>,
    pub(crate) edges: Vec<Edge>,
    pub(crate) services: Vec<ServiceMetrics>,
    pub(crate) canaries: Vec<CanaryPanel>,
    pub(crate) shadows: Vec<ShadowPanel>,
    pub(crate) endpoints: Vec<EndpointRow>,
    pub(crate) breakers: Breakers,
}

/// A service in the graph: one that was called, called another, or has proxies.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Node {
    /// `namespace/service`.
    pub(crate) id: String,
    pub(crate) namespace: String,
    pub(crate) service: String,
    pub(crate) instances: usize,
    pub(crate) healthy_instances: usize,
}

/// Caller → service over the window, all routes and backends together.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Edge {
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) requests: u64,
    pub(crate) rps: f64,
    pub(crate) success_rate: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
}

/// A service's golden metrics as its callers' sidecars reported them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ServiceMetrics {
    pub(crate) id: String,
    pub(crate) namespace: String,
    pub(crate) service: String,
    pub(crate) requests: u64,
    pub(crate) rps: f64,
    pub(crate) success_rate: Option<f64>,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CanaryPanel {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) service: String,
    pub(crate) stable_subset: String,
    pub(crate) canary_subset: String,
    pub(crate) steps: Vec<u32>,
    pub(crate) phase: CanaryPhase,
    pub(crate) weight: u32,
    pub(crate) message: String,
    pub(crate) last_analysis: Option<AnalysisResult>,
    /// The controller's own record of what happened, oldest first.
    pub(crate) events: Vec<CanaryEvent>,
    /// Sampled here each second, oldest first, at most `HISTORY_POINTS`.
    pub(crate) series: Vec<CanaryPoint>,
}

/// The canary as it stood at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CanaryPoint {
    pub(crate) unix_ms: i64,
    pub(crate) weight: u32,
    pub(crate) phase: CanaryPhase,
    /// From the latest analysis at that moment.
    pub(crate) canary_success_rate: Option<f64>,
    pub(crate) stable_success_rate: Option<f64>,
    pub(crate) canary_p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ShadowPanel {
    pub(crate) namespace: String,
    pub(crate) service: String,
    pub(crate) route: String,
    pub(crate) shadow: String,
    pub(crate) mirrored: u64,
    pub(crate) matched: u64,
    pub(crate) status_mismatches: u64,
    pub(crate) body_mismatches: u64,
    pub(crate) shadow_errors: u64,
    pub(crate) dropped: u64,
    pub(crate) too_large: u64,
    /// Newest first.
    pub(crate) recent: Vec<Mismatch>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Mismatch {
    pub(crate) unix_ms: i64,
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) primary_status: u32,
    pub(crate) shadow_status: u32,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EndpointRow {
    pub(crate) namespace: String,
    pub(crate) service: String,
    pub(crate) instance: String,
    pub(crate) address: SocketAddr,
    pub(crate) version: Option<String>,
    /// As its own sidecar's heartbeats say.
    pub(crate) healthy: bool,
    /// Callers' sidecars whose circuit breaker keeps it out now.
    pub(crate) ejected_by: Vec<String>,
}

/// What the sidecars' `/metrics` said at the latest read.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Breakers {
    pub(crate) read_unix_ms: Option<i64>,
    /// Sidecars with an admin address, and how many of them answered.
    pub(crate) proxies: usize,
    pub(crate) answered: usize,
    pub(crate) ejected: Vec<Ejected>,
    /// Ejections since each sidecar started, all together.
    pub(crate) ejections_total: f64,
    pub(crate) bulkheads: Vec<BulkheadRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Ejected {
    /// The sidecar that ejected it: `service/instance`.
    pub(crate) by: String,
    pub(crate) service: String,
    pub(crate) endpoint: String,
}

/// One caller's pool towards a service, summed over the caller's instances.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BulkheadRow {
    pub(crate) caller: String,
    pub(crate) service: String,
    pub(crate) pool: String,
    pub(crate) in_flight: f64,
    pub(crate) queued: f64,
    pub(crate) rejected_total: f64,
    /// `maxConcurrentRequests` per caller instance, from the DestinationPolicy.
    pub(crate) max_concurrent: Option<u32>,
    /// The fullest caller instance's share of its slots, in percent.
    pub(crate) saturation: Option<f64>,
}

/// A canary as stored: its spec and the controller's status.
#[derive(Debug, Clone)]
pub(crate) struct CanaryInfo {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) spec: CanarySpec,
    pub(crate) status: Option<CanaryStatus>,
}

/// Each canary's recent weight and analysis, sampled once a tick.
#[derive(Debug, Default)]
pub(crate) struct CanaryHistory {
    series: BTreeMap<(String, String), VecDeque<CanaryPoint>>,
}

impl CanaryHistory {
    /// Adds one point per canary; the history of a canary that is gone is dropped.
    pub(crate) fn record(&mut self, canaries: &[CanaryInfo], unix_ms: i64) {
        self.series.retain(|(namespace, name), _| {
            canaries
                .iter()
                .any(|c| &c.namespace == namespace && &c.name == name)
        });
        for canary in canaries {
            let key = (canary.namespace.clone(), canary.name.clone());
            if !self.series.contains_key(&key) && self.series.len() >= MAX_CANARY_HISTORIES {
                continue;
            }
            let status = canary.status.clone().unwrap_or_default();
            let analysis = status.last_analysis.as_ref();
            let point = CanaryPoint {
                unix_ms,
                weight: status.weight,
                phase: status.phase,
                canary_success_rate: analysis.and_then(|a| a.canary.success_rate),
                stable_success_rate: analysis.and_then(|a| a.stable.success_rate),
                canary_p99_ms: analysis.and_then(|a| a.canary.p99_ms),
            };
            let series = self.series.entry(key).or_default();
            series.push_back(point);
            while series.len() > HISTORY_POINTS {
                series.pop_front();
            }
        }
    }

    fn series(&self, namespace: &str, name: &str) -> Vec<CanaryPoint> {
        self.series
            .get(&(namespace.to_string(), name.to_string()))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn id(namespace: &str, service: &str) -> String {
    format!("{namespace}/{service}")
}

/// The snapshot of `reports` over the `WINDOW` before `now`, with the registry's
/// `endpoints`, the stored `canaries` and the latest read of the sidecars.
pub(crate) fn build(
    reports: &Reports,
    endpoints: &[EndpointView],
    canaries: &[CanaryInfo],
    history: &CanaryHistory,
    breakers: &Breakers,
    now: Instant,
    unix_ms: i64,
) -> Snapshot {
    let since = now.checked_sub(WINDOW);
    let rate = |requests: u64, covers_from: Instant| {
        requests as f64 / reports::covered_span(covers_from, now, WINDOW).as_secs_f64()
    };
    let edges: Vec<Edge> = reports
        .edge_stats(StatsFilter::default(), since)
        .into_iter()
        .map(|row| Edge {
            from: id(&row.caller_namespace, &row.caller),
            to: id(&row.namespace, &row.service),
            requests: row.stats.requests,
            rps: rate(row.stats.requests, row.covers_from),
            success_rate: row.stats.success_rate(),
            p99_ms: row.stats.p99.map(millis),
        })
        .collect();
    let services: Vec<ServiceMetrics> = reports
        .service_stats(StatsFilter::default(), since)
        .into_iter()
        .map(|row| ServiceMetrics {
            id: id(&row.namespace, &row.service),
            requests: row.stats.requests,
            rps: rate(row.stats.requests, row.covers_from),
            success_rate: row.stats.success_rate(),
            p50_ms: row.p50.map(millis),
            p99_ms: row.stats.p99.map(millis),
            namespace: row.namespace,
            service: row.service,
        })
        .collect();

    fn node<'a>(
        nodes: &'a mut BTreeMap<String, Node>,
        namespace: &str,
        service: &str,
    ) -> &'a mut Node {
        nodes.entry(id(namespace, service)).or_insert_with(|| Node {
            id: id(namespace, service),
            namespace: namespace.to_string(),
            service: service.to_string(),
            instances: 0,
            healthy_instances: 0,
        })
    }
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for endpoint in endpoints {
        let n = node(&mut nodes, &endpoint.namespace, &endpoint.service);
        n.instances += 1;
        n.healthy_instances += usize::from(endpoint.healthy);
    }
    for service in &services {
        node(&mut nodes, &service.namespace, &service.service);
    }
    let edge_ends: Vec<(String, String)> = edges
        .iter()
        .flat_map(|e| [e.from.clone(), e.to.clone()])
        .filter_map(|end| {
            end.split_once('/')
                .map(|(ns, s)| (ns.to_string(), s.to_string()))
        })
        .collect();
    for (namespace, service) in &edge_ends {
        node(&mut nodes, namespace, service);
    }

    let mut ejected_by: HashMap<&str, Vec<String>> = HashMap::new();
    for e in &breakers.ejected {
        ejected_by
            .entry(e.endpoint.as_str())
            .or_default()
            .push(e.by.clone());
    }
    let endpoints = endpoints
        .iter()
        .map(|e| EndpointRow {
            namespace: e.namespace.clone(),
            service: e.service.clone(),
            instance: e.instance.clone(),
            address: e.address,
            version: e.labels.get("version").cloned(),
            healthy: e.healthy,
            ejected_by: ejected_by
                .get(e.address.to_string().as_str())
                .cloned()
                .unwrap_or_default(),
        })
        .collect();

    let canaries = canaries
        .iter()
        .map(|c| {
            let status = c.status.clone().unwrap_or_default();
            CanaryPanel {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
                service: c.spec.service.clone(),
                stable_subset: c.spec.stable_subset.clone(),
                canary_subset: c.spec.canary_subset.clone(),
                steps: c.spec.steps.clone(),
                phase: status.phase,
                weight: status.weight,
                message: status.message,
                last_analysis: status.last_analysis,
                events: status.history,
                series: history.series(&c.namespace, &c.name),
            }
        })
        .collect();

    let shadows = reports
        .shadows(None, None)
        .into_iter()
        .map(|row| ShadowPanel {
            mirrored: row.totals.mirrored,
            matched: row.totals.matched,
            status_mismatches: row.totals.status_mismatches,
            body_mismatches: row.totals.body_mismatches,
            shadow_errors: row.totals.shadow_errors,
            dropped: row.totals.dropped,
            too_large: row.totals.too_large,
            recent: row
                .recent
                .iter()
                .rev()
                .map(|m| Mismatch {
                    unix_ms: m.unix_ms,
                    method: m.method.clone(),
                    path: m.path.clone(),
                    primary_status: m.primary_status,
                    shadow_status: m.shadow_status,
                })
                .collect(),
            namespace: row.namespace,
            service: row.service,
            route: row.route,
            shadow: row.shadow,
        })
        .collect();

    // Every sidecar has pools for every service it may call: show those it does call,
    // and any that holds, queues or refused requests.
    let mut breakers = breakers.clone();
    breakers.bulkheads.retain(|pool| {
        let namespace = pool.caller.split_once('/').map_or("", |(ns, _)| ns);
        let (service, namespace) = pool
            .service
            .split_once('.')
            .unwrap_or((&pool.service, namespace));
        let to = id(namespace, service);
        pool.in_flight > 0.0
            || pool.queued > 0.0
            || pool.rejected_total > 0.0
            || edges.iter().any(|e| e.from == pool.caller && e.to == to)
    });

    Snapshot {
        generated_unix_ms: unix_ms,
        window_seconds: WINDOW.as_secs_f64(),
        nodes: nodes.into_values().collect(),
        edges,
        services,
        canaries,
        shadows,
        endpoints,
        breakers,
    }
}

// === reading the sidecars ===

/// A sidecar to read: who it is and where its admin server listens.
#[derive(Debug, Clone)]
struct Scraped {
    namespace: String,
    service: String,
    instance: String,
    admin: SocketAddr,
}

/// What one sidecar's `/metrics` says about breakers and bulkheads.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct SidecarMetrics {
    /// (service, endpoint) ejected now.
    pub(crate) ejected: Vec<(String, String)>,
    pub(crate) ejections: f64,
    /// (service, pool) → (in flight, queued, rejected so far).
    pub(crate) bulkheads: BTreeMap<(String, String), (f64, f64, f64)>,
}

/// The breaker and bulkhead samples of a sidecar's Prometheus text.
pub(crate) fn sidecar_metrics(text: &str) -> SidecarMetrics {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let Ok(scrape) = prometheus_parse::Scrape::parse(lines) else {
        return SidecarMetrics::default();
    };
    let mut out = SidecarMetrics::default();
    for sample in scrape.samples {
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let label = |name: &str| sample.labels.get(name).unwrap_or_default().to_string();
        match sample.metric.as_str() {
            "trellis_endpoint_ejected" if value >= 1.0 => {
                out.ejected.push((label("service"), label("endpoint")));
            }
            "trellis_endpoint_ejections_total" => out.ejections += value,
            "trellis_bulkhead_in_flight" => {
                out.bulkheads
                    .entry((label("service"), label("pool")))
                    .or_default()
                    .0 += value;
            }
            "trellis_bulkhead_queued" => {
                out.bulkheads
                    .entry((label("service"), label("pool")))
                    .or_default()
                    .1 += value;
            }
            "trellis_bulkhead_rejected_total" => {
                out.bulkheads
                    .entry((label("service"), label("pool")))
                    .or_default()
                    .2 += value;
            }
            _ => {}
        }
    }
    out
}

async fn fetch_metrics(admin: SocketAddr) -> Option<String> {
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(admin).await.ok()?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .ok()?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::get("/metrics")
            .header(header::HOST, admin.to_string())
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = Limited::new(response.into_body(), MAX_METRICS_BYTES)
            .collect()
            .await
            .ok()?
            .to_bytes();
        String::from_utf8(body.to_vec()).ok()
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
        .await
        .ok()
        .flatten()
}

/// The limit of `pool` in the policy of `service` as a sidecar in `namespace` names it
/// (`svc` in its own namespace, `svc.ns` in another).
fn pool_limit(
    policies: &[(String, DestinationPolicySpec)],
    namespace: &str,
    service: &str,
    pool: &str,
) -> Option<u32> {
    let (service, namespace) = service.split_once('.').unwrap_or((service, namespace));
    policies
        .iter()
        .find(|(ns, spec)| ns == namespace && spec.service == service)
        .and_then(|(_, spec)| spec.bulkheads.iter().find(|b| b.name == pool))
        .map(|b| b.max_concurrent_requests)
}

/// The breakers and bulkheads of every sidecar read, put together.
fn combine(
    read: &[(Scraped, Option<SidecarMetrics>)],
    policies: &[(String, DestinationPolicySpec)],
    unix_ms: i64,
) -> Breakers {
    let mut breakers = Breakers {
        read_unix_ms: Some(unix_ms),
        proxies: read.len(),
        ..Breakers::default()
    };
    // (caller, service, pool) → sums and the fullest instance's in-flight count.
    let mut pools: BTreeMap<(String, String, String), (BulkheadRow, f64)> = BTreeMap::new();
    for (sidecar, metrics) in read {
        let Some(metrics) = metrics else { continue };
        breakers.answered += 1;
        breakers.ejections_total += metrics.ejections;
        let by = format!("{}/{}", sidecar.service, sidecar.instance);
        for (service, endpoint) in &metrics.ejected {
            breakers.ejected.push(Ejected {
                by: by.clone(),
                service: service.clone(),
                endpoint: endpoint.clone(),
            });
        }
        for ((service, pool), (in_flight, queued, rejected)) in &metrics.bulkheads {
            let caller = id(&sidecar.namespace, &sidecar.service);
            let (row, fullest) = pools
                .entry((caller.clone(), service.clone(), pool.clone()))
                .or_insert_with(|| {
                    let limit = pool_limit(policies, &sidecar.namespace, service, pool);
                    (
                        BulkheadRow {
                            caller,
                            service: service.clone(),
                            pool: pool.clone(),
                            in_flight: 0.0,
                            queued: 0.0,
                            rejected_total: 0.0,
                            max_concurrent: limit,
                            saturation: None,
                        },
                        0.0,
                    )
                });
            row.in_flight += in_flight;
            row.queued += queued;
            row.rejected_total += rejected;
            *fullest = fullest.max(*in_flight);
        }
    }
    breakers
        .ejected
        .sort_by(|a, b| (&a.service, &a.endpoint, &a.by).cmp(&(&b.service, &b.endpoint, &b.by)));
    breakers.ejected.truncate(MAX_ROWS);
    breakers.bulkheads = pools
        .into_values()
        .map(|(mut row, fullest)| {
            row.saturation = row
                .max_concurrent
                .map(|max| (100.0 * fullest / f64::from(max.max(1))).min(100.0));
            row
        })
        .take(MAX_ROWS)
        .collect();
    breakers
}

/// Reads `sidecars` a few at a time; `None` for each that did not answer in time.
async fn read_sidecars(sidecars: Vec<Scraped>) -> Vec<(Scraped, Option<SidecarMetrics>)> {
    let mut read = Vec::with_capacity(sidecars.len());
    for chunk in sidecars.chunks(SCRAPE_PARALLEL) {
        let mut set = tokio::task::JoinSet::new();
        for (index, sidecar) in chunk.iter().enumerate() {
            let admin = sidecar.admin;
            set.spawn(async move {
                let text = fetch_metrics(admin).await;
                (index, text.map(|t| sidecar_metrics(&t)))
            });
        }
        let mut answers: Vec<Option<SidecarMetrics>> = chunk.iter().map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            if let Ok((index, metrics)) = joined
                && let Some(slot) = answers.get_mut(index)
            {
                *slot = metrics;
            }
        }
        read.extend(chunk.iter().cloned().zip(answers));
    }
    read
}

// === the collector and the server ===

fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

type Stored = (Vec<CanaryInfo>, Vec<(String, DestinationPolicySpec)>);

/// The canaries and policies as the config source has them: the store in universal
/// mode, the cluster's objects in kubernetes mode.
fn read_source(source: &dyn ConfigSource) -> Result<Stored, StoreError> {
    let (_, mut resources) = source.resources()?;
    let canaries = resources
        .take_canaries()
        .into_iter()
        .map(|(namespace, name, canary, status)| CanaryInfo {
            namespace,
            name,
            spec: canary.spec,
            status,
        })
        .collect();
    let policies = resources
        .policies
        .into_iter()
        .map(|policy| {
            (
                policy
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                policy.spec,
            )
        })
        .collect();
    Ok((canaries, policies))
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        "x-content-type-options",
        http::HeaderValue::from_static("nosniff"),
    );
    // Everything the page needs comes from here; nothing may be loaded from elsewhere.
    headers.insert(
        "content-security-policy",
        http::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    response
}

/// Whether a `Host` header names this machine by address or as `localhost`. The
/// dashboard answers only those: a web page elsewhere that points its own
/// name at 127.0.0.1 (DNS rebinding) must not read the mesh through a browser.
fn local_host(host: Option<&str>) -> bool {
    // HTTP/1.0 may send no Host; a browser always does.
    let Some(host) = host else { return true };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Counts a page following `/events` until its stream is dropped.
struct EventClient(Arc<Dashboard>);

impl Drop for EventClient {
    fn drop(&mut self) {
        self.0.event_clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Dashboard {
    pub fn new(
        reports: Arc<Reports>,
        registry: Arc<Registry>,
        source: Arc<dyn ConfigSource>,
    ) -> Self {
        Self {
            reports,
            registry,
            source,
            history: Mutex::default(),
            canaries: Mutex::default(),
            breakers: Mutex::default(),
            policies: Mutex::default(),
            latest: watch::Sender::new(Bytes::new()),
            event_clients: AtomicUsize::new(0),
        }
    }

    /// Builds a snapshot every second until `shutdown`; the sidecars are read by a
    /// task of their own, so slow ones never hold a snapshot back.
    pub async fn collect(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(self.clone().read_sidecars_loop(shutdown.clone()));
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let source = self.source.clone();
            let read = match tokio::task::spawn_blocking(move || read_source(source.as_ref())).await
            {
                Ok(Ok(read)) => Some(read),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "the dashboard could not read canaries");
                    None
                }
                Err(error) => {
                    tracing::warn!(%error, "the dashboard's read of canaries failed");
                    None
                }
            };
            // A failed read keeps the canaries (and their history) of the last good one.
            if let Some((canaries, policies)) = read {
                *self.policies.lock() = policies;
                *self.canaries.lock() = canaries;
            }
            let canaries = self.canaries.lock().clone();
            self.publish(&canaries);
        }
    }

    /// Reads every sidecar's `/metrics` every `SCRAPE_INTERVAL` until `shutdown`.
    async fn read_sidecars_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SCRAPE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let sidecars: Vec<Scraped> = self
                .registry
                .proxies()
                .into_iter()
                .filter_map(|p| {
                    Some(Scraped {
                        admin: p.admin?,
                        namespace: p.namespace,
                        service: p.service,
                        instance: p.instance,
                    })
                })
                .take(MAX_SCRAPED)
                .collect();
            let read = tokio::select! {
                () = shutdown.cancelled() => return,
                read = read_sidecars(sidecars) => read,
            };
            let policies = self.policies.lock().clone();
            *self.breakers.lock() = combine(&read, &policies, unix_ms_now());
        }
    }

    fn publish(&self, canaries: &[CanaryInfo]) {
        let unix_ms = unix_ms_now();
        let breakers = self.breakers.lock().clone();
        let snapshot = {
            let mut history = self.history.lock();
            history.record(canaries, unix_ms);
            build(
                &self.reports,
                &self.registry.endpoints(),
                canaries,
                &history,
                &breakers,
                Instant::now(),
                unix_ms,
            )
        };
        match serde_json::to_vec(&snapshot) {
            Ok(bytes) => {
                self.latest.send_replace(Bytes::from(bytes));
            }
            Err(error) => tracing::error!(%error, "the dashboard snapshot did not serialize"),
        }
    }

    /// Serves the page until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, _) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "dashboard accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let dashboard = self.clone();
            let shutdown = shutdown.clone();
            let service = hyper::service::service_fn(move |req| {
                let dashboard = dashboard.clone();
                let shutdown = shutdown.clone();
                async move { Ok::<_, Infallible>(dashboard.handle(&req, &shutdown)) }
            });
            tokio::spawn(async move {
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tcp), service);
                if let Err(error) = served.await {
                    tracing::debug!(%error, "dashboard connection ended with an error");
                }
            });
        }
    }

    fn handle(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        shutdown: &CancellationToken,
    ) -> Response<Body> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok());
        // Whatever the bind address: a port-forward or tunnel makes any address loopback.
        if !local_host(host) {
            return respond(
                StatusCode::FORBIDDEN,
                "text/plain; charset=utf-8",
                "the dashboard answers only to localhost or an IP address in the Host \
                 header; behind a proxy, have it send one\n",
            );
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut response = respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "the dashboard is read-only: GET only\n",
            );
            response
                .headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match req.uri().path() {
            "/" | "/index.html" => respond(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML),
            "/app.js" => respond(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS),
            "/style.css" => respond(StatusCode::OK, "text/css; charset=utf-8", STYLE_CSS),
            "/api/snapshot" => {
                let latest = self.latest.borrow().clone();
                if latest.is_empty() {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "application/json",
                        r#"{"error":"the first snapshot is being built; try again in a second"}"#,
                    )
                } else {
                    respond(StatusCode::OK, "application/json", latest)
                }
            }
            "/events" => self.events(shutdown),
            path => respond(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                format!("no such page: {path}\n"),
            ),
        }
    }

    /// Server-sent events: the latest snapshot at once, then each new one.
    fn events(self: &Arc<Self>, shutdown: &CancellationToken) -> Response<Body> {
        if self.event_clients.fetch_add(1, Ordering::Relaxed) >= MAX_EVENT_CLIENTS {
            self.event_clients.fetch_sub(1, Ordering::Relaxed);
            return respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("at most {MAX_EVENT_CLIENTS} pages may follow the dashboard at once\n"),
            );
        }
        let client = EventClient(self.clone());
        let mut updates = self.latest.subscribe();
        let shutdown = shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
        tokio::spawn(async move {
            let _client = client;
            // The page reconnects after this long if the stream breaks.
            let mut first = true;
            loop {
                let snapshot = updates.borrow_and_update().clone();
                if !snapshot.is_empty() {
                    let mut event = Vec::with_capacity(snapshot.len() + 32);
                    if first {
                        event.extend_from_slice(b"retry: 2000\n");
                        first = false;
                    }
                    event.extend_from_slice(b"data: ");
                    event.extend_from_slice(&snapshot);
                    event.extend_from_slice(b"\n\n");
                    if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    changed = updates.changed() => if changed.is_err() { return },
                }
            }
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut response = Response::new(BodyExt::boxed_unsync(body));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(
            header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        response
    }
}

/// The URL of a dashboard bound to `addr`: an unspecified address is reached on
/// loopback from this machine.
pub fn url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}/", SocketAddr::new(ip, addr.port()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is a failed test

    use std::collections::BTreeMap;

    use trellis_api::{
        LATENCY_BOUNDS_SECONDS,
        discovery::v1::{ReportRequest, RouteStats},
    };
    use trellis_crds::{Analysis, SubsetStats};

    use super::*;

    /// `requests` to `destination`, `successes` of them fine, all taking `latency` s.
    fn route(destination: &str, requests: u64, successes: u64, latency: f64) -> RouteStats {
        RouteStats {
            destination: destination.into(),
            route: "default".into(),
            backend: destination.into(),
            requests,
            successes,
            latency_bounds_seconds: LATENCY_BOUNDS_SECONDS.to_vec(),
            latency_bucket_counts: LATENCY_BOUNDS_SECONDS
                .iter()
                .map(|&b| if latency <= b { requests } else { 0 })
                .collect(),
        }
    }

    fn report(service: &str, routes: Vec<RouteStats>) -> ReportRequest {
        ReportRequest {
            service: service.into(),
            namespace: "shop".into(),
            instance: format!("{service}-1"),
            window_ms: 1000,
            routes,
            ..ReportRequest::default()
        }
    }

    fn endpoint(service: &str, port: u16, healthy: bool) -> EndpointView {
        EndpointView {
            service: service.into(),
            namespace: "shop".into(),
            instance: format!("{service}-{port}"),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            identity: format!("spiffe://cluster.local/ns/shop/sa/{service}"),
            labels: BTreeMap::from([("version".to_string(), "v1".to_string())]),
            healthy,
        }
    }

    fn canary(weight: u32, success: Option<f64>) -> CanaryInfo {
        CanaryInfo {
            namespace: "shop".into(),
            name: "pay".into(),
            spec: CanarySpec {
                service: "pay".into(),
                stable_subset: "v1".into(),
                canary_subset: "v2".into(),
                steps: vec![10, 50, 100],
                interval: "5s".into(),
                analysis: Analysis {
                    min_success_rate: 99.0,
                    max_p99_latency: "500ms".into(),
                    min_requests: 5,
                },
            },
            status: Some(CanaryStatus {
                phase: CanaryPhase::Progressing,
                weight,
                last_analysis: success.map(|rate| AnalysisResult {
                    at: "2026-01-01T00:00:00Z".into(),
                    weight,
                    canary: SubsetStats {
                        requests: 10,
                        success_rate: Some(rate),
                        p99_ms: Some(3.0),
                    },
                    stable: SubsetStats::default(),
                    verdict: "passed".into(),
                }),
                ..CanaryStatus::default()
            }),
        }
    }

    #[test]
    fn the_graph_has_a_node_per_service_and_an_edge_per_caller() {
        let reports = Reports::new();
        let t0 = Instant::now();
        reports
            .add(
                "shop",
                &report("gateway", vec![route("web", 40, 40, 0.004)]),
                t0,
            )
            .unwrap();
        reports
            .add(
                "shop",
                &report(
                    "web",
                    vec![route("pay", 10, 5, 0.2), route("cart", 20, 20, 0.001)],
                ),
                t0,
            )
            .unwrap();
        // A service with a proxy and no traffic is in the graph too.
        let endpoints = [
            endpoint("web", 1, true),
            endpoint("pay", 2, true),
            endpoint("pay", 3, false),
            endpoint("idle", 4, true),
        ];
        let snapshot = build(
            &reports,
            &endpoints,
            &[],
            &CanaryHistory::default(),
            &Breakers::default(),
            t0 + Duration::from_millis(500),
            0,
        );
        let ids: Vec<&str> = snapshot.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "shop/cart",
                "shop/gateway",
                "shop/idle",
                "shop/pay",
                "shop/web"
            ]
        );
        let pay = snapshot.nodes.iter().find(|n| n.service == "pay").unwrap();
        assert_eq!((pay.instances, pay.healthy_instances), (2, 1));

        let edge = |from: &str, to: &str| {
            snapshot
                .edges
                .iter()
                .find(|e| e.from == from && e.to == to)
                .unwrap_or_else(|| panic!("no edge {from} -> {to}: {:?}", snapshot.edges))
        };
        let to_pay = edge("shop/web", "shop/pay");
        assert_eq!(to_pay.requests, 10);
        assert_eq!(to_pay.success_rate, Some(50.0));
        // The window began a second before the report arrived: 10 requests over 1.5 s.
        assert!((to_pay.rps - 10.0 / 1.5).abs() < 0.01, "{to_pay:?}");
        assert!(to_pay.p99_ms.unwrap() > 100.0, "{to_pay:?}");
        assert_eq!(edge("shop/gateway", "shop/web").success_rate, Some(100.0));
        assert_eq!(snapshot.edges.len(), 3);

        let web = snapshot
            .services
            .iter()
            .find(|s| s.service == "web")
            .unwrap();
        assert_eq!(web.requests, 40);
        let (p50, p99) = (web.p50_ms.unwrap(), web.p99_ms.unwrap());
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= 5.0, "{web:?}");

        // Reports older than the window are out of the graph's numbers.
        let later = build(
            &reports,
            &endpoints,
            &[],
            &CanaryHistory::default(),
            &Breakers::default(),
            t0 + WINDOW + Duration::from_secs(5),
            0,
        );
        assert!(later.edges.is_empty(), "{:?}", later.edges);
        assert_eq!(later.nodes.len(), 3, "only the registered services remain");
    }

    #[test]
    fn canary_history_is_bounded_and_follows_the_canaries() {
        let mut history = CanaryHistory::default();
        for i in 0..(HISTORY_POINTS as i64 + 40) {
            let weight = u32::try_from(i % 100).unwrap();
            history.record(&[canary(weight, Some(99.5))], i * 1000);
        }
        let series = history.series("shop", "pay");
        assert_eq!(series.len(), HISTORY_POINTS);
        // The oldest points went first.
        assert_eq!(series[0].unix_ms, 40_000);
        assert_eq!(
            series.last().unwrap().unix_ms,
            (HISTORY_POINTS as i64 + 39) * 1000
        );
        assert_eq!(series.last().unwrap().canary_success_rate, Some(99.5));

        let snapshot = build(
            &Reports::new(),
            &[],
            &[canary(50, None)],
            &history,
            &Breakers::default(),
            Instant::now(),
            0,
        );
        let panel = &snapshot.canaries[0];
        assert_eq!((panel.weight, panel.series.len()), (50, HISTORY_POINTS));

        // A deleted canary's history goes with it.
        history.record(&[], 0);
        assert!(history.series("shop", "pay").is_empty());
    }

    #[test]
    fn breakers_and_bulkheads_come_from_the_sidecars_metrics() {
        let text = "# TYPE trellis_endpoint_ejected gauge\n\
            trellis_endpoint_ejected{service=\"pay\",endpoint=\"127.0.0.1:2\"} 1\n\
            trellis_endpoint_ejected{service=\"pay\",endpoint=\"127.0.0.1:3\"} 0\n\
            # TYPE trellis_endpoint_ejections_total counter\n\
            trellis_endpoint_ejections_total{service=\"pay\",endpoint=\"127.0.0.1:2\"} 3\n\
            # TYPE trellis_bulkhead_in_flight gauge\n\
            trellis_bulkhead_in_flight{service=\"pay\",pool=\"critical\"} 3\n\
            # TYPE trellis_bulkhead_queued gauge\n\
            trellis_bulkhead_queued{service=\"pay\",pool=\"critical\"} 1\n\
            # TYPE trellis_bulkhead_rejected_total counter\n\
            trellis_bulkhead_rejected_total{service=\"pay\",pool=\"critical\"} 7\n";
        let metrics = sidecar_metrics(text);
        assert_eq!(
            metrics.ejected,
            [("pay".to_string(), "127.0.0.1:2".to_string())]
        );
        assert_eq!(metrics.ejections, 3.0);
        let policy: DestinationPolicySpec = serde_json::from_value(serde_json::json!({
            "service": "pay",
            "bulkheads": [{"name": "critical", "maxConcurrentRequests": 4}],
        }))
        .unwrap();
        let sidecar = |instance: &str| Scraped {
            namespace: "shop".into(),
            service: "web".into(),
            instance: instance.into(),
            admin: SocketAddr::from(([127, 0, 0, 1], 9)),
        };
        let read = vec![
            (sidecar("web-1"), Some(metrics)),
            (sidecar("web-2"), Some(sidecar_metrics(text))),
            (sidecar("web-3"), None),
        ];
        let breakers = combine(&read, &[("shop".into(), policy)], 5);
        assert_eq!((breakers.proxies, breakers.answered), (3, 2));
        assert_eq!(breakers.ejections_total, 6.0);
        assert_eq!(breakers.ejected.len(), 2);
        let pool = &breakers.bulkheads[0];
        assert_eq!(
            (pool.in_flight, pool.queued, pool.rejected_total),
            (6.0, 2.0, 14.0)
        );
        assert_eq!(pool.max_concurrent, Some(4));
        assert_eq!(pool.saturation, Some(75.0));

        let snapshot = build(
            &Reports::new(),
            &[endpoint("pay", 2, true), endpoint("pay", 3, true)],
            &[],
            &CanaryHistory::default(),
            &breakers,
            Instant::now(),
            0,
        );
        assert_eq!(snapshot.endpoints[0].ejected_by, ["web/web-1", "web/web-2"]);
        assert!(snapshot.endpoints[1].ejected_by.is_empty());
        assert_eq!(snapshot.breakers.bulkheads.len(), 1, "a busy pool is shown");

        // An idle pool is shown only while its caller calls the service.
        let idle = sidecar_metrics(
            &text
                .replace("} 3\n", "} 0\n")
                .replace("} 1\n", "} 0\n")
                .replace("} 7\n", "} 0\n"),
        );
        let breakers = combine(&[(sidecar("web-1"), Some(idle))], &[], 5);
        assert_eq!(breakers.bulkheads[0].in_flight, 0.0);
        let quiet = |reports: &Reports| {
            build(
                reports,
                &[],
                &[],
                &CanaryHistory::default(),
                &breakers,
                Instant::now(),
                0,
            )
            .breakers
            .bulkheads
        };
        assert!(quiet(&Reports::new()).is_empty());
        let reports = Reports::new();
        reports
            .add(
                "shop",
                &report("web", vec![route("pay", 5, 5, 0.001)]),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(quiet(&reports).len(), 1);
    }

    #[test]
    fn only_local_host_names_are_answered() {
        for host in [
            None,
            Some("localhost"),
            Some("LOCALHOST:15015"),
            Some("127.0.0.1:15015"),
            Some("[::1]:15015"),
            Some("10.0.0.7"),
        ] {
            assert!(local_host(host), "{host:?}");
        }
        for host in [Some("evil.example:15015"), Some("evil.example"), Some("")] {
            assert!(!local_host(host), "{host:?}");
        }
    }

    #[test]
    fn urls_of_unspecified_addresses_point_at_loopback() {
        assert_eq!(
            url(SocketAddr::from(([0, 0, 0, 0], 15015))),
            "http://127.0.0.1:15015/"
        );
        assert_eq!(
            url(SocketAddr::from(([127, 0, 0, 1], 80))),
            "http://127.0.0.1:80/"
        );
    }
}
