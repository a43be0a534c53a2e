//! The Discovery contract over a real gRPC stream on loopback: a hello, a pushed
//! config that decodes to the same `ProxyConfig`, an ACK and a NACK carried back, a
//! config larger than tonic's default limit, and a report.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming, transport::server::TcpIncoming};
use trellis_api::{
    MAX_MESSAGE_BYTES,
    config::{EndpointConfig, ProxyConfig, ServiceConfig},
    discovery::v1::{
        Ack, ConfigPush, Hello, Nack, ReportRequest, ReportResponse, RouteStats, SubscribeRequest,
        discovery_client::DiscoveryClient,
        discovery_server::{Discovery, DiscoveryServer},
        subscribe_request::Kind,
    },
};

/// Pushes two versions to whoever says hello and forwards what the proxy answers.
struct TwoVersions {
    configs: Vec<ProxyConfig>,
    answers: mpsc::Sender<Kind>,
}

#[tonic::async_trait]
impl Discovery for TwoVersions {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<ConfigPush, Status>> + Send>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let configs = self.configs.clone();
        let answers = self.answers.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = incoming.next().await {
                let Some(kind) = message.kind else { continue };
                if matches!(kind, Kind::Hello(_)) {
                    for config in &configs {
                        let push = ConfigPush {
                            more: false,
                            version: config.version.clone(),
                            config_json: config.to_json().into(),
                        };
                        let _ = tx.send(Ok(push)).await;
                    }
                }
                let _ = answers.send(kind).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let report = request.into_inner();
        if report.routes.iter().any(|r| r.successes > r.requests) {
            return Err(Status::invalid_argument("more successes than requests"));
        }
        Ok(Response::new(ReportResponse {}))
    }
}

/// A config with `n` endpoints; 40,000 of them is larger than 4 MiB.
fn config(version: &str, n: usize) -> ProxyConfig {
    let endpoints = (0..n)
        .map(|i| EndpointConfig {
            address: ([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 15006).into(),
            identity: format!(
                "spiffe://cluster.local/ns/shop/sa/payment-instance-{i:08}-with-a-long-name"
            ),
            labels: Default::default(),
        })
        .collect();
    let mut config = ProxyConfig {
        version: version.into(),
        ..Default::default()
    };
    config.services.insert(
        "payment".into(),
        ServiceConfig {
            namespace: "shop".into(),
            endpoints,
            ..ServiceConfig::default()
        },
    );
    config
}

#[tokio::test]
async fn subscribe_pushes_configs_and_carries_acks_and_nacks() {
    let small = config("v1", 2);
    let large = config("v2", 40_000);
    assert!(
        large.to_json().len() > 4 * 1024 * 1024,
        "the large config must exceed tonic's default"
    );
    let (answers_tx, mut answers) = mpsc::channel(8);
    let service = TwoVersions {
        configs: vec![small.clone(), large.clone()],
        answers: answers_tx,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                DiscoveryServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let mut client = DiscoveryClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(MAX_MESSAGE_BYTES);

    let (tx, rx) = mpsc::channel(4);
    tx.send(SubscribeRequest {
        kind: Some(Kind::Hello(Hello {
            service: "order".into(),
            namespace: "shop".into(),
            instance: "order-1".into(),
            inbound_address: "127.0.0.1:15006".into(),
            healthy: true,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut pushes = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    let first = pushes.message().await.unwrap().unwrap();
    assert_eq!(first.version, "v1");
    assert_eq!(ProxyConfig::from_json(&first.config_json).unwrap(), small);
    tx.send(SubscribeRequest {
        kind: Some(Kind::Ack(Ack {
            version: first.version,
        })),
    })
    .await
    .unwrap();

    let second = pushes.message().await.unwrap().unwrap();
    assert_eq!(ProxyConfig::from_json(&second.config_json).unwrap(), large);
    tx.send(SubscribeRequest {
        kind: Some(Kind::Nack(Nack {
            version: second.version,
            error: "services.payment.endpoints[3].identity: bad".into(),
        })),
    })
    .await
    .unwrap();

    assert!(matches!(answers.recv().await, Some(Kind::Hello(h)) if h.instance == "order-1"));
    assert!(matches!(answers.recv().await, Some(Kind::Ack(a)) if a.version == "v1"));
    assert!(
        matches!(answers.recv().await, Some(Kind::Nack(n)) if n.version == "v2" && n.error.contains("endpoints[3]"))
    );

    let report = ReportRequest {
        service: "order".into(),
        routes: vec![RouteStats {
            destination: "payment".into(),
            route: "pay".into(),
            backend: "v1".into(),
            requests: 10,
            successes: 9,
            latency_bounds_seconds: vec![0.001, 0.01],
            latency_bucket_counts: vec![5, 10],
        }],
        ..Default::default()
    };
    client.report(report.clone()).await.unwrap();
    let mut bad = report;
    bad.routes[0].successes = 11;
    let status = client.report(bad).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[test]
fn a_bad_pushed_config_names_the_field() {
    let e = ProxyConfig::from_json(
        br#"{"services":{"payment":{"endpoints":[{"address":"x","identity":"y"}]}}}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("invalid socket address"), "{e}");
    let e = ProxyConfig::from_json(br#"{"servcies":{}}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field `servcies`"), "{e}");
}
