//! Traffic reports: every `--report-interval` the ledger of what the outbound side did
//! (`traffic::global()`) is drained and sent as `Discovery.Report` on the connection
//! the Discovery stream holds open, for canary analysis and `trellisctl stat`.
//!
//! The ledger is drained on every tick whether or not the send works, so each report
//! covers the time since the previous tick. A window that cannot be sent (no stream
//! to the control plane, a refusal, no answer within the call timeout) is dropped
//! and counted in `trellis_reports_failed_total`: the counts are deltas for a moving
//! analysis, and holding them back would fold minutes of traffic into one late
//! window. Empty windows are not sent. On shutdown the ledger is drained once more
//! and that last window sent with a 1 s deadline. The data path only ever touches
//! the ledger's lock, for one map lookup; it never waits for a report.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use tokio::{
    sync::watch,
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use trellis_api::{
    MAX_REPORT_WINDOW_MS,
    discovery::v1::{ReportRequest, RouteStats, ShadowStats, discovery_client::DiscoveryClient},
};

use super::{CALL_TIMEOUT, ControlError};
use crate::traffic;

pub const REPORTS_FAILED: &str = "trellis_reports_failed_total";

const RPC: &str = "Discovery.Report";

/// How long the last window, on shutdown, may take to send.
const LAST_REPORT_DEADLINE: Duration = Duration::from_secs(1);

/// The control plane refuses Discovery messages over 1 MiB; a window with more in it
/// goes as several reports of the same window, each at most this large.
const MAX_REPORT_BYTES: usize = 512 * 1024;

/// Sends the ledger's windows while the proxy runs.
#[derive(Debug)]
pub(crate) struct Reporter {
    pub(crate) service: String,
    pub(crate) namespace: String,
    pub(crate) instance: String,
    pub(crate) interval: Duration,
    /// The Discovery stream's channel while the stream is open.
    pub(crate) channel: watch::Receiver<Option<Channel>>,
}

