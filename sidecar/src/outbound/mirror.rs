//! Traffic mirroring: a route's `mirror` sends a copy of a share of its requests to a
//! shadow backend and, with `compare`, compares the shadow's answer with the primary's.
//!
//! The copy must never cost the primary anything it could notice. The request body is
//! copied while it streams to the primary (a tee: nothing waits for it); the copy is
//! sent from a task of its own once that body has ended, on a pool of its own that
//! drops copies when full; and nothing about it reaches the primary's balancer,
//! circuit breaker or retry budget. The primary's response streams to the client as it
//! comes, digested on the way; the digest goes to the copy's task when the body ends.
//! See docs/shadow.md.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
};
use http_body_util::{BodyExt, Either};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use trellis_api::config::{DEFAULT_MIRROR_BODY_BYTES, MirrorConfig};

use super::{destinations::CompileError, route::Backend};
use crate::{
    http::{ProxyBody, TRELLIS_ERROR, error_chain, is_upgrade},
    traffic::{self, Mismatch, ShadowOutcome},
};

/// Set on every mirrored copy. A request that already carries it is never mirrored
/// again, so a shadow that calls on through the mesh does not multiply the copies.
pub const SHADOW: HeaderName = HeaderName::from_static("x-trellis-shadow");
/// `trellis_shadow_requests_total{service, route, shadow, outcome}`: requests a mirror
/// took, by `mirrored`, `dropped` (pool full) or `too_large` (body over the limit).
pub const SHADOW_REQUESTS: &str = "trellis_shadow_requests_total";
/// `trellis_shadow_comparisons_total{service, route, shadow, result}`: what the copies
/// of a `compare: true` mirror came to.
pub const SHADOW_COMPARISONS: &str = "trellis_shadow_comparisons_total";

/// Copies one mirror may have out at once; one more is dropped.
pub const POOL_SIZE: usize = 64;
/// How long a copy may take when its route has no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest `maxBodyBytes` (as the CRD allows).
const MAX_BODY_LIMIT: u32 = 1 << 20;
/// With `ignoreFields`, how much of each response body is kept to compare as JSON; a
/// longer body is compared by its raw digest.
pub const COMPARE_COPY_LIMIT: usize = 1 << 20;
/// How long a shadow's answer waits for the primary's response body to end before the
/// pair is left uncompared: a copy's task must end, however long a download runs.
pub const PRIMARY_WAIT: Duration = Duration::from_secs(60);

/// A route's mirror, compiled.
#[derive(Debug)]
pub struct Mirror {
    /// The destination and the route whose requests are copied: metric labels.
    service: String,
    route: String,
    /// Where the copies go.
    backend: Backend,
    percent: f64,
    compare: bool,
    /// `ignoreFields`, each split at its dots.
    ignore: Vec<Vec<String>>,
    max_body_bytes: u64,
    timeout: Duration,
    pool: Arc<Semaphore>,
}

/// A copy admitted to the pool, to be sent once the request body has streamed by.
#[derive(Debug)]
pub struct Shadow {
    mirror: Arc<Mirror>,
    permit: OwnedSemaphorePermit,
    /// The primary's status and digest, when the mirror compares.
    primary: Option<oneshot::Receiver<Observed>>,
}

/// The primary's side of a comparison: digests its response on the way to the client.
#[derive(Debug)]
pub struct Comparison {
    tx: oneshot::Sender<Observed>,
    keep_copy: bool,
}

/// What a copy of the request body came to.
#[derive(Debug)]
enum Copied {
    Whole {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    TooLarge,
}

/// One response as compared: its status, the hex SHA-256 of its body, and, with
/// `ignoreFields`, the body itself when it was at most `COMPARE_COPY_LIMIT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub status: StatusCode,
    pub digest: String,
    pub copy: Option<Vec<u8>>,
}

/// The request line and headers a copy is sent with.
#[derive(Debug)]
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

// === impl Mirror ===

