//! `trellis-proxy`: the Trellis sidecar.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use trellis_sidecar::{args::Args, telemetry};

fn main() -> ExitCode {
    // `trellis-proxy init` is the pod's iptables step, not a proxy: its own flags.
    if std::env::args_os().nth(1).is_some_and(|a| a == "init") {
        return trellis_sidecar::init::main(std::env::args_os());
    }
    let args = Args::parse_checked();
    if let Err(e) = telemetry::init_logging(args.log_format, &args.log) {
        eprintln!("trellis-proxy: {e}");
        return ExitCode::from(2);
    }
    let metrics = match telemetry::install_metrics() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("trellis-proxy: metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    // One worker is the default: a current-thread runtime, cheaper than a pool of one.
    let runtime = if args.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(args.workers))
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trellis-proxy: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(trellis_sidecar::run(args, metrics));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "trellis-proxy failed");
            eprintln!("trellis-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
