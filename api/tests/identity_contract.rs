//! The Identity contract carries everything a workload needs: a CSR goes out over a
//! real gRPC connection on loopback, and what comes back builds an SVID that the
//! trust bundle in the same response verifies. The server here is the minimum that
//! answers with the real CA; credential checks belong to the control plane.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status, transport::server::TcpIncoming};
use trellis_api::identity::v1::{
    CertifyRequest, CertifyResponse, Credential, credential,
    identity_client::IdentityClient,
    identity_server::{Identity, IdentityServer},
};
use trellis_ca::{
    Authority, AuthorityConfig, SpiffeId, Svid, TrustBundle, TrustDomain, WorkloadKey,
};

struct Ca(Arc<Authority>);

#[tonic::async_trait]
impl Identity for Ca {
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
        let Some(Credential {
            kind: Some(credential::Kind::JoinToken(_)),
        }) = credential
        else {
            return Err(Status::permission_denied("a join token is required"));
        };
        let id = SpiffeId::parse(&requested_id)
            .map_err(|e| Status::invalid_argument(format!("requested_id: {e}")))?;
        let issued = self
            .0
            .sign_csr(&csr, &id, Duration::from_secs(ttl_seconds))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(CertifyResponse {
            leaf: issued.leaf.to_vec(),
            chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle: self
                .0
                .trust_bundle()
                .roots()
                .iter()
                .map(|c| c.to_vec())
                .collect(),
            valid_until_unix: issued.not_after.unix_timestamp(),
        }))
    }
}

async fn serve() -> IdentityClient<tonic::transport::Channel> {
    let authority = Authority::generate(AuthorityConfig {
        trust_domain: TrustDomain::parse("cluster.local").unwrap(),
        max_leaf_ttl: Duration::from_secs(24 * 3600),
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(Ca(Arc::new(authority))))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    // The listener is bound before the server task runs, so connecting cannot race it.
    IdentityClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

#[tokio::test]
async fn certify_returns_a_usable_svid_and_bundle() {
    let mut client = serve().await;
    let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/payment").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let response = client
        .certify(CertifyRequest {
            csr: key.csr(&id).unwrap(),
            credential: Some(Credential {
                kind: Some(credential::Kind::JoinToken("token".into())),
            }),
            requested_id: id.to_string(),
            ttl_seconds: 3600,
        })
        .await
        .unwrap()
        .into_inner();

    let chain = std::iter::once(response.leaf)
        .chain(response.chain)
        .map(Into::into)
        .collect();
    let svid = Svid::new(chain, key.private_key_der()).unwrap();
    assert_eq!(svid.id(), &id);
    let not_after = svid
        .not_after()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert_eq!(not_after.as_secs() as i64, response.valid_until_unix);
    let bundle =
        TrustBundle::new(response.trust_bundle.into_iter().map(Into::into).collect()).unwrap();
    assert_eq!(bundle.roots().len(), 1);
}

#[tokio::test]
async fn refusals_arrive_as_status_with_the_reason() {
    let mut client = serve().await;
    let key = WorkloadKey::generate().unwrap();
    let asked = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/order").unwrap();
    let status = client
        .certify(CertifyRequest {
            csr: key.csr(&asked).unwrap(),
            credential: Some(Credential {
                kind: Some(credential::Kind::JoinToken("token".into())),
            }),
            requested_id: "spiffe://cluster.local/ns/shop/sa/payment".into(),
            ttl_seconds: 3600,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("CSR asks for"),
        "{}",
        status.message()
    );
}
