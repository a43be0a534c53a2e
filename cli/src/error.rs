//! Every way a command fails, each worded to tell the operator what to check.
//! `main` prints one as `error: <message>` and exits 1.

use std::{path::PathBuf, time::Duration};

use crate::connection::Origin;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "cannot read the API token from {}: {reason}; start the control plane with \
         this data dir, pass --data-dir (TRELLIS_DATA_DIR), or give --token (TRELLIS_API_TOKEN)",
        path.display()
    )]
    TokenFile { path: PathBuf, reason: String },

    #[error("the API token ({origin}) is empty")]
    EmptyToken { origin: Origin },

    #[error("cannot read the API address from {}: {reason}", path.display())]
    AddrFile { path: PathBuf, reason: String },

    #[error(
        "the API address {value:?} ({origin}) is not an address: write ip:port, e.g. 127.0.0.1:15011"
    )]
    BadAddr { value: String, origin: Origin },

    #[error(
        "cannot reach the control plane API at {addr} ({origin}): connection refused, so the \
         control plane is not running there; start trellis-control-plane or pass --api-addr"
    )]
    Refused { addr: String, origin: Origin },

    #[error(
        "cannot reach the control plane API at {addr} ({origin}): {reason}; is the control \
         plane running?"
    )]
    Unreachable {
        addr: String,
        origin: Origin,
        reason: String,
    },

    #[error(
        "the control plane API at {addr} ({origin}) did not answer within {timeout:?}; it is \
         not running there or it is stuck"
    )]
    Timeout {
        addr: String,
        origin: Origin,
        timeout: Duration,
    },

    #[error(
        "the control plane at {addr} refused the API token (401 Unauthorized): the token \
         {origin} is wrong; use the api-token file of the data dir the control plane runs with"
    )]
    Unauthorized { addr: String, origin: Origin },

    /// The control plane's own `{"error": ...}` text, shown as it is: it names the
    /// document and field path.
    #[error("{0}")]
    Server(String),

    #[error("the control plane at {addr} answered {status}: {body}")]
    Status {
        addr: String,
        status: http::StatusCode,
        body: String,
    },

    #[error("unexpected answer from the control plane at {addr} to {request}: {reason}")]
    Answer {
        addr: String,
        request: String,
        reason: String,
    },

    #[error("{path}: {reason}")]
    Manifest { path: String, reason: String },

    #[error("{0}")]
    Usage(String),

    #[error("demo: {0}")]
    Demo(String),

    /// `trellisctl tap` found nothing it could tap; the message says what it looked for.
    #[error("{0}")]
    Tap(String),

    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}
