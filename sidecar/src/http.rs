//! HTTP pieces both directions share: the body type, hop-by-hop header handling,
//! the mesh's own error responses, and bridging an HTTP/1.1 upgrade.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// A proxied body streams through untouched; the mesh's own answers are small and full.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Set by the mesh on its own error responses: what went wrong, in one token.
pub const TRELLIS_ERROR: HeaderName = HeaderName::from_static("x-trellis-error");
/// The verified SPIFFE id of the calling workload, for the app. Never trusted from outside.
pub const PEER_ID: HeaderName = HeaderName::from_static("x-trellis-peer-id");
/// Sidecar to sidecar: the protocol the calling app spoke (`h1` or `h2`), so the
/// receiving sidecar speaks the same to its app.
pub const APP_PROTOCOL: HeaderName = HeaderName::from_static("x-trellis-proto");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The app protocol a request arrived with, as carried in `x-trellis-proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    Http1,
    Http2,
}

impl AppProtocol {
    pub fn of<B>(req: &Request<B>) -> Self {
        if req.version() == http::Version::HTTP_2 {
            Self::Http2
        } else {
            Self::Http1
        }
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::Http1 => "h1",
            Self::Http2 => "h2",
        })
    }

    pub fn from_header(value: &HeaderValue) -> Option<Self> {
        match value.as_bytes() {
            b"h1" => Some(Self::Http1),
            b"h2" => Some(Self::Http2),
            _ => None,
        }
    }
}

/// A response the mesh makes itself: `status`, `x-trellis-error: kind` and a text body
/// that says what happened.
pub fn mesh_error(status: StatusCode, kind: &'static str, message: String) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(message + "\n"))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(TRELLIS_ERROR, HeaderValue::from_static(kind));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Removes connection-specific headers: they describe one hop, and HTTP/2 forbids
/// them outright. `te: trailers` is the one `te` HTTP/2 allows, and gRPC needs it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    // `te: trailers, deflate` (or several `te` lines) keep just `trailers`.
    let wants_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        });
    headers.remove(header::TE);
    if wants_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// As `strip_hop_by_hop`, but keeps what an HTTP/1.1 upgrade needs on the next hop:
/// `Connection: upgrade` and the `Upgrade` protocols.
pub fn strip_hop_by_hop_keeping_upgrade(headers: &mut HeaderMap) {
    let upgrade = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(headers);
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket and the like).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Sends an upgrade request over `io` (a fresh HTTP/1.1 connection to the next hop)
/// and, on `101 Switching Protocols`, joins the two upgraded streams byte for byte.
pub async fn forward_upgrade<T>(
    mut req: Request<Incoming>,
    io: T,
) -> Result<Response<ProxyBody>, hyper::Error>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(error) = conn.with_upgrades().await {
            tracing::debug!(%error, "upgraded connection ended");
        }
    });
    let downstream = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let mut upstream_req = Request::from_parts(parts, body);
    // Origin form on the next hop.
    if let Some(path) = upstream_req.uri().path_and_query().cloned() {
        *upstream_req.uri_mut() = http::Uri::from(path);
    }
    let mut response = sender.send_request(upstream_req).await?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match tokio::try_join!(downstream, upstream) {
                Ok((down, up)) => {
                    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                    if let Err(error) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                        tracing::debug!(%error, "upgraded stream closed with an error");
                    }
                }
                Err(error) => tracing::debug!(%error, "upgrade did not complete"),
            }
        });
    }
    Ok(response.map(Either::Left))
}

/// The request's URI pointed at `authority`, keeping its path and query.
pub fn retarget(uri: &http::Uri, authority: &str) -> Result<http::Uri, http::Error> {
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    http::Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
}

/// The mesh's answer to a request whose target does not form a URI.
pub fn bad_target(error: &http::Error) -> Response<ProxyBody> {
    mesh_error(
        StatusCode::BAD_REQUEST,
        "bad-request",
        format!("request target: {error}"),
    )
}

/// The host part of an authority (`payment:8080` -> `payment`).
pub fn host_of(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// The authority a request is addressed to: the absolute-form URI's, else `Host`.
pub fn authority_of<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// Serves HTTP/1.1 and HTTP/2 (by the connection's preface) on one accepted
/// connection until it ends; when `drain` fires, stops taking new requests, lets the
/// ones in flight finish, and closes.
pub async fn serve_connection<I, S, B>(
    io: I,
    service: S,
    drain: tokio_util::sync::CancellationToken,
    idle: std::time::Duration,
) where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // hyper reads a new connection's first bytes (to tell HTTP/1 from HTTP/2) with no
    // timeout of its own: a client that connects and says nothing would hold the
    // connection until the process ends.
    let io = match crate::inbound::detect::first_bytes(io, idle).await {
        Ok(Some(io)) => io,
        Ok(None) => return tracing::debug!(?idle, "connection closed: nothing sent"),
        Err(error) => return tracing::debug!(%error, "connection lost before its first request"),
    };
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        // A connection with no complete header block in this time is closed. hyper also
        // runs it while a keep-alive connection is idle, so it doubles as the idle timeout
        // for the app's pooled connections: long enough that pools rarely race it.
        .header_read_timeout(idle)
        .keep_alive(true);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(1024)
        // Finds peers that vanished (a node gone) instead of holding their streams.
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(std::time::Duration::from_secs(10));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => log_connection_end(result),
        () = drain.cancelled() => {
            conn.as_mut().graceful_shutdown();
            log_connection_end(conn.await);
        }
    }
}

fn log_connection_end(result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// An error and its causes on one line: hyper-util's client errors hide the useful
/// part (the TLS verdict, the refused connect) in their sources.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-end-to-end"));

        let mut headers = HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut headers);
        assert!(
            headers.contains_key(header::TE),
            "gRPC's te: trailers survives"
        );

        let mut headers = HeaderMap::new();
        headers.append(
            header::TE,
            HeaderValue::from_static("deflate, trailers;q=1"),
        );
        headers.append(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut headers);
        let te: Vec<_> = headers.get_all(header::TE).iter().collect();
        assert_eq!(te, ["trailers"], "only trailers is left of a mixed te");
    }

    #[test]
    fn an_upgrade_keeps_what_the_next_hop_needs() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, x-hop"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop_keeping_upgrade(&mut headers);
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "upgrade");
        assert_eq!(headers.len(), 2, "{headers:?}");
    }

    #[test]
    fn host_of_strips_only_a_numeric_port() {
        assert_eq!(host_of("payment:8080"), "payment");
        assert_eq!(host_of("payment"), "payment");
        assert_eq!(host_of("payment.shop"), "payment.shop");
        assert_eq!(host_of("[::1]:80"), "[::1]");
    }
}
