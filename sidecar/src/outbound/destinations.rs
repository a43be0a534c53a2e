//! The outbound routing table compiled from a `ProxyConfig`: every destination
//! service with its endpoints, subsets and routes, each endpoint with its pooled
//! HTTP/2 client and its load estimate, plus the inbound authorization rules.
//! Compiled off the hot path and swapped in whole.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use http::Request;
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioTimer},
};
use serde::Serialize;
use trellis_api::config::{BackendConfig, EndpointConfig, ProxyConfig, ServiceConfig};
use trellis_ca::{Credentials, SpiffeId};

use super::{
    balance::{PeakEwma, p2c},
    connect::{H2Connector, PeerTarget},
    outlier::{Outlier, Unavailable},
    route::{Backend, Route},
};
use crate::inbound::authorize::Authorization;

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
    /// Any other field: its path in the config and what is wrong with it.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl CompileError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// One snapshot of where outbound traffic may go and who may call in.
#[derive(Debug)]
pub struct Destinations {
    config: ProxyConfig,
    services: HashMap<String, Arc<Destination>>,
    authorization: Authorization,
}

#[derive(Debug)]
pub struct Destination {
    pub name: String,
    pub namespace: String,
    pub endpoints: Arc<[Arc<Endpoint>]>,
    routes: Vec<Route>,
    /// Where a request no route matches goes: every endpoint.
    whole: Backend,
}

#[derive(Debug)]
pub struct Endpoint {
    pub target: Arc<PeerTarget>,
    /// One multiplexed HTTP/2 connection, kept and re-dialled by the pool.
    pub client: Client<H2Connector, Incoming>,
    pub load: Arc<PeakEwma>,
    /// The circuit breaker's view of this endpoint.
    pub outlier: Outlier,
}

/// An endpoint is the same peer when both where to dial and who must answer are.
type EndpointKey = (SocketAddr, String);

/// A service's endpoints and subsets, before its routes are compiled (a route may
/// name any service's endpoints).
struct Compiled<'c> {
    config: &'c ServiceConfig,
    whole: Backend,
    subsets: BTreeMap<&'c str, Backend>,
}

// === impl Destinations ===

impl Destinations {
    pub fn compile(config: ProxyConfig, creds: &Credentials) -> Result<Self, CompileError> {
        Self::compile_reusing(config, creds, HashMap::new())
    }

    /// Compiles the config that replaces this one. Endpoints that stay (same address
    /// and identity) keep their `Arc<Endpoint>`: their pooled connection and load
    /// estimate, so a push never drops in-flight requests or reconnects.
    pub fn compile_next(
        &self,
        config: ProxyConfig,
        creds: &Credentials,
    ) -> Result<Self, CompileError> {
        let current = self
            .services
            .values()
            .flat_map(|d| d.endpoints.iter())
            .map(|e| (e.key(), e.clone()))
            .collect();
        Self::compile_reusing(config, creds, current)
    }

