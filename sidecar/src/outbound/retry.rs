//! Retries on the outbound path: which failures a route retries (`RetryPolicy`), how
//! long to wait between tries (exponential backoff with full jitter), how many retries
//! a destination may take (`RetryBudget`, a share of recent requests plus a floor),
//! and how a request body is kept so a later try can send it again (`Replay`).
//!
//! Lessons from Istio: retried POSTs charged payments twice (istio#13851, #50506), so
//! only idempotent methods are retried unless a route says otherwise; and unbounded
//! retries turn a struggling service into a dead one, so every destination has a
//! budget.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_body_util::Either;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use parking_lot::Mutex;
use trellis_api::config::{BackoffConfig, RetriesConfig, RetryBudgetConfig};

use super::{destinations::CompileError, mirror::RequestBody};

/// Set on every response of a route with retries: how many tries were made.
pub const ATTEMPTS: HeaderName = HeaderName::from_static("x-trellis-attempts");
/// `trellis_retries_total{service, reason}`: retries sent, by what the try before failed with.
pub const RETRIES: &str = "trellis_retries_total";
/// `trellis_retry_budget_exhausted_total{service}`: retries not sent because the
/// destination's budget was spent.
pub const BUDGET_EXHAUSTED: &str = "trellis_retry_budget_exhausted_total";

/// The most of a request body kept for replay; a longer body is sent once.
pub const REPLAY_LIMIT: usize = 64 * 1024;
/// Tries in all, the first included (as the CRD allows).
const MAX_ATTEMPTS: u32 = 10;
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// The budget counts requests and retries in one-second buckets over this many seconds.
const BUDGET_BUCKETS: u64 = 10;

/// What a request body travels to a peer as: the client's (copied for a mirror on the
/// way, if any) untouched when it is never replayed, through a `ReplayBody` when a later
/// try may need it again; a mirrored copy is the first kind too.
pub type PeerBody = Either<RequestBody, ReplayBody<RequestBody>>;

/// A route's retry policy, compiled.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    on: Conditions,
    pub backoff: Backoff,
    allow_non_idempotent: bool,
}

/// Which failed tries are tried again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Conditions {
    server_error: bool,
    gateway_error: bool,
    connect_failure: bool,
    reset: bool,
    statuses: Vec<StatusCode>,
}

/// What one try failed with, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryFailure {
    /// The peer answered with this status.
    Status(StatusCode),
    /// No connection (TCP or mTLS) to the endpoint; the mesh answers it with a 503.
    ConnectFailure,
    /// The connection or stream broke before the response headers; a 502.
    Reset,
    /// The try's own deadline passed; a 504, like a `gateway-error`.
    PerTryTimeout,
}

/// Exponential backoff with full jitter between `base` and `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

// === impl RetryPolicy ===

impl RetryPolicy {
    /// Compiles the `retries` of the rule at `at` (its field path, e.g.
    /// `services.web.routes[0].retries`).
    pub fn compile(at: &str, config: &RetriesConfig) -> Result<Self, CompileError> {
        let RetriesConfig {
            attempts,
            per_try_timeout,
            on,
            backoff,
            allow_non_idempotent,
        } = config;
        if !(1..=MAX_ATTEMPTS).contains(attempts) {
            return Err(CompileError::invalid(
                format!("{at}.attempts"),
                format!("must be between 1 and {MAX_ATTEMPTS} (tries in all), not {attempts}"),
            ));
        }
        let per_try_timeout = per_try_timeout
            .as_deref()
            .map(|t| positive_duration(&format!("{at}.perTryTimeout"), t))
            .transpose()?;
        let on = Conditions::compile(at, on)?;
        let backoff = match backoff {
            None => Backoff::default(),
            Some(BackoffConfig { base, max }) => {
                let base = positive_duration(&format!("{at}.backoff.base"), base)?;
                let max = positive_duration(&format!("{at}.backoff.max"), max)?;
                if base > max {
                    return Err(CompileError::invalid(
                        format!("{at}.backoff"),
                        format!("base ({base:?}) must not exceed max ({max:?})"),
                    ));
                }
                Backoff { base, max }
            }
        };
        Ok(Self {
            attempts: *attempts,
            per_try_timeout,
            on,
            backoff,
            allow_non_idempotent: *allow_non_idempotent,
        })
    }

    /// Whether a request with this method may be sent more than once.
    pub fn may_retry(&self, method: &Method) -> bool {
        self.allow_non_idempotent || is_idempotent(method)
    }

    /// Whether a try that failed this way is tried again (attempts and budget allowing).
    pub fn retries_on(&self, failure: TryFailure) -> bool {
        self.on.matches(failure)
    }
}

