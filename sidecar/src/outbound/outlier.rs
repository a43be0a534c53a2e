//! Per-endpoint outlier detection (the circuit breaker): consecutive failures eject
//! an endpoint for a time that grows with repeated ejections; after it, one probe
//! decides. The state lives in the `Endpoint`, so it survives config pushes (and two
//! services listing the same address and identity share it); the policy lives in the
//! service's `Breaker`, which every backend of the service shares.
//!
//! Everything on the request path is a handful of atomic loads and at most one
//! compare-and-swap: no lock, no allocation. Only an ejection counts the service's
//! other endpoints (for `maxEjectionPercent`), logs and bumps a counter.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use http::StatusCode;
use trellis_api::config::CircuitBreakerConfig;

use super::destinations::{CompileError, Endpoint};

/// Counter: ejections, by service and endpoint.
pub const EJECTIONS: &str = "trellis_endpoint_ejections_total";
/// Gauge rendered at scrape time from the live state: 1 while out of rotation.
pub const EJECTED: &str = "trellis_endpoint_ejected";

/// How long a probe may go without an outcome before another is let through: the
/// request carrying it may have been cancelled (the client went away) and will never
/// report, and an endpoint must not stay out for good because of that.
const PROBE_LOST_AFTER: Duration = Duration::from_secs(10);

/// What one try against an endpoint came to, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that was not a failure (a 4xx is the caller's problem, not the peer's).
    Success,
    /// A 5xx, a connect failure, a reset or a mesh timeout.
    Failure,
}

impl Outcome {
    /// The outcome of a try that got response headers with `status`.
    pub fn of_status(status: StatusCode) -> Self {
        if status.is_server_error() {
            Self::Failure
        } else {
            Self::Success
        }
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

/// A service's `circuitBreaker`, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub consecutive_failures: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

/// One service's breaker: its policy and the endpoints `maxEjectionPercent` counts.
pub struct Breaker {
    service: String,
    /// None: no `circuitBreaker`, endpoints are never ejected.
    policy: Option<Policy>,
    /// All of the service's endpoints, whichever subset a request went to.
    peers: Arc<[Arc<Endpoint>]>,
    /// Taken while one ejection counts the others, so two at once cannot both slip
    /// under the cap.
    ejecting: AtomicBool,
}

/// One endpoint's breaker state.
#[derive(Debug)]
pub struct Outlier {
    addr: SocketAddr,
    epoch: Instant,
    /// A tag in the low two bits and a time (nanoseconds since `epoch`) above them,
    /// so every transition is one compare-and-swap:
    /// - `CLOSED`: in rotation; the time is when the ejection streak is forgotten;
    /// - `OPEN`: ejected until the time; then half-open, the next pick is the probe;
    /// - `PROBING`: the probe is out; past the time it counts as lost.
    state: AtomicU64,
    /// Failures in a row, reset by any success.
    consecutive: AtomicU32,
    /// Ejections in a row (the streak): the next one lasts `base × 2^ejections`.
    ejections: AtomicU32,
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const PROBING: u64 = 2;
const TAG: u64 = 0b11;

/// What a recorded outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    /// Taken out for `ejection`; `ejections` is the streak, this one included;
    /// `probe_failed` when the half-open probe failed rather than the count ran out.
    Ejected {
        ejection: Duration,
        ejections: u32,
        probe_failed: bool,
    },
    /// The probe succeeded: back in rotation.
    Restored,
}

/// A point-in-time view of an endpoint's breaker, for `/config` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierState {
    /// Out of rotation: ejected, or half-open until a probe succeeds.
    pub ejected: bool,
    /// The ejection time is over; one probe is let through (or is out).
    pub half_open: bool,
    /// When the ejection ends, and how long is left (zero once half-open).
    pub ejected_until: Option<SystemTime>,
    pub remaining: Option<Duration>,
    pub consecutive_failures: u32,
    pub ejections: u32,
}

// === impl Policy ===

impl Policy {
    /// Compiles the `circuitBreaker` at `at` (e.g. `services.web.circuitBreaker`).
    pub fn compile(at: &str, config: &CircuitBreakerConfig) -> Result<Self, CompileError> {
        let CircuitBreakerConfig {
            consecutive_failures,
            base_ejection_time,
            max_ejection_time,
            max_ejection_percent,
        } = config;
        let duration = |field: &str, value: &str| {
            let field = format!("{at}.{field}");
            match trellis_api::duration::parse(value) {
                Ok(d) if d.is_zero() => {
                    Err(CompileError::invalid(field, "must be longer than zero"))
                }
                Ok(d) => Ok(d),
                Err(e) => Err(CompileError::invalid(field, e.to_string())),
            }
        };
        if *consecutive_failures == 0 {
            return Err(CompileError::invalid(
                format!("{at}.consecutiveFailures"),
                "must be at least 1",
            ));
        }
        let base = duration("baseEjectionTime", base_ejection_time)?;
        let max = duration("maxEjectionTime", max_ejection_time)?;
        if max < base {
            return Err(CompileError::invalid(
                format!("{at}.maxEjectionTime"),
                format!(
                    "{max_ejection_time} is shorter than baseEjectionTime {base_ejection_time}"
                ),
            ));
        }
        if *max_ejection_percent > 100 {
            return Err(CompileError::invalid(
                format!("{at}.maxEjectionPercent"),
                format!("must be 0 to 100, not {max_ejection_percent}"),
            ));
        }
        Ok(Self {
            consecutive_failures: *consecutive_failures,
            base_ejection_time: base,
            max_ejection_time: max,
            max_ejection_percent: *max_ejection_percent,
        })
    }

