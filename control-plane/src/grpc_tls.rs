//! gRPC over TLS with SPIFFE identities: the control plane presents its own SVID,
//! verifies any client certificate against the trust bundle, and hands each request
//! the caller's verified id (none for a workload that has no certificate yet).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use trellis_ca::{ClientAuth, Credentials, SpiffeId};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HANDSHAKES: usize = 256;

/// The verified SPIFFE id of the caller, in every request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub Option<SpiffeId>);

/// An accepted TLS connection that tells tonic who is on the other end.
#[derive(Debug)]
pub struct PeerStream {
    tls: TlsStream<TcpStream>,
    caller: Caller,
}

impl Connected for PeerStream {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

/// Accepts on `listener`, running each TLS handshake in its own task so a slow client
/// cannot hold up the others; yields the connections that completed.
pub fn incoming(
    listener: TcpListener,
    creds: &Credentials,
    client_auth: ClientAuth,
) -> Result<ReceiverStream<Result<PeerStream, std::io::Error>>, rustls::Error> {
    let mut config = trellis_ca::server_config_with(creds, client_auth)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(64);
    // Handshakes in flight are capped: client certificates are optional here, so
    // anyone can open connections, and each may take up to the handshake timeout.
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                // The server is gone: stop accepting and release the port.
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "control plane accept failed");
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%remote, "too many TLS handshakes in flight; connection dropped");
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let caller =
                            Caller(trellis_ca::peer_id(tls.get_ref().1.peer_certificates()).ok());
                        let _ = tx.send(Ok(PeerStream { tls, caller })).await;
                    }
                    Ok(Err(error)) => {
                        tracing::info!(%error, %remote, "control plane TLS handshake refused")
                    }
                    Err(_) => tracing::info!(%remote, "control plane TLS handshake timed out"),
                }
            });
        }
    });
    Ok(ReceiverStream::new(rx))
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}
