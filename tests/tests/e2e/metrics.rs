//! Metrics as an operator's tools read them: every kind of `/metrics` (sidecar,
//! gateway, control plane) passes `promtool check metrics` after real traffic, a real
//! Prometheus scraping a sidecar computes the request rate that was sent, and every
//! metric the Grafana dashboard queries exists in a real scrape and parses as PromQL.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use serde_json::Value;
use trellis_tests::{
    apps,
    client::call_on,
    control_plane::{ControlPlane, ControlPlaneSpec, MeshGateway, MeshSidecar, MeshSidecarSpec},
    mesh::{Mesh, SidecarSpec, admin_get, http1_client},
    prometheus::{Prometheus, promtool_check, sample_names},
};

const NOWHERE: &str = "127.0.0.1:9";

/// Everything that makes a metric family appear: subsets, a breaker, a bulkhead,
/// retries, a comparing mirror, a canary, and the gateway's route.
const RESOURCES: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: web}
spec:
  service: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  circuitBreaker: {consecutiveFailures: 2, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 100}
  bulkheads:
  - {name: default, maxConcurrentRequests: 64}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {name: web}
spec:
  service: web
  rules:
  - name: all
    backends: [{subset: v1}]
    retries: {attempts: 2, on: [5xx]}
    mirror: {subset: v2, percent: 100, compare: true}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {name: gateway}
spec:
  service: gateway
  rules:
  - name: web
    match: {pathPrefix: /}
    backends: [{service: web}]
---
apiVersion: trellis.dev/v1alpha1
kind: Canary
metadata: {name: web}
spec:
  service: web
  stableSubset: v1
  canarySubset: v2
  steps: [10, 50]
  interval: 1s
  analysis: {minSuccessRate: 50, maxP99Latency: 5s, minRequests: 100000}
"#;

/// The control plane, web v1 and v2, a caller and the gateway, after traffic through
/// each of them.
struct Busy {
    cp: ControlPlane,
    caller: MeshSidecar,
    web: Vec<MeshSidecar>,
    gateway: MeshGateway,
}

impl Busy {
    async fn start(dir: &std::path::Path) -> Self {
        let cp = ControlPlane::start(dir, &ControlPlaneSpec::default());
        let (status, answer) = cp.apply(RESOURCES).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let mut web = Vec::new();
        for version in ["v1", "v2"] {
            let (app, _) = apps::http_app(
                if version == "v1" { "web-v1" } else { "web-v2" },
                Duration::ZERO,
            )
            .await;
            web.push(
                cp.sidecar(MeshSidecarSpec::new("web", app).label("version", version))
                    .await,
            );
        }
        let caller = cp
            .sidecar(MeshSidecarSpec {
                report_interval: Some("200ms"),
                ..MeshSidecarSpec::new("caller", NOWHERE.parse().unwrap())
            })
            .await;
        let gateway = cp.gateway("gateway").await;
        cp.converged(4).await;

        let client = http1_client();
        for _ in 0..30 {
            let answer = call_on(&client, caller.outbound, "web", Method::GET, "/", &[]).await;
            assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
            let answer = call_on(
                &client,
                gateway.listen,
                "shop.example",
                Method::GET,
                "/",
                &[],
            )
            .await;
            assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        }
        // Failures: retried, then enough in a row to eject an endpoint.
        for _ in 0..3 {
            call_on(
                &client,
                caller.outbound,
                "web",
                Method::GET,
                "/status/503",
                &[],
            )
            .await;
        }
        let busy = Self {
            cp,
            caller,
            web,
            gateway,
        };
        // Comparisons settle after the answers; the canary's first analysis takes an
        // interval (too few requests: `waiting`, which still reports its numbers).
        busy.wait_for(busy.caller.admin, "trellis_shadow_comparisons_total")
            .await;
        busy.wait_for(busy.caller.admin, "trellis_endpoint_ejections_total")
            .await;
        busy.wait_for(busy.caller.admin, "trellis_retries_total")
            .await;
        busy.wait_for(busy.cp.admin, "trellis_canary_analysis_requests")
            .await;
        busy
    }

