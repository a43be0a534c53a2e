//! The admin server, loopback by default: liveness, readiness, Prometheus metrics,
//! the current config and certificate, what the mirrors saw, a live stream of the
//! requests it handles (`/tap`), and a drain trigger for Jobs.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trellis_ca::Credentials;

use crate::{
    app_probe::AppProbes,
    outbound::destinations::{Destinations, DestinationsView},
    tap::{self, OwnIdentity, TapBody},
    telemetry::{self, rfc3339},
    traffic,
};

/// Where the injector points the app's probes (`trellis_crds::injection`).
const APP_PROBE_PREFIX: &str = "/app-probe/";

/// What the admin server answers with: a whole body, or the tap's endless one.
type AdminBody = Either<Full<Bytes>, TapBody>;

/// Where each listener ended up (ports may have been 0).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listeners {
    /// None in gateway mode, which has neither.
    pub inbound: Option<SocketAddr>,
    pub outbound: Option<SocketAddr>,
    /// Gateway mode: where external clients call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub tcp_outbound: Vec<TcpListenerView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TcpListenerView {
    pub listen: SocketAddr,
    pub service: String,
}

pub struct Admin {
    pub service: String,
    pub namespace: String,
    pub creds: Credentials,
    pub destinations: Arc<ArcSwap<Destinations>>,
    /// True once a config is in force: at start in static mode, with the first
    /// applied push in control-plane mode.
    pub config_ready: Arc<AtomicBool>,
    pub metrics: PrometheusHandle,
    pub listeners: Listeners,
    /// Cancelled when the proxy starts draining; `POST /shutdown` cancels it.
    pub shutdown: CancellationToken,
    /// `GET /app-probe/...`: the app's own probes, relayed (see `app_probe`).
    pub app_probes: AppProbes,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigView<'a> {
    service: &'a str,
    namespace: &'a str,
    identity: Option<String>,
    listeners: &'a Listeners,
    #[serde(flatten)]
    destinations: DestinationsView<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertView {
    id: String,
    serial: String,
    not_before: String,
    not_after: String,
    chain_length: usize,
    trust_bundle_roots: usize,
}

/// `GET /shadow`: every mirror's totals and latest mismatches since the process started.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ShadowsView {
    shadows: Vec<ShadowView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ShadowView {
    service: String,
    route: String,
    shadow: String,
    totals: ShadowTotals,
    /// Oldest first.
    recent_mismatches: Vec<MismatchView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ShadowTotals {
    mirrored: u64,
    matched: u64,
    status_mismatches: u64,
    body_mismatches: u64,
    shadow_errors: u64,
    dropped: u64,
    too_large: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MismatchView {
    at: String,
    /// `status` or `body`: what differed first.
    kind: &'static str,
    method: String,
    path: String,
    primary_status: u32,
    shadow_status: u32,
    primary_digest: String,
    shadow_digest: String,
}

impl ShadowsView {
    fn now() -> Self {
        let shadows = traffic::global()
            .shadow_history()
            .into_iter()
            .map(|stats| ShadowView {
                totals: ShadowTotals {
                    mirrored: stats.mirrored,
                    matched: stats.matched,
                    status_mismatches: stats.status_mismatches,
                    body_mismatches: stats.body_mismatches,
                    shadow_errors: stats.shadow_errors,
                    dropped: stats.dropped,
                    too_large: stats.too_large,
                },
                recent_mismatches: stats
                    .recent
                    .into_iter()
                    .map(|m| MismatchView {
                        at: rfc3339(
                            std::time::UNIX_EPOCH
                                + std::time::Duration::from_millis(
                                    u64::try_from(m.unix_ms).unwrap_or(0),
                                ),
                        ),
                        kind: if m.primary_status == m.shadow_status {
                            "body"
                        } else {
                            "status"
                        },
                        method: m.method,
                        path: m.path,
                        primary_status: m.primary_status,
                        shadow_status: m.shadow_status,
                        primary_digest: m.primary_digest,
                        shadow_digest: m.shadow_digest,
                    })
                    .collect(),
                service: stats.destination,
                route: stats.route,
                shadow: stats.shadow,
            })
            .collect();
        Self { shadows }
    }
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// Serves until the process ends: readiness must answer 503 while draining.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move {
                        let probe = (req.method() == Method::GET)
                            .then(|| req.uri().path().strip_prefix(APP_PROBE_PREFIX))
                            .flatten()
                            .is_some();
                        let response = if probe {
                            admin.app_probe(req.uri().path()).await.map(Either::Left)
                        } else {
                            admin.respond(req)
                        };
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tcp), service);
                if let Err(error) = conn.await {
                    tracing::debug!(%error, "admin connection ended with an error");
                }
            });
        }
    }

    /// `GET /app-probe/<container>/<kind>`: the app's answer to the probe the
    /// injector moved here, or 404 for a path it did not name.
    async fn app_probe(&self, path: &str) -> Response<Full<Bytes>> {
        match self.app_probes.get(path) {
            Some(probe) => crate::app_probe::relay(probe).await,
            None => text(StatusCode::NOT_FOUND, "no such app probe"),
        }
    }

    fn respond(&self, req: Request<Incoming>) -> Response<AdminBody> {
        if req.method() == Method::GET && req.uri().path() == "/tap" {
            return self.tap();
        }
        self.route(req).map(Either::Left)
    }

    /// `GET /tap`: newline-delimited JSON, one line per request this proxy finishes
    /// from now on, until the reader hangs up.
    fn tap(&self) -> Response<AdminBody> {
        let watcher = match tap::global().watch() {
            Ok(watcher) => watcher,
            Err(e) => {
                let mut response = Response::new(Full::new(Bytes::from(e.to_string())));
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return response.map(Either::Left);
            }
        };
        let own = OwnIdentity {
            service: self.service.clone(),
            creds: self.creds.clone(),
        };
        let mut response = Response::new(Either::Right(tap::stream(watcher, own)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/x-ndjson"),
        );
        response
    }

    fn route(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live"),
            (&Method::GET, "/ready") if self.shutdown.is_cancelled() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining")
            }
            (&Method::GET, "/ready") if self.creds.svid().is_none() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "no certificate yet")
            }
            (&Method::GET, "/ready") if !self.config_ready.load(Ordering::Acquire) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no config from the control plane yet",
            ),
            (&Method::GET, "/ready") => text(StatusCode::OK, "ready"),
            (&Method::GET, "/metrics") => {
                let mut body = self.metrics.render();
                let destinations = self.destinations.load();
                let component = if self.listeners.gateway.is_some() {
                    "gateway"
                } else {
                    "sidecar"
                };
                body.push_str(&telemetry::render_state(
                    component,
                    &destinations.config().version,
                    self.creds.svid().map(|svid| svid.not_after()),
                ));
                body.push_str(&destinations.render_ejections());
                let mut response = Response::new(Full::new(Bytes::from(body)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            (&Method::GET, "/config") => {
                let destinations = self.destinations.load();
                json(&ConfigView {
                    service: &self.service,
                    namespace: &self.namespace,
                    identity: self.creds.svid().map(|s| s.id().to_string()),
                    listeners: &self.listeners,
                    destinations: destinations.snapshot(),
                })
            }
            (&Method::GET, "/certs") => match self.creds.svid() {
                Some(svid) => json(&CertView {
                    id: svid.id().to_string(),
                    serial: svid.serial().to_string(),
                    not_before: rfc3339(svid.not_before()),
                    not_after: rfc3339(svid.not_after()),
                    chain_length: svid.chain().len(),
                    trust_bundle_roots: self.creds.bundle().roots().len(),
                }),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "no certificate yet"),
            },
            (&Method::GET, "/shadow") => json(&ShadowsView::now()),
            (&Method::POST, "/shutdown") => {
                tracing::info!("shutdown requested on the admin port");
                self.shutdown.cancel();
                text(StatusCode::ACCEPTED, "draining")
            }
            (
                _,
                "/live" | "/ready" | "/metrics" | "/config" | "/certs" | "/shadow" | "/tap"
                | "/shutdown",
            ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /live /ready /metrics /config /certs /shadow /tap or POST /shutdown",
            ),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "could not encode JSON"),
    }
}
