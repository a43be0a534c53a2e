//! A gRPC relay between sidecars and the real control plane that can rewrite the
//! configs it carries: how a test puts a config the sidecar cannot use (one from a
//! newer control plane, with a field this sidecar does not know) on the wire. The
//! relay holds the control plane's identity and, per subscriber, the subscriber's
//! identity, both issued from the control plane's own CA files.

use std::{
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Channel, Endpoint},
};
use trellis_api::discovery::v1::{
    ConfigPush, ReportRequest, ReportResponse, SubscribeRequest,
    discovery_client::DiscoveryClient,
    discovery_server::{Discovery, DiscoveryServer},
    subscribe_request::Kind,
};
use trellis_api::identity::v1::{
    CertifyRequest, CertifyResponse,
    identity_client::IdentityClient,
    identity_server::{Identity, IdentityServer},
};
use trellis_ca::{
    Authority, AuthorityConfig, ClientAuth, Credentials, SpiffeId, Svid, TrustDomain, WorkloadKey,
};

const CONTROL_PLANE_ID: &str = "spiffe://cluster.local/ns/trellis-system/sa/trellis-control-plane";

/// Flip `corrupt` to make every later push carry a field sidecars do not know.
#[derive(Debug, Clone)]
pub struct Relay {
    pub addr: SocketAddr,
    pub corrupt: Arc<AtomicBool>,
}

#[derive(Clone)]
struct Upstream {
    authority: Arc<Authority>,
    addr: SocketAddr,
    corrupt: Arc<AtomicBool>,
}

fn svid(authority: &Authority, id: &str) -> Svid {
    let id = SpiffeId::parse(id).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let issued = authority
        .sign_csr(&key.csr(&id).unwrap(), &id, Duration::from_secs(3600))
        .unwrap();
    Svid::new(
        std::iter::once(issued.leaf).chain(issued.chain).collect(),
        key.private_key_der(),
    )
    .unwrap()
}

impl Upstream {
    /// A channel to the real control plane, presenting `as_id`'s SVID if given.
    async fn channel(&self, as_id: Option<&str>) -> Channel {
        let bundle = self.authority.trust_bundle().clone();
        let creds = match as_id {
            Some(id) => Credentials::with_svid(svid(&self.authority, id), bundle),
            None => Credentials::new(bundle),
        };
        let mut config =
            trellis_ca::client_config(&creds, Some(SpiffeId::parse(CONTROL_PLANE_ID).unwrap()))
                .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = self.addr;
        Endpoint::from_static("http://control-plane")
            .connect_with_connector(tower::service_fn(move |_| {
                let connector = connector.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let name = rustls::pki_types::ServerName::try_from("control-plane").unwrap();
                    Ok::<_, std::io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
                }
            }))
            .await
            .unwrap()
    }
}

#[tonic::async_trait]
impl Identity for Upstream {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        IdentityClient::new(self.channel(None).await)
            .certify(request.into_inner())
            .await
    }
}

type Pushes = Pin<Box<dyn Stream<Item = Result<ConfigPush, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for Upstream {
    type SubscribeStream = Pushes;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Pushes>, Status> {
        let mut downstream = request.into_inner();
        let Some(Ok(SubscribeRequest {
            kind: Some(Kind::Hello(hello)),
        })) = downstream.next().await
        else {
            return Err(Status::invalid_argument("expected a Hello"));
        };
        let id = format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            hello.namespace, hello.service
        );
        let (up_tx, up_rx) = tokio::sync::mpsc::channel(16);
        up_tx
            .send(SubscribeRequest {
                kind: Some(Kind::Hello(hello)),
            })
            .await
            .unwrap();
        tokio::spawn(async move {
            while let Some(Ok(message)) = downstream.next().await {
                if up_tx.send(message).await.is_err() {
                    break;
                }
            }
        });
        let pushes = DiscoveryClient::new(self.channel(Some(&id)).await)
            .subscribe(ReceiverStream::new(up_rx))
            .await?
            .into_inner();
        let corrupt = self.corrupt.clone();
        // Pieces of a config are gathered and passed on as one push, rewritten or not.
        let mut gathered = Vec::new();
        let pushes = pushes.filter_map(move |push| {
            let mut push = match push {
                Ok(push) => push,
                Err(status) => return Some(Err(status)),
            };
            gathered.extend_from_slice(&push.config_json);
            if push.more {
                return None;
            }
            let json = std::mem::take(&mut gathered);
            push.config_json = if corrupt.load(Ordering::Relaxed) {
                let mut config: serde_json::Value = serde_json::from_slice(&json).unwrap();
                config["futureField"] = serde_json::Value::Bool(true);
                serde_json::to_vec(&config).unwrap().into()
            } else {
                json.into()
            };
            Some(Ok(push))
        });
        Ok(Response::new(Box::pin(pushes)))
    }

    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let id = format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            request.get_ref().namespace,
            request.get_ref().service
        );
        DiscoveryClient::new(self.channel(Some(&id)).await)
            .report(request.into_inner())
            .await
    }
}

impl Relay {
    /// Starts a relay in front of the control plane at `upstream` whose data dir
    /// (for its CA files) is `data_dir`.
    pub async fn start(data_dir: &Path, upstream: SocketAddr) -> Self {
        let authority = Authority::load_or_create(
            &data_dir.join("ca"),
            AuthorityConfig {
                trust_domain: TrustDomain::parse("cluster.local").unwrap(),
                max_leaf_ttl: Duration::from_secs(3600),
            },
        )
        .unwrap();
        let creds = Credentials::with_svid(
            svid(&authority, CONTROL_PLANE_ID),
            authority.trust_bundle().clone(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let corrupt = Arc::new(AtomicBool::new(false));
        let upstream = Upstream {
            authority: Arc::new(authority),
            addr: upstream,
            corrupt: corrupt.clone(),
        };
        let incoming =
            trellis_control_plane::grpc_tls::incoming(listener, &creds, ClientAuth::Optional)
                .unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IdentityServer::new(upstream.clone()))
                .add_service(DiscoveryServer::new(upstream))
                .serve_with_incoming(incoming),
        );
        Self { addr, corrupt }
    }
}
