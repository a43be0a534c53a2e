//! `Canary`: a progressive rollout of one service from a stable subset to a canary
//! subset, moved along `steps` while the canary's analysis holds.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    Condition, DestinationPolicySpec,
    validation::{Checker, Invalid},
};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    derive = "PartialEq",
    kind = "Canary",
    namespaced,
    status = "CanaryStatus",
    shortname = "can",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".status.weight"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanarySpec {
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub service: String,
    /// The subset that takes traffic today.
    pub stable_subset: String,
    /// The subset being rolled out.
    pub canary_subset: String,
    /// Canary weights in percent, rising, e.g. `[10, 25, 50, 100]`.
    #[schemars(length(min = 1))]
    pub steps: Vec<u32>,
    /// Time at each step before the analysis decides, e.g. `1m`.
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub interval: String,
    pub analysis: Analysis,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Analysis {
    /// Lowest acceptable share of non-5xx responses, in percent.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub min_success_rate: f64,
    /// Highest acceptable p99 latency, e.g. `500ms`.
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub max_p99_latency: String,
    /// Fewer requests than this in an interval decide nothing.
    #[serde(default)]
    pub min_requests: u32,
}

/// Written by the control plane's canary controller, never by `apply` (like a
/// Kubernetes status subresource).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    #[serde(default)]
    pub phase: CanaryPhase,
    /// The canary's current weight, in percent.
    #[serde(default)]
    pub weight: u32,
    /// Index into `spec.steps` of the step in force while progressing.
    #[serde(default)]
    pub step: u32,
    /// When the current step began (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<String>,
    /// A digest of the spec this status follows: a changed spec starts over.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spec_digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_analysis: Option<AnalysisResult>,
    /// What happened, oldest first; the latest 20 entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<CanaryEvent>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// On Kubernetes, `Accepted` (written by the control plane's status writer; the
    /// controller's own fields are the ones above).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// One analysis: the canary's and the stable subset's numbers over the interval.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisResult {
    /// RFC 3339.
    pub at: String,
    pub weight: u32,
    pub canary: SubsetStats,
    pub stable: SubsetStats,
    /// `passed`, `failed`, `waiting` (too few requests) or `held` (stable fails too).
    pub verdict: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubsetStats {
    pub requests: u64,
    /// Percent of responses that were not 5xx or mesh errors; none without requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryEvent {
    /// RFC 3339.
    pub at: String,
    pub phase: CanaryPhase,
    pub weight: u32,
    pub message: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CanaryPhase {
    #[default]
    Pending,
    Progressing,
    /// Held at its weight by `trellisctl canary pause` until resumed.
    Paused,
    Promoted,
    RolledBack,
}

impl CanarySpec {
    pub fn validate(
        &self,
        name: &str,
        policy: Option<&DestinationPolicySpec>,
    ) -> Result<(), Invalid> {
        let mut check = Checker::default();
        check.name("spec.service", &self.service);
        for (field, subset) in [
            ("stableSubset", &self.stable_subset),
            ("canarySubset", &self.canary_subset),
        ] {
            if !policy.is_some_and(|p| p.has_subset(subset)) {
                check.fail(
                    format!("spec.{field}"),
                    format!(
                        "no subset {subset:?} in the DestinationPolicy of service {:?}",
                        self.service
                    ),
                );
            }
        }
        if self.stable_subset == self.canary_subset {
            check.fail("spec.canarySubset", "must differ from stableSubset");
        }
        if self.steps.is_empty() {
            check.fail("spec.steps", "must hold at least one step");
        }
        let mut previous = 0;
        for (i, step) in self.steps.iter().enumerate() {
            if !(1..=100).contains(step) {
                check.fail(
                    format!("spec.steps[{i}]"),
                    format!("must be between 1 and 100, not {step}"),
                );
            } else if *step <= previous {
                check.fail(format!("spec.steps[{i}]"), "steps must rise");
            }
            previous = *step;
        }
        check.duration("spec.interval", &self.interval);
        check.range(
            "spec.analysis.minSuccessRate",
            self.analysis.min_success_rate,
            0.0,
            100.0,
        );
        check.duration(
            "spec.analysis.maxP99Latency",
            &self.analysis.max_p99_latency,
        );
        check.finish("Canary", name)
    }
}
