//! The Identity service: `Certify` turns a workload's CSR and credential into an
//! SVID. The credential decides the id; the CSR must ask for exactly that id.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use trellis_api::identity::v1::{
    CertifyRequest, CertifyResponse, credential::Kind, identity_server::Identity,
};
use trellis_ca::{Authority, CsrError, SpiffeId, TrustDomain};

use crate::{grpc_tls::Caller, join_token::JoinTokens};

/// The audience a projected ServiceAccount token must be minted for.
pub const TOKEN_AUDIENCE: &str = "trellis";

/// Asks Kubernetes whether a ServiceAccount token is genuine: a TokenReview with
/// `spec.audiences: [audience]` (`kubernetes::identity::KubeTokenReviewer`). What the
/// review says is judged by [`reviewed_id`], not by the reviewer.
#[tonic::async_trait]
pub trait TokenReviewer: Send + Sync + std::fmt::Debug {
    /// The review's status, or why the API server could not be asked.
    async fn review(&self, token: &str, audience: &str) -> Result<TokenReviewStatus, String>;
}

/// The id a TokenReview vouches for: only an authenticated token for
/// [`TOKEN_AUDIENCE`] whose user is `system:serviceaccount:<ns>:<sa>` buys
/// `spiffe://<td>/ns/<ns>/sa/<sa>`. Namespace and account come from the review,
/// never from the request.
pub fn reviewed_id(
    review: &TokenReviewStatus,
    trust_domain: &TrustDomain,
) -> Result<SpiffeId, String> {
    if review.authenticated != Some(true) {
        return Err(match review.error.as_deref() {
            Some(error) if !error.is_empty() => {
                format!("the ServiceAccount token was not authenticated: {error}")
            }
            _ => "the ServiceAccount token was not authenticated".to_string(),
        });
    }
    let audiences = review.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == TOKEN_AUDIENCE) {
        return Err(format!(
            "the ServiceAccount token is not for audience {TOKEN_AUDIENCE:?} (it is for {audiences:?}); \
             mount a projected token with `audience: {TOKEN_AUDIENCE}`"
        ));
    }
    let username = review
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    let account = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'));
    let Some((namespace, account)) = account else {
        return Err(format!(
            "the token's user {username:?} is not a ServiceAccount (system:serviceaccount:<namespace>:<name>)"
        ));
    };
    SpiffeId::workload(trust_domain, namespace, account).map_err(|e| e.to_string())
}

#[derive(Debug)]
pub struct IdentityService {
    authority: Arc<Authority>,
    tokens: Arc<JoinTokens>,
    /// Kubernetes mode: checks ServiceAccount tokens. Universal mode has none.
    reviewer: Option<Arc<dyn TokenReviewer>>,
    /// The lifetime given when a request asks for none (MeshConfig certTTL); the
    /// control plane updates it when a MeshConfig is applied.
    default_ttl: watch::Receiver<Duration>,
}

impl IdentityService {
    pub fn new(authority: Arc<Authority>, tokens: Arc<JoinTokens>, default_ttl: Duration) -> Self {
        Self::with_ttl_source(authority, tokens, watch::channel(default_ttl).1)
    }

    pub fn with_ttl_source(
        authority: Arc<Authority>,
        tokens: Arc<JoinTokens>,
        default_ttl: watch::Receiver<Duration>,
    ) -> Self {
        Self {
            authority,
            tokens,
            reviewer: None,
            default_ttl,
        }
    }

    /// Accepts projected ServiceAccount tokens, checked by `reviewer` (Kubernetes mode).
    pub fn with_token_reviewer(mut self, reviewer: Arc<dyn TokenReviewer>) -> Self {
        self.reviewer = Some(reviewer);
        self
    }
}

/// The namespace and service account of the control plane's own SVID, which sidecars
/// require of the control plane they talk to.
pub const CONTROL_PLANE_NAMESPACE: &str = "trellis-system";
pub const CONTROL_PLANE_ACCOUNT: &str = "trellis-control-plane";

