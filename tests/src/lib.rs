//! `trellis-tests`: end-to-end tests that run the real `trellis-proxy` binary on
//! loopback between real test workloads. This library is the harness: a test PKI,
//! sidecar processes with their readiness, and the workloads they front.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness: a panic is a failed test
#![deny(rust_2018_idioms)]
#![allow(missing_debug_implementations)]

pub mod apps;
pub mod client;
pub mod control_plane;
pub mod fake_kube;
pub mod marketplace;
pub mod mesh;
pub mod otlp;
/// The CA crate's own test PKI (operator-style root + intermediate that can also
/// forge leaves), shared rather than written twice.
#[path = "../../ca/tests/pki/mod.rs"]
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod relay;

/// The test workloads' gRPC API.
#[allow(clippy::all, unreachable_pub, missing_debug_implementations)]
pub mod echo {
    tonic::include_proto!("trellis.test.echo");
}

/// Fails the test instead of hanging it.
pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(std::time::Duration::from_secs(20), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 20 s"))
}

/// Polls `check` every 25 ms until it holds; fails the test naming `what` after 20 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}
