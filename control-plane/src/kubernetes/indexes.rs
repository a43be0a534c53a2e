//! What the watchers saw, kept in plain structs: one [`Index`] per kind with
//! `apply`/`delete`/`reset` (a watcher's Apply, Delete, and Init..InitDone), and
//! [`Cluster`], which turns them into the compiler's `Resources` and endpoints. No API
//! is needed to test any of it.
//!
//! An object that does not deserialize (kube's `DeserializeGuard`) or fails Trellis'
//! validation is kept aside as a [`Problem`] and skipped; every other object applies.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Resource, core::DeserializeGuard};
use trellis_ca::{SpiffeId, TrustDomain};
use trellis_crds::{
    AuthorizationPolicy, Canary, DestinationPolicy, Document, MeshConfig, TrafficRoute,
    injection::INJECTED_ANNOTATION, validate_batch,
};

use crate::{compiler::Resources, registry::EndpointView, source::Problem};

/// The label an EndpointSlice names its Service by.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// (namespace, name); the namespace is empty for cluster-scoped objects.
pub type ObjectKey = (String, String);

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The objects of one kind, and those of that kind that could not be read.
#[derive(Debug, Clone)]
pub struct Index<K> {
    objects: BTreeMap<ObjectKey, K>,
    malformed: BTreeMap<ObjectKey, String>,
}

impl<K> Default for Index<K> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            malformed: BTreeMap::new(),
        }
    }
}

impl<K: Resource<DynamicType = ()> + Clone> Index<K> {
    /// An object was added or changed (or listed). A malformed version replaces a good
    /// one too: the object as it is now cannot be used.
    pub fn apply(&mut self, object: DeserializeGuard<K>) {
        match object.0 {
            Ok(object) => {
                let key = key_of(object.meta());
                self.malformed.remove(&key);
                self.objects.insert(key, object);
            }
            Err(invalid) => {
                let key = key_of(&invalid.metadata);
                // The source reports it (once) with the invalid ones.
                tracing::debug!(
                    kind = %K::kind(&()),
                    namespace = key.0,
                    name = key.1,
                    error = %invalid.error,
                    "skipping a malformed object"
                );
                self.objects.remove(&key);
                self.malformed.insert(key, invalid.error);
            }
        }
    }

    pub fn delete(&mut self, object: &DeserializeGuard<K>) {
        let key = key_of(object.meta());
        self.objects.remove(&key);
        self.malformed.remove(&key);
    }

