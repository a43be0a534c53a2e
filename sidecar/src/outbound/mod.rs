//! The outbound side: the local app sends plain HTTP here with the destination in
//! the authority; the destination's first matching route picks a backend by weight,
//! and the request leaves over mTLS HTTP/2 to one of the backend's peer sidecars,
//! chosen by P2C over peak-EWMA. TCP listeners forward opaque bytes the same way, to
//! any endpoint of their service.

pub mod balance;
pub mod connect;
pub mod destinations;
pub mod outlier;
pub mod route;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::net::TcpStream;

use crate::{
    http::{
        APP_PROTOCOL, AppProtocol, PEER_ID, ProxyBody, authority_of, bad_target, error_chain,
        forward_upgrade, host_of, is_upgrade, mesh_error, retarget, strip_hop_by_hop,
        strip_hop_by_hop_keeping_upgrade,
    },
    telemetry::{self, Direction},
};
use connect::ConnectError;
use destinations::{Destinations, Endpoint};
use route::{Backend, Route};

#[derive(Debug)]
pub struct Outbound {
    service: String,
    destinations: Arc<ArcSwap<Destinations>>,
}

impl Outbound {
    pub fn new(service: String, destinations: Arc<ArcSwap<Destinations>>) -> Self {
        Self {
            service,
            destinations,
        }
    }

    async fn handle(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let start = Instant::now();
        let request_id = telemetry::correlate(req.headers_mut());
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let authority = authority_of(&req).map(str::to_string);
        let destinations = self.destinations.load();
        let destination = authority
            .as_deref()
            .and_then(|a| destinations.resolve(host_of(a)));

        let mut route_name = None;
        let mut subset = None;
        let (response, peer_service, peer_id) = match (destination, authority.as_deref()) {
            (Some(destination), Some(authority)) => {
                let (route, backend) = destination.route(&req);
                route_name = route.map(|r| r.name.as_str());
                subset = backend.subset.as_deref();
                let deadline = route
                    .and_then(|r| r.timeout)
                    .and_then(|t| Some((start.checked_add(t)?, t)));
                let (response, peer_id) = forward(route, backend, deadline, req, authority).await;
                (response, backend.service.as_str(), peer_id)
            }
            _ => {
                let message = match &authority {
                    Some(a) => format!("no service named {:?} in this proxy's config", host_of(a)),
                    None => {
                        "the request names no destination (no Host header or absolute URI)".into()
                    }
                };
                let response =
                    mesh_error(StatusCode::SERVICE_UNAVAILABLE, "unknown-service", message);
                (response, "unknown", None)
            }
        };

        let elapsed = start.elapsed();
        telemetry::record_request(
            Direction::Outbound,
            &self.service,
            peer_service,
            response.status(),
            elapsed,
        );
        tracing::info!(
            target: "trellis::access",
            direction = "outbound",
            method = %method,
            authority = authority.as_deref().unwrap_or_default(),
            path,
            route = route_name,
            peer_service,
            subset,
            status = response.status().as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1e3,
            peer_id,
            request_id = request_id.to_str().unwrap_or_default(),
            "request"
        );
        response
    }

    /// Accepts opaque TCP for `service` and carries it to one of its endpoints over mTLS.
    pub async fn forward_tcp(&self, service: &str, mut downstream: TcpStream) {
        let _ = downstream.set_nodelay(true);
        let target = {
            let destinations = self.destinations.load();
            let endpoint = destinations.get(service).and_then(|d| d.pick());
            match endpoint {
                Some(endpoint) => endpoint.target.clone(),
                None => return tracing::warn!(service, "TCP connection dropped: no endpoints"),
            }
        };
        let mut upstream = match target.connect_tcp().await {
            Ok(upstream) => upstream,
            Err(error) => return tracing::warn!(%error, service, "TCP connection dropped"),
        };
        let gauge = metrics::gauge!(telemetry::TCP_OPEN, "direction" => "outbound");
        gauge.increment(1.0);
        let result = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
        gauge.decrement(1.0);
        match result {
            Ok((up, down)) => tracing::info!(
                target: "trellis::access",
                direction = "outbound",
                protocol = "tcp",
                service,
                peer_id = target.identity.as_str(),
                bytes_out = up,
                bytes_in = down,
                "tcp"
            ),
            Err(error) => {
                tracing::debug!(%error, service, "outbound TCP stream ended with an error")
            }
        }
    }
}