/// GET, HEAD, OPTIONS, TRACE, PUT and DELETE: sending one twice has the effect of
/// sending it once (RFC 9110 9.2.2), so a try that may have been carried out can be
/// repeated. POST, PATCH and CONNECT cannot.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn positive_duration(field: &str, value: &str) -> Result<Duration, CompileError> {
    match trellis_api::duration::parse(value) {
        Ok(d) if d.is_zero() => Err(CompileError::invalid(field, "must be longer than zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(CompileError::invalid(field, e.to_string())),
    }
}

// === impl Conditions ===

impl Conditions {
    fn compile(at: &str, on: &[String]) -> Result<Self, CompileError> {
        if on.is_empty() {
            return Ok(Self {
                gateway_error: true,
                connect_failure: true,
                ..Self::default()
            });
        }
        let mut conditions = Self::default();
        for (i, condition) in on.iter().enumerate() {
            match condition.as_str() {
                "5xx" => conditions.server_error = true,
                "gateway-error" => conditions.gateway_error = true,
                "connect-failure" => conditions.connect_failure = true,
                "reset" => conditions.reset = true,
                code => match status_code(code) {
                    Some(status) => conditions.statuses.push(status),
                    None => {
                        return Err(CompileError::invalid(
                            format!("{at}.on[{i}]"),
                            format!(
                                "{code:?} is not 5xx, gateway-error, connect-failure, reset or a status code (100-599)"
                            ),
                        ));
                    }
                },
            }
        }
        Ok(conditions)
    }

    /// A try that got no response counts as the status the mesh answers it with
    /// (503, 502, 504), so `5xx`, `gateway-error` and those codes cover it too, as in
    /// Envoy.
    fn matches(&self, failure: TryFailure) -> bool {
        match failure {
            TryFailure::Status(status) => self.status(status),
            TryFailure::ConnectFailure => {
                self.connect_failure || self.status(StatusCode::SERVICE_UNAVAILABLE)
            }
            TryFailure::Reset => self.reset || self.status(StatusCode::BAD_GATEWAY),
            TryFailure::PerTryTimeout => self.status(StatusCode::GATEWAY_TIMEOUT),
        }
    }

    fn status(&self, status: StatusCode) -> bool {
        (self.server_error && status.is_server_error())
            || (self.gateway_error
                && matches!(
                    status,
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                ))
            || self.statuses.contains(&status)
    }
}

/// Exactly three digits, 100 to 599.
fn status_code(code: &str) -> Option<StatusCode> {
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    StatusCode::from_bytes(code.as_bytes())
        .ok()
        .filter(|s| (100..600).contains(&s.as_u16()))
}

// === impl TryFailure ===

impl TryFailure {
    /// The `reason` label of `trellis_retries_total`: a status code, `connect-failure`,
    /// `reset` or `per-try-timeout` (a bounded set).
    pub fn reason(self) -> String {
        match self {
            Self::Status(status) => status.as_str().to_string(),
            Self::ConnectFailure => "connect-failure".into(),
            Self::Reset => "reset".into(),
            Self::PerTryTimeout => "per-try-timeout".into(),
        }
    }
}

// === impl Backoff ===

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: DEFAULT_BACKOFF_BASE,
            max: DEFAULT_BACKOFF_MAX,
        }
    }
}

impl Backoff {
    /// A random pause before retry number `retry` (1 for the first retry).
    pub fn pause(&self, retry: u32) -> Duration {
        full_jitter(self.base, self.max, retry, fastrand::f64())
    }
}

/// The pause before retry `retry` (1 for the first): `unit` (uniform in [0, 1]) of
/// `min(max, base * 2^(retry - 1))`. Full jitter spreads the retries of clients that
/// failed together, so they do not come back in step (the AWS architecture blog's
/// "Exponential Backoff And Jitter").
pub fn full_jitter(base: Duration, max: Duration, retry: u32, unit: f64) -> Duration {
    let doublings = retry.saturating_sub(1).min(31);
    let ceiling = base
        .checked_mul(1 << doublings)
        .map_or(max, |grown| grown.min(max));
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

/// Sleeps out a backoff `pause`, unless `deadline` comes first: then it sleeps until
/// the deadline and returns false.
pub async fn sleep_unless_late(pause: Duration, deadline: Option<tokio::time::Instant>) -> bool {
    let until = tokio::time::Instant::now() + pause;
    match deadline {
        Some(deadline) if deadline <= until => {
            tokio::time::sleep_until(deadline).await;
            false
        }
        _ => {
            if !pause.is_zero() {
                tokio::time::sleep_until(until).await;
            }
            true
        }
    }
}

// === RetryBudget ===

/// How many retries a destination may take: retries within the last `BUDGET_BUCKETS`
/// seconds stay under `ratio x requests + floor x BUDGET_BUCKETS`. The counts live in
/// a `BudgetWindow` that a config push carries over while the destination stays; the
/// ratio and floor are the config's.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    min_retries_per_second: u32,
    window: Arc<BudgetWindow>,
}

