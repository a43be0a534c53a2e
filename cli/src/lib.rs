//! `trellisctl`: the operator CLI. It talks to the control plane's operator HTTP API
//! (see `docs/control-plane.md`) with the bearer token from the data dir; commands
//! are described in `docs/trellisctl.md`.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod api;
pub mod args;
pub mod check_kubernetes;
pub mod checks;
pub mod commands;
pub mod connection;
pub mod dashboard;
pub mod demo;
pub mod error;
pub mod inject;
pub mod install;
pub mod kinds;
pub mod manifests;
pub mod table;
pub mod tap;
pub mod views;

use std::{io::Read, time::SystemTime};

use clap::{ArgMatches, parser::ValueSource};

use crate::{
    api::Api,
    args::{Command, ConnectionArgs, TokenCommand},
};
pub use crate::{
    args::Cli,
    commands::Outcome,
    connection::{Endpoint, Given, Origin},
    error::CliError,
};

/// Where `--api-addr` and `--token` came from when they were given: the flag or its
/// environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GivenOrigins {
    pub api_addr: Origin,
    pub token: Origin,
    /// Whether `--data-dir` (or its variable) was given rather than defaulted.
    pub data_dir_given: bool,
}

impl GivenOrigins {
    /// Reads the origins from the parsed command line; global flags may sit on a
    /// subcommand, so every level is asked.
    pub fn from_matches(matches: &ArgMatches) -> Self {
        let origin = |id: &str, flag: &'static str, env: &'static str| {
            let mut level = Some(matches);
            while let Some(m) = level {
                if m.value_source(id) == Some(ValueSource::EnvVariable) {
                    return Origin::Env(env);
                }
                level = m.subcommand().map(|(_, sub)| sub);
            }
            Origin::Flag(flag)
        };
        let mut data_dir_given = false;
        let mut level = Some(matches);
        while let Some(m) = level {
            data_dir_given |= matches!(
                m.value_source("data_dir"),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            level = m.subcommand().map(|(_, sub)| sub);
        }
        Self {
            api_addr: origin("api_addr", "--api-addr", "TRELLIS_API_ADDR"),
            token: origin("token", "--token", "TRELLIS_API_TOKEN"),
            data_dir_given,
        }
    }
}

/// Runs one command: files and the data dir are read first, then the request is made
/// on a single-threaded runtime.
pub fn run(cli: Cli, origins: GivenOrigins, stdin: &mut dyn Read) -> Result<Outcome, CliError> {
    let Cli {
        connection,
        command,
    } = cli;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let now = now_unix();
    match command {
        Command::Apply(args) => {
            let sources = manifests::read_sources(&args.files, stdin)?;
            manifests::check_sources(&sources)?;
            let api = Api::new(endpoint(connection, origins)?);
            runtime.block_on(commands::apply(&api, manifests::join(&sources)))
        }
        Command::Get(args) => {
            let api = Api::new(endpoint(connection, origins)?);
            runtime.block_on(commands::get(&api, args))
        }
        Command::Delete(args) => {
            let api = Api::new(endpoint(connection, origins)?);
            runtime.block_on(commands::delete(&api, args))
        }
        Command::Stat(args) => {
            let api = Api::new(endpoint(connection, origins)?);
            runtime.block_on(commands::stat(&api, args))
        }
        Command::Tap(args) => {
            let timeout = connection.timeout;
            let api = Api::new(endpoint(connection, origins)?);
            // Lines are printed as they come, so it writes to stdout itself.
            let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
            runtime.block_on(tap::run(&api, args, timeout, &mut stdout, &mut stderr))
        }
        Command::Token(TokenCommand::Create(args)) => {
            let api = Api::new(endpoint(connection, origins)?);
            runtime.block_on(commands::token_create(&api, args, now))
        }
        Command::Canary(args) => {
            let api = Api::new(endpoint(connection, origins)?);
            runtime.block_on(commands::canary(&api, args))
        }
        Command::Demo(args) => {
            let args::DemoArgs {
                duration,
                summary_json,
                rate,
            } = args;
            let options = demo::DemoOptions {
                // The demo's state goes in a temporary folder unless a data dir is given.
                data_dir: origins.data_dir_given.then_some(connection.data_dir),
                duration,
                summary_json,
                rate,
            };
            // The live view is drawn as it goes, so it writes to stdout itself.
            let mut stdout = std::io::stdout();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(CliError::Runtime)?;
            runtime.block_on(demo::run(options, &mut stdout))
        }
        Command::Install(args) => install_command(args),
        Command::Dashboard(args) => {
            let api = Api::new(endpoint(connection, origins)?);
            runtime.block_on(dashboard::run(&api, args))
        }
        Command::Inject(args) => inject::run(args, stdin),
        Command::Check(args) if args.kubernetes => Ok(runtime.block_on(check_kubernetes::run(
            args.kube_api_server.as_deref(),
            &args.namespace,
            now,
        ))),
        Command::Check(_) => {
            let endpoint = endpoint(connection, origins);
            Ok(runtime.block_on(commands::check(endpoint, now)))
        }
    }
}

/// `trellisctl install`: the manifests to stdout, or to `--output`.
fn install_command(args: args::InstallArgs) -> Result<Outcome, CliError> {
    let args::InstallArgs {
        namespace,
        image_tag,
        create_namespace,
        output,
    } = args;
    let yaml = install::render(&install::InstallOptions {
        namespace,
        image_tag,
        create_namespace,
    })?;
    let Some(path) = output else {
        return Ok(Outcome {
            stdout: yaml,
            stderr: String::new(),
            ok: true,
        });
    };
    std::fs::write(&path, yaml).map_err(|e| CliError::Manifest {
        path: path.display().to_string(),
        reason: format!("cannot write the manifests: {e}"),
    })?;
    Ok(Outcome {
        stdout: String::new(),
        stderr: format!("wrote {}\n", path.display()),
        ok: true,
    })
}

/// Resolves the address, then the token, from flags, environment and the data dir.
pub fn endpoint(connection: ConnectionArgs, origins: GivenOrigins) -> Result<Endpoint, CliError> {
    let ConnectionArgs {
        data_dir,
        api_addr,
        token,
        timeout,
    } = connection;
    let GivenOrigins {
        api_addr: addr_given,
        token: token_given,
        data_dir_given: _,
    } = origins;
    let (addr, addr_origin) = connection::resolve_addr(
        api_addr.map(|value| Given {
            value,
            origin: addr_given,
        }),
        &data_dir,
    )?;
    let (token, token_origin) = connection::resolve_token(
        token.map(|value| Given {
            value,
            origin: token_given,
        }),
        &data_dir,
    )?;
    Ok(Endpoint {
        addr,
        addr_origin,
        token,
        token_origin,
        timeout,
    })
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
