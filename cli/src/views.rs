//! The tables `get` prints. They read the API's JSON loosely (a missing field prints
//! `-`), so a newer control plane that adds fields never breaks an older CLI.

use serde_json::Value;

use crate::{kinds::Kind, table::Table};

/// One row per resource, sorted by namespace and name: NAMESPACE, NAME, SERVICE and
/// what matters most about the kind. MeshConfig has neither namespace nor service.
pub fn resource_table(kind: Kind, items: &[Value]) -> Table {
    let mut items: Vec<&Value> = items.iter().collect();
    items.sort_by_key(|item| {
        (
            text(item, "/metadata/namespace"),
            text(item, "/metadata/name"),
        )
    });
    let mut table = match kind {
        Kind::MeshConfig => Table::new(vec![
            "NAME",
            "TRUST-DOMAIN",
            "MTLS",
            "DEFAULT-AUTHORIZATION",
        ]),
        Kind::DestinationPolicy => Table::new(vec!["NAMESPACE", "NAME", "SERVICE", "SUBSETS"]),
        Kind::TrafficRoute | Kind::AuthorizationPolicy => {
            Table::new(vec!["NAMESPACE", "NAME", "SERVICE", "RULES"])
        }
        Kind::Canary => Table::new(vec![
            "NAMESPACE",
            "NAME",
            "SERVICE",
            "PHASE",
            "WEIGHT",
            "CANARY",
            "STABLE",
            "MESSAGE",
        ]),
    };
    for item in items {
        let namespace = text(item, "/metadata/namespace");
        let namespace = if namespace == "-" {
            "default".to_string()
        } else {
            namespace
        };
        let name = text(item, "/metadata/name");
        let service = text(item, "/spec/service");
        let row = match kind {
            Kind::MeshConfig => vec![
                name,
                text(item, "/spec/trustDomain"),
                text(item, "/spec/mtls"),
                text(item, "/spec/defaultAuthorization"),
            ],
            Kind::DestinationPolicy => {
                let subsets: Vec<String> = list(item, "/spec/subsets")
                    .iter()
                    .map(|subset| text(subset, "/name"))
                    .collect();
                let subsets = if subsets.is_empty() {
                    "-".into()
                } else {
                    subsets.join(",")
                };
                vec![namespace, name, service, subsets]
            }
            Kind::TrafficRoute | Kind::AuthorizationPolicy => {
                let rules = list(item, "/spec/rules").len().to_string();
                vec![namespace, name, service, rules]
            }
            Kind::Canary => {
                let weight = match item.pointer("/status/weight").and_then(Value::as_u64) {
                    Some(weight) => format!("{weight}%"),
                    None => "-".into(),
                };
                let analysis = |subset: &str| {
                    item.pointer(&format!("/status/lastAnalysis/{subset}"))
                        .map_or_else(|| "-".into(), subset_numbers)
                };
                vec![
                    namespace,
                    name,
                    service,
                    text(item, "/status/phase"),
                    weight,
                    analysis("canary"),
                    analysis("stable"),
                    text(item, "/status/message"),
                ]
            }
        };
        table.push(row);
    }
    table
}

/// One subset's numbers from a canary analysis: `99.5% p99=12ms n=340`.
fn subset_numbers(stats: &Value) -> String {
    let requests = stats.get("requests").and_then(Value::as_u64).unwrap_or(0);
    let rate = stats
        .get("successRate")
        .and_then(Value::as_f64)
        .map_or_else(|| "-".into(), |r| format!("{r:.1}%"));
    let p99 = stats
        .get("p99Ms")
        .and_then(Value::as_f64)
        .map_or_else(|| "-".into(), |p| format!("{p:.0}ms"));
    format!("{rate} p99={p99} n={requests}")
}

