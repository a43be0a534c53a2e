//! Bulkheads: named concurrency pools of one destination service, so one kind of
//! traffic (say `analytics`) cannot take the slots another (`critical`) needs. A pool
//! admits `maxConcurrentRequests` at once, lets `maxPendingRequests` more wait up to
//! `maxPendingTime`, and refuses the rest at once: a refusal that comes immediately
//! and says so is cheaper for everyone than a queue nobody sized.
//!
//! Pools are compiled with the config. One whose limits a push leaves unchanged is
//! carried over whole (its holders and waiters with it); one whose limits change is
//! built anew, and the requests of the old one finish on the old one.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use http::{Response, StatusCode};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use trellis_api::config::BulkheadConfig;

use super::destinations::CompileError;
use crate::http::{ProxyBody, mesh_error};

pub const IN_FLIGHT: &str = "trellis_bulkhead_in_flight";
pub const QUEUED: &str = "trellis_bulkhead_queued";
pub const REJECTED: &str = "trellis_bulkhead_rejected_total";
pub const CAPACITY: &str = "trellis_bulkhead_capacity";

/// The pool of requests whose route names none.
pub const DEFAULT_POOL: &str = "default";

/// One destination service's pools, by name.
#[derive(Debug, Default, Clone)]
pub struct Bulkheads {
    pools: BTreeMap<String, Arc<Pool>>,
}

/// What a pool allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    max_concurrent: u32,
    max_pending: u32,
    /// None: a waiter waits as long as its route's timeout lets it.
    max_pending_time: Option<Duration>,
}

#[derive(Debug)]
pub struct Pool {
    service: String,
    name: String,
    limits: Limits,
    permits: Arc<Semaphore>,
    /// Requests waiting for a permit; never above `limits.max_pending`.
    waiting: AtomicU32,
    in_flight_gauge: metrics::Gauge,
    queued_gauge: metrics::Gauge,
    rejected: metrics::Counter,
}

/// A slot of a pool, held while the request is out; dropping it frees the slot.
/// Owned, so it can travel with a response.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    pool: Arc<Pool>,
}

/// Why a pool turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot taken and as many waiting as may: refused without waiting.
    Full,
    /// Waited `maxPendingTime` and no slot freed.
    WaitedTooLong,
    /// The route's deadline came while waiting.
    Deadline,
}

// === impl Bulkheads ===

impl Bulkheads {
    /// Compiles the pools of the service at `at` (`services.web`), keeping each pool of
    /// `previous` whose limits are unchanged.
    pub fn compile(
        at: &str,
        service: &str,
        configs: &[BulkheadConfig],
        previous: Option<&Bulkheads>,
    ) -> Result<Self, CompileError> {
        let mut pools = BTreeMap::new();
        for (i, config) in configs.iter().enumerate() {
            let at = format!("{at}.bulkheads[{i}]");
            let (name, limits) = Limits::compile(&at, config)?;
            let kept = previous
                .and_then(|p| p.pools.get(name))
                .filter(|pool| pool.limits == limits);
            let pool = match kept {
                Some(pool) => pool.clone(),
                None => Arc::new(Pool::new(service, name, limits)),
            };
            if pools.insert(name.to_string(), pool).is_some() {
                return Err(CompileError::invalid(
                    format!("{at}.name"),
                    format!("{name:?} is listed twice"),
                ));
            }
        }
        Ok(Self { pools })
    }

    /// The pool a route takes: the one it names, else `default`; none (unbounded)
    /// when that is `default` and the service lists no such pool. `at` is the route's
    /// path, for the error.
    pub fn for_route(
        &self,
        at: &str,
        name: Option<&str>,
    ) -> Result<Option<Arc<Pool>>, CompileError> {
        let name = name.unwrap_or(DEFAULT_POOL);
        match self.pools.get(name) {
            Some(pool) => Ok(Some(pool.clone())),
            None if name == DEFAULT_POOL => Ok(None),
            None => {
                let known: Vec<_> = self.pools.keys().collect();
                Err(CompileError::invalid(
                    format!("{at}.bulkhead"),
                    format!("no pool {name:?} (the service has {known:?})"),
                ))
            }
        }
    }

