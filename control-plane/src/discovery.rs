//! The Discovery service: a subscribed sidecar is registered as an endpoint of its
//! service and gets its group's config on every change; its ACKs and NACKs are kept
//! for `trellisctl get proxies`. The caller's SVID decides who it is: a Hello that
//! claims another service is refused.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use trellis_api::CONFIG_CHUNK_BYTES;
use trellis_api::discovery::v1::{
    Ack, ConfigPush, Heartbeat, Hello, Nack, ReportRequest, ReportResponse, RouteStats,
    ShadowStats, SubscribeRequest, discovery_server::Discovery, subscribe_request::Kind,
};
use trellis_ca::{SpiffeId, TrustDomain};

use crate::{
    compiler::Compiler,
    grpc_tls::Caller,
    registry::{Group, ProxyId, ProxyInfo, Registry},
    reports::Reports,
    telemetry,
};

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct DiscoveryService {
    trust_domain: TrustDomain,
    registry: Arc<Registry>,
    compiler: Arc<Compiler>,
    /// Where the sidecars' traffic reports go.
    reports: Arc<Reports>,
    /// A proxy whose heartbeats stop for this long leaves the registry.
    heartbeat_timeout: Duration,
    /// Streams pushing a config at once. Each push is encoded into its stream's own
    /// buffers; letting a thousand run together makes a thousand copies at once.
    pushing: Arc<Semaphore>,
    /// Ends every session when the control plane stops, so the server drains at once.
    shutdown: CancellationToken,
}

/// How many streams may be sending a config at the same time.
const CONCURRENT_PUSHES: usize = 64;

impl DiscoveryService {
    pub fn new(
        trust_domain: TrustDomain,
        registry: Arc<Registry>,
        compiler: Arc<Compiler>,
        reports: Arc<Reports>,
        heartbeat_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            trust_domain,
            registry,
            compiler,
            reports,
            heartbeat_timeout,
            pushing: Arc::new(Semaphore::new(CONCURRENT_PUSHES)),
            shutdown,
        }
    }

    /// The caller must hold an SVID of this mesh for exactly `service` in `namespace`.
    fn authorize(
        &self,
        caller: Option<&Caller>,
        service: &str,
        namespace: &str,
    ) -> Result<SpiffeId, Status> {
        let Some(Caller(Some(id))) = caller.cloned() else {
            return Err(Status::unauthenticated(
                "Discovery needs the sidecar's SVID in the TLS handshake; certify first",
            ));
        };
        let expected = format!(
            "spiffe://{}/ns/{namespace}/sa/{service}",
            self.trust_domain.as_str()
        );
        if id.as_str() != expected {
            return Err(Status::permission_denied(format!(
                "the caller is {id}, which may not speak for service {service:?} in namespace \
                 {namespace:?} ({expected})"
            )));
        }
        Ok(id)
    }
}

