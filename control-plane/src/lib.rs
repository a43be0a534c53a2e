//! `trellis-control-plane` owns the mesh's brain in universal mode: the embedded
//! store of applied resources and secrets, join tokens that prove a sidecar's
//! identity, and (to come) the identity and discovery services, the registry, the
//! compiler from resources to per-proxy config, and the operator API.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_debug_implementations)]

pub mod join_token;
pub mod store;
