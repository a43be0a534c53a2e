//! The inbound side: accept a peer sidecar's mTLS connection (or, in PERMISSIVE
//! mode, plaintext), verify its SPIFFE id, check each request against the
//! authorization rules, and hand it to the local app in the protocol the calling app
//! spoke, with the verified id in `x-trellis-peer-id`.

pub mod authorize;
pub mod detect;
pub mod rate_limit;

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use trellis_api::config::MtlsMode;
use trellis_ca::{Credentials, SpiffeId};

use crate::{
    args::AppKind,
    http::{
        APP_PROTOCOL, AppProtocol, PEER_ID, ProxyBody, authority_of, bad_target, forward_upgrade,
        is_upgrade, mesh_error, retarget, serve_connection, strip_hop_by_hop,
        strip_hop_by_hop_keeping_upgrade,
    },
    outbound::{
        connect::{ALPN_H2, ALPN_HTTP1, ALPN_TCP},
        destinations::Destinations,
    },
    tap::{TapDirection, TapEvent},
    telemetry::{self, Direction},
    trace::{self, KeyValue, SpanKind},
};
use detect::Protocol;
use rate_limit::RateLimiter;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Shorter than common app keep-alive timeouts (Node's is 5 s), so the pool does not
/// hand out a connection the app is closing.
const APP_POOL_IDLE: Duration = Duration::from_secs(4);

pub struct Inbound {
    service: String,
    app_addr: SocketAddr,
    app_kind: AppKind,
    detect_timeout: Duration,
    idle_timeout: Duration,
    destinations: Arc<ArcSwap<Destinations>>,
    tls: TlsAcceptor,
    app_h1: Client<AppConnector, Incoming>,
    app_h2: Client<AppConnector, Incoming>,
    rate_limiter: RateLimiter,
    /// Authorization decisions and rate-limit refusals, counted without a label
    /// lookup per request.
    allowed: metrics::Counter,
    denied: metrics::Counter,
    limited: metrics::Counter,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("service", &self.service)
            .field("app_addr", &self.app_addr)
            .finish_non_exhaustive()
    }
}

impl Inbound {
    pub fn new(
        service: String,
        app_addr: SocketAddr,
        app_kind: AppKind,
        detect_timeout: Duration,
        idle_timeout: Duration,
        destinations: Arc<ArcSwap<Destinations>>,
        creds: &Credentials,
    ) -> Result<Self, rustls::Error> {
        let mut tls = trellis_ca::server_config(creds)?;
        tls.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
        metrics::describe_counter!(
            authorize::DECISIONS,
            "Inbound requests and opaque connections by authorization decision (allow, deny)"
        );
        metrics::describe_counter!(
            rate_limit::LIMITED,
            "Inbound requests refused with 429 by the local rate limit"
        );
        let decision = |decision: &'static str| metrics::counter!(authorize::DECISIONS, "service" => service.clone(), "decision" => decision);
        let (allowed, denied) = (decision("allow"), decision("deny"));
        let limited = metrics::counter!(rate_limit::LIMITED, "service" => service.clone());
        let client = |http2_only| {
            Client::builder(TokioExecutor::new())
                .http2_only(http2_only)
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(APP_POOL_IDLE)
                .build(AppConnector(app_addr))
        };
        Ok(Self {
            service,
            app_addr,
            app_kind,
            detect_timeout,
            idle_timeout,
            destinations,
            tls: TlsAcceptor::from(Arc::new(tls)),
            app_h1: client(false),
            app_h2: client(true),
            rate_limiter: RateLimiter::default(),
            allowed,
            denied,
            limited,
        })
    }

