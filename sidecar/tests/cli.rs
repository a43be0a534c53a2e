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

const CONTROL: &[&str] = &[
    "--control-plane",
    "127.0.0.1:1",
    "--trust-anchors",
    "anchors.pem",
    "--join-token-file",
    "token",
];

#[test]
fn one_mode_and_the_flags_control_plane_mode_needs() {
    let neither = proxy(BASE);
    assert_eq!(neither.status.code(), Some(2));
    assert!(
        stderr(&neither).contains("<--config <FILE>|--control-plane <ADDR>>"),
        "{}",
        stderr(&neither)
    );

    let both = proxy(&[BASE, CONTROL, &["--config", "proxy.yaml"]].concat());
    assert_eq!(both.status.code(), Some(2));
    assert!(
        stderr(&both).contains("cannot be used with")
            && stderr(&both).contains("'--config <FILE>'")
            && stderr(&both).contains("'--control-plane <ADDR>'"),
        "{}",
        stderr(&both)
    );

    let no_anchors = proxy(
        &[
            BASE,
            &["--control-plane", "cp:15012", "--join-token-file", "t"],
        ]
        .concat(),
    );
    assert_eq!(no_anchors.status.code(), Some(2));
    assert!(
        stderr(&no_anchors).contains("required arguments were not provided")
            && stderr(&no_anchors).contains("--trust-anchors <FILE>"),
        "{}",
        stderr(&no_anchors)
    );

    let plaintext = proxy(
        &[
            BASE,
            &[
                "--control-plane",
                "http://cp:15012",
                "--trust-anchors",
                "a",
                "--join-token-file",
                "t",
            ],
        ]
        .concat(),
    );
    assert_eq!(plaintext.status.code(), Some(2));
    assert!(
        stderr(&plaintext).contains("TLS only"),
        "{}",
        stderr(&plaintext)
    );
}

/// A temp dir holding trust anchors and a join token for `service` in `default`.
fn control_plane_files(service: &str) -> tempfile::TempDir {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let authority = trellis_ca::Authority::generate(trellis_ca::AuthorityConfig {
        trust_domain: trellis_ca::TrustDomain::parse("cluster.local").unwrap(),
        max_leaf_ttl: std::time::Duration::from_secs(3600),
    })
    .unwrap();
    std::fs::write(
        dir.path().join("anchors.pem"),
        authority.trust_bundle().to_pem(),
    )
    .unwrap();
    let claims = format!(r#"{{"ns":"default","svc":"{service}","exp":4102444800,"jti":"j"}}"#);
    let token = format!(
        "trellis-jt1.{}.c2lnbmF0dXJl",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims)
    );
    std::fs::write(dir.path().join("token"), token).unwrap();
    dir
}

fn control_args(dir: &std::path::Path) -> Vec<String> {
    vec![
        "--control-plane".into(),
        "127.0.0.1:1".into(),
        "--trust-anchors".into(),
        dir.join("anchors.pem").display().to_string(),
        "--join-token-file".into(),
        dir.join("token").display().to_string(),
    ]
}

#[test]
fn a_join_token_for_another_service_stops_the_start_without_leaking_it() {
    let dir = control_plane_files("b");
    let args: Vec<String> = BASE
        .iter()
        .map(|s| s.to_string())
        .chain(control_args(dir.path()))
        .collect();
    let output = Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("--join-token-file"), "{text}");
    assert!(
        text.contains("for service \"b\" in namespace \"default\""),
        "{text}"
    );
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    let all = format!("{text}{}", String::from_utf8_lossy(&output.stdout));
    assert!(!all.contains(&token), "the token was printed");
}

/// The listeners come up and say so while the control plane is unreachable: the proxy
/// is alive, but not ready until it has a certificate and a config.
#[test]
fn control_plane_mode_serves_before_the_control_plane_answers() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = control_plane_files("a");
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
        .args(BASE)
        .args(control_args(dir.path()))
        .args([
            "--inbound-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
        ])
        .args(["--admin-addr", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let admin = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("a listening line");
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        if json["message"] == "listening" {
            break json["admin"].as_str().unwrap().to_string();
        }
    };
    let get = |path: &str| {
        let mut tcp = std::net::TcpStream::connect(&admin).unwrap();
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).unwrap();
        response
    };
    assert!(get("/live").starts_with("HTTP/1.1 200"));
    let ready = get("/ready");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.ends_with("no certificate yet"), "{ready}");
    child.kill().unwrap();
    child.wait().unwrap();
}
