//! The store keeps what was applied across restarts, refuses an invalid batch whole,
//! and keeps its file private.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::os::unix::fs::PermissionsExt;

use trellis_control_plane::store::{Change, ResourceKey, Store, StoreError};
use trellis_crds::{Document, parse_documents};

const POLICY: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: payment, namespace: shop}
spec:
  service: payment
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"#;

fn route(weight_v2: u32) -> String {
    format!(
        r#"
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {{name: payment, namespace: shop}}
spec:
  service: payment
  rules: [{{backends: [{{subset: v1, weight: 90}}, {{subset: v2, weight: {weight_v2}}}]}}]
"#
    )
}

fn docs(yaml: &str) -> Vec<Document> {
    parse_documents(yaml).unwrap()
}

fn key(kind: &str, name: &str) -> ResourceKey {
    ResourceKey {
        kind: kind.into(),
        namespace: Some("shop".into()),
        name: name.into(),
    }
}

#[test]
fn applied_resources_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let applied = store.apply(&docs(POLICY)).unwrap();
        assert_eq!(applied.revision, 1);
        assert_eq!(applied.changes[0].1, Change::Created);
        // A route naming a subset of the policy applied before validates against it.
        let applied = store.apply(&docs(&route(10))).unwrap();
        assert_eq!(applied.revision, 2);
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.revision().unwrap(), 2);
    let route = store.get(&key("TrafficRoute", "payment")).unwrap().unwrap();
    assert_eq!(route, docs(&self::route(10)).remove(0));
    assert_eq!(store.list(None).unwrap().len(), 2);
    assert_eq!(store.list(Some("DestinationPolicy")).unwrap().len(), 1);

    let mode = std::fs::metadata(dir.path().join("trellis.redb"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn reapplying_the_same_thing_changes_nothing_and_an_update_bumps_the_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .apply(&docs(&format!("{POLICY}---{}", route(10))))
        .unwrap();
    let again = store.apply(&docs(&route(10))).unwrap();
    assert_eq!(again.revision, 1);
    assert_eq!(again.changes[0].1, Change::Unchanged);
    let updated = store.apply(&docs(&route(20))).unwrap();
    assert_eq!(
        (updated.revision, updated.changes[0].1),
        (2, Change::Updated)
    );
}

#[test]
fn an_invalid_batch_is_refused_whole_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .apply(&docs(&format!("{POLICY}---{}", route(10))))
        .unwrap();
    // A valid update to the route, and a route naming a subset that does not exist.
    let bad = format!(
        "{}---{}",
        route(50),
        route(1)
            .replace("name: payment,", "name: other,")
            .replace("subset: v2", "subset: v9")
    );
    let err = store.apply(&docs(&bad)).unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)));
    let message = err.to_string();
    assert!(
        message.contains("spec.rules[0].backends[1].subset"),
        "{message}"
    );
    assert_eq!(store.revision().unwrap(), 1);
    let route = store.get(&key("TrafficRoute", "payment")).unwrap().unwrap();
    assert_eq!(
        route,
        docs(&self::route(10)).remove(0),
        "the good half was not written"
    );
}

#[test]
fn delete_removes_and_reports_absence() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.apply(&docs(POLICY)).unwrap();
    assert!(store.delete(&key("DestinationPolicy", "payment")).unwrap());
    assert!(!store.delete(&key("DestinationPolicy", "payment")).unwrap());
    assert_eq!(store.revision().unwrap(), 2);
    assert!(
        store
            .get(&key("DestinationPolicy", "payment"))
            .unwrap()
            .is_none()
    );
}

#[test]
fn secrets_are_made_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path())
        .unwrap()
        .secret("join-token-key", 32)
        .unwrap();
    assert_eq!(first.len(), 32);
    let second = Store::open(dir.path())
        .unwrap()
        .secret("join-token-key", 32)
        .unwrap();
    assert_eq!(first, second);
    let other = Store::open(dir.path())
        .unwrap()
        .secret("api-token", 32)
        .unwrap();
    assert_ne!(first, other);
}

#[test]
fn a_policy_change_that_strands_a_stored_route_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .apply(&docs(&format!("{POLICY}---{}", route(10))))
        .unwrap();

    // Dropping subset v2, which the stored route still sends 10% to.
    let without_v2 = POLICY.replace(", {name: v2, labels: {version: v2}}", "");
    let err = store.apply(&docs(&without_v2)).unwrap_err();
    assert!(err.to_string().contains("no subset \"v2\""), "{err}");

    // Deleting the policy the route depends on.
    let err = store
        .delete(&key("DestinationPolicy", "payment"))
        .unwrap_err();
    assert!(err.to_string().contains("no subset"), "{err}");
    assert_eq!(store.revision().unwrap(), 1, "nothing changed");

    // Once the route no longer uses v2, the policy may drop it.
    let v1_only = route(0).replace(", {subset: v2, weight: 0}", "");
    store
        .apply(&docs(&format!("{without_v2}---{v1_only}")))
        .unwrap();
}

#[test]
fn an_existing_store_file_is_made_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trellis.redb");
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    Store::open(dir.path()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}
