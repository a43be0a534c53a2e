//! Automated canaries end to end: the real control plane moves a Canary's weight
//! along its steps while the sidecars' reports show the canary healthy, rolls it back
//! with the numbers when it is not, keeps its place across its own restart, and obeys
//! `trellisctl canary`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use parking_lot::Mutex;
use serde_json::Value;
use trellis_tests::{
    apps::{self, Faults},
    client::call_on,
    control_plane::{ControlPlane, ControlPlaneSpec, MeshSidecar, MeshSidecarSpec, WEB_POLICY},
    mesh::http1_client,
};

const NOWHERE: &str = "127.0.0.1:9";

fn canary(steps: &str) -> String {
    format!(
        "
apiVersion: trellis.dev/v1alpha1
kind: Canary
metadata: {{name: web}}
spec:
  service: web
  stableSubset: v1
  canarySubset: v2
  steps: {steps}
  interval: 2s
  analysis: {{minSuccessRate: 99, maxP99Latency: 500ms, minRequests: 20}}
"
    )
}

/// `web` v1 (stable) and v2 (canary, failing on command) behind their sidecars, and a
/// caller whose sidecar reports every 200 ms.
struct Mesh {
    cp: ControlPlane,
    v2: Arc<Faults>,
    caller: MeshSidecar,
    _web: Vec<MeshSidecar>,
}

async fn mesh(dir: &Path, resources: &str) -> Mesh {
    let cp = ControlPlane::start(dir, &ControlPlaneSpec::default());
    let (status, answer) = cp.apply(resources).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (v1_app, _) = apps::faulty_app("web-v1").await;
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
            report_interval: Some("200ms"),
            ..MeshSidecarSpec::new("caller", NOWHERE.parse().unwrap())
        })
        .await;
    cp.converged(3).await;
    Mesh {
        cp,
        v2,
        caller,
        _web: web,
    }
}

