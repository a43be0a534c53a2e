//! The sidecar injector as the API server sees it: AdmissionReviews in, responses
//! with a JSONPatch out. The patch applied to the pod of the fixture must give the
//! golden pod (`UPDATE_GOLDEN=1` rewrites it after a deliberate change).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{path::PathBuf, sync::Arc, time::Duration};

use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use trellis_ca::{Authority, AuthorityConfig, TrustDomain};
use trellis_control_plane::webhook::{self, Webhook};
use trellis_crds::injection::InjectionSettings;

const DNS_NAME: &str = "trellis-control-plane.trellis-system.svc";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webhook")
}

fn fixture() -> Value {
    let text = std::fs::read_to_string(fixtures().join("review-pod.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn settings() -> InjectionSettings {
    InjectionSettings {
        proxy_image: "registry.example/trellis-proxy:test".into(),
        ..InjectionSettings::default()
    }
}

fn respond(review: &Value) -> (StatusCode, Value) {
    webhook::review(review.to_string().as_bytes(), &settings())
}

/// The response's patch, decoded, or `None` when there is none.
fn patch_of(answer: &Value) -> Option<json_patch::Patch> {
    let response = &answer["response"];
    let encoded = response.get("patch")?.as_str().unwrap();
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

fn injected_pod(review: &Value, answer: &Value) -> Value {
    let patch = patch_of(answer).expect("a patch");
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

#[test]
fn a_pod_of_a_labelled_namespace_gets_a_patch_that_yields_the_golden_pod() {
    let review = fixture();
    let (status, answer) = respond(&review);
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], true);
    let pod = injected_pod(&review, &answer);

    let golden = fixtures().join("pod-injected.golden.json");
    let rendered = serde_json::to_string_pretty(&pod).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &rendered).unwrap();
    }
    let expected = std::fs::read_to_string(&golden)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", golden.display()));
    assert_eq!(
        rendered,
        expected,
        "the injected pod differs from {}; if the change is meant, rerun with UPDATE_GOLDEN=1",
        golden.display()
    );

    // What the golden file must hold whatever else changes.
    let inits = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits[0]["name"], "trellis-init");
    assert_eq!(inits[1]["name"], "trellis-proxy");
    assert_eq!(inits[1]["restartPolicy"], "Always");
    assert_eq!(inits[1]["image"], "registry.example/trellis-proxy:test");
    assert_eq!(
        pod["metadata"]["annotations"]["trellis.dev/injected"],
        "true"
    );
    // The app and what it had are untouched, but for its HTTP probe, which now goes
    // through the proxy's admin port (the redirect would send it to mTLS).
    let mut app = review["request"]["object"]["spec"]["containers"].clone();
    app[0]["readinessProbe"]["httpGet"] =
        json!({"path": "/app-probe/orders/readiness", "port": 15020, "scheme": "HTTP"});
    assert_eq!(pod["spec"]["containers"], app);
    // The app's own init container comes after the two of the mesh, whole.
    assert_eq!(
        inits[2],
        review["request"]["object"]["spec"]["initContainers"][0]
    );
    assert_eq!(
        pod["metadata"]["ownerReferences"],
        review["request"]["object"]["metadata"]["ownerReferences"]
    );
}

#[test]
fn opted_out_and_already_injected_pods_are_allowed_unchanged() {
    let mut opted_out = fixture();
    opted_out["request"]["object"]["metadata"]["annotations"] =
        json!({"trellis.dev/inject": "disabled"});
    let (status, answer) = respond(&opted_out);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(patch_of(&answer).is_none(), "{answer}");

    let review = fixture();
    let (_, answer) = respond(&review);
    let mut again = review.clone();
    again["request"]["object"] = injected_pod(&review, &answer);
    let (status, answer) = respond(&again);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(patch_of(&answer).is_none(), "injected twice: {answer}");
}

#[test]
fn malformed_reviews_get_an_error_response_naming_the_problem() {
    let (status, answer) = webhook::review(b"{not json", &settings());
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("not an AdmissionReview"), "{message}");

    let (status, answer) = respond(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"
    }));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("no request"),
        "{answer}"
    );

    // A Deployment: the webhook configuration is wrong; say so, do not guess.
    let mut deployment = fixture();
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    deployment["request"]["object"] = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "orders"},
        "spec": {"selector": {}, "template": {}}
    });
    let (status, answer) = respond(&deployment);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["response"]["uid"], deployment["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("pods only") && message.contains("Deployment"),
        "{message}"
    );

    // A "Pod" whose containers are not a list.
    let mut broken = fixture();
    broken["request"]["object"]["spec"]["containers"] = json!("orders");
    let (status, answer) = respond(&broken);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("not a valid Pod"), "{message}");

    // A pod the injector cannot name a service for is refused with the fix.
    let mut nameless = fixture();
    nameless["request"]["object"]["metadata"]["labels"] = json!({});
    let (_, answer) = respond(&nameless);
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("trellis.dev/service"), "{message}");
}

async fn post(
    addr: std::net::SocketAddr,
    authority: &Authority,
    server_name: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes), String> {
    let mut roots = rustls::RootCertStore::empty();
    for root in authority.trust_bundle().roots() {
        roots.add(root.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(trellis_ca::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::post("/inject")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Ok((status, body))
}

#[tokio::test]
async fn the_webhook_serves_reviews_over_tls_with_a_certificate_from_the_mesh_ca() {
    let authority = Arc::new(
        Authority::generate(AuthorityConfig {
            trust_domain: TrustDomain::parse("cluster.local").unwrap(),
            max_leaf_ttl: Duration::from_secs(7 * 24 * 3600),
        })
        .unwrap(),
    );
    let webhook =
        Arc::new(Webhook::new(authority.clone(), vec![DNS_NAME.to_string()], settings()).unwrap());
    assert_eq!(
        webhook.ca_bundle_pem(),
        authority.trust_bundle().to_pem().into_bytes()
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(webhook.serve(listener, shutdown.clone()));

    let review = fixture();
    let (status, body) = post(addr, &authority, DNS_NAME, review.to_string().into_bytes())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    let pod = injected_pod(&review, &answer);
    assert_eq!(pod["spec"]["initContainers"][1]["name"], "trellis-proxy");

    // A bad body gets a 400 with a message, and the server keeps serving.
    let (status, body) = post(addr, &authority, DNS_NAME, b"[]".to_vec())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("not an AdmissionReview"));
    let (status, _) = post(
        addr,
        &authority,
        DNS_NAME,
        vec![b' '; webhook::MAX_BODY_BYTES + 1],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // The certificate names the Service, nothing else.
    let error = post(addr, &authority, "other.trellis-system.svc", b"{}".to_vec())
        .await
        .unwrap_err();
    assert!(error.contains("certificate"), "{error}");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