fn is_control_plane_id(id: &SpiffeId) -> bool {
    id.as_str()
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .is_some_and(|(_, path)| {
            path == format!("ns/{CONTROL_PLANE_NAMESPACE}/sa/{CONTROL_PLANE_ACCOUNT}")
        })
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let CertifyRequest {
            csr,
            credential,
            requested_id,
            ttl_seconds,
        } = request.into_inner();
        let now = SystemTime::now();
        let mut credential_kind = "join-token";
        let (expected, credential_expiry) = match credential.and_then(|c| c.kind) {
            Some(Kind::JoinToken(token)) => {
                match self
                    .tokens
                    .verify(&token, self.authority.trust_domain(), now)
                {
                    Ok((claims, id)) => (id, UNIX_EPOCH + Duration::from_secs(claims.exp)),
                    Err(e) => {
                        tracing::info!(error = %e, requested_id, "Certify refused");
                        return Err(Status::permission_denied(e.to_string()));
                    }
                }
            }
            Some(Kind::ServiceAccountToken(token)) => {
                let Some(reviewer) = &self.reviewer else {
                    return Err(Status::unimplemented(
                        "ServiceAccount tokens are checked in Kubernetes mode; this control plane \
                         runs in universal mode: use a join token",
                    ));
                };
                credential_kind = "sa-token";
                let review = reviewer.review(&token, TOKEN_AUDIENCE).await.map_err(|e| {
                    tracing::warn!(error = %e, requested_id, "TokenReview failed");
                    Status::unavailable(format!("the TokenReview could not be made: {e}"))
                })?;
                match reviewed_id(&review, self.authority.trust_domain()) {
                    // Kubernetes rotates projected tokens itself; the certificate's own
                    // lifetime bounds it, and renewal goes by the certificate.
                    Ok(id) => (id, now + self.authority.max_leaf_ttl()),
                    Err(message) => {
                        tracing::info!(%message, requested_id, "Certify refused");
                        return Err(Status::permission_denied(message));
                    }
                }
            }
            // Renewal: the SVID the caller proved in the TLS handshake is the
            // credential, so a workload outlives the join token that first admitted it.
            None => match caller {
                Some(Caller(Some(id))) => {
                    credential_kind = "svid";
                    (id, now + self.authority.max_leaf_ttl())
                }
                _ => {
                    return Err(Status::unauthenticated(
                        "a credential is required: a join token, or a valid SVID presented \
                         in the TLS handshake to renew it",
                    ));
                }
            },
        };
        // Sidecars trust the control plane by this id: no credential may buy it.
        if is_control_plane_id(&expected) {
            let message = format!("{expected} is the control plane's own identity");
            tracing::warn!(%message, credential = credential_kind, "Certify refused");
            return Err(Status::permission_denied(message));
        }
        if requested_id != expected.as_str() {
            let message = format!("the credential is for {expected}, not {requested_id}");
            tracing::info!(%message, "Certify refused");
            return Err(Status::permission_denied(message));
        }
        // A certificate never outlives the credential that bought it, and the default
        // never exceeds what the CA signs.
        let until_expiry = credential_expiry.duration_since(now).unwrap_or_default();
        let ttl = match ttl_seconds {
            0 => (*self.default_ttl.borrow()).min(self.authority.max_leaf_ttl()),
            secs => Duration::from_secs(secs),
        }
        .min(until_expiry);
        let issued = self
            .authority
            .sign_csr(&csr, &expected, ttl)
            .map_err(|e| match e {
                // On Kubernetes a CSR for another id than the reviewed account is a
                // refusal of what the credential allows, not a malformed request.
                CsrError::IdMismatch { .. } if credential_kind == "sa-token" => {
                    tracing::info!(error = %e, "Certify refused");
                    Status::permission_denied(e.to_string())
                }
                e => Status::invalid_argument(e.to_string()),
            })?;
        metrics::counter!(crate::telemetry::CERTIFICATES, "credential" => credential_kind)
            .increment(1);
        tracing::info!(id = %expected, serial = issued.serial, credential = credential_kind, "certificate issued");
        Ok(Response::new(CertifyResponse {
            leaf: issued.leaf.to_vec(),
            chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle: self
                .authority
                .trust_bundle()
                .roots()
                .iter()
                .map(|c| c.to_vec())
                .collect(),
            valid_until_unix: issued.not_after.unix_timestamp(),
        }))
    }
}
