//! The outbound side: the local app sends plain HTTP here with the destination in
//! the authority; the destination's first matching route picks a backend by weight,
//! and the request leaves over mTLS HTTP/2 to one of the backend's peer sidecars,
//! chosen by P2C over peak-EWMA. A route's mirror sends a copy on the side (see
//! `mirror`). TCP listeners forward opaque bytes the same way, to any endpoint of their
//! service.

pub mod balance;
pub mod bulkhead;
pub mod connect;
pub mod destinations;
pub mod fault;
pub mod mirror;
pub mod outlier;
pub mod retry;
pub mod route;

use std::{
    borrow::Cow,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::net::TcpStream;

use crate::{
    http::{
        APP_PROTOCOL, AppProtocol, PEER_ID, ProxyBody, authority_of, bad_target, error_chain,
        forward_upgrade, host_of, is_upgrade, mesh_error, retarget, strip_hop_by_hop,
        strip_hop_by_hop_keeping_upgrade,
    },
    tap::{TapDirection, TapEvent},
    telemetry::{self, Direction, RouteOutcome},
    trace::{self, KeyValue, SpanKind},
};
use connect::ConnectError;
use destinations::{Destinations, Endpoint};
use mirror::{OutboundBody, RequestBody, Shadow};
use outlier::{Breaker, Outcome};
use retry::{PeerBody, Replay, RetryPolicy, TryFailure};
use route::{Backend, Route};

/// The route name reported for requests no rule matched (they go to the whole service).
pub const DEFAULT_ROUTE: &str = "default";

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

    async fn handle(&self, req: Request<Incoming>) -> Response<OutboundBody> {
        self.handle_to(req, None).await
    }

    /// Sends `req` on. `to: None` takes the destination from its authority; `Some(name)`
    /// routes it by the routes of service `name` whatever it is addressed to, and sends
    /// it with the chosen backend's service as authority (the gateway: its own name
    /// means nothing to the backend).
    pub async fn handle_to(
        &self,
        mut req: Request<Incoming>,
        to: Option<&str>,
    ) -> Response<OutboundBody> {
        let start = Instant::now();
        let request_id = telemetry::correlate(req.headers_mut());
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let authority = authority_of(&req).map(str::to_string);
        let destinations = self.destinations.load();
        trace::global().follow(&destinations);
        // Named for its destination once the route is known.
        let mut span = trace::global().start(SpanKind::Client, req.headers_mut(), || {
            Cow::Borrowed("outbound")
        });
        let destination = match to {
            Some(name) => destinations.get(name),
            None => authority
                .as_deref()
                .and_then(|a| destinations.resolve(host_of(a))),
        };

        let mut route_name = None;
        let mut subset = None;
        let mut served = None;
        let mut comparison = None;
        // Retries, ejections and bulkhead refusals on the way are the span's events.
        let routed = span.scope(async {
            match (destination, authority.as_deref()) {
                (Some(destination), Some(authority)) => {
                    let (route, backend) = destination.route(&req);
                    route_name = route.map(|r| r.name.as_str());
                    subset = backend.subset.as_deref();
                    served = Some(RouteRecord {
                        service: &self.service,
                        // Counted for the service that serves it: a rule of `gateway` (or of
                        // any service) that sends to `storefront` is traffic to storefront.
                        destination: &backend.service,
                        route: route_name.unwrap_or(DEFAULT_ROUTE),
                        backend,
                        start,
                        recorded: false,
                    });
                    let deadline = route
                        .and_then(|r| r.timeout)
                        .and_then(|t| Some((start.checked_add(t)?, t)));
                    let until = deadline.map(|(at, _)| tokio::time::Instant::from_std(at));
                    let pool = match route {
                        Some(route) => route.bulkhead.as_ref(),
                        None => destination.bulkheads.default_pool(),
                    };
                    let (response, peer_id) = 'answer: {
                        // Faults come first: an injected delay holds no slot and an abort
                        // takes none.
                        if let Some(fault) = route.and_then(|r| r.fault.as_ref())
                            && let Some(answer) = fault.inject(&destination.name, until).await
                        {
                            break 'answer (answer, None);
                        }
                        // Held until the response headers are in (ProxyBody has no room
                        // to carry it to the body's end): see docs/resilience.md.
                        let _slot = match pool {
                            Some(pool) => match pool.enter(until).await {
                                Ok(slot) => Some(slot),
                                Err(refusal) => break 'answer (pool.refusal(refusal), None),
                            },
                            None => None,
                        };
                        // Only a request that is sent is copied, and its copy is no reason
                        // to refuse or delay it.
                        let shadow = match route.and_then(|r| r.mirror.as_ref()) {
                            Some(mirror) => mirror.admit(&req).map(|(shadow, compare)| {
                                comparison = compare;
                                shadow
                            }),
                            None => None,
                        };
                        let authority = match to {
                            Some(_) => backend.service.as_str(),
                            None => authority,
                        };
                        forward(route, backend, deadline, req, authority, shadow).await
                    };
                    (response, backend.service.as_str(), peer_id)
                }
                _ => {
                    let message = match &authority {
                        Some(a) => {
                            format!("no service named {:?} in this proxy's config", host_of(a))
                        }
                        None => "the request names no destination (no Host header or absolute URI)"
                            .into(),
                    };
                    let response =
                        mesh_error(StatusCode::SERVICE_UNAVAILABLE, "unknown-service", message);
                    (response, "unknown", None)
                }
            }
        });
        let (response, peer_service, peer_id) = routed.await;

        span.record(|span| {
            span.name = Cow::Owned(format!("{method} {peer_service}"));
            let attributes = &mut span.attributes;
            attributes.extend([
                KeyValue::new("trellis.direction", "outbound"),
                KeyValue::new("trellis.service", self.service.clone()),
                KeyValue::new("trellis.destination", peer_service.to_string()),
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.clone()),
                KeyValue::new("trellis.request_id", trace::header_text(&request_id)),
            ]);
            if let Some(authority) = &authority {
                attributes.push(KeyValue::new("server.address", authority.clone()));
            }
            if let Some(served) = &served {
                attributes.push(KeyValue::new("trellis.route", served.route.to_string()));
                attributes.push(KeyValue::new(
                    "trellis.backend",
                    served.backend.label().to_string(),
                ));
            }
            if let Some(peer_id) = peer_id {
                attributes.push(KeyValue::new("trellis.peer.id", peer_id.to_string()));
            }
            // Set with the header when the route retries; otherwise one try if any.
            let attempts = response
                .headers()
                .get(retry::ATTEMPTS)
                .and_then(|v| v.to_str().ok()?.parse::<i64>().ok())
                .unwrap_or(i64::from(peer_id.is_some()));
            attributes.push(KeyValue::new("trellis.retry.attempts", attempts));
        });
        span.end(
            response.status(),
            response.headers().get(crate::http::TRELLIS_ERROR),
        );

        let elapsed = start.elapsed();
        telemetry::record_request(
            Direction::Outbound,
            &self.service,
            peer_service,
            response.status(),
            elapsed,
        );
        if let Some(served) = served {
            served.answered(
                RouteOutcome::Answered {
                    status: response.status(),
                    mesh_error: response.headers().contains_key(crate::http::TRELLIS_ERROR),
                },
                elapsed,
            );
        }
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
        let tap = crate::tap::global();
        if tap.watched() {
            tap.publish(TapEvent {
                at: SystemTime::now(),
                direction: TapDirection::Outbound,
                method,
                authority: authority.unwrap_or_default(),
                path,
                status: response.status().as_u16(),
                latency: elapsed,
                peer_id: peer_id.map(str::to_string),
                route: route_name.map(str::to_string),
                request_id,
                client: None,
            });
        }
        match comparison {
            Some(comparison) => comparison.observe(response).map(Either::Right),
            None => response.map(Either::Left),
        }
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

