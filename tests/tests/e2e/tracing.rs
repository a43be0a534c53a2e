//! Traces across the mesh, received by a real OTLP/gRPC collector (`otlp::Collector`):
//! a checkout through the gateway is one trace whose spans link hop to hop from the
//! gateway to payment; a caller's `traceparent` and its sampled flag are kept; a
//! collector that is down costs requests nothing but the drop counter; a retry is an
//! event of its client span; and the sidecar's environment can name the collector
//! when the MeshConfig does not.

use std::{
    collections::HashMap,
    process::Command,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::{Value, json};
use trellis_tests::{
    apps::http_app,
    client::call_on,
    control_plane::{ControlPlane, ControlPlaneSpec, MeshSidecar, MeshSidecarSpec},
    marketplace::MarketplaceService,
    mesh::{http1_client, metric_value, scrape, workload_id},
    otlp::{Collector, ReceivedSpan},
    process::{Process, addr_field},
    within,
};

/// A sidecar that fronts no app: it only sends.
const NOWHERE: &str = "127.0.0.1:9";

const GATEWAY_ROUTES: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {name: gateway}
spec:
  service: gateway
  rules:
  - name: shop
    match: {pathPrefix: /}
    backends: [{service: storefront}]
"#;

fn mesh_config(tracing: Option<&str>) -> String {
    let tracing = tracing
        .map(|endpoint| format!(", tracing: {{otlpEndpoint: \"{endpoint}\", samplingRatio: 1}}"))
        .unwrap_or_default();
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default}}\n\
         spec: {{mtls: STRICT, defaultAuthorization: allow-mesh{tracing}}}\n"
    )
}

