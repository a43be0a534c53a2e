//! Bad flags and bad config files get a clear error and a non-zero exit, never a
//! panic. (This integration test also makes `cargo test` build `trellis-proxy` for
//! the end-to-end tests in `tests/`.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::process::{Command, Output};

fn proxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
        .args(args)
        .output()
        .expect("running trellis-proxy")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const BASE: &[&str] = &["--service", "a", "--app-addr", "127.0.0.1:9"];

#[test]
fn bad_flags_are_named() {
    for (extra, needle) in [
        (&["--workers", "0", "--config", "x"][..], "--workers"),
        (
            &["--drain-timeout", "soon", "--config", "x"],
            "invalid duration \"soon\"",
        ),
        (
            &["--inbound-addr", "nowhere", "--config", "x"],
            "--inbound-addr",
        ),
        (&["--log-format", "xml", "--config", "x"], "--log-format"),
    ] {
        let output = proxy(&[BASE, extra].concat());
        assert_eq!(output.status.code(), Some(2), "{extra:?}");
        assert!(
            stderr(&output).contains(needle),
            "{extra:?}: {}",
            stderr(&output)
        );
    }
    let output = proxy(&["--app-addr", "127.0.0.1:9", "--config", "x"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--service"), "{}", stderr(&output));
}

#[test]
fn bad_config_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let output = proxy(&[BASE, &["--config", missing.to_str().unwrap()]].concat());
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("missing.yaml"),
        "{}",
        stderr(&output)
    );

    let typo = dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        "identity: {certificate: c, privateKey: k, trustBundle: b}\nproxy: {mtls: STRICT, servics: {}}\n",
    )
    .unwrap();
    let output = proxy(&[BASE, &["--config", typo.to_str().unwrap()]].concat());
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("unknown field `servics`"),
        "{}",
        stderr(&output)
    );

    let no_certs = dir.path().join("no-certs.yaml");
    std::fs::write(
        &no_certs,
        "identity: {certificate: c.pem, privateKey: k.pem, trustBundle: b.pem}\n",
    )
    .unwrap();
    let output = proxy(&[BASE, &["--config", no_certs.to_str().unwrap()]].concat());
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("c.pem"), "{}", stderr(&output));
    assert!(!stderr(&output).contains("panicked"));
}
