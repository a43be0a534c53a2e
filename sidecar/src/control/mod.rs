//! Control-plane mode: the sidecar gets its certificate from `Identity.Certify` and its
//! routing config from `Discovery.Subscribe`, both over TLS to the control plane, and
//! sends what its outbound side did with `Discovery.Report` (see `report`),
//! whose own SVID (`spiffe://<td>/ns/trellis-system/sa/trellis-control-plane`) is
//! checked against `--trust-anchors`.
//!
//! Everything here runs on one background task, started after the listeners are
//! bound: the data path never waits for the control plane, and keeps serving with
//! the last certificate and config while it is away.

mod backoff;
pub mod certify;
#[cfg(test)]
mod fake_control_plane;
pub mod report;
pub mod sa_token;
pub mod subscribe;
pub mod token;

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::{net::TcpStream, sync::watch, task::JoinHandle};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};
use trellis_ca::{Credentials, SpiffeId, TrustBundle, TrustDomain};

pub use backoff::Backoff;
pub use certify::{renewal_delay, retry_delay};
pub use sa_token::{SaToken, SaTokenError, SaTokenFile};
pub use token::{JoinToken, TokenError};

use crate::{args::ControlPlaneArgs, outbound::destinations::Destinations, telemetry};

/// The control plane's own identity in its trust domain.
const CONTROL_PLANE_NAMESPACE: &str = "trellis-system";
const CONTROL_PLANE_SERVICE: &str = "trellis-control-plane";
/// TCP connect plus TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings find a control plane that vanished without closing the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a unary call (Certify) or the opening of a stream may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the control plane's gRPC listens: `host:port` or `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlaneAddr {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

/// Why control-plane mode cannot start. Each names the flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--trust-anchors {path}: {reason}")]
    TrustAnchors { path: PathBuf, reason: String },
    #[error("--join-token-file {path}: {reason}")]
    TokenFile { path: PathBuf, reason: String },
    #[error("--join-token-file {path}: {source}")]
    Token { path: PathBuf, source: TokenError },
    #[error("{0}")]
    ServiceAccountToken(#[from] SaTokenError),
    #[error(
        "give exactly one credential: --join-token-file (universal mode) or --token-file \
         (a projected ServiceAccount token on Kubernetes)"
    )]
    Credential,
    #[error("--control-plane is required in control-plane mode")]
    NoControlPlane,
}

