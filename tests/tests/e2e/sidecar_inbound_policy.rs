//! Inbound policies pushed by the real control plane: the local rate limit (429 with
//! `retry-after`, the admitted rate held to the limit) and authorization that follows
//! every policy change on the connections already open.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use http::{Method, StatusCode, header};
use trellis_tests::{
    apps,
    client::Answer,
    control_plane::{ControlPlane, ControlPlaneSpec, MeshSidecarSpec},
};

const NOWHERE: &str = "127.0.0.1:9";

async fn get(outbound: SocketAddr, service: &str) -> Answer {
    trellis_tests::client::get(outbound, service, "/").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_rate_limit_gets_429s_and_the_admitted_rate_is_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let (status, answer) = cp
        .apply(
            "apiVersion: trellis.dev/v1alpha1\nkind: DestinationPolicy\nmetadata: {name: web}\n\
             spec:\n  service: web\n  rateLimit: {requestsPerSecond: 20, burst: 5}\n",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (app, _) = apps::http_app("web", Duration::ZERO).await;
    let _web = cp.sidecar(MeshSidecarSpec::new("web", app)).await;
    let a = cp
        .sidecar(MeshSidecarSpec::new("a", NOWHERE.parse().unwrap()))
        .await;
    cp.converged(2).await;

    // A burst: the bucket's 5, plus what refills while it runs, then 429s.
    let start = Instant::now();
    let mut admitted = 0u32;
    let mut refused = None;
    for _ in 0..30 {
        let response = get(a.outbound, "web").await;
        match response.status {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => refused = Some(response),
            other => panic!("unexpected {other}: {response:?}"),
        }
    }
    let refill = (start.elapsed().as_secs_f64() * 20.0).ceil() as u32;
    assert!(
        (5..=5 + refill).contains(&admitted),
        "{admitted} admitted of a burst of 30 (refill {refill})"
    );
    let refused = refused.expect("the burst was refused in part");
    assert_eq!(refused.error(), "rate-limited");
    let retry_after: u64 = refused.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "{retry_after}");

    // Steady pressure for 1.5 s: what gets through is the rate, not what is asked.
    let start = Instant::now();
    let (mut ok, mut asked) = (0u32, 0u32);
    while start.elapsed() < Duration::from_millis(1500) {
        asked += 1;
        if get(a.outbound, "web").await.status == StatusCode::OK {
            ok += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let ceiling = (5.0 + 20.0 * seconds).ceil() as u32 + 1;
    let floor = (20.0 * seconds * 0.8) as u32;
    assert!(asked > 3 * ceiling, "the test asked too little: {asked}");
    assert!(
        (floor..=ceiling).contains(&ok),
        "{ok} of {asked} admitted in {seconds:.2}s at 20/s (expected {floor}..={ceiling})"
    );
}

const ALLOW_A: &str = "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\n\
    metadata: {name: web}\nspec:\n  service: web\n  rules:\n  \
    - from: [{identity: \"spiffe://cluster.local/ns/default/sa/a\"}]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_follows_every_policy_change_on_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let (app, _) = apps::http_app("web", Duration::ZERO).await;
    let web = cp.sidecar(MeshSidecarSpec::new("web", app)).await;
    let a = cp
        .sidecar(MeshSidecarSpec::new("a", NOWHERE.parse().unwrap()))
        .await;
    let c = cp
        .sidecar(MeshSidecarSpec::new("c", NOWHERE.parse().unwrap()))
        .await;
    cp.converged(3).await;
    // No policy, mesh default allow-mesh: both in.
    assert_eq!(get(a.outbound, "web").await.status, StatusCode::OK);
    assert_eq!(get(c.outbound, "web").await.status, StatusCode::OK);

    let apply = |yaml: String| {
        let cp = &cp;
        async move {
            let (status, answer) = cp.apply(&yaml).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            cp.converged(3).await;
        }
    };
    apply(ALLOW_A.to_string()).await;
    assert_eq!(get(a.outbound, "web").await.status, StatusCode::OK);
    let refused = get(c.outbound, "web").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.error(), "unauthorized");
    let body = &refused.body;
    assert!(
        body.contains("spiffe://cluster.local/ns/default/sa/c"),
        "{body}"
    );

    // The same connections, the opposite answer.
    apply(ALLOW_A.replace("sa/a", "sa/c")).await;
    assert_eq!(get(a.outbound, "web").await.status, StatusCode::FORBIDDEN);
    assert_eq!(get(c.outbound, "web").await.status, StatusCode::OK);

    // No policy and a mesh that denies by default: nobody.
    let (status, _) = cp
        .call(
            Method::DELETE,
            "/v1/resources/authorizationpolicy/web",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    apply(
        "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\n\
         spec: {defaultAuthorization: deny}\n"
            .to_string(),
    )
    .await;
    assert_eq!(get(a.outbound, "web").await.status, StatusCode::FORBIDDEN);
    assert_eq!(get(c.outbound, "web").await.status, StatusCode::FORBIDDEN);

    let metrics = trellis_tests::mesh::scrape(web.admin).await;
    let decided = |decision| {
        trellis_tests::mesh::metric_value(
            &metrics,
            "trellis_authz_decisions_total",
            &[("service", "web"), ("decision", decision)],
        )
    };
    assert_eq!((decided("allow"), decided("deny")), (4.0, 4.0));
}
