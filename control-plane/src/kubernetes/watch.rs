//! The Kubernetes config source: one kube `watcher` per kind (the five CRDs, Services,
//! EndpointSlices, Pods), cluster-wide, with kube's default backoff, feeding the
//! [`Cluster`] indexes. Objects come wrapped in `DeserializeGuard`, so one malformed
//! object is reported and skipped instead of failing the whole list. Every change
//! wakes the compiler.

use std::{
    collections::BTreeSet,
    fmt::Debug,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    core::DeserializeGuard,
    runtime::{WatchStreamExt, watcher},
};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use trellis_ca::TrustDomain;
use trellis_crds::{AuthorizationPolicy, Canary, DestinationPolicy, MeshConfig, TrafficRoute};

use super::indexes::{Cluster, Index};
use crate::{
    compiler::Resources,
    registry::EndpointView,
    source::{ConfigSource, Mode, Problem},
    store::StoreError,
};

/// Objects skipped because they are malformed or invalid, by kind.
pub const INVALID_OBJECTS: &str = "trellis_control_plane_kubernetes_invalid_objects";
/// Watch errors (each is retried with backoff), by kind.
pub const WATCH_ERRORS: &str = "trellis_control_plane_kubernetes_watch_errors_total";

/// How many kinds are watched; the source is synced once each has listed once.
const KINDS: usize = 8;

#[derive(Debug)]
pub struct KubernetesSource {
    cluster: Mutex<Cluster>,
    trust_domain: TrustDomain,
    trigger: Arc<Notify>,
    /// Bumped on every change: the "revision" a compile reflects.
    revision: AtomicU64,
    /// Kinds that have completed their first list.
    synced: Mutex<BTreeSet<String>>,
    synced_tx: watch::Sender<bool>,
    /// The problems last reported, to log each once.
    reported: Mutex<Vec<Problem>>,
}

impl KubernetesSource {
    /// `trigger` is the compiler's: it is woken on every change.
    pub fn new(trust_domain: TrustDomain, trigger: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            cluster: Mutex::default(),
            trust_domain,
            trigger,
            revision: AtomicU64::new(0),
            synced: Mutex::default(),
            synced_tx: watch::channel(false).0,
            reported: Mutex::default(),
        })
    }

    /// Starts the watchers; they run until `shutdown`.
    pub fn spawn(self: &Arc<Self>, client: &Client, shutdown: &CancellationToken) {
        macro_rules! watch_kind {
            ($kind:ty, $field:ident) => {
                tokio::spawn(run::<$kind>(
                    client.clone(),
                    self.clone(),
                    |c: &mut Cluster| &mut c.$field,
                    shutdown.clone(),
                ));
            };
        }
        watch_kind!(MeshConfig, mesh);
        watch_kind!(DestinationPolicy, policies);
        watch_kind!(TrafficRoute, routes);
        watch_kind!(AuthorizationPolicy, authorization);
        watch_kind!(Canary, canaries);
        watch_kind!(Service, services);
        watch_kind!(EndpointSlice, slices);
        watch_kind!(Pod, pods);
    }

    /// Waits until every kind has been listed once (configs built before would lack
    /// endpoints), logging what it still waits for every `every`.
    pub async fn wait_synced(&self, every: Duration) {
        let mut synced = self.synced_tx.subscribe();
        loop {
            if *synced.borrow_and_update() {
                return;
            }
            match tokio::time::timeout(every, synced.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    let done = self.synced.lock().clone();
                    tracing::warn!(
                        listed = ?done,
                        "still waiting for the first list of every watched kind from the Kubernetes API"
                    );
                }
            }
        }
    }

    pub fn is_synced(&self) -> bool {
        *self.synced_tx.borrow()
    }

    /// Applies a change to the indexes and wakes the compiler.
    pub fn update(&self, change: impl FnOnce(&mut Cluster)) {
        change(&mut self.cluster.lock());
        self.revision.fetch_add(1, Ordering::AcqRel);
        self.trigger.notify_one();
    }

    fn mark_synced(&self, kind: &str) {
        let mut synced = self.synced.lock();
        if synced.insert(kind.to_string()) && synced.len() == KINDS {
            tracing::info!("every watched kind is listed; compiling from the cluster");
            self.synced_tx.send_replace(true);
        }
    }

    /// Logs problems not reported before and sets the gauge per kind.
    fn report(&self, problems: &[Problem]) {
        let mut reported = self.reported.lock();
        if *reported == problems {
            return;
        }
        for problem in problems.iter().filter(|p| !reported.contains(p)) {
            tracing::warn!(
                kind = problem.kind,
                namespace = problem.namespace,
                name = problem.name,
                error = problem.error,
                "skipping a malformed or invalid object; the others apply"
            );
        }
        let kinds: BTreeSet<&str> = problems
            .iter()
            .chain(reported.iter())
            .map(|p| p.kind.as_str())
            .collect();
        for kind in kinds {
            let count = problems.iter().filter(|p| p.kind == kind).count();
            metrics::gauge!(INVALID_OBJECTS, "kind" => kind.to_string()).set(count as f64);
        }
        *reported = problems.to_vec();
    }
}

