//! The CA's costs against baselines measured in the same run:
//!
//! - `sign/*`: `Authority::sign_csr` (parse, verify the CSR, check SANs and key, sign)
//!   against rcgen signing the same leaf with no checks at all.
//! - `mtls_handshake/*`: a full TLS 1.3 mutual handshake with the SPIFFE verifiers
//!   against the same handshake with rustls' stock webpki verifiers and DNS SANs.
//!
//! Run: `cargo bench -p trellis-bench --bench ca`. Throughput is in elements/s.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{sync::Arc, time::Duration};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SanType,
};
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
    pki_types::{PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
};
use trellis_bench::tls_memory::handshake;
use trellis_ca::{
    Authority, AuthorityConfig, Credentials, SpiffeId, Svid, TrustDomain, WorkloadKey,
    client_config, crypto_provider, server_config,
};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/storefront";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/payment";
const TTL: Duration = Duration::from_secs(24 * 3600);

fn authority() -> Authority {
    Authority::generate(AuthorityConfig {
        trust_domain: TrustDomain::parse("cluster.local").unwrap(),
        max_leaf_ttl: TTL,
    })
    .unwrap()
}

fn svid(ca: &Authority, id: &str) -> Svid {
    let id = SpiffeId::parse(id).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let issued = ca.sign_csr(&key.csr(&id).unwrap(), &id, TTL).unwrap();
    let mut chain = vec![issued.leaf];
    chain.extend(issued.chain);
    Svid::new(chain, key.private_key_der()).unwrap()
}

fn signing(c: &mut Criterion) {
    let ca = authority();
    let id = SpiffeId::parse(SERVER).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&id).unwrap();

    // Baseline: the bare signature over an equivalent leaf.
    let issuer_key = KeyPair::generate().unwrap();
    let mut issuer_params = CertificateParams::default();
    issuer_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let issuer = CertifiedIssuer::self_signed(issuer_params, issuer_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(SERVER.try_into().unwrap())];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];

    let mut group = c.benchmark_group("sign");
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline_rcgen_sign_only", |b| {
        b.iter(|| leaf.signed_by(&leaf_key, &issuer).unwrap())
    });
    group.bench_function("trellis_sign_csr", |b| {
        b.iter(|| ca.sign_csr(&csr, &id, TTL).unwrap())
    });
    group.finish();
}

/// rustls' stock mTLS: webpki verifiers, a DNS SAN, the same key type and TLS 1.3.
fn stock_configs() -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let root = CertifiedIssuer::self_signed(
        {
            let mut p = CertificateParams::default();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p
        },
        KeyPair::generate().unwrap(),
    )
    .unwrap();
    let leaf = |dns: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![dns.to_string()]).unwrap();
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &root).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    };
    let mut roots = RootCertStore::empty();
    roots.add(root.der().clone()).unwrap();
    let roots = Arc::new(roots);
    let provider = crypto_provider();
    let (server_chain, server_key) = leaf("payment.shop.svc");
    let (client_chain, client_key) = leaf("storefront.shop.svc");
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .unwrap(),
        )
        .with_single_cert(server_chain, server_key)
        .unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(client_chain, client_key)
        .unwrap();
    (Arc::new(client), Arc::new(server))
}

fn handshakes(c: &mut Criterion) {
    let ca = authority();
    let bundle = ca.trust_bundle().clone();
    let client_creds = Credentials::with_svid(svid(&ca, CLIENT), bundle.clone());
    let server_creds = Credentials::with_svid(svid(&ca, SERVER), bundle);
    let expected = SpiffeId::parse(SERVER).unwrap();
    let trellis_client = Arc::new(client_config(&client_creds, Some(expected)).unwrap());
    let trellis_server = Arc::new(server_config(&server_creds).unwrap());
    let (stock_client, stock_server) = stock_configs();

    let run = |client: &Arc<ClientConfig>, server: &Arc<ServerConfig>, name: &str| {
        let mut client = Connection::Client(
            ClientConnection::new(
                client.clone(),
                ServerName::try_from(name.to_string()).unwrap(),
            )
            .unwrap(),
        );
        let mut server = Connection::Server(ServerConnection::new(server.clone()).unwrap());
        handshake(&mut client, &mut server).unwrap();
    };

    let mut group = c.benchmark_group("mtls_handshake");
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline_rustls_webpki_dns", |b| {
        b.iter(|| run(&stock_client, &stock_server, "payment.shop.svc"))
    });
    group.bench_function("trellis_spiffe", |b| {
        b.iter(|| run(&trellis_client, &trellis_server, "payment.mesh"))
    });
    group.finish();
}

criterion_group!(benches, signing, handshakes);
criterion_main!(benches);
