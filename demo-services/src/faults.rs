//! The fault knobs chaos is shown with: a share of requests answered 500 and a delay
//! added to every request. Set by flags, read and changed at `/admin/faults`.

use std::time::Duration;

use parking_lot::RwLock;
use serde::Serialize;

use crate::input::{Fields, InputError};

/// A minute: longer would only hold connections (and the demo) hostage.
pub const MAX_LATENCY_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultSettings {
    /// Share of requests answered 500, 0 to 1.
    pub error_rate: f64,
    /// Added to every request before it is handled.
    pub latency_ms: u64,
}

impl FaultSettings {
    pub fn check_error_rate(rate: f64) -> Result<(), String> {
        if (0.0..=1.0).contains(&rate) {
            Ok(())
        } else {
            Err(format!("must be from 0 to 1, got {rate}"))
        }
    }

    pub fn check_latency_ms(ms: u64) -> Result<(), String> {
        if ms <= MAX_LATENCY_MS {
            Ok(())
        } else {
            Err(format!("must be at most {MAX_LATENCY_MS}, got {ms}"))
        }
    }

    /// These settings changed by a `PUT /admin/faults` body: a field left out keeps its
    /// value; an unknown or invalid field refuses the whole update.
    pub fn updated(self, body: Fields<'_>) -> Result<Self, InputError> {
        body.only(&["errorRate", "latencyMs"])?;
        let error_rate = body.optional_number("errorRate", 0.0..=1.0)?;
        let latency_ms = body.optional_whole("latencyMs", 0..=MAX_LATENCY_MS)?;
        Ok(Self {
            error_rate: error_rate.unwrap_or(self.error_rate),
            latency_ms: latency_ms.unwrap_or(self.latency_ms),
        })
    }
}

/// What the knobs decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub delay: Duration,
    pub fail: bool,
}

/// The knobs in force, shared by the request path and the admin endpoint.
#[derive(Debug)]
pub struct Faults {
    settings: RwLock<FaultSettings>,
}

impl Faults {
    pub fn new(settings: FaultSettings) -> Self {
        Self {
            settings: RwLock::new(settings),
        }
    }

    pub fn get(&self) -> FaultSettings {
        *self.settings.read()
    }

    pub fn set(&self, settings: FaultSettings) {
        *self.settings.write() = settings;
    }

    /// Changes the settings with `change`, atomically: two partial updates at once
    /// both take effect.
    pub fn update<E>(
        &self,
        change: impl FnOnce(FaultSettings) -> Result<FaultSettings, E>,
    ) -> Result<FaultSettings, E> {
        let mut settings = self.settings.write();
        *settings = change(*settings)?;
        Ok(*settings)
    }

    pub fn draw(&self) -> Verdict {
        let settings = self.get();
        Verdict {
            delay: Duration::from_millis(settings.latency_ms),
            // `f64()` is below 1, so a rate of 1 fails every request and 0 none.
            fail: fastrand::f64() < settings.error_rate,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::input::object;

    const NONE: FaultSettings = FaultSettings {
        error_rate: 0.0,
        latency_ms: 0,
    };

    fn update(body: serde_json::Value) -> Result<FaultSettings, InputError> {
        NONE.updated(object(&body).unwrap())
    }

    #[test]
    fn an_update_changes_only_the_fields_it_names() {
        let both = update(json!({"errorRate": 0.2, "latencyMs": 50})).unwrap();
        assert_eq!(
            both,
            FaultSettings {
                error_rate: 0.2,
                latency_ms: 50
            }
        );
        let latency_only = both.updated(object(&json!({"latencyMs": 0})).unwrap());
        assert_eq!(latency_only.unwrap().error_rate, 0.2);
    }

    #[test]
    fn bad_knobs_are_refused_by_name() {
        let field = |body| update(body).unwrap_err().field;
        assert_eq!(field(json!({"errorRate": 1.5})), "errorRate");
        assert_eq!(field(json!({"errorRate": -0.1})), "errorRate");
        assert_eq!(field(json!({"errorRate": "0.5"})), "errorRate");
        assert_eq!(field(json!({"latencyMs": -1})), "latencyMs");
        assert_eq!(field(json!({"latencyMs": 2.5})), "latencyMs");
        assert_eq!(field(json!({"latencyMs": 60_001})), "latencyMs");
        assert_eq!(field(json!({"errorrate": 0.5})), "errorrate");
        assert!(FaultSettings::check_error_rate(f64::NAN).is_err());
    }

    #[test]
    fn the_extremes_fail_all_or_nothing() {
        let faults = Faults::new(NONE);
        assert!((0..200).all(|_| !faults.draw().fail));
        faults.set(FaultSettings {
            error_rate: 1.0,
            latency_ms: 7,
        });
        assert!((0..200).all(|_| faults.draw().fail));
        assert_eq!(faults.draw().delay, Duration::from_millis(7));
    }
}