impl ConfigSource for KubernetesSource {
    fn mode(&self) -> Mode {
        Mode::Kubernetes
    }

    fn resources(&self) -> Result<(u64, Resources), StoreError> {
        let revision = self.revision.load(Ordering::Acquire);
        let (resources, mut problems) = {
            let cluster = self.cluster.lock();
            let (resources, mut problems) = cluster.resources();
            problems.extend(cluster.workload_problems());
            (resources, problems)
        };
        problems.sort();
        self.report(&problems);
        Ok((revision, resources))
    }

    fn endpoints(&self) -> Vec<EndpointView> {
        self.cluster.lock().endpoints(&self.trust_domain)
    }

    fn documents(&self) -> Option<Vec<trellis_crds::Document>> {
        Some(self.cluster.lock().documents().0)
    }

    fn problems(&self) -> Vec<Problem> {
        let mut problems = {
            let cluster = self.cluster.lock();
            let (_, mut problems) = cluster.resources();
            problems.extend(cluster.workload_problems());
            problems
        };
        problems.sort();
        problems
    }
}

/// Watches every object of `K` in the cluster into its index until `shutdown`.
async fn run<K>(
    client: Client,
    source: Arc<KubernetesSource>,
    index: fn(&mut Cluster) -> &mut Index<K>,
    shutdown: CancellationToken,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let kind = K::kind(&()).into_owned();
    let kind = kind.as_str();
    let api: Api<DeserializeGuard<K>> = Api::all(client);
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    // A (re)list arrives as Init, InitApply.., InitDone and replaces the index at once.
    let mut listed: Vec<DeserializeGuard<K>> = Vec::new();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = stream.next() => event,
        };
        match event {
            None => {
                tracing::error!(kind, "the watch ended; this kind is no longer followed");
                return;
            }
            Some(Err(error)) => {
                metrics::counter!(WATCH_ERRORS, "kind" => kind.to_string()).increment(1);
                tracing::warn!(kind, %error, "watching failed; retrying with backoff");
            }
            Some(Ok(watcher::Event::Init)) => listed.clear(),
            Some(Ok(watcher::Event::InitApply(object))) => listed.push(object),
            Some(Ok(watcher::Event::InitDone)) => {
                let objects = std::mem::take(&mut listed);
                tracing::debug!(kind, objects = objects.len(), "listed");
                source.update(|cluster| index(cluster).reset(objects));
                source.mark_synced(kind);
            }
            Some(Ok(watcher::Event::Apply(object))) => {
                source.update(|cluster| index(cluster).apply(object));
            }
            Some(Ok(watcher::Event::Delete(object))) => {
                source.update(|cluster| index(cluster).delete(&object));
            }
        }
    }
}
