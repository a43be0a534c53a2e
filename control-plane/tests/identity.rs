//! `Certify` over gRPC and TLS on loopback, as a sidecar without a certificate calls
//! it: the control plane proves its own SVID, the join token decides the id.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};
use trellis_api::identity::v1::{
    CertifyRequest, Credential, credential, identity_client::IdentityClient,
    identity_server::IdentityServer,
};
use trellis_ca::{
    Authority, AuthorityConfig, ClientAuth, Credentials, SpiffeId, Svid, TrustBundle, TrustDomain,
    WorkloadKey,
};
use trellis_control_plane::{grpc_tls, identity::IdentityService, join_token::JoinTokens};

const CONTROL_PLANE: &str = "spiffe://cluster.local/ns/trellis-system/sa/trellis-control-plane";
const HOUR: Duration = Duration::from_secs(3600);

struct ControlPlane {
    addr: std::net::SocketAddr,
    bundle: TrustBundle,
    tokens: Arc<JoinTokens>,
}

fn td() -> TrustDomain {
    TrustDomain::parse("cluster.local").unwrap()
}

fn svid(authority: &Authority, id: &str) -> Svid {
    let id = SpiffeId::parse(id).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let issued = authority
        .sign_csr(&key.csr(&id).unwrap(), &id, HOUR)
        .unwrap();
    Svid::new(
        std::iter::once(issued.leaf).chain(issued.chain).collect(),
        key.private_key_der(),
    )
    .unwrap()
}

async fn control_plane() -> ControlPlane {
    let authority = Authority::generate(AuthorityConfig {
        trust_domain: td(),
        max_leaf_ttl: 24 * HOUR,
    })
    .unwrap();
    let bundle = authority.trust_bundle().clone();
    let creds = Credentials::with_svid(svid(&authority, CONTROL_PLANE), bundle.clone());
    let tokens = Arc::new(JoinTokens::new(b"0123456789abcdef0123456789abcdef"));
    let service = IdentityService::new(Arc::new(authority), tokens.clone(), HOUR);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = grpc_tls::incoming(listener, &creds, ClientAuth::Optional).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(service))
            .serve_with_incoming(incoming),
    );
    ControlPlane {
        addr,
        bundle,
        tokens,
    }
}

/// A client with trust anchors but no certificate, requiring the control plane's id.
async fn client(
    cp: &ControlPlane,
    expect: &str,
) -> Result<IdentityClient<Channel>, tonic::transport::Error> {
    client_with(cp, expect, Credentials::new(cp.bundle.clone())).await
}

/// A client presenting whatever SVID `creds` holds.
async fn client_with(
    cp: &ControlPlane,
    expect: &str,
    creds: Credentials,
) -> Result<IdentityClient<Channel>, tonic::transport::Error> {
    let mut config =
        trellis_ca::client_config(&creds, Some(SpiffeId::parse(expect).unwrap())).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let addr = cp.addr;
    let channel = Endpoint::from_static("http://control-plane")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = ServerName::try_from("control-plane").unwrap();
                Ok::<_, std::io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
            }
        }))
        .await?;
    Ok(IdentityClient::new(channel))
}

fn request(
    token: Option<String>,
    csr_for: &str,
    requested: &str,
    key: &WorkloadKey,
) -> CertifyRequest {
    CertifyRequest {
        csr: key.csr(&SpiffeId::parse(csr_for).unwrap()).unwrap(),
        credential: token.map(|t| Credential {
            kind: Some(credential::Kind::JoinToken(t)),
        }),
        requested_id: requested.into(),
        ttl_seconds: 0,
    }
}

const PAYMENT: &str = "spiffe://cluster.local/ns/shop/sa/payment";
const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";

