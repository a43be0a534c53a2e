//! Sidecar processes: identities written as PEM files, a static config, the real
//! `trellis-proxy` binary started with every listener on port 0, and its readiness
//! read from its `listening` log line.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use trellis_api::config::{
    EndpointConfig, InboundConfig, MtlsMode, ProxyConfig, ServiceConfig, TracingConfig,
};
use trellis_ca::{SpiffeId, WorkloadKey};

use crate::{
    pki::TestPki,
    process::{Process, addr_field, binary},
};

pub const TRUST_DOMAIN: &str = "cluster.local";

pub fn workload_id(service: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{service}")
}

/// A mesh for one test: a CA and a temp dir for the files sidecars read.
pub struct Mesh {
    pub pki: TestPki,
    dir: tempfile::TempDir,
}

/// How to start one sidecar.
#[derive(Debug, Clone)]
pub struct SidecarSpec {
    pub service: String,
    pub app_addr: SocketAddr,
    pub mtls: MtlsMode,
    /// The destinations, by service name, as `ProxyConfig.services`.
    pub services: BTreeMap<String, ServiceConfig>,
    /// Who may call this sidecar's app.
    pub inbound: InboundConfig,
    pub tcp_outbound: Vec<String>,
    pub drain_timeout: &'static str,
    /// `--app-protocol`: `http` or `tcp`.
    pub app_protocol: &'static str,
    pub idle_timeout: &'static str,
    /// Where spans go, as `ProxyConfig.tracing`.
    pub tracing: Option<TracingConfig>,
}

impl SidecarSpec {
    pub fn new(service: &str, app_addr: SocketAddr) -> Self {
        Self {
            service: service.into(),
            app_addr,
            mtls: MtlsMode::Strict,
            services: BTreeMap::new(),
            inbound: InboundConfig::default(),
            tcp_outbound: Vec::new(),
            drain_timeout: "30s",
            app_protocol: "http",
            idle_timeout: "60s",
            tracing: None,
        }
    }

    /// Routes `service` to `endpoints`.
    pub fn to(self, service: &str, endpoints: Vec<EndpointConfig>) -> Self {
        self.service(
            service,
            ServiceConfig {
                endpoints,
                ..ServiceConfig::default()
            },
        )
    }

    /// Adds a destination with everything it may carry: subsets, routes, labels.
    pub fn service(mut self, name: &str, config: ServiceConfig) -> Self {
        self.services.insert(name.into(), config);
        self
    }

    /// Sets the inbound authorization rules.
    pub fn inbound(mut self, inbound: InboundConfig) -> Self {
        self.inbound = inbound;
        self
    }

    /// Records every request's spans and exports them to the OTLP/gRPC `endpoint`.
    pub fn traced(mut self, endpoint: &str) -> Self {
        self.tracing = Some(TracingConfig {
            otlp_endpoint: Some(endpoint.into()),
            sampling_ratio: 1.0,
        });
        self
    }
}

/// A running `trellis-proxy`. Killed when dropped.
pub struct Sidecar {
    process: Process,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub identity: String,
}

/// The `trellis-proxy` binary: `$TRELLIS_PROXY_BIN`, else the one cargo built.
pub fn proxy_binary() -> PathBuf {
    binary("trellis-proxy", "TRELLIS_PROXY_BIN")
}

