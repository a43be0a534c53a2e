//! Load generation over HTTP/1.1 keep-alive connections, as an app behind a sidecar
//! sends it.
//!
//! - `fixed_rate`: open loop. Requests are due at fixed times whatever happened to the
//!   ones before, and latency is measured from when a request was due, not from when a
//!   busy connection got round to it, so a stall shows up in the percentiles instead
//!   of hiding (no coordinated omission).
//! - `max_throughput`: closed loop, every connection sends its next request as soon as
//!   the last answer arrives.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

/// Latencies of the requests that succeeded, and how many failed.
#[derive(Debug, Default)]
pub struct Sample {
    pub latencies: Vec<Duration>,
    pub errors: u64,
    pub elapsed: Duration,
}

impl Sample {
    pub fn percentile(&mut self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies.sort_unstable();
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }

    pub fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
}

async fn connect(target: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, String> {
    let tcp = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn send(sender: &mut SendRequest<Empty<Bytes>>, host: &str) -> Result<(), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let request = Request::get("/")
        .header(http::header::HOST, host)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// `rate` requests per second for `duration` over `connections` connections.
pub async fn fixed_rate(
    target: SocketAddr,
    host: &str,
    rate: u32,
    duration: Duration,
    connections: usize,
) -> Result<Sample, String> {
    let mut queues = Vec::with_capacity(connections);
    let mut workers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
        let mut sender = connect(target).await?;
        let host = host.to_string();
        queues.push(tx);
        workers.push(tokio::spawn(async move {
            let mut sample = Sample::default();
            while let Some(due) = rx.recv().await {
                match send(&mut sender, &host).await {
                    Ok(()) => sample.latencies.push(due.elapsed()),
                    Err(_) => sample.errors += 1,
                }
            }
            sample
        }));
    }
    // The pacer is an OS thread: the runtime's timer ticks in whole milliseconds, and a
    // request sent up to a millisecond late would be charged to the proxy under test.
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let total = (f64::from(rate) * duration.as_secs_f64()) as usize;
    let start = Instant::now();
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            let due = start + period * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                #[allow(clippy::disallowed_methods)] // a dedicated pacing thread, not the runtime
                std::thread::sleep(wait);
            }
            if queues[i % queues.len()].send(due).is_err() {
                return Err("a load worker stopped".to_string());
            }
        }
        Ok(())
    });
    let paced = tokio::task::spawn_blocking(move || pacer.join())
        .await
        .map_err(|e| e.to_string())?;
    paced.map_err(|_| "the pacer panicked".to_string())??;
    merge(workers, start).await
}

/// As many requests as `connections` connections can carry for `duration`.
pub async fn max_throughput(
    target: SocketAddr,
    host: &str,
    duration: Duration,
    connections: usize,
) -> Result<Sample, String> {
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let mut workers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut sender = connect(target).await?;
        let host = host.to_string();
        workers.push(tokio::spawn(async move {
            let mut sample = Sample::default();
            while Instant::now() < deadline {
                let sent = Instant::now();
                match send(&mut sender, &host).await {
                    Ok(()) => sample.latencies.push(sent.elapsed()),
                    Err(_) => sample.errors += 1,
                }
            }
            sample
        }));
    }
    merge(workers, start).await
}

/// Joins the workers' samples into one, timed from `start`.
async fn merge(
    workers: Vec<tokio::task::JoinHandle<Sample>>,
    start: Instant,
) -> Result<Sample, String> {
    let mut merged = Sample::default();
    for worker in workers {
        let sample = worker.await.map_err(|e| e.to_string())?;
        merged.latencies.extend(sample.latencies);
        merged.errors += sample.errors;
    }
    merged.elapsed = start.elapsed();
    Ok(merged)
}
