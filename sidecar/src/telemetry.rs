//! Logs, metrics and request correlation. Metrics go to a Prometheus recorder the
//! admin server renders; every request gets one access-log line, an `x-request-id`
//! and a W3C `traceparent`.

use std::{
    collections::{HashMap, HashSet},
    sync::LazyLock,
    time::Duration,
};

use http::{HeaderMap, HeaderValue, StatusCode};
use metrics::Counter;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::RwLock;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::{
    args::LogFormat,
    http::REQUEST_ID,
    traffic::{RouteKey, RouteNames},
};

pub const REQUESTS: &str = "trellis_requests_total";
pub const REQUEST_DURATION: &str = "trellis_request_duration_seconds";
pub const TCP_OPEN: &str = "trellis_tcp_connections_open";
pub const TLS_ERRORS: &str = "trellis_tls_handshake_errors_total";
pub const CONTROL_PLANE_CONNECTED: &str = "trellis_control_plane_connected";
pub const CONFIG_UPDATES: &str = "trellis_config_updates_total";
pub const CERT_RENEWALS: &str = "trellis_certificate_renewals_total";
/// Rendered from the credentials and the config in force at scrape time, so they are
/// exact in both modes and an old config version leaves no series behind.
pub const CERT_EXPIRY: &str = "trellis_certificate_expiry_timestamp_seconds";
pub const CONFIG_VERSION: &str = "trellis_config_version_info";
/// `trellis_build_info{component,version} 1`: which build runs, in which mode.
pub const BUILD_INFO: &str = "trellis_build_info";
pub const ROUTE_BACKEND_REQUESTS: &str = "trellis_route_backend_requests_total";

/// Fine enough below a millisecond, where a sidecar's own cost lives.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("--log {filter:?}: {e}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
            )
            .try_init(),
        LogFormat::Text => registry.with(fmt::layer()).try_init(),
    };
    result.map_err(|e| e.to_string())
}

pub fn install_metrics() -> Result<PrometheusHandle, String> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), DURATION_BUCKETS)
        .map_err(|e| e.to_string())?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    metrics::describe_counter!(
        ROUTE_BACKEND_REQUESTS,
        "Outbound requests by destination service, matching route, backend (subset or service) and status"
    );
    metrics::describe_counter!(
        REQUESTS,
        "HTTP requests handled, by direction and status code"
    );
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from request to response headers"
    );
    metrics::describe_gauge!(TCP_OPEN, "Opaque TCP connections being proxied");
    metrics::describe_counter!(TLS_ERRORS, "Refused or failed TLS handshakes, by reason");
    metrics::describe_gauge!(
        CONTROL_PLANE_CONNECTED,
        "1 while the Discovery stream to the control plane is open"
    );
    metrics::describe_counter!(
        CONFIG_UPDATES,
        "Configs pushed by the control plane, by result (ack: in force, nack: refused)"
    );
    metrics::describe_counter!(
        CERT_RENEWALS,
        "Certify requests (the first certificate and renewals), by result"
    );
    describe_resilience();
    describe_shadow();
    Ok(handle)
}

/// HELP lines of the resilience layers' metrics (docs/resilience.md).
fn describe_resilience() {
    use crate::outbound::{bulkhead, fault, outlier, retry};
    metrics::describe_counter!(
        retry::RETRIES,
        "Retries sent, by destination service and the condition that caused them"
    );
    metrics::describe_counter!(
        retry::BUDGET_EXHAUSTED,
        "Failures returned without a retry because the retry budget was spent"
    );
    metrics::describe_counter!(
        outlier::EJECTIONS,
        "Times an endpoint was ejected by the circuit breaker"
    );
    metrics::describe_gauge!(bulkhead::IN_FLIGHT, "Requests holding a bulkhead slot");
    metrics::describe_gauge!(bulkhead::QUEUED, "Requests waiting for a bulkhead slot");
    metrics::describe_gauge!(
        bulkhead::CAPACITY,
        "A bulkhead's maxConcurrentRequests: in_flight / capacity is its saturation"
    );
    metrics::describe_counter!(
        bulkhead::REJECTED,
        "Requests refused with 503 bulkhead-full"
    );
    metrics::describe_counter!(
        fault::INJECTED,
        "Requests delayed or aborted by a route's fault injection, by kind"
    );
}

