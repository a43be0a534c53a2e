//! `Authority::sign_csr`: what it issues, and each CSR it refuses, with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod pki;

use std::time::{Duration, SystemTime};

use pki::{TestPki, id};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use time::OffsetDateTime;
use trellis_ca::{CsrError, WorkloadKey, spiffe_id_of};
use x509_parser::extensions::ParsedExtension;

const PAYMENT: &str = "spiffe://cluster.local/ns/shop/sa/payment";
const HOUR: Duration = Duration::from_secs(3600);

fn csr_with_sans(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn refusal(result: Result<trellis_ca::IssuedCert, CsrError>) -> CsrError {
    match result {
        Ok(cert) => panic!(
            "expected a refusal, got a certificate with serial {}",
            cert.serial
        ),
        Err(e) => e,
    }
}

#[test]
fn issues_a_leaf_fit_for_mtls() {
    let pki = TestPki::new("mesh");
    let key = WorkloadKey::generate().unwrap();
    let before = OffsetDateTime::now_utc();
    let issued = pki
        .authority
        .sign_csr(&key.csr(&id(PAYMENT)).unwrap(), &id(PAYMENT), HOUR)
        .unwrap();
    assert_eq!(spiffe_id_of(&issued.leaf).unwrap(), id(PAYMENT));
    assert_eq!(issued.chain.len(), 1, "the intermediate follows the leaf");

    let (_, cert) = x509_parser::parse_x509_certificate(&issued.leaf).unwrap();
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let has = |want: fn(&ParsedExtension<'_>) -> bool| {
        cert.extensions().iter().any(|e| want(e.parsed_extension()))
    };
    assert!(has(|e| matches!(
        e,
        ParsedExtension::SubjectKeyIdentifier(_)
    )));
    assert!(has(|e| matches!(
        e,
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));
    let validity = cert.validity();
    let backdate = before - validity.not_before.to_datetime();
    assert!(backdate >= time::Duration::seconds(59) && backdate <= time::Duration::seconds(62));
    let lifetime = validity.not_after.to_datetime() - before;
    assert!((lifetime - time::Duration::hours(1)).abs() < time::Duration::seconds(5));
    assert_eq!(issued.not_after, validity.not_after.to_datetime());

    // Serials are random: two leaves for the same id differ.
    let again = pki
        .authority
        .sign_csr(&key.csr(&id(PAYMENT)).unwrap(), &id(PAYMENT), HOUR)
        .unwrap();
    assert_ne!(issued.serial, again.serial);
    assert_eq!(issued.serial.len(), 32);
}

#[test]
fn accepts_an_ed25519_key() {
    let pki = TestPki::new("mesh");
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let csr = csr_with_sans(&key, vec![uri(PAYMENT)]);
    pki.authority.sign_csr(&csr, &id(PAYMENT), HOUR).unwrap();
}

#[test]
fn refuses_a_tampered_csr() {
    let pki = TestPki::new("mesh");
    let mut csr = WorkloadKey::generate().unwrap().csr(&id(PAYMENT)).unwrap();
    // Rewrite the signed id to another of the same length: it still parses, but the
    // signature no longer covers what the CSR says.
    let at = csr.windows(7).position(|w| w == b"payment").unwrap();
    csr[at..at + 7].copy_from_slice(b"paymenu");
    let forged_id = id("spiffe://cluster.local/ns/shop/sa/paymenu");
    let e = refusal(pki.authority.sign_csr(&csr, &forged_id, HOUR));
    assert!(matches!(e, CsrError::BadSignature), "{e}");
    assert!(e.to_string().contains("signature does not verify"));
}

#[test]
fn refuses_garbage() {
    let pki = TestPki::new("mesh");
    let e = refusal(
        pki.authority
            .sign_csr(b"\x30\x03not a csr", &id(PAYMENT), HOUR),
    );
    assert!(e.to_string().starts_with("CSR is not valid DER"), "{e}");
    let e = refusal(pki.authority.sign_csr(&[], &id(PAYMENT), HOUR));
    assert!(matches!(e, CsrError::Malformed(_)), "{e}");
}

#[test]
fn refuses_a_csr_for_another_id() {
    let pki = TestPki::new("mesh");
    let other = id("spiffe://cluster.local/ns/shop/sa/order");
    let csr = WorkloadKey::generate().unwrap().csr(&other).unwrap();
    let e = refusal(pki.authority.sign_csr(&csr, &id(PAYMENT), HOUR));
    assert_eq!(
        e.to_string(),
        "CSR asks for spiffe://cluster.local/ns/shop/sa/order but the credential is for \
         spiffe://cluster.local/ns/shop/sa/payment"
    );
}

#[test]
fn refuses_dns_ip_and_email_sans() {
    let pki = TestPki::new("mesh");
    let key = KeyPair::generate().unwrap();
    for (extra, kind) in [
        (
            SanType::DnsName("payment.shop.svc".try_into().unwrap()),
            "DNS",
        ),
        (SanType::IpAddress("10.0.0.1".parse().unwrap()), "IP"),
        (
            SanType::Rfc822Name("ops@example.com".try_into().unwrap()),
            "email",
        ),
    ] {
        let csr = csr_with_sans(&key, vec![uri(PAYMENT), extra]);
        let e = refusal(pki.authority.sign_csr(&csr, &id(PAYMENT), HOUR));
        assert!(
            matches!(e, CsrError::ForbiddenSan { kind: k, .. } if k == kind),
            "{e}"
        );
        assert!(e.to_string().contains(&format!("has a {kind} SAN")), "{e}");
    }
}

#[test]
fn refuses_zero_or_two_uri_sans() {
    let pki = TestPki::new("mesh");
    let key = KeyPair::generate().unwrap();
    let e = refusal(
        pki.authority
            .sign_csr(&csr_with_sans(&key, vec![]), &id(PAYMENT), HOUR),
    );
    assert!(e.to_string().contains("no URI SAN"), "{e}");
    let two = csr_with_sans(
        &key,
        vec![uri(PAYMENT), uri("spiffe://cluster.local/ns/a/sa/b")],
    );
    let e = refusal(pki.authority.sign_csr(&two, &id(PAYMENT), HOUR));
    assert!(e.to_string().contains("2 URI SANs"), "{e}");
}

#[test]
fn refuses_an_id_outside_its_trust_domain() {
    let pki = TestPki::new("mesh");
    let foreign = id("spiffe://elsewhere.example/ns/shop/sa/payment");
    let csr = WorkloadKey::generate().unwrap().csr(&foreign).unwrap();
    let e = refusal(pki.authority.sign_csr(&csr, &foreign, HOUR));
    assert!(
        e.to_string()
            .contains("outside this CA's trust domain cluster.local"),
        "{e}"
    );
}

#[test]
fn refuses_an_over_long_or_zero_ttl() {
    let pki = TestPki::new("mesh");
    let csr = WorkloadKey::generate().unwrap().csr(&id(PAYMENT)).unwrap();
    let e = refusal(pki.authority.sign_csr(&csr, &id(PAYMENT), 25 * HOUR));
    assert!(e.to_string().contains("above the maximum"), "{e}");
    let e = refusal(pki.authority.sign_csr(&csr, &id(PAYMENT), Duration::ZERO));
    assert!(e.to_string().contains("at least one second"), "{e}");
}

#[test]
fn refuses_keys_other_than_p256_and_ed25519() {
    let pki = TestPki::new("mesh");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let csr = csr_with_sans(&key, vec![uri(PAYMENT)]);
    let e = refusal(pki.authority.sign_csr(&csr, &id(PAYMENT), HOUR));
    assert!(matches!(e, CsrError::UnsupportedKey(_)), "{e}");
    assert!(
        e.to_string().contains("only ECDSA P-256 and Ed25519"),
        "{e}"
    );
}

#[test]
fn svid_reports_what_it_holds() {
    let pki = TestPki::new("mesh");
    let svid = pki.svid(PAYMENT);
    assert_eq!(svid.id(), &id(PAYMENT));
    assert_eq!(svid.chain().len(), 2);
    assert!(svid.not_before() < SystemTime::now() && SystemTime::now() < svid.not_after());
    let debug = format!("{svid:?}");
    assert!(
        debug.contains(PAYMENT) && !debug.contains("PRIVATE"),
        "{debug}"
    );
}