/// Requests and retries per one-second bucket, lock-free: each bucket is one
/// `AtomicU64` holding the second it counts (high 32 bits, 136 years' worth) and the
/// count (low 32 bits), so a bucket is moved to a new second and counted in one step.
#[derive(Debug)]
pub struct BudgetWindow {
    epoch: Instant,
    requests: [AtomicU64; BUDGET_BUCKETS as usize],
    retries: [AtomicU64; BUDGET_BUCKETS as usize],
}

impl Default for RetryBudget {
    fn default() -> Self {
        let RetryBudgetConfig {
            ratio,
            min_retries_per_second,
        } = RetryBudgetConfig::default();
        Self {
            ratio,
            min_retries_per_second,
            window: Arc::new(BudgetWindow::new(Instant::now())),
        }
    }
}

impl RetryBudget {
    /// Compiles a destination's `retryBudget` (none: the default, ratio 0.2 and 10
    /// retries per second), counting in `window` when the destination already had one.
    pub fn compile(
        at: &str,
        config: Option<&RetryBudgetConfig>,
        window: Option<Arc<BudgetWindow>>,
    ) -> Result<Self, CompileError> {
        let RetryBudgetConfig {
            ratio,
            min_retries_per_second,
        } = config.cloned().unwrap_or_default();
        if !(0.0..=1.0).contains(&ratio) {
            return Err(CompileError::invalid(
                format!("{at}.ratio"),
                format!("must be between 0 and 1, not {ratio}"),
            ));
        }
        Ok(Self {
            ratio,
            min_retries_per_second,
            window: window.unwrap_or_else(|| Arc::new(BudgetWindow::new(Instant::now()))),
        })
    }

    /// The counts, for the next config to carry over.
    pub fn window(&self) -> &Arc<BudgetWindow> {
        &self.window
    }

    /// Counts a request that may be retried.
    pub fn deposit(&self, now: Instant) {
        self.window.count_request(now);
    }

    /// Takes one retry from the budget if there is room; false when it is spent.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        self.window
            .take_retry(now, self.ratio, self.min_retries_per_second)
    }
}

impl BudgetWindow {
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            requests: Default::default(),
            retries: Default::default(),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs() & u64::from(u32::MAX)
    }

    fn count_request(&self, now: Instant) {
        let second = self.second(now);
        let bucket = &self.requests[(second % BUDGET_BUCKETS) as usize];
        let _ = bucket.fetch_update(Ordering::AcqRel, Ordering::Acquire, |packed| {
            Some(counted(packed, second))
        });
    }

    fn take_retry(&self, now: Instant, ratio: f64, floor_per_second: u32) -> bool {
        let second = self.second(now);
        let index = (second % BUDGET_BUCKETS) as usize;
        let allowed = ratio * live_sum(&self.requests, second) as f64
            + f64::from(floor_per_second) * BUDGET_BUCKETS as f64;
        let others: u64 = self
            .retries
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, bucket)| live(bucket.load(Ordering::Acquire), second))
            .sum();
        // Only this second's bucket takes retries now, so a compare-and-swap on it
        // makes check and count one step: two racing retries cannot both take the
        // last one.
        let bucket = &self.retries[index];
        let mut current = bucket.load(Ordering::Acquire);
        loop {
            let retries = others + live(current, second);
            if (retries + 1) as f64 > allowed {
                return false;
            }
            match bucket.compare_exchange_weak(
                current,
                counted(current, second),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
}

fn pack(second: u64, count: u64) -> u64 {
    (second << 32) | (count & u64::from(u32::MAX))
}

fn unpack(packed: u64) -> (u64, u64) {
    (packed >> 32, packed & u64::from(u32::MAX))
}

/// The bucket after counting one more at `second`: a bucket still on an older second
/// starts over; one already on a later second (a racing caller got there first) takes
/// the count as it is.
fn counted(packed: u64, second: u64) -> u64 {
    match unpack(packed) {
        (at, count) if at >= second => pack(at, count.saturating_add(1).min(u64::from(u32::MAX))),
        _ => pack(second, 1),
    }
}

/// The bucket's count if it belongs to the window ending at `second`.
fn live(packed: u64, second: u64) -> u64 {
    let (at, count) = unpack(packed);
    if at + BUDGET_BUCKETS > second {
        count
    } else {
        0
    }
}

fn live_sum(buckets: &[AtomicU64], second: u64) -> u64 {
    buckets
        .iter()
        .map(|b| live(b.load(Ordering::Acquire), second))
        .sum()
}

// === Replay ===

/// Whether a request body may be kept for replay: its announced length (Content-Length,
/// or what the body itself says) is within `REPLAY_LIMIT`. A body that turns out longer
/// while it is read stops being kept and is sent on once.
pub fn fits(headers: &HeaderMap, body: &impl Body) -> bool {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| body.size_hint().lower());
    announced <= REPLAY_LIMIT as u64
}

