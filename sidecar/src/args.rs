//! Command-line flags; each has a `TRELLIS_*` environment variable of the same name.

use std::{collections::BTreeMap, ffi::OsString, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{CommandFactory, FromArgMatches, error::ErrorKind, parser::ValueSource};
use trellis_ca::TrustDomain;

pub use crate::control::ControlPlaneAddr;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "trellis-proxy",
    version,
    about = "The Trellis sidecar: carries a workload's traffic over mTLS with SPIFFE identities",
    after_help = "On Kubernetes, `trellis-proxy init` installs a pod's iptables redirects \
                  first (see `trellis-proxy init --help`).",
    group(clap::ArgGroup::new("source").required(true).args(["config", "control_plane"]))
)]
pub struct Args {
    /// `sidecar`: beside one app, with inbound and outbound listeners. `gateway`: the
    /// mesh's edge, routing external HTTP on `--listen` by its own service's routes.
    #[arg(long, env = "TRELLIS_MODE", value_enum, default_value_t = Mode::Sidecar)]
    pub mode: Mode,

    /// Gateway mode only: the plain HTTP/1.1 and h2c listener external clients call.
    #[arg(long, env = "TRELLIS_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// The local workload's service name (metrics labels, logs).
    #[arg(long, env = "TRELLIS_SERVICE")]
    pub service: String,

    /// The local workload's namespace.
    #[arg(long, env = "TRELLIS_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Where the local app listens; inbound traffic is forwarded there. Required in
    /// sidecar mode; a gateway fronts no app.
    #[arg(long, env = "TRELLIS_APP_ADDR", value_name = "ADDR")]
    pub app_addr: Option<SocketAddr>,

    /// What the local app speaks: `http` (HTTP/1.1 or h2c; raw TCP to it is refused, so
    /// no peer can forge `x-trellis-peer-id` inside a raw stream) or `tcp` (anything; raw
    /// streams pass through and the app must not trust `x-trellis-peer-id` on them).
    #[arg(long, env = "TRELLIS_APP_PROTOCOL", value_enum, default_value_t = AppKind::Http)]
    pub app_protocol: AppKind,

    /// The mTLS listener peers connect to.
    #[arg(long, env = "TRELLIS_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    pub inbound_addr: SocketAddr,

    /// The plain HTTP listener the local app sends outbound requests to.
    #[arg(long, env = "TRELLIS_OUTBOUND_ADDR", default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,

    /// Admin server: /live /ready /metrics /config /certs, POST /shutdown.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
    pub admin_addr: SocketAddr,

    /// The app's HTTP probes the admin port relays (set by the Kubernetes injector):
    /// JSON, `{"/app-probe/web/readiness": {"port": 8080, "path": "/ready"}}`.
    #[arg(long, env = "TRELLIS_APP_PROBES", value_name = "JSON", value_parser = crate::app_probe::AppProbes::parse)]
    pub app_probes: Option<crate::app_probe::AppProbes>,

    /// Static mode: a YAML file with the identity files, endpoints and TCP listeners.
    /// Exactly one of `--config` and `--control-plane`.
    #[arg(long, env = "TRELLIS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub control: ControlPlaneArgs,

    /// Log lines as JSON (one object per line) or as text for people.
    #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `info,trellis_sidecar=debug`.
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log: String,

    /// Tokio worker threads. A sidecar should cost one core at most.
    #[arg(long, env = "TRELLIS_WORKERS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,

    /// How long in-flight requests may take to finish after SIGTERM or POST /shutdown.
    #[arg(long, env = "TRELLIS_DRAIN_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// How long a client connection may stay silent: before its first request and
    /// between requests on a kept-alive HTTP/1 connection.
    #[arg(long, env = "TRELLIS_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,

