//! The mesh certificate authority: a root that is created once and kept, an
//! intermediate that signs workloads, and the checks a CSR must pass before it is
//! signed.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use ring::rand::SecureRandom;
use rustls_pki_types::{CertificateDer, pem::PemObject};
use time::OffsetDateTime;
use x509_parser::{
    certification_request::X509CertificationRequest, extensions::GeneralName,
    extensions::ParsedExtension, prelude::FromDer,
};

use crate::{
    SpiffeId, TrustBundle, TrustDomain,
    bundle::pem_encode_certs,
    svid::{hex, parse_certificate},
};

/// How long a generated root lives.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a generated intermediate lives.
pub const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// A persisted intermediate closer than this to its end is replaced at start-up.
const INTERMEDIATE_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// notBefore is set this far in the past so peers with slightly slow clocks accept it.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

const ROOT_CERT: &str = "root.pem";
const ROOT_KEY: &str = "root-key.pem";
const INTERMEDIATE_CERT: &str = "intermediate.pem";
const INTERMEDIATE_KEY: &str = "intermediate-key.pem";

/// Why the CA could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: key file is readable by group or others (mode {mode:04o}); \
         run `chmod 600 {path}` and check who else has read it"
    )]
    KeyFileTooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("generating CA material: {0}")]
    Generate(String),
}

/// Why a CSR was refused. Each variant names the reason for the workload's operator.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not valid DER: {0}")]
    Malformed(String),
    #[error("CSR signature does not verify (tampered or not signed by its own key)")]
    BadSignature,
    #[error("CSR has no URI SAN; it must carry exactly one, the SPIFFE id {expected}")]
    MissingId { expected: SpiffeId },
    #[error("CSR has {0} URI SANs; it must carry exactly one")]
    ManyIds(usize),
    #[error("CSR asks for {requested} but the credential is for {expected}")]
    IdMismatch {
        requested: String,
        expected: SpiffeId,
    },
    #[error("CSR has a {kind} SAN ({value}); only one URI SAN, the SPIFFE id, is allowed")]
    ForbiddenSan { kind: &'static str, value: String },
    #[error("CSR key is {0}; only ECDSA P-256 and Ed25519 keys are accepted")]
    UnsupportedKey(String),
    #[error("{id} is outside this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("requested TTL {requested:?} is above the maximum of {max:?}")]
    TtlTooLong { requested: Duration, max: Duration },
    #[error("requested TTL must be at least one second")]
    TtlTooShort,
    #[error("the CA's intermediate has expired; no certificate can be issued")]
    AuthorityExpired,
    #[error("signing failed: {0}")]
    Sign(String),
}

/// What the CA needs to know beyond its key material.
#[derive(Debug, Clone)]
pub struct AuthorityConfig {
    pub trust_domain: TrustDomain,
    /// The longest leaf TTL a CSR may ask for.
    pub max_leaf_ttl: Duration,
}

/// Operator-supplied CA material, PEM. The intermediate (with its key) signs
/// workloads; the roots become the trust bundle.
#[derive(Clone)]
pub struct OperatorCa<'a> {
    pub roots_pem: &'a str,
    pub intermediate_cert_pem: &'a str,
    pub intermediate_key_pem: &'a str,
}

impl std::fmt::Debug for OperatorCa<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperatorCa { .. }")
    }
}

/// A leaf SVID the CA issued, with the chain a workload presents after it.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub leaf: CertificateDer<'static>,
    /// Intermediates, nearest first; the roots are in the bundle.
    pub chain: Vec<CertificateDer<'static>>,
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// The mesh CA. Signing needs `&self` only, so one `Authority` serves concurrent calls.
pub struct Authority {
    config: AuthorityConfig,
    issuer: Issuer<'static, KeyPair>,
    intermediate: CertificateDer<'static>,
    intermediate_not_after: OffsetDateTime,
    bundle: TrustBundle,
}

// === impl Authority ===

