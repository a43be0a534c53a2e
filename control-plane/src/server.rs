//! Wires the control plane together: open the data dir (store, CA, secrets), certify
//! itself, bind the gRPC, API and admin listeners, compile and serve until a signal.

use std::{
    io::Write,
    net::SocketAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{
    net::TcpListener,
    sync::{Notify, watch},
};
use tokio_util::sync::CancellationToken;
use trellis_api::{
    MAX_MESSAGE_BYTES, discovery::v1::discovery_server::DiscoveryServer,
    identity::v1::identity_server::IdentityServer,
};
use trellis_ca::{
    Authority, AuthorityConfig, ClientAuth, Credentials, SpiffeId, Svid, TrustDomain, WorkloadKey,
};

use crate::{
    api::OperatorApi, args::Args, compiler::Compiler, discovery::DiscoveryService, grpc_tls,
    identity::IdentityService, join_token::JoinTokens, registry::Registry, store::Store,
};

/// The largest message a sidecar may send on Discovery (a Hello, an answer, a report).
const MAX_SIDECAR_MESSAGE: usize = 1024 * 1024;
/// The longest certificate the CA signs; MeshConfig `certTTL` picks within it.
const MAX_LEAF_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The control plane's own SVID; renewed at 70% of it.
const OWN_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
const API_TOKEN: &str = "api-token";
const TRUST_ANCHORS: &str = "trust-anchors.pem";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("--trust-domain: {0}")]
    TrustDomain(String),
    #[error("the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the CA: {0}")]
    Authority(String),
    #[error("binding the {listener} listener on {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
    #[error("{0}")]
    Webhook(#[from] crate::webhook::WebhookError),
    #[error("the gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("Kubernetes: {0}")]
    Kubernetes(#[from] crate::kubernetes::ClientError),
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> ServerError {
    ServerError::File {
        path: path.into(),
        reason: reason.to_string(),
    }
}

/// Writes `contents` to `path` with `mode` via a temporary file and a rename, so a
/// reader never sees half a file and a secret is never world-readable.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), ServerError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| file_error(&tmp, e))?;
    file.write_all(contents).map_err(|e| file_error(&tmp, e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| file_error(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_error(path, e))
}

/// The operator API's bearer token: created once, 0600, refused if others can read it.
fn api_token(data_dir: &Path) -> Result<String, ServerError> {
    let path = data_dir.join(API_TOKEN);
    match std::fs::metadata(&path) {
        Ok(meta) => {
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(file_error(
                    &path,
                    "the API token is readable by others; run `chmod 600` on it",
                ));
            }
            let token = std::fs::read_to_string(&path).map_err(|e| file_error(&path, e))?;
            let token = token.trim().to_string();
            if token.len() < 32 {
                return Err(file_error(
                    &path,
                    "the API token is shorter than 32 characters",
                ));
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| file_error(&path, "the system random source failed"))?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            write_file(&path, token.as_bytes(), 0o600)?;
            Ok(token)
        }
        Err(e) => Err(file_error(&path, e)),
    }
}

fn own_svid(authority: &Authority, id: &SpiffeId) -> Result<Svid, ServerError> {
    let fail = |e: &dyn std::fmt::Display| ServerError::Authority(format!("own certificate: {e}"));
    let key = WorkloadKey::generate().map_err(|e| fail(&e))?;
    let csr = key.csr(id).map_err(|e| fail(&e))?;
    let issued = authority
        .sign_csr(&csr, id, OWN_SVID_TTL)
        .map_err(|e| fail(&e))?;
    Svid::new(
        std::iter::once(issued.leaf).chain(issued.chain).collect(),
        key.private_key_der(),
    )
    .map_err(|e| fail(&e))
}

/// Renews the control plane's own SVID at 70% of its life, for as long as it runs.
async fn renew_own_svid(
    authority: Arc<Authority>,
    creds: Credentials,
    id: SpiffeId,
    shutdown: CancellationToken,
) {
    let mut wait = OWN_SVID_TTL.mul_f64(0.7);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        match own_svid(&authority, &id) {
            Ok(svid) => {
                tracing::info!(serial = svid.serial(), "control plane certificate renewed");
                creds.set_svid(svid);
                wait = OWN_SVID_TTL.mul_f64(0.7);
            }
            Err(error) => {
                tracing::error!(%error, "renewing the control plane's certificate failed");
                wait = Duration::from_secs(60);
            }
        }
    }
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            listener,
            addr,
            source,
        })
}

