//! The marketplace demo services (`marketplace SERVICE`) as real processes, each
//! behind a real sidecar of the control plane, and JSON calls to them.
//!
//! An app needs its sidecar's outbound address when it starts (`--mesh`), and the
//! sidecar needs the app's address when it starts (`--app-addr`). Rather than reserve a
//! port by binding and releasing it (which another test may take in between), the app
//! gets an [`OutboundHandoff`]: a listener this test process holds from the start,
//! which passes each connection on to the sidecar's outbound listener once that exists.
//! The bytes are untouched, so the sidecar sees exactly what the app sent.

use std::{net::SocketAddr, path::PathBuf, process::Command};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    control_plane::{ControlPlane, MeshSidecar, MeshSidecarSpec},
    mesh::http1_client,
    process::{Process, addr_field, binary},
    within,
};

pub fn marketplace_binary() -> PathBuf {
    binary("marketplace", "TRELLIS_MARKETPLACE_BIN")
}

/// A listener that forwards to an address given later (see the module doc).
pub struct OutboundHandoff {
    pub addr: SocketAddr,
    target: watch::Sender<Option<SocketAddr>>,
    accepting: JoinHandle<()>,
}

impl OutboundHandoff {
    pub async fn bind() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (target, watching) = watch::channel(None);
        let accepting = tokio::spawn(async move {
            while let Ok((mut app_side, _)) = listener.accept().await {
                let mut watching = watching.clone();
                tokio::spawn(async move {
                    // A connection made before the sidecar is known waits for it.
                    let target = match watching.wait_for(Option::is_some).await {
                        Ok(target) => *target,
                        Err(_) => return,
                    };
                    let Some(target) = target else { return };
                    let Ok(mut sidecar_side) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut app_side, &mut sidecar_side).await;
                });
            }
        });
        Self {
            addr,
            target,
            accepting,
        }
    }

    pub fn forward_to(&self, outbound: SocketAddr) {
        self.target.send_replace(Some(outbound));
    }
}

impl Drop for OutboundHandoff {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// One marketplace service: the app process, its sidecar and the handoff between.
pub struct MarketplaceService {
    pub service: &'static str,
    /// The app's own port (admin endpoints; the mesh reaches it through `sidecar`).
    pub addr: SocketAddr,
    pub app: Process,
    pub sidecar: MeshSidecar,
    _handoff: OutboundHandoff,
}

impl MarketplaceService {
    /// Starts `marketplace SERVICE ARGS` and its sidecar with a join token of `cp`.
    pub async fn start(cp: &ControlPlane, service: &'static str, args: &[&str]) -> Self {
        Self::start_with(cp, service, args, |spec| spec).await
    }

    /// As `start`, with the sidecar's spec (namespace, labels) changed by `sidecar`.
    pub async fn start_with(
        cp: &ControlPlane,
        service: &'static str,
        args: &[&str],
        sidecar: impl FnOnce(MeshSidecarSpec) -> MeshSidecarSpec,
    ) -> Self {
        let handoff = OutboundHandoff::bind().await;
        let mut command = Command::new(marketplace_binary());
        command
            .arg(service)
            .args(["--listen", "127.0.0.1:0"])
            .args(["--mesh", &handoff.addr.to_string()])
            .args(["--log-format", "json"])
            .args(args);
        let mut app = Process::spawn(&format!("marketplace {service}"), command);
        let listening = app.listening(service);
        assert_eq!(listening["service"], service, "{listening}");
        let addr = addr_field(&listening, "addr");
        let sidecar = cp
            .sidecar(sidecar(MeshSidecarSpec::new(service, addr)))
            .await;
        handoff.forward_to(sidecar.outbound);
        Self {
            service,
            addr,
            app,
            sidecar,
            _handoff: handoff,
        }
    }

    /// A call straight to the app's port, as an operator or a test reads admin data.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        json_call(self.addr, self.service, method, path, body).await
    }

    /// The mesh identities that called this app, from its `/admin/peers`.
    pub async fn peers(&self) -> Vec<String> {
        let (status, answer) = self.call(Method::GET, "/admin/peers", None).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer["peers"]
            .as_object()
            .unwrap_or_else(|| panic!("{} peers: {answer}", self.service))
            .keys()
            .cloned()
            .collect()
    }
}

/// A JSON request to `via` (an app, or a sidecar's outbound listener) for `host`;
/// the answer's status and JSON body (`Value::Null` when the body is not JSON).
pub async fn json_call(
    via: SocketAddr,
    host: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{via}{path}"))
        .header(header::HOST, host);
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = request.body(Full::new(Bytes::from(body))).unwrap();
    let response = within(path, http1_client().request(request)).await.unwrap();
    let status = response.status();
    let body = within("body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}
