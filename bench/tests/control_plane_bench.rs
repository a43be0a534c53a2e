//! The control-plane benchmark end to end at a tiny scale, against the control plane
//! binary cargo built beside it, so the tool keeps working as the control plane moves.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::process::Command;

#[test]
fn three_proxies_get_every_applied_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("control-plane.json");
    let output = Command::new(env!("CARGO_BIN_EXE_trellis-bench-control-plane"))
        .args(["--proxies", "3", "--services", "2", "--rounds", "3"])
        .args(["--debounce", "10ms"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the benchmark failed (it needs `cargo build -p trellis-control-plane`):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(table.contains("| 3 |"), "{table}");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let run = &report["runs"][0];
    assert_eq!(run["proxies"], 3);
    assert_eq!(run["nacks"], 0);
    assert!(run["config_bytes"].as_u64().unwrap() > 0, "{run}");
    let last = &run["last_ack"];
    let (p50, max) = (
        last["p50_ms"].as_f64().unwrap(),
        last["max_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= max, "{last}");
    assert!(
        run["control_plane"]["peak_rss_kib"].as_u64().unwrap() > 0,
        "{run}"
    );
}
