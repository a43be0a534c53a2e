//! What every service serves besides its own API, never failed or delayed by the fault
//! knobs: `/health`, `/ready`, `/admin/faults` and `/admin/peers` (which mesh
//! identities called this service, so a test can see mTLS on every hop).

use std::{collections::BTreeMap, sync::Arc};

use axum::{Router, body::Bytes, extract::State, response::Response, routing::get};
use http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use serde_json::json;

use crate::{
    faults::Faults,
    input::{json_body, object},
    reply::{self, ApiError},
};

/// The header the sidecar's inbound sets to the caller's verified SPIFFE id.
pub const PEER_ID: &str = "x-trellis-peer-id";

/// Requests counted by the caller's mesh identity.
#[derive(Debug, Default)]
pub struct Peers {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Peers {
    /// Counts a request that came through the mesh; others carry no identity.
    pub fn record(&self, headers: &HeaderMap) {
        let Some(peer) = headers.get(PEER_ID).and_then(|v| v.to_str().ok()) else {
            return;
        };
        *self.counts.lock().entry(peer.to_string()).or_default() += 1;
    }

    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts.lock().clone()
    }
}

#[derive(Debug, Clone)]
struct AdminState {
    faults: Arc<Faults>,
    peers: Arc<Peers>,
}

/// Paths the fault knobs leave alone: probes and the knobs themselves.
pub fn exempt_from_faults(path: &str) -> bool {
    path == "/health" || path == "/ready" || path.starts_with("/admin/")
}

pub fn router(faults: Arc<Faults>, peers: Arc<Peers>) -> Router {
    Router::new()
        .route("/health", get(ok))
        .route("/ready", get(ok))
        .route("/admin/faults", get(get_faults).put(put_faults))
        .route("/admin/peers", get(get_peers))
        .with_state(AdminState { faults, peers })
}

async fn ok() -> Response {
    reply::json(StatusCode::OK, &json!({ "status": "ok" }))
}

async fn get_faults(State(state): State<AdminState>) -> Response {
    reply::json(StatusCode::OK, &state.faults.get())
}

async fn put_faults(State(state): State<AdminState>, body: Bytes) -> Result<Response, ApiError> {
    let body = json_body(&body)?;
    let fields = object(&body)?;
    let settings = state.faults.update(|current| current.updated(fields))?;
    tracing::info!(
        error_rate = settings.error_rate,
        latency_ms = settings.latency_ms,
        "fault knobs changed"
    );
    Ok(reply::json(StatusCode::OK, &settings))
}

async fn get_peers(State(state): State<AdminState>) -> Response {
    reply::json(StatusCode::OK, &json!({ "peers": state.peers.counts() }))
}
