//! Kubernetes mode against the fake API server (`trellis_tests::fake_kube`): the fake
//! itself speaks the protocol `kube` expects, and a control plane in
//! `--mode kubernetes` turns CRDs, Services, EndpointSlices and Pods into the config
//! its sidecars get and the traffic they carry, reports and skips malformed objects,
//! and recovers from broken watches.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use trellis_tests::{
    apps,
    control_plane::{ControlPlane, MeshSidecar, MeshSidecarSpec, control_plane_binary},
    eventually,
    fake_kube::FakeKube,
    mesh::admin_get,
    process::{Process, addr_field},
};

fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "shop"},
        "data": {"k": value},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_api_serves_kube_clients_crud_patch_and_watch() {
    let fake = FakeKube::start().await;
    let client = trellis_control_plane::kubernetes::client(Some(&fake.url()))
        .await
        .unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");

    let created = api
        .create(&PostParams::default(), &config_map("a", "1"))
        .await
        .unwrap();
    let rv1: u64 = created
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    let err = api
        .create(&PostParams::default(), &config_map("a", "1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err}"
    );

    let patch = Patch::Merge(json!({"data": {"k": "2"}}));
    let patched = api
        .patch("a", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap()["k"], "2");
    let rv2: u64 = patched.metadata.resource_version.unwrap().parse().unwrap();
    assert!(rv2 > rv1, "resourceVersion must grow: {rv1} then {rv2}");

    // A stale resourceVersion on replace is a conflict, as on a real server.
    let mut stale = created.clone();
    stale.data = Some([("k".to_string(), "3".to_string())].into());
    let err = api
        .replace("a", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err}"
    );

    // Server-side apply creates what is absent.
    let ssa = PatchParams::apply("test").force();
    let applied = api
        .patch("b", &ssa, &Patch::Apply(config_map("b", "x")))
        .await
        .unwrap();
    assert_eq!(applied.metadata.name.as_deref(), Some("b"));
    assert_eq!(api.list(&Default::default()).await.unwrap().items.len(), 2);

    // A watcher sees the initial state, later changes, and recovers from a broken watch.
    let stream = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if let Ok(cm) = item {
                let _ = tx.send((
                    cm.metadata.name.unwrap(),
                    cm.data.unwrap_or_default()["k"].clone(),
                ));
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = async |want: (&str, &str)| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if seen
                .iter()
                .any(|(n, v): &(String, String)| n == want.0 && v == want.1)
            {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(item)) => seen.push(item),
                _ => panic!("the watcher never saw {want:?}; saw {seen:?}"),
            }
        }
    };
    wait_for(("a", "2")).await;
    wait_for(("b", "x")).await;
    api.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "y"}})),
    )
    .await
    .unwrap();
    wait_for(("b", "y")).await;

    let watches = fake.watches_started();
    fake.break_watches();
    fake.compact();
    eventually("the watcher watches again", || async {
        fake.watches_started() > watches
    })
    .await;
    api.create(&PostParams::default(), &config_map("c", "after"))
        .await
        .unwrap();
    wait_for(("c", "after")).await;

    // Deleting returns the object and the next get is a 404.
    api.delete("a", &Default::default()).await.unwrap();
    let err = api.get("a").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err}"
    );

    // An injected 500 reaches the client as one.
    fake.fail_next(1);
    let err = api.get("b").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 500),
        "{err}"
    );
    api.get("b").await.unwrap();
    task.abort();
}