    /// The pool of requests no route matches.
    pub fn default_pool(&self) -> Option<&Arc<Pool>> {
        self.pools.get(DEFAULT_POOL)
    }
}

// === impl Limits ===

impl Limits {
    fn compile<'c>(at: &str, config: &'c BulkheadConfig) -> Result<(&'c str, Self), CompileError> {
        let BulkheadConfig {
            name,
            max_concurrent_requests,
            max_pending_requests,
            max_pending_time,
        } = config;
        if name.is_empty() {
            return Err(CompileError::invalid(
                format!("{at}.name"),
                "must not be empty",
            ));
        }
        if *max_concurrent_requests == 0 {
            return Err(CompileError::invalid(
                format!("{at}.maxConcurrentRequests"),
                "must be at least 1",
            ));
        }
        let max_pending_time = max_pending_time
            .as_deref()
            .map(|t| {
                let field = || format!("{at}.maxPendingTime");
                match trellis_api::duration::parse(t) {
                    Ok(d) if d.is_zero() => Err(CompileError::invalid(
                        field(),
                        "must be longer than zero (maxPendingRequests: 0 lets none wait)",
                    )),
                    Ok(d) => Ok(d),
                    Err(e) => Err(CompileError::invalid(field(), e.to_string())),
                }
            })
            .transpose()?;
        let limits = Self {
            max_concurrent: *max_concurrent_requests,
            max_pending: *max_pending_requests,
            max_pending_time,
        };
        Ok((name, limits))
    }
}

// === impl Pool ===

