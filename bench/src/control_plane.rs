//! The real `trellis-control-plane` binary on a temp data dir with every listener on
//! port 0, the operator API as `trellisctl` speaks it, and the open-file limit that
//! a thousand connections on each side need.

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tempfile::TempDir;
use trellis_ca::TrustBundle;

/// How long the control plane may take to bind its listeners.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running control plane, killed (and its data dir removed) when dropped.
#[derive(Debug)]
pub struct ControlPlane {
    child: Child,
    data_dir: TempDir,
    pub api: SocketAddr,
    pub grpc: SocketAddr,
    pub token: String,
    pub trust_anchors: TrustBundle,
}

/// `trellis-control-plane` beside the running executable, as cargo builds both into
/// `target/<profile>/`.
pub fn binary_beside_this_one() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("this executable's path: {e}"))?;
    let candidate = exe
        .parent()
        .map(|dir| dir.join("trellis-control-plane"))
        .filter(|path| path.exists());
    candidate.ok_or_else(|| {
        format!(
            "no trellis-control-plane beside {}: run `cargo build --release -p \
             trellis-control-plane -p trellis-bench` or pass --control-plane-bin",
            exe.display()
        )
    })
}

fn read_addr(path: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl ControlPlane {
    /// Starts `binary` and returns once it wrote its bound addresses to the data dir,
    /// which it does after every listener is bound and served.
    pub async fn start(binary: &Path, debounce: &str) -> Result<Self, String> {
        let data_dir = tempfile::tempdir().map_err(|e| format!("a temp data dir: {e}"))?;
        // Its log lines go to our stderr so the table on stdout stays clean.
        let log = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("sharing stderr with the control plane: {e}"))?;
        let mut child = Command::new(binary)
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["--api-addr", "127.0.0.1:0"])
            .args(["--grpc-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--dashboard-addr", "127.0.0.1:0"])
            .args(["--debounce", debounce])
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let dir = data_dir.path();
        let deadline = Instant::now() + START_TIMEOUT;
        let (api, grpc) = loop {
            // `admin-addr` is written after these two, each by a rename, so all three are whole.
            if let (Some(api), Some(grpc), Some(_)) = (
                read_addr(&dir.join("api-addr")),
                read_addr(&dir.join("grpc-addr")),
                read_addr(&dir.join("admin-addr")),
            ) {
                break (api, grpc);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "trellis-control-plane exited ({status}) before listening"
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "trellis-control-plane wrote no addresses to {} within {START_TIMEOUT:?}",
                    dir.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let file = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        let token = file("api-token")?.trim().to_string();
        let trust_anchors = TrustBundle::from_pem(&file("trust-anchors.pem")?)
            .map_err(|e| format!("trust-anchors.pem: {e}"))?;
        Ok(Self {
            child,
            data_dir,
            api,
            grpc,
            token,
            trust_anchors,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The operator API over one keep-alive HTTP/1.1 connection, reopened if it drops.
#[derive(Debug)]
pub struct ApiClient {
    addr: SocketAddr,
    token: String,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl ApiClient {
    pub fn new(addr: SocketAddr, token: String) -> Self {
        Self {
            addr,
            token,
            sender: None,
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connecting to the API at {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("the API at {}: {e}", self.addr))?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// One call; an answer other than 200 is an error naming the call and the answer.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: String,
    ) -> Result<serde_json::Value, String> {
        let mut sender = match self.sender.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.connect().await?,
        };
        let what = format!("{method} {path}");
        sender
            .ready()
            .await
            .map_err(|e| format!("{what}: the API connection: {e}"))?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("{what}: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{what}: reading the answer: {e}"))?
            .to_bytes();
        self.sender = Some(sender);
        if status != StatusCode::OK {
            return Err(format!(
                "{what}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("{what}: the answer is not JSON: {e}"))
    }
}

/// The soft and hard open-file limits of this process, from /proc.
fn open_file_limits() -> Result<(u64, u64), String> {
    let limits = std::fs::read_to_string("/proc/self/limits")
        .map_err(|e| format!("/proc/self/limits: {e}"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or("/proc/self/limits has no \"Max open files\" line")?;
    let mut values = line["Max open files".len()..].split_whitespace().map(|v| {
        if v == "unlimited" {
            Ok(u64::MAX)
        } else {
            v.parse::<u64>()
                .map_err(|e| format!("/proc/self/limits: open files {v:?}: {e}"))
        }
    });
    match (values.next(), values.next()) {
        (Some(soft), Some(hard)) => Ok((soft?, hard?)),
        _ => Err(format!("/proc/self/limits: cannot read {line:?}")),
    }
}

/// Raises this process's soft open-file limit to `needed` if it is lower, with
/// util-linux `prlimit` (children started afterwards inherit it).
pub fn ensure_open_files(needed: u64) -> Result<(), String> {
    let (soft, hard) = open_file_limits()?;
    if soft >= needed {
        return Ok(());
    }
    let advice = format!(
        "{needed} open files are needed and the limit is {soft}; run `ulimit -n {needed}` first"
    );
    if hard < needed {
        return Err(advice);
    }
    let raised = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string()])
        .arg(format!("--nofile={needed}:"))
        .status();
    match (raised, open_file_limits()) {
        (Ok(status), Ok((soft, _))) if status.success() && soft >= needed => {
            eprintln!("raised the open-file limit to {soft}");
            Ok(())
        }
        _ => Err(advice),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is a failed test
    use super::*;

    #[test]
    fn the_open_file_limits_are_read_from_proc() {
        let (soft, hard) = open_file_limits().unwrap();
        assert!(soft > 0 && soft <= hard, "soft {soft}, hard {hard}");
        // What the process has already is enough without prlimit.
        ensure_open_files(soft).unwrap();
    }
}
