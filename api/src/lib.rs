//! `trellis-api` owns the contracts between sidecars and the control plane: the
//! protobuf services (Identity, Discovery) and the proxy configuration model both
//! sides share.

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

/// `trellis.discovery.v1`: config pushed to sidecars (ACK/NACK), stats reported back.
pub mod discovery {
    #[allow(
        clippy::all,
        clippy::pedantic,
        unreachable_pub,
        missing_debug_implementations
    )]
    pub mod v1 {
        tonic::include_proto!("trellis.discovery.v1");
    }
}

/// The largest gRPC message either side accepts. tonic's 4 MiB default is too small
/// for the config of a proxy that may call thousands of endpoints.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The largest piece of a config one `ConfigPush` carries. A gRPC stream keeps an
/// encode buffer as large as the largest message it sent, for as long as it lives:
/// with whole configs that is a copy of the config per connected proxy.
pub const CONFIG_CHUNK_BYTES: usize = 8 * 1024;

/// Upper bounds of the latency buckets a `Discovery.Report` carries, in seconds.
/// Fixed, so the control plane adds windows from every proxy up bucket by bucket; it
/// refuses a report with any other bounds.
pub const LATENCY_BOUNDS_SECONDS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The longest window one `Discovery.Report` may cover, in milliseconds (an hour, the
/// control plane's retention).
pub const MAX_REPORT_WINDOW_MS: u32 = 3_600_000;
