//! The sidecar seen by an operator: metrics that match the traffic, the admin
//! endpoints, access logs, and draining on SIGTERM or `POST /shutdown`.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use trellis_tests::{
    apps,
    mesh::{Mesh, SidecarSpec, admin_get, http1_client, metric_value, scrape, workload_id},
    within,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_requests_sent() {
    let mesh = Mesh::new();
    let (app, _) = apps::http_app("b", Duration::ZERO).await;
    let b = mesh.sidecar(SidecarSpec::new("b", app));
    let a = mesh
        .sidecar(SidecarSpec::new("a", "127.0.0.1:9".parse().unwrap()).to("b", vec![b.endpoint()]));
    let client = http1_client();
    for path in ["/", "/", "/", "/", "/", "/status/503", "/status/503"] {
        let request = Request::get(format!("http://{}{path}", a.outbound))
            .header(header::HOST, "b")
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = within(path, client.request(request)).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    let a_metrics = scrape(a.admin).await;
    let out = |code| {
        metric_value(
            &a_metrics,
            "trellis_requests_total",
            &[
                ("direction", "outbound"),
                ("service", "a"),
                ("peer_service", "b"),
                ("code", code),
            ],
        )
    };
    assert_eq!(out("200"), 5.0);
    assert_eq!(out("503"), 2.0);
    let histogram = metric_value(
        &a_metrics,
        "trellis_request_duration_seconds",
        &[("direction", "outbound"), ("peer_service", "b")],
    );
    assert_eq!(histogram, 7.0, "the +Inf bucket counts every request");

    let b_metrics = scrape(b.admin).await;
    let inbound = metric_value(
        &b_metrics,
        "trellis_requests_total",
        &[
            ("direction", "inbound"),
            ("service", "b"),
            ("peer_service", "a"),
        ],
    );
    assert_eq!(inbound, 7.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_access_log() {
    let mesh = Mesh::new();
    let (app, _) = apps::http_app("b", Duration::ZERO).await;
    let b = mesh.sidecar(SidecarSpec::new("b", app));
    let mut a = mesh
        .sidecar(SidecarSpec::new("a", "127.0.0.1:9".parse().unwrap()).to("b", vec![b.endpoint()]));

    assert_eq!(
        admin_get(a.admin, "/live").await,
        (StatusCode::OK, "live".into())
    );
    assert_eq!(
        admin_get(a.admin, "/ready").await,
        (StatusCode::OK, "ready".into())
    );
    assert_eq!(admin_get(a.admin, "/nope").await.0, StatusCode::NOT_FOUND);

    let (status, certs) = admin_get(a.admin, "/certs").await;
    assert_eq!(status, StatusCode::OK);
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(certs["id"], workload_id("a"));
    assert_eq!(certs["serial"].as_str().unwrap().len(), 32);
    assert_eq!(certs["chainLength"], 2);

    let (_, config) = admin_get(a.admin, "/config").await;
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["identity"], workload_id("a"));
    assert_eq!(config["config"]["version"], "test-1");
    assert_eq!(config["endpoints"][0]["address"], b.inbound.to_string());
    assert_eq!(config["endpoints"][0]["identity"], workload_id("b"));

    // One JSON access-log line per request, carrying the caller's x-request-id.
    let request = Request::get(format!("http://{}/status/201", a.outbound))
        .header(header::HOST, "b")
        .header("x-request-id", "req-42")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = within("request", http1_client().request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let line = a
        .wait_for_log(|l| l["target"] == "trellis::access" && l["request_id"] == "req-42")
        .expect("an access-log line for req-42");
    assert_eq!(line["direction"], "outbound");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["authority"], "b");
    assert_eq!(line["path"], "/status/201");
    assert_eq!(line["status"], 201);
    assert_eq!(line["peer_id"], workload_id("b"));
    assert!(line["duration_ms"].as_f64().unwrap() >= 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_slow_request_finish_then_exits_zero() {
    let mesh = Mesh::new();
    let (app, hold) = apps::http_app("b", Duration::ZERO).await;
    let mut b = mesh.sidecar(SidecarSpec::new("b", app));
    let a = mesh
        .sidecar(SidecarSpec::new("a", "127.0.0.1:9".parse().unwrap()).to("b", vec![b.endpoint()]));

    let request = Request::get(format!("http://{}/hold", a.outbound))
        .header(header::HOST, "b")
        .body(Full::<Bytes>::default())
        .unwrap();
    let in_flight = tokio::spawn(http1_client().request(request));
    within("the request reaches the app", hold.arrived()).await;

    b.signal("TERM");
    b.wait_for_log(|l| l["message"] == "draining")
        .expect("b starts draining");
    assert_eq!(
        admin_get(b.admin, "/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    hold.release();

    let response = within("the slow request", in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"released");
    let status = b.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_shutdown_drains_and_exits_zero() {
    let mesh = Mesh::new();
    let mut a = mesh.sidecar(SidecarSpec::new("a", "127.0.0.1:9".parse().unwrap()));
    let request = Request::post(format!("http://{}/shutdown", a.admin))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = within("shutdown", http1_client().request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(a.wait_exit(Duration::from_secs(15)).code(), Some(0));
}
