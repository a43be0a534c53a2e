//! The command line: which service to be, where to listen, where the mesh is, and the
//! fault knobs' starting values.

use std::net::SocketAddr;

use clap::{Parser, ValueEnum};

use crate::faults::FaultSettings;

/// One marketplace service, listening for HTTP/1.1 and h2c (and gRPC, for inventory)
/// on one port and calling the others through the local sidecar.
#[derive(Debug, Clone, Parser)]
#[command(name = "marketplace")]
pub struct Args {
    /// The service this process is.
    #[arg(value_enum)]
    pub service: ServiceName,

    /// Address to serve on; port 0 picks a free one (logged in the `listening` line).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,

    /// The local sidecar's outbound listener: every call to another service goes there.
    #[arg(long, env = "TRELLIS_MESH", default_value = "127.0.0.1:15001")]
    pub mesh: SocketAddr,

    /// Which implementation to run: recommendations v2 uses another algorithm, payment
    /// v2 is the shadow whose fees sometimes differ.
    #[arg(long, value_enum, default_value_t = Version::V1)]
    pub version: Version,

    /// Share of requests answered 500, from 0 to 1; changeable at `PUT /admin/faults`.
    #[arg(long, default_value_t = 0.0, value_parser = parse_error_rate)]
    pub error_rate: f64,

    /// Milliseconds added to every request; changeable at `PUT /admin/faults`.
    #[arg(long, default_value_t = 0, value_parser = parse_latency_ms)]
    pub latency_ms: u64,

    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

impl Args {
    pub fn faults(&self) -> FaultSettings {
        FaultSettings {
            error_rate: self.error_rate,
            latency_ms: self.latency_ms,
        }
    }
}

fn parse_error_rate(value: &str) -> Result<f64, String> {
    let rate: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    FaultSettings::check_error_rate(rate)?;
    Ok(rate)
}

fn parse_latency_ms(value: &str) -> Result<u64, String> {
    let ms: u64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a whole number of milliseconds"))?;
    FaultSettings::check_latency_ms(ms)?;
    Ok(ms)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServiceName {
    Storefront,
    User,
    Order,
    Payment,
    Inventory,
    Shipping,
    Analytics,
    Recommendations,
}

impl ServiceName {
    /// The name other services use for it in the mesh (the `Host` they call).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Storefront => "storefront",
            Self::User => "user",
            Self::Order => "order",
            Self::Payment => "payment",
            Self::Inventory => "inventory",
            Self::Shipping => "shipping",
            Self::Analytics => "analytics",
            Self::Recommendations => "recommendations",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}