/// What `get canary NAME` adds under its table: the canary's history, oldest first.
pub fn canary_history(item: &Value) -> String {
    let mut table = Table::new(vec!["TIME", "PHASE", "WEIGHT", "EVENT"]);
    for event in list(item, "/status/history") {
        table.push(vec![
            text(event, "/at"),
            text(event, "/phase"),
            format!("{}%", text(event, "/weight")),
            text(event, "/message"),
        ]);
    }
    if table.is_empty() {
        return String::new();
    }
    format!("\nHistory:\n{}", table.render())
}

/// The registry: every instance a sidecar announced, and whether it is healthy.
pub fn endpoint_table(items: &[Value]) -> Table {
    let mut table = Table::new(vec![
        "NAMESPACE",
        "SERVICE",
        "INSTANCE",
        "ADDRESS",
        "HEALTHY",
        "LABELS",
        "IDENTITY",
    ]);
    for item in sorted_by_instance(items) {
        let healthy = match item.get("healthy").and_then(Value::as_bool) {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        let mut labels: Vec<String> = item
            .get("labels")
            .and_then(Value::as_object)
            .map(|labels| {
                labels
                    .iter()
                    .map(|(key, value)| format!("{key}={}", scalar(value)))
                    .collect()
            })
            .unwrap_or_default();
        labels.sort();
        let labels = if labels.is_empty() {
            "-".into()
        } else {
            labels.join(",")
        };
        table.push(vec![
            text(item, "/namespace"),
            text(item, "/service"),
            text(item, "/instance"),
            text(item, "/address"),
            healthy.into(),
            labels,
            text(item, "/identity"),
        ]);
    }
    table
}

/// Connected sidecars and where each stands with its config; a NACK's error is shown
/// in full, last, because it is what the operator must read.
pub fn proxy_table(items: &[Value]) -> Table {
    let mut table = Table::new(vec![
        "NAMESPACE",
        "SERVICE",
        "INSTANCE",
        "ADDRESS",
        "PROXY-VERSION",
        "CONNECTED",
        "STATE",
        "ACKED",
        "LATEST",
        "ERROR",
    ]);
    for item in sorted_by_instance(items) {
        let connected = item
            .get("connectedSeconds")
            .and_then(Value::as_f64)
            .map_or_else(|| "-".into(), |s| age(s as u64));
        let state = text(item, "/state");
        let error = match item.get("nack") {
            Some(nack) if state == "NACKED" && !nack.is_null() => format!(
                "{} (version {})",
                text(nack, "/error"),
                short_version(nack.get("version"))
            ),
            _ => String::new(),
        };
        table.push(vec![
            text(item, "/namespace"),
            text(item, "/service"),
            text(item, "/instance"),
            text(item, "/address"),
            text(item, "/proxyVersion"),
            connected,
            state,
            short_version(item.get("ackedVersion")),
            short_version(item.get("latestVersion")),
            error,
        ]);
    }
    table
}

/// Each route mirror's totals since the control plane started (`GET /v1/shadows`);
/// `NAMESPACE` first when more than one namespace is listed.
pub fn shadow_table(items: &[Value], with_namespace: bool) -> Table {
    let mut headers = vec![
        "SERVICE",
        "ROUTE",
        "SHADOW",
        "MIRRORED",
        "MATCH",
        "STATUS≠",
        "BODY≠",
        "ERRORS",
        "DROPPED",
        "TOO-LARGE",
    ];
    if with_namespace {
        headers.insert(0, "NAMESPACE");
    }
    let mut table = Table::new(headers);
    for item in items {
        let mut row: Vec<String> = [
            "/service",
            "/route",
            "/shadow",
            "/mirrored",
            "/matched",
            "/statusMismatches",
            "/bodyMismatches",
            "/shadowErrors",
            "/dropped",
            "/tooLarge",
        ]
        .iter()
        .map(|pointer| reported_text(item, pointer))
        .collect();
        if with_namespace {
            row.insert(0, reported_text(item, "/namespace"));
        }
        table.push(row);
    }
    table
}

/// The mirrors' latest mismatches, oldest first: when, which request, both statuses
/// and the start of both body digests.
pub fn mismatch_table(items: &[Value]) -> Table {
    let mut mismatches: Vec<(&Value, &Value)> = items
        .iter()
        .flat_map(|item| list(item, "/recent").iter().map(move |m| (item, m)))
        .collect();
    mismatches.sort_by_key(|(_, m)| m.get("unixMs").and_then(Value::as_i64).unwrap_or(0));
    let mut table = Table::new(vec![
        "TIME", "SERVICE", "ROUTE", "REQUEST", "STATUS", "DIGEST",
    ]);
    for (item, mismatch) in mismatches {
        let time = mismatch
            .get("unixMs")
            .and_then(Value::as_i64)
            .map_or_else(|| "-".into(), |ms| crate::checks::format_unix(ms / 1000));
        let digest =
            |pointer: &str| escape_controls(text(mismatch, pointer).chars().take(8).collect());
        table.push(vec![
            time,
            reported_text(item, "/service"),
            reported_text(item, "/route"),
            format!(
                "{} {}",
                reported_text(mismatch, "/method"),
                reported_text(mismatch, "/path")
            ),
            format!(
                "{}→{}",
                reported_text(mismatch, "/primaryStatus"),
                reported_text(mismatch, "/shadowStatus")
            ),
            format!("{}→{}", digest("/primaryDigest"), digest("/shadowDigest")),
        ]);
    }
    table
}

/// `GET /v1/stats` as `trellisctl stat` prints it.
pub fn stat_table(items: &[Value], with_namespace: bool) -> Table {
    let mut headers = vec!["SERVICE", "ROUTE", "BACKEND", "RPS", "SUCCESS", "P99"];
    if with_namespace {
        headers.insert(0, "NAMESPACE");
    }
    let mut table = Table::new(headers);
    for item in items {
        let number = |pointer: &str| item.pointer(pointer).and_then(Value::as_f64);
        let mut row = vec![
            text(item, "/service"),
            text(item, "/route"),
            text(item, "/backend"),
            number("/rps").map_or_else(|| "-".into(), |rps| format!("{rps:.1}")),
            number("/successRate").map_or_else(|| "-".into(), |rate| format!("{rate:.2}%")),
            number("/p99Ms").map_or_else(|| "-".into(), latency),
        ];
        if with_namespace {
            row.insert(0, text(item, "/namespace"));
        }
        table.push(row);
    }
    table
}

/// `GET /v1/stats?by=edge` as `trellisctl stat --edges` prints it. Names outside
/// `namespace` (all of them with `-A`) are shown as `namespace/service`.
pub fn edge_table(items: &[Value], namespace: Option<&str>) -> Table {
    let mut table = Table::new(vec!["FROM", "TO", "RPS", "SUCCESS", "P99"]);
    let name = |item: &Value, ns: &str, service: &str| {
        let (ns, service) = (text(item, ns), text(item, service));
        if namespace == Some(ns.as_str()) {
            service
        } else {
            format!("{ns}/{service}")
        }
    };
    for item in items {
        let number = |pointer: &str| item.pointer(pointer).and_then(Value::as_f64);
        table.push(vec![
            name(item, "/callerNamespace", "/caller"),
            name(item, "/namespace", "/service"),
            number("/rps").map_or_else(|| "-".into(), |rps| format!("{rps:.1}")),
            number("/successRate").map_or_else(|| "-".into(), |rate| format!("{rate:.2}%")),
            number("/p99Ms").map_or_else(|| "-".into(), latency),
        ]);
    }
    table
}

/// The header `tap_line` lines up under.
pub fn tap_header() -> String {
    tap_columns(&[
        "TIME",
        "PROXY",
        "DIR",
        "METHOD",
        "AUTHORITY",
        "PATH",
        "STATUS",
        "LATENCY",
        "ROUTE",
        "SOURCE",
        "DESTINATION",
        "REQUEST-ID",
    ])
}

/// One line of `trellisctl tap`, from a sidecar's `/tap` line and the proxy's
/// instance. The columns are padded to usual widths rather than measured: lines are
/// printed as they come.
pub fn tap_line(line: &Value, instance: &str) -> String {
    let time = text(line, "/time");
    // 2025-03-02T10:14:07.123Z: the clock is enough on a live stream.
    let clock = time
        .split_once('T')
        .map_or(time.as_str(), |(_, clock)| clock.trim_end_matches('Z'))
        .to_string();
    let latency_ms = line
        .get("latencyMs")
        .and_then(Value::as_f64)
        .map_or_else(|| "-".into(), latency);
    tap_columns(&[
        &clock,
        &escape_controls(instance.to_string()),
        &reported_text(line, "/direction"),
        &reported_text(line, "/method"),
        &reported_text(line, "/authority"),
        &reported_text(line, "/path"),
        &reported_text(line, "/status"),
        &latency_ms,
        &reported_text(line, "/route"),
        &reported_text(line, "/source"),
        &reported_text(line, "/destination"),
        &reported_text(line, "/requestId"),
    ])
}

fn tap_columns(columns: &[&str]) -> String {
    // Instances are `<service>-<8 hex>`; ids `spiffe://<td>/ns/<ns>/sa/<service>`.
    const WIDTHS: [usize; 11] = [12, 20, 8, 6, 16, 20, 6, 8, 10, 52, 52];
    let mut out = String::new();
    for (i, column) in columns.iter().enumerate() {
        match WIDTHS.get(i) {
            Some(&width) => out.push_str(&format!("{column:<width$} ")),
            None => out.push_str(column),
        }
    }
    out.trim_end().to_string()
}

/// Milliseconds with the digits that matter: `0.42ms`, `12ms`, `1.50s`.
fn latency(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{ms:.2}ms")
    }
}

