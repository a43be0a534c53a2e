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
}

/// One instance of a destination: its sidecar's inbound address and the SPIFFE id
/// that sidecar must present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    pub identity: String,
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
