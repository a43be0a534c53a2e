//! Distributed traces: one span per request hop, W3C `traceparent` in and out, and
//! export to an OTLP/gRPC collector (docs/observability.md).
//!
//! Each hop reads the caller's `traceparent` as its parent, makes a span of its own
//! and writes that span's `traceparent` into the request it passes on: the inbound
//! side's SERVER span becomes the parent the app forwards, so the app's next call is
//! the child of the hop that called it. The gateway's SERVER span starts the trace
//! for an external request that brings none.
//!
//! Sampling is parent-based: a caller's sampled flag is kept; a new trace is sampled
//! with the configured ratio, decided from its trace id as OpenTelemetry's
//! `TraceIdRatioBased` does, so every hop of a trace agrees.
//!
//! Export never waits on the collector: a finished span is `try_send`-ed into a
//! bounded queue and a background task sends batches with `opentelemetry-otlp`. A
//! full queue, a failed export and spans left when export is turned off are counted
//! in `trellis_trace_spans_dropped_total` and otherwise cost nothing.

use std::{
    borrow::Cow,
    fmt::Write as _,
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue, StatusCode};
use opentelemetry::{
    InstrumentationScope,
    trace::{SpanContext, SpanId, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use trellis_api::config::TracingConfig;

pub use opentelemetry::{
    KeyValue,
    trace::{Event, SpanKind},
};

use crate::{http::TRACEPARENT, outbound::destinations::Destinations};

/// Spans that never reached a collector, by reason.
pub const SPANS_DROPPED: &str = "trellis_trace_spans_dropped_total";
/// Spans a collector accepted.
pub const SPANS_EXPORTED: &str = "trellis_trace_spans_exported_total";
/// The environment variable read when the config names no collector.
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Finished spans waiting for export. Room for a few seconds of a busy proxy; past
/// it spans are dropped rather than held.
pub const QUEUE_CAPACITY: usize = 2048;
const MAX_BATCH: usize = 512;
/// How long the exporter lets a batch fill after its first span.
const BATCH_DELAY: Duration = Duration::from_millis(200);
/// One export, its retries included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a span was dropped (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The export queue was full.
    QueueFull,
    /// The collector did not take the batch (down, refused, timed out).
    ExportFailed,
    /// No exporter: export was turned off with spans still queued, or the named
    /// endpoint could not be used (logged).
    Disabled,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ExportFailed => "export_failed",
            Self::Disabled => "disabled",
        }
    }
}

/// HELP lines of the trace metrics.
pub fn describe() {
    metrics::describe_counter!(
        SPANS_DROPPED,
        "Spans not exported, by reason: queue_full (the bounded export queue was full), export_failed (the collector did not take them) or disabled (no exporter: export turned off, or an unusable endpoint)"
    );
    metrics::describe_counter!(SPANS_EXPORTED, "Spans the OTLP collector accepted");
}

fn count_dropped(reason: DropReason, n: usize) {
    metrics::counter!(SPANS_DROPPED, "reason" => reason.as_str()).increment(n as u64);
}

// === W3C trace context ===

