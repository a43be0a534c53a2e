//! The registry of running sidecars in universal mode: each subscribed proxy is an
//! endpoint of its service while its stream is open and it reports healthy, but for
//! one that gave no inbound address (a gateway: peers never call it). The compiler
//! reads endpoints from here; `trellisctl get proxies` reads config state.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use trellis_ca::SpiffeId;

/// What a proxy said about itself in its Hello, with the id its SVID proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyInfo {
    pub service: String,
    pub namespace: String,
    pub instance: String,
    pub identity: SpiffeId,
    /// Where peers reach it; none for a gateway, which is nobody's endpoint.
    pub address: Option<SocketAddr>,
    pub labels: BTreeMap<String, String>,
    pub healthy: bool,
    pub proxy_version: String,
    /// Its admin server, for `trellisctl tap`; none from a sidecar that did not say.
    pub admin: Option<SocketAddr>,
}

/// A service the compiler builds one config for: every proxy of it gets the same one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Group {
    pub service: String,
    pub namespace: String,
}

#[derive(Debug)]
struct Entry {
    info: ProxyInfo,
    connected_at: Instant,
    /// The last version pushed to it.
    latest: Option<String>,
    acked: Option<String>,
    nack: Option<Nack>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nack {
    pub version: String,
    pub error: String,
}

/// One endpoint as other proxies see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    pub service: String,
    pub namespace: String,
    pub instance: String,
    pub address: SocketAddr,
    pub identity: String,
    pub labels: BTreeMap<String, String>,
    pub healthy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConfigState {
    /// It runs the latest version it was sent.
    Acked,
    /// A version was sent and not answered yet (or none was sent yet).
    Pending,
    /// It refused the latest version and runs an older one.
    Nacked,
}

/// One proxy's connection and config state, for `trellisctl get proxies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyView {
    pub service: String,
    pub namespace: String,
    pub instance: String,
    pub identity: String,
    /// None for a gateway.
    pub address: Option<SocketAddr>,
    /// Its admin server (`/tap`, `/metrics`); none when it did not say.
    pub admin: Option<SocketAddr>,
    pub healthy: bool,
    pub proxy_version: String,
    pub connected_seconds: u64,
    pub latest_version: Option<String>,
    pub acked_version: Option<String>,
    pub nack: Option<Nack>,
    pub state: ConfigState,
}

/// A Hello's `inbound_address`: an `ip:port` peers can dial, or empty for a proxy
/// peers never call (a gateway), which is then no endpoint.
pub fn inbound_address(text: &str) -> Result<Option<SocketAddr>, String> {
    dialable("hello.inbound_address", "peers", text)
}

/// A Hello's `admin_address`: an `ip:port` an operator's `trellisctl tap` can dial,
/// or empty when the sidecar does not say.
pub fn admin_address(text: &str) -> Result<Option<SocketAddr>, String> {
    dialable("hello.admin_address", "trellisctl", text)
}

fn dialable(field: &str, who: &str, text: &str) -> Result<Option<SocketAddr>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let address: SocketAddr = text.parse().map_err(|e| format!("{field} {text:?}: {e}"))?;
    if address.ip().is_unspecified() || address.port() == 0 {
        return Err(format!(
            "{field} {address} is not an address {who} can dial"
        ));
    }
    Ok(Some(address))
}

/// Handle of one registered proxy; the stream that owns it calls `leave` when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProxyId(u64);

#[derive(Debug, Default)]
pub struct Registry {
    entries: Mutex<HashMap<ProxyId, Entry>>,
    next_id: AtomicU64,
    /// Woken when the set of endpoints others see changes (join, leave, health).
    endpoints_changed: Arc<Notify>,
    /// Endpoints of the previous control plane process, kept until their sidecars
    /// reconnect or the deadline passes, so a restart does not empty everyone's
    /// endpoints while the sidecars are still finding their way back.
    remembered: Mutex<(Vec<EndpointView>, Option<Instant>)>,
}

