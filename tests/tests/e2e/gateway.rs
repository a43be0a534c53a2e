//! The ingress gateway (`trellis-proxy --mode gateway`) with the real control plane:
//! external HTTP/1.1 and h2c requests routed by the gateway's own TrafficRoute (path
//! and host) to mesh services over mTLS with the gateway's identity, correlation and
//! forwarding headers, 404 for what no rule matches, the gateway's rate limit per
//! client address, the flags each mode refuses, and static mode.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use trellis_tests::{
    client::{Answer, HttpClient, call_on},
    control_plane::{ControlPlane, ControlPlaneSpec, MeshGateway, MeshSidecarSpec},
    mesh::{Mesh, SidecarSpec, http1_client, metric_value, proxy_binary, scrape, workload_id},
    process::{Process, addr_field},
    within,
};

const ROUTES: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {name: gateway}
spec:
  service: gateway
  rules:
  - name: b-host
    match:
      headers: [{name: host, exact: b.example}]
    backends: [{service: b}]
  - name: a
    match: {pathPrefix: /a}
    backends: [{service: a}]
  - name: b
    match: {pathPrefix: /b}
    backends: [{service: b}]
"#;

/// An app that answers every request with its name in `x-app-name` and the request's
/// headers as a JSON object (values of a repeated header joined by `|`).
async fn header_echo_app(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<Incoming>| async move {
                        let mut seen: BTreeMap<String, String> = BTreeMap::new();
                        for (key, value) in req.headers() {
                            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                            seen.entry(key.to_string())
                                .and_modify(|v| *v = format!("{v}|{value}"))
                                .or_insert(value);
                        }
                        if let Some(authority) = req.uri().authority() {
                            seen.entry("host".into())
                                .or_insert_with(|| authority.to_string());
                        }
                        let body = serde_json::to_vec(&seen).unwrap();
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        response
                            .headers_mut()
                            .insert("x-app-name", name.parse().unwrap());
                        Ok::<_, Infallible>(response)
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// The headers the app saw, from a `header_echo_app` answer.
fn seen(answer: &Answer) -> Value {
    serde_json::from_str(&answer.body)
        .unwrap_or_else(|e| panic!("not the app's JSON ({e}): {answer:?}"))
}

/// Apps `a` and `b` behind their sidecars and the gateway, all converged on `resources`.
struct Edge {
    cp: ControlPlane,
    gateway: MeshGateway,
    _sidecars: Vec<trellis_tests::control_plane::MeshSidecar>,
}

impl Edge {
    async fn start(dir: &std::path::Path, resources: &str) -> Self {
        let cp = ControlPlane::start(dir, &ControlPlaneSpec::default());
        let (status, answer) = cp.apply(resources).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let mut sidecars = Vec::new();
        for name in ["a", "b"] {
            let app = header_echo_app(name).await;
            sidecars.push(cp.sidecar(MeshSidecarSpec::new(name, app)).await);
        }
        let gateway = cp.gateway("gateway").await;
        cp.converged(3).await;
        Self {
            cp,
            gateway,
            _sidecars: sidecars,
        }
    }

    async fn get(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        call_on(
            &http1_client(),
            self.gateway.listen,
            host,
            Method::GET,
            path,
            headers,
        )
        .await
    }
}

/// GET `path` over h2c (prior knowledge) with `:authority` `authority`.
async fn get_h2c(gateway: SocketAddr, authority: &str, path: &str) -> Answer {
    let tcp = TcpStream::connect(gateway).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get(format!("http://{authority}{path}"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = within(path, sender.send_request(request)).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let (parts, body) = response.into_parts();
    let body = within("body", body.collect()).await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_requests_reach_the_service_their_rule_names_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(dir.path(), ROUTES).await;
    let host = format!("shop.example:{}", edge.gateway.listen.port());

    // By path, from a plain HTTP/1.1 client.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let answer = edge
        .get(
            &host,
            "/a/items?page=2",
            &[
                ("x-request-id", "req-42"),
                (
                    "traceparent",
                    &format!("00-{client_trace}-00f067aa0ba902b7-01"),
                ),
                ("x-trellis-peer-id", "spiffe://forged/ns/x/sa/y"),
            ],
        )
        .await;
    assert_eq!(
        (answer.status, answer.app()),
        (StatusCode::OK, "a"),
        "{answer:?}"
    );
    let headers = seen(&answer);
    assert_eq!(headers["x-trellis-peer-id"], workload_id("gateway"));
    assert_eq!(headers["x-request-id"], "req-42");
    let traceparent = headers["traceparent"].as_str().unwrap();
    assert!(
        traceparent.starts_with(&format!("00-{client_trace}-")) && traceparent.ends_with("-01"),
        "the client's trace continues: {traceparent}"
    );
    assert!(
        !traceparent.contains("00f067aa0ba902b7"),
        "a new span: {traceparent}"
    );
    assert_eq!(headers["x-forwarded-host"], host.as_str());
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["host"], "a", "addressed by its service");
    assert_eq!(answer.header("x-request-id"), "req-42");

    // Without ids of its own the request gets them.
    let answer = edge.get(&host, "/b/cart", &[]).await;
    assert_eq!(
        (answer.status, answer.app()),
        (StatusCode::OK, "b"),
        "{answer:?}"
    );
    let headers = seen(&answer);
    let request_id = headers["x-request-id"].as_str().unwrap();
    assert!(!request_id.is_empty());
    assert_eq!(answer.header("x-request-id"), request_id);
    assert!(headers["traceparent"].as_str().unwrap().starts_with("00-"));
    assert_eq!(headers["x-trellis-peer-id"], workload_id("gateway"));

    // By host, whatever the path: HTTP/1.1 Host and HTTP/2 :authority alike.
    let answer = edge.get("b.example", "/a/looks-like-a", &[]).await;
    assert_eq!(answer.app(), "b", "{answer:?}");
    assert_eq!(seen(&answer)["x-forwarded-host"], "b.example");
    let answer = get_h2c(edge.gateway.listen, "b.example", "/other").await;
    assert_eq!(
        (answer.status, answer.app()),
        (StatusCode::OK, "b"),
        "{answer:?}"
    );
    let answer = get_h2c(edge.gateway.listen, "shop.example", "/a/h2").await;
    assert_eq!(answer.app(), "a", "{answer:?}");

    // What no rule matches is the gateway's 404, naming the path.
    let answer = edge.get(&host, "/nowhere/at/all", &[]).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{answer:?}");
    assert_eq!(answer.error(), "no-route");
    assert_eq!(answer.app(), "");
    assert!(answer.body.contains("/nowhere/at/all"), "{}", answer.body);

    // Listed among the proxies, but nobody's endpoint.
    let proxies = edge.cp.proxies().await;
    let gateway = proxies
        .iter()
        .find(|p| p["service"] == "gateway")
        .unwrap_or_else(|| panic!("the gateway is not listed: {proxies:#?}"));
    assert!(gateway["address"].is_null(), "{gateway}");
    let endpoints = edge.cp.endpoints().await;
    let services: Vec<&str> = endpoints
        .iter()
        .map(|e| e["service"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["a", "b"], "{endpoints:#?}");

    // Its own access log line and metrics, direction `gateway`.
    let mut gateway = edge.gateway;
    let line = gateway
        .process
        .wait_for_log(|l| l["direction"] == "gateway" && l["path"] == "/nowhere/at/all")
        .expect("an access log line for the unrouted request");
    assert_eq!(line["status"], 404);
    assert_eq!(line["authority"], host.as_str());
    let requests = |labels: &'static [(&'static str, &'static str)]| async move {
        metric_value(
            &scrape(gateway.admin).await,
            "trellis_requests_total",
            labels,
        )
    };
    let edge_200 = &[
        ("direction", "gateway"),
        ("service", "gateway"),
        ("code", "200"),
    ];
    let edge_404 = &[
        ("direction", "gateway"),
        ("service", "gateway"),
        ("code", "404"),
    ];
    let hops_to_b = &[
        ("direction", "outbound"),
        ("service", "gateway"),
        ("peer_service", "b"),
    ];
    // Counted as each exchange ends, which may be just after the client has its answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counts = (
            requests(edge_200).await,
            requests(edge_404).await,
            requests(hops_to_b).await,
        );
        if counts == (5.0, 1.0, 3.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "(gateway 200s, gateway 404s, mesh hops to b) = {counts:?}, not (5, 1, 3)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_rate_limit_refuses_a_burst_per_client_address() {
    let dir = tempfile::tempdir().unwrap();
    let limit = "apiVersion: trellis.dev/v1alpha1\nkind: DestinationPolicy\n\
                 metadata: {name: gateway}\nspec:\n  service: gateway\n  \
                 rateLimit: {requestsPerSecond: 1, burst: 3, perSource: true}\n";
    let edge = Edge::start(dir.path(), &format!("{ROUTES}---\n{limit}")).await;
    let host = "shop.example";

    let start = Instant::now();
    let mut admitted = 0u32;
    let mut refused = None;
    for _ in 0..10 {
        let answer = edge.get(host, "/a", &[]).await;
        match answer.status {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => refused = Some(answer),
            _ => panic!("unexpected answer: {answer:?}"),
        }
    }
    let refill = start.elapsed().as_secs_f64().ceil() as u32;
    assert!(
        (3..=3 + refill).contains(&admitted),
        "{admitted} of 10 admitted (burst 3, refill {refill})"
    );
    let refused = refused.expect("the burst was refused in part");
    assert_eq!(refused.error(), "rate-limited");
    assert_eq!(refused.app(), "", "the app never saw it");
    let retry_after: u64 = refused.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "{refused:?}");

    // Another client address has a bucket of its own.
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(IpAddr::from([127, 0, 0, 2])));
    let other: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let answer = call_on(&other, edge.gateway.listen, host, Method::GET, "/a", &[]).await;
    assert_eq!(
        (answer.status, answer.app()),
        (StatusCode::OK, "a"),
        "{answer:?}"
    );
    assert_eq!(seen(&answer)["x-forwarded-for"], "127.0.0.2");

    let metrics = scrape(edge.gateway.admin).await;
    let limited = metric_value(
        &metrics,
        "trellis_rate_limited_total",
        &[("service", "gateway")],
    );
    assert_eq!(limited, f64::from(10 - admitted));
}

#[test]
fn gateway_flags_out_of_place_exit_2_naming_the_flag() {
    let control = [
        "--control-plane",
        "127.0.0.1:1",
        "--trust-anchors",
        "/nonexistent/anchors.pem",
        "--join-token-file",
        "/nonexistent/token",
    ];
    for (flags, named) in [
        (&["--mode", "gateway"][..], "--listen"),
        (
            &["--app-addr", "127.0.0.1:9", "--listen", "127.0.0.1:0"],
            "--listen",
        ),
        (
            &[
                "--mode",
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--app-addr",
                "127.0.0.1:9",
            ],
            "--app-addr",
        ),
        (
            &[
                "--mode",
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--inbound-addr",
                "127.0.0.1:0",
            ],
            "--inbound-addr",
        ),
    ] {
        let output = Command::new(proxy_binary())
            .args(["--service", "gateway"])
            .args(control)
            .args(flags)
            .env_remove("TRELLIS_MODE")
            .env_remove("TRELLIS_LISTEN")
            .env_remove("TRELLIS_APP_ADDR")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(named), "{flags:?}: {stderr}");
        assert!(output.stdout.is_empty(), "nothing started: {flags:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_routes_answers_404_and_waits_for_them() {
    // No TrafficRoute names the gateway yet: nothing is routed, nothing breaks.
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let gateway = cp.gateway("gateway").await;
    cp.converged(1).await;
    let answer = call_on(
        &http1_client(),
        gateway.listen,
        "shop.example",
        Method::POST,
        "/checkout",
        &[],
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{answer:?}");
    assert_eq!(answer.error(), "no-route");
    assert!(answer.body.contains("POST /checkout"), "{}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_in_static_mode_routes_by_its_config_file() {
    let mesh = Mesh::new();
    let app = header_echo_app("web").await;
    let web = mesh.sidecar(SidecarSpec::new("web", app));
    let (cert, key, bundle) = mesh.write_identity("gateway", &workload_id("gateway"));
    let config = serde_json::json!({
        "identity": {"certificate": cert, "privateKey": key, "trustBundle": bundle},
        "proxy": {
            "version": "static-1",
            "mtls": "STRICT",
            "services": {
                "gateway": {"routes": [{
                    "name": "shop",
                    "matches": {"pathPrefix": "/shop/"},
                    "backends": [{"service": "web", "weight": 1}],
                }]},
                "web": {"endpoints": [web.endpoint()]},
            },
        },
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
    let mut command = Command::new(proxy_binary());
    command
        .args(["--mode", "gateway", "--service", "gateway"])
        .args(["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .arg("--config")
        .arg(&path)
        .args(["--log-format", "json"]);
    let mut process = Process::spawn("trellis-proxy static gateway", command);
    let listening = process.listening("the static gateway");
    assert!(
        listening.get("inbound").is_none() && listening.get("outbound").is_none(),
        "a gateway has neither: {listening}"
    );
    let listen = addr_field(&listening, "gateway");

    let answer = call_on(
        &http1_client(),
        listen,
        "shop.example",
        Method::GET,
        "/shop/cart",
        &[],
    )
    .await;
    assert_eq!(
        (answer.status, answer.app()),
        (StatusCode::OK, "web"),
        "{answer:?}"
    );
    assert_eq!(seen(&answer)["x-trellis-peer-id"], workload_id("gateway"));
    let answer = call_on(
        &http1_client(),
        listen,
        "shop.example",
        Method::GET,
        "/admin",
        &[],
    )
    .await;
    assert_eq!(
        (answer.status, answer.error()),
        (StatusCode::NOT_FOUND, "no-route")
    );
}
