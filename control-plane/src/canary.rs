//! The canary controller: moves each Canary's weight along its `steps` every
//! `interval` while the canary subset's analysis holds (from the sidecars' reports),
//! rolls it back to 0% on a failed analysis, promotes it after the last step, and
//! carries out the operator's pause, resume, promote and abort.
//!
//! In universal mode the status lives in the store next to the Canary (see
//! `Store::put_status`), so a restarted control plane resumes where it was; only the
//! step clock starts over, because the reports it would judge by were kept in memory.
//! A weight change bumps the store's revision and wakes the compiler, which splits the
//! routes by the status (`compiler::split_for_canary`).
//!
//! In kubernetes mode the Canary objects come from the config source and the status
//! is written to their status subresource (server-side apply, field manager
//! [`CONTROLLER_MANAGER`], with the resourceVersion that was read as a precondition, so
//! a status that changed meanwhile is never overwritten); the watch brings it back to
//! the source and the compiler. Only the leader ticks; an operator's action may come
//! through any replica.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use parking_lot::Mutex;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio_util::sync::CancellationToken;
use trellis_crds::{
    AnalysisResult, Canary, CanaryEvent, CanaryPhase, CanarySpec, CanaryStatus, Document,
    SubsetStats,
};

use crate::{
    compiler::Compiler,
    reports::{BackendStats, Reports},
    store::{ResourceKey, Store, StoreError},
};

/// How often canaries are looked at; far below any sensible interval.
const TICK: Duration = Duration::from_millis(250);
/// History entries kept in the status.
const HISTORY: usize = 20;

/// What an operator may tell a canary to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Promote,
    Abort,
}

impl Action {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pause" => Some(Self::Pause),
            "resume" => Some(Self::Resume),
            "promote" => Some(Self::Promote),
            "abort" => Some(Self::Abort),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{0} not found")]
    NotFound(ResourceKey),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Home(#[from] HomeError),
}

/// Reading or writing where canaries live failed.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the canary's status to the Kubernetes API: {0}")]
    Kubernetes(#[from] kube::Error),
    #[error("writing the canary's status to the Kubernetes API took longer than {0:?}")]
    KubernetesTimeout(Duration),
}

/// The field manager of the canary controller's status fields on Kubernetes; the
/// status writer's conditions have their own, so neither removes the other's.
pub const CONTROLLER_MANAGER: &str = "trellis-canary-controller";
/// How long one status write to the Kubernetes API may take.
const KUBERNETES_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the canaries and their statuses live.
enum Home {
    /// Universal mode: both in the store.
    Store(Arc<Store>),
    /// Kubernetes mode: the Canary objects as the config source read them; statuses
    /// are written to the cluster from blocking sections through `runtime`.
    Cluster {
        client: kube::Client,
        runtime: tokio::runtime::Handle,
    },
}

impl std::fmt::Debug for Home {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Store(_) => "Home::Store",
            Self::Cluster { .. } => "Home::Cluster",
        })
    }
}

#[derive(Debug)]
pub struct CanaryController {
    home: Home,
    reports: Arc<Reports>,
    compiler: Arc<Compiler>,
    /// Ticks and operator actions each read a status and write the next one: one at a
    /// time. Only taken inside blocking sections, never across an await.
    writing: Mutex<()>,
    /// Reports from before this process started are gone: no step is judged on less.
    started: SystemTime,
}

impl CanaryController {
    /// Universal mode: canaries and their statuses in `store`.
    pub fn new(store: Arc<Store>, reports: Arc<Reports>, compiler: Arc<Compiler>) -> Self {
        Self::with_home(Home::Store(store), reports, compiler)
    }

    /// Kubernetes mode: canaries from the compiler's source, statuses to the cluster.
    /// Call from within the runtime.
    pub fn on_cluster(
        client: kube::Client,
        reports: Arc<Reports>,
        compiler: Arc<Compiler>,
    ) -> Self {
        let runtime = tokio::runtime::Handle::current();
        Self::with_home(Home::Cluster { client, runtime }, reports, compiler)
    }

