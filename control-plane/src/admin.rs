//! The admin server: liveness, readiness and Prometheus metrics.

use std::{convert::Infallible, sync::Arc, time::Duration};

use crate::{
    compiler::Compiler,
    source::ConfigSource,
    telemetry::{self, CanaryState},
};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What `/metrics` renders: the recorder's events and the state read at scrape time.
#[derive(Clone)]
pub struct Admin {
    pub metrics: PrometheusHandle,
    pub compiler: Arc<Compiler>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

/// Serves until `shutdown`. The control plane binds this last, so once it answers
/// every other listener is up: `/ready` is true whenever it is reachable.
pub async fn serve(listener: TcpListener, admin: Admin, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let admin = admin.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(handle(&req, &admin).await) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn handle(req: &Request<Incoming>, admin: &Admin) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/live" | "/ready") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            render(admin).await,
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: /live /ready /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

async fn render(admin: &Admin) -> String {
    let mut body = admin.metrics.render();
    // The compiled revision is read first: the canaries it shows are at least as new.
    let revision = admin.compiler.compiled_revision();
    let source = admin.compiler.source().clone();
    let canaries = match tokio::task::spawn_blocking(move || canaries(source.as_ref())).await {
        Ok(Ok(canaries)) => canaries,
        // The rest of the metrics are still worth a scrape.
        Ok(Err(error)) => {
            tracing::warn!(%error, "metrics: could not read the canaries");
            Vec::new()
        }
        Err(error) => {
            tracing::warn!(%error, "metrics: reading the canaries failed");
            Vec::new()
        }
    };
    body.push_str(&telemetry::render_state(revision, &canaries));
    body
}

/// Every Canary with its status (a canary the controller has not seen yet is
/// `Pending` at 0%), from the config source: the store in universal mode, the
/// cluster's Canary objects in kubernetes mode. Blocking: the source may read.
fn canaries(source: &dyn ConfigSource) -> Result<Vec<CanaryState>, crate::store::StoreError> {
    let (_, mut resources) = source.resources()?;
    let mut out: Vec<CanaryState> = resources
        .take_canaries()
        .into_iter()
        .map(|(namespace, name, canary, status)| CanaryState {
            namespace,
            name,
            service: canary.spec.service,
            status: status.unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(out)
}