fn local(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

pub async fn run(args: Args, metrics: PrometheusHandle) -> Result<(), ServerError> {
    let Args {
        data_dir,
        api_addr,
        grpc_addr,
        admin_addr,
        dashboard_addr,
        mode,
        kube_api_server,
        trust_domain,
        heartbeat_timeout,
        debounce,
        webhook_addr,
        webhook_dns_names,
        injection_config,
        proxy_image,
        kubernetes: kube_args,
        log_format: _,
        log: _,
    } = args;
    let trust_domain =
        TrustDomain::parse(&trust_domain).map_err(|e| ServerError::TrustDomain(e.to_string()))?;

    let store = {
        let dir = data_dir.clone();
        tokio::task::spawn_blocking(move || Store::open(&dir))
            .await
            .map_err(|e| file_error(&data_dir, e))??
    };
    let store = Arc::new(store);
    let ca_config = AuthorityConfig {
        trust_domain: trust_domain.clone(),
        max_leaf_ttl: MAX_LEAF_TTL,
    };
    // Kubernetes mode keeps the CA in a Secret every replica shares, not in a file.
    let authority = match mode {
        crate::source::Mode::Kubernetes => {
            let client = crate::kubernetes::client(kube_api_server.as_deref()).await?;
            crate::kubernetes::ca_secret::load_or_create(
                &client,
                &kube_args.namespace,
                &kube_args.ca_secret,
                ca_config,
            )
            .await
            .map_err(|e| ServerError::Authority(e.to_string()))?
        }
        crate::source::Mode::Universal => {
            let authority = Authority::load_or_create(&data_dir.join("ca"), ca_config)
                .map_err(|e| ServerError::Authority(e.to_string()))?;
            if authority.trust_domain() != &trust_domain {
                return Err(ServerError::TrustDomain(format!(
                    "the CA in {} is for {:?}, not {:?}",
                    data_dir.join("ca").display(),
                    authority.trust_domain().as_str(),
                    trust_domain.as_str()
                )));
            }
            // The keys inside are 0600 already; the folder says so too.
            let ca_dir = data_dir.join("ca");
            std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| file_error(&ca_dir, e))?;
            authority
        }
    };
    let authority = Arc::new(authority);
    let tokens = Arc::new(JoinTokens::new(&store.secret("join-token", 32)?));
    let token = api_token(&data_dir)?;
    write_file(
        &data_dir.join(TRUST_ANCHORS),
        authority.trust_bundle().to_pem().as_bytes(),
        0o644,
    )?;

    let own_id = SpiffeId::workload(
        &trust_domain,
        crate::identity::CONTROL_PLANE_NAMESPACE,
        crate::identity::CONTROL_PLANE_ACCOUNT,
    )
    .map_err(|e| ServerError::Authority(e.to_string()))?;
    let creds = Credentials::with_svid(
        own_svid(&authority, &own_id)?,
        authority.trust_bundle().clone(),
    );

    let shutdown = CancellationToken::new();
    let changed = Arc::new(Notify::new());
    let registry = Arc::new(Registry::new(changed.clone()));
    let (cert_ttl, cert_ttl_rx) = watch::channel(crate::compiler::DEFAULT_CERT_TTL);
    // Kubernetes mode: one API client for every Kubernetes part.
    let kube_client = match mode {
        crate::source::Mode::Universal => None,
        crate::source::Mode::Kubernetes => {
            Some(crate::kubernetes::client(kube_api_server.as_deref()).await?)
        }
    };
    let compiler = Compiler::new(
        store.clone(),
        registry.clone(),
        changed.clone(),
        debounce,
        cert_ttl,
    );
    let compiler = Arc::new(match &kube_client {
        None => compiler,
        Some(client) => {
            let source =
                crate::kubernetes::watch::KubernetesSource::new(trust_domain.clone(), changed);
            source.spawn(client, &shutdown);
            // Configs compiled before every kind is listed would lack endpoints.
            source.wait_synced(Duration::from_secs(10)).await;
            compiler.with_source(source)
        }
    });
    // Endpoints of the previous run stay published for one heartbeat timeout: sidecars
    // reconnect well within it, and until they do their peers keep reaching them.
    if let Some(bytes) = store.state(Compiler::ENDPOINTS_STATE)? {
        match serde_json::from_slice::<Vec<crate::registry::EndpointView>>(&bytes) {
            Ok(endpoints) if !endpoints.is_empty() => {
                tracing::info!(
                    endpoints = endpoints.len(),
                    until = ?heartbeat_timeout,
                    "publishing the previous run's endpoints while their sidecars reconnect"
                );
                registry.remember(endpoints, std::time::Instant::now() + heartbeat_timeout);
                let (compiler, shutdown) = (compiler.clone(), shutdown.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(heartbeat_timeout) => compiler.changed(),
                    }
                });
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "ignoring unreadable remembered endpoints"),
        }
    }
    // The first round reads MeshConfig (certificate lifetime) before anyone certifies.
    {
        let compiler = compiler.clone();
        tokio::task::spawn_blocking(move || compiler.compile_round())
            .await
            .map_err(|e| file_error(&data_dir, e))??;
    }
    tokio::spawn(compiler.clone().run(shutdown.clone()));
    // What sidecars report; the canary controller judges canaries by it.
    let reports = Arc::new(crate::reports::Reports::new());
    let canaries = Arc::new(match &kube_client {
        None => {
            crate::canary::CanaryController::new(store.clone(), reports.clone(), compiler.clone())
        }
        Some(client) => crate::canary::CanaryController::on_cluster(
            client.clone(),
            reports.clone(),
            compiler.clone(),
        ),
    });
    let leading = match &kube_client {
        None => {
            tokio::spawn(canaries.clone().run(shutdown.clone()));
            None
        }
        // One replica leads: it alone moves canaries and writes statuses, the caBundle
        // and the trust anchors; every replica serves discovery and identity.
        Some(client) => Some(
            crate::kubernetes::leader::LeaderDuties {
                client: client.clone(),
                namespace: kube_args.namespace.clone(),
                lease_name: kube_args.leader_lease.clone(),
                identity: kube_args.pod_name.clone(),
                canaries: canaries.clone(),
                source: compiler.source().clone(),
                bundle: authority.trust_bundle().clone(),
                webhook_configuration: kube_args.webhook_configuration.clone(),
            }
            .start(&shutdown),
        ),
    };
    tokio::spawn(renew_own_svid(
        authority.clone(),
        creds.clone(),
        own_id,
        shutdown.clone(),
    ));

    let grpc_listener = bind("gRPC", grpc_addr).await?;
    let api_listener = bind("API", api_addr).await?;
    let admin_listener = bind("admin", admin_addr).await?;
    let dashboard_listener = bind("dashboard", dashboard_addr).await?;
    // Kubernetes mode serves the sidecar injector unless told where else.
    let webhook_addr = webhook_addr.or_else(|| {
        (mode == crate::source::Mode::Kubernetes)
            .then(|| SocketAddr::from(([0, 0, 0, 0], crate::webhook::DEFAULT_PORT)))
    });
    let webhook_listener = match webhook_addr {
        Some(addr) => Some(bind("webhook", addr).await?),
        None => None,
    };
    let (grpc_addr, api_addr, admin_addr, dashboard_addr) = (
        local(&grpc_listener),
        local(&api_listener),
        local(&admin_listener),
        local(&dashboard_listener),
    );

    let identity = IdentityService::with_ttl_source(authority.clone(), tokens.clone(), cert_ttl_rx);
    // Kubernetes mode: sidecars prove themselves with projected ServiceAccount tokens.
    let identity = match &kube_client {
        Some(client) => identity.with_token_reviewer(Arc::new(
            crate::kubernetes::identity::KubeTokenReviewer::new(client.clone()),
        )),
        None => identity,
    };
    let discovery = DiscoveryService::new(
        trust_domain.clone(),
        registry.clone(),
        compiler.clone(),
        reports.clone(),
        heartbeat_timeout,
        shutdown.clone(),
    );
    let incoming = grpc_tls::incoming(grpc_listener, &creds, ClientAuth::Optional)?;
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(IdentityServer::new(identity))
        .add_service(
            // Sidecars send small messages; a large one is a mistake or an attack.
            // Configs go out in pieces, far below the encoding limit.
            DiscoveryServer::new(discovery)
                .max_decoding_message_size(MAX_SIDECAR_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let grpc = tokio::spawn(grpc);

    let dashboard = Arc::new(crate::dashboard::Dashboard::new(
        reports.clone(),
        registry.clone(),
        compiler.source().clone(),
    ));
    tokio::spawn(dashboard.clone().collect(shutdown.clone()));
    tokio::spawn(dashboard.serve(dashboard_listener, shutdown.clone()));

    let admin = crate::admin::Admin {
        metrics,
        compiler: compiler.clone(),
    };
    if let Some(listener) = webhook_listener {
        let settings = crate::webhook::load_settings(
            injection_config.as_deref(),
            proxy_image,
            trust_domain.as_str(),
        )?;
        let webhook = crate::webhook::Webhook::new(authority.clone(), webhook_dns_names, settings)?;
        tracing::info!(addr = %local(&listener), "serving the sidecar injector");
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(error) = Arc::new(webhook).serve(listener, shutdown).await {
                tracing::error!(%error, "the sidecar injector stopped");
            }
        });
    }

    let api = Arc::new(OperatorApi {
        dashboard: dashboard_addr,
        token,
        store,
        registry,
        compiler,
        tokens,
        authority,
        canaries,
        reports,
    });
    tokio::spawn(api.serve(api_listener, shutdown.clone()));
    tokio::spawn(crate::admin::serve(admin_listener, admin, shutdown.clone()));

    for (name, addr) in [
        ("grpc-addr", grpc_addr),
        ("api-addr", api_addr),
        ("admin-addr", admin_addr),
        ("dashboard-addr", dashboard_addr),
    ] {
        write_file(&data_dir.join(name), addr.to_string().as_bytes(), 0o644)?;
    }
    let mut signals = Signals::install()?;
    // Tests, trellisctl and tooling read this line (or the addr files) for the ports.
    tracing::info!(
        grpc = %grpc_addr,
        api = %api_addr,
        admin = %admin_addr,
        dashboard = %dashboard_addr,
        trust_domain = trust_domain.as_str(),
        data_dir = %data_dir.display(),
        "listening"
    );

    let name = signals.next().await;
    tracing::info!(signal = name, "shutting down");
    shutdown.cancel();
    // A leader hands its Lease back before it goes, so another replica takes over at
    // once instead of after the lease runs out.
    if let Some(mut leading) = leading {
        let _ = tokio::time::timeout(Duration::from_secs(2), leading.wait_for(|l| !l)).await;
    }
    // Open Discovery streams end with the server; sidecars keep their config and
    // reconnect to the next control plane.
    match tokio::time::timeout(Duration::from_secs(5), grpc).await {
        Ok(Ok(Err(e))) => return Err(e.into()),
        Ok(_) => {}
        Err(_) => tracing::warn!("the gRPC server did not stop within 5s"),
    }
    tracing::info!("stopped");
    Ok(())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, ServerError> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(ServerError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(ServerError::Signal)?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
