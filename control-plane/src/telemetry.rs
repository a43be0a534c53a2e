//! Logs and metrics of the control plane; `/metrics` on the admin server renders them.

use std::fmt::Write;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};
use trellis_crds::{CanaryPhase, CanaryStatus, SubsetStats};

pub const PROXIES: &str = "trellis_control_plane_proxies_connected";
pub const PUSHES: &str = "trellis_control_plane_config_pushes_total";
pub const PUSH_LATENCY: &str = "trellis_control_plane_push_ack_seconds";
pub const NACKS: &str = "trellis_control_plane_config_nacks_total";
pub const COMPILES: &str = "trellis_control_plane_compiles_total";
pub const COMPILE_DURATION: &str = "trellis_control_plane_compile_duration_seconds";
pub const CERTIFICATES: &str = "trellis_control_plane_certificates_issued_total";
pub const REPORTS: &str = "trellis_control_plane_reports_total";

// Rendered from the compiler and the store at scrape time (`render_state`): current
// state, exact, and nothing left behind by a deleted canary.
pub const BUILD_INFO: &str = "trellis_build_info";
pub const COMPILED_REVISION: &str = "trellis_control_plane_compiled_revision";
pub const CANARY_WEIGHT: &str = "trellis_canary_weight_ratio";
pub const CANARY_PHASE: &str = "trellis_canary_phase";
pub const CANARY_ANALYSIS_TIME: &str = "trellis_canary_analysis_timestamp_seconds";
pub const CANARY_ANALYSIS_VERDICT: &str = "trellis_canary_analysis_verdict";
pub const CANARY_ANALYSIS_REQUESTS: &str = "trellis_canary_analysis_requests";
pub const CANARY_ANALYSIS_SUCCESS: &str = "trellis_canary_analysis_success_ratio";
pub const CANARY_ANALYSIS_P99: &str = "trellis_canary_analysis_p99_seconds";

/// Every phase, so each canary has the same series whatever its phase (a state set).
const PHASES: [CanaryPhase; 5] = [
    CanaryPhase::Pending,
    CanaryPhase::Progressing,
    CanaryPhase::Paused,
    CanaryPhase::Promoted,
    CanaryPhase::RolledBack,
];
/// The verdicts the controller writes (`canary::advance`); anything else is not shown.
const VERDICTS: [&str; 4] = ["passed", "failed", "waiting", "held"];

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

/// One Canary and the status its controller last wrote.
#[derive(Debug, Clone)]
pub struct CanaryState {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub status: CanaryStatus,
}

