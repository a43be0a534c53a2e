//! `TrafficRoute`: ordered rules for one service — which requests go where (canary
//! splits by weight), what is mirrored, and with what timeout, retries, bulkhead and
//! injected faults.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ResourceStatus;

use crate::{
    DestinationPolicySpec,
    validation::{Checker, Invalid},
};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    derive = "PartialEq",
    kind = "TrafficRoute",
    status = "ResourceStatus",
    namespaced,
    shortname = "tr",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficRouteSpec {
    /// The service whose callers these rules apply to.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub service: String,
    /// Tried in order; the first that matches wins.
    #[schemars(length(min = 1))]
    pub rules: Vec<RouteRule>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    /// A name for metrics (`route` label); defaults to the rule's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Which requests this rule takes; none means all.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<RouteMatch>,
    /// Where the requests go, split by weight.
    #[schemars(length(min = 1))]
    pub backends: Vec<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Whole-request deadline, e.g. `2s`; 504 when it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// A bulkhead pool of the destination's DestinationPolicy (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<String>,
    /// Delays or fails a share of this rule's requests on purpose, to test how callers
    /// cope with a slow or failing service; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = "[has(self.pathPrefix), has(self.pathExact), has(self.pathRegex)].filter(x, x).size() <= 1"
)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = "[has(self.exact), has(self.prefix), has(self.regex)].filter(x, x).size() == 1"
)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A subset of this service, or another service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = "has(self.service) != has(self.subset)")]
pub struct Backend {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Relative share; the rule's weights must sum to more than 0.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 10000))]
    pub weight: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = "has(self.service) != has(self.subset)")]
pub struct Mirror {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Share of requests copied, 0 to 100.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    /// Compare the shadow's status and body digest with the primary's.
    #[serde(default)]
    pub compare: bool,
    /// JSON fields the comparison ignores, by name or dotted path (`id`,
    /// `order.createdAt`): values that differ on every call, like ids and timestamps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore_fields: Vec<String>,
    /// Requests whose bodies are larger are not mirrored (and are counted); default 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1048576))]
    pub max_body_bytes: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Total tries including the first.
    #[schemars(range(min = 1, max = 10))]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub per_try_timeout: Option<String>,
    /// `5xx`, `gateway-error`, `connect-failure`, `reset`, or a status code.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<RetryOn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Also retry methods that are not idempotent (POST, PATCH, CONNECT, ...); by default
    /// only GET, HEAD, OPTIONS, TRACE, PUT and DELETE are retried. A failed or timed-out
    /// POST may still have been carried out, so retrying it can charge a payment twice:
    /// turn this on only for services that deduplicate (e.g. by an idempotency key).
    #[serde(default)]
    pub allow_non_idempotent: bool,
}

/// A retry condition, as written: `5xx`, `gateway-error`, `connect-failure`, `reset`, or a
/// status code such as `503`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct RetryOn(
    #[schemars(regex(pattern = r"^(5xx|gateway-error|connect-failure|reset|[1-5][0-9][0-9])$"))]
    pub String,
);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub base: String,
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub max: String,
}

/// Faults injected by the caller's sidecar into requests this rule matched. Delay and
/// abort are drawn independently per request; an aborted request never reaches the
/// service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new("has(self.delay) || has(self.abort)")
        .message("give at least one of delay and abort")
)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Holds a share of requests for a while before sending them on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// How long each delayed request waits, e.g. `100ms`; longer than zero.
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub duration: String,
    /// Share of requests delayed, 0 to 100 (fractions allowed, e.g. `0.5`).
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
}

/// Answers a share of requests with an error status instead of sending them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// The status returned, 400 to 599, e.g. `503`.
    #[schemars(range(min = 400, max = 599))]
    pub status: u16,
    /// Share of requests aborted, 0 to 100 (fractions allowed, e.g. `0.5`).
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
}

fn default_weight() -> u32 {
    1
}

