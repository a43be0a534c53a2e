//! A sidecar's conversation with the control plane, without the proxy: certify with
//! a join token over TLS, subscribe over mTLS with the SVID it got, ACK every push at
//! once and heartbeat. Each new config version is reported with the moment its ACK
//! was handed to the connection, which is what the benchmark times.

use std::{
    error::Error,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig,
    pki_types::{CertificateDer, ServerName},
};
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, mpsc},
    time::MissedTickBehavior,
};
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use trellis_api::{
    MAX_MESSAGE_BYTES,
    discovery::v1::{
        Ack, Heartbeat, Hello, SubscribeRequest, discovery_client::DiscoveryClient,
        subscribe_request::Kind,
    },
    identity::v1::{CertifyRequest, Credential, credential, identity_client::IdentityClient},
};
use trellis_ca::{Credentials, SpiffeId, Svid, TrustBundle, WorkloadKey};

/// Connect plus handshake, and each unary call or stream opening.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What every simulated proxy shares.
#[derive(Debug)]
pub struct Fleet {
    pub grpc: SocketAddr,
    pub bundle: TrustBundle,
    /// The id the control plane must prove.
    pub control_plane: SpiffeId,
    pub heartbeat_interval: Duration,
    /// TLS with the trust anchors and no certificate, for the first Certify.
    certify_tls: Arc<ClientConfig>,
}

impl Fleet {
    pub fn new(
        grpc: SocketAddr,
        bundle: TrustBundle,
        control_plane: SpiffeId,
        heartbeat_interval: Duration,
    ) -> Result<Self, String> {
        let certify_tls = tls_config(&Credentials::new(bundle.clone()), &control_plane)?;
        Ok(Self {
            grpc,
            bundle,
            control_plane,
            heartbeat_interval,
            certify_tls,
        })
    }
}

/// One simulated sidecar.
#[derive(Debug, Clone)]
pub struct ProxySpec {
    pub index: usize,
    pub service: String,
    pub namespace: String,
    pub instance: String,
    /// The id its join token is for.
    pub identity: SpiffeId,
    pub join_token: String,
    /// What its Hello advertises; nothing listens there.
    pub inbound: SocketAddr,
}

#[derive(Debug)]
pub enum Event {
    /// Proxy `proxy` ACKed a version it did not have before, at `acked`.
    NewConfig {
        proxy: usize,
        acked: Instant,
        bytes: usize,
    },
    Failed {
        proxy: usize,
        error: String,
    },
}

fn tls_config(creds: &Credentials, control_plane: &SpiffeId) -> Result<Arc<ClientConfig>, String> {
    let mut config = trellis_ca::client_config(creds, Some(control_plane.clone()))
        .map_err(|e| format!("client TLS config: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// An error and its sources on one line: tonic's transport errors say little alone.
fn describe(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// One HTTP/2 connection over TLS to the control plane, as a sidecar opens it.
async fn channel(addr: SocketAddr, tls: Arc<ClientConfig>) -> Result<Channel, String> {
    let tls = TlsConnector::from(tls);
    let endpoint = Endpoint::from_static("http://control-plane");
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            // The verifier checks the SPIFFE id; the name is only for SNI.
            let name = ServerName::try_from("control-plane").map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(TokioIo::new(tls.connect(name, tcp).await?))
        }
    }));
    match tokio::time::timeout(CALL_TIMEOUT, connect).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(format!("connecting to {addr}: {}", describe(&e))),
        Err(_) => Err(format!(
            "connecting to {addr}: no TLS within {CALL_TIMEOUT:?}"
        )),
    }
}

