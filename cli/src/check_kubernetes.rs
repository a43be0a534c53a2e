//! `trellisctl check --kubernetes`: is Trellis installed and healthy in a cluster? One
//! line per check, `✔` or `✘` with what was found: the five CRDs, the control plane
//! Deployment, the injection webhook (caBundle filled, Service with ready endpoints)
//! and the trust anchors (not expiring within 30 days).

use std::time::Duration;

use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration, apps::v1::Deployment,
        core::v1::ConfigMap, discovery::v1::EndpointSlice,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, Client, Config, api::ListParams};

use crate::{
    checks::{Check, format_unix},
    commands::Outcome,
};

/// The CRDs a working installation has.
pub const CRDS: [&str; 5] = [
    "meshconfigs.trellis.dev",
    "destinationpolicies.trellis.dev",
    "trafficroutes.trellis.dev",
    "authorizationpolicies.trellis.dev",
    "canaries.trellis.dev",
];
pub const DEPLOYMENT: &str = "trellis-control-plane";
pub const WEBHOOK_CONFIGURATION: &str = "trellis-sidecar-injector";
pub const TRUST_ANCHORS: &str = "trellis-trust-anchors";
/// Trust anchors closer than this to their end fail: time to roll new roots out.
pub const ANCHOR_MARGIN_SECONDS: i64 = 30 * 86_400;
/// Each request to the API server; a hung one fails its check, not the command.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A Kubernetes client: `api_server` (plain URL, for tests), else `KUBECONFIG`,
/// `~/.kube/config` or the in-cluster service account, as `kubectl` finds them.
pub async fn client(api_server: Option<&str>) -> Result<Client, String> {
    // kube's rustls uses the process default provider; ring is the one built in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match api_server {
        Some(url) => {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| format!("--kube-api-server {url}: {e}"))?;
            if uri.scheme().is_none() || uri.authority().is_none() {
                return Err(format!(
                    "--kube-api-server {url}: expected an absolute URL such as https://10.0.0.1:6443"
                ));
            }
            Config::new(uri)
        }
        None => Config::infer().await.map_err(|e| {
            format!("no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster): {e}")
        })?,
    };
    Client::try_from(config).map_err(|e| format!("building the Kubernetes client: {e}"))
}

async fn within<T>(fut: impl Future<Output = Result<T, kube::Error>>) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no answer from the API server within {REQUEST_TIMEOUT:?}"
        )),
    }
}

/// Every check, in order; each one's failure is reported, the others still run.
pub async fn run(api_server: Option<&str>, namespace: &str, now_unix: i64) -> Outcome {
    let lines = match client(api_server).await {
        Ok(client) => checks(&client, namespace, now_unix).await,
        Err(e) => vec![Check::fail(e)],
    };
    Outcome {
        stdout: lines.iter().map(|c| c.line() + "\n").collect(),
        stderr: String::new(),
        ok: lines.iter().all(|c| c.ok),
    }
}

pub async fn checks(client: &Client, namespace: &str, now_unix: i64) -> Vec<Check> {
    let mut lines = vec![crds(client).await, deployment(client, namespace).await];
    lines.extend(webhook(client).await);
    lines.push(trust_anchors(client, namespace, now_unix).await);
    lines
}

async fn crds(client: &Client) -> Check {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut missing = Vec::new();
    for name in CRDS {
        match within(api.get_opt(name)).await {
            Ok(Some(_)) => {}
            Ok(None) => missing.push(name),
            Err(e) => return Check::fail(format!("CRDs: cannot read {name}: {e}")),
        }
    }
    if missing.is_empty() {
        Check::pass(format!("CRDs installed ({})", CRDS.len()))
    } else {
        Check::fail(format!(
            "CRDs missing: {}; install the chart (helm/trellis/crds) or `trellisctl install`",
            missing.join(", ")
        ))
    }
}

async fn deployment(client: &Client, namespace: &str) -> Check {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let what = format!("control plane Deployment {namespace}/{DEPLOYMENT}");
    match within(api.get_opt(DEPLOYMENT)).await {
        Ok(Some(deployment)) => {
            let status = deployment.status.unwrap_or_default();
            let available = status.available_replicas.unwrap_or(0);
            let wanted = deployment.spec.replicas.unwrap_or(1);
            if available >= 1 {
                Check::pass(format!(
                    "{what} ready ({available}/{wanted} replicas available)"
                ))
            } else {
                Check::fail(format!(
                    "{what} has no available replica (0/{wanted}); see `kubectl -n {namespace} describe deployment {DEPLOYMENT}`"
                ))
            }
        }
        Ok(None) => Check::fail(format!(
            "{what} not found; is Trellis installed in {namespace} (--namespace)?"
        )),
        Err(e) => Check::fail(format!("{what}: {e}")),
    }
}

