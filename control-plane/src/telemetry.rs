//! Logs and metrics of the control plane; `/metrics` on the admin server renders them.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

pub const PROXIES: &str = "trellis_control_plane_proxies_connected";
pub const PUSHES: &str = "trellis_control_plane_config_pushes_total";
pub const PUSH_LATENCY: &str = "trellis_control_plane_push_ack_seconds";
pub const NACKS: &str = "trellis_control_plane_config_nacks_total";
pub const COMPILES: &str = "trellis_control_plane_compiles_total";
pub const COMPILE_DURATION: &str = "trellis_control_plane_compile_duration_seconds";
pub const CERTIFICATES: &str = "trellis_control_plane_certificates_issued_total";
pub const REPORTS: &str = "trellis_control_plane_reports_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("--log {filter:?}: {e}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
            )
            .try_init(),
        LogFormat::Text => registry.with(fmt::layer()).try_init(),
    };
    result.map_err(|e| e.to_string())
}

pub fn install_metrics() -> Result<PrometheusHandle, String> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    metrics::describe_gauge!(PROXIES, "Sidecars with an open Discovery stream");
    metrics::describe_counter!(PUSHES, "Config versions sent to sidecars");
    metrics::describe_histogram!(
        PUSH_LATENCY,
        metrics::Unit::Seconds,
        "Time from sending a config version to its ACK or NACK"
    );
    metrics::describe_counter!(NACKS, "Config versions sidecars refused");
    metrics::describe_counter!(COMPILES, "Compiler rounds");
    metrics::describe_histogram!(
        COMPILE_DURATION,
        metrics::Unit::Seconds,
        "Time to compile every proxy config once"
    );
    metrics::describe_counter!(CERTIFICATES, "Workload certificates issued, by credential");
    metrics::describe_counter!(REPORTS, "Traffic reports received from sidecars");
    Ok(handle)
}
