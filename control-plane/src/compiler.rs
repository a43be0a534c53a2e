//! The compiler: applied resources + registered endpoints → one `ProxyConfig` per
//! service that has proxies. Every proxy of a service shares one encoded snapshot;
//! the version is a digest of the content, so an unchanged config is never re-sent.
//! A change (apply, join, leave, health) wakes it; bursts are debounced into one round.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use trellis_api::config::{
    AllowConfig, AuthorizationDefault, BackendConfig, BackoffConfig, BulkheadConfig,
    CircuitBreakerConfig, EndpointConfig, FaultAbortConfig, FaultConfig, FaultDelayConfig,
    HeaderMatchConfig, InboundConfig, MirrorConfig, MtlsMode, OperationConfig, ProxyConfig,
    RateLimitConfig, RetriesConfig, RetryBudgetConfig, RouteConfig, RouteMatchConfig,
    ServiceConfig, SourceConfig, TracingConfig,
};
use trellis_crds::{
    AuthorizationPolicy, Canary, CanarySpec, CanaryStatus, DefaultAuthorization, DestinationPolicy,
    DestinationPolicySpec, Document, MeshConfigSpec, Mtls, RouteRule, TrafficRoute,
};

use crate::{
    registry::{EndpointView, Group, Registry},
    source::{ConfigSource, Universal},
    store::Store,
    telemetry,
};

/// The certificate lifetime when no MeshConfig says otherwise.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// One encoded config, shared by every proxy of its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub version: String,
    pub json: Bytes,
}

/// The resources the compiler reads, sorted by kind.
#[derive(Debug, Default)]
pub struct Resources {
    pub mesh: Option<MeshConfigSpec>,
    pub policies: Vec<DestinationPolicy>,
    pub routes: Vec<TrafficRoute>,
    pub authorization: Vec<AuthorizationPolicy>,
    pub canaries: Vec<Canary>,
    /// The controller's status of each Canary, by (namespace, name).
    pub canary_status: BTreeMap<(String, String), CanaryStatus>,
}

impl Resources {
    pub fn from_documents(documents: Vec<Document>) -> Self {
        let mut resources = Self::default();
        for document in documents {
            match document {
                // Validation admits one MeshConfig (named `default`).
                Document::MeshConfig(mesh) => {
                    resources.mesh.get_or_insert(mesh.spec);
                }
                Document::DestinationPolicy(p) => resources.policies.push(p),
                Document::TrafficRoute(r) => resources.routes.push(r),
                Document::AuthorizationPolicy(a) => resources.authorization.push(a),
                // Its weights come from its status: see `split_for_canary`.
                Document::Canary(c) => resources.canaries.push(c),
            }
        }
        resources
    }

    pub fn cert_ttl(&self) -> Option<Duration> {
        let mesh = self.mesh.as_ref()?;
        trellis_api::duration::parse(&mesh.cert_ttl).ok()
    }

