//! The marketplace demo services inside the real mesh: a checkout through the
//! storefront crosses storefront → order → inventory (gRPC), payment and shipping, each
//! hop over mTLS with the caller's own identity; and when payment fails, the order's
//! saga releases the reservation it made. A service's inbound port takes nobody
//! without a mesh certificate; with the marketplace's own resources applied in its
//! namespace only order may pay; and what `trellisctl stat` and `trellisctl tap`
//! show is what the test sent.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use trellis_ca::{Credentials, TrustBundle, client_config};
use trellis_tests::{
    control_plane::{
        ControlPlane, ControlPlaneSpec, MeshSidecar, MeshSidecarSpec, trellisctl_binary,
    },
    marketplace::{MarketplaceService, json_call},
    mesh::{http1_client, metric_value, scrape, workload_id},
    within,
};

/// The shopper's sidecar fronts no app: it only sends.
const NOWHERE: &str = "127.0.0.1:9";

const STRICT_MTLS: &str = "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\n\
                           metadata: {name: default}\n\
                           spec: {mtls: STRICT, defaultAuthorization: allow-mesh}\n";

struct Marketplace {
    services: BTreeMap<&'static str, MarketplaceService>,
    shopper: MeshSidecar,
    cp: ControlPlane,
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
            cp,
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

/// A charge as order sends it.
fn charge(order_id: &str) -> Value {
    json!({ "orderId": order_id, "user": "alice", "amountCents": 1299 })
}

/// Dials `inbound` over TLS with the mesh's roots and no client certificate, sends an
/// HTTP/2 preface and reads: a refused client sees the connection fail, not an answer.
async fn tls_without_a_certificate(
    inbound: SocketAddr,
    anchors: &Path,
    expected_id: &str,
) -> Result<usize, String> {
    let bundle = TrustBundle::from_pem(&std::fs::read_to_string(anchors).unwrap()).unwrap();
    let creds = Credentials::new(bundle);
    let mut config = client_config(&creds, Some(expected_id.parse().unwrap())).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let name = ServerName::try_from("mesh").unwrap();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf).await {
        Ok(0) => Err("closed".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Waits until the sidecar at `admin` has counted `n` refused inbound handshakes for
/// `reason` (it counts once the connection is already closing).
async fn assert_handshakes_refused(admin: SocketAddr, reason: &str, n: f64) {
    let labels = [("direction", "inbound"), ("reason", reason)];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counted = metric_value(
            &scrape(admin).await,
            "trellis_tls_handshake_errors_total",
            &labels,
        );
        if counted == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{counted} handshakes refused for {reason}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_request_to_an_inbound_port_needs_a_mesh_certificate() {
    let shop = Marketplace::start(&["payment"]).await;
    let payment = &shop.service("payment").sidecar;

    // Plain HTTP, as anyone on the machine could send it: the connection is closed.
    let request = Request::post(format!("http://{}/payments", payment.inbound))
        .header(header::HOST, "payment")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(charge("o-plain").to_string())))
        .unwrap();
    let plain = within("plaintext", http1_client().request(request)).await;
    assert!(
        plain.is_err(),
        "plaintext was answered: {:?}",
        plain.map(|r| r.status())
    );
    assert_handshakes_refused(payment.admin, "plaintext", 1.0).await;

    // TLS that trusts the mesh's CA but shows no certificate of its own.
    let anchors = shop.cp.trust_anchors();
    let tls = within(
        "TLS without a certificate",
        tls_without_a_certificate(payment.inbound, &anchors, &workload_id("payment")),
    )
    .await;
    assert!(tls.is_err(), "a client without a certificate was answered");
    assert_handshakes_refused(payment.admin, "no_client_certificate", 1.0).await;

    // The same charge from a mesh workload, through its sidecar, goes through.
    let (status, paid) = json_call(
        shop.shopper.outbound,
        "payment",
        Method::POST,
        "/payments",
        Some(&charge("o-mesh")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{paid}");
    let (_, payments) = shop
        .service("payment")
        .call(Method::GET, "/payments/o-plain", None)
        .await;
    assert_ne!(
        payments["orderId"], "o-plain",
        "the plaintext charge was made"
    );
}

const NAMESPACE: &str = "marketplace";

/// Payment (v1, the subset its route sends to) in namespace `marketplace` with the
/// marketplace's resources applied, and two sidecars that only send: order's, which
/// may pay, and shipping's, which may not. Both report every 200 ms.
struct PaymentDesk {
    payment: MarketplaceService,
    order: MeshSidecar,
    shipping: MeshSidecar,
    cp: ControlPlane,
    _dir: tempfile::TempDir,
}

impl PaymentDesk {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(dir.path(), &ControlPlaneSpec::default());
        let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/examples");
        let applied = cp.trellisctl(&[
            "apply",
            "-f",
            &format!("{examples}/mesh-config.yaml"),
            "-f",
            &format!("{examples}/marketplace"),
        ]);
        assert!(applied.success, "{}", applied.stderr);
        assert!(
            applied
                .stdout
                .contains("authorizationpolicy marketplace/payment created"),
            "{}",
            applied.stdout
        );
        let payment = MarketplaceService::start_with(&cp, "payment", &[], |spec| {
            spec.in_namespace(NAMESPACE).label("version", "v1")
        })
        .await;
        let sender = |service: &str| MeshSidecarSpec {
            report_interval: Some("200ms"),
            ..MeshSidecarSpec::new(service, NOWHERE.parse().unwrap()).in_namespace(NAMESPACE)
        };
        let order = cp.sidecar(sender("order")).await;
        let shipping = cp.sidecar(sender("shipping")).await;
        cp.converged(3).await;
        Self {
            payment,
            order,
            shipping,
            cp,
            _dir: dir,
        }
    }

    /// `trellisctl ARGS -o json`, which must succeed.
    fn ctl_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let output = self.cp.trellisctl(&args);
        assert!(output.success, "trellisctl {args:?}: {}", output.stderr);
        serde_json::from_str(&output.stdout).unwrap()
    }
}

fn marketplace_id(service: &str) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{service}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_order_may_pay_and_stat_counts_what_each_caller_sent() {
    let desk = PaymentDesk::start().await;
    const CHARGES: u64 = 7;
    for i in 0..CHARGES {
        let order_id = format!("o-{i}");
        let (status, paid) = json_call(
            desk.order.outbound,
            "payment",
            Method::POST,
            "/payments",
            Some(&charge(&order_id)),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{paid}");
        assert_eq!(paid["orderId"], order_id.as_str(), "{paid}");
    }
    // Shipping has a certificate of this mesh, but payment's policy names only order.
    let (status, refused) = json_call(
        desk.shipping.outbound,
        "payment",
        Method::POST,
        "/payments",
        Some(&charge("o-shipping")),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    let request = Request::post(format!("http://{}/payments", desk.shipping.outbound))
        .header(header::HOST, "payment")
        .body(Full::new(Bytes::from(charge("o-shipping").to_string())))
        .unwrap();
    let response = within("refused", http1_client().request(request))
        .await
        .unwrap();
    assert_eq!(response.headers()["x-trellis-error"], "unauthorized");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains(&marketplace_id("shipping")), "{body}");
    let (_, lookup) = desk
        .payment
        .call(Method::GET, "/payments/o-shipping", None)
        .await;
    assert_ne!(
        lookup["orderId"], "o-shipping",
        "shipping's charge was made"
    );
    let refused_count = 2;

    // `stat`: payment's route was asked CHARGES + 2 times, CHARGES of them answered.
    let deadline = Instant::now() + Duration::from_secs(20);
    let per_route = loop {
        let stats = desk.ctl_json(&["stat", "payment", "-n", NAMESPACE]);
        let items = stats["items"].as_array().unwrap().clone();
        let total = |field: &str| -> u64 { items.iter().map(|i| i[field].as_u64().unwrap()).sum() };
        if total("requests") == CHARGES + refused_count {
            assert_eq!(total("successes"), CHARGES, "{stats:#}");
            break items;
        }
        assert!(
            Instant::now() < deadline,
            "stat never showed {} requests to payment: {stats:#}",
            CHARGES + refused_count
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rows: Vec<(&str, &str)> = per_route
        .iter()
        .map(|i| (i["route"].as_str().unwrap(), i["backend"].as_str().unwrap()))
        .collect();
    assert_eq!(rows, [("charge", "v1")], "{per_route:#?}");

    // `stat --edges`: who sent what, each caller on its own row.
    let edges = desk.ctl_json(&["stat", "--edges", "--service", "payment", "-n", NAMESPACE]);
    let edges: Vec<(String, u64, u64)> = edges["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(
                (e["namespace"].as_str(), e["service"].as_str()),
                (Some(NAMESPACE), Some("payment")),
                "{e}"
            );
            (
                format!(
                    "{}/{}",
                    e["callerNamespace"].as_str().unwrap(),
                    e["caller"].as_str().unwrap()
                ),
                e["requests"].as_u64().unwrap(),
                e["successes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        edges,
        [
            (format!("{NAMESPACE}/order"), CHARGES, CHARGES),
            (format!("{NAMESPACE}/shipping"), refused_count, 0),
        ]
    );
    let (status, refused) = desk.cp.call(Method::GET, "/v1/stats?by=caller", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(
        refused["error"],
        "by \"caller\": must be route (the default) or edge"
    );
    let table = desk.cp.trellisctl(&["stat", "--edges", "-n", NAMESPACE]);
    assert!(table.success, "{}", table.stderr);
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", table.stdout);
    assert!(
        lines[0].starts_with("FROM       TO        RPS"),
        "{}",
        table.stdout
    );
    assert!(
        lines[1].starts_with("order      payment   "),
        "{}",
        table.stdout
    );
    assert!(lines[1].contains(" 100.00% "), "{}", table.stdout);
    assert!(
        lines[2].starts_with("shipping   payment   "),
        "{}",
        table.stdout
    );
    assert!(lines[2].contains(" 0.00% "), "{}", table.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_shows_a_request_the_test_sent_as_it_happens() {
    let desk = PaymentDesk::start().await;
    let proxies = desk.cp.proxies().await;
    let payment_proxy = proxies.iter().find(|p| p["service"] == "payment").unwrap();
    assert_eq!(
        payment_proxy["admin"],
        desk.payment.sidecar.admin.to_string(),
        "the registry knows where payment's admin server is"
    );

    let mut tap = Command::new(trellisctl_binary());
    tap.arg("--data-dir")
        .arg(&desk.cp.data_dir)
        .args([
            "tap", "payment", "-n", NAMESPACE, "--max", "1", "-o", "json",
        ])
        .args(["--duration", "30s"])
        .env_remove("TRELLIS_API_ADDR")
        .env_remove("TRELLIS_API_TOKEN");
    let tapping = tokio::task::spawn_blocking(move || tap.output().unwrap());

    // The tap prints requests from the moment it is connected, which the test cannot
    // see: it charges, each with its own request id, until the tap has printed one.
    let mut sent = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tapping.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the tap printed nothing: sent {sent:?}"
        );
        let request_id = format!("tap-test-{}", sent.len());
        let request = Request::post(format!("http://{}/payments", desk.order.outbound))
            .header(header::HOST, "payment")
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-request-id", &request_id)
            .body(Full::new(Bytes::from(charge(&request_id).to_string())))
            .unwrap();
        let response = within("charge", http1_client().request(request))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        sent.push(request_id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = tapping.await.unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--max 1: {stdout}");
    let line: Value = serde_json::from_str(lines[0]).unwrap();
    let request_id = line["requestId"].as_str().unwrap();
    assert!(
        sent.iter().any(|s| s == request_id),
        "{line} not among {sent:?}"
    );
    assert_eq!(line["path"], "/payments", "{line}");
    assert_eq!(line["method"], "POST", "{line}");
    assert_eq!(line["status"], 201, "{line}");
    assert_eq!(line["direction"], "inbound", "{line}");
    assert_eq!(line["source"], marketplace_id("order").as_str(), "{line}");
    assert_eq!(
        line["destination"],
        marketplace_id("payment").as_str(),
        "{line}"
    );
    assert!(line["latencyMs"].as_f64().unwrap() > 0.0, "{line}");
    assert!(
        line["proxy"].as_str().unwrap().starts_with("payment-"),
        "{line}"
    );
    assert!(
        stderr.contains("tapping 1 proxy of marketplace/payment"),
        "{stderr}"
    );
}
