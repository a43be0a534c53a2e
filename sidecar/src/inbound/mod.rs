//! The inbound side: accept a peer sidecar's mTLS connection (or, in PERMISSIVE
//! mode, plaintext), verify its SPIFFE id, and hand each request to the local app
//! in the protocol the calling app spoke, with the verified id in `x-trellis-peer-id`.

pub mod detect;

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
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
    http::{
        APP_PROTOCOL, AppProtocol, PEER_ID, ProxyBody, authority_of, forward_upgrade, is_upgrade,
        mesh_error, serve_connection, strip_hop_by_hop,
    },
    outbound::{
        connect::{ALPN_H2, ALPN_HTTP1, ALPN_TCP},
        destinations::Destinations,
    },
    telemetry::{self, Direction},
};
use detect::Protocol;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Inbound {
    service: String,
    app_addr: SocketAddr,
    detect_timeout: Duration,
    destinations: Arc<ArcSwap<Destinations>>,
    tls: TlsAcceptor,
    app_h1: Client<AppConnector, Incoming>,
    app_h2: Client<AppConnector, Incoming>,
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
        detect_timeout: Duration,
        destinations: Arc<ArcSwap<Destinations>>,
        creds: &Credentials,
    ) -> Result<Self, rustls::Error> {
        let mut tls = trellis_ca::server_config(creds)?;
        tls.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
        let client = |http2_only| {
            Client::builder(TokioExecutor::new())
                .http2_only(http2_only)
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(AppConnector(app_addr))
        };
        Ok(Self {
            service,
            app_addr,
            detect_timeout,
            destinations,
            tls: TlsAcceptor::from(Arc::new(tls)),
            app_h1: client(false),
            app_h2: client(true),
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
                let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
                if alpn.as_deref() == Some(ALPN_TCP) {
                    self.forward_tcp(tls, Some(&peer)).await;
                } else {
                    let service = InboundService {
                        inbound: self.clone(),
                        peer: Some(peer),
                    };
                    serve_connection(tls, service, drain).await;
                }
            }
            (_, MtlsMode::Strict) => {
                telemetry::record_tls_error(Direction::Inbound, "plaintext");
                tracing::info!(?protocol, "plaintext refused: mtls is STRICT");
            }
            (Protocol::Http1 | Protocol::Http2, MtlsMode::Permissive) => {
                let service = InboundService {
                    inbound: self.clone(),
                    peer: None,
                };
                serve_connection(io, service, drain).await;
            }
            (Protocol::Opaque, MtlsMode::Permissive) => self.forward_tcp(io, None).await,
        }
    }

    async fn forward_tcp<T>(&self, mut downstream: T, peer: Option<&SpiffeId>)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut app = match TcpStream::connect(self.app_addr).await {
            Ok(app) => app,
            Err(error) => {
                return tracing::warn!(%error, app = %self.app_addr, "app refused a TCP connection");
            }
        };
        let _ = app.set_nodelay(true);
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

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: Option<&SpiffeId>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let request_id = telemetry::correlate(req.headers_mut());
        let headers = req.headers_mut();
        // Only this sidecar may say who the caller is.
        headers.remove(PEER_ID);
        if let Some(value) = peer.and_then(|p| HeaderValue::from_str(p.as_str()).ok()) {
            headers.insert(PEER_ID, value);
        }
        let protocol = headers
            .remove(APP_PROTOCOL)
            .as_ref()
            .and_then(AppProtocol::from_header)
            .unwrap_or_else(|| AppProtocol::of(&req));
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let authority = authority_of(&req)
            .map(str::to_string)
            .unwrap_or_else(|| self.app_addr.to_string());

        let response = if is_upgrade(&req) {
            self.upgrade(req).await
        } else {
            self.forward(req, protocol, &authority).await
        };

        let elapsed = start.elapsed();
        let peer_service = peer
            .and_then(|p| p.workload_parts())
            .map_or("unknown", |(_, sa)| sa);
        telemetry::record_request(
            Direction::Inbound,
            &self.service,
            peer_service,
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
            peer_id = peer.map(SpiffeId::as_str),
            request_id = request_id.to_str().unwrap_or_default(),
            "request"
        );
        response
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        protocol: AppProtocol,
        authority: &str,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        parts.uri = match Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build()
        {
            Ok(uri) => uri,
            Err(e) => {
                return mesh_error(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    format!("request target: {e}"),
                );
            }
        };
        let client = match protocol {
            AppProtocol::Http1 => {
                parts.version = http::Version::HTTP_11;
                parts.headers.entry(http::header::HOST).or_insert(
                    HeaderValue::from_str(authority)
                        .unwrap_or(HeaderValue::from_static("localhost")),
                );
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

    async fn upgrade(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let app = match TcpStream::connect(self.app_addr).await {
            Ok(app) => app,
            Err(e) => {
                return mesh_error(
                    StatusCode::BAD_GATEWAY,
                    "app-unavailable",
                    format!("connecting to the app: {e}"),
                );
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
#[derive(Clone)]
struct InboundService {
    inbound: Arc<Inbound>,
    peer: Option<SpiffeId>,
}

impl hyper::service::Service<Request<Incoming>> for InboundService {
    type Response = Response<ProxyBody>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.inbound.handle(req, this.peer.as_ref()).await) })
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
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            Ok(TokioIo::new(tcp))
        })
    }
}