/// Keeps what a request body has sent so far (up to `REPLAY_LIMIT`), so a later try
/// can send the same bytes again. The body streams to the first try as it arrives —
/// nothing waits for the whole body, so a gRPC stream or a slow upload works as
/// without retries — and a retry's body first replays what was kept, then reads on
/// from the client. Dropping the `Replay` ends the keeping.
#[derive(Debug)]
pub struct Replay<B = Incoming> {
    recording: Arc<Mutex<Recording<B>>>,
}

/// One try's request body.
#[derive(Debug)]
pub struct ReplayBody<B = Incoming> {
    recording: Arc<Mutex<Recording<B>>>,
    /// Which try this body belongs to; a body of an earlier try stops.
    generation: u64,
    /// How many kept chunks this body has sent.
    cursor: usize,
    trailers_sent: bool,
}

#[derive(Debug)]
struct Recording<B> {
    /// The client's body, read by the body of the current try only.
    source: B,
    source_done: bool,
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    /// Another try could still send the whole body: false once it outgrew the limit,
    /// failed, or the request is settled.
    replayable: bool,
    generation: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the request body: {0}")]
    Source(Box<dyn std::error::Error + Send + Sync>),
    /// The try this body belonged to is over and a later one has the body now.
    #[error("the request body moved to a later try")]
    Superseded,
}

impl<B> Replay<B> {
    /// Starts keeping `source`; the body returned is the first try's.
    pub fn new(source: B) -> (Self, ReplayBody<B>) {
        let recording = Arc::new(Mutex::new(Recording {
            source,
            source_done: false,
            chunks: Vec::new(),
            len: 0,
            trailers: None,
            replayable: true,
            generation: 0,
        }));
        let body = ReplayBody {
            recording: recording.clone(),
            generation: 0,
            cursor: 0,
            trailers_sent: false,
        };
        (Self { recording }, body)
    }

    /// Whether a new try could send the whole body.
    pub fn can_replay(&self) -> bool {
        self.recording.lock().replayable
    }

    /// The body for the next try. Every earlier try's body stops with an error, so the
    /// client's body is never read by two tries at once.
    pub fn next_body(&self) -> ReplayBody<B> {
        let generation = {
            let mut recording = self.recording.lock();
            recording.generation += 1;
            recording.generation
        };
        ReplayBody {
            recording: self.recording.clone(),
            generation,
            cursor: 0,
            trailers_sent: false,
        }
    }
}

