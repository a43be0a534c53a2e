//! Routes, subsets and timeouts on the outbound side, and authorization on the
//! inbound side, across real sidecar processes.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_api::config::{
    AllowConfig, AuthorizationDefault, BackendConfig, HeaderMatchConfig, InboundConfig, MtlsMode,
    OperationConfig, RouteConfig, RouteMatchConfig, ServiceConfig, SourceConfig,
};
use trellis_tests::{
    apps,
    client::{Answer, call, get},
    mesh::{Mesh, Sidecar, SidecarSpec, admin_get, metric_value, scrape, workload_id},
    within,
};

const NO_APP: &str = "127.0.0.1:9";

fn subset(name: &str, weight: u32) -> BackendConfig {
    BackendConfig {
        service: None,
        subset: Some(name.into()),
        weight,
    }
}

fn rule(name: &str, matches: RouteMatchConfig, backends: Vec<BackendConfig>) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        matches,
        backends,
        timeout: None,
        retries: None,
        bulkhead: None,
        fault: None,
        mirror: None,
    }
}

/// Service `web` with one instance per version, `v1` and `v2`, each its own sidecar;
/// the subsets select them by the `version` label, and `v3` selects nothing.
struct Versions {
    _apps: Vec<Sidecar>,
    web: ServiceConfig,
}

async fn versions(mesh: &Mesh) -> Versions {
    let mut sidecars = Vec::new();
    let mut endpoints = Vec::new();
    for version in ["v1", "v2"] {
        let (app, _) = apps::http_app(version, Duration::ZERO).await;
        let sidecar = mesh.sidecar(SidecarSpec::new("web", app));
        endpoints.push(sidecar.labeled(&[("version", version), ("tier", "web")]));
        sidecars.push(sidecar);
    }
    let selector = |version: &str| BTreeMap::from([("version".to_string(), version.to_string())]);
    let web = ServiceConfig {
        endpoints,
        subsets: ["v1", "v2", "v3"]
            .into_iter()
            .map(|v| (v.to_string(), selector(v)))
            .collect(),
        ..ServiceConfig::default()
    };
    Versions {
        _apps: sidecars,
        web,
    }
}

