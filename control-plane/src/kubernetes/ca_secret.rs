//! The CA on Kubernetes: its key lives in a Secret in the control plane's namespace
//! (default `trellis-ca`), created once by whichever replica starts first, or
//! supplied by the operator. Its roots are published in the ConfigMap
//! `trellis-trust-anchors` (keys `ca.crt` and `trust-anchors.pem`) in that namespace
//! and in every namespace labelled `trellis.dev/inject=enabled`, where injected
//! sidecars mount it: a pod can only mount a ConfigMap of its own namespace.
//!
//! Secret layouts accepted:
//! - `ca.crt` + `ca.key` (a root and its key), optionally `tls.crt` + `tls.key` (the
//!   intermediate it signed). This is what the control plane creates. Without an
//!   intermediate, or with one within 30 days of its end, a new one is made; the
//!   control plane writes it back only into a Secret it created itself.
//! - `tls.crt` + `tls.key` + `ca.crt` (cert-manager's layout for a Certificate with
//!   `isCA: true`): `tls.crt` is the intermediate that signs workloads, `ca.crt` the
//!   roots. cert-manager renews it; the control plane reads it at start.

use std::{collections::BTreeMap, io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Namespace, Secret},
};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use trellis_ca::{Authority, AuthorityConfig, OperatorCa, TrustBundle};

/// The field manager of everything the control plane writes.
pub const FIELD_MANAGER: &str = "trellis-control-plane";
pub const CA_SECRET: &str = "trellis-ca";
pub const TRUST_ANCHORS_CONFIGMAP: &str = "trellis-trust-anchors";
/// The key the brief and `kubectl` users expect, and the one the injected sidecar reads.
pub const TRUST_ANCHORS_KEYS: [&str; 2] = ["ca.crt", "trust-anchors.pem"];
/// Namespaces whose pods get a sidecar, and so need the trust anchors.
pub const INJECT_SELECTOR: &str = "trellis.dev/inject=enabled";
/// Marks a Secret the control plane created, and so may update.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "trellis-control-plane");

const ROOT_CERT: &str = "ca.crt";
const ROOT_KEY: &str = "ca.key";
const INTERMEDIATE_CERT: &str = "tls.crt";
const INTERMEDIATE_KEY: &str = "tls.key";

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name}: {reason}")]
    Material {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("ConfigMap {namespace}/{TRUST_ANCHORS_CONFIGMAP}: {source}")]
    Anchors {
        namespace: String,
        source: kube::Error,
    },
}

/// The CA of the mesh, from the Secret `name` in `namespace`: read, or created once if
/// absent. Two replicas may race to create it; the loser reads the winner's.
pub async fn load_or_create(
    client: &Client,
    namespace: &str,
    name: &str,
    config: AuthorityConfig,
) -> Result<Authority, CaSecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let api_error = |source| CaSecretError::Api {
        namespace: namespace.into(),
        name: name.into(),
        source,
    };
    let material = |reason: String| CaSecretError::Material {
        namespace: namespace.into(),
        name: name.into(),
        reason,
    };
    let secret = match api.get_opt(name).await.map_err(api_error)? {
        Some(secret) => secret,
        None => {
            let data = {
                let config = config.clone();
                tokio::task::spawn_blocking(move || generate(config))
                    .await
                    .map_err(|e| material(e.to_string()))?
                    .map_err(material)?
            };
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some(namespace.into()),
                    labels: Some(BTreeMap::from([(MANAGED_BY.0.into(), MANAGED_BY.1.into())])),
                    ..Default::default()
                },
                data: Some(data),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    tracing::info!(namespace, name, "created the mesh CA in a Secret");
                    created
                }
                // Another replica created it first: use theirs, so the mesh has one root.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    tracing::info!(
                        namespace,
                        name,
                        "another replica created the CA Secret first"
                    );
                    api.get(name).await.map_err(api_error)?
                }
                Err(e) => return Err(api_error(e)),
            }
        }
    };
    let data = secret.data.clone().unwrap_or_default();
    let ours = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY.0))
        .is_some_and(|v| v == MANAGED_BY.1);
    let (authority, renewed) = {
        let config = config.clone();
        let data = data.clone();
        tokio::task::spawn_blocking(move || load(&data, config))
            .await
            .map_err(|e| material(e.to_string()))?
            .map_err(material)?
    };
    if let Some(intermediate) = renewed
        && ours
    {
        let mut updated = secret;
        updated.data.get_or_insert_default().extend(intermediate);
        // Guarded by the resourceVersion read: if another replica renewed first, its
        // intermediate stays and this one serves with its own, under the same root.
        match api.replace(name, &PostParams::default(), &updated).await {
            Ok(_) => tracing::info!(namespace, name, "stored a new intermediate CA"),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => tracing::warn!(%error, "storing the new intermediate CA failed"),
        }
    }
    Ok(authority)
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Result<Option<String>, String> {
    data.get(key)
        .map(|b| String::from_utf8(b.0.clone()).map_err(|_| format!("{key} is not PEM text")))
        .transpose()
}

