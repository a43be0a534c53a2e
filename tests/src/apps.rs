//! Test workloads on loopback, port 0: an HTTP app (HTTP/1.1 and h2c, upgrades), a
//! gRPC app, and a TCP echo. Each reports what it saw in response headers so tests
//! can check what crossed the mesh.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::{Notify, mpsc},
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Status, Streaming};

use crate::echo::{
    Message,
    echo_server::{Echo, EchoServer},
};

type Body = BoxBody<Bytes, hyper::Error>;

/// Lets a test hold a request inside the app and release it later.
#[derive(Debug, Default)]
pub struct Hold {
    arrived: Notify,
    release: Notify,
}

impl Hold {
    /// Resolves once a `/hold` request has reached the app.
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    pub fn release(&self) {
        self.release.notify_one();
    }
}

/// An HTTP app. Routes: `/echo` streams the request body back; `/bytes/N` answers N
/// bytes; `/status/N` answers status N; `/hold` waits for `Hold::release`; anything
/// else answers 200 with the app's name. Every response carries `x-app-name`,
/// `x-app-version`, `x-app-peer-id`, `x-app-host` and echoes `x-test` as `x-app-x-test`.
/// An `Upgrade` request is switched and then echoes bytes. `delay` is added to each
/// response, to play a slow instance.
pub async fn http_app(name: &'static str, delay: Duration) -> (SocketAddr, Arc<Hold>) {
    let (addr, hold, _) = serve_http(name, delay).await;
    (addr, hold)
}

/// Failures and slowness a test switches on and off while the app runs, and what the
/// app saw: a backend that fails on command.
#[derive(Debug, Default)]
pub struct Faults {
    /// Answer 503 to this many of the next requests.
    pub fail_next: AtomicU64,
    /// Answer 503 to every request while set.
    pub failing: AtomicBool,
    /// Added to each response, in milliseconds.
    pub delay_ms: AtomicU64,
    /// Requests received, failed ones included.
    pub requests: AtomicU64,
}

impl Faults {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Whether this request is to fail, counting it.
    fn should_fail(&self) -> bool {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return true;
        }
        self.fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// `http_app` with `Faults` the test controls.
pub async fn faulty_app(name: &'static str) -> (SocketAddr, Arc<Faults>) {
    let (addr, _, faults) = serve_http(name, Duration::ZERO).await;
    (addr, faults)
}

async fn serve_http(name: &'static str, delay: Duration) -> (SocketAddr, Arc<Hold>, Arc<Faults>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = Arc::new(Hold::default());
    let faults = Arc::new(Faults::default());
    let app_hold = hold.clone();
    let app_faults = faults.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let hold = app_hold.clone();
            let faults = app_faults.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (hold, faults) = (hold.clone(), faults.clone());
                    async move {
                        let extra = Duration::from_millis(faults.delay_ms.load(Ordering::SeqCst));
                        if !extra.is_zero() {
                            tokio::time::sleep(extra).await;
                        }
                        if faults.should_fail() {
                            let mut r = Response::new(full(format!("{name} failing on command")));
                            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            r.headers_mut().insert("x-app-name", name.parse().unwrap());
                            return Ok::<_, Infallible>(r);
                        }
                        Ok::<_, Infallible>(respond(name, delay, req, &hold).await)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, hold, faults)
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn respond(
    name: &'static str,
    delay: Duration,
    mut req: Request<Incoming>,
    hold: &Hold,
) -> Response<Body> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let seen = |h: &str| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string()
    };
    let (peer, test_header) = (seen("x-trellis-peer-id"), seen("x-test"));
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "none".into());
    let version = format!("{:?}", req.version());
    let path = req.uri().path().to_string();

    let mut response = if req.headers().contains_key(header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(header::UPGRADE, "echo".parse().unwrap());
        r.headers_mut()
            .insert(header::CONNECTION, "upgrade".parse().unwrap());
        r
    } else if path == "/echo" {
        Response::new(req.into_body().boxed())
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0);
        Response::new(full(vec![b'x'; n]))
    } else if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(full(format!("status {code}")));
        *r.status_mut() = code.parse().unwrap_or(StatusCode::IM_A_TEAPOT);
        r
    } else if path == "/hold" {
        hold.arrived.notify_one();
        hold.release.notified().await;
        Response::new(full("released"))
    } else {
        Response::new(full(name))
    };
    let headers = response.headers_mut();
    for (key, value) in [
        ("x-app-name", name.to_string()),
        ("x-app-version", version),
        ("x-app-peer-id", peer),
        ("x-app-host", host),
        ("x-app-x-test", test_header),
    ] {
        headers.insert(key, value.parse().unwrap());
    }
    response
}

