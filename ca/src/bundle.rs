//! The trust bundle: the root certificates a peer's chain must lead to. It holds
//! several roots while one is rotated out and another in.

use rustls_pki_types::{CertificateDer, TrustAnchor, pem::PemObject};

use crate::svid::parse_certificate;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("trust bundle PEM: {0}")]
    Pem(String),
    #[error("trust bundle root #{index}: {reason}")]
    Root { index: usize, reason: String },
}

/// Root certificates, with the webpki trust anchors derived from them once.
#[derive(Clone, Default)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

// === impl TrustBundle ===

impl TrustBundle {
    /// A bundle no certificate chains to: every verification fails until roots arrive.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Takes each root after checking that it parses and is a CA certificate.
    /// Duplicates are kept once.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        let mut bundle = Self::empty();
        for (index, root) in roots.into_iter().enumerate() {
            bundle
                .add(root)
                .map_err(|reason| BundleError::Root { index, reason })?;
        }
        Ok(bundle)
    }

    /// Parses every `CERTIFICATE` block of `pem`; any other block is refused.
    pub fn from_pem(pem: &str) -> Result<Self, BundleError> {
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        if roots.is_empty() {
            return Err(BundleError::Pem("no CERTIFICATE block found".into()));
        }
        Self::new(roots)
    }

    pub fn to_pem(&self) -> String {
        pem_encode_certs(&self.roots)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The union of two bundles: how a new root is introduced before the old one leaves.
    pub fn merged(&self, other: &TrustBundle) -> TrustBundle {
        let mut bundle = self.clone();
        for root in &other.roots {
            // Both sides were checked when they were built.
            let _ = bundle.add(root.clone());
        }
        bundle
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    fn add(&mut self, root: CertificateDer<'static>) -> Result<(), String> {
        if self.roots.contains(&root) {
            return Ok(());
        }
        let cert = parse_certificate(&root).map_err(|e| e.to_string())?;
        if !cert.is_ca() {
            return Err("not a CA certificate (basicConstraints cA is not set)".into());
        }
        let anchor = webpki::anchor_from_trusted_cert(&root)
            .map_err(|e| format!("not usable as a trust anchor: {e}"))?
            .to_owned();
        self.anchors.push(anchor);
        self.roots.push(root);
        Ok(())
    }
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.len())
            .finish()
    }
}

pub(crate) fn pem_encode_certs(certs: &[CertificateDer<'_>]) -> String {
    let blocks = certs
        .iter()
        .map(|c| pem::Pem::new("CERTIFICATE", c.to_vec()))
        .collect::<Vec<_>>();
    pem::encode_many(&blocks)
}
