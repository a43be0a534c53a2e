//! The end-to-end suite: real control plane, sidecars and apps on loopback.
//!
//! One test binary rather than one per file: each binary links the whole mesh, and ten
//! copies of it cost CI gigabytes of disk and minutes of linking for nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod canary;
mod control_plane;
mod gateway;
mod kubernetes;
mod kubernetes_control;
mod marketplace;
mod metrics;
mod sidecar_admin;
mod sidecar_breaker;
mod sidecar_bulkheads;
mod sidecar_faults;
mod sidecar_inbound_policy;
mod sidecar_mirror;
mod sidecar_refusals;
mod sidecar_retries;
mod sidecar_routing;
mod sidecar_traffic;
mod tracing;
mod traffic_split;
