//! The proxy configuration model: what a sidecar needs to route traffic. The control
//! plane compiles it and pushes it; in static mode a sidecar reads it from a file.
//! Field names are camelCase, as in the CRDs, and unknown fields are refused so a
//! typo is an error rather than silently lost config.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

/// Everything routing-related a sidecar runs with, as one versioned snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// One TrafficRoute rule, as the sidecar runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

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
        }
    }
}
