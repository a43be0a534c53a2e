//! The control loop against an in-process control plane that speaks the real protocol
//! over TLS on loopback: first certificate with the join token, renewal with the SVID,
//! Hello, ACK and NACK, heartbeats that follow the app's health, reconnection after
//! the stream ends, and a clean stop on shutdown.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use trellis_api::{
    config::{EndpointConfig, ProxyConfig, ServiceConfig},
    discovery::v1::{
        ConfigPush, Hello, ReportRequest, ReportResponse, SubscribeRequest,
        discovery_server::{Discovery, DiscoveryServer},
        subscribe_request::Kind,
    },
    identity::v1::{
        CertifyRequest, CertifyResponse, credential,
        identity_server::{Identity, IdentityServer},
    },
};
use trellis_ca::{
    Authority, AuthorityConfig, ClientAuth, Credentials, SpiffeId, Svid, TrustDomain, WorkloadKey,
};

use trellis_control_plane::grpc_tls::{self, Caller};

use super::ControlPlane;
use crate::{
    args::{ControlPlaneArgs, Labels},
    outbound::destinations::Destinations,
};

const PAYMENT: &str = "spiffe://cluster.local/ns/shop/sa/payment";
const SERVER: &str = "spiffe://cluster.local/ns/trellis-system/sa/trellis-control-plane";
/// Short enough that the test sees a renewal.
const LEAF_TTL: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
enum Event {
    Certify {
        join_token: bool,
        caller: Option<SpiffeId>,
        /// The ServiceAccount token sent, if any.
        sa_token: Option<String>,
    },
    Subscribed(Hello),
    Answer(Kind),
}

