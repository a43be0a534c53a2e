//! The Identity service: `Certify` turns a workload's CSR and credential into an
//! SVID. The credential decides the id; the CSR must ask for exactly that id.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tonic::{Request, Response, Status};
use trellis_api::identity::v1::{
    CertifyRequest, CertifyResponse, credential::Kind, identity_server::Identity,
};
use trellis_ca::Authority;

use crate::join_token::JoinTokens;

#[derive(Debug)]
pub struct IdentityService {
    authority: Arc<Authority>,
    tokens: Arc<JoinTokens>,
    /// The lifetime given when a request asks for none (MeshConfig certTTL).
    default_ttl: Duration,
}

impl IdentityService {
    pub fn new(authority: Arc<Authority>, tokens: Arc<JoinTokens>, default_ttl: Duration) -> Self {
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
        let CertifyRequest {
            csr,
            credential,
            requested_id,
            ttl_seconds,
        } = request.into_inner();
        let now = SystemTime::now();
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
            None => {
                return Err(Status::unauthenticated(
                    "a credential (a join token) is required",
                ));
            }
        };
        if requested_id != expected.as_str() {
            let message = format!("the join token is for {expected}, not {requested_id}");
            tracing::info!(%message, "Certify refused");
            return Err(Status::permission_denied(message));
        }
        // A certificate never outlives the credential that bought it, and the default
        // never exceeds what the CA signs.
        let until_expiry = credential_expiry.duration_since(now).unwrap_or_default();
        let ttl = match ttl_seconds {
            0 => self.default_ttl.min(self.authority.max_leaf_ttl()),
            secs => Duration::from_secs(secs),
        }
        .min(until_expiry);
        let issued = self
            .authority
            .sign_csr(&csr, &expected, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(id = %expected, serial = issued.serial, "certificate issued");
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
