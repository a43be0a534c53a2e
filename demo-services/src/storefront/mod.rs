//! `storefront`: the backend for the web client. It owns the catalog and the carts,
//! asks inventory for stock and recommendations for picks when showing products
//! (and shows what it has when either is down), and turns a cart into an order.

pub mod cart;

use std::sync::Arc;

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, RawQuery, State},
    response::Response,
    routing::{get, post},
};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};

use self::cart::Carts;
use crate::{
    catalog::{self, PRODUCTS, Product},
    input::{InputError, json_body, object, query_param},
    mesh::{Mesh, MeshAnswer, Trace},
    reply::{self, ApiError},
    serve::ServiceRoutes,
};

/// The mesh's own error header (circuit-open, bulkhead-full, ...), passed on so the
/// client can tell the mesh's refusals from the services' answers.
const TRELLIS_ERROR: &str = "x-trellis-error";

#[derive(Debug, Clone)]
struct Storefront {
    mesh: Mesh,
    carts: Arc<Mutex<Carts>>,
}

pub fn routes(mesh: Mesh) -> ServiceRoutes {
    let service = Storefront {
        mesh,
        carts: Arc::default(),
    };
    ServiceRoutes {
        http: Router::new()
            .route("/products", get(products))
            .route("/products/{id}", get(product))
            .route("/search", get(search))
            .route("/cart/{user}", get(show_cart))
            .route("/cart/{user}/items", post(add_to_cart))
            .route("/checkout/{user}", post(checkout))
            .with_state(service),
        grpc: None,
    }
}

/// A user name as it appears in paths: short, and nothing that needs escaping.
fn check_user(user: &str) -> Result<(), InputError> {
    let valid = (1..=64).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(InputError::new(
            "user",
            format!("expected 1 to 64 letters, digits, '.', '_' or '-', got {user:?}"),
        ))
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ProductView {
    #[serde(flatten)]
    product: &'static Product,
    /// Units available, or null when inventory could not say.
    stock: Option<u64>,
}

/// Available units per product from inventory's `GET /stock`.
async fn stock(mesh: &Mesh, trace: &Trace) -> Result<Value, String> {
    let answer = mesh
        .get("inventory", "/stock", trace)
        .await
        .and_then(|answer| answer.success_json())
        .map_err(|e| e.to_string())?;
    Ok(answer["stock"].clone())
}

fn view(product: &'static Product, stock: Option<&Value>) -> ProductView {
    ProductView {
        product,
        stock: stock.and_then(|s| s[product.id]["available"].as_u64()),
    }
}

async fn products(
    State(service): State<Storefront>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let user = query_param(query.as_deref(), "user")?.unwrap_or_else(|| "guest".to_string());
    check_user(&user)?;
    let trace = Trace::of(&headers);
    let picks_path = format!("/recommendations?user={user}");
    let (stock, picks) = tokio::join!(
        stock(&service.mesh, &trace),
        service.mesh.get("recommendations", &picks_path, &trace),
    );
    let mut degraded = Vec::new();
    let stock = stock
        .inspect_err(|error| {
            tracing::warn!(%error, "showing products without stock");
            degraded.push("inventory");
        })
        .ok();
    let picks = picks
        .and_then(|answer| answer.success_json())
        .inspect_err(|error| {
            tracing::warn!(%error, "showing products without recommendations");
            degraded.push("recommendations");
        })
        .ok();
    let products: Vec<_> = PRODUCTS.iter().map(|p| view(p, stock.as_ref())).collect();
    Ok(reply::json(
        StatusCode::OK,
        &json!({ "products": products, "recommendations": picks, "degraded": degraded }),
    ))
}

async fn product(
    State(service): State<Storefront>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let product =
        catalog::find(&id).ok_or_else(|| ApiError::not_found(format!("no product {id:?}")))?;
    let stock = stock(&service.mesh, &Trace::of(&headers))
        .await
        .inspect_err(|error| tracing::warn!(%error, "showing a product without stock"))
        .ok();
    Ok(reply::json(StatusCode::OK, &view(product, stock.as_ref())))
}

async fn search(RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    let q = query_param(query.as_deref(), "q")?
        .filter(|q| !q.trim().is_empty())
        .ok_or_else(|| InputError::new("q", "required query parameter"))?;
    let needle = q.trim().to_lowercase();
    let found: Vec<&Product> = PRODUCTS
        .iter()
        .filter(|p| {
            p.name.to_lowercase().contains(&needle) || p.category.to_lowercase().contains(&needle)
        })
        .collect();
    Ok(reply::json(
        StatusCode::OK,
        &json!({ "query": q, "products": found }),
    ))
}

async fn show_cart(
    State(service): State<Storefront>,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    check_user(&user)?;
    let view = service.carts.lock().view(&user);
    Ok(reply::json(StatusCode::OK, &view))
}

async fn add_to_cart(
    State(service): State<Storefront>,
    Path(user): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_user(&user)?;
    let body = json_body(&body)?;
    let fields = object(&body)?;
    let product_id = fields.string("productId")?;
    let quantity = fields.whole("quantity", 1..=cart::MAX_LINE_QUANTITY)?;
    let view = {
        let mut carts = service.carts.lock();
        carts.add(&user, product_id, quantity)?;
        carts.view(&user)
    };
    Ok(reply::json(StatusCode::OK, &view))
}

/// Places the cart as an order and answers with the order's status and body, so the
/// client sees exactly why a checkout failed (409 out of stock, 402 payment failed).
async fn checkout(
    State(service): State<Storefront>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    check_user(&user)?;
    let lines = service.carts.lock().lines(&user);
    if lines.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("the cart of {user:?} is empty"),
        ));
    }
    let items: Vec<Value> = lines
        .iter()
        .map(|(id, quantity)| json!({ "productId": id, "quantity": quantity }))
        .collect();
    let answer = service
        .mesh
        .post(
            "order",
            "/orders",
            &json!({ "user": user, "items": items }),
            &Trace::of(&headers),
        )
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    if answer.status.is_success() {
        service.carts.lock().remove_ordered(&user, &lines);
    }
    tracing::info!(user, status = answer.status.as_u16(), "checkout");
    Ok(passed_through(answer))
}

fn passed_through(answer: MeshAnswer) -> Response {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    let content_type = answer
        .headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/json"));
    headers.insert(header::CONTENT_TYPE, content_type);
    if let Some(error) = answer.headers.get(TRELLIS_ERROR) {
        headers.insert(TRELLIS_ERROR, error.clone());
    }
    response
}