impl Pool {
    fn new(service: &str, name: &str, limits: Limits) -> Self {
        let labels = [("service", service.to_string()), ("pool", name.to_string())];
        let in_flight_gauge = metrics::gauge!(IN_FLIGHT, &labels);
        let queued_gauge = metrics::gauge!(QUEUED, &labels);
        let rejected = metrics::counter!(REJECTED, &labels);
        // Touched so every configured pool shows in /metrics before its first request.
        // A pool rebuilt with new limits shares the series with the old one, whose
        // requests still count until they finish; hence deltas, never `set`.
        in_flight_gauge.increment(0.0);
        queued_gauge.increment(0.0);
        rejected.increment(0);
        // The newest limits are the ones in force.
        metrics::gauge!(CAPACITY, &labels).set(f64::from(limits.max_concurrent));
        Self {
            service: service.to_string(),
            name: name.to_string(),
            limits,
            permits: Arc::new(Semaphore::new(limits.max_concurrent as usize)),
            waiting: AtomicU32::new(0),
            in_flight_gauge,
            queued_gauge,
            rejected,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes a slot: at once if one is free; else waits for one, if fewer than
    /// `maxPendingRequests` already wait, until `maxPendingTime` or `deadline`
    /// (the route's), whichever comes first.
    pub async fn enter(self: &Arc<Self>, deadline: Option<Instant>) -> Result<Slot, Refusal> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(self.slot(permit));
        }
        let max_pending = self.limits.max_pending;
        let reserved = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_pending).then_some(n + 1)
            });
        if reserved.is_err() {
            return Err(self.refuse(Refusal::Full));
        }
        let waiter = Waiter::new(self);
        let patience = self.limits.max_pending_time.map(|t| Instant::now() + t);
        let (until, expiry) = match (patience, deadline) {
            (Some(p), Some(d)) if d < p => (Some(d), Refusal::Deadline),
            (Some(p), _) => (Some(p), Refusal::WaitedTooLong),
            (None, d) => (d, Refusal::Deadline),
        };
        let acquire = self.permits.clone().acquire_owned();
        let acquired = match until {
            Some(until) => tokio::time::timeout_at(until, acquire).await.ok(),
            None => Some(acquire.await),
        };
        drop(waiter);
        match acquired {
            Some(Ok(permit)) => Ok(self.slot(permit)),
            Some(Err(_closed)) => Err(self.refuse(Refusal::Full)),
            None => Err(self.refuse(expiry)),
        }
    }

    fn slot(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        self.in_flight_gauge.increment(1.0);
        Slot {
            _permit: permit,
            pool: self.clone(),
        }
    }

    fn refuse(&self, refusal: Refusal) -> Refusal {
        self.rejected.increment(1);
        refusal
    }

    /// Requests holding a slot.
    pub fn in_flight(&self) -> u32 {
        let free = u32::try_from(self.permits.available_permits()).unwrap_or(u32::MAX);
        self.limits.max_concurrent.saturating_sub(free)
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> u32 {
        self.waiting.load(Ordering::Acquire)
    }

    /// The mesh's answer to a request this pool refused: `503 bulkhead-full`, or `504
    /// timeout` when the route's deadline ran out while it waited.
    pub fn refusal(&self, refusal: Refusal) -> Response<ProxyBody> {
        let Self {
            service,
            name,
            limits,
            ..
        } = self;
        let (status, kind, message) = match refusal {
            Refusal::Full => (
                StatusCode::SERVICE_UNAVAILABLE,
                "bulkhead-full",
                format!(
                    "bulkhead {name:?} of service {service:?} is full: {} requests in flight \
                     and {} waiting (maxConcurrentRequests {}, maxPendingRequests {})",
                    self.in_flight(),
                    self.queued(),
                    limits.max_concurrent,
                    limits.max_pending
                ),
            ),
            Refusal::WaitedTooLong => (
                StatusCode::SERVICE_UNAVAILABLE,
                "bulkhead-full",
                format!(
                    "no slot of bulkhead {name:?} of service {service:?} freed within its \
                     maxPendingTime of {:?}",
                    limits.max_pending_time.unwrap_or_default()
                ),
            ),
            Refusal::Deadline => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "no slot of bulkhead {name:?} of service {service:?} freed within the \
                     route's timeout"
                ),
            ),
        };
        tracing::debug!(error = %message, "bulkhead refused a request");
        crate::trace::event("bulkhead rejected", || {
            use crate::trace::KeyValue;
            let reason = match refusal {
                Refusal::Full => "full",
                Refusal::WaitedTooLong => "max_pending_time",
                Refusal::Deadline => "route_timeout",
            };
            vec![
                KeyValue::new("trellis.bulkhead", name.clone()),
                KeyValue::new("trellis.bulkhead.reason", reason),
            ]
        });
        mesh_error(status, kind, message)
    }
}

// === impl Slot ===

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.in_flight_gauge.decrement(1.0);
    }
}

/// One place in a pool's queue, given back however the wait ends (a slot, a
/// refusal, or the caller going away and dropping the request).
struct Waiter<'p>(&'p Pool);

impl<'p> Waiter<'p> {
    fn new(pool: &'p Pool) -> Self {
        pool.queued_gauge.increment(1.0);
        Self(pool)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.queued_gauge.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, concurrent: u32, pending: u32, time: Option<&str>) -> BulkheadConfig {
        BulkheadConfig {
            name: name.into(),
            max_concurrent_requests: concurrent,
            max_pending_requests: pending,
            max_pending_time: time.map(str::to_string),
        }
    }

    fn pool(concurrent: u32, pending: u32, time: Option<&str>) -> Arc<Pool> {
        let pools = Bulkheads::compile(
            "services.web",
            "web",
            &[config("p", concurrent, pending, time)],
            None,
        )
        .unwrap();
        pools.for_route("r", Some("p")).unwrap().unwrap()
    }

