//! The circuit breaker across real sidecars: a failing endpoint is ejected, probed
//! and restored; when every endpoint is out the caller's sidecar answers at once
//! without connecting; `maxEjectionPercent` keeps some endpoints in rotation; and
//! `/config` and `/metrics` show it all.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use trellis_api::config::{
    BackendConfig, CircuitBreakerConfig, EndpointConfig, HeaderMatchConfig, RouteConfig,
    RouteMatchConfig, ServiceConfig,
};
use trellis_tests::{
    apps::{self, Faults},
    mesh::{Mesh, Sidecar, SidecarSpec, admin_get, http1_client, metric_value, scrape},
    within,
};

const NO_APP: &str = "127.0.0.1:9";
const APPS: [&str; 3] = ["w1", "w2", "w3"];

/// Three instances of `web`, each a faulty app behind its own sidecar, and a caller
/// whose sidecar routes `web` to them under `breaker`. A request with
/// `x-instance: w1` goes to w1 alone (a route to a one-endpoint subset), so a test
/// can reach one instance whatever P2C would prefer; the breaker still counts over
/// the whole service.
struct Web {
    caller: Sidecar,
    faults: Vec<Arc<Faults>>,
    endpoints: Vec<EndpointConfig>,
    _sidecars: Vec<Sidecar>,
}

async fn web(mesh: &Mesh, breaker: CircuitBreakerConfig) -> Web {
    let (mut sidecars, mut faults, mut endpoints) = (Vec::new(), Vec::new(), Vec::new());
    for name in APPS {
        let (app, app_faults) = apps::faulty_app(name).await;
        let sidecar = mesh.sidecar(SidecarSpec::new("web", app));
        endpoints.push(sidecar.labeled(&[("instance", name)]));
        sidecars.push(sidecar);
        faults.push(app_faults);
    }
    let pin = |name: &str| RouteConfig {
        name: format!("pin-{name}"),
        matches: RouteMatchConfig {
            headers: vec![HeaderMatchConfig {
                name: "x-instance".into(),
                exact: Some(name.into()),
                prefix: None,
                regex: None,
            }],
            ..RouteMatchConfig::default()
        },
        backends: vec![BackendConfig {
            service: None,
            subset: Some(name.into()),
            weight: 1,
        }],
        ..RouteConfig::default()
    };
    let service = ServiceConfig {
        endpoints: endpoints.clone(),
        subsets: APPS
            .iter()
            .map(|name| {
                (
                    name.to_string(),
                    [("instance".into(), name.to_string())].into(),
                )
            })
            .collect(),
        routes: APPS.iter().map(|name| pin(name)).collect(),
        circuit_breaker: Some(breaker),
        ..ServiceConfig::default()
    };
    let caller =
        mesh.sidecar(SidecarSpec::new("a", NO_APP.parse().unwrap()).service("web", service));
    Web {
        caller,
        faults,
        endpoints,
        _sidecars: sidecars,
    }
}

fn breaker(failures: u32, base: &str, percent: u32) -> CircuitBreakerConfig {
    CircuitBreakerConfig {
        consecutive_failures: failures,
        base_ejection_time: base.into(),
        max_ejection_time: "1m".into(),
        max_ejection_percent: percent,
    }
}

struct Answer {
    status: StatusCode,
    /// `x-trellis-error`, when the mesh answered.
    error: Option<String>,
    body: String,
    took: Duration,
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<bytes::Bytes>,
>;

async fn get(client: &Client, via: SocketAddr) -> Answer {
    send(client, via, None).await
}

/// GETs `web`, from `instance` alone when given.
async fn send(client: &Client, via: SocketAddr, instance: Option<&str>) -> Answer {
    let mut request = Request::get(format!("http://{via}/")).header(header::HOST, "web");
    if let Some(instance) = instance {
        request = request.header("x-instance", instance);
    }
    let request = request.body(Full::default()).unwrap();
    let start = Instant::now();
    let response = within("GET web", client.request(request)).await.unwrap();
    let took = start.elapsed();
    let (parts, body) = response.into_parts();
    let body = within("body", body.collect()).await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        error: parts
            .headers
            .get("x-trellis-error")
            .map(|v| v.to_str().unwrap().to_string()),
        body: String::from_utf8_lossy(&body).into_owned(),
        took,
    }
}

impl Web {
    fn requests(&self) -> Vec<u64> {
        self.faults.iter().map(|f| f.requests()).collect()
    }

    fn fail(&self, app: usize, failing: bool) {
        self.faults[app].failing.store(failing, Ordering::SeqCst);
    }

