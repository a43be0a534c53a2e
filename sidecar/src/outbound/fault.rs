//! Fault injection: a route may delay a share of its requests before sending them, and
//! answer a share itself with an error status without contacting the service, to
//! rehearse a slow or failing dependency. Each is drawn per request, independently.

use std::time::Duration;

use http::{Response, StatusCode};
use tokio::time::Instant;
use trellis_api::config::{FaultAbortConfig, FaultConfig, FaultDelayConfig};

use super::destinations::CompileError;
use crate::http::{ProxyBody, mesh_error};

pub const INJECTED: &str = "trellis_faults_injected_total";

/// A route's faults, compiled.
#[derive(Debug)]
pub struct Fault {
    route: String,
    delay: Option<Delay>,
    abort: Option<Abort>,
}

#[derive(Debug)]
struct Delay {
    duration: Duration,
    share: Share,
    injected: metrics::Counter,
}

#[derive(Debug)]
struct Abort {
    status: StatusCode,
    share: Share,
    injected: metrics::Counter,
}

/// A percentage, drawn against per request.
#[derive(Debug, Clone, Copy)]
struct Share(f64);

// === impl Fault ===

impl Fault {
    /// Compiles the `fault` of the route at `at` (`services.web.routes[1]`), named
    /// `route`, of `service`.
    pub fn compile(
        at: &str,
        service: &str,
        route: &str,
        config: &FaultConfig,
    ) -> Result<Self, CompileError> {
        let at = format!("{at}.fault");
        let FaultConfig { delay, abort } = config;
        if delay.is_none() && abort.is_none() {
            return Err(CompileError::invalid(
                at,
                "give at least one of delay and abort",
            ));
        }
        let counter = |kind: &'static str| {
            let counter =
                metrics::counter!(INJECTED, "service" => service.to_string(), "kind" => kind);
            // Shown as 0 until the first injection, so a dashboard sees the fault is armed.
            counter.increment(0);
            counter
        };
        let delay = delay
            .as_ref()
            .map(|config| {
                let FaultDelayConfig { duration, percent } = config;
                let field = || format!("{at}.delay.duration");
                let duration = match trellis_api::duration::parse(duration) {
                    Ok(d) if d.is_zero() => {
                        return Err(CompileError::invalid(field(), "must be longer than zero"));
                    }
                    Ok(d) => d,
                    Err(e) => return Err(CompileError::invalid(field(), e.to_string())),
                };
                Ok(Delay {
                    duration,
                    share: Share::compile(&format!("{at}.delay.percent"), *percent)?,
                    injected: counter("delay"),
                })
            })
            .transpose()?;
        let abort = abort
            .as_ref()
            .map(|config| {
                let FaultAbortConfig { status, percent } = config;
                // An answer in place of the service's is an error; 1xx-3xx would
                // not even be a final answer or would send the client elsewhere.
                let status = StatusCode::from_u16(*status)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .ok_or_else(|| {
                        CompileError::invalid(
                            format!("{at}.abort.status"),
                            format!("must be between 400 and 599, not {status}"),
                        )
                    })?;
                Ok(Abort {
                    status,
                    share: Share::compile(&format!("{at}.abort.percent"), *percent)?,
                    injected: counter("abort"),
                })
            })
            .transpose()?;
        Ok(Self {
            route: route.to_string(),
            delay,
            abort,
        })
    }

    /// Applies the faults drawn for one request: waits out a delay, then answers in
    /// the service's place when an abort is drawn. A delay that outlasts `deadline`
    /// (the route's) ends there, with the mesh's 504. `None`: send the request on.
    pub async fn inject(
        &self,
        service: &str,
        deadline: Option<Instant>,
    ) -> Option<Response<ProxyBody>> {
        if let Some(delay) = &self.delay
            && delay.share.draw()
        {
            delay.injected.increment(1);
            let until = Instant::now() + delay.duration;
            match deadline {
                Some(deadline) if deadline < until => {
                    tokio::time::sleep_until(deadline).await;
                    return Some(mesh_error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout",
                        format!(
                            "the timeout of route {:?} of service {service:?} passed during an \
                             injected delay of {:?}",
                            self.route, delay.duration
                        ),
                    ));
                }
                _ => tokio::time::sleep_until(until).await,
            }
        }
        if let Some(abort) = &self.abort
            && abort.share.draw()
        {
            abort.injected.increment(1);
            return Some(mesh_error(
                abort.status,
                "fault",
                format!(
                    "fault injected by route {:?} of service {service:?}: abort with {}",
                    self.route,
                    abort.status.as_u16()
                ),
            ));
        }
        None
    }
}