impl Mesh {
    pub fn new() -> Self {
        Self {
            pki: TestPki::new("mesh"),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Issues an SVID for `id` through the CA and writes cert chain, key (0600) and
    /// bundle; returns the three paths.
    pub fn write_identity(&self, name: &str, id: &str) -> (PathBuf, PathBuf, PathBuf) {
        let id = SpiffeId::parse(id).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let issued = self
            .pki
            .authority
            .sign_csr(&key.csr(&id).unwrap(), &id, Duration::from_secs(3600))
            .unwrap();
        let chain: Vec<pem::Pem> = std::iter::once(&issued.leaf)
            .chain(&issued.chain)
            .map(|c| pem::Pem::new("CERTIFICATE", c.to_vec()))
            .collect();
        let cert = self.dir.path().join(format!("{name}.pem"));
        let key_path = self.dir.path().join(format!("{name}-key.pem"));
        let bundle = self.dir.path().join("bundle.pem");
        std::fs::write(&cert, pem::encode_many(&chain)).unwrap();
        let key_der = match key.private_key_der() {
            rustls_pki_types::PrivateKeyDer::Pkcs8(der) => der.secret_pkcs8_der().to_vec(),
            other => panic!("unexpected key form {other:?}"),
        };
        std::fs::write(
            &key_path,
            pem::encode(&pem::Pem::new("PRIVATE KEY", key_der)),
        )
        .unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&bundle, self.pki.authority.trust_bundle().to_pem()).unwrap();
        (cert, key_path, bundle)
    }

    /// Starts a sidecar for `spec` with the workload id of its service.
    pub fn sidecar(&self, spec: SidecarSpec) -> Sidecar {
        let id = workload_id(&spec.service);
        self.sidecar_with_identity(spec, &id)
    }

    pub fn sidecar_with_identity(&self, spec: SidecarSpec, id: &str) -> Sidecar {
        let (cert, key, bundle) = self.write_identity(&spec.service, id);
        let proxy = ProxyConfig {
            version: "test-1".into(),
            mtls: spec.mtls,
            services: spec.services.clone(),
            inbound: spec.inbound.clone(),
            tracing: spec.tracing.clone(),
        };
        let config = serde_json::json!({
            "identity": {"certificate": cert, "privateKey": key, "trustBundle": bundle},
            "tcpOutbound": spec.tcp_outbound.iter()
                .map(|s| serde_json::json!({"listen": "127.0.0.1:0", "service": s}))
                .collect::<Vec<_>>(),
            "proxy": proxy,
        });
        let config_path = self.dir.path().join(format!("{}.yaml", spec.service));
        std::fs::write(&config_path, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
        Sidecar::start(&spec, &config_path, id)
    }
}

impl Default for Mesh {
    fn default() -> Self {
        Self::new()
    }
}

impl Sidecar {
    fn start(spec: &SidecarSpec, config: &Path, id: &str) -> Self {
        let mut command = Command::new(proxy_binary());
        command
            .args(["--service", &spec.service])
            .args(["--app-addr", &spec.app_addr.to_string()])
            .args(["--app-protocol", spec.app_protocol])
            .args(["--inbound-addr", "127.0.0.1:0"])
            .args(["--outbound-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--drain-timeout", spec.drain_timeout])
            .args(["--idle-timeout", spec.idle_timeout])
            .args(["--detect-timeout", "200ms"])
            .arg("--config")
            .arg(config)
            .args(["--log-format", "json"]);
        let mut process = Process::spawn("trellis-proxy", command);
        let listening = process.listening(&spec.service);
        Self {
            process,
            inbound: addr_field(&listening, "inbound"),
            outbound: addr_field(&listening, "outbound"),
            admin: addr_field(&listening, "admin"),
            identity: id.to_string(),
        }
    }

    /// This sidecar as an endpoint other sidecars route to.
    pub fn endpoint(&self) -> EndpointConfig {
        self.labeled(&[])
    }

    /// This sidecar as an endpoint with `labels`, for subsets to select.
    pub fn labeled(&self, labels: &[(&str, &str)]) -> EndpointConfig {
        EndpointConfig {
            address: self.inbound,
            identity: self.identity.clone(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Reads log lines until one matches (or 20 s pass, or the process ends).
    pub fn wait_for_log(
        &mut self,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        self.process.wait_for_log(matches)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn signal(&self, signal: &str) {
        self.process.signal(signal)
    }

    /// Waits for the process to exit on its own; kills it and fails after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        self.process.wait_exit(limit)
    }
}

/// A plain HTTP/1.1 client, as a local app would use.
pub fn http1_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// GETs `path` from an admin server and returns status and body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (http::StatusCode, String) {
    use http_body_util::BodyExt;
    let response = http1_client()
        .get(format!("http://{admin}{path}").parse().unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Scrapes `/metrics` with a Prometheus text parser; fails the test if it does not parse.
pub async fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    let (status, text) = admin_get(admin, "/metrics").await;
    assert_eq!(status, http::StatusCode::OK);
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{text}"))
}

/// The sum of the samples of `name` whose labels include all of `labels`.
pub fn metric_value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}