#[tokio::test]
async fn a_join_token_gets_its_own_identity_and_nothing_else() {
    let cp = control_plane().await;
    let mut client = client(&cp, CONTROL_PLANE).await.unwrap();
    let now = SystemTime::now();
    let token = cp.tokens.mint(&td(), "shop", "payment", HOUR, now).unwrap();

    let key = WorkloadKey::generate().unwrap();
    let response = client
        .certify(request(Some(token.clone()), PAYMENT, PAYMENT, &key))
        .await
        .unwrap()
        .into_inner();
    let svid = Svid::new(
        std::iter::once(response.leaf)
            .chain(response.chain)
            .map(Into::into)
            .collect(),
        key.private_key_der(),
    )
    .unwrap();
    assert_eq!(svid.id().as_str(), PAYMENT);
    let lifetime = svid.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(
        lifetime > HOUR - Duration::from_secs(60) && lifetime <= HOUR,
        "{lifetime:?}"
    );
    assert_eq!(response.trust_bundle.len(), 1);

    // The payment token cannot buy order's identity, whatever the CSR says.
    let status = client
        .certify(request(Some(token.clone()), ORDER, ORDER, &key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains(&format!("the credential is for {PAYMENT}, not {ORDER}")),
        "{}",
        status.message()
    );

    // Nor can a CSR for order ride on a request that names payment.
    let status = client
        .certify(request(Some(token), ORDER, PAYMENT, &key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("CSR asks for"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_certificate_never_outlives_its_join_token() {
    let cp = control_plane().await;
    let mut client = client(&cp, CONTROL_PLANE).await.unwrap();
    let half_hour = Duration::from_secs(1800);
    let token = cp
        .tokens
        .mint(&td(), "shop", "payment", half_hour, SystemTime::now())
        .unwrap();
    let key = WorkloadKey::generate().unwrap();
    let response = client
        .certify(request(Some(token), PAYMENT, PAYMENT, &key))
        .await
        .unwrap()
        .into_inner();
    let valid_for = response.valid_until_unix
        - SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert!(
        valid_for <= 1800,
        "the certificate outlives the token by {}s",
        valid_for - 1800
    );
}

#[tokio::test]
async fn expired_forged_and_missing_credentials_are_refused() {
    let cp = control_plane().await;
    let mut client = client(&cp, CONTROL_PLANE).await.unwrap();
    let key = WorkloadKey::generate().unwrap();

    let long_ago = SystemTime::now() - 3 * HOUR;
    let expired = cp
        .tokens
        .mint(&td(), "shop", "payment", HOUR, long_ago)
        .unwrap();
    let status = client
        .certify(request(Some(expired), PAYMENT, PAYMENT, &key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("expired"), "{}", status.message());

    let forged = JoinTokens::new(b"not the control plane's secret!!")
        .mint(&td(), "shop", "payment", HOUR, SystemTime::now())
        .unwrap();
    let status = client
        .certify(request(Some(forged), PAYMENT, PAYMENT, &key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("signature does not verify"),
        "{}",
        status.message()
    );

    let status = client
        .certify(request(None, PAYMENT, PAYMENT, &key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn a_sidecar_refuses_a_control_plane_with_another_identity() {
    let cp = control_plane().await;
    let impostor_expected = "spiffe://cluster.local/ns/trellis-system/sa/someone-else";
    let result = client(&cp, impostor_expected).await;
    assert!(
        result.is_err(),
        "connected to a control plane that is not the expected one"
    );
}

#[tokio::test]
async fn a_valid_svid_renews_itself_without_a_token_and_only_for_its_own_id() {
    let cp = control_plane().await;
    let mut client = client(&cp, CONTROL_PLANE).await.unwrap();
    // A token that is about to run out: renewal must not depend on it.
    let token = cp
        .tokens
        .mint(
            &td(),
            "shop",
            "payment",
            Duration::from_secs(120),
            SystemTime::now(),
        )
        .unwrap();
    let key = WorkloadKey::generate().unwrap();
    let first = client
        .certify(request(Some(token), PAYMENT, PAYMENT, &key))
        .await
        .unwrap()
        .into_inner();
    let svid = Svid::new(
        std::iter::once(first.leaf)
            .chain(first.chain)
            .map(Into::into)
            .collect(),
        key.private_key_der(),
    )
    .unwrap();
    let creds = Credentials::with_svid(svid, cp.bundle.clone());
    let mut renewing = client_with(&cp, CONTROL_PLANE, creds).await.unwrap();

    let next_key = WorkloadKey::generate().unwrap();
    let renewed = renewing
        .certify(request(None, PAYMENT, PAYMENT, &next_key))
        .await
        .unwrap()
        .into_inner();
    // The mesh default (an hour here), not the two minutes the token had left.
    assert!(renewed.valid_until_unix > first.valid_until_unix + 1800);
    let svid = Svid::new(
        std::iter::once(renewed.leaf)
            .chain(renewed.chain)
            .map(Into::into)
            .collect(),
        next_key.private_key_der(),
    )
    .unwrap();
    assert_eq!(svid.id().as_str(), PAYMENT);

    // The SVID proves payment, and nothing else.
    let status = renewing
        .certify(request(None, ORDER, ORDER, &next_key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains(&format!("the credential is for {PAYMENT}, not {ORDER}")),
        "{}",
        status.message()
    );
}
