//! Retries across real sidecar processes: which requests are retried and which are
//! not, bodies replayed intact, the retry budget under a failing backend, per-try
//! timeouts that move a slow try to another endpoint, and the route timeout over all
//! tries. The backends are `faulty_app`s that fail and slow down on command.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_api::config::{
    BackoffConfig, HeaderMatchConfig, RetriesConfig, RouteConfig, RouteMatchConfig, ServiceConfig,
};
use trellis_tests::{
    apps::{self, Faults},
    echo::{Message, echo_client::EchoClient},
    mesh::{Mesh, Sidecar, SidecarSpec, metric_value, scrape},
    within,
};

const NO_APP: &str = "127.0.0.1:9";

type Body = BoxBody<Bytes, std::convert::Infallible>;

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("response has no {name}: {:?}", self.headers))
    }

    fn attempts(&self) -> u32 {
        self.header("x-trellis-attempts").parse().unwrap()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request through the outbound listener `via`, as the local app would.
async fn send(
    via: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> Answer {
    let client =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Body>();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{via}{path}"))
        .header(header::HOST, "web");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = within(path, client.request(request.body(body).unwrap()))
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = within("body", body.collect()).await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A body of unknown length (chunked on HTTP/1.1), sent in `pieces`.
fn streamed(pieces: Vec<Bytes>) -> Body {
    let frames = pieces.into_iter().map(|p| Ok(Frame::data(p)));
    StreamBody::new(tokio_stream::iter(frames)).boxed()
}

async fn get(via: SocketAddr, path: &str) -> Answer {
    send(via, Method::GET, path, &[], full("")).await
}

fn retries(attempts: u32) -> RetriesConfig {
    RetriesConfig {
        attempts,
        per_try_timeout: None,
        on: vec![],
        // Short pauses keep the tests quick; the default (25ms, 250ms) is unit-tested.
        backoff: Some(BackoffConfig {
            base: "1ms".into(),
            max: "5ms".into(),
        }),
        allow_non_idempotent: false,
    }
}

fn route(name: &str, matches: RouteMatchConfig, retries: RetriesConfig) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        matches,
        retries: Some(retries),
        ..RouteConfig::default()
    }
}

fn with_header(name: &str) -> RouteMatchConfig {
    RouteMatchConfig {
        headers: vec![HeaderMatchConfig {
            name: name.into(),
            exact: None,
            prefix: None,
            regex: None,
        }],
        ..RouteMatchConfig::default()
    }
}

/// Service `web`: one sidecar per `faulty_app`, named by `names`.
struct Web {
    sidecars: Vec<Sidecar>,
    faults: Vec<Arc<Faults>>,
}

async fn web(mesh: &Mesh, names: &[&'static str]) -> Web {
    let (mut sidecars, mut faults) = (Vec::new(), Vec::new());
    for name in names {
        let (app, app_faults) = apps::faulty_app(name).await;
        sidecars.push(mesh.sidecar(SidecarSpec::new("web", app)));
        faults.push(app_faults);
    }
    Web { sidecars, faults }
}

/// The caller's sidecar, with `routes` on service `web`.
fn caller(mesh: &Mesh, web: &Web, routes: Vec<RouteConfig>) -> Sidecar {
    let service = ServiceConfig {
        endpoints: web.sidecars.iter().map(Sidecar::endpoint).collect(),
        routes,
        ..ServiceConfig::default()
    };
    mesh.sidecar(SidecarSpec::new("a", NO_APP.parse().unwrap()).service("web", service))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_that_fails_twice_succeeds_on_the_third_try() {
    let mesh = Mesh::new();
    let web = web(&mesh, &["web"]).await;
    let a = caller(
        &mesh,
        &web,
        vec![route("all", Default::default(), retries(3))],
    );
    let faults = &web.faults[0];

    faults.fail_next.store(2, Ordering::SeqCst);
    let answer = get(a.outbound, "/").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.header("x-app-name"), "web");
    assert_eq!(answer.attempts(), 3);
    assert_eq!(faults.requests(), 3);

    // A success at once is one try, and says so.
    let answer = get(a.outbound, "/").await;
    assert_eq!((answer.status, answer.attempts()), (StatusCode::OK, 1));

    // Three failures in a row: the last one is returned as it came.
    faults.fail_next.store(3, Ordering::SeqCst);
    let answer = get(a.outbound, "/").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.text(), "web failing on command");
    assert_eq!(answer.attempts(), 3);
    assert_eq!(faults.requests(), 7);

    // Not a condition of the route (on: [] is connect-failure and gateway-error).
    let answer = get(a.outbound, "/status/500").await;
    assert_eq!((answer.status.as_u16(), answer.attempts()), (500, 1));

    let metrics = scrape(a.admin).await;
    let retried = [("service", "web"), ("reason", "503")];
    assert_eq!(
        metric_value(&metrics, "trellis_retries_total", &retried),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_post_is_not_retried_unless_the_route_allows_it() {
    let mesh = Mesh::new();
    let web = web(&mesh, &["web"]).await;
    let allowed = RetriesConfig {
        allow_non_idempotent: true,
        ..retries(3)
    };
    let a = caller(
        &mesh,
        &web,
        vec![
            route("keyed", with_header("idempotency-key"), allowed),
            route("all", Default::default(), retries(3)),
        ],
    );
    let faults = &web.faults[0];

    faults.fail_next.store(2, Ordering::SeqCst);
    let answer = send(a.outbound, Method::POST, "/echo", &[], full("pay 10")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.attempts(), 1);
    assert_eq!(faults.requests(), 1, "a POST is sent once");

    // PATCH neither; PUT is idempotent and is retried.
    faults.fail_next.store(1, Ordering::SeqCst);
    let answer = send(a.outbound, Method::PATCH, "/echo", &[], full("x")).await;
    assert_eq!((answer.status.as_u16(), answer.attempts()), (503, 1));
    faults.fail_next.store(1, Ordering::SeqCst);
    let answer = send(a.outbound, Method::PUT, "/echo", &[], full("put")).await;
    assert_eq!((answer.status.as_u16(), answer.attempts()), (200, 2));
    assert_eq!(answer.body, "put");

    // The keyed route allows it: the same failure, then the body arrives whole.
    faults.fail_next.store(2, Ordering::SeqCst);
    let before = faults.requests();
    let key = [("idempotency-key", "k-1")];
    let answer = send(a.outbound, Method::POST, "/echo", &key, full("pay 10")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.attempts(), 3);
    assert_eq!(answer.body, "pay 10");
    assert_eq!(faults.requests() - before, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_replayed_intact_or_sent_once() {
    let mesh = Mesh::new();
    let web = web(&mesh, &["web"]).await;
    let allowed = RetriesConfig {
        allow_non_idempotent: true,
        ..retries(3)
    };
    let a = caller(&mesh, &web, vec![route("all", Default::default(), allowed)]);
    let faults = &web.faults[0];
    let pattern = |n: usize| -> Vec<u8> { (0..n).map(|i| (i % 251) as u8).collect() };

    // With a Content-Length, just under the 64 KiB limit.
    let body = pattern(64 * 1024 - 1);
    faults.fail_next.store(2, Ordering::SeqCst);
    let answer = send(a.outbound, Method::POST, "/echo", &[], full(body.clone())).await;
    assert_eq!((answer.status, answer.attempts()), (StatusCode::OK, 3));
    assert!(answer.body == body, "the replayed body differs");

    // Chunked, no length given: kept as it streams.
    let body = pattern(40 * 1024);
    let pieces = body.chunks(7000).map(Bytes::copy_from_slice).collect();
    faults.fail_next.store(2, Ordering::SeqCst);
    let answer = send(a.outbound, Method::POST, "/echo", &[], streamed(pieces)).await;
    assert_eq!((answer.status, answer.attempts()), (StatusCode::OK, 3));
    assert!(answer.body == body, "the replayed chunked body differs");

    // Over the limit by its Content-Length: sent once, and whole.
    let big = pattern(256 * 1024);
    faults.fail_next.store(1, Ordering::SeqCst);
    let before = faults.requests();
    let answer = send(a.outbound, Method::POST, "/echo", &[], full(big.clone())).await;
    // The app answers 503 without reading the body; the receiving sidecar may see
    // that as the app dropping the request (502 app-unavailable) when the app closes
    // the connection while the body is still being written. Either way: one try.
    assert!(
        [502, 503].contains(&answer.status.as_u16()),
        "{} {}",
        answer.status,
        answer.text()
    );
    assert_eq!(answer.attempts(), 1);
    assert_eq!(faults.requests() - before, 1);
    let answer = send(a.outbound, Method::POST, "/echo", &[], full(big.clone())).await;
    assert_eq!((answer.status, answer.attempts()), (StatusCode::OK, 1));
    assert!(answer.body == big, "the large body differs");

    // Over the limit only as it streams: it outgrows the buffer on the first try and
    // goes through whole; a failure would have been returned rather than retried.
    let pieces = big.chunks(16 * 1024).map(Bytes::copy_from_slice).collect();
    let answer = send(a.outbound, Method::POST, "/echo", &[], streamed(pieces)).await;
    assert_eq!((answer.status, answer.attempts()), (StatusCode::OK, 1));
    assert!(answer.body == big, "the large chunked body differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget_while_a_backend_fails() {
    let mesh = Mesh::new();
    let web = web(&mesh, &["web"]).await;
    // No retryBudget: the default, ratio 0.2 plus 10 retries a second over 10 s.
    let a = caller(
        &mesh,
        &web,
        vec![route("all", Default::default(), retries(3))],
    );
    let faults = web.faults[0].clone();
    faults.failing.store(true, Ordering::SeqCst);

    let (clients, per_client) = (3u32, 100u32);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let outbound = a.outbound;
            tokio::spawn(async move {
                let mut tries = 0;
                for _ in 0..per_client {
                    let answer = get(outbound, "/").await;
                    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
                    tries += answer.attempts();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tries
            })
        })
        .collect();
    let mut tries = 0;
    for task in tasks {
        tries += task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let requests = clients * per_client;

    let retries = faults.requests() - u64::from(requests);
    assert_eq!(u64::from(tries), faults.requests(), "attempts add up");
    // Each window of 10 s allows 0.2 x its requests + 10/s x 10 s.
    let windows = (elapsed.as_secs_f64() / 10.0).floor() + 1.0;
    let bound = 0.2 * f64::from(requests) + 100.0 * windows;
    assert!(
        retries as f64 <= bound,
        "{retries} retries for {requests} requests in {elapsed:?}, at most {bound} allowed"
    );
    // Unbounded, every request would have been tried 3 times (600 retries); the
    // budget's floor alone allows 100.
    assert!(retries >= 100, "{retries} retries");

    let metrics = scrape(a.admin).await;
    assert_eq!(
        metric_value(&metrics, "trellis_retries_total", &[("service", "web")]),
        retries as f64
    );
    let exhausted = metric_value(
        &metrics,
        "trellis_retry_budget_exhausted_total",
        &[("service", "web")],
    );
    assert!(exhausted > 0.0, "the budget ran out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_moves_a_slow_try_to_another_endpoint() {
    let mesh = Mesh::new();
    let web = web(&mesh, &["slow", "fast"]).await;
    web.faults[0].delay_ms.store(5000, Ordering::SeqCst);
    // Slower than an endpoint P2C has not measured yet (1 ms), so the slow one is
    // drawn first within two requests, whatever the first draw.
    web.faults[1].delay_ms.store(20, Ordering::SeqCst);
    let a = caller(
        &mesh,
        &web,
        vec![RouteConfig {
            timeout: Some("10s".into()),
            ..route(
                "all",
                Default::default(),
                RetriesConfig {
                    // Roomy for a loaded CI machine; a third try covers a fast try
                    // that was slowed by its first mTLS handshake.
                    per_try_timeout: Some("500ms".into()),
                    ..retries(3)
                },
            )
        }],
    );

    let (mut moved, mut retried) = (0, 0);
    for _ in 0..4 {
        let started = Instant::now();
        let answer = get(a.outbound, "/").await;
        let took = started.elapsed();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.header("x-app-name"), "fast");
        assert!(took < Duration::from_secs(3), "answered after {took:?}");
        if answer.attempts() > 1 {
            moved += 1;
            retried += answer.attempts() - 1;
            assert!(
                took >= Duration::from_millis(500),
                "answered after {took:?}"
            );
        }
    }
    assert!(moved >= 1, "no try went to the slow endpoint first");
    let metrics = scrape(a.admin).await;
    let timed_out = [("service", "web"), ("reason", "per-try-timeout")];
    assert_eq!(
        metric_value(&metrics, "trellis_retries_total", &timed_out),
        f64::from(retried)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_timeout_bounds_all_tries_and_pauses() {
    let mesh = Mesh::new();
    let web = web(&mesh, &["slow"]).await;
    web.faults[0].delay_ms.store(1000, Ordering::SeqCst);
    let timed = |name: &str, prefix: &str, retries: RetriesConfig| RouteConfig {
        timeout: Some("100ms".into()),
        ..route(
            name,
            RouteMatchConfig {
                path_prefix: Some(prefix.into()),
                ..Default::default()
            },
            retries,
        )
    };
    let a = caller(
        &mesh,
        &web,
        vec![
            timed("whole", "/whole", retries(3)),
            timed(
                "tries",
                "/tries",
                RetriesConfig {
                    per_try_timeout: Some("30ms".into()),
                    ..retries(5)
                },
            ),
        ],
    );
    // The first request also sets up the mTLS connection; the deadline covers that
    // too, but the measurement below should not depend on it.
    let _ = get(a.outbound, "/whole").await;

    for (path, min_tries) in [("/whole", 1), ("/tries", 2)] {
        // Every answer comes at the deadline, never before it and long before the
        // backend's 1 s; the quickest of three (other tests share the two cores)
        // within 50 ms of it.
        let mut quickest = Duration::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            let answer = get(a.outbound, path).await;
            let took = started.elapsed();
            assert_eq!(
                answer.status,
                StatusCode::GATEWAY_TIMEOUT,
                "{}",
                answer.text()
            );
            assert_eq!(answer.header("x-trellis-error"), "timeout");
            assert!(
                answer.text().contains("100ms timeout of route"),
                "{}",
                answer.text()
            );
            assert!(
                answer.attempts() >= min_tries,
                "{path}: {}",
                answer.attempts()
            );
            assert!(
                took >= Duration::from_millis(100) && took < Duration::from_millis(500),
                "{path}: answered after {took:?}"
            );
            quickest = quickest.min(took);
        }
        assert!(
            quickest < Duration::from_millis(150),
            "{path}: answered after {quickest:?} at best"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_grpc_and_upgrades_pass_a_route_with_retries() {
    let mesh = Mesh::new();
    let grpc = apps::grpc_app().await;
    let inventory = mesh.sidecar(SidecarSpec::new("inventory", grpc));
    let (http_app, _) = apps::http_app("web", Duration::ZERO).await;
    let web = mesh.sidecar(SidecarSpec::new("web", http_app));
    let everything = RetriesConfig {
        allow_non_idempotent: true,
        on: vec!["5xx".into(), "reset".into()],
        ..retries(3)
    };
    let with_retries = |sidecar: &Sidecar| ServiceConfig {
        endpoints: vec![sidecar.endpoint()],
        routes: vec![route("all", Default::default(), everything.clone())],
        ..ServiceConfig::default()
    };
    let a = mesh.sidecar(
        SidecarSpec::new("a", NO_APP.parse().unwrap())
            .service("inventory", with_retries(&inventory))
            .service("web", with_retries(&web)),
    );

    // A bidirectional stream: each reply comes before the next message is sent, so
    // nothing may wait for the request body to end.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", a.outbound))
        .unwrap()
        .origin("http://inventory".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut client = EchoClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let response = within(
        "chat",
        client.chat(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap();
    assert_eq!(response.metadata().get("x-trellis-attempts").unwrap(), "1");
    let mut replies = response.into_inner();
    // Past the 64 KiB kept for replay, too.
    let long = "x".repeat(30 * 1024);
    for i in 0..5 {
        let text = format!("m{i} {long}");
        tx.send(Message { text: text.clone() }).await.unwrap();
        let reply = within("reply", replies.message()).await.unwrap().unwrap();
        assert_eq!(reply.text, format!("echo: {text}"));
    }
    drop(tx);
    assert!(within("end", replies.message()).await.unwrap().is_none());

    // An upgrade is one try, and still switches.
    let tcp = tokio::net::TcpStream::connect(a.outbound).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let request = Request::get("/socket")
        .header(header::HOST, "web")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "echo")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = within("upgrade", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(response.headers()["x-trellis-attempts"], "1");
    let upgraded = within("upgraded", hyper::upgrade::on(response))
        .await
        .unwrap();
    let mut io = TokioIo::new(upgraded);
    io.write_all(b"frame").await.unwrap();
    let mut back = [0u8; 5];
    within("echo", io.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"frame");
}