    /// How long the inbound listener waits for a client's first bytes to tell TLS,
    /// HTTP and opaque TCP apart (PERMISSIVE mode); silent clients are treated as TCP.
    #[arg(long, env = "TRELLIS_DETECT_TIMEOUT", default_value = "1s", value_parser = duration)]
    pub detect_timeout: Duration,
}

/// Control-plane mode: identity from `Identity.Certify`, config from
/// `Discovery.Subscribe`. Every flag but `--control-plane` needs `--control-plane`.
/// The first certificate is bought with exactly one credential: a join token
/// (universal mode) or a projected ServiceAccount token (Kubernetes).
#[derive(Debug, Clone, clap::Args)]
#[command(group(
    clap::ArgGroup::new("credential").args(["join_token_file", "token_file"]).multiple(false)
))]
pub struct ControlPlaneArgs {
    /// The control plane's gRPC address: `host:port` or `https://host:port` (TLS only).
    #[arg(
        long,
        env = "TRELLIS_CONTROL_PLANE",
        value_name = "ADDR",
        requires_all = ["trust_anchors", "credential"]
    )]
    pub control_plane: Option<ControlPlaneAddr>,

    /// PEM roots the control plane's certificate must chain to (its `trust-anchors.pem`).
    #[arg(
        long,
        env = "TRELLIS_TRUST_ANCHORS",
        value_name = "FILE",
        requires = "control_plane"
    )]
    pub trust_anchors: Option<PathBuf>,

    /// A file holding the join token (`trellisctl token create --service NAME`); read
    /// once at start, never logged.
    #[arg(
        long,
        env = "TRELLIS_JOIN_TOKEN_FILE",
        value_name = "FILE",
        requires = "control_plane"
    )]
    pub join_token_file: Option<PathBuf>,

    /// Kubernetes: a projected ServiceAccount token (audience `trellis`), e.g.
    /// `/var/run/secrets/trellis/token`. Read again for every certificate request,
    /// since the kubelet rotates it; the id is the pod's namespace and service account.
    #[arg(
        long,
        env = "TRELLIS_TOKEN_FILE",
        value_name = "FILE",
        requires = "control_plane"
    )]
    pub token_file: Option<PathBuf>,

    /// The mesh's trust domain, when the join token does not state it
    /// [default: cluster.local].
    #[arg(
        long,
        env = "TRELLIS_TRUST_DOMAIN",
        value_name = "NAME",
        value_parser = trust_domain,
        requires = "control_plane"
    )]
    pub trust_domain: Option<TrustDomain>,

    /// This instance's labels, `k=v,k=v` (e.g. `version=v2`); subsets select on them.
    #[arg(
        long,
        env = "TRELLIS_LABELS",
        value_name = "K=V,...",
        value_parser = labels,
        requires = "control_plane"
    )]
    pub labels: Option<Labels>,

    /// This instance's name in the registry [default: <service>-<8 random hex>].
    #[arg(
        long,
        env = "TRELLIS_INSTANCE",
        value_name = "NAME",
        requires = "control_plane"
    )]
    pub instance: Option<String>,

    /// The address peers dial to reach the inbound listener [default: the bound
    /// inbound address, 0.0.0.0 replaced by 127.0.0.1].
    #[arg(
        long,
        env = "TRELLIS_ADVERTISE_ADDR",
        value_name = "ADDR",
        requires = "control_plane"
    )]
    pub advertise_addr: Option<SocketAddr>,

    /// How often the sidecar tells the control plane it is alive, with its app's health.
    #[arg(
        long,
        env = "TRELLIS_HEARTBEAT_INTERVAL",
        default_value = "5s",
        value_parser = positive_duration
    )]
    pub heartbeat_interval: Duration,

    /// How often the sidecar sends the control plane what its outbound side did
    /// (requests per route and backend with latency, mirror outcomes), for canary
    /// analysis and `trellisctl stat`.
    #[arg(
        long,
        env = "TRELLIS_REPORT_INTERVAL",
        default_value = "10s",
        value_parser = positive_duration
    )]
    pub report_interval: Duration,

    /// The certificate lifetime to ask for; absent or 0 asks for the mesh default
    /// (MeshConfig certTTL).
    #[arg(
        long,
        env = "TRELLIS_CERT_TTL",
        value_name = "DURATION",
        value_parser = duration_or_zero,
        requires = "control_plane"
    )]
    pub cert_ttl: Option<Duration>,
}

