//! `DestinationPolicy`: how callers treat one service — its subsets, load balancing,
//! circuit breaking, bulkheads, connection pool and retry budget — and how much the
//! service's own sidecars let in (rate limit).

use std::{collections::BTreeMap, time::Duration};

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ResourceStatus;
use trellis_api::duration::DurationError;

use crate::validation::{Checker, Invalid};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    derive = "PartialEq",
    kind = "DestinationPolicy",
    status = "ResourceStatus",
    namespaced,
    shortname = "dp",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationPolicySpec {
    /// The service this policy is for.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub service: String,
    /// Named groups of endpoints by labels, e.g. `v1`, `v2`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    // A list keyed by name: the apiserver refuses duplicate names, as `validate` does.
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Named concurrency pools; routes pick one (default pool: `default`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub bulkheads: Vec<Bulkhead>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// How many retries callers may send: `ratio` of recent requests plus
    /// `minRetriesPerSecond`. When absent: ratio 0.2 plus 10 retries per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
    /// Inbound rate limit, a token bucket in each of the service's own sidecars: over
    /// it, 429 with `retry-after`. None by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub name: String,
    /// Endpoints whose labels include all of these.
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency.
    #[default]
    P2cEwma,
    RoundRobin,
    LeastRequest,
}

/// Per-endpoint outlier ejection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
// CEL's duration() reads Go durations, which have no `d` unit: a value in days is left
// to the Rust check rather than failing the rule with an evaluation error.
#[x_kube(
    validation = Rule::new(
        "!has(self.maxEjectionTime) || self.baseEjectionTime.contains('d') \
         || self.maxEjectionTime.contains('d') \
         || duration(self.maxEjectionTime) >= duration(self.baseEjectionTime)"
    )
    .message("maxEjectionTime must not be shorter than baseEjectionTime")
)]
pub struct CircuitBreaker {
    /// Failures in a row (5xx or connect errors) that eject an endpoint.
    #[schemars(range(min = 1))]
    pub consecutive_failures: u32,
    /// How often ejections are reconsidered, e.g. `10s`.
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub interval: String,
    /// First ejection's length; it grows with repeated ejections of the same endpoint.
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub base_ejection_time: String,
    /// Never eject more than this share of endpoints.
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: u32,
    /// The longest an ejection grows to, however often an endpoint is ejected; at least
    /// `baseEjectionTime`. Default: 10 × `baseEjectionTime`. Without a cap, an endpoint
    /// that failed often would stay out long after it recovered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub max_ejection_time: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bulkhead {
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub name: String,
    #[schemars(range(min = 1))]
    pub max_concurrent_requests: u32,
    /// Requests that may wait for a slot; beyond this, 503 bulkhead-full.
    #[serde(default)]
    pub max_pending_requests: u32,
    /// How long a request may wait for a slot, e.g. `50ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub max_pending_time: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections_per_endpoint: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub idle_timeout: Option<String>,
}

/// Retries allowed per destination: `ratio` of recent requests plus a floor per second,
/// so retries cannot multiply the load on a service that is already failing. A policy
/// without one gets `RetryBudget::default()`: ratio 0.2 plus 10 retries per second.
/// A budget that is given but leaves out `minRetriesPerSecond` has a floor of 0.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries as a share of recent requests, 0 to 1, e.g. `0.2` for one in five.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ratio: f64,
    /// Retries allowed per second whatever the ratio, so a quiet service can still
    /// retry; 0 when left out (10 only when the whole budget is absent).
    #[serde(default)]
    pub min_retries_per_second: u32,
}

/// Inbound local rate limit: a token bucket in each of the service's own sidecars,
/// refilled at `requestsPerSecond` and holding at most `burst` tokens. Each sidecar
/// counts alone, so N replicas let in up to N times the rate. A request that finds the
/// bucket empty is answered 429 with `retry-after` and never reaches the app.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate per sidecar, at least 1.
    #[schemars(range(min = 1))]
    pub requests_per_second: u32,
    /// Requests that may arrive at once after a quiet spell, at least 1; default
    /// `requestsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
    /// false: one bucket shared by all callers. true: a bucket per caller SPIFFE id, so
    /// one noisy caller cannot starve the others (callers without an id share one).
    #[serde(default)]
    pub per_source: bool,
}

// === impl RetryBudget ===

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_retries_per_second: 10,
        }
    }
}