    /// Each Canary with its (namespace, name) and the controller's status of it, if
    /// any; moved out of `self`.
    pub fn take_canaries(&mut self) -> Vec<(String, String, Canary, Option<CanaryStatus>)> {
        let mut statuses = std::mem::take(&mut self.canary_status);
        std::mem::take(&mut self.canaries)
            .into_iter()
            .map(|canary| {
                let namespace = namespace_of(&canary.metadata).to_string();
                let name = canary.metadata.name.clone().unwrap_or_default();
                let status = statuses.remove(&(namespace.clone(), name.clone()));
                (namespace, name, canary, status)
            })
            .collect()
    }
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// Every callable service of the mesh, built once per round and shared by every group.
/// A service is callable once it has an instance or a resource describing it.
#[derive(Debug, Default)]
pub struct Catalog {
    /// By (namespace, service); route backends name services of the same namespace.
    services: BTreeMap<(String, String), ServiceConfig>,
    mtls: MtlsMode,
    /// MeshConfig `tracing`, the same for every proxy.
    tracing: Option<TracingConfig>,
}

impl Catalog {
    /// `known` are services that had instances before: callers of one whose last
    /// instance left get `no-endpoints`, not `unknown-service`.
    pub fn new(
        resources: &Resources,
        endpoints: &[EndpointView],
        known: &BTreeSet<(String, String)>,
    ) -> Self {
        let mut services: BTreeMap<(String, String), ServiceConfig> = BTreeMap::new();
        let mut entry = |namespace: &str, service: &str| {
            services
                .entry((namespace.to_string(), service.to_string()))
                .or_insert_with(|| ServiceConfig {
                    namespace: namespace.to_string(),
                    ..ServiceConfig::default()
                });
        };
        for (namespace, service) in known {
            entry(namespace, service);
        }
        for e in endpoints {
            entry(&e.namespace, &e.service);
        }
        for p in &resources.policies {
            entry(namespace_of(&p.metadata), &p.spec.service);
        }
        for r in &resources.routes {
            let ns = namespace_of(&r.metadata);
            entry(ns, &r.spec.service);
            for rule in &r.spec.rules {
                let backends = rule.backends.iter().map(|b| &b.service);
                let mirror = rule.mirror.iter().map(|m| &m.service);
                for other in backends.chain(mirror).flatten() {
                    entry(ns, other);
                }
            }
        }
        // Unready instances are withdrawn: peers never see them.
        for e in endpoints.iter().filter(|e| e.healthy) {
            if let Some(service) = services.get_mut(&(e.namespace.clone(), e.service.clone())) {
                service.endpoints.push(EndpointConfig {
                    address: e.address,
                    identity: e.identity.clone(),
                    labels: e.labels.clone(),
                });
            }
        }
        for p in &resources.policies {
            let key = (
                namespace_of(&p.metadata).to_string(),
                p.spec.service.clone(),
            );
            if let Some(service) = services.get_mut(&key) {
                apply_policy(service, &p.spec);
            }
        }
        for r in &resources.routes {
            let key = (
                namespace_of(&r.metadata).to_string(),
                r.spec.service.clone(),
            );
            let Some(service) = services.get_mut(&key) else {
                continue;
            };
            for rule in &r.spec.rules {
                let index = service.routes.len();
                service.routes.push(route(index, rule));
            }
        }
        for canary in &resources.canaries {
            let namespace = namespace_of(&canary.metadata).to_string();
            let name = canary.metadata.name.clone().unwrap_or_default();
            // Before the controller's first word on this spec the canary gets nothing:
            // a weight written for an earlier spec (say, 100% for another subset)
            // must not reach the new one.
            let digest = crate::canary::spec_digest(&canary.spec);
            let weight = resources
                .canary_status
                .get(&(namespace.clone(), name))
                .filter(|s| s.spec_digest == digest)
                .map_or(0, |s| s.weight);
            if let Some(service) = services.get_mut(&(namespace, canary.spec.service.clone())) {
                split_for_canary(service, &canary.spec, weight);
            }
        }
        let mtls = match resources.mesh.as_ref().map(|m| m.mtls) {
            Some(Mtls::Permissive) => MtlsMode::Permissive,
            Some(Mtls::Strict) | None => MtlsMode::Strict,
        };
        let tracing = resources
            .mesh
            .as_ref()
            .and_then(|m| m.tracing.as_ref())
            .map(|t| TracingConfig {
                otlp_endpoint: t.otlp_endpoint.clone(),
                sampling_ratio: t.sampling_ratio,
            });
        Self {
            services,
            mtls,
            tracing,
        }
    }

