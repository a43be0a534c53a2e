//! A projected Kubernetes ServiceAccount token (audience `trellis`), as a sidecar sees
//! it: a file the kubelet rewrites before the token expires, so it is read again for
//! every `Identity.Certify`. The sidecar reads the token's claims without verifying
//! them — the control plane does that with a TokenReview — only to learn which
//! SPIFFE id to ask for (`spiffe://<td>/ns/<namespace>/sa/<service account>`) and to
//! not send a token that has already expired.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::Deserialize;
use trellis_ca::{SpiffeId, SpiffeIdError, TrustDomain};

const SUBJECT_PREFIX: &str = "system:serviceaccount:";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaTokenError {
    #[error("--token-file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "--token-file {path}: not a ServiceAccount token ({reason}); mount a projected \
         serviceAccountToken with audience `trellis` there"
    )]
    Malformed { path: PathBuf, reason: &'static str },
    #[error(
        "--token-file {path}: the token's subject {subject:?} is not a ServiceAccount \
         (system:serviceaccount:<namespace>:<name>)"
    )]
    NotAServiceAccount { path: PathBuf, subject: String },
    #[error(
        "--token-file {path}: the token is for {found}, but the sidecar started as {expected}; \
         the pod's service account cannot change while it runs"
    )]
    Changed {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("--token-file {path}: the token names an invalid identity: {source}")]
    Identity {
        path: PathBuf,
        source: SpiffeIdError,
    },
    #[error(
        "--token-file {path}: the token expired at {expired_at_unix} (unix seconds) and the \
         kubelet has not replaced it"
    )]
    Expired { path: PathBuf, expired_at_unix: u64 },
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    exp: Option<u64>,
}

/// One reading of the token file. The token is a secret: `Debug` never shows it.
#[derive(Clone)]
pub struct SaToken {
    token: String,
    namespace: String,
    service_account: String,
    expires_at: Option<SystemTime>,
}

