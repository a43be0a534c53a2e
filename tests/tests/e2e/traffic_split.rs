//! Weighted splits and header matches with the real control plane and sidecars: the
//! share each subset gets is checked against a binomial bound, counted where the
//! requests land (the apps); a weight change under load fails nothing; and what the
//! caller's sidecar reports adds up, in `GET /v1/stats` and `trellisctl stat`, to what
//! the apps saw, failures, latency and requests the client gave up on included.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use serde_json::Value;
use trellis_tests::{
    apps::{self, Faults},
    client::call_on,
    control_plane::{ControlPlane, ControlPlaneSpec, MeshSidecar, MeshSidecarSpec, WEB_POLICY},
    mesh::http1_client,
};

const NOWHERE: &str = "127.0.0.1:9";

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficRoute\nmetadata: {{name: web}}\n\
         spec:\n  service: web\n  rules:\n  - name: split\n    backends:\n    \
         - {{subset: v1, weight: {v1}}}\n    - {{subset: v2, weight: {v2}}}\n"
    )
}

const TESTERS_TO_V2: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {name: web}
spec:
  service: web
  rules:
  - name: testers
    match:
      headers:
      - {name: x-canary, exact: "true"}
    backends:
    - {subset: v2, weight: 100}
  - name: everyone
    backends:
    - {subset: v1, weight: 100}
"#;

/// `web` v1 and v2 behind their sidecars, and a caller whose app sends from nowhere.
struct Mesh {
    cp: ControlPlane,
    v1: Arc<Faults>,
    v2: Arc<Faults>,
    caller: MeshSidecar,
    _web: Vec<MeshSidecar>,
}

impl Mesh {
    async fn start(dir: &Path, resources: &str, report_interval: Option<&'static str>) -> Self {
        let cp = ControlPlane::start(dir, &ControlPlaneSpec::default());
        let (status, answer) = cp.apply(resources).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let (v1_app, v1) = apps::faulty_app("web-v1").await;
        let (v2_app, v2) = apps::faulty_app("web-v2").await;
        let mut web = Vec::new();
        for (version, app) in [("v1", v1_app), ("v2", v2_app)] {
            web.push(
                cp.sidecar(MeshSidecarSpec::new("web", app).label("version", version))
                    .await,
            );
        }
        let caller = cp
            .sidecar(MeshSidecarSpec {
                report_interval,
                ..MeshSidecarSpec::new("caller", NOWHERE.parse().unwrap())
            })
            .await;
        cp.converged(3).await;
        Self {
            cp,
            v1,
            v2,
            caller,
            _web: web,
        }
    }

    /// Requests each app has received: (v1, v2).
    fn landed(&self) -> (u64, u64) {
        (self.v1.requests(), self.v2.requests())
    }

    /// Sends `n` GETs to `web`, a few at a time, and counts the answers that were not
    /// 200, all of which must be the apps' own 503s: (from v1, from v2).
    async fn send_counting_failures(&self, n: u64) -> (u64, u64) {
        const WORKERS: u64 = 8;
        let client = http1_client();
        let tasks: Vec<_> = (0..WORKERS)
            .map(|worker| {
                let (client, outbound) = (client.clone(), self.caller.outbound);
                tokio::spawn(async move {
                    let mut failed = (0, 0);
                    for _ in (worker..n).step_by(WORKERS as usize) {
                        let answer = call_on(&client, outbound, "web", Method::GET, "/", &[]).await;
                        match (answer.status, answer.app()) {
                            (StatusCode::OK, _) => {}
                            (StatusCode::SERVICE_UNAVAILABLE, "web-v1") => failed.0 += 1,
                            (StatusCode::SERVICE_UNAVAILABLE, "web-v2") => failed.1 += 1,
                            _ => panic!("neither an answer nor an app's failure: {answer:?}"),
                        }
                    }
                    failed
                })
            })
            .collect();
        let mut failed = (0, 0);
        for task in tasks {
            let (v1, v2) = task.await.unwrap();
            failed = (failed.0 + v1, failed.1 + v2);
        }
        failed
    }