impl Authority {
    /// A new root and intermediate, in memory only.
    pub fn generate(config: AuthorityConfig) -> Result<Self, AuthorityError> {
        let root = Generated::root(&config.trust_domain)?;
        let intermediate = Generated::intermediate(&config.trust_domain, &root)?;
        Self::assemble(config, &root, intermediate)
    }

    /// Loads the CA from `dir`, creating what is missing: a root on first start (kept for
    /// good), and an intermediate when there is none or it is within 30 days of its end.
    /// Key files are written 0600 and refused when group or others may read them.
    pub fn load_or_create(dir: &Path, config: AuthorityConfig) -> Result<Self, AuthorityError> {
        std::fs::create_dir_all(dir).map_err(|source| AuthorityError::Io {
            path: dir.into(),
            source,
        })?;
        let (root_cert, root_key) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
        let root = match (root_cert.exists(), root_key.exists()) {
            (false, false) => {
                let root = Generated::root(&config.trust_domain)?;
                root.persist(&root_cert, &root_key)?;
                tracing::info!(dir = %dir.display(), "created a new mesh root CA");
                root
            }
            (true, true) => Generated::load(&root_cert, &root_key)?,
            (true, false) | (false, true) => {
                // Never mint a new root beside half of an old one: every workload trusts
                // the old root, and replacing it silently would cut the mesh in two.
                return Err(AuthorityError::BadFile {
                    path: dir.into(),
                    reason: format!(
                        "only one of {ROOT_CERT} and {ROOT_KEY} exists; restore the other \
                         or remove both to create a new root"
                    ),
                });
            }
        };
        let (int_cert, int_key) = (dir.join(INTERMEDIATE_CERT), dir.join(INTERMEDIATE_KEY));
        let kept = match (int_cert.exists() && int_key.exists())
            .then(|| Generated::load(&int_cert, &int_key))
            .transpose()?
        {
            Some(int) if int.not_after - OffsetDateTime::now_utc() > INTERMEDIATE_RENEW_BEFORE => {
                Some(int)
            }
            _ => None,
        };
        let intermediate = match kept {
            Some(int) => int,
            None => {
                let int = Generated::intermediate(&config.trust_domain, &root)?;
                int.persist(&int_cert, &int_key)?;
                tracing::info!(dir = %dir.display(), "issued a new intermediate CA");
                int
            }
        };
        Self::assemble(config, &root, intermediate)
    }

    /// Loads operator-supplied material (e.g. from cert-manager or an offline root).
    pub fn from_operator(
        config: AuthorityConfig,
        material: OperatorCa<'_>,
    ) -> Result<Self, AuthorityError> {
        let OperatorCa {
            roots_pem,
            intermediate_cert_pem,
            intermediate_key_pem,
        } = material;
        let bundle = TrustBundle::from_pem(roots_pem).map_err(|e| AuthorityError::Invalid {
            what: "roots",
            reason: e.to_string(),
        })?;
        let intermediate = Generated::from_pem(intermediate_cert_pem, intermediate_key_pem)
            .map_err(|reason| AuthorityError::Invalid {
                what: "intermediate",
                reason,
            })?;
        Self::with_bundle(config, bundle, intermediate)
    }

    fn assemble(
        config: AuthorityConfig,
        root: &Generated,
        intermediate: Generated,
    ) -> Result<Self, AuthorityError> {
        let bundle =
            TrustBundle::new(vec![root.cert.clone()]).map_err(|e| AuthorityError::Invalid {
                what: "root",
                reason: e.to_string(),
            })?;
        Self::with_bundle(config, bundle, intermediate)
    }

