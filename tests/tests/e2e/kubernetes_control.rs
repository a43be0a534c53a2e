//! The control plane's own Kubernetes duties against the fake API server: identity by
//! TokenReview, the CA in a Secret and its trust anchors in ConfigMaps, Lease leader
//! election, status written with server-side apply, and the webhook's caBundle.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use kube::Client;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request};
use trellis_api::identity::v1::{
    CertifyRequest, Credential, credential, identity_server::Identity,
};
use trellis_ca::{Authority, AuthorityConfig, SpiffeId, TrustDomain, WorkloadKey};
use trellis_control_plane::{
    compiler::Resources,
    identity::IdentityService,
    join_token::JoinTokens,
    kubernetes::{
        ca_secret, identity::KubeTokenReviewer, leader::LeaderElection, status::StatusWriter,
        webhook_config,
    },
    registry::EndpointView,
    source::{ConfigSource, Mode, Problem},
    store::StoreError,
};
use trellis_tests::{eventually, fake_kube::FakeKube};

const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";
const CONTROL_PLANE: &str = "spiffe://cluster.local/ns/trellis-system/sa/trellis-control-plane";

async fn start() -> (FakeKube, Client) {
    let fake = FakeKube::start().await;
    let client = trellis_control_plane::kubernetes::client(Some(&fake.url()))
        .await
        .unwrap();
    (fake, client)
}

fn config() -> AuthorityConfig {
    AuthorityConfig {
        trust_domain: TrustDomain::parse("cluster.local").unwrap(),
        max_leaf_ttl: Duration::from_secs(3600),
    }
}

/// A TokenReview answer as the API server gives it for the tokens the test knows.
fn review(body: Value) -> Result<Value, (u16, String)> {
    assert_eq!(body["kind"], "TokenReview");
    let audiences = body["spec"]["audiences"].clone();
    let status = match body["spec"]["token"].as_str().unwrap_or_default() {
        "order-token" if audiences == json!(["trellis"]) => json!({
            "authenticated": true,
            "audiences": ["trellis"],
            "user": {"username": "system:serviceaccount:shop:order", "uid": "u-1",
                     "groups": ["system:serviceaccounts", "system:serviceaccounts:shop"]},
        }),
        // The control plane's own account, e.g. in a namespace someone else created
        // where the chart was installed elsewhere.
        "control-plane-token" if audiences == json!(["trellis"]) => json!({
            "authenticated": true,
            "audiences": ["trellis"],
            "user": {"username": "system:serviceaccount:trellis-system:trellis-control-plane"},
        }),
        // A token minted for the API server itself: the authenticator vouches for the
        // user but not for the trellis audience.
        "kube-api-token" => json!({
            "authenticated": true,
            "audiences": ["https://kubernetes.default.svc"],
            "user": {"username": "system:serviceaccount:shop:order"},
        }),
        _ => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    Ok(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {},
        "spec": body["spec"],
        "status": status,
    }))
}