/// Steady customer traffic to `web`, about 200 requests a second, counting answers by
/// the app that gave them (or `failed <status>`).
struct Load {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(outbound: SocketAddr) -> Self {
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (counts, stop) = (counts.clone(), stop.clone());
            tokio::spawn(async move {
                let client = http1_client();
                while !stop.load(Ordering::Relaxed) {
                    let answer = call_on(&client, outbound, "web", Method::GET, "/", &[]).await;
                    let key = if answer.status == StatusCode::OK {
                        answer.app().to_string()
                    } else {
                        format!("failed {}", answer.status)
                    };
                    *counts.lock().entry(key).or_default() += 1;
                    // Pacing, not waiting for anything: a realistic rate on 2 cores.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        Self { counts, stop, task }
    }

    /// Stops the traffic; what it saw.
    async fn stop(self) -> BTreeMap<String, u64> {
        let Self { counts, stop, task } = self;
        stop.store(true, Ordering::Relaxed);
        task.await.unwrap();
        std::mem::take(&mut *counts.lock())
    }
}

async fn status(cp: &ControlPlane) -> Value {
    let (code, canary) = cp.call(Method::GET, "/v1/resources/canary/web", None).await;
    assert_eq!(code, StatusCode::OK, "{canary}");
    canary["status"].clone()
}

/// Polls the canary until `done` holds for its status; returns it and every weight
/// seen on the way, in order.
async fn watch(cp: &ControlPlane, what: &str, done: impl Fn(&Value) -> bool) -> (Value, Vec<u64>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut weights: Vec<u64> = Vec::new();
    loop {
        let status = status(cp).await;
        if let Some(weight) = status["weight"].as_u64()
            && weights.last() != Some(&weight)
        {
            weights.push(weight);
        }
        if done(&status) {
            return (status, weights);
        }
        assert!(
            Instant::now() < deadline,
            "the canary never got {what}: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn phase_is(phase: &'static str) -> impl Fn(&Value) -> bool {
    move |status| status["phase"] == phase
}

/// After the last config change: which apps answer `n` requests.
async fn answers(mesh: &Mesh, n: usize) -> BTreeMap<String, u64> {
    mesh.cp.converged(3).await;
    let client = http1_client();
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let answer = call_on(&client, mesh.caller.outbound, "web", Method::GET, "/", &[]).await;
        let key = if answer.status == StatusCode::OK {
            answer.app().to_string()
        } else {
            format!("failed {}", answer.status)
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_climbs_every_step_and_is_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = mesh(
        dir.path(),
        &format!("{WEB_POLICY}---{}", canary("[10, 25, 50, 100]")),
    )
    .await;
    let load = Load::start(mesh.caller.outbound);
    let (promoted, weights) = watch(&mesh.cp, "Promoted", phase_is("Promoted")).await;
    let seen = load.stop().await;

    assert_eq!(weights, [10, 25, 50, 100], "{promoted:#}");
    assert_eq!(promoted["weight"], 100);
    let history: Vec<u64> = promoted["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(history, [10, 25, 50, 100], "{promoted:#}");
    let analysis = &promoted["lastAnalysis"];
    assert_eq!(analysis["verdict"], "passed", "{promoted:#}");
    assert_eq!(analysis["weight"], 50);
    assert!(analysis["canary"]["requests"].as_u64().unwrap() >= 20);
    assert_eq!(analysis["canary"]["successRate"], 100.0);
    assert!(analysis["stable"]["requests"].as_u64().unwrap() > 0);
    assert!(
        seen.keys().all(|k| !k.starts_with("failed")),
        "requests failed while the weights moved: {seen:?}"
    );
    // Promoted: the canary takes everything.
    assert_eq!(
        answers(&mesh, 40).await,
        BTreeMap::from([("web-v2".to_string(), 40)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_to_zero_with_its_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = mesh(
        dir.path(),
        &format!("{WEB_POLICY}---{}", canary("[20, 50, 100]")),
    )
    .await;
    // One request in five to v2 fails: a 20% error rate.
    let failing = {
        let v2 = mesh.v2.clone();
        tokio::spawn(async move {
            let mut next = 5;
            loop {
                if v2.requests() >= next {
                    v2.fail_next.fetch_add(1, Ordering::SeqCst);
                    next += 5;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let load = Load::start(mesh.caller.outbound);
    let (rolled_back, weights) = watch(&mesh.cp, "RolledBack", phase_is("RolledBack")).await;
    load.stop().await;
    failing.abort();

    assert_eq!(weights, [20, 0], "{rolled_back:#}");
    let message = rolled_back["message"].as_str().unwrap();
    assert!(
        message.starts_with("rolled back from 20%: canary success rate")
            && message.contains("< 99%"),
        "{message}"
    );
    let analysis = &rolled_back["lastAnalysis"];
    assert_eq!(analysis["verdict"], "failed");
    let rate = analysis["canary"]["successRate"].as_f64().unwrap();
    assert!((60.0..95.0).contains(&rate), "canary success rate {rate}");
    assert_eq!(analysis["stable"]["successRate"], 100.0, "{analysis:#}");
    // Rolled back: the stable subset takes everything, and nothing fails.
    assert_eq!(
        answers(&mesh, 40).await,
        BTreeMap::from([("web-v1".to_string(), 40)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_keeps_its_place_across_a_control_plane_restart_and_obeys_trellisctl() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = mesh(
        dir.path(),
        &format!("{WEB_POLICY}---{}", canary("[10, 25, 50, 100]")),
    )
    .await;
    let load = Load::start(mesh.caller.outbound);
    watch(&mesh.cp, "to 25%", |s| s["weight"] == 25).await;
    let paused = mesh.cp.trellisctl(&["canary", "pause", "web"]);
    assert!(paused.success, "{paused:?}");
    assert!(paused.stdout.contains("Paused at 25%"), "{paused:?}");

    // Restart the control plane where sidecars find it: the canary is where it was.
    let grpc = mesh.cp.grpc;
    mesh.cp.process.kill();
    mesh.cp = ControlPlane::start(
        dir.path(),
        &ControlPlaneSpec {
            grpc_addr: grpc,
            ..ControlPlaneSpec::default()
        },
    );
    let after = status(&mesh.cp).await;
    assert_eq!(
        (&after["phase"], &after["weight"]),
        (&"Paused".into(), &25.into())
    );
    mesh.cp.converged(3).await;
    // Paused means paused: more than an interval passes and nothing moves.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = status(&mesh.cp).await;
    assert_eq!(
        (&still["phase"], &still["weight"]),
        (&"Paused".into(), &25.into())
    );

    let resumed = mesh.cp.trellisctl(&["canary", "resume", "web"]);
    assert!(resumed.success, "{resumed:?}");
    let (promoted, weights) = watch(&mesh.cp, "Promoted", phase_is("Promoted")).await;
    assert_eq!(weights, [25, 50, 100], "{promoted:#}");
    let seen = load.stop().await;
    assert!(
        seen.keys().all(|k| !k.starts_with("failed")),
        "requests failed: {seen:?}"
    );

    let shown = mesh.cp.trellisctl(&["get", "canary", "web"]);
    assert!(shown.success, "{shown:?}");
    for want in [
        "Promoted",
        "100%",
        "History:",
        "paused by the operator at 25%",
    ] {
        assert!(
            shown.stdout.contains(want),
            "no {want:?} in:\n{}",
            shown.stdout
        );
    }
    let again = mesh.cp.trellisctl(&["canary", "resume", "web"]);
    assert!(!again.success, "{again:?}");
    assert!(
        again.stderr.contains("only a paused canary can be resumed"),
        "{again:?}"
    );
    let aborted = mesh.cp.trellisctl(&["canary", "abort", "web"]);
    assert!(aborted.stdout.contains("RolledBack at 0%"), "{aborted:?}");
    assert_eq!(
        answers(&mesh, 20).await,
        BTreeMap::from([("web-v1".to_string(), 20)])
    );
    let missing = mesh.cp.trellisctl(&["canary", "pause", "nothing"]);
    assert!(
        !missing.success && missing.stderr.contains("not found"),
        "{missing:?}"
    );
}
