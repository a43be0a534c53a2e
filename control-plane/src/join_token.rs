//! Join tokens: how a sidecar proves who it is in universal mode. The control plane
//! mints one per service identity (`trellisctl token create --service NAME`); it is
//! HMAC-SHA256 signed with a secret only the control plane holds, bound to one
//! namespace and service, and expires. `Certify` turns a valid token into the one
//! SPIFFE id it may ask for.
//!
//! Format: `trellis-jt1.<base64url(JSON claims)>.<base64url(HMAC of the first two parts)>`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use ring::{hmac, rand::SecureRandom};
use serde::{Deserialize, Serialize};
use trellis_ca::{SpiffeId, SpiffeIdError, TrustDomain};

const PREFIX: &str = "trellis-jt1";
/// The control plane's own identities live here; a token for them would let its holder
/// impersonate the control plane to every sidecar.
pub const RESERVED_NAMESPACE: &str = "trellis-system";
/// The longest lifetime a token may be minted with.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the join token is malformed ({0})")]
    Malformed(&'static str),
    #[error(
        "the join token's signature does not verify (forged, or minted by another control plane)"
    )]
    BadSignature,
    #[error("the join token expired at {expired_at_unix} (unix seconds); mint a new one")]
    Expired { expired_at_unix: u64 },
    #[error("the join token names an invalid identity: {0}")]
    Identity(#[from] SpiffeIdError),
    #[error(
        "namespace {RESERVED_NAMESPACE:?} belongs to the control plane; no join token can name it"
    )]
    Reserved,
    #[error("a token's ttl must be between 1 second and {MAX_TTL:?}")]
    Ttl,
    #[error("the system random source failed")]
    Random,
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The trust domain, so a sidecar knows which control plane identity to expect
    /// before it holds anything else; checked like the rest of the claims.
    #[serde(default)]
    pub td: String,
    /// Namespace.
    pub ns: String,
    /// Service (its service account in universal mode).
    pub svc: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// A random id, so two tokens for the same service differ and can be told apart.
    pub jti: String,
}

/// Mints and checks tokens with one secret.
pub struct JoinTokens {
    key: hmac::Key,
}

impl std::fmt::Debug for JoinTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinTokens { key: <redacted> }")
    }
}

