//! The built `trellisctl` binary: its error lines when no control plane is there, and
//! the requests it sends to (and the output it prints from) a stand-in API server
//! that records every request.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    io::Write,
    net::SocketAddr,
    path::Path,
    process::{Command, Output, Stdio},
    sync::Arc,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc};

const TOKEN: &str = "test-token-0123";

/// Runs the binary in `dir` with no `TRELLIS_*` variables from the test's
/// environment; blocking, so tests call it through `spawn_blocking`.
fn trellisctl(dir: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_trellisctl"));
    command
        .args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "TRELLIS_DATA_DIR",
        "TRELLIS_API_ADDR",
        "TRELLIS_API_TOKEN",
        "TRELLIS_API_TIMEOUT",
        "RUST_BACKTRACE",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    let mut child = command.spawn().expect("the trellisctl binary runs");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

async fn run(dir: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let dir = dir.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let stdin = stdin.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        trellisctl(&dir, &args, &env, stdin.as_deref())
    })
    .await
    .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// An error is one `error: ` line on stderr, nothing on stdout, and exit code 1.
fn assert_one_error_line(output: &Output) -> String {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("error: "), "{err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert_eq!(stdout(output), "");
    err
}

/// A loopback port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// === the stand-in API ===

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    uri: String,
    authorization: Option<String>,
    content_type: Option<String>,
    body: String,
}

type Answers = Arc<dyn Fn(&Recorded) -> (StatusCode, Value) + Send + Sync>;

/// Serves HTTP/1 on a free port: a request without `Bearer TOKEN` gets a 401, any
/// other gets what `answers` says. Every request is reported on the channel.
async fn api_server(answers: Answers) -> (SocketAddr, mpsc::UnboundedReceiver<Recorded>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, recorded) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let answers = answers.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let answers = answers.clone();
                    let seen = seen.clone();
                    async move {
                        let header_text = |name| {
                            request
                                .headers()
                                .get(name)
                                .map(|v: &http::HeaderValue| v.to_str().unwrap().to_string())
                        };
                        let mut recorded = Recorded {
                            method: request.method().to_string(),
                            uri: request.uri().to_string(),
                            authorization: header_text(header::AUTHORIZATION),
                            content_type: header_text(header::CONTENT_TYPE),
                            body: String::new(),
                        };
                        let body = request.into_body().collect().await?.to_bytes();
                        recorded.body = String::from_utf8(body.to_vec()).unwrap();
                        let (status, answer) = if recorded.authorization.as_deref()
                            == Some(&format!("Bearer {TOKEN}"))
                        {
                            answers(&recorded)
                        } else {
                            (StatusCode::UNAUTHORIZED, json!({"error": "unauthorized"}))
                        };
                        let _ = seen.send(recorded);
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(status)
                                .header(header::CONTENT_TYPE, "application/json")
                                .body(Full::new(Bytes::from(answer.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, recorded)
}

/// A data dir as the control plane leaves it: `api-addr` and `api-token`.
fn data_dir(root: &Path, addr: SocketAddr) -> std::path::PathBuf {
    let dir = root.join(".trellis");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("api-addr"), format!("{addr}\n")).unwrap();
    std::fs::write(dir.join("api-token"), format!("{TOKEN}\n")).unwrap();
    dir
}

fn route(namespace: &str, name: &str, rules: usize) -> Value {
    json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"service": name, "rules": vec![json!({"backends": [{"service": name, "weight": 1}]}); rules]}
    })
}

const DESTINATION_POLICY: &str = "\
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: web, namespace: shop}
spec:
  service: web
  subsets:
    - {name: v1, labels: {version: v1}}
";

const TRAFFIC_ROUTE: &str = r#"{"apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficRoute",
 "metadata": {"name": "web", "namespace": "shop"},
 "spec": {"service": "web", "rules": [{"backends": [{"subset": "v1", "weight": 100}]}]}}"#;