/// Enters one routed request in the route and backend counts exactly once: with its
/// response, or, when the handler is dropped first (the client reset the stream or
/// hung up), on drop as a failure with the time it had taken. Without it a backend so
/// slow that clients give up would not count at all, and look healthy to a canary.
struct RouteRecord<'a> {
    service: &'a str,
    destination: &'a str,
    route: &'a str,
    backend: &'a Backend,
    start: Instant,
    recorded: bool,
}

impl RouteRecord<'_> {
    fn answered(mut self, outcome: RouteOutcome, elapsed: Duration) {
        self.recorded = true;
        telemetry::record_route_backend(
            self.destination,
            self.route,
            self.backend.label(),
            outcome,
            elapsed,
        );
    }
}

impl Drop for RouteRecord<'_> {
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        let elapsed = self.start.elapsed();
        telemetry::record_request(
            Direction::Outbound,
            self.service,
            &self.backend.service,
            telemetry::CLIENT_CLOSED,
            elapsed,
        );
        telemetry::record_route_backend(
            self.destination,
            self.route,
            self.backend.label(),
            RouteOutcome::ClientGone,
            elapsed,
        );
        tracing::debug!(
            destination = self.destination,
            route = self.route,
            duration_ms = elapsed.as_secs_f64() * 1e3,
            "the client went away before the response; counted as a failure"
        );
    }
}

