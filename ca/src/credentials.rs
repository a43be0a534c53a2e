//! The current SVID and trust bundle of a process, swappable at run time.
//!
//! rustls asks the resolver for a certificate on every handshake and the verifiers
//! read the bundle on every handshake, so a swap here rotates certificates without
//! rebuilding any `ServerConfig`/`ClientConfig` and without touching established
//! connections.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::{
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::{Svid, TrustBundle};

/// A shared handle: clones see the same state.
#[derive(Clone)]
pub struct Credentials {
    svid: Arc<ArcSwapOption<Svid>>,
    bundle: Arc<ArcSwap<TrustBundle>>,
}

// === impl Credentials ===

impl Credentials {
    /// Until an SVID is set, handshakes fail (no certificate to present) rather than the
    /// process.
    pub fn new(bundle: TrustBundle) -> Self {
        Self {
            svid: Arc::new(ArcSwapOption::empty()),
            bundle: Arc::new(ArcSwap::from_pointee(bundle)),
        }
    }

    pub fn with_svid(svid: Svid, bundle: TrustBundle) -> Self {
        let creds = Self::new(bundle);
        creds.set_svid(svid);
        creds
    }

    /// The next handshake presents `svid`; connections already established keep theirs.
    pub fn set_svid(&self, svid: Svid) {
        tracing::debug!(id = %svid.id(), serial = svid.serial(), "SVID installed");
        self.svid.store(Some(Arc::new(svid)));
    }

    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.bundle.store(Arc::new(bundle));
    }

    pub fn svid(&self) -> Option<Arc<Svid>> {
        self.svid.load_full()
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.svid
            .load()
            .as_ref()
            .map(|svid| svid.certified_key().clone())
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("svid", &self.svid.load())
            .field("bundle", &self.bundle.load())
            .finish()
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified_key()
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.certified_key()
    }

    fn has_certs(&self) -> bool {
        self.svid.load().is_some()
    }
}
