//! Status on Kubernetes: the leader writes each Trellis resource's `status` with
//! server-side apply (field manager `trellis-control-plane`, forced) on the status
//! subresource: an `Accepted` condition on every one (`False` with the validation
//! error for one the config source skipped). A Canary's other status fields (phase,
//! weight, step, analysis, history) are the canary controller's, under a field manager
//! of its own (`canary::CONTROLLER_MANAGER`), so neither writer removes the other's.
//!
//! What to write is computed from the config source ([`desired`], a pure function);
//! only what changed since the last write goes out, and everything again after this
//! replica becomes the leader.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    compiler::Resources,
    kubernetes::ca_secret::FIELD_MANAGER,
    source::{ConfigSource, Problem},
};

pub const GROUP: &str = "trellis.dev";
pub const VERSION: &str = "v1alpha1";
/// How often the leader compares what the source says with what it wrote.
pub const PERIOD: Duration = Duration::from_secs(2);

/// The five kinds, their plurals and whether they are namespaced.
pub const KINDS: [(&str, &str, bool); 5] = [
    ("MeshConfig", "meshconfigs", false),
    ("DestinationPolicy", "destinationpolicies", true),
    ("TrafficRoute", "trafficroutes", true),
    ("AuthorizationPolicy", "authorizationpolicies", true),
    ("Canary", "canaries", true),
];

/// One resource's place; `namespace` is empty for the cluster-scoped MeshConfig.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StatusKey {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

/// The status every resource should have, without timestamps (added when written, so
/// an unchanged status compares equal round after round).
pub fn desired(resources: &Resources, problems: &[Problem]) -> BTreeMap<StatusKey, Value> {
    let mut out = BTreeMap::new();
    let mut accepted = |kind: &'static str, meta: &kube::api::ObjectMeta, extra: Value| {
        let Some(name) = meta.name.clone() else {
            return;
        };
        let key = StatusKey {
            kind,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name,
        };
        let mut status = extra;
        status["conditions"] = json!([condition(true, "", meta.generation)]);
        out.insert(key, status);
    };
    for p in &resources.policies {
        accepted("DestinationPolicy", &p.metadata, json!({}));
    }
    for r in &resources.routes {
        accepted("TrafficRoute", &r.metadata, json!({}));
    }
    for a in &resources.authorization {
        accepted("AuthorizationPolicy", &a.metadata, json!({}));
    }
    for c in &resources.canaries {
        accepted("Canary", &c.metadata, json!({}));
    }
    if resources.mesh.is_some() {
        out.insert(
            StatusKey {
                kind: "MeshConfig",
                namespace: String::new(),
                name: "default".into(),
            },
            json!({"conditions": [condition(true, "", None)]}),
        );
    }
    for problem in problems {
        let Some((kind, _, namespaced)) = KINDS
            .iter()
            .find(|(kind, _, _)| kind.eq_ignore_ascii_case(&problem.kind))
        else {
            continue;
        };
        let key = StatusKey {
            kind,
            namespace: if *namespaced {
                problem.namespace.clone()
            } else {
                String::new()
            },
            name: problem.name.clone(),
        };
        // An invalid object keeps whatever else its status said; the condition says
        // why it is not in force.
        let mut status = out.remove(&key).unwrap_or_else(|| json!({}));
        status["conditions"] = json!([condition(false, &problem.error, None)]);
        out.insert(key, status);
    }
    out
}

fn condition(accepted: bool, message: &str, generation: Option<i64>) -> Value {
    let mut condition = json!({
        "type": "Accepted",
        "status": if accepted { "True" } else { "False" },
        "reason": if accepted { "Valid" } else { "Invalid" },
        "message": if accepted { "the resource is valid and in force" } else { message },
    });
    if let Some(generation) = generation {
        condition["observedGeneration"] = json!(generation);
    }
    condition
}

fn api_for(client: &Client, key: &StatusKey) -> Option<Api<DynamicObject>> {
    let (kind, plural, namespaced) = KINDS.iter().find(|(kind, _, _)| *kind == key.kind)?;
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind), plural);
    Some(if *namespaced {
        Api::namespaced_with(client.clone(), &key.namespace, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    })
}

