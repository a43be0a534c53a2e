//! `trellis-control-plane` owns the mesh's brain in universal mode: the embedded
//! store of applied resources and secrets, join tokens that prove a sidecar's
//! identity, the Identity service that certifies sidecars over TLS, the registry of
//! running sidecars, the compiler from resources and endpoints to per-proxy config,
//! the Discovery service that pushes it, the canary controller that moves canaries'
//! weights by the sidecars' reports, and the operator API `trellisctl` speaks.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_debug_implementations)]

pub mod admin;
pub mod api;
pub mod args;
pub mod canary;
pub mod compiler;
pub mod dashboard;
pub mod discovery;
pub mod grpc_tls;
pub mod identity;
pub mod join_token;
pub mod kubernetes;
pub mod registry;
pub mod reports;
pub mod server;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod webhook;