fn certify(token: &str, csr_id: &str, requested: &str) -> Request<CertifyRequest> {
    let key = WorkloadKey::generate().unwrap();
    Request::new(CertifyRequest {
        csr: key.csr(&SpiffeId::parse(csr_id).unwrap()).unwrap(),
        credential: Some(Credential {
            kind: Some(credential::Kind::ServiceAccountToken(token.into())),
        }),
        requested_id: requested.into(),
        ttl_seconds: 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_reviews_service_account_tokens_through_the_api_server() {
    let (fake, client) = start().await;
    fake.on_create("authentication.k8s.io", "tokenreviews", review);
    let identity = IdentityService::new(
        Arc::new(Authority::generate(config()).unwrap()),
        Arc::new(JoinTokens::new(b"0123456789abcdef0123456789abcdef")),
        Duration::from_secs(600),
    )
    .with_token_reviewer(Arc::new(KubeTokenReviewer::new(client)));

    let issued = identity
        .certify(certify("order-token", ORDER, ORDER))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        trellis_ca::spiffe_id_of(&issued.leaf).unwrap().as_str(),
        ORDER
    );

    let payment = "spiffe://cluster.local/ns/shop/sa/payment";
    for (token, csr, requested, needle) in [
        (
            "stolen",
            ORDER,
            ORDER,
            "not authenticated: invalid bearer token",
        ),
        (
            "kube-api-token",
            ORDER,
            ORDER,
            "not for audience \"trellis\"",
        ),
        ("order-token", payment, payment, "the credential is for"),
        ("order-token", payment, ORDER, "CSR asks for"),
        (
            "control-plane-token",
            CONTROL_PLANE,
            CONTROL_PLANE,
            "the control plane's own identity",
        ),
    ] {
        let status = identity
            .certify(certify(token, csr, requested))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{token} {csr}");
        assert!(
            status.message().contains(needle),
            "{token}: {}",
            status.message()
        );
    }

    // The API server failing is not a refusal: the sidecar retries.
    fake.fail_next(1);
    let status = identity
        .certify(certify("order-token", ORDER, ORDER))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_is_created_once_in_a_secret_and_its_roots_reach_meshed_namespaces() {
    let (fake, client) = start().await;
    // Two replicas start together: one creates the Secret, the other reads it.
    let (a, b) = tokio::join!(
        ca_secret::load_or_create(&client, "trellis-system", "trellis-ca", config()),
        ca_secret::load_or_create(&client, "trellis-system", "trellis-ca", config()),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.trust_bundle().to_pem(), b.trust_bundle().to_pem());
    let secret = fake
        .get("v1", "Secret", "trellis-system", "trellis-ca")
        .unwrap();
    let mut keys: Vec<&str> = secret["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(keys, ["ca.crt", "ca.key", "tls.crt", "tls.key"]);
    // A restart reads the same root back.
    let again = ca_secret::load_or_create(&client, "trellis-system", "trellis-ca", config())
        .await
        .unwrap();
    assert_eq!(again.trust_bundle().to_pem(), a.trust_bundle().to_pem());

    // An unusable Secret is named, not replaced.
    fake.apply(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "broken", "namespace": "trellis-system"},
        "data": {"tls.crt": "bm90IGEgY2VydA=="}}));
    let error = ca_secret::load_or_create(&client, "trellis-system", "broken", config())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("trellis-system/broken") && error.contains("expected keys"),
        "{error}"
    );

    for (name, labels) in [
        ("shop", json!({"trellis.dev/inject": "enabled"})),
        ("billing", json!({"trellis.dev/inject": "enabled"})),
        ("kube-system", json!({})),
    ] {
        fake.apply(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}}));
    }
    let written = ca_secret::publish_everywhere(&client, "trellis-system", a.trust_bundle()).await;
    assert_eq!(written, 3);
    for namespace in ["trellis-system", "shop", "billing"] {
        let cm = fake
            .get("v1", "ConfigMap", namespace, "trellis-trust-anchors")
            .unwrap_or_else(|| panic!("no trust anchors in {namespace}"));
        assert_eq!(cm["data"]["ca.crt"], a.trust_bundle().to_pem());
        assert_eq!(cm["data"]["trust-anchors.pem"], a.trust_bundle().to_pem());
    }
    assert!(
        fake.get("v1", "ConfigMap", "kube-system", "trellis-trust-anchors")
            .is_none()
    );
}

fn elector(client: &Client, name: &str) -> LeaderElection {
    let mut elector = LeaderElection::new(client.clone(), "trellis-system", name);
    elector.lease_duration = Duration::from_secs(1);
    elector.renew_every = Duration::from_millis(100);
    elector
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_replica_leads_and_another_takes_over_when_it_stops_renewing() {
    let (fake, client) = start().await;
    let shutdown = CancellationToken::new();
    let (a, task_a) = elector(&client, "cp-a").spawn(shutdown.clone());
    let (b, task_b) = elector(&client, "cp-b").spawn(shutdown.clone());
    eventually("a leader", || async { *a.borrow() || *b.borrow() }).await;
    // Over several renewals, never both and never neither.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let (la, lb) = (*a.borrow(), *b.borrow());
        assert!(la != lb, "cp-a leads: {la}, cp-b leads: {lb}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (leader, follower, leader_task, follower_name) = if *a.borrow() {
        (a.clone(), b.clone(), task_a, "cp-b")
    } else {
        (b.clone(), a.clone(), task_b, "cp-a")
    };
    let lease = fake
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            "trellis-system",
            "trellis-control-plane-leader",
        )
        .unwrap();
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 1);

    // The leader's process dies without a word: its lease runs out, then the other
    // replica takes it.
    leader_task.abort();
    let stopped = Instant::now();
    eventually("the follower takes over", || async { *follower.borrow() }).await;
    assert!(
        stopped.elapsed() >= Duration::from_millis(900),
        "taken over after {:?}, before the lease expired",
        stopped.elapsed()
    );
    drop(leader);
    let lease = fake
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            "trellis-system",
            "trellis-control-plane-leader",
        )
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], follower_name);
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    // A clean stop hands the lease back at once.
    shutdown.cancel();
    eventually("the lease is released", || async {
        fake.get(
            "coordination.k8s.io/v1",
            "Lease",
            "trellis-system",
            "trellis-control-plane-leader",
        )
        .is_some_and(|l| l["spec"]["holderIdentity"].is_null())
    })
    .await;
}

