//! `MeshConfig`: mesh-wide settings, one cluster-scoped object named `default`.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ResourceStatus;

use crate::validation::{Checker, Invalid};

/// Mesh-wide settings. Only the object named `default` is read.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    derive = "PartialEq",
    kind = "MeshConfig",
    status = "ResourceStatus",
    shortname = "mc",
    validation = "self.metadata.name == 'default'",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfigSpec {
    /// The SPIFFE trust domain, e.g. `cluster.local`.
    #[serde(default = "default_trust_domain")]
    #[schemars(regex(pattern = r"^[a-z0-9._-]+$"), length(min = 1, max = 255))]
    pub trust_domain: String,
    /// STRICT: only mTLS between workloads. PERMISSIVE: plaintext is accepted too.
    #[serde(default)]
    pub mtls: Mtls,
    /// What a service with no AuthorizationPolicy allows.
    #[serde(default)]
    pub default_authorization: DefaultAuthorization,
    /// Workload certificate lifetime, e.g. `24h`.
    #[serde(default = "default_cert_ttl", rename = "certTTL")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub cert_ttl: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mtls {
    #[default]
    Strict,
    Permissive,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultAuthorization {
    /// Any workload of the mesh may call.
    #[default]
    AllowMesh,
    /// Nothing is allowed unless a policy says so.
    Deny,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled, 0 to 1.
    #[serde(default = "default_sampling")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sampling_ratio: f64,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

fn default_cert_ttl() -> String {
    "24h".into()
}

fn default_sampling() -> f64 {
    1.0
}

impl MeshConfigSpec {
    pub fn validate(&self, name: &str) -> Result<(), Invalid> {
        let mut check = Checker::default();
        if name != "default" {
            check.fail("metadata.name", "the MeshConfig must be named \"default\"");
        }
        check.duration("spec.certTTL", &self.cert_ttl);
        if self.trust_domain.is_empty()
            || self.trust_domain.len() > 255
            || !self
                .trust_domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            check.fail(
                "spec.trustDomain",
                "may hold only lowercase letters, digits, '.', '-' and '_'",
            );
        }
        if let Some(tracing) = &self.tracing {
            check.range(
                "spec.tracing.samplingRatio",
                tracing.sampling_ratio,
                0.0,
                1.0,
            );
        }
        check.finish("MeshConfig", name)
    }
}