/// A JSON request to the gateway with `headers`; the status and body.
async fn through_gateway(
    gateway: std::net::SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{gateway}{path}"))
        .header(header::HOST, "shop.example")
        .header(header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let response = within(
        path,
        http1_client().request(request.body(Full::new(Bytes::from(body))).unwrap()),
    )
    .await
    .unwrap();
    let status = response.status();
    let body = within("body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn kind_name(kind: SpanKind) -> &'static str {
    match kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
        _ => "OTHER",
    }
}

/// The spans from `leaf` up to its trace's root, leaf first.
fn ancestry<'a>(leaf: &'a ReceivedSpan, trace: &'a [ReceivedSpan]) -> Vec<&'a ReceivedSpan> {
    let by_id: HashMap<&str, &ReceivedSpan> =
        trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut chain = vec![leaf];
    let mut at = leaf;
    while !at.parent_span_id.is_empty() {
        match by_id.get(at.parent_span_id.as_str()) {
            Some(parent) => {
                chain.push(parent);
                at = parent;
            }
            None => break,
        }
    }
    chain
}

/// Every span of `trace` but one root has its parent among them.
fn connected(trace: &[ReceivedSpan]) -> bool {
    let ids: Vec<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let roots = trace.iter().filter(|s| s.parent_span_id.is_empty()).count();
    roots == 1
        && trace
            .iter()
            .all(|s| s.parent_span_id.is_empty() || ids.contains(&s.parent_span_id.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_through_the_gateway_is_one_trace_linked_hop_by_hop() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let resources = format!(
        "{}---{GATEWAY_ROUTES}",
        mesh_config(Some(&collector.endpoint()))
    );
    let (status, answer) = cp.apply(&resources).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let names = [
        "storefront",
        "order",
        "payment",
        "inventory",
        "shipping",
        "analytics",
    ];
    let mut services = Vec::new();
    for name in names {
        services.push(MarketplaceService::start(&cp, name, &[]).await);
    }
    let gateway = cp.gateway("gateway").await;
    cp.converged(names.len() + 1).await;
    let shop = gateway.listen;

    // A caller's sampled trace is continued; its unsampled one is propagated only.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let unsampled_trace = "5c0a3f3577b34da6a3ce929d0e0e4737";
    let item = json!({"productId": "p-01", "quantity": 2});
    let (status, cart) = through_gateway(
        shop,
        Method::POST,
        "/cart/alice/items",
        Some(item.clone()),
        &[(
            "traceparent",
            &format!("00-{unsampled_trace}-00f067aa0ba902b7-00"),
        )],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{cart}");
    let (status, cart) = through_gateway(
        shop,
        Method::POST,
        "/cart/alice/items",
        Some(json!({"productId": "p-05", "quantity": 1})),
        &[(
            "traceparent",
            &format!("00-{client_trace}-00f067aa0ba902b7-01"),
        )],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{cart}");
    let spans = collector
        .wait_for("the cart request's spans", |spans| {
            ["gateway", "storefront"].iter().all(|service| {
                spans
                    .iter()
                    .any(|s| s.trace_id == client_trace && s.service == *service)
            })
        })
        .await;
    let continued = spans
        .iter()
        .find(|s| {
            s.trace_id == client_trace && s.service == "gateway" && s.kind == SpanKind::Server
        })
        .unwrap_or_else(|| panic!("no gateway span in the client's trace: {spans:#?}"));
    assert_eq!(
        continued.parent_span_id, "00f067aa0ba902b7",
        "{continued:#?}"
    );
    // The gateway exports in order: had it recorded the unsampled request, its span
    // would be here by now.
    assert!(
        !spans.iter().any(|s| s.trace_id == unsampled_trace),
        "an unsampled trace was recorded: {spans:#?}"
    );

    // The checkout brings no traceparent: the gateway starts the trace.
    let request_id = "checkout-trace-test";
    let (status, order) = through_gateway(
        shop,
        Method::POST,
        "/checkout/alice",
        None,
        &[("x-request-id", request_id)],
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert!(
        order["paymentId"].as_str().unwrap().starts_with("pay-"),
        "{order}"
    );

    let root = |spans: &[ReceivedSpan]| {
        spans
            .iter()
            .find(|s| {
                s.service == "gateway"
                    && s.kind == SpanKind::Server
                    && s.attribute("trellis.request_id") == request_id
            })
            .cloned()
    };
    let in_trace = |spans: &[ReceivedSpan], trace_id: &str| -> Vec<ReceivedSpan> {
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    };
    let spans = collector
        .wait_for("the checkout's trace down to payment", |spans| {
            let Some(root) = root(spans) else {
                return false;
            };
            let trace = in_trace(spans, &root.trace_id);
            // Shipping and analytics come after payment: wait for the whole trace.
            ["payment", "shipping", "analytics", "inventory"]
                .iter()
                .all(|service| {
                    trace
                        .iter()
                        .any(|s| s.service == *service && s.kind == SpanKind::Server)
                })
                && connected(&trace)
        })
        .await;
    let root = root(&spans).unwrap();
    let trace = in_trace(&spans, &root.trace_id);
    assert!(
        root.parent_span_id.is_empty(),
        "the gateway's span is the root: {root:#?}"
    );

    let payment = trace
        .iter()
        .find(|s| s.service == "payment" && s.kind == SpanKind::Server)
        .unwrap();
    let chain = ancestry(payment, &trace);
    let hops: Vec<(&str, &str)> = chain
        .iter()
        .map(|s| (s.service.as_str(), kind_name(s.kind)))
        .collect();
    assert_eq!(
        hops,
        [
            ("payment", "SERVER"),
            ("order", "CLIENT"),
            ("order", "SERVER"),
            ("storefront", "CLIENT"),
            ("storefront", "SERVER"),
            ("gateway", "CLIENT"),
            ("gateway", "SERVER"),
        ],
        "each hop's parent is the hop before it: {chain:#?}"
    );
    assert_eq!(chain.last().unwrap().span_id, root.span_id);

    // What each hop knows of the request.
    let [
        pay_in,
        pay_out,
        order_in,
        order_out,
        store_in,
        gw_out,
        gw_in,
    ] = chain[..]
    else {
        unreachable!()
    };
    assert_eq!(pay_in.attribute("trellis.peer.id"), workload_id("order"));
    assert_eq!(pay_in.attribute("trellis.peer.service"), "order");
    assert_eq!(pay_in.attribute("url.path"), "/payments");
    assert_eq!(pay_in.attribute("http.response.status_code"), "201");
    assert_eq!(pay_out.attribute("trellis.destination"), "payment");
    assert_eq!(pay_out.attribute("trellis.peer.id"), workload_id("payment"));
    assert_eq!(pay_out.attribute("trellis.route"), "default");
    assert_eq!(pay_out.attribute("trellis.backend"), "payment");
    assert_eq!(pay_out.attribute("trellis.retry.attempts"), "1");
    assert_eq!(pay_out.name, "POST payment");
    assert_eq!(
        order_in.attribute("trellis.peer.id"),
        workload_id("storefront")
    );
    assert_eq!(order_out.attribute("trellis.destination"), "order");
    assert_eq!(
        store_in.attribute("trellis.peer.id"),
        workload_id("gateway")
    );
    assert_eq!(gw_out.attribute("trellis.route"), "shop");
    assert_eq!(gw_out.attribute("trellis.destination"), "storefront");
    assert_eq!(gw_in.attribute("url.path"), "/checkout/alice");
    assert_eq!(gw_in.attribute("http.response.status_code"), "201");
    for span in &chain {
        assert_eq!(
            span.attribute("trellis.request_id"),
            request_id,
            "{span:#?}"
        );
        assert_eq!(span.status_code, 0, "no error: {span:#?}");
    }
    // A parent spans its children.
    for pair in chain.windows(2) {
        let (child, parent) = (pair[0], pair[1]);
        assert!(
            parent.start_unix_nano <= child.start_unix_nano
                && child.end_unix_nano <= parent.end_unix_nano,
            "{parent:#?} does not span {child:#?}"
        );
    }

    // The excerpt docs/observability.md shows.
    eprintln!("trace {} ({} spans)", root.trace_id, trace.len());
    let mut ordered = trace.clone();
    ordered.sort_by_key(|s| s.start_unix_nano);
    for span in &ordered {
        eprintln!(
            "  {} {:<6} {:<22} span {} parent {:<16} {:>8.3} ms  status {}",
            kind_name(span.kind),
            span.service,
            span.name,
            span.span_id,
            if span.parent_span_id.is_empty() {
                "-"
            } else {
                &span.parent_span_id
            },
            span.duration().as_secs_f64() * 1e3,
            span.attribute("http.response.status_code"),
        );
    }
}

/// Sequential GETs through `client`'s outbound to `web`; the median latency.
async fn median_latency(client: &MeshSidecar, n: usize) -> Duration {
    let http = http1_client();
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let answer = call_on(&http, client.outbound, "web", Method::GET, "/", &[]).await;
        latencies.push(started.elapsed());
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    }
    latencies.sort();
    latencies[n / 2]
}

async fn spans_dropped(sidecar: &MeshSidecar) -> f64 {
    metric_value(
        &scrape(sidecar.admin).await,
        "trellis_trace_spans_dropped_total",
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_requests_nothing_but_the_drop_counter() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let (status, answer) = cp.apply(&mesh_config(None)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (app, _) = http_app("web", Duration::ZERO).await;
    let web = cp.sidecar(MeshSidecarSpec::new("web", app)).await;
    let client = cp
        .sidecar(MeshSidecarSpec::new("client", NOWHERE.parse().unwrap()))
        .await;
    cp.converged(2).await;
    median_latency(&client, 20).await; // warm: connections, pools
    let untraced = median_latency(&client, 200).await;
    assert_eq!(
        spans_dropped(&client).await,
        0.0,
        "no tracing, nothing dropped"
    );

    // Turned on while the sidecars run: a collector nobody listens for.
    let (status, answer) = cp
        .apply(&mesh_config(Some(&format!("http://{closed}"))))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    cp.converged(2).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while spans_dropped(&client).await == 0.0 {
        assert!(
            Instant::now() < deadline,
            "the sidecar never started recording spans"
        );
        median_latency(&client, 5).await;
    }
    let before = [spans_dropped(&client).await, spans_dropped(&web).await];
    let traced = median_latency(&client, 200).await;
    eprintln!(
        "median latency: {untraced:?} without tracing, {traced:?} exporting to a closed port"
    );
    let bound = untraced.mul_f64(1.5) + Duration::from_millis(2);
    assert!(
        traced <= bound,
        "a collector that is down slowed requests: median {traced:?} against {untraced:?} without tracing"
    );

    // Every span of those 200 requests is dropped, on both sides, and counted.
    for (sidecar, before) in [&client, &web].into_iter().zip(before) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let dropped = spans_dropped(sidecar).await;
            if dropped >= before + 200.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {dropped} spans dropped, expected at least {}",
                sidecar.service,
                before + 200.0
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let scrape = scrape(client.admin).await;
    assert_eq!(
        metric_value(&scrape, "trellis_trace_spans_exported_total", &[]),
        0.0
    );
    assert!(
        metric_value(
            &scrape,
            "trellis_trace_spans_dropped_total",
            &[("reason", "export_failed")]
        ) > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_names_the_collector_when_the_mesh_config_does_not() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let (app, _) = http_app("web", Duration::ZERO).await;
    let spec = MeshSidecarSpec::new("web", app);
    let token = cp.join_token_file("web", "1h").await;
    let mut command: Command = cp.sidecar_command(&spec, &token);
    // No scheme: http:// is assumed.
    command.env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.addr.to_string());
    let mut process = Process::spawn("trellis-proxy web (OTEL env)", command);
    let listening = process.listening("web");
    let _web = (process, addr_field(&listening, "inbound"));
    let client = cp
        .sidecar(MeshSidecarSpec::new("client", NOWHERE.parse().unwrap()))
        .await;
    cp.converged(2).await;

    let trace = "0af7651916cd43dd8448eb211c80319c";
    let answer = call_on(
        &http1_client(),
        client.outbound,
        "web",
        Method::GET,
        "/",
        &[("traceparent", &format!("00-{trace}-b7ad6b7169203331-01"))],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let spans = collector
        .wait_for("web's span", |spans| {
            spans.iter().any(|s| s.trace_id == trace)
        })
        .await;
    let web = spans.iter().find(|s| s.trace_id == trace).unwrap();
    assert_eq!((web.service.as_str(), web.kind), ("web", SpanKind::Server));
    assert_eq!(web.attribute("trellis.peer.id"), workload_id("client"));
    // The client's sidecar exports nothing but still made the hop a span of its own.
    assert_ne!(web.parent_span_id, "b7ad6b7169203331");
    assert!(spans.iter().all(|s| s.service == "web"), "{spans:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_an_event_of_the_client_span_and_counts_in_its_attempts() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let route = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficRoute\nmetadata: {name: web}\n\
                 spec:\n  service: web\n  rules:\n  - name: flaky\n    backends: [{service: web}]\n    \
                 retries: {attempts: 2, on: [5xx]}\n";
    let resources = format!("{}---\n{route}", mesh_config(Some(&collector.endpoint())));
    let (status, answer) = cp.apply(&resources).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (app, faults) = trellis_tests::apps::faulty_app("web").await;
    let _web = cp.sidecar(MeshSidecarSpec::new("web", app)).await;
    let client = cp
        .sidecar(MeshSidecarSpec::new("client", NOWHERE.parse().unwrap()))
        .await;
    cp.converged(2).await;

    faults
        .fail_next
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let answer = call_on(
        &http1_client(),
        client.outbound,
        "web",
        Method::GET,
        "/",
        &[],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.header("x-trellis-attempts"), "2");

    let spans = collector
        .wait_for("the client's span and both tries' server spans", |spans| {
            spans.iter().filter(|s| s.service == "web").count() == 2
                && spans.iter().any(|s| s.service == "client")
        })
        .await;
    let out = spans.iter().find(|s| s.service == "client").unwrap();
    assert_eq!(out.kind, SpanKind::Client);
    assert_eq!(out.events, ["retry"], "{out:#?}");
    assert_eq!(out.attribute("trellis.retry.attempts"), "2");
    assert_eq!(out.attribute("trellis.route"), "flaky");
    assert_eq!(out.attribute("http.response.status_code"), "200");
    // Both tries are children of the one client span; the failed one is an error.
    let tries: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.service == "web").collect();
    assert!(
        tries
            .iter()
            .all(|s| s.parent_span_id == out.span_id && s.trace_id == out.trace_id)
    );
    let mut statuses: Vec<(&str, i32)> = tries
        .iter()
        .map(|s| (s.attribute("http.response.status_code"), s.status_code))
        .collect();
    statuses.sort();
    assert_eq!(statuses, [("200", 0), ("503", 2)]);
}
