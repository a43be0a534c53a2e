//! `trellis-control-plane` owns the mesh's brain in universal mode: the embedded
//! store of applied resources and secrets, join tokens that prove a sidecar's
//! identity, and the Identity service that certifies sidecars over TLS. To come: the
//! discovery service, the registry, the compiler from resources to per-proxy config,
//! the operator API and the binary.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_debug_implementations)]

pub mod grpc_tls;
pub mod identity;
pub mod join_token;
pub mod store;
