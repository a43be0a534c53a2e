//! `shipping`: books a shipment for a placed order and promises a delivery date.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    response::Response,
    routing::{get, post},
};
use http::StatusCode;
use parking_lot::Mutex;
use serde::Serialize;

use crate::{
    clock,
    input::{json_body, object},
    reply::{self, ApiError},
    serve::ServiceRoutes,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Shipment {
    pub id: String,
    pub order_id: String,
    pub user: String,
    /// Delivery date, `YYYY-MM-DD`.
    pub eta: String,
}

#[derive(Debug, Clone, Default)]
struct ShippingService {
    /// By order id: booking an order twice (a retry) books it once.
    shipments: Arc<Mutex<BTreeMap<String, Shipment>>>,
}

pub fn routes() -> ServiceRoutes {
    ServiceRoutes {
        http: Router::new()
            .route("/shipments", post(book))
            .route("/shipments/{id}", get(find))
            .with_state(ShippingService::default()),
        grpc: None,
    }
}

async fn book(State(service): State<ShippingService>, body: Bytes) -> Result<Response, ApiError> {
    let body = json_body(&body)?;
    let fields = object(&body)?;
    let order_id = fields.string("orderId")?;
    let user = fields.string("user")?;
    let shipment = service
        .shipments
        .lock()
        .entry(order_id.to_string())
        .or_insert_with(|| {
            // Two to five days out, like a real carrier's estimate.
            let days = fastrand::u64(2..=5);
            Shipment {
                id: format!("shp-{:012x}", fastrand::u64(..) >> 16),
                order_id: order_id.to_string(),
                user: user.to_string(),
                eta: clock::date(SystemTime::now() + Duration::from_secs(days * 86_400)),
            }
        })
        .clone();
    tracing::info!(
        order_id,
        shipment_id = shipment.id,
        eta = shipment.eta,
        "shipment booked"
    );
    Ok(reply::json(StatusCode::CREATED, &shipment))
}

async fn find(
    State(service): State<ShippingService>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let shipments = service.shipments.lock();
    shipments
        .values()
        .find(|s| s.id == id)
        .map(|s| reply::json(StatusCode::OK, s))
        .ok_or_else(|| ApiError::not_found(format!("no shipment {id:?}")))
}