/// HELP lines of the mirrors' metrics (docs/shadow.md).
fn describe_shadow() {
    use crate::outbound::mirror;
    metrics::describe_counter!(
        mirror::SHADOW_REQUESTS,
        "Requests a route's mirror took, by outcome: mirrored (copy sent), dropped (the mirror's pool was full) or too_large (body over maxBodyBytes)"
    );
    metrics::describe_counter!(
        mirror::SHADOW_COMPARISONS,
        "Copies of a compare: true mirror by result: match, status_mismatch, body_mismatch, shadow_error (no answer from the shadow) or dropped"
    );
}

/// The gauges that describe current state rather than events, in Prometheus text, to
/// append to the recorder's output. `component`: `sidecar` or `gateway`.
pub fn render_state(
    component: &str,
    config_version: &str,
    cert_not_after: Option<std::time::SystemTime>,
) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "# HELP {BUILD_INFO} The running build: component (sidecar or gateway) and version\n\
         # TYPE {BUILD_INFO} gauge\n{BUILD_INFO}{{component=\"{component}\",version=\"{}\"}} 1\n\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(not_after) = cert_not_after {
        let unix = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let _ = write!(
            out,
            "# HELP {CERT_EXPIRY} When the SVID in use expires (notAfter), unix seconds\n\
             # TYPE {CERT_EXPIRY} gauge\n{CERT_EXPIRY} {unix}\n\n"
        );
    }
    if !config_version.is_empty() {
        let _ = write!(
            out,
            "# HELP {CONFIG_VERSION} The config version in force\n\
             # TYPE {CONFIG_VERSION} gauge\n{CONFIG_VERSION}{{version=\"{}\"}} 1\n\n",
            label_value(config_version)
        );
    }
    out
}

/// Escapes a Prometheus label value.
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// An RFC 3339 timestamp for logs and `/certs`.
pub fn rfc3339(at: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Which way a request crosses this sidecar.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// Distinct `peer_service` values a sidecar labels its requests with; callers beyond
/// them are counted as `other`. Peers are services of the mesh (verified identities or
/// configured destinations), so only a mesh of more services than this reaches it.
pub const MAX_PEER_SERVICES: usize = 256;

/// The `peer_service` values in use, for the cap.
static PEER_SERVICES: LazyLock<RwLock<HashSet<String>>> = LazyLock::new(RwLock::default);

/// `peer`, or `other` once `MAX_PEER_SERVICES` others are in use.
pub fn bounded_peer(peer: &str) -> &str {
    {
        let peers = PEER_SERVICES.read();
        if peers.contains(peer) {
            return peer;
        }
        // Full: no write lock on every request from a peer beyond the cap.
        if peers.len() >= MAX_PEER_SERVICES {
            return "other";
        }
    }
    let mut peers = PEER_SERVICES.write();
    if peers.len() < MAX_PEER_SERVICES {
        peers.insert(peer.to_string());
        return peer;
    }
    if peers.contains(peer) { peer } else { "other" }
}

/// Counts one finished request. Labels are bounded: service names from config, peer
/// names from verified mesh identities (capped: `bounded_peer`), status codes (three
/// digits).
pub fn record_request(
    direction: Direction,
    service: &str,
    peer_service: &str,
    status: StatusCode,
    elapsed: Duration,
) {
    let labels = [
        ("direction", direction.as_str().to_string()),
        ("service", service.to_string()),
        ("peer_service", bounded_peer(peer_service).to_string()),
    ];
    metrics::histogram!(REQUEST_DURATION, &labels).record(elapsed.as_secs_f64());
    let code = ("code", status.as_u16().to_string());
    let [a, b, c] = labels;
    metrics::counter!(REQUESTS, &[a, b, c, code]).increment(1);
}

/// How an outbound request through a route ended, for its route and backend counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteOutcome {
    /// Response headers came back; `mesh_error`: the mesh's own (`x-trellis-error`).
    Answered {
        status: StatusCode,
        mesh_error: bool,
    },
    /// The client went away (HTTP/2 reset, closed connection) before the response
    /// headers: a failure, since a backend too slow to wait for is not a healthy one.
    ClientGone,
}

/// The status counted for `RouteOutcome::ClientGone`: nginx's "client closed request".
pub const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => panic!("499 is a valid status code"),
};

