//! Leader election with a `coordination.k8s.io/v1` Lease: exactly one replica runs
//! the canary controller and the status writers; every replica serves discovery and
//! identity. Every write is a replace guarded by the resourceVersion just read, so of
//! two replicas racing for an expired lease one gets a 409 Conflict and stays a
//! follower.
//!
//! Expiry is judged as client-go does, by this replica's own clock: a lease is
//! expired when its record (holder, renewTime) has not changed for
//! `leaseDurationSeconds` since this replica first saw it, so clock skew between
//! nodes does not matter.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

pub const LEASE_NAME: &str = "trellis-control-plane-leader";
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct LeaderElection {
    pub client: Client,
    pub namespace: String,
    pub lease_name: String,
    /// This replica: the pod name (`POD_NAME`).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

impl std::fmt::Debug for LeaderElection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElection")
            .field("namespace", &self.namespace)
            .field("lease_name", &self.lease_name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// What this replica last saw of the lease, and when it first saw it so.
#[derive(Debug, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    at: Instant,
}

impl LeaderElection {
    pub fn new(client: Client, namespace: &str, identity: &str) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            lease_name: LEASE_NAME.into(),
            identity: identity.into(),
            lease_duration: LEASE_DURATION,
            renew_every: RENEW_EVERY,
        }
    }

    /// Campaigns until `shutdown`, then hands the lease back so another replica takes
    /// over at once. The receiver says whether this replica leads now.
    pub fn spawn(self, shutdown: CancellationToken) -> (watch::Receiver<bool>, JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(self.run(tx, shutdown));
        (rx, task)
    }

    async fn run(self, leading: watch::Sender<bool>, shutdown: CancellationToken) {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut observed: Option<Observed> = None;
        let mut last_renewed: Option<Instant> = None;
        loop {
            // A request that hangs must not keep this replica leading: the Err arm
            // below steps down in time only if every round ends.
            let round = self.try_acquire_or_renew(&api, &mut observed);
            let result = match tokio::time::timeout(self.renew_every, round).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {:?}", self.renew_every)),
            };
            let now = Instant::now();
            let leads = match result {
                Ok(leads) => {
                    if leads {
                        last_renewed = Some(now);
                    }
                    leads
                }
                Err(error) => {
                    tracing::warn!(%error, lease = self.lease_name, "leader election: the Lease could not be read or written");
                    // Keep leading only while the lease we last renewed surely holds for
                    // everyone else; step down before another replica may take over.
                    let deadline = self.lease_duration.mul_f64(2.0 / 3.0);
                    *leading.borrow() && last_renewed.is_some_and(|at| now - at < deadline)
                }
            };
            leading.send_if_modified(|was| {
                if *was == leads {
                    return false;
                }
                if leads {
                    tracing::info!(
                        identity = self.identity,
                        lease = self.lease_name,
                        "became the leader"
                    );
                } else {
                    tracing::info!(
                        identity = self.identity,
                        lease = self.lease_name,
                        "no longer the leader"
                    );
                }
                *was = leads;
                true
            });
            // A follower polls as often as the leader renews: a takeover waits at most
            // one lease duration plus one period.
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.renew_every) => {}
            }
        }
        if *leading.borrow() {
            self.release(&api).await;
        }
        leading.send_replace(false);
    }

    /// One round: Ok(true) when this replica holds the lease after it.
    async fn try_acquire_or_renew(
        &self,
        api: &Api<Lease>,
        observed: &mut Option<Observed>,
    ) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = api.get_opt(&self.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.lease_name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, now, 0)),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let renew_time = spec.renew_time.as_ref().map(|t| t.0);
        let seen_at = Instant::now();
        let first_seen = match observed.take() {
            Some(o) if o.holder == holder && o.renew_time == renew_time => o.at,
            _ => seen_at,
        };
        *observed = Some(Observed {
            holder: holder.clone(),
            renew_time,
            at: first_seen,
        });
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.lease_duration, Duration::from_secs);
        let ours = holder.as_deref() == Some(self.identity.as_str());
        let expired = holder.is_none() || seen_at.duration_since(first_seen) >= duration;
        if !ours && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(if ours {
            let acquired = spec.acquire_time.map_or(now, |t| t.0);
            self.spec(acquired, now, transitions)
        } else {
            self.spec(now, now, transitions.saturating_add(1))
        });
        // `lease.metadata.resourceVersion` is the one just read: a concurrent writer
        // makes this a 409 and the round a loss.
        match api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn spec(&self, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Empties the holder, if it is still this replica, so a follower need not wait.
    async fn release(&self, api: &Api<Lease>) {
        let Ok(Some(mut lease)) = api.get_opt(&self.lease_name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        match api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(identity = self.identity, "released the leader lease"),
            Err(error) => tracing::warn!(%error, "releasing the leader lease failed"),
        }
    }
}

