//! `trellis-sidecar` owns the data path of `trellis-proxy`: the outbound listener
//! the local app calls, the inbound mTLS listener peers call, the ingress gateway's
//! listener (`--mode gateway`), protocol detection,
//! load balancing, the admin server, the proxy's telemetry, the traffic ledger it
//! reports, the request tap (`GET /tap`) and, in control-plane mode,
//! the client that fetches its certificate and config.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_debug_implementations)]

pub mod admin;
pub mod app_probe;
pub mod args;
pub mod control;
pub mod gateway;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod outbound;
pub mod proxy;
pub mod static_config;
pub mod tap;
pub mod telemetry;
pub mod trace;
pub mod traffic;

pub use proxy::{ProxyError, run};
