//! The operator HTTP API that `trellisctl` speaks (docs/control-plane.md): apply, get
//! and delete resources, list endpoints and proxies, mint join tokens, report status.
//! Every request needs the bearer token from the data dir.

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trellis_ca::Authority;
use trellis_crds::{Document, parse_documents};

use crate::{
    canary::{Action, ActionError, CanaryController, HomeError},
    compiler::Compiler,
    join_token::JoinTokens,
    registry::{ConfigState, Registry},
    reports::{self, Reports, StatsFilter},
    store::{Change, ResourceKey, Store, StoreError},
};

/// Applies larger than this are refused: a mesh's whole config is far smaller.
const MAX_BODY: usize = 8 * 1024 * 1024;
const KINDS: [&str; 5] = [
    "MeshConfig",
    "DestinationPolicy",
    "TrafficRoute",
    "AuthorizationPolicy",
    "Canary",
];
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_STATS_WINDOW: &str = "60s";

pub struct OperatorApi {
    pub token: String,
    /// Where the web dashboard listens, for `trellisctl dashboard`.
    pub dashboard: std::net::SocketAddr,
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    pub compiler: Arc<Compiler>,
    pub tokens: Arc<JoinTokens>,
    pub authority: Arc<Authority>,
    pub canaries: Arc<CanaryController>,
    pub reports: Arc<Reports>,
}

impl std::fmt::Debug for OperatorApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorApi")
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, body: &impl Serialize) -> Answer {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// A request the API turns down: the status and the one message the client shows.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl Refusal {
    fn into_answer(self) -> Answer {
        answer(self.0, &json!({ "error": self.1 }))
    }
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Refusal {
    Refusal(status, message.to_string())
}

/// The kind a path names, in any case.
fn kind_of(text: &str) -> Result<&'static str, Refusal> {
    KINDS
        .iter()
        .find(|k| k.eq_ignore_ascii_case(text))
        .copied()
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                format!("unknown kind {text:?}; kinds are {}", KINDS.join(", ")),
            )
        })
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A resource as the API shows it: its stored spec and, where the control plane keeps
/// one, its status.
fn with_status(document: &Document, status: Option<&[u8]>) -> Result<serde_json::Value, Refusal> {
    let internal = |e: serde_json::Error| error(StatusCode::INTERNAL_SERVER_ERROR, e);
    let mut value: serde_json::Value =
        serde_json::from_slice(&document.to_json().map_err(internal)?).map_err(internal)?;
    if let (Some(status), Some(object)) = (status, value.as_object_mut()) {
        // The controller writes an unreadable status anew; until then, show the spec.
        match serde_json::from_slice(status) {
            Ok(status) => {
                object.insert("status".into(), status);
            }
            Err(e) => {
                tracing::warn!(error = %e, resource = document.name(), "unreadable status left out")
            }
        }
    }
    Ok(value)
}

/// A query parameter that is there and not empty.
fn non_empty_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query_param(query, name).filter(|v| !v.is_empty())
}

/// Compares without an early exit, so response time says nothing about the token.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    service: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
}

#[derive(Debug, Serialize)]
struct ChangeView<'a> {
    kind: &'a str,
    namespace: Option<&'a str>,
    name: &'a str,
    change: &'static str,
}

