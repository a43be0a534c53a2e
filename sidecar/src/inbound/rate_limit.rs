//! Local rate limiting of the requests this sidecar lets through to its app
//! (`DestinationPolicy.rateLimit`): a token bucket refilled at `requestsPerSecond` and
//! holding at most `burst`, one for all callers or one per caller identity. Each
//! sidecar counts for itself, so N replicas admit N times the rate.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use trellis_api::config::RateLimitConfig;
use trellis_ca::SpiffeId;

pub const LIMITED: &str = "trellis_rate_limited_total";

/// Per-source buckets kept at most; past it, buckets that are full again (callers
/// that went quiet) are dropped first, then all, so memory stays bounded.
const MAX_SOURCES: usize = 10_000;

#[derive(Debug, Default)]
pub struct RateLimiter {
    /// The config the buckets were made for; a different one starts them afresh.
    state: Mutex<Option<State>>,
}

#[derive(Debug)]
struct State {
    config: RateLimitConfig,
    shared: Bucket,
    by_source: HashMap<String, Bucket>,
}

/// Tokens are counted in billionths, so a nanosecond of refill at one request per
/// second is exactly one unit and no rounding drifts over time.
const TOKEN: u128 = 1_000_000_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    units: u128,
    refilled: Instant,
}

impl Bucket {
    fn full(config: &RateLimitConfig, now: Instant) -> Self {
        Self {
            units: u128::from(config.burst.max(1)) * TOKEN,
            refilled: now,
        }
    }

    fn refill(&self, config: &RateLimitConfig, now: Instant) -> u128 {
        let elapsed = now.saturating_duration_since(self.refilled).as_nanos();
        let rate = u128::from(config.requests_per_second.max(1));
        let cap = u128::from(config.burst.max(1)) * TOKEN;
        self.units
            .saturating_add(elapsed.saturating_mul(rate))
            .min(cap)
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, config: &RateLimitConfig, now: Instant) -> Result<(), Duration> {
        self.units = self.refill(config, now);
        self.refilled = now;
        if self.units >= TOKEN {
            self.units -= TOKEN;
            return Ok(());
        }
        let rate = u128::from(config.requests_per_second.max(1));
        let nanos = (TOKEN - self.units).div_ceil(rate);
        Err(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }

    fn is_full(&self, config: &RateLimitConfig, now: Instant) -> bool {
        self.refill(config, now) >= u128::from(config.burst.max(1)) * TOKEN
    }
}

impl RateLimiter {
    /// Admits one request of `caller` under `config` (none: no limit), or says when to
    /// come back.
    pub fn admit(
        &self,
        config: Option<&RateLimitConfig>,
        caller: Option<&SpiffeId>,
        now: Instant,
    ) -> Result<(), Duration> {
        // Callers without an identity (plaintext, PERMISSIVE mode) share one bucket.
        self.admit_source(config, caller.map_or("", SpiffeId::as_str), now)
    }

    /// `admit` for a caller known by `source`: its SPIFFE id, or at the gateway its
    /// client address; with `perSource` each source gets its own bucket.
    pub fn admit_source(
        &self,
        config: Option<&RateLimitConfig>,
        source: &str,
        now: Instant,
    ) -> Result<(), Duration> {
        let Some(config) = config else {
            return Ok(());
        };
        // A short section without awaits: refill and take one token.
        let mut state = self.state.lock();
        let state = match &mut *state {
            Some(state) if state.config == *config => state,
            slot => slot.insert(State {
                config: config.clone(),
                shared: Bucket::full(config, now),
                by_source: HashMap::new(),
            }),
        };
        if !config.per_source {
            return state.shared.take(config, now);
        }
        let key = source;
        if let Some(bucket) = state.by_source.get_mut(key) {
            return bucket.take(config, now);
        }
        if state.by_source.len() >= MAX_SOURCES {
            state.by_source.retain(|_, b| !b.is_full(config, now));
            if state.by_source.len() >= MAX_SOURCES {
                state.by_source.clear();
            }
        }
        let mut bucket = Bucket::full(config, now);
        let taken = bucket.take(config, now);
        state.by_source.insert(key.to_string(), bucket);
        taken
    }
}

/// `retry-after` in whole seconds, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0 || wait.is_zero())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limit(rps: u32, burst: u32, per_source: bool) -> RateLimitConfig {
        RateLimitConfig {
            requests_per_second: rps,
            burst,
            per_source,
        }
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let limiter = RateLimiter::default();
        let config = limit(10, 5, false);
        let start = Instant::now();
        let admitted = (0..20)
            .filter(|_| limiter.admit(Some(&config), None, start).is_ok())
            .count();
        assert_eq!(admitted, 5, "the burst");
        let wait = limiter.admit(Some(&config), None, start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // Over the next second, one request every 10 ms: ten tokens come back.
        let admitted = (1..=100)
            .filter(|i| {
                let now = start + Duration::from_millis(10 * i);
                limiter.admit(Some(&config), None, now).is_ok()
            })
            .count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn per_source_buckets_are_independent_and_a_new_config_starts_afresh() {
        let limiter = RateLimiter::default();
        let config = limit(1, 2, true);
        let now = Instant::now();
        let a = SpiffeId::parse("spiffe://td/ns/default/sa/a").unwrap();
        let b = SpiffeId::parse("spiffe://td/ns/default/sa/b").unwrap();
        for _ in 0..2 {
            assert!(limiter.admit(Some(&config), Some(&a), now).is_ok());
        }
        assert!(limiter.admit(Some(&config), Some(&a), now).is_err());
        assert!(limiter.admit(Some(&config), Some(&b), now).is_ok());
        let raised = limit(1, 5, true);
        assert!(limiter.admit(Some(&raised), Some(&a), now).is_ok());
        assert!(
            limiter.admit(None, Some(&a), now).is_ok(),
            "no limit configured"
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::from_millis(100)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2100)), 3);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
    }
}