#[derive(Clone)]
struct Fake {
    authority: Arc<Authority>,
    events: mpsc::UnboundedSender<Event>,
    subscriptions: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Identity for Fake {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let Caller(caller) = request.extensions().get::<Caller>().cloned().unwrap();
        let CertifyRequest {
            csr,
            credential,
            requested_id,
            ttl_seconds,
        } = request.into_inner();
        let kind = credential.and_then(|c| c.kind);
        let join_token = matches!(kind, Some(credential::Kind::JoinToken(_)));
        let sa_token = match kind {
            Some(credential::Kind::ServiceAccountToken(token)) => Some(token),
            _ => None,
        };
        let bootstrap = join_token || sa_token.is_some();
        let _ = self.events.send(Event::Certify {
            join_token,
            caller: caller.clone(),
            sa_token,
        });
        if !bootstrap && caller.is_none() {
            return Err(Status::unauthenticated("no credential"));
        }
        assert_eq!(ttl_seconds, LEAF_TTL.as_secs(), "--cert-ttl is asked for");
        let id = SpiffeId::parse(&requested_id).unwrap();
        let issued = self
            .authority
            .sign_csr(&csr, &id, LEAF_TTL)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
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

#[tonic::async_trait]
impl Discovery for Fake {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<ConfigPush, Status>> + Send>>;

    /// The first subscription gets a good config, one that does not compile and one
    /// that does not decode, then the stream ends once all three are answered. Later
    /// ones get the good config and stay open.
    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        assert!(
            matches!(request.extensions().get::<Caller>(), Some(Caller(Some(_)))),
            "Subscribe presents the SVID"
        );
        let mut incoming = request.into_inner();
        let Some(Ok(SubscribeRequest {
            kind: Some(Kind::Hello(hello)),
        })) = incoming.next().await
        else {
            return Err(Status::invalid_argument("no hello"));
        };
        let _ = self.events.send(Event::Subscribed(hello));
        let first = self.subscriptions.fetch_add(1, Ordering::SeqCst) == 0;
        let mut pushes = vec![push("v1", good_config().to_json())];
        if first {
            let mut bad = good_config();
            bad.services.get_mut("b").unwrap().endpoints[0].identity = "not-an-id".into();
            pushes.push(push("v2", bad.to_json()));
            pushes.push(push("v3", b"{not json".to_vec()));
        }
        let (tx, rx) = mpsc::channel(8);
        let events = self.events.clone();
        tokio::spawn(async move {
            let mut unanswered = pushes.len();
            for p in pushes {
                tx.send(Ok(p)).await.unwrap();
            }
            while let Some(Ok(SubscribeRequest { kind: Some(kind) })) = incoming.next().await {
                let answer = matches!(kind, Kind::Ack(_) | Kind::Nack(_));
                let _ = events.send(Event::Answer(kind));
                if answer {
                    unanswered -= 1;
                    if first && unanswered == 0 {
                        return; // dropping `tx` ends the stream
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report(
        &self,
        _request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        Ok(Response::new(ReportResponse {}))
    }
}

fn push(version: &str, config_json: Vec<u8>) -> ConfigPush {
    ConfigPush {
        version: version.into(),
        config_json: config_json.into(),
        more: false,
    }
}

fn good_config() -> ProxyConfig {
    let mut config = ProxyConfig::default();
    config.services.insert(
        "b".into(),
        ServiceConfig {
            endpoints: vec![EndpointConfig {
                address: ([127, 0, 0, 1], 1).into(),
                identity: "spiffe://cluster.local/ns/shop/sa/b".into(),
                labels: Default::default(),
            }],
            ..ServiceConfig::default()
        },
    );
    config
}

/// Serves Identity and Discovery over TLS with the control plane's SVID.
async fn control_plane(events: mpsc::UnboundedSender<Event>) -> (std::net::SocketAddr, String) {
    let td = TrustDomain::parse("cluster.local").unwrap();
    let authority = Authority::generate(AuthorityConfig {
        trust_domain: td,
        max_leaf_ttl: Duration::from_secs(3600),
    })
    .unwrap();
    let server_id = SpiffeId::parse(SERVER).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let issued = authority
        .sign_csr(
            &key.csr(&server_id).unwrap(),
            &server_id,
            Duration::from_secs(3600),
        )
        .unwrap();
    let svid = Svid::new(
        std::iter::once(issued.leaf).chain(issued.chain).collect(),
        key.private_key_der(),
    )
    .unwrap();
    let anchors = authority.trust_bundle().to_pem();
    let creds = Credentials::with_svid(svid, authority.trust_bundle().clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The real control plane's TLS front: the caller's verified id in each request.
    let incoming = grpc_tls::incoming(listener, &creds, ClientAuth::Optional).unwrap();
    let fake = Fake {
        authority: Arc::new(authority),
        events,
        subscriptions: Arc::default(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(fake.clone()))
            .add_service(DiscoveryServer::new(fake))
            .serve_with_incoming(incoming),
    );
    (addr, anchors)
}

fn join_token(service: &str) -> String {
    let claims = format!(r#"{{"ns":"shop","svc":"{service}","exp":4102444800,"jti":"x"}}"#);
    format!("trellis-jt1.{}.c2ln", B64.encode(claims))
}

async fn next_event<T>(
    events: &mut mpsc::UnboundedReceiver<Event>,
    what: &str,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events.recv().await.expect("the control plane is running");
            if let Some(found) = pick(event) {
                return found;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_subscribe_answer_renew_reconnect_and_stop() {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (addr, anchors) = control_plane(events_tx).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("anchors.pem"), anchors).unwrap();
    std::fs::write(dir.path().join("token"), join_token("payment")).unwrap();
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let args = ControlPlaneArgs {
        control_plane: Some(format!("https://{addr}").parse().unwrap()),
        trust_anchors: Some(dir.path().join("anchors.pem")),
        join_token_file: Some(dir.path().join("token")),
        token_file: None,
        trust_domain: None,
        labels: Some(Labels([("version".to_string(), "v2".to_string())].into())),
        instance: None,
        advertise_addr: None,
        heartbeat_interval: Duration::from_millis(200),
        report_interval: Duration::from_secs(10),
        cert_ttl: Some(LEAF_TTL),
    };
    let control =
        ControlPlane::new(args, "payment", "shop", Some(app.local_addr().unwrap())).unwrap();
    let creds = control.credentials().clone();
    assert!(creds.svid().is_none());
    let destinations = Arc::new(ArcSwap::from_pointee(
        Destinations::compile(ProxyConfig::default(), &creds).unwrap(),
    ));
    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let task = control.spawn(
        Some("0.0.0.0:15006".parse().unwrap()),
        Some("0.0.0.0:15020".parse().unwrap()),
        destinations.clone(),
        ready.clone(),
        shutdown.clone(),
    );

    // The first certificate is bought with the join token, without a client certificate.
    let (join_token, caller) = next_event(&mut events, "Certify", |e| match e {
        Event::Certify {
            join_token, caller, ..
        } => Some((join_token, caller)),
        _ => None,
    })
    .await;
    assert!(join_token && caller.is_none());

    let hello = next_event(&mut events, "Hello", |e| match e {
        Event::Subscribed(hello) => Some(hello),
        _ => None,
    })
    .await;
    assert_eq!(creds.svid().unwrap().id().as_str(), PAYMENT);
    assert_eq!(
        (hello.service.as_str(), hello.namespace.as_str()),
        ("payment", "shop")
    );
    assert!(
        hello.instance.starts_with("payment-") && hello.instance.len() == 16,
        "{}",
        hello.instance
    );
    assert_eq!(hello.labels["version"], "v2");
    assert_eq!(hello.inbound_address, "127.0.0.1:15006");
    assert_eq!(
        hello.admin_address, "127.0.0.1:15020",
        "dialable, as advertised"
    );
    assert_eq!(hello.proxy_version, env!("CARGO_PKG_VERSION"));

    // v1 is applied; v2 (does not compile) and v3 (does not decode) are refused and
    // v1 stays in force.
    let mut answers = Vec::new();
    while answers.len() < 3 {
        let answer = next_event(&mut events, "answer", |e| match e {
            Event::Answer(Kind::Ack(ack)) => Some(format!("ack {}", ack.version)),
            Event::Answer(Kind::Nack(nack)) => {
                Some(format!("nack {} {}", nack.version, nack.error))
            }
            _ => None,
        })
        .await;
        answers.push(answer);
    }
    assert_eq!(answers[0], "ack v1");
    assert!(
        answers[1].starts_with("nack v2 services.b.endpoints[0].identity"),
        "{}",
        answers[1]
    );
    assert!(
        answers[2].starts_with("nack v3 decoding the config"),
        "{}",
        answers[2]
    );
    assert!(ready.load(Ordering::Acquire));
    assert_eq!(destinations.load().config().version, "v1");
    assert!(destinations.load().get("b").is_some());

    // The stream ended after the answers: the sidecar comes back and says hello again.
    let again = next_event(&mut events, "second Hello", |e| match e {
        Event::Subscribed(hello) => Some(hello),
        _ => None,
    })
    .await;
    assert_eq!(again.instance, hello.instance, "the instance name is kept");

    // Renewal presents the SVID and asks with no other credential.
    let first_serial = creds.svid().unwrap().serial().to_string();
    let caller = next_event(&mut events, "renewal", |e| match e {
        Event::Certify {
            join_token: false,
            caller,
            ..
        } => Some(caller),
        _ => None,
    })
    .await;
    assert_eq!(caller.unwrap().as_str(), PAYMENT);
    tokio::time::timeout(WAIT, async {
        while creds.svid().unwrap().serial() == first_serial {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the renewed certificate is installed");

    // Heartbeats follow the app's health.
    next_event(&mut events, "healthy heartbeat", |e| {
        matches!(e, Event::Answer(Kind::Heartbeat(h)) if h.healthy).then_some(())
    })
    .await;
    drop(app);
    next_event(&mut events, "unhealthy heartbeat", |e| {
        matches!(e, Event::Answer(Kind::Heartbeat(h)) if !h.healthy).then_some(())
    })
    .await;

    shutdown.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the control task stops on shutdown")
        .unwrap();
}

#[test]
fn a_token_for_another_service_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let authority = Authority::generate(AuthorityConfig {
        trust_domain: TrustDomain::parse("cluster.local").unwrap(),
        max_leaf_ttl: Duration::from_secs(3600),
    })
    .unwrap();
    std::fs::write(
        dir.path().join("anchors.pem"),
        authority.trust_bundle().to_pem(),
    )
    .unwrap();
    let args = |token: &str| {
        std::fs::write(dir.path().join("token"), token).unwrap();
        ControlPlaneArgs {
            control_plane: Some("127.0.0.1:1".parse().unwrap()),
            trust_anchors: Some(dir.path().join("anchors.pem")),
            join_token_file: Some(dir.path().join("token")),
            token_file: None,
            trust_domain: None,
            labels: None,
            instance: Some("payment-1".into()),
            advertise_addr: None,
            heartbeat_interval: Duration::from_secs(5),
            report_interval: Duration::from_secs(10),
            cert_ttl: None,
        }
    };
    let app = Some("127.0.0.1:9".parse().unwrap());
    let error = ControlPlane::new(args(&join_token("order")), "payment", "shop", app)
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("--join-token-file "), "{error}");
    assert!(error.contains("for service \"order\""), "{error}");

    let expired = format!(
        "trellis-jt1.{}.c2ln",
        B64.encode(r#"{"ns":"shop","svc":"payment","exp":1000}"#)
    );
    let error = ControlPlane::new(args(&expired), "payment", "shop", app)
        .unwrap_err()
        .to_string();
    assert!(error.contains("expired at 1000"), "{error}");

    let error = ControlPlane::new(args("garbage"), "payment", "shop", app)
        .unwrap_err()
        .to_string();
    assert!(error.contains("malformed"), "{error}");

    let ok = ControlPlane::new(args(&join_token("payment")), "payment", "shop", app).unwrap();
    assert_eq!(ok.id.as_str(), PAYMENT);
    assert_eq!(ok.server_id.as_str(), SERVER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_says_hello_with_no_address_and_stays_healthy_without_an_app() {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (addr, anchors) = control_plane(events_tx).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("anchors.pem"), anchors).unwrap();
    std::fs::write(dir.path().join("token"), join_token("payment")).unwrap();
    let args = ControlPlaneArgs {
        control_plane: Some(format!("https://{addr}").parse().unwrap()),
        trust_anchors: Some(dir.path().join("anchors.pem")),
        join_token_file: Some(dir.path().join("token")),
        token_file: None,
        trust_domain: None,
        labels: None,
        instance: None,
        advertise_addr: None,
        heartbeat_interval: Duration::from_millis(100),
        report_interval: Duration::from_secs(10),
        cert_ttl: Some(LEAF_TTL),
    };
    let control = ControlPlane::new(args, "payment", "shop", None).unwrap();
    let destinations = Arc::new(ArcSwap::from_pointee(
        Destinations::compile(ProxyConfig::default(), control.credentials()).unwrap(),
    ));
    let shutdown = CancellationToken::new();
    let task = control.spawn(
        None,
        None,
        destinations,
        Arc::new(AtomicBool::new(false)),
        shutdown.clone(),
    );
    let hello = next_event(&mut events, "Hello", |e| match e {
        Event::Subscribed(hello) => Some(hello),
        _ => None,
    })
    .await;
    assert_eq!(hello.inbound_address, "", "peers never call a gateway");
    assert!(hello.healthy, "no app to be unhealthy");
    let beats: Vec<bool> = next_heartbeats(&mut events, 3).await;
    assert!(beats.iter().all(|healthy| *healthy), "{beats:?}");
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

/// The health the next `n` heartbeats report.
async fn next_heartbeats(events: &mut mpsc::UnboundedReceiver<Event>, n: usize) -> Vec<bool> {
    let mut beats = Vec::new();
    while beats.len() < n {
        let healthy = next_event(events, "heartbeat", |e| match e {
            Event::Answer(Kind::Heartbeat(h)) => Some(h.healthy),
            _ => None,
        })
        .await;
        beats.push(healthy);
    }
    beats
}

/// Kubernetes: the first certificate is bought with the projected ServiceAccount token
/// as the file holds it, for the id the token names (not `--service`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_token_buys_the_certificate_for_its_account() {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (addr, anchors) = control_plane(events_tx).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("anchors.pem"), anchors).unwrap();
    let token = crate::control::sa_token::tests::order_token(4_102_444_800);
    std::fs::write(dir.path().join("sa-token"), &token).unwrap();
    let args = ControlPlaneArgs {
        control_plane: Some(format!("https://{addr}").parse().unwrap()),
        trust_anchors: Some(dir.path().join("anchors.pem")),
        join_token_file: None,
        token_file: Some(dir.path().join("sa-token")),
        trust_domain: None,
        labels: None,
        instance: None,
        advertise_addr: None,
        heartbeat_interval: Duration::from_millis(200),
        report_interval: Duration::from_secs(10),
        cert_ttl: Some(LEAF_TTL),
    };
    // The app is called `orders` but runs as service account `order`.
    let control = ControlPlane::new(args, "orders", "shop", None).unwrap();
    let creds = control.credentials().clone();
    let destinations = Arc::new(ArcSwap::from_pointee(
        Destinations::compile(ProxyConfig::default(), &creds).unwrap(),
    ));
    let shutdown = CancellationToken::new();
    let task = control.spawn(
        None,
        None,
        destinations,
        Arc::new(AtomicBool::new(false)),
        shutdown.clone(),
    );
    let (sent, caller) = next_event(&mut events, "Certify", |e| match e {
        Event::Certify {
            sa_token: Some(sent),
            caller,
            ..
        } => Some((sent, caller)),
        _ => None,
    })
    .await;
    assert_eq!(sent, token);
    assert!(caller.is_none(), "no certificate to present yet");
    tokio::time::timeout(WAIT, async {
        while creds.svid().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(
        creds.svid().unwrap().id().as_str(),
        "spiffe://cluster.local/ns/shop/sa/order"
    );
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}