    /// The complete set after a (re)list: whatever is not in it is gone.
    pub fn reset(&mut self, objects: Vec<DeserializeGuard<K>>) {
        self.objects.clear();
        self.malformed.clear();
        for object in objects {
            self.apply(object);
        }
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&K> {
        self.objects.get(&(namespace.to_string(), name.to_string()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &K> {
        self.objects.values()
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    fn problems(&self) -> impl Iterator<Item = Problem> + '_ {
        self.malformed
            .iter()
            .map(|((namespace, name), error)| Problem {
                kind: K::kind(&()).into_owned(),
                namespace: namespace.clone(),
                name: name.clone(),
                error: error.clone(),
            })
    }
}

/// Everything the Kubernetes source watches.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub mesh: Index<MeshConfig>,
    pub policies: Index<DestinationPolicy>,
    pub routes: Index<TrafficRoute>,
    pub authorization: Index<AuthorizationPolicy>,
    pub canaries: Index<Canary>,
    pub services: Index<Service>,
    pub slices: Index<EndpointSlice>,
    pub pods: Index<Pod>,
}

impl Cluster {
    /// The valid Trellis resources as the compiler reads them, and the problems of the
    /// others. A Canary's weight comes from its `status` (the leader's controller
    /// writes it).
    pub fn resources(&self) -> (Resources, Vec<Problem>) {
        let (documents, problems) = self.documents();
        let mut resources = Resources::from_documents(documents);
        for canary in &resources.canaries {
            if let Some(status) = &canary.status {
                let (namespace, name) = key_of(&canary.metadata);
                resources
                    .canary_status
                    .insert((namespace, name), status.clone());
            }
        }
        (resources, problems)
    }

    /// The Trellis resources that are valid, sorted by kind then (namespace, name),
    /// and the problems of those that are not (malformed or failing validation).
    pub fn documents(&self) -> (Vec<Document>, Vec<Problem>) {
        let mut problems: Vec<Problem> = self
            .mesh
            .problems()
            .chain(self.policies.problems())
            .chain(self.routes.problems())
            .chain(self.authorization.problems())
            .chain(self.canaries.problems())
            .collect();
        let mut documents: Vec<Document> = Vec::new();
        documents.extend(
            self.mesh
                .iter()
                .filter(|m| m.metadata.name.as_deref() == Some("default"))
                .cloned()
                .map(Document::MeshConfig),
        );
        documents.extend(
            self.policies
                .iter()
                .cloned()
                .map(Document::DestinationPolicy),
        );
        documents.extend(self.routes.iter().cloned().map(Document::TrafficRoute));
        documents.extend(
            self.authorization
                .iter()
                .cloned()
                .map(Document::AuthorizationPolicy),
        );
        documents.extend(self.canaries.iter().cloned().map(Document::Canary));
        let policies: Vec<DestinationPolicy> = self.policies.iter().cloned().collect();
        // Each object on its own (against every policy, for routes' subsets): one
        // invalid object must not take the others down with it.
        documents.retain(|document| {
            let Err(invalid) = validate_batch(std::slice::from_ref(document), &policies) else {
                return true;
            };
            let mine: Vec<String> = invalid
                .iter()
                .filter(|i| i.kind == document.kind() && i.name == document.name())
                .map(ToString::to_string)
                .collect();
            if mine.is_empty() {
                return true;
            }
            problems.push(Problem {
                kind: document.kind().into(),
                namespace: document.namespace().unwrap_or_default().into(),
                name: document.name().into(),
                error: mine.join("; "),
            });
            false
        });
        problems.sort();
        (documents, problems)
    }

    /// Objects of the core kinds (Services, EndpointSlices, Pods) that could not be read.
    pub fn workload_problems(&self) -> Vec<Problem> {
        self.services
            .problems()
            .chain(self.slices.problems())
            .chain(self.pods.problems())
            .collect()
    }

    /// One endpoint per ready address of an EndpointSlice whose Service exists and
    /// whose Pod carries the sidecar: the address and port from the slice, the labels
    /// from the Pod, the identity from its service account. The port is the slice's
    /// port named like the Service's first port, else its first port.
    pub fn endpoints(&self, trust_domain: &TrustDomain) -> Vec<EndpointView> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for slice in self.slices.iter() {
            let namespace = slice.metadata.namespace.clone().unwrap_or_default();
            let Some(service_name) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            let Some(service) = self.services.get(&namespace, service_name) else {
                continue;
            };
            let Some(port) = slice_port(slice, service) else {
                continue;
            };
            for endpoint in slice.endpoints.iter().flatten() {
                // Unset means ready, as the API documents.
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                if !ready {
                    continue;
                }
                let Some(target) = endpoint
                    .target_ref
                    .as_ref()
                    .filter(|t| t.kind.as_deref().is_none_or(|k| k == "Pod"))
                else {
                    continue;
                };
                let pod_namespace = target.namespace.as_deref().unwrap_or(&namespace);
                let Some(pod_name) = target.name.as_deref() else {
                    continue;
                };
                let Some(pod) = self.pods.get(pod_namespace, pod_name) else {
                    continue;
                };
                let Some(endpoint) = endpoint_view(
                    trust_domain,
                    &namespace,
                    service_name,
                    pod,
                    endpoint.addresses.first().map(String::as_str),
                    port,
                ) else {
                    continue;
                };
                if seen.insert((
                    endpoint.namespace.clone(),
                    endpoint.service.clone(),
                    endpoint.instance.clone(),
                )) {
                    out.push(endpoint);
                }
            }
        }
        out.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.instance).cmp(&(&b.namespace, &b.service, &b.instance))
        });
        out
    }
}

fn slice_port(slice: &EndpointSlice, service: &Service) -> Option<u16> {
    let ports = slice.ports.as_ref()?;
    let wanted = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
        .map(|p| p.name.clone().unwrap_or_default());
    let port = wanted
        .and_then(|name| {
            ports
                .iter()
                .find(|p| p.name.clone().unwrap_or_default() == name)
        })
        .or_else(|| ports.first())?;
    u16::try_from(port.port?).ok()
}

