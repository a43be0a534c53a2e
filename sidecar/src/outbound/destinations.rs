//! The outbound routing table compiled from a `ProxyConfig`: every destination
//! service with its endpoints, subsets and routes, each endpoint with its pooled
//! HTTP/2 client and its load estimate, plus the inbound authorization rules.
//! Compiled off the hot path and swapped in whole.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use http::{Request, Response, StatusCode};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioTimer},
};
use serde::Serialize;
use trellis_api::config::{BackendConfig, EndpointConfig, ProxyConfig, ServiceConfig};
use trellis_ca::{Credentials, SpiffeId};

use super::{
    balance::{PeakEwma, p2c, p2c_where},
    bulkhead::Bulkheads,
    connect::{H2Connector, PeerTarget},
    outlier::{self, Breaker, Outlier, Policy, Unavailable},
    retry::{BudgetWindow, PeerBody, RetryBudget},
    route::{Backend, Route},
};
use crate::{
    http::{ProxyBody, mesh_error},
    inbound::authorize::Authorization,
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
    /// The service's pools; requests no route matches take `default`.
    pub bulkheads: Bulkheads,
}

#[derive(Debug)]
pub struct Endpoint {
    pub target: Arc<PeerTarget>,
    /// One multiplexed HTTP/2 connection, kept and re-dialled by the pool.
    pub client: Client<H2Connector, PeerBody>,
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
        Self::compile_reusing(config, creds, HashMap::new(), None)
    }

    /// Compiles the config that replaces this one. Endpoints that stay (same address
    /// and identity) keep their `Arc<Endpoint>`: their pooled connection and load
    /// estimate, so a push never drops in-flight requests or reconnects. Bulkhead
    /// pools whose limits stay keep their slots and waiters.
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
        Self::compile_reusing(config, creds, current, Some(self))
    }

    fn compile_reusing(
        config: ProxyConfig,
        creds: &Credentials,
        mut built: HashMap<EndpointKey, Arc<Endpoint>>,
        previous: Option<&Destinations>,
    ) -> Result<Self, CompileError> {
        let authorization = Authorization::compile(&config.inbound)?;
        let mut compiled = BTreeMap::new();
        for (name, service) in &config.services {
            // The retry budget keeps counting while the service stays.
            let window = previous
                .and_then(|p| p.services.get(name.as_str()))
                .map(|d| d.whole.budget.window().clone());
            compiled.insert(
                name.as_str(),
                Compiled::new(name, service, creds, &mut built, window)?,
            );
        }
        let mut services = HashMap::with_capacity(compiled.len());
        for (name, this) in &compiled {
            let ServiceConfig {
                namespace,
                endpoints: _,
                subsets: _,
                routes,
                // Compiled with the endpoints, which its breaker needs.
                circuit_breaker: _,
                bulkheads,
                // Compiled with the backends, which carry it.
                retry_budget: _,
            } = this.config;
            let bulkheads = Bulkheads::compile(
                &format!("services.{name}"),
                name,
                bulkheads,
                previous
                    .and_then(|p| p.services.get(*name))
                    .map(|d| &d.bulkheads),
            )?;
            let mut routes = routes
                .iter()
                .enumerate()
                .map(|(r, route)| {
                    let at = format!("services.{name}.routes[{r}]");
                    Route::compile(&at, route, &this.whole, &bulkheads, |field, backend| {
                        this.backend(field, backend, &compiled)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(before) = previous.and_then(|p| p.services.get(*name)) {
                for route in &mut routes {
                    route.keep_mirror_pool(&before.routes);
                }
            }
            services.insert(
                name.to_string(),
                Arc::new(Destination {
                    name: name.to_string(),
                    namespace: namespace.clone(),
                    endpoints: this.whole.endpoints.clone(),
                    routes,
                    whole: this.whole.clone(),
                    bulkheads,
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
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut endpoints: Vec<EndpointView<'_>> = self
            .services
            .values()
            .flat_map(|d| {
                d.endpoints.iter().map(move |e| {
                    let outlier::OutlierState {
                        ejected,
                        half_open,
                        ejected_until,
                        remaining,
                        consecutive_failures,
                        ejections,
                    } = e.outlier.state_at(now, wall);
                    EndpointView {
                        service: &d.name,
                        address: e.target.addr,
                        identity: e.target.identity.as_str(),
                        ewma_rtt_ms: e.load.rtt().as_secs_f64() * 1e3,
                        in_flight: e.load.pending(),
                        ejected,
                        half_open,
                        ejected_until: ejected_until.map(crate::telemetry::rfc3339),
                        ejection_remaining_ms: remaining.map(|r| r.as_secs_f64() * 1e3),
                        consecutive_failures,
                        ejections,
                    }
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

impl Destinations {
    /// `trellis_endpoint_ejected` in Prometheus text, from the live state at scrape
    /// time (an endpoint that left the config leaves no series behind). Only services
    /// with a `circuitBreaker`: the others never eject.
    pub fn render_ejections(&self) -> String {
        use std::fmt::Write;
        let mut services: Vec<_> = self
            .services
            .values()
            .filter(|d| d.breaker().policy().is_some())
            .collect();
        if services.is_empty() {
            return String::new();
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let name = outlier::EJECTED;
        let mut out = format!(
            "# HELP {name} 1 while the circuit breaker keeps the endpoint out of rotation (ejected or half-open)\n\
             # TYPE {name} gauge\n"
        );
        for destination in services {
            for endpoint in destination.endpoints.iter() {
                let ejected = u8::from(endpoint.outlier.is_out());
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",endpoint=\"{}\"}} {ejected}",
                    label_value(&destination.name),
                    endpoint.target.addr
                );
            }
        }
        out.push('\n');
        out
    }
}

/// Escapes a Prometheus label value.
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
    /// Out of rotation: ejected, or half-open until its probe succeeds.
    pub ejected: bool,
    /// The ejection time is over: one probe is let through (or is out).
    pub half_open: bool,
    /// When the ejection ends (absent once the probe is out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_until: Option<String>,
    /// How long the ejection has left; 0 once half-open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejection_remaining_ms: Option<f64>,
    pub consecutive_failures: u32,
    /// Ejections in a row; the next lasts `baseEjectionTime × 2^ejections`.
    pub ejections: u32,
}

// === impl Compiled ===

impl<'c> Compiled<'c> {
    fn new(
        name: &str,
        config: &'c ServiceConfig,
        creds: &Credentials,
        built: &mut HashMap<EndpointKey, Arc<Endpoint>>,
        budget_window: Option<Arc<BudgetWindow>>,
    ) -> Result<Self, CompileError> {
        let ServiceConfig {
            namespace: _,
            endpoints,
            subsets,
            routes: _,
            circuit_breaker,
            bulkheads: _,
            retry_budget,
        } = config;
        let budget = RetryBudget::compile(
            &format!("services.{name}.retryBudget"),
            retry_budget.as_ref(),
            budget_window,
        )?;
        let policy = circuit_breaker
            .as_ref()
            .map(|cb| Policy::compile(&format!("services.{name}.circuitBreaker"), cb))
            .transpose()?;
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
        let all: Arc<[Arc<Endpoint>]> = all.into();
        let breaker = Arc::new(Breaker::new(name, policy, all.clone()));
        let subsets = subsets
            .iter()
            .map(|(subset, selector)| {
                // A subset that selects nothing is no error: instances come and go.
                let selected: Vec<_> = endpoints
                    .iter()
                    .zip(all.iter())
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
                    breaker: breaker.clone(),
                    budget: budget.clone(),
                };
                (subset.as_str(), backend)
            })
            .collect();
        Ok(Self {
            config,
            whole: Backend {
                service: name.to_string(),
                subset: None,
                endpoints: all,
                breaker,
                budget,
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
    /// An endpoint in rotation among all of them, as opaque TCP uses them. TCP
    /// reports no outcomes, so it never takes a half-open endpoint's probe.
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        if self.whole.breaker.policy().is_none() {
            return p2c(&self.endpoints, |e| &e.load);
        }
        let now = Instant::now();
        p2c_where(
            &self.endpoints,
            |e| e.load.cost(now),
            |e| !e.outlier.is_out(),
        )
    }

    /// The service's circuit breaker.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.whole.breaker
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
    /// How reports and metrics name the backend: its subset, or its service when the
    /// backend is a whole service.
    pub fn label(&self) -> &str {
        self.subset.as_deref().unwrap_or(&self.service)
    }

    /// `pick_for(None)`, for callers that need no reason.
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        self.pick_for(None).ok()
    }

    /// The mesh's answer when `pick_for` has no endpoint: 503 `no-endpoints` or
    /// `circuit-open`, naming the service and subset.
    pub fn unavailable(&self, why: Unavailable) -> Response<ProxyBody> {
        let what = match &self.subset {
            Some(subset) => format!("subset {subset:?} of service {:?}", self.service),
            None => format!("service {:?}", self.service),
        };
        let (kind, message) = match why {
            Unavailable::NoEndpoints => ("no-endpoints", format!("{what} has no endpoints")),
            Unavailable::CircuitOpen => (
                "circuit-open",
                format!("every endpoint of {what} is ejected by its circuit breaker"),
            ),
        };
        mesh_error(StatusCode::SERVICE_UNAVAILABLE, kind, message)
    }

    /// An endpoint that is not ejected, preferring one other than `avoid` (the one
    /// a retry follows) while another is available. A half-open endpoint may be
    /// picked as its one probe: the caller must `record` the outcome of every
    /// request it sends to what this returns.
    pub fn pick_for(&self, avoid: Option<&Arc<Endpoint>>) -> Result<&Arc<Endpoint>, Unavailable> {
        self.pick_at(avoid, Instant::now())
    }

    /// An endpoint for a mirrored copy: one in rotation, by load, that is neither
    /// ejected nor half-open. A copy reports nothing to the balancer or the breaker, so
    /// it must not take a half-open endpoint's one probe.
    pub fn pick_for_shadow(&self) -> Option<&Arc<Endpoint>> {
        let now = Instant::now();
        p2c_where(
            &self.endpoints,
            |e| e.load.cost(now),
            |e| !e.outlier.is_out(),
        )
    }

    fn pick_at(
        &self,
        avoid: Option<&Arc<Endpoint>>,
        now: Instant,
    ) -> Result<&Arc<Endpoint>, Unavailable> {
        let endpoints = &*self.endpoints;
        let other = |e: &Arc<Endpoint>| avoid.is_none_or(|a| !Arc::ptr_eq(a, e));
        let load = |e: &Arc<Endpoint>| e.load.cost(now);
        if self.breaker.policy().is_none() {
            // Nothing is ever ejected: P2C as it always was, around `avoid`.
            return p2c_where(endpoints, load, other)
                .or_else(|| p2c_where(endpoints, load, |_| true))
                .ok_or(Unavailable::NoEndpoints);
        }
        // A half-open endpoint wins its draw: its estimate dates from before the
        // ejection (slow, or the penalty of failed connects) and would otherwise keep
        // its probe waiting long after the ejection ended.
        let cost = |e: &Arc<Endpoint>| if e.outlier.is_out() { 0.0 } else { load(e) };
        if endpoints.is_empty() {
            return Err(Unavailable::NoEndpoints);
        }
        // Each miss (a probe another request took first, an ejection meanwhile)
        // leaves one fewer candidate, so this ends.
        for _ in 0..=endpoints.len() {
            let admits = |e: &Arc<Endpoint>| e.outlier.admits(now);
            let picked = p2c_where(endpoints, cost, |e| other(e) && admits(e))
                .or_else(|| p2c_where(endpoints, cost, admits));
            match picked {
                Some(endpoint) if endpoint.outlier.admit(now) => return Ok(endpoint),
                Some(_) => continue,
                None => break,
            }
        }
        Err(Unavailable::CircuitOpen)
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
            outlier: Outlier::new(*address),
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

    fn mirrored(mirror: trellis_api::config::MirrorConfig) -> ProxyConfig {
        web_with_routes(vec![RouteConfig {
            mirror: Some(mirror),
            ..rule(vec![to(None, Some("v1"))])
        }])
    }

    fn mirror_to(service: Option<&str>, subset: Option<&str>) -> trellis_api::config::MirrorConfig {
        trellis_api::config::MirrorConfig {
            service: service.map(str::to_string),
            subset: subset.map(str::to_string),
            percent: 100.0,
            compare: false,
            ignore_fields: vec![],
            max_body_bytes: None,
        }
    }

    #[test]
    fn a_mirror_resolves_its_shadow_like_a_backend() {
        let req = Request::get("/").body(()).unwrap();
        let d = compile(mirrored(mirror_to(None, Some("v2")))).unwrap();
        let (route, _) = d.get("web").unwrap().route(&req);
        let mirror = route.unwrap().mirror.as_ref().unwrap();
        assert_eq!(mirror.shadow(), "v2");
        let d = compile(mirrored(mirror_to(Some("web-next"), None))).unwrap();
        let (route, _) = d.get("web").unwrap().route(&req);
        assert_eq!(route.unwrap().mirror.as_ref().unwrap().shadow(), "web-next");
    }

    #[test]
    fn a_push_keeps_the_mirror_pool_while_the_shadow_stays() {
        let creds = Credentials::new(Default::default());
        let req = Request::get("/").body(()).unwrap();
        let mirror_of = |d: &Destinations| {
            let (route, _) = d.get("web").unwrap().route(&req);
            route.unwrap().mirror.clone().unwrap()
        };
        let first = Destinations::compile(mirrored(mirror_to(None, Some("v2"))), &creds).unwrap();
        let body = http_body_util::Empty::<bytes::Bytes>::new();
        let (_held, _) = mirror_of(&first).admit(&Request::new(body)).unwrap();
        let same = first
            .compile_next(mirrored(mirror_to(None, Some("v2"))), &creds)
            .unwrap();
        assert_eq!(mirror_of(&same).in_flight(), 1, "the copy out still counts");
        let other = same
            .compile_next(mirrored(mirror_to(Some("web-next"), None)), &creds)
            .unwrap();
        assert_eq!(
            mirror_of(&other).in_flight(),
            0,
            "another shadow, another pool"
        );
    }

    #[test]
    fn bad_mirrors_are_named_by_their_field_path() {
        let at = "services.web.routes[0].mirror";
        let cases = [
            (
                mirror_to(None, Some("v4")),
                format!("{at}.subset: no subset \"v4\" (the service has [\"v1\", \"v2\", \"v3\"])"),
            ),
            (
                mirror_to(Some("nowhere"), None),
                format!("{at}.service: no service \"nowhere\" in this config"),
            ),
            (
                mirror_to(Some("web-next"), Some("v2")),
                format!("{at}: give exactly one of service and subset"),
            ),
            (
                trellis_api::config::MirrorConfig {
                    percent: 100.5,
                    ..mirror_to(None, Some("v2"))
                },
                format!("{at}.percent: must be between 0 and 100, not 100.5"),
            ),
            (
                trellis_api::config::MirrorConfig {
                    compare: true,
                    ignore_fields: vec!["id".into(), "order..at".into()],
                    ..mirror_to(None, Some("v2"))
                },
                format!(
                    "{at}.ignoreFields[1]: \"order..at\" must be a field name or a dotted path like `order.id`"
                ),
            ),
            (
                trellis_api::config::MirrorConfig {
                    ignore_fields: vec!["id".into()],
                    ..mirror_to(None, Some("v2"))
                },
                format!("{at}.ignoreFields: only means something with `compare: true`"),
            ),
            (
                trellis_api::config::MirrorConfig {
                    max_body_bytes: Some(2 << 20),
                    ..mirror_to(None, Some("v2"))
                },
                format!("{at}.maxBodyBytes: must be at most 1048576, not 2097152"),
            ),
        ];
        for (mirror, want) in cases {
            let e = compile(mirrored(mirror)).unwrap_err().to_string();
            assert_eq!(e, want);
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

    fn breaker(failures: u32, percent: u32) -> trellis_api::config::CircuitBreakerConfig {
        trellis_api::config::CircuitBreakerConfig {
            consecutive_failures: failures,
            base_ejection_time: "10s".into(),
            max_ejection_time: "1m".into(),
            max_ejection_percent: percent,
        }
    }

    /// `web` (:1 :2 v1, :3 v2) with a circuit breaker.
    fn guarded(failures: u32, percent: u32) -> Destinations {
        let mut config = web_with_routes(vec![]);
        let web = config.services.get_mut("web").unwrap();
        web.circuit_breaker = Some(breaker(failures, percent));
        compile(config).unwrap()
    }

    fn fail(backend: &Backend, port: u16, times: u32, now: Instant) {
        let endpoint = backend
            .endpoints
            .iter()
            .find(|e| e.target.addr.port() == port)
            .unwrap();
        for _ in 0..times {
            backend
                .breaker
                .record_at(&endpoint.outlier, outlier::Outcome::Failure, now);
        }
    }

    fn picked_ports(backend: &Backend, now: Instant) -> std::collections::BTreeSet<u16> {
        (0..200)
            .filter_map(|_| backend.pick_at(None, now).ok())
            .map(|e| e.target.addr.port())
            .collect()
    }

    #[test]
    fn pick_for_skips_ejected_endpoints_and_opens_when_all_are_out() {
        let d = guarded(2, 100);
        let web = d.get("web").unwrap();
        let whole = &web.whole;
        let t0 = Instant::now();
        fail(whole, 1, 1, t0);
        assert_eq!(picked_ports(whole, t0), [1, 2, 3].into(), "below the count");
        fail(whole, 1, 1, t0);
        assert_eq!(picked_ports(whole, t0), [2, 3].into());
        fail(whole, 2, 2, t0);
        fail(whole, 3, 2, t0);
        assert_eq!(
            whole.pick_at(None, t0).unwrap_err(),
            Unavailable::CircuitOpen
        );
        let response = whole.unavailable(Unavailable::CircuitOpen);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["x-trellis-error"], "circuit-open");

        // The v1 subset shares the state: ejected there too.
        let v1 = d
            .get("web")
            .unwrap()
            .route(&Request::get("/").body(()).unwrap())
            .1;
        assert_eq!(v1.pick_at(None, t0).unwrap_err(), Unavailable::CircuitOpen);

        // Ten seconds on, all three are half-open: exactly one probe each.
        let t1 = t0 + Duration::from_secs(10);
        let probes: std::collections::BTreeSet<u16> = (0..3)
            .map(|_| whole.pick_at(None, t1).unwrap().target.addr.port())
            .collect();
        assert_eq!(probes, [1, 2, 3].into());
        assert_eq!(
            whole.pick_at(None, t1).unwrap_err(),
            Unavailable::CircuitOpen
        );
    }

    #[test]
    fn a_half_open_endpoint_gets_its_probe_however_slow_it_looked() {
        let d = guarded(1, 100);
        let whole = &d.get("web").unwrap().whole;
        let t0 = Instant::now();
        // Connects refused before the ejection: a 1 s penalty in its estimate.
        whole.endpoints[0].load.start().fail();
        fail(whole, 1, 1, t0);
        let t1 = t0 + Duration::from_secs(10);
        let picks: Vec<u16> = (0..50)
            .map(|_| whole.pick_at(None, t1).unwrap().target.addr.port())
            .collect();
        assert_eq!(picks.iter().filter(|p| **p == 1).count(), 1, "{picks:?}");
    }

    #[test]
    fn pick_for_avoids_the_endpoint_a_retry_follows_while_another_is_available() {
        let d = guarded(1, 100);
        let whole = &d.get("web").unwrap().whole;
        let t0 = Instant::now();
        let first = whole.endpoints[0].clone();
        for _ in 0..100 {
            let picked = whole.pick_at(Some(&first), t0).unwrap();
            assert!(!Arc::ptr_eq(picked, &first));
        }
        fail(whole, 2, 1, t0);
        fail(whole, 3, 1, t0);
        let picked = whole.pick_at(Some(&first), t0).unwrap();
        assert!(Arc::ptr_eq(picked, &first), "the only one left");

        // Without a breaker too.
        let d = compile(web_with_routes(vec![])).unwrap();
        let whole = &d.get("web").unwrap().whole;
        let first = whole.endpoints[0].clone();
        assert!((0..100).all(|_| !Arc::ptr_eq(whole.pick_for(Some(&first)).unwrap(), &first)));
    }

    #[test]
    fn the_ejection_cap_counts_the_whole_service() {
        // 50% of 3 rounds down to 1.
        let d = guarded(1, 50);
        let web = d.get("web").unwrap();
        let t0 = Instant::now();
        fail(&web.whole, 1, 1, t0);
        // :3 fails through its subset: the cap counts :1 of the whole service.
        let v2 = Backend {
            subset: Some("v2".into()),
            endpoints: web.whole.endpoints[2..].into(),
            ..web.whole.clone()
        };
        fail(&v2, 3, 5, t0);
        fail(&web.whole, 2, 5, t0);
        assert_eq!(picked_ports(&web.whole, t0), [2, 3].into());
        let view = d.snapshot();
        let ejected: Vec<_> = view.endpoints.iter().filter(|e| e.ejected).collect();
        assert_eq!(ejected.len(), 1);
        assert_eq!(ejected[0].address.port(), 1);
        assert_eq!(ejected[0].ejections, 1);
        let remaining = ejected[0].ejection_remaining_ms.unwrap();
        assert!((9_000.0..=10_000.0).contains(&remaining), "{remaining}");
        let kept = view
            .endpoints
            .iter()
            .find(|e| e.address.port() == 3)
            .unwrap();
        assert_eq!((kept.ejected, kept.consecutive_failures), (false, 5));
    }

    #[test]
    fn without_a_circuit_breaker_nothing_is_ejected() {
        let d = compile(web_with_routes(vec![])).unwrap();
        let whole = &d.get("web").unwrap().whole;
        let t0 = Instant::now();
        fail(whole, 1, 100, t0);
        fail(whole, 2, 100, t0);
        fail(whole, 3, 100, t0);
        assert_eq!(picked_ports(whole, t0), [1, 2, 3].into());
        assert_eq!(d.render_ejections(), "");
        let view = d.snapshot();
        let web: Vec<_> = view
            .endpoints
            .iter()
            .filter(|e| e.service == "web")
            .collect();
        assert!(
            web.iter()
                .all(|e| !e.ejected && e.consecutive_failures == 100)
        );
    }

    #[test]
    fn ejections_survive_a_push_and_show_in_metrics() {
        let creds = Credentials::new(Default::default());
        let mut config = web_with_routes(vec![]);
        config.services.get_mut("web").unwrap().circuit_breaker = Some(breaker(1, 100));
        let first = Destinations::compile(config.clone(), &creds).unwrap();
        fail(&first.get("web").unwrap().whole, 2, 1, Instant::now());
        config.version = "2".into();
        let next = first.compile_next(config, &creds).unwrap();
        let whole = &next.get("web").unwrap().whole;
        assert_eq!(picked_ports(whole, Instant::now()), [1, 3].into());
        let text = next.render_ejections();
        assert!(
            text.starts_with("# HELP trellis_endpoint_ejected "),
            "{text}"
        );
        assert!(
            text.contains("trellis_endpoint_ejected{service=\"web\",endpoint=\"127.0.0.1:2\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("trellis_endpoint_ejected{service=\"web\",endpoint=\"127.0.0.1:1\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("web-next"), "no breaker there: {text}");
    }

    #[test]
    fn a_bad_circuit_breaker_is_named_by_its_field_path() {
        let mut config = web_with_routes(vec![]);
        let mut bad = breaker(1, 100);
        bad.base_ejection_time = "soon".into();
        config.services.get_mut("web").unwrap().circuit_breaker = Some(bad);
        let e = compile(config).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "services.web.circuitBreaker.baseEjectionTime: invalid duration \"soon\""
            ),
            "{e}"
        );
    }

    fn with_pools(routes: Vec<RouteConfig>, concurrent: u32) -> ProxyConfig {
        let mut config = web_with_routes(routes);
        config.services.get_mut("web").unwrap().bulkheads = ["default", "batch"]
            .map(|name| trellis_api::config::BulkheadConfig {
                name: name.into(),
                max_concurrent_requests: concurrent,
                max_pending_requests: 0,
                max_pending_time: None,
            })
            .into();
        config
    }

    #[test]
    fn routes_take_their_pools_and_a_push_keeps_unchanged_ones() {
        let creds = Credentials::new(Default::default());
        let batch = RouteConfig {
            bulkhead: Some("batch".into()),
            ..rule(vec![])
        };
        let config = |concurrent| with_pools(vec![batch.clone()], concurrent);
        let req = Request::get("/").body(()).unwrap();
        // The routed request's pool, and the pool of requests no route matches.
        let pools = |d: &Destinations| {
            let web = d.get("web").unwrap();
            let routed = web.route(&req).0.unwrap().bulkhead.clone().unwrap();
            (routed, web.bulkheads.default_pool().unwrap().clone())
        };

        let first = Destinations::compile(config(1), &creds).unwrap();
        let (batch_pool, default_pool) = pools(&first);
        assert_eq!(batch_pool.name(), "batch");
        assert_eq!(default_pool.name(), "default");
        let web_next = first.get("web-next").unwrap();
        assert!(web_next.bulkheads.default_pool().is_none(), "unbounded");

        // Same limits: the same pools. New limits: new pools.
        let same = first.compile_next(config(1), &creds).unwrap();
        let (kept, _) = pools(&same);
        assert!(Arc::ptr_eq(&batch_pool, &kept));
        let changed = same.compile_next(config(2), &creds).unwrap();
        let (rebuilt, rebuilt_default) = pools(&changed);
        assert!(!Arc::ptr_eq(&batch_pool, &rebuilt));
        assert!(!Arc::ptr_eq(&default_pool, &rebuilt_default));
    }

    #[test]
    fn bad_pools_and_faults_are_named_by_their_field_path() {
        let unknown = RouteConfig {
            bulkhead: Some("x".into()),
            ..rule(vec![])
        };
        let e = compile(with_pools(vec![rule(vec![]), unknown], 1))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "services.web.routes[1].bulkhead: no pool \"x\" (the service has [\"batch\", \"default\"])"
        );
        let e = compile(with_pools(vec![], 0)).unwrap_err().to_string();
        assert_eq!(
            e,
            "services.web.bulkheads[0].maxConcurrentRequests: must be at least 1"
        );
        let faulty = RouteConfig {
            fault: Some(trellis_api::config::FaultConfig {
                delay: None,
                abort: Some(trellis_api::config::FaultAbortConfig {
                    status: 503,
                    percent: 130.0,
                }),
            }),
            ..rule(vec![])
        };
        let e = compile(web_with_routes(vec![faulty]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "services.web.routes[0].fault.abort.percent: must be between 0 and 100, not 130"
        );
    }
}
