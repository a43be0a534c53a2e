//! `inventory`: stock per product and reservations per order. The order saga uses its
//! gRPC API (`marketplace.inventory.v1.Inventory`: Reserve, Release, Stock); HTTP
//! serves `GET /stock` (for the storefront) and `GET /reservations` (for tests and
//! operators) on the same port.

pub mod stock;

use std::{collections::BTreeMap, sync::Arc};

use axum::{Router, extract::State, response::Response, routing::get};
use http::StatusCode;
use parking_lot::Mutex;
use serde_json::json;
use tonic::{Request, Status};

use self::{
    grpc::{
        ReleaseRequest, ReleaseResponse, ReserveRequest, ReserveResponse, StockLevel, StockRequest,
        StockResponse,
        inventory_server::{Inventory, InventoryServer},
    },
    stock::{Line, ReserveError, Reserved, StockBook},
};
use crate::{reply, serve::ServiceRoutes};

/// Inventory's gRPC API, generated from `proto/marketplace/inventory/v1`.
#[allow(clippy::all, unreachable_pub, missing_debug_implementations)]
pub mod grpc {
    tonic::include_proto!("marketplace.inventory.v1");
}

#[derive(Debug, Clone)]
struct InventoryService {
    book: Arc<Mutex<StockBook>>,
}

pub fn routes() -> ServiceRoutes {
    let service = InventoryService {
        book: Arc::new(Mutex::new(StockBook::seeded())),
    };
    let http = Router::new()
        .route("/stock", get(http_stock))
        .route("/reservations", get(http_reservations))
        .with_state(service.clone());
    let grpc = tonic::service::Routes::new(InventoryServer::new(service))
        .prepare()
        .into_axum_router();
    ServiceRoutes {
        http,
        grpc: Some(grpc),
    }
}

async fn http_stock(State(service): State<InventoryService>) -> Response {
    let stock = service.book.lock().levels().clone();
    reply::json(StatusCode::OK, &json!({ "stock": stock }))
}

async fn http_reservations(State(service): State<InventoryService>) -> Response {
    let reservations: BTreeMap<String, Vec<Line>> = service.book.lock().reservations().clone();
    reply::json(StatusCode::OK, &json!({ "reservations": reservations }))
}

fn status_of(error: &ReserveError) -> Status {
    let message = error.to_string();
    match error {
        ReserveError::NoOrderId | ReserveError::NoItems | ReserveError::BadQuantity { .. } => {
            Status::invalid_argument(message)
        }
        ReserveError::UnknownProduct { .. } => Status::not_found(message),
        ReserveError::Insufficient { .. } => Status::failed_precondition(message),
        ReserveError::Conflict { .. } => Status::already_exists(message),
    }
}

#[tonic::async_trait]
impl Inventory for InventoryService {
    async fn reserve(
        &self,
        request: Request<ReserveRequest>,
    ) -> Result<tonic::Response<ReserveResponse>, Status> {
        let ReserveRequest { order_id, items } = request.into_inner();
        let lines: Vec<Line> = items
            .into_iter()
            .map(|item| Line {
                product_id: item.product_id,
                quantity: item.quantity,
            })
            .collect();
        let result = self.book.lock().reserve(&order_id, &lines);
        match result {
            Ok((reserved, restocked)) => {
                tracing::info!(order_id, repeat = reserved == Reserved::Repeat, "reserved");
                for product_id in restocked {
                    tracing::info!(product_id, "ran low: restocked");
                }
                Ok(tonic::Response::new(ReserveResponse {
                    order_id,
                    already_reserved: reserved == Reserved::Repeat,
                }))
            }
            Err(error) => {
                tracing::info!(order_id, %error, "reservation refused");
                Err(status_of(&error))
            }
        }
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<tonic::Response<ReleaseResponse>, Status> {
        let order_id = request.into_inner().order_id;
        if order_id.trim().is_empty() {
            return Err(Status::invalid_argument("order_id: must not be empty"));
        }
        let released = self.book.lock().release(&order_id);
        tracing::info!(order_id, released, "release");
        Ok(tonic::Response::new(ReleaseResponse { released }))
    }

    async fn stock(
        &self,
        request: Request<StockRequest>,
    ) -> Result<tonic::Response<StockResponse>, Status> {
        let wanted = request.into_inner().product_ids;
        let book = self.book.lock();
        let levels = book.levels();
        let level = |id: &String| {
            levels.get(id).map(|level| StockLevel {
                product_id: id.clone(),
                available: level.available,
                reserved: level.reserved,
            })
        };
        let levels = if wanted.is_empty() {
            levels.keys().filter_map(level).collect()
        } else {
            let mut found = Vec::with_capacity(wanted.len());
            for (index, id) in wanted.iter().enumerate() {
                match level(id) {
                    Some(level) => found.push(level),
                    None => {
                        return Err(Status::not_found(format!(
                            "product_ids[{index}]: no product {id:?}"
                        )));
                    }
                }
            }
            found
        };
        Ok(tonic::Response::new(StockResponse { levels }))
    }
}
