//! `trellis-control-plane`: certifies sidecars and pushes them their config.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use trellis_control_plane::{args::Args, server, telemetry};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = telemetry::init_logging(args.log_format, &args.log) {
        eprintln!("trellis-control-plane: {e}");
        return ExitCode::from(2);
    }
    let metrics = match telemetry::install_metrics() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("trellis-control-plane: metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trellis-control-plane: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(server::run(args, metrics));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "trellis-control-plane failed");
            eprintln!("trellis-control-plane: {e}");
            ExitCode::FAILURE
        }
    }
}
