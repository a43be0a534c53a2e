//! Bulkheads across real sidecars: a saturated pool refuses at once and leaves the
//! other pools of the service alone; waiters get a freed slot, or give up after
//! `maxPendingTime` or the route's timeout.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use tokio::task::JoinSet;
use trellis_api::config::{
    BulkheadConfig, HeaderMatchConfig, RouteConfig, RouteMatchConfig, ServiceConfig,
};
use trellis_tests::{
    apps::{self, Hold},
    client::{Answer, HttpClient, call_on},
    mesh::{Mesh, SidecarSpec, http1_client, metric_value, scrape},
    within,
};

const NO_APP: &str = "127.0.0.1:9";

/// GETs `path` of service `web` through the sidecar at `via`; the routes below pick
/// the pool by the `x-class` header.
async fn call(
    client: &HttpClient,
    via: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    call_on(client, via, "web", Method::GET, path, headers).await
}

fn pool(name: &str, concurrent: u32, pending: u32, time: Option<&str>) -> BulkheadConfig {
    BulkheadConfig {
        name: name.into(),
        max_concurrent_requests: concurrent,
        max_pending_requests: pending,
        max_pending_time: time.map(str::to_string),
    }
}

fn header_is(name: &str, value: &str) -> HeaderMatchConfig {
    HeaderMatchConfig {
        name: name.into(),
        exact: Some(value.into()),
        prefix: None,
        regex: None,
    }
}

fn route(name: &str, matches: RouteMatchConfig, bulkhead: Option<&str>) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        matches,
        bulkhead: bulkhead.map(str::to_string),
        ..RouteConfig::default()
    }
}

fn class(class: &str) -> RouteMatchConfig {
    RouteMatchConfig {
        headers: vec![header_is("x-class", class)],
        ..RouteMatchConfig::default()
    }
}

