//! Kubernetes mode: the API client every Kubernetes part shares, and the config source
//! that watches the cluster (`indexes` keep what the watchers saw; `watch` runs them).

pub mod ca_secret;
pub mod identity;
pub mod indexes;
pub mod leader;
pub mod status;
pub mod watch;
pub mod webhook_config;

use kube::{Client, Config};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--kube-api-server {url}: {reason}")]
    Url { url: String, reason: String },
    #[error(
        "no Kubernetes configuration: neither KUBECONFIG (or ~/.kube/config) nor the in-cluster service account works: {0}"
    )]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Build(#[from] kube::Error),
}

/// The Kubernetes API client: `api_server` (tests point it at a fake, plain HTTP) or,
/// without it, the in-cluster service account or `KUBECONFIG` as `kubectl` finds them.
pub async fn client(api_server: Option<&str>) -> Result<Client, ClientError> {
    // kube's rustls picks the process default; ring is the only provider built in, but
    // say so before anything asks (an error means one is already installed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match api_server {
        Some(url) => {
            let uri: http::Uri =
                url.parse()
                    .map_err(|e: http::uri::InvalidUri| ClientError::Url {
                        url: url.to_string(),
                        reason: e.to_string(),
                    })?;
            if uri.scheme().is_none() || uri.authority().is_none() {
                return Err(ClientError::Url {
                    url: url.to_string(),
                    reason: "expected an absolute URL such as https://10.0.0.1:6443".into(),
                });
            }
            Config::new(uri)
        }
        // As `kube::Client::try_default`: KUBECONFIG or ~/.kube/config, else in-cluster.
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}
