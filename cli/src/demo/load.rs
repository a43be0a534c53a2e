//! Customer-like traffic through the gateway: shoppers browse, search, look at their
//! account, fill carts and check out, at a steady rate. Every answer is kept (when,
//! what, status, latency) so the view and the summary can say what customers saw.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Requests in flight at most; beyond that a tick is skipped rather than piling up.
const MAX_IN_FLIGHT: usize = 64;
/// A customer gives up after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The marketplace's seeded users, products (`p-01`…) and product categories.
const SHOPPERS: [&str; 5] = ["alice", "bob", "chen", "dana", "emil"];
const PRODUCTS: u32 = 12;
const SEARCHES: [&str; 6] = [
    "footwear",
    "outdoor",
    "apparel",
    "bags",
    "kitchen",
    "electronics",
];

/// What a shopper does, and how often (weights out of 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Browse,
    Search,
    Account,
    AddToCart,
    Checkout,
}

const MIX: [(Action, u32); 5] = [
    (Action::Browse, 45),
    (Action::Search, 15),
    (Action::Account, 10),
    (Action::AddToCart, 20),
    (Action::Checkout, 10),
];

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Self::Browse => "browse",
            Self::Search => "search",
            Self::Account => "account",
            Self::AddToCart => "add to cart",
            Self::Checkout => "checkout",
        }
    }

    fn draw() -> Self {
        let mut draw = fastrand::u32(..100);
        for (action, weight) in MIX {
            if draw < weight {
                return action;
            }
            draw -= weight;
        }
        Self::Browse
    }

    fn request(self, gateway: SocketAddr) -> Request<Full<Bytes>> {
        let shopper = SHOPPERS[fastrand::usize(..SHOPPERS.len())];
        let product = fastrand::u32(1..=PRODUCTS);
        let (method, path, body) = match self {
            Self::Browse => (Method::GET, "/products".to_string(), String::new()),
            Self::Search => {
                let q = SEARCHES[fastrand::usize(..SEARCHES.len())];
                (Method::GET, format!("/search?q={q}"), String::new())
            }
            Self::Account => (Method::GET, format!("/users/{shopper}"), String::new()),
            Self::AddToCart => (
                Method::POST,
                format!("/cart/{shopper}/items"),
                format!(r#"{{"productId":"p-{product:02}","quantity":1}}"#),
            ),
            Self::Checkout => (Method::POST, format!("/checkout/{shopper}"), String::new()),
        };
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = method;
        *request.uri_mut() = format!("http://{gateway}{path}")
            .parse()
            .unwrap_or_default();
        if let Ok(host) = "shop.example".parse() {
            request.headers_mut().insert(header::HOST, host);
        }
        if let Ok(json) = "application/json".parse() {
            request.headers_mut().insert(header::CONTENT_TYPE, json);
        }
        request
    }
}

/// One answer a shopper got.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// Since the traffic started.
    pub at: Duration,
    pub action: Action,
    /// None: no answer (connection failure or timeout).
    pub status: Option<u16>,
    /// The mesh answered in the service's place (`x-trellis-error`): refused,
    /// rate-limited, unrouted, circuit open.
    pub mesh_error: bool,
    pub latency: Duration,
}

impl Answer {
    /// What a customer would call an error: no answer, a 5xx, an answer the mesh gave
    /// in the service's place, or a 4xx the shop never gives a well-behaved shopper. A
    /// declined checkout (402) and a checkout of an empty cart (409) are answers.
    pub fn failed(&self) -> bool {
        match self.status {
            None => true,
            Some(_) if self.mesh_error => true,
            Some(402 | 409) => false,
            Some(status) => status >= 400,
        }
    }
}

/// Everything the shoppers saw so far.
#[derive(Debug, Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<Answer>>>);

impl Seen {
    pub fn snapshot(&self) -> Vec<Answer> {
        self.0.lock().clone()
    }

    fn push(&self, answer: Answer) {
        self.0.lock().push(answer);
    }
}

