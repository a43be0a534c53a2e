//! `trellis-bench` measures Trellis against baselines taken in the same run: the
//! CA's signing and handshake costs against plain rustls/rcgen (criterion benches
//! under `benches/`), and the sidecar pair against a direct connection and an HAProxy
//! pair (the `trellis-bench` binary).

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_debug_implementations)]

pub mod backend;
pub mod haproxy;
pub mod load;
pub mod procstat;
pub mod tls_memory;
