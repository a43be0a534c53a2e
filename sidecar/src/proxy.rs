//! Wires the proxy together: load identity and config (static mode) or prepare to
//! fetch them (control-plane mode), bind every listener (a sidecar's inbound and
//! outbound, or a gateway's external one), start the control loop, serve until
//! SIGTERM, SIGINT or `POST /shutdown`, then drain.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{Admin, Listeners, TcpListenerView},
    args::{Args, FlagError, Role},
    control::{ControlPlane, SetupError},
    gateway::Gateway,
    http::serve_connection,
    identity,
    inbound::Inbound,
    outbound::{Outbound, OutboundService, destinations::Destinations},
    static_config::StaticConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("give exactly one of --config (static mode) and --control-plane")]
    Mode,
    #[error("{0}")]
    Flags(#[from] FlagError),
    #[error("--config: {0}")]
    Config(#[from] crate::static_config::StaticConfigError),
    #[error("{0}")]
    ControlPlane(#[from] SetupError),
    #[error("the control-plane task stopped: {0}")]
    ControlTask(String),
    #[error("identity: {0}")]
    Identity(#[from] identity::IdentityError),
    #[error("config: {0}")]
    Compile(#[from] crate::outbound::destinations::CompileError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("binding the {listener} listener on {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    let bound = TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind {
            listener,
            addr,
            source,
        })?;
    Ok(bound)
}

fn local(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

pub async fn run(args: Args, metrics: PrometheusHandle) -> Result<(), ProxyError> {
    let role = args.role()?;
    let Args {
        mode: _,
        listen: _,
        service,
        namespace,
        app_addr: _,
        app_protocol,
        inbound_addr,
        outbound_addr,
        admin_addr,
        app_probes,
        config,
        control: control_args,
        log_format: _,
        log: _,
        workers: _,
        drain_timeout,
        idle_timeout,
        detect_timeout,
    } = args;
    let app_addr = match role {
        Role::Sidecar { app_addr } => Some(app_addr),
        Role::Gateway { .. } => None,
    };
    let (creds, proxy_config, tcp_outbound, control) =
        match (config, control_args.control_plane.is_some()) {
            (Some(path), false) => {
                let StaticConfig {
                    identity,
                    tcp_outbound,
                    proxy,
                } = StaticConfig::load(&path)?;
                (identity::load(&identity)?, proxy, tcp_outbound, None)
            }
            (None, true) => {
                let control = ControlPlane::new(control_args, &service, &namespace, app_addr)?;
                // No routes until the first push: outbound answers 503 unknown-service.
                let creds = control.credentials().clone();
                (creds, Default::default(), Vec::new(), Some(control))
            }
            _ => return Err(ProxyError::Mode),
        };
    let config_ready = Arc::new(AtomicBool::new(control.is_none()));
    let destinations = Arc::new(ArcSwap::from_pointee(Destinations::compile(
        proxy_config,
        &creds,
    )?));
    if !admin_addr.ip().is_loopback() {
        tracing::warn!(%admin_addr, "the admin server is reachable from off this host");
    }
    crate::trace::start(
        crate::trace::Origin {
            service: service.clone(),
            namespace: namespace.clone(),
            mode: match role {
                Role::Sidecar { .. } => "sidecar",
                Role::Gateway { .. } => "gateway",
            },
        },
        &destinations.load_full(),
    );

    // A sidecar listens for its peers and its app; a gateway for external clients only.
    let (data_listeners, gateway_listener) = match role {
        Role::Sidecar { app_addr } => {
            let inbound = bind("inbound", inbound_addr).await?;
            let outbound = bind("outbound", outbound_addr).await?;
            (Some((inbound, outbound, app_addr)), None)
        }
        Role::Gateway { listen } => (None, Some(bind("gateway", listen).await?)),
    };
    let admin_listener = bind("admin", admin_addr).await?;
    let mut tcp_listeners = Vec::new();
    for tcp in &tcp_outbound {
        tcp_listeners.push((bind("tcpOutbound", tcp.listen).await?, tcp.service.clone()));
    }
    let listeners = Listeners {
        inbound: data_listeners
            .as_ref()
            .map(|(inbound, _, _)| local(inbound)),
        outbound: data_listeners
            .as_ref()
            .map(|(_, outbound, _)| local(outbound)),
        gateway: gateway_listener.as_ref().map(local),
        admin: local(&admin_listener),
        tcp_outbound: tcp_listeners
            .iter()
            .map(|(l, service)| TcpListenerView {
                listen: local(l),
                service: service.clone(),
            })
            .collect(),
    };

    let sidecar = match data_listeners {
        Some((inbound_listener, outbound_listener, app_addr)) => {
            let inbound = Inbound::new(
                service.clone(),
                app_addr,
                app_protocol,
                detect_timeout,
                idle_timeout,
                destinations.clone(),
                &creds,
            )?;
            Some((Arc::new(inbound), inbound_listener, outbound_listener))
        }
        None => None,
    };
    let outbound = Arc::new(Outbound::new(service.clone(), destinations.clone()));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();

    let admin = Arc::new(Admin {
        service: service.clone(),
        namespace,
        creds,
        destinations: destinations.clone(),
        config_ready: config_ready.clone(),
        metrics,
        listeners: listeners.clone(),
        shutdown: shutdown.clone(),
        app_probes: app_probes.unwrap_or_default(),
    });
    tokio::spawn(admin.serve(admin_listener));

    if let Some((inbound, inbound_listener, outbound_listener)) = sidecar {
        tracker.spawn(accept_loop(
            inbound_listener,
            shutdown.clone(),
            tracker.clone(),
            move |tcp, drain| inbound.clone().serve(tcp, drain),
        ));
        let service = OutboundService(outbound.clone());
        tracker.spawn(accept_loop(
            outbound_listener,
            shutdown.clone(),
            tracker.clone(),
            move |tcp, drain| {
                let _ = tcp.set_nodelay(true);
                let service = service.clone();
                async move {
                    // Behind the iptables redirect on Kubernetes, what is not HTTP
                    // goes on to where the app sent it.
                    match crate::init::outbound(tcp, detect_timeout, &drain).await {
                        crate::init::Outbound::Direct(tcp) => {
                            serve_connection(tcp, service, drain, idle_timeout).await;
                        }
                        crate::init::Outbound::Http(io) => {
                            serve_connection(io, service, drain, idle_timeout).await;
                        }
                        crate::init::Outbound::PassedThrough => {}
                    }
                }
            },
        ));
    }
    if let Some(listener) = gateway_listener {
        let gateway = Arc::new(Gateway::new(
            service.clone(),
            outbound.clone(),
            destinations.clone(),
            idle_timeout,
        ));
        tracker.spawn(accept_loop(
            listener,
            shutdown.clone(),
            tracker.clone(),
            move |tcp, drain| gateway.clone().serve(tcp, drain),
        ));
    }
    for (listener, tcp_service) in tcp_listeners {
        let outbound = outbound.clone();
        tracker.spawn(accept_loop(
            listener,
            shutdown.clone(),
            tracker.clone(),
            move |tcp, _drain| {
                let outbound = outbound.clone();
                let tcp_service = tcp_service.clone();
                async move { outbound.forward_tcp(&tcp_service, tcp).await }
            },
        ));
    }

    // Handlers go in before readiness is announced: a SIGTERM right after must drain.
    let mut signals = Signals::install()?;
    // Tests and tooling read this line to learn the bound ports.
    tracing::info!(
        service,
        inbound = listeners.inbound.map(tracing::field::display),
        outbound = listeners.outbound.map(tracing::field::display),
        gateway = listeners.gateway.map(tracing::field::display),
        admin = %listeners.admin,
        tcp_outbound = ?listeners.tcp_outbound.iter().map(|t| (t.service.as_str(), t.listen)).collect::<Vec<_>>(),
        "listening"
    );
    // Only now: the control plane is never waited for to start serving.
    let mut control_task = control.map(|control| {
        control.spawn(
            listeners.inbound,
            Some(listeners.admin),
            destinations,
            config_ready,
            shutdown.clone(),
        )
    });

    let mut failure = None;
    let mut control_ended = false;
    tokio::select! {
        name = signals.next() => tracing::info!(signal = name, "shutting down"),
        () = shutdown.cancelled() => tracing::info!("shutting down on request"),
        // It runs until shutdown; ending before means it panicked. A proxy whose
        // certificates and config silently stopped updating must not look healthy.
        ended = until_ended(&mut control_task) => {
            let reason = match ended {
                Err(error) => error.to_string(),
                Ok(()) => "it returned".to_string(),
            };
            tracing::error!(reason, "the control-plane task stopped; shutting down");
            failure = Some(ProxyError::ControlTask(reason));
            control_ended = true;
        }
    }
    shutdown.cancel();
    tracker.close();
    tracing::info!(timeout = ?drain_timeout, in_flight = tracker.len(), "draining");
    tokio::select! {
        drained = tokio::time::timeout(drain_timeout, tracker.wait()) => {
            if drained.is_err() {
                tracing::warn!(cut = tracker.len(), "drain timeout reached; closing what is still open");
            }
        }
        name = signals.next() => {
            tracing::warn!(signal = name, cut = tracker.len(), "second signal: not waiting for the drain");
        }
    }
    // The control task sends the last traffic report as it stops: give it a moment
    // before the runtime goes, or that window never reaches the control plane.
    if let Some(task) = control_task.as_mut().filter(|_| !control_ended)
        && tokio::time::timeout(CONTROL_STOP_TIMEOUT, task)
            .await
            .is_err()
    {
        tracing::warn!(timeout = ?CONTROL_STOP_TIMEOUT, "the control-plane task did not stop in time");
    }
    tracing::info!("stopped");
    failure.map_or(Ok(()), Err)
}

/// How long a stopping proxy waits for its control-plane task's last report.
const CONTROL_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits for a task to end; forever when there is none.
async fn until_ended(task: &mut Option<JoinHandle<()>>) -> Result<(), tokio::task::JoinError> {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// SIGTERM and SIGINT, installed once.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, ProxyError> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(ProxyError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(ProxyError::Signal)?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Accepts until `shutdown`, handing each connection to `handle` as a tracked task so
/// the drain can wait for it.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(TcpStream, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, _)) => {
                tracker.spawn(handle(tcp, shutdown.clone()));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
