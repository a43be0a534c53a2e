//! Protocol detection on a connection's first bytes: a TLS ClientHello, an HTTP/2
//! preface, an HTTP/1 request line, or anything else (opaque TCP). The bytes read
//! are replayed to whoever handles the connection next.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
/// Enough for the longest prefix we compare against.
const PEEK: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tls,
    Http1,
    Http2,
    Opaque,
}

/// Reads until the protocol is known, the peer stops sending, or `timeout` passes
/// (a server-first protocol: the client waits for us, so it is opaque TCP).
pub async fn detect<T>(mut io: T, timeout: Duration) -> io::Result<(Protocol, Prefixed<T>)>
where
    T: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(PEEK);
    let deadline = tokio::time::Instant::now() + timeout;
    let protocol = loop {
        if let Some(protocol) = classify(&buf) {
            break protocol;
        }
        let mut chunk = [0u8; PEEK];
        let want = PEEK - buf.len();
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await {
            Ok(Ok(0)) | Err(_) => break Protocol::Opaque,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((
        protocol,
        Prefixed {
            prefix: buf,
            offset: 0,
            io,
        },
    ))
}

/// Waits up to `timeout` for the first bytes of a connection; `None` when the peer
/// stays silent or closes. What was read is replayed.
pub async fn first_bytes<T>(mut io: T, timeout: Duration) -> io::Result<Option<Prefixed<T>>>
where
    T: AsyncRead + Unpin,
{
    let mut chunk = [0u8; PEEK];
    match tokio::time::timeout(timeout, io.read(&mut chunk)).await {
        Ok(Ok(0)) | Err(_) => Ok(None),
        Ok(Ok(n)) => Ok(Some(Prefixed {
            prefix: chunk[..n].to_vec(),
            offset: 0,
            io,
        })),
        Ok(Err(e)) => Err(e),
    }
}

/// The protocol `bytes` show, or `None` while they could still be more than one.
fn classify(bytes: &[u8]) -> Option<Protocol> {
    let first = *bytes.first()?;
    if first == 0x16 {
        // TLS handshake record.
        return Some(Protocol::Tls);
    }
    let could_be = |candidate: &[u8]| {
        let n = bytes.len().min(candidate.len());
        bytes[..n] == candidate[..n]
    };
    if bytes.len() >= H2_PREFACE.len() && could_be(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if METHODS
        .iter()
        .any(|m| bytes.len() >= m.len() && could_be(m))
    {
        return Some(Protocol::Http1);
    }
    let undecided = could_be(H2_PREFACE) || METHODS.iter().any(|m| could_be(m));
    (!undecided).then_some(Protocol::Opaque)
}

/// An IO that first yields the bytes detection consumed, then the rest of the stream.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    offset: usize,
    io: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.offset < this.prefix.len() {
            let rest = &this.prefix[this.offset..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.offset += n;
            if this.offset == this.prefix.len() {
                this.prefix = Vec::new();
                this.offset = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tells_protocols_apart_and_replays_what_it_read() {
        for (bytes, want) in [
            (&b"\x16\x03\x01\x02\x00"[..], Protocol::Tls),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Protocol::Http1),
            (b"DELETE /x HTTP/1.1\r\n\r\n", Protocol::Http1),
            (H2_PREFACE, Protocol::Http2),
            (b"\x00\x01binary protocol", Protocol::Opaque),
            (b"GETX", Protocol::Opaque),
            (b"*1\r\n$4\r\nPING\r\n", Protocol::Opaque),
        ] {
            let (protocol, mut io) = detect(bytes, Duration::from_secs(5)).await.unwrap();
            assert_eq!(protocol, want, "{:?}", String::from_utf8_lossy(bytes));
            let mut replayed = Vec::new();
            io.read_to_end(&mut replayed).await.unwrap();
            assert_eq!(replayed, bytes);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_after_the_timeout() {
        let (_client, server) = tokio::io::duplex(64);
        let (protocol, _) = detect(server, Duration::from_millis(300)).await.unwrap();
        assert_eq!(protocol, Protocol::Opaque);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_method_waits_for_more() {
        let (mut client, server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client.write_all(b"PO").await.unwrap();
        let detection = tokio::spawn(detect(server, Duration::from_secs(1)));
        tokio::task::yield_now().await;
        client.write_all(b"ST /orders HTTP/1.1\r\n").await.unwrap();
        let (protocol, _) = detection.await.unwrap().unwrap();
        assert_eq!(protocol, Protocol::Http1);
    }
}