impl<B> Drop for Replay<B> {
    /// No more tries: the last try's body sends what is kept and reads on without
    /// keeping, and frees the kept chunks once it is past them.
    fn drop(&mut self) {
        self.recording.lock().replayable = false;
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = ReplayError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReplayError>>> {
        let this = self.get_mut();
        let mut recording = this.recording.lock();
        let recording = &mut *recording;
        if recording.generation != this.generation {
            return Poll::Ready(Some(Err(ReplayError::Superseded)));
        }
        if let Some(chunk) = recording.chunks.get(this.cursor) {
            this.cursor += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if !recording.replayable && !recording.chunks.is_empty() {
            // Past every kept chunk and no try will want them again.
            recording.chunks = Vec::new();
            this.cursor = 0;
        }
        if !this.trailers_sent
            && let Some(trailers) = &recording.trailers
        {
            this.trailers_sent = true;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
        }
        if recording.source_done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut recording.source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                recording.source_done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                recording.replayable = false;
                recording.source_done = true;
                Poll::Ready(Some(Err(ReplayError::Source(error.into()))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if recording.replayable {
                        if recording.len + data.len() > REPLAY_LIMIT {
                            // Longer than announced: this try is its last.
                            recording.replayable = false;
                            recording.chunks = Vec::new();
                            this.cursor = 0;
                        } else {
                            recording.len += data.len();
                            recording.chunks.push(data.clone());
                            this.cursor += 1;
                        }
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    recording.trailers = Some(trailers.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let recording = self.recording.lock();
        recording.generation == self.generation
            && self.cursor >= recording.chunks.len()
            && (self.trailers_sent || recording.trailers.is_none())
            && (recording.source_done || recording.source.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let recording = self.recording.lock();
        let kept: u64 = recording
            .chunks
            .get(self.cursor..)
            .unwrap_or_default()
            .iter()
            .map(|c| c.len() as u64)
            .sum();
        let rest = if recording.source_done {
            SizeHint::with_exact(0)
        } else {
            recording.source.size_hint()
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + kept);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + kept);
        }
        hint
    }
}

/// The header to set on a response of a route with retries.
pub fn attempts_header(tries: u32) -> HeaderValue {
    HeaderValue::from(tries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(on: &[&str]) -> Result<RetryPolicy, CompileError> {
        RetryPolicy::compile(
            "services.web.routes[0].retries",
            &RetriesConfig {
                attempts: 3,
                per_try_timeout: None,
                on: on.iter().map(|s| s.to_string()).collect(),
                backoff: None,
                allow_non_idempotent: false,
            },
        )
    }

    fn status(code: u16) -> TryFailure {
        TryFailure::Status(StatusCode::from_u16(code).unwrap())
    }

    #[test]
    fn conditions_parse_and_match_what_they_name() {
        // Empty: connect-failure and gateway-error.
        let default = compile(&[]).unwrap();
        for failure in [
            status(502),
            status(503),
            status(504),
            TryFailure::ConnectFailure,
            TryFailure::PerTryTimeout,
            TryFailure::Reset,
        ] {
            assert!(default.retries_on(failure), "{failure:?}");
        }
        for failure in [status(500), status(429), status(404), status(200)] {
            assert!(!default.retries_on(failure), "{failure:?}");
        }

        let server_error = compile(&["5xx"]).unwrap();
        assert!(server_error.retries_on(status(500)));
        assert!(server_error.retries_on(status(599)));
        assert!(server_error.retries_on(TryFailure::Reset));
        assert!(server_error.retries_on(TryFailure::PerTryTimeout));
        assert!(!server_error.retries_on(status(499)));

        let connect = compile(&["connect-failure"]).unwrap();
        assert!(connect.retries_on(TryFailure::ConnectFailure));
        assert!(!connect.retries_on(TryFailure::Reset));
        assert!(!connect.retries_on(status(503)));
        assert!(!connect.retries_on(TryFailure::PerTryTimeout));

        let reset = compile(&["reset"]).unwrap();
        assert!(reset.retries_on(TryFailure::Reset));
        assert!(!reset.retries_on(TryFailure::ConnectFailure));
        assert!(!reset.retries_on(status(502)));

        let codes = compile(&["429", "504"]).unwrap();
        assert!(codes.retries_on(status(429)));
        assert!(codes.retries_on(TryFailure::PerTryTimeout), "a 504");
        assert!(!codes.retries_on(status(503)));
        assert!(!codes.retries_on(TryFailure::ConnectFailure));
    }

    #[test]
    fn bad_retries_are_named_by_their_field_path() {
        for (on, want) in [
            (
                "6xx",
                "services.web.routes[0].retries.on[1]: \"6xx\" is not 5xx, gateway-error, connect-failure, reset or a status code (100-599)",
            ),
            (
                "600",
                "services.web.routes[0].retries.on[1]: \"600\" is not",
            ),
            ("5031", "services.web.routes[0].retries.on[1]: \"5031\""),
            ("Reset", "services.web.routes[0].retries.on[1]: \"Reset\""),
        ] {
            let e = compile(&["reset", on]).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
        let config =
            |attempts, per_try: Option<&str>, backoff: Option<(&str, &str)>| RetriesConfig {
                attempts,
                per_try_timeout: per_try.map(str::to_string),
                on: vec![],
                backoff: backoff.map(|(base, max)| BackoffConfig {
                    base: base.into(),
                    max: max.into(),
                }),
                allow_non_idempotent: false,
            };
        for (config, want) in [
            (
                config(0, None, None),
                "services.web.routes[0].retries.attempts: must be between 1 and 10 (tries in all), not 0",
            ),
            (
                config(11, None, None),
                "services.web.routes[0].retries.attempts: must be between 1 and 10 (tries in all), not 11",
            ),
            (
                config(2, Some("soon"), None),
                "services.web.routes[0].retries.perTryTimeout: invalid duration \"soon\"",
            ),
            (
                config(2, Some("0ms"), None),
                "services.web.routes[0].retries.perTryTimeout: must be longer than zero",
            ),
            (
                config(2, None, Some(("1s", "100ms"))),
                "services.web.routes[0].retries.backoff: base (1s) must not exceed max (100ms)",
            ),
            (
                config(2, None, Some(("x", "100ms"))),
                "services.web.routes[0].retries.backoff.base: invalid duration",
            ),
        ] {
            let e = RetryPolicy::compile("services.web.routes[0].retries", &config)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let ok =
            RetryPolicy::compile("r", &config(10, Some("150ms"), Some(("10ms", "1s")))).unwrap();
        assert_eq!(ok.attempts, 10);
        assert_eq!(ok.per_try_timeout, Some(Duration::from_millis(150)));
        assert_eq!(
            ok.backoff,
            Backoff {
                base: Duration::from_millis(10),
                max: Duration::from_secs(1)
            }
        );
        assert_eq!(
            RetryPolicy::compile("r", &config(1, None, None))
                .unwrap()
                .backoff,
            Backoff {
                base: DEFAULT_BACKOFF_BASE,
                max: DEFAULT_BACKOFF_MAX
            }
        );
    }

    #[test]
    fn only_idempotent_methods_are_retried_unless_allowed() {
        let policy = compile(&[]).unwrap();
        for method in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(policy.may_retry(&method.parse().unwrap()), "{method}");
        }
        for method in ["POST", "PATCH", "CONNECT", "PURGE"] {
            assert!(!policy.may_retry(&method.parse().unwrap()), "{method}");
        }
        let allowed = RetryPolicy {
            allow_non_idempotent: true,
            ..policy
        };
        assert!(allowed.may_retry(&Method::POST));
        assert!(allowed.may_retry(&Method::PATCH));
    }

    #[test]
    fn full_jitter_stays_within_the_growing_ceiling() {
        let (base, max) = (Duration::from_millis(25), Duration::from_millis(250));
        // The bounds at the ends of the unit interval.
        assert_eq!(full_jitter(base, max, 1, 0.0), Duration::ZERO);
        assert_eq!(full_jitter(base, max, 1, 1.0), base);
        assert_eq!(full_jitter(base, max, 3, 1.0), Duration::from_millis(100));
        assert_eq!(full_jitter(base, max, 5, 1.0), max, "capped: 400ms > max");
        assert_eq!(full_jitter(base, max, u32::MAX, 1.0), max, "no overflow");
        assert_eq!(full_jitter(base, max, 0, 1.0), base);

        let samples = 20_000;
        let mut previous_mean = Duration::ZERO;
        for retry in 1..=6u32 {
            let ceiling = (base * 2u32.pow(retry - 1)).min(max);
            let pauses: Vec<Duration> = (0..samples)
                .map(|_| Backoff { base, max }.pause(retry))
                .collect();
            assert!(pauses.iter().all(|p| *p <= ceiling), "retry {retry}");
            let mean = pauses.iter().sum::<Duration>() / samples;
            // Uniform on [0, ceiling]: the mean is half the ceiling (the standard
            // error is under 0.5% of the ceiling here), and the spread reaches both
            // ends.
            let half = ceiling.as_secs_f64() / 2.0;
            assert!(
                (mean.as_secs_f64() - half).abs() < half * 0.05,
                "retry {retry}: mean {mean:?}, ceiling {ceiling:?}"
            );
            assert!(pauses.iter().any(|p| *p < ceiling / 10), "retry {retry}");
            assert!(
                pauses.iter().any(|p| *p > ceiling * 9 / 10),
                "retry {retry}"
            );
            // The pause grows until the cap, then stays.
            if retry <= 4 {
                assert!(mean > previous_mean, "retry {retry}");
            }
            previous_mean = mean;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_backoff_pause_ends_at_the_deadline_when_that_comes_first() {
        let start = tokio::time::Instant::now();
        assert!(sleep_unless_late(Duration::from_millis(80), None).await);
        assert_eq!(start.elapsed(), Duration::from_millis(80));

        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_millis(30);
        assert!(!sleep_unless_late(Duration::from_millis(80), Some(deadline)).await);
        assert_eq!(start.elapsed(), Duration::from_millis(30));

        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_secs(1);
        assert!(sleep_unless_late(Duration::from_millis(80), Some(deadline)).await);
        assert_eq!(start.elapsed(), Duration::from_millis(80));
    }

    fn budget(ratio: f64, floor: u32, epoch: Instant) -> RetryBudget {
        RetryBudget {
            ratio,
            min_retries_per_second: floor,
            window: Arc::new(BudgetWindow::new(epoch)),
        }
    }

    /// Retries taken of `wanted`, at `at`.
    fn take(budget: &RetryBudget, wanted: u32, at: Instant) -> u32 {
        (0..wanted).filter(|_| budget.try_withdraw(at)).count() as u32
    }

    #[test]
    fn the_budget_is_a_share_of_recent_requests_plus_a_floor() {
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);

        // No floor: 20% of the requests in the window.
        let b = budget(0.2, 0, t0);
        assert_eq!(take(&b, 5, s(0.0)), 0, "nothing sent, nothing to retry");
        for _ in 0..100 {
            b.deposit(s(0.5));
        }
        assert_eq!(take(&b, 50, s(0.5)), 20);
        // More requests later in the window add room; the 20 taken still count.
        for _ in 0..50 {
            b.deposit(s(4.2));
        }
        assert_eq!(take(&b, 50, s(4.5)), 10, "0.2 x 150 - 20");
        // 10 s after the first bucket it has left the window: its 100 requests and
        // 20 retries no longer count, the 50 requests of second 4 still do.
        assert_eq!(take(&b, 50, s(10.0)), 0, "0.2 x 50 - 10");
        for _ in 0..5 {
            b.deposit(s(13.9));
        }
        assert_eq!(take(&b, 50, s(13.9)), 1, "0.2 x 55 - 10: second 4 is in");
        assert_eq!(take(&b, 50, s(14.0)), 0, "0.2 x 5 - 1: second 4 has left");
        for _ in 0..10 {
            b.deposit(s(15.5));
        }
        assert_eq!(take(&b, 50, s(15.5)), 2, "0.2 x 15 - 1");

        // The floor: minRetriesPerSecond x the 10 s window, even with no requests.
        let b = budget(0.2, 10, t0);
        assert_eq!(take(&b, 500, s(0.0)), 100);
        assert_eq!(take(&b, 500, s(9.9)), 0, "the window still holds 100");
        assert_eq!(take(&b, 500, s(10.0)), 100, "second 0 has left the window");

        // Both: 0.2 x 300 + 10 x 10.
        let b = budget(0.2, 10, t0);
        for i in 0..300 {
            b.deposit(s(f64::from(i) / 100.0));
        }
        assert_eq!(take(&b, 1000, s(3.0)), 160);

        // Ratio 1 and no floor: one retry per request.
        let b = budget(1.0, 0, t0);
        b.deposit(s(0.0));
        assert_eq!(take(&b, 3, s(0.0)), 1);
    }

    #[test]
    fn racing_withdrawals_never_overdraw_the_budget() {
        let b = budget(0.0, 5, Instant::now());
        let at = Instant::now();
        let taken: u32 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| take(&b, 100, at))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 50);
    }

    #[test]
    fn budget_config_is_checked_and_its_window_carried_over() {
        let e = RetryBudget::compile(
            "services.web.retryBudget",
            Some(&RetryBudgetConfig {
                ratio: 1.5,
                min_retries_per_second: 1,
            }),
            None,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "services.web.retryBudget.ratio: must be between 0 and 1, not 1.5"
        );
        let nan = RetryBudgetConfig {
            ratio: f64::NAN,
            min_retries_per_second: 1,
        };
        assert!(RetryBudget::compile("b", Some(&nan), None).is_err());

        let default = RetryBudget::compile("b", None, None).unwrap();
        assert_eq!((default.ratio, default.min_retries_per_second), (0.2, 10));
        let now = Instant::now();
        assert_eq!(take(&default, 200, now), 100);
        // A new config of the same destination keeps counting in the same window,
        // with its own ratio and floor.
        let next = RetryBudget::compile(
            "b",
            Some(&RetryBudgetConfig {
                ratio: 0.2,
                min_retries_per_second: 11,
            }),
            Some(default.window().clone()),
        )
        .unwrap();
        assert_eq!(take(&next, 200, now), 10);
    }

    // === replay ===

    type Sent = Result<Frame<Bytes>, std::convert::Infallible>;
    type Source = http_body_util::StreamBody<tokio_stream::wrappers::ReceiverStream<Sent>>;

    /// A client body the test feeds frame by frame.
    fn source() -> (tokio::sync::mpsc::Sender<Sent>, Source) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        (tx, body)
    }

    async fn send(tx: &tokio::sync::mpsc::Sender<Sent>, data: &'static [u8]) {
        tx.send(Ok(Frame::data(Bytes::from_static(data))))
            .await
            .unwrap();
    }

    async fn next(body: &mut ReplayBody<Source>) -> Option<Result<Frame<Bytes>, ReplayError>> {
        use http_body_util::BodyExt;
        tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a frame or the end, not a hang")
    }

    async fn data(body: &mut ReplayBody<Source>) -> Bytes {
        next(body).await.unwrap().unwrap().into_data().unwrap()
    }

    /// Everything left of `body`: its data, and its trailers if any.
    async fn rest(body: &mut ReplayBody<Source>) -> (Vec<u8>, Option<HeaderMap>) {
        let (mut bytes, mut trailers) = (Vec::new(), None);
        while let Some(frame) = next(body).await {
            match frame.unwrap().into_data() {
                Ok(data) => bytes.extend_from_slice(&data),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        (bytes, trailers)
    }

    #[tokio::test]
    async fn a_retry_replays_what_was_read_then_reads_on() {
        let (tx, source) = source();
        let (replay, mut first) = Replay::new(source);
        send(&tx, b"one ").await;
        send(&tx, b"two ").await;
        assert_eq!(data(&mut first).await, "one ");
        assert_eq!(data(&mut first).await, "two ");
        assert!(!first.is_end_stream());

        // The first try failed half way: the second gets the same bytes, then the rest.
        assert!(replay.can_replay());
        let mut second = replay.next_body();
        assert_eq!(second.size_hint().lower(), 8, "the kept bytes");
        assert_eq!(data(&mut second).await, "one ");
        assert!(matches!(
            next(&mut first).await,
            Some(Err(ReplayError::Superseded))
        ));
        assert_eq!(data(&mut second).await, "two ");
        send(&tx, b"three").await;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        tx.send(Ok(Frame::trailers(trailers.clone())))
            .await
            .unwrap();
        drop(tx);
        let (bytes, got) = rest(&mut second).await;
        assert_eq!(bytes, b"three");
        assert_eq!(got.as_ref(), Some(&trailers));
        assert!(second.is_end_stream());

        // A third try, once the client's body is done, is all replay.
        let mut third = replay.next_body();
        assert!(!third.is_end_stream());
        let (bytes, got) = rest(&mut third).await;
        assert_eq!(bytes, b"one two three");
        assert_eq!(got, Some(trailers));
        assert!(third.is_end_stream());
    }

    #[tokio::test]
    async fn an_empty_body_ends_at_once_on_every_try() {
        let (replay, first) = Replay::new(http_body_util::Empty::<Bytes>::new());
        assert!(first.is_end_stream());
        drop(first);
        let second = replay.next_body();
        assert!(second.is_end_stream());
        assert_eq!(second.size_hint().exact(), Some(0));
    }

    #[tokio::test]
    async fn a_body_that_outgrows_the_limit_is_sent_whole_once() {
        let (tx, source) = source();
        let (replay, mut first) = Replay::new(source);
        let chunk: &'static [u8] = &[7u8; 16 * 1024];
        let feeder = tokio::spawn(async move {
            for _ in 0..6 {
                send(&tx, chunk).await;
            }
        });
        let mut bytes = Vec::new();
        for i in 0..6 {
            bytes.extend_from_slice(&data(&mut first).await);
            // 64 KiB still fit; the fifth chunk does not.
            assert_eq!(replay.can_replay(), i < 4, "after chunk {i}");
        }
        feeder.await.unwrap();
        let (tail, _) = rest(&mut first).await;
        assert!(tail.is_empty());
        assert_eq!(bytes.len(), 6 * chunk.len(), "nothing lost or cut");
        assert!(replay.recording.lock().chunks.is_empty(), "nothing kept");
    }

    #[tokio::test]
    async fn the_last_try_sends_what_is_kept_after_retries_end() {
        let (tx, source) = source();
        let (replay, mut first) = Replay::new(source);
        send(&tx, b"kept ").await;
        assert_eq!(data(&mut first).await, "kept ");
        let mut last = replay.next_body();
        // The retry loop is over (the last try answered before reading its body).
        drop(replay);
        send(&tx, b"streamed").await;
        drop(tx);
        let (bytes, _) = rest(&mut last).await;
        assert_eq!(bytes, b"kept streamed");
        assert!(last.recording.lock().chunks.is_empty(), "freed once sent");
    }

    #[tokio::test]
    async fn a_client_body_error_ends_replay() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let source =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let (replay, mut first) = Replay::new(source);
        tx.send(Err(std::io::Error::other("client went away")))
            .await
            .unwrap();
        use http_body_util::BodyExt;
        let error = first.frame().await.unwrap().unwrap_err();
        assert!(error.to_string().contains("client went away"), "{error}");
        assert!(!replay.can_replay());
    }

    #[test]
    fn a_route_with_bad_retries_refuses_the_config() {
        use super::super::destinations::Destinations;
        use trellis_api::config::{ProxyConfig, RouteConfig, ServiceConfig};

        let route = |attempts| RouteConfig {
            name: "r".into(),
            retries: Some(RetriesConfig {
                attempts,
                per_try_timeout: None,
                on: vec![],
                backoff: None,
                allow_non_idempotent: false,
            }),
            ..RouteConfig::default()
        };
        let mut config = ProxyConfig::default();
        config.services.insert(
            "web".into(),
            ServiceConfig {
                routes: vec![route(2), route(0)],
                ..ServiceConfig::default()
            },
        );
        let creds = trellis_ca::Credentials::new(Default::default());
        let e = Destinations::compile(config, &creds)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("services.web.routes[1].retries.attempts: must be between 1 and 10"),
            "{e}"
        );
    }

    #[test]
    fn a_push_keeps_the_budget_of_a_destination_that_stays() {
        use super::super::destinations::Destinations;
        use trellis_api::config::{ProxyConfig, ServiceConfig};
        use trellis_ca::Credentials;

        let creds = Credentials::new(Default::default());
        let config = |budget: Option<RetryBudgetConfig>| {
            let mut config = ProxyConfig::default();
            for name in ["web", "api"] {
                config.services.insert(
                    name.into(),
                    ServiceConfig {
                        retry_budget: budget.clone(),
                        ..ServiceConfig::default()
                    },
                );
            }
            config
        };
        let first = Destinations::compile(config(None), &creds).unwrap();
        let window = |d: &Destinations, name: &str| {
            let req = http::Request::get("/").body(()).unwrap();
            let destination = d.get(name).unwrap();
            destination.route(&req).1.budget.window().clone()
        };
        let mut next_config = config(Some(RetryBudgetConfig {
            ratio: 0.5,
            min_retries_per_second: 1,
        }));
        next_config.services.remove("api");
        next_config
            .services
            .insert("new".into(), ServiceConfig::default());
        let next = first.compile_next(next_config, &creds).unwrap();
        assert!(Arc::ptr_eq(&window(&first, "web"), &window(&next, "web")));
        assert!(!Arc::ptr_eq(&window(&first, "api"), &window(&next, "new")));

        let mut bad = config(None);
        bad.services.get_mut("api").unwrap().retry_budget = Some(RetryBudgetConfig {
            ratio: -0.1,
            min_retries_per_second: 0,
        });
        let e = first.compile_next(bad, &creds).unwrap_err().to_string();
        assert!(
            e.starts_with("services.api.retryBudget.ratio: must be between 0 and 1"),
            "{e}"
        );
    }
}
