//! Logs: JSON lines (one event per line, fields flattened) like the mesh's own
//! binaries, or human-readable text.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::args::LogFormat;

pub fn init_logging(format: LogFormat) -> Result<(), String> {
    let filter = EnvFilter::try_new("info").map_err(|e| format!("log filter: {e}"))?;
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