    async fn wait_for(&self, admin: SocketAddr, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, text) = admin_get(admin, "/metrics").await;
            if sample_names(&text).contains(name) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {name} on {admin} within 20 s:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Each kind of `/metrics`, by name.
    async fn scrapes(&self) -> Vec<(&'static str, SocketAddr, String)> {
        let mut scrapes = Vec::new();
        for (kind, admin) in [
            ("sidecar (caller)", self.caller.admin),
            ("sidecar (web v1)", self.web[0].admin),
            ("gateway", self.gateway.admin),
            ("control plane", self.cp.admin),
        ] {
            let (status, text) = admin_get(admin, "/metrics").await;
            assert_eq!(status, StatusCode::OK, "{kind}: {text}");
            scrapes.push((kind, admin, text));
        }
        scrapes
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_metrics_endpoint_passes_promtool_after_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let busy = Busy::start(dir.path()).await;
    for (kind, _, text) in busy.scrapes().await {
        let verdict = promtool_check(&text);
        assert!(
            verdict.success && verdict.problems.trim().is_empty(),
            "promtool check metrics on the {kind}'s /metrics:\n{}\n--- the scrape:\n{text}",
            verdict.problems
        );
        // Checked with what traffic brings, not an empty page.
        let names = sample_names(&text);
        let expected: &[&str] = match kind {
            "control plane" => &[
                "trellis_control_plane_config_pushes_total",
                "trellis_canary_weight_ratio",
            ],
            _ => &[
                "trellis_requests_total",
                "trellis_request_duration_seconds_bucket",
            ],
        };
        for name in expected {
            assert!(names.contains(*name), "{kind}: no {name} in\n{text}");
        }
        assert!(
            text.lines().any(|l| l.starts_with("trellis_build_info{")),
            "{kind}: no build info:\n{text}"
        );
    }
    let scrapes = busy.scrapes().await;
    let text_of = |kind: &str| &scrapes.iter().find(|(k, _, _)| *k == kind).unwrap().2;
    for (kind, component) in [
        ("sidecar (caller)", "sidecar"),
        ("gateway", "gateway"),
        ("control plane", "control-plane"),
    ] {
        let line = text_of(kind)
            .lines()
            .find(|l| l.starts_with("trellis_build_info{"))
            .unwrap()
            .to_string();
        assert!(
            line.contains(&format!("component=\"{component}\""))
                && line.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
                && line.ends_with(" 1"),
            "{kind}: {line}"
        );
    }
    // The sidecar runs the version the control plane last compiled.
    let proxies = busy.cp.proxies().await;
    let caller_version = proxies
        .iter()
        .find(|p| p["service"] == "caller")
        .and_then(|p| p["ackedVersion"].as_str())
        .unwrap()
        .to_string();
    assert!(
        text_of("sidecar (caller)").contains(&format!(
            "trellis_config_version_info{{version=\"{caller_version}\"}} 1"
        )),
        "{}",
        text_of("sidecar (caller)")
    );
    let (_, status) = busy.cp.call(Method::GET, "/v1/status", None).await;
    let compiled = status["compiledRevision"].as_u64().unwrap();
    assert!(
        text_of("control plane").contains(&format!(
            "trellis_control_plane_compiled_revision {compiled}\n"
        )),
        "{}",
        text_of("control plane")
    );
}

/// The dashboard the Helm chart ships to Grafana.
fn dashboard() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/trellis/dashboards/trellis-mesh.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

/// Every panel, those inside collapsed rows too.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        out.push(panel);
        if let Some(inner) = panel["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// The `trellis_*` metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("trellis_") {
        let preceded_by_ident = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        if !preceded_by_ident {
            names.insert(name.clone());
        }
        rest = &rest[at + name.len()..];
    }
    names
}

