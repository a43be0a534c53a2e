//! rustls verifiers that check SPIFFE identities, and the mesh's TLS configs.
//!
//! rustls' own verifiers check DNS names, which mean nothing in the mesh; these check
//! the chain to the trust bundle with webpki, then read the peer's SPIFFE id from its
//! one URI SAN. The client side of a connection may also require one exact id: the
//! id the control plane says the endpoint has.

use std::sync::{Arc, OnceLock};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{Credentials, SpiffeId, svid::spiffe_id_of};

/// The process-wide crypto provider: ring, and only ring, so that no second provider
/// can make rustls panic at run time.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Why a peer's identity was refused after its chain verified.
#[derive(thiserror::Error)]
pub enum PeerIdError {
    #[error("peer certificate is not an SVID: {0}")]
    NotAnSvid(#[from] crate::SvidError),
    #[error("peer presented {presented} but {expected} was expected")]
    Unexpected {
        expected: SpiffeId,
        presented: SpiffeId,
    },
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("peer {presented} is not in this workload's trust domain {trust_domain}")]
    ForeignTrustDomain {
        presented: SpiffeId,
        trust_domain: String,
    },
}

// rustls prints the error it carries with `{:?}`; make that the operator's message.
impl std::fmt::Debug for PeerIdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A server config for the mesh: TLS 1.3, a client certificate required and checked
/// against the bundle, the current SVID presented. ALPN is the caller's to set.
pub fn server_config(creds: &Credentials) -> Result<ServerConfig, rustls::Error> {
    server_config_with(creds, ClientAuth::Required)
}

/// Whether a server demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client presents an SVID (the data path, Discovery).
    Required,
    /// A client may come without one, as a workload asking for its first certificate
    /// does; one that presents a certificate is still verified.
    Optional,
}

pub fn server_config_with(
    creds: &Credentials,
    client_auth: ClientAuth,
) -> Result<ServerConfig, rustls::Error> {
    let verifier = SpiffeClientVerifier {
        creds: creds.clone(),
        provider: crypto_provider(),
        mandatory: client_auth == ClientAuth::Required,
    };
    Ok(ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(creds.clone())))
}

/// A client config that presents the current SVID and accepts a server whose chain
/// leads to the bundle and, when `expected` is given, whose id is exactly that.
pub fn client_config(
    creds: &Credentials,
    expected: Option<SpiffeId>,
) -> Result<ClientConfig, rustls::Error> {
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            creds.clone(),
            expected,
        )))
        .with_client_cert_resolver(Arc::new(creds.clone())))
}

/// The verified SPIFFE id of the peer of an established connection, from the
/// certificates rustls reports (`CommonState::peer_certificates`).
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, PeerIdError> {
    let leaf = certs
        .and_then(|certs| certs.first())
        .ok_or(PeerIdError::NoCertificate)?;
    Ok(spiffe_id_of(leaf)?)
}

/// Checks a server's chain and SPIFFE id.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    creds: Credentials,
    expected: Option<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

/// Checks a client's chain and SPIFFE id; a certificate is mandatory, and its id must
/// be in the trust domain of this workload's own SVID (federation would widen this).
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    creds: Credentials,
    provider: Arc<CryptoProvider>,
    mandatory: bool,
}

// === impl SpiffeServerVerifier ===

impl SpiffeServerVerifier {
    pub fn new(creds: Credentials, expected: Option<SpiffeId>) -> Self {
        Self {
            creds,
            expected,
            provider: crypto_provider(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = verify_chain(
            &self.creds,
            &self.provider,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        match &self.expected {
            Some(expected) if *expected != presented => Err(other(PeerIdError::Unexpected {
                expected: expected.clone(),
                presented,
            })),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// === impl SpiffeClientVerifier ===

impl SpiffeClientVerifier {
    pub fn new(creds: Credentials) -> Self {
        Self {
            creds,
            provider: crypto_provider(),
            mandatory: true,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let presented = verify_chain(
            &self.creds,
            &self.provider,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        if let Some(own) = self.creds.svid() {
            let trust_domain = own.id().trust_domain_name();
            if presented.trust_domain_name() != trust_domain {
                return Err(other(PeerIdError::ForeignTrustDomain {
                    trust_domain: trust_domain.to_string(),
                    presented,
                }));
            }
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies the chain to the current bundle for `usage`, then returns the leaf's id.
fn verify_chain(
    creds: &Credentials,
    provider: &CryptoProvider,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, rustls::Error> {
    let bundle = creds.bundle();
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        bundle.anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(pki_error)?;
    spiffe_id_of(end_entity).map_err(|e| other(PeerIdError::NotAnSvid(e)))
}

fn other(e: PeerIdError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Maps webpki's verdicts onto rustls' certificate errors, which become the TLS alert
/// the peer sees; anything without a match keeps webpki's own text.
fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let mapped = match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(mapped)
}
