//! What a workload holds: its own key (generated in process, never sent anywhere),
//! the CSR it sends to the CA, and the X.509 SVID it gets back.

use std::{sync::Arc, time::SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use crate::{SpiffeId, spiffe::SpiffeIdError, tls::crypto_provider};

/// Why a certificate or key cannot serve as an SVID.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("the certificate is not valid DER X.509: {0}")]
    Parse(String),
    #[error("the certificate has no URI SAN; an SVID carries its SPIFFE id as exactly one URI SAN")]
    NoUriSan,
    #[error("the certificate has {0} URI SANs; an SVID carries exactly one")]
    ManyUriSans(usize),
    #[error("the certificate's URI SAN {uri:?} is not a SPIFFE id: {source}")]
    BadId { uri: String, source: SpiffeIdError },
    #[error("the private key is unusable: {0}")]
    Key(String),
    #[error("the private key does not match the certificate: {0}")]
    KeyMismatch(String),
}

/// Reads the SPIFFE id from a leaf certificate: its one and only URI SAN.
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<SpiffeId, SvidError> {
    let cert = parse_certificate(cert_der)?;
    spiffe_id_of_parsed(&cert)
}

pub(crate) fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(SvidError::Parse(
            "trailing bytes after the certificate".into(),
        )),
        Err(e) => Err(SvidError::Parse(e.to_string())),
    }
}

pub(crate) fn spiffe_id_of_parsed(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Parse(format!("subject alternative name: {e}")))?;
    let mut uris = san.iter().flat_map(|san| {
        san.value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        let count = san.map_or(0, |san| {
            san.value
                .general_names
                .iter()
                .filter(|n| matches!(n, GeneralName::URI(_)))
                .count()
        });
        return Err(match count {
            0 => SvidError::NoUriSan,
            n => SvidError::ManyUriSans(n),
        });
    };
    SpiffeId::parse(uri).map_err(|source| SvidError::BadId {
        uri: uri.to_string(),
        source,
    })
}

/// An X.509 SVID with its private key, ready to present in a TLS handshake.
pub struct Svid {
    id: SpiffeId,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
    certified: Arc<CertifiedKey>,
}

// === impl Svid ===

impl Svid {
    /// `chain` is the leaf first, then the intermediates that lead to a root of the bundle.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let cert = parse_certificate(leaf)?;
        let id = spiffe_id_of_parsed(&cert)?;
        let validity = cert.validity();
        let serial = hex(cert.raw_serial());
        let not_before = validity.not_before.to_datetime().into();
        let not_after = validity.not_after.to_datetime().into();
        let provider = crypto_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| SvidError::Key(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing_key);
        certified
            .keys_match()
            .map_err(|e| SvidError::KeyMismatch(e.to_string()))?;
        Ok(Self {
            id,
            serial,
            not_before,
            not_after,
            certified: Arc::new(certified),
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The leaf's serial number, hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    pub(crate) fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }
}

impl std::fmt::Debug for Svid {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.as_str())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A workload's ECDSA P-256 key. It is generated in process and leaves only as the
/// PKCS#8 handed to rustls; the CA sees the CSR, never the key.
pub struct WorkloadKey {
    key: KeyPair,
}

// === impl WorkloadKey ===

impl WorkloadKey {
    pub fn generate() -> Result<Self, SvidError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| SvidError::Key(e.to_string()))?;
        Ok(Self { key })
    }

    /// A DER CSR asking for `id` as the one URI SAN, signed with this key.
    pub fn csr(&self, id: &SpiffeId) -> Result<Vec<u8>, SvidError> {
        let uri = id
            .as_str()
            .try_into()
            .map_err(|e: rcgen::Error| SvidError::Key(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&self.key)
            .map_err(|e| SvidError::Key(e.to_string()))?;
        Ok(csr.der().to_vec())
    }

    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkloadKey(ECDSA P-256, redacted)")
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
