//! The `marketplace` binary as the demo starts it: its `listening` line, one port
//! serving HTTP/1.1, h2c and (for inventory) gRPC, the fault knobs over the wire, and
//! a clean exit on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{Value, json};
use tonic::Code;
use trellis_demo_services::inventory::grpc::{
    Item, ReleaseRequest, ReserveRequest, inventory_client::InventoryClient,
};

/// A running `marketplace` whose stdout lines arrive on a channel.
struct Service {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Service {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_marketplace"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The next log line that matches, within 20 s.
    async fn log_line(&self, matches: impl Fn(&Value) -> bool) -> Value {
        tokio::task::block_in_place(|| {
            loop {
                let line = self
                    .lines
                    .recv_timeout(Duration::from_secs(20))
                    .expect("a log line within 20 s");
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                if matches(&value) {
                    return value;
                }
            }
        })
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Polls for the exit, for up to 10 s.
    async fn wait(&mut self) -> std::process::ExitStatus {
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no exit within 10 s");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn call(
    addr: SocketAddr,
    http2: bool,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http::<Full<Bytes>>();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn reserve(order_id: &str, product_id: &str, quantity: u32) -> ReserveRequest {
    ReserveRequest {
        order_id: order_id.into(),
        items: vec![Item {
            product_id: product_id.into(),
            quantity,
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_serves_http_and_grpc_on_one_port_and_obeys_its_knobs() {
    let mut inventory = Service::start(&["inventory", "--error-rate", "1", "--latency-ms", "5"]);
    let listening = inventory
        .log_line(|line| line["message"] == "listening")
        .await;
    assert_eq!(
        (&listening["service"], &listening["version"]),
        (&json!("inventory"), &json!("v1"))
    );
    let addr: SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();

    // Every request fails, gRPC with a status its client understands; probes do not.
    let mut grpc = InventoryClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let failed = grpc.reserve(reserve("o-1", "p-01", 1)).await.unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    let (status, _) = call(addr, false, Method::GET, "/stock", None).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let (status, _) = call(addr, false, Method::GET, "/health", None).await;
    assert_eq!(status, StatusCode::OK);

    // The knobs turn at run time, over h2c too; a bad one is refused by name.
    let (status, refused) = call(
        addr,
        true,
        Method::PUT,
        "/admin/faults",
        Some(json!({"latencyMs": "slow"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        refused["error"].as_str().unwrap().starts_with("latencyMs:"),
        "{refused}"
    );
    let (status, knobs) = call(
        addr,
        true,
        Method::PUT,
        "/admin/faults",
        Some(json!({"errorRate": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(knobs, json!({"errorRate": 0.0, "latencyMs": 5}));

    // Reservations over gRPC show in HTTP on the same port.
    grpc.reserve(reserve("o-2", "p-01", 3)).await.unwrap();
    let (_, stock) = call(addr, false, Method::GET, "/stock", None).await;
    assert_eq!(stock["stock"]["p-01"]["reserved"], 3, "{stock}");
    let short = grpc.reserve(reserve("o-3", "p-06", 700)).await.unwrap_err();
    assert_eq!(short.code(), Code::FailedPrecondition, "{short:?}");
    let (_, held) = call(addr, true, Method::GET, "/reservations", None).await;
    assert_eq!(
        held,
        json!({"reservations": {"o-2": [{"productId": "p-01", "quantity": 3}]}})
    );
    let released = grpc
        .release(ReleaseRequest {
            order_id: "o-2".into(),
        })
        .await
        .unwrap();
    assert!(released.into_inner().released);
    let access = inventory
        .log_line(|line| line["path"] == "/reservations")
        .await;
    assert_eq!(access["status"], 200, "{access}");
    assert!(access["duration_ms"].as_f64().unwrap() >= 5.0, "{access}");

    inventory.signal("TERM");
    assert_eq!(inventory.wait().await.code(), Some(0));
}

#[test]
fn bad_flags_are_refused_by_name() {
    let output = Command::new(env!("CARGO_BIN_EXE_marketplace"))
        .args(["payment", "--error-rate", "1.5"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--error-rate") && stderr.contains("from 0 to 1"),
        "{stderr}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_marketplace"))
        .arg("warehouse")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}
