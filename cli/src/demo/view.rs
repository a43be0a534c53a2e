//! The demo's live view, its narration and its summary, as text.

use std::{fmt::Write, net::SocketAddr, time::Duration};

use serde_json::Value;

use super::{
    SERVICES,
    load::{Answer, Tally},
    observe::Observation,
};
use crate::table::Table;

/// What happened, in order, with when (since the traffic started).
#[derive(Debug, Default)]
pub struct Story {
    lines: Vec<(Duration, String)>,
}

impl Story {
    pub fn tell(&mut self, at: Duration, what: String) {
        self.lines.push((at, what));
    }

    /// Tells what changed between two observations: the canary's steps, endpoints
    /// ejected and restored.
    pub fn notice(&mut self, at: Duration, before: &Observation, now: &Observation) {
        if let (Some(was), Some(is)) = (&before.canary, &now.canary)
            && (was.phase != is.phase || was.weight != is.weight)
        {
            self.tell(
                at,
                format!(
                    "canary recommendations v2: {} {}% → {} {}% ({})",
                    was.phase, was.weight, is.phase, is.weight, is.message
                ),
            );
        }
        // A sidecar that could not be read says nothing about its breakers.
        if !(before.complete && now.complete) {
            return;
        }
        for ejected in now.ejected.iter().filter(|e| !before.ejected.contains(e)) {
            self.tell(
                at,
                format!("breaker open: {ejected} ejected, callers get 503 circuit-open at once"),
            );
        }
        for back in before.ejected.iter().filter(|e| !now.ejected.contains(e)) {
            self.tell(at, format!("breaker closed: {back} back in rotation"));
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines
            .iter()
            .map(|(at, what)| format!("{} {what}", clock(*at)))
            .collect()
    }
}

/// What one refresh of the live view shows.
#[derive(Debug)]
pub struct Frame<'a> {
    pub at: Duration,
    pub gateway: SocketAddr,
    /// The control plane's web dashboard URL.
    pub dashboard: &'a str,
    pub observation: &'a Observation,
    /// Every answer customers got so far; the view shows the last 10 s.
    pub recent: &'a [Answer],
    pub story: &'a Story,
}

pub fn frame(frame: &Frame<'_>) -> String {
    let Frame {
        at,
        gateway,
        dashboard,
        observation,
        recent,
        story,
    } = frame;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Trellis marketplace demo  {}  customers enter at http://{gateway}  (Ctrl-C stops everything)\n\
         dashboard: {dashboard}\n",
        clock(*at)
    );
    let mut table = Table::new(vec!["SERVICE", "RPS", "SUCCESS", "P99"]);
    for service in SERVICES {
        let row = observation
            .services
            .get(service)
            .cloned()
            .unwrap_or_default();
        table.push(vec![
            service.to_string(),
            format!("{:.1}", row.rps),
            row.success_rate()
                .map_or_else(|| "-".into(), |r| format!("{r:.1}%")),
            row.p99_ms
                .map_or_else(|| "-".into(), |p| format!("{p:.0} ms")),
        ]);
    }
    out.push_str(&table.render());
    let since = at.saturating_sub(Duration::from_secs(10));
    let last = Tally::of(recent.iter().filter(|a| a.at >= since));
    let window = at.as_secs_f64().clamp(1.0, 10.0);
    let declined = recent
        .iter()
        .filter(|a| a.at >= since && a.status == Some(402))
        .count();
    let _ = writeln!(
        out,
        "\ncustomers (last 10 s): {:.1} req/s, {:.1}% served, p50 {:.0} ms, p99 {:.0} ms, {declined} checkouts declined",
        last.requests as f64 / window,
        last.success_rate(),
        last.p50.as_secs_f64() * 1e3,
        last.p99.as_secs_f64() * 1e3,
    );
    match &observation.canary {
        Some(c) => {
            let _ = writeln!(
                out,
                "canary recommendations v2: {} at {}%  {}",
                c.phase, c.weight, c.message
            );
        }
        None => out.push_str("canary recommendations v2: -\n"),
    }
    let s = &observation.shadow;
    let _ = writeln!(
        out,
        "shadow payment v2: {} copies, {} compared: {} match, {} body differs, {} status differs, {} errors, {} dropped",
        s.mirrored,
        s.compared(),
        s.matched,
        s.body_mismatches,
        s.status_mismatches,
        s.shadow_errors,
        s.dropped
    );
    let ejected = if observation.ejected.is_empty() {
        "none".to_string()
    } else {
        observation.ejected.join(", ")
    };
    let _ = writeln!(
        out,
        "breakers: ejected now: {ejected} ({} ejections so far); bulkheads: {} rejected",
        observation.ejections, observation.bulkhead_rejections
    );
    out.push_str("\nwhat happened:\n");
    let lines = story.lines();
    for line in &lines[lines.len().saturating_sub(12)..] {
        let _ = writeln!(out, "  {line}");
    }
    out
}