/// A span's place in a trace, as `traceparent` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceContext {
    /// Parses a `traceparent`. Per W3C, a version above 00 is read as 00 (it may carry
    /// more fields after the four we know); version ff, all-zero ids and anything
    /// malformed are refused.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let is_hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let valid = is_hex(version, 2)
            && version != "ff"
            && (version != "00" || parts.next().is_none())
            && is_hex(trace, 32)
            && is_hex(parent, 16)
            && is_hex(flags, 2);
        if !valid {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(parent, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` of a request in `headers`, if there is a valid one.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(Self::parse)
    }

    /// A child of `parent` (same trace and decision, a new span id), or the root of a
    /// new trace sampled with probability `ratio`.
    pub fn child_of(parent: Option<&Self>, ratio: f64) -> Self {
        match parent {
            Some(parent) => Self {
                trace_id: parent.trace_id,
                span_id: new_span_id(),
                sampled: parent.sampled,
            },
            None => {
                let trace_id = loop {
                    let id = fastrand::u128(..);
                    if id != 0 {
                        break id;
                    }
                };
                Self {
                    trace_id,
                    span_id: new_span_id(),
                    sampled: sampled_by_ratio(trace_id, ratio),
                }
            }
        }
    }

    pub fn traceparent(&self) -> String {
        let mut out = String::with_capacity(55);
        let _ = write!(
            out,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        );
        out
    }

    fn span_context(&self, remote: bool) -> SpanContext {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            TraceId::from_bytes(self.trace_id.to_be_bytes()),
            SpanId::from_bytes(self.span_id.to_be_bytes()),
            flags,
            remote,
            TraceState::NONE,
        )
    }
}

/// A header's value as an attribute (ids are ASCII; anything else is shown lossily).
pub fn header_text(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

fn new_span_id() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

/// OpenTelemetry's `TraceIdRatioBased`: the trace id's low 8 bytes, shifted right by
/// one, under `ratio` × 2^63. Any proxy decides the same for the same trace.
pub fn sampled_by_ratio(trace_id: u128, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    ((trace_id as u64) >> 1) < bound
}

// === the bounded queue ===

/// A bounded queue that never waits: a span that finds it full is dropped and
/// counted.
#[derive(Debug)]
pub struct SpanQueue<T> {
    tx: mpsc::Sender<T>,
    dropped: AtomicU64,
}

impl<T> SpanQueue<T> {
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<T>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let queue = Self {
            tx,
            dropped: AtomicU64::new(0),
        };
        (queue, rx)
    }

    /// Queues `item`; false (and counted) when the queue is full or its reader gone.
    pub fn push(&self, item: T) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                count_dropped(DropReason::QueueFull, 1);
                false
            }
        }
    }

    /// Items refused since the queue was made.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

// === the tracer ===

/// What decides whether spans are recorded, and where they go.
#[derive(Debug)]
pub struct Tracer {
    /// True while a collector is named: only then are spans recorded.
    exporting: AtomicBool,
    ratio: AtomicU64,
    queue: OnceLock<SpanQueue<SpanData>>,
    /// Spans the collector did not take.
    export_failed: AtomicU64,
    /// Set by `start`: what `follow` needs to apply a new config's settings.
    control: OnceLock<Control>,
}

/// The settings in force and the way to the exporter task.
#[derive(Debug)]
struct Control {
    env: Option<String>,
    /// The config they were taken from, held so its address is not reused by a
    /// later one: comparing addresses is how a request tells a config is new.
    seen: ArcSwap<Destinations>,
    applied: Mutex<Settings>,
    endpoint: watch::Sender<Option<String>>,
}

static GLOBAL: Tracer = Tracer::new();

/// The process's tracer.
pub fn global() -> &'static Tracer {
    &GLOBAL
}

impl Default for Tracer {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracer {
    pub const fn new() -> Self {
        Self {
            exporting: AtomicBool::new(false),
            ratio: AtomicU64::new(1.0f64.to_bits()),
            queue: OnceLock::new(),
            export_failed: AtomicU64::new(0),
            control: OnceLock::new(),
        }
    }

    /// Applies the `tracing` settings of the config in force if it is not the one
    /// already followed: one pointer comparison per request, so a config is traced
    /// from the first request after it is swapped in (and so once it is ACKed).
    pub fn follow(&self, destinations: &Arc<Destinations>) {
        let Some(control) = self.control.get() else {
            return;
        };
        if Arc::ptr_eq(&control.seen.load(), destinations) {
            return;
        }
        control.seen.store(destinations.clone());
        let next = Settings::resolve(
            destinations.config().tracing.as_ref(),
            control.env.as_deref(),
        );
        let mut applied = control.applied.lock();
        if *applied == next {
            return;
        }
        tracing::info!(
            endpoint = next.endpoint.as_deref(),
            sampling_ratio = next.ratio,
            "tracing settings changed"
        );
        self.apply(&next);
        control.endpoint.send_if_modified(|endpoint| {
            let changed = *endpoint != next.endpoint;
            endpoint.clone_from(&next.endpoint);
            changed
        });
        *applied = next;
    }

    fn apply(&self, settings: &Settings) {
        self.set_ratio(settings.ratio);
        self.exporting
            .store(settings.endpoint.is_some(), Ordering::Relaxed);
    }

    /// The ratio new traces are sampled with; also the flag a proxy that exports
    /// nothing sets, so that apps tracing on their own keep working.
    pub fn ratio(&self) -> f64 {
        f64::from_bits(self.ratio.load(Ordering::Relaxed))
    }

    pub fn exporting(&self) -> bool {
        self.exporting.load(Ordering::Relaxed)
    }

    /// Spans refused by a full queue so far.
    pub fn queue_dropped(&self) -> u64 {
        self.queue.get().map_or(0, SpanQueue::dropped)
    }

    /// Spans the collector did not take so far.
    pub fn export_failed(&self) -> u64 {
        self.export_failed.load(Ordering::Relaxed)
    }

    fn set_ratio(&self, ratio: f64) {
        let ratio = if ratio.is_nan() {
            1.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        self.ratio.store(ratio.to_bits(), Ordering::Relaxed);
    }

    /// Takes over the queue's receiving end; the first call wins.
    fn install_queue(&self, capacity: usize) -> Option<mpsc::Receiver<SpanData>> {
        let (queue, rx) = SpanQueue::new(capacity);
        self.queue.set(queue).ok().map(|()| rx)
    }

    fn submit(&self, span: SpanData) {
        match self.queue.get() {
            Some(queue) => {
                queue.push(span);
            }
            None => count_dropped(DropReason::Disabled, 1),
        }
    }

    /// Starts this hop's span from the `traceparent` in `headers` and replaces that
    /// header with the new span's, for the next hop. `name` is only called when the
    /// span is recorded.
    pub fn start(
        &'static self,
        kind: SpanKind,
        headers: &mut HeaderMap,
        name: impl FnOnce() -> Cow<'static, str>,
    ) -> Span {
        let parent = TraceContext::from_headers(headers);
        let context = TraceContext::child_of(parent.as_ref(), self.ratio());
        if let Ok(value) = HeaderValue::from_str(&context.traceparent()) {
            headers.insert(TRACEPARENT, value);
        }
        let recording = (context.sampled && self.exporting()).then(|| {
            Box::new(Recording {
                name: name(),
                kind,
                parent: parent.map(|p| p.span_id),
                start: SystemTime::now(),
                started: Instant::now(),
                attributes: Vec::with_capacity(12),
                events: Arc::default(),
            })
        });
        Span {
            tracer: self,
            context,
            recording,
        }
    }
}

// === spans ===

/// One hop's span while its request is in flight. Ending it queues it for export;
/// dropping it unended (the client went away) queues it marked as cancelled.
#[derive(Debug)]
pub struct Span {
    tracer: &'static Tracer,
    context: TraceContext,
    recording: Option<Box<Recording>>,
}

/// What a recorded span has gathered so far.
#[derive(Debug)]
pub struct Recording {
    pub name: Cow<'static, str>,
    kind: SpanKind,
    parent: Option<u64>,
    start: SystemTime,
    started: Instant,
    pub attributes: Vec<KeyValue>,
    events: Arc<Mutex<Vec<Event>>>,
}

tokio::task_local! {
    /// The events of the span whose request the current task is handling.
    static CURRENT_EVENTS: Option<Arc<Mutex<Vec<Event>>>>;
}

/// Adds an event to the span of the request this task is handling, if it is
/// recorded; `attributes` is only called then.
pub fn event(name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
    let _ = CURRENT_EVENTS.try_with(|events| {
        if let Some(events) = events {
            let event = Event::new(name, SystemTime::now(), attributes(), 0);
            events.lock().push(event);
        }
    });
}

impl Span {
    pub fn context(&self) -> TraceContext {
        self.context
    }

    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Changes a recorded span (name, attributes); `f` is not called otherwise, so
    /// an unrecorded span allocates nothing.
    pub fn record(&mut self, f: impl FnOnce(&mut Recording)) {
        if let Some(recording) = self.recording.as_deref_mut() {
            f(recording);
        }
    }

    /// Runs `fut` with this span as the one `event` adds to.
    pub fn scope<F: Future>(&self, fut: F) -> impl Future<Output = F::Output> + use<F> {
        let events = self.recording.as_ref().map(|r| r.events.clone());
        CURRENT_EVENTS.scope(events, fut)
    }

    /// Ends the span with the response's status; a 5xx is an error, described by
    /// the mesh's `x-trellis-error` kind when it made the answer itself.
    pub fn end(mut self, status: StatusCode, mesh_error: Option<&HeaderValue>) {
        let Some(mut recording) = self.recording.take() else {
            return;
        };
        recording.attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        let error = mesh_error.and_then(|v| v.to_str().ok());
        if let Some(kind) = error {
            recording
                .attributes
                .push(KeyValue::new("trellis.error", kind.to_string()));
        }
        let outcome = if status.is_server_error() {
            Status::error(
                error.map_or_else(|| status.as_str().to_string(), |kind| kind.to_string()),
            )
        } else {
            Status::Unset
        };
        self.tracer
            .submit(finish(self.context, *recording, outcome));
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(mut recording) = self.recording.take() {
            recording
                .attributes
                .push(KeyValue::new("trellis.cancelled", true));
            let outcome = Status::error("the client went away before the response");
            self.tracer
                .submit(finish(self.context, *recording, outcome));
        }
    }
}

fn finish(context: TraceContext, recording: Recording, status: Status) -> SpanData {
    let Recording {
        name,
        kind,
        parent,
        start,
        started,
        attributes,
        events,
    } = recording;
    let mut span_events = SpanEvents::default();
    span_events.events = std::mem::take(&mut *events.lock());
    SpanData {
        span_context: context.span_context(false),
        parent_span_id: parent.map_or(SpanId::INVALID, |id| SpanId::from_bytes(id.to_be_bytes())),
        parent_span_is_remote: parent.is_some(),
        span_kind: kind,
        name,
        start_time: start,
        end_time: start + started.elapsed(),
        attributes,
        dropped_attributes_count: 0,
        events: span_events,
        links: SpanLinks::default(),
        status,
        instrumentation_scope: InstrumentationScope::default(),
    }
}

// === settings and export ===

/// Where spans go and how many new traces are recorded, from the config in force and
/// the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub endpoint: Option<String>,
    pub ratio: f64,
}

impl Settings {
    /// The config's collector, else `env` (`OTEL_EXPORTER_OTLP_ENDPOINT`); the
    /// config's ratio, else 1. An endpoint without a scheme gets `http://`.
    pub fn resolve(config: Option<&TracingConfig>, env: Option<&str>) -> Self {
        let endpoint = config
            .and_then(|c| c.otlp_endpoint.as_deref())
            .or(env)
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e.contains("://") {
                    e.to_string()
                } else {
                    format!("http://{e}")
                }
            });
        Self {
            endpoint,
            ratio: config.map_or(1.0, |c| c.sampling_ratio),
        }
    }
}

