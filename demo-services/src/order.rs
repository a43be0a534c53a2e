//! `order`: places orders as a saga through the mesh. (1) inventory reserves the
//! items (gRPC); (2) payment charges the total; (3) shipping books delivery; (4)
//! analytics hears of it, best effort. When payment or shipping fails, the
//! reservation is released again (the compensation) before the order answers.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    response::Response,
    routing::{get, post},
};
use http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};
use tonic::Code;

use crate::{
    catalog,
    input::{InputError, json_body, object},
    inventory::grpc::{Item, ReleaseRequest, ReserveRequest},
    mesh::{Mesh, MeshError, Trace},
    reply::{self, ApiError},
    serve::ServiceRoutes,
};

/// Most of one product a single order may take.
pub const MAX_LINE_QUANTITY: u64 = 100;
/// Compensation matters more than a quick answer: a release is tried this many times.
const RELEASE_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    pub product_id: String,
    pub quantity: u32,
    pub price_cents: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub order_id: String,
    pub user: String,
    pub items: Vec<OrderLine>,
    pub amount_cents: u64,
    /// pending, placed, out_of_stock, inventory_failed, payment_failed, shipping_failed.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shipment_id: Option<String>,
}

/// A `POST /orders` body, checked and priced from the catalog.
pub fn parse_order(body: &Value) -> Result<(String, Vec<OrderLine>), InputError> {
    let fields = object(body)?;
    let user = fields.string("user")?.to_string();
    let items = fields.objects("items", |item| {
        let product_id = item.string("productId")?;
        let product = catalog::find(product_id).ok_or_else(|| {
            InputError::new(
                item.path_of("productId"),
                format!("no product {product_id:?}"),
            )
        })?;
        let quantity = item.whole("quantity", 1..=MAX_LINE_QUANTITY)?;
        Ok(OrderLine {
            product_id: product.id.to_string(),
            quantity: u32::try_from(quantity).unwrap_or(u32::MAX),
            price_cents: product.price_cents,
        })
    })?;
    Ok((user, items))
}

pub fn amount_cents(items: &[OrderLine]) -> u64 {
    items
        .iter()
        .map(|line| line.price_cents * u64::from(line.quantity))
        .sum()
}

#[derive(Debug, Clone)]
struct OrderService {
    mesh: Mesh,
    orders: Arc<Mutex<BTreeMap<String, Order>>>,
    next: Arc<AtomicU64>,
}

impl OrderService {
    fn save(&self, order: &Order) {
        self.orders
            .lock()
            .insert(order.order_id.clone(), order.clone());
    }

    /// Gives the order's reservation back; `true` once inventory holds nothing for
    /// it (released now, or never held).
    async fn release(&self, order_id: &str, trace: &Trace) -> bool {
        let mut inventory = self.mesh.inventory();
        for attempt in 1..=RELEASE_ATTEMPTS {
            let request = trace.grpc(ReleaseRequest {
                order_id: order_id.to_string(),
            });
            match inventory.release(request).await {
                Ok(answer) => {
                    let released = answer.into_inner().released;
                    tracing::info!(order_id, released, "compensation: reservation released");
                    return true;
                }
                Err(status) => {
                    tracing::warn!(order_id, attempt, code = ?status.code(), message = status.message(), "compensation: release failed");
                    if attempt < RELEASE_ATTEMPTS {
                        tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                    }
                }
            }
        }
        tracing::error!(
            order_id,
            "compensation failed: the reservation is still held"
        );
        false
    }
}

pub fn routes(mesh: Mesh) -> ServiceRoutes {
    let service = OrderService {
        mesh,
        orders: Arc::default(),
        next: Arc::new(AtomicU64::new(1)),
    };
    ServiceRoutes {
        http: Router::new()
            .route("/orders", post(place))
            .route("/orders/{id}", get(find))
            .with_state(service),
        grpc: None,
    }
}

async fn find(
    State(service): State<OrderService>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let orders = service.orders.lock();
    orders
        .get(&id)
        .map(|order| reply::json(StatusCode::OK, order))
        .ok_or_else(|| ApiError::not_found(format!("no order {id:?}")))
}

/// An answer that ends the saga early, after the order was recorded as `status`.
fn ended(status: StatusCode, order: &Order, details: Value) -> Response {
    let mut body = json!({ "orderId": order.order_id, "status": order.status });
    if let (Some(body), Value::Object(details)) = (body.as_object_mut(), details) {
        body.extend(details);
    }
    reply::json(status, &body)
}

