//! The ingress gateway (`--mode gateway`): the mesh's edge. External clients send
//! plain HTTP/1.1 or h2c to `--listen`; each request is routed by the rules of the
//! gateway's own service (the TrafficRoute for `--service`), by host, path, method and
//! headers, to a mesh service over mTLS with the gateway's SVID. It takes the outbound
//! path a sidecar's app takes, so the rule's timeout, retries, bulkhead, fault and
//! mirror and the backend's circuit breaker all apply. The `rateLimit` of the
//! gateway's own DestinationPolicy limits external clients, per client address with
//! `perSource`. A request no rule matches is answered 404: the gateway has no app to
//! fall back to.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::{
    http::{ProxyBody, REQUEST_ID, authority_of, mesh_error, serve_connection},
    inbound::rate_limit::{self, RateLimiter},
    outbound::{Outbound, destinations::Destinations, mirror::OutboundBody},
    tap::{TapDirection, TapEvent},
    telemetry,
    trace::{self, KeyValue, SpanKind},
};

pub const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// The `peer_service` of the gateway's own metrics: its callers are outside the mesh.
const EXTERNAL: &str = "external";

pub struct Gateway {
    service: String,
    outbound: Arc<Outbound>,
    destinations: Arc<ArcSwap<Destinations>>,
    idle_timeout: Duration,
    rate_limiter: RateLimiter,
    limited: metrics::Counter,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Routes as `service` through `outbound`, which must share `destinations`.
    pub fn new(
        service: String,
        outbound: Arc<Outbound>,
        destinations: Arc<ArcSwap<Destinations>>,
        idle_timeout: Duration,
    ) -> Self {
        metrics::describe_counter!(
            rate_limit::LIMITED,
            "Requests refused with 429 by the local rate limit"
        );
        let limited = metrics::counter!(rate_limit::LIMITED, "service" => service.clone());
        Self {
            service,
            outbound,
            destinations,
            idle_timeout,
            rate_limiter: RateLimiter::default(),
            limited,
        }
    }

    /// Serves one external client's connection to its end.
    pub async fn serve(self: Arc<Self>, tcp: TcpStream, drain: CancellationToken) {
        let _ = tcp.set_nodelay(true);
        let client = tcp.peer_addr().ok();
        let idle = self.idle_timeout;
        let service = GatewayService {
            gateway: self,
            client,
        };
        serve_connection(tcp, service, drain, idle).await;
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        client: Option<SocketAddr>,
    ) -> Response<OutboundBody> {
        let start = Instant::now();
        let request_id = telemetry::correlate(req.headers_mut());
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let host = authority_of(&req).map(str::to_string);
        // Rules match `host` as a header; HTTP/2 carries it as :authority, and a
        // request without one still needs an authority for the outbound path.
        let host_header = host.as_deref().unwrap_or(&self.service);
        if let Ok(value) = HeaderValue::from_str(host_header) {
            req.headers_mut().insert(header::HOST, value);
        }
        trace::global().follow(&self.destinations.load());
        // The trace starts here unless the client brought one; the outbound span is
        // this one's child.
        let mut span = trace::global().start(SpanKind::Server, req.headers_mut(), || {
            format!("{method} {}", self.service).into()
        });

        let mut response = match self.refusal(&req, client, host.as_deref()) {
            Some(refusal) => refusal.map(Either::Left),
            None => {
                forwarded(req.headers_mut(), client, host.as_deref());
                self.outbound.handle_to(req, Some(&self.service)).await
            }
        };
        // The client can quote it when asking what became of its request.
        response
            .headers_mut()
            .insert(REQUEST_ID, request_id.clone());

        span.record(|span| {
            span.attributes.extend([
                KeyValue::new("trellis.direction", "gateway"),
                KeyValue::new("trellis.service", self.service.clone()),
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.clone()),
                KeyValue::new("trellis.request_id", trace::header_text(&request_id)),
            ]);
            if let Some(host) = &host {
                span.attributes
                    .push(KeyValue::new("server.address", host.clone()));
            }
            if let Some(client) = client {
                span.attributes.push(KeyValue::new(
                    "client.address",
                    client.ip().to_canonical().to_string(),
                ));
            }
        });
        span.end(
            response.status(),
            response.headers().get(crate::http::TRELLIS_ERROR),
        );

