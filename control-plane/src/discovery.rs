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
use trellis_api::discovery::v1::{
    Ack, ConfigPush, Heartbeat, Hello, Nack, ReportRequest, ReportResponse, RouteStats,
    ShadowStats, SubscribeRequest, discovery_server::Discovery, subscribe_request::Kind,
};
use trellis_api::{CONFIG_CHUNK_BYTES, LATENCY_BOUNDS_SECONDS, MAX_REPORT_WINDOW_MS};
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
            admin_address,
        } = hello;
        let identity = self.authorize(caller.as_ref(), &service, &namespace)?;
        check_hello_sizes(&instance, &labels)?;
        // Empty for a gateway: listed in `get proxies`, nobody's endpoint.
        let address: Option<SocketAddr> =
            crate::registry::inbound_address(&inbound_address).map_err(Status::invalid_argument)?;
        let admin =
            crate::registry::admin_address(&admin_address).map_err(Status::invalid_argument)?;
        let instance = match (instance.is_empty(), address) {
            (false, _) => instance,
            (true, Some(address)) => format!("{service}-{address}"),
            (true, None) => {
                return Err(Status::invalid_argument(
                    "hello.instance is required when hello.inbound_address is empty",
                ));
            }
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
            admin,
        };
        tracing::info!(
            service = info.service,
            namespace = info.namespace,
            instance = info.instance,
            address = info.address.map(tracing::field::display),
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
        self.reports
            .add(&namespace, &report, Instant::now())
            .map_err(|full| Status::resource_exhausted(full.to_string()))?;
        metrics::counter!(telemetry::REPORTS).increment(1);
        Ok(Response::new(ReportResponse {}))
    }
}

/// Limits on one report: far above what a sidecar's config produces in a window, far
/// below what would let one sidecar crowd the statistics' memory.
const MAX_REPORT_ENTRIES: usize = 10_000;
const MAX_REPORT_MISMATCHES: usize = 32;
const MAX_NAME_BYTES: usize = 253;
/// Requests one entry may count per millisecond of its window: 100,000 a second, far
/// above what one sidecar sends one backend, far below what would make a forged report
/// outweigh every real one.
const MAX_REQUESTS_PER_MS: u64 = 100;

/// A report whose numbers cannot be true or whose size is out of bounds is refused
/// whole, with the field path of the first problem.
fn check_report(report: &ReportRequest) -> Result<(), String> {
    if report.window_ms == 0 || report.window_ms > MAX_REPORT_WINDOW_MS {
        return Err(format!(
            "window_ms: {} must be 1 to {MAX_REPORT_WINDOW_MS} (an hour)",
            report.window_ms
        ));
    }
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
        check_route(route, report.window_ms).map_err(|e| format!("routes[{index}].{e}"))?;
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

fn check_route(route: &RouteStats, window_ms: u32) -> Result<(), String> {
    check_name("destination", &route.destination)?;
    check_name("route", &route.route)?;
    check_name("backend", &route.backend)?;
    if route.successes > route.requests {
        return Err(format!(
            "successes: {} successes out of {} requests",
            route.successes, route.requests
        ));
    }
    let most = u64::from(window_ms).saturating_mul(MAX_REQUESTS_PER_MS);
    if route.requests > most {
        return Err(format!(
            "requests: {} in a window of {window_ms} ms; at most {most} \
             ({MAX_REQUESTS_PER_MS} per ms)",
            route.requests
        ));
    }
    // Windows add up bucket by bucket: only the bounds every sidecar uses can.
    if route.latency_bounds_seconds != LATENCY_BOUNDS_SECONDS {
        return Err(format!(
            "latency_bounds_seconds: {} must be the fixed bounds {:?}",
            describe_bounds(&route.latency_bounds_seconds),
            LATENCY_BOUNDS_SECONDS
        ));
    }
    let counts = &route.latency_bucket_counts;
    if counts.len() != LATENCY_BOUNDS_SECONDS.len() {
        return Err(format!(
            "latency_bucket_counts: {} counts for {} latency bounds",
            counts.len(),
            LATENCY_BOUNDS_SECONDS.len()
        ));
    }
    let mut previous: Option<u64> = None;
    for (i, &count) in counts.iter().enumerate() {
        if let Some(previous) = previous
            && count < previous
        {
            return Err(format!(
                "latency_bucket_counts[{i}]: {count} is less than the count before it \
                 ({previous}); counts are cumulative"
            ));
        }
        if count > route.requests {
            return Err(format!(
                "latency_bucket_counts[{i}]: {count} is more than the {} requests",
                route.requests
            ));
        }
        previous = Some(count);
    }
    Ok(())
}

/// Bounds from a report as an error shows them: the first few and how many.
fn describe_bounds(bounds: &[f64]) -> String {
    const SHOWN: usize = 4;
    let first: Vec<String> = bounds.iter().take(SHOWN).map(f64::to_string).collect();
    let more = if bounds.len() > SHOWN { ", ..." } else { "" };
    format!("{} bounds [{}{more}]", bounds.len(), first.join(", "))
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
            latency_bounds_seconds: LATENCY_BOUNDS_SECONDS.to_vec(),
            // 4 by 10 ms, all 10 by 100 ms.
            latency_bucket_counts: [0, 0, 0, 4, 4, 4, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
                .to_vec(),
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
            window_ms: 10_000,
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
        r.latency_bucket_counts[7] = 3;
        let error = refused(with(vec![r], vec![]));
        assert!(
            error.starts_with("routes[0].latency_bucket_counts[7]: 3 is less than"),
            "{error}"
        );
        let mut r = route();
        r.latency_bucket_counts[15] = 11;
        assert!(refused(with(vec![r], vec![])).contains("more than the 10 requests"));
        let mut r = route();
        r.latency_bucket_counts.pop();
        let error = refused(with(vec![r], vec![]));
        assert!(
            error.starts_with("routes[0].latency_bucket_counts: 15 counts for 16"),
            "{error}"
        );
        let mut r = route();
        r.requests = u64::MAX;
        let error = refused(with(vec![r], vec![]));
        assert!(
            error.starts_with(
                "routes[0].requests: 18446744073709551615 in a window of 10000 ms; at most 1000000"
            ),
            "{error}"
        );
        let mut r = route();
        r.requests = 1_000_000;
        assert_eq!(check_report(&with(vec![r], vec![])), Ok(()), "at the cap");
        let mut r = route();
        r.backend = String::new();
        assert!(refused(with(vec![r], vec![])).starts_with("routes[0].backend:"));

        // Only the sidecars' fixed bounds add up: any other set is refused by name.
        for bounds in [
            vec![0.01, 0.1],
            vec![],
            LATENCY_BOUNDS_SECONDS.map(|b| b * 2.0).to_vec(),
            vec![f64::NAN; 16],
        ] {
            let mut r = route();
            r.latency_bounds_seconds = bounds;
            let error = refused(with(vec![route(), r], vec![]));
            assert!(
                error.starts_with("routes[1].latency_bounds_seconds: ")
                    && error.contains("must be the fixed bounds [0.001, 0.0025"),
                "{error}"
            );
        }

        for window_ms in [0, MAX_REPORT_WINDOW_MS + 1] {
            let report = ReportRequest {
                window_ms,
                ..with(vec![route()], vec![])
            };
            let error = refused(report);
            assert!(
                error.starts_with(&format!("window_ms: {window_ms} must be 1 to 3600000")),
                "{error}"
            );
        }

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