impl Mirror {
    /// Compiles the `mirror` at `at` (e.g. `services.web.routes[0].mirror`) of route
    /// `route` of `service`, whose copies go to `backend`. `timeout` is the route's.
    pub fn compile(
        at: &str,
        service: &str,
        route: &str,
        config: &MirrorConfig,
        backend: Backend,
        timeout: Option<Duration>,
    ) -> Result<Self, CompileError> {
        let MirrorConfig {
            // Resolved into `backend` by the caller.
            service: _,
            subset: _,
            percent,
            compare,
            ignore_fields,
            max_body_bytes,
        } = config;
        if !(0.0..=100.0).contains(percent) {
            return Err(CompileError::invalid(
                format!("{at}.percent"),
                format!("must be between 0 and 100, not {percent}"),
            ));
        }
        let ignore = ignore_fields
            .iter()
            .enumerate()
            .map(|(i, field)| {
                if field.is_empty() || field.split('.').any(str::is_empty) {
                    return Err(CompileError::invalid(
                        format!("{at}.ignoreFields[{i}]"),
                        format!("{field:?} must be a field name or a dotted path like `order.id`"),
                    ));
                }
                Ok(field.split('.').map(str::to_string).collect())
            })
            .collect::<Result<Vec<Vec<String>>, _>>()?;
        if !ignore.is_empty() && !compare {
            return Err(CompileError::invalid(
                format!("{at}.ignoreFields"),
                "only means something with `compare: true`",
            ));
        }
        let max_body_bytes = max_body_bytes.unwrap_or(DEFAULT_MIRROR_BODY_BYTES);
        if max_body_bytes > MAX_BODY_LIMIT {
            return Err(CompileError::invalid(
                format!("{at}.maxBodyBytes"),
                format!("must be at most {MAX_BODY_LIMIT}, not {max_body_bytes}"),
            ));
        }
        Ok(Self {
            service: service.to_string(),
            route: route.to_string(),
            backend,
            percent: *percent,
            compare: *compare,
            ignore,
            max_body_bytes: u64::from(max_body_bytes),
            timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
            pool: Arc::new(Semaphore::new(POOL_SIZE)),
        })
    }

    /// The subset or service that gets the copies, as metrics name it.
    pub fn shadow(&self) -> &str {
        self.backend.label()
    }

    /// Shares `before`'s pool when both copy to the same shadow.
    pub fn keep_pool_of(&mut self, before: &Mirror) {
        if self.backend.service == before.backend.service
            && self.backend.subset == before.backend.subset
        {
            self.pool = before.pool.clone();
        }
    }

