//! A test PKI: a root and intermediate made here with rcgen and handed to the
//! `Authority` as operator material, so tests can also forge leaves that the real CA
//! would never sign (expired, no URI SAN, two URI SANs) but that chain to the bundle.

#![allow(dead_code, unreachable_pub)] // each test file uses a different part

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use trellis_ca::{
    Authority, AuthorityConfig, Credentials, OperatorCa, SpiffeId, Svid, TrustDomain, WorkloadKey,
};

/// A rustls resolver that always presents one (possibly forged) certificate.
#[derive(Debug)]
pub struct FixedCert(pub std::sync::Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

pub struct TestPki {
    pub authority: Authority,
    intermediate: CertifiedIssuer<'static, KeyPair>,
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn ca_params(cn: &str, constraints: BasicConstraints) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl TestPki {
    pub fn new(name: &str) -> Self {
        let root = CertifiedIssuer::self_signed(
            ca_params(&format!("{name} root"), BasicConstraints::Unconstrained),
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let int_key = KeyPair::generate().unwrap();
        let int_key_pem = int_key.serialize_pem();
        let intermediate = CertifiedIssuer::signed_by(
            ca_params(
                &format!("{name} intermediate"),
                BasicConstraints::Constrained(0),
            ),
            int_key,
            &root,
        )
        .unwrap();
        let authority = Authority::from_operator(
            AuthorityConfig {
                trust_domain: TrustDomain::parse("cluster.local").unwrap(),
                max_leaf_ttl: Duration::from_secs(24 * 3600),
            },
            OperatorCa {
                roots_pem: &root.pem(),
                intermediate_cert_pem: &intermediate.pem(),
                intermediate_key_pem: &int_key_pem,
            },
        )
        .unwrap();
        Self {
            authority,
            intermediate,
        }
    }

    /// An SVID through the real path: a workload key, a CSR, `sign_csr`.
    pub fn svid(&self, spiffe_id: &str) -> Svid {
        let id = id(spiffe_id);
        let key = WorkloadKey::generate().unwrap();
        let csr = key.csr(&id).unwrap();
        let issued = self
            .authority
            .sign_csr(&csr, &id, Duration::from_secs(3600))
            .unwrap();
        let mut chain = vec![issued.leaf];
        chain.extend(issued.chain);
        Svid::new(chain, key.private_key_der()).unwrap()
    }

    /// Credentials holding `svid` and trusting this PKI's root.
    pub fn creds(&self, svid: Svid) -> Credentials {
        Credentials::with_svid(svid, self.authority.trust_bundle().clone())
    }

    /// Credentials that trust this PKI but hold no certificate yet.
    pub fn creds_without_svid(&self) -> Credentials {
        Credentials::new(self.authority.trust_bundle().clone())
    }

    /// A leaf signed straight by the intermediate, bypassing every CSR check, with the
    /// given URI SANs and validity. Returned as raw chain + key so `Svid::new` (which
    /// insists on one URI SAN) is not in the way.
    pub fn forged(
        &self,
        uris: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> rustls::sign::CertifiedKey {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "forged");
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.intermediate).unwrap();
        let chain = vec![cert.der().clone(), self.intermediate.der().clone()];
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        rustls::sign::CertifiedKey::from_der(chain, der, &trellis_ca::crypto_provider()).unwrap()
    }
}
