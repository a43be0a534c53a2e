//! Real TLS 1.3 handshakes (tokio-rustls over an in-memory duplex) between parties
//! holding CA-issued SVIDs, and every way a handshake must fail.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod pki;

use std::{sync::Arc, time::Duration};

use pki::{FixedCert, TestPki, id};
use rustls::pki_types::ServerName;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
use trellis_ca::{Credentials, SpiffeId, client_config, peer_id, server_config};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/storefront";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/payment";

/// What each side saw: the client's view of the server and the server's view of the
/// client, each after one request/response round trip.
struct Outcome {
    client: Result<SpiffeId, String>,
    server: Result<SpiffeId, String>,
}

fn connector(creds: &Credentials, expected: Option<&str>) -> TlsConnector {
    TlsConnector::from(Arc::new(client_config(creds, expected.map(id)).unwrap()))
}

fn acceptor(creds: &Credentials) -> TlsAcceptor {
    TlsAcceptor::from(Arc::new(server_config(creds).unwrap()))
}

async fn connect(
    connector: &TlsConnector,
    io: DuplexStream,
) -> std::io::Result<client::TlsStream<DuplexStream>> {
    let name = ServerName::try_from("payment.mesh").unwrap();
    connector.connect(name, io).await
}

async fn exchange(connector: TlsConnector, acceptor: TlsAcceptor) -> Outcome {
    let (client_io, server_io) = tokio::io::duplex(16 * 1024);
    let server = async move {
        let mut tls: server::TlsStream<DuplexStream> = acceptor
            .accept(server_io)
            .await
            .map_err(|e| e.to_string())?;
        let peer = peer_id(tls.get_ref().1.peer_certificates()).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    };
    let client = async move {
        let mut tls = connect(&connector, client_io)
            .await
            .map_err(|e| e.to_string())?;
        let peer = peer_id(tls.get_ref().1.peer_certificates()).map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"pong");
        Ok::<_, String>(peer)
    };
    // A refusal must end both sides: a hang here fails the test instead of stalling it.
    let (client, server) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(client, server)
    })
    .await
    .expect("handshake hung");
    Outcome { client, server }
}

fn assert_refused(result: &Result<SpiffeId, String>, reason: &str) {
    match result {
        Ok(id) => panic!("expected a refusal naming {reason:?}, but the peer was accepted as {id}"),
        Err(e) => assert!(e.contains(reason), "refusal {e:?} does not name {reason:?}"),
    }
}