    fn with_bundle(
        config: AuthorityConfig,
        bundle: TrustBundle,
        intermediate: Generated,
    ) -> Result<Self, AuthorityError> {
        let invalid = |reason: String| AuthorityError::Invalid {
            what: "intermediate",
            reason,
        };
        let parsed = parse_certificate(&intermediate.cert).map_err(|e| invalid(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(invalid(
                "not a CA certificate (basicConstraints cA is not set)".into(),
            ));
        }
        if intermediate.not_after <= OffsetDateTime::now_utc() {
            return Err(invalid(format!("expired at {}", intermediate.not_after)));
        }
        let signed_by_a_root = bundle.roots().iter().any(|root| {
            parse_certificate(root).is_ok_and(|root| {
                root.subject() == parsed.issuer()
                    && parsed.verify_signature(Some(root.public_key())).is_ok()
            })
        });
        if !signed_by_a_root {
            return Err(invalid("not signed by any of the roots".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&intermediate.cert, intermediate.key)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            config,
            issuer,
            intermediate: intermediate.cert,
            intermediate_not_after: intermediate.not_after,
            bundle,
        })
    }

    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.config.trust_domain
    }

    pub fn max_leaf_ttl(&self) -> Duration {
        self.config.max_leaf_ttl
    }

    /// When the intermediate expires; no leaf outlives it.
    pub fn intermediate_not_after(&self) -> OffsetDateTime {
        self.intermediate_not_after
    }

    /// When the earliest-expiring root of the bundle expires (`None` for an unreadable
    /// root, which `load_or_create` and `from_operator` never accept).
    pub fn roots_not_after(&self) -> Option<OffsetDateTime> {
        self.bundle
            .roots()
            .iter()
            .map(|root| parse_certificate(root).map(|c| c.validity().not_after.to_datetime()))
            .collect::<Result<Vec<_>, _>>()
            .ok()?
            .into_iter()
            .min()
    }

    /// Signs a workload's CSR after checking it: `expected` (the id the credential
    /// proved) is in this CA's trust domain, the signature verifies, the one URI SAN
    /// is `expected`, there is no other SAN, the key is
    /// P-256 or Ed25519 and `ttl` is within the maximum. The leaf never outlives the
    /// intermediate.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        expected: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCert, CsrError> {
        if expected.trust_domain_name() != self.config.trust_domain.as_str() {
            return Err(CsrError::ForeignTrustDomain {
                id: expected.clone(),
                trust_domain: self.config.trust_domain.clone(),
            });
        }
        if ttl > self.config.max_leaf_ttl {
            return Err(CsrError::TtlTooLong {
                requested: ttl,
                max: self.config.max_leaf_ttl,
            });
        }
        if ttl < Duration::from_secs(1) {
            return Err(CsrError::TtlTooShort);
        }
        let csr = match X509CertificationRequest::from_der(csr_der) {
            Ok(([], csr)) => csr,
            Ok(_) => return Err(CsrError::Malformed("trailing bytes after the CSR".into())),
            Err(e) => return Err(CsrError::Malformed(e.to_string())),
        };
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        check_sans(&csr, expected)?;

        let spki = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|e| CsrError::UnsupportedKey(e.to_string()))?;
        let alg = rcgen::PublicKeyData::algorithm(&spki);
        if alg != &PKCS_ECDSA_P256_SHA256 && alg != &PKCS_ED25519 {
            return Err(CsrError::UnsupportedKey(format!("{alg:?}")));
        }

        let now = OffsetDateTime::now_utc();
        if now >= self.intermediate_not_after {
            return Err(CsrError::AuthorityExpired);
        }
        // X.509 times have whole seconds; report the validity the certificate states.
        let not_after = (now + ttl)
            .min(self.intermediate_not_after)
            .replace_nanosecond(0)
            .unwrap_or(self.intermediate_not_after);
        let serial = random_serial().map_err(CsrError::Sign)?;
        let uri = expected
            .as_str()
            .try_into()
            .map_err(|e: rcgen::Error| CsrError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = now - CLOCK_SKEW;
        params.not_after = not_after;
        let leaf = params
            .signed_by(&spki, &self.issuer)
            .map_err(|e| CsrError::Sign(e.to_string()))?;
        Ok(IssuedCert {
            leaf: leaf.der().clone(),
            chain: vec![self.intermediate.clone()],
            serial: hex(&serial),
            not_after,
        })
    }
}