fn caller(mesh: &Mesh, web: ServiceConfig, routes: Vec<RouteConfig>) -> Sidecar {
    let web = ServiceConfig { routes, ..web };
    mesh.sidecar(SidecarSpec::new("a", NO_APP.parse().unwrap()).service("web", web))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_between_subsets_follows_the_weights() {
    let mesh = Mesh::new();
    let versions = versions(&mesh).await;
    let a = caller(
        &mesh,
        versions.web.clone(),
        vec![rule(
            "split",
            RouteMatchConfig::default(),
            vec![subset("v1", 80), subset("v2", 20)],
        )],
    );
    let total = 400;
    let mut to_v2 = 0;
    for _ in 0..total {
        if get(a.outbound, "web", "/").await.app() == "v2" {
            to_v2 += 1;
        }
    }
    // 80 expected, with a standard deviation of 8: five of them either side.
    assert!(
        (40..=120).contains(&to_v2),
        "{to_v2} of {total} went to v2, 80 expected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_match_sends_canary_requests_to_v2() {
    let mesh = Mesh::new();
    let versions = versions(&mesh).await;
    let canary = RouteMatchConfig {
        headers: vec![HeaderMatchConfig {
            name: "x-canary".into(),
            exact: Some("true".into()),
            prefix: None,
            regex: None,
        }],
        ..Default::default()
    };
    let a = caller(
        &mesh,
        versions.web.clone(),
        vec![
            rule("canary", canary, vec![subset("v2", 1)]),
            rule("stable", RouteMatchConfig::default(), vec![subset("v1", 1)]),
        ],
    );
    for _ in 0..30 {
        let canary = call(a.outbound, "web", Method::GET, "/", &[("x-canary", "true")]).await;
        assert_eq!(canary.app(), "v2");
        let stable = call(a.outbound, "web", Method::GET, "/", &[("x-canary", "no")]).await;
        assert_eq!(stable.app(), "v1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_prefixes_and_methods_pick_the_route() {
    let mesh = Mesh::new();
    let versions = versions(&mesh).await;
    let a = caller(
        &mesh,
        versions.web.clone(),
        vec![
            rule(
                "api",
                RouteMatchConfig {
                    path_prefix: Some("/api/".into()),
                    ..Default::default()
                },
                vec![subset("v2", 1)],
            ),
            rule(
                "deletes",
                RouteMatchConfig {
                    method: Some("DELETE".into()),
                    ..Default::default()
                },
                vec![subset("v2", 1)],
            ),
            rule("rest", RouteMatchConfig::default(), vec![subset("v1", 1)]),
        ],
    );
    for _ in 0..10 {
        assert_eq!(get(a.outbound, "web", "/api/orders?id=1").await.app(), "v2");
        assert_eq!(get(a.outbound, "web", "/apiary").await.app(), "v1");
        assert_eq!(get(a.outbound, "web", "/").await.app(), "v1");
        let delete = call(a.outbound, "web", Method::DELETE, "/x", &[]).await;
        assert_eq!(delete.app(), "v2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_can_name_another_service() {
    let mesh = Mesh::new();
    let versions = versions(&mesh).await;
    let (next_app, _) = apps::http_app("next", Duration::ZERO).await;
    let next = mesh.sidecar(SidecarSpec::new("web-next", next_app));
    let web = ServiceConfig {
        routes: vec![rule(
            "to-next",
            RouteMatchConfig {
                path_prefix: Some("/new/".into()),
                ..Default::default()
            },
            vec![BackendConfig {
                service: Some("web-next".into()),
                subset: None,
                weight: 1,
            }],
        )],
        ..versions.web.clone()
    };
    let a = mesh.sidecar(
        SidecarSpec::new("a", NO_APP.parse().unwrap())
            .service("web", web)
            .to("web-next", vec![next.endpoint()]),
    );
    let moved = get(a.outbound, "web", "/new/page").await;
    assert_eq!(moved.app(), "next");
    // The request keeps the authority it was sent with, and the caller's identity.
    assert_eq!(moved.header("x-app-host"), "web");
    assert_eq!(moved.header("x-app-peer-id"), workload_id("a"));
    let stayed = get(a.outbound, "web", "/old/page").await;
    assert!(["v1", "v2"].contains(&stayed.app()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_subset_is_a_503_that_names_it() {
    let mesh = Mesh::new();
    let versions = versions(&mesh).await;
    let a = caller(
        &mesh,
        versions.web.clone(),
        vec![rule(
            "v3",
            RouteMatchConfig::default(),
            vec![subset("v3", 1)],
        )],
    );
    let answer = get(a.outbound, "web", "/").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header("x-trellis-error"), "no-endpoints");
    assert!(
        answer.body.contains("\"v3\"") && answer.body.contains("\"web\""),
        "{}",
        answer.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_answers_504_long_before_the_slow_app() {
    let mesh = Mesh::new();
    let app_delay = Duration::from_millis(1500);
    let (slow_app, _) = apps::http_app("slow", app_delay).await;
    let slow = mesh.sidecar(SidecarSpec::new("slow", slow_app));
    let service = ServiceConfig {
        endpoints: vec![slow.endpoint()],
        routes: vec![RouteConfig {
            timeout: Some("200ms".into()),
            ..rule(
                "impatient",
                RouteMatchConfig {
                    path_prefix: Some("/impatient".into()),
                    ..Default::default()
                },
                vec![],
            )
        }],
        ..ServiceConfig::default()
    };
    let a = mesh.sidecar(SidecarSpec::new("a", NO_APP.parse().unwrap()).service("slow", service));

    let started = Instant::now();
    let answer = get(a.outbound, "slow", "/impatient").await;
    let took = started.elapsed();
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.body
    );
    assert_eq!(answer.header("x-trellis-error"), "timeout");
    assert!(answer.body.contains("200ms"), "{}", answer.body);
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(1000),
        "answered after {took:?}"
    );

    // A request no timed route matches waits for the app.
    let started = Instant::now();
    let patient = get(a.outbound, "slow", "/patient").await;
    assert_eq!(patient.app(), "slow");
    assert!(started.elapsed() >= app_delay);
}

// === authorization ===

/// App `b` behind a sidecar with `inbound` rules, in PERMISSIVE mode so a plaintext
/// caller can be tried too.
async fn guarded(mesh: &Mesh, inbound: InboundConfig) -> Sidecar {
    let (app, _) = apps::http_app("b", Duration::ZERO).await;
    let mut spec = SidecarSpec::new("b", app).inbound(inbound);
    spec.mtls = MtlsMode::Permissive;
    mesh.sidecar(spec)
}

/// A caller of `b` with the SPIFFE id `id`.
fn caller_of(mesh: &Mesh, b: &Sidecar, name: &str, id: &str) -> Sidecar {
    let spec = SidecarSpec::new(name, NO_APP.parse().unwrap()).to("b", vec![b.endpoint()]);
    mesh.sidecar_with_identity(spec, id)
}

fn from_identity(id: &str) -> SourceConfig {
    SourceConfig {
        identity: Some(id.into()),
        namespace: None,
    }
}

fn allow(from: Vec<SourceConfig>, to: Vec<OperationConfig>) -> InboundConfig {
    InboundConfig {
        default: AuthorizationDefault::Allow,
        allow: vec![AllowConfig { from, to }],
        rate_limit: None,
    }
}

fn assert_denied(answer: &Answer, caller: &str) {
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.body);
    assert_eq!(answer.header("x-trellis-error"), "unauthorized");
    assert!(
        answer.body.contains(caller) && answer.body.contains("\"b\""),
        "the body names the caller and the service: {}",
        answer.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_allowed_identity_reaches_the_app() {
    let mesh = Mesh::new();
    let b = guarded(&mesh, allow(vec![from_identity(&workload_id("a"))], vec![])).await;
    let a = caller_of(&mesh, &b, "a", &workload_id("a"));
    let c = caller_of(&mesh, &b, "c", &workload_id("c"));

    assert_eq!(get(a.outbound, "b", "/").await.app(), "b");
    assert_denied(&get(c.outbound, "b", "/").await, &workload_id("c"));
    // Without mTLS there is no identity for a rule to match.
    assert_denied(&get(b.inbound, "b", "/").await, "unauthenticated");

    let metrics = scrape(b.admin).await;
    assert_eq!(
        metric_value(
            &metrics,
            "trellis_authz_decisions_total",
            &[("service", "b"), ("decision", "deny")]
        ),
        2.0
    );
    let requests = [("direction", "inbound"), ("code", "403")];
    assert_eq!(
        metric_value(&metrics, "trellis_requests_total", &requests),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_rule_admits_every_identity_of_the_namespace() {
    let mesh = Mesh::new();
    let shop = SourceConfig {
        identity: None,
        namespace: Some("shop".into()),
    };
    let b = guarded(&mesh, allow(vec![shop], vec![])).await;
    let cart = "spiffe://cluster.local/ns/shop/sa/cart";
    let in_shop = caller_of(&mesh, &b, "cart", cart);
    let outside = caller_of(&mesh, &b, "a", &workload_id("a"));

    let answer = get(in_shop.outbound, "b", "/").await;
    assert_eq!(answer.app(), "b");
    assert_eq!(answer.header("x-app-peer-id"), cart);
    assert_denied(&get(outside.outbound, "b", "/").await, &workload_id("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_and_paths_restrict_what_a_caller_may_do() {
    let mesh = Mesh::new();
    let operation = |methods: &[&str], paths: &[&str]| OperationConfig {
        methods: methods.iter().map(|m| m.to_string()).collect(),
        paths: paths.iter().map(|p| p.to_string()).collect(),
    };
    let b = guarded(
        &mesh,
        allow(
            vec![from_identity(&workload_id("a"))],
            vec![
                operation(&["GET"], &["/status/*", "/"]),
                operation(&["POST"], &["/echo"]),
            ],
        ),
    )
    .await;
    let a = caller_of(&mesh, &b, "a", &workload_id("a"));
    let id = workload_id("a");

    assert_eq!(get(a.outbound, "b", "/").await.app(), "b");
    assert_eq!(
        get(a.outbound, "b", "/status/204").await.status,
        StatusCode::NO_CONTENT
    );
    let posted = call(a.outbound, "b", Method::POST, "/echo", &[]).await;
    assert_eq!(posted.status, StatusCode::OK);
    for (method, path) in [
        (Method::GET, "/echo"),
        (Method::DELETE, "/status/204"),
        (Method::POST, "/echo/more"),
        (Method::GET, "/status/..%2fadmin"),
        (Method::GET, "/status/../admin"),
    ] {
        let answer = call(a.outbound, "b", method.clone(), path, &[]).await;
        assert_denied(&answer, &id);
        assert!(
            answer.body.contains(&format!("{method} {path}")),
            "{}",
            answer.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_deny_without_rules_refuses_everyone() {
    let mesh = Mesh::new();
    let b = guarded(
        &mesh,
        InboundConfig {
            default: AuthorizationDefault::Deny,
            allow: vec![],
            rate_limit: None,
        },
    )
    .await;
    let a = caller_of(&mesh, &b, "a", &workload_id("a"));
    let answer = get(a.outbound, "b", "/").await;
    assert_denied(&answer, &workload_id("a"));
    assert!(answer.body.contains("DENY"), "{}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_needs_a_rule_without_operations() {
    let mesh = Mesh::new();
    let echo = apps::tcp_echo().await;
    let inbound = InboundConfig {
        default: AuthorizationDefault::Allow,
        allow: vec![
            AllowConfig {
                from: vec![from_identity(&workload_id("a"))],
                to: vec![],
            },
            // A rule about methods cannot be checked on bytes: it admits no stream.
            AllowConfig {
                from: vec![from_identity(&workload_id("c"))],
                to: vec![OperationConfig {
                    methods: vec!["GET".into()],
                    paths: vec![],
                }],
            },
        ],
        rate_limit: None,
    };
    let mut spec = SidecarSpec::new("cache", echo).inbound(inbound);
    spec.app_protocol = "tcp";
    let cache = mesh.sidecar(spec);
    let tcp_caller = |name: &str| {
        let mut spec =
            SidecarSpec::new(name, NO_APP.parse().unwrap()).to("cache", vec![cache.endpoint()]);
        spec.tcp_outbound = vec!["cache".into()];
        mesh.sidecar(spec)
    };
    let a = tcp_caller("a");
    let c = tcp_caller("c");

    let mut allowed = tokio::net::TcpStream::connect(tcp_listener(&a).await)
        .await
        .unwrap();
    allowed.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    within("echo", allowed.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"ping");

    let mut refused = tokio::net::TcpStream::connect(tcp_listener(&c).await)
        .await
        .unwrap();
    // The write may or may not land before the close; the read is what tells.
    let _ = refused.write_all(b"ping").await;
    let mut answer = Vec::new();
    let _ = within("refusal", refused.read_to_end(&mut answer)).await;
    assert!(
        answer.is_empty(),
        "a denied stream was answered: {answer:?}"
    );
    let metrics = scrape(cache.admin).await;
    assert_eq!(
        metric_value(
            &metrics,
            "trellis_authz_decisions_total",
            &[("service", "cache"), ("decision", "deny")]
        ),
        1.0
    );
}

async fn tcp_listener(sidecar: &Sidecar) -> SocketAddr {
    let (_, config) = admin_get(sidecar.admin, "/config").await;
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["listeners"]["tcpOutbound"][0]["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}
