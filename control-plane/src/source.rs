//! Where the compiler's input comes from. Universal mode: resources applied through
//! the operator API into the embedded store, endpoints from the sidecars in the
//! registry. Kubernetes mode: both from the cluster's objects, as kube watchers see
//! them (`crate::kubernetes`). Either way a source wakes the compiler through the
//! `Notify` it was built with whenever its answer may have changed; the compiler
//! debounces and asks again.

use std::sync::Arc;

use serde::Serialize;

use crate::{
    compiler::Resources,
    registry::{EndpointView, Registry},
    store::{Store, StoreError},
};

/// Which kind of source runs; the operator API refuses writes the source does not own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The embedded store and the sidecars' own announcements.
    Universal,
    /// CRDs, Services, EndpointSlices and Pods of the cluster.
    Kubernetes,
}

/// An object a source could not use, with why; it is skipped, the rest still apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, PartialOrd, Ord)]
pub struct Problem {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub error: String,
}

/// What the compiler needs. Called off the runtime (`spawn_blocking`): a source may block.
pub trait ConfigSource: Send + Sync + std::fmt::Debug {
    fn mode(&self) -> Mode;

    /// The resources to compile and the revision they reflect at least (the store's
    /// revision; 0 where there is none).
    fn resources(&self) -> Result<(u64, Resources), StoreError>;

    /// Every endpoint of every service, healthy or not (the compiler publishes the
    /// healthy ones).
    fn endpoints(&self) -> Vec<EndpointView>;

    /// Objects skipped because they could not be read or are invalid.
    fn problems(&self) -> Vec<Problem> {
        Vec::new()
    }

    /// The valid resources as documents (status included), where they do not live in
    /// the store: the operator API's reads serve these instead.
    fn documents(&self) -> Option<Vec<trellis_crds::Document>> {
        None
    }
}

/// Universal mode: the store and the registry.
#[derive(Debug)]
pub struct Universal {
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
}

impl ConfigSource for Universal {
    fn mode(&self) -> Mode {
        Mode::Universal
    }

    fn resources(&self) -> Result<(u64, Resources), StoreError> {
        // Read before the resources: what is compiled is at least this revision.
        let revision = self.store.revision()?;
        let mut resources = Resources::from_documents(self.store.list(None)?);
        for ((namespace, name), bytes) in self.store.statuses("Canary")? {
            match serde_json::from_slice(&bytes) {
                Ok(status) => {
                    resources.canary_status.insert((namespace, name), status);
                }
                // The controller writes it anew on its next step; until then the
                // canary gets nothing, which is the safe side.
                Err(error) => {
                    tracing::warn!(%error, namespace, name, "unreadable canary status")
                }
            }
        }
        Ok((revision, resources))
    }

    fn endpoints(&self) -> Vec<EndpointView> {
        self.registry.endpoints()
    }
}