/// A TCP echo server.
pub async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// A gRPC app serving `Echo`.
pub async fn grpc_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoApp))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

struct EchoApp;

#[tonic::async_trait]
impl Echo for EchoApp {
    async fn unary(
        &self,
        request: tonic::Request<Message>,
    ) -> Result<tonic::Response<Message>, Status> {
        let peer = request
            .metadata()
            .get("x-trellis-peer-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        let text = request.into_inner().text;
        if text == "fail" {
            let mut status = Status::invalid_argument("told to fail");
            status
                .metadata_mut()
                .insert("x-detail", "trailer-survived".parse().unwrap());
            return Err(status);
        }
        let mut response = tonic::Response::new(Message { text });
        response
            .metadata_mut()
            .insert("x-app-peer-id", peer.parse().unwrap());
        Ok(response)
    }

    type ChatStream = ReceiverStream<Result<Message, Status>>;

    async fn chat(
        &self,
        request: tonic::Request<Streaming<Message>>,
    ) -> Result<tonic::Response<Self::ChatStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(message) = incoming.next().await {
                let reply = message.map(|m| Message {
                    text: format!("echo: {}", m.text),
                });
                if tx.send(reply).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// What `recording_app` saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// `x-trellis-shadow`, when the request carried it.
    pub shadow: Option<String>,
    pub body: Bytes,
}

/// Every request a `recording_app` got, in order of arrival (bodies read whole).
#[derive(Debug, Default)]
pub struct Recorded {
    seen: parking_lot::Mutex<Vec<Seen>>,
    arrived: Notify,
}

impl Recorded {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    /// Waits until at least `n` requests came in; fails the test after 20 s.
    pub async fn wait_for(&self, n: usize) -> Vec<Seen> {
        crate::within(&format!("{n} requests at the app"), async {
            loop {
                let notified = self.arrived.notified();
                let seen = self.seen();
                if seen.len() >= n {
                    return seen;
                }
                notified.await;
            }
        })
        .await
    }
}

/// An HTTP app that records every request (method, path, `x-trellis-shadow`, body) and
/// answers `answer(&seen)` (status and body) after `delay`, with `x-app-name: name`.
/// A request is recorded when it arrives, before the delay: a shadow that hangs still
/// shows what it was sent.
pub async fn recording_app<F>(
    name: &'static str,
    delay: Duration,
    answer: F,
) -> (SocketAddr, Arc<Recorded>)
where
    F: Fn(&Seen) -> (StatusCode, Bytes) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let recorded = Arc::new(Recorded::default());
    let answer = Arc::new(answer);
    let app_recorded = recorded.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (recorded, answer) = (app_recorded.clone(), answer.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (recorded, answer) = (recorded.clone(), answer.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let seen = Seen {
                            method: parts.method.to_string(),
                            path: parts.uri.path().to_string(),
                            shadow: parts
                                .headers
                                .get("x-trellis-shadow")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string),
                            body,
                        };
                        let (status, body) = answer(&seen);
                        recorded.seen.lock().push(seen);
                        recorded.arrived.notify_waiters();
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let mut response = Response::new(full(body));
                        *response.status_mut() = status;
                        response
                            .headers_mut()
                            .insert("x-app-name", name.parse().unwrap());
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, recorded)
}