/// Waits until `/metrics` of `admin` shows `value` for `name` of pool `pool`.
async fn wait_for_gauge(admin: SocketAddr, name: &str, pool: &str, value: f64) {
    let labels = [("service", "web"), ("pool", pool)];
    within(&format!("{name}{{pool={pool}}} = {value}"), async {
        loop {
            if metric_value(&scrape(admin).await, name, &labels) == value {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Lets held requests go, one at a time, until every task of `held` has answered
/// `released`. A slot freed by one lets a waiter in, which the app holds in turn.
/// Each release wakes one held request, or is kept for the next to arrive (only one
/// is kept): so one release per answer, never more, or the next test phase would
/// find its request let through at once.
async fn release_all(hold: &Hold, mut held: JoinSet<Answer>) {
    while !held.is_empty() {
        hold.release();
        let answer = within("a released request", held.join_next()).await;
        answer.unwrap().unwrap().assert_ok("released");
    }
}

/// The time one request of pool `critical` takes; it must succeed.
async fn time_critical(client: &HttpClient, via: SocketAddr) -> Duration {
    let started = Instant::now();
    let answer = call(client, via, "/", &[("x-class", "critical")]).await;
    let took = started.elapsed();
    answer.assert_ok("web");
    took
}

fn p99(mut took: Vec<Duration>) -> Duration {
    took.sort();
    took[took.len() * 99 / 100]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_refuses_at_once_and_never_slows_another() {
    let mesh = Mesh::new();
    let (app, hold) = apps::http_app("web", Duration::ZERO).await;
    let web = mesh.sidecar(SidecarSpec::new("web", app));
    let service = ServiceConfig {
        endpoints: vec![web.endpoint()],
        bulkheads: vec![
            pool("analytics", 10, 5, None),
            pool("critical", 100, 0, None),
        ],
        routes: vec![
            route("analytics", class("analytics"), Some("analytics")),
            route("critical", class("critical"), Some("critical")),
        ],
        ..ServiceConfig::default()
    };
    let caller = |name| {
        let spec = SidecarSpec::new(name, NO_APP.parse().unwrap());
        mesh.sidecar(spec.service("web", service.clone()))
    };
    // `a`'s analytics pool is saturated below; its twin `b` (same config, same
    // backend) is not, and is the baseline.
    let (a, b) = (caller("a"), caller("b"));
    let client = http1_client();
    let (in_flight, queued) = ("trellis_bulkhead_in_flight", "trellis_bulkhead_queued");

    // Warm up: connections between the sidecars, the app's pool.
    for _ in 0..50 {
        time_critical(&client, a.outbound).await;
        time_critical(&client, b.outbound).await;
    }

    // Ten analytics requests held by the app fill the pool; five more wait.
    let mut held = JoinSet::new();
    for _ in 0..15 {
        let (client, via) = (client.clone(), a.outbound);
        held.spawn(async move { call(&client, via, "/hold", &[("x-class", "analytics")]).await });
    }
    wait_for_gauge(a.admin, in_flight, "analytics", 10.0).await;
    wait_for_gauge(a.admin, queued, "analytics", 5.0).await;

    // Past that, refused at once. The held requests answer only when released, so a
    // refusal that waited for a slot would take as long as the test let it: a bound
    // far below that shows it did not wait.
    let excess = 20;
    for _ in 0..excess {
        let started = Instant::now();
        let answer = call(&client, a.outbound, "/", &[("x-class", "analytics")]).await;
        let took = started.elapsed();
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            answer.body
        );
        assert_eq!(answer.error(), "bulkhead-full");
        assert!(
            answer.body.contains("\"analytics\"")
                && answer.body.contains("maxConcurrentRequests 10"),
            "{}",
            answer.body
        );
        assert!(took < Duration::from_millis(250), "a refusal took {took:?}");
    }

    // Meanwhile `a`'s critical pool loses nothing and keeps its latency. The baseline
    // is measured at the same time, request by request in turn with `a`'s, so both
    // see the same background: these tests share two cores with each other and with
    // builds, and a baseline taken before the saturation can be seconds and a load
    // spike away.
    // The held requests give up after 20 s (`within`), so the sampling must end well
    // before that on a slow, shared machine: 400 pairs still put 4 above the p99.
    let samples = 400;
    let (mut beside, mut alone) = (Vec::new(), Vec::new());
    for i in 0..samples {
        if i % 2 == 0 {
            beside.push(time_critical(&client, a.outbound).await);
            alone.push(time_critical(&client, b.outbound).await);
        } else {
            alone.push(time_critical(&client, b.outbound).await);
            beside.push(time_critical(&client, a.outbound).await);
        }
    }

    let metrics = scrape(a.admin).await;
    let of = |pool| [("service", "web"), ("pool", pool)];
    let rejected = "trellis_bulkhead_rejected_total";
    assert_eq!(
        metric_value(&metrics, rejected, &of("analytics")),
        f64::from(excess)
    );
    assert_eq!(metric_value(&metrics, rejected, &of("critical")), 0.0);
    assert_eq!(metric_value(&metrics, in_flight, &of("critical")), 0.0);

    // The waiters get the slots the held requests free, and succeed.
    release_all(&hold, held).await;
    wait_for_gauge(a.admin, in_flight, "analytics", 0.0).await;
    wait_for_gauge(a.admin, queued, "analytics", 0.0).await;
    call(&client, a.outbound, "/", &[("x-class", "analytics")])
        .await
        .assert_ok("web");

    // Within 10% of the baseline's p99. But that p99 is a few milliseconds through
    // two sidecars on loopback (debug build), and one preemption costs more than 10%
    // of it, so the bound is at least 5 ms over the baseline. That still catches what
    // a shared pool would do: a request queued behind the held ones waits until they
    // are released, after the measurement, and a refused one fails above.
    let (alone, beside) = (p99(alone), p99(beside));
    let allowed = alone.mul_f64(1.1).max(alone + Duration::from_millis(5));
    eprintln!("critical p99: {alone:?} alone, {beside:?} beside a saturated pool");
    assert!(
        beside <= allowed,
        "critical p99 {beside:?} beside a saturated pool, {alone:?} alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_gets_a_freed_slot_or_gives_up_at_its_limit() {
    let mesh = Mesh::new();
    let (app, hold) = apps::http_app("web", Duration::ZERO).await;
    let web = mesh.sidecar(SidecarSpec::new("web", app));
    let patient = |matches: RouteMatchConfig| RouteMatchConfig {
        headers: [class("patient").headers, matches.headers].concat(),
        ..matches
    };
    let service = ServiceConfig {
        endpoints: vec![web.endpoint()],
        bulkheads: vec![
            pool("default", 1, 1, Some("300ms")),
            pool("patient", 1, 1, None),
        ],
        routes: vec![
            route(
                "patient-hold",
                patient(RouteMatchConfig {
                    path_exact: Some("/hold".into()),
                    ..RouteMatchConfig::default()
                }),
                Some("patient"),
            ),
            RouteConfig {
                timeout: Some("300ms".into()),
                ..route(
                    "patient-timed",
                    patient(RouteMatchConfig {
                        headers: vec![header_is("x-timed", "yes")],
                        ..RouteMatchConfig::default()
                    }),
                    Some("patient"),
                )
            },
            route("patient", class("patient"), Some("patient")),
        ],
        ..ServiceConfig::default()
    };
    let a = mesh.sidecar(SidecarSpec::new("a", NO_APP.parse().unwrap()).service("web", service));
    let client = http1_client();
    let in_flight = "trellis_bulkhead_in_flight";
    let hold_one = |headers: &'static [(&'static str, &'static str)]| {
        let (client, via) = (client.clone(), a.outbound);
        let mut held = JoinSet::new();
        held.spawn(async move { call(&client, via, "/hold", headers).await });
        held
    };

    // A request no route matches takes the `default` pool; its waiter gives up after
    // maxPendingTime.
    let held = hold_one(&[]);
    wait_for_gauge(a.admin, in_flight, "default", 1.0).await;
    let started = Instant::now();
    let answer = call(&client, a.outbound, "/", &[]).await;
    let waited = started.elapsed();
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.body
    );
    assert_eq!(answer.error(), "bulkhead-full");
    assert!(
        answer.body.contains("maxPendingTime of 300ms"),
        "{}",
        answer.body
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "gave up after {waited:?}"
    );
    release_all(&hold, held).await;

    // Without maxPendingTime the route's timeout bounds the wait: the mesh's 504.
    let held = hold_one(&[("x-class", "patient")]);
    wait_for_gauge(a.admin, in_flight, "patient", 1.0).await;
    let started = Instant::now();
    let answer = call(
        &client,
        a.outbound,
        "/",
        &[("x-class", "patient"), ("x-timed", "yes")],
    )
    .await;
    let waited = started.elapsed();
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.body
    );
    assert_eq!(answer.error(), "timeout");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "gave up after {waited:?}"
    );

    // A waiter with neither limit is served once the slot frees.
    let mut waiter = JoinSet::new();
    let (waiter_client, via) = (client.clone(), a.outbound);
    waiter.spawn(async move { call(&waiter_client, via, "/", &[("x-class", "patient")]).await });
    wait_for_gauge(a.admin, "trellis_bulkhead_queued", "patient", 1.0).await;
    release_all(&hold, held).await;
    let answer = within("the waiter", waiter.join_next())
        .await
        .unwrap()
        .unwrap();
    answer.assert_ok("web");

    let metrics = scrape(a.admin).await;
    for pool in ["default", "patient"] {
        let labels = [("service", "web"), ("pool", pool)];
        assert_eq!(
            metric_value(&metrics, "trellis_bulkhead_rejected_total", &labels),
            1.0,
            "{pool}"
        );
    }
}