/// Handles of `trellis_route_backend_requests_total` by (service, route, backend) and
/// code, found with borrowed names: `counter!` would allocate the four label values on
/// every request. As bounded as the series themselves.
static ROUTE_BACKEND_COUNTERS: LazyLock<RwLock<HashMap<RouteKey, HashMap<u16, Counter>>>> =
    LazyLock::new(RwLock::default);

/// Counts one outbound request by the route that matched and the backend (subset or
/// service) that served it, for splits and canaries; and enters it in the ledger the
/// control plane is sent. Routes and backends come from config, so labels stay bounded.
pub fn record_route_backend(
    service: &str,
    route: &str,
    backend: &str,
    outcome: RouteOutcome,
    elapsed: Duration,
) {
    let (code, success) = match outcome {
        RouteOutcome::Answered { status, mesh_error } => {
            (status, !status.is_server_error() && !mesh_error)
        }
        RouteOutcome::ClientGone => (CLIENT_CLOSED, false),
    };
    let names = (service, route, backend);
    let code = code.as_u16();
    let counted = ROUTE_BACKEND_COUNTERS
        .read()
        .get(&names as &dyn RouteNames)
        .and_then(|codes| codes.get(&code))
        .map(|counter| counter.increment(1))
        .is_some();
    if !counted {
        let counter = metrics::counter!(
            ROUTE_BACKEND_REQUESTS,
            "service" => service.to_string(),
            "route" => route.to_string(),
            "backend" => backend.to_string(),
            "code" => code.to_string(),
        );
        counter.increment(1);
        ROUTE_BACKEND_COUNTERS
            .write()
            .entry(RouteKey::new(names))
            .or_default()
            .insert(code, counter);
    }
    crate::traffic::global().record_route(service, route, backend, success, elapsed);
}

pub fn record_tls_error(direction: Direction, reason: &'static str) {
    metrics::counter!(TLS_ERRORS, "direction" => direction.as_str(), "reason" => reason)
        .increment(1);
}

/// Ensures the request carries an `x-request-id` (kept when present). Returns it for
/// the access log. `traceparent` is the hop's span's (`crate::trace`).
pub fn correlate(headers: &mut HeaderMap) -> HeaderValue {
    match headers.get(REQUEST_ID) {
        Some(id) if !id.is_empty() => id.clone(),
        _ => {
            let id = hex_id(16);
            headers.insert(REQUEST_ID, id.clone());
            id
        }
    }
}

/// `bytes` random bytes as lowercase hex: ids, not secrets.
pub fn random_hex(bytes: usize) -> String {
    hex(bytes)
}

fn hex(bytes: usize) -> String {
    use std::fmt::Write;
    (0..bytes).fold(String::with_capacity(bytes * 2), |mut s, _| {
        let _ = write!(s, "{:02x}", fastrand::u8(..));
        s
    })
}

fn hex_id(bytes: usize) -> HeaderValue {
    HeaderValue::from_str(&hex(bytes)).unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_gauges_render_as_prometheus_text() {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let text = render_state("gateway", "v\"1\\", Some(at));
        assert!(
            text.contains("trellis_certificate_expiry_timestamp_seconds 1700000000\n"),
            "{text}"
        );
        assert!(
            text.contains("trellis_config_version_info{version=\"v\\\"1\\\\\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "trellis_build_info{{component=\"gateway\",version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        let bare = render_state("sidecar", "", None);
        assert!(
            !bare.contains(CONFIG_VERSION) && !bare.contains(CERT_EXPIRY),
            "{bare}"
        );
        assert_eq!(random_hex(4).len(), 8);
    }

    #[test]
    fn peer_services_beyond_the_cap_are_counted_as_other() {
        let kept: Vec<String> = (0..MAX_PEER_SERVICES + 10)
            .map(|i| format!("cap-test-{i}"))
            .filter(|peer| bounded_peer(peer) == peer)
            .collect();
        assert!(!kept.is_empty() && kept.len() <= MAX_PEER_SERVICES);
        assert_eq!(bounded_peer("cap-test-never-seen"), "other");
        assert!(kept.iter().all(|peer| bounded_peer(peer) == peer));
    }

    #[test]
    fn request_id_is_kept_or_made() {
        let mut headers = HeaderMap::new();
        let made = correlate(&mut headers);
        assert_eq!(made.len(), 32);
        assert_eq!(headers[REQUEST_ID], made);
        let kept = correlate(&mut headers);
        assert_eq!(kept, made);
    }
}