    /// The config of a proxy in `namespace`: services of its own namespace go by their
    /// name, others by `name.namespace`, which is also how the proxy resolves a host.
    pub fn config_for(&self, namespace: &str, inbound: InboundConfig) -> ProxyConfig {
        let key = |ns: &str, service: &str| {
            if ns == namespace {
                service.to_string()
            } else {
                format!("{service}.{ns}")
            }
        };
        let services = self
            .services
            .iter()
            .map(|((ns, name), service)| {
                let mut service = service.clone();
                for route in &mut service.routes {
                    let backends = route.backends.iter_mut().map(|b| &mut b.service);
                    let mirror = route.mirror.iter_mut().map(|m| &mut m.service);
                    for other in backends.chain(mirror).flatten() {
                        *other = key(ns, other);
                    }
                }
                (key(ns, name), service)
            })
            .collect();
        ProxyConfig {
            version: String::new(),
            mtls: self.mtls,
            services,
            inbound,
            tracing: self.tracing.clone(),
        }
    }
}

/// The name of the rule a Canary adds for requests no other rule matches.
pub const CANARY_ROUTE: &str = "canary";

/// While a Canary exists its weight decides between the stable and the canary subset:
/// every rule that sends to the stable subset (and otherwise only to the canary) is
/// split, and a last rule splits the requests no rule matches. Rules that send
/// elsewhere, like a header match that sends testers to the canary, stay as written.
fn split_for_canary(service: &mut ServiceConfig, spec: &CanarySpec, weight: u32) {
    let weight = weight.min(100);
    let subset = |name: &str, weight| BackendConfig {
        service: None,
        subset: Some(name.to_string()),
        weight,
    };
    let split = || {
        vec![
            subset(&spec.stable_subset, 100 - weight),
            subset(&spec.canary_subset, weight),
        ]
    };
    let is =
        |b: &BackendConfig, name: &str| b.service.is_none() && b.subset.as_deref() == Some(name);
    for route in &mut service.routes {
        let stable_or_canary = route
            .backends
            .iter()
            .all(|b| is(b, &spec.stable_subset) || is(b, &spec.canary_subset));
        let to_stable = route.backends.iter().any(|b| is(b, &spec.stable_subset));
        if stable_or_canary && to_stable {
            route.backends = split();
        }
    }
    service.routes.push(RouteConfig {
        name: CANARY_ROUTE.to_string(),
        backends: split(),
        ..RouteConfig::default()
    });
}

/// The DestinationPolicy parts the callers' sidecars run (rateLimit runs in the
/// service's own sidecars: see `inbound`).
fn apply_policy(service: &mut ServiceConfig, spec: &DestinationPolicySpec) {
    let DestinationPolicySpec {
        service: _,
        subsets,
        load_balancer: _,
        circuit_breaker,
        bulkheads,
        connection_pool: _,
        retry_budget,
        rate_limit: _,
    } = spec;
    for s in subsets {
        service.subsets.insert(s.name.clone(), s.labels.clone());
    }
    service.circuit_breaker = circuit_breaker.as_ref().map(|cb| CircuitBreakerConfig {
        consecutive_failures: cb.consecutive_failures,
        base_ejection_time: cb.base_ejection_time.clone(),
        // Validation has checked both durations; the fallback is the documented default.
        max_ejection_time: cb
            .max_ejection_time_or_default()
            .map(|d| format!("{}ms", d.as_millis()))
            .unwrap_or_else(|_| cb.base_ejection_time.clone()),
        max_ejection_percent: cb.max_ejection_percent,
    });
    service.bulkheads = bulkheads
        .iter()
        .map(|b| BulkheadConfig {
            name: b.name.clone(),
            max_concurrent_requests: b.max_concurrent_requests,
            max_pending_requests: b.max_pending_requests,
            max_pending_time: b.max_pending_time.clone(),
        })
        .collect();
    service.retry_budget = retry_budget.as_ref().map(|b| RetryBudgetConfig {
        ratio: b.ratio,
        min_retries_per_second: b.min_retries_per_second,
    });
}

fn route(index: usize, rule: &RouteRule) -> RouteConfig {
    RouteConfig {
        name: rule.name.clone().unwrap_or_else(|| index.to_string()),
        matches: rule
            .matches
            .as_ref()
            .map(|m| RouteMatchConfig {
                path_prefix: m.path_prefix.clone(),
                path_exact: m.path_exact.clone(),
                path_regex: m.path_regex.clone(),
                method: m.method.clone(),
                headers: m
                    .headers
                    .iter()
                    .map(|h| HeaderMatchConfig {
                        name: h.name.clone(),
                        exact: h.exact.clone(),
                        prefix: h.prefix.clone(),
                        regex: h.regex.clone(),
                    })
                    .collect(),
            })
            .unwrap_or_default(),
        backends: rule
            .backends
            .iter()
            .map(|b| BackendConfig {
                service: b.service.clone(),
                subset: b.subset.clone(),
                weight: b.weight,
            })
            .collect(),
        timeout: rule.timeout.clone(),
        retries: rule.retries.as_ref().map(|r| RetriesConfig {
            attempts: r.attempts,
            per_try_timeout: r.per_try_timeout.clone(),
            on: r.on.iter().map(|on| on.0.clone()).collect(),
            backoff: r.backoff.as_ref().map(|b| BackoffConfig {
                base: b.base.clone(),
                max: b.max.clone(),
            }),
            allow_non_idempotent: r.allow_non_idempotent,
        }),
        bulkhead: rule.bulkhead.clone(),
        fault: rule.fault.as_ref().map(|f| FaultConfig {
            delay: f.delay.as_ref().map(|d| FaultDelayConfig {
                duration: d.duration.clone(),
                percent: d.percent,
            }),
            abort: f.abort.as_ref().map(|a| FaultAbortConfig {
                status: a.status,
                percent: a.percent,
            }),
        }),
        mirror: rule.mirror.as_ref().map(|m| MirrorConfig {
            service: m.service.clone(),
            subset: m.subset.clone(),
            percent: m.percent,
            compare: m.compare,
            ignore_fields: m.ignore_fields.clone(),
            max_body_bytes: m.max_body_bytes,
        }),
    }
}

/// Builds the config of every proxy of `group`.
pub fn compile(group: &Group, resources: &Resources, endpoints: &[EndpointView]) -> ProxyConfig {
    Catalog::new(resources, endpoints, &BTreeSet::new())
        .config_for(&group.namespace, inbound(group, resources))
}

fn inbound(group: &Group, resources: &Resources) -> InboundConfig {
    let default = match resources.mesh.as_ref().map(|m| m.default_authorization) {
        Some(DefaultAuthorization::Deny) => AuthorizationDefault::Deny,
        Some(DefaultAuthorization::AllowMesh) | None => AuthorizationDefault::Allow,
    };
    let allow = resources
        .authorization
        .iter()
        .filter(|a| a.spec.service == group.service && namespace_of(&a.metadata) == group.namespace)
        .flat_map(|a| &a.spec.rules)
        .map(|rule| AllowConfig {
            from: rule
                .from
                .iter()
                .map(|s| SourceConfig {
                    identity: s.identity.clone(),
                    namespace: s.namespace.clone(),
                })
                .collect(),
            to: rule
                .to
                .iter()
                .map(|o| OperationConfig {
                    methods: o.methods.clone(),
                    paths: o.paths.clone(),
                })
                .collect(),
        })
        .collect();
    // A service with any policy allows only what a rule allows.
    let has_policy = resources
        .authorization
        .iter()
        .any(|a| a.spec.service == group.service && namespace_of(&a.metadata) == group.namespace);
    let rate_limit = resources
        .policies
        .iter()
        .find(|p| p.spec.service == group.service && namespace_of(&p.metadata) == group.namespace)
        .and_then(|p| p.spec.rate_limit.as_ref())
        .map(|r| RateLimitConfig {
            requests_per_second: r.requests_per_second,
            burst: r.burst_or_default(),
            per_source: r.per_source,
        });
    InboundConfig {
        default: if has_policy {
            AuthorizationDefault::Deny
        } else {
            default
        },
        allow,
        rate_limit,
    }
}

/// Stamps the content digest as the version and encodes once.
pub fn seal(mut config: ProxyConfig) -> Snapshot {
    config.version = String::new();
    let digest = ring::digest::digest(&ring::digest::SHA256, &config.to_json());
    let version: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    config.version = version.clone();
    Snapshot {
        version,
        json: Bytes::from(config.to_json()),
    }
}

/// The running compiler: holds the latest snapshot of every group that has proxies.
#[derive(Debug)]
pub struct Compiler {
    store: Arc<Store>,
    registry: Arc<Registry>,
    trigger: Arc<Notify>,
    debounce: Duration,
    groups: Mutex<HashMap<Group, watch::Sender<Option<Arc<Snapshot>>>>>,
    /// Every (namespace, service) that ever had an instance while this process ran.
    known: Mutex<BTreeSet<(String, String)>>,
    /// The endpoints last written to the store, to write only changes.
    persisted: Mutex<Vec<u8>>,
    /// The store revision the last finished round compiled (at least).
    compiled_revision: std::sync::atomic::AtomicU64,
    cert_ttl: watch::Sender<Duration>,
    /// Resources and endpoints: the store and registry, or the cluster.
    source: Arc<dyn ConfigSource>,
}

impl Compiler {
    /// `trigger` is the notifier the registry and the API wake on every change.
    pub fn new(
        store: Arc<Store>,
        registry: Arc<Registry>,
        trigger: Arc<Notify>,
        debounce: Duration,
        cert_ttl: watch::Sender<Duration>,
    ) -> Self {
        let source = Arc::new(Universal {
            store: store.clone(),
            registry: registry.clone(),
        });
        Self {
            store,
            registry,
            trigger,
            debounce,
            groups: Mutex::default(),
            known: Mutex::default(),
            persisted: Mutex::default(),
            compiled_revision: std::sync::atomic::AtomicU64::new(0),
            cert_ttl,
            source,
        }
    }