fn store_failure(e: StoreError) -> Refusal {
    match e {
        StoreError::Invalid(_) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
        other => {
            tracing::error!(error = %other, "store failure");
            error(StatusCode::INTERNAL_SERVER_ERROR, other)
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Refusal> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(store_failure(e)),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

impl OperatorApi {
    /// Serves until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, _) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let api = self.clone();
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(req).await) }
            });
            tokio::spawn(async move {
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
                if let Err(error) = served {
                    tracing::debug!(%error, "API connection ended with an error");
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Answer {
        let authorized = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| same_secret(given.trim().as_bytes(), self.token.as_bytes()));
        if !authorized {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (it is in the data dir's api-token file)",
            )
            .into_answer();
        }
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let kubernetes = self.compiler.source().mode() == crate::source::Mode::Kubernetes;
        let result = match (&method, segments.as_slice()) {
            // The cluster owns the resources; a write here would be silently ignored.
            (&Method::POST, ["v1", "apply"]) | (&Method::DELETE, ["v1", "resources", ..])
                if kubernetes =>
            {
                Err(error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "in kubernetes mode, use kubectl apply (or kubectl delete): resources come from the cluster",
                ))
            }
            (&Method::GET, ["v1", "endpoints"]) if kubernetes => Ok(answer(
                StatusCode::OK,
                &json!({ "items": self.compiler.source().endpoints() }),
            )),
            (&Method::GET, ["v1", "source"]) => Ok(answer(
                StatusCode::OK,
                &json!({
                    "mode": self.compiler.source().mode(),
                    "problems": self.compiler.source().problems(),
                }),
            )),
            (&Method::POST, ["v1", "apply"]) => self.apply(req).await,
            (&Method::GET, ["v1", "resources", kind]) => self.list(kind, query.as_deref()).await,
            (&Method::GET, ["v1", "resources", kind, name]) => {
                self.get(kind, name, query.as_deref()).await
            }
            (&Method::DELETE, ["v1", "resources", kind, name]) => {
                self.delete(kind, name, query.as_deref()).await
            }
            (&Method::GET, ["v1", "endpoints"]) => Ok(answer(
                StatusCode::OK,
                &json!({ "items": self.registry.endpoints() }),
            )),
            (&Method::GET, ["v1", "proxies"]) => Ok(answer(
                StatusCode::OK,
                &json!({ "items": self.registry.proxies() }),
            )),
            (&Method::POST, ["v1", "tokens"]) => self.token(req).await,
            (&Method::GET, ["v1", "stats"]) => self.stats(query.as_deref()),
            (&Method::GET, ["v1", "shadows"]) => Ok(self.shadows(query.as_deref())),
            (&Method::POST, ["v1", "canaries", name, action]) => {
                self.canary_action(name, action, query.as_deref()).await
            }
            (&Method::GET, ["v1", "status"]) => self.status().await,
            (&Method::GET, ["v1", "dashboard"]) => Ok(answer(
                StatusCode::OK,
                &json!({
                    "addr": self.dashboard,
                    "url": crate::dashboard::url(self.dashboard),
                }),
            )),
            _ => Err(error(
                StatusCode::NOT_FOUND,
                format!("no such API: {method} {path}"),
            )),
        };
        result.unwrap_or_else(Refusal::into_answer)
    }

    async fn body(req: Request<Incoming>) -> Result<Bytes, Refusal> {
        match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(body) => Ok(body.to_bytes()),
            Err(e) => Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("reading the request body (at most {MAX_BODY} bytes): {e}"),
            )),
        }
    }

    async fn apply(&self, req: Request<Incoming>) -> Result<Answer, Refusal> {
        let body = Self::body(req).await?;
        let text = std::str::from_utf8(&body).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("the body is not UTF-8: {e}"),
            )
        })?;
        let documents = parse_documents(text).map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
        if documents.is_empty() {
            return Err(error(StatusCode::BAD_REQUEST, "no documents to apply"));
        }
        let ours = self.authority.trust_domain().as_str();
        for document in &documents {
            if let Document::MeshConfig(mesh) = document
                && mesh.spec.trust_domain != ours
            {
                return Err(error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "MeshConfig {:?}: spec.trustDomain: {:?} is not this control plane's \
                         trust domain {ours:?}, which is fixed when its CA is created",
                        document.name(),
                        mesh.spec.trust_domain
                    ),
                ));
            }
        }
        let store = self.store.clone();
        let applied = blocking(move || store.apply(&documents)).await?;
        if applied.changes.iter().any(|(_, c)| *c != Change::Unchanged) {
            self.compiler.changed();
        }
        let changes: Vec<ChangeView<'_>> = applied
            .changes
            .iter()
            .map(|(key, change)| ChangeView {
                kind: &key.kind,
                namespace: key.namespace.as_deref(),
                name: &key.name,
                change: match change {
                    Change::Created => "created",
                    Change::Updated => "updated",
                    Change::Unchanged => "unchanged",
                },
            })
            .collect();
        for c in &changes {
            tracing::info!(
                kind = c.kind,
                namespace = c.namespace,
                name = c.name,
                change = c.change,
                "applied"
            );
        }
        Ok(answer(
            StatusCode::OK,
            &json!({ "revision": applied.revision, "changes": changes }),
        ))
    }

    fn key(kind: &'static str, name: &str, query: Option<&str>) -> ResourceKey {
        let namespace = (kind != "MeshConfig").then(|| {
            query_param(query, "namespace")
                .unwrap_or("default")
                .to_string()
        });
        ResourceKey {
            kind: kind.to_string(),
            namespace,
            name: name.to_string(),
        }
    }

    async fn list(&self, kind: &str, query: Option<&str>) -> Result<Answer, Refusal> {
        let kind = kind_of(kind)?;
        let namespace = query_param(query, "namespace").map(str::to_string);
        if let Some(documents) = self.compiler.source().documents() {
            let items = documents
                .iter()
                .filter(|d| d.kind() == kind)
                .filter(|d| namespace.is_none() || d.namespace() == namespace.as_deref())
                .map(|d| with_status(d, None))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(answer(StatusCode::OK, &json!({ "items": items })));
        }
        let store = self.store.clone();
        let (documents, statuses) =
            blocking(move || Ok((store.list(Some(kind))?, store.statuses(kind)?))).await?;
        let items = documents
            .iter()
            .filter(|d| namespace.is_none() || d.namespace() == namespace.as_deref())
            .map(|d| {
                let key = (
                    d.namespace().unwrap_or_default().to_string(),
                    d.name().to_string(),
                );
                with_status(d, statuses.get(&key).map(Vec::as_slice))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(answer(StatusCode::OK, &json!({ "items": items })))
    }

    async fn get(&self, kind: &str, name: &str, query: Option<&str>) -> Result<Answer, Refusal> {
        let key = Self::key(kind_of(kind)?, name, query);
        if let Some(documents) = self.compiler.source().documents() {
            let found = documents.iter().find(|d| {
                d.kind() == key.kind
                    && d.name() == key.name
                    && d.namespace() == key.namespace.as_deref()
            });
            return match found {
                Some(document) => Ok(answer(StatusCode::OK, &with_status(document, None)?)),
                None => Err(error(StatusCode::NOT_FOUND, format!("{key} not found"))),
            };
        }
        let store = self.store.clone();
        let lookup = key.clone();
        let found = blocking(move || Ok((store.get(&lookup)?, store.status(&lookup)?))).await?;
        match found {
            (Some(document), status) => {
                let value = with_status(&document, status.as_deref())?;
                Ok(answer(StatusCode::OK, &value))
            }
            (None, _) => Err(error(StatusCode::NOT_FOUND, format!("{key} not found"))),
        }
    }

    /// `POST /v1/canaries/NAME/ACTION?namespace=NS`: pause, resume, promote or abort.
    async fn canary_action(
        &self,
        name: &str,
        action: &str,
        query: Option<&str>,
    ) -> Result<Answer, Refusal> {
        let Some(parsed) = Action::parse(action) else {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!(
                    "unknown canary action {action:?}; actions are pause, resume, promote, abort"
                ),
            ));
        };
        let key = Self::key("Canary", name, query);
        let canaries = self.canaries.clone();
        let target = key.clone();
        let acted = tokio::task::spawn_blocking(move || canaries.act(&target, parsed))
            .await
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        match acted {
            Ok(status) => {
                tracing::info!(canary = %key, action, "canary action");
                Ok(answer(StatusCode::OK, &json!({ "status": status })))
            }
            Err(ActionError::NotFound(_)) => {
                Err(error(StatusCode::NOT_FOUND, format!("{key} not found")))
            }
            Err(ActionError::Refused(why)) => {
                Err(error(StatusCode::CONFLICT, format!("{key}: {why}")))
            }
            Err(ActionError::Home(HomeError::Store(e))) => Err(store_failure(e)),
            Err(ActionError::Home(HomeError::Kubernetes(kube::Error::Api(e)))) if e.code == 409 => {
                Err(error(
                    StatusCode::CONFLICT,
                    format!("{key} changed while the action was applied; try again"),
                ))
            }
            Err(ActionError::Home(e)) => Err(error(StatusCode::BAD_GATEWAY, e)),
        }
    }

    async fn delete(&self, kind: &str, name: &str, query: Option<&str>) -> Result<Answer, Refusal> {
        let key = Self::key(kind_of(kind)?, name, query);
        let store = self.store.clone();
        let target = key.clone();
        let removed = tokio::task::spawn_blocking(move || {
            store
                .delete(&target)
                .and_then(|removed| Ok((removed, store.revision()?)))
        })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        match removed {
            Ok((true, revision)) => {
                self.compiler.changed();
                tracing::info!(resource = %key, "deleted");
                Ok(answer(StatusCode::OK, &json!({ "revision": revision })))
            }
            Ok((false, _)) => Err(error(StatusCode::NOT_FOUND, format!("{key} not found"))),
            Err(StoreError::Invalid(invalid)) => Err(error(
                StatusCode::CONFLICT,
                format!("{key} is still needed: {}", StoreError::Invalid(invalid)),
            )),
            Err(e) => Err(store_failure(e)),
        }
    }

    async fn token(&self, req: Request<Incoming>) -> Result<Answer, Refusal> {
        let body = Self::body(req).await?;
        let TokenRequest {
            service,
            namespace,
            ttl,
        } = serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
        let namespace = namespace.unwrap_or_else(|| "default".into());
        let ttl = match ttl {
            Some(text) => trellis_api::duration::parse(&text)
                .map_err(|e| error(StatusCode::BAD_REQUEST, format!("ttl {text:?}: {e}")))?,
            None => DEFAULT_TOKEN_TTL,
        };
        let now = SystemTime::now();
        let td = self.authority.trust_domain();
        let token = self
            .tokens
            .mint(td, &namespace, &service, ttl, now)
            .map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
        let expires = now + ttl;
        tracing::info!(service, namespace, ?ttl, "join token minted");
        Ok(answer(
            StatusCode::OK,
            &json!({
                "token": token,
                "identity": format!("spiffe://{}/ns/{namespace}/sa/{service}", td.as_str()),
                "expiresUnix": expires.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
            }),
        ))
    }

    /// `GET /v1/stats?namespace=&service=&caller=&window=60s&by=route|edge`: per
    /// (service, route, backend), or per caller → service edge, what the sidecars
    /// reported over the window. `rps` is over the time the included reports cover,
    /// not the whole window: traffic that started 10 s ago is not diluted over a minute.
    fn stats(&self, query: Option<&str>) -> Result<Answer, Refusal> {
        let by_edge = match query_param(query, "by") {
            None | Some("" | "route") => false,
            Some("edge") => true,
            Some(other) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("by {other:?}: must be route (the default) or edge"),
                ));
            }
        };
        let text = query_param(query, "window").unwrap_or(DEFAULT_STATS_WINDOW);
        let window = trellis_api::duration::parse(text)
            .map_err(|e| e.to_string())
            .and_then(|window| {
                if window.is_zero() || window > reports::RETENTION {
                    Err(format!(
                        "must be longer than zero and at most {}s (statistics are kept that long)",
                        reports::RETENTION.as_secs()
                    ))
                } else {
                    Ok(window)
                }
            })
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("window {text:?}: {e}")))?;
        let filter = StatsFilter {
            namespace: non_empty_param(query, "namespace"),
            service: non_empty_param(query, "service"),
            caller: non_empty_param(query, "caller"),
        };
        // No instant as old as the window (a machine up for less): everything kept is
        // within it.
        let now = Instant::now();
        let since = now.checked_sub(window);
        let seconds = window.as_secs_f64();
        let rate = |stats: &reports::BackendStats, covers_from| {
            let covered = reports::covered_span(covers_from, now, window);
            json!({
                "requests": stats.requests,
                "successes": stats.successes,
                "successRate": stats.success_rate(),
                "rps": stats.requests as f64 / covered.as_secs_f64(),
                "coveredSeconds": covered.as_secs_f64(),
                "p99Ms": stats.p99.map(|p| p.as_secs_f64() * 1e3),
            })
        };
        if by_edge {
            let items: Vec<_> = self
                .reports
                .edge_stats(filter, since)
                .into_iter()
                .map(|row| {
                    let mut item = json!({
                        "callerNamespace": row.caller_namespace,
                        "caller": row.caller,
                        "namespace": row.namespace,
                        "service": row.service,
                    });
                    if let (Some(item), serde_json::Value::Object(numbers)) =
                        (item.as_object_mut(), rate(&row.stats, row.covers_from))
                    {
                        item.extend(numbers);
                    }
                    item
                })
                .collect();
            return Ok(answer(
                StatusCode::OK,
                &json!({ "windowSeconds": seconds, "by": "edge", "items": items }),
            ));
        }
        let items: Vec<_> = self
            .reports
            .route_stats(filter, since)
            .into_iter()
            .map(|row| {
                let stats = row.stats;
                let covered = reports::covered_span(row.covers_from, now, window);
                json!({
                    "namespace": row.namespace,
                    "service": row.service,
                    "route": row.route,
                    "backend": row.backend,
                    "requests": stats.requests,
                    "successes": stats.successes,
                    "successRate": stats.success_rate(),
                    "rps": stats.requests as f64 / covered.as_secs_f64(),
                    "coveredSeconds": covered.as_secs_f64(),
                    "p99Ms": stats.p99.map(|p| p.as_secs_f64() * 1e3),
                })
            })
            .collect();
        Ok(answer(
            StatusCode::OK,
            &json!({ "windowSeconds": seconds, "items": items }),
        ))
    }

    /// `GET /v1/shadows?namespace=&service=`: each route mirror's totals since the
    /// control plane started and its latest mismatches.
    fn shadows(&self, query: Option<&str>) -> Answer {
        let rows = self.reports.shadows(
            non_empty_param(query, "namespace"),
            non_empty_param(query, "service"),
        );
        let items: Vec<_> = rows
            .into_iter()
            .map(|row| {
                let t = row.totals;
                let recent: Vec<_> = row
                    .recent
                    .iter()
                    .map(|m| {
                        json!({
                            "unixMs": m.unix_ms,
                            "method": m.method,
                            "path": m.path,
                            "primaryStatus": m.primary_status,
                            "shadowStatus": m.shadow_status,
                            "primaryDigest": m.primary_digest,
                            "shadowDigest": m.shadow_digest,
                        })
                    })
                    .collect();
                json!({
                    "namespace": row.namespace,
                    "service": row.service,
                    "route": row.route,
                    "shadow": row.shadow,
                    "mirrored": t.mirrored,
                    "matched": t.matched,
                    "statusMismatches": t.status_mismatches,
                    "bodyMismatches": t.body_mismatches,
                    "shadowErrors": t.shadow_errors,
                    "dropped": t.dropped,
                    "tooLarge": t.too_large,
                    "recent": recent,
                })
            })
            .collect();
        answer(StatusCode::OK, &json!({ "items": items }))
    }

    async fn status(&self) -> Result<Answer, Refusal> {
        let store = self.store.clone();
        let revision = blocking(move || store.revision()).await?;
        let proxies = self.registry.proxies();
        let nacks = proxies
            .iter()
            .filter(|p| p.state == ConfigState::Nacked)
            .count();
        Ok(answer(
            StatusCode::OK,
            &json!({
                "trustDomain": self.authority.trust_domain().as_str(),
                "revision": revision,
                "compiledRevision": self.compiler.compiled_revision(),
                "proxies": proxies.len(),
                "rootNotAfterUnix": self.authority.roots_not_after().map(|t| t.unix_timestamp()),
                "intermediateNotAfterUnix": self.authority.intermediate_not_after().unix_timestamp(),
                "nacks": nacks,
            }),
        ))
    }
}
