//! The operator API client: HTTP/1 over plain TCP to the control plane, a bearer
//! token on every request, JSON answers, and a deadline so nothing hangs.

use std::{error::Error as _, io};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use serde_json::Value;

use crate::{connection::Endpoint, error::CliError};

/// Answers are a few resources or a list of proxies; anything near this is not ours.
const MAX_ANSWER_BYTES: usize = 64 << 20;

#[derive(Debug)]
pub struct Api {
    endpoint: Endpoint,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    pub fn new(endpoint: Endpoint) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(endpoint.timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self { endpoint, client }
    }

    pub fn addr(&self) -> &str {
        &self.endpoint.addr
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.send(Method::GET, path, None).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, CliError> {
        self.send(Method::DELETE, path, None).await
    }

    pub async fn post(
        &self,
        path: &str,
        content_type: &'static str,
        body: Bytes,
    ) -> Result<Value, CliError> {
        self.send(Method::POST, path, Some((content_type, body)))
            .await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Value, CliError> {
        let Endpoint {
            addr,
            addr_origin,
            token,
            token_origin,
            timeout,
        } = &self.endpoint;
        let request_name = format!("{method} {path}");
        let answer_error = |reason: String| CliError::Answer {
            addr: addr.clone(),
            request: request_name.clone(),
            reason,
        };
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("http://{addr}{path}"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::ACCEPT, "application/json");
        if let Some((content_type, _)) = &body {
            request = request.header(header::CONTENT_TYPE, *content_type);
        }
        let request = request
            .body(Full::new(body.map(|(_, bytes)| bytes).unwrap_or_default()))
            .map_err(|e| {
                CliError::Usage(format!("cannot build the request {request_name}: {e}"))
            })?;

        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if let Some(io) = io_cause(&e)
                    && io.kind() == io::ErrorKind::ConnectionRefused
                {
                    return CliError::Refused {
                        addr: addr.clone(),
                        origin: addr_origin.clone(),
                    };
                }
                if let Some(io) = io_cause(&e)
                    && io.kind() == io::ErrorKind::TimedOut
                {
                    return CliError::Timeout {
                        addr: addr.clone(),
                        origin: addr_origin.clone(),
                        timeout: *timeout,
                    };
                }
                CliError::Unreachable {
                    addr: addr.clone(),
                    origin: addr_origin.clone(),
                    reason: cause_chain(&e),
                }
            })?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| answer_error(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, CliError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(*timeout, exchange)
            .await
            .map_err(|_| CliError::Timeout {
                addr: addr.clone(),
                origin: addr_origin.clone(),
                timeout: *timeout,
            })??;

        if status == StatusCode::UNAUTHORIZED {
            return Err(CliError::Unauthorized {
                addr: addr.clone(),
                origin: token_origin.clone(),
            });
        }
        let json: Result<Value, _> = serde_json::from_slice(&bytes);
        if status.is_success() {
            return json.map_err(|e| answer_error(format!("not JSON ({e})")));
        }
        match json.as_ref().ok().and_then(|v| v.get("error")) {
            Some(Value::String(text)) => Err(CliError::Server(text.clone())),
            _ => Err(CliError::Status {
                addr: addr.clone(),
                status,
                body: first_line(&bytes),
            }),
        }
    }
}

/// The `io::Error` underneath a client error, if any: it tells a refused connection
/// from a timeout.
fn io_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cause = e.source();
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cause = c.source();
    }
    None
}

fn cause_chain(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A short, one-line view of a body that is not the API's JSON error.
fn first_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(empty body)");
    let mut line: String = line.trim().chars().take(200).collect();
    if text.trim().chars().count() > line.chars().count() {
        line.push_str(" ...");
    }
    line
}

/// Percent-encodes one path segment or query value, so a name typed on the command
/// line can never change the request's shape.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_into_one_segment() {
        assert_eq!(encode("web-1.v2"), "web-1.v2");
        assert_eq!(encode("a/b?c"), "a%2Fb%3Fc");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn a_foreign_error_body_is_shortened_to_a_line() {
        assert_eq!(first_line(b"\n<html>\n<body>"), "<html> ...");
        assert_eq!(first_line(b""), "(empty body)");
        assert_eq!(first_line(b"bad gateway"), "bad gateway");
    }
}