        let elapsed = start.elapsed();
        let labels = [
            ("direction", "gateway".to_string()),
            ("service", self.service.clone()),
            ("peer_service", EXTERNAL.to_string()),
        ];
        metrics::histogram!(telemetry::REQUEST_DURATION, &labels).record(elapsed.as_secs_f64());
        let code = ("code", response.status().as_u16().to_string());
        let [a, b, c] = labels;
        metrics::counter!(telemetry::REQUESTS, &[a, b, c, code]).increment(1);
        tracing::info!(
            target: "trellis::access",
            direction = "gateway",
            method = %method,
            authority = host.as_deref().unwrap_or_default(),
            path,
            status = response.status().as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1e3,
            client = client.map(tracing::field::display),
            request_id = request_id.to_str().unwrap_or_default(),
            "request"
        );
        let tap = crate::tap::global();
        if tap.watched() {
            tap.publish(TapEvent {
                at: SystemTime::now(),
                direction: TapDirection::Gateway,
                method,
                authority: host.unwrap_or_default(),
                path,
                status: response.status().as_u16(),
                latency: elapsed,
                peer_id: None,
                route: None,
                request_id,
                client,
            });
        }
        response
    }

    /// The gateway's own answer when the request goes no further: 429 past the rate
    /// limit, 404 when no rule of the gateway's service matches.
    fn refusal(
        &self,
        req: &Request<Incoming>,
        client: Option<SocketAddr>,
        host: Option<&str>,
    ) -> Option<Response<ProxyBody>> {
        let destinations = self.destinations.load();
        let limit = destinations.config().inbound.rate_limit.as_ref();
        // Only a per-source limit needs the address as text.
        let source = match (limit, client) {
            (Some(limit), Some(client)) if limit.per_source => {
                client.ip().to_canonical().to_string()
            }
            _ => String::new(),
        };
        if let Err(wait) = self
            .rate_limiter
            .admit_source(limit, &source, Instant::now())
        {
            return Some(self.limit(wait, &source));
        }
        let routed = destinations
            .get(&self.service)
            .is_some_and(|d| d.route(req).0.is_some());
        if routed {
            return None;
        }
        let message = format!(
            "no route of the gateway's service {:?} matches {} {} (host {:?})",
            self.service,
            req.method(),
            req.uri().path(),
            host.unwrap_or_default(),
        );
        Some(mesh_error(StatusCode::NOT_FOUND, "no-route", message))
    }

    /// 429 with `retry-after`: the gateway's rate limit has no token left.
    fn limit(&self, wait: Duration, source: &str) -> Response<ProxyBody> {
        self.limited.increment(1);
        let seconds = rate_limit::retry_after_seconds(wait);
        let whose = if source.is_empty() {
            String::new()
        } else {
            format!(" for {source}")
        };
        let message = format!(
            "the gateway {:?} is over its rate limit{whose}; retry in {seconds}s",
            self.service
        );
        tracing::debug!(source, retry_after = seconds, "request rate limited");
        let mut response = mesh_error(StatusCode::TOO_MANY_REQUESTS, "rate-limited", message);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        response
    }
}

/// What the backend should know of the external request, and what an outsider may
/// not say: the mesh's own `x-trellis-*` headers are never taken from outside.
/// `x-forwarded-for` gets the client's address appended to what came before it.
fn forwarded(headers: &mut HeaderMap, client: Option<SocketAddr>, host: Option<&str>) {
    let foreign: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-trellis-"))
        .cloned()
        .collect();
    for name in foreign {
        headers.remove(name);
    }
    if let Some(host) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert(FORWARDED_HOST, host);
    }
    if let Some(client) = client {
        let ip = client.ip().to_canonical().to_string();
        let mut chain: Vec<&str> = headers
            .get_all(FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        chain.push(&ip);
        if let Ok(value) = HeaderValue::from_str(&chain.join(", ")) {
            headers.insert(FORWARDED_FOR, value);
        }
    }
    headers.insert(FORWARDED_PROTO, HeaderValue::from_static("http"));
}

/// The gateway as a hyper service for one client connection.
#[derive(Debug, Clone)]
struct GatewayService {
    gateway: Arc<Gateway>,
    client: Option<SocketAddr>,
}

impl hyper::service::Service<Request<Incoming>> for GatewayService {
    type Response = Response<OutboundBody>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let (gateway, client) = (self.gateway.clone(), self.client);
        Box::pin(async move { Ok(gateway.handle(req, client).await) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header(headers: &HeaderMap, name: &HeaderName) -> String {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect::<Vec<_>>()
            .join("|")
    }

    #[test]
    fn forwarded_headers_say_where_the_request_came_from_and_drop_the_meshs_own() {
        let mut headers = HeaderMap::new();
        headers.insert("x-trellis-peer-id", "spiffe://forged".parse().unwrap());
        headers.insert("x-trellis-shadow", "yes".parse().unwrap());
        headers.append(FORWARDED_FOR, "203.0.113.9".parse().unwrap());
        headers.append(FORWARDED_FOR, "198.51.100.2, 10.0.0.1".parse().unwrap());
        headers.insert(FORWARDED_PROTO, "https".parse().unwrap());
        headers.insert("x-keep", "1".parse().unwrap());
        let client = "[::ffff:192.0.2.7]:51000".parse().unwrap();
        forwarded(&mut headers, Some(client), Some("shop.example:8080"));
        assert!(!headers.contains_key("x-trellis-peer-id"));
        assert!(!headers.contains_key("x-trellis-shadow"));
        assert_eq!(
            header(&headers, &FORWARDED_FOR),
            "203.0.113.9, 198.51.100.2, 10.0.0.1, 192.0.2.7"
        );
        assert_eq!(header(&headers, &FORWARDED_HOST), "shop.example:8080");
        assert_eq!(header(&headers, &FORWARDED_PROTO), "http");
        assert_eq!(header(&headers, &HeaderName::from_static("x-keep")), "1");

        let mut bare = HeaderMap::new();
        forwarded(&mut bare, None, None);
        assert!(!bare.contains_key(FORWARDED_FOR) && !bare.contains_key(FORWARDED_HOST));
        assert_eq!(header(&bare, &FORWARDED_PROTO), "http");
    }
}