async fn place(
    State(service): State<OrderService>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let trace = Trace::of(&headers);
    let (user, items) = parse_order(&json_body(&body)?)?;
    let sequence = service.next.fetch_add(1, Ordering::Relaxed);
    let mut order = Order {
        // The random part keeps ids unique across replicas and restarts.
        order_id: format!("ord-{sequence:06}-{:04x}", fastrand::u16(..)),
        amount_cents: amount_cents(&items),
        user,
        items,
        status: "pending",
        payment_id: None,
        shipment_id: None,
    };
    service.save(&order);
    let order_id = order.order_id.clone();

    // (1) Reserve the items.
    let reserve = trace.grpc(ReserveRequest {
        order_id: order_id.clone(),
        items: order
            .items
            .iter()
            .map(|line| Item {
                product_id: line.product_id.clone(),
                quantity: line.quantity,
            })
            .collect(),
    });
    if let Err(status) = service.mesh.inventory().reserve(reserve).await {
        tracing::info!(order_id, code = ?status.code(), message = status.message(), "reservation failed");
        return Ok(match status.code() {
            Code::FailedPrecondition => {
                order.status = "out_of_stock";
                service.save(&order);
                ended(
                    StatusCode::CONFLICT,
                    &order,
                    json!({ "error": status.message() }),
                )
            }
            _ => {
                // The reservation may have been made and only the answer lost.
                let released = service.release(&order_id, &trace).await;
                order.status = "inventory_failed";
                service.save(&order);
                ended(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &order,
                    json!({
                        "error": format!("inventory: {:?}: {}", status.code(), status.message()),
                        "inventoryReleased": released,
                    }),
                )
            }
        });
    }

    // (2) Charge the total.
    let payment_body = json!({
        "orderId": order_id,
        "user": order.user,
        "amountCents": order.amount_cents,
    });
    let charged = service
        .mesh
        .post("payment", "/payments", &payment_body, &trace)
        .await
        .and_then(|answer| id_of(&answer.success_json()?, "payment"));
    let payment_id = match charged {
        Ok(id) => id,
        Err(error) => {
            tracing::info!(order_id, %error, "payment failed");
            let released = service.release(&order_id, &trace).await;
            order.status = "payment_failed";
            service.save(&order);
            return Ok(ended(
                StatusCode::PAYMENT_REQUIRED,
                &order,
                json!({ "error": error.to_string(), "inventoryReleased": released }),
            ));
        }
    };
    order.payment_id = Some(payment_id.clone());

    // (3) Book the shipment.
    let shipment_body = json!({ "orderId": order_id, "user": order.user });
    let booked = service
        .mesh
        .post("shipping", "/shipments", &shipment_body, &trace)
        .await
        .and_then(|answer| id_of(&answer.success_json()?, "shipping"));
    let shipment_id = match booked {
        Ok(id) => id,
        Err(error) => {
            tracing::info!(order_id, %error, "shipping failed");
            let released = service.release(&order_id, &trace).await;
            order.status = "shipping_failed";
            service.save(&order);
            return Ok(ended(
                StatusCode::BAD_GATEWAY,
                &order,
                json!({
                    "error": error.to_string(),
                    "inventoryReleased": released,
                    "paymentId": payment_id,
                }),
            ));
        }
    };
    order.shipment_id = Some(shipment_id.clone());
    order.status = "placed";
    service.save(&order);

    // (4) Tell analytics, without making the customer wait for it.
    let event = json!({
        "type": "order_placed",
        "orderId": order_id,
        "amountCents": order.amount_cents,
    });
    let mesh = service.mesh.clone();
    tokio::spawn(async move {
        let sent = mesh.post("analytics", "/events", &event, &trace).await;
        if let Err(error) = sent.and_then(|answer| answer.success_json()) {
            tracing::warn!(%error, "analytics event lost");
        }
    });

    tracing::info!(order_id, amount_cents = order.amount_cents, "order placed");
    Ok(reply::json(
        StatusCode::CREATED,
        &json!({
            "orderId": order_id,
            "status": "placed",
            "paymentId": payment_id,
            "shipmentId": shipment_id,
        }),
    ))
}

/// The `id` of what another service created.
fn id_of(answer: &Value, service: &'static str) -> Result<String, MeshError> {
    answer["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| MeshError {
            service,
            problem: format!("answered without an id: {answer}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_is_priced_from_the_catalog() {
        let body = json!({"user": "ann", "items": [{"productId": "p-02", "quantity": 3},
                                                   {"productId": "p-07", "quantity": 1}]});
        let (user, items) = parse_order(&body).unwrap();
        assert_eq!(user, "ann");
        assert_eq!(amount_cents(&items), 3 * 1_499 + 6_499);
    }

    #[test]
    fn a_bad_line_is_named() {
        let body = json!({"user": "ann", "items": [{"productId": "p-02", "quantity": 1},
                                                   {"productId": "p-99", "quantity": 1}]});
        let error = parse_order(&body).unwrap_err();
        assert_eq!(error.field, "items[1].productId");
        let body = json!({"user": "ann", "items": [{"productId": "p-02", "quantity": 101}]});
        assert_eq!(parse_order(&body).unwrap_err().field, "items[0].quantity");
        let body = json!({"user": "ann", "items": []});
        assert_eq!(parse_order(&body).unwrap_err().field, "items");
    }
}