#[tokio::test]
async fn svid_holders_complete_mtls_and_see_each_others_ids() {
    let pki = TestPki::new("mesh");
    let client = pki.creds(pki.svid(CLIENT));
    let server = pki.creds(pki.svid(SERVER));

    let outcome = exchange(connector(&client, Some(SERVER)), acceptor(&server)).await;
    assert_eq!(outcome.client, Ok(id(SERVER)));
    assert_eq!(outcome.server, Ok(id(CLIENT)));

    // Without an expected id, any server chaining to the bundle is accepted.
    let outcome = exchange(connector(&client, None), acceptor(&server)).await;
    assert_eq!(outcome.client, Ok(id(SERVER)));
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let pki = TestPki::new("mesh");
    let server = pki.creds(pki.svid(SERVER));
    let client = pki.creds_without_svid();
    let outcome = exchange(connector(&client, Some(SERVER)), acceptor(&server)).await;
    assert_refused(&outcome.server, "no certificates");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let pki = TestPki::new("mesh");
    let other = TestPki::new("intruder");
    let server = pki.creds(pki.svid(SERVER));
    // The intruder trusts our root, so only the server's check stands in the way.
    let client = trellis_ca::Credentials::with_svid(
        other.svid(CLIENT),
        pki.authority.trust_bundle().clone(),
    );
    let outcome = exchange(connector(&client, Some(SERVER)), acceptor(&server)).await;
    assert_refused(&outcome.server, "UnknownIssuer");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn server_from_another_ca_is_refused() {
    let pki = TestPki::new("mesh");
    let other = TestPki::new("intruder");
    let client = pki.creds(pki.svid(CLIENT));
    let server = other.creds(other.svid(SERVER));
    let outcome = exchange(connector(&client, Some(SERVER)), acceptor(&server)).await;
    assert_refused(&outcome.client, "UnknownIssuer");
}

/// Presents a forged client certificate and returns the server's verdict.
async fn server_verdict_on_forged_client(uris: &[&str], not_after: OffsetDateTime) -> Outcome {
    let pki = TestPki::new("mesh");
    let server = pki.creds(pki.svid(SERVER));
    let now = OffsetDateTime::now_utc();
    let forged = pki.forged(uris, now - time::Duration::days(2), not_after);
    let mut config = client_config(&pki.creds_without_svid(), Some(id(SERVER))).unwrap();
    config.client_auth_cert_resolver = Arc::new(FixedCert(Arc::new(forged)));
    exchange(TlsConnector::from(Arc::new(config)), acceptor(&server)).await
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let past = OffsetDateTime::now_utc() - time::Duration::days(1);
    let outcome = server_verdict_on_forged_client(&[CLIENT], past).await;
    assert_refused(&outcome.server, "xpired");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn leaf_without_uri_san_is_refused() {
    let future = OffsetDateTime::now_utc() + time::Duration::days(1);
    let outcome = server_verdict_on_forged_client(&[], future).await;
    assert_refused(&outcome.server, "no URI SAN");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn leaf_with_two_uri_sans_is_refused() {
    let future = OffsetDateTime::now_utc() + time::Duration::days(1);
    let outcome = server_verdict_on_forged_client(&[CLIENT, SERVER], future).await;
    assert_refused(&outcome.server, "2 URI SANs");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn leaf_whose_uri_is_not_spiffe_is_refused() {
    let future = OffsetDateTime::now_utc() + time::Duration::days(1);
    let outcome = server_verdict_on_forged_client(&["https://example.com/x"], future).await;
    assert_refused(&outcome.server, "not a SPIFFE id");
}

#[tokio::test]
async fn client_from_a_foreign_trust_domain_is_refused() {
    // Chains to our own root, but names another trust domain.
    let future = OffsetDateTime::now_utc() + time::Duration::days(1);
    let foreign = "spiffe://elsewhere.example/ns/shop/sa/storefront";
    let outcome = server_verdict_on_forged_client(&[foreign], future).await;
    assert_refused(
        &outcome.server,
        "is not in this workload's trust domain cluster.local",
    );
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let pki = TestPki::new("mesh");
    let client = pki.creds(pki.svid(CLIENT));
    let now = OffsetDateTime::now_utc();
    let forged = pki.forged(
        &[SERVER],
        now - time::Duration::days(2),
        now - time::Duration::days(1),
    );
    let mut config = server_config(&pki.creds_without_svid()).unwrap();
    config.cert_resolver = Arc::new(FixedCert(Arc::new(forged)));
    let outcome = exchange(
        connector(&client, Some(SERVER)),
        TlsAcceptor::from(Arc::new(config)),
    )
    .await;
    assert_refused(&outcome.client, "xpired");
}

#[tokio::test]
async fn server_with_unexpected_id_is_refused() {
    let pki = TestPki::new("mesh");
    let client = pki.creds(pki.svid(CLIENT));
    // A valid mesh member, but not the one the control plane said lives there.
    let impostor = pki.creds(pki.svid("spiffe://cluster.local/ns/shop/sa/analytics"));
    let outcome = exchange(connector(&client, Some(SERVER)), acceptor(&impostor)).await;
    assert_refused(
        &outcome.client,
        "presented spiffe://cluster.local/ns/shop/sa/analytics but spiffe://cluster.local/ns/shop/sa/payment was expected",
    );
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn rotation_serves_the_new_cert_and_keeps_established_connections() {
    let pki = TestPki::new("mesh");
    let client = pki.creds(pki.svid(CLIENT));
    let first = pki.svid(SERVER);
    let first_serial = first.serial().to_string();
    let server = pki.creds(first);
    let acceptor = acceptor(&server);
    let connector = connector(&client, Some(SERVER));

    // Connection 1, established with the first certificate, left open.
    let (client_io, server_io) = tokio::io::duplex(16 * 1024);
    let (c1, s1) = tokio::join!(connect(&connector, client_io), acceptor.accept(server_io));
    let (mut c1, mut s1) = (c1.unwrap(), s1.unwrap());
    let serial_of = |certs: Option<&[rustls::pki_types::CertificateDer<'_>]>| {
        let leaf = &certs.unwrap()[0];
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
        cert.raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(serial_of(c1.get_ref().1.peer_certificates()), first_serial);

    // Rotate: no config is rebuilt, the same acceptor is reused.
    let second = pki.svid(SERVER);
    let second_serial = second.serial().to_string();
    assert_ne!(first_serial, second_serial);
    server.set_svid(second);

    let (client_io, server_io) = tokio::io::duplex(16 * 1024);
    let (c2, s2) = tokio::join!(connect(&connector, client_io), acceptor.accept(server_io));
    let (c2, _s2) = (c2.unwrap(), s2.unwrap());
    assert_eq!(serial_of(c2.get_ref().1.peer_certificates()), second_serial);
    assert_eq!(server.svid().unwrap().serial(), second_serial);

    // The old connection still carries data both ways.
    c1.write_all(b"still").await.unwrap();
    c1.flush().await.unwrap();
    let mut buf = [0u8; 5];
    s1.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still");
    s1.write_all(b"here!").await.unwrap();
    s1.flush().await.unwrap();
    c1.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"here!");
}

#[tokio::test]
async fn a_bundle_with_the_new_root_admits_peers_of_both_roots() {
    let old = TestPki::new("old");
    let new = TestPki::new("new");
    let both = old
        .authority
        .trust_bundle()
        .merged(new.authority.trust_bundle());
    let server = Credentials::with_svid(new.svid(SERVER), both.clone());
    let client = Credentials::with_svid(old.svid(CLIENT), both);
    let outcome = exchange(connector(&client, Some(SERVER)), acceptor(&server)).await;
    assert_eq!(outcome.client, Ok(id(SERVER)));
    assert_eq!(outcome.server, Ok(id(CLIENT)));
}

#[tokio::test]
async fn optional_client_auth_admits_a_newcomer_but_still_checks_a_certificate() {
    let pki = TestPki::new("mesh");
    let server = pki.creds(pki.svid(SERVER));
    let optional = |creds: &Credentials| {
        let config =
            trellis_ca::server_config_with(creds, trellis_ca::ClientAuth::Optional).unwrap();
        TlsAcceptor::from(Arc::new(config))
    };

    // No certificate yet: the handshake completes, and the server knows there is no id.
    let (client_io, server_io) = tokio::io::duplex(16 * 1024);
    let newcomer = connector(&pki.creds_without_svid(), Some(SERVER));
    let (client, accepted) = tokio::join!(
        connect(&newcomer, client_io),
        optional(&server).accept(server_io)
    );
    let accepted = accepted.unwrap();
    assert!(client.is_ok());
    assert!(accepted.get_ref().1.peer_certificates().is_none());

    // A certificate of another CA is still refused.
    let other = TestPki::new("intruder");
    let intruder = Credentials::with_svid(other.svid(CLIENT), pki.authority.trust_bundle().clone());
    let outcome = exchange(connector(&intruder, Some(SERVER)), optional(&server)).await;
    assert_refused(&outcome.server, "UnknownIssuer");
}
