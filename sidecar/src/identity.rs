//! The sidecar's own identity: its SVID and trust bundle, read from PEM files in
//! static mode and held in `Credentials` so a later renewal can swap them in place.

use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use trellis_ca::{Credentials, Svid, TrustBundle};

use crate::static_config::IdentityFiles;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

pub fn load(files: &IdentityFiles) -> Result<Credentials, IdentityError> {
    let IdentityFiles {
        certificate,
        private_key,
        trust_bundle,
    } = files;
    let fail = |path: &Path, reason: String| IdentityError::File {
        path: path.into(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(certificate)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail(certificate, e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_file(private_key).map_err(|e| fail(private_key, e.to_string()))?;
    let bundle_pem =
        std::fs::read_to_string(trust_bundle).map_err(|e| fail(trust_bundle, e.to_string()))?;
    let bundle =
        TrustBundle::from_pem(&bundle_pem).map_err(|e| fail(trust_bundle, e.to_string()))?;
    let svid = Svid::new(chain, key).map_err(|e| fail(certificate, e.to_string()))?;
    if svid.not_after() <= std::time::SystemTime::now() {
        // Peers will refuse it; say so now rather than on every handshake.
        tracing::warn!(id = %svid.id(), path = %certificate.display(), "the SVID has expired");
    }
    tracing::info!(id = %svid.id(), serial = svid.serial(), "identity loaded");
    Ok(Credentials::with_svid(svid, bundle))
}
