//! The control plane in universal mode with real sidecars: certification with join
//! tokens, config pushed and ACKed, routing changes that traffic follows, a control
//! plane that dies under load and comes back, certificate rotation under a long
//! stream, and sidecars that vanish.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use serde_json::Value;
use trellis_tests::{
    apps,
    client::Answer,
    control_plane::{ControlPlane, ControlPlaneSpec, MeshSidecar, MeshSidecarSpec, WEB_POLICY},
    echo::{Message, echo_client::EchoClient},
    mesh::admin_get,
    within,
};

const NOWHERE: &str = "127.0.0.1:9";

fn id(service: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{service}")
}

/// GETs `path` of `service` through a sidecar's outbound listener, as its app would.
async fn get(outbound: SocketAddr, service: &str, path: &str) -> Answer {
    trellis_tests::client::get(outbound, service, path).await
}

async fn ready(sidecar: &MeshSidecar) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = admin_get(sidecar.admin, "/ready").await;
        if status == StatusCode::OK {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never became ready: {body}",
            sidecar.service
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_certify_and_carry_mtls_traffic_from_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let (app, _) = apps::http_app("b", Duration::ZERO).await;
    let b = cp.sidecar(MeshSidecarSpec::new("b", app)).await;
    let a = cp
        .sidecar(MeshSidecarSpec::new("a", NOWHERE.parse().unwrap()))
        .await;
    ready(&a).await;
    ready(&b).await;
    cp.converged(2).await;

    let response = get(a.outbound, "b", "/").await;
    assert_eq!(response.status, StatusCode::OK, "{response:?}");
    assert_eq!(response.header("x-app-name"), "b");
    // b's sidecar verified a's certificate, which the control plane issued.
    assert_eq!(response.header("x-app-peer-id"), id("a"));

    let endpoints = cp.endpoints().await;
    let listed: Vec<(&str, &str, bool)> = endpoints
        .iter()
        .map(|e| {
            (
                e["service"].as_str().unwrap(),
                e["identity"].as_str().unwrap(),
                e["healthy"].as_bool().unwrap(),
            )
        })
        .collect();
    // a's app does not listen: a is registered but not healthy.
    let (a_id, b_id) = (id("a"), id("b"));
    assert_eq!(
        listed,
        [("a", a_id.as_str(), false), ("b", b_id.as_str(), true)]
    );
    assert_eq!(endpoints[1]["address"], b.inbound.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_foreign_join_tokens_get_no_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let (app, _) = apps::http_app("b", Duration::ZERO).await;

    // A token for a, offered by a sidecar that says it is b: it will not even ask
    // (the CA's own refusal is tested in control-plane/tests/identity.rs).
    let a_token = cp.join_token_file("a", "1h").await;
    let impostor = tokio::task::block_in_place(|| {
        cp.sidecar_command(&MeshSidecarSpec::new("b", app), &a_token)
            .output()
            .unwrap()
    });
    assert!(!impostor.status.success());
    let stderr = String::from_utf8_lossy(&impostor.stderr);
    assert!(
        stderr.contains("\"a\"") || stderr.contains("/sa/a"),
        "{stderr}"
    );
    let token_text = std::fs::read_to_string(&a_token).unwrap();
    assert!(
        !stderr.contains(token_text.trim()),
        "the token leaked: {stderr}"
    );

    // A token whose signature was tampered with.
    let good = std::fs::read_to_string(cp.join_token_file("b", "1h").await).unwrap();
    let (signed, _) = good.rsplit_once('.').unwrap();
    let forged = dir.path().join("forged.token");
    std::fs::write(
        &forged,
        format!("{signed}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    )
    .unwrap();
    let mut spec = MeshSidecarSpec::new("b", app);
    spec.join_token = Some(forged);
    let mut forger = cp.sidecar(spec).await;
    let refusal = forger
        .process
        .wait_for_log(|l| l.to_string().contains("signature"))
        .expect("the forged token's refusal is logged");
    assert!(refusal.to_string().contains("signature"), "{refusal}");
    assert_eq!(
        admin_get(forger.admin, "/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(
        cp.proxies().await.is_empty(),
        "no certificate, no subscription"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_requests_without_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    for token in [None, Some("wrong"), Some("")] {
        for (method, path) in [
            (Method::GET, "/v1/status"),
            (Method::GET, "/v1/proxies"),
            (Method::POST, "/v1/tokens"),
            (Method::POST, "/v1/apply"),
        ] {
            let (status, answer) = cp
                .call_with_token(method.clone(), path, Some("{}"), token)
                .await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
            assert!(answer["error"].as_str().unwrap().contains("bearer token"));
        }
    }
    let (status, _) = cp.call(Method::GET, "/v1/status", None).await;
    assert_eq!(status, StatusCode::OK);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("api-token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

/// Every example applies, and reads back as it was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_round_trips_through_apply_and_get() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/examples");
    let mut files: Vec<_> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3);
    for file in files {
        let yaml = std::fs::read_to_string(&file).unwrap();
        let (status, answer) = cp.apply(&yaml).await;
        assert_eq!(status, StatusCode::OK, "{}: {answer}", file.display());
        for document in trellis_crds::parse_documents(&yaml).unwrap() {
            let mut path = format!("/v1/resources/{}/{}", document.kind(), document.name());
            if let Some(ns) = document.namespace() {
                path.push_str(&format!("?namespace={ns}"));
            }
            let (status, stored) = cp.call(Method::GET, &path, None).await;
            assert_eq!(status, StatusCode::OK, "{path}: {stored}");
            let written: Value = serde_json::from_slice(&document.to_json().unwrap()).unwrap();
            assert_eq!(stored["spec"], written["spec"], "{path}");
            assert_eq!(stored["kind"], written["kind"]);
        }
    }
}

fn web_route(subset: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficRoute\nmetadata: {{name: web}}\n\
         spec:\n  service: web\n  rules:\n  - backends: [{{subset: {subset}, weight: 100}}]\n"
    )
}

async fn versions_served(via: &MeshSidecar, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let response = get(via.outbound, "web", "/").await;
        assert_eq!(response.status, StatusCode::OK, "{response:?}");
        seen.push(response.header("x-app-name").to_string());
    }
    seen.sort();
    seen.dedup();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_change_reaches_every_sidecar_within_a_second_and_traffic_follows() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let (status, answer) = cp
        .apply(&format!("{WEB_POLICY}---\n{}", web_route("v1")))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (v1_app, _) = apps::http_app("web-v1", Duration::ZERO).await;
    let (v2_app, _) = apps::http_app("web-v2", Duration::ZERO).await;
    let _v1 = cp
        .sidecar(MeshSidecarSpec::new("web", v1_app).label("version", "v1"))
        .await;
    let _v2 = cp
        .sidecar(MeshSidecarSpec::new("web", v2_app).label("version", "v2"))
        .await;
    let a = cp
        .sidecar(MeshSidecarSpec::new("a", NOWHERE.parse().unwrap()))
        .await;
    let before = cp.converged(3).await;
    assert_eq!(versions_served(&a, 20).await, ["web-v1"]);

    let start = Instant::now();
    let (status, answer) = cp.apply(&web_route("v2")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["changes"][0]["change"], "updated");
    // Every sidecar runs a new version within a second of the apply.
    loop {
        let proxies = cp.proxies().await;
        let all_new = proxies.iter().all(|p| {
            p["state"] == "ACKED"
                && before
                    .iter()
                    .find(|b| b["instance"] == p["instance"])
                    .is_some_and(|b| b["ackedVersion"] != p["ackedVersion"])
        });
        if all_new {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "not every sidecar ACKed the new config within 1 s: {proxies:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(versions_served(&a, 20).await, ["web-v2"]);

    // An invalid route is refused whole, with the field path, and changes nothing.
    let settled = cp.converged(3).await;
    let bad = format!("{WEB_POLICY}---\n{}", web_route("v3"));
    let (status, answer) = cp.apply(&bad).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("spec.rules[0].backends[0].subset"),
        "{error}"
    );
    let (_, route) = cp
        .call(Method::GET, "/v1/resources/trafficroute/web", None)
        .await;
    assert_eq!(route["spec"]["rules"][0]["backends"][0]["subset"], "v2");
    assert_eq!(cp.converged(3).await, settled);
    assert_eq!(versions_served(&a, 10).await, ["web-v2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_the_control_plane_dying_and_sidecars_reconnect_to_its_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let (status, _) = cp.apply(WEB_POLICY).await;
    assert_eq!(status, StatusCode::OK);
    let (app, _) = apps::http_app("web", Duration::ZERO).await;
    let _web = cp.sidecar(MeshSidecarSpec::new("web", app)).await;
    let a = cp
        .sidecar(MeshSidecarSpec::new("a", NOWHERE.parse().unwrap()))
        .await;
    cp.converged(2).await;

    // Load through a → web for the whole test.
    let (ok, failed, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let load = {
        let (outbound, ok, failed, stop) = (a.outbound, ok.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let response = get(outbound, "web", "/").await;
                let counter = if response.status == StatusCode::OK {
                    &ok
                } else {
                    &failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let grpc = cp.grpc;
    cp.process.kill();
    let at_kill = ok.load(Ordering::Relaxed);
    // The control plane is gone: traffic keeps flowing on the last config and certs.
    let deadline = Instant::now() + Duration::from_secs(20);
    while ok.load(Ordering::Relaxed) < at_kill + 200 {
        assert!(
            Instant::now() < deadline,
            "traffic stalled without the control plane"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let cp = ControlPlane::start(
        dir.path(),
        &ControlPlaneSpec {
            grpc_addr: grpc,
            ..ControlPlaneSpec::default()
        },
    );
    let (status, policy) = cp
        .call(Method::GET, "/v1/resources/destinationpolicy/web", None)
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the applied policy survived: {policy}"
    );
    assert_eq!(policy["spec"]["subsets"][1]["name"], "v2");
    cp.converged(2).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed");
    assert!(ok.load(Ordering::Relaxed) > at_kill + 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_sidecar_leaves_the_others_endpoints_within_the_heartbeat_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        dir.path(),
        &ControlPlaneSpec {
            heartbeat_timeout: "2s",
            ..ControlPlaneSpec::default()
        },
    );
    let (app, _) = apps::http_app("web", Duration::ZERO).await;
    let frozen = cp.sidecar(MeshSidecarSpec::new("web", app)).await;
    let killed = cp.sidecar(MeshSidecarSpec::new("web", app)).await;
    let a = cp
        .sidecar(MeshSidecarSpec::new("a", NOWHERE.parse().unwrap()))
        .await;
    cp.converged(3).await;
    let web_endpoints = || async {
        let (_, config) = admin_get(a.admin, "/config").await;
        let config: Value = serde_json::from_str(&config).unwrap();
        let mut addrs: Vec<String> = config["config"]["services"]["web"]["endpoints"]
            .as_array()
            .unwrap_or_else(|| panic!("{config:#}"))
            .iter()
            .map(|e| e["address"].as_str().unwrap().to_string())
            .collect();
        addrs.sort();
        addrs
    };
    let mut both = vec![frozen.inbound.to_string(), killed.inbound.to_string()];
    both.sort();
    assert_eq!(web_endpoints().await, both);

    // A sidecar that dies closes its stream: it leaves at once.
    let mut killed = killed;
    killed.process.kill();
    let deadline = Instant::now() + Duration::from_secs(2);
    while web_endpoints().await != [frozen.inbound.to_string()] {
        assert!(
            Instant::now() < deadline,
            "the dead sidecar was not removed"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // A frozen one keeps its connection open but stops heartbeating.
    frozen.process.signal("STOP");
    let stopped = Instant::now();
    while !web_endpoints().await.is_empty() {
        assert!(
            stopped.elapsed() < Duration::from_millis(3500),
            "the silent sidecar was not removed within the 2 s heartbeat timeout"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        stopped.elapsed() >= Duration::from_millis(1000),
        "removed before its timeout"
    );
    let endpoints = cp.endpoints().await;
    assert!(
        endpoints.iter().all(|e| e["service"] != "web"),
        "{endpoints:#?}"
    );
    let response = get(a.outbound, "web", "/").await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.header("x-trellis-error"), "no-endpoints");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_a_long_stream_and_new_connections_get_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let app = apps::grpc_app().await;
    let mut spec = MeshSidecarSpec::new("inventory", app);
    spec.cert_ttl = Some("3s");
    let mut b = cp.sidecar(spec).await;
    let a = cp
        .sidecar(MeshSidecarSpec::new("order", NOWHERE.parse().unwrap()))
        .await;
    cp.converged(2).await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", a.outbound))
        .unwrap()
        .origin("http://inventory".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut client = EchoClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = within(
        "open the stream",
        client.chat(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap()
    .into_inner();
    let mut serials = Vec::new();
    for round in 0..3 {
        tx.send(Message {
            text: format!("round {round}"),
        })
        .await
        .unwrap();
        let reply = within("reply", replies.message()).await.unwrap().unwrap();
        assert_eq!(reply.text, format!("echo: round {round}"));
        // The next rotation of b's certificate, while the stream stays open.
        let renewed = b
            .process
            .wait_for_log(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("certificate") && m.contains("renewed"))
            })
            .expect("b renews its certificate");
        serials.push(renewed["serial"].to_string());
        // A new connection to b is served with the certificate just issued.
        let presented = inbound_serial(&cp, b.inbound).await;
        assert_eq!(
            presented,
            renewed["serial"].as_str().unwrap(),
            "round {round}"
        );
    }
    serials.dedup();
    assert_eq!(serials.len(), 3, "three distinct certificates: {serials:?}");
    tx.send(Message {
        text: "last".into(),
    })
    .await
    .unwrap();
    let reply = within("reply", replies.message()).await.unwrap().unwrap();
    assert_eq!(reply.text, "echo: last");
}

/// The serial (hex) of the certificate a sidecar's inbound listener presents now,
/// seen by a client holding an SVID from the control plane's CA.
async fn inbound_serial(cp: &ControlPlane, inbound: SocketAddr) -> String {
    let authority = trellis_ca::Authority::load_or_create(
        &cp.data_dir.join("ca"),
        trellis_ca::AuthorityConfig {
            trust_domain: trellis_ca::TrustDomain::parse("cluster.local").unwrap(),
            max_leaf_ttl: Duration::from_secs(3600),
        },
    )
    .unwrap();
    let me = trellis_ca::SpiffeId::parse(&id("prober")).unwrap();
    let key = trellis_ca::WorkloadKey::generate().unwrap();
    let issued = authority
        .sign_csr(&key.csr(&me).unwrap(), &me, Duration::from_secs(600))
        .unwrap();
    let svid = trellis_ca::Svid::new(
        std::iter::once(issued.leaf).chain(issued.chain).collect(),
        key.private_key_der(),
    )
    .unwrap();
    let creds = trellis_ca::Credentials::with_svid(svid, authority.trust_bundle().clone());
    let mut config = trellis_ca::client_config(&creds, None).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("inventory").unwrap();
    let tls = within("handshake", connector.connect(name, tcp))
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_the_sidecar_cannot_use_is_nacked_shown_and_the_old_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let relay = trellis_tests::relay::Relay::start(dir.path(), cp.grpc).await;
    let (app, _) = apps::http_app("web", Duration::ZERO).await;
    let _web = cp.sidecar(MeshSidecarSpec::new("web", app)).await;
    let mut spec = MeshSidecarSpec::new("a", NOWHERE.parse().unwrap());
    spec.control_plane = Some(relay.addr);
    let a = cp.sidecar(spec).await;
    let before = cp.converged(2).await;
    let a_before = before.iter().find(|p| p["service"] == "a").unwrap().clone();
    assert_eq!(get(a.outbound, "web", "/").await.status, StatusCode::OK);

    // From now on a gets configs with a field it does not know (a newer control plane).
    relay.corrupt.store(true, Ordering::Relaxed);
    let (status, answer) = cp
        .apply(&format!("{WEB_POLICY}---\n{}", web_route("v1")))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let nacked = loop {
        let proxies = cp.proxies().await;
        if let Some(p) = proxies
            .iter()
            .find(|p| p["service"] == "a" && p["state"] == "NACKED")
        {
            break p.clone();
        }
        assert!(Instant::now() < deadline, "no NACK shown: {proxies:#?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let error = nacked["nack"]["error"].as_str().unwrap();
    assert!(error.contains("futureField"), "{error}");
    assert_eq!(nacked["ackedVersion"], a_before["ackedVersion"]);
    assert_ne!(nacked["latestVersion"], a_before["ackedVersion"]);
    let (_, status) = cp.call(Method::GET, "/v1/status", None).await;
    assert_eq!(status["nacks"], 1);

    // a still runs its last good config: no route, web reachable.
    let (_, config) = admin_get(a.admin, "/config").await;
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["config"]["version"], a_before["ackedVersion"]);
    assert_eq!(get(a.outbound, "web", "/").await.status, StatusCode::OK);

    // The operator sees it.
    let proxies = cp.trellisctl(&["get", "proxies"]);
    assert!(proxies.success, "{proxies:?}");
    let line = proxies
        .stdout
        .lines()
        .find(|l| l.contains("NACKED"))
        .unwrap_or_else(|| panic!("no NACKED proxy in {}", proxies.stdout));
    assert!(line.contains("futureField"), "{line}");
    let check = cp.trellisctl(&["check"]);
    assert!(!check.success, "check passes with a NACK: {check:?}");
    assert!(
        check.stdout.contains("NACK") || check.stdout.contains("nack"),
        "{check:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trellisctl_applies_lists_mints_and_checks_against_the_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/examples");
    let applied = cp.trellisctl(&["apply", "-f", examples]);
    assert!(applied.success, "{applied:?}");
    assert!(
        applied.stdout.contains("trafficroute shop/payment created"),
        "{}",
        applied.stdout
    );
    let again = cp.trellisctl(&["apply", "-f", examples]);
    assert!(
        again.stdout.lines().all(|l| l.ends_with("unchanged")),
        "{again:?}"
    );

    let routes = cp.trellisctl(&["get", "trafficroutes", "-n", "shop"]);
    assert!(
        routes.success && routes.stdout.contains("payment"),
        "{routes:?}"
    );
    let as_json = cp.trellisctl(&["get", "tr", "payment", "-n", "shop", "-o", "json"]);
    let route: Value = serde_json::from_str(&as_json.stdout).unwrap();
    assert_eq!(route["spec"]["service"], "payment");

    // A token minted by trellisctl admits a sidecar.
    let minted = cp.trellisctl(&["token", "create", "--service", "web", "--ttl", "10m"]);
    assert!(minted.success, "{minted:?}");
    let token = dir.path().join("web.token");
    std::fs::write(&token, minted.stdout.trim()).unwrap();
    let (app, _) = apps::http_app("web", Duration::ZERO).await;
    let mut spec = MeshSidecarSpec::new("web", app);
    spec.join_token = Some(token);
    let web = cp.sidecar(spec).await;
    ready(&web).await;
    cp.converged(1).await;

    let endpoints = cp.trellisctl(&["get", "endpoints"]);
    assert!(
        endpoints.stdout.contains(&web.inbound.to_string()),
        "{endpoints:?}"
    );
    assert!(endpoints.stdout.contains(&id("web")), "{endpoints:?}");
    let proxies = cp.trellisctl(&["get", "proxies"]);
    assert!(proxies.stdout.contains("ACKED"), "{proxies:?}");
    let check = cp.trellisctl(&["check"]);
    assert!(check.success, "{check:?}");

    let deleted = cp.trellisctl(&["delete", "authz", "payment", "-n", "shop"]);
    assert!(deleted.success, "{deleted:?}");
    let gone = cp.trellisctl(&["get", "authz", "payment", "-n", "shop"]);
    assert!(
        !gone.success && gone.stderr.starts_with("error:"),
        "{gone:?}"
    );
}
