//! `trellis-bench` measures Trellis against baselines taken in the same run: the
//! CA's signing and handshake costs against plain rustls/rcgen (criterion benches
//! under `benches/`), the sidecar pair against a direct connection and an HAProxy
//! pair (the `trellis-bench` binary), and the control plane's config push to many
//! simulated proxies against the apply alone (`trellis-bench-control-plane`).

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_debug_implementations)]

pub mod backend;
pub mod control_plane;
pub mod haproxy;
pub mod load;
pub mod policies;
pub mod procstat;
pub mod simulated_proxy;
pub mod tls_memory;