    /// Handles one accepted connection to its end.
    pub async fn serve(self: Arc<Self>, tcp: TcpStream, drain: CancellationToken) {
        let _ = tcp.set_nodelay(true);
        let mode = self.destinations.load().config().mtls;
        let (protocol, io) = match detect::detect(tcp, self.detect_timeout).await {
            Ok(detected) => detected,
            Err(error) => return tracing::debug!(%error, "connection lost before detection"),
        };
        match (protocol, mode) {
            (Protocol::Tls, _) => {
                let accepted =
                    tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, self.tls.accept(io)).await;
                let tls = match accepted {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        let reason = handshake_failure(&error);
                        telemetry::record_tls_error(Direction::Inbound, reason);
                        return tracing::info!(%error, reason, "inbound TLS handshake refused");
                    }
                    Err(_) => {
                        telemetry::record_tls_error(Direction::Inbound, "timeout");
                        return tracing::info!("inbound TLS handshake timed out");
                    }
                };
                let (_, session) = tls.get_ref();
                let peer = match trellis_ca::peer_id(session.peer_certificates()) {
                    Ok(peer) => peer,
                    // The verifier already accepted it, so this cannot happen; refuse anyway.
                    Err(error) => return tracing::warn!(%error, "verified peer has no id"),
                };
                if session.alpn_protocol() == Some(ALPN_TCP) {
                    self.forward_tcp(tls, Some(&peer)).await;
                } else {
                    let service = InboundService::new(self.clone(), Some(peer));
                    serve_connection(tls, service, drain, self.idle_timeout).await;
                }
            }
            (_, MtlsMode::Strict) => {
                telemetry::record_tls_error(Direction::Inbound, "plaintext");
                tracing::info!(?protocol, "plaintext refused: mtls is STRICT");
            }
            (Protocol::Http1 | Protocol::Http2, MtlsMode::Permissive) => {
                let service = InboundService::new(self.clone(), None);
                serve_connection(io, service, drain, self.idle_timeout).await;
            }
            (Protocol::Opaque, MtlsMode::Permissive) => self.forward_tcp(io, None).await,
        }
    }

    /// Opaque bytes to the app, only when it is declared to speak TCP: an HTTP app
    /// reached through a raw stream would see whatever `x-trellis-peer-id` the
    /// caller wrote.
    async fn forward_tcp<T>(&self, mut downstream: T, peer: Option<&SpiffeId>)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let authorized = self.destinations.load().authorization().check_stream(peer);
        if let Err(denial) = authorized {
            self.denied.increment(1);
            return tracing::info!(
                peer_id = peer.map(SpiffeId::as_str),
                service = self.service,
                reason = denial.reason(),
                "opaque TCP connection denied"
            );
        }
        self.allowed.increment(1);
        if self.app_kind != AppKind::Tcp {
            return tracing::info!(
                peer_id = peer.map(SpiffeId::as_str),
                "opaque TCP refused: the app speaks HTTP (--app-protocol http)"
            );
        }
        let mut app = match connect_app(self.app_addr).await {
            Ok(app) => app,
            Err(error) => {
                return tracing::warn!(%error, app = %self.app_addr, "app refused a TCP connection");
            }
        };
        let gauge = metrics::gauge!(telemetry::TCP_OPEN, "direction" => "inbound");
        gauge.increment(1.0);
        let result = tokio::io::copy_bidirectional(&mut downstream, &mut app).await;
        gauge.decrement(1.0);
        match result {
            Ok((up, down)) => tracing::info!(
                target: "trellis::access",
                direction = "inbound",
                protocol = "tcp",
                peer_id = peer.map(SpiffeId::as_str),
                bytes_in = up,
                bytes_out = down,
                "tcp"
            ),
            Err(error) => tracing::debug!(%error, "inbound TCP stream ended with an error"),
        }
    }

    async fn handle(&self, mut req: Request<Incoming>, caller: &Caller) -> Response<ProxyBody> {
        let start = Instant::now();
        let request_id = telemetry::correlate(req.headers_mut());
        // Only this sidecar may say who the caller is, and only a mesh peer may say
        // what its app spoke.
        let claimed_protocol = req.headers_mut().remove(APP_PROTOCOL);
        let protocol = match (&caller.peer, claimed_protocol) {
            (Some(_), Some(value)) => AppProtocol::from_header(&value),
            _ => None,
        }
        .unwrap_or_else(|| AppProtocol::of(&req));
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let authority = authority_of(&req)
            .map(str::to_string)
            .unwrap_or_else(|| self.app_addr.to_string());
        trace::global().follow(&self.destinations.load());
        // The app gets this span's traceparent: its own calls are this hop's children.
        let mut span = trace::global().start(SpanKind::Server, req.headers_mut(), || {
            format!("{method} {}", self.service).into()
        });

        let (limited, authorized) = {
            let destinations = self.destinations.load();
            let limit = destinations.config().inbound.rate_limit.as_ref();
            let limited = self
                .rate_limiter
                .admit(limit, caller.peer.as_ref(), Instant::now());
            let authorized = destinations
                .authorization()
                .check_request(caller.peer.as_ref(), &req);
            (limited, authorized)
        };
        let response = if let Err(wait) = limited {
            self.limit(caller, wait)
        } else if let Err(denial) = authorized {
            self.deny(caller, &method, &path, denial)
        } else if is_upgrade(&req) {
            self.allowed.increment(1);
            self.upgrade(req, caller).await
        } else {
            self.allowed.increment(1);
            self.forward(req, caller, protocol, &authority).await
        };

        span.record(|span| {
            span.attributes.extend([
                KeyValue::new("trellis.direction", "inbound"),
                KeyValue::new("trellis.service", self.service.clone()),
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.clone()),
                KeyValue::new("server.address", authority.clone()),
                KeyValue::new("trellis.request_id", trace::header_text(&request_id)),
                KeyValue::new("trellis.peer.service", caller.peer_service.clone()),
            ]);
            if let Some(peer) = &caller.peer {
                span.attributes
                    .push(KeyValue::new("trellis.peer.id", peer.as_str().to_string()));
            }
        });
        span.end(
            response.status(),
            response.headers().get(crate::http::TRELLIS_ERROR),
        );

        let elapsed = start.elapsed();
        telemetry::record_request(
            Direction::Inbound,
            &self.service,
            &caller.peer_service,
            response.status(),
            elapsed,
        );
        tracing::info!(
            target: "trellis::access",
            direction = "inbound",
            method = %method,
            authority,
            path,
            status = response.status().as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1e3,
            peer_id = caller.peer.as_ref().map(SpiffeId::as_str),
            request_id = request_id.to_str().unwrap_or_default(),
            "request"
        );
        let tap = crate::tap::global();
        if tap.watched() {
            tap.publish(TapEvent {
                at: SystemTime::now(),
                direction: TapDirection::Inbound,
                method,
                authority,
                path,
                status: response.status().as_u16(),
                latency: elapsed,
                peer_id: caller.peer.as_ref().map(|p| p.as_str().to_string()),
                route: None,
                request_id,
                client: None,
            });
        }
        response
    }

    fn deny(
        &self,
        caller: &Caller,
        method: &http::Method,
        path: &str,
        denial: authorize::Denial,
    ) -> Response<ProxyBody> {
        self.denied.increment(1);
        let who = caller
            .peer
            .as_ref()
            .map_or("an unauthenticated (plaintext) caller", SpiffeId::as_str);
        let message = format!(
            "{who} may not {method} {path} on service {:?}: {}",
            self.service,
            denial.reason()
        );
        tracing::info!(
            peer_id = caller.peer.as_ref().map(SpiffeId::as_str),
            %method,
            path,
            reason = denial.reason(),
            "request denied"
        );
        mesh_error(StatusCode::FORBIDDEN, "unauthorized", message)
    }

    /// 429 with `retry-after`: the service's local rate limit has no token left.
    fn limit(&self, caller: &Caller, wait: Duration) -> Response<ProxyBody> {
        self.limited.increment(1);
        let seconds = rate_limit::retry_after_seconds(wait);
        let message = format!(
            "service {:?} is over its rate limit; retry in {seconds}s",
            self.service
        );
        tracing::debug!(
            peer_id = caller.peer.as_ref().map(SpiffeId::as_str),
            retry_after = seconds,
            "request rate limited"
        );
        let mut response = mesh_error(StatusCode::TOO_MANY_REQUESTS, "rate-limited", message);
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
        response
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        caller: &Caller,
        protocol: AppProtocol,
        authority: &str,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        // Stripping first: a peer must not be able to name the peer-id header in
        // `Connection` and so have its verified id removed.
        strip_hop_by_hop(&mut parts.headers);
        caller.stamp(&mut parts.headers);
        parts.uri = match retarget(&parts.uri, authority) {
            Ok(uri) => uri,
            Err(e) => return bad_target(&e),
        };
        let client = match protocol {
            AppProtocol::Http1 => {
                parts.version = http::Version::HTTP_11;
                // The authority the caller addressed is the app's Host.
                if let Ok(host) = HeaderValue::from_str(authority) {
                    parts.headers.insert(http::header::HOST, host);
                }
                &self.app_h1
            }
            AppProtocol::Http2 => {
                parts.version = http::Version::HTTP_2;
                &self.app_h2
            }
        };
        match client.request(Request::from_parts(parts, body)).await {
            Ok(mut response) => {
                strip_hop_by_hop(response.headers_mut());
                response.map(Either::Left)
            }
            Err(error) => {
                let error = crate::http::error_chain(&error);
                tracing::warn!(%error, app = %self.app_addr, "the app did not answer");
                mesh_error(StatusCode::BAD_GATEWAY, "app-unavailable", error)
            }
        }
    }

    async fn upgrade(&self, mut req: Request<Incoming>, caller: &Caller) -> Response<ProxyBody> {
        strip_hop_by_hop_keeping_upgrade(req.headers_mut());
        caller.stamp(req.headers_mut());
        let app = match connect_app(self.app_addr).await {
            Ok(app) => app,
            Err(e) => {
                let message = format!("connecting to the app: {e}");
                return mesh_error(StatusCode::BAD_GATEWAY, "app-unavailable", message);
            }
        };
        forward_upgrade(req, app).await.unwrap_or_else(|e| {
            mesh_error(
                StatusCode::BAD_GATEWAY,
                "app-unavailable",
                format!("upgrade: {e}"),
            )
        })
    }
}