/// Build info, the compiled revision and every canary's state, in Prometheus text, to
/// append to the recorder's output. Series per canary: a handful, times the canaries
/// applied.
pub fn render_state(compiled_revision: u64, canaries: &[CanaryState]) -> String {
    let mut out = String::new();
    family(
        &mut out,
        BUILD_INFO,
        "The running build: component (control-plane) and version",
        &[format!(
            "{{component=\"control-plane\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )],
    );
    family(
        &mut out,
        COMPILED_REVISION,
        "The store revision the configs sent to sidecars were compiled from",
        &[format!(" {compiled_revision}")],
    );
    if canaries.is_empty() {
        return out;
    }
    let ids: Vec<String> = canaries
        .iter()
        .map(|c| {
            format!(
                "namespace=\"{}\",canary=\"{}\",service=\"{}\"",
                label_value(&c.namespace),
                label_value(&c.name),
                label_value(&c.service)
            )
        })
        .collect();
    let each = |sample: &dyn Fn(&str, &CanaryStatus) -> Vec<String>| -> Vec<String> {
        ids.iter()
            .zip(canaries)
            .flat_map(|(id, c)| sample(id, &c.status))
            .collect()
    };
    family(
        &mut out,
        CANARY_WEIGHT,
        "Share of the service's traffic the canary subset takes (0 to 1)",
        &each(&|id, s| vec![format!("{{{id}}} {}", f64::from(s.weight) / 100.0)]),
    );
    family(
        &mut out,
        CANARY_PHASE,
        "1 for the canary's phase, 0 for the others",
        &each(&|id, s| {
            PHASES
                .iter()
                .map(|p| format!("{{{id},phase=\"{p:?}\"}} {}", u8::from(*p == s.phase)))
                .collect()
        }),
    );
    let analysed: Vec<(&String, &trellis_crds::AnalysisResult)> = ids
        .iter()
        .zip(canaries)
        .filter_map(|(id, c)| Some((id, c.status.last_analysis.as_ref()?)))
        .collect();
    if analysed.is_empty() {
        return out;
    }
    let per = |sample: &dyn Fn(&str, &trellis_crds::AnalysisResult) -> Vec<String>| {
        analysed
            .iter()
            .flat_map(|(id, a)| sample(id, a))
            .collect::<Vec<_>>()
    };
    family(
        &mut out,
        CANARY_ANALYSIS_TIME,
        "When the canary's latest analysis ran, unix seconds",
        &per(&|id, a| {
            time::OffsetDateTime::parse(&a.at, &time::format_description::well_known::Rfc3339)
                .map(|at| vec![format!("{{{id}}} {}", at.unix_timestamp())])
                .unwrap_or_default()
        }),
    );
    family(
        &mut out,
        CANARY_ANALYSIS_VERDICT,
        "1 for the verdict of the canary's latest analysis (passed, failed, waiting: too few requests, held: the stable subset fails too), 0 for the others",
        &per(&|id, a| {
            VERDICTS
                .iter()
                .map(|v| format!("{{{id},verdict=\"{v}\"}} {}", u8::from(a.verdict == *v)))
                .collect()
        }),
    );
    let subsets = |a: &trellis_crds::AnalysisResult| {
        [("canary", a.canary.clone()), ("stable", a.stable.clone())]
    };
    let by_subset = |value: fn(&SubsetStats) -> Option<f64>| {
        per(&|id, a| {
            subsets(a)
                .iter()
                .filter_map(|(subset, stats)| {
                    Some(format!("{{{id},subset=\"{subset}\"}} {}", value(stats)?))
                })
                .collect()
        })
    };
    family(
        &mut out,
        CANARY_ANALYSIS_REQUESTS,
        "Requests to each subset (canary, stable) over the latest analysis interval",
        &by_subset(|s| Some(s.requests as f64)),
    );
    family(
        &mut out,
        CANARY_ANALYSIS_SUCCESS,
        "Share of non-5xx answers of each subset over the latest analysis interval (0 to 1)",
        &by_subset(|s| s.success_rate.map(|r| r / 100.0)),
    );
    family(
        &mut out,
        CANARY_ANALYSIS_P99,
        "p99 latency of each subset over the latest analysis interval",
        &by_subset(|s| s.p99_ms.map(|ms| ms / 1e3)),
    );
    out
}

/// One gauge family; each sample is its labels and value (`{a="b"} 1` or ` 1`).
fn family(out: &mut String, name: &str, help: &str, samples: &[String]) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for sample in samples {
        let _ = writeln!(out, "{name}{sample}");
    }
    out.push('\n');
}

/// Escapes a Prometheus label value.
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_crds::AnalysisResult;

    fn canary(phase: CanaryPhase, analysis: Option<AnalysisResult>) -> CanaryState {
        CanaryState {
            namespace: "shop".into(),
            name: "web\"x".into(),
            service: "web".into(),
            status: CanaryStatus {
                phase,
                weight: 25,
                last_analysis: analysis,
                ..CanaryStatus::default()
            },
        }
    }

    #[test]
    fn state_renders_build_info_revision_and_canaries() {
        let bare = render_state(7, &[]);
        assert!(
            bare.contains("\ntrellis_control_plane_compiled_revision 7\n"),
            "{bare}"
        );
        assert!(
            bare.contains(&format!(
                "trellis_build_info{{component=\"control-plane\",version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{bare}"
        );
        assert!(!bare.contains("canary"), "{bare}");

        let analysis = AnalysisResult {
            at: "2026-01-01T00:00:10Z".into(),
            weight: 25,
            canary: SubsetStats {
                requests: 40,
                success_rate: Some(97.5),
                p99_ms: Some(120.0),
            },
            stable: SubsetStats {
                requests: 0,
                success_rate: None,
                p99_ms: None,
            },
            verdict: "failed".into(),
        };
        let text = render_state(7, &[canary(CanaryPhase::RolledBack, Some(analysis))]);
        let id = r#"namespace="shop",canary="web\"x",service="web""#;
        for line in [
            format!("trellis_canary_weight_ratio{{{id}}} 0.25"),
            format!("trellis_canary_phase{{{id},phase=\"RolledBack\"}} 1"),
            format!("trellis_canary_phase{{{id},phase=\"Progressing\"}} 0"),
            format!("trellis_canary_analysis_timestamp_seconds{{{id}}} 1767225610"),
            format!("trellis_canary_analysis_verdict{{{id},verdict=\"failed\"}} 1"),
            format!("trellis_canary_analysis_verdict{{{id},verdict=\"passed\"}} 0"),
            format!("trellis_canary_analysis_requests{{{id},subset=\"canary\"}} 40"),
            format!("trellis_canary_analysis_requests{{{id},subset=\"stable\"}} 0"),
            format!("trellis_canary_analysis_success_ratio{{{id},subset=\"canary\"}} 0.975"),
            format!("trellis_canary_analysis_p99_seconds{{{id},subset=\"canary\"}} 0.12"),
        ] {
            assert!(text.contains(&format!("{line}\n")), "no {line} in\n{text}");
        }
        // A subset without numbers has no success ratio or p99, not a made-up one.
        assert!(!text.contains(
            r#"success_ratio{namespace="shop",canary="web\"x",service="web",subset="stable"}"#
        ));
        // Without an analysis yet, only weight and phase.
        let fresh = render_state(7, &[canary(CanaryPhase::Progressing, None)]);
        assert!(fresh.contains("trellis_canary_weight_ratio{"), "{fresh}");
        assert!(!fresh.contains("analysis"), "{fresh}");
    }
}
