//! The marketplace demo services inside the real mesh: a checkout through the
//! storefront crosses storefront → order → inventory (gRPC), payment and shipping, each
//! hop over mTLS with the caller's own identity; and when payment fails, the order's
//! saga releases the reservation it made.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use serde_json::{Value, json};
use trellis_tests::{
    control_plane::{ControlPlane, ControlPlaneSpec, MeshSidecar, MeshSidecarSpec},
    marketplace::{MarketplaceService, json_call},
    mesh::workload_id,
};

/// The shopper's sidecar fronts no app: it only sends.
const NOWHERE: &str = "127.0.0.1:9";

const STRICT_MTLS: &str = "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\n\
                           metadata: {name: default}\n\
                           spec: {mtls: STRICT, defaultAuthorization: allow-mesh}\n";

struct Marketplace {
    services: BTreeMap<&'static str, MarketplaceService>,
    shopper: MeshSidecar,
    _cp: ControlPlane,
    _dir: tempfile::TempDir,
}

impl Marketplace {
    async fn start(services: &[&'static str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
        let (status, answer) = cp.apply(STRICT_MTLS).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let mut started = BTreeMap::new();
        for service in services {
            started.insert(*service, MarketplaceService::start(&cp, service, &[]).await);
        }
        let shopper = cp
            .sidecar(MeshSidecarSpec::new("shopper", NOWHERE.parse().unwrap()))
            .await;
        cp.converged(services.len() + 1).await;
        Self {
            services: started,
            shopper,
            _cp: cp,
            _dir: dir,
        }
    }

    fn service(&self, name: &str) -> &MarketplaceService {
        &self.services[name]
    }

    /// A request to the storefront as the shopper's app sends it: to its sidecar.
    async fn shop(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        json_call(
            self.shopper.outbound,
            "storefront",
            method,
            path,
            body.as_ref(),
        )
        .await
    }

    /// Inventory's stock, `{productId: {available, reserved}}`.
    async fn stock(&self) -> Value {
        let (status, answer) = self
            .service("inventory")
            .call(Method::GET, "/stock", None)
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer["stock"].clone()
    }

    async fn reservations(&self) -> Value {
        let inventory = self.service("inventory");
        let (status, answer) = inventory.call(Method::GET, "/reservations", None).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer["reservations"].clone()
    }

    async fn fill_cart(&self, user: &str) {
        for (product, quantity) in [("p-01", 2), ("p-05", 1)] {
            let item = json!({ "productId": product, "quantity": quantity });
            let (status, cart) = self
                .shop(Method::POST, &format!("/cart/{user}/items"), Some(item))
                .await;
            assert_eq!(status, StatusCode::OK, "{cart}");
        }
    }

    /// Waits until `service`'s app has been called by exactly `callers` (analytics
    /// hears of an order after the order answered).
    async fn assert_callers(&self, service: &str, callers: &[&str]) {
        let mut expected: Vec<String> = callers.iter().map(|c| workload_id(c)).collect();
        expected.sort();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let peers = self.service(service).peers().await;
            if peers == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{service} was called by {peers:?}, expected {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_crosses_every_hop_over_mtls() {
    let shop = Marketplace::start(&[
        "storefront",
        "order",
        "payment",
        "inventory",
        "shipping",
        "analytics",
        "recommendations",
    ])
    .await;

    // Browsing: the storefront adds inventory's stock and recommendations' picks.
    let (status, page) = shop.shop(Method::GET, "/products?user=alice", None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["degraded"], json!([]), "{page}");
    assert_eq!(page["products"].as_array().unwrap().len(), 12);
    assert!(page["products"][0]["stock"].as_u64().unwrap() > 0, "{page}");
    assert_eq!(page["recommendations"]["version"], "v1", "{page}");

    shop.fill_cart("alice").await;
    let before = shop.stock().await;
    let (status, order) = shop.shop(Method::POST, "/checkout/alice", None).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(order["status"], "placed", "{order}");
    let order_id = order["orderId"].as_str().unwrap();
    assert!(
        order["paymentId"].as_str().unwrap().starts_with("pay-"),
        "{order}"
    );
    assert!(
        order["shipmentId"].as_str().unwrap().starts_with("shp-"),
        "{order}"
    );

    // The cart is empty, the items are held for the order, the order is on record.
    let (_, cart) = shop.shop(Method::GET, "/cart/alice", None).await;
    assert_eq!(cart["items"], json!([]), "{cart}");
    let held = &shop.reservations().await[order_id];
    assert_eq!(
        held,
        &json!([{"productId": "p-01", "quantity": 2}, {"productId": "p-05", "quantity": 1}])
    );
    let after = shop.stock().await;
    for (product, quantity) in [("p-01", 2), ("p-05", 1)] {
        let available = |stock: &Value| stock[product]["available"].as_u64().unwrap();
        assert_eq!(
            available(&before) - available(&after),
            quantity,
            "{product}"
        );
    }
    let (status, recorded) = shop
        .service("order")
        .call(Method::GET, &format!("/orders/{order_id}"), None)
        .await;
    assert_eq!(
        (status, &recorded["status"]),
        (StatusCode::OK, &json!("placed"))
    );

    // Every hop arrived through a sidecar that verified the caller's certificate.
    shop.assert_callers("storefront", &["shopper"]).await;
    shop.assert_callers("order", &["storefront"]).await;
    shop.assert_callers("inventory", &["order", "storefront"])
        .await;
    shop.assert_callers("recommendations", &["storefront"])
        .await;
    shop.assert_callers("payment", &["order"]).await;
    shop.assert_callers("shipping", &["order"]).await;
    shop.assert_callers("analytics", &["order"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_payment_releases_the_reservation() {
    let shop =
        Marketplace::start(&["storefront", "order", "payment", "inventory", "shipping"]).await;
    let payment = shop.service("payment");
    let (status, knobs) = payment
        .call(
            Method::PUT,
            "/admin/faults",
            Some(&json!({"errorRate": 1.0})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{knobs}");
    assert_eq!(knobs, json!({"errorRate": 1.0, "latencyMs": 0}));

    shop.fill_cart("bob").await;
    let before = shop.stock().await;
    let (status, declined) = shop.shop(Method::POST, "/checkout/bob", None).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{declined}");
    assert_eq!(declined["status"], "payment_failed", "{declined}");
    assert_eq!(declined["inventoryReleased"], true, "{declined}");
    // The charge reached payment through the mesh and was refused there.
    assert!(
        declined["error"].as_str().unwrap().contains("500"),
        "{declined}"
    );
    shop.assert_callers("payment", &["order"]).await;

    assert_eq!(shop.reservations().await, json!({}));
    assert_eq!(shop.stock().await, before, "stock is back where it was");
    let order_id = declined["orderId"].as_str().unwrap();
    let (_, recorded) = shop
        .service("order")
        .call(Method::GET, &format!("/orders/{order_id}"), None)
        .await;
    assert_eq!(recorded["status"], "payment_failed", "{recorded}");
    let (_, cart) = shop.shop(Method::GET, "/cart/bob", None).await;
    assert_eq!(
        cart["items"].as_array().unwrap().len(),
        2,
        "a declined cart is kept: {cart}"
    );

    // Payment heals: the same cart now goes through.
    payment
        .call(Method::PUT, "/admin/faults", Some(&json!({"errorRate": 0})))
        .await;
    let (status, order) = shop.shop(Method::POST, "/checkout/bob", None).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(shop.reservations().await.as_object().unwrap().len(), 1);
}
