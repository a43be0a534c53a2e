//! `trellis-demo-services`: the online marketplace `trellisctl demo` runs inside the
//! mesh. One binary, `marketplace SERVICE`, is any one of its services:
//!
//! | service | owns | calls (through its sidecar) |
//! |---|---|---|
//! | `storefront` | catalog, carts | inventory (stock), recommendations, order |
//! | `user` | accounts | — |
//! | `order` | orders | inventory (gRPC), payment, shipping, analytics |
//! | `payment` | charges (v2: the shadow) | — |
//! | `inventory` | stock, reservations (HTTP and gRPC) | — |
//! | `shipping` | shipments | — |
//! | `analytics` | event counts | — |
//! | `recommendations` | picks (v1 bestsellers, v2 per user: the canary) | — |
//!
//! Every service serves HTTP/1.1 and h2c on one port, `/health` and `/ready`, fault
//! knobs at `/admin/faults` and the callers' mesh identities at `/admin/peers`, and
//! logs JSON. It never dials another service itself: calls go to the local sidecar's
//! outbound listener (`--mesh`) with the destination service as the authority, so the
//! mesh carries every hop over mTLS.
//!
//! Modules: one per service; `serve` (listener, request pipeline, access log),
//! `admin`, `faults`, `mesh` (outbound calls), `input`/`reply` (JSON in and out),
//! `catalog` (seed data), `clock`, `telemetry`, `args`.

pub mod admin;
pub mod analytics;
pub mod args;
pub mod catalog;
pub mod clock;
pub mod faults;
pub mod input;
pub mod inventory;
pub mod mesh;
pub mod order;
pub mod payment;
pub mod recommendations;
pub mod reply;
pub mod serve;
pub mod shipping;
pub mod storefront;
pub mod telemetry;
pub mod user;

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::{
    args::{Args, ServiceName},
    faults::Faults,
    mesh::Mesh,
    serve::{Front, StopSignal},
};

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Mesh(String),
}

/// Runs the service `args` names until SIGTERM or SIGINT.
pub async fn run(args: Args) -> Result<(), StartError> {
    let stop = StopSignal::install().map_err(StartError::Signals)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: args.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: args.listen,
        source,
    })?;
    let mesh = Mesh::new(args.mesh).map_err(StartError::Mesh)?;
    let routes = match args.service {
        ServiceName::Storefront => storefront::routes(mesh),
        ServiceName::User => user::routes(),
        ServiceName::Order => order::routes(mesh),
        ServiceName::Payment => payment::routes(args.version),
        ServiceName::Inventory => inventory::routes(),
        ServiceName::Shipping => shipping::routes(),
        ServiceName::Analytics => analytics::routes(),
        ServiceName::Recommendations => recommendations::routes(args.version),
    };
    let faults = args.faults();
    let front = Front::new(routes, Arc::new(Faults::new(faults)));
    tracing::info!(
        addr = %addr,
        service = args.service.as_str(),
        version = args.version.as_str(),
        mesh = %args.mesh,
        error_rate = faults.error_rate,
        latency_ms = faults.latency_ms,
        "listening"
    );
    serve::serve(listener, front, stop.received()).await;
    Ok(())
}
