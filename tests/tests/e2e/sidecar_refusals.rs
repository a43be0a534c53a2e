//! What the mesh refuses, and how: plaintext, foreign CAs and foreign identities at
//! the inbound; a server with the wrong id at the outbound. Never a hang.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use trellis_api::config::{EndpointConfig, MtlsMode};
use trellis_ca::{Credentials, client_config};
use trellis_tests::{
    apps,
    mesh::{Mesh, Sidecar, SidecarSpec, http1_client, metric_value, scrape, workload_id},
    pki::{FixedCert, TestPki},
    within,
};

/// Dials the inbound over TLS with `config`, sends an HTTP/2 preface and reads: a
/// refused client sees the connection fail instead of an answer.
async fn tls_exchange(sidecar: &Sidecar, config: rustls::ClientConfig) -> Result<usize, String> {
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(sidecar.inbound)
        .await
        .unwrap();
    let name = ServerName::try_from("mesh").unwrap();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf).await {
        Ok(0) => Err("closed".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

async fn tls_errors(sidecar: &Sidecar, reason: &str) -> f64 {
    metric_value(
        &scrape(sidecar.admin).await,
        "trellis_tls_handshake_errors_total",
        &[("direction", "inbound"), ("reason", reason)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_inbound_refuses_plaintext() {
    let mesh = Mesh::new();
    let (app, _) = apps::http_app("b", Duration::ZERO).await;
    let b = mesh.sidecar(SidecarSpec::new("b", app));
    let request = Request::get(format!("http://{}/", b.inbound))
        .body(Full::<Bytes>::default())
        .unwrap();
    let result = within("plaintext", http1_client().request(request)).await;
    assert!(
        result.is_err(),
        "plaintext was answered: {:?}",
        result.map(|r| r.status())
    );
    assert_eq!(tls_errors(&b, "plaintext").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refuses_a_client_from_another_ca() {
    let mesh = Mesh::new();
    let (app, _) = apps::http_app("b", Duration::ZERO).await;
    let b = mesh.sidecar(SidecarSpec::new("b", app));
    let intruder = TestPki::new("intruder");
    // It trusts our root, so only the inbound's check can stop it.
    let creds = Credentials::with_svid(
        intruder.svid(&workload_id("a")),
        mesh.pki.authority.trust_bundle().clone(),
    );
    let config = client_config(&creds, Some(b.identity.parse().unwrap())).unwrap();
    let result = within("foreign CA", tls_exchange(&b, config)).await;
    assert!(result.is_err(), "a client of another CA was answered");
    assert_eq!(tls_errors(&b, "unknown_issuer").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refuses_an_id_outside_the_trust_domain() {
    let mesh = Mesh::new();
    let (app, _) = apps::http_app("b", Duration::ZERO).await;
    let b = mesh.sidecar(SidecarSpec::new("b", app));
    // Chains to the mesh root, but is not a cluster.local identity.
    let now = OffsetDateTime::now_utc();
    let forged = mesh.pki.forged(
        &["spiffe://elsewhere.example/ns/default/sa/a"],
        now - time::Duration::hours(1),
        now + time::Duration::hours(1),
    );
    let mut config = client_config(&mesh.pki.creds_without_svid(), None).unwrap();
    config.client_auth_cert_resolver = Arc::new(FixedCert(Arc::new(forged)));
    let result = within("foreign id", tls_exchange(&b, config)).await;
    assert!(result.is_err(), "a foreign identity was answered");
    assert_eq!(tls_errors(&b, "invalid_identity").await, 1.0);

    // The same path with a proper identity is answered, so the refusal above is real.
    let creds = mesh.pki.creds(mesh.pki.svid(&workload_id("a")));
    let config = client_config(&creds, Some(b.identity.parse().unwrap())).unwrap();
    assert!(within("mesh id", tls_exchange(&b, config)).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_refuses_a_server_with_the_wrong_id() {
    let mesh = Mesh::new();
    let (app, _) = apps::http_app("b", Duration::ZERO).await;
    let b = mesh.sidecar(SidecarSpec::new("b", app));
    let wrong = EndpointConfig {
        address: b.inbound,
        identity: workload_id("not-b"),
        labels: Default::default(),
    };
    let a =
        mesh.sidecar(SidecarSpec::new("a", "127.0.0.1:9".parse().unwrap()).to("b", vec![wrong]));
    let request = Request::get(format!("http://{}/", a.outbound))
        .header(header::HOST, "b")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = within("wrong id", http1_client().request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers()["x-trellis-error"],
        "tls-handshake-failed"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    let reason = format!(
        "{} but {} was expected",
        workload_id("b"),
        workload_id("not-b")
    );
    assert!(body.contains(&reason), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_inbound_takes_plaintext_without_a_peer_id() {
    let mesh = Mesh::new();
    let (app, _) = apps::http_app("b", Duration::ZERO).await;
    let mut spec = SidecarSpec::new("b", app);
    spec.mtls = MtlsMode::Permissive;
    let b = mesh.sidecar(spec);
    let request = Request::get(format!("http://{}/", b.inbound))
        .header(header::HOST, "b")
        .header("x-trellis-peer-id", workload_id("forged"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = within("permissive", http1_client().request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // A plaintext caller has no verified id, and a claimed one is dropped.
    assert_eq!(response.headers()["x-app-peer-id"], "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_inbound_passes_opaque_plaintext_tcp() {
    let mesh = Mesh::new();
    let echo = apps::tcp_echo().await;
    let mut spec = SidecarSpec::new("cache", echo);
    spec.mtls = MtlsMode::Permissive;
    spec.app_protocol = "tcp";
    let b = mesh.sidecar(spec);
    let mut tcp = tokio::net::TcpStream::connect(b.inbound).await.unwrap();
    tcp.write_all(b"\x00\x01not http at all").await.unwrap();
    let mut back = [0u8; 17];
    within("plaintext tcp", tcp.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, b"\x00\x01not http at all");
}
