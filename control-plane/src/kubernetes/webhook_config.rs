//! `caBundle` upkeep: the API server calls the injection webhook over TLS and checks
//! its certificate against `webhooks[*].clientConfig.caBundle` of the
//! MutatingWebhookConfiguration. The chart leaves it empty; the leader fills it with
//! the mesh's roots (base64 PEM) when it starts leading, when the roots change, and
//! every minute in case a `helm upgrade` emptied it again.

use std::time::Duration;

use k8s_openapi::{ByteString, api::admissionregistration::v1::MutatingWebhookConfiguration};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub const WEBHOOK_CONFIGURATION: &str = "trellis-sidecar-injector";
pub const RESYNC: Duration = Duration::from_secs(60);

/// Sets every webhook's caBundle of configuration `name` to `bundle_pem`. Returns how
/// many webhooks changed (0 when all were current). A merge patch carries the whole
/// list (a merge patch replaces lists) and the resourceVersion just read, so a
/// concurrent edit is never overwritten: the API server answers 409 and the next
/// round tries again.
pub async fn sync_ca_bundle(
    client: &Client,
    name: &str,
    bundle_pem: &[u8],
) -> Result<usize, kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = api.get(name).await?;
    let mut webhooks = config.webhooks.unwrap_or_default();
    let mut changed = 0;
    for webhook in &mut webhooks {
        if webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice())
            != Some(bundle_pem)
        {
            webhook.client_config.ca_bundle = Some(ByteString(bundle_pem.to_vec()));
            changed += 1;
        }
    }
    if changed == 0 {
        return Ok(0);
    }
    let patch = json!({
        "metadata": {"resourceVersion": config.metadata.resource_version},
        "webhooks": webhooks,
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(
        configuration = name,
        webhooks = changed,
        "updated the webhook caBundle"
    );
    Ok(changed)
}

/// Keeps the caBundle current while this replica leads, until `shutdown`.
pub async fn run(
    client: Client,
    name: String,
    mut bundle: watch::Receiver<Vec<u8>>,
    mut leading: watch::Receiver<bool>,
    resync: Duration,
    shutdown: CancellationToken,
) {
    // The roots may be fixed for the process's life: a closed channel keeps the last.
    let mut bundle_open = true;
    loop {
        if *leading.borrow_and_update() {
            let pem = bundle.borrow_and_update().clone();
            if let Err(error) = sync_ca_bundle(&client, &name, &pem).await {
                tracing::warn!(%error, configuration = name, "updating the webhook caBundle failed; retrying");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = leading.changed() => if changed.is_err() { return },
            changed = bundle.changed(), if bundle_open => bundle_open = changed.is_ok(),
            () = tokio::time::sleep(resync) => {}
        }
    }
}