/// Sends the request to an endpoint of `backend`, and again to another while the
/// route's `retries` allow it; answers 504 if `deadline` passes first, backoff pauses
/// included. Returns the response and the id the last endpoint tried was required to
/// have. A `shadow` gets its copy of the request as the body streams to the first try.
async fn forward<'d>(
    route: Option<&Route>,
    backend: &'d Backend,
    deadline: Option<(Instant, Duration)>,
    req: Request<Incoming>,
    authority: &str,
    shadow: Option<Shadow>,
) -> (Response<ProxyBody>, Option<&'d str>) {
    let route_name = route.map_or("", |r| r.name.as_str());
    let policy = route.and_then(|r| r.retries.as_ref());
    if policy.is_some() {
        backend.budget.deposit(Instant::now());
    }
    if is_upgrade(&req) {
        // The connection becomes the upgraded protocol's: one try, never replayed.
        let (response, peer_id) = upgrade_once(backend, deadline, route_name, req).await;
        let tries = u32::from(peer_id.is_some());
        return (with_attempts(response, policy, tries), peer_id);
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
        Err(e) => return (with_attempts(bad_target(&e), policy, 0), None),
    };
    parts.version = http::Version::HTTP_2;
    // Under the replay, so the copy sees each byte of the client's body once however
    // many tries there are.
    let body = match shadow {
        Some(shadow) => shadow.start(&parts, body),
        None => RequestBody::plain(body),
    };

    // Only a request that may be sent again pays for keeping its body: the others
    // (no retries, POST without allowNonIdempotent, a body over the limit) stream
    // through untouched, as they always did.
    let resend = policy
        .filter(|p| p.attempts > 1 && p.may_retry(&parts.method))
        .filter(|_| retry::fits(&parts.headers, &body));
    let (mut request, resend) = match resend {
        Some(policy) => {
            let (replay, body) = Replay::new(body);
            let resend = Resend {
                replay,
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                headers: parts.headers.clone(),
                attempts: policy.attempts,
            };
            (
                Request::from_parts(parts, Either::Right(body)),
                Some(resend),
            )
        }
        None => (Request::from_parts(parts, Either::Left(body)), None),
    };

    let per_try_timeout = policy.and_then(|p| p.per_try_timeout);
    let route_deadline = deadline.map(|(at, _)| at);
    let mut tries = 0u32;
    let mut previous: Option<&'d Arc<Endpoint>> = None;
    let mut last_failure: Option<Response<ProxyBody>> = None;
    loop {
        let endpoint = match backend.pick_for(previous) {
            Ok(endpoint) => endpoint,
            Err(why) => {
                // A retry that finds no endpoint leaves the last failure standing.
                let response = last_failure.unwrap_or_else(|| backend.unavailable(why));
                let peer_id = previous.map(|e| e.target.identity.as_str());
                return (with_attempts(response, policy, tries), peer_id);
            }
        };
        // The next try is out: the failure before it is no longer needed.
        drop(last_failure.take());
        tries += 1;
        previous = Some(endpoint);
        let peer_id = Some(endpoint.target.identity.as_str());
        let per_try_deadline = per_try_timeout.and_then(|t| Instant::now().checked_add(t));
        // Whichever deadline comes first ends the try; the route's ends the request.
        let (until, route_cuts) = match (per_try_deadline, route_deadline) {
            (Some(try_at), Some(route_at)) if try_at < route_at => (Some(try_at), false),
            (Some(try_at), None) => (Some(try_at), false),
            (_, route_at) => (route_at, true),
        };
        let (response, failure) = match try_once(endpoint, &backend.breaker, request, until).await {
            Tried::Answered(response) => {
                let status = response.status();
                (response, TryFailure::Status(status))
            }
            Tried::Failed(error) => {
                let failure = match connect_error(&error) {
                    Some(_) => TryFailure::ConnectFailure,
                    None => TryFailure::Reset,
                };
                (peer_failure(&error, &endpoint.target.addr), failure)
            }
            Tried::TimedOut if route_cuts => {
                let late = route_timeout(backend, endpoint, deadline, route_name, tries);
                return (with_attempts(late, policy, tries), peer_id);
            }
            Tried::TimedOut => {
                let timeout = per_try_timeout.unwrap_or_default();
                let late = per_try_late(backend, endpoint, timeout, route_name);
                (late, TryFailure::PerTryTimeout)
            }
        };

        // Another try only for a failure the route retries, with tries left, a body
        // that can be sent again, and room in the destination's budget.
        let retry = match (policy, &resend) {
            (Some(policy), Some(resend))
                if tries < resend.attempts
                    && policy.retries_on(failure)
                    && resend.replay.can_replay() =>
            {
                Some((policy, resend))
            }
            _ => None,
        };
        let Some((policy, next)) = retry else {
            return (with_attempts(response, policy, tries), peer_id);
        };
        if !backend.budget.try_withdraw(Instant::now()) {
            metrics::counter!(retry::BUDGET_EXHAUSTED, "service" => backend.service.clone())
                .increment(1);
            trace::event("retry budget exhausted", || {
                vec![KeyValue::new("trellis.retry.reason", failure.reason())]
            });
            tracing::debug!(
                service = backend.service,
                "retry budget spent: the failure is returned as is"
            );
            return (with_attempts(response, Some(policy), tries), peer_id);
        }
        let pause = policy.backoff.pause(tries);
        let until = route_deadline.map(tokio::time::Instant::from_std);
        if !retry::sleep_unless_late(pause, until).await {
            let late = route_timeout(backend, endpoint, deadline, route_name, tries);
            return (with_attempts(late, Some(policy), tries), peer_id);
        }
        metrics::counter!(
            retry::RETRIES,
            "service" => backend.service.clone(),
            "reason" => failure.reason(),
        )
        .increment(1);
        trace::event("retry", || {
            vec![
                KeyValue::new("trellis.retry.attempt", i64::from(tries + 1)),
                KeyValue::new("trellis.retry.reason", failure.reason()),
                KeyValue::new(
                    "trellis.retry.previous_endpoint",
                    endpoint.target.addr.to_string(),
                ),
            ]
        });
        request = next.request();
        last_failure = Some(response);
    }
}

