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

    /// The SPIFFE trust domain; fixed when the CA is first created.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// A sidecar whose heartbeats stop for this long leaves the registry.
    #[arg(long, env = "TRELLIS_HEARTBEAT_TIMEOUT", default_value = "15s", value_parser = nonzero_duration)]
    pub heartbeat_timeout: Duration,

    /// How long the compiler lets a burst of changes settle before it recompiles.
    #[arg(long, env = "TRELLIS_DEBOUNCE", default_value = "50ms", value_parser = duration_or_zero)]
    pub debounce: Duration,

    /// Log lines as JSON (one object per line) or as text for people.
    #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `info,trellis_control_plane=debug`.
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log: String,
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