/// An expression as Grafana sends it, its template variables filled in.
fn as_sent(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("${service}", ".*")
        .replace("$service", ".*")
        .replace("${datasource}", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_in_a_real_scrape() {
    let dashboard = dashboard();
    // The shape Grafana's loader needs.
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let templates = dashboard["templating"]["list"].as_array().unwrap();
    let datasource = templates
        .iter()
        .find(|t| t["name"] == "datasource")
        .expect("a datasource template variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");

    let dir = tempfile::tempdir().unwrap();
    let busy = Busy::start(dir.path()).await;
    let scrapes = busy.scrapes().await;
    let scraped: BTreeSet<String> = scrapes
        .iter()
        .flat_map(|(_, _, text)| sample_names(text))
        .collect();
    let prometheus = Prometheus::start(
        &scrapes
            .iter()
            .map(|(_, admin, _)| *admin)
            .collect::<Vec<_>>(),
    )
    .await;

    let mut queries = Vec::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        if panel["type"] == "row" {
            continue;
        }
        for key in ["x", "y", "w", "h"] {
            assert!(
                panel["gridPos"][key].is_u64(),
                "panel {title:?} has no gridPos.{key}"
            );
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title:?} must query the chosen data source"
        );
        let targets = panel["targets"].as_array().unwrap_or_else(|| {
            panic!("panel {title:?} has no targets");
        });
        assert!(!targets.is_empty(), "panel {title:?} has no targets");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_else(|| {
                panic!("a target of {title:?} has no expr");
            });
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "{title:?}: {expr} reads no trellis metric"
            );
            for name in names {
                assert!(
                    scraped.contains(&name),
                    "panel {title:?} queries {name}, which no /metrics serves"
                );
            }
            // The real Prometheus parses it (a syntax error is a 400 with an error).
            prometheus.query(&as_sent(expr)).await;
            queries.push((title, expr));
        }
    }
    assert!(
        queries.len() >= 10,
        "only {} queries in the dashboard",
        queries.len()
    );

    // And once it has scraped twice, each panel shows a series: no label matcher
    // names a value the mesh never sends. The canary's analysis numbers are of its
    // latest interval, so traffic goes on meanwhile.
    let outbound = busy.caller.outbound;
    let traffic = tokio::spawn(async move {
        let client = http1_client();
        loop {
            call_on(&client, outbound, "web", Method::GET, "/", &[]).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    for (title, expr) in queries {
        loop {
            let series = prometheus.query(&as_sent(expr)).await;
            if !series.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "panel {title:?} shows nothing after traffic: {expr}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    traffic.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scraping_a_sidecar_sees_the_rate_sent() {
    const RATE: u64 = 50;
    let mesh = Mesh::new();
    let (app, _) = apps::http_app("b", Duration::ZERO).await;
    let b = mesh.sidecar(SidecarSpec::new("b", app));
    let a =
        mesh.sidecar(SidecarSpec::new("a", NOWHERE.parse().unwrap()).to("b", vec![b.endpoint()]));
    let prometheus = Prometheus::start(&[a.admin]).await;

    // A steady RATE requests a second, each on its own task so a slow answer does not
    // slow the sender.
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (sent, failed, outbound) = (sent.clone(), failed.clone(), a.outbound);
        tokio::spawn(async move {
            let client = http1_client();
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            loop {
                tick.tick().await;
                let (client, sent, failed) = (client.clone(), sent.clone(), failed.clone());
                tokio::spawn(async move {
                    let answer = call_on(&client, outbound, "b", Method::GET, "/", &[]).await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    if answer.status != StatusCode::OK {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        })
    };

    // rate() over a window that is still filling reads low: it is judged once 30 s
    // of samples are in, counted from Prometheus's first rate (its second scrape).
    let started = Instant::now();
    let mut filled = None;
    let deadline = started + Duration::from_secs(58);
    let mut seen = Vec::new();
    let measured = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let value = prometheus
            .query("sum(rate(trellis_requests_total[30s]))")
            .await
            .first()
            .copied();
        if let Some(value) = value {
            seen.push(value);
            let filled = *filled.get_or_insert_with(|| Instant::now() + Duration::from_secs(30));
            if Instant::now() >= filled && (value - RATE as f64).abs() <= RATE as f64 * 0.25 {
                break value;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw {RATE}/s ± 25%: {seen:?}"
        );
    };
    traffic.abort();
    let sent = sent.load(Ordering::Relaxed);
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    eprintln!(
        "sent {RATE}/s ({sent} requests in {:.1} s); Prometheus measured {measured:.2}/s; all reads: {seen:.1?}",
        started.elapsed().as_secs_f64()
    );
}