    fn compile_reusing(
        config: ProxyConfig,
        creds: &Credentials,
        mut built: HashMap<EndpointKey, Arc<Endpoint>>,
    ) -> Result<Self, CompileError> {
        let authorization = Authorization::compile(&config.inbound)?;
        let mut compiled = BTreeMap::new();
        for (name, service) in &config.services {
            compiled.insert(
                name.as_str(),
                Compiled::new(name, service, creds, &mut built)?,
            );
        }
        let mut services = HashMap::with_capacity(compiled.len());
        for (name, this) in &compiled {
            let ServiceConfig {
                namespace,
                endpoints: _,
                subsets: _,
                routes,
                circuit_breaker: _,
                bulkheads: _,
                retry_budget: _,
            } = this.config;
            let routes = routes
                .iter()
                .enumerate()
                .map(|(r, route)| {
                    let at = format!("services.{name}.routes[{r}]");
                    Route::compile(&at, route, &this.whole, |field, backend| {
                        this.backend(field, backend, &compiled)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            services.insert(
                name.to_string(),
                Arc::new(Destination {
                    name: name.to_string(),
                    namespace: namespace.clone(),
                    endpoints: this.whole.endpoints.clone(),
                    routes,
                    whole: this.whole.clone(),
                }),
            );
        }
        Ok(Self {
            config,
            services,
            authorization,
        })
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Who may call the local app.
    pub fn authorization(&self) -> &Authorization {
        &self.authorization
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
        let (namespace, suffix) = rest.split_once('.').unwrap_or((rest, ""));
        let suffix_ok = suffix.is_empty() || suffix == "svc" || suffix.starts_with("svc.");
        if !suffix_ok {
            return None;
        }
        // A service of the proxy's own namespace is keyed by its name, one of another
        // namespace by `name.namespace`: the host's first two labels, sliced rather
        // than built.
        let qualified = &host[..name.len() + 1 + namespace.len()];
        [name, qualified]
            .into_iter()
            .filter_map(|key| self.services.get(key))
            .find(|found| found.namespace == namespace)
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

// === impl Compiled ===

impl<'c> Compiled<'c> {
    fn new(
        name: &str,
        config: &'c ServiceConfig,
        creds: &Credentials,
        built: &mut HashMap<EndpointKey, Arc<Endpoint>>,
    ) -> Result<Self, CompileError> {
        let ServiceConfig {
            namespace: _,
            endpoints,
            subsets,
            routes: _,
            circuit_breaker: _,
            bulkheads: _,
            retry_budget: _,
        } = config;
        let mut all = Vec::with_capacity(endpoints.len());
        for (index, endpoint) in endpoints.iter().enumerate() {
            let key = (endpoint.address, endpoint.identity.clone());
            let endpoint = match built.get(&key) {
                Some(existing) => existing.clone(),
                None => {
                    let new = Arc::new(Endpoint::new(name, index, endpoint, creds)?);
                    built.insert(key, new.clone());
                    new
                }
            };
            all.push(endpoint);
        }
        let subsets = subsets
            .iter()
            .map(|(subset, selector)| {
                // A subset that selects nothing is no error: instances come and go.
                let selected: Vec<_> = endpoints
                    .iter()
                    .zip(&all)
                    .filter(|(config, _)| {
                        selector
                            .iter()
                            .all(|(k, v)| config.labels.get(k) == Some(v))
                    })
                    .map(|(_, endpoint)| endpoint.clone())
                    .collect();
                let backend = Backend {
                    service: name.to_string(),
                    subset: Some(subset.clone()),
                    endpoints: selected.into(),
                };
                (subset.as_str(), backend)
            })
            .collect();
        Ok(Self {
            config,
            whole: Backend {
                service: name.to_string(),
                subset: None,
                endpoints: all.into(),
            },
            subsets,
        })
    }

    /// Resolves a route's backend: a subset of this service, or another service of
    /// the config as a whole (its own routes do not apply again).
    fn backend(
        &self,
        field: &str,
        config: &BackendConfig,
        services: &BTreeMap<&str, Compiled<'_>>,
    ) -> Result<Backend, CompileError> {
        let BackendConfig {
            service,
            subset,
            weight: _,
        } = config;
        match (service, subset) {
            (Some(service), None) => services
                .get(service.as_str())
                .map(|s| s.whole.clone())
                .ok_or_else(|| {
                    CompileError::invalid(
                        format!("{field}.service"),
                        format!("no service {service:?} in this config"),
                    )
                }),
            (None, Some(subset)) => self.subsets.get(subset.as_str()).cloned().ok_or_else(|| {
                let known: Vec<_> = self.subsets.keys().copied().collect();
                CompileError::invalid(
                    format!("{field}.subset"),
                    format!("no subset {subset:?} (the service has {known:?})"),
                )
            }),
            _ => Err(CompileError::invalid(
                field,
                "give exactly one of service and subset",
            )),
        }
    }
}

// === impl Destination ===

impl Destination {
    /// All endpoints, as opaque TCP uses them.
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        p2c(&self.endpoints, |e| &e.load)
    }

    /// The first route whose match holds and the backend drawn from it; without one,
    /// the whole service.
    pub fn route<B>(&self, req: &Request<B>) -> (Option<&Route>, &Backend) {
        match self.routes.iter().find(|r| r.matches(req)) {
            // Compile refuses a rule whose weights sum to 0, so a rule always picks one.
            Some(route) => (Some(route), route.pick().unwrap_or(&self.whole)),
            None => (None, &self.whole),
        }
    }
}

// === impl Backend ===

impl Backend {
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        p2c(&self.endpoints, |e| &e.load)
    }

    /// An endpoint that is not ejected, preferring one other than `avoid` (the one
    /// a retry follows).
    pub fn pick_for(&self, avoid: Option<&Arc<Endpoint>>) -> Result<&Arc<Endpoint>, Unavailable> {
        let _ = avoid;
        self.pick().ok_or(Unavailable::NoEndpoints)
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
        // Labels only select subsets, at compile time.
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
            outlier: Outlier::default(),
        })
    }

    fn key(&self) -> EndpointKey {
        (self.target.addr, self.target.identity.as_str().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::config::{EndpointConfig, RouteConfig};

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
        config.services.insert(
            "ledger.bank".into(),
            ServiceConfig {
                namespace: "bank".into(),
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
        // Another namespace's service is keyed `name.namespace` by the control plane.
        for host in [
            "ledger.bank",
            "ledger.bank.svc",
            "Ledger.Bank.svc.cluster.local",
        ] {
            assert_eq!(
                d.resolve(host).map(|d| d.name.as_str()),
                Some("ledger.bank"),
                "{host}"
            );
        }
        for host in [
            "payment.other",
            "payment.shop.elsewhere",
            "pay",
            "order",
            "ledger.other",
        ] {
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

    fn endpoint(port: u16, service: &str, version: &str) -> EndpointConfig {
        EndpointConfig {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            identity: format!("spiffe://cluster.local/ns/default/sa/{service}"),
            labels: [("version".to_string(), version.to_string())].into(),
        }
    }

    fn web_with_routes(routes: Vec<RouteConfig>) -> ProxyConfig {
        let mut config = ProxyConfig::default();
        config.services.insert(
            "web".into(),
            ServiceConfig {
                endpoints: vec![
                    endpoint(1, "web", "v1"),
                    endpoint(2, "web", "v1"),
                    endpoint(3, "web", "v2"),
                ],
                subsets: [
                    ("v1".to_string(), [("version".into(), "v1".into())].into()),
                    ("v2".to_string(), [("version".into(), "v2".into())].into()),
                    ("v3".to_string(), [("version".into(), "v3".into())].into()),
                ]
                .into(),
                routes,
                ..ServiceConfig::default()
            },
        );
        config.services.insert(
            "web-next".into(),
            ServiceConfig {
                endpoints: vec![endpoint(4, "web-next", "v9")],
                ..ServiceConfig::default()
            },
        );
        config
    }

    fn rule(backends: Vec<BackendConfig>) -> RouteConfig {
        RouteConfig {
            name: "r".into(),
            matches: Default::default(),
            backends,
            ..RouteConfig::default()
        }
    }

    fn to(service: Option<&str>, subset: Option<&str>) -> BackendConfig {
        BackendConfig {
            service: service.map(str::to_string),
            subset: subset.map(str::to_string),
            weight: 1,
        }
    }

    fn compile(config: ProxyConfig) -> Result<Destinations, CompileError> {
        Destinations::compile(config, &Credentials::new(Default::default()))
    }

    fn ports(backend: &Backend) -> Vec<u16> {
        backend
            .endpoints
            .iter()
            .map(|e| e.target.addr.port())
            .collect()
    }

    #[test]
    fn subsets_select_endpoints_by_label_and_backends_resolve() {
        let d = compile(web_with_routes(vec![rule(vec![to(None, Some("v2"))])])).unwrap();
        let web = d.get("web").unwrap();
        let req = Request::get("/").body(()).unwrap();
        let (route, backend) = web.route(&req);
        assert_eq!(route.unwrap().name, "r");
        assert_eq!(
            (backend.subset.as_deref(), ports(backend)),
            (Some("v2"), vec![3])
        );

        let d = compile(web_with_routes(vec![rule(vec![to(
            Some("web-next"),
            None,
        )])]))
        .unwrap();
        let (_, backend) = d.get("web").unwrap().route(&req);
        assert_eq!(
            (backend.service.as_str(), ports(backend)),
            ("web-next", vec![4])
        );
        // A service backend shares the other service's endpoints, pool and all.
        assert!(Arc::ptr_eq(
            &backend.endpoints[0],
            &d.get("web-next").unwrap().endpoints[0]
        ));

        // The empty subset v3 compiles; it is a 503 at request time, not a NACK.
        let d = compile(web_with_routes(vec![rule(vec![to(None, Some("v3"))])])).unwrap();
        let (_, backend) = d.get("web").unwrap().route(&req);
        assert!(backend.pick().is_none());

        // No rule: the whole service.
        let d = compile(web_with_routes(vec![])).unwrap();
        let (route, backend) = d.get("web").unwrap().route(&req);
        assert!(route.is_none());
        assert_eq!(ports(backend), vec![1, 2, 3]);
    }

    #[test]
    fn bad_backends_are_named_by_their_field_path() {
        for (routes, want) in [
            (
                vec![
                    rule(vec![]),
                    rule(vec![to(None, Some("v1")), to(None, Some("v4"))]),
                ],
                "services.web.routes[1].backends[1].subset: no subset \"v4\" (the service has [\"v1\", \"v2\", \"v3\"])",
            ),
            (
                vec![rule(vec![to(Some("nowhere"), None)])],
                "services.web.routes[0].backends[0].service: no service \"nowhere\" in this config",
            ),
            (
                vec![rule(vec![to(Some("web-next"), Some("v1"))])],
                "services.web.routes[0].backends[0]: give exactly one of service and subset",
            ),
            (
                vec![rule(vec![to(None, None)])],
                "services.web.routes[0].backends[0]: give exactly one of service and subset",
            ),
        ] {
            let e = compile(web_with_routes(routes)).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
    }

    #[test]
    fn compile_next_keeps_the_endpoints_that_stay() {
        let creds = Credentials::new(Default::default());
        let first = Destinations::compile(web_with_routes(vec![]), &creds).unwrap();
        let mut next_config = web_with_routes(vec![rule(vec![to(None, Some("v1"))])]);
        let web = next_config.services.get_mut("web").unwrap();
        // :2 stays, :3 changes identity, :1 goes, :5 comes.
        web.endpoints.remove(0);
        web.endpoints[1].identity = "spiffe://cluster.local/ns/default/sa/other".into();
        web.endpoints.push(endpoint(5, "web", "v1"));
        let next = first.compile_next(next_config, &creds).unwrap();

        let old = &first.get("web").unwrap().endpoints;
        let new = &next.get("web").unwrap().endpoints;
        assert!(Arc::ptr_eq(&old[1], &new[0]), ":2 kept its endpoint");
        assert!(!Arc::ptr_eq(&old[2], &new[1]), ":3 has a new identity");
        assert_eq!(
            new[1].target.identity.as_str(),
            "spiffe://cluster.local/ns/default/sa/other"
        );
        assert!(Arc::ptr_eq(
            &first.get("web-next").unwrap().endpoints[0],
            &next.get("web-next").unwrap().endpoints[0]
        ));
        // The route's subset holds the kept endpoint itself, not a copy.
        let req = Request::get("/").body(()).unwrap();
        let (_, backend) = next.get("web").unwrap().route(&req);
        assert_eq!(ports(backend), vec![2, 5]);
        assert!(Arc::ptr_eq(&backend.endpoints[0], &old[1]));
    }

    #[test]
    fn bad_inbound_rules_fail_the_compile() {
        let mut config = ProxyConfig::default();
        config.inbound.allow.push(Default::default());
        config.inbound.allow.push(trellis_api::config::AllowConfig {
            from: vec![trellis_api::config::SourceConfig {
                identity: Some("not-spiffe".into()),
                namespace: None,
            }],
            to: vec![],
        });
        let e = compile(config).unwrap_err().to_string();
        assert!(e.starts_with("inbound.allow[1].from[0].identity:"), "{e}");
    }
}