impl RetryOn {
    fn is_valid(&self) -> bool {
        matches!(
            self.0.as_str(),
            "5xx" | "gateway-error" | "connect-failure" | "reset"
        ) || (self.0.len() == 3
            && self.0.bytes().all(|b| b.is_ascii_digit())
            && (b'1'..=b'5').contains(&self.0.as_bytes()[0]))
    }
}

impl TrafficRouteSpec {
    /// Checks the route on its own, and against its service's DestinationPolicy when
    /// there is one: subsets and bulkhead pools it names must exist there.
    pub fn validate(
        &self,
        name: &str,
        policy: Option<&DestinationPolicySpec>,
    ) -> Result<(), Invalid> {
        let mut check = Checker::default();
        check.name("spec.service", &self.service);
        let mut names = std::collections::BTreeSet::new();
        for (r, rule) in self.rules.iter().enumerate() {
            if let Some(rule_name) = rule.name.as_deref()
                && !names.insert(rule_name)
            {
                check.fail(
                    format!("spec.rules[{r}].name"),
                    format!("{rule_name:?} is used twice"),
                );
            }
        }
        if self.rules.is_empty() {
            check.fail("spec.rules", "must hold at least one rule");
        }
        for (r, rule) in self.rules.iter().enumerate() {
            let at = format!("spec.rules[{r}]");
            if let Some(rule_name) = &rule.name
                && !crate::validation::is_dns_label(rule_name)
            {
                check.fail(
                    format!("{at}.name"),
                    format!("{rule_name:?} is not a DNS-1123 label"),
                );
            }
            if let Some(m) = &rule.matches {
                for (field, path) in [("pathPrefix", &m.path_prefix), ("pathExact", &m.path_exact)]
                {
                    if path.as_deref().is_some_and(|p| !p.starts_with('/')) {
                        check.fail(format!("{at}.match.{field}"), "must start with '/'");
                    }
                }
                if let Some(method) = &m.method
                    && (method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()))
                {
                    check.fail(
                        format!("{at}.match.method"),
                        format!("{method:?} is not an upper-case HTTP method"),
                    );
                }
                let paths = [&m.path_prefix, &m.path_exact, &m.path_regex];
                if paths.iter().filter(|p| p.is_some()).count() > 1 {
                    check.fail(
                        format!("{at}.match"),
                        "give at most one of pathPrefix, pathExact, pathRegex",
                    );
                }
                if let Some(re) = &m.path_regex {
                    check.regex(&format!("{at}.match.pathRegex"), re);
                }
                for (h, header) in m.headers.iter().enumerate() {
                    let hat = format!("{at}.match.headers[{h}]");
                    let given = [&header.exact, &header.prefix, &header.regex];
                    if given.iter().filter(|v| v.is_some()).count() != 1 {
                        check.fail(&hat, "give exactly one of exact, prefix, regex");
                    }
                    if let Some(re) = &header.regex {
                        check.regex(&format!("{hat}.regex"), re);
                    }
                    if http_header_name_invalid(&header.name) {
                        check.fail(format!("{hat}.name"), "is not a valid header name");
                    }
                }
            }
            if rule.backends.is_empty() {
                check.fail(format!("{at}.backends"), "must hold at least one backend");
            } else if rule.backends.iter().all(|b| b.weight == 0) {
                check.fail(format!("{at}.backends"), "weights must sum to more than 0");
            }
            for (b, backend) in rule.backends.iter().enumerate() {
                let bat = format!("{at}.backends[{b}]");
                if backend.weight > 10_000 {
                    check.fail(format!("{bat}.weight"), "must be at most 10000");
                }
                target(
                    &mut check,
                    &bat,
                    backend.service.as_deref(),
                    backend.subset.as_deref(),
                    policy,
                );
            }
            if let Some(mirror) = &rule.mirror {
                let mat = format!("{at}.mirror");
                check.range(&format!("{mat}.percent"), mirror.percent, 0.0, 100.0);
                target(
                    &mut check,
                    &mat,
                    mirror.service.as_deref(),
                    mirror.subset.as_deref(),
                    policy,
                );
                if mirror.max_body_bytes.is_some_and(|b| b > 1 << 20) {
                    check.fail(format!("{mat}.maxBodyBytes"), "must be at most 1048576");
                }
                for (f, field) in mirror.ignore_fields.iter().enumerate() {
                    if field.is_empty() || field.split('.').any(str::is_empty) {
                        check.fail(
                            format!("{mat}.ignoreFields[{f}]"),
                            "must be a field name or a dotted path like `order.id`",
                        );
                    }
                }
                if !mirror.ignore_fields.is_empty() && !mirror.compare {
                    check.fail(
                        format!("{mat}.ignoreFields"),
                        "only means something with `compare: true`",
                    );
                }
            }
            check.optional_duration(&format!("{at}.timeout"), rule.timeout.as_deref());
            if let Some(retries) = &rule.retries {
                let rat = format!("{at}.retries");
                if !(1..=10).contains(&retries.attempts) {
                    check.fail(format!("{rat}.attempts"), "must be between 1 and 10");
                }
                check.optional_duration(
                    &format!("{rat}.perTryTimeout"),
                    retries.per_try_timeout.as_deref(),
                );
                for (o, on) in retries.on.iter().enumerate() {
                    if !on.is_valid() {
                        check.fail(
                            format!("{rat}.on[{o}]"),
                            format!(
                                "{:?} is not 5xx, gateway-error, connect-failure, reset or a status code",
                                on.0
                            ),
                        );
                    }
                }
                if let Some(backoff) = &retries.backoff {
                    check.duration(&format!("{rat}.backoff.base"), &backoff.base);
                    check.duration(&format!("{rat}.backoff.max"), &backoff.max);
                    let (base, max) = (
                        trellis_api::duration::parse(&backoff.base),
                        trellis_api::duration::parse(&backoff.max),
                    );
                    if let (Ok(base), Ok(max)) = (base, max)
                        && base > max
                    {
                        check.fail(format!("{rat}.backoff"), "base must not exceed max");
                    }
                }
            }
            if let Some(fault) = &rule.fault {
                fault.check(&mut check, &format!("{at}.fault"));
            }
            if let Some(pool) = &rule.bulkhead {
                let missing = policy.is_none_or(|p| !p.has_bulkhead(pool));
                if pool != "default" && missing {
                    check.fail(
                        format!("{at}.bulkhead"),
                        format!(
                            "no bulkhead {pool:?} in the DestinationPolicy of service {:?}",
                            self.service
                        ),
                    );
                }
            }
        }
        check.finish("TrafficRoute", name)
    }
}

