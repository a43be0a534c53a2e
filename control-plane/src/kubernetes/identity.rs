//! Identity on Kubernetes: a projected ServiceAccount token is checked with the
//! TokenReview API (`authentication.k8s.io/v1`, `spec.audiences: [trellis]`). What the
//! review vouches for is judged by `crate::identity::reviewed_id`; this module only
//! asks the API server.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};

use crate::identity::TokenReviewer;

/// A TokenReview is one small POST; a slower API server is treated as unavailable so a
/// sidecar retries instead of hanging its first certificate.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Reviews tokens through the API server the control plane runs against. Needs RBAC:
/// `create` on `tokenreviews.authentication.k8s.io` (the chart's ClusterRole).
#[derive(Clone)]
pub struct KubeTokenReviewer {
    client: Client,
}

impl KubeTokenReviewer {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl std::fmt::Debug for KubeTokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTokenReviewer").finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl TokenReviewer for KubeTokenReviewer {
    async fn review(&self, token: &str, audience: &str) -> Result<TokenReviewStatus, String> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            metadata: Default::default(),
            spec: TokenReviewSpec {
                audiences: Some(vec![audience.to_string()]),
                token: token.to_string(),
            },
            status: None,
        };
        let created =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| format!("no answer from the API server within {REVIEW_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())?;
        created
            .status
            .ok_or_else(|| "the API server returned a TokenReview without a status".to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc, time::Duration};

    use k8s_openapi::api::authentication::v1::UserInfo;
    use tonic::{Code, Request};
    use trellis_api::identity::v1::{
        CertifyRequest, Credential, credential, identity_server::Identity,
    };
    use trellis_ca::{Authority, AuthorityConfig, SpiffeId, TrustDomain, WorkloadKey};

    use super::*;
    use crate::{identity::IdentityService, join_token::JoinTokens};

    const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";

    /// Answers as a real API server would for the tokens it knows.
    #[derive(Debug, Default)]
    struct FakeReviewer {
        reviews: HashMap<String, TokenReviewStatus>,
        asked: parking_lot::Mutex<Vec<(String, String)>>,
    }

    #[tonic::async_trait]
    impl TokenReviewer for FakeReviewer {
        async fn review(&self, token: &str, audience: &str) -> Result<TokenReviewStatus, String> {
            self.asked.lock().push((token.into(), audience.into()));
            match token {
                "unreachable" => Err("connection refused".into()),
                token => Ok(self
                    .reviews
                    .get(token)
                    .cloned()
                    .unwrap_or(TokenReviewStatus {
                        authenticated: Some(false),
                        error: Some("invalid bearer token".into()),
                        ..Default::default()
                    })),
            }
        }
    }

    fn authenticated(username: &str, audiences: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                ..Default::default()
            }),
            error: None,
        }
    }

    fn service(reviewer: Arc<FakeReviewer>) -> IdentityService {
        let authority = Authority::generate(AuthorityConfig {
            trust_domain: TrustDomain::parse("cluster.local").unwrap(),
            max_leaf_ttl: Duration::from_secs(3600),
        })
        .unwrap();
        let tokens = Arc::new(JoinTokens::new(b"0123456789abcdef0123456789abcdef"));
        IdentityService::new(Arc::new(authority), tokens, Duration::from_secs(600))
            .with_token_reviewer(reviewer)
    }

    fn request(token: &str, csr_id: &str, requested: &str) -> Request<CertifyRequest> {
        let key = WorkloadKey::generate().unwrap();
        Request::new(CertifyRequest {
            csr: key.csr(&SpiffeId::parse(csr_id).unwrap()).unwrap(),
            credential: Some(Credential {
                kind: Some(credential::Kind::ServiceAccountToken(token.into())),
            }),
            requested_id: requested.into(),
            ttl_seconds: 0,
        })
    }

    fn reviewer() -> Arc<FakeReviewer> {
        let mut reviews = HashMap::new();
        reviews.insert(
            "order-token".to_string(),
            authenticated("system:serviceaccount:shop:order", &["trellis"]),
        );
        reviews.insert(
            "api-token".to_string(),
            authenticated(
                "system:serviceaccount:shop:order",
                &["https://kubernetes.default.svc"],
            ),
        );
        reviews.insert(
            "user-token".to_string(),
            authenticated("alice@example.com", &["trellis"]),
        );
        Arc::new(FakeReviewer {
            reviews,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_reviewed_token_for_shop_order_buys_its_spiffe_id() {
        let reviewer = reviewer();
        let identity = service(reviewer.clone());
        let response = identity
            .certify(request("order-token", ORDER, ORDER))
            .await
            .unwrap()
            .into_inner();
        let id = trellis_ca::spiffe_id_of(&response.leaf).unwrap();
        assert_eq!(id.as_str(), ORDER);
        assert!(!response.trust_bundle.is_empty());
        assert_eq!(
            reviewer.asked.lock().as_slice(),
            [("order-token".to_string(), "trellis".to_string())],
            "the review asks for the trellis audience"
        );
    }

    #[tokio::test]
    async fn unauthenticated_wrong_audience_and_non_service_account_tokens_are_refused() {
        let identity = service(reviewer());
        for (token, needle) in [
            ("forged", "not authenticated: invalid bearer token"),
            ("api-token", "not for audience \"trellis\""),
            ("user-token", "not a ServiceAccount"),
        ] {
            let status = identity
                .certify(request(token, ORDER, ORDER))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{token}");
            assert!(
                status.message().contains(needle),
                "{token}: {}",
                status.message()
            );
        }
    }

    #[tokio::test]
    async fn the_id_comes_from_the_review_never_from_the_request() {
        let identity = service(reviewer());
        let payment = "spiffe://cluster.local/ns/shop/sa/payment";
        // Asking for another account with order's token.
        let status = identity
            .certify(request("order-token", payment, payment))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(
            status
                .message()
                .contains(&format!("the credential is for {ORDER}, not {payment}")),
            "{}",
            status.message()
        );
        // A CSR for another id riding on a request that names the right one.
        let status = identity
            .certify(request("order-token", payment, ORDER))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(
            status.message().contains("CSR asks for"),
            "{}",
            status.message()
        );
    }

    #[tokio::test]
    async fn an_unreachable_api_server_is_unavailable_and_universal_mode_says_why() {
        let identity = service(reviewer());
        let status = identity
            .certify(request("unreachable", ORDER, ORDER))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("connection refused"));

        let authority = Authority::generate(AuthorityConfig {
            trust_domain: TrustDomain::parse("cluster.local").unwrap(),
            max_leaf_ttl: Duration::from_secs(3600),
        })
        .unwrap();
        let universal = IdentityService::new(
            Arc::new(authority),
            Arc::new(JoinTokens::new(b"0123456789abcdef0123456789abcdef")),
            Duration::from_secs(600),
        );
        let status = universal
            .certify(request("order-token", ORDER, ORDER))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented);
    }
}