/// Sends the request to one endpoint of `backend`, and answers 504 if `deadline`
/// passes before the response headers arrive. Returns the response and the id the
/// endpoint was required to have.
async fn forward<'d>(
    route: Option<&Route>,
    backend: &'d Backend,
    deadline: Option<(Instant, Duration)>,
    req: Request<Incoming>,
    authority: &str,
) -> (Response<ProxyBody>, Option<&'d str>) {
    let Some(endpoint) = backend.pick() else {
        let message = match &backend.subset {
            Some(subset) => format!(
                "subset {subset:?} of service {:?} has no endpoints",
                backend.service
            ),
            None => format!("service {:?} has no endpoints", backend.service),
        };
        return (
            mesh_error(StatusCode::SERVICE_UNAVAILABLE, "no-endpoints", message),
            None,
        );
    };
    let peer_id = Some(endpoint.target.identity.as_str());
    let late = || {
        let timeout = deadline.map(|(_, t)| t).unwrap_or_default();
        let route = route.map_or("", |r| r.name.as_str());
        let message = format!(
            "service {:?} (endpoint {}) did not answer within the {timeout:?} timeout of route {route:?}",
            backend.service, endpoint.target.addr
        );
        tracing::info!(error = %message, "request timed out");
        mesh_error(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
    };
    if is_upgrade(&req) {
        let upgraded = upgrade(endpoint, req);
        let response = match deadline {
            Some((at, _)) => tokio::time::timeout_at(at.into(), upgraded)
                .await
                .unwrap_or_else(|_| late()),
            None => upgraded.await,
        };
        return (response, peer_id);
    }
    let protocol = AppProtocol::of(&req);
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(PEER_ID);
    // The authority the request was routed by travels as :authority and becomes the
    // app's Host; a different Host (absolute form) must not override it.
    parts.headers.remove(http::header::HOST);
    parts.headers.insert(APP_PROTOCOL, protocol.header_value());
    parts.uri = match retarget(&parts.uri, authority) {
        Ok(uri) => uri,
        Err(e) => return (bad_target(&e), peer_id),
    };
    parts.version = http::Version::HTTP_2;

    let in_flight = endpoint.load.start();
    let sent = endpoint.client.request(Request::from_parts(parts, body));
    let result = match deadline {
        // Dropping the request on time resets its HTTP/2 stream, so the peer
        // sidecar stops working on it too.
        Some((at, _)) => match tokio::time::timeout_at(at.into(), sent).await {
            Ok(result) => result,
            Err(_) => {
                // The endpoint was at least this slow; the balancer should know.
                in_flight.finish();
                return (late(), peer_id);
            }
        },
        None => sent.await,
    };
    let response = match result {
        Ok(mut response) => {
            in_flight.finish();
            strip_hop_by_hop(response.headers_mut());
            response.map(Either::Left)
        }
        Err(error) => {
            in_flight.fail();
            peer_failure(&error, &endpoint.target.addr)
        }
    };
    (response, peer_id)
}

async fn upgrade(endpoint: &Endpoint, mut req: Request<Incoming>) -> Response<ProxyBody> {
    strip_hop_by_hop_keeping_upgrade(req.headers_mut());
    req.headers_mut().remove(PEER_ID);
    let io = match endpoint.target.connect_http1().await {
        Ok(io) => io,
        Err(error) => return connect_failure(&error),
    };
    forward_upgrade(req, io).await.unwrap_or_else(|e| {
        mesh_error(
            StatusCode::BAD_GATEWAY,
            "upstream-error",
            format!("upgrade: {e}"),
        )
    })
}

fn connect_failure(error: &ConnectError) -> Response<ProxyBody> {
    mesh_error(
        StatusCode::SERVICE_UNAVAILABLE,
        error.kind(),
        error.to_string(),
    )
}

/// A connect or TLS failure is the mesh's 503 naming the reason; a peer that fails
/// mid-request is a 502.
fn peer_failure(
    error: &hyper_util::client::legacy::Error,
    addr: &std::net::SocketAddr,
) -> Response<ProxyBody> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if let Some(connect) = cause.downcast_ref::<ConnectError>() {
            tracing::warn!(error = %connect, "peer unreachable");
            return connect_failure(connect);
        }
        source = cause.source();
    }
    let message = format!("peer {addr}: {}", error_chain(error));
    tracing::warn!(error = %message, "peer failed the request");
    mesh_error(StatusCode::BAD_GATEWAY, "upstream-error", message)
}

/// The outbound handler as a hyper service.
#[derive(Debug, Clone)]
pub struct OutboundService(pub Arc<Outbound>);

impl hyper::service::Service<Request<Incoming>> for OutboundService {
    type Response = Response<ProxyBody>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let outbound = self.0.clone();
        Box::pin(async move { Ok(outbound.handle(req).await) })
    }
}