async fn certify(fleet: &Fleet, spec: &ProxySpec) -> Result<Svid, String> {
    let key = WorkloadKey::generate().map_err(|e| format!("a key: {e}"))?;
    let csr = key
        .csr(&spec.identity)
        .map_err(|e| format!("a CSR for {}: {e}", spec.identity))?;
    let mut client = IdentityClient::new(channel(fleet.grpc, fleet.certify_tls.clone()).await?);
    let request = CertifyRequest {
        csr,
        credential: Some(Credential {
            kind: Some(credential::Kind::JoinToken(spec.join_token.clone())),
        }),
        requested_id: spec.identity.as_str().to_string(),
        ttl_seconds: 0,
    };
    let response = match tokio::time::timeout(CALL_TIMEOUT, client.certify(request)).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            return Err(format!(
                "Certify: {:?}: {}",
                status.code(),
                status.message()
            ));
        }
        Err(_) => return Err(format!("Certify: no answer within {CALL_TIMEOUT:?}")),
    };
    let chain = std::iter::once(response.leaf)
        .chain(response.chain)
        .map(CertificateDer::from)
        .collect();
    Svid::new(chain, key.private_key_der()).map_err(|e| format!("the issued SVID: {e}"))
}

/// Certifies, subscribes and answers pushes until the task is dropped. `joining` is
/// held until the first config is ACKed, which bounds how many proxies join at once.
pub async fn run(
    fleet: Arc<Fleet>,
    spec: ProxySpec,
    joining: OwnedSemaphorePermit,
    events: mpsc::UnboundedSender<Event>,
) {
    let index = spec.index;
    if let Err(error) = subscribe(&fleet, spec, joining, &events).await {
        let _ = events.send(Event::Failed {
            proxy: index,
            error,
        });
    }
}

async fn subscribe(
    fleet: &Fleet,
    spec: ProxySpec,
    joining: OwnedSemaphorePermit,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), String> {
    let svid = certify(fleet, &spec).await?;
    let tls = tls_config(
        &Credentials::with_svid(svid, fleet.bundle.clone()),
        &fleet.control_plane,
    )?;
    let mut client = DiscoveryClient::new(channel(fleet.grpc, tls).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let (outbox, rx) = mpsc::channel(8);
    let send = |kind| {
        let outbox = outbox.clone();
        async move {
            outbox
                .send(SubscribeRequest { kind: Some(kind) })
                .await
                .map_err(|_| "the Discovery stream closed".to_string())
        }
    };
    // The control plane reads the Hello before it answers the call.
    send(Kind::Hello(Hello {
        service: spec.service,
        namespace: spec.namespace,
        instance: spec.instance,
        labels: [("version".to_string(), "v1".to_string())].into(),
        inbound_address: spec.inbound.to_string(),
        healthy: true,
        proxy_version: "trellis-bench".into(),
        admin_address: String::new(),
    }))
    .await?;
    let mut pushes =
        match tokio::time::timeout(CALL_TIMEOUT, client.subscribe(ReceiverStream::new(rx))).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                return Err(format!(
                    "Subscribe: {:?}: {}",
                    status.code(),
                    status.message()
                ));
            }
            Err(_) => return Err(format!("Subscribe: no answer within {CALL_TIMEOUT:?}")),
        };
    let period = fleet.heartbeat_interval;
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut joining = Some(joining);
    let mut current = String::new();
    // A config arrives in pieces; it counts (and is ACKed) once the last is in.
    let mut gathered = 0usize;
    loop {
        tokio::select! {
            push = pushes.message() => {
                let push = match push {
                    Ok(Some(push)) => push,
                    Ok(None) => return Err("the control plane ended the stream".into()),
                    Err(status) => {
                        return Err(format!("the stream: {:?}: {}", status.code(), status.message()));
                    }
                };
                gathered += push.config_json.len();
                if push.more {
                    continue;
                }
                let bytes = std::mem::take(&mut gathered);
                let new = push.version != current;
                current.clone_from(&push.version);
                send(Kind::Ack(Ack { version: push.version })).await?;
                if new {
                    let acked = Instant::now();
                    let _ = events.send(Event::NewConfig { proxy: spec.index, acked, bytes });
                }
                // The join slot is free once the first config is ACKed.
                drop(joining.take());
            }
            _ = heartbeat.tick() => send(Kind::Heartbeat(Heartbeat { healthy: true })).await?,
        }
    }
}