/// A new root and intermediate, as the Secret's data.
fn generate(config: AuthorityConfig) -> Result<BTreeMap<String, ByteString>, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
    Authority::load_or_create(dir.path(), config).map_err(|e| e.to_string())?;
    let mut data = BTreeMap::new();
    for (file, key) in FILES {
        let bytes = std::fs::read(dir.path().join(file)).map_err(|e| format!("{file}: {e}"))?;
        data.insert(key.to_string(), ByteString(bytes));
    }
    Ok(data)
}

/// The trellis-ca crate's file names for each Secret key.
const FILES: [(&str, &str); 4] = [
    ("root.pem", ROOT_CERT),
    ("root-key.pem", ROOT_KEY),
    ("intermediate.pem", INTERMEDIATE_CERT),
    ("intermediate-key.pem", INTERMEDIATE_KEY),
];

fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The authority from a Secret's data, and the intermediate's keys when a new one was
/// made (none, or near its end).
#[allow(clippy::type_complexity)]
fn load(
    data: &BTreeMap<String, ByteString>,
    config: AuthorityConfig,
) -> Result<(Authority, Option<BTreeMap<String, ByteString>>), String> {
    let root = text(data, ROOT_CERT)?;
    let root_key = text(data, ROOT_KEY)?;
    let cert = text(data, INTERMEDIATE_CERT)?;
    let key = text(data, INTERMEDIATE_KEY)?;
    match (root, root_key, cert, key) {
        (Some(root), Some(root_key), cert, key) => {
            // The CA crate keeps its material in files; a private temporary directory
            // lets it load, check and renew the intermediate as in universal mode.
            let dir = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
            write_private(&dir.path().join("root.pem"), &root)?;
            write_private(&dir.path().join("root-key.pem"), &root_key)?;
            if let (Some(cert), Some(key)) = (&cert, &key) {
                write_private(&dir.path().join("intermediate.pem"), cert)?;
                write_private(&dir.path().join("intermediate-key.pem"), key)?;
            }
            let authority =
                Authority::load_or_create(dir.path(), config).map_err(|e| e.to_string())?;
            let new_cert = std::fs::read_to_string(dir.path().join("intermediate.pem"))
                .map_err(|e| format!("the intermediate: {e}"))?;
            let renewed = if cert.as_deref() == Some(new_cert.as_str()) {
                None
            } else {
                let new_key = std::fs::read_to_string(dir.path().join("intermediate-key.pem"))
                    .map_err(|e| format!("the intermediate's key: {e}"))?;
                Some(BTreeMap::from([
                    (
                        INTERMEDIATE_CERT.to_string(),
                        ByteString(new_cert.into_bytes()),
                    ),
                    (
                        INTERMEDIATE_KEY.to_string(),
                        ByteString(new_key.into_bytes()),
                    ),
                ]))
            };
            Ok((authority, renewed))
        }
        (Some(roots), None, Some(cert), Some(key)) => {
            let authority = Authority::from_operator(
                config,
                OperatorCa {
                    roots_pem: &roots,
                    intermediate_cert_pem: &cert,
                    intermediate_key_pem: &key,
                },
            )
            .map_err(|e| e.to_string())?;
            Ok((authority, None))
        }
        _ => Err(format!(
            "expected keys {ROOT_CERT} + {ROOT_KEY} (a root and its key, optionally \
             {INTERMEDIATE_CERT} + {INTERMEDIATE_KEY}), or {INTERMEDIATE_CERT} + \
             {INTERMEDIATE_KEY} + {ROOT_CERT} (cert-manager); found {:?}",
            data.keys().collect::<Vec<_>>()
        )),
    }
}

/// Writes the trust anchors into the ConfigMap in `namespace` (server-side apply).
/// An operator-supplied bundle in the control plane's own namespace (`own_namespace`)
/// that already holds every root of ours is kept, and copied: during a root rotation
/// it lists old and new. What a meshed namespace's copy says is never read back, so
/// whoever may edit ConfigMaps there cannot slip a root of their own into it.
pub async fn publish_trust_anchors(
    client: &Client,
    own_namespace: &str,
    namespace: &str,
    bundle: &TrustBundle,
) -> Result<(), CaSecretError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let own: Api<ConfigMap> = Api::namespaced(client.clone(), own_namespace);
    let fail = |source| CaSecretError::Anchors {
        namespace: namespace.into(),
        source,
    };
    let pem = anchors_to_publish(
        own.get_opt(TRUST_ANCHORS_CONFIGMAP).await.map_err(fail)?,
        bundle,
    );
    let data: BTreeMap<_, _> = TRUST_ANCHORS_KEYS
        .iter()
        .map(|k| (k.to_string(), pem.clone()))
        .collect();
    let config_map = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": TRUST_ANCHORS_CONFIGMAP, "namespace": namespace},
        "data": data,
    });
    api.patch(
        TRUST_ANCHORS_CONFIGMAP,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&config_map),
    )
    .await
    .map_err(fail)?;
    Ok(())
}