/// A config source that says what the test tells it.
#[derive(Debug, Default)]
struct Fixed {
    canaries: Vec<Value>,
    statuses: Vec<((String, String), Value)>,
    problems: Vec<Problem>,
}

impl ConfigSource for Fixed {
    fn mode(&self) -> Mode {
        Mode::Kubernetes
    }

    fn resources(&self) -> Result<(u64, Resources), StoreError> {
        let mut resources = Resources::default();
        for canary in &self.canaries {
            resources
                .canaries
                .push(serde_json::from_value(canary.clone()).unwrap());
        }
        for (key, status) in &self.statuses {
            resources
                .canary_status
                .insert(key.clone(), serde_json::from_value(status.clone()).unwrap());
        }
        Ok((0, resources))
    }

    fn endpoints(&self) -> Vec<EndpointView> {
        Vec::new()
    }

    fn problems(&self) -> Vec<Problem> {
        self.problems.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_writes_accepted_conditions_and_says_why_one_is_invalid() {
    let (fake, client) = start().await;
    let canary = fake.apply(json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": "recommendations", "namespace": "shop"},
        "spec": {"service": "recommendations", "stableSubset": "v1", "canarySubset": "v2",
                 "steps": [10, 25, 50, 100], "interval": "1m",
                 "analysis": {"minSuccessRate": 99.0, "maxP99Latency": "500ms"}},
    }));
    fake.apply(json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficRoute",
        "metadata": {"name": "broken", "namespace": "shop"},
        "spec": {"service": "payment"},
    }));
    let source = Fixed {
        canaries: vec![canary],
        statuses: vec![(
            ("shop".into(), "recommendations".into()),
            json!({"phase": "Progressing", "weight": 25, "step": 1}),
        )],
        problems: vec![Problem {
            kind: "TrafficRoute".into(),
            namespace: "shop".into(),
            name: "broken".into(),
            error: "spec.rules: at least one rule is required".into(),
        }],
    };
    let mut writer = StatusWriter::new(client, Arc::new(source));
    writer.period = Duration::from_millis(50);
    let (leading_tx, leading) = watch::channel(false);
    let shutdown = CancellationToken::new();
    tokio::spawn(writer.run(leading, shutdown.clone()));

    // A follower writes nothing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let get = |kind: &str, name: &str| {
        fake.get("trellis.dev/v1alpha1", kind, "shop", name)
            .unwrap()
    };
    assert!(get("Canary", "recommendations").get("status").is_none());

    leading_tx.send_replace(true);
    eventually("the canary's condition", || async {
        get("Canary", "recommendations")["status"]["conditions"][0]["type"] == "Accepted"
    })
    .await;
    let canary = get("Canary", "recommendations");
    // Phase and weight are the canary controller's (under its own field manager).
    assert_eq!(canary["status"].get("weight"), None);
    assert_eq!(canary["status"]["conditions"][0]["status"], "True");
    assert_eq!(
        canary["spec"]["steps"],
        json!([10, 25, 50, 100]),
        "spec untouched"
    );
    eventually("the invalid route's condition", || async {
        get("TrafficRoute", "broken")["status"]["conditions"][0]["status"] == "False"
    })
    .await;
    let condition = &get("TrafficRoute", "broken")["status"]["conditions"][0];
    assert_eq!(condition["reason"], "Invalid");
    assert_eq!(
        condition["message"],
        "spec.rules: at least one rule is required"
    );
    assert!(condition["lastTransitionTime"].is_string());

    // Unchanged statuses are not written again.
    let version = fake.resource_version();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.resource_version(), version);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_keeps_the_webhook_ca_bundle_current() {
    let (fake, client) = start().await;
    let webhook = |name: &str| {
        json!({
            "name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"service": {"name": "trellis-control-plane",
                "namespace": "trellis-system", "path": "/inject", "port": 443}},
        })
    };
    fake.apply(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "trellis-sidecar-injector"},
        "webhooks": [webhook("inject.trellis.dev"), webhook("inject-ns.trellis.dev")],
    }));
    let pem = Authority::generate(config())
        .unwrap()
        .trust_bundle()
        .to_pem()
        .into_bytes();
    let (bundle_tx, bundle) = watch::channel(pem.clone());
    let (leading_tx, leading) = watch::channel(false);
    let shutdown = CancellationToken::new();
    tokio::spawn(webhook_config::run(
        client.clone(),
        "trellis-sidecar-injector".into(),
        bundle,
        leading,
        Duration::from_millis(100),
        shutdown.clone(),
    ));
    let bundles = || {
        let config = fake
            .get(
                "admissionregistration.k8s.io/v1",
                "MutatingWebhookConfiguration",
                "",
                "trellis-sidecar-injector",
            )
            .unwrap();
        config["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                w["clientConfig"]["caBundle"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect::<Vec<_>>()
    };
    use base64::Engine;
    let b64 = |pem: &[u8]| base64::engine::general_purpose::STANDARD.encode(pem);

    leading_tx.send_replace(true);
    eventually("caBundle set", || async {
        bundles() == [b64(&pem), b64(&pem)]
    })
    .await;
    let stored = fake
        .get(
            "admissionregistration.k8s.io/v1",
            "MutatingWebhookConfiguration",
            "",
            "trellis-sidecar-injector",
        )
        .unwrap();
    assert_eq!(
        stored["webhooks"][1]["clientConfig"]["service"]["path"], "/inject",
        "the rest is kept"
    );
    assert_eq!(
        webhook_config::sync_ca_bundle(&client, "trellis-sidecar-injector", &pem)
            .await
            .unwrap(),
        0,
        "nothing to do when current"
    );

    // New roots (a rotation) reach the configuration.
    let rotated = Authority::generate(config())
        .unwrap()
        .trust_bundle()
        .to_pem()
        .into_bytes();
    bundle_tx.send_replace(rotated.clone());
    eventually("caBundle rotated", || async {
        bundles() == [b64(&rotated), b64(&rotated)]
    })
    .await;
    shutdown.cancel();
}