// === impl Authority: TLS server certificates ===

impl Authority {
    /// A TLS server certificate for `dns_names` (e.g. the admission webhook's
    /// `<service>.<namespace>.svc`) with a fresh P-256 key, signed by the
    /// intermediate so clients trust it through the same roots as the mesh. Unlike a
    /// workload SVID it carries DNS SANs, no SPIFFE id and only serverAuth, so no peer
    /// can take it for a workload's identity.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(IssuedCert, rustls_pki_types::PrivateKeyDer<'static>), CsrError> {
        if dns_names.is_empty() {
            return Err(CsrError::Sign(
                "a server certificate needs a DNS name".into(),
            ));
        }
        if ttl > self.config.max_leaf_ttl {
            return Err(CsrError::TtlTooLong {
                requested: ttl,
                max: self.config.max_leaf_ttl,
            });
        }
        if ttl < Duration::from_secs(1) {
            return Err(CsrError::TtlTooShort);
        }
        let now = OffsetDateTime::now_utc();
        if now >= self.intermediate_not_after {
            return Err(CsrError::AuthorityExpired);
        }
        let not_after = (now + ttl)
            .min(self.intermediate_not_after)
            .replace_nanosecond(0)
            .unwrap_or(self.intermediate_not_after);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CsrError::Sign(e.to_string()))?;
        let serial = random_serial().map_err(CsrError::Sign)?;
        let mut params = CertificateParams::new(dns_names.to_vec())
            .map_err(|e| CsrError::Sign(format!("DNS name: {e}")))?;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = now - CLOCK_SKEW;
        params.not_after = not_after;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CsrError::Sign(e.to_string()))?;
        let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let issued = IssuedCert {
            leaf: cert.der().clone(),
            chain: vec![self.intermediate.clone()],
            serial: hex(&serial),
            not_after,
        };
        Ok((issued, key_der))
    }
}

impl std::fmt::Debug for Authority {
    // Key material stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.config.trust_domain.as_str())
            .field("max_leaf_ttl", &self.config.max_leaf_ttl)
            .field("intermediate_not_after", &self.intermediate_not_after)
            .field("roots", &self.bundle.roots().len())
            .finish_non_exhaustive()
    }
}

fn check_sans(csr: &X509CertificationRequest<'_>, expected: &SpiffeId) -> Result<(), CsrError> {
    let names = csr
        .requested_extensions()
        .into_iter()
        .flatten()
        .filter_map(|ext| match ext {
            ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.iter()),
            _ => None,
        })
        .flatten();
    let mut uris = Vec::new();
    for name in names {
        let (kind, value) = match name {
            GeneralName::URI(uri) => {
                uris.push(*uri);
                continue;
            }
            GeneralName::DNSName(dns) => ("DNS", dns.to_string()),
            GeneralName::IPAddress(ip) => ("IP", format!("{ip:02x?}")),
            GeneralName::RFC822Name(email) => ("email", email.to_string()),
            other => ("non-URI", format!("{other:?}")),
        };
        return Err(CsrError::ForbiddenSan { kind, value });
    }
    match uris.as_slice() {
        [] => Err(CsrError::MissingId {
            expected: expected.clone(),
        }),
        [uri] if *uri == expected.as_str() => Ok(()),
        [uri] => Err(CsrError::IdMismatch {
            requested: uri.to_string(),
            expected: expected.clone(),
        }),
        many => Err(CsrError::ManyIds(many.len())),
    }
}

/// 16 random bytes, positive and with no leading zero byte, as RFC 5280 wants.
fn random_serial() -> Result<[u8; 16], String> {
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| "the system random source failed".to_string())?;
    serial[0] = 0x40 | (serial[0] & 0x3f);
    Ok(serial)
}

