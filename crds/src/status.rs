//! The `status` every Trellis resource carries: conditions in the Kubernetes
//! convention, written by the control plane's leader (never by `kubectl apply`).

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// One observation about a resource, e.g. `Accepted`: whether the control plane
/// put it in force, and if not, why.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Accepted`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word for programs, e.g. `Valid`, `Invalid`.
    #[serde(default)]
    pub reason: String,
    /// What a person needs to know, e.g. the validation error.
    #[serde(default)]
    pub message: String,
    /// The `metadata.generation` this condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// The status of a `MeshConfig`, `DestinationPolicy`, `TrafficRoute` or
/// `AuthorizationPolicy`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