impl Registry {
    pub fn new(endpoints_changed: Arc<Notify>) -> Self {
        Self {
            entries: Mutex::default(),
            next_id: AtomicU64::new(1),
            endpoints_changed,
            remembered: Mutex::default(),
        }
    }

    /// Publishes `endpoints` (from before a restart) until `until`, each until an
    /// instance of the same name subscribes again.
    pub fn remember(&self, endpoints: Vec<EndpointView>, until: Instant) {
        *self.remembered.lock() = (endpoints, Some(until));
        self.endpoints_changed.notify_one();
    }

    pub fn join(&self, info: ProxyInfo) -> ProxyId {
        let id = ProxyId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut entries = self.entries.lock();
        // The same instance subscribing again (it saw its old stream die first): the
        // new stream wins, so the instance is never published twice.
        let before = entries.len();
        entries.retain(|_, e| {
            (&e.info.namespace, &e.info.service, &e.info.instance)
                != (&info.namespace, &info.service, &info.instance)
        });
        let replaced = before - entries.len();
        let entry = Entry {
            info,
            connected_at: Instant::now(),
            latest: None,
            acked: None,
            nack: None,
        };
        entries.insert(id, entry);
        drop(entries);
        if replaced > 0 {
            metrics::gauge!(crate::telemetry::PROXIES).decrement(replaced as f64);
        }
        metrics::gauge!(crate::telemetry::PROXIES).increment(1.0);
        self.endpoints_changed.notify_one();
        id
    }

    pub fn leave(&self, id: ProxyId) {
        if self.entries.lock().remove(&id).is_some() {
            metrics::gauge!(crate::telemetry::PROXIES).decrement(1.0);
            self.endpoints_changed.notify_one();
        }
    }

    pub fn set_health(&self, id: ProxyId, healthy: bool) {
        let changed = self
            .entries
            .lock()
            .get_mut(&id)
            .is_some_and(|e| std::mem::replace(&mut e.info.healthy, healthy) != healthy);
        if changed {
            self.endpoints_changed.notify_one();
        }
    }

    pub fn pushed(&self, id: ProxyId, version: &str) {
        if let Some(e) = self.entries.lock().get_mut(&id) {
            e.latest = Some(version.to_string());
        }
    }

    pub fn acked(&self, id: ProxyId, version: &str) {
        if let Some(e) = self.entries.lock().get_mut(&id) {
            e.acked = Some(version.to_string());
            // A later good version clears an earlier refusal.
            if e.nack.as_ref().is_some_and(|n| n.version != version) {
                e.nack = None;
            }
        }
    }

    pub fn nacked(&self, id: ProxyId, version: &str, error: &str) {
        if let Some(e) = self.entries.lock().get_mut(&id) {
            // Kept and shown to operators: a proxy gets to say a paragraph, not a book.
            let mut error = error.to_string();
            if error.len() > crate::discovery::MAX_NACK_BYTES {
                let mut cut = crate::discovery::MAX_NACK_BYTES;
                while !error.is_char_boundary(cut) {
                    cut -= 1;
                }
                error.truncate(cut);
                error.push('…');
            }
            e.nack = Some(Nack {
                version: version.to_string(),
                error,
            });
        }
    }

    /// The services that have at least one proxy connected.
    pub fn groups(&self) -> Vec<Group> {
        let mut groups: Vec<Group> = self
            .entries
            .lock()
            .values()
            .map(|e| Group {
                service: e.info.service.clone(),
                namespace: e.info.namespace.clone(),
            })
            .collect();
        groups.sort();
        groups.dedup();
        groups
    }

