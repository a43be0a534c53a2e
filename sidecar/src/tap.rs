//! `GET /tap` on the admin server: every request this proxy finishes, as one JSON line,
//! for as long as someone reads (`trellisctl tap`). The data path publishes where it
//! writes its access-log line, and only while a tap is open: otherwise it pays a
//! relaxed atomic load per request (after the `LazyLock`'s own check).
//!
//! Events go through a bounded broadcast channel. A tap that reads slower than
//! requests finish falls behind, skips what the channel no longer holds, and is told
//! how many in a `{"skipped": N}` line; the data path never waits for a reader.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderValue, Method};
use hyper::body::{Body, Frame};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use trellis_ca::Credentials;

/// Events a tap may fall behind by before it skips.
const CAPACITY: usize = 1024;
/// Taps open at once; each costs the data path a copy of every event.
pub const MAX_WATCHERS: usize = 16;
/// Lines encoded ahead of a slow reader; the broadcast channel holds the rest.
const LINES_AHEAD: usize = 16;

/// Which way the request crossed this proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapDirection {
    /// From a peer sidecar to the local app.
    Inbound,
    /// From the local app (or the gateway's client) to a mesh service.
    Outbound,
    /// From an external client into the gateway.
    Gateway,
}

impl TapDirection {
    fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
            Self::Gateway => "gateway",
        }
    }
}

/// One finished request, as the access log has it.
#[derive(Debug, Clone)]
pub struct TapEvent {
    pub at: SystemTime,
    pub direction: TapDirection,
    pub method: Method,
    pub authority: String,
    pub path: String,
    pub status: u16,
    /// To the response headers, as everywhere else.
    pub latency: Duration,
    /// The other side: the caller's verified id (inbound), or the id the answering
    /// sidecar had to present (outbound); none for a plaintext caller or a request
    /// the mesh answered itself.
    pub peer_id: Option<String>,
    /// The route rule that matched (outbound).
    pub route: Option<String>,
    pub request_id: HeaderValue,
    /// Gateway: the external client's address.
    pub client: Option<SocketAddr>,
}

/// The channel the data path publishes into, and how many taps read it.
#[derive(Debug)]
pub struct Tap {
    events: broadcast::Sender<Arc<TapEvent>>,
    /// Kept apart from the channel's own count, which takes a lock to read: this is
    /// what every request looks at.
    watchers: AtomicUsize,
}

static GLOBAL: LazyLock<Arc<Tap>> = LazyLock::new(|| Arc::new(Tap::new(CAPACITY)));

/// The process's tap.
pub fn global() -> &'static Arc<Tap> {
    &GLOBAL
}

/// Every tap is already in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{MAX_WATCHERS} taps are already open on this proxy; close one and try again")]
pub struct TooManyTaps;

impl Tap {
    pub fn new(capacity: usize) -> Self {
        let (events, _) = broadcast::channel(capacity);
        Self {
            events,
            watchers: AtomicUsize::new(0),
        }
    }

    /// Whether anyone reads: the data path builds an event only then.
    #[inline]
    pub fn watched(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    pub fn publish(&self, event: TapEvent) {
        // No receiver (the last tap just closed) is not an error.
        let _ = self.events.send(Arc::new(event));
    }

    /// Opens a tap; it closes when the `Watcher` is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<Watcher, TooManyTaps> {
        self.watchers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_WATCHERS).then_some(n + 1)
            })
            .map_err(|_| TooManyTaps)?;
        Ok(Watcher {
            events: self.events.subscribe(),
            tap: self.clone(),
        })
    }
}

/// One open tap.
#[derive(Debug)]
pub struct Watcher {
    events: broadcast::Receiver<Arc<TapEvent>>,
    tap: Arc<Tap>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.tap.watchers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Watcher {
    /// The next line: an event, or how many were skipped since the last one.
    pub async fn next_line(&mut self, own: &OwnIdentity) -> Option<Bytes> {
        match self.events.recv().await {
            Ok(event) => Some(line(&event, own)),
            Err(broadcast::error::RecvError::Lagged(skipped)) => Some(skipped_line(skipped)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// Who this proxy is, for the side of each line that is this proxy.
#[derive(Debug, Clone)]
pub struct OwnIdentity {
    pub service: String,
    pub creds: Credentials,
}

/// Streams `watcher`'s lines as a response body until the reader goes away.
pub fn stream(mut watcher: Watcher, own: OwnIdentity) -> TapBody {
    let (lines, receiver) = mpsc::channel(LINES_AHEAD);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                // The reader hung up: close the tap now, not at the next request.
                () = lines.closed() => return,
                next = watcher.next_line(&own) => next,
            };
            let Some(next) = next else { return };
            if lines.send(next).await.is_err() {
                return;
            }
        }
    });
    TapBody { lines: receiver }
}

/// The body of `GET /tap`: lines as they come, never ending on its own.
#[derive(Debug)]
pub struct TapBody {
    lines: mpsc::Receiver<Bytes>,
}

impl Body for TapBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.lines
            .poll_recv(cx)
            .map(|line| line.map(|line| Ok(Frame::data(line))))
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Line<'a> {
    time: String,
    service: &'a str,
    direction: &'static str,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    status: u16,
    latency_ms: f64,
    source: Option<&'a str>,
    destination: Option<&'a str>,
    route: Option<&'a str>,
    request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<String>,
}

