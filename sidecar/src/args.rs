//! Command-line flags; each has a `TRELLIS_*` environment variable of the same name.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "trellis-proxy",
    version,
    about = "The Trellis sidecar: carries a workload's traffic over mTLS with SPIFFE identities"
)]
pub struct Args {
    /// The local workload's service name (metrics labels, logs).
    #[arg(long, env = "TRELLIS_SERVICE")]
    pub service: String,

    /// The local workload's namespace.
    #[arg(long, env = "TRELLIS_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Where the local app listens; inbound traffic is forwarded there.
    #[arg(long, env = "TRELLIS_APP_ADDR")]
    pub app_addr: SocketAddr,

    /// What the local app speaks: `http` (HTTP/1.1 or h2c; raw TCP to it is refused, so
    /// no peer can forge `x-trellis-peer-id` inside a raw stream) or `tcp` (anything; raw
    /// streams pass through and the app must not trust `x-trellis-peer-id` on them).
    #[arg(long, env = "TRELLIS_APP_PROTOCOL", value_enum, default_value_t = AppKind::Http)]
    pub app_protocol: AppKind,

    /// The mTLS listener peers connect to.
    #[arg(long, env = "TRELLIS_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    pub inbound_addr: SocketAddr,

    /// The plain HTTP listener the local app sends outbound requests to.
    #[arg(long, env = "TRELLIS_OUTBOUND_ADDR", default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,

    /// Admin server: /live /ready /metrics /config /certs, POST /shutdown.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
    pub admin_addr: SocketAddr,

    /// Static mode: a YAML file with the identity files, endpoints and TCP listeners.
    #[arg(long, env = "TRELLIS_CONFIG")]
    pub config: PathBuf,

    /// Log lines as JSON (one object per line) or as text for people.
    #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `info,trellis_sidecar=debug`.
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log: String,

    /// Tokio worker threads. A sidecar should cost one core at most.
    #[arg(long, env = "TRELLIS_WORKERS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,

    /// How long in-flight requests may take to finish after SIGTERM or POST /shutdown.
    #[arg(long, env = "TRELLIS_DRAIN_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// How long a client connection may stay silent: before its first request and
    /// between requests on a kept-alive HTTP/1 connection.
    #[arg(long, env = "TRELLIS_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,

    /// How long the inbound listener waits for a client's first bytes to tell TLS,
    /// HTTP and opaque TCP apart (PERMISSIVE mode); silent clients are treated as TCP.
    #[arg(long, env = "TRELLIS_DETECT_TIMEOUT", default_value = "1s", value_parser = duration)]
    pub detect_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AppKind {
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

fn duration(s: &str) -> Result<Duration, String> {
    trellis_api::duration::parse(s).map_err(|e| e.to_string())
}