/// Two lines: the configuration and its caBundle, then its Service's endpoints.
async fn webhook(client: &Client) -> Vec<Check> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let what = format!("webhook configuration {WEBHOOK_CONFIGURATION}");
    let config = match within(api.get_opt(WEBHOOK_CONFIGURATION)).await {
        Ok(Some(config)) => config,
        Ok(None) => {
            return vec![Check::fail(format!(
                "{what} not found: pods will not get a sidecar"
            ))];
        }
        Err(e) => return vec![Check::fail(format!("{what}: {e}"))],
    };
    let webhooks = config.webhooks.unwrap_or_default();
    let empty: Vec<&str> = webhooks
        .iter()
        .filter(|w| {
            w.client_config
                .ca_bundle
                .as_ref()
                .is_none_or(|b| b.0.is_empty())
        })
        .map(|w| w.name.as_str())
        .collect();
    let bundle = if webhooks.is_empty() {
        Check::fail(format!("{what} has no webhooks"))
    } else if empty.is_empty() {
        Check::pass(format!("{what} present, caBundle set"))
    } else {
        Check::fail(format!(
            "{what}: caBundle empty for {}; the control plane's leader fills it — is it running?",
            empty.join(", ")
        ))
    };
    let service = webhooks
        .iter()
        .find_map(|w| w.client_config.service.clone());
    let endpoints = match service {
        None => Check::fail(format!("{what} names no Service to call")),
        Some(service) => {
            let ns = service.namespace;
            let name = service.name;
            let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
            let selector = format!("kubernetes.io/service-name={name}");
            match within(slices.list(&ListParams::default().labels(&selector))).await {
                Ok(list) => {
                    let ready = list
                        .items
                        .iter()
                        .flat_map(|s| s.endpoints.iter().flatten())
                        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                        .count();
                    if ready > 0 {
                        Check::pass(format!(
                            "webhook Service {ns}/{name} has {ready} ready endpoint(s)"
                        ))
                    } else {
                        Check::fail(format!(
                            "webhook Service {ns}/{name} has no ready endpoints: the API server cannot reach the webhook"
                        ))
                    }
                }
                Err(e) => Check::fail(format!("webhook Service {ns}/{name}: {e}")),
            }
        }
    };
    vec![bundle, endpoints]
}

async fn trust_anchors(client: &Client, namespace: &str, now_unix: i64) -> Check {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let what = format!("trust anchors ConfigMap {namespace}/{TRUST_ANCHORS}");
    let config_map = match within(api.get_opt(TRUST_ANCHORS)).await {
        Ok(Some(cm)) => cm,
        Ok(None) => return Check::fail(format!("{what} not found")),
        Err(e) => return Check::fail(format!("{what}: {e}")),
    };
    let data = config_map.data.unwrap_or_default();
    let Some(pem) = ["ca.crt", "trust-anchors.pem"]
        .iter()
        .find_map(|k| data.get(*k).filter(|v| !v.trim().is_empty()))
    else {
        return Check::fail(format!(
            "{what} holds no certificate (keys ca.crt / trust-anchors.pem are empty)"
        ));
    };
    match earliest_not_after(pem) {
        Err(reason) => Check::fail(format!("{what}: {reason}")),
        Ok((count, not_after)) => {
            let when = format_unix(not_after);
            let left = not_after - now_unix;
            if left <= 0 {
                Check::fail(format!("{what}: a root expired on {when}"))
            } else if left < ANCHOR_MARGIN_SECONDS {
                Check::fail(format!(
                    "{what}: a root expires within 30 days (on {when}); roll out new roots"
                ))
            } else {
                Check::pass(format!("{what}: {count} root(s), valid until {when}"))
            }
        }
    }
}

/// How many certificates the PEM holds and the earliest notAfter among them (unix).
fn earliest_not_after(pem: &str) -> Result<(usize, i64), String> {
    let mut earliest: Option<i64> = None;
    let mut count = 0;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| format!("not PEM: {e}"))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        let cert = block
            .parse_x509()
            .map_err(|e| format!("a certificate does not parse: {e}"))?;
        let not_after = cert.validity().not_after.timestamp();
        earliest = Some(earliest.map_or(not_after, |e| e.min(not_after)));
        count += 1;
    }
    earliest
        .map(|e| (count, e))
        .ok_or_else(|| "no CERTIFICATE block".to_string())
}