/// A CA certificate with its key.
struct Generated {
    cert: CertificateDer<'static>,
    key: KeyPair,
    not_after: OffsetDateTime,
}

// === impl Generated ===

impl Generated {
    fn root(trust_domain: &TrustDomain) -> Result<Self, AuthorityError> {
        let key = new_ca_key()?;
        let params = ca_params(
            trust_domain,
            "root",
            ROOT_TTL,
            BasicConstraints::Unconstrained,
        )?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| AuthorityError::Generate(e.to_string()))?;
        Ok(Self {
            cert: cert.der().clone(),
            key,
            not_after: params.not_after,
        })
    }

    fn intermediate(trust_domain: &TrustDomain, root: &Generated) -> Result<Self, AuthorityError> {
        let key = new_ca_key()?;
        let mut params = ca_params(
            trust_domain,
            "intermediate",
            INTERMEDIATE_TTL,
            BasicConstraints::Constrained(0),
        )?;
        // An intermediate must not outlive the root that vouches for it.
        params.not_after = params.not_after.min(root.not_after);
        let issuer = Issuer::from_ca_cert_der(&root.cert, &root.key)
            .map_err(|e| AuthorityError::Generate(e.to_string()))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| AuthorityError::Generate(e.to_string()))?;
        Ok(Self {
            cert: cert.der().clone(),
            key,
            not_after: params.not_after,
        })
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, AuthorityError> {
        let key_pem = read_key_file(key_path)?;
        let cert_pem = std::fs::read_to_string(cert_path).map_err(|source| AuthorityError::Io {
            path: cert_path.into(),
            source,
        })?;
        Self::from_pem(&cert_pem, &key_pem).map_err(|reason| AuthorityError::BadFile {
            path: cert_path.into(),
            reason,
        })
    }

    /// The key first: a certificate on disk without its key would block the next start.
    fn persist(&self, cert_path: &Path, key_path: &Path) -> Result<(), AuthorityError> {
        write_atomically(key_path, &self.key.serialize_pem(), 0o600)?;
        write_atomically(
            cert_path,
            &pem_encode_certs(std::slice::from_ref(&self.cert)),
            0o644,
        )
    }

    fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, String> {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("certificate PEM: {e}"))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("private key PEM: {e}"))?;
        let parsed = parse_certificate(&cert).map_err(|e| e.to_string())?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err("the private key does not match the certificate".into());
        }
        let not_after = parsed.validity().not_after.to_datetime();
        Ok(Self {
            cert,
            key,
            not_after,
        })
    }
}

fn new_ca_key() -> Result<KeyPair, AuthorityError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| AuthorityError::Generate(e.to_string()))
}

fn ca_params(
    trust_domain: &TrustDomain,
    role: &str,
    ttl: Duration,
    constraints: BasicConstraints,
) -> Result<CertificateParams, AuthorityError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Trellis");
    dn.push(
        DnType::CommonName,
        format!("Trellis {role} CA for {trust_domain}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(SerialNumber::from_slice(
        &random_serial().map_err(AuthorityError::Generate)?,
    ));
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + ttl;
    Ok(params)
}

/// Reads a key file after checking that only its owner may read it.
fn read_key_file(path: &Path) -> Result<String, AuthorityError> {
    use std::{io::Read, os::unix::fs::PermissionsExt};
    let io = |source| AuthorityError::Io {
        path: path.into(),
        source,
    };
    // Check the mode of the file we opened, not of whatever the path names later.
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthorityError::KeyFileTooOpen {
            path: path.into(),
            mode,
        });
    }
    let mut pem = String::new();
    file.read_to_string(&mut pem).map_err(io)?;
    Ok(pem)
}

/// Writes with `mode` from the first byte (a key is never briefly world-readable),
/// atomically: a temp file, fsync, rename.
fn write_atomically(path: &Path, contents: &str, mode: u32) -> Result<(), AuthorityError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let io = |source| AuthorityError::Io {
        path: path.into(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
