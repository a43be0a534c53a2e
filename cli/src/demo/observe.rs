//! What the demo shows each second, gathered from the control plane's API (per-service
//! statistics, the canary, shadow comparisons) and the sidecars' `/metrics` (ejected
//! endpoints, ejections, bulkhead rejections).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use serde_json::Value;

use crate::api::Api;

pub const NAMESPACE: &str = "marketplace";

/// One service as its callers' sidecars reported it over the last window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceRow {
    pub requests: u64,
    pub successes: u64,
    pub rps: f64,
    /// The slowest of its routes' and backends' p99s.
    pub p99_ms: Option<f64>,
}

impl ServiceRow {
    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| 100.0 * self.successes as f64 / self.requests as f64)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CanaryRow {
    pub phase: String,
    pub weight: u64,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShadowRow {
    pub mirrored: u64,
    pub matched: u64,
    pub status_mismatches: u64,
    pub body_mismatches: u64,
    pub shadow_errors: u64,
    pub dropped: u64,
}

impl ShadowRow {
    pub fn compared(&self) -> u64 {
        self.matched + self.status_mismatches + self.body_mismatches
    }
}

/// Everything one refresh shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    pub services: BTreeMap<String, ServiceRow>,
    pub canary: Option<CanaryRow>,
    pub shadow: ShadowRow,
    /// `service endpoint` of every endpoint some sidecar has ejected now.
    pub ejected: Vec<String>,
    pub ejections: f64,
    pub bulkhead_rejections: f64,
    /// Every sidecar's metrics were read: only then does a missing ejection mean one.
    pub complete: bool,
}

/// Reads the control plane and the sidecars' admin pages.
#[derive(Debug)]
pub struct Observer {
    api: Api,
    admins: Vec<SocketAddr>,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Observer {
    pub fn new(api: Api, admins: Vec<SocketAddr>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        let http = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self { api, admins, http }
    }

    /// One look at everything; what cannot be read this time is left empty.
    pub async fn observe(&self, window: Duration) -> Observation {
        let stats = self
            .api
            .get(&format!(
                "/v1/stats?namespace={NAMESPACE}&window={}s",
                window.as_secs().max(1)
            ))
            .await
            .unwrap_or_default();
        let canary = self
            .api
            .get(&format!(
                "/v1/resources/canary/recommendations?namespace={NAMESPACE}"
            ))
            .await
            .ok()
            .map(|c| CanaryRow {
                phase: c["status"]["phase"].as_str().unwrap_or("Pending").into(),
                weight: c["status"]["weight"].as_u64().unwrap_or(0),
                message: c["status"]["message"].as_str().unwrap_or_default().into(),
            });
        let shadows = self
            .api
            .get(&format!("/v1/shadows?namespace={NAMESPACE}"))
            .await
            .unwrap_or_default();
        let mut observation = Observation {
            services: services(&stats),
            canary,
            shadow: shadow(&shadows),
            complete: true,
            ..Observation::default()
        };
        for admin in &self.admins {
            let Some(text) = self.metrics(*admin).await else {
                observation.complete = false;
                continue;
            };
            for (labels, value) in samples(&text, "trellis_endpoint_ejected") {
                if value >= 1.0 {
                    let service = label(labels, "service").unwrap_or("?");
                    let endpoint = label(labels, "endpoint").unwrap_or("?");
                    observation.ejected.push(format!("{service} {endpoint}"));
                }
            }
            observation.ejections += samples(&text, "trellis_endpoint_ejections_total")
                .map(|(_, v)| v)
                .sum::<f64>();
            observation.bulkhead_rejections += samples(&text, "trellis_bulkhead_rejected_total")
                .map(|(_, v)| v)
                .sum::<f64>();
        }
        observation.ejected.sort();
        observation.ejected.dedup();
        observation
    }

    async fn metrics(&self, admin: SocketAddr) -> Option<String> {
        let request = Request::get(format!("http://{admin}/metrics"))
            .body(Full::default())
            .ok()?;
        let fetch = async {
            let response = self.http.request(request).await.ok()?;
            let body = response.into_body().collect().await.ok()?.to_bytes();
            String::from_utf8(body.to_vec()).ok()
        };
        tokio::time::timeout(Duration::from_secs(1), fetch)
            .await
            .ok()
            .flatten()
    }
}

/// `/v1/stats` items summed per service.
fn services(stats: &Value) -> BTreeMap<String, ServiceRow> {
    let mut services: BTreeMap<String, ServiceRow> = BTreeMap::new();
    for item in stats["items"].as_array().into_iter().flatten() {
        let Some(name) = item["service"].as_str() else {
            continue;
        };
        let row = services.entry(name.to_string()).or_default();
        row.requests += item["requests"].as_u64().unwrap_or(0);
        row.successes += item["successes"].as_u64().unwrap_or(0);
        row.rps += item["rps"].as_f64().unwrap_or(0.0);
        if let Some(p99) = item["p99Ms"].as_f64() {
            row.p99_ms = Some(row.p99_ms.map_or(p99, |p| p.max(p99)));
        }
    }
    services
}

/// `/v1/shadows` items summed.
fn shadow(shadows: &Value) -> ShadowRow {
    let mut row = ShadowRow::default();
    for item in shadows["items"].as_array().into_iter().flatten() {
        let n = |field: &str| item[field].as_u64().unwrap_or(0);
        row.mirrored += n("mirrored");
        row.matched += n("matched");
        row.status_mismatches += n("statusMismatches");
        row.body_mismatches += n("bodyMismatches");
        row.shadow_errors += n("shadowErrors");
        row.dropped += n("dropped");
    }
    row
}

/// The samples of metric `name` in Prometheus text: (the text between the braces,
/// value). Only what the demo reads; the exposition comes from our own sidecars.
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => rest.split_once('}')?,
            None if rest.starts_with(' ') => ("", rest),
            None => return None,
        };
        let value = value.split_whitespace().next()?.parse().ok()?;
        Some((labels, value))
    })
}

/// The value of `key` in a sample's labels (`a="x",b="y"`).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_and_labels_are_read_from_prometheus_text() {
        let text = "# HELP trellis_endpoint_ejected x\n\
                    trellis_endpoint_ejected{service=\"payment\",endpoint=\"127.0.0.1:9\"} 1\n\
                    trellis_endpoint_ejected_other 5\n\
                    trellis_endpoint_ejections_total 3\n";
        let ejected: Vec<_> = samples(text, "trellis_endpoint_ejected").collect();
        assert_eq!(ejected.len(), 1);
        assert_eq!(label(ejected[0].0, "endpoint"), Some("127.0.0.1:9"));
        assert_eq!(ejected[0].1, 1.0);
        let total: f64 = samples(text, "trellis_endpoint_ejections_total")
            .map(|(_, v)| v)
            .sum();
        assert_eq!(total, 3.0);
    }

    #[test]
    fn stats_are_summed_per_service() {
        let stats = serde_json::json!({"items": [
            {"service": "payment", "requests": 10, "successes": 9, "rps": 1.0, "p99Ms": 4.0},
            {"service": "payment", "requests": 10, "successes": 10, "rps": 1.0, "p99Ms": 9.0},
            {"service": "user", "requests": 0, "successes": 0, "rps": 0.0, "p99Ms": null},
        ]});
        let rows = services(&stats);
        let payment = &rows["payment"];
        assert_eq!((payment.requests, payment.successes), (20, 19));
        assert_eq!(payment.p99_ms, Some(9.0));
        assert_eq!(payment.success_rate(), Some(95.0));
        assert_eq!(rows["user"].success_rate(), None);
    }
}