    /// What the caller's `/config` says about endpoint `app`.
    async fn view(&self, app: usize) -> serde_json::Value {
        let (status, body) = admin_get(self.caller.admin, "/config").await;
        assert_eq!(status, StatusCode::OK);
        let config: serde_json::Value = serde_json::from_str(&body).unwrap();
        let address = self.endpoints[app].address.to_string();
        config["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["service"] == "web" && e["address"] == address.as_str())
            .unwrap_or_else(|| panic!("no endpoint {address} in {body}"))
            .clone()
    }

    /// One request to instance `app` alone.
    async fn pinned(&self, client: &Client, app: usize) -> Answer {
        send(client, self.caller.outbound, Some(APPS[app])).await
    }

    /// Waits (polling `/config`) until endpoint `app`'s ejection time is over.
    async fn until_half_open(&self, app: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.view(app).await["halfOpen"] != true {
            assert!(Instant::now() < deadline, "{} never half-open", APPS[app]);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metric(&self, name: &str, app: usize) -> f64 {
        let address = self.endpoints[app].address.to_string();
        let labels = [("service", "web"), ("endpoint", address.as_str())];
        metric_value(&scrape(self.caller.admin).await, name, &labels)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_probed_and_restored() {
    let mesh = Mesh::new();
    let mut web = web(&mesh, breaker(3, "1s", 100)).await;
    let client = http1_client();
    web.fail(0, true);

    // Its three failures in a row reach the client (no retries here)...
    for _ in 0..3 {
        let answer = web.pinned(&client, 0).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.error, None, "the app answered: {}", answer.body);
    }
    let ejected_by = Instant::now();
    assert_eq!(web.faults[0].requests(), 3);
    // ...then nothing reaches it for the whole ejection: requests for it alone are
    // refused by the caller's sidecar, and the others serve the rest.
    let others = web.requests()[1] + web.requests()[2];
    let mut served = 0;
    while ejected_by.elapsed() < Duration::from_millis(700) {
        let refused = web.pinned(&client, 0).await;
        assert_eq!(
            refused.error.as_deref(),
            Some("circuit-open"),
            "{}",
            refused.body
        );
        assert!(
            refused.body.contains("subset \"w1\" of service \"web\""),
            "{}",
            refused.body
        );
        let answer = get(&client, web.caller.outbound).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        served += 1;
    }
    assert_eq!(
        web.faults[0].requests(),
        3,
        "no request reaches an ejected endpoint"
    );
    assert_eq!(web.requests()[1] + web.requests()[2], others + served);
    assert!(served >= 10, "only {served} requests in 700 ms");

    let view = web.view(0).await;
    assert_eq!(view["ejected"], true, "{view}");
    assert_eq!(view["halfOpen"], false, "{view}");
    assert_eq!(view["consecutiveFailures"], 3, "{view}");
    assert_eq!(view["ejections"], 1, "{view}");
    assert!(
        view["ejectionRemainingMs"].as_f64().unwrap() > 0.0,
        "{view}"
    );
    assert!(view["ejectedUntil"].is_string(), "{view}");
    assert_eq!(web.view(1).await["ejected"], false);
    assert_eq!(web.metric("trellis_endpoint_ejected", 0).await, 1.0);
    assert_eq!(web.metric("trellis_endpoint_ejected", 1).await, 0.0);
    assert_eq!(web.metric("trellis_endpoint_ejections_total", 0).await, 1.0);
    let address = web.endpoints[0].address.to_string();
    let logged = web
        .caller
        .wait_for_log(|l| l["message"] == "endpoint ejected" && l["endpoint"] == address.as_str())
        .expect("the ejection is logged");
    assert_eq!(logged["service"], "web");

    // After the ejection one probe reaches it; still failing, it is out for twice as long.
    web.until_half_open(0).await;
    let probe = web.pinned(&client, 0).await;
    assert_eq!(
        (probe.status, probe.error),
        (StatusCode::SERVICE_UNAVAILABLE, None)
    );
    assert_eq!(web.faults[0].requests(), 4, "the probe");
    let view = web.view(0).await;
    assert_eq!(
        (&view["ejected"], &view["ejections"]),
        (&true.into(), &2.into()),
        "{view}"
    );
    let remaining = view["ejectionRemainingMs"].as_f64().unwrap();
    assert!(remaining > 1000.0 && remaining <= 2000.0, "{view}");
    for _ in 0..10 {
        let refused = web.pinned(&client, 0).await;
        assert_eq!(refused.error.as_deref(), Some("circuit-open"));
    }
    assert_eq!(web.faults[0].requests(), 4, "one probe, no more");

    // Recovered: the next probe succeeds and traffic comes back.
    web.fail(0, false);
    web.until_half_open(0).await;
    let probe = web.pinned(&client, 0).await;
    assert_eq!(probe.status, StatusCode::OK, "{}", probe.body);
    let view = web.view(0).await;
    assert_eq!(view["ejected"], false, "{view}");
    assert_eq!(view["consecutiveFailures"], 0, "{view}");
    assert_eq!(
        view["ejections"], 2,
        "remembered until it has served a while: {view}"
    );
    web.caller
        .wait_for_log(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("endpoint restored"))
                && l["endpoint"] == address.as_str()
        })
        .expect("the restoration is logged");
    for _ in 0..10 {
        let answer = web.pinned(&client, 0).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    assert_eq!(web.faults[0].requests(), 15);
    assert_eq!(web.metric("trellis_endpoint_ejected", 0).await, 0.0);
    assert_eq!(web.metric("trellis_endpoint_ejections_total", 0).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_endpoint_is_ejected_the_circuit_opens_and_answers_at_once() {
    let mesh = Mesh::new();
    let web = web(&mesh, breaker(2, "30s", 100)).await;
    let client = http1_client();
    for app in 0..APPS.len() {
        web.fail(app, true);
    }
    let mut opened = false;
    for _ in 0..300 {
        let answer = get(&client, web.caller.outbound).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        if answer.error.as_deref() == Some("circuit-open") {
            opened = true;
            break;
        }
    }
    assert!(opened, "the circuit never opened: {:?}", web.requests());
    assert_eq!(web.requests(), [2, 2, 2], "two failures each, then nothing");

    let mut took = Vec::new();
    for _ in 0..21 {
        let answer = get(&client, web.caller.outbound).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.error.as_deref(), Some("circuit-open"));
        assert!(
            answer.body.contains("service \"web\"") && answer.body.contains("circuit breaker"),
            "{}",
            answer.body
        );
        took.push(answer.took);
    }
    assert_eq!(
        web.requests(),
        [2, 2, 2],
        "no connect, no request to the apps"
    );
    took.sort();
    // The median round trip through the client and the sidecar, on a shared machine.
    assert!(took[10] < Duration::from_millis(10), "{took:?}");

    for app in 0..APPS.len() {
        assert_eq!(web.view(app).await["ejected"], true);
        assert_eq!(web.metric("trellis_endpoint_ejected", app).await, 1.0);
        assert_eq!(
            web.metric("trellis_endpoint_ejections_total", app).await,
            1.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_keeps_endpoints_in_rotation() {
    let mesh = Mesh::new();
    // 50% of 3 endpoints rounds down to 1.
    let mut web = web(&mesh, breaker(2, "30s", 50)).await;
    let client = http1_client();
    for app in 0..APPS.len() {
        web.fail(app, true);
    }
    for _ in 0..60 {
        let answer = get(&client, web.caller.outbound).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            answer.error, None,
            "the apps answer, not the mesh: {}",
            answer.body
        );
    }
    let mut ejected = Vec::new();
    for app in 0..APPS.len() {
        if web.view(app).await["ejected"] == true {
            ejected.push(app);
        }
    }
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    let out = ejected[0];

    let before = web.requests();
    for _ in 0..30 {
        get(&client, web.caller.outbound).await;
    }
    let after = web.requests();
    assert_eq!(after[out], before[out], "the ejected one gets nothing");
    let gained: u64 = (0..APPS.len()).map(|a| after[a] - before[a]).sum();
    assert_eq!(
        gained, 30,
        "the other two take everything: {before:?} -> {after:?}"
    );
    // P2C may starve the slower of the two, but at least one has failed often
    // enough to be ejected and is kept in by the cap alone.
    let mut failures = Vec::new();
    for app in (0..APPS.len()).filter(|a| *a != out) {
        let view = web.view(app).await;
        assert_eq!(view["ejected"], false, "{view}");
        failures.push(view["consecutiveFailures"].as_u64().unwrap());
    }
    assert!(failures.iter().any(|f| *f >= 2), "{failures:?}");

    let scraped = scrape(web.caller.admin).await;
    let web_labels = [("service", "web")];
    assert_eq!(
        metric_value(&scraped, "trellis_endpoint_ejected", &web_labels),
        1.0
    );
    assert_eq!(
        metric_value(&scraped, "trellis_endpoint_ejections_total", &web_labels),
        1.0
    );
    web.caller
        .wait_for_log(|l| l["message"] == "endpoint not ejected: maxEjectionPercent reached")
        .expect("the cap is logged");
}