    /// Compiles from `source` instead of the store and the registry (which still say
    /// which proxies are connected); the source wakes the compiler's trigger on change.
    pub fn with_source(mut self, source: Arc<dyn ConfigSource>) -> Self {
        self.source = source;
        self
    }

    pub fn source(&self) -> &Arc<dyn ConfigSource> {
        &self.source
    }

    /// The snapshots for `group`: the current one (if compiled yet), then every new one.
    pub fn watch(&self, group: &Group) -> watch::Receiver<Option<Arc<Snapshot>>> {
        let mut groups = self.groups.lock();
        match groups.get(group) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = watch::channel(None);
                groups.insert(group.clone(), sender);
                receiver
            }
        }
    }

    /// The store revision every published config reflects.
    pub fn compiled_revision(&self) -> u64 {
        self.compiled_revision
            .load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn changed(&self) {
        self.trigger.notify_one();
    }

    /// Recompiles on every change until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.trigger.notified() => {}
            }
            // Let a burst (an apply of many documents, proxies joining at start) land,
            // then compile once; changes during the round wake the next one.
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.debounce) => {}
            }
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.compile_round()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "compiling proxy configs failed; proxies keep their last config");
                }
                Err(e) => tracing::error!(error = %e, "the compiler task failed"),
            }
        }
    }

    /// The name of the store state holding the last endpoints.
    pub const ENDPOINTS_STATE: &'static str = "registry-endpoints";

    /// Keeps the endpoints in the store so a restarted control plane can publish them
    /// while their sidecars reconnect.
    fn persist_endpoints(
        &self,
        endpoints: &[EndpointView],
    ) -> Result<(), crate::store::StoreError> {
        let encoded = serde_json::to_vec(endpoints).unwrap_or_default();
        let mut persisted = self.persisted.lock();
        if *persisted != encoded {
            self.store.put_state(Self::ENDPOINTS_STATE, &encoded)?;
            *persisted = encoded;
        }
        Ok(())
    }

    /// One round: read the store and the registry, rebuild every group's snapshot and
    /// publish the ones that changed. Blocking (store reads); runs off the runtime.
    pub fn compile_round(&self) -> Result<(), crate::store::StoreError> {
        let start = Instant::now();
        let (revision, resources) = self.source.resources()?;
        // Without a MeshConfig (or after its deletion) the default applies again.
        let ttl = resources.cert_ttl().unwrap_or(DEFAULT_CERT_TTL);
        self.cert_ttl
            .send_if_modified(|current| std::mem::replace(current, ttl) != ttl);
        let endpoints = self.source.endpoints();
        // Losing this only costs a smoother restart; it must not stop configs. A cluster
        // keeps its endpoints itself.
        if self.source.mode() == crate::source::Mode::Universal
            && let Err(error) = self.persist_endpoints(&endpoints)
        {
            tracing::warn!(%error, "saving the registry's endpoints failed");
        }
        let known = {
            let mut known = self.known.lock();
            known.extend(
                endpoints
                    .iter()
                    .map(|e| (e.namespace.clone(), e.service.clone())),
            );
            known.clone()
        };
        let catalog = Catalog::new(&resources, &endpoints, &known);
        // Groups of one namespace without authorization policies of their own get the
        // same config: compile and encode it once.
        let mut sealed: HashMap<(String, InboundConfig), Arc<Snapshot>> = HashMap::new();
        let mut wanted: BTreeSet<Group> = self.registry.groups().into_iter().collect();
        {
            // Groups nobody watches any more are dropped; groups with proxies are built
            // even before their first watcher so a join finds its config ready.
            let mut groups = self.groups.lock();
            groups.retain(|group, sender| sender.receiver_count() > 0 || wanted.contains(group));
            wanted.extend(groups.keys().cloned());
        }
        // Encoding happens without the lock: `watch` is called from request handlers.
        let built: Vec<(Group, Arc<Snapshot>)> = wanted
            .into_iter()
            .map(|group| {
                let inbound = inbound(&group, &resources);
                let snapshot = sealed
                    .entry((group.namespace.clone(), inbound))
                    .or_insert_with_key(|(namespace, inbound)| {
                        Arc::new(seal(catalog.config_for(namespace, inbound.clone())))
                    })
                    .clone();
                (group, snapshot)
            })
            .collect();
        let mut groups = self.groups.lock();
        let mut pushed = 0u64;
        for (group, snapshot) in built {
            let sender = groups
                .entry(group)
                .or_insert_with(|| watch::channel(None).0);
            let modified = sender.send_if_modified(|current| {
                if current
                    .as_ref()
                    .is_some_and(|c| c.version == snapshot.version)
                {
                    return false;
                }
                *current = Some(snapshot);
                true
            });
            pushed += u64::from(modified);
        }
        drop(groups);
        self.compiled_revision
            .fetch_max(revision, std::sync::atomic::Ordering::Release);
        metrics::counter!(telemetry::COMPILES).increment(1);
        metrics::histogram!(telemetry::COMPILE_DURATION).record(start.elapsed().as_secs_f64());
        tracing::debug!(changed = pushed, elapsed = ?start.elapsed(), "proxy configs compiled");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use trellis_crds::parse_documents;

    fn endpoint(service: &str, namespace: &str, port: u16, version: &str) -> EndpointView {
        EndpointView {
            service: service.into(),
            namespace: namespace.into(),
            instance: format!("{service}-{port}"),
            address: ([127, 0, 0, 1], port).into(),
            identity: format!("spiffe://td/ns/{namespace}/sa/{service}"),
            labels: [("version".to_string(), version.to_string())].into(),
            healthy: true,
        }
    }

    fn resources(yaml: &str) -> Resources {
        Resources::from_documents(parse_documents(yaml).unwrap())
    }

    fn web() -> Group {
        Group {
            service: "web".into(),
            namespace: "default".into(),
        }
    }

    const ROUTED: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: api}