/// Why one exchange with the control plane failed; the caller retries.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("connecting to the control plane at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{rpc}: {code:?}: {message}")]
    Status {
        rpc: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("{0}: no answer within {CALL_TIMEOUT:?}")]
    Timeout(&'static str),
    #[error("building the TLS config: {0}")]
    Tls(#[from] rustls::Error),
    #[error("generating the key or CSR: {0}")]
    Key(trellis_ca::SvidError),
    #[error("the control plane returned an unusable certificate: {0}")]
    Certificate(trellis_ca::SvidError),
    #[error("the control plane returned a certificate for {got}, not {expected}")]
    WrongId { expected: SpiffeId, got: SpiffeId },
    #[error("the control plane returned an unusable trust bundle: {0}")]
    Bundle(#[from] trellis_ca::BundleError),
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("{0}")]
    ServiceAccountToken(#[from] SaTokenError),
    #[error("the control plane closed the stream: {0}")]
    Stream(String),
}

impl ControlError {
    fn status(rpc: &'static str, status: tonic::Status) -> Self {
        Self::Status {
            rpc,
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// Control-plane mode, set up before the listeners are bound: the files are read and
/// checked, so a bad flag stops the process before it announces anything.
#[derive(Debug)]
pub struct ControlPlane {
    addr: ControlPlaneAddr,
    creds: Credentials,
    id: SpiffeId,
    server_id: SpiffeId,
    bootstrap: certify::Bootstrap,
    cert_ttl: Duration,
    service: String,
    namespace: String,
    instance: String,
    labels: std::collections::BTreeMap<String, String>,
    advertise_addr: Option<SocketAddr>,
    heartbeat_interval: Duration,
    report_interval: Duration,
    /// None for a gateway: no app, so always healthy.
    app_addr: Option<SocketAddr>,
}

// === impl ControlPlane ===

impl ControlPlane {
    pub fn new(
        args: ControlPlaneArgs,
        service: &str,
        namespace: &str,
        app_addr: Option<SocketAddr>,
    ) -> Result<Self, SetupError> {
        let ControlPlaneArgs {
            control_plane,
            trust_anchors,
            join_token_file,
            token_file,
            trust_domain,
            labels,
            instance,
            advertise_addr,
            heartbeat_interval,
            report_interval,
            cert_ttl,
        } = args;
        let addr = control_plane.ok_or(SetupError::NoControlPlane)?;
        let anchors_path = trust_anchors.unwrap_or_default();
        let bundle = read_trust_anchors(&anchors_path)?;
        let (id, bootstrap, credential_expires) = match (join_token_file, token_file) {
            (Some(token_path), None) => {
                let token = read_join_token(&token_path)?;
                let token_error = |source| SetupError::Token {
                    path: token_path.clone(),
                    source,
                };
                let id = token
                    .identity(service, namespace, trust_domain.as_ref())
                    .map_err(token_error)?;
                // Without a certificate to renew, an expired token is the end of the road.
                token
                    .check_unexpired(SystemTime::now())
                    .map_err(token_error)?;
                let expires = telemetry::rfc3339(token.expires_at());
                (id, certify::Bootstrap::Join(token), expires)
            }
            (None, Some(token_path)) => {
                // The id is the pod's service account, not --service: the control plane
                // reviews the token and signs for what it names.
                let trust_domain = match trust_domain {
                    Some(td) => td,
                    None => TrustDomain::parse(token::DEFAULT_TRUST_DOMAIN).map_err(|e| {
                        SetupError::Token {
                            path: token_path.clone(),
                            source: TokenError::Identity(e),
                        }
                    })?,
                };
                let (file, token) = SaTokenFile::open(token_path, &trust_domain)?;
                token.check_unexpired(file.path(), SystemTime::now())?;
                // The kubelet rotates the file; the expiry of this reading says little.
                let id = file.id().clone();
                (
                    id,
                    certify::Bootstrap::ServiceAccount(file),
                    "rotated by the kubelet".to_string(),
                )
            }
            _ => return Err(SetupError::Credential),
        };
        let server_id = SpiffeId::workload(
            &id.trust_domain(),
            CONTROL_PLANE_NAMESPACE,
            CONTROL_PLANE_SERVICE,
        )
        .map_err(|e| SetupError::Token {
            path: PathBuf::new(),
            source: TokenError::Identity(e),
        })?;
        let instance =
            instance.unwrap_or_else(|| format!("{service}-{}", telemetry::random_hex(4)));
        tracing::info!(
            control_plane = %addr,
            %id,
            instance,
            credential = bootstrap.kind(),
            credential_expires,
            "control-plane mode"
        );
        Ok(Self {
            addr,
            creds: Credentials::new(bundle),
            id,
            server_id,
            bootstrap,
            cert_ttl: cert_ttl.unwrap_or_default(),
            service: service.to_string(),
            namespace: namespace.to_string(),
            instance,
            labels: labels.unwrap_or_default().0,
            advertise_addr,
            heartbeat_interval,
            report_interval,
            app_addr,
        })
    }

    /// The credentials the listeners use: the trust anchors now, the SVID once issued.
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// Starts the control loop: certificates (first and renewals), the app health
    /// probe and the Discovery stream. `inbound` is the bound inbound listener, the
    /// address advertised to peers unless `--advertise-addr` says otherwise; a gateway
    /// has none and advertises none, so it is never made anyone's endpoint. `admin`
    /// is the bound admin server, told to the control plane so `trellisctl tap` can
    /// find it. `config_ready` turns true with the first config applied. The task
    /// ends on `shutdown`, closing the stream so the control plane withdraws this
    /// instance.
    pub fn spawn(
        self,
        inbound: Option<SocketAddr>,
        admin: Option<SocketAddr>,
        destinations: Arc<ArcSwap<Destinations>>,
        config_ready: Arc<AtomicBool>,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let Self {
            addr,
            creds,
            id,
            server_id,
            bootstrap,
            cert_ttl,
            service,
            namespace,
            instance,
            labels,
            advertise_addr,
            heartbeat_interval,
            report_interval,
            app_addr,
        } = self;
        let advertise =
            inbound.map(|inbound| advertise_addr.unwrap_or_else(|| advertised(inbound)));
        let certifier = certify::Certifier {
            addr: addr.clone(),
            creds: creds.clone(),
            id,
            server_id: server_id.clone(),
            bootstrap,
            cert_ttl,
        };
        // Reports ride on the Discovery stream's connection: one per proxy, not two.
        let (channel_tx, channel_rx) = watch::channel(None);
        let reporter = report::Reporter {
            service: service.clone(),
            namespace: namespace.clone(),
            instance: instance.clone(),
            interval: report_interval,
            channel: channel_rx,
        };
        let subscriber = subscribe::Subscriber {
            addr,
            creds,
            server_id,
            hello: subscribe::HelloInfo {
                service,
                namespace,
                instance,
                labels,
                advertise,
                admin: admin.map(advertised),
            },
            heartbeat_interval,
            destinations,
            config_ready,
            channel: channel_tx,
        };
        let (issued_tx, issued_rx) = watch::channel(false);
        // Without an app there is nothing to be unhealthy about.
        let (health_tx, health_rx) = watch::channel(app_addr.is_none());
        let probe_every = heartbeat_interval.min(subscribe::PROBE_INTERVAL);
        let probe_shutdown = shutdown.clone();
        let probe = async move {
            if let Some(app_addr) = app_addr {
                subscribe::probe_app(app_addr, probe_every, health_tx, probe_shutdown).await;
            }
        };
        tokio::spawn(async move {
            tokio::join!(
                certifier.run(issued_tx, shutdown.clone()),
                probe,
                subscriber.run(issued_rx, health_rx, shutdown.clone()),
                reporter.run(shutdown.clone()),
            );
        })
    }
}

/// What peers dial by default: the bound address, with an unspecified IP (listening
/// on all interfaces) replaced by loopback, the one address surely among them.
pub fn advertised(bound: SocketAddr) -> SocketAddr {
    let mut addr = bound;
    match bound {
        SocketAddr::V4(v4) if v4.ip().is_unspecified() => {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into())
        }
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => {
            addr.set_ip(std::net::Ipv6Addr::LOCALHOST.into())
        }
        _ => {}
    }
    addr
}

fn read_trust_anchors(path: &Path) -> Result<TrustBundle, SetupError> {
    let fail = |reason: String| SetupError::TrustAnchors {
        path: path.into(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    TrustBundle::from_pem(&pem).map_err(|e| fail(e.to_string()))
}

fn read_join_token(path: &Path) -> Result<JoinToken, SetupError> {
    let text = std::fs::read_to_string(path).map_err(|e| SetupError::TokenFile {
        path: path.into(),
        reason: e.to_string(),
    })?;
    JoinToken::parse(&text).map_err(|source| SetupError::Token {
        path: path.into(),
        source,
    })
}

/// A channel to the control plane over TLS: its SVID must be `server_id` and chain to
/// the bundle in `creds`; the SVID in `creds`, if any, is presented. A new channel per
/// exchange, so each handshake presents the certificate current at that moment.
pub(crate) async fn connect(
    addr: &ControlPlaneAddr,
    creds: &Credentials,
    server_id: &SpiffeId,
) -> Result<Channel, ControlError> {
    let mut tls = trellis_ca::client_config(creds, Some(server_id.clone()))?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = TlsConnector::from(Arc::new(tls));
    let target = addr.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let (tls, target) = (tls.clone(), target.clone());
        async move {
            let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tls.connect(target.server_name.clone(), tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    // The authority is cosmetic: the connector decides where the bytes go.
    Endpoint::from_static("http://trellis-control-plane")
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|e| ControlError::Connect {
            addr: addr.to_string(),
            reason: causes(&e),
        })
}

/// An error and its sources on one line: tonic's own text ("transport error") says
/// nothing; the refused certificate or the refused connection is in the chain.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

// === impl ControlPlaneAddr ===

impl FromStr for ControlPlaneAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = match s.strip_prefix("https://") {
            Some(rest) => rest,
            None if s.contains("://") => {
                return Err(format!(
                    "{s:?}: the control plane speaks gRPC over TLS only; write host:port or \
                     https://host:port"
                ));
            }
            None => s,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(format!("{s:?}: expected host:port, without a path"));
        }
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("{s:?}: unclosed '[' in an IPv6 address"))?;
                let port = after
                    .strip_prefix(':')
                    .ok_or_else(|| format!("{s:?}: expected [ipv6]:port"))?;
                (host, port)
            }
            None => rest
                .rsplit_once(':')
                .ok_or_else(|| format!("{s:?}: expected host:port"))?,
        };
        if host.is_empty() {
            return Err(format!("{s:?}: the host is missing"));
        }
        if host.contains(':') && !rest.starts_with('[') {
            return Err(format!(
                "{s:?}: write an IPv6 address in brackets, [ip]:port"
            ));
        }
        let port = match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("{s:?}: {port:?} is not a port (1-65535)")),
            Ok(port) => port,
        };
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|_| format!("{s:?}: {host:?} is not a host name or IP address"))?;
        Ok(Self {
            host: host.to_string(),
            port,
            server_name,
        })
    }
}

