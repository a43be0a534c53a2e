//! `trellis-bench` measures Trellis against baselines taken in the same run: the
//! CA's signing and handshake costs against plain rustls/rcgen (criterion benches
//! under `benches/`), and later the sidecar pair against a direct connection and HAProxy.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_debug_implementations)]

pub mod tls_memory;