const MESH_CONFIG: &str = "\
apiVersion: trellis.dev/v1alpha1
kind: MeshConfig
metadata: {name: default}
spec: {mtls: STRICT}
";

// === errors without a server ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_is_one_line_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let addr = closed_port().await.to_string();
    let output = run(
        dir.path(),
        &["get", "trafficroutes", "--api-addr", &addr, "--token", "t"],
        &[],
        None,
    )
    .await;
    let err = assert_one_error_line(&output);
    assert!(
        err.contains(&format!("at {addr} (given with --api-addr)")),
        "{err}"
    );
    assert!(
        err.contains("the control plane is not running there"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_from_the_data_dir_is_named_when_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let addr = closed_port().await;
    data_dir(dir.path(), addr);
    let output = run(dir.path(), &["get", "proxies"], &[], None).await;
    let err = assert_one_error_line(&output);
    assert!(
        err.contains(&format!("at {addr} (read from ./.trellis/api-addr)")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("elsewhere");
    let output = run(
        dir.path(),
        &["get", "tr"],
        &[("TRELLIS_DATA_DIR", data.to_str().unwrap())],
        None,
    )
    .await;
    let err = assert_one_error_line(&output);
    let path = data.join("api-token");
    assert!(
        err.contains(&format!(
            "cannot read the API token from {}: it does not exist",
            path.display()
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_output_format_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(dir.path(), &["get", "tr", "-o", "xml"], &[], None).await;
    let err = assert_one_error_line(&output);
    assert!(err.contains("'xml'"), "{err}");
    assert!(err.contains("table, json, yaml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kind_is_one_line_listing_the_kinds() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["get", "routes"][..], &["delete", "routes", "web"][..]] {
        let output = run(dir.path(), args, &[], None).await;
        let err = assert_one_error_line(&output);
        assert!(err.contains("unknown kind \"routes\""), "{err}");
        assert!(err.contains("trafficroute (tr)"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_document_is_refused_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, MESH_CONFIG.replace("mtls", "mtsl")).unwrap();
    let addr = closed_port().await.to_string();
    let output = run(
        dir.path(),
        &[
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--api-addr",
            &addr,
            "--token",
            "t",
        ],
        &[],
        None,
    )
    .await;
    let err = assert_one_error_line(&output);
    assert!(
        err.starts_with(&format!("error: {}: document 0", file.display())),
        "{err}"
    );
    assert!(err.contains("mtsl"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_api_times_out() {
    let dir = tempfile::tempdir().unwrap();
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let output = run(
        dir.path(),
        &[
            "get",
            "tr",
            "--api-addr",
            &addr,
            "--token",
            "t",
            "--timeout",
            "300ms",
        ],
        &[],
        None,
    )
    .await;
    holder.abort();
    let err = assert_one_error_line(&output);
    assert!(err.contains(&format!("at {addr}")), "{err}");
    assert!(err.contains("did not answer within 300ms"), "{err}");
}

// === against the stand-in API ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_sends_every_document_as_one_batch() {
    let (addr, mut seen) = api_server(Arc::new(|_| {
        (
            StatusCode::OK,
            json!({"revision": 7, "changes": [
                {"kind": "DestinationPolicy", "namespace": "shop", "name": "web", "change": "created"},
                {"kind": "TrafficRoute", "namespace": "shop", "name": "web", "change": "updated"},
                {"kind": "MeshConfig", "namespace": null, "name": "default", "change": "unchanged"},
            ]}),
        )
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path(), addr);
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(manifests.join("routes")).unwrap();
    std::fs::write(manifests.join("a-policy.yaml"), DESTINATION_POLICY).unwrap();
    std::fs::write(manifests.join("routes/web.json"), TRAFFIC_ROUTE).unwrap();
    std::fs::write(manifests.join("README.md"), "not a manifest").unwrap();

    let output = run(
        dir.path(),
        &["apply", "-f", "manifests", "-f", "-"],
        &[],
        Some(MESH_CONFIG),
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "destinationpolicy shop/web created\n\
         trafficroute shop/web updated\n\
         meshconfig default unchanged\n"
    );

    let request = seen.recv().await.unwrap();
    assert!(seen.try_recv().is_err(), "one request for the whole batch");
    assert_eq!(request.method, "POST");
    assert_eq!(request.uri, "/v1/apply");
    assert_eq!(
        request.authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(request.content_type.as_deref(), Some("application/yaml"));
    assert_eq!(
        request.body,
        format!("{DESTINATION_POLICY}---\n{TRAFFIC_ROUTE}\n---\n{MESH_CONFIG}")
    );
    // The control plane parses the batch as one YAML stream.
    let documents = trellis_crds::parse_documents(&request.body).unwrap();
    let kinds: Vec<&str> = documents.iter().map(|d| d.kind()).collect();
    assert_eq!(kinds, ["DestinationPolicy", "TrafficRoute", "MeshConfig"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_lists_one_namespace_with_the_token_from_the_data_dir() {
    let (addr, mut seen) = api_server(Arc::new(|request| {
        if request.uri.split('?').next() == Some("/v1/resources/TrafficRoute") {
            (
                StatusCode::OK,
                json!({"items": [route("shop", "web", 2), route("shop", "cart", 1)]}),
            )
        } else {
            (StatusCode::NOT_FOUND, json!({"error": "not found"}))
        }
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path(), addr);

    let output = run(dir.path(), &["get", "tr", "-n", "shop"], &[], None).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "NAMESPACE   NAME   SERVICE   RULES\n\
         shop        cart   cart      1\n\
         shop        web    web       2\n"
    );
    let request = seen.recv().await.unwrap();
    assert_eq!(request.method, "GET");
    assert_eq!(request.uri, "/v1/resources/TrafficRoute?namespace=shop");
    assert_eq!(
        request.authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(request.body, "");

    // -A asks for every namespace; -o json prints the answer.
    let output = run(
        dir.path(),
        &["get", "trafficroutes", "-A", "-o", "json"],
        &[],
        None,
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(seen.recv().await.unwrap().uri, "/v1/resources/TrafficRoute");
    let printed: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(printed["items"][0]["metadata"]["name"], "web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_one_resource_as_yaml_can_be_applied_again() {
    let (addr, mut seen) =
        api_server(Arc::new(|_| (StatusCode::OK, route("default", "web", 1)))).await;
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path(), addr);
    let output = run(
        dir.path(),
        &["get", "TrafficRoute", "web", "-o", "yaml"],
        &[],
        None,
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        seen.recv().await.unwrap().uri,
        "/v1/resources/TrafficRoute/web?namespace=default"
    );
    let documents = trellis_crds::parse_documents(&stdout(&output)).unwrap();
    assert_eq!(documents.len(), 1);
    assert_eq!(documents[0].name(), "web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_proxies_filters_by_namespace_and_shows_nacks() {
    let (addr, mut seen) = api_server(Arc::new(|_| {
        (
            StatusCode::OK,
            json!({"items": [
                {"service": "web", "namespace": "default", "instance": "web-1",
                 "identity": "spiffe://cluster.local/ns/default/sa/web", "address": "127.0.0.1:7001",
                 "proxyVersion": "0.1.0", "connectedSeconds": 90, "latestVersion": "abc",
                 "ackedVersion": "abb", "nack": {"version": "abc", "error": "rule \"r\": bad"},
                 "state": "NACKED"},
                {"service": "pay", "namespace": "shop", "instance": "pay-1",
                 "identity": "spiffe://cluster.local/ns/shop/sa/pay", "address": "127.0.0.1:7002",
                 "proxyVersion": "0.1.0", "connectedSeconds": 5, "latestVersion": "def",
                 "ackedVersion": "def", "nack": null, "state": "ACKED"},
            ]}),
        )
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path(), addr);
    let output = run(dir.path(), &["get", "proxies"], &[], None).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(seen.recv().await.unwrap().uri, "/v1/proxies");
    let printed = stdout(&output);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 2, "only namespace default:\n{printed}");
    assert!(lines[1].contains(" NACKED "), "{printed}");
    assert!(
        lines[1].ends_with("rule \"r\": bad (version abc)"),
        "{printed}"
    );

    let output = run(dir.path(), &["get", "proxies", "-n", "nowhere"], &[], None).await;
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(stdout(&output), "");
    assert!(stderr(&output).contains("No proxies found in namespace nowhere"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_says_where_it_was_read_from() {
    let (addr, mut seen) = api_server(Arc::new(|_| (StatusCode::OK, json!({"items": []})))).await;
    let dir = tempfile::tempdir().unwrap();
    let addr = addr.to_string();
    let output = run(
        dir.path(),
        &["get", "canaries", "--api-addr", &addr],
        &[("TRELLIS_API_TOKEN", "stale")],
        None,
    )
    .await;
    let err = assert_one_error_line(&output);
    assert!(err.contains("401"), "{err}");
    assert!(
        err.contains("the token from TRELLIS_API_TOKEN is wrong"),
        "{err}"
    );
    assert_eq!(
        seen.recv().await.unwrap().authorization.as_deref(),
        Some("Bearer stale")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_error_is_shown_as_it_is() {
    // The store reports every bad field of a resource, one per line.
    const REFUSAL: &str = "TrafficRoute \"web\" is invalid:\n  \
        spec.rules[0].backends[0].subset: no subset \"v9\"\n  \
        spec.rules[0].timeout: invalid duration \"soon\"";
    let (addr, _seen) = api_server(Arc::new(|_| {
        (StatusCode::UNPROCESSABLE_ENTITY, json!({"error": REFUSAL}))
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path(), addr);
    let output = run(dir.path(), &["apply", "-f", "-"], &[], Some(TRAFFIC_ROUTE)).await;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout(&output), "");
    assert_eq!(stderr(&output), format!("error: {REFUSAL}\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_token_create_send_what_the_api_expects() {
    let (addr, mut seen) = api_server(Arc::new(|request| match request.method.as_str() {
        "DELETE" => (StatusCode::OK, json!({"revision": 8})),
        _ => (
            StatusCode::OK,
            json!({"token": "join.abc.def", "identity": "spiffe://cluster.local/ns/shop/sa/pay",
                   "expiresUnix": 4_102_444_800_i64}),
        ),
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path(), addr);

    let output = run(
        dir.path(),
        &["delete", "dp", "pay", "-n", "shop"],
        &[],
        None,
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), "destinationpolicy shop/pay deleted\n");
    let request = seen.recv().await.unwrap();
    assert_eq!(request.method, "DELETE");
    assert_eq!(
        request.uri,
        "/v1/resources/DestinationPolicy/pay?namespace=shop"
    );

    let output = run(
        dir.path(),
        &[
            "token",
            "create",
            "--service",
            "pay",
            "--namespace",
            "shop",
            "--ttl",
            "2h",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "join.abc.def\n",
        "the token alone on stdout"
    );
    let err = stderr(&output);
    assert!(
        err.contains("spiffe://cluster.local/ns/shop/sa/pay"),
        "{err}"
    );
    assert!(err.contains("2100-01-01T00:00:00Z"), "{err}");
    let request = seen.recv().await.unwrap();
    assert_eq!(
        (request.method.as_str(), request.uri.as_str()),
        ("POST", "/v1/tokens")
    );
    assert_eq!(request.content_type.as_deref(), Some("application/json"));
    let body: Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(
        body,
        json!({"service": "pay", "namespace": "shop", "ttl": "2h"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_a_line_per_check_and_fails_on_a_nack() {
    let nacked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers_nacked = nacked.clone();
    let (addr, _seen) = api_server(Arc::new(move |request| {
        let far = 4_102_444_800_i64; // 2100
        match request.uri.as_str() {
            "/v1/status" => (
                StatusCode::OK,
                json!({"trustDomain": "cluster.local", "revision": 3, "proxies": 1,
                       "rootNotAfterUnix": far, "intermediateNotAfterUnix": far, "nacks": 0}),
            ),
            _ => {
                let state = if answers_nacked.load(std::sync::atomic::Ordering::SeqCst) {
                    json!({"state": "NACKED", "nack": {"version": "v2", "error": "bad subset"}})
                } else {
                    json!({"state": "ACKED", "nack": null})
                };
                let mut proxy =
                    json!({"service": "web", "namespace": "default", "instance": "web-1"});
                proxy
                    .as_object_mut()
                    .unwrap()
                    .extend(state.as_object().unwrap().clone());
                (StatusCode::OK, json!({"items": [proxy]}))
            }
        }
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path(), addr);

    let output = run(dir.path(), &["check"], &[], None).await;
    let printed = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{printed}");
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 5, "{printed}");
    assert!(lines.iter().all(|l| l.starts_with("✔ ")), "{printed}");
    assert!(lines[0].contains(&addr.to_string()), "{printed}");

    nacked.store(true, std::sync::atomic::Ordering::SeqCst);
    let output = run(dir.path(), &["check"], &[], None).await;
    let printed = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains("✘ 1 proxy NACKed its config: default/web web-1 NACKed: bad subset"),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_the_api_is_away() {
    let dir = tempfile::tempdir().unwrap();
    let addr = closed_port().await.to_string();
    let output = run(
        dir.path(),
        &["check", "--api-addr", &addr, "--token", "t"],
        &[],
        None,
    )
    .await;
    assert_eq!(output.status.code(), Some(1));
    let printed = stdout(&output);
    assert_eq!(printed.lines().count(), 1, "{printed}");
    assert!(
        printed.starts_with("✘ cannot reach the control plane API at "),
        "{printed}"
    );
}

// === tap ===

/// A body that sends `lines` and then stays open, as a sidecar's `/tap` does.
struct EndlessBody(std::collections::VecDeque<Bytes>);

impl hyper::body::Body for EndlessBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.0.pop_front() {
            Some(line) => std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(line)))),
            // Never woken: the stream is open and quiet, like a sidecar without traffic.
            None => std::task::Poll::Pending,
        }
    }
}

/// A sidecar admin server whose `/tap` sends `lines` and stays open.
async fn tap_server(lines: &'static [&'static str]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    assert_eq!(request.uri().path(), "/tap");
                    let body = EndlessBody(lines.iter().map(|l| Bytes::from(*l)).collect());
                    Ok::<_, std::convert::Infallible>(Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

const TAP_LINES: &[&str] = &[
    "{\"time\":\"2025-03-02T10:14:07.123Z\",\"direction\":\"inbound\",\"method\":\"POST\",\
     \"path\":\"/payments\",\"status\":403,\"latencyMs\":1.5,\"requestId\":\"req-1\"}\n{\"skip",
    "ped\":3}\n",
    "{\"time\":\"2025-03-02T10:14:08.000Z\",\"direction\":\"outbound\",\"method\":\"GET\",\
     \"path\":\"/health\",\"status\":200,\"latencyMs\":0.4,\"requestId\":\"req-2\"}\n",
];

/// An API whose registry lists payment's proxies: one tappable, one whose admin
/// port is closed, one that never said where its admin server is.
async fn tap_api() -> (tempfile::TempDir, SocketAddr) {
    let tappable = tap_server(TAP_LINES).await.to_string();
    let closed = closed_port().await.to_string();
    let (addr, _) = api_server(Arc::new(move |_| {
        (
            StatusCode::OK,
            json!({"items": [
                {"service": "payment", "namespace": "shop", "instance": "payment-1",
                 "admin": tappable},
                {"service": "payment", "namespace": "shop", "instance": "payment-2",
                 "admin": closed},
                {"service": "payment", "namespace": "shop", "instance": "payment-3",
                 "admin": null},
                {"service": "order", "namespace": "shop", "instance": "order-1",
                 "admin": tappable},
            ]}),
        )
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path(), addr);
    (dir, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_prints_each_proxys_requests_and_names_those_it_cannot_reach() {
    let (dir, _) = tap_api().await;
    let output = run(
        dir.path(),
        &[
            "tap",
            "payment",
            "-n",
            "shop",
            "--duration",
            "1s",
            "-o",
            "json",
        ],
        &[],
        None,
    )
    .await;
    let (printed, told) = (stdout(&output), stderr(&output));
    assert_eq!(output.status.code(), Some(0), "{told}");
    let lines: Vec<Value> = printed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["requestId"].as_str().unwrap(),
                l["proxy"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [("req-1", "payment-1"), ("req-2", "payment-1")]);
    for expected in [
        "tapping 3 proxies of shop/payment",
        "proxy payment-1: this tap fell behind and 3 requests were not shown",
        "cannot tap proxy payment-2: admin server 127.0.0.1:",
        "cannot tap proxy payment-3: it did not tell the control plane its admin address",
        "2 requests shown from 1 proxy tapped",
    ] {
        assert!(told.contains(expected), "{expected:?} in:\n{told}");
    }

    // The table, and --max ends it before --duration does.
    let started = std::time::Instant::now();
    let output = run(
        dir.path(),
        &[
            "tap",
            "payment",
            "-n",
            "shop",
            "--max",
            "1",
            "--duration",
            "20s",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let printed = stdout(&output);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 2, "{printed}");
    assert!(lines[0].starts_with("TIME         PROXY"), "{printed}");
    assert!(
        lines[1].starts_with("10:14:07.123 payment-1            inbound  POST   "),
        "{printed}"
    );
    assert!(lines[1].ends_with(" req-1"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_without_a_proxy_to_tap_is_an_error_naming_what_it_looked_for() {
    let (dir, _) = tap_api().await;
    let output = run(dir.path(), &["tap", "payment"], &[], None).await;
    let err = assert_one_error_line(&output);
    assert!(
        err.contains("no proxy of service \"payment\" in namespace \"default\""),
        "{err}"
    );

    // Only proxies it cannot reach: an error once each has been named.
    let closed = closed_port().await.to_string();
    let (addr, _) = api_server(Arc::new(move |_| {
        (
            StatusCode::OK,
            json!({"items": [{"service": "web", "namespace": "default", "instance": "web-1",
                              "admin": closed}]}),
        )
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path(), addr);
    let output = run(dir.path(), &["tap", "web"], &[], None).await;
    assert_eq!(output.status.code(), Some(1));
    let told = stderr(&output);
    assert!(
        told.contains("cannot tap proxy web-1: admin server "),
        "{told}"
    );
    assert!(
        told.ends_with(
            "error: could not tap any proxy of service \"web\" in namespace \"default\" \
             (each is named above)\n"
        ),
        "{told}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_edges_asks_for_edges_and_prints_who_calls_whom() {
    let (addr, mut seen) = api_server(Arc::new(|_| {
        (
            StatusCode::OK,
            json!({"windowSeconds": 60.0, "by": "edge", "items": [
                {"callerNamespace": "shop", "caller": "order", "namespace": "shop",
                 "service": "payment", "requests": 12, "successes": 12, "successRate": 100.0,
                 "rps": 0.2, "coveredSeconds": 60.0, "p99Ms": 9.8},
            ]}),
        )
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path(), addr);
    let output = run(
        dir.path(),
        &["stat", "--edges", "--service", "payment", "-n", "shop"],
        &[],
        None,
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        seen.recv().await.unwrap().uri,
        "/v1/stats?namespace=shop&service=payment&window=60s&by=edge"
    );
    assert_eq!(
        stdout(&output),
        "FROM    TO        RPS   SUCCESS   P99\n\
         order   payment   0.2   100.00%   9.80ms\n"
    );
}
