//! The sidecar injector: a mutating admission webhook served over TLS at
//! `POST /inject`. The API server sends an `admission.k8s.io/v1` AdmissionReview for
//! every pod created in a namespace labelled `trellis.dev/inject=enabled` (the
//! webhook configuration's namespaceSelector does that filtering); the answer allows
//! the pod with a JSONPatch that adds the proxy ([`trellis_crds::injection`]).
//!
//! The serving certificate is issued by the mesh CA for the webhook's Service DNS
//! names and renewed at 70% of its life; the configuration's `caBundle` is the mesh's
//! roots ([`ca_bundle_pem`]), which survive the renewals and are the same on every
//! replica.

use std::{convert::Infallible, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trellis_ca::Authority;
use trellis_crds::injection::{self, Injection, InjectionSettings};

/// The path the webhook configuration's `clientConfig.service.path` names.
pub const INJECT_PATH: &str = "/inject";
/// The port the control plane serves the webhook on in Kubernetes mode.
pub const DEFAULT_PORT: u16 = 15017;
/// Pods are far smaller; the API server caps objects at 1.5 MiB.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// The serving certificate's lifetime; renewed at 70% of it.
pub const CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a client may take over the TLS handshake and its request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook's serving certificate: {0}")]
    Certificate(String),
    #[error("--injection-config {path}: {reason}")]
    Config {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("the webhook's TLS config: {0}")]
    Tls(#[from] rustls::Error),
}

/// What injected pods get: the `--injection-config` YAML file (camelCase fields of
/// [`InjectionSettings`]) or the defaults, then `--proxy-image`; the trust domain is
/// always the control plane's own.
pub fn load_settings(
    path: Option<&std::path::Path>,
    proxy_image: Option<String>,
    trust_domain: &str,
) -> Result<InjectionSettings, WebhookError> {
    let mut settings = match path {
        None => InjectionSettings::default(),
        Some(path) => {
            let fail = |reason: String| WebhookError::Config {
                path: path.into(),
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            InjectionSettings::from_yaml(&text).map_err(fail)?
        }
    };
    if let Some(image) = proxy_image {
        settings.proxy_image = image;
    }
    settings.trust_domain = trust_domain.to_string();
    Ok(settings)
}

/// The `caBundle` of the MutatingWebhookConfiguration: the mesh's roots, PEM.
pub fn ca_bundle_pem(authority: &Authority) -> Vec<u8> {
    authority.trust_bundle().to_pem().into_bytes()
}

/// The injector: its settings and its rotating serving certificate.
#[derive(Debug)]
pub struct Webhook {
    authority: Arc<Authority>,
    dns_names: Vec<String>,
    settings: InjectionSettings,
    cert: Arc<RotatingCert>,
}

impl Webhook {
    /// Issues the first serving certificate for `dns_names` (e.g.
    /// `trellis-control-plane.trellis-system.svc`).
    pub fn new(
        authority: Arc<Authority>,
        dns_names: Vec<String>,
        settings: InjectionSettings,
    ) -> Result<Self, WebhookError> {
        let first = issue(&authority, &dns_names)?;
        Ok(Self {
            authority,
            dns_names,
            settings,
            cert: Arc::new(RotatingCert(ArcSwap::from_pointee(first))),
        })
    }

    pub fn ca_bundle_pem(&self) -> Vec<u8> {
        ca_bundle_pem(&self.authority)
    }

    /// The TLS config the listener serves with; it follows every renewal.
    pub fn tls_config(&self) -> Result<Arc<ServerConfig>, WebhookError> {
        let mut config = ServerConfig::builder_with_provider(trellis_ca::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.cert.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Serves `POST /inject` on `listener` until `shutdown`, renewing the certificate
    /// as it goes.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), WebhookError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls_config()?);
        tokio::spawn(self.clone().renew(shutdown.clone()));
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => accepted,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tracing::warn!(%error, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, webhook) = (acceptor.clone(), self.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let webhook = webhook.clone();
                    async move { Ok::<_, Infallible>(webhook.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    }

    async fn renew(self: Arc<Self>, shutdown: CancellationToken) {
        let mut wait = CERT_TTL.mul_f64(0.7);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            match issue(&self.authority, &self.dns_names) {
                Ok(cert) => {
                    self.cert.0.store(Arc::new(cert));
                    tracing::info!("webhook serving certificate renewed");
                    wait = CERT_TTL.mul_f64(0.7);
                }
                Err(error) => {
                    // The current certificate has 30% of its life left: retry soon.
                    tracing::error!(%error, "renewing the webhook's certificate failed");
                    wait = Duration::from_secs(60);
                }
            }
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() != INJECT_PATH {
            return plain(StatusCode::NOT_FOUND, "not found: POST /inject\n");
        }
        if req.method() != Method::POST {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n");
        }
        let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(error) => {
                let message = if error.is::<http_body_util::LengthLimitError>() {
                    format!("the AdmissionReview is larger than {MAX_BODY_BYTES} bytes")
                } else {
                    format!("reading the AdmissionReview: {error}")
                };
                return json(StatusCode::PAYLOAD_TOO_LARGE, &invalid(&message));
            }
        };
        let (status, review) = review(&body, &self.settings);
        json(status, &review)
    }
}

/// Answers one AdmissionReview body: 200 with the response (allowed, with a patch or
/// none, or denied with the reason), or 400 with an error response when the body is
/// no AdmissionReview at all.
pub fn review(body: &[u8], settings: &InjectionSettings) -> (StatusCode, serde_json::Value) {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                invalid(&format!("the body is not an AdmissionReview: {e}")),
            );
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(_) => {
            return (
                StatusCode::BAD_REQUEST,
                invalid("the AdmissionReview has no request"),
            );
        }
    };
    let response = answer(&request, settings);
    let patch = response.patch.clone();
    let mut answer = to_json(&response.into_review());
    // The API (Go's []byte) documents the patch as a base64 string; serde would
    // write kube's Vec<u8> as an array of numbers.
    if let (Some(patch), Some(response)) = (patch, answer.get_mut("response")) {
        response["patch"] = base64::engine::general_purpose::STANDARD
            .encode(patch)
            .into();
    }
    (StatusCode::OK, answer)
}

fn answer(
    request: &AdmissionRequest<DynamicObject>,
    settings: &InjectionSettings,
) -> AdmissionResponse {
    let allowed = AdmissionResponse::from(request);
    let kind = &request.kind;
    if !(kind.group.is_empty() && kind.kind == "Pod") {
        return allowed.deny(format!(
            "trellis injects into pods only; this webhook was sent a {}/{} {}: check the \
             MutatingWebhookConfiguration's rules",
            kind.group, kind.version, kind.kind
        ));
    }
    // Containers of a running pod cannot change; only creation is injected.
    if request.operation != Operation::Create {
        return allowed;
    }
    let Some(object) = request.object.as_ref() else {
        return allowed.deny("the AdmissionReview's request has no object");
    };
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(pod) => pod,
        Err(e) => return allowed.deny(format!("the object is not a valid Pod: {e}")),
    };
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    let namespace = request.namespace.clone().unwrap_or_default();
    match injection::inject(&pod, true, settings) {
        Ok(Injection::Unchanged(reason)) => {
            tracing::debug!(pod = name, namespace, %reason, "not injected");
            allowed
        }
        Ok(Injection::Injected(mutated)) => {
            let patch = match injection::json_patch(&pod, &mutated) {
                Ok(patch) => patch,
                Err(e) => return allowed.deny(format!("building the patch: {e}")),
            };
            match allowed.clone().with_patch(patch) {
                Ok(response) => {
                    tracing::info!(pod = name, namespace, "injected the trellis proxy");
                    response
                }
                Err(e) => allowed.deny(format!("encoding the patch: {e}")),
            }
        }
        Err(e) => {
            tracing::warn!(pod = name, namespace, error = %e, "refused to inject");
            allowed.deny(format!("trellis injection: {e}"))
        }
    }
}

fn invalid(message: &str) -> serde_json::Value {
    to_json(&AdmissionResponse::invalid(message).into_review())
}

fn to_json(review: &AdmissionReview<DynamicObject>) -> serde_json::Value {
    serde_json::to_value(review).unwrap_or_else(|e| {
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {"uid": "", "allowed": false,
                         "status": {"message": format!("encoding the response: {e}")}},
        })
    })
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    response
}

fn issue(authority: &Authority, dns_names: &[String]) -> Result<CertifiedKey, WebhookError> {
    let fail = |e: &dyn std::fmt::Display| WebhookError::Certificate(e.to_string());
    let ttl = CERT_TTL.min(authority.max_leaf_ttl());
    let (issued, key) = authority
        .issue_server_cert(dns_names, ttl)
        .map_err(|e| fail(&e))?;
    let key = trellis_ca::crypto_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| fail(&e))?;
    let chain = std::iter::once(issued.leaf).chain(issued.chain).collect();
    Ok(CertifiedKey::new(chain, key))
}

/// The current serving certificate, swapped on renewal; handshakes read it lock-free.
#[derive(Debug)]
struct RotatingCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}
