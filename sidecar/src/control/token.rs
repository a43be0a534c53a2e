//! The join token, as a sidecar sees it: an opaque credential for `Identity.Certify`
//! whose claims (namespace, service, expiry) the sidecar reads without verifying —
//! only the control plane holds the key — to learn which SPIFFE id to ask for and to
//! refuse, before dialling anything, a token that was minted for another workload.
//!
//! Format: `trellis-jt1.<base64url(JSON claims)>.<base64url(HMAC)>`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::Deserialize;
use trellis_ca::{SpiffeId, SpiffeIdError, TrustDomain};

const PREFIX: &str = "trellis-jt1";
/// What a mesh's trust domain is unless the token or `--trust-domain` says otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "the join token is malformed ({0}); paste it exactly as `trellisctl token create` printed it"
    )]
    Malformed(&'static str),
    #[error(
        "the join token is for service {token_service:?} in namespace {token_namespace:?}, \
         but this sidecar runs as --service {service:?} --namespace {namespace:?}"
    )]
    WrongWorkload {
        token_service: String,
        token_namespace: String,
        service: String,
        namespace: String,
    },
    #[error("the join token is for trust domain {token:?}, but --trust-domain is {flag:?}")]
    WrongTrustDomain { token: String, flag: String },
    #[error("the join token names an invalid identity: {0}")]
    Identity(#[from] SpiffeIdError),
    #[error(
        "the join token expired at {expired_at_unix} (unix seconds); mint a new one with `trellisctl token create`"
    )]
    Expired { expired_at_unix: u64 },
}

/// What a token says. Fields the sidecar does not use (`jti`) are ignored, so the
/// control plane may add claims without breaking older sidecars.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Claims {
    /// Namespace.
    pub ns: String,
    /// Service (its service account in universal mode).
    pub svc: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Trust domain, when the control plane states it; otherwise the sidecar's own.
    #[serde(default)]
    pub td: Option<String>,
}

/// The token and its claims. The token is a secret: `Debug` never shows it, and
/// nothing logs it.
#[derive(Clone)]
pub struct JoinToken {
    token: String,
    claims: Claims,
}

// === impl JoinToken ===

