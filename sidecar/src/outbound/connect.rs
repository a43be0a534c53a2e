//! Connections to a peer sidecar's inbound listener: TCP, then mTLS that requires
//! the endpoint's SPIFFE id, with the ALPN that says what the connection carries.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::{
    client::legacy::connect::{Connected, Connection},
    rt::TokioIo,
};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use trellis_ca::{Credentials, SpiffeId};

/// ALPN between sidecars: multiplexed HTTP (any app protocol rides on HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN between sidecars: one HTTP/1.1 connection for a protocol upgrade.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN between sidecars: opaque TCP, forwarded to the app as bytes.
pub const ALPN_TCP: &[u8] = b"trellis-tcp";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("mTLS handshake with {addr} failed: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out after {CONNECT_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
}

impl ConnectError {
    /// The `x-trellis-error` token for this failure.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Tcp { .. } | Self::Timeout { .. } => "connect-failed",
            Self::Tls { .. } => "tls-handshake-failed",
        }
    }
}

/// How to reach one endpoint: its address and a TLS config per ALPN, each requiring
/// the endpoint's id.
#[derive(Clone)]
pub struct PeerTarget {
    pub addr: SocketAddr,
    pub identity: SpiffeId,
    h2: TlsConnector,
    http1: TlsConnector,
    tcp: TlsConnector,
}

impl std::fmt::Debug for PeerTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTarget")
            .field("addr", &self.addr)
            .field("identity", &self.identity.as_str())
            .finish_non_exhaustive()
    }
}

impl PeerTarget {
    pub fn new(
        addr: SocketAddr,
        identity: SpiffeId,
        creds: &Credentials,
    ) -> Result<Self, rustls::Error> {
        let with_alpn = |alpn: &[u8]| -> Result<TlsConnector, rustls::Error> {
            let mut config: ClientConfig =
                trellis_ca::client_config(creds, Some(identity.clone()))?;
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(TlsConnector::from(Arc::new(config)))
        };
        Ok(Self {
            addr,
            h2: with_alpn(ALPN_H2)?,
            http1: with_alpn(ALPN_HTTP1)?,
            tcp: with_alpn(ALPN_TCP)?,
            identity,
        })
    }

    pub async fn connect_h2(&self) -> Result<TlsStream<TcpStream>, ConnectError> {
        self.connect(&self.h2).await
    }

    pub async fn connect_http1(&self) -> Result<TlsStream<TcpStream>, ConnectError> {
        self.connect(&self.http1).await
    }

    pub async fn connect_tcp(&self) -> Result<TlsStream<TcpStream>, ConnectError> {
        self.connect(&self.tcp).await
    }

    async fn connect(&self, tls: &TlsConnector) -> Result<TlsStream<TcpStream>, ConnectError> {
        let addr = self.addr;
        let attempt = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| ConnectError::Tcp { addr, source })?;
            let _ = tcp.set_nodelay(true);
            // SNI is not used for identity (the SPIFFE id is checked); the IP keeps it honest.
            tls.connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .map_err(|source| ConnectError::Tls { addr, source })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| ConnectError::Timeout { addr })?
    }
}

/// A hyper-util connector that always dials one endpoint with ALPN h2, whatever the
/// request URI says: the URI keeps the app's authority for the next hop.
#[derive(Debug, Clone)]
pub struct H2Connector(pub Arc<PeerTarget>);

impl tower::Service<http::Uri> for H2Connector {
    type Response = PeerIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<PeerIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let target = self.0.clone();
        Box::pin(async move { Ok(PeerIo(TokioIo::new(target.connect_h2().await?))) })
    }
}

/// A TLS connection to a peer, in hyper's IO traits.
#[derive(Debug)]
pub struct PeerIo(TokioIo<TlsStream<TcpStream>>);

impl Connection for PeerIo {
    fn connected(&self) -> Connected {
        let negotiated_h2 = self.0.inner().get_ref().1.alpn_protocol() == Some(ALPN_H2);
        let connected = Connected::new();
        if negotiated_h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl hyper::rt::Read for PeerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PeerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}
