//! The real `trellis-control-plane` on a temp data dir with every listener on port 0,
//! sidecars in control-plane mode that certify with join tokens, and the operator
//! API as `trellisctl` speaks it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::{
    mesh::http1_client,
    process::{Process, addr_field, binary},
};

/// Service `web` with subsets `v1` and `v2` by the `version` label: the policy most
/// routing, split and canary tests start from.
pub const WEB_POLICY: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: web}
spec:
  service: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

pub fn control_plane_binary() -> PathBuf {
    binary("trellis-control-plane", "TRELLIS_CONTROL_PLANE_BIN")
}

pub fn trellisctl_binary() -> PathBuf {
    binary("trellisctl", "TRELLISCTL_BIN")
}

/// How to start a control plane.
#[derive(Debug, Clone)]
pub struct ControlPlaneSpec {
    pub heartbeat_timeout: &'static str,
    /// Reuse this gRPC address (a restart that sidecars must find again).
    pub grpc_addr: SocketAddr,
}

impl Default for ControlPlaneSpec {
    fn default() -> Self {
        Self {
            heartbeat_timeout: "15s",
            grpc_addr: ([127, 0, 0, 1], 0).into(),
        }
    }
}

/// A running control plane; its data dir outlives it so a test can restart it.
pub struct ControlPlane {
    pub process: Process,
    pub data_dir: PathBuf,
    pub api: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub token: String,
}

impl ControlPlane {
    pub fn start(data_dir: &Path, spec: &ControlPlaneSpec) -> Self {
        let mut command = Command::new(control_plane_binary());
        command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--api-addr", "127.0.0.1:0"])
            .args(["--grpc-addr", &spec.grpc_addr.to_string()])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--dashboard-addr", "127.0.0.1:0"])
            .args(["--heartbeat-timeout", spec.heartbeat_timeout])
            .args(["--debounce", "20ms"])
            .args(["--log-format", "json"]);
        let mut process = Process::spawn("trellis-control-plane", command);
        let listening = process.listening("the control plane");
        let addr = |field: &str| addr_field(&listening, field);
        let token = std::fs::read_to_string(data_dir.join("api-token")).unwrap();
        Self {
            process,
            data_dir: data_dir.to_path_buf(),
            api: addr("api"),
            grpc: addr("grpc"),
            admin: addr("admin"),
            token: token.trim().to_string(),
        }
    }

    pub fn trust_anchors(&self) -> PathBuf {
        self.data_dir.join("trust-anchors.pem")
    }