type PushStream = Pin<Box<dyn Stream<Item = Result<ConfigPush, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type SubscribeStream = PushStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        // Nothing is read from a caller without an SVID of this mesh.
        if !matches!(caller, Some(Caller(Some(_)))) {
            return Err(Status::unauthenticated(
                "Discovery needs the sidecar's SVID in the TLS handshake; certify first",
            ));
        }
        let mut incoming = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, incoming.message()).await {
            Ok(Ok(Some(SubscribeRequest {
                kind: Some(Kind::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument(
                    "the first message of a subscription must be a Hello",
                ));
            }
            Ok(Ok(None)) => return Err(Status::cancelled("the stream ended before a Hello")),
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no Hello within {HELLO_TIMEOUT:?}"
                )));
            }
        };
        let Hello {
            service,
            namespace,
            instance,
            labels,
            inbound_address,
            healthy,
            proxy_version,
        } = hello;
        let identity = self.authorize(caller.as_ref(), &service, &namespace)?;
        check_hello_sizes(&instance, &labels)?;
        let address: SocketAddr = inbound_address.parse().map_err(|e| {
            Status::invalid_argument(format!("hello.inbound_address {inbound_address:?}: {e}"))
        })?;
        if address.ip().is_unspecified() || address.port() == 0 {
            return Err(Status::invalid_argument(format!(
                "hello.inbound_address {address} is not an address peers can dial"
            )));
        }
        let instance = if instance.is_empty() {
            format!("{service}-{address}")
        } else {
            instance
        };
        let group = Group {
            service: service.clone(),
            namespace: namespace.clone(),
        };
        let snapshots = self.compiler.watch(&group);
        let info = ProxyInfo {
            service,
            namespace,
            instance,
            identity,
            address,
            labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
            healthy,
            proxy_version,
        };
        tracing::info!(
            service = info.service,
            namespace = info.namespace,
            instance = info.instance,
            address = %info.address,
            healthy,
            "proxy subscribed"
        );
        let proxy = self.registry.join(info.clone());
        // One push at a time: tonic encodes every ready message into one buffer that its
        // stream keeps for life, so a deeper queue means a bigger buffer per proxy.
        let (tx, rx) = mpsc::channel(1);
        let session = Session {
            proxy,
            info,
            registry: self.registry.clone(),
            heartbeat_timeout: self.heartbeat_timeout,
            pushing: self.pushing.clone(),
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(session.run(incoming, snapshots, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let (service, namespace) = {
            let r = request.get_ref();
            (r.service.clone(), r.namespace.clone())
        };
        self.authorize(request.extensions().get::<Caller>(), &service, &namespace)?;
        let report = request.into_inner();
        check_report(&report).map_err(Status::invalid_argument)?;
        self.reports.add(&namespace, &report, Instant::now());
        metrics::counter!(telemetry::REPORTS).increment(1);
        Ok(Response::new(ReportResponse {}))
    }
}

/// Limits on one report: far above what a sidecar's config produces in a window, far
/// below what would let one sidecar crowd the statistics' memory.
const MAX_REPORT_ENTRIES: usize = 10_000;
const MAX_REPORT_MISMATCHES: usize = 32;
const MAX_LATENCY_BOUNDS: usize = 64;
const MAX_NAME_BYTES: usize = 253;

/// A report whose numbers cannot be true or whose size is out of bounds is refused
/// whole, with the field path of the first problem.
fn check_report(report: &ReportRequest) -> Result<(), String> {
    for (field, len) in [
        ("routes", report.routes.len()),
        ("shadows", report.shadows.len()),
    ] {
        if len > MAX_REPORT_ENTRIES {
            return Err(format!(
                "{field}: {len} entries; at most {MAX_REPORT_ENTRIES} per report"
            ));
        }
    }
    for (index, route) in report.routes.iter().enumerate() {
        check_route(route).map_err(|e| format!("routes[{index}].{e}"))?;
    }
    for (index, shadow) in report.shadows.iter().enumerate() {
        check_shadow(shadow).map_err(|e| format!("shadows[{index}].{e}"))?;
    }
    Ok(())
}

/// A name a report files counts under: present and of a sane length.
fn check_name(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{field}: {:?} must be 1 to {MAX_NAME_BYTES} bytes",
            value.chars().take(64).collect::<String>()
        ));
    }
    Ok(())
}