    /// Lets spawned tasks run until they wait on something.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slots_then_waiters_then_refusals_at_once() {
        let pool = pool(2, 1, None);
        let a = pool.enter(None).await.unwrap();
        let _b = pool.enter(None).await.unwrap();
        assert_eq!((pool.in_flight(), pool.queued()), (2, 0));

        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.enter(None).await }
        });
        settle().await;
        assert_eq!(pool.queued(), 1);

        // The queue is full: refused without waiting, not even a tick of the clock.
        let before = Instant::now();
        assert_eq!(pool.enter(None).await.unwrap_err(), Refusal::Full);
        assert_eq!(before.elapsed(), Duration::ZERO);

        drop(a);
        let slot = waiting.await.unwrap().unwrap();
        assert_eq!((pool.in_flight(), pool.queued()), (2, 0));
        drop(slot);
        assert_eq!(pool.in_flight(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_after_max_pending_time_or_the_deadline() {
        let pool = pool(1, 5, Some("200ms"));
        let _held = pool.enter(None).await.unwrap();

        let before = Instant::now();
        assert_eq!(pool.enter(None).await.unwrap_err(), Refusal::WaitedTooLong);
        assert_eq!(before.elapsed(), Duration::from_millis(200));
        assert_eq!(pool.queued(), 0, "the place in the queue is given back");

        // A route deadline before maxPendingTime wins.
        let before = Instant::now();
        let deadline = before + Duration::from_millis(50);
        assert_eq!(
            pool.enter(Some(deadline)).await.unwrap_err(),
            Refusal::Deadline
        );
        assert_eq!(before.elapsed(), Duration::from_millis(50));

        // Without maxPendingTime, only the deadline bounds the wait.
        let patient = self::pool(1, 1, None);
        let _held = patient.enter(None).await.unwrap();
        let before = Instant::now();
        let deadline = before + Duration::from_secs(3);
        assert_eq!(
            patient.enter(Some(deadline)).await.unwrap_err(),
            Refusal::Deadline
        );
        assert_eq!(before.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_get_slots_in_arrival_order() {
        let pool = pool(1, 3, None);
        let held = pool.enter(None).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            let (pool, tx) = (pool.clone(), tx.clone());
            tokio::spawn(async move {
                let slot = pool.enter(None).await.unwrap();
                tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(slot);
            });
            settle().await;
        }
        assert_eq!(pool.queued(), 3);
        drop(held);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, [0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_leaves_frees_its_place_in_the_queue() {
        let pool = pool(1, 1, None);
        let _held = pool.enter(None).await.unwrap();
        let gone = tokio::spawn({
            let pool = pool.clone();
            async move { pool.enter(None).await }
        });
        settle().await;
        assert_eq!(pool.queued(), 1);
        gone.abort();
        let _ = gone.await;
        assert_eq!(pool.queued(), 0);
        // Its place is free for the next one.
        let next = tokio::spawn({
            let pool = pool.clone();
            async move { pool.enter(None).await }
        });
        settle().await;
        assert_eq!(pool.queued(), 1);
        next.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn pools_are_independent() {
        let pools = Bulkheads::compile(
            "services.web",
            "web",
            &[
                config("analytics", 1, 0, None),
                config("critical", 1, 0, None),
            ],
            None,
        )
        .unwrap();
        let analytics = pools.for_route("r", Some("analytics")).unwrap().unwrap();
        let critical = pools.for_route("r", Some("critical")).unwrap().unwrap();
        let _busy = analytics.enter(None).await.unwrap();
        assert_eq!(analytics.enter(None).await.unwrap_err(), Refusal::Full);
        assert!(critical.enter(None).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_keeps_unchanged_pools_and_rebuilds_changed_ones() {
        let first = Bulkheads::compile(
            "services.web",
            "web",
            &[config("same", 1, 0, None), config("changed", 1, 0, None)],
            None,
        )
        .unwrap();
        let same = first.for_route("r", Some("same")).unwrap().unwrap();
        let old = first.for_route("r", Some("changed")).unwrap().unwrap();
        let held_same = same.enter(None).await.unwrap();
        let held_old = old.enter(None).await.unwrap();

        let next = Bulkheads::compile(
            "services.web",
            "web",
            &[config("same", 1, 0, None), config("changed", 2, 0, None)],
            Some(&first),
        )
        .unwrap();
        let kept = next.for_route("r", Some("same")).unwrap().unwrap();
        assert!(Arc::ptr_eq(&same, &kept), "unchanged limits keep the pool");
        assert_eq!(
            kept.enter(None).await.unwrap_err(),
            Refusal::Full,
            "and its holders"
        );
        let rebuilt = next.for_route("r", Some("changed")).unwrap().unwrap();
        assert!(!Arc::ptr_eq(&old, &rebuilt));
        assert_eq!(rebuilt.in_flight(), 0);
        let _a = rebuilt.enter(None).await.unwrap();
        let _b = rebuilt.enter(None).await.unwrap();
        // The old pool's request finishes normally, on the old pool.
        drop(held_old);
        assert_eq!(old.in_flight(), 0);
        drop(held_same);
        assert_eq!(kept.in_flight(), 0);
    }

    #[test]
    fn routes_take_their_pool_or_default_or_none() {
        let with_default = Bulkheads::compile(
            "services.web",
            "web",
            &[config("default", 5, 0, None), config("batch", 1, 0, None)],
            None,
        )
        .unwrap();
        let name = |p: Option<Arc<Pool>>| p.map(|p| p.name().to_string());
        assert_eq!(
            name(with_default.for_route("r", None).unwrap()).as_deref(),
            Some("default")
        );
        assert_eq!(
            name(with_default.for_route("r", Some("batch")).unwrap()).as_deref(),
            Some("batch")
        );
        assert!(with_default.default_pool().is_some());

        let without =
            Bulkheads::compile("services.web", "web", &[config("batch", 1, 0, None)], None)
                .unwrap();
        assert!(without.for_route("r", None).unwrap().is_none(), "unbounded");
        assert!(without.for_route("r", Some("default")).unwrap().is_none());
        assert!(without.default_pool().is_none());
        let e = without
            .for_route("services.web.routes[1]", Some("x"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "services.web.routes[1].bulkhead: no pool \"x\" (the service has [\"batch\"])"
        );
    }

    #[test]
    fn bad_pools_are_named_by_their_field_path() {
        let cases = [
            (
                vec![config("a", 0, 0, None)],
                "services.web.bulkheads[0].maxConcurrentRequests: must be at least 1",
            ),
            (
                vec![config("a", 1, 0, None), config("a", 2, 0, None)],
                "services.web.bulkheads[1].name: \"a\" is listed twice",
            ),
            (
                vec![config("", 1, 0, None)],
                "services.web.bulkheads[0].name: must not be empty",
            ),
            (
                vec![config("a", 1, 1, Some("soon"))],
                "services.web.bulkheads[0].maxPendingTime: invalid duration \"soon\"",
            ),
            (
                vec![config("a", 1, 1, Some("0s"))],
                "services.web.bulkheads[0].maxPendingTime: must be longer than zero",
            ),
        ];
        for (configs, want) in cases {
            let e = Bulkheads::compile("services.web", "web", &configs, None)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn refusals_say_what_happened() {
        let pool = pool(2, 3, Some("150ms"));
        let full = pool.refusal(Refusal::Full);
        assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(full.headers()["x-trellis-error"], "bulkhead-full");
        let expired = pool.refusal(Refusal::WaitedTooLong);
        assert_eq!(expired.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(expired.headers()["x-trellis-error"], "bulkhead-full");
        let late = pool.refusal(Refusal::Deadline);
        assert_eq!(late.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(late.headers()["x-trellis-error"], "timeout");
    }
}