/// Labels in flag order; a key given twice is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(pub BTreeMap<String, String>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AppKind {
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Sidecar,
    Gateway,
}

/// What the proxy fronts, as `--mode` and the flags that go with it say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Beside the app at `app_addr`.
    Sidecar { app_addr: SocketAddr },
    /// The mesh's edge, taking external requests on `listen`.
    Gateway { listen: SocketAddr },
}

/// A flag that is missing or out of place for the `--mode` given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FlagError {
    pub kind: ErrorKind,
    pub message: String,
}

impl FlagError {
    fn missing(message: &str) -> Self {
        Self {
            kind: ErrorKind::MissingRequiredArgument,
            message: message.into(),
        }
    }

    fn conflict(message: String) -> Self {
        Self {
            kind: ErrorKind::ArgumentConflict,
            message,
        }
    }
}

/// Flags (by clap id) a gateway has no use for: it fronts no app and peers never call it.
const SIDECAR_ONLY: &[(&str, &str)] = &[
    ("app_addr", "--app-addr"),
    ("app_protocol", "--app-protocol"),
    ("inbound_addr", "--inbound-addr"),
    ("outbound_addr", "--outbound-addr"),
    ("detect_timeout", "--detect-timeout"),
    ("advertise_addr", "--advertise-addr"),
];

impl Args {
    /// `Args::parse` plus what clap's attributes cannot say: which flags each `--mode`
    /// takes. A bad combination exits 2 naming the flag, as clap's own errors do.
    pub fn parse_checked() -> Self {
        Self::try_parse_checked_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    pub fn try_parse_checked_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut command = Self::command();
        let matches = command.try_get_matches_from_mut(args)?;
        let parsed = Self::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
        // A default is no choice of the user's; only a flag or variable they set is
        // refused.
        let given = |id: &str| {
            matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        if parsed.mode == Mode::Gateway
            && let Some((_, flag)) = SIDECAR_ONLY.iter().find(|(id, _)| given(id))
        {
            return Err(command.error(
                ErrorKind::ArgumentConflict,
                format!(
                    "{flag} is for --mode sidecar: a gateway fronts no app and peers never \
                     call it"
                ),
            ));
        }
        parsed
            .role()
            .map_err(|e| command.error(e.kind, e.message))?;
        Ok(parsed)
    }

    /// The role the flags give, or which flag is missing or out of place.
    pub fn role(&self) -> Result<Role, FlagError> {
        match (self.mode, self.app_addr, self.listen) {
            (Mode::Sidecar, _, Some(_)) => Err(FlagError::conflict(
                "--listen is the gateway's listener: give --mode gateway with it (a \
                 sidecar's app calls --outbound-addr)"
                    .into(),
            )),
            (Mode::Sidecar, Some(app_addr), None) => Ok(Role::Sidecar { app_addr }),
            (Mode::Sidecar, None, None) => Err(FlagError::missing(
                "--app-addr is required in sidecar mode: where the local app listens",
            )),
            (Mode::Gateway, _, None) => Err(FlagError::missing(
                "--mode gateway needs --listen ADDR: the listener external clients call",
            )),
            (Mode::Gateway, Some(_), Some(_)) => Err(FlagError::conflict(
                "--app-addr is for --mode sidecar: a gateway fronts no app".into(),
            )),
            (Mode::Gateway, None, Some(listen)) => Ok(Role::Gateway { listen }),
        }
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    trellis_api::duration::parse(s).map_err(|e| e.to_string())
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        Duration::ZERO => Err("must be longer than zero".into()),
        d => Ok(d),
    }
}

fn duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    duration(s)
}