spec:
  service: api
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {name: api}
spec:
  service: api
  rules:
  - name: testers
    match: {headers: [{name: x-canary, exact: "true"}]}
    backends: [{subset: v2, weight: 1}]
  - backends: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]
    timeout: 2s
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web}
spec:
  service: web
  rules:
  - from: [{identity: "spiffe://td/ns/default/sa/gateway"}]
    to: [{methods: [GET], paths: ["/shop/*"]}]
"#;

    #[test]
    fn a_canary_weight_splits_its_subsets_and_leaves_other_rules_alone() {
        let canary = r#"
---
apiVersion: trellis.dev/v1alpha1
kind: Canary
metadata: {name: api}
spec:
  service: api
  stableSubset: v1
  canarySubset: v2
  steps: [10, 50]
  interval: 1m
  analysis: {minSuccessRate: 99, maxP99Latency: 1s}
"#;
        let endpoints = vec![endpoint("api", "default", 1, "v1")];
        let weights = |resources: &Resources| {
            let config = compile(&web(), resources, &endpoints);
            config.services["api"]
                .routes
                .iter()
                .map(|r| {
                    let backends = r
                        .backends
                        .iter()
                        .map(|b| (b.subset.clone().unwrap_or_default(), b.weight));
                    (r.name.clone(), backends.collect::<Vec<_>>())
                })
                .collect::<Vec<_>>()
        };
        let split = |w: u32| vec![("v1".to_string(), 100 - w), ("v2".to_string(), w)];
        let testers = ("testers".to_string(), vec![("v2".to_string(), 1)]);

        let mut resources = resources(&format!("{ROUTED}{canary}"));
        // No status yet: the canary gets nothing, the testers still get v2.
        assert_eq!(
            weights(&resources),
            [
                testers.clone(),
                ("1".into(), split(0)),
                (CANARY_ROUTE.into(), split(0))
            ]
        );
        let mut status = CanaryStatus {
            weight: 25,
            spec_digest: crate::canary::spec_digest(&resources.canaries[0].spec),
            ..CanaryStatus::default()
        };
        let key = ("default".to_string(), "api".to_string());
        resources.canary_status.insert(key.clone(), status.clone());
        assert_eq!(
            weights(&resources),
            [
                testers.clone(),
                ("1".into(), split(25)),
                (CANARY_ROUTE.into(), split(25))
            ]
        );
        // A status written for an earlier spec moves nothing.
        status.spec_digest = "for another spec".into();
        resources.canary_status.insert(key, status);
        assert_eq!(weights(&resources)[2], (CANARY_ROUTE.into(), split(0)));
    }

    #[test]
    fn routes_subsets_endpoints_and_authorization_reach_the_config() {
        let endpoints = vec![
            endpoint("api", "default", 1, "v1"),
            endpoint("api", "default", 2, "v2"),
            endpoint("web", "default", 3, "v1"),
            endpoint("db", "data", 4, "v1"),
        ];
        let config = compile(&web(), &resources(ROUTED), &endpoints);
        let api = &config.services["api"];
        assert_eq!(api.endpoints.len(), 2);
        assert_eq!(api.subsets["v2"]["version"], "v2");
        assert_eq!(api.routes.len(), 2);
        assert_eq!(api.routes[0].name, "testers");
        assert_eq!(api.routes[1].name, "1");
        assert_eq!(api.routes[1].backends[1].weight, 10);
        assert_eq!(api.routes[1].timeout.as_deref(), Some("2s"));
        // Another namespace's service is named with its namespace.
        assert!(config.services.contains_key("db.data"));
        assert!(!config.services.contains_key("db"));
        // A policy for web: default deny, one rule.
        assert_eq!(config.inbound.default, AuthorizationDefault::Deny);
        assert_eq!(config.inbound.allow[0].to[0].paths, ["/shop/*"]);
        // api has no policy: the mesh default (allow).
        let api_group = Group {
            service: "api".into(),
            namespace: "default".into(),
        };
        let api_config = compile(&api_group, &resources(ROUTED), &endpoints);
        assert_eq!(api_config.inbound, InboundConfig::default());
    }

    #[test]
    fn unhealthy_instances_are_withdrawn() {
        let mut sick = endpoint("api", "default", 2, "v1");
        sick.healthy = false;
        let endpoints = vec![endpoint("api", "default", 1, "v1"), sick];
        let config = compile(&web(), &Resources::default(), &endpoints);
        assert_eq!(config.services["api"].endpoints.len(), 1);
        assert_eq!(config.services["api"].endpoints[0].address.port(), 1);
    }

    #[test]
    fn the_version_is_the_content_digest() {
        let endpoints = vec![endpoint("api", "default", 1, "v1")];
        let a = seal(compile(&web(), &Resources::default(), &endpoints));
        let b = seal(compile(&web(), &Resources::default(), &endpoints));
        assert_eq!(a, b);
        let more = vec![
            endpoint("api", "default", 1, "v1"),
            endpoint("api", "default", 2, "v1"),
        ];
        let c = seal(compile(&web(), &Resources::default(), &more));
        assert_ne!(a.version, c.version);
        let decoded = ProxyConfig::from_json(&c.json).unwrap();
        assert_eq!(decoded.version, c.version);
    }

    #[test]
    fn mesh_config_sets_mtls_default_authorization_and_cert_ttl() {
        let r = resources(
            "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\n\
             spec: {mtls: PERMISSIVE, defaultAuthorization: deny, certTTL: 2h}\n",
        );
        let config = compile(&web(), &r, &[]);
        assert_eq!(config.mtls, MtlsMode::Permissive);
        assert_eq!(config.inbound.default, AuthorizationDefault::Deny);
        assert_eq!(r.cert_ttl(), Some(Duration::from_secs(7200)));
        assert_eq!(config.tracing, None);
    }

    #[test]
    fn mesh_config_tracing_reaches_every_proxy() {
        let r = resources(
            "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\n\
             spec: {tracing: {otlpEndpoint: \"http://collector:4317\", samplingRatio: 0.25}}\n",
        );
        let config = compile(&web(), &r, &[]);
        assert_eq!(
            config.tracing,
            Some(TracingConfig {
                otlp_endpoint: Some("http://collector:4317".into()),
                sampling_ratio: 0.25,
            })
        );
        // A changed ratio is a new config version, so proxies are sent it.
        let other = resources(
            "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\n\
             spec: {tracing: {otlpEndpoint: \"http://collector:4317\", samplingRatio: 0.5}}\n",
        );
        assert_ne!(
            seal(compile(&web(), &r, &[])).version,
            seal(compile(&web(), &other, &[])).version
        );
    }

    /// Every resilience field of the example reaches the config the sidecars run:
    /// nothing applied is silently dropped on the way.
    #[test]
    fn resilience_fields_reach_callers_and_the_services_own_sidecars() {
        let yaml = include_str!("../../crds/examples/resilience.yaml");
        let r = resources(yaml);
        let caller = Group {
            service: "order".into(),
            namespace: "shop".into(),
        };
        let config = compile(&caller, &r, &[]);
        let inventory = &config.services["inventory"];
        let breaker = inventory.circuit_breaker.as_ref().unwrap();
        assert_eq!(
            (breaker.consecutive_failures, breaker.max_ejection_percent),
            (5, 50)
        );
        assert_eq!(breaker.base_ejection_time, "30s");
        assert_eq!(breaker.max_ejection_time, "300000ms");
        assert!(
            inventory.retry_budget.is_none(),
            "the sidecar applies the default"
        );
        let chaos = &inventory.routes[0];
        let fault = chaos.fault.as_ref().unwrap();
        assert_eq!(fault.abort.as_ref().unwrap().status, 503);
        assert_eq!(fault.delay.as_ref().unwrap().duration, "500ms");
        let reserve = &inventory.routes[1];
        let retries = reserve.retries.as_ref().unwrap();
        assert_eq!(retries.attempts, 3);
        assert!(retries.allow_non_idempotent);
        assert_eq!(retries.on, ["5xx", "reset"]);
        assert_eq!(retries.per_try_timeout.as_deref(), Some("500ms"));
        // The rate limit runs in inventory's own sidecars, not in its callers'.
        assert!(config.inbound.rate_limit.is_none());
        let own = Group {
            service: "inventory".into(),
            namespace: "shop".into(),
        };
        let limit = compile(&own, &r, &[]).inbound.rate_limit.unwrap();
        assert_eq!(
            (limit.requests_per_second, limit.burst, limit.per_source),
            (200, 400, true)
        );

        // Bulkhead pools and the routes that pick them.
        let payment = resources(include_str!("../../crds/examples/payment.yaml"));
        let config = compile(&caller, &payment, &[]);
        let service = &config.services["payment"];
        let pools: Vec<&str> = service.bulkheads.iter().map(|b| b.name.as_str()).collect();
        assert!(pools.contains(&"critical"), "{pools:?}");
        assert!(
            service
                .routes
                .iter()
                .any(|r| r.bulkhead.as_deref() == Some("critical"))
        );
    }
}
