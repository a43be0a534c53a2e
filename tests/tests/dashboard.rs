//! The control plane's web dashboard in a real browser: `trellisctl demo` runs the
//! marketplace, headless Chromium opens the dashboard URL the demo prints, and the
//! test reads the page over the DevTools protocol: the graph has a node per
//! marketplace service, the numbers change while the page stays open (server-sent
//! events, no reload), and a screenshot is saved.
//!
//! A test binary of its own, like the demo's: its two dozen processes and a browser
//! do not share the two cores with the e2e suite's timing-sensitive tests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader},
    process::{ChildStdin, ChildStdout},
};
use trellis_tests::control_plane::trellisctl_binary;

/// The marketplace's services, each a node in the graph once traffic flows.
const SERVICES: [&str; 8] = [
    "storefront",
    "user",
    "order",
    "payment",
    "inventory",
    "shipping",
    "analytics",
    "recommendations",
];

/// What the test reads from the page: the graph's nodes and edges, the golden
/// metrics table, and whether the event stream is live.
const READ_PAGE: &str = r##"JSON.stringify({
  state: document.getElementById("status").dataset.state,
  nodes: [...document.querySelectorAll("#graph g.node")].map((g) => g.dataset.service),
  edges: document.querySelectorAll("#graph g.edge").length,
  rows: [...document.querySelectorAll("#services tbody tr[data-service]")]
    .map((tr) => tr.textContent.replace(/\s+/g, " ").trim()),
  canaries: document.querySelectorAll(".canary").length,
  analysed: document.querySelectorAll(".canary[data-analysed]").length,
  shadows: document.querySelectorAll(".shadow").length,
  generated: document.getElementById("generated").dataset.unixMs || null,
})"##;

fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.exists(),
        "no Chromium at {}: install the Debian package `chromium` (apt-get install chromium), \
         or point CHROMIUM at the browser; CI installs it",
        path.display()
    );
    path
}

/// The demo, interrupted (so it stops everything it started) when the test ends.
struct Demo {
    child: Child,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        // Polled with a deadline: Drop cannot await, and a stuck demo must not hang CI.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::park_timeout(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `trellisctl demo`; the dashboard URL it prints.
fn start_demo(state: &Path) -> (Demo, String) {
    let mut child = Command::new(trellisctl_binary())
        .arg("demo")
        .args(["--duration", "120s"])
        .arg("--data-dir")
        .arg(state)
        .env_remove("TRELLIS_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let demo = Demo { child };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|e| {
            panic!(
                "the demo printed no dashboard URL ({e}):\n{}",
                seen.join("\n")
            )
        });
        if let Some(url) = line.strip_prefix("dashboard: ") {
            let url = url.trim().to_string();
            // Keep draining, so the demo never blocks on a full pipe.
            std::thread::spawn(move || for _ in rx {});
            return (demo, url);
        }
        seen.push(line);
    }
}

/// Chromium driven over `--remote-debugging-pipe`: DevTools messages are JSON, each
/// ended by a NUL byte, on the browser's fds 3 (in) and 4 (out), here its stdin and
/// stdout.
struct Browser {
    _child: tokio::process::Child,
    input: ChildStdin,
    output: AsyncBufReader<ChildStdout>,
    next_id: u64,
}

impl Browser {
    fn launch(profile: &Path) -> Self {
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
                "--hide-scrollbars",
                "--window-size=1400,1000",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self {
            input: child.stdin.take().unwrap(),
            output: AsyncBufReader::new(child.stdout.take().unwrap()),
            _child: child,
            next_id: 0,
        }
    }

