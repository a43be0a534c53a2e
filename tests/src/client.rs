//! Requests as a local app sends them to its sidecar's outbound listener, and what
//! came back, read whole.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};

use crate::{mesh::http1_client, within};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A response with its body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    /// A header that must be there.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("response has no {name}: {:?}", self.headers))
    }

    /// `x-trellis-error`, or "" when the mesh did not make this answer.
    pub fn error(&self) -> &str {
        self.headers
            .get("x-trellis-error")
            .map_or("", |v| v.to_str().unwrap())
    }

    /// A 200 whose body is `body`.
    pub fn assert_ok(&self, body: &str) {
        assert_eq!(
            (self.status, self.body.as_str()),
            (StatusCode::OK, body),
            "{:?}",
            self.headers
        );
    }

    /// The app that answered, or "" when none did (the mesh answered itself).
    pub fn app(&self) -> &str {
        self.headers
            .get("x-app-name")
            .map_or("", |v| v.to_str().unwrap())
    }
}

/// Sends `method path` for `host` through the outbound listener `via` on `client`.
pub async fn call_on(
    client: &HttpClient,
    via: SocketAddr,
    host: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{via}{path}"))
        .header(header::HOST, host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::default()).unwrap();
    let response = within(path, client.request(request)).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = within("body", body.collect()).await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `call_on` with a fresh client.
pub async fn call(
    via: SocketAddr,
    host: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    call_on(&http1_client(), via, host, method, path, headers).await
}

pub async fn get(via: SocketAddr, host: &str, path: &str) -> Answer {
    call(via, host, Method::GET, path, &[]).await
}
