//! Traffic mirroring through a real control plane and real sidecars: `web` v1 answers,
//! a shadow gets the copies, and neither a slow, failing, absent nor overloaded shadow
//! changes what the caller sees. With `compare`, the two answers are compared and the
//! mismatches shown on the admin `/shadow` page.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::Value;
use trellis_tests::{
    apps::{self, Seen},
    client::{Answer, call, get},
    control_plane::{ControlPlane, ControlPlaneSpec, MeshSidecar, MeshSidecarSpec},
    mesh::{admin_get, metric_value, scrape},
    within,
};

const NOWHERE: &str = "127.0.0.1:9";

/// `web`'s subsets: one per version, and `empty`, which selects nothing.
const POLICY: &str = r#"apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: web}
spec:
  service: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
  - {name: empty, labels: {version: none}}
"#;

/// A control plane, one `web` sidecar per (version, app), and the caller `a`, with
/// the TrafficRoute `rules` for `web` applied and every proxy on it.
struct Shadowed {
    _cp: ControlPlane,
    a: MeshSidecar,
    _web: Vec<MeshSidecar>,
    _dir: tempfile::TempDir,
}

async fn shadowed(rules: &str, versions: &[(&str, SocketAddr)]) -> Shadowed {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let route = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficRoute\nmetadata: {{name: web}}\n\
         spec:\n  service: web\n  rules:\n{rules}"
    );
    let (status, answer) = cp.apply(&format!("{POLICY}---\n{route}")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let mut web = Vec::new();
    for (version, app) in versions {
        let spec = MeshSidecarSpec::new("web", *app).label("version", version);
        web.push(cp.sidecar(spec).await);
    }
    let a = cp
        .sidecar(MeshSidecarSpec::new("a", NOWHERE.parse().unwrap()))
        .await;
    cp.converged(web.len() + 1).await;
    Shadowed {
        _cp: cp,
        a,
        _web: web,
        _dir: dir,
    }
}

/// An app that answers 200 `body` to everything.
async fn plain_app(name: &'static str, body: &'static str) -> (SocketAddr, Arc<apps::Recorded>) {
    apps::recording_app(name, Duration::ZERO, move |_| {
        (StatusCode::OK, Bytes::from_static(body.as_bytes()))
    })
    .await
}

fn shadow_labels<'a>(route: &'a str, shadow: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("service", "web"), ("route", route), ("shadow", shadow)]
}

/// Waits until each `(metric, labels, value)` reads exactly its value on `admin`'s
/// `/metrics`; fails with what was read after 20 s.
/// A metric, the labels its samples must have, and the sum they must reach.
type Expected<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);

