//! `payment`: charges an order. v1 is the one in production; v2 is the shadow the
//! mesh mirrors charges to and compares: same API and statuses, its JSON differs only
//! in `id` and `processedAt` — except that for about one order in twenty it computes
//! a different `fee` (the new pricing under test), which a comparison must catch.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

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
    args::Version,
    clock,
    input::{json_body, object},
    reply::{self, ApiError},
    serve::ServiceRoutes,
};

/// A charge bigger than this (ten million dollars) is refused as a typo.
const MAX_AMOUNT_CENTS: u64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    pub id: String,
    pub order_id: String,
    pub status: &'static str,
    pub amount_cents: u64,
    pub fee: u64,
    pub processed_at: String,
}

/// The card processor's cut in cents: 2.9% plus 30 cents, rounded to the nearest cent.
/// v2 charges 2.5% plus 30 for the orders its experiment picks.
pub fn fee(version: Version, order_id: &str, amount_cents: u64) -> u64 {
    let per_mille = match version {
        Version::V2 if in_experiment(order_id) => 25,
        _ => 29,
    };
    (amount_cents * per_mille + 500) / 1_000 + 30
}

/// About one order in twenty, the same ones on every run (FNV-1a of the order id):
/// mismatches in a shadow comparison can be reproduced.
pub fn in_experiment(order_id: &str) -> bool {
    let hash = order_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    hash % 20 == 0
}

#[derive(Debug, Clone)]
struct PaymentService {
    version: Version,
    /// By order id: charging an order twice (a retry) charges it once.
    payments: Arc<Mutex<BTreeMap<String, Payment>>>,
}

pub fn routes(version: Version) -> ServiceRoutes {
    let service = PaymentService {
        version,
        payments: Arc::default(),
    };
    ServiceRoutes {
        http: Router::new()
            .route("/payments", post(charge))
            .route("/payments/{id}", get(find))
            .with_state(service),
        grpc: None,
    }
}

async fn charge(State(service): State<PaymentService>, body: Bytes) -> Result<Response, ApiError> {
    let body = json_body(&body)?;
    let fields = object(&body)?;
    let order_id = fields.string("orderId")?;
    let _user = fields.string("user")?;
    let amount_cents = fields.whole("amountCents", 1..=MAX_AMOUNT_CENTS)?;
    let payment = {
        let mut payments = service.payments.lock();
        if let Some(existing) = payments.get(order_id) {
            if existing.amount_cents != amount_cents {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "order {order_id:?} was charged {} cents already, not {amount_cents}",
                        existing.amount_cents
                    ),
                ));
            }
            existing.clone()
        } else {
            let id_prefix = match service.version {
                Version::V1 => "pay",
                Version::V2 => "pay2",
            };
            let payment = Payment {
                id: format!("{id_prefix}-{:012x}", fastrand::u64(..) >> 16),
                order_id: order_id.to_string(),
                status: "charged",
                amount_cents,
                fee: fee(service.version, order_id, amount_cents),
                processed_at: clock::timestamp(SystemTime::now()),
            };
            payments.insert(order_id.to_string(), payment.clone());
            payment
        }
    };
    tracing::info!(
        order_id = payment.order_id,
        payment_id = payment.id,
        amount_cents,
        fee = payment.fee,
        "charged"
    );
    Ok(reply::json(StatusCode::CREATED, &payment))
}

async fn find(
    State(service): State<PaymentService>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let payments = service.payments.lock();
    payments
        .values()
        .find(|p| p.id == id)
        .map(|p| reply::json(StatusCode::OK, p))
        .ok_or_else(|| ApiError::not_found(format!("no payment {id:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_fee_is_2_9_percent_plus_30_cents() {
        assert_eq!(fee(Version::V1, "any", 10_000), 320);
        assert_eq!(fee(Version::V1, "any", 1), 30);
        assert_eq!(fee(Version::V1, "any", 8_999), 291);
    }

    #[test]
    fn v2_differs_for_about_one_order_in_twenty() {
        let orders: Vec<String> = (0..4_000).map(|i| format!("ord-{i:06}")).collect();
        let differing = orders
            .iter()
            .filter(|id| fee(Version::V1, id, 10_000) != fee(Version::V2, id, 10_000))
            .count();
        assert!((120..=280).contains(&differing), "{differing} of 4000");
        assert!(orders.iter().filter(|id| in_experiment(id)).count() == differing);
    }
}