    /// Copies admitted and not yet settled.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        POOL_SIZE - self.pool.available_permits()
    }

    /// Whether `req` gets a copy: not a copy itself nor an upgrade, drawn by `percent`,
    /// a body not announced over the limit, and room in the pool. Counts the copies
    /// refused for their size or for a full pool.
    pub fn admit<B: Body>(
        self: &Arc<Self>,
        req: &Request<B>,
    ) -> Option<(Shadow, Option<Comparison>)> {
        if req.headers().contains_key(SHADOW) || is_upgrade(req) {
            return None;
        }
        if fastrand::f64() * 100.0 >= self.percent {
            return None;
        }
        if announced_length(req) > self.max_body_bytes {
            self.record(ShadowOutcome::TooLarge);
            return None;
        }
        let Ok(permit) = self.pool.clone().try_acquire_owned() else {
            self.record(ShadowOutcome::Dropped);
            return None;
        };
        let (comparison, primary) = if self.compare {
            let (tx, rx) = oneshot::channel();
            let keep_copy = !self.ignore.is_empty();
            (Some(Comparison { tx, keep_copy }), Some(rx))
        } else {
            (None, None)
        };
        let shadow = Shadow {
            mirror: self.clone(),
            permit,
            primary,
        };
        Some((shadow, comparison))
    }

    /// Counts an outcome in the metrics and in the traffic ledger.
    fn record(&self, outcome: ShadowOutcome) {
        let (request, result) = match &outcome {
            ShadowOutcome::Mirrored => (Some("mirrored"), None),
            ShadowOutcome::TooLarge => (Some("too_large"), None),
            ShadowOutcome::Dropped => (Some("dropped"), Some("dropped")),
            ShadowOutcome::Matched => (None, Some("match")),
            ShadowOutcome::StatusMismatch(_) => (None, Some("status_mismatch")),
            ShadowOutcome::BodyMismatch(_) => (None, Some("body_mismatch")),
            ShadowOutcome::ShadowError => (None, Some("shadow_error")),
        };
        if let Some(outcome) = request {
            metrics::counter!(
                SHADOW_REQUESTS,
                "service" => self.service.clone(),
                "route" => self.route.clone(),
                "shadow" => self.shadow().to_string(),
                "outcome" => outcome,
            )
            .increment(1);
        }
        if self.compare
            && let Some(result) = result
        {
            metrics::counter!(
                SHADOW_COMPARISONS,
                "service" => self.service.clone(),
                "route" => self.route.clone(),
                "shadow" => self.shadow().to_string(),
                "result" => result,
            )
            .increment(1);
        }
        traffic::global().record_shadow(&self.service, &self.route, self.shadow(), outcome);
    }

    /// Sends one copy to an endpoint of the shadow and reads its answer, all within the
    /// timeout. Nothing here reports to the balancer or the circuit breaker: the copy's
    /// fate must not steer the primary's traffic. A response the mesh made itself
    /// (`x-trellis-error`: the shadow's app down, its sidecar refusing) is a failure,
    /// not an answer to compare.
    async fn send(
        &self,
        head: &Head,
        data: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Result<Option<Observed>, String> {
        let endpoint = self.backend.pick_for_shadow().ok_or_else(|| {
            format!(
                "{:?} of service {:?} has no endpoint in rotation",
                self.shadow(),
                self.backend.service
            )
        })?;
        let mut request = Request::new(Either::Left(RequestBody::copy(data, trailers)));
        *request.method_mut() = head.method.clone();
        *request.uri_mut() = head.uri.clone();
        *request.version_mut() = http::Version::HTTP_2;
        *request.headers_mut() = head.headers.clone();
        let digest = self
            .compare
            .then(|| BodyDigest::new(!self.ignore.is_empty()));
        let exchange = async {
            let response =
                endpoint.client.request(request).await.map_err(|e| {
                    format!("endpoint {}: {}", endpoint.target.addr, error_chain(&e))
                })?;
            if let Some(kind) = response.headers().get(TRELLIS_ERROR) {
                return Err(format!(
                    "the mesh answered {} {kind:?} in its place",
                    response.status()
                ));
            }
            let status = response.status();
            let mut digest = digest;
            // Read to the end even when not comparing: the shadow's app sees its
            // response taken, not a reset stream.
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("reading its response body: {e}"))?;
                if let (Some(digest), Some(data)) = (digest.as_mut(), frame.data_ref()) {
                    digest.update(data);
                }
            }
            Ok(digest.map(|d| d.finish(status)))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }

    /// Compares the shadow's answer with the primary's.
    fn verdict(&self, head: &Head, primary: &Observed, shadow: &Observed) -> ShadowOutcome {
        let (primary_digest, shadow_digest) = compared_digests(&self.ignore, primary, shadow);
        let same_body = primary_digest == shadow_digest;
        let mismatch = Mismatch {
            method: head.method.to_string(),
            path: head.uri.path().to_string(),
            primary_status: primary.status.as_u16(),
            shadow_status: shadow.status.as_u16(),
            primary_digest,
            shadow_digest,
        };
        if primary.status != shadow.status {
            ShadowOutcome::StatusMismatch(mismatch)
        } else if !same_body {
            ShadowOutcome::BodyMismatch(mismatch)
        } else {
            ShadowOutcome::Matched
        }
    }
}

/// The request body's announced length: `Content-Length`, else what the body says.
fn announced_length<B: Body>(req: &Request<B>) -> u64 {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| req.body().size_hint().lower())
}

// === impl Shadow ===

