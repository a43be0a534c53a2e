//! `trellis-api` owns the contracts between sidecars and the control plane: the
//! protobuf services (Identity now; Discovery with the control plane) and, later, the
//! proxy configuration model both sides share.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_debug_implementations)]

pub mod config;
pub mod duration;

/// `trellis.identity.v1`: a workload's CSR and credential in, its SVID out.
pub mod identity {
    #[allow(
        clippy::all,
        clippy::pedantic,
        unreachable_pub,
        missing_debug_implementations
    )]
    pub mod v1 {
        tonic::include_proto!("trellis.identity.v1");
    }
}
