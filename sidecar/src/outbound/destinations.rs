//! The outbound routing table compiled from a `ProxyConfig`: every destination
//! service with its endpoints, each endpoint with its pooled HTTP/2 client and its
//! load estimate. Compiled off the hot path and swapped in whole.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioTimer},
};
use serde::Serialize;
use trellis_api::config::{EndpointConfig, ProxyConfig, ServiceConfig};
use trellis_ca::{Credentials, SpiffeId};

use super::{
    balance::{PeakEwma, p2c},
    connect::{H2Connector, PeerTarget},
};

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("services.{service}.endpoints[{index}].identity: {reason}")]
    Identity {
        service: String,
        index: usize,
        reason: String,
    },
    #[error("services.{service}: building the TLS config: {reason}")]
    Tls { service: String, reason: String },
}

/// One snapshot of where outbound traffic may go.
#[derive(Debug)]
pub struct Destinations {
    config: ProxyConfig,
    services: HashMap<String, Arc<Destination>>,
}

#[derive(Debug)]
pub struct Destination {
    pub name: String,
    pub namespace: String,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug)]
pub struct Endpoint {
    pub target: Arc<PeerTarget>,
    /// One multiplexed HTTP/2 connection, kept and re-dialled by the pool.
    pub client: Client<H2Connector, Incoming>,
    pub load: Arc<PeakEwma>,
}

// === impl Destinations ===

impl Destinations {
    pub fn compile(config: ProxyConfig, creds: &Credentials) -> Result<Self, CompileError> {
        let mut services = HashMap::with_capacity(config.services.len());
        for (name, service) in &config.services {
            let ServiceConfig {
                namespace,
                endpoints,
                subsets: _,
                routes: _,
            } = service;
            let endpoints = endpoints
                .iter()
                .enumerate()
                .map(|(index, endpoint)| Endpoint::new(name, index, endpoint, creds))
                .collect::<Result<Vec<_>, _>>()?;
            services.insert(
                name.clone(),
                Arc::new(Destination {
                    name: name.clone(),
                    namespace: namespace.clone(),
                    endpoints,
                }),
            );
        }
        Ok(Self { config, services })
    }

    /// Compiles the config that replaces this one. Endpoints that stay keep their
    /// connections and load estimates, so a push never drops in-flight requests.
    pub fn compile_next(
        &self,
        config: ProxyConfig,
        creds: &Credentials,
    ) -> Result<Self, CompileError> {
        Self::compile(config, creds)
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Destination>> {
        self.services.get(name)
    }

    /// Finds the destination a host names: `payment`, `payment.shop`,
    /// `payment.shop.svc` or `payment.shop.svc.cluster.local` (port already removed).
    /// A namespace in the name must be the service's.
    pub fn resolve(&self, host: &str) -> Option<&Arc<Destination>> {
        // DNS names are case-insensitive; service names are lowercase.
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        if let Some(found) = self.services.get(host) {
            return Some(found);
        }
        let (name, rest) = host.split_once('.')?;
        let found = self.services.get(name)?;
        let (namespace, suffix) = rest.split_once('.').unwrap_or((rest, ""));
        let suffix_ok = suffix.is_empty() || suffix == "svc" || suffix.starts_with("svc.");
        (namespace == found.namespace && suffix_ok).then_some(found)
    }

    /// A view for `/config`: the config as given, plus each endpoint's live state.
    pub fn snapshot(&self) -> DestinationsView<'_> {
        let mut endpoints: Vec<EndpointView<'_>> = self
            .services
            .values()
            .flat_map(|d| {
                d.endpoints.iter().map(|e| EndpointView {
                    service: &d.name,
                    address: e.target.addr,
                    identity: e.target.identity.as_str(),
                    ewma_rtt_ms: e.load.rtt().as_secs_f64() * 1e3,
                    in_flight: e.load.pending(),
                })
            })
            .collect();
        endpoints.sort_by(|a, b| (a.service, a.address).cmp(&(b.service, b.address)));
        DestinationsView {
            config: &self.config,
            endpoints,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationsView<'a> {
    pub config: &'a ProxyConfig,
    pub endpoints: Vec<EndpointView<'a>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView<'a> {
    pub service: &'a str,
    pub address: SocketAddr,
    pub identity: &'a str,
    pub ewma_rtt_ms: f64,
    pub in_flight: u64,
}

// === impl Destination ===

impl Destination {
    pub fn pick(&self) -> Option<&Endpoint> {
        p2c(&self.endpoints, |e| &e.load)
    }
}

// === impl Endpoint ===

impl Endpoint {
    fn new(
        service: &str,
        index: usize,
        config: &EndpointConfig,
        creds: &Credentials,
    ) -> Result<Self, CompileError> {
        let EndpointConfig {
            address,
            identity,
            labels: _,
        } = config;
        let identity = SpiffeId::parse(identity).map_err(|e| CompileError::Identity {
            service: service.to_string(),
            index,
            reason: e.to_string(),
        })?;
        let target = PeerTarget::new(*address, identity, creds).map_err(|e| CompileError::Tls {
            service: service.to_string(),
            reason: e.to_string(),
        })?;
        let target = Arc::new(target);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_keep_alive_interval(Some(Duration::from_secs(30)))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .build(H2Connector(target.clone()));
        Ok(Self {
            target,
            client,
            load: Arc::new(PeakEwma::default()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::config::EndpointConfig;

    fn destinations() -> Destinations {
        let mut config = ProxyConfig::default();
        config.services.insert(
            "payment".into(),
            ServiceConfig {
                namespace: "shop".into(),
                endpoints: vec![],
                ..ServiceConfig::default()
            },
        );
        Destinations::compile(config, &Credentials::new(Default::default())).unwrap()
    }

    #[test]
    fn resolves_short_and_namespaced_names() {
        let d = destinations();
        for host in [
            "payment",
            "Payment.Shop",
            "payment.shop",
            "payment.shop.svc",
            "payment.shop.svc.cluster.local",
        ] {
            assert_eq!(
                d.resolve(host).map(|d| d.name.as_str()),
                Some("payment"),
                "{host}"
            );
        }
        for host in ["payment.other", "payment.shop.elsewhere", "pay", "order"] {
            assert!(d.resolve(host).is_none(), "{host}");
        }
    }

    #[test]
    fn a_bad_identity_is_named_by_its_field_path() {
        let mut config = ProxyConfig::default();
        config.services.insert(
            "payment".into(),
            ServiceConfig {
                namespace: "shop".into(),
                endpoints: vec![EndpointConfig {
                    address: "127.0.0.1:1".parse().unwrap(),
                    identity: "http://nope".into(),
                    labels: Default::default(),
                }],
                ..ServiceConfig::default()
            },
        );
        let e = Destinations::compile(config, &Credentials::new(Default::default())).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("services.payment.endpoints[0].identity:"),
            "{e}"
        );
    }
}