impl Shadow {
    /// Starts the copy of a request whose head, as the primary gets it, is `parts`:
    /// returns the body to send the primary, which copies what passes for the shadow.
    pub fn start<B>(self, parts: &http::request::Parts, body: B) -> RequestBody<B>
    where
        B: Body<Data = Bytes>,
    {
        let mut headers = parts.headers.clone();
        headers.insert(SHADOW, HeaderValue::from_static("true"));
        let head = Head {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers,
        };
        let (tx, rx) = oneshot::channel();
        let limit = self.mirror.max_body_bytes;
        tokio::spawn(self.run(head, rx));
        RequestBody::tee(body, Tee::new(tx, limit))
    }

    async fn run(self, head: Head, body: oneshot::Receiver<Copied>) {
        // The slot is held until the copy is settled, comparison included.
        let Self {
            mirror,
            permit: _permit,
            primary,
        } = self;
        let (service, route) = (mirror.service.as_str(), mirror.route.as_str());
        let (data, trailers) = match tokio::time::timeout(mirror.timeout, body).await {
            Ok(Ok(Copied::Whole { data, trailers })) => (data, trailers),
            Ok(Ok(Copied::TooLarge)) => return mirror.record(ShadowOutcome::TooLarge),
            Ok(Err(_)) | Err(_) => {
                return tracing::debug!(
                    service,
                    route,
                    "not mirrored: the request body did not reach its end"
                );
            }
        };
        mirror.record(ShadowOutcome::Mirrored);
        let outcome = match (mirror.send(&head, data, trailers).await, primary) {
            (Err(error), _) => {
                tracing::debug!(service, route, shadow = mirror.shadow(), %error, "the shadow did not answer");
                ShadowOutcome::ShadowError
            }
            (Ok(Some(shadow)), Some(primary)) => {
                match tokio::time::timeout(PRIMARY_WAIT, primary).await {
                    Ok(Ok(primary)) if mirror.ignore.is_empty() => {
                        mirror.verdict(&head, &primary, &shadow)
                    }
                    // Parsing and re-serialising JSON of up to 1 MiB a side costs
                    // milliseconds of CPU: not on the threads that carry traffic.
                    Ok(Ok(primary)) => {
                        let judge = mirror.clone();
                        let judged = tokio::task::spawn_blocking(move || {
                            judge.verdict(&head, &primary, &shadow)
                        });
                        match judged.await {
                            Ok(outcome) => outcome,
                            Err(error) => {
                                return tracing::warn!(service, route, %error, "comparing failed");
                            }
                        }
                    }
                    Ok(Err(_)) => {
                        return tracing::debug!(
                            service,
                            route,
                            "not compared: the primary's response body did not reach its end"
                        );
                    }
                    Err(_) => {
                        return tracing::debug!(
                            service,
                            route,
                            "not compared: the primary's response body did not end within {PRIMARY_WAIT:?}"
                        );
                    }
                }
            }
            (Ok(_), _) => return,
        };
        mirror.record(outcome);
    }
}

// === impl Comparison ===

impl Comparison {
    /// The primary's response, its body digested as it streams to the client.
    pub fn observe<B>(self, response: Response<B>) -> Response<ComparedBody<B>>
    where
        B: Body<Data = Bytes>,
    {
        let status = response.status();
        response.map(|inner| {
            // The copy's task is over already (its shadow failed): nothing to compare.
            if self.tx.is_closed() {
                return ComparedBody {
                    inner,
                    digest: None,
                };
            }
            let digest = PrimaryDigest {
                status,
                digest: BodyDigest::new(self.keep_copy),
                tx: self.tx,
            };
            if inner.is_end_stream() {
                digest.finish();
                return ComparedBody {
                    inner,
                    digest: None,
                };
            }
            ComparedBody {
                inner,
                digest: Some(digest),
            }
        })
    }
}

// === RequestBody ===

/// A request body on its way to a peer: the client's, copied for a shadow as it
/// streams when the request is mirrored, or a mirrored copy itself.
#[derive(Debug)]
pub enum RequestBody<B = Incoming> {
    Client {
        body: B,
        tee: Option<Tee>,
    },
    Copy {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
}

/// Keeps what passes of a request body, up to a limit, for the shadow's copy.
#[derive(Debug)]
pub struct Tee {
    kept: BytesMut,
    trailers: Option<HeaderMap>,
    limit: u64,
    tx: oneshot::Sender<Copied>,
}

impl<B> RequestBody<B> {
    /// The client's body, passed on as it is.
    pub fn plain(body: B) -> Self {
        Self::Client { body, tee: None }
    }