/// Who the spans are from: the OTLP resource.
#[derive(Debug, Clone)]
pub struct Origin {
    pub service: String,
    pub namespace: String,
    /// `sidecar` or `gateway`.
    pub mode: &'static str,
}

impl Origin {
    fn resource(&self) -> Resource {
        Resource::builder_empty()
            .with_service_name(self.service.clone())
            .with_attributes([
                KeyValue::new("service.namespace", self.namespace.clone()),
                KeyValue::new("trellis.proxy.mode", self.mode),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build()
    }
}

/// Starts the exporter task and applies the settings of the config in force (the
/// handlers `follow` later ones); spans are recorded from the moment a collector is
/// named. Call once, after the metrics recorder is installed.
pub fn start(origin: Origin, destinations: &Arc<Destinations>) {
    describe();
    let tracer = global();
    let Some(rx) = tracer.install_queue(QUEUE_CAPACITY) else {
        return tracing::warn!("tracing was started twice; keeping the first");
    };
    for reason in [DropReason::QueueFull, DropReason::ExportFailed] {
        count_dropped(reason, 0);
    }
    metrics::counter!(SPANS_EXPORTED).increment(0);
    let env = std::env::var(ENDPOINT_ENV).ok();
    let initial = Settings::resolve(destinations.config().tracing.as_ref(), env.as_deref());
    tracer.apply(&initial);
    let (endpoint, endpoint_rx) = watch::channel(initial.endpoint.clone());
    let control = Control {
        env,
        seen: ArcSwap::new(destinations.clone()),
        applied: Mutex::new(initial),
        endpoint,
    };
    if tracer.control.set(control).is_err() {
        return;
    }
    tokio::spawn(export_loop(tracer, rx, endpoint_rx, origin));
}

fn build_exporter(
    endpoint: &str,
    origin: &Origin,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    exporter.set_resource(&origin.resource());
    Ok(exporter)
}

/// Sends queued spans in batches to the collector `endpoint` names, rebuilding the
/// exporter when it changes. Runs until the queue's senders are gone.
async fn export_loop(
    tracer: &'static Tracer,
    mut rx: mpsc::Receiver<SpanData>,
    mut endpoint: watch::Receiver<Option<String>>,
    origin: Origin,
) {
    let scope = InstrumentationScope::builder("trellis-proxy")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let mut exporter = None;
    let mut rebuild = true;
    let mut failing = false;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if rebuild {
            rebuild = false;
            let target = endpoint.borrow_and_update().clone();
            exporter = target.as_deref().and_then(|target| {
                match build_exporter(target, &origin) {
                    Ok(exporter) => {
                        tracing::info!(endpoint = target, "exporting spans over OTLP/gRPC");
                        Some(exporter)
                    }
                    Err(error) => {
                        tracing::error!(endpoint = target, %error, "cannot export spans: they are dropped");
                        None
                    }
                }
            });
            failing = false;
        }
        tokio::select! {
            changed = endpoint.changed() => {
                if changed.is_err() {
                    return;
                }
                rebuild = true;
                continue;
            }
            received = rx.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    return;
                }
            }
        }
        // Let a busy proxy send fewer, larger batches.
        tokio::time::sleep(BATCH_DELAY).await;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
        let n = batch.len();
        let Some(exporter) = exporter.as_ref() else {
            batch.clear();
            count_dropped(DropReason::Disabled, n);
            continue;
        };
        let mut spans = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        for span in &mut spans {
            span.instrumentation_scope = scope.clone();
        }
        match exporter.export(spans).await {
            Ok(()) => {
                metrics::counter!(SPANS_EXPORTED).increment(n as u64);
                if failing {
                    failing = false;
                    tracing::info!("span export works again");
                }
            }
            Err(error) => {
                tracer.export_failed.fetch_add(n as u64, Ordering::Relaxed);
                count_dropped(DropReason::ExportFailed, n);
                // Once per outage, not once per batch.
                if !failing {
                    failing = true;
                    tracing::warn!(
                        %error,
                        endpoint = endpoint.borrow().as_deref(),
                        "span export failed; spans are dropped and counted in {SPANS_DROPPED} until it works again"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn traceparent_parses_and_formats() {
        let parsed = TraceContext::parse(&format!("00-{TRACE}-00f067aa0ba902b7-01")).unwrap();
        assert_eq!(parsed.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(parsed.span_id, 0x00f067aa0ba902b7);
        assert!(parsed.sampled);
        assert_eq!(
            parsed.traceparent(),
            format!("00-{TRACE}-00f067aa0ba902b7-01")
        );
        // Only bit 0 of the flags is the sampled flag.
        let other_flags = TraceContext::parse(&format!("00-{TRACE}-00f067aa0ba902b7-02")).unwrap();
        assert!(!other_flags.sampled);
        // A future version is read as 00, extra fields and all.
        let future = TraceContext::parse(&format!("01-{TRACE}-00f067aa0ba902b7-00-extra")).unwrap();
        assert_eq!((future.trace_id, future.sampled), (parsed.trace_id, false));

        for bad in [
            "garbage".to_string(),
            format!("00-{TRACE}-00f067aa0ba902b7"),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".into(),
            format!("00-{TRACE}-0000000000000000-01"),
            format!("ff-{TRACE}-00f067aa0ba902b7-01"),
            format!("00-{TRACE}-00f067aa0ba902b7-01-extra"),
            format!("00-{}-00f067aa0ba902b7-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-00f067aa0ba902b7-1"),
            format!("00-{TRACE}-00f067aa0ba902bz-01"),
        ] {
            assert_eq!(TraceContext::parse(&bad), None, "{bad} was accepted");
        }
    }

    #[test]
    fn a_child_continues_the_trace_and_keeps_the_decision() {
        for flag in ["01", "00"] {
            let parent =
                TraceContext::parse(&format!("00-{TRACE}-00f067aa0ba902b7-{flag}")).unwrap();
            // Even a ratio of 0 keeps a sampled parent's decision, and 1 an unsampled one's.
            for ratio in [0.0, 1.0] {
                let child = TraceContext::child_of(Some(&parent), ratio);
                assert_eq!(child.trace_id, parent.trace_id);
                assert_ne!(child.span_id, parent.span_id);
                assert_eq!(child.sampled, parent.sampled, "flag {flag}, ratio {ratio}");
                assert!(child.traceparent().ends_with(&format!("-{flag}")));
            }
        }
    }

    #[test]
    fn new_traces_are_sampled_by_ratio_from_the_trace_id() {
        let sampled = |ratio| {
            (0..10_000)
                .filter(|_| TraceContext::child_of(None, ratio).sampled)
                .count()
        };
        assert_eq!(sampled(1.0), 10_000);
        assert_eq!(sampled(0.0), 0);
        let quarter = sampled(0.25);
        assert!(
            (2_000..3_000).contains(&quarter),
            "{quarter} of 10000 at 0.25"
        );
        // The decision is the trace id's, so every proxy of the trace agrees.
        assert!(sampled_by_ratio(0x1234_u128 << 64, 0.01));
        assert!(!sampled_by_ratio(u128::from(u64::MAX), 0.99));
        assert!(!sampled_by_ratio(1, f64::NAN));
    }

    #[test]
    fn the_hop_replaces_traceparent_with_its_own_span() {
        let tracer: &'static Tracer = Box::leak(Box::new(Tracer::new()));
        let mut headers = HeaderMap::new();
        let incoming = format!("00-{TRACE}-00f067aa0ba902b7-01");
        headers.insert(TRACEPARENT, incoming.parse().unwrap());
        let span = tracer.start(SpanKind::Server, &mut headers, || "x".into());
        let out = headers[TRACEPARENT].to_str().unwrap();
        assert_eq!(out, span.context().traceparent());
        assert!(out.starts_with(&format!("00-{TRACE}-")) && out.ends_with("-01"));
        assert_ne!(out, incoming);
        // Not exporting: nothing is recorded, only propagated.
        assert!(!span.is_recording());

        // No parent, or a malformed one: a new trace, sampled at ratio 1.
        headers.insert(TRACEPARENT, "garbage".parse().unwrap());
        let span = tracer.start(SpanKind::Server, &mut headers, || "x".into());
        let out = headers[TRACEPARENT].to_str().unwrap();
        assert!(!out.contains(TRACE) && out.ends_with("-01"), "{out}");
        assert_eq!(TraceContext::parse(out), Some(span.context()));
        tracer.set_ratio(0.0);
        let span = tracer.start(SpanKind::Server, &mut HeaderMap::new(), || "x".into());
        assert!(!span.context().sampled);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (queue, mut rx) = SpanQueue::new(4);
        let accepted = (0..10).filter(|i| queue.push(*i)).count();
        assert_eq!((accepted, queue.dropped()), (4, 6));
        assert_eq!(rx.try_recv().unwrap(), 0);
        assert!(queue.push(10), "room again once the exporter took one");
        assert_eq!(queue.dropped(), 6);
        drop(rx);
        assert!(!queue.push(11), "no reader: dropped, not kept");
        assert_eq!(queue.dropped(), 7);
    }

    #[tokio::test]
    async fn recorded_spans_carry_parent_attributes_and_events() {
        let tracer: &'static Tracer = Box::leak(Box::new(Tracer::new()));
        let mut rx = tracer.install_queue(8).unwrap();
        tracer.exporting.store(true, Ordering::Relaxed);
        let mut headers = HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            format!("00-{TRACE}-00f067aa0ba902b7-01").parse().unwrap(),
        );
        let mut span = tracer.start(SpanKind::Client, &mut headers, || "GET order".into());
        span.record(|r| r.attributes.push(KeyValue::new("trellis.route", "r0")));
        span.scope(async {
            event("retry", || vec![KeyValue::new("trellis.retry.attempt", 2)]);
        })
        .await;
        // Outside the span's scope an event goes nowhere.
        event("stray", Vec::new);
        let context = span.context();
        span.end(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(&HeaderValue::from_static("bulkhead-full")),
        );
        let data = rx.try_recv().unwrap();
        assert_eq!(data.name, "GET order");
        assert_eq!(data.span_kind, SpanKind::Client);
        assert_eq!(
            data.span_context.trace_id(),
            TraceId::from_bytes(context.trace_id.to_be_bytes())
        );
        assert_eq!(
            data.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        let names: Vec<_> = data.events.iter().map(|e| e.name.as_ref()).collect();
        assert_eq!(names, ["retry"]);
        assert!(
            data.attributes
                .contains(&KeyValue::new("http.response.status_code", 503i64))
        );
        assert!(
            data.attributes
                .contains(&KeyValue::new("trellis.error", "bulkhead-full"))
        );
        assert_eq!(data.status, Status::error("bulkhead-full"));

        // A span dropped before its response is sent as cancelled, not lost.
        let span = tracer.start(SpanKind::Server, &mut HeaderMap::new(), || "POST a".into());
        drop(span);
        let data = rx.try_recv().unwrap();
        assert!(
            data.attributes
                .contains(&KeyValue::new("trellis.cancelled", true))
        );
        assert_eq!(data.parent_span_id, SpanId::INVALID);
    }

    #[tokio::test]
    async fn a_collector_that_is_down_costs_only_the_drop_count() {
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let tracer: &'static Tracer = Box::leak(Box::new(Tracer::new()));
        let rx = tracer.install_queue(4).unwrap();
        let (_endpoint_tx, endpoint_rx) = watch::channel(Some(format!("http://{closed}")));
        let origin = Origin {
            service: "test".into(),
            namespace: "default".into(),
            mode: "sidecar",
        };
        tracer.exporting.store(true, Ordering::Relaxed);
        let exporter = tokio::spawn(export_loop(tracer, rx, endpoint_rx, origin));
        let deadline = Instant::now() + Duration::from_secs(10);
        // Queue far more than fits while the first export fails: pushing never waits.
        let started = Instant::now();
        for _ in 0..100 {
            let mut span = tracer.start(SpanKind::Client, &mut HeaderMap::new(), || "x".into());
            span.record(|r| r.attributes.push(KeyValue::new("k", "v")));
            span.end(StatusCode::OK, None);
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        assert!(tracer.queue_dropped() >= 90, "{}", tracer.queue_dropped());
        // What the exporter took fails against the closed port and is counted too.
        while tracer.export_failed() + tracer.queue_dropped() < 100 {
            assert!(
                Instant::now() < deadline,
                "failed exports not counted: {} of 100 accounted for",
                tracer.export_failed() + tracer.queue_dropped()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        exporter.abort();
    }
}