fn check_route(route: &RouteStats) -> Result<(), String> {
    check_name("destination", &route.destination)?;
    check_name("route", &route.route)?;
    check_name("backend", &route.backend)?;
    if route.successes > route.requests {
        return Err(format!(
            "successes: {} successes out of {} requests",
            route.successes, route.requests
        ));
    }
    let (bounds, counts) = (&route.latency_bounds_seconds, &route.latency_bucket_counts);
    if bounds.len() != counts.len() {
        return Err(format!(
            "latency_bucket_counts: {} latency bounds but {} bucket counts",
            bounds.len(),
            counts.len()
        ));
    }
    if bounds.len() > MAX_LATENCY_BOUNDS {
        return Err(format!(
            "latency_bounds_seconds: {} bounds; at most {MAX_LATENCY_BOUNDS}",
            bounds.len()
        ));
    }
    let mut previous: Option<(f64, u64)> = None;
    for (i, (&bound, &count)) in bounds.iter().zip(counts).enumerate() {
        if !bound.is_finite() || bound < 0.0 {
            return Err(format!(
                "latency_bounds_seconds[{i}]: {bound} is not a finite number of seconds ≥ 0"
            ));
        }
        if let Some((previous_bound, previous_count)) = previous {
            if bound <= previous_bound {
                return Err(format!(
                    "latency_bounds_seconds[{i}]: {bound} does not exceed the bound before it \
                     ({previous_bound})"
                ));
            }
            if count < previous_count {
                return Err(format!(
                    "latency_bucket_counts[{i}]: {count} is less than the count before it \
                     ({previous_count}); counts are cumulative"
                ));
            }
        }
        if count > route.requests {
            return Err(format!(
                "latency_bucket_counts[{i}]: {count} is more than the {} requests",
                route.requests
            ));
        }
        previous = Some((bound, count));
    }
    Ok(())
}

fn check_shadow(shadow: &ShadowStats) -> Result<(), String> {
    check_name("destination", &shadow.destination)?;
    check_name("route", &shadow.route)?;
    check_name("shadow", &shadow.shadow)?;
    let recent = shadow.recent.len();
    if recent > MAX_REPORT_MISMATCHES {
        return Err(format!(
            "recent: {recent} mismatches; at most {MAX_REPORT_MISMATCHES}"
        ));
    }
    // Each kept mismatch was counted in the same window.
    let mismatches = shadow
        .status_mismatches
        .saturating_add(shadow.body_mismatches);
    if recent as u64 > mismatches {
        return Err(format!(
            "recent: {recent} mismatches listed but {mismatches} counted \
             (status_mismatches + body_mismatches)"
        ));
    }
    Ok(())
}

/// Limits on what a Hello may carry: its labels end up in every proxy's config.
const MAX_LABELS: usize = 64;
const MAX_LABEL_BYTES: usize = 253;
const MAX_INSTANCE_BYTES: usize = 253;
/// NACK texts kept for `get proxies` are cut to this.
pub const MAX_NACK_BYTES: usize = 1024;

