//! `trellisctl inject` as an operator runs it: a file in, injected YAML out, and the
//! output injected again is the same.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    io::Write,
    process::{Command, Stdio},
};

use serde::Deserialize;
use serde_json::Value;

fn trellisctl(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellisctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(input);
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).unwrap()).unwrap())
        .collect()
}

#[test]
fn inject_adds_the_proxy_to_a_deployments_template_once() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/deploy.yaml");
    let (ok, out, err) = trellisctl(
        &[
            "inject",
            "-f",
            file,
            "--proxy-image",
            "registry.example/trellis-proxy:1",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(err, "deployment orders: injected\n");
    let docs = documents(&out);
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0]["kind"], "Service");
    let template = &docs[1]["spec"]["template"];
    let inits = template["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits[0]["name"], "trellis-init");
    assert_eq!(inits[0]["args"][0], "init");
    assert_eq!(inits[1]["name"], "trellis-proxy");
    assert_eq!(inits[1]["image"], "registry.example/trellis-proxy:1");
    assert_eq!(inits[1]["restartPolicy"], "Always");
    let args: Vec<&str> = inits[1]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--app-addr", "127.0.0.1:8080"]),
        "{args:?}"
    );
    let env = inits[1]["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "TRELLIS_SERVICE" && e["value"] == "orders")
    );
    let volumes = template["spec"]["volumes"].as_array().unwrap();
    assert!(volumes.iter().any(|v| v["name"] == "trellis-token"
        && v["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "trellis"));
    // The app container is as it was.
    assert_eq!(template["spec"]["containers"][0]["name"], "orders");
    assert!(
        template["spec"]["containers"][0]
            .get("securityContext")
            .is_none()
    );

    // Injecting the output again changes nothing.
    let (ok, again, err) = trellisctl(
        &[
            "inject",
            "-f",
            "-",
            "--proxy-image",
            "registry.example/trellis-proxy:1",
        ],
        Some(&out),
    );
    assert!(ok, "{err}");
    assert_eq!(again, out);
    assert_eq!(err, "deployment orders: unchanged (already injected)\n");
}

#[test]
fn a_bad_document_is_named_with_its_index_and_field() {
    let bad = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {app: p}}\nspec: {containers: []}\n";
    let (ok, out, err) = trellisctl(&["inject", "-f", "-"], Some(&format!("---\n{bad}")));
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.starts_with("error: -: document 0 (Pod p): the pod: the pod has no spec.containers"),
        "{err}"
    );
}