/// Writes one status with server-side apply on the status subresource.
pub async fn write(client: &Client, key: &StatusKey, status: &Value) -> Result<(), kube::Error> {
    let Some(api) = api_for(client, key) else {
        return Ok(());
    };
    let mut status = status.clone();
    let now = Timestamp::now().to_string();
    if let Some(conditions) = status["conditions"].as_array_mut() {
        for condition in conditions {
            condition["lastTransitionTime"] = json!(now);
        }
    }
    let mut metadata = json!({"name": key.name});
    if !key.namespace.is_empty() {
        metadata["namespace"] = json!(key.namespace);
    }
    let patch = json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": key.kind,
        "metadata": metadata,
        "status": status,
    });
    api.patch_status(
        &key.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Writes statuses while this replica leads, until `shutdown`.
#[derive(Clone)]
pub struct StatusWriter {
    pub client: Client,
    pub source: Arc<dyn ConfigSource>,
    pub period: Duration,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("period", &self.period)
            .finish_non_exhaustive()
    }
}

impl StatusWriter {
    pub fn new(client: Client, source: Arc<dyn ConfigSource>) -> Self {
        Self {
            client,
            source,
            period: PERIOD,
        }
    }

    pub async fn run(self, mut leading: watch::Receiver<bool>, shutdown: CancellationToken) {
        let mut written: BTreeMap<StatusKey, Value> = BTreeMap::new();
        loop {
            if !*leading.borrow_and_update() {
                // A new leader writes everything: the last one may have been cut off.
                written.clear();
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = leading.changed() => {
                        if changed.is_err() { return; }
                        continue;
                    }
                }
            }
            let source = self.source.clone();
            let wanted = match tokio::task::spawn_blocking(move || {
                let (_, resources) = source.resources()?;
                Ok::<_, crate::store::StoreError>(desired(&resources, &source.problems()))
            })
            .await
            {
                Ok(Ok(wanted)) => wanted,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "reading resources for their status failed");
                    BTreeMap::new()
                }
                Err(error) => {
                    tracing::warn!(%error, "the status task failed");
                    BTreeMap::new()
                }
            };
            written.retain(|key, _| wanted.contains_key(key));
            for (key, status) in wanted {
                if written.get(&key) == Some(&status) {
                    continue;
                }
                match write(&self.client, &key, &status).await {
                    Ok(()) => {
                        written.insert(key, status);
                    }
                    // A resource deleted meanwhile has no status to write.
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(error) => tracing::warn!(
                        %error,
                        kind = key.kind,
                        namespace = key.namespace,
                        name = key.name,
                        "writing a status failed; retrying next round"
                    ),
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.period) => {}
                changed = leading.changed() => if changed.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use trellis_crds::{Canary, CanaryPhase, CanaryStatus};

    use super::*;

    fn canary() -> Canary {
        serde_json::from_value(json!({
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "Canary",
            "metadata": {"name": "payment", "namespace": "shop", "generation": 3},
            "spec": {
                "service": "payment", "stableSubset": "v1", "canarySubset": "v2",
                "steps": [10, 50, 100], "interval": "1m",
                "analysis": {"minSuccessRate": 99.0, "maxP99Latency": "500ms"}
            }
        }))
        .unwrap()
    }

    #[test]
    fn canaries_get_conditions_only_and_invalid_objects_say_why() {
        let mut resources = Resources::default();
        resources.canaries.push(canary());
        resources.canary_status.insert(
            ("shop".into(), "payment".into()),
            CanaryStatus {
                phase: CanaryPhase::default(),
                weight: 10,
                ..Default::default()
            },
        );
        let problems = [Problem {
            kind: "TrafficRoute".into(),
            namespace: "shop".into(),
            name: "broken".into(),
            error: "spec.rules[0].backends: weights must add up to 100".into(),
        }];
        let wanted = desired(&resources, &problems);
        let canary = &wanted[&StatusKey {
            kind: "Canary",
            namespace: "shop".into(),
            name: "payment".into(),
        }];
        // The controller's fields are the controller's to write.
        assert_eq!(canary.get("weight"), None);
        assert_eq!(canary["conditions"][0]["status"], "True");
        assert_eq!(canary["conditions"][0]["observedGeneration"], 3);
        let broken = &wanted[&StatusKey {
            kind: "TrafficRoute",
            namespace: "shop".into(),
            name: "broken".into(),
        }];
        assert_eq!(broken["conditions"][0]["status"], "False");
        assert_eq!(broken["conditions"][0]["reason"], "Invalid");
        assert_eq!(
            broken["conditions"][0]["message"],
            "spec.rules[0].backends: weights must add up to 100"
        );
        // Stable across rounds: nothing is rewritten without a change.
        assert_eq!(wanted, desired(&resources, &problems));
    }
}