async fn counted(admin: SocketAddr, expected: &[Expected<'_>]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = scrape(admin).await;
        let read: Vec<f64> = expected
            .iter()
            .map(|(name, labels, _)| metric_value(&metrics, name, labels))
            .collect();
        if read
            .iter()
            .zip(expected)
            .all(|(got, (_, _, want))| got == want)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "counters read {read:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const REQUESTS: &str = "trellis_shadow_requests_total";
const COMPARISONS: &str = "trellis_shadow_comparisons_total";

fn with<'a>(
    mut labels: Vec<(&'a str, &'a str)>,
    key: &'a str,
    value: &'a str,
) -> Vec<(&'a str, &'a str)> {
    labels.push((key, value));
    labels
}

async fn shadow_page(admin: SocketAddr) -> Value {
    let (status, body) = admin_get(admin, "/shadow").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_answers_every_request_and_v2_gets_each_once_marked_as_a_shadow() {
    let (v1_app, v1) = plain_app("v1", "from v1").await;
    let (v2_app, v2) = plain_app("v2", "from v2").await;
    let mesh = shadowed(
        "  - name: mirrored\n    backends: [{subset: v1}]\n    mirror: {subset: v2, percent: 100}\n",
        &[("v1", v1_app), ("v2", v2_app)],
    )
    .await;
    let a = mesh.a.outbound;

    // Requests that are copies already are never copied again.
    for i in 0..5 {
        let path = format!("/marked/{i}");
        call(
            a,
            "web",
            Method::GET,
            &path,
            &[("x-trellis-shadow", "true")],
        )
        .await
        .assert_ok("from v1");
    }
    let n = 20;
    for i in 0..n {
        get(a, "web", &format!("/copied/{i}"))
            .await
            .assert_ok("from v1");
    }

    let seen = v2.wait_for(n).await;
    let mut paths: Vec<String> = seen.iter().map(|s| s.path.clone()).collect();
    paths.sort();
    let mut expected: Vec<String> = (0..n).map(|i| format!("/copied/{i}")).collect();
    expected.sort();
    assert_eq!(paths, expected, "each request once, and no marked one");
    assert!(
        seen.iter().all(|s| s.shadow.as_deref() == Some("true")),
        "{seen:?}"
    );
    // The primary got every request, unmarked unless the caller marked it.
    let primary = v1.seen();
    assert_eq!(primary.len(), 5 + n);
    assert!(
        primary
            .iter()
            .all(|s| s.shadow.is_some() == s.path.starts_with("/marked/"))
    );

    let mirrored = with(shadow_labels("mirrored", "v2"), "outcome", "mirrored");
    counted(mesh.a.admin, &[(REQUESTS, mirrored, n as f64)]).await;
    let page = shadow_page(mesh.a.admin).await;
    let shadow = &page["shadows"][0];
    assert_eq!(
        (&shadow["service"], &shadow["route"], &shadow["shadow"]),
        (
            &Value::from("web"),
            &Value::from("mirrored"),
            &Value::from("v2")
        )
    );
    assert_eq!(shadow["totals"]["mirrored"], n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_failing_or_absent_shadow_never_delays_or_fails_the_primary() {
    let shadow_delay = Duration::from_secs(5);
    let (v1_app, _) = plain_app("v1", "ok").await;
    let (slow_app, slow) = apps::recording_app("v2", shadow_delay, |_| {
        (StatusCode::OK, Bytes::from_static(b"ok"))
    })
    .await;
    let (failing_app, _) = apps::recording_app("v3", Duration::ZERO, |_| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Bytes::from_static(b"broken"),
        )
    })
    .await;
    let rule = |name: &str, shadow: &str, extra: &str| {
        format!(
            "  - name: {name}\n    match: {{pathPrefix: /{name}}}\n    backends: [{{subset: v1}}]\n{extra}\
             \x20   mirror: {{subset: {shadow}, percent: 100, compare: true}}\n"
        )
    };
    let rules = [
        // The copy's timeout is the route's: shorter than the shadow's delay.
        rule("slow", "v2", "    timeout: 1500ms\n"),
        rule("failing", "v3", ""),
        rule("absent", "empty", ""),
    ]
    .concat();
    let mesh = shadowed(
        &rules,
        &[("v1", v1_app), ("v2", slow_app), ("v3", failing_app)],
    )
    .await;

    let n = 10;
    for route in ["slow", "failing", "absent"] {
        for i in 0..n {
            let started = Instant::now();
            let answer = get(mesh.a.outbound, "web", &format!("/{route}/{i}")).await;
            let took = started.elapsed();
            answer.assert_ok("ok");
            assert_eq!(answer.app(), "v1");
            assert!(
                took < Duration::from_secs(1),
                "{route}: the primary took {took:?} (the shadow sleeps {shadow_delay:?})"
            );
        }
    }
    // The slow shadow did get the copies; it answered too late to count.
    slow.wait_for(n).await;
    let n = n as f64;
    let result = |route: &'static str, shadow: &'static str, result: &'static str| {
        (
            COMPARISONS,
            with(shadow_labels(route, shadow), "result", result),
            n,
        )
    };
    counted(
        mesh.a.admin,
        &[
            result("slow", "v2", "shadow_error"),
            // An app's 500 is an answer: compared, and it differs.
            result("failing", "v3", "status_mismatch"),
            result("absent", "empty", "shadow_error"),
            (
                REQUESTS,
                with(shadow_labels("absent", "empty"), "outcome", "mirrored"),
                n,
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_beyond_the_pool_are_dropped_and_counted() {
    let (v1_app, _) = plain_app("v1", "ok").await;
    // A shadow that holds every copy longer than the test runs.
    let (v2_app, v2) = apps::recording_app("v2", Duration::from_secs(120), |_| {
        (StatusCode::OK, Bytes::from_static(b"late"))
    })
    .await;
    let mesh = shadowed(
        "  - name: hung\n    backends: [{subset: v1}]\n    timeout: 60s\n    \
         mirror: {subset: v2, percent: 100, compare: true}\n",
        &[("v1", v1_app), ("v2", v2_app)],
    )
    .await;

    let (pool, sent) = (64, 80);
    for i in 0..sent {
        let started = Instant::now();
        get(mesh.a.outbound, "web", &format!("/{i}"))
            .await
            .assert_ok("ok");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    let labels = shadow_labels("hung", "v2");
    counted(
        mesh.a.admin,
        &[
            (
                REQUESTS,
                with(labels.clone(), "outcome", "mirrored"),
                pool as f64,
            ),
            (
                REQUESTS,
                with(labels.clone(), "outcome", "dropped"),
                (sent - pool) as f64,
            ),
            (
                COMPARISONS,
                with(labels.clone(), "result", "dropped"),
                (sent - pool) as f64,
            ),
        ],
    )
    .await;
    assert_eq!(v2.wait_for(pool).await.len(), pool);
    let totals = &shadow_page(mesh.a.admin).await["shadows"][0]["totals"];
    assert_eq!(
        (&totals["mirrored"], &totals["dropped"]),
        (&Value::from(pool), &Value::from(sent - pool))
    );
}

/// POSTs `body` to `path` of `web` through `via`: in one piece with a Content-Length,
/// or in `chunks` pieces without one (chunked, its length unknown until its end).
async fn post(via: SocketAddr, path: &str, body: &[u8], chunks: Option<usize>) -> Answer {
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = match chunks {
        Some(n) => body
            .chunks(body.len().div_ceil(n))
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect(),
        None => vec![Ok(Frame::data(Bytes::copy_from_slice(body)))],
    };
    let mut request = Request::post(format!("http://{via}{path}")).header(header::HOST, "web");
    if chunks.is_none() {
        request = request.header(header::CONTENT_LENGTH, body.len());
    }
    let request = request
        .body(StreamBody::new(tokio_stream::iter(frames)))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let response = within(path, client.request(request)).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = within("body", body.collect()).await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_up_to_the_limit_are_copied_intact_and_larger_ones_counted() {
    let (v1_app, v1_faults) = apps::faulty_app("v1").await;
    let (v2_app, v2) = plain_app("v2", "copy").await;
    let mesh = shadowed(
        "  - name: uploads\n    backends: [{subset: v1}]\n    \
         retries: {attempts: 2, on: [5xx], allowNonIdempotent: true}\n    \
         mirror: {subset: v2, percent: 100, maxBodyBytes: 1024}\n",
        &[("v1", v1_app), ("v2", v2_app)],
    )
    .await;
    let a = mesh.a.outbound;
    let text = |n: usize, seed: u8| -> String {
        (0..n)
            .map(|i| char::from(b'a' + (i as u8).wrapping_add(seed) % 26))
            .collect()
    };

    // Under the limit, and retried: the client gets its echo from the second try, the
    // shadow one copy.
    let retried = text(1000, 0);
    v1_faults.fail_next.store(1, Ordering::SeqCst);
    let answer = post(a, "/echo", retried.as_bytes(), None).await;
    answer.assert_ok(&retried);
    assert_eq!(answer.header("x-trellis-attempts"), "2");
    // Under the limit, streamed without a length.
    let streamed = text(700, 7);
    post(a, "/echo", streamed.as_bytes(), Some(3))
        .await
        .assert_ok(&streamed);
    // Over it: announced, then found out while streaming. Both reach the primary whole.
    let announced = text(2000, 1);
    post(a, "/echo", announced.as_bytes(), None)
        .await
        .assert_ok(&announced);
    let discovered = text(3000, 2);
    post(a, "/echo", discovered.as_bytes(), Some(3))
        .await
        .assert_ok(&discovered);

    let labels = shadow_labels("uploads", "v2");
    counted(
        mesh.a.admin,
        &[
            (REQUESTS, with(labels.clone(), "outcome", "mirrored"), 2.0),
            (REQUESTS, with(labels.clone(), "outcome", "too_large"), 2.0),
        ],
    )
    .await;
    let seen = v2.wait_for(2).await;
    let mut copies: Vec<&Seen> = seen.iter().collect();
    copies.sort_by_key(|s| s.body.len());
    assert_eq!(copies.len(), 2, "{seen:?}");
    assert_eq!(copies[0].body, streamed.as_bytes());
    assert_eq!(copies[1].body, retried.as_bytes());
    assert!(
        copies
            .iter()
            .all(|s| s.method == "POST" && s.path == "/echo")
    );
    assert_eq!(v1_faults.requests(), 5, "one retry, four requests");
}

/// 1.5 MB that are not all the same byte.
fn large_body() -> Bytes {
    (0..1_500_000u32).map(|i| (i % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_counts_matches_and_mismatches_and_shows_the_mismatches() {
    let ids = Arc::new(AtomicU64::new(0));
    let answer = move |version: &'static str| {
        let ids = ids.clone();
        move |seen: &Seen| {
            let id = ids.fetch_add(1, Ordering::Relaxed);
            let (status, body): (u16, Bytes) = match (seen.path.as_str(), version) {
                ("/same", _) => (200, "same".into()),
                ("/status", "v1") => (200, "status".into()),
                ("/status", _) => (500, "status".into()),
                ("/body", "v1") => (200, "one".into()),
                ("/body", _) => (200, "two".into()),
                // Only the ignored fields differ (and the key order, which never counts);
                // `items.id` reaches the id of each item.
                ("/json", "v1") => (
                    200,
                    format!(r#"{{"id":"{version}-{id}","meta":{{"at":{id},"v":1}},"items":[{{"id":{id},"n":1}}]}}"#).into(),
                ),
                ("/json", _) => (
                    200,
                    format!(r#"{{"items":[{{"n":1,"id":"x{id}"}}],"meta":{{"v":1,"at":"later"}},"id":"{version}"}}"#).into(),
                ),
                ("/large", _) => (200, large_body()),
                _ => (404, Bytes::new()),
            };
            (StatusCode::from_u16(status).unwrap(), body)
        }
    };
    let (v1_app, _) = apps::recording_app("v1", Duration::ZERO, answer("v1")).await;
    let (v2_app, _) = apps::recording_app("v2", Duration::ZERO, answer("v2")).await;
    let mesh = shadowed(
        "  - name: compared\n    backends: [{subset: v1}]\n    \
         mirror: {subset: v2, percent: 100, compare: true, ignoreFields: [id, meta.at, items.id]}\n",
        &[("v1", v1_app), ("v2", v2_app)],
    )
    .await;
    let a = mesh.a.outbound;

    for (path, times, status, body) in [
        ("/same", 3, StatusCode::OK, "same"),
        ("/status", 2, StatusCode::OK, "status"),
        ("/body", 2, StatusCode::OK, "one"),
    ] {
        for _ in 0..times {
            let answer = get(a, "web", path).await;
            assert_eq!((answer.status, answer.body.as_str()), (status, body));
        }
    }
    for _ in 0..3 {
        let answer = get(a, "web", "/json").await;
        let json: Value = serde_json::from_str(&answer.body).unwrap();
        assert!(json["id"].as_str().unwrap().starts_with("v1-"), "{json}");
    }
    // A large response streams through whole while it is digested.
    let response = within(
        "large",
        trellis_tests::mesh::http1_client().request(
            Request::get(format!("http://{a}/large"))
                .header(header::HOST, "web")
                .body(Default::default())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = within("large body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert!(
        body == large_body(),
        "the large body arrived changed ({} bytes)",
        body.len()
    );

    let labels = shadow_labels("compared", "v2");
    let result =
        |result: &'static str, n: f64| (COMPARISONS, with(labels.clone(), "result", result), n);
    counted(
        mesh.a.admin,
        &[
            result("match", 3.0 + 3.0 + 1.0),
            result("status_mismatch", 2.0),
            result("body_mismatch", 2.0),
            result("shadow_error", 0.0),
        ],
    )
    .await;

    let page = shadow_page(mesh.a.admin).await;
    let shadow = &page["shadows"][0];
    assert_eq!(shadow["route"], "compared");
    let totals = &shadow["totals"];
    assert_eq!(totals["mirrored"], 11);
    assert_eq!(totals["matched"], 7);
    assert_eq!(
        (&totals["statusMismatches"], &totals["bodyMismatches"]),
        (&Value::from(2), &Value::from(2))
    );
    let recent = shadow["recentMismatches"].as_array().unwrap();
    assert_eq!(recent.len(), 4, "{recent:#?}");
    let status = recent.iter().find(|m| m["kind"] == "status").unwrap();
    assert_eq!(
        (
            &status["method"],
            &status["path"],
            &status["primaryStatus"],
            &status["shadowStatus"]
        ),
        (
            &Value::from("GET"),
            &Value::from("/status"),
            &Value::from(200),
            &Value::from(500)
        )
    );
    assert_eq!(status["primaryDigest"].as_str().unwrap().len(), 64);
    let body = recent.iter().find(|m| m["kind"] == "body").unwrap();
    assert_eq!(body["path"], "/body");
    assert_eq!(
        (&body["primaryStatus"], &body["shadowStatus"]),
        (&Value::from(200), &Value::from(200))
    );
    // SHA-256 of "one" and of "two".
    assert_eq!(
        body["primaryDigest"],
        "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
    );
    assert_eq!(
        body["shadowDigest"],
        "3fc4ccfe745870e2c0d99f71f30ff0656c8dedd41cc1d7d3d376b0dbe685e2f3"
    );
}

/// The p99 of `samples`, nearest rank.
fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let rank = (samples.len() * 99).div_ceil(100).max(1);
    samples[rank - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_sleeps_a_second_leaves_the_primary_p99_within_5_percent() {
    // The primary does 100 ms of work, like a slow service call: 5% of its p99 is then
    // a margin the proxies' own jitter on a shared, busy 2-core machine cannot eat.
    let work = Duration::from_millis(100);
    let (v1_app, _) = apps::recording_app("v1", work, |seen: &Seen| {
        (StatusCode::OK, Bytes::from(seen.path.clone()))
    })
    .await;
    let (v2_app, v2) = apps::recording_app("v2", Duration::from_secs(1), |_| {
        (StatusCode::OK, Bytes::from_static(b"shadow"))
    })
    .await;
    let mesh = shadowed(
        "  - name: mirrored\n    match: {pathPrefix: /mirrored}\n    backends: [{subset: v1}]\n    \
         mirror: {subset: v2, percent: 100}\n  - name: plain\n    backends: [{subset: v1}]\n",
        &[("v1", v1_app), ("v2", v2_app)],
    )
    .await;
    let a = mesh.a.outbound;
    let timed = |path: String| async move {
        let started = Instant::now();
        let answer = get(a, "web", &path).await;
        answer.assert_ok(&path);
        started.elapsed()
    };
    // Pairs sent together, so both sides of the comparison see the same machine.
    let n = 100;
    let (mut mirrored, mut plain) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (m, p) = tokio::join!(
            timed(format!("/mirrored/{i}")),
            timed(format!("/plain/{i}"))
        );
        mirrored.push(m);
        plain.push(p);
    }
    let (mirrored, plain) = (p99(mirrored), p99(plain));
    assert!(
        mirrored.as_secs_f64() <= plain.as_secs_f64() * 1.05,
        "mirrored p99 {mirrored:?} vs unmirrored p99 {plain:?}: more than 5% apart"
    );
    // Every copy reached the shadow, marked; the shadow's second of sleep cost the
    // callers nothing.
    let copies = v2.wait_for(n).await;
    assert_eq!(copies.len(), n);
    assert!(
        copies
            .iter()
            .all(|s| s.shadow.as_deref() == Some("true") && s.path.starts_with("/mirrored/"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_is_down_changes_no_primary_response() {
    // The primary answers something different for every request: its status from the
    // path, its body from the method, path and request body.
    let answer = |seen: &Seen| {
        let status = match seen.path.rsplit('/').next() {
            Some("missing") => StatusCode::NOT_FOUND,
            Some("broken") => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::OK,
        };
        let body = format!(
            "{} {} {}",
            seen.method,
            seen.path,
            String::from_utf8_lossy(&seen.body)
        );
        (status, Bytes::from(body))
    };
    let (v1_app, _) = apps::recording_app("v1", Duration::ZERO, answer).await;
    let (v2_app, _) = apps::recording_app("v2", Duration::ZERO, answer).await;
    let mut mesh = shadowed(
        "  - name: mirrored\n    backends: [{subset: v1}]\n    \
         mirror: {subset: v2, percent: 100, compare: true}\n",
        &[("v1", v1_app), ("v2", v2_app)],
    )
    .await;
    // The shadow's sidecar dies; the control plane still lists it (its heartbeat
    // timeout has not passed), so every copy meets a refused connection.
    mesh._web[1].process.kill();

    let n = 60;
    for i in 0..n {
        let last = ["ok", "missing", "broken"][i % 3];
        let path = format!("/items/{i}/{last}");
        let (got, method, body) = if i % 2 == 0 {
            (
                get(mesh.a.outbound, "web", &path).await,
                "GET",
                String::new(),
            )
        } else {
            let body = format!("payload {i}");
            (
                post(mesh.a.outbound, &path, body.as_bytes(), None).await,
                "POST",
                body,
            )
        };
        let (status, expected) = answer(&Seen {
            method: method.into(),
            path: path.clone(),
            shadow: None,
            body: Bytes::from(body),
        });
        assert_eq!(
            (got.status, got.body.as_str(), got.app()),
            (status, std::str::from_utf8(&expected).unwrap(), "v1"),
            "request {i} changed"
        );
        assert!(
            !got.headers.contains_key("x-trellis-error"),
            "request {i}: {got:?}"
        );
    }
    let labels = shadow_labels("mirrored", "v2");
    counted(
        mesh.a.admin,
        &[(
            COMPARISONS,
            with(labels, "result", "shadow_error"),
            n as f64,
        )],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_different_body_in_five_counts_as_20_percent_body_mismatch() {
    let (v1_app, _) = plain_app("v1", "the answer").await;
    // The shadow answers differently to a random fifth of the copies, and counts them.
    let differed = Arc::new(AtomicU64::new(0));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let state = Arc::new(AtomicU64::new(u64::from(seed) | 1));
    let (v2_app, v2) = {
        let differed = differed.clone();
        apps::recording_app("v2", Duration::ZERO, move |_: &Seen| {
            let mut x = state.load(Ordering::Relaxed);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            state.store(x, Ordering::Relaxed);
            let body: &'static [u8] = if x.is_multiple_of(5) {
                differed.fetch_add(1, Ordering::Relaxed);
                b"another answer"
            } else {
                b"the answer"
            };
            (StatusCode::OK, Bytes::from_static(body))
        })
        .await
    };
    let mesh = shadowed(
        "  - name: compared\n    backends: [{subset: v1}]\n    \
         mirror: {subset: v2, percent: 100, compare: true}\n",
        &[("v1", v1_app), ("v2", v2_app)],
    )
    .await;
    let n = 1000;
    for i in 0..n {
        get(mesh.a.outbound, "web", &format!("/{i}"))
            .await
            .assert_ok("the answer");
    }
    let labels = shadow_labels("compared", "v2");
    // Every copy went out (none dropped) and reached the shadow.
    counted(
        mesh.a.admin,
        &[
            (
                REQUESTS,
                with(labels.clone(), "outcome", "mirrored"),
                n as f64,
            ),
            (REQUESTS, with(labels.clone(), "outcome", "dropped"), 0.0),
        ],
    )
    .await;
    v2.wait_for(n).await;
    let differing = usize::try_from(differed.load(Ordering::Relaxed)).unwrap();
    let result =
        |r: &'static str, v: usize| (COMPARISONS, with(labels.clone(), "result", r), v as f64);
    // Every comparison lands where it belongs: the answers that differed, and only
    // they, as body mismatches, the rest as matches...
    counted(
        mesh.a.admin,
        &[
            result("body_mismatch", differing),
            result("match", n - differing),
            result("status_mismatch", 0),
            result("shadow_error", 0),
        ],
    )
    .await;
    // ...so the counted share is 20% within the binomial 99.9% bound.
    let (p, n) = (0.2, n as f64);
    let bound = 3.29 * (n * p * (1.0 - p)).sqrt();
    let share = differing as f64;
    assert!(
        (share - n * p).abs() <= bound,
        "{share} of {n} differ: not 20% within ±{bound:.1}"
    );
}