    /// How long the `n`th ejection in a row lasts: `base × 2^(n-1)`, at most `max`.
    pub fn ejection_time(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(31);
        self.base_ejection_time
            .saturating_mul(1 << doublings)
            .min(self.max_ejection_time)
    }

    /// How many of `total` endpoints may be out at once: the percentage rounded
    /// down, but at least one unless the percentage is 0. Without that floor a small
    /// service could never eject anything (10% of 5 rounds down to 0), and a service
    /// of one endpoint could never fail fast.
    pub fn max_ejected(&self, total: usize) -> usize {
        if self.max_ejection_percent == 0 {
            return 0;
        }
        (total * self.max_ejection_percent as usize / 100).max(1)
    }
}

// === impl Breaker ===

impl Breaker {
    pub fn new(service: &str, policy: Option<Policy>, peers: Arc<[Arc<Endpoint>]>) -> Self {
        Self {
            service: service.to_string(),
            policy,
            peers,
            ejecting: AtomicBool::new(false),
        }
    }

    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref()
    }

    /// Counts one try's outcome against `outlier` under this service's policy.
    pub fn record(&self, outlier: &Outlier, outcome: Outcome) {
        self.record_at(outlier, outcome, Instant::now());
    }

    pub(super) fn record_at(&self, outlier: &Outlier, outcome: Outcome, now: Instant) {
        let Some(policy) = &self.policy else {
            // Counted anyway, so `/config` shows a failing endpoint without a breaker.
            outlier.count(outcome);
            return;
        };
        let room = |failures| self.room_for_one_more(policy, failures, outlier.addr);
        match outlier.record_at(outcome, policy, now, room) {
            Transition::Unchanged => {}
            Transition::Ejected {
                ejection,
                ejections,
                probe_failed,
            } => {
                metrics::counter!(
                    EJECTIONS,
                    "service" => self.service.clone(),
                    "endpoint" => outlier.addr.to_string()
                )
                .increment(1);
                crate::trace::event("endpoint ejected", || {
                    use crate::trace::KeyValue;
                    vec![
                        KeyValue::new("trellis.endpoint", outlier.addr.to_string()),
                        KeyValue::new("trellis.ejection_ms", ejection.as_millis() as i64),
                        KeyValue::new("trellis.ejections", i64::from(ejections)),
                    ]
                });
                tracing::info!(
                    service = %self.service,
                    endpoint = %outlier.addr,
                    ejection_ms = ejection.as_millis() as u64,
                    ejections,
                    consecutive_failures = outlier.consecutive_failures(),
                    reason = if probe_failed { "probe failed" } else { "consecutive failures" },
                    "endpoint ejected"
                );
            }
            Transition::Restored => tracing::info!(
                service = %self.service,
                endpoint = %outlier.addr,
                "endpoint restored: its probe succeeded"
            ),
        }
    }