/// The summary `--duration` prints.
pub fn summary_text(summary: &Value) -> String {
    let mut out = String::new();
    let g = &summary["gateway"];
    let _ = writeln!(
        out,
        "customers: {} requests, {:.2}% served ({:.2}% outside the injected failure), p50 {} ms, p99 {} ms, {} checkouts declined",
        g["requests"],
        num(&g["successRate"]),
        num(&g["successRateOutsideFailure"]),
        g["p50Ms"],
        g["p99Ms"],
        g["checkoutsDeclined"]
    );
    let mut table = Table::new(vec!["SERVICE", "REQUESTS", "SUCCESS", "P99"]);
    for service in SERVICES {
        let row = &summary["services"][service];
        table.push(vec![
            service.to_string(),
            row["requests"].as_u64().unwrap_or(0).to_string(),
            row["successRate"]
                .as_f64()
                .map_or_else(|| "-".into(), |r| format!("{r:.1}%")),
            row["p99Ms"]
                .as_f64()
                .map_or_else(|| "-".into(), |p| format!("{p:.0} ms")),
        ]);
    }
    out.push('\n');
    out.push_str(&table.render());
    let c = &summary["canary"];
    let s = &summary["shadow"];
    let _ = writeln!(
        out,
        "\ncanary: {} at {}%\nshadow: {} copies, {} matched, {} body mismatches, {} status mismatches, {} errors\nbreaker ejections: {}; bulkhead rejections: {}\n\nwhat happened:",
        c["phase"].as_str().unwrap_or("-"),
        c["weight"],
        s["mirrored"],
        s["matched"],
        s["bodyMismatches"],
        s["statusMismatches"],
        s["shadowErrors"],
        summary["breaker"]["ejections"],
        summary["bulkheadRejections"],
    );
    for line in summary["story"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  {}", line.as_str().unwrap_or_default());
    }
    out.push_str("\nexpected:\n");
    for e in summary["expectations"].as_array().into_iter().flatten() {
        let mark = if e["ok"] == true { "ok  " } else { "FAIL" };
        let _ = writeln!(
            out,
            "  {mark} {}: {}",
            e["what"].as_str().unwrap_or_default(),
            e["detail"].as_str().unwrap_or_default()
        );
    }
    out
}

fn num(value: &Value) -> f64 {
    value.as_f64().unwrap_or(0.0)
}

/// `m:ss`.
fn clock(at: Duration) -> String {
    let s = at.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::observe::CanaryRow;

    #[test]
    fn the_story_notices_canary_steps_and_breakers() {
        let mut story = Story::default();
        let before = Observation {
            complete: true,
            canary: Some(CanaryRow {
                phase: "Progressing".into(),
                weight: 10,
                message: String::new(),
            }),
            ..Observation::default()
        };
        let mut now = before.clone();
        if let Some(c) = now.canary.as_mut() {
            c.weight = 25;
        }
        now.ejected = vec!["payment 127.0.0.1:9".into()];
        story.notice(Duration::from_secs(75), &before, &now);
        story.notice(Duration::from_secs(80), &now, &before);
        let lines = story.lines();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(
            lines[0]
                .starts_with("1:15 canary recommendations v2: Progressing 10% → Progressing 25%")
        );
        assert!(lines[1].contains("breaker open: payment 127.0.0.1:9"));
        assert!(lines[3].starts_with("1:20 breaker closed: payment 127.0.0.1:9"));
    }
}
