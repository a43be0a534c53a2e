//! `analytics`: takes events (`POST /events`, 202) and reports how many of each type
//! it has seen (`GET /reports`). Callers treat it as best effort.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    response::Response,
    routing::{get, post},
};
use http::StatusCode;
use parking_lot::Mutex;
use serde_json::json;

use crate::{
    input::{json_body, object},
    reply::{self, ApiError},
    serve::ServiceRoutes,
};

/// Kept per type; a flood of invented types must not grow memory without end.
const MAX_EVENT_TYPES: usize = 1_000;

#[derive(Debug, Clone, Default)]
struct AnalyticsService {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
}

pub fn routes() -> ServiceRoutes {
    ServiceRoutes {
        http: Router::new()
            .route("/events", post(record))
            .route("/reports", get(report))
            .with_state(AnalyticsService::default()),
        grpc: None,
    }
}

async fn record(
    State(service): State<AnalyticsService>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = json_body(&body)?;
    let kind = object(&body)?.string("type")?;
    {
        let mut counts = service.counts.lock();
        if !counts.contains_key(kind) && counts.len() >= MAX_EVENT_TYPES {
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "type: {MAX_EVENT_TYPES} event types are counted already; {kind:?} is one too many"
                ),
            ));
        }
        *counts.entry(kind.to_string()).or_default() += 1;
    }
    Ok(reply::json(
        StatusCode::ACCEPTED,
        &json!({ "accepted": true }),
    ))
}

async fn report(State(service): State<AnalyticsService>) -> Response {
    let counts = service.counts.lock().clone();
    let total: u64 = counts.values().sum();
    reply::json(StatusCode::OK, &json!({ "counts": counts, "total": total }))
}
