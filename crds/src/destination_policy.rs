//! `DestinationPolicy`: how callers treat one service — its subsets, load balancing,
//! circuit breaking, bulkheads, connection pool and retry budget.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{Checker, Invalid};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    derive = "PartialEq",
    kind = "DestinationPolicy",
    namespaced,
    shortname = "dp"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationPolicySpec {
    /// The service this policy is for.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub service: String,
    /// Named groups of endpoints by labels, e.g. `v1`, `v2`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Named concurrency pools; routes pick one (default pool: `default`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bulkheads: Vec<Bulkhead>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
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
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Failures in a row (5xx or connect errors) that eject an endpoint.
    #[schemars(range(min = 1))]
    pub consecutive_failures: u32,
    /// How often ejections are reconsidered, e.g. `10s`.
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub interval: String,
    /// First ejection's length; it grows with repeated ejections.
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub base_ejection_time: String,
    /// Never eject more than this share of endpoints.
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: u32,
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

/// Retries allowed per destination: `ratio` of recent requests plus a floor per second.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ratio: f64,
    #[serde(default)]
    pub min_retries_per_second: u32,
}

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
        check.finish("DestinationPolicy", name)
    }

    pub fn has_subset(&self, name: &str) -> bool {
        self.subsets.iter().any(|s| s.name == name)
    }

    pub fn has_bulkhead(&self, name: &str) -> bool {
        self.bulkheads.iter().any(|b| b.name == name)
    }
}