    /// Whether one more endpoint may be ejected without passing `maxEjectionPercent`;
    /// the guard keeps other ejections of this service out until it is dropped.
    fn room_for_one_more(
        &self,
        policy: &Policy,
        failures: u32,
        addr: SocketAddr,
    ) -> Option<EjectingGuard<'_>> {
        // Busy means another ejection is deciding right now: skip this one rather
        // than wait; the endpoint's next failure asks again.
        self.ejecting
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        let guard = EjectingGuard(&self.ejecting);
        let out = self.peers.iter().filter(|e| e.outlier.is_out()).count();
        let cap = policy.max_ejected(self.peers.len());
        if out < cap {
            return Some(guard);
        }
        // Once per streak, not on every failure after it.
        if failures == policy.consecutive_failures {
            tracing::info!(
                service = %self.service,
                endpoint = %addr,
                ejected = out,
                max_ejected = cap,
                "endpoint not ejected: maxEjectionPercent reached"
            );
        }
        None
    }
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("service", &self.service)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

struct EjectingGuard<'b>(&'b AtomicBool);

impl Drop for EjectingGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

// === impl Outlier ===

impl Outlier {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            epoch: Instant::now(),
            state: AtomicU64::new(CLOSED),
            consecutive: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
        }
    }

    /// Counts one try's outcome under the policy of the service the try was for.
    pub fn record(&self, outcome: Outcome, breaker: &Breaker) {
        breaker.record(self, outcome);
    }

    /// Whether the endpoint is in rotation: neither ejected nor half-open.
    pub fn is_out(&self) -> bool {
        tag(self.state.load(Ordering::Acquire)) != CLOSED
    }

    /// Whether a pick may choose this endpoint now (in rotation, or half-open with no
    /// probe out). Takes nothing: `admit` does.
    pub fn admits(&self, now: Instant) -> bool {
        let state = self.state.load(Ordering::Acquire);
        tag(state) == CLOSED || self.at(now) >= time(state)
    }

    /// Takes the endpoint for one request: always, in rotation; as the one probe when
    /// half-open (false when another request took the probe first).
    pub fn admit(&self, now: Instant) -> bool {
        let state = self.state.load(Ordering::Acquire);
        if tag(state) == CLOSED {
            return true;
        }
        let now_ns = self.at(now);
        if now_ns < time(state) {
            return false;
        }
        let probing = pack(PROBING, now_ns.saturating_add(nanos(PROBE_LOST_AFTER)));
        let claimed = self
            .state
            .compare_exchange(state, probing, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if claimed {
            tracing::debug!(endpoint = %self.addr, "half-open: sending the probe");
        }
        claimed
    }

    /// Counts an outcome and moves the state. `room` is asked before an ejection
    /// (with the failure count) and may refuse it; what it returns is held until the
    /// ejection is in place.
    pub fn record_at<G>(
        &self,
        outcome: Outcome,
        policy: &Policy,
        now: Instant,
        room: impl FnOnce(u32) -> Option<G>,
    ) -> Transition {
        let failures = self.count(outcome);
        let state = self.state.load(Ordering::Acquire);
        let now_ns = self.at(now);
        match (outcome, tag(state)) {
            // The probe's answer; a request sent before the ejection that answers
            // meanwhile counts too: it is as fresh as the probe's.
            (Outcome::Success, PROBING) => {
                let forget_at = now_ns.saturating_add(nanos(policy.max_ejection_time));
                if self.swap(state, pack(CLOSED, forget_at)) {
                    Transition::Restored
                } else {
                    Transition::Unchanged
                }
            }
            (Outcome::Failure, PROBING) => {
                let ejections = self.ejections.load(Ordering::Relaxed).saturating_add(1);
                self.eject(state, policy, now_ns, ejections, true)
            }
            (Outcome::Failure, CLOSED) if failures >= policy.consecutive_failures => {
                let Some(_guard) = room(failures) else {
                    return Transition::Unchanged;
                };
                // After `maxEjectionTime` back in rotation the streak is forgotten, so
                // an endpoint that failed long ago starts again at `baseEjectionTime`.
                let forget_at = time(state);
                let streak = if forget_at != 0 && now_ns >= forget_at {
                    0
                } else {
                    self.ejections.load(Ordering::Relaxed)
                };
                self.eject(state, policy, now_ns, streak.saturating_add(1), false)
            }
            // Ejected: only the probe decides what happens next. Closed: below the count.
            _ => Transition::Unchanged,
        }
    }

    /// Counts the outcome; returns the failures in a row.
    fn count(&self, outcome: Outcome) -> u32 {
        match outcome {
            Outcome::Success => {
                self.consecutive.store(0, Ordering::Relaxed);
                0
            }
            Outcome::Failure => {
                let previous = self
                    .consecutive
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_add(1))
                    })
                    .unwrap_or(u32::MAX);
                previous.saturating_add(1)
            }
        }
    }

    fn eject(
        &self,
        from: u64,
        policy: &Policy,
        now_ns: u64,
        ejections: u32,
        probe_failed: bool,
    ) -> Transition {
        let ejection = policy.ejection_time(ejections);
        let until = pack(OPEN, now_ns.saturating_add(nanos(ejection)));
        if !self.swap(from, until) {
            // Another outcome moved the state first; it decided.
            return Transition::Unchanged;
        }
        self.ejections.store(ejections, Ordering::Relaxed);
        Transition::Ejected {
            ejection,
            ejections,
            probe_failed,
        }
    }

    fn swap(&self, from: u64, to: u64) -> bool {
        self.state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Ordering::Relaxed)
    }

    /// The state as of `now`, for `/config` and `/metrics`.
    pub fn state_at(&self, now: Instant, wall: SystemTime) -> OutlierState {
        let state = self.state.load(Ordering::Acquire);
        let (tag, at) = (tag(state), time(state));
        let now_ns = self.at(now);
        let ejected = tag != CLOSED;
        let forgotten = tag == CLOSED && at != 0 && now_ns >= at;
        let ejected_until = (tag == OPEN).then(|| {
            if at >= now_ns {
                wall + Duration::from_nanos(at - now_ns)
            } else {
                wall - Duration::from_nanos(now_ns - at)
            }
        });
        OutlierState {
            ejected,
            half_open: tag == PROBING || (tag == OPEN && now_ns >= at),
            ejected_until,
            remaining: match tag {
                OPEN => Some(Duration::from_nanos(at.saturating_sub(now_ns))),
                PROBING => Some(Duration::ZERO),
                _ => None,
            },
            consecutive_failures: self.consecutive_failures(),
            ejections: if forgotten {
                0
            } else {
                self.ejections.load(Ordering::Relaxed)
            },
        }
    }

    /// `now` as nanoseconds since this endpoint's epoch; never 0, which `CLOSED`
    /// uses for "no streak to forget".
    fn at(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.epoch)).max(1)
    }
}