    fn copy(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self::Copy {
            data: (!data.is_empty()).then_some(data),
            trailers,
        }
    }
}

impl<B: Body> RequestBody<B> {
    fn tee(body: B, tee: Tee) -> Self {
        // A body that is over before it starts is never read (hyper sends the headers
        // with END_STREAM): the copy is complete now.
        if body.is_end_stream() {
            tee.finish();
            return Self::plain(body);
        }
        Self::Client {
            body,
            tee: Some(tee),
        }
    }
}

impl Tee {
    fn new(tx: oneshot::Sender<Copied>, limit: u64) -> Self {
        Self {
            kept: BytesMut::new(),
            trailers: None,
            limit,
            tx,
        }
    }

    /// Keeps `frame`; `None` once the body is over the limit (the shadow is told) or
    /// the shadow's task has gone.
    fn keep(mut self, frame: &Frame<Bytes>) -> Option<Self> {
        if self.tx.is_closed() {
            return None;
        }
        if let Some(data) = frame.data_ref() {
            if (self.kept.len() + data.len()) as u64 > self.limit {
                let _ = self.tx.send(Copied::TooLarge);
                return None;
            }
            // Copied rather than kept by reference: a chunk may pin a far larger
            // read buffer.
            self.kept.extend_from_slice(data);
        } else if let Some(trailers) = frame.trailers_ref() {
            self.trailers = Some(trailers.clone());
        }
        Some(self)
    }