#[derive(Debug, thiserror::Error)]
enum ReportError {
    #[error("not connected to the control plane")]
    NotConnected,
    #[error(transparent)]
    Control(#[from] ControlError),
}

// === impl Reporter ===

impl Reporter {
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        metrics::describe_counter!(
            REPORTS_FAILED,
            "Traffic report windows that could not be sent to the control plane and were dropped"
        );
        let period = self.interval;
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut window = WindowStart::now();
        let mut failing = false;
        // Kept rather than read at each send: on shutdown the subscriber clears the
        // watch as it closes its stream, and the last window still goes out on the
        // connection, which lives while a clone of its channel does.
        let mut channel = self.channel.borrow_and_update().clone();
        let mut watching = true;
        loop {
            tokio::select! {
                // Shutdown before a channel change: the subscriber's `None` on its way
                // out must not cost the last window its connection.
                biased;
                () = shutdown.cancelled() => break,
                changed = self.channel.changed(), if watching => {
                    match changed {
                        Ok(()) => channel = self.channel.borrow_and_update().clone(),
                        // The subscriber is gone: nothing will change the channel again.
                        Err(_) => watching = false,
                    }
                    continue;
                }
                _ = ticks.tick() => {}
            }
            let Some(reports) = self.take(&mut window) else {
                continue;
            };
            let send = self.send(channel.clone(), reports);
            tokio::pin!(send);
            let sent = tokio::select! {
                biased;
                sent = &mut send => sent,
                // A window on its way is let finish, briefly, rather than thrown away.
                () = shutdown.cancelled() => {
                    match tokio::time::timeout(LAST_REPORT_DEADLINE, send).await {
                        Ok(sent) => sent,
                        Err(_) => Err(ControlError::Timeout(RPC).into()),
                    }
                }
            };
            match sent {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("traffic reports reach the control plane again");
                }
                Ok(()) => {}
                Err(error) => {
                    metrics::counter!(REPORTS_FAILED).increment(1);
                    // Once per streak: a control plane that is away fails every tick.
                    if !failing {
                        failing = true;
                        tracing::warn!(
                            %error,
                            "sending a traffic report failed; its window is dropped, and \
                             later failures are only counted until one succeeds"
                        );
                    }
                }
            }
        }
        // What was counted since the last tick would be lost with the process: one
        // more window, given a short while so shutdown is not held up by it.
        let Some(reports) = self.take(&mut window) else {
            return;
        };
        let sent =
            match tokio::time::timeout(LAST_REPORT_DEADLINE, self.send(channel, reports)).await {
                Ok(sent) => sent,
                Err(_) => Err(ControlError::Timeout(RPC).into()),
            };
        match sent {
            Ok(()) => tracing::debug!("the last traffic window was sent"),
            Err(error) => {
                metrics::counter!(REPORTS_FAILED).increment(1);
                tracing::warn!(%error, "the last traffic window could not be sent on shutdown");
            }
        }
    }

    /// Drains the ledger: the window since `start` as reports, and a new window
    /// starting now; `None` when nothing was counted.
    fn take(&self, start: &mut WindowStart) -> Option<Vec<ReportRequest>> {
        let (routes, shadows) = traffic::global().take();
        let began = std::mem::replace(start, WindowStart::now());
        if routes.is_empty() && shadows.is_empty() {
            return None;
        }
        let length = began.monotonic.elapsed();
        Some(self.reports(began.wall, length, routes, shadows))
    }

    /// The window of `length` from `start` as reports of at most `MAX_REPORT_BYTES`
    /// each.
    fn reports(
        &self,
        start: SystemTime,
        length: Duration,
        routes: Vec<RouteStats>,
        shadows: Vec<ShadowStats>,
    ) -> Vec<ReportRequest> {
        let empty = ReportRequest {
            service: self.service.clone(),
            namespace: self.namespace.clone(),
            instance: self.instance.clone(),
            window_start_unix_ms: unix_ms(start),
            window_ms: window_ms(length),
            routes: Vec::new(),
            shadows: Vec::new(),
        };
        split(empty, routes, shadows, MAX_REPORT_BYTES)
    }

    /// Sends the pieces in order on `channel`; the first failure ends the window.
    async fn send(
        &self,
        channel: Option<Channel>,
        reports: Vec<ReportRequest>,
    ) -> Result<(), ReportError> {
        let mut client = DiscoveryClient::new(channel.ok_or(ReportError::NotConnected)?);
        for report in reports {
            tokio::time::timeout(CALL_TIMEOUT, client.report(report))
                .await
                .map_err(|_| ControlError::Timeout(RPC))?
                .map_err(|status| ControlError::status(RPC, status))?;
        }
        Ok(())
    }
}

/// When a window began: by the wall clock for the report, and by the monotonic one
/// for its length, which a clock step must not make zero or huge.
#[derive(Debug, Clone, Copy)]
struct WindowStart {
    wall: SystemTime,
    monotonic: Instant,
}

impl WindowStart {
    fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            monotonic: Instant::now(),
        }
    }
}

/// A window's length as the control plane accepts it: at least 1 ms, at most an hour
/// (a longer window, after a suspended machine, is reported as the last hour's).
fn window_ms(length: Duration) -> u32 {
    let ms = u32::try_from(length.as_millis()).unwrap_or(u32::MAX);
    ms.clamp(1, MAX_REPORT_WINDOW_MS)
}