fn pack(tag: u64, time: u64) -> u64 {
    (time.min(u64::MAX >> 2) << 2) | tag
}

fn tag(state: u64) -> u64 {
    state & TAG
}

fn time(state: u64) -> u64 {
    state >> 2
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(failures: u32, base_ms: u64, max_ms: u64, percent: u32) -> Policy {
        Policy {
            consecutive_failures: failures,
            base_ejection_time: Duration::from_millis(base_ms),
            max_ejection_time: Duration::from_millis(max_ms),
            max_ejection_percent: percent,
        }
    }

    fn outlier() -> Outlier {
        Outlier::new("127.0.0.1:1".parse().unwrap())
    }

    /// Records with room to eject.
    fn record(o: &Outlier, outcome: Outcome, p: &Policy, now: Instant) -> Transition {
        o.record_at(outcome, p, now, |_| Some(()))
    }

    fn ejected_for(ms: u64, ejections: u32, probe_failed: bool) -> Transition {
        Transition::Ejected {
            ejection: Duration::from_millis(ms),
            ejections,
            probe_failed,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let (o, p, t0) = (outlier(), policy(3, 1000, 10_000, 100), Instant::now());
        assert_eq!(record(&o, Outcome::Failure, &p, t0), Transition::Unchanged);
        assert_eq!(record(&o, Outcome::Failure, &p, t0), Transition::Unchanged);
        assert_eq!(record(&o, Outcome::Success, &p, t0), Transition::Unchanged);
        assert_eq!(o.consecutive_failures(), 0);
        assert_eq!(record(&o, Outcome::Failure, &p, t0), Transition::Unchanged);
        assert_eq!(record(&o, Outcome::Failure, &p, t0), Transition::Unchanged);
        assert!(o.admits(t0));
        assert_eq!(
            record(&o, Outcome::Failure, &p, t0),
            ejected_for(1000, 1, false)
        );
        assert!(o.is_out());
        assert!(!o.admits(t0 + ms(999)));
        assert!(!o.admit(t0 + ms(999)));
        // Late answers of requests sent before the ejection change nothing.
        assert_eq!(record(&o, Outcome::Failure, &p, t0), Transition::Unchanged);
        assert_eq!(record(&o, Outcome::Success, &p, t0), Transition::Unchanged);
        assert!(!o.admits(t0 + ms(999)));
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through() {
        let (o, p, t0) = (outlier(), policy(1, 1000, 10_000, 100), Instant::now());
        record(&o, Outcome::Failure, &p, t0);
        let t1 = t0 + ms(1000);
        assert!(o.admits(t1));
        assert!(o.admit(t1), "the probe");
        assert!(!o.admits(t1), "a second request skips the endpoint");
        assert!(!o.admit(t1 + ms(5)));
        let state = o.state_at(t1, SystemTime::now());
        assert!(state.ejected && state.half_open);
        assert_eq!(state.remaining, Some(Duration::ZERO));

        assert_eq!(record(&o, Outcome::Success, &p, t1), Transition::Restored);
        assert!(!o.is_out());
        assert!(o.admit(t1) && o.admit(t1), "back in rotation: no limit");
    }

    #[test]
    fn failed_probes_eject_for_twice_as_long_up_to_the_cap() {
        let (o, p, mut now) = (outlier(), policy(2, 1000, 5000, 100), Instant::now());
        record(&o, Outcome::Failure, &p, now);
        assert_eq!(
            record(&o, Outcome::Failure, &p, now),
            ejected_for(1000, 1, false)
        );
        for (streak, want) in [(2, 2000), (3, 4000), (4, 5000), (5, 5000)] {
            let ejection = o.state_at(now, SystemTime::now()).remaining.unwrap();
            assert!(!o.admit(now + ejection - ms(1)));
            now += ejection;
            assert!(o.admit(now), "ejection {streak}: the probe");
            // One failure of the probe is enough, whatever the count says.
            assert_eq!(
                record(&o, Outcome::Failure, &p, now),
                ejected_for(want, streak, true)
            );
        }
        assert_eq!(o.state_at(now, SystemTime::now()).ejections, 5);
    }

    #[test]
    fn the_streak_is_forgotten_after_max_ejection_time_in_rotation() {
        let (o, p, t0) = (outlier(), policy(1, 1000, 4000, 100), Instant::now());
        record(&o, Outcome::Failure, &p, t0);
        let t1 = t0 + ms(1000);
        assert!(o.admit(t1));
        assert_eq!(record(&o, Outcome::Success, &p, t1), Transition::Restored);
        // Failing again soon: the streak goes on, the ejection doubles.
        let t2 = t1 + ms(3999);
        assert_eq!(o.state_at(t2, SystemTime::now()).ejections, 1);
        assert_eq!(
            record(&o, Outcome::Failure, &p, t2),
            ejected_for(2000, 2, false)
        );
        let t3 = t2 + ms(2000);
        assert!(o.admit(t3));
        assert_eq!(record(&o, Outcome::Success, &p, t3), Transition::Restored);
        // Failing after maxEjectionTime in rotation: back to baseEjectionTime.
        let t4 = t3 + ms(4000);
        assert_eq!(o.state_at(t4, SystemTime::now()).ejections, 0);
        assert_eq!(
            record(&o, Outcome::Failure, &p, t4),
            ejected_for(1000, 1, false)
        );
    }

    #[test]
    fn a_lost_probe_is_replaced() {
        let (o, p, t0) = (outlier(), policy(1, 1000, 10_000, 100), Instant::now());
        record(&o, Outcome::Failure, &p, t0);
        let t1 = t0 + ms(1000);
        assert!(o.admit(t1));
        assert!(!o.admit(t1 + PROBE_LOST_AFTER - ms(1)));
        assert!(
            o.admit(t1 + PROBE_LOST_AFTER),
            "the first probe never answered"
        );
    }

    #[test]
    fn no_room_keeps_the_endpoint_in_rotation_until_there_is() {
        let (o, p, t0) = (outlier(), policy(2, 1000, 10_000, 50), Instant::now());
        let refused = |_| None::<()>;
        o.record_at(Outcome::Failure, &p, t0, refused);
        assert_eq!(
            o.record_at(Outcome::Failure, &p, t0, refused),
            Transition::Unchanged
        );
        assert!(!o.is_out());
        // Every further failure asks again.
        let mut asked = None;
        o.record_at(Outcome::Failure, &p, t0, |failures| {
            asked = Some(failures);
            None::<()>
        });
        assert_eq!(asked, Some(3));
        assert_eq!(
            record(&o, Outcome::Failure, &p, t0),
            ejected_for(1000, 1, false)
        );
    }

    #[test]
    fn ejection_cap_rounds_down_but_allows_one() {
        for (percent, total, want) in [
            (0, 10, 0),
            (10, 5, 1),
            (10, 20, 2),
            (50, 3, 1),
            (67, 3, 2),
            (100, 3, 3),
            (100, 1, 1),
            (1, 1, 1),
        ] {
            let p = policy(1, 1, 1, percent);
            assert_eq!(p.max_ejected(total), want, "{percent}% of {total}");
        }
    }

    #[test]
    fn ejection_time_saturates_instead_of_overflowing() {
        let p = policy(1, 1000, u64::MAX / 2, 100);
        assert_eq!(p.ejection_time(1), ms(1000));
        assert_eq!(p.ejection_time(3), ms(4000));
        assert_eq!(p.ejection_time(u32::MAX), ms(1000) * (1 << 31));
    }

    #[test]
    fn bad_policies_are_named_by_their_field_path() {
        let config = |failures, base: &str, max: &str, percent| CircuitBreakerConfig {
            consecutive_failures: failures,
            base_ejection_time: base.into(),
            max_ejection_time: max.into(),
            max_ejection_percent: percent,
        };
        let at = "services.web.circuitBreaker";
        for (config, want) in [
            (
                config(0, "1s", "1s", 10),
                "services.web.circuitBreaker.consecutiveFailures: must be at least 1",
            ),
            (
                config(1, "soon", "1s", 10),
                "services.web.circuitBreaker.baseEjectionTime: invalid duration \"soon\"",
            ),
            (
                config(1, "0s", "1s", 10),
                "services.web.circuitBreaker.baseEjectionTime: must be longer than zero",
            ),
            (
                config(1, "30s", "10s", 10),
                "services.web.circuitBreaker.maxEjectionTime: 10s is shorter than baseEjectionTime 30s",
            ),
            (
                config(1, "1s", "1s", 101),
                "services.web.circuitBreaker.maxEjectionPercent: must be 0 to 100, not 101",
            ),
        ] {
            let e = Policy::compile(at, &config).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
        assert_eq!(
            Policy::compile(at, &config(5, "30s", "5m", 50)).unwrap(),
            policy(5, 30_000, 300_000, 50)
        );
    }

    #[test]
    fn outcomes_of_statuses() {
        assert_eq!(Outcome::of_status(StatusCode::OK), Outcome::Success);
        assert_eq!(Outcome::of_status(StatusCode::NOT_FOUND), Outcome::Success);
        assert_eq!(
            Outcome::of_status(StatusCode::SERVICE_UNAVAILABLE),
            Outcome::Failure
        );
    }
}