/// What the ConfigMap should hold: what it has, when that trusts all our roots;
/// otherwise our roots.
fn anchors_to_publish(existing: Option<ConfigMap>, bundle: &TrustBundle) -> String {
    let kept = existing
        .and_then(|cm| cm.data)
        .and_then(|data| {
            TRUST_ANCHORS_KEYS
                .iter()
                .find_map(|k| data.get(*k).cloned())
        })
        .filter(|pem| {
            TrustBundle::from_pem(pem).is_ok_and(|have| {
                bundle
                    .roots()
                    .iter()
                    .all(|root| have.roots().contains(root))
            })
        });
    kept.unwrap_or_else(|| bundle.to_pem())
}

/// Publishes the trust anchors into the control plane's namespace and every meshed
/// one. Returns how many namespaces were written; a failure in one does not stop
/// the others.
pub async fn publish_everywhere(
    client: &Client,
    own_namespace: &str,
    bundle: &TrustBundle,
) -> usize {
    let mut namespaces = vec![own_namespace.to_string()];
    let api: Api<Namespace> = Api::all(client.clone());
    match api
        .list(&ListParams::default().labels(INJECT_SELECTOR))
        .await
    {
        Ok(list) => namespaces.extend(
            list.items
                .into_iter()
                .filter_map(|ns| ns.metadata.name)
                .filter(|ns| ns != own_namespace),
        ),
        Err(error) => tracing::warn!(%error, "listing meshed namespaces failed"),
    }
    let mut written = 0;
    for namespace in namespaces {
        match publish_trust_anchors(client, own_namespace, &namespace, bundle).await {
            Ok(()) => written += 1,
            Err(error) => tracing::warn!(%error, "publishing the trust anchors failed"),
        }
    }
    written
}

/// While this replica leads, publishes the trust anchors every `period` (namespaces
/// get labelled for injection at any time), until `shutdown`.
pub async fn publish_while_leading(
    client: Client,
    own_namespace: String,
    bundle: TrustBundle,
    mut leading: tokio::sync::watch::Receiver<bool>,
    period: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        if *leading.borrow_and_update() {
            publish_everywhere(&client, &own_namespace, &bundle).await;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = leading.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(period) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use trellis_ca::TrustDomain;

    use super::*;

    fn config() -> AuthorityConfig {
        AuthorityConfig {
            trust_domain: TrustDomain::parse("cluster.local").unwrap(),
            max_leaf_ttl: Duration::from_secs(3600),
        }
    }

    #[test]
    fn generated_material_loads_back_to_the_same_root() {
        let data = generate(config()).unwrap();
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>(),
            ["ca.crt", "ca.key", "tls.crt", "tls.key"]
        );
        let (authority, renewed) = load(&data, config()).unwrap();
        assert!(renewed.is_none(), "a fresh intermediate is kept");
        let root = String::from_utf8(data["ca.crt"].0.clone()).unwrap();
        assert_eq!(authority.trust_bundle().to_pem().trim(), root.trim());

        // A root alone gets an intermediate made for it.
        let mut root_only = data.clone();
        root_only.remove("tls.crt");
        root_only.remove("tls.key");
        let (again, renewed) = load(&root_only, config()).unwrap();
        assert!(renewed.is_some());
        assert_eq!(
            again.trust_bundle().to_pem(),
            authority.trust_bundle().to_pem()
        );

        // cert-manager's layout: no root key, the intermediate signs.
        let mut cert_manager = data.clone();
        cert_manager.remove("ca.key");
        let (operator, renewed) = load(&cert_manager, config()).unwrap();
        assert!(renewed.is_none());
        assert_eq!(
            operator.trust_bundle().to_pem(),
            authority.trust_bundle().to_pem()
        );

        let mut broken = BTreeMap::new();
        broken.insert("tls.crt".to_string(), data["tls.crt"].clone());
        let error = load(&broken, config()).err().unwrap();
        assert!(
            error.contains("expected keys") && error.contains("tls.crt"),
            "{error}"
        );
    }

    #[test]
    fn an_operator_bundle_that_holds_our_root_is_kept() {
        let ours = Authority::generate(config()).unwrap();
        let other = Authority::generate(config()).unwrap();
        let both = ours.trust_bundle().merged(other.trust_bundle());
        let cm = |pem: &str| ConfigMap {
            data: Some(BTreeMap::from([(
                "trust-anchors.pem".to_string(),
                pem.to_string(),
            )])),
            ..Default::default()
        };
        let bundle = ours.trust_bundle();
        assert_eq!(
            anchors_to_publish(Some(cm(&both.to_pem())), bundle),
            both.to_pem()
        );
        assert_eq!(
            anchors_to_publish(Some(cm(&other.trust_bundle().to_pem())), bundle),
            bundle.to_pem()
        );
        assert_eq!(anchors_to_publish(None, bundle), bundle.to_pem());
    }
}