/// Who is on the other end of a connection, worked out once per connection.
#[derive(Debug)]
struct Caller {
    peer: Option<SpiffeId>,
    /// `x-trellis-peer-id` as the app will see it.
    header: Option<HeaderValue>,
    /// The metrics label: the peer's service account, or `unknown` without mTLS.
    peer_service: String,
}

impl Caller {
    fn new(peer: Option<SpiffeId>) -> Self {
        let header = peer
            .as_ref()
            .and_then(|p| HeaderValue::from_str(p.as_str()).ok());
        let peer_service = peer
            .as_ref()
            .and_then(|p| p.workload_parts())
            .map_or("unknown", |(_, sa)| sa)
            .to_string();
        Self {
            peer,
            header,
            peer_service,
        }
    }

    /// Replaces any `x-trellis-peer-id` the caller sent with the verified one (or none).
    fn stamp(&self, headers: &mut http::HeaderMap) {
        headers.remove(PEER_ID);
        if let Some(value) = &self.header {
            headers.insert(PEER_ID, value.clone());
        }
    }
}

async fn connect_app(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to the app at {addr} timed out after {APP_CONNECT_TIMEOUT:?}"),
            )
        })??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// The reason label for a refused handshake (bounded, for metrics).
fn handshake_failure(error: &std::io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    match error.get_ref().and_then(|e| e.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented) => "no_client_certificate",
        Some(E::InvalidCertificate(C::UnknownIssuer)) => "unknown_issuer",
        Some(E::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => "expired",
        Some(E::InvalidCertificate(C::Other(_))) => "invalid_identity",
        Some(E::InvalidCertificate(_)) => "invalid_certificate",
        Some(_) => "protocol",
        None => "io",
    }
}

/// Per-connection request handler: the inbound plus who is on the other end.
#[derive(Debug, Clone)]
struct InboundService {
    inbound: Arc<Inbound>,
    caller: Arc<Caller>,
}

impl InboundService {
    fn new(inbound: Arc<Inbound>, peer: Option<SpiffeId>) -> Self {
        Self {
            inbound,
            caller: Arc::new(Caller::new(peer)),
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for InboundService {
    type Response = Response<ProxyBody>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.inbound.handle(req, &this.caller).await) })
    }
}

/// Dials the local app whatever the URI says, so the URI keeps the caller's authority.
#[derive(Debug, Clone, Copy)]
pub struct AppConnector(SocketAddr);

impl tower::Service<Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move { Ok(TokioIo::new(connect_app(addr).await?)) })
    }
}
