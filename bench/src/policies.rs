//! The sidecar config of the `trellis+policies` scenario: every policy layer
//! configured, each with limits far above the benchmark's load, so the layers run on
//! every request but none ever acts. What it measures is their cost alone.

use trellis_api::config::{
    AllowConfig, AuthorizationDefault, BulkheadConfig, CircuitBreakerConfig, EndpointConfig,
    InboundConfig, RateLimitConfig, RetriesConfig, RetryBudgetConfig, RouteConfig, ServiceConfig,
    SourceConfig,
};

/// The bulkhead pool the route takes a slot of.
const POOL: &str = "bench";

/// The caller's side: one route (every request matches it) with a timeout, retries
/// under the default retry budget and a bulkhead, and a circuit breaker on the service.
pub fn outbound(endpoints: Vec<EndpointConfig>) -> ServiceConfig {
    ServiceConfig {
        endpoints,
        routes: vec![RouteConfig {
            name: "bench".into(),
            timeout: Some("5s".into()),
            retries: Some(RetriesConfig {
                attempts: 3,
                per_try_timeout: None,
                on: vec!["5xx".into(), "connect-failure".into()],
                backoff: None,
                allow_non_idempotent: false,
            }),
            bulkhead: Some(POOL.into()),
            ..RouteConfig::default()
        }],
        circuit_breaker: Some(CircuitBreakerConfig {
            consecutive_failures: 5,
            base_ejection_time: "30s".into(),
            max_ejection_time: "5m".into(),
            max_ejection_percent: 50,
        }),
        bulkheads: vec![BulkheadConfig {
            name: POOL.into(),
            max_concurrent_requests: 1000,
            max_pending_requests: 1000,
            max_pending_time: None,
        }],
        retry_budget: Some(RetryBudgetConfig::default()),
        ..ServiceConfig::default()
    }
}

/// Far above what the max-throughput phase reaches on any machine, so no 429.
const RATE_LIMIT: u32 = 1_000_000;

/// The server's side: deny by default, allow `client` (an AuthorizationPolicy), and a
/// shared rate limit.
pub fn inbound(client: &str) -> InboundConfig {
    InboundConfig {
        default: AuthorizationDefault::Deny,
        allow: vec![AllowConfig {
            from: vec![SourceConfig {
                identity: Some(client.into()),
                namespace: None,
            }],
            to: Vec::new(),
        }],
        rate_limit: Some(RateLimitConfig {
            requests_per_second: RATE_LIMIT,
            burst: RATE_LIMIT,
            per_source: false,
        }),
    }
}
