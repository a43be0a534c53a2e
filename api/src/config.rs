//! The proxy configuration model: what a sidecar needs to route traffic. The control
//! plane compiles it and pushes it; in static mode a sidecar reads it from a file.
//! Field names are camelCase, as in the CRDs, and unknown fields are refused so a
//! typo is an error rather than silently lost config.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

/// Everything routing-related a sidecar runs with, as one versioned snapshot.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Opaque version; the sidecar reports it in metrics and `/config`.
    #[serde(default)]
    pub version: String,
    /// Whether the inbound listener also accepts plaintext.
    #[serde(default)]
    pub mtls: MtlsMode,
    /// Destinations the local app may call, by service name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
    /// Who may call the local app.
    #[serde(default)]
    pub inbound: InboundConfig,
    /// Span export (MeshConfig `tracing`); absent: the sidecar exports only when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingConfig>,
}

/// Where spans go and how many new traces are recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces (no sampled parent) recorded, 0 to 1; a caller's
    /// decision is kept.
    #[serde(default = "default_sampling_ratio")]
    pub sampling_ratio: f64,
}

fn default_sampling_ratio() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Only mTLS from mesh identities.
    #[default]
    Strict,
    /// mTLS, and plaintext from workloads outside the mesh (during a migration).
    Permissive,
}

/// One destination service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceConfig {
    /// The namespace the service lives in; `name.<namespace>` also resolves to it.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Named groups of endpoints, by label selector (DestinationPolicy `subsets`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subsets: BTreeMap<String, BTreeMap<String, String>>,
    /// TrafficRoute rules, first match wins; a request no rule matches goes to all
    /// endpoints of the service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// Per-endpoint outlier ejection; none: endpoints are never ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Named concurrency pools routes choose with `bulkhead`; a route naming none
    /// uses `default`, unbounded unless listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bulkheads: Vec<BulkheadConfig>,
    /// Retries allowed on top of requests; the default (ratio 0.2, 10/s) when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Failures in a row (5xx, connect errors, resets) that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection's length; each repeated ejection doubles it.
    pub base_ejection_time: String,
    /// The longest an ejection grows to.
    pub max_ejection_time: String,
    /// Never eject more than this share (0..=100) of the service's endpoints.
    pub max_ejection_percent: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkheadConfig {
    pub name: String,
    pub max_concurrent_requests: u32,
    /// How many may wait for a slot; beyond, 503 bulkhead-full at once.
    #[serde(default)]
    pub max_pending_requests: u32,
    /// How long one may wait; none: as long as the route's timeout allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_time: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Retries allowed per request sent recently (0..=1).
    pub ratio: f64,
    /// Retries allowed per second regardless of the ratio.
    pub min_retries_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_retries_per_second: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetriesConfig {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// Each try's deadline; none: only the route's timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// `5xx`, `gateway-error`, `connect-failure`, `reset`, or a status code; empty
    /// means `connect-failure` and `gateway-error`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    /// Full-jitter exponential backoff between `base` and `max` (default 25ms, 250ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffConfig>,
    /// Retry POST, PATCH and other non-idempotent methods too.
    #[serde(default)]
    pub allow_non_idempotent: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackoffConfig {
    pub base: String,
    pub max: String,
}

/// Chaos on purpose: delay or fail a share of a route's requests in the caller's sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelayConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbortConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelayConfig {
    pub duration: String,
    /// 0..=100.
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbortConfig {
    pub status: u16,
    /// 0..=100.
    pub percent: f64,
}

/// One TrafficRoute rule, as the sidecar runs it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteConfig {
    /// The rule's name, or its index; a metrics label.
    pub name: String,
    #[serde(default)]
    pub matches: RouteMatchConfig,
    /// Where matching requests go, by weight; empty means the whole service.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// The whole request's deadline, e.g. `2s`; past it the client gets a 504.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetriesConfig>,
    /// The service's bulkhead pool this route's requests take a slot of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultConfig>,
    /// A copy of a share of the requests, sent to a shadow whose answers are discarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorConfig>,
}

/// Where copies of a route's requests go, and whether the shadow's answers are compared
/// with the primary's. Exactly one of `service` and `subset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MirrorConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Share of the route's requests copied, 0..=100.
    pub percent: f64,
    /// Compare the shadow's status and body digest with the primary's.
    #[serde(default)]
    pub compare: bool,
    /// JSON fields left out of the body comparison (`id`, `meta.timestamp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore_fields: Vec<String>,
    /// Requests with larger bodies are not mirrored; none: `DEFAULT_MIRROR_BODY_BYTES`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u32>,
}

/// How much of a request body a mirror copies when the route does not say.
pub const DEFAULT_MIRROR_BODY_BYTES: u32 = 64 * 1024;

/// Every condition given must hold; an empty match matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatchConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatchConfig>,
}

/// Exactly one of `exact`, `prefix`, `regex`; none means "present".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatchConfig {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A subset of the route's service, or another service of this config (by its key in
/// `services`); the share of traffic is `weight` over the rule's total.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    pub weight: u32,
}

/// Inbound authorization: which callers the local app accepts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundConfig {
    /// What happens to a caller no rule allows.
    #[serde(default)]
    pub default: AuthorizationDefault,
    /// Allow rules (AuthorizationPolicy); a request any rule matches is allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<AllowConfig>,
    /// Local rate limit of the service's own sidecars (DestinationPolicy `rateLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
}

/// A token bucket per sidecar: `requestsPerSecond` refill, `burst` capacity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConfig {
    pub requests_per_second: u32,
    pub burst: u32,
    /// One bucket per caller SPIFFE id instead of one for all.
    #[serde(default)]
    pub per_source: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthorizationDefault {
    /// No AuthorizationPolicy for this service and MeshConfig says allow.
    #[default]
    Allow,
    Deny,
}

/// One allow rule: a caller matching any `from` doing any `to`. An empty list matches all.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<SourceConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<OperationConfig>,
}

/// A caller: an exact SPIFFE id, or any identity of a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Methods and paths (a trailing `*` matches a prefix, otherwise exact); empty: any.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperationConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// One instance of a destination: its sidecar's inbound address and the SPIFFE id
/// that sidecar must present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    pub identity: String,
    /// The instance's labels (e.g. `version: v2`); subsets select on them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl ProxyConfig {
    /// The encoding carried in `ConfigPush.config_json`.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings, numbers and maps always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a pushed config; the error names the field (`services.payment...`).
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

pub fn default_namespace() -> String {
    "default".to_string()
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            namespace: default_namespace(),
            endpoints: Vec::new(),
            subsets: BTreeMap::new(),
            routes: Vec::new(),
            circuit_breaker: None,
            bulkheads: Vec::new(),
            retry_budget: None,
        }
    }
}
