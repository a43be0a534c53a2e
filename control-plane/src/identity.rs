//! The Identity service: `Certify` turns a workload's CSR and credential into an
//! SVID. The credential decides the id; the CSR must ask for exactly that id.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use trellis_api::identity::v1::{
    CertifyRequest, CertifyResponse, credential::Kind, identity_server::Identity,
};
use trellis_ca::Authority;

use crate::{grpc_tls::Caller, join_token::JoinTokens};

#[derive(Debug)]
pub struct IdentityService {
    authority: Arc<Authority>,
    tokens: Arc<JoinTokens>,
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
            default_ttl,
        }
    }
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
            Some(Kind::ServiceAccountToken(_)) => {
                return Err(Status::unimplemented(
                    "ServiceAccount tokens are checked in Kubernetes mode; this control plane \
                     runs in universal mode: use a join token",
                ));
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
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
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
