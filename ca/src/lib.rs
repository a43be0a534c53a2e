//! `trellis-ca` owns workload identity: SPIFFE ids, the mesh certificate authority
//! (root, intermediate, CSR signing), trust bundles, the rustls verifiers that check
//! SPIFFE ids instead of DNS names, and the swappable credentials that let a process
//! rotate its certificate without dropping connections.
//!
//! Both the control plane (which signs) and the sidecar (which presents and verifies)
//! build on this crate; it knows nothing of either.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_debug_implementations)]

mod authority;
mod bundle;
mod credentials;
mod spiffe;
mod svid;
mod tls;

pub use authority::{
    Authority, AuthorityConfig, AuthorityError, CsrError, INTERMEDIATE_TTL, IssuedCert, OperatorCa,
    ROOT_TTL,
};
pub use bundle::{BundleError, TrustBundle};
pub use credentials::Credentials;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use svid::{Svid, SvidError, WorkloadKey, spiffe_id_of};
pub use tls::{
    ClientAuth, PeerIdError, SpiffeClientVerifier, SpiffeServerVerifier, client_config,
    crypto_provider, peer_id, server_config, server_config_with,
};