    fn finish(self) {
        let _ = self.tx.send(Copied::Whole {
            data: self.kept.freeze(),
            trailers: self.trailers,
        });
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.get_mut() {
            Self::Client { body, tee } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if let Poll::Ready(ready) = &polled
                    && let Some(copying) = tee.take()
                {
                    match ready {
                        Some(Ok(frame)) => {
                            if let Some(copying) = copying.keep(frame) {
                                // hyper stops reading once the body says it is over,
                                // without asking for the end.
                                if body.is_end_stream() {
                                    copying.finish();
                                } else {
                                    *tee = Some(copying);
                                }
                            }
                        }
                        None => copying.finish(),
                        // A body that failed is no request to copy.
                        Some(Err(_)) => {}
                    }
                }
                polled
            }
            Self::Copy { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if let Some(trailers) = trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Client { body, .. } => body.is_end_stream(),
            Self::Copy { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Client { body, .. } => body.size_hint(),
            Self::Copy { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

// === ComparedBody ===

/// The primary's response body on its way to the client, unbuffered; digested as it
/// passes when its request was mirrored with `compare`.
#[derive(Debug)]
pub struct ComparedBody<B = ProxyBody> {
    inner: B,
    digest: Option<PrimaryDigest>,
}

#[derive(Debug)]
struct PrimaryDigest {
    status: StatusCode,
    digest: BodyDigest,
    tx: oneshot::Sender<Observed>,
}

impl PrimaryDigest {
    fn finish(self) {
        let _ = self.tx.send(self.digest.finish(self.status));
    }
}

impl<B> Body for ComparedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(ready) = &polled
            && let Some(mut digest) = this.digest.take()
        {
            match ready {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        digest.digest.update(data);
                    }
                    if this.inner.is_end_stream() {
                        digest.finish();
                    } else if !digest.tx.is_closed() {
                        this.digest = Some(digest);
                    }
                }
                None => digest.finish(),
                // The client gets the error; there is nothing whole to compare.
                Some(Err(_)) => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the outbound listener answers with: a response as it came, or one being
/// digested for a comparison.
pub type OutboundBody = Either<ProxyBody, ComparedBody>;

// === digests ===

/// SHA-256 of a body as it passes, and with `ignoreFields` a copy of it (up to
/// `COMPARE_COPY_LIMIT`) to compare as JSON.
struct BodyDigest {
    hash: ring::digest::Context,
    copy: Option<Vec<u8>>,
}

impl std::fmt::Debug for BodyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyDigest")
            .field("copied", &self.copy.as_ref().map(Vec::len))
            .finish_non_exhaustive()
    }
}

impl BodyDigest {
    fn new(keep_copy: bool) -> Self {
        Self {
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            copy: keep_copy.then(Vec::new),
        }
    }

    fn update(&mut self, data: &[u8]) {
        self.hash.update(data);
        if let Some(copy) = &mut self.copy {
            if copy.len() + data.len() > COMPARE_COPY_LIMIT {
                self.copy = None;
            } else {
                copy.extend_from_slice(data);
            }
        }
    }

    fn finish(self, status: StatusCode) -> Observed {
        Observed {
            status,
            digest: hex(self.hash.finish().as_ref()),
            copy: self.copy,
        }
    }
}

/// The digests to compare: of the JSON with `ignore` removed when both bodies were
/// kept and both are JSON, else of the raw bytes.
pub fn compared_digests(
    ignore: &[Vec<String>],
    primary: &Observed,
    shadow: &Observed,
) -> (String, String) {
    if !ignore.is_empty()
        && let (Some(p), Some(s)) = (&primary.copy, &shadow.copy)
        && let (Some(p), Some(s)) = (canonical_digest(p, ignore), canonical_digest(s, ignore))
    {
        return (p, s);
    }
    (primary.digest.clone(), shadow.digest.clone())
}

/// The hex SHA-256 of `body` as canonical JSON (keys sorted, no whitespace) with the
/// `ignore` paths removed; `None` when it is not JSON.
pub fn canonical_digest(body: &[u8], ignore: &[Vec<String>]) -> Option<String> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    for path in ignore {
        remove_path(&mut value, path);
    }
    let mut hash = HashWriter(ring::digest::Context::new(&ring::digest::SHA256));
    write_canonical(&value, &mut hash).ok()?;
    Some(hex(hash.0.finish().as_ref()))
}

/// Removes the field at `path` (`["order", "createdAt"]`). An array on the way has it
/// removed from each of its elements, so `items.id` reaches every item's id and `id`
/// every element's of a top-level array.
fn remove_path(value: &mut Value, path: &[String]) {
    match value {
        Value::Array(items) => items.iter_mut().for_each(|item| remove_path(item, path)),
        Value::Object(map) => match path {
            [last] => {
                map.remove(last);
            }
            [first, rest @ ..] => {
                if let Some(child) = map.get_mut(first) {
                    remove_path(child, rest);
                }
            }
            [] => {}
        },
        _ => {}
    }
}

/// Writes `value` with object keys sorted, whatever order the map keeps them in.
fn write_canonical(value: &Value, out: &mut impl io::Write) -> serde_json::Result<()> {
    match value {
        Value::Object(map) => {
            let mut fields: Vec<_> = map.iter().collect();
            fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.write_all(b"{").map_err(serde_json::Error::io)?;
            for (i, (key, value)) in fields.into_iter().enumerate() {
                if i > 0 {
                    out.write_all(b",").map_err(serde_json::Error::io)?;
                }
                serde_json::to_writer(&mut *out, key)?;
                out.write_all(b":").map_err(serde_json::Error::io)?;
                write_canonical(value, out)?;
            }
            out.write_all(b"}").map_err(serde_json::Error::io)
        }
        Value::Array(items) => {
            out.write_all(b"[").map_err(serde_json::Error::io)?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.write_all(b",").map_err(serde_json::Error::io)?;
                }
                write_canonical(item, out)?;
            }
            out.write_all(b"]").map_err(serde_json::Error::io)
        }
        scalar => serde_json::to_writer(out, scalar),
    }
}

/// Feeds what is written to a SHA-256.
struct HashWriter(ring::digest::Context);

impl io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn paths(fields: &[&str]) -> Vec<Vec<String>> {
        fields
            .iter()
            .map(|f| f.split('.').map(str::to_string).collect())
            .collect()
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    }

