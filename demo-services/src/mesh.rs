//! Calls to other services, always through the local sidecar's outbound listener:
//! HTTP to `http://MESH/...` with `Host: <service>`, gRPC on a channel to `MESH` whose
//! `:authority` names the service. The sidecar picks the endpoint, brings mTLS and
//! applies the mesh's policies; a service never dials another's port itself.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Serialize;
use serde_json::Value;
use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};

use crate::inventory::grpc::inventory_client::InventoryClient;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A bound on every call, answer included: the sidecar has its own timeouts, but a
/// service must not hang if its sidecar does.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Answers between these services are small; a huge one is a fault, not data.
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// A call that got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{service}: {problem}")]
pub struct MeshError {
    pub service: &'static str,
    pub problem: String,
}

/// What another service answered.
#[derive(Debug, Clone)]
pub struct MeshAnswer {
    pub service: &'static str,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl MeshAnswer {
    /// The body as JSON, whatever the status.
    pub fn json(&self) -> Result<Value, MeshError> {
        serde_json::from_slice(&self.body).map_err(|e| MeshError {
            service: self.service,
            problem: format!("answered {} with a body that is not JSON: {e}", self.status),
        })
    }

    /// The body as JSON if the status is a success; otherwise an error naming it.
    pub fn success_json(&self) -> Result<Value, MeshError> {
        if !self.status.is_success() {
            return Err(MeshError {
                service: self.service,
                problem: format!(
                    "answered {}: {}",
                    self.status,
                    String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
                ),
            });
        }
        self.json()
    }
}

/// The headers that tie a call to the request that caused it, so the sidecars' logs
/// and traces follow one checkout across every hop.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    request_id: Option<HeaderValue>,
    traceparent: Option<HeaderValue>,
}

impl Trace {
    pub fn of(headers: &HeaderMap) -> Self {
        Self {
            request_id: headers.get(REQUEST_ID).cloned(),
            traceparent: headers.get(TRACEPARENT).cloned(),
        }
    }

    fn stamp(&self, headers: &mut HeaderMap) {
        if let Some(id) = &self.request_id {
            headers.insert(REQUEST_ID, id.clone());
        }
        if let Some(parent) = &self.traceparent {
            headers.insert(TRACEPARENT, parent.clone());
        }
    }

    /// `message` as a gRPC request carrying this trace.
    pub fn grpc<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = |value: &Option<HeaderValue>| {
            value
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<MetadataValue<Ascii>>().ok())
        };
        if let Some(id) = metadata(&self.request_id) {
            request.metadata_mut().insert("x-request-id", id);
        }
        if let Some(parent) = metadata(&self.traceparent) {
            request.metadata_mut().insert("traceparent", parent);
        }
        request
    }
}

/// The way out to the rest of the marketplace.
#[derive(Debug, Clone)]
pub struct Mesh {
    addr: SocketAddr,
    http: Client<HttpConnector, Full<Bytes>>,
    inventory: Channel,
}

impl Mesh {
    /// Nothing is dialled yet: the sidecar may start after its app.
    pub fn new(addr: SocketAddr) -> Result<Self, String> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let http = Client::builder(TokioExecutor::new()).build(connector);
        let inventory = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("--mesh {addr}: {e}"))?
            .origin(Uri::from_static("http://inventory"))
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_lazy();
        Ok(Self {
            addr,
            http,
            inventory,
        })
    }

    /// Inventory's gRPC API; requests made with [`Trace::grpc`] carry the trace.
    pub fn inventory(&self) -> InventoryClient<Channel> {
        InventoryClient::new(self.inventory.clone())
    }

    pub async fn get(
        &self,
        service: &'static str,
        path_and_query: &str,
        trace: &Trace,
    ) -> Result<MeshAnswer, MeshError> {
        self.send(service, Method::GET, path_and_query, None, trace)
            .await
    }

    pub async fn post(
        &self,
        service: &'static str,
        path: &str,
        body: &impl Serialize,
        trace: &Trace,
    ) -> Result<MeshAnswer, MeshError> {
        let body = serde_json::to_vec(body).map_err(|e| MeshError {
            service,
            problem: format!("encoding the request: {e}"),
        })?;
        self.send(service, Method::POST, path, Some(body.into()), trace)
            .await
    }

    async fn send(
        &self,
        service: &'static str,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        trace: &Trace,
    ) -> Result<MeshAnswer, MeshError> {
        let failed = |problem: String| MeshError { service, problem };
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path_and_query}", self.addr))
            .header(header::HOST, service);
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let mut request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| failed(format!("building the request for {path_and_query:?}: {e}")))?;
        trace.stamp(request.headers_mut());
        let call = async {
            let response = self.http.request(request).await.map_err(|e| {
                failed(format!(
                    "no answer through the mesh at {}: {}",
                    self.addr,
                    error_chain(&e)
                ))
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| failed(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok(MeshAnswer {
                service,
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| failed(format!("no answer within {CALL_TIMEOUT:?}")))?
    }
}

/// An error with its causes, which is where hyper says what actually went wrong.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