impl SaToken {
    /// Reads and parses the token at `path`.
    pub fn read(path: &Path) -> Result<Self, SaTokenError> {
        let text = std::fs::read_to_string(path).map_err(|e| SaTokenError::Read {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, SaTokenError> {
        let malformed = |reason| SaTokenError::Malformed {
            path: path.into(),
            reason,
        };
        let token = text.trim();
        let mut parts = token.split('.');
        let (Some(_header), Some(body), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("expected a JWT: three dot-separated parts"));
        };
        let body = B64
            .decode(body.trim_end_matches('='))
            .map_err(|_| malformed("the claims are not base64url"))?;
        let claims: Claims = serde_json::from_slice(&body)
            .map_err(|_| malformed("the claims are not JSON with a `sub`"))?;
        let account = claims
            .sub
            .strip_prefix(SUBJECT_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'));
        let Some((namespace, service_account)) = account else {
            return Err(SaTokenError::NotAServiceAccount {
                path: path.into(),
                subject: claims.sub,
            });
        };
        Ok(Self {
            token: token.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            expires_at: claims.exp.map(|exp| UNIX_EPOCH + Duration::from_secs(exp)),
        })
    }

    /// The token as sent in `Credential.service_account_token`.
    pub fn secret(&self) -> &str {
        &self.token
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The id this token can buy: the namespace and service account it names.
    pub fn identity(
        &self,
        path: &Path,
        trust_domain: &TrustDomain,
    ) -> Result<SpiffeId, SaTokenError> {
        SpiffeId::workload(trust_domain, &self.namespace, &self.service_account).map_err(|source| {
            SaTokenError::Identity {
                path: path.into(),
                source,
            }
        })
    }

    /// Refuses a token past its `exp`; one without `exp` is left to the control plane.
    pub fn check_unexpired(&self, path: &Path, now: SystemTime) -> Result<(), SaTokenError> {
        match self.expires_at {
            Some(at) if now >= at => Err(SaTokenError::Expired {
                path: path.into(),
                expired_at_unix: at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            }),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for SaToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaToken")
            .field("namespace", &self.namespace)
            .field("service_account", &self.service_account)
            .field("expires_at", &self.expires_at)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The token file, read again for every request because the kubelet rotates it.
#[derive(Debug, Clone)]
pub struct SaTokenFile {
    path: PathBuf,
    /// The id read at start; a rotated token must name the same account.
    id: SpiffeId,
}

impl SaTokenFile {
    /// Reads the file once to learn the id and fail early on a missing or foreign file.
    pub fn open(
        path: PathBuf,
        trust_domain: &TrustDomain,
    ) -> Result<(Self, SaToken), SaTokenError> {
        let token = SaToken::read(&path)?;
        let id = token.identity(&path, trust_domain)?;
        Ok((Self { path, id }, token))
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current token, checked to still name the account the sidecar started as.
    pub fn current(&self, now: SystemTime) -> Result<SaToken, SaTokenError> {
        let token = SaToken::read(&self.path)?;
        let id = token.identity(&self.path, &self.id.trust_domain())?;
        if id != self.id {
            return Err(SaTokenError::Changed {
                path: self.path.clone(),
                expected: self.id.to_string(),
                found: id.to_string(),
            });
        }
        token.check_unexpired(&self.path, now)?;
        Ok(token)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A token shaped like the kubelet's; the signature is the API server's to check.
    pub(crate) fn jwt(claims: &str) -> String {
        format!(
            "{}.{}.c2lnbmF0dXJl",
            B64.encode(r#"{"alg":"RS256","kid":"k"}"#),
            B64.encode(claims)
        )
    }

    pub(crate) fn order_token(exp: u64) -> String {
        jwt(&format!(
            r#"{{"aud":["trellis"],"exp":{exp},"iss":"https://kubernetes.default.svc","sub":"system:serviceaccount:shop:order","kubernetes.io":{{"namespace":"shop","serviceaccount":{{"name":"order"}}}}}}"#
        ))
    }

    #[test]
    fn the_subject_names_the_id_and_the_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{}\n", order_token(4_102_444_800))).unwrap();
        let td = TrustDomain::parse("cluster.local").unwrap();
        let (file, first) = SaTokenFile::open(path.clone(), &td).unwrap();
        assert_eq!(
            file.id().as_str(),
            "spiffe://cluster.local/ns/shop/sa/order"
        );
        assert!(!first.secret().ends_with('\n'));
        assert!(!format!("{first:?}").contains(first.secret()));

        // The kubelet rotates the token: the next request sends the new one.
        let rotated = order_token(4_102_444_900);
        std::fs::write(&path, &rotated).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(file.current(now).unwrap().secret(), rotated);

        // A token for another account is refused rather than sent.
        std::fs::write(
            &path,
            jwt(r#"{"sub":"system:serviceaccount:shop:payment","exp":4102444800}"#),
        )
        .unwrap();
        let error = file.current(now).unwrap_err().to_string();
        assert!(error.contains("ns/shop/sa/payment"), "{error}");

        std::fs::write(&path, order_token(1_000)).unwrap();
        assert!(matches!(
            file.current(now),
            Err(SaTokenError::Expired {
                expired_at_unix: 1_000,
                ..
            })
        ));
        std::fs::remove_file(&path).unwrap();
        let error = file.current(now).unwrap_err().to_string();
        assert!(error.starts_with("--token-file "), "{error}");
    }

    #[test]
    fn malformed_tokens_are_named() {
        let path = Path::new("/t");
        for garbage in ["", "a.b", "a.!!.c", &jwt("not json"), &jwt(r#"{"exp":1}"#)] {
            assert!(
                matches!(
                    SaToken::parse(path, garbage),
                    Err(SaTokenError::Malformed { .. })
                ),
                "{garbage:?}"
            );
        }
        for subject in [
            "alice",
            "system:serviceaccount:shop",
            "system:serviceaccount::x",
        ] {
            let error = SaToken::parse(path, &jwt(&format!(r#"{{"sub":"{subject}"}}"#)));
            assert!(
                matches!(error, Err(SaTokenError::NotAServiceAccount { .. })),
                "{subject}"
            );
        }
    }
}