/// `event` as one JSON line; this proxy's own id is the source of what it sent and
/// the destination of what it received.
fn line(event: &TapEvent, own: &OwnIdentity) -> Bytes {
    let svid = own.creds.svid();
    let own_id = svid.as_ref().map(|svid| svid.id().as_str());
    let peer = event.peer_id.as_deref();
    let (source, destination) = match event.direction {
        TapDirection::Outbound => (own_id, peer),
        TapDirection::Inbound => (peer, own_id),
        TapDirection::Gateway => (None, own_id),
    };
    let line = Line {
        time: utc_millis(event.at),
        service: &own.service,
        direction: event.direction.as_str(),
        method: event.method.as_str(),
        authority: &event.authority,
        path: &event.path,
        status: event.status,
        latency_ms: event.latency.as_secs_f64() * 1e3,
        source,
        destination,
        route: event.route.as_deref(),
        request_id: String::from_utf8_lossy(event.request_id.as_bytes()).into_owned(),
        client: event.client.map(|c| c.to_string()),
    };
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn skipped_line(skipped: u64) -> Bytes {
    Bytes::from(format!("{{\"skipped\":{skipped}}}\n"))
}

/// `2025-03-02T10:14:07.123Z`: fixed width, so lines line up.
fn utc_millis(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is a failed test

    use serde_json::{Value, json};
    use trellis_ca::TrustBundle;

    use super::*;

    fn event(direction: TapDirection, path: &str) -> TapEvent {
        TapEvent {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            direction,
            method: Method::POST,
            authority: "payment".into(),
            path: path.into(),
            status: 403,
            latency: Duration::from_micros(1500),
            peer_id: Some("spiffe://td/ns/shop/sa/shipping".into()),
            route: None,
            request_id: HeaderValue::from_static("req-1"),
            client: None,
        }
    }

    fn own() -> OwnIdentity {
        OwnIdentity {
            service: "payment".into(),
            creds: Credentials::new(TrustBundle::empty()),
        }
    }

    fn parse(line: &Bytes) -> Value {
        assert!(line.ends_with(b"\n"), "{line:?}");
        serde_json::from_slice(line).unwrap()
    }

    #[test]
    fn a_line_is_one_json_object_with_the_peer_on_the_right_side() {
        let inbound = parse(&line(&event(TapDirection::Inbound, "/payments"), &own()));
        assert_eq!(
            inbound,
            json!({
                "time": "2023-11-14T22:13:20.123Z", "service": "payment",
                "direction": "inbound", "method": "POST", "authority": "payment",
                "path": "/payments", "status": 403, "latencyMs": 1.5,
                "source": "spiffe://td/ns/shop/sa/shipping", "destination": null,
                "route": null, "requestId": "req-1"
            })
        );
        let outbound = parse(&line(&event(TapDirection::Outbound, "/"), &own()));
        assert_eq!(outbound["source"], Value::Null, "no SVID yet");
        assert_eq!(outbound["destination"], "spiffe://td/ns/shop/sa/shipping");
        let mut from_outside = event(TapDirection::Gateway, "/");
        from_outside.client = Some(([127, 0, 0, 1], 5000).into());
        let gateway = parse(&line(&from_outside, &own()));
        assert_eq!(gateway["source"], Value::Null);
        assert_eq!(gateway["client"], "127.0.0.1:5000");
    }

    #[tokio::test]
    async fn nothing_is_watched_until_a_tap_opens_and_after_it_closes() {
        let tap = Arc::new(Tap::new(8));
        assert!(!tap.watched());
        let mut watcher = tap.watch().unwrap();
        assert!(tap.watched());
        tap.publish(event(TapDirection::Inbound, "/one"));
        let line = watcher.next_line(&own()).await.unwrap();
        assert_eq!(parse(&line)["path"], "/one");
        drop(watcher);
        assert!(!tap.watched());
    }

    #[tokio::test]
    async fn a_lagging_tap_is_told_how_many_it_skipped() {
        let tap = Arc::new(Tap::new(4));
        let mut watcher = tap.watch().unwrap();
        for i in 0..10 {
            tap.publish(event(TapDirection::Inbound, &format!("/{i}")));
        }
        let first = watcher.next_line(&own()).await.unwrap();
        assert_eq!(parse(&first), json!({"skipped": 6}));
        let next = watcher.next_line(&own()).await.unwrap();
        assert_eq!(parse(&next)["path"], "/6", "the oldest still held");
    }

    #[test]
    fn taps_are_limited() {
        let tap = Arc::new(Tap::new(4));
        let open: Vec<Watcher> = (0..MAX_WATCHERS).map(|_| tap.watch().unwrap()).collect();
        assert_eq!(tap.watch().unwrap_err(), TooManyTaps);
        drop(open);
        assert!(tap.watch().is_ok());
    }

    #[tokio::test]
    async fn the_body_ends_its_task_when_the_reader_goes_away() {
        let tap = Arc::new(Tap::new(4));
        let body = stream(tap.watch().unwrap(), own());
        assert!(tap.watched());
        drop(body);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tap.watched() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the tap stayed open"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
