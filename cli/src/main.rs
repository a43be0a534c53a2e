//! `trellisctl`: operate a Trellis mesh through the control plane's API.

#![forbid(unsafe_code)]

use std::{
    io::{self, Write},
    process::ExitCode,
};

use clap::{CommandFactory, FromArgMatches, error::ErrorKind};
use trellis_cli::{Cli, GivenOrigins};

fn main() -> ExitCode {
    // A bug must still end as one line, never a backtrace an operator has to read.
    std::panic::set_hook(Box::new(|info| {
        let report = info.to_string().replace('\n', " ");
        eprintln!("error: trellisctl failed unexpectedly, please report it: {report}");
    }));
    let matches = match Cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(e) => return usage_error(&e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let origins = GivenOrigins::from_matches(&matches);
    match trellis_cli::run(cli, origins, &mut io::stdin().lock()) {
        Ok(outcome) => {
            // A closed pipe (`trellisctl get proxies | head -1`) is not worth an error.
            let _ = io::stdout().lock().write_all(outcome.stdout.as_bytes());
            let _ = io::stderr().lock().write_all(outcome.stderr.as_bytes());
            if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version print as clap writes them; a usage mistake becomes one line,
/// clap's message without the usage block that follows it.
fn usage_error(e: &clap::Error) -> ExitCode {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::FAILURE;
    }
    let rendered = e.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.is_empty())
        .collect();
    let mut line = message.join(" ");
    if !line.starts_with("error:") {
        line = format!("error: {line}");
    }
    eprintln!("{line} (see trellisctl --help)");
    ExitCode::FAILURE
}