    /// Sends `n` GETs to `web`, a few at a time; every one must be answered 200.
    async fn send(&self, n: u64) {
        const WORKERS: u64 = 8;
        let client = http1_client();
        let tasks: Vec<_> = (0..WORKERS)
            .map(|worker| {
                let (client, outbound) = (client.clone(), self.caller.outbound);
                tokio::spawn(async move {
                    for _ in (worker..n).step_by(WORKERS as usize) {
                        let answer = call_on(&client, outbound, "web", Method::GET, "/", &[]).await;
                        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }
}

/// `hits` of `n` draws of probability `p` lie within the two-sided 99.9% bound,
/// ±3.29 standard deviations of the binomial.
fn assert_binomial(what: &str, hits: u64, n: u64, p: f64) {
    let mean = n as f64 * p;
    let bound = 3.29 * (n as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (hits as f64 - mean).abs() <= bound,
        "{what}: {hits} of {n}, expected {mean:.0} ± {bound:.1}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_sends_v2_a_tenth_within_the_binomial_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(
        dir.path(),
        &format!("{WEB_POLICY}---\n{}", split(90, 10)),
        None,
    )
    .await;
    mesh.send(5000).await;
    let (v1, v2) = mesh.landed();
    assert_eq!(v1 + v2, 5000, "every request landed once: v1 {v1}, v2 {v2}");
    assert_binomial("v2 at 10%", v2, 5000, 0.1);
}

/// Load that runs until stopped, counting what did not come back 200.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(outbound: SocketAddr, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let client = http1_client();
        let tasks = (0..workers)
            .map(|_| {
                let (stop, sent, client) = (stop.clone(), sent.clone(), client.clone());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let answer = call_on(&client, outbound, "web", Method::GET, "/", &[]).await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        if answer.status != StatusCode::OK {
                            failures.push(format!("{} {:?}", answer.status, answer.body));
                        }
                        // Pacing, not waiting for anything: steady load that leaves the
                        // control plane and the other tests room on 2 cores.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    failures
                })
            })
            .collect();
        Self { stop, sent, tasks }
    }

    /// Stops and returns every failure seen.
    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for task in self.tasks {
            failures.extend(task.await.unwrap());
        }
        (self.sent.load(Ordering::Relaxed), failures)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_change_under_load_fails_no_request_and_the_new_split_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(
        dir.path(),
        &format!("{WEB_POLICY}---\n{}", split(90, 10)),
        None,
    )
    .await;
    let load = Load::start(mesh.caller.outbound, 4);
    // Some traffic on the old split first, so the change lands mid-stream.
    let deadline = Instant::now() + Duration::from_secs(20);
    while load.sent.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "the load does not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, answer) = mesh.cp.apply(&split(50, 50)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["changes"][0]["change"], "updated", "{answer}");
    mesh.cp.converged(3).await;

    // From here on every request is drawn 50/50.
    let (v1_before, v2_before) = mesh.landed();
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = 2000;
    while mesh.landed().0 + mesh.landed().1 < v1_before + v2_before + after {
        assert!(
            Instant::now() < deadline,
            "the load stalled after the change"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (sent, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed across the change: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let (v1, v2) = mesh.landed();
    assert_eq!(v1 + v2, sent, "every request landed once");
    let (dv1, dv2) = (v1 - v1_before, v2 - v2_before);
    assert_binomial("v2 at 50% after the change", dv2, dv1 + dv2, 0.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_match_sends_only_marked_requests_to_v2() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(
        dir.path(),
        &format!("{WEB_POLICY}---\n{TESTERS_TO_V2}"),
        None,
    )
    .await;
    let client = http1_client();
    let mut marked = 0;
    for i in 0..300 {
        let header: &[(&str, &str)] = match i % 3 {
            0 => &[("x-canary", "true")],
            1 => &[("x-canary", "false")],
            _ => &[],
        };
        let answer = call_on(
            &client,
            mesh.caller.outbound,
            "web",
            Method::GET,
            "/",
            header,
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        let expected = if i % 3 == 0 { "web-v2" } else { "web-v1" };
        assert_eq!(answer.app(), expected, "request {i} with {header:?}");
        marked += u64::from(i % 3 == 0);
    }
    assert_eq!(mesh.landed(), (300 - marked, marked));
}

/// `GET /v1/stats` for `web`, summed per backend over routes: (requests, successes).
fn per_backend(stats: &Value, backend: &str) -> (u64, u64) {
    stats["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["service"] == "web" && row["backend"] == backend)
        .fold((0, 0), |(r, s), row| {
            (
                r + row["requests"].as_u64().unwrap(),
                s + row["successes"].as_u64().unwrap(),
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_statistics_match_what_the_apps_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(
        dir.path(),
        &format!("{WEB_POLICY}---\n{}", split(70, 30)),
        Some("200ms"),
    )
    .await;
    mesh.send(600).await;
    let (v1, v2) = mesh.landed();
    assert_eq!(v1 + v2, 600);

    let path = "/v1/stats?namespace=default&service=web&window=5m";
    let deadline = Instant::now() + Duration::from_secs(20);
    let stats = loop {
        let (status, stats) = mesh.cp.call(Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "{stats}");
        if per_backend(&stats, "v1").0 == v1 && per_backend(&stats, "v2").0 == v2 {
            break stats;
        }
        assert!(
            Instant::now() < deadline,
            "the reports never added up to v1 {v1}, v2 {v2}: {stats:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stats["windowSeconds"], 300.0);
    for row in stats["items"].as_array().unwrap() {
        assert_eq!(
            (&row["namespace"], &row["route"]),
            (&Value::from("default"), &Value::from("split")),
            "{row}"
        );
        assert_eq!(row["successes"], row["requests"], "{row}");
        assert_eq!(row["successRate"], 100.0, "{row}");
        let p99 = row["p99Ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("no p99: {row}"));
        assert!(p99 > 0.0 && p99 < 20_000.0, "{row}");
        assert!(row["rps"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert_eq!(
        per_backend(&stats, "v1"),
        (v1, v1),
        "every request succeeded"
    );

    let (status, refused) = mesh
        .cp
        .call(Method::GET, "/v1/stats?window=soon", None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .starts_with("window \"soon\""),
        "{refused}"
    );
    let (status, none) = mesh
        .cp
        .call(Method::GET, "/v1/stats?service=nothing", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(none["items"], Value::Array(vec![]));

    let out = mesh.cp.trellisctl(&["stat", "web", "--window", "5m"]);
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    let columns = |line: &str| {
        line.split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        columns(lines[0]),
        ["SERVICE", "ROUTE", "BACKEND", "RPS", "SUCCESS", "P99"],
        "{}",
        out.stdout
    );
    let rows: Vec<Vec<String>> = lines[1..].iter().map(|l| columns(l)).collect();
    assert_eq!(rows.len(), 2, "{}", out.stdout);
    for (row, backend) in rows.iter().zip(["v1", "v2"]) {
        assert_eq!(&row[..3], ["web", "split", backend], "{}", out.stdout);
        assert_eq!(row[4], "100.00%", "{}", out.stdout);
        assert!(
            row[5].ends_with("ms") || row[5].ends_with('s'),
            "{}",
            out.stdout
        );
    }
    let out = mesh.cp.trellisctl(&["stat", "--window", "0s"]);
    assert!(!out.success);
    assert!(out.stderr.contains("--window"), "{}", out.stderr);

    // No route mirrors: nothing to show, and the CLI says where it looked.
    let out = mesh.cp.trellisctl(&["get", "shadow"]);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout, "");
    assert!(out.stderr.contains("No shadows found"), "{}", out.stderr);
}

/// The row of `web`'s `backend` in `GET /v1/stats`, once the reports have caught up
/// with the `requests` that app received.
async fn stats_row(cp: &ControlPlane, backend: &str, requests: u64) -> Value {
    let path = "/v1/stats?namespace=default&service=web&window=5m";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, stats) = cp.call(Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "{stats}");
        if per_backend(&stats, backend).0 == requests {
            let rows = stats["items"].as_array().unwrap();
            let row = rows.iter().find(|row| row["backend"] == backend).unwrap();
            return row.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the reports never added up to {requests} requests to {backend}: {stats:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_show_a_slow_failing_v2_beside_a_fast_healthy_v1() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(
        dir.path(),
        &format!("{WEB_POLICY}---\n{}", split(50, 50)),
        Some("200ms"),
    )
    .await;
    mesh.v2.delay_ms.store(50, Ordering::SeqCst);
    // After every tenth request v2 receives, its next one fails: about 10%.
    let failing = {
        let v2 = mesh.v2.clone();
        tokio::spawn(async move {
            let mut next = 10;
            loop {
                if v2.requests() >= next {
                    v2.fail_next.fetch_add(1, Ordering::SeqCst);
                    next += 10;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let (v1_failed, v2_failed) = mesh.send_counting_failures(600).await;
    failing.abort();
    let (v1, v2) = mesh.landed();
    assert_eq!(v1 + v2, 600, "every request landed once: v1 {v1}, v2 {v2}");
    assert_eq!(v1_failed, 0);
    assert_binomial("v2's failures at 10%", v2_failed, v2, 0.1);

    let v2_row = stats_row(&mesh.cp, "v2", v2).await;
    assert_eq!(v2_row["successes"], v2 - v2_failed, "{v2_row}");
    let rate = v2_row["successRate"].as_f64().unwrap();
    // The same bound, in percent of v2's requests.
    let bound = 3.29 * (v2 as f64 * 0.1 * 0.9).sqrt() * 100.0 / v2 as f64;
    assert!((rate - 90.0).abs() <= bound, "90% ± {bound:.1}: {v2_row}");
    // 50 ms added to each: p99 interpolates into the (50 ms, 100 ms] bucket, or the
    // next, (100 ms, 250 ms], when a loaded machine delays a few answers past 100 ms.
    let p99 = v2_row["p99Ms"].as_f64().unwrap();
    assert!((25.0..=250.0).contains(&p99), "{v2_row}");

    let v1_row = stats_row(&mesh.cp, "v1", v1).await;
    assert_eq!(v1_row["successRate"], 100.0, "{v1_row}");
    // Fast: v1's slowest percent is still quicker than v2's, which waits 50 ms for
    // every answer. (An absolute bound would measure the machine's load instead.)
    let v1_p99 = v1_row["p99Ms"].as_f64().unwrap();
    assert!(v1_p99 < p99, "v1 {v1_row} against v2 {v2_row}");

    // A rate over the time the reports cover, which is at most the window.
    for row in [&v1_row, &v2_row] {
        let covered = row["coveredSeconds"].as_f64().unwrap();
        assert!(covered > 0.0 && covered <= 300.0, "{row}");
        let rps = row["rps"].as_f64().unwrap();
        let requests = row["requests"].as_f64().unwrap();
        assert!((rps * covered - requests).abs() < 1e-6 * requests, "{row}");
        // The load took seconds, not the 5 minutes asked for.
        assert!(covered < 120.0, "{row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_window_is_reported_when_the_caller_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    // No tick comes in the test's lifetime: only the shutdown's report can carry it.
    let mut mesh = Mesh::start(
        dir.path(),
        &format!("{WEB_POLICY}---\n{}", split(50, 50)),
        Some("1h"),
    )
    .await;
    mesh.send(100).await;
    let (v1, v2) = mesh.landed();
    let path = "/v1/stats?namespace=default&service=web&window=5m";
    let (_, before) = mesh.cp.call(Method::GET, path, None).await;
    assert_eq!(before["items"], Value::Array(vec![]), "{before}");

    mesh.caller.process.signal("TERM");
    assert!(
        mesh.caller
            .process
            .wait_exit(Duration::from_secs(10))
            .success()
    );
    let (_, after) = mesh.cp.call(Method::GET, path, None).await;
    assert_eq!(
        (per_backend(&after, "v1").0, per_backend(&after, "v2").0),
        (v1, v2),
        "{after:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_client_gives_up_on_counts_as_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(
        dir.path(),
        &format!("{WEB_POLICY}---\n{TESTERS_TO_V2}"),
        Some("200ms"),
    )
    .await;
    mesh.v2.delay_ms.store(5_000, Ordering::SeqCst);

    // Over h2c, so giving up resets the stream and the caller's sidecar drops the
    // request at once.
    let tcp = tokio::net::TcpStream::connect(mesh.caller.outbound)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("http://web/")
        .header("x-canary", "true")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(300), sender.send_request(request));
    assert!(gave_up.await.is_err(), "v2 answered within 300 ms");

    let row = stats_row(&mesh.cp, "v2", 1).await;
    assert_eq!(row["successes"], 0, "{row}");
    // Counted with the time it had taken: in the (250 ms, 500 ms] bucket.
    let p99 = row["p99Ms"].as_f64().unwrap();
    assert!((250.0..=500.0).contains(&p99), "{row}");
    let scrape = trellis_tests::mesh::scrape(mesh.caller.admin).await;
    let labels = [("backend", "v2"), ("code", "499")];
    assert_eq!(
        trellis_tests::mesh::metric_value(&scrape, "trellis_route_backend_requests_total", &labels),
        1.0
    );
}