/// A control plane in `--mode kubernetes` against `fake`, on port 0 everywhere.
fn kubernetes_control_plane(data_dir: &Path, fake: &FakeKube) -> ControlPlane {
    let mut command = Command::new(control_plane_binary());
    command
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--mode", "kubernetes"])
        .args(["--kube-api-server", &fake.url()])
        .args(["--api-addr", "127.0.0.1:0"])
        .args(["--grpc-addr", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0"])
        .args(["--dashboard-addr", "127.0.0.1:0"])
        .args(["--webhook-addr", "127.0.0.1:0"])
        .args(["--debounce", "20ms"])
        .args(["--log-format", "json"]);
    let mut process = Process::spawn("trellis-control-plane", command);
    let listening = process.listening("the control plane in kubernetes mode");
    let addr = |field: &str| addr_field(&listening, field);
    let token = std::fs::read_to_string(data_dir.join("api-token")).unwrap();
    ControlPlane {
        process,
        data_dir: data_dir.to_path_buf(),
        api: addr("api"),
        grpc: addr("grpc"),
        admin: addr("admin"),
        token: token.trim().to_string(),
    }
}

fn service(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

/// A meshed pod (the injector's annotation) of `app` at `ip`.
fn pod(name: &str, app: &str, version: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "shop",
            "labels": {"app": app, "version": version},
            "annotations": {"trellis.dev/injected": "true"},
        },
        "spec": {"serviceAccountName": app, "containers": [{"name": app, "image": app}]},
        "status": {"podIP": ip, "phase": "Running"},
    })
}

/// An EndpointSlice of `service`: (pod, address, port, ready) per endpoint.
fn slice(name: &str, service: &str, endpoints: &[(&str, &str, bool)], port: u16) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(pod, ip, ready)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn policy() -> Value {
    json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "DestinationPolicy",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"service": "api", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ]},
    })
}

/// A TrafficRoute splitting `api` between its subsets.
fn split(v1: u32, v2: u32) -> Value {
    json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficRoute",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"service": "api", "rules": [{"name": "split", "backends": [
            {"subset": "v1", "weight": v1}, {"subset": "v2", "weight": v2},
        ]}]},
    })
}

/// The config `sidecar` runs, as its admin `/config` shows it.
async fn running_config(sidecar: &MeshSidecar) -> Value {
    let (_, config) = admin_get(sidecar.admin, "/config").await;
    let config: Value = serde_json::from_str(&config).unwrap();
    config["config"].clone()
}