// === impl RateLimit ===

impl RateLimit {
    /// The bucket size: `burst`, or `requestsPerSecond` when it is not given.
    pub fn burst_or_default(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_second)
    }
}

// === impl CircuitBreaker ===

impl CircuitBreaker {
    /// What `maxEjectionTime` defaults to, as a multiple of `baseEjectionTime`.
    pub const DEFAULT_MAX_EJECTION_FACTOR: u32 = 10;

    /// The cap on an ejection: `maxEjectionTime`, or 10 × `baseEjectionTime` when it is
    /// not given. Errors only on a duration `validate` refuses.
    pub fn max_ejection_time_or_default(&self) -> Result<Duration, DurationError> {
        match &self.max_ejection_time {
            Some(max) => trellis_api::duration::parse(max),
            None => Ok(trellis_api::duration::parse(&self.base_ejection_time)?
                .saturating_mul(Self::DEFAULT_MAX_EJECTION_FACTOR)),
        }
    }
}

// === impl DestinationPolicySpec ===

impl DestinationPolicySpec {
    pub fn validate(&self, name: &str) -> Result<(), Invalid> {
        let mut check = Checker::default();
        check.name("spec.service", &self.service);
        check.unique("spec.subsets", self.subsets.iter().map(|s| s.name.as_str()));
        for (i, subset) in self.subsets.iter().enumerate() {
            check.name(&format!("spec.subsets[{i}].name"), &subset.name);
            if subset.labels.is_empty() {
                check.fail(
                    format!("spec.subsets[{i}].labels"),
                    "must select at least one label",
                );
            }
        }
        if let Some(cb) = &self.circuit_breaker {
            check.at_least(
                "spec.circuitBreaker.consecutiveFailures",
                cb.consecutive_failures,
                1,
            );
            check.duration("spec.circuitBreaker.interval", &cb.interval);
            check.duration(
                "spec.circuitBreaker.baseEjectionTime",
                &cb.base_ejection_time,
            );
            check.range(
                "spec.circuitBreaker.maxEjectionPercent",
                f64::from(cb.max_ejection_percent),
                0.0,
                100.0,
            );
            if let Some(max) = &cb.max_ejection_time {
                check.duration("spec.circuitBreaker.maxEjectionTime", max);
                let (base, max) = (
                    trellis_api::duration::parse(&cb.base_ejection_time),
                    trellis_api::duration::parse(max),
                );
                if let (Ok(base), Ok(max)) = (base, max)
                    && max < base
                {
                    check.fail(
                        "spec.circuitBreaker.maxEjectionTime",
                        "must not be shorter than baseEjectionTime",
                    );
                }
            }
        }
        check.unique(
            "spec.bulkheads",
            self.bulkheads.iter().map(|b| b.name.as_str()),
        );
        for (i, pool) in self.bulkheads.iter().enumerate() {
            let at = format!("spec.bulkheads[{i}]");
            check.name(&format!("{at}.name"), &pool.name);
            check.at_least(
                &format!("{at}.maxConcurrentRequests"),
                pool.max_concurrent_requests,
                1,
            );
            check.optional_duration(
                &format!("{at}.maxPendingTime"),
                pool.max_pending_time.as_deref(),
            );
        }
        if let Some(pool) = &self.connection_pool {
            if let Some(max) = pool.max_connections_per_endpoint {
                check.at_least("spec.connectionPool.maxConnectionsPerEndpoint", max, 1);
            }
            check.optional_duration(
                "spec.connectionPool.idleTimeout",
                pool.idle_timeout.as_deref(),
            );
        }
        if let Some(budget) = &self.retry_budget {
            check.range("spec.retryBudget.ratio", budget.ratio, 0.0, 1.0);
        }
        if let Some(RateLimit {
            requests_per_second,
            burst,
            per_source: _,
        }) = &self.rate_limit
        {
            check.at_least("spec.rateLimit.requestsPerSecond", *requests_per_second, 1);
            if let Some(burst) = burst {
                check.at_least("spec.rateLimit.burst", *burst, 1);
            }
        }
        check.finish("DestinationPolicy", name)
    }

    pub fn has_subset(&self, name: &str) -> bool {
        self.subsets.iter().any(|s| s.name == name)
    }

    pub fn has_bulkhead(&self, name: &str) -> bool {
        self.bulkheads.iter().any(|b| b.name == name)
    }
}