/// Runs `task` for each term this replica leads: started when it becomes the leader,
/// cancelled (through the token it is given) when it stops being one, until
/// `shutdown`.
pub async fn while_leading<F, Fut>(
    mut leading: watch::Receiver<bool>,
    shutdown: CancellationToken,
    mut task: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        if *leading.borrow_and_update() {
            let term = shutdown.child_token();
            let running = tokio::spawn(task(term.clone()));
            tokio::select! {
                () = shutdown.cancelled() => {}
                _ = async {
                    while leading.changed().await.is_ok() {
                        if !*leading.borrow() { break; }
                    }
                } => {}
            }
            term.cancel();
            let _ = running.await;
            if shutdown.is_cancelled() {
                return;
            }
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = leading.changed() => if changed.is_err() { return },
        }
    }
}

/// What only the leader does, and what it needs.
pub struct LeaderDuties {
    pub client: Client,
    pub namespace: String,
    pub lease_name: String,
    /// `POD_NAME`; without it the host name, else a random name.
    pub identity: Option<String>,
    pub canaries: std::sync::Arc<crate::canary::CanaryController>,
    pub source: std::sync::Arc<dyn crate::source::ConfigSource>,
    pub bundle: trellis_ca::TrustBundle,
    pub webhook_configuration: String,
}

impl std::fmt::Debug for LeaderDuties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderDuties")
            .field("namespace", &self.namespace)
            .field("lease_name", &self.lease_name)
            .finish_non_exhaustive()
    }
}

impl LeaderDuties {
    /// Campaigns for the lease and, while leading, runs the canary controller, the
    /// status writer, the trust-anchor publisher and the caBundle upkeep. Returns
    /// whether this replica leads, as it changes.
    pub fn start(self, shutdown: &CancellationToken) -> watch::Receiver<bool> {
        let Self {
            client,
            namespace,
            lease_name,
            identity,
            canaries,
            source,
            bundle,
            webhook_configuration,
        } = self;
        let identity = identity
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| format!("trellis-control-plane-{:08x}", fastrand::u32(..)));
        let mut election = LeaderElection::new(client.clone(), &namespace, &identity);
        election.lease_name = lease_name;
        let (leading, _task) = election.spawn(shutdown.clone());
        tokio::spawn(while_leading(
            leading.clone(),
            shutdown.clone(),
            move |term| canaries.clone().run(term),
        ));
        let writer = super::status::StatusWriter::new(client.clone(), source);
        tokio::spawn(writer.run(leading.clone(), shutdown.clone()));
        let pem = bundle.to_pem().into_bytes();
        tokio::spawn(super::ca_secret::publish_while_leading(
            client.clone(),
            namespace,
            bundle,
            leading.clone(),
            super::webhook_config::RESYNC,
            shutdown.clone(),
        ));
        let (_fixed, roots) = watch::channel(pem);
        tokio::spawn(super::webhook_config::run(
            client,
            webhook_configuration,
            roots,
            leading.clone(),
            super::webhook_config::RESYNC,
            shutdown.clone(),
        ));
        leading
    }
}