fn check_hello_sizes(
    instance: &str,
    labels: &std::collections::HashMap<String, String>,
) -> Result<(), Status> {
    if instance.len() > MAX_INSTANCE_BYTES {
        return Err(Status::invalid_argument(format!(
            "hello.instance is {} bytes; at most {MAX_INSTANCE_BYTES}",
            instance.len()
        )));
    }
    if labels.len() > MAX_LABELS {
        return Err(Status::invalid_argument(format!(
            "hello.labels has {} labels; at most {MAX_LABELS}",
            labels.len()
        )));
    }
    if let Some((k, _)) = labels
        .iter()
        .find(|(k, v)| k.is_empty() || k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES)
    {
        return Err(Status::invalid_argument(format!(
            "hello.labels: key {:?} or its value is empty or longer than {MAX_LABEL_BYTES} bytes",
            k.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

/// Sends `snapshot` as pushes of at most `CONFIG_CHUNK_BYTES`, each a slice of the
/// shared encoding (no copy).
async fn send_in_pieces(
    tx: &mpsc::Sender<Result<ConfigPush, Status>>,
    snapshot: &crate::compiler::Snapshot,
) -> Result<(), ()> {
    let json = &snapshot.json;
    let mut start = 0;
    loop {
        let end = (start + CONFIG_CHUNK_BYTES).min(json.len());
        let push = ConfigPush {
            version: snapshot.version.clone(),
            config_json: json.slice(start..end),
            more: end < json.len(),
        };
        tx.send(Ok(push)).await.map_err(|_| ())?;
        if end == json.len() {
            return Ok(());
        }
        start = end;
    }
}

/// One subscribed proxy: pushes its group's snapshots, reads its answers, and takes it
/// out of the registry when the stream ends or its heartbeats stop.
struct Session {
    proxy: ProxyId,
    info: ProxyInfo,
    registry: Arc<Registry>,
    heartbeat_timeout: Duration,
    pushing: Arc<Semaphore>,
    shutdown: CancellationToken,
}

impl Session {
    async fn run(
        self,
        mut incoming: Streaming<SubscribeRequest>,
        mut snapshots: tokio::sync::watch::Receiver<Option<Arc<crate::compiler::Snapshot>>>,
        tx: mpsc::Sender<Result<ConfigPush, Status>>,
    ) {
        let mut deadline = tokio::time::Instant::now() + self.heartbeat_timeout;
        // The snapshot present at subscribe time is sent at once.
        snapshots.mark_changed();
        let mut sent: Option<(String, Instant)> = None;
        let reason = loop {
            tokio::select! {
                // Answers first: after a long push, queued heartbeats must count
                // before the deadline is looked at.
                biased;
                message = incoming.message() => match message {
                    Ok(Some(SubscribeRequest { kind: Some(kind) })) => {
                        deadline = tokio::time::Instant::now() + self.heartbeat_timeout;
                        self.answer(kind, &sent);
                    }
                    Ok(Some(SubscribeRequest { kind: None })) => {}
                    Ok(None) => break "the proxy closed its stream",
                    Err(_) => break "the proxy's stream failed",
                },
                () = self.shutdown.cancelled() => {
                    let _ = tx.try_send(Err(Status::unavailable("the control plane is shutting down")));
                    break "the control plane is shutting down";
                }
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break "the control plane is shutting down";
                    }
                    let Some(snapshot) = snapshots.borrow_and_update().clone() else { continue };
                    // A proxy that stops reading must not hold a push slot, or its
                    // place in the registry, for ever.
                    let push = async {
                        let _permit = self.pushing.acquire().await.map_err(|_| ())?;
                        send_in_pieces(&tx, &snapshot).await
                    };
                    match tokio::time::timeout(self.heartbeat_timeout, push).await {
                        Ok(Ok(())) => {}
                        Ok(Err(())) => break "the proxy went away",
                        Err(_) => break "it stopped reading its config",
                    }
                    metrics::counter!(telemetry::PUSHES).increment(1);
                    self.registry.pushed(self.proxy, &snapshot.version);
                    sent = Some((snapshot.version.clone(), Instant::now()));
                }
                () = tokio::time::sleep_until(deadline) => {
                    let _ = tx.try_send(Err(Status::deadline_exceeded(format!(
                        "no heartbeat for {:?}", self.heartbeat_timeout
                    ))));
                    break "its heartbeats stopped";
                }
                () = tx.closed() => break "the proxy went away",
            }
        };
        self.registry.leave(self.proxy);
        tracing::info!(
            service = self.info.service,
            instance = self.info.instance,
            reason,
            "proxy left"
        );
    }

    fn answer(&self, kind: Kind, sent: &Option<(String, Instant)>) {
        let latency = |version: &str| {
            if let Some((sent_version, at)) = sent
                && sent_version == version
            {
                metrics::histogram!(telemetry::PUSH_LATENCY).record(at.elapsed().as_secs_f64());
            }
        };
        match kind {
            Kind::Ack(Ack { version }) => {
                latency(&version);
                self.registry.acked(self.proxy, &version);
                tracing::debug!(instance = self.info.instance, version, "config ACKed");
            }
            Kind::Nack(Nack { version, error }) => {
                latency(&version);
                metrics::counter!(telemetry::NACKS).increment(1);
                tracing::warn!(
                    service = self.info.service,
                    instance = self.info.instance,
                    version,
                    error,
                    "config NACKed; the proxy keeps its last good config"
                );
                self.registry.nacked(self.proxy, &version, &error);
            }
            Kind::Heartbeat(Heartbeat { healthy }) => self.registry.set_health(self.proxy, healthy),
            Kind::Hello(_) => {
                tracing::debug!(instance = self.info.instance, "a second Hello is ignored");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use trellis_api::discovery::v1::ShadowMismatch;

    use super::*;

    fn route() -> RouteStats {
        RouteStats {
            destination: "pay".into(),
            route: "default".into(),
            backend: "v1".into(),
            requests: 10,
            successes: 9,
            latency_bounds_seconds: vec![0.01, 0.1],
            latency_bucket_counts: vec![4, 10],
        }
    }

    fn shadow() -> ShadowStats {
        ShadowStats {
            destination: "pay".into(),
            route: "pay".into(),
            shadow: "v2".into(),
            mirrored: 5,
            status_mismatches: 1,
            recent: vec![ShadowMismatch::default()],
            ..ShadowStats::default()
        }
    }

    fn with(routes: Vec<RouteStats>, shadows: Vec<ShadowStats>) -> ReportRequest {
        ReportRequest {
            routes,
            shadows,
            ..ReportRequest::default()
        }
    }

    #[test]
    fn reports_with_impossible_numbers_or_sizes_are_refused_by_field() {
        assert_eq!(check_report(&with(vec![route()], vec![shadow()])), Ok(()));
        let refused = |report: ReportRequest| check_report(&report).unwrap_err();

        let mut r = route();
        r.successes = 11;
        assert!(refused(with(vec![route(), r], vec![])).starts_with("routes[1].successes:"));
        let mut r = route();
        r.latency_bucket_counts = vec![10, 4];
        let error = refused(with(vec![r], vec![]));
        assert!(
            error.starts_with("routes[0].latency_bucket_counts[1]:"),
            "{error}"
        );
        let mut r = route();
        r.latency_bounds_seconds = vec![0.1, 0.1];
        let error = refused(with(vec![r], vec![]));
        assert!(
            error.starts_with("routes[0].latency_bounds_seconds[1]:"),
            "{error}"
        );
        let mut r = route();
        r.latency_bounds_seconds = vec![f64::NAN, 0.1];
        assert!(refused(with(vec![r], vec![])).contains("not a finite number"));
        let mut r = route();
        r.latency_bucket_counts = vec![4, 11];
        assert!(refused(with(vec![r], vec![])).contains("more than the 10 requests"));
        let mut r = route();
        r.latency_bucket_counts.pop();
        assert!(refused(with(vec![r], vec![])).contains("2 latency bounds but 1 bucket counts"));
        let mut r = route();
        r.backend = String::new();
        assert!(refused(with(vec![r], vec![])).starts_with("routes[0].backend:"));

        let error = refused(with(vec![route(); MAX_REPORT_ENTRIES + 1], vec![]));
        assert!(error.starts_with("routes: 10001 entries"), "{error}");
        let error = refused(with(vec![], vec![shadow(); MAX_REPORT_ENTRIES + 1]));
        assert!(error.starts_with("shadows: 10001 entries"), "{error}");

        let mut s = shadow();
        s.status_mismatches = 40;
        s.recent = vec![ShadowMismatch::default(); MAX_REPORT_MISMATCHES + 1];
        let error = refused(with(vec![], vec![shadow(), s]));
        assert!(
            error.starts_with("shadows[1].recent: 33 mismatches"),
            "{error}"
        );
        let mut s = shadow();
        s.status_mismatches = 0;
        let error = refused(with(vec![], vec![s]));
        assert!(
            error.contains("1 mismatches listed but 0 counted"),
            "{error}"
        );
    }
}
