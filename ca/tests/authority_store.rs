//! The CA's files: created once and kept, keys 0600, open keys refused, operator
//! material checked.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use trellis_ca::{
    Authority, AuthorityConfig, AuthorityError, OperatorCa, TrustBundle, TrustDomain,
};

fn config() -> AuthorityConfig {
    AuthorityConfig {
        trust_domain: TrustDomain::parse("cluster.local").unwrap(),
        max_leaf_ttl: Duration::from_secs(24 * 3600),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn root_is_created_once_with_private_key_files_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let first = Authority::load_or_create(dir.path(), config()).unwrap();
    assert_eq!(mode(&dir.path().join("root-key.pem")), 0o600);
    assert_eq!(mode(&dir.path().join("intermediate-key.pem")), 0o600);

    let second = Authority::load_or_create(dir.path(), config()).unwrap();
    assert_eq!(first.trust_bundle().roots(), second.trust_bundle().roots());
    assert_eq!(first.trust_bundle().roots().len(), 1);
    // The persisted root certificate is the bundle, byte for byte.
    let on_disk = std::fs::read_to_string(dir.path().join("root.pem")).unwrap();
    assert_eq!(
        TrustBundle::from_pem(&on_disk).unwrap().roots(),
        first.trust_bundle().roots()
    );
}

#[test]
fn a_key_file_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    Authority::load_or_create(dir.path(), config()).unwrap();
    let key = dir.path().join("root-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Authority::load_or_create(dir.path(), config()).unwrap_err();
    assert!(
        matches!(err, AuthorityError::KeyFileTooOpen { mode: 0o644, .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("root-key.pem") && message.contains("chmod 600"),
        "{message}"
    );
}

#[test]
fn half_a_root_is_refused_rather_than_replaced() {
    let dir = tempfile::tempdir().unwrap();
    Authority::load_or_create(dir.path(), config()).unwrap();
    std::fs::remove_file(dir.path().join("root-key.pem")).unwrap();
    let err = Authority::load_or_create(dir.path(), config()).unwrap_err();
    assert!(
        err.to_string()
            .contains("only one of root.pem and root-key.pem"),
        "{err}"
    );
    assert!(dir.path().join("root.pem").exists());
}

#[test]
fn a_lost_intermediate_is_reissued_under_the_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let first = Authority::load_or_create(dir.path(), config()).unwrap();
    let old = std::fs::read(dir.path().join("intermediate.pem")).unwrap();
    std::fs::remove_file(dir.path().join("intermediate.pem")).unwrap();
    let second = Authority::load_or_create(dir.path(), config()).unwrap();
    assert_eq!(first.trust_bundle().roots(), second.trust_bundle().roots());
    assert_ne!(
        std::fs::read(dir.path().join("intermediate.pem")).unwrap(),
        old
    );
}

#[test]
fn corrupt_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    Authority::load_or_create(dir.path(), config()).unwrap();
    std::fs::write(dir.path().join("root.pem"), "not a certificate").unwrap();
    let err = Authority::load_or_create(dir.path(), config()).unwrap_err();
    assert!(err.to_string().contains("root.pem"), "{err}");
}

#[test]
fn operator_material_must_hang_together() {
    let a = Authority::generate(config()).unwrap();
    let b = Authority::generate(config()).unwrap();
    let dir_a = tempfile::tempdir().unwrap();
    let stored = Authority::load_or_create(dir_a.path(), config()).unwrap();
    let read = |name: &str| std::fs::read_to_string(dir_a.path().join(name)).unwrap();

    // The stored files, handed back as operator material, load.
    let loaded = Authority::from_operator(
        config(),
        OperatorCa {
            roots_pem: &read("root.pem"),
            intermediate_cert_pem: &read("intermediate.pem"),
            intermediate_key_pem: &read("intermediate-key.pem"),
        },
    )
    .unwrap();
    assert_eq!(loaded.trust_bundle().roots(), stored.trust_bundle().roots());

    // An intermediate that no given root signed is refused.
    let err = Authority::from_operator(
        config(),
        OperatorCa {
            roots_pem: &b.trust_bundle().to_pem(),
            intermediate_cert_pem: &read("intermediate.pem"),
            intermediate_key_pem: &read("intermediate-key.pem"),
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("not signed by any of the roots"),
        "{err}"
    );

    // A key that is not the intermediate's is refused.
    let err = Authority::from_operator(
        config(),
        OperatorCa {
            roots_pem: &read("root.pem"),
            intermediate_cert_pem: &read("intermediate.pem"),
            intermediate_key_pem: &read("root-key.pem"),
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    // A leaf cannot serve as a root.
    let err = Authority::from_operator(
        config(),
        OperatorCa {
            roots_pem: "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
            intermediate_cert_pem: &read("intermediate.pem"),
            intermediate_key_pem: &read("intermediate-key.pem"),
        },
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("roots:"), "{err}");
    drop(a);
}

#[test]
fn trust_bundle_pem_round_trips_and_refuses_non_ca_certs() {
    let a = Authority::generate(config()).unwrap();
    let b = Authority::generate(config()).unwrap();
    let both = a.trust_bundle().merged(b.trust_bundle());
    assert_eq!(both.roots().len(), 2);
    assert_eq!(
        both.merged(a.trust_bundle()).roots().len(),
        2,
        "merging is idempotent"
    );
    let parsed = TrustBundle::from_pem(&both.to_pem()).unwrap();
    assert_eq!(parsed.roots(), both.roots());

    let err = TrustBundle::from_pem("").unwrap_err();
    assert!(err.to_string().contains("no CERTIFICATE block"), "{err}");

    let leaf = rcgen::generate_simple_self_signed(vec!["x.example".into()]).unwrap();
    let err = TrustBundle::from_pem(&leaf.cert.pem()).unwrap_err();
    assert!(
        err.to_string().contains("root #0") && err.to_string().contains("not a CA"),
        "{err}"
    );
}

#[test]
fn authority_debug_never_shows_keys() {
    let a = Authority::generate(config()).unwrap();
    let debug = format!("{a:?}");
    assert!(
        debug.contains("cluster.local") && !debug.contains("PRIVATE KEY"),
        "{debug}"
    );
}