fn trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::parse(s).map_err(|e| e.to_string())
}

/// `k=v,k=v`; keys and values as Kubernetes label values allow them: letters, digits,
/// `-`, `_`, `.` (and `/` in keys, for prefixes such as `app.kubernetes.io/version`).
fn labels(s: &str) -> Result<Labels, String> {
    let mut labels = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let (key, value) = (key.trim(), value.trim());
        let ok = |s: &str, extra: &[char]| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c) || extra.contains(&c))
        };
        if key.is_empty() || !ok(key, &['/']) {
            return Err(format!(
                "label key {key:?} must be letters, digits, '-', '_', '.' or '/'"
            ));
        }
        if !ok(value, &[]) {
            return Err(format!(
                "label {key}'s value {value:?} must be letters, digits, '-', '_' or '.'"
            ));
        }
        if labels.insert(key.to_string(), value.to_string()).is_some() {
            return Err(format!("label {key:?} is given twice"));
        }
    }
    Ok(Labels(labels))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let base = [
            "trellis-proxy",
            "--service",
            "a",
            "--app-addr",
            "127.0.0.1:9",
        ];
        Args::try_parse_from(base.iter().chain(extra))
    }

    const CONTROL: &[&str] = &[
        "--control-plane",
        "127.0.0.1:15012",
        "--trust-anchors",
        "ca.pem",
        "--join-token-file",
        "token",
    ];

    #[test]
    fn exactly_one_mode() {
        let static_mode = parse(&["--config", "proxy.yaml"]).unwrap();
        assert!(static_mode.config.is_some() && static_mode.control.control_plane.is_none());
        let control = parse(CONTROL).unwrap();
        assert!(control.config.is_none());
        assert_eq!(control.control.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(control.control.report_interval, Duration::from_secs(10));
        assert_eq!(control.control.cert_ttl, None);

        let neither = parse(&[]).unwrap_err().to_string();
        assert!(
            neither.contains("--config") && neither.contains("--control-plane"),
            "{neither}"
        );
        let both = parse(&[CONTROL, &["--config", "proxy.yaml"]].concat())
            .unwrap_err()
            .to_string();
        assert!(both.contains("cannot be used with"), "{both}");
    }

    #[test]
    fn control_plane_needs_its_anchors_and_token_and_vice_versa() {
        let error = parse(&["--control-plane", "cp:15012", "--join-token-file", "t"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--trust-anchors"), "{error}");
        let error = parse(&["--control-plane", "cp:15012", "--trust-anchors", "ca.pem"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--join-token-file") && error.contains("--token-file"),
            "{error}"
        );
        let error = parse(&[CONTROL, &["--token-file", "/var/run/secrets/trellis/token"]].concat())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--join-token-file") && error.contains("cannot be used with"),
            "{error}"
        );
        let kubernetes = parse(&[
            "--control-plane",
            "cp:15012",
            "--trust-anchors",
            "ca.pem",
            "--token-file",
            "/var/run/secrets/trellis/token",
        ])
        .unwrap();
        assert_eq!(
            kubernetes.control.token_file.as_deref(),
            Some(std::path::Path::new("/var/run/secrets/trellis/token"))
        );
        assert!(kubernetes.control.join_token_file.is_none());
        let error = parse(&["--config", "proxy.yaml", "--labels", "version=v2"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--control-plane"), "{error}");
    }

    #[test]
    fn gateway_mode_takes_listen_and_refuses_what_only_a_sidecar_uses() {
        let checked = |extra: &[&str]| {
            let base = ["trellis-proxy", "--service", "edge"];
            Args::try_parse_checked_from(base.iter().chain(CONTROL).chain(extra))
        };
        let gateway = checked(&["--mode", "gateway", "--listen", "127.0.0.1:8080"]).unwrap();
        assert_eq!(
            gateway.role().unwrap(),
            Role::Gateway {
                listen: "127.0.0.1:8080".parse().unwrap()
            }
        );
        let sidecar = checked(&["--app-addr", "127.0.0.1:9"]).unwrap();
        assert_eq!(sidecar.mode, Mode::Sidecar);
        assert_eq!(
            sidecar.role().unwrap(),
            Role::Sidecar {
                app_addr: "127.0.0.1:9".parse().unwrap()
            }
        );

        let gateway_with = |extra: &[&'static str]| {
            [
                &["--mode", "gateway", "--listen", "127.0.0.1:8080"][..],
                extra,
            ]
            .concat()
        };
        use ErrorKind::{ArgumentConflict, InvalidValue, MissingRequiredArgument};
        let cases = [
            (
                vec!["--mode", "gateway"],
                "--listen",
                MissingRequiredArgument,
            ),
            (
                vec!["--app-addr", "127.0.0.1:9", "--listen", "127.0.0.1:8080"],
                "--listen",
                ArgumentConflict,
            ),
            (vec![], "--app-addr", MissingRequiredArgument),
            (
                gateway_with(&["--app-addr", "127.0.0.1:9"]),
                "--app-addr",
                ArgumentConflict,
            ),
            (
                gateway_with(&["--inbound-addr", "127.0.0.1:0"]),
                "--inbound-addr",
                ArgumentConflict,
            ),
            (
                gateway_with(&["--advertise-addr", "127.0.0.1:7"]),
                "--advertise-addr",
                ArgumentConflict,
            ),
            (vec!["--mode", "edge"], "edge", InvalidValue),
        ];
        for (extra, needle, kind) in cases {
            let error = checked(&extra).unwrap_err();
            assert_eq!(error.kind(), kind, "{extra:?}: {error}");
            assert_eq!(error.exit_code(), 2);
            assert!(error.to_string().contains(needle), "{extra:?}: {error}");
        }
    }

    #[test]
    fn labels_parse_and_refuse_nonsense() {
        let args = parse(&[CONTROL, &["--labels", "version=v2, zone=eu-1,app.io/tier="]].concat())
            .unwrap();
        let labels = args.control.labels.unwrap().0;
        assert_eq!(labels["version"], "v2");
        assert_eq!(labels["zone"], "eu-1");
        assert_eq!(labels["app.io/tier"], "");
        for (bad, needle) in [
            ("version", "is not key=value"),
            ("=v2", "label key \"\""),
            ("a=b,a=c", "given twice"),
            ("a=b c", "value \"b c\""),
        ] {
            let error = parse(&[CONTROL, &["--labels", bad]].concat())
                .unwrap_err()
                .to_string();
            assert!(error.contains(needle), "{bad}: {error}");
        }
    }

    #[test]
    fn durations_and_addresses_are_checked() {
        let args = parse(
            &[
                CONTROL,
                &["--cert-ttl", "0", "--heartbeat-interval", "250ms"],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(args.control.cert_ttl, Some(Duration::ZERO));
        assert_eq!(args.control.heartbeat_interval, Duration::from_millis(250));
        let error = parse(&[CONTROL, &["--heartbeat-interval", "0s"]].concat())
            .unwrap_err()
            .to_string();
        assert!(error.contains("longer than zero"), "{error}");
        let args = parse(&[CONTROL, &["--report-interval", "200ms"]].concat()).unwrap();
        assert_eq!(args.control.report_interval, Duration::from_millis(200));
        for bad in ["0s", "0", "soon", "10x"] {
            let error = parse(&[CONTROL, &["--report-interval", bad]].concat())
                .unwrap_err()
                .to_string();
            assert!(error.contains("--report-interval"), "{bad}: {error}");
        }
        let error = parse(&[
            "--control-plane",
            "http://cp:1",
            "--trust-anchors",
            "a",
            "--join-token-file",
            "t",
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("TLS only"), "{error}");
    }
}