    fn with_home(home: Home, reports: Arc<Reports>, compiler: Arc<Compiler>) -> Self {
        Self {
            home,
            reports,
            compiler,
            writing: Mutex::new(()),
            started: SystemTime::now(),
        }
    }

    /// Looks at every canary each tick until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TICK) => {}
            }
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.tick()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "the canary controller failed a round"),
                Err(error) => tracing::error!(%error, "the canary controller task failed"),
            }
        }
    }

    /// One round over every canary. Blocking (store or API reads and writes). A canary
    /// whose status cannot be read or written is skipped this round, not the others.
    pub fn tick(&self) -> Result<(), HomeError> {
        let _writing = self.writing.lock();
        for (canary, status) in self.canaries()? {
            let key = key_of(&canary);
            match self.step(&key, &canary, status) {
                Ok(()) => {}
                // Changed since it was read (often by our own write the watch has yet
                // to bring back): read again next round.
                Err(HomeError::Kubernetes(kube::Error::Api(e))) if e.code == 409 => {
                    tracing::debug!(canary = %key, "the canary changed meanwhile; next round");
                }
                Err(error) => {
                    tracing::warn!(%error, canary = %key, "the canary controller skipped a canary this round");
                }
            }
        }
        Ok(())
    }

    fn step(
        &self,
        key: &ResourceKey,
        canary: &Canary,
        status: Option<CanaryStatus>,
    ) -> Result<(), HomeError> {
        let now = SystemTime::now();
        let next = advance(
            &canary.spec,
            status.as_ref(),
            now,
            self.started,
            |subset, since| {
                self.reports.backend_stats(
                    key.namespace.as_deref().unwrap_or("default"),
                    &canary.spec.service,
                    subset,
                    instant_of(since, now),
                )
            },
        );
        match next {
            Some(next) => self.write(key, canary, status.as_ref(), &next),
            None => Ok(()),
        }
    }

    /// Carries out an operator's `action` on the canary at `key`; the new status.
    pub fn act(&self, key: &ResourceKey, action: Action) -> Result<CanaryStatus, ActionError> {
        let _writing = self.writing.lock();
        let Some((canary, status)) = self
            .canaries()?
            .into_iter()
            .find(|(canary, _)| key_of(canary) == *key)
        else {
            return Err(ActionError::NotFound(key.clone()));
        };
        let now = SystemTime::now();
        let current = match &status {
            Some(s) if s.spec_digest == spec_digest(&canary.spec) => s.clone(),
            _ => start(&canary.spec, now),
        };
        let next = operate(&current, action, now).map_err(ActionError::Refused)?;
        self.write(key, &canary, status.as_ref(), &next)?;
        Ok(next)
    }

    /// Every canary with the controller's latest status of it.
    fn canaries(&self) -> Result<Vec<(Canary, Option<CanaryStatus>)>, HomeError> {
        match &self.home {
            Home::Store(store) => {
                let mut canaries = Vec::new();
                for document in store.list(Some("Canary"))? {
                    if let Document::Canary(canary) = document {
                        let status = stored_status(store, &key_of(&canary))?;
                        canaries.push((canary, status));
                    }
                }
                Ok(canaries)
            }
            Home::Cluster { .. } => {
                let (_, mut resources) = self.compiler.source().resources()?;
                Ok(resources
                    .take_canaries()
                    .into_iter()
                    .map(|(_, _, canary, status)| (canary, status))
                    .collect())
            }
        }
    }

    fn write(
        &self,
        key: &ResourceKey,
        canary: &Canary,
        before: Option<&CanaryStatus>,
        next: &CanaryStatus,
    ) -> Result<(), HomeError> {
        let weight_changed = before.is_none_or(|b| b.weight != next.weight);
        let written = match &self.home {
            Home::Store(store) => {
                let bytes = serde_json::to_vec(next).unwrap_or_default();
                // A canary deleted meanwhile keeps no status.
                store.put_status(key, &bytes, weight_changed)?
            }
            Home::Cluster { client, runtime } => {
                let write = write_to_cluster(client, canary, next);
                runtime
                    .block_on(tokio::time::timeout(KUBERNETES_WRITE_TIMEOUT, write))
                    .map_err(|_| HomeError::KubernetesTimeout(KUBERNETES_WRITE_TIMEOUT))??;
                true
            }
        };
        if written {
            if before.is_none_or(|b| b.phase != next.phase || b.weight != next.weight) {
                tracing::info!(
                    canary = %key,
                    phase = ?next.phase,
                    weight = next.weight,
                    message = next.message,
                    "canary"
                );
            }
            // On the cluster, the watch wakes the compiler once the status is back.
            if weight_changed && matches!(self.home, Home::Store(_)) {
                self.compiler.changed();
            }
        }
        Ok(())
    }
}