/// A self-signed CA certificate valid for `days` more days, PEM.
fn root_pem(days: i64) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
    params.self_signed(&key).unwrap().pem()
}

/// A cluster where Trellis is installed and running; `broken` breaks every part.
fn install(fake: &FakeKube, broken: bool) {
    for plural in [
        "meshconfigs",
        "destinationpolicies",
        "trafficroutes",
        "authorizationpolicies",
        "canaries",
    ] {
        if broken && plural == "canaries" {
            continue;
        }
        fake.apply(json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.trellis.dev")},
            "spec": {"group": "trellis.dev", "names": {"plural": plural, "kind": "X"},
                     "scope": "Namespaced", "versions": []},
        }));
    }
    fake.apply(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "trellis-control-plane", "namespace": "trellis-system"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "cp"}},
                 "template": {"metadata": {"labels": {"app": "cp"}},
                              "spec": {"containers": [{"name": "cp", "image": "cp"}]}}},
        "status": {"replicas": 2, "availableReplicas": if broken { 0 } else { 2 }},
    }));
    let bundle = if broken { "" } else { "LS0tLS1CRUdJTg==" };
    fake.apply(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "trellis-sidecar-injector"},
        "webhooks": [{"name": "inject.trellis.dev", "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "clientConfig": {"caBundle": bundle, "service": {"name": "trellis-control-plane",
                "namespace": "trellis-system", "path": "/inject", "port": 443}}}],
    }));
    fake.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "trellis-control-plane-abcde", "namespace": "trellis-system",
                     "labels": {"kubernetes.io/service-name": "trellis-control-plane"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.7"], "conditions": {"ready": !broken}}],
    }));
    let pem = root_pem(if broken { 10 } else { 3650 });
    fake.apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "trellis-trust-anchors", "namespace": "trellis-system"},
        "data": {"ca.crt": pem},
    }));
}