/// Sends `rate` requests a second to the gateway until `stop`.
pub async fn run(gateway: SocketAddr, rate: u32, seen: Seen, stop: CancellationToken) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .build(connector);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            continue;
        };
        let (client, seen) = (client.clone(), seen.clone());
        tokio::spawn(async move {
            let action = Action::draw();
            let sent = Instant::now();
            let exchange = async {
                let response = client.request(action.request(gateway)).await.ok()?;
                let status = response.status().as_u16();
                let mesh_error = response.headers().contains_key("x-trellis-error");
                // Read to the end: latency is what the customer waited for.
                response.into_body().collect().await.ok()?;
                Some((status, mesh_error))
            };
            let answered = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                .await
                .ok()
                .flatten();
            seen.push(Answer {
                at: sent.duration_since(started),
                action,
                status: answered.map(|(status, _)| status),
                mesh_error: answered.is_some_and(|(_, mesh)| mesh),
                latency: sent.elapsed(),
            });
            drop(permit);
        });
    }
}

/// Counts, failures and latency percentiles of some answers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    pub requests: usize,
    pub failures: usize,
    pub p50: Duration,
    pub p99: Duration,
}

impl Tally {
    pub fn of<'a>(answers: impl Iterator<Item = &'a Answer>) -> Self {
        let mut latencies = Vec::new();
        let mut failures = 0;
        for answer in answers {
            latencies.push(answer.latency);
            failures += usize::from(answer.failed());
        }
        latencies.sort();
        let at = |q: f64| {
            let rank = ((latencies.len() as f64) * q).ceil() as usize;
            latencies
                .get(rank.saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        Self {
            requests: latencies.len(),
            failures,
            p50: at(0.50),
            p99: at(0.99),
        }
    }

    /// Percent answered without a failure; 100 without requests.
    pub fn success_rate(&self) -> f64 {
        if self.requests == 0 {
            return 100.0;
        }
        100.0 * (self.requests - self.failures) as f64 / self.requests as f64
    }
}

/// The answers of each action.
pub fn by_action(answers: &[Answer]) -> BTreeMap<Action, Tally> {
    let mut actions: BTreeMap<Action, Vec<Answer>> = BTreeMap::new();
    for answer in answers {
        actions.entry(answer.action).or_default().push(*answer);
    }
    actions
        .into_iter()
        .map(|(action, answers)| (action, Tally::of(answers.iter())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(ms: u64, status: Option<u16>) -> Answer {
        Answer {
            at: Duration::ZERO,
            action: Action::Browse,
            status,
            mesh_error: false,
            latency: Duration::from_millis(ms),
        }
    }

    #[test]
    fn a_tally_counts_failures_and_takes_percentiles() {
        let mut answers: Vec<Answer> = (1..=100).map(|ms| answer(ms, Some(200))).collect();
        answers.push(answer(500, Some(503)));
        answers.push(answer(10_000, None));
        answers.push(answer(7, Some(402)));
        let tally = Tally::of(answers.iter());
        assert_eq!((tally.requests, tally.failures), (103, 2));
        assert_eq!(tally.p50, Duration::from_millis(51));
        assert_eq!(tally.p99, Duration::from_millis(500));
        assert!((tally.success_rate() - 100.0 * 101.0 / 103.0).abs() < 1e-9);
        // The mesh refusing, limiting or not routing is a failure whatever the status.
        let refused = Answer {
            mesh_error: true,
            ..answer(1, Some(429))
        };
        assert!(refused.failed());
        assert!(answer(1, Some(404)).failed());
        assert!(!answer(1, Some(409)).failed());
        assert_eq!(Tally::of([].iter()).success_rate(), 100.0);
    }

    #[test]
    fn the_mix_adds_up_to_every_draw() {
        assert_eq!(MIX.iter().map(|(_, w)| w).sum::<u32>(), 100);
        let drawn: std::collections::BTreeSet<Action> = (0..2000).map(|_| Action::draw()).collect();
        assert_eq!(drawn.len(), MIX.len());
    }
}