fn stored_status(store: &Store, key: &ResourceKey) -> Result<Option<CanaryStatus>, StoreError> {
    Ok(store.status(key)?.and_then(|bytes| {
        serde_json::from_slice(&bytes)
            .inspect_err(|error| {
                tracing::warn!(%error, canary = %key, "unreadable canary status; starting over")
            })
            .ok()
    }))
}

/// Applies the controller's fields of `status` to `canary`'s status subresource, on
/// condition that the Canary is still at the resourceVersion it was read at: a status
/// someone changed meanwhile (an operator's action through another replica, or this
/// controller's own write the watch has not brought back yet) is read again next round.
async fn write_to_cluster(
    client: &kube::Client,
    canary: &Canary,
    status: &CanaryStatus,
) -> Result<(), kube::Error> {
    let namespace = canary.metadata.namespace.as_deref().unwrap_or("default");
    let name = canary.metadata.name.as_deref().unwrap_or_default();
    let mut status = status.clone();
    // The status writer's.
    status.conditions.clear();
    let mut metadata = serde_json::json!({"name": name, "namespace": namespace});
    if let Some(version) = &canary.metadata.resource_version {
        metadata["resourceVersion"] = version.as_str().into();
    }
    let patch = serde_json::json!({
        "apiVersion": format!("{}/{}", trellis_crds::GROUP, trellis_crds::VERSION),
        "kind": "Canary",
        "metadata": metadata,
        "status": status,
    });
    let api: kube::Api<Canary> = kube::Api::namespaced(client.clone(), namespace);
    api.patch_status(
        name,
        &kube::api::PatchParams::apply(CONTROLLER_MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

fn key_of(canary: &Canary) -> ResourceKey {
    ResourceKey {
        kind: "Canary".into(),
        namespace: Some(
            canary
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
        ),
        name: canary.metadata.name.clone().unwrap_or_default(),
    }
}

/// The monotonic instant `since` was, given that `now` is now.
fn instant_of(since: SystemTime, now: SystemTime) -> Instant {
    let ago = now.duration_since(since).unwrap_or_default();
    let now = Instant::now();
    now.checked_sub(ago).unwrap_or(now)
}

/// The status that follows `status` at `now`, if anything changes. `stats` gives a
/// subset's numbers since a time.
pub fn advance(
    spec: &CanarySpec,
    status: Option<&CanaryStatus>,
    now: SystemTime,
    started: SystemTime,
    stats: impl Fn(&str, SystemTime) -> BackendStats,
) -> Option<CanaryStatus> {
    let status = match status {
        Some(s) if s.spec_digest == spec_digest(spec) && s.phase != CanaryPhase::Pending => s,
        _ => return Some(start(spec, now)),
    };
    if status.phase != CanaryPhase::Progressing {
        return None;
    }
    // Validation has checked both durations.
    let interval = trellis_api::duration::parse(&spec.interval).ok()?;
    let max_p99 = trellis_api::duration::parse(&spec.analysis.max_p99_latency).ok()?;
    let step_started = status
        .step_started_at
        .as_deref()
        .and_then(parse_time)
        .unwrap_or(now);
    let observed_from = step_started.max(started);
    if now.duration_since(observed_from).unwrap_or_default() < interval {
        return None;
    }
    let canary = stats(&spec.canary_subset, observed_from);
    let stable = stats(&spec.stable_subset, observed_from);
    let analysis = |verdict: &str| AnalysisResult {
        at: format_time(now),
        weight: status.weight,
        canary: subset_stats(&canary),
        stable: subset_stats(&stable),
        verdict: verdict.to_string(),
    };
    let mut next = status.clone();
    let min_requests = u64::from(spec.analysis.min_requests.max(1));
    if canary.requests < min_requests {
        // Too little traffic decides nothing: look again after another interval.
        next.step_started_at = Some(format_time(now));
        next.last_analysis = Some(analysis("waiting"));
        next.message = format!(
            "waiting at {}%: {} requests reached the canary in the last interval, {} needed",
            status.weight, canary.requests, min_requests
        );
        return Some(next);
    }
    // Each failed check, by kind (0: success rate, 1: p99) and in words.
    let problems = |s: &BackendStats| {
        let mut problems = Vec::new();
        let rate = s.success_rate().unwrap_or(0.0);
        if rate < spec.analysis.min_success_rate {
            let words = format!(
                "success rate {rate:.1}% < {}%",
                spec.analysis.min_success_rate
            );
            problems.push((0, words));
        }
        if let Some(p99) = s.p99.filter(|p| *p > max_p99) {
            let words = format!(
                "p99 {:.1} ms > {}",
                p99.as_secs_f64() * 1e3,
                spec.analysis.max_p99_latency
            );
            problems.push((1, words));
        }
        problems
    };
    let failing = problems(&canary);
    if !failing.is_empty() {
        let words: Vec<&str> = failing.iter().map(|(_, w)| w.as_str()).collect();
        let numbers = format!(
            "canary {} over {} requests; stable {}",
            words.join(", "),
            canary.requests,
            describe(&stable)
        );
        // A failure the stable subset shares, check for check, is not the canary's
        // doing (a shared dependency is down): hold the weight and look again. A canary
        // failing where the stable does not is rolled back, whatever else fails.
        let stable_fails: Vec<u8> = problems(&stable).into_iter().map(|(k, _)| k).collect();
        let shared = failing.iter().all(|(kind, _)| stable_fails.contains(kind));
        if stable.requests >= min_requests && shared {
            next.step_started_at = Some(format_time(now));
            next.last_analysis = Some(analysis("held"));
            next.message = format!(
                "holding at {}%: the stable subset fails too: {numbers}",
                status.weight
            );
            return Some(next);
        }
        next.phase = CanaryPhase::RolledBack;
        next.weight = 0;
        next.last_analysis = Some(analysis("failed"));
        next.message = format!("rolled back from {}%: {numbers}", status.weight);
        record(&mut next, now);
        return Some(next);
    }
    next.last_analysis = Some(analysis("passed"));
    let following = usize::try_from(status.step)
        .ok()
        .and_then(|i| spec.steps.get(i + 1));
    match following {
        Some(&weight) if weight < 100 => {
            next.step += 1;
            next.weight = weight;
            next.step_started_at = Some(format_time(now));
            next.message = format!(
                "{}% passed ({}); now at {weight}%",
                status.weight,
                describe(&canary)
            );
        }
        _ => {
            next.phase = CanaryPhase::Promoted;
            next.weight = 100;
            next.step_started_at = None;
            next.message = format!(
                "promoted: {}% passed ({}); the canary takes all traffic",
                status.weight,
                describe(&canary)
            );
        }
    }
    record(&mut next, now);
    Some(next)
}

/// A canary seen for the first time, or whose spec changed: its first step.
fn start(spec: &CanarySpec, now: SystemTime) -> CanaryStatus {
    let weight = spec.steps.first().copied().unwrap_or(0);
    let mut status = CanaryStatus {
        phase: CanaryPhase::Progressing,
        weight,
        step: 0,
        step_started_at: Some(format_time(now)),
        spec_digest: spec_digest(spec),
        last_analysis: None,
        history: Vec::new(),
        message: format!("started: {}% to {}", weight, spec.canary_subset),
        conditions: Vec::new(),
    };
    record(&mut status, now);
    status
}

/// An operator's action on `status`, or why it makes no sense now.
fn operate(status: &CanaryStatus, action: Action, now: SystemTime) -> Result<CanaryStatus, String> {
    use CanaryPhase::{Paused, Pending, Progressing, Promoted, RolledBack};
    let mut next = status.clone();
    match (action, status.phase) {
        (Action::Pause, Progressing | Pending) => {
            next.phase = Paused;
            next.message = format!("paused by the operator at {}%", status.weight);
        }
        (Action::Resume, Paused) => {
            next.phase = Progressing;
            next.step_started_at = Some(format_time(now));
            next.message = format!("resumed by the operator at {}%", status.weight);
        }
        (Action::Promote, Progressing | Pending | Paused | RolledBack) => {
            next.phase = Promoted;
            next.weight = 100;
            next.step_started_at = None;
            next.message = "promoted by the operator: the canary takes all traffic".into();
        }
        (Action::Abort, Progressing | Pending | Paused | Promoted) => {
            next.phase = RolledBack;
            next.weight = 0;
            next.step_started_at = None;
            next.message = "aborted by the operator: the stable subset takes all traffic".into();
        }
        (action, phase) => {
            let can = match action {
                Action::Pause => "only a progressing canary can be paused",
                Action::Resume => "only a paused canary can be resumed",
                Action::Promote => "it is promoted already",
                Action::Abort => "it is rolled back already",
            };
            return Err(format!("the canary is {phase:?}: {can}"));
        }
    }
    record(&mut next, now);
    Ok(next)
}

/// Adds the status's phase, weight and message to its history.
fn record(status: &mut CanaryStatus, now: SystemTime) {
    if status.history.len() == HISTORY {
        status.history.remove(0);
    }
    status.history.push(CanaryEvent {
        at: format_time(now),
        phase: status.phase,
        weight: status.weight,
        message: status.message.clone(),
    });
}

fn subset_stats(stats: &BackendStats) -> SubsetStats {
    SubsetStats {
        requests: stats.requests,
        success_rate: stats.success_rate(),
        p99_ms: stats.p99.map(|p| p.as_secs_f64() * 1e3),
    }
}

fn describe(stats: &BackendStats) -> String {
    match (stats.success_rate(), stats.p99) {
        (Some(rate), Some(p99)) => format!(
            "success rate {rate:.1}%, p99 {:.1} ms over {} requests",
            p99.as_secs_f64() * 1e3,
            stats.requests
        ),
        (Some(rate), None) => format!("success rate {rate:.1}% over {} requests", stats.requests),
        _ => "no requests".into(),
    }
}

/// Which spec a status follows: the start of the hex SHA-256 of the spec's JSON. A
/// status written for another spec says nothing about this one.
pub fn spec_digest(spec: &CanarySpec) -> String {
    let json = serde_json::to_vec(spec).unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA256, &json);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn format_time(at: SystemTime) -> String {
    OffsetDateTime::from(at)
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn parse_time(text: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> CanarySpec {
        serde_json::from_value(serde_json::json!({
            "service": "web", "stableSubset": "v1", "canarySubset": "v2",
            "steps": [10, 25, 50, 100], "interval": "10s",
            "analysis": {"minSuccessRate": 99, "maxP99Latency": "500ms", "minRequests": 20},
        }))
        .unwrap()
    }

    fn healthy(requests: u64) -> BackendStats {
        BackendStats {
            requests,
            successes: requests,
            p99: Some(Duration::from_millis(20)),
        }
    }

    fn failing(requests: u64, successes: u64) -> BackendStats {
        BackendStats {
            requests,
            successes,
            p99: Some(Duration::from_millis(20)),
        }
    }

    /// Runs the controller over `rounds`: each gives the canary's and the stable's
    /// numbers for one interval. Returns every status.
    fn run(rounds: &[(BackendStats, BackendStats)]) -> Vec<CanaryStatus> {
        let spec = spec();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut status = advance(&spec, None, t0, t0, |_, _| unreachable!()).unwrap();
        let mut seen = vec![status.clone()];
        for (i, (canary, stable)) in rounds.iter().enumerate() {
            let now = t0 + Duration::from_secs(10 * (i as u64 + 1));
            let stats = |subset: &str, _| if subset == "v2" { *canary } else { *stable };
            match advance(&spec, Some(&status), now, t0, stats) {
                Some(next) => status = next,
                None => break,
            }
            seen.push(status.clone());
        }
        seen
    }

    fn weights(seen: &[CanaryStatus]) -> Vec<(CanaryPhase, u32)> {
        seen.iter().map(|s| (s.phase, s.weight)).collect()
    }

    #[test]
    fn a_healthy_canary_climbs_every_step_and_is_promoted() {
        let seen = run(&[(healthy(50), healthy(500)); 4]);
        use CanaryPhase::{Progressing, Promoted};
        assert_eq!(
            weights(&seen),
            [
                (Progressing, 10),
                (Progressing, 25),
                (Progressing, 50),
                (Promoted, 100)
            ]
        );
        let last = seen.last().unwrap();
        assert_eq!(last.history.len(), 4);
        assert_eq!(last.last_analysis.as_ref().unwrap().verdict, "passed");
    }

    #[test]
    fn a_failing_canary_rolls_back_to_zero_and_stays_there() {
        let seen = run(&[
            (healthy(50), healthy(500)),
            (failing(100, 80), healthy(500)),
        ]);
        let last = seen.last().unwrap();
        assert_eq!((last.phase, last.weight), (CanaryPhase::RolledBack, 0));
        assert!(
            last.message.contains("success rate 80.0% < 99%"),
            "{}",
            last.message
        );
        let analysis = last.last_analysis.as_ref().unwrap();
        assert_eq!((analysis.weight, analysis.canary.requests), (25, 100));
        assert_eq!(analysis.stable.success_rate, Some(100.0));
        // Rolled back is final: nothing moves it on.
        let later = SystemTime::now();
        assert_eq!(
            advance(&spec(), Some(last), later, later, |_, _| healthy(500)),
            None
        );
    }

    #[test]
    fn a_slow_canary_rolls_back_on_its_p99() {
        let slow = BackendStats {
            p99: Some(Duration::from_millis(900)),
            ..healthy(50)
        };
        let seen = run(&[(slow, healthy(500))]);
        let last = seen.last().unwrap();
        assert_eq!(last.phase, CanaryPhase::RolledBack);
        assert!(
            last.message.contains("p99 900.0 ms > 500ms"),
            "{}",
            last.message
        );
    }

    #[test]
    fn too_few_requests_wait_and_a_shared_failure_holds() {
        let seen = run(&[
            (healthy(5), healthy(500)),
            (failing(50, 10), failing(500, 100)),
        ]);
        assert_eq!(weights(&seen)[1..], [(CanaryPhase::Progressing, 10); 2]);
        assert_eq!(seen[1].last_analysis.as_ref().unwrap().verdict, "waiting");
        assert!(
            seen[1].message.contains("5 requests"),
            "{}",
            seen[1].message
        );
        assert_eq!(seen[2].last_analysis.as_ref().unwrap().verdict, "held");
    }

    #[test]
    fn a_canary_failing_where_the_stable_does_not_is_rolled_back() {
        // The stable subset is slow, but the canary fails its requests: not shared.
        let slow_stable = BackendStats {
            p99: Some(Duration::from_millis(900)),
            ..healthy(500)
        };
        let seen = run(&[(failing(50, 0), slow_stable)]);
        assert_eq!(seen.last().unwrap().phase, CanaryPhase::RolledBack);
        // Both slow: shared, held.
        let slow_canary = BackendStats {
            p99: Some(Duration::from_millis(900)),
            ..healthy(50)
        };
        let seen = run(&[(slow_canary, slow_stable)]);
        let last = seen.last().unwrap();
        assert_eq!(last.phase, CanaryPhase::Progressing);
        assert_eq!(last.last_analysis.as_ref().unwrap().verdict, "held");
    }

    #[test]
    fn nothing_is_judged_before_an_interval_of_this_process_passed() {
        let spec = spec();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let status = advance(&spec, None, t0, t0, |_, _| unreachable!()).unwrap();
        // A restart 30 s later: the step began long ago, but the reports did not survive.
        let restarted = t0 + Duration::from_secs(30);
        let soon = restarted + Duration::from_secs(5);
        assert_eq!(
            advance(&spec, Some(&status), soon, restarted, |_, _| healthy(50)),
            None
        );
        let later = restarted + Duration::from_secs(10);
        let next = advance(&spec, Some(&status), later, restarted, |_, since| {
            assert_eq!(since, restarted);
            healthy(50)
        });
        assert_eq!(next.unwrap().weight, 25);
    }

    #[test]
    fn a_changed_spec_starts_over() {
        let seen = run(&[(healthy(50), healthy(500))]);
        let mut changed = spec();
        changed.steps = vec![5, 100];
        let now = SystemTime::now();
        let next = advance(&changed, seen.last(), now, now, |_, _| healthy(50)).unwrap();
        assert_eq!(
            (next.phase, next.weight, next.step),
            (CanaryPhase::Progressing, 5, 0)
        );
    }

    #[test]
    fn operator_actions_follow_the_phase() {
        let now = SystemTime::now();
        let progressing = start(&spec(), now);
        let paused = operate(&progressing, Action::Pause, now).unwrap();
        assert_eq!((paused.phase, paused.weight), (CanaryPhase::Paused, 10));
        let err = operate(&paused, Action::Pause, now).unwrap_err();
        assert!(err.contains("only a progressing canary"), "{err}");
        let resumed = operate(&paused, Action::Resume, now).unwrap();
        assert_eq!(resumed.phase, CanaryPhase::Progressing);
        let promoted = operate(&resumed, Action::Promote, now).unwrap();
        assert_eq!(
            (promoted.phase, promoted.weight),
            (CanaryPhase::Promoted, 100)
        );
        let aborted = operate(&promoted, Action::Abort, now).unwrap();
        assert_eq!(
            (aborted.phase, aborted.weight),
            (CanaryPhase::RolledBack, 0)
        );
        assert!(operate(&aborted, Action::Abort, now).is_err());
        // A paused canary is not moved by the controller.
        assert_eq!(
            advance(&spec(), Some(&paused), now, now, |_, _| healthy(50)),
            None
        );
    }

    #[test]
    fn history_keeps_the_latest_entries() {
        let now = SystemTime::now();
        let mut status = start(&spec(), now);
        for _ in 0..30 {
            status = operate(&status, Action::Pause, now).unwrap();
            status = operate(&status, Action::Resume, now).unwrap();
        }
        assert_eq!(status.history.len(), HISTORY);
        assert!(
            status
                .history
                .last()
                .unwrap()
                .message
                .starts_with("resumed")
        );
    }
}
