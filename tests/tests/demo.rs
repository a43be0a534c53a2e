//! `trellisctl demo --duration 30s`: the whole marketplace in a mesh, driven through
//! the gateway, summed up, and every process it started gone afterwards.
//!
//! A test binary of its own, unlike the e2e suite: cargo runs test binaries one after
//! another, so the demo's two dozen processes never share the two cores with the
//! suite's timing-sensitive tests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;
use trellis_tests::control_plane::trellisctl_binary;

/// Whether a process with this pid still runs (and is not a zombie).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_the_marketplace_and_the_mesh_behaves_as_the_scenario_expects() {
    let dir = tempfile::tempdir().unwrap();
    let summary_path = dir.path().join("summary.json");
    let state = dir.path().join("state");
    let run = || {
        Command::new(trellisctl_binary())
            .arg("demo")
            .args(["--duration", "30s"])
            .arg("--summary-json")
            .arg(&summary_path)
            .arg("--data-dir")
            .arg(&state)
            .env_remove("TRELLIS_DATA_DIR")
            .output()
            .unwrap()
    };
    let output = tokio::task::block_in_place(run);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(&summary_path)
            .unwrap_or_else(|e| panic!("no summary ({e}):\n{stdout}\n{stderr}")),
    )
    .unwrap();
    assert!(
        output.status.success(),
        "the demo failed:\n{stdout}\n{stderr}\n{summary:#}"
    );

    // Every expectation held, and the numbers say so too.
    for expectation in summary["expectations"].as_array().unwrap() {
        assert_eq!(expectation["ok"], true, "{expectation}");
    }
    for service in [
        "storefront",
        "user",
        "order",
        "payment",
        "inventory",
        "shipping",
        "analytics",
        "recommendations",
    ] {
        let requests = summary["services"][service]["requests"]
            .as_u64()
            .unwrap_or(0);
        assert!(requests > 0, "{service} got no traffic: {summary:#}");
    }
    assert!(
        summary["gateway"]["successRateOutsideFailure"]
            .as_f64()
            .unwrap()
            >= 99.0
    );
    let canary = &summary["canary"];
    assert!(
        canary["phase"] == "Promoted" || canary["weight"].as_u64().unwrap() > 10,
        "{canary}"
    );
    let shadow = &summary["shadow"];
    assert!(shadow["matched"].as_u64().unwrap() > 0, "{shadow}");
    // Payment failed for a while: the breaker opened.
    assert!(
        summary["breaker"]["ejections"].as_f64().unwrap() >= 1.0,
        "{summary:#}"
    );
    assert!(stdout.contains("expected:"), "{stdout}");

    // Nothing it started is left running.
    let pids = std::fs::read_to_string(state.join("logs/pids")).unwrap();
    assert!(pids.lines().count() >= 22, "{pids}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for line in pids.lines() {
        let (pid, name) = line.split_once(' ').unwrap();
        while alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "{name} (pid {pid}) still runs after the demo"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(Path::new(&state).join("logs/gateway.log").exists());
}