fn sorted_by_instance(items: &[Value]) -> Vec<&Value> {
    let mut items: Vec<&Value> = items.iter().collect();
    items.sort_by_key(|item| {
        (
            text(item, "/namespace"),
            text(item, "/service"),
            text(item, "/instance"),
        )
    });
    items
}

/// The field at `pointer` as text, `-` when absent or null.
pub fn text(value: &Value, pointer: &str) -> String {
    value.pointer(pointer).map_or_else(|| "-".into(), scalar)
}

/// `text` of what a sidecar reported, with control characters shown as `\u{..}`
/// escapes: a hostile report must not write terminal escape sequences (or fake lines)
/// to whoever reads the table.
fn reported_text(value: &Value, pointer: &str) -> String {
    escape_controls(text(value, pointer))
}

fn escape_controls(text: String) -> String {
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn scalar(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn list<'a>(value: &'a Value, pointer: &str) -> &'a [Value] {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Config versions are content digests; twelve characters tell them apart.
fn short_version(version: Option<&Value>) -> String {
    match version {
        None | Some(Value::Null) => "-".into(),
        Some(version) => scalar(version).chars().take(12).collect(),
    }
}

/// A duration as `kubectl` shows ages: the two largest units, e.g. `5m3s`, `2h7m`, `3d4h`.
pub fn age(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3_600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if s == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h{m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn resource_tables_show_the_kind_summary() {
        let policy = json!({
            "apiVersion": "trellis.dev/v1alpha1", "kind": "DestinationPolicy",
            "metadata": {"name": "payment", "namespace": "shop"},
            "spec": {"service": "payment", "subsets": [{"name": "v1"}, {"name": "v2"}]}
        });
        let bare = json!({"metadata": {"name": "cart"}, "spec": {"service": "cart"}});
        assert_eq!(
            resource_table(Kind::DestinationPolicy, &[policy, bare]).render(),
            "NAMESPACE   NAME      SERVICE   SUBSETS\n\
             default     cart      cart      -\n\
             shop        payment   payment   v1,v2\n"
        );

        let route = json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"service": "web", "rules": [{}, {}, {}]}
        });
        assert_eq!(
            resource_table(Kind::TrafficRoute, &[route]).render(),
            "NAMESPACE   NAME   SERVICE   RULES\n\
             default     web    web       3\n"
        );

        let rolling = json!({
            "metadata": {"name": "recs", "namespace": "shop"},
            "spec": {"service": "recommendations"},
            "status": {"phase": "Progressing", "weight": 25, "message": "now at 25%",
                       "lastAnalysis": {
                           "canary": {"requests": 61, "successRate": 100.0, "p99Ms": 4.2},
                           "stable": {"requests": 540, "successRate": 99.5}}}
        });
        let fresh = json!({"metadata": {"name": "search", "namespace": "shop"},
                           "spec": {"service": "search"}});
        assert_eq!(
            resource_table(Kind::Canary, &[rolling.clone(), fresh]).render(),
            "NAMESPACE   NAME     SERVICE           PHASE         WEIGHT   CANARY                STABLE              MESSAGE\n\
             shop        recs     recommendations   Progressing   25%      100.0% p99=4ms n=61   99.5% p99=- n=540   now at 25%\n\
             shop        search   search            -             -        -                     -                   -\n"
        );
        assert_eq!(canary_history(&rolling), "");
        let history = json!({"status": {"history": [
            {"at": "2026-12-02T10:00:00Z", "phase": "Progressing", "weight": 10, "message": "started"}]}});
        assert_eq!(
            canary_history(&history),
            "\nHistory:\nTIME                   PHASE         WEIGHT   EVENT\n\
             2026-12-02T10:00:00Z   Progressing   10%      started\n"
        );

        let mesh = json!({"metadata": {"name": "default"},
            "spec": {"trustDomain": "cluster.local", "mtls": "STRICT",
                     "defaultAuthorization": "allow-mesh"}});
        assert_eq!(
            resource_table(Kind::MeshConfig, &[mesh]).render(),
            "NAME      TRUST-DOMAIN    MTLS     DEFAULT-AUTHORIZATION\n\
             default   cluster.local   STRICT   allow-mesh\n"
        );
    }

    #[test]
    fn the_endpoint_table_shows_health_and_sorted_labels() {
        let endpoints = [json!({
            "service": "web", "namespace": "default", "instance": "web-1",
            "address": "127.0.0.1:8001", "identity": "spiffe://cluster.local/ns/default/sa/web",
            "labels": {"zone": "a", "version": "v1"}, "healthy": false
        })];
        let rendered = endpoint_table(&endpoints).render();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(
            lines,
            [
                "NAMESPACE   SERVICE   INSTANCE   ADDRESS          HEALTHY   LABELS              IDENTITY",
                "default     web       web-1      127.0.0.1:8001   no        version=v1,zone=a   spiffe://cluster.local/ns/default/sa/web",
            ]
        );
    }

    #[test]
    fn the_proxy_table_shows_a_nack_error_only_when_nacked() {
        let proxies = [
            json!({"service": "web", "namespace": "default", "instance": "web-2",
                   "address": "127.0.0.1:8002", "proxyVersion": "0.1.0", "connectedSeconds": 3725,
                   "latestVersion": "9f8e7d6c5b4a39281706", "ackedVersion": "0123456789abcdef",
                   "nack": {"version": "9f8e7d6c5b4a39281706", "error": "route \"r\": no subset v9"},
                   "state": "NACKED"}),
            json!({"service": "web", "namespace": "default", "instance": "web-1",
                   "address": "127.0.0.1:8001", "proxyVersion": "0.1.0", "connectedSeconds": 42,
                   "latestVersion": "9f8e7d6c5b4a39281706", "ackedVersion": "9f8e7d6c5b4a39281706",
                   "nack": null, "state": "ACKED"}),
        ];
        let rendered = proxy_table(&proxies).render();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("NAMESPACE   SERVICE   INSTANCE"),
            "{rendered}"
        );
        assert!(
            lines[1].contains("web-1"),
            "sorted by instance:\n{rendered}"
        );
        assert!(
            lines[1].ends_with(" ACKED    9f8e7d6c5b4a   9f8e7d6c5b4a"),
            "{rendered}"
        );
        assert!(lines[2].contains("1h2m"), "{rendered}");
        assert!(
            lines[2].ends_with(
                "NACKED   0123456789ab   9f8e7d6c5b4a   route \"r\": no subset v9 (version 9f8e7d6c5b4a)"
            ),
            "{rendered}"
        );
    }

    #[test]
    fn shadow_tables_show_totals_then_the_mismatches_oldest_first() {
        let mirrors = [json!({
            "namespace": "shop", "service": "payment", "route": "pay", "shadow": "v2",
            "mirrored": 120, "matched": 95, "statusMismatches": 3, "bodyMismatches": 20,
            "shadowErrors": 2, "dropped": 1, "tooLarge": 0,
            "recent": [
                {"unixMs": 1_700_000_060_000i64, "method": "POST", "path": "/pay",
                 "primaryStatus": 200, "shadowStatus": 200,
                 "primaryDigest": "3f2a9c1e55aa", "shadowDigest": "7b4d0e2266bb"},
                {"unixMs": 1_700_000_000_000i64, "method": "GET", "path": "/pay/7",
                 "primaryStatus": 200, "shadowStatus": 500,
                 "primaryDigest": "0011223344", "shadowDigest": "5566778899"}
            ]
        })];
        assert_eq!(
            shadow_table(&mirrors, false).render(),
            "SERVICE   ROUTE   SHADOW   MIRRORED   MATCH   STATUS≠   BODY≠   ERRORS   DROPPED   TOO-LARGE\n\
             payment   pay     v2       120        95      3         20      2        1         0\n"
        );
        assert!(
            shadow_table(&mirrors, true)
                .render()
                .starts_with("NAMESPACE   SERVICE")
        );
        let rendered = mismatch_table(&mirrors).render();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines.len(), 3, "{rendered}");
        assert!(
            lines[1].starts_with("2023-11-14T22:13:20Z   payment   pay     GET /pay/7"),
            "{rendered}"
        );
        assert!(
            lines[1].ends_with("200→500   00112233→55667788"),
            "{rendered}"
        );
        assert!(
            lines[2].ends_with("200→200   3f2a9c1e→7b4d0e22"),
            "{rendered}"
        );
    }

    #[test]
    fn control_characters_a_sidecar_reported_are_escaped_in_shadow_tables() {
        let mirrors = [json!({
            "namespace": "shop", "service": "pay\u{9b}2J", "route": "pay", "shadow": "v2",
            "mirrored": 1, "matched": 0, "statusMismatches": 1, "bodyMismatches": 0,
            "shadowErrors": 0, "dropped": 0, "tooLarge": 0,
            "recent": [
                {"unixMs": 1_700_000_000_000i64, "method": "GET\u{1b}[2J",
                 "path": "/x\r\n2023-11-14T22:13:20Z   pay   forged\u{7}",
                 "primaryStatus": 200, "shadowStatus": 500,
                 "primaryDigest": "\u{1b}]0;t\u{7}", "shadowDigest": "bb"}
            ]
        })];
        for rendered in [
            shadow_table(&mirrors, true).render(),
            mismatch_table(&mirrors).render(),
        ] {
            assert!(
                !rendered.chars().any(|c| c.is_control() && c != '\n'),
                "{rendered:?}"
            );
            assert_eq!(rendered.lines().count(), 2, "{rendered}");
        }
        let rendered = mismatch_table(&mirrors).render();
        assert!(
            rendered.contains(r"GET\u{1b}[2J /x\u{d}\u{a}2023-11-14T22:13:20Z   pay   forged\u{7}"),
            "{rendered}"
        );
        assert!(rendered.contains(r"pay\u{9b}2J"), "{rendered}");
        assert!(rendered.contains(r"\u{1b}]0;t\u{7}→bb"), "{rendered}");
    }

    #[test]
    fn the_stat_table_shows_rates_and_latency_readably() {
        let rows = [
            json!({"namespace": "default", "service": "web", "route": "split", "backend": "v1",
                   "requests": 540, "successes": 540, "successRate": 100.0, "rps": 9.0,
                   "p99Ms": 4.2}),
            json!({"namespace": "default", "service": "web", "route": "split", "backend": "v2",
                   "requests": 0, "successes": 0, "successRate": null, "rps": 0.0,
                   "p99Ms": null}),
            json!({"namespace": "default", "service": "pay", "route": "default",
                   "backend": "pay", "requests": 7, "successes": 6,
                   "successRate": 85.714_285, "rps": 0.116, "p99Ms": 2300.0}),
        ];
        assert_eq!(
            stat_table(&rows, false).render(),
            "SERVICE   ROUTE     BACKEND   RPS   SUCCESS   P99\n\
             web       split     v1        9.0   100.00%   4.20ms\n\
             web       split     v2        0.0   -         -\n\
             pay       default   pay       0.1   85.71%    2.30s\n"
        );
        assert!(
            stat_table(&rows, true)
                .render()
                .starts_with("NAMESPACE   SERVICE")
        );
        assert_eq!(latency(12.4), "12ms");
    }

    #[test]
    fn the_edge_table_names_other_namespaces() {
        let rows = [
            json!({"callerNamespace": "shop", "caller": "order", "namespace": "shop",
                   "service": "payment", "requests": 30, "successes": 30,
                   "successRate": 100.0, "rps": 3.0, "p99Ms": 4.2}),
            json!({"callerNamespace": "billing", "caller": "ledger", "namespace": "shop",
                   "service": "payment", "requests": 0, "successes": 0,
                   "successRate": null, "rps": 0.0, "p99Ms": null}),
        ];
        assert_eq!(
            edge_table(&rows, Some("shop")).render(),
            "FROM             TO        RPS   SUCCESS   P99\n\
             order            payment   3.0   100.00%   4.20ms\n\
             billing/ledger   payment   0.0   -         -\n"
        );
        let everywhere = edge_table(&rows, None).render();
        assert!(
            everywhere.contains("shop/order       shop/payment"),
            "{everywhere}"
        );
    }

    #[test]
    fn tap_lines_line_up_under_the_header_and_escape_what_sidecars_sent() {
        let line = json!({
            "time": "2025-03-02T10:14:07.123Z", "service": "payment", "direction": "inbound",
            "method": "POST", "authority": "payment", "path": "/payments", "status": 403,
            "latencyMs": 1.5, "source": "spiffe://cluster.local/ns/shop/sa/shipping",
            "destination": "spiffe://cluster.local/ns/shop/sa/payment", "route": null,
            "requestId": "req-1"
        });
        let header = tap_header();
        let rendered = tap_line(&line, "payment-1");
        assert_eq!(
            rendered,
            "10:14:07.123 payment-1            inbound  POST   payment          /payments            \
             403    1.50ms   -          spiffe://cluster.local/ns/shop/sa/shipping           \
             spiffe://cluster.local/ns/shop/sa/payment            req-1"
        );
        for column in ["PROXY", "PATH", "STATUS", "SOURCE", "REQUEST-ID"] {
            let at = header.find(column).unwrap();
            assert_ne!(
                rendered.as_bytes()[at],
                b' ',
                "{column}:\n{header}\n{rendered}"
            );
            assert_eq!(
                rendered.as_bytes()[at - 1],
                b' ',
                "{column}:\n{header}\n{rendered}"
            );
        }
        let hostile = json!({"path": "/x\u{1b}[2J\nforged", "status": 200});
        let rendered = tap_line(&hostile, "p");
        assert!(!rendered.chars().any(char::is_control), "{rendered:?}");
    }

    #[test]
    fn ages_keep_the_two_largest_units() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(59), "59s");
        assert_eq!(age(60), "1m");
        assert_eq!(age(303), "5m3s");
        assert_eq!(age(3600), "1h");
        assert_eq!(age(7620), "2h7m");
        assert_eq!(age(86_400), "1d");
        assert_eq!(age(3 * 86_400 + 4 * 3600 + 5), "3d4h");
    }
}
