//! `trellisctl check`: is the mesh healthy? Each check is one line, `✔` or `✘` and
//! what was found, so a failure says what to look at.

use serde_json::Value;

use crate::views::{age, text};

/// Certificates that expire sooner than this fail the check: a week leaves time to
/// rotate them.
pub const EXPIRY_MARGIN_SECONDS: i64 = 7 * 86_400;

/// How many offending proxies a line names before it says "and N more".
const NAMED_PROXIES: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn pass(detail: impl Into<String>) -> Self {
        Self {
            ok: true,
            detail: detail.into(),
        }
    }

    pub fn fail(detail: impl Into<String>) -> Self {
        Self {
            ok: false,
            detail: detail.into(),
        }
    }

    pub fn line(&self) -> String {
        format!("{} {}", if self.ok { "✔" } else { "✘" }, self.detail)
    }
}

/// The CA certificates, from `GET /v1/status`.
pub fn certificate_checks(status: &Value, now_unix: i64) -> Vec<Check> {
    vec![
        certificate("root CA", status.get("rootNotAfterUnix"), now_unix),
        certificate(
            "intermediate CA",
            status.get("intermediateNotAfterUnix"),
            now_unix,
        ),
    ]
}

/// Every proxy's config, from `GET /v1/proxies`.
pub fn proxy_checks(proxies: &[Value]) -> Vec<Check> {
    vec![acked(proxies), nacks(proxies)]
}

fn certificate(what: &str, not_after: Option<&Value>, now_unix: i64) -> Check {
    let Some(not_after) = not_after.and_then(Value::as_i64) else {
        return Check::fail(format!(
            "{what}: the control plane did not report its expiry"
        ));
    };
    let when = format_unix(not_after);
    let left = not_after - now_unix;
    if left <= 0 {
        Check::fail(format!("{what} expired on {when}; rotate it now"))
    } else if left < EXPIRY_MARGIN_SECONDS {
        Check::fail(format!(
            "{what} expires in {} (on {when}); rotate it",
            age(left.unsigned_abs())
        ))
    } else {
        Check::pass(format!(
            "{what} valid until {when} ({} left)",
            age(left.unsigned_abs())
        ))
    }
}

fn acked(proxies: &[Value]) -> Check {
    if proxies.is_empty() {
        return Check::pass("no proxies connected, so none is behind on its config");
    }
    let behind: Vec<String> = proxies
        .iter()
        .filter(|p| p.get("state").and_then(Value::as_str) != Some("ACKED"))
        .map(|p| format!("{} ({})", proxy_name(p), text(p, "/state")))
        .collect();
    if behind.is_empty() {
        Check::pass(format!(
            "all {} proxies ACKed their latest config",
            proxies.len()
        ))
    } else {
        Check::fail(format!(
            "{} of {} proxies have not ACKed their latest config: {}",
            behind.len(),
            proxies.len(),
            name_some(&behind)
        ))
    }
}

fn nacks(proxies: &[Value]) -> Check {
    let nacked: Vec<String> = proxies
        .iter()
        .filter(|p| p.get("state").and_then(Value::as_str) == Some("NACKED"))
        .map(|p| format!("{} NACKed: {}", proxy_name(p), text(p, "/nack/error")))
        .collect();
    match nacked.len() {
        0 => Check::pass("no proxy NACKed its config"),
        n => Check::fail(format!(
            "{n} {} NACKed {} config: {}",
            if n == 1 { "proxy" } else { "proxies" },
            if n == 1 { "its" } else { "their" },
            name_some(&nacked)
        )),
    }
}

fn proxy_name(proxy: &Value) -> String {
    format!(
        "{}/{} {}",
        text(proxy, "/namespace"),
        text(proxy, "/service"),
        text(proxy, "/instance")
    )
}

fn name_some(names: &[String]) -> String {
    let mut text = names
        .iter()
        .take(NAMED_PROXIES)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if names.len() > NAMED_PROXIES {
        text.push_str(&format!(
            "; and {} more (trellisctl get proxies -A)",
            names.len() - NAMED_PROXIES
        ));
    }
    text
}

/// A Unix time as RFC 3339 in UTC, or the raw number if it is out of range.
pub fn format_unix(seconds: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix time {seconds}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn evaluate(status: &Value, proxies: &[Value], now_unix: i64) -> Vec<Check> {
        let mut checks = certificate_checks(status, now_unix);
        checks.extend(proxy_checks(proxies));
        checks
    }

    const NOW: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

    fn proxy(instance: &str, state: &str) -> Value {
        json!({"service": "web", "namespace": "default", "instance": instance, "state": state,
               "nack": if state == "NACKED" { json!({"version": "v2", "error": "bad route"}) }
                       else { Value::Null }})
    }

    #[test]
    fn a_healthy_mesh_passes_every_check() {
        let status = json!({"rootNotAfterUnix": NOW + 365 * 86_400,
                            "intermediateNotAfterUnix": NOW + 30 * 86_400});
        let checks = evaluate(&status, &[proxy("a", "ACKED"), proxy("b", "ACKED")], NOW);
        assert!(checks.iter().all(|c| c.ok), "{checks:?}");
        assert_eq!(
            checks[0].line(),
            "✔ root CA valid until 2027-01-01T00:00:00Z (365d left)"
        );
        assert_eq!(
            checks[2].line(),
            "✔ all 2 proxies ACKed their latest config"
        );
        assert_eq!(checks[3].line(), "✔ no proxy NACKed its config");
    }

    #[test]
    fn certificates_near_or_past_expiry_fail() {
        let status = json!({"rootNotAfterUnix": NOW + 3 * 86_400,
                            "intermediateNotAfterUnix": NOW - 1});
        let checks = evaluate(&status, &[], NOW);
        assert_eq!(
            checks[0].line(),
            "✘ root CA expires in 3d (on 2026-01-04T00:00:00Z); rotate it"
        );
        assert_eq!(
            checks[1].line(),
            "✘ intermediate CA expired on 2025-12-31T23:59:59Z; rotate it now"
        );
        assert!(checks[2].ok && checks[3].ok, "no proxies is not a failure");
        let silent = evaluate(&json!({}), &[], NOW);
        assert!(!silent[0].ok && !silent[1].ok);
    }

    #[test]
    fn pending_and_nacked_proxies_are_named() {
        let status = json!({"rootNotAfterUnix": NOW + 365 * 86_400,
                            "intermediateNotAfterUnix": NOW + 365 * 86_400});
        let proxies = [
            proxy("a", "ACKED"),
            proxy("b", "PENDING"),
            proxy("c", "NACKED"),
        ];
        let checks = evaluate(&status, &proxies, NOW);
        assert_eq!(
            checks[2].line(),
            "✘ 2 of 3 proxies have not ACKed their latest config: \
             default/web b (PENDING); default/web c (NACKED)"
        );
        assert_eq!(
            checks[3].line(),
            "✘ 1 proxy NACKed its config: default/web c NACKed: bad route"
        );
    }

    #[test]
    fn long_lists_are_cut_short() {
        let proxies: Vec<Value> = (0..5).map(|i| proxy(&format!("p{i}"), "PENDING")).collect();
        let check = acked(&proxies);
        assert!(
            check
                .detail
                .ends_with("default/web p2 (PENDING); and 2 more (trellisctl get proxies -A)"),
            "{}",
            check.detail
        );
    }
}