impl JoinTokens {
    /// `secret` should be 32 random bytes kept in the store.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    pub fn mint(
        &self,
        trust_domain: &TrustDomain,
        namespace: &str,
        service: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, TokenError> {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(TokenError::Ttl);
        }
        if namespace == RESERVED_NAMESPACE {
            return Err(TokenError::Reserved);
        }
        // Refuse to mint a token for an id that could never be certified.
        SpiffeId::workload(trust_domain, namespace, service)?;
        let mut jti = [0u8; 12];
        ring::rand::SystemRandom::new()
            .fill(&mut jti)
            .map_err(|_| TokenError::Random)?;
        let claims = Claims {
            td: trust_domain.as_str().into(),
            ns: namespace.into(),
            svc: service.into(),
            exp: unix(now) + ttl.as_secs(),
            jti: B64.encode(jti),
        };
        let body = serde_json::to_vec(&claims).map_err(|_| TokenError::Malformed("claims"))?;
        let signed = format!("{PREFIX}.{}", B64.encode(body));
        let tag = hmac::sign(&self.key, signed.as_bytes());
        Ok(format!("{signed}.{}", B64.encode(tag.as_ref())))
    }

    /// Checks the signature and expiry and returns the claims and the one SPIFFE id
    /// the token's holder may be certified as.
    pub fn verify(
        &self,
        token: &str,
        trust_domain: &TrustDomain,
        now: SystemTime,
    ) -> Result<(Claims, SpiffeId), TokenError> {
        let token = token.trim();
        let (signed, tag) = token
            .rsplit_once('.')
            .ok_or(TokenError::Malformed("no signature"))?;
        let (prefix, body) = signed
            .split_once('.')
            .ok_or(TokenError::Malformed("no claims"))?;
        if prefix != PREFIX {
            return Err(TokenError::Malformed("not a trellis join token"));
        }
        let tag = B64
            .decode(tag)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        // Constant-time comparison, before anything in the claims is trusted.
        hmac::verify(&self.key, signed.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        let body = B64
            .decode(body)
            .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
        let claims: Claims = serde_json::from_slice(&body)
            .map_err(|_| TokenError::Malformed("claims are not JSON"))?;
        if unix(now) >= claims.exp {
            return Err(TokenError::Expired {
                expired_at_unix: claims.exp,
            });
        }
        if claims.ns == RESERVED_NAMESPACE {
            return Err(TokenError::Reserved);
        }
        if !claims.td.is_empty() && claims.td != trust_domain.as_str() {
            return Err(TokenError::Malformed(
                "the token is for another trust domain",
            ));
        }
        let id = SpiffeId::workload(trust_domain, &claims.ns, &claims.svc)?;
        Ok((claims, id))
    }
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::parse("cluster.local").unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_token_proves_exactly_one_identity_until_it_expires() {
        let tokens = JoinTokens::new(b"0123456789abcdef0123456789abcdef");
        let now = SystemTime::now();
        let token = tokens.mint(&td(), "shop", "payment", HOUR, now).unwrap();
        let (claims, id) = tokens.verify(&token, &td(), now).unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/payment");
        assert_eq!(
            (claims.ns.as_str(), claims.svc.as_str()),
            ("shop", "payment")
        );

        let later = now + HOUR + Duration::from_secs(1);
        assert!(matches!(
            tokens.verify(&token, &td(), later),
            Err(TokenError::Expired { .. })
        ));

        let again = tokens.mint(&td(), "shop", "payment", HOUR, now).unwrap();
        assert_ne!(token, again, "every token is unique");
    }

    #[test]
    fn forged_tampered_and_foreign_tokens_are_refused() {
        let tokens = JoinTokens::new(b"0123456789abcdef0123456789abcdef");
        let now = SystemTime::now();
        let token = tokens.mint(&td(), "shop", "payment", HOUR, now).unwrap();

        // Claims rewritten to another service, signature kept.
        let (_, body, tag) = {
            let mut parts = token.split('.');
            (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            )
        };
        let claims = String::from_utf8(B64.decode(body).unwrap()).unwrap();
        let forged_claims = B64.encode(claims.replace("payment", "order"));
        let forged = format!("{PREFIX}.{forged_claims}.{tag}");
        assert_eq!(
            tokens.verify(&forged, &td(), now),
            Err(TokenError::BadSignature)
        );

        // Minted by another control plane.
        let other = JoinTokens::new(b"another secret, another mesh....");
        let theirs = other.mint(&td(), "shop", "payment", HOUR, now).unwrap();
        assert_eq!(
            tokens.verify(&theirs, &td(), now),
            Err(TokenError::BadSignature)
        );

        for garbage in ["", "x", "trellis-jt1.x", "nope.a.b", "trellis-jt1.!!.??"] {
            assert!(
                matches!(
                    tokens.verify(garbage, &td(), now),
                    Err(TokenError::Malformed(_))
                ),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn minting_refuses_bad_identities_and_ttls() {
        let tokens = JoinTokens::new(b"0123456789abcdef0123456789abcdef");
        let now = SystemTime::now();
        assert!(matches!(
            tokens.mint(&td(), "shop", "pay/ment", HOUR, now),
            Err(TokenError::Identity(_))
        ));
        assert_eq!(
            tokens.mint(&td(), "shop", "payment", Duration::ZERO, now),
            Err(TokenError::Ttl)
        );
        assert_eq!(
            tokens.mint(&td(), "shop", "payment", MAX_TTL * 2, now),
            Err(TokenError::Ttl)
        );
        assert_eq!(
            tokens.mint(&td(), "trellis-system", "trellis-control-plane", HOUR, now),
            Err(TokenError::Reserved)
        );
        assert!(format!("{tokens:?}").contains("redacted"));
    }

    #[test]
    fn tokens_without_a_trust_domain_still_verify_and_a_foreign_one_does_not() {
        let tokens = JoinTokens::new(b"0123456789abcdef0123456789abcdef");
        let sign = |claims: String| {
            let signed = format!("{PREFIX}.{}", B64.encode(claims));
            let tag = hmac::sign(&tokens.key, signed.as_bytes());
            format!("{signed}.{}", B64.encode(tag.as_ref()))
        };
        let now = SystemTime::now();
        let exp = unix(now) + 3600;
        let legacy = sign(format!(
            r#"{{"ns":"shop","svc":"payment","exp":{exp},"jti":"x"}}"#
        ));
        let (_, id) = tokens.verify(&legacy, &td(), now).unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/payment");
        let foreign = sign(format!(
            r#"{{"td":"other.example","ns":"shop","svc":"payment","exp":{exp},"jti":"x"}}"#
        ));
        let error = tokens.verify(&foreign, &td(), now).unwrap_err();
        assert!(
            error.to_string().contains("another trust domain"),
            "{error}"
        );
    }
}
