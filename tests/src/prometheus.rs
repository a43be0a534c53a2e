//! The Prometheus tools of Debian's `prometheus` package, run for real: `promtool check
//! metrics` on a scrape, and a Prometheus server that scrapes our admin ports and
//! answers PromQL over its HTTP API.

use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use http_body_util::BodyExt;

use crate::mesh::http1_client;

const INSTALL: &str = "install the Debian package `prometheus` (apt-get install prometheus), \
                       which provides promtool and prometheus";

/// `$name_BIN`-style override, else `/usr/bin/<name>`, else `<name>` on `PATH`.
fn tool(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let usr_bin = PathBuf::from("/usr/bin").join(name);
    if usr_bin.exists() {
        return usr_bin;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.exists())
        })
        .unwrap_or_else(|| panic!("{name} not found: {INSTALL}"))
}

/// What `promtool check metrics` said about one scrape.
#[derive(Debug)]
pub struct PromtoolVerdict {
    pub success: bool,
    /// stdout and stderr together: the problems it found, one a line.
    pub problems: String,
}

/// Feeds `text` (a `/metrics` body) to `promtool check metrics` on stdin.
pub fn promtool_check(text: &str) -> PromtoolVerdict {
    let run = || {
        let mut child = Command::new(tool("promtool", "PROMTOOL_BIN"))
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting promtool ({e}): {INSTALL}"));
        // Written before reading: promtool reads all of stdin before it writes a line.
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        PromtoolVerdict {
            success: output.status.success(),
            problems: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::task::block_in_place(run)
    } else {
        run()
    }
}

/// The names of the samples in a Prometheus text body, histogram series included
/// (`_bucket`, `_sum`, `_count`), each once.
pub fn sample_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// A child process killed (and reaped) when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Prometheus server in a temp dir, scraping `targets` every second. Killed when
/// dropped.
pub struct Prometheus {
    _child: KillOnDrop,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port and waits until `/-/ready` answers.
    pub async fn start(targets: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let targets = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: trellis\n    scrape_interval: 1s\n    \
                 scrape_timeout: 1s\n    static_configs:\n      - targets: [{targets}]\n"
            ),
        )
        .unwrap();
        // The port is free when looked at; another process may take it before
        // Prometheus binds it, so a lost race is tried again on another port.
        let mut last_log = String::new();
        for attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let log_path = dir.path().join(format!("prometheus-{attempt}.log"));
            let log = std::fs::File::create(&log_path).unwrap();
            let child = Command::new(tool("prometheus", "PROMETHEUS_BIN"))
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting prometheus ({e}): {INSTALL}"));
            let mut child = KillOnDrop(child);
            if ready(&mut child, addr).await {
                return Self {
                    _child: child,
                    addr,
                    _dir: dir,
                };
            }
            drop(child);
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
            assert!(
                last_log.contains("address already in use"),
                "prometheus did not become ready on {addr}:\n{last_log}"
            );
        }
        panic!("prometheus found no free port in 5 tries:\n{last_log}")
    }

    /// Evaluates an instant PromQL query; the value of each series of the answer (NaN
    /// where it is not a number: `NaN`, a 0/0 ratio).
    pub async fn query(&self, promql: &str) -> Vec<f64> {
        let uri = format!(
            "http://{}/api/v1/query?query={}",
            self.addr,
            percent_encode(promql)
        );
        let response = crate::within(
            "a Prometheus query",
            http1_client().get(uri.parse().unwrap()),
        )
        .await
        .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let answer: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("Prometheus answered no JSON ({e}): {body:?}"));
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        answer["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{promql}: no result in {answer}"))
            .iter()
            .map(|series| {
                series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN)
            })
            .collect()
    }
}

/// Waits up to 20 s for `/-/ready`; false as soon as the process has exited.
async fn ready(child: &mut KillOnDrop, addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    let uri: http::Uri = format!("http://{addr}/-/ready").parse().unwrap();
    while Instant::now() < deadline {
        if child.0.try_wait().unwrap().is_some() {
            return false;
        }
        let answer =
            tokio::time::timeout(Duration::from_secs(2), http1_client().get(uri.clone())).await;
        if let Ok(Ok(response)) = answer
            && response.status() == http::StatusCode::OK
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("prometheus on {addr} was not ready within 20 s")
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters stay).
fn percent_encode(value: &str) -> String {
    use std::fmt::Write;
    value.bytes().fold(String::new(), |mut out, b| {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
        out
    })
}