    /// Sends one command (to a page when `session` is given) and waits for its answer.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        let exchange = async {
            self.input.write_all(&bytes).await.unwrap();
            self.input.flush().await.unwrap();
            loop {
                let mut raw = Vec::new();
                let read = self.output.read_until(0, &mut raw).await.unwrap();
                assert!(
                    read > 0,
                    "Chromium closed its DevTools pipe during {method}"
                );
                raw.pop();
                let answer: Value = serde_json::from_slice(&raw).unwrap();
                if answer["id"] == id {
                    return answer;
                }
            }
        };
        let answer = tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .unwrap_or_else(|_| panic!("Chromium did not answer {method} within 20 s"));
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// Opens `url` in a new tab; the session to talk to it.
    async fn open(&mut self, url: &str) -> String {
        let target = self
            .call(None, "Target.createTarget", json!({ "url": url }))
            .await;
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        attached["sessionId"].as_str().unwrap().to_string()
    }

    async fn read_page(&mut self, session: &str) -> Value {
        let result = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({ "expression": READ_PAGE, "returnByValue": true }),
            )
            .await;
        serde_json::from_str(result["result"]["value"].as_str().unwrap_or("null")).unwrap()
    }

    /// Reads the page until `ready` says yes; the last read either way.
    async fn read_until(
        &mut self,
        session: &str,
        within: Duration,
        ready: impl Fn(&Value) -> bool,
    ) -> (Value, bool) {
        let deadline = Instant::now() + within;
        loop {
            let page = self.read_page(session).await;
            if ready(&page) || Instant::now() >= deadline {
                let ok = ready(&page);
                return (page, ok);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Sends `request` to the dashboard and reads until `enough` says the answer is
/// complete (the event stream never ends by itself).
async fn raw_http(url: &str, request: &str, enough: impl Fn(&str) -> bool) -> String {
    use tokio::io::AsyncReadExt;
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer).to_string();
            if n == 0 || enough(&text) {
                return text;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("no complete answer to {request:?} within 10 s"))
}

fn graph_has_every_service(page: &Value) -> bool {
    let nodes: Vec<&str> = page["nodes"]
        .as_array()
        .map(|n| n.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    page["state"] == "live"
        && SERVICES.iter().all(|s| nodes.contains(s))
        && page["rows"]
            .as_array()
            .is_some_and(|r| r.len() >= SERVICES.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_marketplace_live_in_a_real_browser() {
    let started = Instant::now();
    let chromium = chromium();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (demo, url) = tokio::task::block_in_place(|| start_demo(&state));
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    // `trellisctl dashboard` learns the same URL from the control plane; without a
    // browser opener on the PATH it still prints it and succeeds.
    let cli = |extra: &[&str]| {
        Command::new(trellisctl_binary())
            .arg("dashboard")
            .args(extra)
            .arg("--data-dir")
            .arg(state.join("control-plane"))
            .env_remove("TRELLIS_API_ADDR")
            .env_remove("TRELLIS_API_TOKEN")
            .env("PATH", dir.path())
            .output()
            .unwrap()
    };
    for extra in [&["--no-open"][..], &[]] {
        let output = cli(extra);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{extra:?}: {stderr}");
        assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{url}\n"));
        if extra.is_empty() {
            assert!(stderr.contains("no xdg-open"), "{stderr}");
        }
    }

    // Read-only, and the event stream is server-sent events carrying the snapshot.
    let refused = raw_http(
        &url,
        "POST /api/snapshot HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        |_| false,
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 405"), "{refused}");
    // A name that is not this machine's (DNS rebinding) gets nothing.
    let rebound = raw_http(
        &url,
        "GET /api/snapshot HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        |_| false,
    )
    .await;
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    // HTTP/1.0: the stream is sent as it is, without chunk framing.
    let stream = raw_http(&url, "GET /events HTTP/1.0\r\n\r\n", |text| {
        text.split_once("data: ")
            .is_some_and(|(_, event)| event.contains("\n\n"))
    })
    .await;
    assert!(stream.starts_with("HTTP/1.0 200"), "{stream}");
    assert!(
        stream
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{stream}"
    );
    let (_, event) = stream.split_once("data: ").unwrap();
    let snapshot: Value = serde_json::from_str(event.lines().next().unwrap()).unwrap();
    assert!(snapshot["nodes"].is_array(), "{snapshot}");

    let mut browser = Browser::launch(&dir.path().join("chromium-profile"));
    let session = browser.open(&url).await;

    // Read 1: once traffic has reached every service, the graph shows each of them.
    let (first, ready) = browser
        .read_until(&session, Duration::from_secs(40), graph_has_every_service)
        .await;
    assert!(
        ready,
        "the graph never showed every marketplace service (chromium {}): {first:#}",
        chromium.display()
    );
    assert!(first["edges"].as_u64().unwrap() >= 8, "{first:#}");
    assert!(first["canaries"].as_u64().unwrap() >= 1, "{first:#}");

    // Read 2, same page, no reload: the events stream brought new numbers.
    let (second, changed) = browser
        .read_until(&session, Duration::from_secs(15), |page| {
            page["rows"] != first["rows"] && page["generated"] != first["generated"]
        })
        .await;
    assert!(
        changed,
        "the numbers did not change within 15 s:\nfirst {first:#}\nsecond {second:#}"
    );
    assert!(graph_has_every_service(&second), "{second:#}");

    // The picture is taken once payment's mirror has reported and the canary had its
    // first analysis (a few seconds in); it is taken anyway if they are late.
    let _ = browser
        .read_until(&session, Duration::from_secs(15), |page| {
            page["shadows"].as_u64().unwrap_or(0) >= 1
                && page["analysed"].as_u64().unwrap_or(0) >= 1
        })
        .await;
    let shot = browser
        .call(
            Some(&session),
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        )
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    let path = dir.path().join("dashboard.png");
    std::fs::write(&path, &png).unwrap();
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard.png");
    std::fs::write(&target, &png).unwrap();
    eprintln!(
        "screenshot: {} (and {}), after {:.1} s",
        path.display(),
        target.display(),
        started.elapsed().as_secs_f64()
    );
    drop(browser);
    // Interrupting the demo waits for it to stop everything it started.
    tokio::task::block_in_place(|| drop(demo));
}