/// A Pod as an endpoint, if it is meshed and its identity is well formed.
fn endpoint_view(
    trust_domain: &TrustDomain,
    namespace: &str,
    service: &str,
    pod: &Pod,
    address: Option<&str>,
    port: u16,
) -> Option<EndpointView> {
    let name = pod.metadata.name.clone()?;
    // Without a sidecar a peer's mTLS call cannot be answered.
    let meshed = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    if !meshed {
        return None;
    }
    let pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
    let ip: IpAddr = address.or(pod_ip)?.parse().ok()?;
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|a| !a.is_empty())
        .unwrap_or("default");
    let pod_namespace = pod.metadata.namespace.as_deref().unwrap_or(namespace);
    let identity = match SpiffeId::workload(trust_domain, pod_namespace, account) {
        Ok(id) => id,
        Err(error) => {
            tracing::warn!(%error, pod = name, "skipping a pod whose identity is not a SPIFFE id");
            return None;
        }
    };
    Some(EndpointView {
        service: service.to_string(),
        namespace: namespace.to_string(),
        instance: name,
        address: SocketAddr::new(ip, port),
        identity: identity.to_string(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        healthy: true,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::{Value, json};

    use super::*;
    use crate::compiler::{Catalog, seal};

    fn guard<K: serde::de::DeserializeOwned + Resource>(value: Value) -> DeserializeGuard<K> {
        serde_json::from_value(value).unwrap()
    }

    fn td() -> TrustDomain {
        TrustDomain::parse("cluster.local").unwrap()
    }

    fn service(ns: &str, name: &str) -> DeserializeGuard<Service> {
        guard(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))
    }

    fn pod(ns: &str, name: &str, sa: &str, version: &str, ip: &str) -> DeserializeGuard<Pod> {
        guard(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": ns,
                "labels": {"app": "web", "version": version},
                "annotations": {INJECTED_ANNOTATION: "true"},
            },
            "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "web"}]},
            "status": {"podIP": ip},
        }))
    }

    /// `endpoints` are (pod name, address, ready).
    fn slice(
        ns: &str,
        name: &str,
        service: &str,
        endpoints: &[(&str, &str, Option<bool>)],
    ) -> DeserializeGuard<EndpointSlice> {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(pod, address, ready)| {
                json!({
                    "addresses": [address],
                    "conditions": {"ready": ready},
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": pod},
                })
            })
            .collect();
        guard(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}],
            "endpoints": endpoints,
        }))
    }

    fn web_cluster() -> Cluster {
        let mut cluster = Cluster::default();
        cluster.services.apply(service("shop", "web"));
        cluster
            .pods
            .apply(pod("shop", "web-1", "web-sa", "v1", "10.0.0.1"));
        cluster
            .pods
            .apply(pod("shop", "web-2", "web-sa", "v2", "10.0.0.2"));
        cluster
            .pods
            .apply(pod("shop", "web-3", "web-sa", "v2", "10.0.0.3"));
        cluster.slices.apply(slice(
            "shop",
            "web-abc",
            "web",
            &[
                ("web-1", "10.0.0.1", Some(true)),
                ("web-2", "10.0.0.2", None),
                ("web-3", "10.0.0.3", Some(false)),
            ],
        ));
        cluster
    }

    #[test]
    fn ready_endpoints_of_meshed_pods_become_endpoints_with_the_pods_identity_and_labels() {
        let cluster = web_cluster();
        let endpoints = cluster.endpoints(&td());
        let got: Vec<(String, SocketAddr, String, String)> = endpoints
            .iter()
            .map(|e| {
                (
                    e.instance.clone(),
                    e.address,
                    e.identity.clone(),
                    e.labels["version"].clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "web-1".into(),
                    "10.0.0.1:8080".parse().unwrap(),
                    "spiffe://cluster.local/ns/shop/sa/web-sa".into(),
                    "v1".into()
                ),
                (
                    "web-2".into(),
                    "10.0.0.2:8080".parse().unwrap(),
                    "spiffe://cluster.local/ns/shop/sa/web-sa".into(),
                    "v2".into()
                ),
            ],
            "web-3 is not ready; the port is the one named like the Service's"
        );
        assert!(
            endpoints
                .iter()
                .all(|e| e.service == "web" && e.namespace == "shop" && e.healthy)
        );
    }

    #[test]
    fn endpoints_follow_deletes_and_need_their_service_pod_and_sidecar() {
        let mut cluster = web_cluster();
        cluster
            .pods
            .delete(&pod("shop", "web-1", "web-sa", "v1", "10.0.0.1"));
        assert_eq!(
            cluster.endpoints(&td()).len(),
            1,
            "a pod gone takes its endpoint"
        );
        // A pod without the sidecar is nobody's endpoint.
        let mut plain = pod("shop", "web-2", "web-sa", "v2", "10.0.0.2");
        if let Ok(p) = &mut plain.0 {
            p.metadata.annotations = None;
        }
        cluster.pods.apply(plain);
        assert!(cluster.endpoints(&td()).is_empty());
        let mut cluster = web_cluster();
        cluster.services.delete(&service("shop", "web"));
        assert!(
            cluster.endpoints(&td()).is_empty(),
            "a slice whose Service is gone"
        );
        let mut cluster = web_cluster();
        cluster.slices.delete(&slice("shop", "web-abc", "web", &[]));
        assert!(cluster.endpoints(&td()).is_empty());
        // A pod without a service account is `default`'s.
        let mut cluster = web_cluster();
        let mut no_sa = pod("shop", "web-1", "", "v1", "10.0.0.1");
        if let Ok(p) = &mut no_sa.0 {
            p.spec.as_mut().unwrap().service_account_name = None;
        }
        cluster.pods.apply(no_sa);
        assert_eq!(
            cluster.endpoints(&td())[0].identity,
            "spiffe://cluster.local/ns/shop/sa/default"
        );
    }

    #[test]
    fn reset_replaces_everything_a_relist_no_longer_has() {
        let mut cluster = web_cluster();
        cluster
            .pods
            .reset(vec![pod("shop", "web-2", "web-sa", "v2", "10.0.0.2")]);
        assert_eq!(cluster.pods.len(), 1);
        let endpoints = cluster.endpoints(&td());
        assert_eq!(endpoints.len(), 1);
        assert_eq!(endpoints[0].instance, "web-2");
    }

    fn policy(ns: &str) -> Value {
        json!({
            "apiVersion": "trellis.dev/v1alpha1", "kind": "DestinationPolicy",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {"service": "web", "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ]},
        })
    }

    fn route(name: &str, subset: &str) -> Value {
        json!({
            "apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficRoute",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"service": "web", "rules": [{"backends": [{"subset": subset, "weight": 1}]}]},
        })
    }

    #[test]
    fn crds_become_the_resources_the_compiler_reads_and_configs_follow() {
        let mut cluster = web_cluster();
        cluster.policies.apply(guard(policy("shop")));
        cluster.routes.apply(guard(route("web", "v2")));
        let (resources, problems) = cluster.resources();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(resources.policies.len(), 1);
        assert_eq!(resources.routes.len(), 1);
        let endpoints = cluster.endpoints(&td());
        let catalog = Catalog::new(&resources, &endpoints, &BTreeSet::new());
        let config = catalog.config_for("shop", Default::default());
        let web = &config.services["web"];
        assert_eq!(web.endpoints.len(), 2);
        let json = String::from_utf8(seal(config.clone()).json.to_vec()).unwrap();
        assert!(json.contains("\"v2\""), "{json}");

        // Deleting the route takes it out of the next compile.
        cluster.routes.delete(&guard(route("web", "v2")));
        let (resources, _) = cluster.resources();
        assert!(resources.routes.is_empty());
    }

    #[test]
    fn a_malformed_or_invalid_object_is_reported_and_skipped_and_the_rest_applies() {
        let mut cluster = web_cluster();
        cluster.policies.apply(guard(policy("shop")));
        // `rules` is not a list: it does not deserialize.
        cluster.routes.apply(guard(json!({
            "apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficRoute",
            "metadata": {"name": "broken", "namespace": "shop"},
            "spec": {"service": "web", "rules": "everything"},
        })));
        // Deserializes, but names a subset the policy does not define.
        cluster.routes.apply(guard(route("ghost", "v9")));
        cluster.routes.apply(guard(route("web", "v1")));
        let (resources, problems) = cluster.resources();
        let names: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.kind.as_str(), p.name.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![("TrafficRoute", "broken"), ("TrafficRoute", "ghost")],
            "{problems:?}"
        );
        assert!(problems[1].error.contains("v9"), "{}", problems[1].error);
        let routes: Vec<_> = resources
            .routes
            .iter()
            .map(|r| r.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(routes, vec!["web".to_string()]);

        // Fixed in place: the problem goes and the route applies.
        cluster.routes.apply(guard(route("broken", "v2")));
        let (resources, problems) = cluster.resources();
        assert_eq!(problems.len(), 1);
        assert_eq!(resources.routes.len(), 2);
        // A malformed Pod is reported too, and skipped.
        cluster.pods.apply(guard(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop"},
            "spec": {"containers": "nope"},
        })));
        assert_eq!(cluster.workload_problems().len(), 1);
        assert_eq!(
            cluster.endpoints(&td()).len(),
            1,
            "web-1 is skipped, web-2 stays"
        );
    }

    #[test]
    fn a_canary_takes_its_weight_from_its_status_and_only_mesh_config_default_counts() {
        let mut cluster = Cluster::default();
        cluster.policies.apply(guard(policy("shop")));
        cluster.canaries.apply(guard(json!({
            "apiVersion": "trellis.dev/v1alpha1", "kind": "Canary",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"service": "web", "stableSubset": "v1", "canarySubset": "v2",
                     "steps": [10, 50, 100], "interval": "1m",
                     "analysis": {"minSuccessRate": 0.99, "maxP99Latency": "500ms", "minRequests": 10}},
            "status": {"phase": "Progressing", "weight": 10, "specDigest": "abc"},
        })));
        cluster.mesh.apply(guard(json!({
            "apiVersion": "trellis.dev/v1alpha1", "kind": "MeshConfig",
            "metadata": {"name": "other"},
            "spec": {"certTTL": "1h"},
        })));
        let (resources, problems) = cluster.resources();
        assert!(resources.mesh.is_none());
        assert_eq!(resources.canaries.len(), 1, "{problems:?}");
        assert_eq!(
            resources.canary_status[&("shop".to_string(), "web".to_string())].weight,
            10
        );
    }
}