    /// One operator API call with the bearer token; the answer's status and JSON.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        self.call_with_token(method, path, body, Some(&self.token))
            .await
    }

    pub async fn call_with_token(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.api));
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_string())))
            .unwrap();
        let response = crate::within("operator API", http1_client().request(request))
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("API answer is not JSON ({e}): {body:?}"));
        (status, value)
    }

    pub async fn apply(&self, yaml: &str) -> (StatusCode, Value) {
        self.call(Method::POST, "/v1/apply", Some(yaml)).await
    }

    /// Mints a join token for `service` in `default`, written to a file in the data dir.
    pub async fn join_token_file(&self, service: &str, ttl: &str) -> PathBuf {
        self.join_token_file_in(service, "default", ttl).await
    }

    /// Mints a join token for `service` in `namespace`, written to a file in the data dir.
    pub async fn join_token_file_in(&self, service: &str, namespace: &str, ttl: &str) -> PathBuf {
        let body = serde_json::json!({ "service": service, "namespace": namespace, "ttl": ttl })
            .to_string();
        let (status, answer) = self.call(Method::POST, "/v1/tokens", Some(&body)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let path = self
            .data_dir
            .join(format!("{namespace}-{service}-{}.token", unique_suffix()));
        std::fs::write(&path, answer["token"].as_str().unwrap()).unwrap();
        path
    }

    pub async fn proxies(&self) -> Vec<Value> {
        let (status, answer) = self.call(Method::GET, "/v1/proxies", None).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer["items"].as_array().unwrap().clone()
    }

    pub async fn endpoints(&self) -> Vec<Value> {
        let (status, answer) = self.call(Method::GET, "/v1/endpoints", None).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer["items"].as_array().unwrap().clone()
    }

    /// Waits until `n` proxies are connected and every one runs the latest config it
    /// was sent, and no recompile is pending (two polls agree); returns their state.
    pub async fn converged(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        // First the compiler catches up with the store (an apply just made)...
        loop {
            let (_, status) = self.call(Method::GET, "/v1/status", None).await;
            if status["compiledRevision"].as_u64() >= status["revision"].as_u64() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the compiler is behind: {status}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // ...then every proxy runs what it was sent.
        let mut previous: Option<Vec<Value>> = None;
        loop {
            let proxies = self.proxies().await;
            let settled = proxies.len() == n
                && proxies
                    .iter()
                    .all(|p| p["state"] == "ACKED" && p["latestVersion"] == p["ackedVersion"]);
            if settled && previous.as_ref() == Some(&proxies) {
                return proxies;
            }
            previous = settled.then_some(proxies.clone());
            assert!(
                Instant::now() < deadline,
                "proxies did not converge on {n}: {proxies:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a sidecar in control-plane mode; returns once it has listeners.
    pub async fn sidecar(&self, spec: MeshSidecarSpec) -> MeshSidecar {
        let token = match &spec.join_token {
            Some(path) => path.clone(),
            None => {
                self.join_token_file_in(&spec.service, &spec.namespace, "1h")
                    .await
            }
        };
        let command = self.sidecar_command(&spec, &token);
        let mut process = Process::spawn(&format!("trellis-proxy {}", spec.service), command);
        let listening = process.listening(&spec.service);
        let addr = |field: &str| addr_field(&listening, field);
        MeshSidecar {
            inbound: addr("inbound"),
            outbound: addr("outbound"),
            admin: addr("admin"),
            service: spec.service,
            process,
        }
    }

    /// Starts `trellis-proxy --mode gateway` for `service` in control-plane mode,
    /// listening on a free loopback port; returns once it has listeners.
    pub async fn gateway(&self, service: &str) -> MeshGateway {
        let token = self.join_token_file(service, "1h").await;
        let mut command = Command::new(crate::mesh::proxy_binary());
        command
            .args(["--mode", "gateway"])
            .args(["--service", service])
            .args(["--listen", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--control-plane", &self.grpc.to_string()])
            .arg("--trust-anchors")
            .arg(self.trust_anchors())
            .arg("--join-token-file")
            .arg(token)
            .args(["--heartbeat-interval", "1s"])
            .args(["--log-format", "json"]);
        let mut process = Process::spawn(&format!("trellis-proxy gateway {service}"), command);
        let listening = process.listening(service);
        let addr = |field: &str| addr_field(&listening, field);
        MeshGateway {
            listen: addr("gateway"),
            admin: addr("admin"),
            service: service.to_string(),
            process,
        }
    }

    /// The command line of a sidecar in control-plane mode.
    pub fn sidecar_command(&self, spec: &MeshSidecarSpec, token: &Path) -> Command {
        let labels = spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut command = Command::new(crate::mesh::proxy_binary());
        command
            .args(["--service", &spec.service])
            .args(["--namespace", &spec.namespace])
            .args(["--app-addr", &spec.app_addr.to_string()])
            .args(["--inbound-addr", "127.0.0.1:0"])
            .args(["--outbound-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args([
                "--control-plane",
                &spec.control_plane.unwrap_or(self.grpc).to_string(),
            ])
            .arg("--trust-anchors")
            .arg(self.trust_anchors())
            .arg("--join-token-file")
            .arg(token)
            .args(["--heartbeat-interval", spec.heartbeat_interval])
            .args(["--log-format", "json"]);
        if !labels.is_empty() {
            command.args(["--labels", &labels]);
        }
        if let Some(ttl) = spec.cert_ttl {
            command.args(["--cert-ttl", ttl]);
        }
        if let Some(interval) = spec.report_interval {
            command.args(["--report-interval", interval]);
        }
        command
    }
}

/// Tells apart the token files of one test's sidecars of the same service.
fn unique_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// How to start one sidecar in control-plane mode.
#[derive(Debug, Clone)]
pub struct MeshSidecarSpec {
    pub service: String,
    pub namespace: String,
    pub app_addr: SocketAddr,
    pub labels: BTreeMap<String, String>,
    pub heartbeat_interval: &'static str,
    /// `--cert-ttl`; the mesh default when `None`.
    pub cert_ttl: Option<&'static str>,
    /// `--report-interval`; the sidecar's default when `None`.
    pub report_interval: Option<&'static str>,
    /// A join token file; one for `service` is minted when `None`.
    pub join_token: Option<PathBuf>,
    /// Where the sidecar finds the control plane, if not at the control plane's own
    /// address (a relay in between).
    pub control_plane: Option<SocketAddr>,
}

impl MeshSidecarSpec {
    pub fn new(service: &str, app_addr: SocketAddr) -> Self {
        Self {
            service: service.into(),
            namespace: "default".into(),
            app_addr,
            labels: BTreeMap::new(),
            heartbeat_interval: "1s",
            cert_ttl: None,
            report_interval: None,
            join_token: None,
            control_plane: None,
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.into();
        self
    }
}

/// A sidecar in control-plane mode.
pub struct MeshSidecar {
    pub process: Process,
    pub service: String,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
}

/// An ingress gateway (`trellis-proxy --mode gateway`) in control-plane mode.
pub struct MeshGateway {
    pub process: Process,
    pub service: String,
    /// Where external clients call it (plain HTTP/1.1 and h2c).
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

/// What one `trellisctl` run printed.
#[derive(Debug)]
pub struct CtlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl ControlPlane {
    /// Runs `trellisctl --data-dir <this control plane's> ARGS`, as an operator would.
    pub fn trellisctl(&self, args: &[&str]) -> CtlOutput {
        let run = || {
            Command::new(trellisctl_binary())
                .arg("--data-dir")
                .arg(&self.data_dir)
                .args(args)
                .env_remove("TRELLIS_API_ADDR")
                .env_remove("TRELLIS_API_TOKEN")
                .output()
                .expect("running trellisctl")
        };
        let output = if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(run)
        } else {
            run()
        };
        CtlOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}
