//! Command-line flags; each has a `TRELLIS_*` environment variable of the same name.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::telemetry::LogFormat;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "trellis-control-plane",
    version,
    about = "The Trellis control plane: certifies sidecars and pushes them their config"
)]
pub struct Args {
    /// Where the store, the CA and the API token live (created 0700).
    #[arg(long, env = "TRELLIS_DATA_DIR", default_value = "./.trellis")]
    pub data_dir: PathBuf,

    /// The operator HTTP API (`trellisctl`).
    #[arg(long, env = "TRELLIS_API_ADDR", default_value = "127.0.0.1:15011")]
    pub api_addr: SocketAddr,

    /// gRPC over TLS for sidecars: Identity and Discovery.
    #[arg(long, env = "TRELLIS_GRPC_ADDR", default_value = "127.0.0.1:15012")]
    pub grpc_addr: SocketAddr,

    /// Admin server: /live /ready /metrics.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "127.0.0.1:15014")]
    pub admin_addr: SocketAddr,

    /// The read-only web dashboard (docs/observability.md). It has no login of its
    /// own: keep it on loopback, or put an authenticating proxy in front.
    #[arg(
        long,
        env = "TRELLIS_DASHBOARD_ADDR",
        default_value = "127.0.0.1:15015"
    )]
    pub dashboard_addr: SocketAddr,

    /// Where resources and endpoints come from: `universal` (the embedded store and
    /// the sidecars' announcements) or `kubernetes` (CRDs, Services, EndpointSlices and
    /// Pods watched from the cluster; `/v1/apply` is refused, use kubectl apply).
    #[arg(long, env = "TRELLIS_MODE", value_enum, default_value_t = crate::source::Mode::Universal)]
    pub mode: crate::source::Mode,

    /// Kubernetes mode: the API server's URL, instead of the in-cluster service account
    /// or KUBECONFIG. For tests (a fake API server); plain http is allowed.
    #[arg(long, env = "TRELLIS_KUBE_API_SERVER", hide = true)]
    pub kube_api_server: Option<String>,

    /// The SPIFFE trust domain; fixed when the CA is first created.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// A sidecar whose heartbeats stop for this long leaves the registry.
    #[arg(long, env = "TRELLIS_HEARTBEAT_TIMEOUT", default_value = "15s", value_parser = nonzero_duration)]
    pub heartbeat_timeout: Duration,

    /// How long the compiler lets a burst of changes settle before it recompiles.
    #[arg(long, env = "TRELLIS_DEBOUNCE", default_value = "50ms", value_parser = duration_or_zero)]
    pub debounce: Duration,

    /// The sidecar injector's HTTPS listener (`POST /inject`, the mutating admission
    /// webhook) [default: 0.0.0.0:15017 in kubernetes mode; off in universal mode].
    #[arg(long, env = "TRELLIS_WEBHOOK_ADDR", value_name = "ADDR")]
    pub webhook_addr: Option<SocketAddr>,

    /// The DNS names of the webhook's serving certificate, comma-separated: its
    /// Service as the API server dials it (`<service>.<namespace>.svc`).
    #[arg(
        long,
        env = "TRELLIS_WEBHOOK_DNS_NAMES",
        value_delimiter = ',',
        default_value = "trellis-control-plane.trellis-system.svc"
    )]
    pub webhook_dns_names: Vec<String>,

    /// What injection puts into pods, YAML (docs/kubernetes.md): proxy image,
    /// resources, the control plane's address as sidecars dial it, skipped ports.
    #[arg(long, env = "TRELLIS_INJECTION_CONFIG", value_name = "FILE")]
    pub injection_config: Option<PathBuf>,

    /// The proxy image injected pods run (overrides the injection config's).
    #[arg(long, env = "TRELLIS_PROXY_IMAGE", value_name = "IMAGE")]
    pub proxy_image: Option<String>,

    /// Kubernetes mode: where the CA, the leader lease and the webhook configuration are.
    #[command(flatten)]
    pub kubernetes: KubernetesArgs,

    /// Log lines as JSON (one object per line) or as text for people.
    #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `info,trellis_control_plane=debug`.
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log: String,
}

/// Kubernetes mode's own objects; the chart sets each through the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct KubernetesArgs {
    /// The control plane's namespace: its CA Secret, trust anchors and leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "trellis-system")]
    pub namespace: String,

    /// This replica's name, the Lease holder when it leads [default: the host name].
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// The Secret with the CA (created once if absent; docs/kubernetes.md for the keys).
    #[arg(long, env = "TRELLIS_CA_SECRET", default_value = "trellis-ca")]
    pub ca_secret: String,

    /// The Lease replicas elect their leader with.
    #[arg(
        long,
        env = "TRELLIS_LEADER_LEASE",
        default_value = "trellis-control-plane-leader"
    )]
    pub leader_lease: String,

    /// The MutatingWebhookConfiguration whose caBundle the leader keeps current.
    #[arg(
        long,
        env = "TRELLIS_WEBHOOK_CONFIGURATION",
        default_value = "trellis-sidecar-injector"
    )]
    pub webhook_configuration: String,
}

fn duration(s: &str) -> Result<Duration, String> {
    trellis_api::duration::parse(s).map_err(|e| e.to_string())
}

fn nonzero_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be longer than zero".into()),
        d => Ok(d),
    }
}

fn duration_or_zero(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    duration(s)
}