async fn check_kubernetes(fake: &FakeKube) -> (bool, String) {
    let url = fake.url();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(trellis_tests::control_plane::trellisctl_binary())
            .args(["check", "--kubernetes", "--kube-api-server", &url])
            .env_remove("KUBECONFIG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.success(), stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trellisctl_check_kubernetes_passes_a_healthy_install_and_names_what_is_broken() {
    let healthy = FakeKube::start().await;
    install(&healthy, false);
    let (ok, stdout) = check_kubernetes(&healthy).await;
    assert!(ok, "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    assert!(lines.iter().all(|l| l.starts_with('✔')), "{stdout}");
    assert!(stdout.contains("CRDs installed (5)"), "{stdout}");
    assert!(stdout.contains("2/2 replicas available"), "{stdout}");
    assert!(stdout.contains("1 ready endpoint"), "{stdout}");

    let broken = FakeKube::start().await;
    install(&broken, true);
    let (ok, stdout) = check_kubernetes(&broken).await;
    assert!(!ok, "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    assert!(lines.iter().all(|l| l.starts_with('✘')), "{stdout}");
    for needle in [
        "CRDs missing: canaries.trellis.dev",
        "no available replica",
        "caBundle empty for inject.trellis.dev",
        "no ready endpoints",
        "expires within 30 days",
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }

    // No API server at all: one line saying so, and a failure.
    let gone = broken.url();
    drop(broken);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(trellis_tests::control_plane::trellisctl_binary())
            .args(["check", "--kubernetes", "--kube-api-server", &gone])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains('✘'));
}

/// A `--mode kubernetes` control plane named `pod` (POD_NAME) against `fake`.
fn replica(data_dir: &std::path::Path, fake: &FakeKube, pod: &str) -> Replica {
    let mut command =
        std::process::Command::new(trellis_tests::control_plane::control_plane_binary());
    command
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--mode", "kubernetes", "--kube-api-server", &fake.url()])
        .args(["--api-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--dashboard-addr",
            "127.0.0.1:0",
        ])
        .args(["--webhook-addr", "127.0.0.1:0", "--log-format", "json"])
        .env("POD_NAME", pod)
        .env("POD_NAMESPACE", "trellis-system");
    let mut process = trellis_tests::process::Process::spawn(pod, command);
    let listening = process.listening(pod);
    let token = std::fs::read_to_string(data_dir.join("api-token")).unwrap();
    Replica {
        process,
        api: trellis_tests::process::addr_field(&listening, "api"),
        token: token.trim().to_string(),
    }
}

struct Replica {
    process: trellis_tests::process::Process,
    api: std::net::SocketAddr,
    token: String,
}

impl Replica {
    /// `POST path` on the operator API; the answer's status code and body.
    async fn post(&self, path: &str) -> (u16, String) {
        use http_body_util::BodyExt;
        let request = hyper::Request::post(format!("http://{}{path}", self.api))
            .header("authorization", format!("Bearer {}", self.token))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let response = trellis_tests::within(
            "the operator API",
            trellis_tests::mesh::http1_client().request(request),
        )
        .await
        .unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// Two replicas of the real binary share one CA Secret; one leads and does the
/// leader's work (caBundle, trust anchors, statuses); a stopped leader hands over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_ca_and_one_leads() {
    let fake = FakeKube::start().await;
    fake.apply(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "trellis-sidecar-injector"},
        "webhooks": [{"name": "inject.trellis.dev", "admissionReviewVersions": ["v1"],
            "sideEffects": "None", "clientConfig": {"service": {"name": "trellis-control-plane",
                "namespace": "trellis-system", "path": "/inject", "port": 443}}}],
    }));
    fake.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"trellis.dev/inject": "enabled"}}}));
    // `rules` is not a list: the source skips it, the leader says why.
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
    fake.apply(json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "DestinationPolicy",
        "metadata": {"name": "checkout", "namespace": "shop"},
        "spec": {"service": "checkout", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}}]},
    }));
    fake.apply(json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": "checkout", "namespace": "shop"},
        "spec": {"service": "checkout", "stableSubset": "v1", "canarySubset": "v2",
                 "steps": [10, 50, 100], "interval": "10m",
                 "analysis": {"minSuccessRate": 99.0, "maxP99Latency": "500ms"}},
    }));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = replica(dir_a.path(), &fake, "cp-a");
    let mut b = replica(dir_b.path(), &fake, "cp-b");
    let anchors = |dir: &tempfile::TempDir| {
        std::fs::read_to_string(dir.path().join("trust-anchors.pem")).unwrap()
    };
    assert_eq!(anchors(&dir_a), anchors(&dir_b), "one CA for both replicas");
    assert!(
        fake.get("v1", "Secret", "trellis-system", "trellis-ca")
            .is_some()
    );
    let pem = anchors(&dir_a);

    let holder = || {
        fake.get(
            "coordination.k8s.io/v1",
            "Lease",
            "trellis-system",
            "trellis-control-plane-leader",
        )
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    };
    eventually("a leader", || async { holder().is_some() }).await;
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(pem.as_bytes());
    eventually("the caBundle", || async {
        fake.get(
            "admissionregistration.k8s.io/v1",
            "MutatingWebhookConfiguration",
            "",
            "trellis-sidecar-injector",
        )
        .is_some_and(|c| c["webhooks"][0]["clientConfig"]["caBundle"] == b64)
    })
    .await;
    for namespace in ["trellis-system", "shop"] {
        eventually(&format!("trust anchors in {namespace}"), || async {
            fake.get("v1", "ConfigMap", namespace, "trellis-trust-anchors")
                .is_some_and(|cm| cm["data"]["ca.crt"] == pem.as_str())
        })
        .await;
    }
    eventually("the invalid route's condition", || async {
        fake.get("trellis.dev/v1alpha1", "TrafficRoute", "shop", "broken")
            .is_some_and(|r| r["status"]["conditions"][0]["status"] == "False")
    })
    .await;
    let route = fake
        .get("trellis.dev/v1alpha1", "TrafficRoute", "shop", "broken")
        .unwrap();
    let message = route["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap();
    assert!(message.to_lowercase().contains("sequence"), "{message}");

    // The leader's canary controller starts the canary in the cluster, beside the
    // status writer's condition.
    let canary = || {
        fake.get("trellis.dev/v1alpha1", "Canary", "shop", "checkout")
            .unwrap()["status"]
            .clone()
    };
    eventually("the canary's first step in its status", || async {
        let status = canary();
        status["phase"] == "Progressing"
            && status["weight"] == 10
            && status["conditions"][0]["status"] == "True"
    })
    .await;
    // An operator's action through the replica that does not lead reaches the cluster,
    // and the leader goes on from it rather than from what it wrote before.
    let follower = if holder().as_deref() == Some("cp-a") {
        &b
    } else {
        &a
    };
    let (code, body) = follower
        .post("/v1/canaries/checkout/promote?namespace=shop")
        .await;
    assert_eq!(code, 200, "{body}");
    eventually("the promotion in the canary's status", || async {
        canary()["phase"] == "Promoted" && canary()["weight"] == 100
    })
    .await;
    // Once the follower's watch has it, a second promotion makes no sense.
    eventually("a second promotion refused", || async {
        let (code, body) = follower
            .post("/v1/canaries/checkout/promote?namespace=shop")
            .await;
        code == 409 && body.contains("promoted already")
    })
    .await;
    assert_eq!(canary()["weight"], 100);

    // The leader stops cleanly: it hands the lease back and the other takes it.
    let first = holder().unwrap();
    let (leader, other) = if first == "cp-a" {
        (&mut a, "cp-b")
    } else {
        (&mut b, "cp-a")
    };
    leader.process.signal("TERM");
    assert!(leader.process.wait_exit(Duration::from_secs(10)).success());
    eventually("the other replica leads", || async {
        holder().as_deref() == Some(other)
    })
    .await;
}