/// The (address, identity, version label) of each endpoint of `service` in the config.
async fn endpoints_of(sidecar: &MeshSidecar, service: &str) -> Vec<(String, String, String)> {
    let config = running_config(sidecar).await;
    let mut endpoints: Vec<(String, String, String)> = config["services"][service]["endpoints"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap_or_default().to_string(),
                e["identity"].as_str().unwrap_or_default().to_string(),
                e["labels"]["version"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    endpoints.sort();
    endpoints
}

/// The weights of `api`'s first route in the config, by subset.
async fn api_split(sidecar: &MeshSidecar) -> Vec<(String, u64)> {
    let config = running_config(sidecar).await;
    config["services"]["api"]["routes"][0]["backends"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["subset"].as_str().unwrap_or_default().to_string(),
                b["weight"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

const NOWHERE: &str = "127.0.0.1:9";
const API_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_objects_reach_the_sidecars_config_and_traffic_follows() {
    let fake = FakeKube::start().await;
    // Some of the cluster exists before the control plane starts (the initial list)...
    fake.apply(service("api"));
    fake.apply(policy());
    let dir = tempfile::tempdir().unwrap();
    let cp = kubernetes_control_plane(dir.path(), &fake);

    // The api workload: a real app behind a real sidecar whose certificate says
    // ns/shop/sa/api, the identity the Pod's service account gives its endpoint.
    let (api_app, _) = apps::http_app("api", Duration::ZERO).await;
    let api = cp
        .sidecar(MeshSidecarSpec::new("api", api_app).in_namespace("shop"))
        .await;
    let web = cp
        .sidecar(MeshSidecarSpec::new("web", NOWHERE.parse().unwrap()).in_namespace("shop"))
        .await;
    let inbound = api.inbound;
    let api_address = inbound.to_string();

    // ...the rest arrives on the watches. Pod api-2 is not ready: not an endpoint.
    fake.apply(pod("api-1", "api", "v1", "127.0.0.1"));
    fake.apply(pod("api-2", "api", "v2", "127.0.0.2"));
    fake.apply(slice(
        "api-x1",
        "api",
        &[("api-1", "127.0.0.1", true), ("api-2", "127.0.0.2", false)],
        inbound.port(),
    ));
    let want = vec![(api_address.clone(), API_ID.to_string(), "v1".to_string())];
    eventually("the ready pod's endpoint reaches web's config", || async {
        endpoints_of(&web, "api").await == want
    })
    .await;
    // The endpoint is real: web's sidecar calls it over mTLS with the pod's identity.
    let answer = trellis_tests::client::get(web.outbound, "api", "/hello").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.header("x-app-name"), "api");

    // A TrafficRoute (kubectl apply) splits api; a change to it follows.
    fake.apply(split(90, 10));
    eventually("the split reaches web", || async {
        api_split(&web).await == [("v1".to_string(), 90), ("v2".to_string(), 10)]
    })
    .await;
    // The operator API reads what the cluster holds (`trellisctl get`).
    let (status, routes) = cp
        .call(
            Method::GET,
            "/v1/resources/trafficroute?namespace=shop",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{routes}");
    assert_eq!(routes["items"][0]["metadata"]["name"], "api", "{routes}");
    let (status, got) = cp
        .call(
            Method::GET,
            "/v1/resources/DestinationPolicy/api?namespace=shop",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["spec"]["subsets"][1]["name"], "v2", "{got}");
    fake.apply(split(0, 100));
    eventually("the new weights reach web", || async {
        api_split(&web).await == [("v1".to_string(), 0), ("v2".to_string(), 100)]
    })
    .await;
    // All of it to v2, and no v2 endpoint is ready: web's sidecar says so.
    let answer = trellis_tests::client::get(web.outbound, "api", "/hello").await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.body
    );
    // Relabelling the pod to v2 (a Pod change) makes it v2's endpoint: traffic flows.
    fake.apply(pod("api-1", "api", "v2", "127.0.0.1"));
    eventually("the pod's new labels reach web", || async {
        endpoints_of(&web, "api").await
            == [(api_address.clone(), API_ID.to_string(), "v2".to_string())]
    })
    .await;
    let answer = trellis_tests::client::get(web.outbound, "api", "/hello").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);

    // Deleting the route (kubectl delete) takes it out of the config.
    assert!(
        fake.remove("trellis.dev/v1alpha1", "TrafficRoute", "shop", "api")
            .is_some()
    );
    eventually("the route's deletion reaches web", || async {
        api_split(&web).await.is_empty()
    })
    .await;
    // The endpoint turning unready withdraws it; deleting the Service too.
    fake.apply(slice(
        "api-x1",
        "api",
        &[("api-1", "127.0.0.1", false)],
        inbound.port(),
    ));
    eventually("the unready endpoint leaves web's config", || async {
        endpoints_of(&web, "api").await.is_empty()
    })
    .await;
    fake.apply(slice(
        "api-x1",
        "api",
        &[("api-1", "127.0.0.1", true)],
        inbound.port(),
    ));
    eventually("the ready endpoint is back", || async {
        endpoints_of(&web, "api").await.len() == 1
    })
    .await;
    assert!(fake.remove("v1", "Service", "shop", "api").is_some());
    eventually("the Service's deletion withdraws its endpoints", || async {
        endpoints_of(&web, "api").await.is_empty()
    })
    .await;

    // The operator API shows the cluster's endpoints and refuses writes it does not own.
    fake.apply(service("api"));
    eventually("the endpoints view follows the cluster", || async {
        let items = cp.endpoints().await;
        items.len() == 1 && items[0]["identity"] == API_ID && items[0]["address"] == api_address
    })
    .await;
    let (status, answer) = cp
        .apply("apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {}\n")
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{answer}");
    assert!(
        answer
            .to_string()
            .contains("in kubernetes mode, use kubectl apply"),
        "{answer}"
    );
    let (status, _) = cp
        .call(Method::DELETE, "/v1/resources/TrafficRoute/api", None)
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_object_is_reported_and_skipped_and_a_broken_watch_recovers() {
    let fake = FakeKube::start().await;
    fake.apply(service("api"));
    fake.apply(policy());
    fake.apply(pod("api-1", "api", "v1", "127.0.0.1"));
    fake.apply(slice(
        "api-x1",
        "api",
        &[("api-1", "127.0.0.1", true)],
        8081,
    ));
    // Malformed from the start: `rules` is not a list. It must not break the list.
    fake.put_raw(
        "trellis.dev/v1alpha1",
        "TrafficRoute",
        "shop",
        "broken",
        json!({
            "apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficRoute",
            "metadata": {"name": "broken", "namespace": "shop"},
            "spec": {"service": "api", "rules": "all of them"},
        }),
    );
    fake.apply(split(70, 30));
    let dir = tempfile::tempdir().unwrap();
    let mut cp = kubernetes_control_plane(dir.path(), &fake);
    let web = cp
        .sidecar(MeshSidecarSpec::new("web", NOWHERE.parse().unwrap()).in_namespace("shop"))
        .await;
    eventually(
        "the valid route applies beside the malformed one",
        || async { api_split(&web).await == [("v1".to_string(), 70), ("v2".to_string(), 30)] },
    )
    .await;
    assert_eq!(endpoints_of(&web, "api").await.len(), 1);

    // Reported three ways: the operator API, a metric, and a log line (shown here for
    // a malformed Pod arriving on a watch: the initial list is logged before the
    // control plane says it is listening).
    let (status, source) = cp.call(Method::GET, "/v1/source", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(source["mode"], "kubernetes");
    let problems = source["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{source}");
    assert_eq!(problems[0]["kind"], "TrafficRoute");
    assert_eq!(problems[0]["name"], "broken");
    assert!(
        problems[0]["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("expected a sequence"),
        "{source}"
    );
    let (_, metrics) = admin_get(cp.admin, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l
                == "trellis_control_plane_kubernetes_invalid_objects{kind=\"TrafficRoute\"} 1"),
        "{metrics}"
    );
    fake.put_raw(
        "v1",
        "Pod",
        "shop",
        "api-9",
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "api-9", "namespace": "shop"},
            "spec": {"containers": "not a list"},
        }),
    );
    let logged = cp.process.wait_for_log(|l| {
        let line = l.to_string();
        line.contains("malformed") && line.contains("api-9")
    });
    assert!(logged.is_some(), "no log line names the malformed pod");
    eventually("the malformed pod is reported", || async {
        let (_, source) = cp.call(Method::GET, "/v1/source", None).await;
        source["problems"].as_array().is_some_and(|p| p.len() == 2)
    })
    .await;
    assert_eq!(
        endpoints_of(&web, "api").await.len(),
        1,
        "api-1 still serves"
    );
    fake.remove("v1", "Pod", "shop", "api-9");
    // An invalid (well-formed) object is refused the same way: a subset nobody defines.
    let mut ghost = split(1, 0);
    ghost["metadata"]["name"] = json!("ghost");
    ghost["spec"]["service"] = json!("web");
    ghost["spec"]["rules"][0]["backends"] = json!([{"subset": "v9", "weight": 1}]);
    fake.apply(ghost);
    eventually("the invalid route is reported", || async {
        let (_, source) = cp.call(Method::GET, "/v1/source", None).await;
        source["problems"]
            .as_array()
            .is_some_and(|p| p.len() == 2 && p.iter().any(|p| p["name"] == "ghost"))
    })
    .await;
    assert!(running_config(&web).await["services"]["web"]["routes"].is_null());
    // Fixing the malformed object in place applies it and clears the report.
    fake.remove("trellis.dev/v1alpha1", "TrafficRoute", "shop", "ghost");
    fake.put_raw(
        "trellis.dev/v1alpha1",
        "TrafficRoute",
        "shop",
        "broken",
        json!({
            "apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficRoute",
            "metadata": {"name": "broken", "namespace": "shop"},
            "spec": {"service": "web", "rules": [
                {"name": "fixed", "backends": [{"service": "web", "weight": 1}], "timeout": "3s"},
            ]},
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while running_config(&web).await["services"]["web"]["routes"][0]["name"] != "fixed" {
        let (_, source) = cp.call(Method::GET, "/v1/source", None).await;
        assert!(
            Instant::now() < deadline,
            "the fixed object never applied: {source} {}",
            running_config(&web).await
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (_, source) = cp.call(Method::GET, "/v1/source", None).await;
    assert_eq!(source["problems"], json!([]), "{source}");

    // Every watch breaks with an error, history is compacted (the resume is 410 Gone),
    // and the first requests of the recovery fail too: the watchers back off, list
    // again and carry on. Changes made while they were down arrive.
    let before = fake.watches_started();
    fake.compact();
    fake.fail_next(3);
    fake.break_watches();
    fake.apply(split(20, 80));
    eventually("every kind watches again", || async {
        fake.watches_started() >= before + 8
    })
    .await;
    eventually("the change made during the outage arrives", || async {
        api_split(&web).await == [("v1".to_string(), 20), ("v2".to_string(), 80)]
    })
    .await;
    // And later changes still arrive on the new watches.
    fake.apply(pod("api-2", "api", "v2", "127.0.0.2"));
    fake.apply(slice(
        "api-x1",
        "api",
        &[("api-1", "127.0.0.1", true), ("api-2", "127.0.0.2", true)],
        8081,
    ));
    eventually("a change after the recovery arrives", || async {
        endpoints_of(&web, "api").await.len() == 2
    })
    .await;
    let (_, metrics) = admin_get(cp.admin, "/metrics").await;
    assert!(
        metrics.contains("trellis_control_plane_kubernetes_watch_errors_total"),
        "the broken watches are counted: {metrics}"
    );
}

/// The first `n` lines of a watch on the fake, as `{type, object}` values.
async fn watch_lines(fake: &FakeKube, query: &str, n: usize) -> Vec<Value> {
    use http_body_util::BodyExt;
    let uri = format!(
        "{}/api/v1/namespaces/shop/configmaps?watch=1&{query}",
        fake.url()
    );
    let response = trellis_tests::within(
        "a watch on the fake",
        trellis_tests::mesh::http1_client().get(uri.parse().unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut text = String::new();
    while text.lines().count() < n {
        let frame = trellis_tests::within("a watch event", body.frame())
            .await
            .expect("the watch ended early")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_api_replays_a_watch_from_its_resource_version_and_expires_old_ones() {
    let fake = FakeKube::start().await;
    let cm = |name: &str, v: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": name, "namespace": "shop"}, "data": {"k": v}})
    };
    let first = fake.apply(cm("a", "1"));
    let rv: u64 = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    fake.apply(cm("a", "2"));
    fake.apply(cm("b", "1"));
    fake.remove("v1", "ConfigMap", "shop", "b");
    // Another namespace's object is not in this watch.
    fake.apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "c", "namespace": "other"}}));
    let events = watch_lines(
        &fake,
        &format!("resourceVersion={rv}&allowWatchBookmarks=true"),
        4,
    )
    .await;
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("MODIFIED", "a"),
            ("ADDED", "b"),
            ("DELETED", "b"),
            ("BOOKMARK", "-")
        ],
        "{events:#?}"
    );
    let bookmark: u64 = events[3]["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(bookmark, fake.resource_version());

    // After a compaction, resuming from before it is 410 Gone, as etcd would have it.
    fake.compact();
    let events = watch_lines(&fake, &format!("resourceVersion={rv}"), 1).await;
    assert_eq!(events[0]["type"], "ERROR", "{events:#?}");
    assert_eq!(events[0]["object"]["code"], 410);
    assert_eq!(events[0]["object"]["reason"], "Expired");
}