    /// Every registered instance, healthy or not, sorted by service then instance;
    /// with those remembered from before a restart that have not come back yet.
    pub fn endpoints(&self) -> Vec<EndpointView> {
        let mut endpoints = self.live_endpoints();
        let remembered = self.remembered.lock();
        if let (list, Some(until)) = &*remembered
            && Instant::now() < *until
        {
            let back = |r: &EndpointView| {
                endpoints.iter().any(|e| {
                    (&e.namespace, &e.service, &e.instance)
                        == (&r.namespace, &r.service, &r.instance)
                })
            };
            let missing: Vec<EndpointView> = list.iter().filter(|r| !back(r)).cloned().collect();
            endpoints.extend(missing);
        }
        drop(remembered);
        endpoints.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.instance, a.address).cmp(&(
                &b.namespace,
                &b.service,
                &b.instance,
                b.address,
            ))
        });
        endpoints
    }

    fn live_endpoints(&self) -> Vec<EndpointView> {
        self.entries
            .lock()
            .values()
            .filter_map(|e| {
                let ProxyInfo {
                    service,
                    namespace,
                    instance,
                    identity,
                    address,
                    labels,
                    healthy,
                    proxy_version: _,
                    admin: _,
                } = &e.info;
                Some(EndpointView {
                    service: service.clone(),
                    namespace: namespace.clone(),
                    instance: instance.clone(),
                    address: (*address)?,
                    identity: identity.to_string(),
                    labels: labels.clone(),
                    healthy: *healthy,
                })
            })
            .collect()
    }

    pub fn proxies(&self) -> Vec<ProxyView> {
        let now = Instant::now();
        let mut proxies: Vec<ProxyView> = self
            .entries
            .lock()
            .values()
            .map(|e| {
                let state = match (&e.latest, &e.acked, &e.nack) {
                    (Some(latest), _, Some(nack)) if &nack.version == latest => ConfigState::Nacked,
                    (Some(latest), Some(acked), _) if acked == latest => ConfigState::Acked,
                    _ => ConfigState::Pending,
                };
                ProxyView {
                    service: e.info.service.clone(),
                    namespace: e.info.namespace.clone(),
                    instance: e.info.instance.clone(),
                    identity: e.info.identity.to_string(),
                    address: e.info.address,
                    admin: e.info.admin,
                    healthy: e.info.healthy,
                    proxy_version: e.info.proxy_version.clone(),
                    connected_seconds: now.duration_since(e.connected_at).as_secs(),
                    latest_version: e.latest.clone(),
                    acked_version: e.acked.clone(),
                    nack: e.nack.clone(),
                    state,
                }
            })
            .collect();
        proxies.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.instance).cmp(&(&b.namespace, &b.service, &b.instance))
        });
        proxies
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn info(service: &str, port: u16) -> ProxyInfo {
        ProxyInfo {
            service: service.into(),
            namespace: "default".into(),
            instance: format!("{service}-{port}"),
            identity: SpiffeId::parse(&format!("spiffe://td/ns/default/sa/{service}")).unwrap(),
            address: Some(([127, 0, 0, 1], port).into()),
            labels: BTreeMap::new(),
            healthy: true,
            proxy_version: "test".into(),
            admin: Some(([127, 0, 0, 1], 20_000 + port).into()),
        }
    }

    #[test]
    fn config_state_follows_pushes_acks_and_nacks() {
        let registry = Registry::new(Arc::default());
        let id = registry.join(info("web", 1));
        let state = || registry.proxies()[0].state;
        assert_eq!(state(), ConfigState::Pending);
        registry.pushed(id, "v1");
        registry.acked(id, "v1");
        assert_eq!(state(), ConfigState::Acked);
        registry.pushed(id, "v2");
        registry.nacked(id, "v2", "bad regex");
        assert_eq!(state(), ConfigState::Nacked);
        assert_eq!(registry.proxies()[0].acked_version.as_deref(), Some("v1"));
        registry.pushed(id, "v3");
        assert_eq!(state(), ConfigState::Pending);
        registry.acked(id, "v3");
        assert_eq!(state(), ConfigState::Acked);
        assert!(registry.proxies()[0].nack.is_none());
    }

    #[test]
    fn joins_leaves_and_health_changes_wake_the_compiler_but_acks_do_not() {
        let notify = Arc::new(Notify::new());
        let registry = Registry::new(notify.clone());
        let woken = || {
            let notified = notify.notified();
            tokio::pin!(notified);
            // A stored permit completes the future on its first poll.
            notified.as_mut().enable()
        };
        let id = registry.join(info("web", 1));
        assert!(woken());
        registry.pushed(id, "v1");
        registry.acked(id, "v1");
        assert!(!woken());
        registry.set_health(id, true);
        assert!(!woken(), "unchanged health");
        registry.set_health(id, false);
        assert!(woken());
        assert_eq!(registry.groups().len(), 1);
        registry.leave(id);
        assert!(woken());
        assert!(registry.endpoints().is_empty());
    }

    #[test]
    fn remembered_endpoints_last_until_their_instance_returns_or_the_deadline() {
        let registry = Registry::new(Arc::default());
        let view = |port| {
            let id = registry.join(info("web", port));
            let v = registry
                .endpoints()
                .into_iter()
                .find(|e| e.address.port() == port);
            registry.leave(id);
            v.unwrap()
        };
        let (old_a, old_b) = (view(1), view(2));
        registry.remember(
            vec![old_a.clone(), old_b],
            Instant::now() + std::time::Duration::from_secs(60),
        );
        assert_eq!(registry.endpoints().len(), 2);
        // Instance web-1 comes back at a new address: it replaces the remembered one.
        let mut back = info("web", 3);
        back.instance = old_a.instance.clone();
        registry.join(back);
        let ports: Vec<u16> = registry
            .endpoints()
            .iter()
            .map(|e| e.address.port())
            .collect();
        assert_eq!(ports, [3, 2]);
        // Past the deadline only live instances remain.
        registry.remember(vec![old_a], Instant::now());
        assert_eq!(registry.endpoints().len(), 1);
    }

    #[test]
    fn a_proxy_without_an_address_is_listed_but_is_no_endpoint() {
        let registry = Registry::new(Arc::default());
        let mut gateway = info("gateway", 0);
        gateway.address = inbound_address("").unwrap();
        registry.join(gateway);
        registry.join(info("web", 1));
        let endpoints: Vec<String> = registry
            .endpoints()
            .into_iter()
            .map(|e| e.service)
            .collect();
        assert_eq!(endpoints, ["web"]);
        let proxies = registry.proxies();
        assert_eq!(proxies.len(), 2);
        assert_eq!(
            (proxies[0].service.as_str(), proxies[0].address),
            ("gateway", None)
        );
        assert_eq!(
            registry.groups().len(),
            2,
            "the gateway still gets its config"
        );
        let json = serde_json::to_value(&proxies[0]).unwrap();
        assert!(json["address"].is_null(), "{json}");
        let web = serde_json::to_value(&proxies[1]).unwrap();
        assert_eq!(web["admin"], "127.0.0.1:20001", "{web}");
    }

    #[test]
    fn inbound_addresses_must_be_dialable_or_empty() {
        assert_eq!(
            inbound_address("127.0.0.1:15006").unwrap(),
            Some(([127, 0, 0, 1], 15006).into())
        );
        assert_eq!(inbound_address("").unwrap(), None);
        for (bad, needle) in [
            ("0.0.0.0:15006", "is not an address peers can dial"),
            ("127.0.0.1:0", "is not an address peers can dial"),
            ("web:15006", "hello.inbound_address \"web:15006\""),
        ] {
            let error = inbound_address(bad).unwrap_err();
            assert!(error.contains(needle), "{bad}: {error}");
        }
        assert_eq!(admin_address("").unwrap(), None);
        let error = admin_address("0.0.0.0:15020").unwrap_err();
        assert_eq!(
            error,
            "hello.admin_address 0.0.0.0:15020 is not an address trellisctl can dial"
        );
    }
}
