//! `marketplace SERVICE`: one service of the demo marketplace.

use std::process::ExitCode;

use clap::Parser;
use trellis_demo_services::{args::Args, telemetry};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = telemetry::init_logging(args.log_format) {
        eprintln!("marketplace: {e}");
        return ExitCode::from(2);
    }
    // One thread: a demo service does little work, and a dozen of them share the
    // machine with their sidecars.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("marketplace: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let service = args.service.as_str();
    let result = runtime.block_on(trellis_demo_services::run(args));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, service, "marketplace failed");
            eprintln!("marketplace {service}: {e}");
            ExitCode::FAILURE
        }
    }
}