/// `empty` (the header) filled with the entries, as few reports as fit `max_bytes`
/// each; an entry larger than that alone goes alone.
fn split(
    empty: ReportRequest,
    routes: Vec<RouteStats>,
    shadows: Vec<ShadowStats>,
    max_bytes: usize,
) -> Vec<ReportRequest> {
    // A repeated field's tag and length prefix: a few bytes per entry at most.
    const ENTRY_OVERHEAD: usize = 6;
    let header = empty.encoded_len();
    let mut reports = Vec::new();
    let mut current = empty.clone();
    let mut size = header;
    let mut flush = |current: &mut ReportRequest, size: &mut usize, needed: usize| {
        let has_entries = !current.routes.is_empty() || !current.shadows.is_empty();
        if has_entries && *size + needed > max_bytes {
            reports.push(std::mem::replace(current, empty.clone()));
            *size = header;
        }
        *size += needed;
    };
    for route in routes {
        flush(
            &mut current,
            &mut size,
            route.encoded_len() + ENTRY_OVERHEAD,
        );
        current.routes.push(route);
    }
    for shadow in shadows {
        flush(
            &mut current,
            &mut size,
            shadow.encoded_len() + ENTRY_OVERHEAD,
        );
        current.shadows.push(shadow);
    }
    reports.push(current);
    reports
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(i: usize) -> RouteStats {
        RouteStats {
            destination: format!("service-{i}"),
            route: "default".into(),
            backend: "v1".into(),
            requests: 10,
            successes: 10,
            latency_bounds_seconds: traffic::LATENCY_BOUNDS_SECONDS.to_vec(),
            latency_bucket_counts: vec![10; traffic::LATENCY_BOUNDS_SECONDS.len()],
        }
    }

    fn shadow(i: usize) -> ShadowStats {
        ShadowStats {
            destination: format!("service-{i}"),
            route: "default".into(),
            shadow: "v2".into(),
            mirrored: 1,
            ..ShadowStats::default()
        }
    }

    fn header() -> ReportRequest {
        ReportRequest {
            service: "web".into(),
            namespace: "shop".into(),
            instance: "web-1".into(),
            window_start_unix_ms: 1_700_000_000_000,
            window_ms: 10_000,
            ..ReportRequest::default()
        }
    }

    #[test]
    fn a_small_window_is_one_report() {
        let reports = split(
            header(),
            vec![route(0), route(1)],
            vec![shadow(0)],
            1024 * 1024,
        );
        let [report] = &reports[..] else {
            panic!("one report expected: {reports:?}")
        };
        assert_eq!((report.routes.len(), report.shadows.len()), (2, 1));
        assert_eq!(report.instance, "web-1");
        assert_eq!(report.window_ms, 10_000);
    }

    #[test]
    fn a_large_window_is_split_into_reports_under_the_limit_losing_nothing() {
        let max = 4096;
        let reports = split(
            header(),
            (0..200).map(route).collect(),
            (0..100).map(shadow).collect(),
            max,
        );
        assert!(reports.len() > 5, "{}", reports.len());
        for report in &reports {
            assert!(report.encoded_len() <= max, "{}", report.encoded_len());
            assert_eq!(report.window_start_unix_ms, 1_700_000_000_000);
            assert_eq!(report.service, "web");
        }
        let destinations: Vec<_> = reports
            .iter()
            .flat_map(|r| &r.routes)
            .map(|r| r.destination.clone())
            .collect();
        assert_eq!(
            destinations,
            (0..200).map(|i| format!("service-{i}")).collect::<Vec<_>>()
        );
        let shadows: usize = reports.iter().map(|r| r.shadows.len()).sum();
        assert_eq!(shadows, 100);
    }

    #[test]
    fn an_entry_larger_than_the_limit_goes_alone() {
        let mut big = route(1);
        big.destination = "x".repeat(5000);
        let reports = split(header(), vec![route(0), big, route(2)], vec![], 4096);
        let sizes: Vec<_> = reports.iter().map(|r| r.routes.len()).collect();
        assert_eq!(sizes, [1, 1, 1]);
    }

    #[test]
    fn window_lengths_are_kept_within_what_the_control_plane_accepts() {
        assert_eq!(window_ms(Duration::from_micros(10)), 1);
        assert_eq!(window_ms(Duration::from_millis(10_500)), 10_500);
        assert_eq!(
            window_ms(Duration::from_secs(3 * 3600)),
            MAX_REPORT_WINDOW_MS
        );
    }

    #[tokio::test]
    async fn without_a_stream_to_the_control_plane_a_window_fails_at_once() {
        let (_tx, channel) = watch::channel(None);
        let reporter = Reporter {
            service: "web".into(),
            namespace: "shop".into(),
            instance: "web-1".into(),
            interval: Duration::from_secs(10),
            channel,
        };
        let reports = reporter.reports(
            UNIX_EPOCH + Duration::from_secs(100),
            Duration::from_millis(10_500),
            vec![route(0)],
            vec![],
        );
        assert_eq!(reports[0].window_start_unix_ms, 100_000);
        assert_eq!(reports[0].window_ms, 10_500);
        let error = reporter.send(None, reports).await.unwrap_err();
        assert!(matches!(error, ReportError::NotConnected), "{error}");
    }
}