impl fmt::Display for ControlPlaneAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_plane_addresses() {
        for (input, shown) in [
            ("127.0.0.1:15012", "127.0.0.1:15012"),
            ("https://cp.trellis-system:15012", "cp.trellis-system:15012"),
            ("https://cp:15012/", "cp:15012"),
            ("[::1]:15012", "[::1]:15012"),
            ("https://[fd00::7]:443", "[fd00::7]:443"),
        ] {
            let addr: ControlPlaneAddr = input.parse().unwrap();
            assert_eq!(addr.to_string(), shown, "{input}");
        }
        for (input, needle) in [
            ("http://cp:15012", "TLS only"),
            ("grpc://cp:15012", "TLS only"),
            ("cp", "expected host:port"),
            ("cp:0", "is not a port"),
            ("cp:http", "is not a port"),
            (":15012", "host is missing"),
            ("::1:15012", "in brackets"),
            ("[::1:15012", "unclosed"),
            ("https://cp:15012/v1", "without a path"),
            ("bad_host!:1", "not a host name"),
        ] {
            let error = input.parse::<ControlPlaneAddr>().unwrap_err();
            assert!(error.contains(needle), "{input}: {error}");
        }
    }

    #[test]
    fn unspecified_addresses_are_advertised_as_loopback() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(advertised(addr("0.0.0.0:15006")), addr("127.0.0.1:15006"));
        assert_eq!(advertised(addr("[::]:15006")), addr("[::1]:15006"));
        assert_eq!(advertised(addr("10.1.2.3:15006")), addr("10.1.2.3:15006"));
    }

    #[test]
    fn error_chains_are_one_line_without_repeats() {
        let inner =
            std::io::Error::other("peer presented spiffe://x/a but spiffe://x/b was expected");
        let outer = std::io::Error::other(inner);
        let text = causes(&outer);
        assert_eq!(text.matches("peer presented").count(), 1, "{text}");
    }

    #[test]
    fn setup_refuses_bad_files_by_flag() {
        let dir = tempfile::tempdir().unwrap();
        let args = |anchors: &Path, token: &Path| ControlPlaneArgs {
            control_plane: Some("127.0.0.1:1".parse().unwrap()),
            trust_anchors: Some(anchors.into()),
            join_token_file: Some(token.into()),
            token_file: None,
            trust_domain: None,
            labels: None,
            instance: None,
            advertise_addr: None,
            heartbeat_interval: Duration::from_secs(5),
            report_interval: Duration::from_secs(10),
            cert_ttl: None,
        };
        let app = Some("127.0.0.1:9".parse().unwrap());
        let missing = dir.path().join("missing.pem");
        let error = ControlPlane::new(args(&missing, &missing), "a", "default", app)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("--trust-anchors ") && error.contains("missing.pem"),
            "{error}"
        );

        let anchors = dir.path().join("anchors.pem");
        std::fs::write(&anchors, "not PEM").unwrap();
        let error = ControlPlane::new(args(&anchors, &missing), "a", "default", app)
            .unwrap_err()
            .to_string();
        assert!(error.contains("no CERTIFICATE block"), "{error}");
    }
}