impl Fault {
    fn check(&self, check: &mut Checker, at: &str) {
        let Self { delay, abort } = self;
        if delay.is_none() && abort.is_none() {
            check.fail(at, "give at least one of delay and abort");
        }
        if let Some(FaultDelay { duration, percent }) = delay {
            check.duration(&format!("{at}.delay.duration"), duration);
            check.range(&format!("{at}.delay.percent"), *percent, 0.0, 100.0);
        }
        if let Some(FaultAbort { status, percent }) = abort {
            check.range(
                &format!("{at}.abort.status"),
                f64::from(*status),
                400.0,
                599.0,
            );
            check.range(&format!("{at}.abort.percent"), *percent, 0.0, 100.0);
        }
    }
}

/// A backend or mirror names exactly one of a service or a subset; a subset must exist
/// in the destination's policy.
fn target(
    check: &mut Checker,
    at: &str,
    service: Option<&str>,
    subset: Option<&str>,
    policy: Option<&DestinationPolicySpec>,
) {
    match (service, subset) {
        (Some(service), None) => check.name(&format!("{at}.service"), service),
        (None, Some(subset)) => {
            if !policy.is_some_and(|p| p.has_subset(subset)) {
                check.fail(
                    format!("{at}.subset"),
                    format!("no subset {subset:?} in the service's DestinationPolicy"),
                );
            }
        }
        _ => check.fail(at, "give exactly one of service and subset"),
    }
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