impl JoinToken {
    /// Reads the claims; the signature is the control plane's to check.
    pub fn parse(token: &str) -> Result<Self, TokenError> {
        let token = token.trim();
        let mut parts = token.split('.');
        let (Some(prefix), Some(body), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        if prefix != PREFIX {
            return Err(TokenError::Malformed("not a trellis join token"));
        }
        if tag.is_empty() {
            return Err(TokenError::Malformed("no signature"));
        }
        let body = B64
            .decode(body)
            .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
        let claims: Claims = serde_json::from_slice(&body)
            .map_err(|_| TokenError::Malformed("claims are not the expected JSON"))?;
        Ok(Self {
            token: token.to_string(),
            claims,
        })
    }

    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// The token as sent in `Credential.join_token`.
    pub fn secret(&self) -> &str {
        &self.token
    }

    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.claims.exp)
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.expires_at()
    }

    /// The SPIFFE id this token can buy, after checking it was minted for this
    /// workload. `trust_domain` is `--trust-domain`, when given.
    pub fn identity(
        &self,
        service: &str,
        namespace: &str,
        trust_domain: Option<&TrustDomain>,
    ) -> Result<SpiffeId, TokenError> {
        let Claims {
            ns,
            svc,
            exp: _,
            td,
        } = &self.claims;
        if svc != service || ns != namespace {
            return Err(TokenError::WrongWorkload {
                token_service: svc.clone(),
                token_namespace: ns.clone(),
                service: service.to_string(),
                namespace: namespace.to_string(),
            });
        }
        let trust_domain = match (td, trust_domain) {
            (Some(token), Some(flag)) if token != flag.as_str() => {
                return Err(TokenError::WrongTrustDomain {
                    token: token.clone(),
                    flag: flag.to_string(),
                });
            }
            (Some(token), _) => TrustDomain::parse(token)?,
            (None, Some(flag)) => flag.clone(),
            (None, None) => TrustDomain::parse(DEFAULT_TRUST_DOMAIN)?,
        };
        Ok(SpiffeId::workload(&trust_domain, ns, svc)?)
    }

    /// Refuses a token that can no longer buy a certificate.
    pub fn check_unexpired(&self, now: SystemTime) -> Result<(), TokenError> {
        if self.is_expired(now) {
            return Err(TokenError::Expired {
                expired_at_unix: self.claims.exp,
            });
        }
        Ok(())
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("claims", &self.claims)
            .field("token", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token as the control plane mints it; the signature is not checked here.
    fn token(claims: &str) -> String {
        format!("{PREFIX}.{}.c2lnbmF0dXJl", B64.encode(claims))
    }

    const PAYMENT: &str = r#"{"ns":"shop","svc":"payment","exp":4102444800,"jti":"abc"}"#;

    #[test]
    fn claims_name_the_workload_id() {
        let parsed = JoinToken::parse(&format!("  {}\n", token(PAYMENT))).unwrap();
        assert_eq!(parsed.claims().svc, "payment");
        assert_eq!(parsed.claims().exp, 4_102_444_800);
        let id = parsed.identity("payment", "shop", None).unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/payment");
        assert!(
            !parsed.secret().ends_with('\n'),
            "the file's newline is not part of it"
        );

        let td = TrustDomain::parse("prod.example").unwrap();
        let id = parsed.identity("payment", "shop", Some(&td)).unwrap();
        assert_eq!(id.as_str(), "spiffe://prod.example/ns/shop/sa/payment");

        let with_td = JoinToken::parse(&token(
            r#"{"ns":"shop","svc":"payment","exp":1,"td":"prod.example"}"#,
        ))
        .unwrap();
        let id = with_td.identity("payment", "shop", None).unwrap();
        assert_eq!(id.as_str(), "spiffe://prod.example/ns/shop/sa/payment");
        assert_eq!(
            with_td.identity(
                "payment",
                "shop",
                Some(&TrustDomain::parse("other").unwrap())
            ),
            Err(TokenError::WrongTrustDomain {
                token: "prod.example".into(),
                flag: "other".into()
            })
        );
    }

    #[test]
    fn a_token_for_another_workload_is_refused_by_name() {
        let parsed = JoinToken::parse(&token(PAYMENT)).unwrap();
        let error = parsed.identity("order", "shop", None).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the join token is for service \"payment\" in namespace \"shop\", \
             but this sidecar runs as --service \"order\" --namespace \"shop\""
        );
        assert!(matches!(
            parsed.identity("payment", "default", None),
            Err(TokenError::WrongWorkload { .. })
        ));
    }

    #[test]
    fn expiry_is_read_from_the_claims() {
        let parsed = JoinToken::parse(&token(r#"{"ns":"a","svc":"b","exp":1000}"#)).unwrap();
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert!(parsed.check_unexpired(at(999)).is_ok());
        assert_eq!(
            parsed.check_unexpired(at(1000)),
            Err(TokenError::Expired {
                expired_at_unix: 1000
            })
        );
    }

    #[test]
    fn malformed_tokens_are_named_and_never_echoed() {
        for garbage in [
            "",
            "x",
            "trellis-jt1.x",
            "nope.e30.sig",
            "trellis-jt1.!!.sig",
            "trellis-jt1.e30.",
            "trellis-jt1.e30.sig.extra",
            &token(r#"{"ns":"a"}"#),
            &token("not json"),
        ] {
            let error = JoinToken::parse(garbage).unwrap_err();
            assert!(matches!(error, TokenError::Malformed(_)), "{garbage:?}");
        }
        let secret = token(PAYMENT);
        let parsed = JoinToken::parse(&secret).unwrap();
        assert!(!format!("{parsed:?}").contains(&secret));
        assert!(format!("{parsed:?}").contains("redacted"));
    }
}
