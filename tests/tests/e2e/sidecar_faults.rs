//! Fault injection across real sidecars: aborts answer a share of requests in the
//! caller's sidecar without reaching the app; delays hold requests before they go.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use trellis_api::config::{
    FaultAbortConfig, FaultConfig, FaultDelayConfig, HeaderMatchConfig, RouteConfig,
    RouteMatchConfig, ServiceConfig,
};
use trellis_tests::{
    apps::{self, Faults},
    client::{Answer, HttpClient, call_on},
    mesh::{Mesh, Sidecar, SidecarSpec, http1_client, metric_value, scrape},
};

const NO_APP: &str = "127.0.0.1:9";

/// GETs `/` of service `web` through the sidecar at `via`, with `chaos` as the
/// `x-chaos` header the routes below match on.
async fn call(client: &HttpClient, via: SocketAddr, chaos: &str) -> Answer {
    call_on(client, via, "web", Method::GET, "/", &[("x-chaos", chaos)]).await
}

fn chaos(name: &str, fault: FaultConfig, timeout: Option<&str>) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        matches: RouteMatchConfig {
            headers: vec![HeaderMatchConfig {
                name: "x-chaos".into(),
                exact: Some(name.into()),
                prefix: None,
                regex: None,
            }],
            ..RouteMatchConfig::default()
        },
        timeout: timeout.map(str::to_string),
        fault: Some(fault),
        ..RouteConfig::default()
    }
}

fn abort(status: u16, percent: f64) -> FaultConfig {
    FaultConfig {
        delay: None,
        abort: Some(FaultAbortConfig { status, percent }),
    }
}

fn delay(duration: &str, percent: f64) -> FaultConfig {
    FaultConfig {
        delay: Some(FaultDelayConfig {
            duration: duration.into(),
            percent,
        }),
        abort: None,
    }
}

/// App `web` that counts its requests, behind its sidecar, and a caller whose
/// routes of `web` inject `routes`' faults.
async fn web_with_faults(mesh: &Mesh, routes: Vec<RouteConfig>) -> (Sidecar, Sidecar, Arc<Faults>) {
    let (app, faults) = apps::faulty_app("web").await;
    let web = mesh.sidecar(SidecarSpec::new("web", app));
    let service = ServiceConfig {
        endpoints: vec![web.endpoint()],
        routes,
        ..ServiceConfig::default()
    };
    let a = mesh.sidecar(SidecarSpec::new("a", NO_APP.parse().unwrap()).service("web", service));
    (a, web, faults)
}

async fn injected(admin: SocketAddr, kind: &str) -> f64 {
    let labels = [("service", "web"), ("kind", kind)];
    metric_value(
        &scrape(admin).await,
        "trellis_faults_injected_total",
        &labels,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_answers_its_share_without_reaching_the_app() {
    let mesh = Mesh::new();
    let (a, _web, faults) = web_with_faults(
        &mesh,
        vec![
            chaos("some", abort(500, 30.0), None),
            chaos("all", abort(418, 100.0), None),
        ],
    )
    .await;
    let client = http1_client();

    // 2,000 requests from 8 callers at once; each is drawn on its own.
    let total = 2000;
    let callers = 8;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (client, via) = (client.clone(), a.outbound);
        tasks.spawn(async move {
            let (mut aborted, mut passed) = (0u64, 0u64);
            for _ in 0..total / callers {
                let answer = call(&client, via, "some").await;
                match (answer.status, answer.error(), answer.app()) {
                    (StatusCode::INTERNAL_SERVER_ERROR, "fault", "") => aborted += 1,
                    (StatusCode::OK, "", "web") => passed += 1,
                    _ => panic!("{} {:?} {}", answer.status, answer.headers, answer.body),
                }
            }
            (aborted, passed)
        });
    }
    let (mut aborted, mut passed) = (0, 0);
    while let Some(counts) = tasks.join_next().await {
        let (a, p) = counts.unwrap();
        aborted += a;
        passed += p;
    }
    assert_eq!(aborted + passed, total);
    // A binomial count: 600 expected, standard deviation sqrt(2000 x 0.3 x 0.7) = 20.5.
    // Four of them either side fails a correct sidecar about once in 16,000 runs.
    let (expected, sigma) = (600.0, (2000.0f64 * 0.3 * 0.7).sqrt());
    assert!(
        (aborted as f64 - expected).abs() <= 4.0 * sigma,
        "{aborted} of {total} aborted, {expected} expected"
    );
    assert_eq!(
        faults.requests(),
        passed,
        "an aborted request reached the app"
    );
    assert_eq!(injected(a.admin, "abort").await, aborted as f64);

    // All of them: the app sees none, and the answer says what happened.
    let before = faults.requests();
    for _ in 0..20 {
        let answer = call(&client, a.outbound, "all").await;
        assert_eq!(answer.status, StatusCode::IM_A_TEAPOT, "{}", answer.body);
        assert_eq!(answer.error(), "fault");
        assert!(
            answer.body.contains("\"all\"") && answer.body.contains("418"),
            "{}",
            answer.body
        );
    }
    assert_eq!(faults.requests(), before);
    assert_eq!(injected(a.admin, "delay").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_holds_requests_before_they_go() {
    let mesh = Mesh::new();
    let delay_for = Duration::from_millis(200);
    let (a, _web, faults) = web_with_faults(
        &mesh,
        vec![
            chaos("slow", delay("200ms", 100.0), None),
            // Longer than the route's timeout: the timeout answers, the app sees nothing.
            chaos("late", delay("5s", 100.0), Some("300ms")),
        ],
    )
    .await;
    let client = http1_client();

    for _ in 0..5 {
        let started = Instant::now();
        let answer = call(&client, a.outbound, "slow").await;
        let took = started.elapsed();
        assert_eq!(
            (answer.status, answer.app()),
            (StatusCode::OK, "web"),
            "{}",
            answer.body
        );
        assert!(took >= delay_for, "answered after {took:?}");
    }
    assert_eq!(faults.requests(), 5, "delayed requests still reach the app");
    assert_eq!(injected(a.admin, "delay").await, 5.0);

    let started = Instant::now();
    let answer = call(&client, a.outbound, "late").await;
    let took = started.elapsed();
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.body
    );
    assert_eq!(answer.error(), "timeout");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "answered after {took:?}"
    );
    assert_eq!(faults.requests(), 5, "the late request never left");

    // A request no faulty route matches is not delayed.
    let started = Instant::now();
    let answer = call(&client, a.outbound, "none").await;
    assert_eq!(answer.app(), "web");
    assert!(started.elapsed() < delay_for, "{:?}", started.elapsed());
}
