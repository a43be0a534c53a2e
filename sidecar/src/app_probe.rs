//! The app's own HTTP probes, relayed. On Kubernetes the injector points each app
//! container's `httpGet` probe at this proxy's admin port (`/app-probe/<container>/
//! <kind>`), because the kubelet probes in plaintext from outside the pod and the
//! inbound listener refuses plaintext under STRICT mTLS. The admin server answers
//! such a path by sending the probe to the app over loopback and returning the app's
//! status, so the probe means what the pod's author wrote. Only the paths the
//! injector named (`--app-probes`) are relayed: the admin port is no open door to
//! every local port.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{Empty, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// The longest a relayed probe may take; the kubelet's own timeout is usually shorter.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where one rewritten probe really goes: `GET http://127.0.0.1:<port><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppProbe {
    pub port: u16,
    pub path: String,
}

/// The probes to relay, by the admin path the kubelet calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppProbes(BTreeMap<String, AppProbe>);

impl AppProbes {
    /// `{"/app-probe/web/readiness": {"port": 8080, "path": "/ready"}}`, as the
    /// injector writes `TRELLIS_APP_PROBES`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let probes: BTreeMap<String, AppProbe> = serde_json::from_str(text).map_err(|e| {
            format!("not a JSON object of {{\"port\", \"path\"}} by admin path: {e}")
        })?;
        for (admin_path, probe) in &probes {
            if !admin_path.starts_with("/app-probe/") {
                return Err(format!("{admin_path:?} does not start with /app-probe/"));
            }
            if probe.port == 0 || !probe.path.starts_with('/') {
                return Err(format!(
                    "{admin_path:?}: port {} path {:?}: want a port 1-65535 and a path starting with /",
                    probe.port, probe.path
                ));
            }
        }
        Ok(Self(probes))
    }

    pub fn get(&self, admin_path: &str) -> Option<&AppProbe> {
        self.0.get(admin_path)
    }
}

/// Sends `probe` to the app and answers with the app's status (and no body); 503
/// naming why when the app cannot be reached.
pub async fn relay(probe: &AppProbe) -> Response<Full<Bytes>> {
    match tokio::time::timeout(PROBE_TIMEOUT, send(probe)).await {
        Ok(Ok(status)) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = status;
            response
        }
        Ok(Err(error)) => unavailable(format!(
            "app probe 127.0.0.1:{}{}: {error}\n",
            probe.port, probe.path
        )),
        Err(_) => unavailable(format!(
            "app probe 127.0.0.1:{}{}: no answer within {PROBE_TIMEOUT:?}\n",
            probe.port, probe.path
        )),
    }
}

async fn send(probe: &AppProbe) -> Result<StatusCode, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", probe.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::get(probe.path.as_str())
        .header(header::HOST, format!("127.0.0.1:{}", probe.port))
        .header(header::USER_AGENT, "trellis-proxy app-probe")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.status())
}

fn unavailable(message: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(message)));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_parse_and_bad_ones_are_named() {
        let probes =
            AppProbes::parse(r#"{"/app-probe/web/readiness": {"port": 8080, "path": "/ready"}}"#)
                .unwrap();
        assert_eq!(
            probes.get("/app-probe/web/readiness"),
            Some(&AppProbe {
                port: 8080,
                path: "/ready".into()
            })
        );
        assert_eq!(probes.get("/app-probe/web/liveness"), None);
        for (bad, needle) in [
            ("[1]", "not a JSON object"),
            (
                r#"{"/metrics": {"port": 1, "path": "/"}}"#,
                "does not start with /app-probe/",
            ),
            (
                r#"{"/app-probe/a/b": {"port": 0, "path": "/"}}"#,
                "want a port",
            ),
            (
                r#"{"/app-probe/a/b": {"port": 80, "path": "x"}}"#,
                "path starting with /",
            ),
            (
                r#"{"/app-probe/a/b": {"port": 80, "path": "/", "host": "h"}}"#,
                "unknown field",
            ),
        ] {
            let error = AppProbes::parse(bad).unwrap_err();
            assert!(error.contains(needle), "{bad}: {error}");
        }
    }

    /// A one-route app: `/ready` answers `status`, anything else 404.
    async fn app(status: StatusCode) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<_>| async move {
                        let mut response = Response::new(Empty::<Bytes>::new());
                        if req.uri().path() != "/ready" {
                            *response.status_mut() = StatusCode::NOT_FOUND;
                        } else {
                            *response.status_mut() = status;
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn the_apps_status_is_the_probes_answer() {
        let healthy = app(StatusCode::OK).await;
        let failing = app(StatusCode::SERVICE_UNAVAILABLE).await;
        let probe = |port, path: &str| AppProbe {
            port,
            path: path.into(),
        };
        assert_eq!(
            relay(&probe(healthy, "/ready")).await.status(),
            StatusCode::OK
        );
        assert_eq!(
            relay(&probe(healthy, "/other")).await.status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            relay(&probe(failing, "/ready")).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Nobody listening: unavailable, saying so.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let response = relay(&probe(closed, "/ready")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        use http_body_util::BodyExt;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains("connect"),
            "{body:?}"
        );
    }
}
