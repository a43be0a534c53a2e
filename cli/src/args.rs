//! Command-line flags. The connection flags are global: they may come before or after
//! the command, and each has a `TRELLIS_*` environment variable.

use std::{path::PathBuf, time::Duration};

use crate::kinds::{Kind, Target};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "trellisctl",
    version,
    about = "Operate a Trellis mesh through the control plane's API",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// The control plane's data dir; its `api-addr` and `api-token` files are read
    /// when --api-addr and --token are not given.
    #[arg(
        long,
        global = true,
        env = "TRELLIS_DATA_DIR",
        default_value = "./.trellis",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,

    /// The operator API, `ip:port` [default: <data-dir>/api-addr, else 127.0.0.1:15011].
    #[arg(long, global = true, env = "TRELLIS_API_ADDR", value_name = "ADDR")]
    pub api_addr: Option<String>,

    /// The API's bearer token [default: the contents of <data-dir>/api-token].
    #[arg(
        long,
        global = true,
        env = "TRELLIS_API_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// How long a request may take, connecting included.
    #[arg(
        long,
        global = true,
        env = "TRELLIS_API_TIMEOUT",
        default_value = "10s",
        value_parser = duration
    )]
    pub timeout: Duration,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Apply resources from files, directories or stdin, all or nothing.
    Apply(ApplyArgs),
    /// List resources, endpoints or proxies, or show one resource.
    Get(GetArgs),
    /// Delete a resource.
    Delete(DeleteArgs),
    /// Requests, success rate and p99 per service, route and backend (or per caller →
    /// service edge with --edges), as the sidecars reported them over a recent window.
    Stat(StatArgs),
    /// Stream the requests a service's sidecars handle, in and out, as they happen.
    Tap(TapArgs),
    /// Join tokens for sidecars.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Check that the control plane, its CA and every proxy are healthy; with
    /// --kubernetes, that an installation in a cluster is.
    Check(CheckArgs),
    /// Steer a canary: pause or resume its progress, promote or abort it now.
    Canary(CanaryArgs),
    /// Run the marketplace inside a mesh on this machine and show it live.
    Demo(DemoArgs),
    /// Print the control plane's web dashboard URL and open it in a browser.
    Dashboard(DashboardArgs),
    /// Print the Kubernetes manifests of helm/trellis's defaults (CRDs included),
    /// rendered without helm, for `kubectl apply -f -`.
    Install(InstallArgs),
    /// Add the Trellis proxy to the pods of Kubernetes manifests, offline, as the
    /// admission webhook would; prints the manifests for `kubectl apply -f -`.
    Inject(InjectArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Check the installation in a Kubernetes cluster (CRDs, control plane
    /// Deployment, webhook, trust anchors) instead of the control plane's API.
    #[arg(long)]
    pub kubernetes: bool,

    /// The control plane's namespace (with --kubernetes).
    #[arg(long, value_name = "NS", default_value = "trellis-system")]
    pub namespace: String,

    /// The Kubernetes API server's URL [default: KUBECONFIG, ~/.kube/config or
    /// in-cluster, as kubectl finds them].
    #[arg(
        long,
        env = "TRELLIS_KUBE_API_SERVER",
        value_name = "URL",
        requires = "kubernetes"
    )]
    pub kube_api_server: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// A YAML or JSON file of one or more documents, or `-` for stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
    pub file: PathBuf,

    /// The proxy image [default: the injection config's, else the release's].
    #[arg(long, value_name = "IMAGE")]
    pub proxy_image: Option<String>,

    /// The control plane's gRPC address as sidecars dial it [default:
    /// https://trellis-control-plane.trellis-system.svc:15012].
    #[arg(long, value_name = "ADDR")]
    pub control_plane_addr: Option<String>,

    /// The mesh's trust domain [default: cluster.local].
    #[arg(long, value_name = "NAME")]
    pub trust_domain: Option<String>,

    /// The injection settings the control plane uses (its --injection-config), YAML.
    #[arg(long, value_name = "FILE")]
    pub injection_config: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DashboardArgs {
    /// Only print the URL; do not start a browser.
    #[arg(long)]
    pub no_open: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// The namespace the control plane runs in.
    #[arg(short, long, value_name = "NS", default_value = "trellis-system")]
    pub namespace: String,

    /// The tag of the control plane and proxy images [default: this trellisctl's version].
    #[arg(long, value_name = "TAG")]
    pub image_tag: Option<String>,

    /// Also emit the namespace itself, first.
    #[arg(long)]
    pub create_namespace: bool,

    /// Write the manifests to this file instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Run this long without the live view, then print a summary and exit 0 only if
    /// the mesh behaved as the scenario expects, e.g. 60s [default: until Ctrl-C].
    #[arg(long, value_parser = duration, value_name = "DURATION")]
    pub duration: Option<Duration>,

    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,

    /// Customer requests per second through the gateway.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=2000))]
    pub rate: u32,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CanaryArgs {
    #[arg(value_enum)]
    pub action: CanaryAction,

    /// The Canary resource's name.
    pub name: String,

    /// The namespace.
    #[arg(short, long, value_name = "NS", default_value = "default")]
    pub namespace: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CanaryAction {
    /// Hold the canary at its weight until resumed.
    Pause,
    /// Go on from where it was paused; the step's interval starts again.
    Resume,
    /// Send all traffic to the canary now.
    Promote,
    /// Send all traffic back to the stable subset now.
    Abort,
}

impl CanaryAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Promote => "promote",
            Self::Abort => "abort",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ApplyArgs {
    /// A YAML or JSON file, a directory (every *.yaml, *.yml and *.json under it), or
    /// `-` for stdin. May be repeated; everything is applied as one batch.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR|-",
        required = true
    )]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct GetArgs {
    /// meshconfig (mc), destinationpolicy (dp), trafficroute (tr), authorizationpolicy
    /// (authz), canary (can), endpoints (ep), proxies (px) or shadow (route mirrors'
    /// comparisons); plurals work too.
    #[arg(value_parser = Target::parse)]
    pub kind: Target,

    /// One resource by name; for endpoints, proxies and shadows, only this service's.
    pub name: Option<String>,

    /// The namespace [default: default].
    #[arg(short, long, value_name = "NS", conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,

    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table, value_name = "FORMAT")]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    /// The resource's kind, under any of the names `get` takes.
    #[arg(value_parser = Kind::parse)]
    pub kind: Kind,

    pub name: String,

    /// The namespace (ignored for meshconfig).
    #[arg(short, long, value_name = "NS", default_value = "default")]
    pub namespace: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatArgs {
    /// Only this service (the one called).
    pub service: Option<String>,

    /// The same as the SERVICE argument.
    #[arg(long = "service", value_name = "SERVICE", conflicts_with = "service")]
    pub service_flag: Option<String>,

    /// One row per caller → service edge instead of per route and backend.
    #[arg(long)]
    pub edges: bool,

    /// The namespace of the services called [default: default].
    #[arg(short, long, value_name = "NS", conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,

    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,

    /// How far back to look, e.g. 30s, 5m, 1h (at most 1h: what the control plane keeps).
    #[arg(long, default_value = "60s", value_parser = window, value_name = "DURATION")]
    pub window: String,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table, value_name = "FORMAT")]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TapArgs {
    /// The service whose sidecars to tap: what they receive and what they send.
    pub service: String,

    /// The service's namespace.
    #[arg(short, long, value_name = "NS", default_value = "default")]
    pub namespace: String,

    /// Stop after this many requests [default: no limit].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max: Option<u64>,

    /// Stop after this long, e.g. 30s [default: until Ctrl-C].
    #[arg(long, value_parser = duration, value_name = "DURATION")]
    pub duration: Option<Duration>,

    /// One line per request: aligned text, or the sidecar's JSON with the proxy's
    /// instance added.
    #[arg(short, long, value_enum, default_value_t = TapFormat::Table, value_name = "FORMAT")]
    pub output: TapFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TapFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokenCommand {
    /// Mint a join token for a sidecar of one service; prints only the token.
    Create(TokenCreateArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct TokenCreateArgs {
    /// The service the sidecar will run for; its identity is ns/<namespace>/sa/<service>.
    #[arg(long, value_name = "NAME")]
    pub service: String,

    /// The service's namespace [default: default].
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,

    /// How long the token may be used, e.g. 10m, 1h, 7d [default: 1h].
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
    Yaml,
}

/// Checked here for a clap error naming `--window`; sent as written.
fn window(value: &str) -> Result<String, String> {
    duration(value).map(|_| value.to_string())
}

fn duration(value: &str) -> Result<Duration, String> {
    match trellis_api::duration::parse(value) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn the_flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn connection_flags_go_before_or_after_the_command() {
        let cli =
            Cli::try_parse_from(["trellisctl", "get", "tr", "--api-addr", "127.0.0.1:1"]).unwrap();
        assert_eq!(cli.connection.api_addr.as_deref(), Some("127.0.0.1:1"));
        let cli = Cli::try_parse_from(["trellisctl", "--timeout", "2s", "check"]).unwrap();
        assert_eq!(cli.connection.timeout, Duration::from_secs(2));
    }

    #[test]
    fn stat_takes_the_service_as_an_argument_or_a_flag_but_not_both() {
        let cli =
            Cli::try_parse_from(["trellisctl", "stat", "--service", "web", "--edges"]).unwrap();
        let Command::Stat(args) = cli.command else {
            panic!("not stat: {cli:?}")
        };
        assert_eq!(
            (args.service, args.service_flag.as_deref(), args.edges),
            (None, Some("web"), true)
        );
        let e = Cli::try_parse_from(["trellisctl", "stat", "web", "--service", "pay"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn tap_needs_a_service_and_a_positive_max() {
        let cli = Cli::try_parse_from([
            "trellisctl",
            "tap",
            "payment",
            "-n",
            "shop",
            "--max",
            "3",
            "--duration",
            "5s",
            "-o",
            "json",
        ])
        .unwrap();
        let Command::Tap(args) = cli.command else {
            panic!("not tap: {cli:?}")
        };
        assert_eq!(
            (args.service.as_str(), args.namespace.as_str(), args.max),
            ("payment", "shop", Some(3))
        );
        assert_eq!(args.duration, Some(Duration::from_secs(5)));
        assert_eq!(args.output, TapFormat::Json);
        for bad in [
            &["trellisctl", "tap"][..],
            &["trellisctl", "tap", "web", "--max", "0"],
            &["trellisctl", "tap", "web", "-o", "yaml"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn namespace_and_all_namespaces_exclude_each_other() {
        let e = Cli::try_parse_from(["trellisctl", "get", "tr", "-n", "shop", "-A"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }
}