/// What a retry needs to send the request again.
struct Resend {
    replay: Replay<RequestBody>,
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    attempts: u32,
}

impl Resend {
    /// The request for the next try; earlier tries' bodies stop.
    fn request(&self) -> Request<PeerBody> {
        let mut request = Request::new(Either::Right(self.replay.next_body()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = http::Version::HTTP_2;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// What one try came to.
enum Tried {
    /// Response headers, hop-by-hop headers removed.
    Answered(Response<ProxyBody>),
    Failed(hyper_util::client::legacy::Error),
    /// `until` passed first; the request to the peer is cancelled.
    TimedOut,
}

/// Sends one try to `endpoint` and reports its outcome to the balancer and the
/// circuit breaker.
async fn try_once(
    endpoint: &Endpoint,
    breaker: &Breaker,
    request: Request<PeerBody>,
    until: Option<Instant>,
) -> Tried {
    let in_flight = endpoint.load.start();
    let sent = endpoint.client.request(request);
    let result = match until {
        // Dropping the request on time resets its HTTP/2 stream, so the peer
        // sidecar stops working on it too.
        Some(at) => match tokio::time::timeout_at(at.into(), sent).await {
            Ok(result) => result,
            Err(_) => {
                // The endpoint was at least this slow; the balancer should know.
                in_flight.finish();
                endpoint.outlier.record(Outcome::Failure, breaker);
                return Tried::TimedOut;
            }
        },
        None => sent.await,
    };
    match result {
        Ok(mut response) => {
            in_flight.finish();
            endpoint
                .outlier
                .record(Outcome::of_status(response.status()), breaker);
            strip_hop_by_hop(response.headers_mut());
            Tried::Answered(response.map(Either::Left))
        }
        Err(error) => {
            in_flight.fail();
            endpoint.outlier.record(Outcome::Failure, breaker);
            Tried::Failed(error)
        }
    }
}

/// Sets `x-trellis-attempts` when the route has retries.
fn with_attempts(
    mut response: Response<ProxyBody>,
    policy: Option<&RetryPolicy>,
    tries: u32,
) -> Response<ProxyBody> {
    if policy.is_some() {
        response
            .headers_mut()
            .insert(retry::ATTEMPTS, HeaderValue::from(tries));
    }
    response
}

/// The mesh's 504 when the route's timeout passes, during a try or a backoff pause.
fn route_timeout(
    backend: &Backend,
    endpoint: &Endpoint,
    deadline: Option<(Instant, Duration)>,
    route: &str,
    tries: u32,
) -> Response<ProxyBody> {
    let timeout = deadline.map(|(_, t)| t).unwrap_or_default();
    let mut message = format!(
        "service {:?} (endpoint {}) did not answer within the {timeout:?} timeout of route {route:?}",
        backend.service, endpoint.target.addr
    );
    if tries > 1 {
        message.push_str(&format!(" ({tries} tries)"));
    }
    tracing::info!(error = %message, "request timed out");
    mesh_error(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
}

/// The mesh's 504 for one try past its `perTryTimeout`.
fn per_try_late(
    backend: &Backend,
    endpoint: &Endpoint,
    timeout: Duration,
    route: &str,
) -> Response<ProxyBody> {
    let message = format!(
        "service {:?} (endpoint {}) did not answer within the {timeout:?} per-try timeout of route {route:?}",
        backend.service, endpoint.target.addr
    );
    tracing::info!(error = %message, "try timed out");
    mesh_error(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
}

/// An upgrade request, once, to one endpoint of `backend`.
async fn upgrade_once<'d>(
    backend: &'d Backend,
    deadline: Option<(Instant, Duration)>,
    route: &str,
    req: Request<Incoming>,
) -> (Response<ProxyBody>, Option<&'d str>) {
    let endpoint = match backend.pick_for(None) {
        Ok(endpoint) => endpoint,
        Err(why) => return (backend.unavailable(why), None),
    };
    let upgraded = upgrade(endpoint, req);
    let response = match deadline {
        Some((at, _)) => match tokio::time::timeout_at(at.into(), upgraded).await {
            Ok(response) => response,
            Err(_) => route_timeout(backend, endpoint, deadline, route, 1),
        },
        None => upgraded.await,
    };
    endpoint
        .outlier
        .record(Outcome::of_status(response.status()), &backend.breaker);
    (response, Some(endpoint.target.identity.as_str()))
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

/// The connect or TLS failure behind a client error, if that is what it was.
fn connect_error(error: &hyper_util::client::legacy::Error) -> Option<&ConnectError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if let Some(connect) = cause.downcast_ref::<ConnectError>() {
            return Some(connect);
        }
        source = cause.source();
    }
    None
}

/// A connect or TLS failure is the mesh's 503 naming the reason; a peer that fails
/// mid-request is a 502.
fn peer_failure(
    error: &hyper_util::client::legacy::Error,
    addr: &std::net::SocketAddr,
) -> Response<ProxyBody> {
    if let Some(connect) = connect_error(error) {
        tracing::warn!(error = %connect, "peer unreachable");
        return connect_failure(connect);
    }
    let message = format!("peer {addr}: {}", error_chain(error));
    tracing::warn!(error = %message, "peer failed the request");
    mesh_error(StatusCode::BAD_GATEWAY, "upstream-error", message)
}

/// The outbound handler as a hyper service.
#[derive(Debug, Clone)]
pub struct OutboundService(pub Arc<Outbound>);

impl hyper::service::Service<Request<Incoming>> for OutboundService {
    type Response = Response<OutboundBody>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let outbound = self.0.clone();
        Box::pin(async move { Ok(outbound.handle(req).await) })
    }
}