// === impl Share ===

impl Share {
    fn compile(at: &str, percent: f64) -> Result<Self, CompileError> {
        if !(0.0..=100.0).contains(&percent) {
            return Err(CompileError::invalid(
                at,
                format!("must be between 0 and 100, not {percent}"),
            ));
        }
        Ok(Self(percent))
    }

    /// Whether this request is in the share; 100 always is, 0 never.
    fn draw(self) -> bool {
        fastrand::f64() * 100.0 < self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(delay: Option<(&str, f64)>, abort: Option<(u16, f64)>) -> Result<Fault, CompileError> {
        let config = FaultConfig {
            delay: delay.map(|(duration, percent)| FaultDelayConfig {
                duration: duration.into(),
                percent,
            }),
            abort: abort.map(|(status, percent)| FaultAbortConfig { status, percent }),
        };
        Fault::compile("services.web.routes[1]", "web", "r", &config)
    }

    #[test]
    fn bad_faults_are_named_by_their_field_path() {
        let cases = [
            (
                fault(None, None),
                "services.web.routes[1].fault: give at least one of delay and abort",
            ),
            (
                fault(Some(("soon", 10.0)), None),
                "services.web.routes[1].fault.delay.duration: invalid duration \"soon\"",
            ),
            (
                fault(Some(("0ms", 10.0)), None),
                "services.web.routes[1].fault.delay.duration: must be longer than zero",
            ),
            (
                fault(Some(("1s", 100.5)), None),
                "services.web.routes[1].fault.delay.percent: must be between 0 and 100, not 100.5",
            ),
            (
                fault(None, Some((503, -1.0))),
                "services.web.routes[1].fault.abort.percent: must be between 0 and 100, not -1",
            ),
            (
                fault(None, Some((503, f64::NAN))),
                "services.web.routes[1].fault.abort.percent: must be between 0 and 100, not NaN",
            ),
            (
                fault(None, Some((200, 5.0))),
                "services.web.routes[1].fault.abort.status: must be between 400 and 599, not 200",
            ),
            (
                fault(None, Some((1000, 5.0))),
                "services.web.routes[1].fault.abort.status: must be between 400 and 599, not 1000",
            ),
        ];
        for (result, want) in cases {
            let e = result.unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn shares_follow_the_percentage() {
        let share = Share::compile("p", 30.0).unwrap();
        let hits = (0..10_000).filter(|_| share.draw()).count();
        // 3000 expected, standard deviation about 46: four of them either side.
        assert!((2816..=3184).contains(&hits), "{hits}");
        let always = Share::compile("p", 100.0).unwrap();
        assert!((0..1000).all(|_| always.draw()));
        let never = Share::compile("p", 0.0).unwrap();
        assert!(!(0..1000).any(|_| never.draw()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_waits_then_sends_and_an_abort_answers() {
        let delayed = fault(Some(("200ms", 100.0)), None).unwrap();
        let before = Instant::now();
        assert!(delayed.inject("web", None).await.is_none(), "sent on");
        assert_eq!(before.elapsed(), Duration::from_millis(200));

        let aborted = fault(None, Some((418, 100.0))).unwrap();
        let answer = aborted.inject("web", None).await.unwrap();
        assert_eq!(answer.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(answer.headers()["x-trellis-error"], "fault");

        // Both: the delay first, then the abort.
        let both = fault(Some(("1s", 100.0)), Some((503, 100.0))).unwrap();
        let before = Instant::now();
        let answer = both.inject("web", None).await.unwrap();
        assert_eq!(before.elapsed(), Duration::from_secs(1));
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_longer_than_the_route_timeout_ends_in_a_504_at_the_deadline() {
        let delayed = fault(Some(("5s", 100.0)), Some((503, 100.0))).unwrap();
        let before = Instant::now();
        let answer = delayed
            .inject("web", Some(before + Duration::from_millis(300)))
            .await
            .unwrap();
        assert_eq!(before.elapsed(), Duration::from_millis(300));
        assert_eq!(answer.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(answer.headers()["x-trellis-error"], "timeout");
    }
}
