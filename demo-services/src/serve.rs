//! The listener: one port for HTTP/1.1 and h2c, gRPC (by content type) to the tonic
//! routes and everything else to the HTTP routes. Every request is counted by caller
//! identity, passes the fault knobs and leaves one access-log line; SIGTERM or
//! SIGINT stops accepting and lets requests in flight finish.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{Router, response::Response};
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{net::TcpListener, signal::unix::SignalKind, time::Instant};
use tower::ServiceExt;

use crate::{
    admin::{self, PEER_ID, Peers},
    faults::Faults,
    mesh::REQUEST_ID,
    reply,
};

/// How long requests in flight get to finish after a stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that sends no complete request header in this long is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A service's own routes: HTTP, and gRPC if it serves any.
#[derive(Debug, Clone)]
pub struct ServiceRoutes {
    pub http: Router,
    pub grpc: Option<Router>,
}

/// What every request passes through around the service's own handlers.
#[derive(Debug)]
pub struct Front {
    http: Router,
    grpc: Option<Router>,
    faults: Arc<Faults>,
    peers: Arc<Peers>,
}

impl Front {
    pub fn new(routes: ServiceRoutes, faults: Arc<Faults>) -> Self {
        let peers = Arc::new(Peers::default());
        Self {
            http: routes
                .http
                .merge(admin::router(faults.clone(), peers.clone())),
            grpc: routes.grpc,
            faults,
            peers,
        }
    }

    async fn handle(self: Arc<Self>, mut request: Request<Incoming>) -> Response {
        let started = Instant::now();
        let request_id = ensure_request_id(request.headers_mut());
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let peer_id = header_text(request.headers(), PEER_ID).map(str::to_owned);
        self.peers.record(request.headers());
        let grpc = is_grpc(request.headers());

        let mut injected = None;
        if !admin::exempt_from_faults(&path) {
            let verdict = self.faults.draw();
            if !verdict.delay.is_zero() {
                tokio::time::sleep(verdict.delay).await;
            }
            if verdict.fail {
                injected = Some(injected_failure(grpc));
            }
        }
        let response = match injected {
            Some(response) => response,
            None => {
                let router = match (&self.grpc, grpc) {
                    (Some(routes), true) => routes.clone(),
                    _ => self.http.clone(),
                };
                match router.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }
        };
        tracing::info!(
            target: "marketplace::access",
            method = %method,
            path,
            status = response.status().as_u16(),
            duration_ms = started.elapsed().as_secs_f64() * 1e3,
            request_id = request_id.to_str().unwrap_or_default(),
            peer_id,
            injected_fault = response.headers().contains_key(FAULT_HEADER),
            "request"
        );
        response
    }
}

/// Marks answers the knobs made, so nobody debugs a failure that was ordered.
const FAULT_HEADER: &str = "x-marketplace-fault";

/// A 500 as its client expects one: JSON for HTTP; for gRPC also `grpc-status` 14
/// (UNAVAILABLE) in the headers, so a tonic client sees a status, not a protocol error.
fn injected_failure(grpc: bool) -> Response {
    let mut response = reply::json(
        StatusCode::INTERNAL_SERVER_ERROR,
        &serde_json::json!({ "error": "injected fault (the service's errorRate knob)" }),
    );
    let headers = response.headers_mut();
    headers.insert(FAULT_HEADER, HeaderValue::from_static("error"));
    if grpc {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        headers.insert("grpc-message", HeaderValue::from_static("injected%20fault"));
    }
    response
}

fn is_grpc(headers: &HeaderMap) -> bool {
    header_text(headers, header::CONTENT_TYPE.as_str())
        .is_some_and(|t| t.starts_with("application/grpc"))
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The request's `x-request-id`, made up when it came without one (a call that did not
/// pass a sidecar) so the calls it causes still share one.
fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(REQUEST_ID).filter(|id| !id.is_empty()) {
        return id.clone();
    }
    let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let id = HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("0"));
    headers.insert(REQUEST_ID, id.clone());
    id
}

/// A SIGTERM or SIGINT, listened for from creation on: a signal that arrives right
/// after the `listening` line must stop the service cleanly, not kill it.
#[derive(Debug)]
pub struct StopSignal {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignal {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            terminate: tokio::signal::unix::signal(SignalKind::terminate())?,
            interrupt: tokio::signal::unix::signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves with the signal's name once one arrives.
    pub async fn received(mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

/// Serves `front` on `listener` until `stop` resolves (with what stopped it), then
/// drains.
pub async fn serve(listener: TcpListener, front: Front, stop: impl Future<Output = &'static str>) {
    tokio::pin!(stop);
    let front = Arc::new(front);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024);
    let graceful = GracefulShutdown::new();
    let signal = loop {
        let accepted = tokio::select! {
            signal = &mut stop => break signal,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                // Out of file descriptors and the like: pass, and try again shortly.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let front = front.clone();
        let service = hyper::service::service_fn(move |request| {
            let front = front.clone();
            async move { Ok::<_, Infallible>(front.handle(request).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(tcp), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
        });
    };
    drop(listener);
    tracing::info!(signal, "stopping: finishing requests in flight");
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?DRAIN_TIMEOUT,
            "requests still in flight at the drain timeout"
        );
    }
    tracing::info!("stopped");
}