    #[test]
    fn the_raw_digest_is_the_sha256_of_the_bytes() {
        let mut digest = BodyDigest::new(false);
        digest.update(b"hello, ");
        digest.update(b"world");
        let observed = digest.finish(StatusCode::OK);
        assert_eq!(
            observed.digest,
            "09ca7e4eaa6e8ae9c7d261167129184883644d07dfba7cbfbc4c8a2e08360d5b"
        );
        assert_eq!(observed.digest, sha256_hex(b"hello, world"));
        assert_eq!(observed.copy, None, "no copy without ignoreFields");
    }

    #[test]
    fn key_order_and_whitespace_do_not_change_the_canonical_digest() {
        let a = canonical_digest(br#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#, &[]).unwrap();
        let b = canonical_digest(br#"{"a":{"x":"s","y":[1,2]},"b":1}"#, &[]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, sha256_hex(br#"{"a":{"x":"s","y":[1,2]},"b":1}"#));
        // Array order and values do count.
        let c = canonical_digest(br#"{"a":{"x":"s","y":[2,1]},"b":1}"#, &[]).unwrap();
        assert_ne!(a, c);
        assert_eq!(canonical_digest(b"not json {", &[]), None);
    }

    #[test]
    fn ignored_fields_are_removed_through_objects_and_arrays() {
        let ignore = paths(&["id", "order.createdAt", "items.meta.seen"]);
        let primary = br#"{"id": 1, "order": {"createdAt": "t1", "total": 5},
            "items": [{"sku": "a", "meta": {"seen": 1, "keep": true}}, {"sku": "b"}]}"#;
        let shadow = br#"{"id": 2, "order": {"total": 5, "createdAt": "t2"},
            "items": [{"sku": "a", "meta": {"keep": true, "seen": 9}}, {"sku": "b"}]}"#;
        assert_eq!(
            canonical_digest(primary, &ignore),
            canonical_digest(shadow, &ignore)
        );
        // A field that is not ignored still tells them apart.
        let other_total = br#"{"id": 3, "order": {"createdAt": "t3", "total": 6},
            "items": [{"sku": "a", "meta": {"seen": 1, "keep": true}}, {"sku": "b"}]}"#;
        assert_ne!(
            canonical_digest(primary, &ignore),
            canonical_digest(other_total, &ignore)
        );
        // A top-level array: each element loses its `id`.
        let ids = paths(&["id"]);
        assert_eq!(
            canonical_digest(br#"[{"id":1,"v":"a"},{"id":2,"v":"b"}]"#, &ids),
            canonical_digest(br#"[{"v":"a","id":7},{"v":"b"}]"#, &ids)
        );
        // A path through a scalar, or one that is not there, changes nothing.
        let odd = paths(&["v.deeper", "missing.field"]);
        assert_eq!(
            canonical_digest(br#"{"v":1}"#, &odd),
            canonical_digest(br#"{"v":1}"#, &[])
        );
    }

    fn observed(status: u16, body: &[u8], keep_copy: bool) -> Observed {
        let mut digest = BodyDigest::new(keep_copy);
        digest.update(body);
        digest.finish(StatusCode::from_u16(status).unwrap())
    }

    #[test]
    fn json_is_compared_canonically_only_when_both_sides_are_json() {
        let ignore = paths(&["at"]);
        let p = observed(200, br#"{"at":1,"v":"x"}"#, true);
        let s = observed(200, br#"{"v":"x","at":2}"#, true);
        let (a, b) = compared_digests(&ignore, &p, &s);
        assert_eq!(a, b);
        // One side is not JSON: raw digests, which differ.
        let text = observed(200, b"v=x", true);
        let (a, b) = compared_digests(&ignore, &p, &text);
        assert_eq!((a, b), (p.digest.clone(), text.digest.clone()));
        // Without ignoreFields the raw bytes are compared, key order and all.
        let (a, b) = compared_digests(&[], &p, &s);
        assert_ne!(a, b);
    }

    #[test]
    fn a_body_over_the_copy_limit_is_compared_raw() {
        let mut digest = BodyDigest::new(true);
        digest.update(&vec![b' '; COMPARE_COPY_LIMIT]);
        assert!(digest.copy.is_some(), "exactly the limit is kept");
        digest.update(b"1");
        let observed = digest.finish(StatusCode::OK);
        assert_eq!(observed.copy, None);
    }

    fn tee_over(
        frames: Vec<Frame<Bytes>>,
        limit: u64,
    ) -> (RequestBody<Frames>, oneshot::Receiver<Copied>) {
        let stream = streamed(frames);
        let (tx, rx) = oneshot::channel();
        (RequestBody::tee(stream, Tee::new(tx, limit)), rx)
    }

    type Frames =
        StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, io::Error>>>>;

    fn streamed(frames: Vec<Frame<Bytes>>) -> Frames {
        StreamBody::new(tokio_stream::iter(
            frames.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    #[tokio::test]
    async fn the_tee_passes_the_body_on_and_copies_it_whole() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = vec![
            Frame::data(Bytes::from_static(b"hello, ")),
            Frame::data(Bytes::from_static(b"world")),
            Frame::trailers(trailers.clone()),
        ];
        let (body, rx) = tee_over(frames, 64);
        let passed = body.collect().await.unwrap();
        assert_eq!(passed.trailers(), Some(&trailers));
        assert_eq!(passed.to_bytes(), "hello, world");
        match rx.await.unwrap() {
            Copied::Whole { data, trailers: t } => {
                assert_eq!(data, "hello, world");
                assert_eq!(t, Some(trailers));
            }
            Copied::TooLarge => panic!("within the limit"),
        }
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_passed_on_whole_but_not_copied() {
        let frames = vec![
            Frame::data(Bytes::from_static(b"12345")),
            Frame::data(Bytes::from_static(b"678")),
        ];
        let (body, rx) = tee_over(frames, 7);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "12345678");
        assert!(matches!(rx.await.unwrap(), Copied::TooLarge));
    }

    #[tokio::test]
    async fn an_empty_body_is_copied_at_once_and_an_abandoned_one_never() {
        let (tx, rx) = oneshot::channel();
        let empty = RequestBody::tee(http_body_util::Empty::<Bytes>::new(), Tee::new(tx, 8));
        assert!(empty.is_end_stream());
        assert!(matches!(rx.await.unwrap(), Copied::Whole { data, .. } if data.is_empty()));

        let (body, rx) = tee_over(vec![Frame::data(Bytes::from_static(b"part"))], 64);
        drop(body);
        assert!(
            rx.await.is_err(),
            "a body dropped before its end is no copy"
        );
    }

    #[tokio::test]
    async fn a_copy_body_sends_its_data_and_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", HeaderValue::from_static("1"));
        let copy = RequestBody::<Incoming>::copy(Bytes::from_static(b"abc"), Some(trailers));
        assert_eq!(copy.size_hint().exact(), Some(3));
        let collected = copy.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-t"], "1");
        assert_eq!(collected.to_bytes(), "abc");
        assert!(RequestBody::<Incoming>::copy(Bytes::new(), None).is_end_stream());
    }

    #[tokio::test]
    async fn the_primary_digest_reaches_the_shadow_task_when_the_body_ends() {
        let (tx, rx) = oneshot::channel();
        let comparison = Comparison {
            tx,
            keep_copy: true,
        };
        let body = streamed(vec![
            Frame::data(Bytes::from_static(b"{\"a\":")),
            Frame::data(Bytes::from_static(b"1}")),
        ]);
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::CREATED;
        let observed = comparison.observe(response);
        let passed = observed.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(passed, "{\"a\":1}");
        let primary = rx.await.unwrap();
        assert_eq!(primary.status, StatusCode::CREATED);
        assert_eq!(primary.digest, sha256_hex(b"{\"a\":1}"));
        assert_eq!(primary.copy.as_deref(), Some(&b"{\"a\":1}"[..]));

        // A client that goes away mid-body: nothing is handed over.
        let (tx, rx) = oneshot::channel();
        let comparison = Comparison {
            tx,
            keep_copy: false,
        };
        let body = streamed(vec![Frame::data(Bytes::from_static(b"x"))]);
        drop(comparison.observe(Response::new(body)));
        assert!(rx.await.is_err());
    }
}
