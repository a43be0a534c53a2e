//! `trellisctl demo`: the marketplace inside the mesh on this machine. It starts the
//! control plane, every marketplace service with its own sidecar and the ingress
//! gateway as real processes on loopback, applies `crds/examples/marketplace/`, sends
//! customers through the gateway and plays a scenario (payment fails for a while, its
//! breaker opens and closes; the recommendations canary climbs; payment v2 shadows
//! v1), showing it live or, with `--duration`, summing it up at the end.

pub mod load;
pub mod observe;
pub mod processes;
pub mod view;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::{
    api::Api,
    connection::{Endpoint, Origin},
    error::CliError,
};
use load::Seen;
use observe::{NAMESPACE, Observation, Observer};
use processes::Processes;

/// The marketplace's resources, built in so the demo runs from any folder: the mesh's
/// settings (STRICT mTLS) and `crds/examples/marketplace/`.
const RESOURCES: [&str; 8] = [
    include_str!("../../../crds/examples/mesh-config.yaml"),
    include_str!("../../../crds/examples/marketplace/gateway.yaml"),
    include_str!("../../../crds/examples/marketplace/storefront.yaml"),
    include_str!("../../../crds/examples/marketplace/order.yaml"),
    include_str!("../../../crds/examples/marketplace/payment.yaml"),
    include_str!("../../../crds/examples/marketplace/inventory.yaml"),
    include_str!("../../../crds/examples/marketplace/recommendations.yaml"),
    include_str!("../../../crds/examples/marketplace/backoffice.yaml"),
];

/// Every marketplace workload: (service, version).
const WORKLOADS: [(&str, &str); 10] = [
    ("storefront", "v1"),
    ("user", "v1"),
    ("order", "v1"),
    ("payment", "v1"),
    ("payment", "v2"),
    ("inventory", "v1"),
    ("shipping", "v1"),
    ("analytics", "v1"),
    ("recommendations", "v1"),
    ("recommendations", "v2"),
];

/// Services every run must have seen traffic reach.
pub const SERVICES: [&str; 8] = [
    "storefront",
    "user",
    "order",
    "payment",
    "inventory",
    "shipping",
    "analytics",
    "recommendations",
];

/// How often sidecars report to the control plane in the demo: often, so the view
/// is live.
const REPORT_INTERVAL: &str = "1s";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Keep state here instead of a temporary folder removed at the end.
    pub data_dir: Option<PathBuf>,
    /// Run this long without the live view, then print a summary.
    pub duration: Option<Duration>,
    pub summary_json: Option<PathBuf>,
    /// Customer requests per second through the gateway.
    pub rate: u32,
}

/// When payment fails, for how long, in a run of `duration` (or an endless one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scenario {
    pub payment_fails_at: Duration,
    pub payment_fails_for: Duration,
}

impl Scenario {
    pub fn for_run(duration: Option<Duration>) -> Self {
        match duration {
            // Early and short enough that the breaker has closed again by the end.
            Some(d) => Self {
                payment_fails_at: d.mul_f64(0.3),
                payment_fails_for: d.mul_f64(0.15).min(Duration::from_secs(10)),
            },
            None => Self {
                payment_fails_at: Duration::from_secs(20),
                payment_fails_for: Duration::from_secs(10),
            },
        }
    }

    /// While customers may see the injected failure or the breaker's recovery from it.
    pub fn disturbed(&self, at: Duration) -> bool {
        // The breaker's first ejection lasts 5 s; the probe after it restores payment.
        let recovered = self.payment_fails_at + self.payment_fails_for + Duration::from_secs(8);
        at >= self.payment_fails_at && at < recovered
    }
}

/// Runs the demo to its end (Ctrl-C, or `--duration`). The summary is the outcome.
pub async fn run(
    options: DemoOptions,
    out: &mut dyn std::io::Write,
) -> Result<crate::Outcome, CliError> {
    let temporary = match &options.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("trellis-demo-")
                .tempdir()
                .map_err(|e| CliError::Demo(format!("cannot create a temporary folder: {e}")))?,
        ),
    };
    let state = match (&options.data_dir, &temporary) {
        (Some(dir), _) => dir.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => return Err(CliError::Demo("no folder for the demo's state".into())),
    };
    // Before the first child: a Ctrl-C, SIGTERM or SIGHUP at any moment from here on
    // stops every child in order instead of killing trellisctl and orphaning them.
    let mut signals = Signals::install()?;
    let mut children = Processes::new(state.join("logs"))?;
    let result = run_in(&options, &state, &mut children, &mut signals, out).await;
    let stuck = children.stop_all().await;
    let all_gone = children.all_exited();
    let mut notes = String::new();
    if !stuck.is_empty() || !all_gone {
        notes.push_str(&format!(
            "processes that would not stop: {}\n",
            stuck.join(", ")
        ));
    }
    // A failed run keeps its logs for reading, even in a temporary folder.
    match temporary {
        Some(dir) if result.is_err() => {
            let kept = dir.keep();
            notes.push_str(&format!("state and logs kept in {}\n", kept.display()));
        }
        Some(dir) => drop(dir),
        None => notes.push_str(&format!("state and logs kept in {}\n", state.display())),
    }
    match result {
        Ok(mut outcome) => {
            outcome.ok &= stuck.is_empty() && all_gone;
            outcome.stderr.push_str(&notes);
            Ok(outcome)
        }
        Err(CliError::Demo(message)) => Err(CliError::Demo(format!("{message}\n{notes}"))),
        Err(other) => Err(other),
    }
}

/// The signals that end the demo, installed once.
#[derive(Debug)]
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, CliError> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind| {
            signal(kind).map_err(|e| CliError::Demo(format!("cannot handle signals: {e}")))
        };
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
            hangup: install(SignalKind::hangup())?,
        })
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "Ctrl-C",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

/// Where each part of the running demo listens.
#[derive(Debug)]
struct Addresses {
    api: String,
    /// The control plane's web dashboard, `http://ip:port/`.
    dashboard: String,
    gateway: SocketAddr,
    /// (name, admin address) of every proxy.
    admins: Vec<(String, SocketAddr)>,
    /// (service version, app address) of every app.
    apps: Vec<(String, SocketAddr)>,
}

async fn run_in(
    options: &DemoOptions,
    state: &Path,
    children: &mut Processes,
    signals: &mut Signals,
    out: &mut dyn std::io::Write,
) -> Result<crate::Outcome, CliError> {
    let started = Instant::now();
    let say = |out: &mut dyn std::io::Write, text: &str| {
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    };
    say(
        out,
        "starting the control plane, 10 services with their sidecars and the gateway...",
    );
    let starting = async {
        let addresses = start_mesh(state, children).await?;
        let api = Api::new(api_endpoint(&addresses.api, state)?);
        converge(&api, children, WORKLOADS.len() + 1).await?;
        Ok::<_, CliError>((addresses, api))
    };
    let (addresses, api) = tokio::select! {
        started = starting => started?,
        signal = signals.next() => {
            return Err(CliError::Demo(format!(
                "{signal} while starting; everything started is stopped"
            )));
        }
    };
    say(
        out,
        &format!(
            "the mesh is up in {:.1} s: gateway http://{} — control plane API http://{} — logs in {}",
            started.elapsed().as_secs_f64(),
            addresses.gateway,
            addresses.api,
            children.logs().display()
        ),
    );
    say(out, &format!("dashboard: {}", addresses.dashboard));
    for (name, admin) in &addresses.admins {
        say(out, &format!("  admin of {name}: http://{admin}"));
    }

    let scenario = Scenario::for_run(options.duration);
    let payment_v1 = addresses
        .apps
        .iter()
        .find(|(name, _)| name == "payment v1")
        .map(|(_, addr)| *addr)
        .ok_or_else(|| CliError::Demo("payment v1 did not start".into()))?;
    let observer = Observer::new(api, addresses.admins.iter().map(|(_, a)| *a).collect());
    let seen = Seen::default();
    let stop = CancellationToken::new();
    let traffic = tokio::spawn(load::run(
        addresses.gateway,
        options.rate,
        seen.clone(),
        stop.clone(),
    ));
    let mut story = view::Story::default();
    story.tell(
        Duration::ZERO,
        format!(
            "customers start: {} requests/s through the gateway",
            options.rate
        ),
    );
    let live = options.duration.is_none();
    let traffic_started = Instant::now();
    let mut faults = FaultSwitch::new(payment_v1);
    let mut last = Observation::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let ended_by = loop {
        tokio::select! {
            _ = tick.tick() => {}
            signal = signals.next() => break signal.to_string(),
        }
        let at = traffic_started.elapsed();
        if let Some(crash) = children.crashed() {
            stop.cancel();
            let _ = traffic.await;
            return Err(CliError::Demo(crash));
        }
        if let Some(event) = faults.follow(&scenario, at).await {
            story.tell(at, event);
        }
        let observation = observer.observe(Duration::from_secs(10)).await;
        story.notice(at, &last, &observation);
        if live {
            let answers = seen.snapshot();
            let frame = view::frame(&view::Frame {
                at,
                gateway: addresses.gateway,
                dashboard: &addresses.dashboard,
                observation: &observation,
                recent: &answers,
                story: &story,
            });
            let _ = write!(out, "\x1b[H\x1b[2J{frame}");
            let _ = out.flush();
        }
        last = observation;
        if options.duration.is_some_and(|d| at >= d) {
            break "the end of --duration".to_string();
        }
    };
    stop.cancel();
    let _ = traffic.await;
    faults.heal().await;
    let ran = traffic_started.elapsed();
    // One more report interval, so the last seconds are in the statistics.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The control plane keeps an hour of statistics.
    let whole = observer
        .observe((ran + Duration::from_secs(5)).min(Duration::from_secs(3600)))
        .await;
    let summary = summarize(ran, &scenario, &seen.snapshot(), &whole, &last, &story);
    if let Some(path) = &options.summary_json {
        let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
        tokio::fs::write(path, text + "\n").await.map_err(|e| {
            CliError::Demo(format!(
                "cannot write the summary to {}: {e}",
                path.display()
            ))
        })?;
    }
    // Only an unattended run is judged: a live one ends whenever its watcher says.
    let ok = options.duration.is_none() || summary["ok"].as_bool().unwrap_or(false);
    let mut stdout = format!("stopped ({ended_by}) after {:.0} s\n\n", ran.as_secs_f64());
    stdout.push_str(&view::summary_text(&summary));
    Ok(crate::Outcome {
        stdout,
        stderr: String::new(),
        ok,
    })
}

/// Starts the control plane, applies the marketplace, and starts every app, its
/// sidecar and the gateway.
async fn start_mesh(state: &Path, children: &mut Processes) -> Result<Addresses, CliError> {
    let control_plane = processes::locate("trellis-control-plane")?;
    let proxy = processes::locate("trellis-proxy")?;
    let marketplace = processes::locate("marketplace")?;
    let data = state.join("control-plane");
    let mut command = Command::new(&control_plane);
    command
        .arg("--data-dir")
        .arg(&data)
        .args(["--api-addr", "127.0.0.1:0"])
        .args(["--grpc-addr", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0"])
        .args(["--dashboard-addr", "127.0.0.1:0"])
        .args(["--debounce", "20ms"])
        .args(["--log-format", "json"]);
    let listening = children.start("control-plane", command).await?;
    let field = |line: &Value, name: &str| -> Result<String, CliError> {
        line[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| CliError::Demo(format!("a `listening` line without {name}: {line}")))
    };
    let api_addr = field(&listening, "api")?;
    let grpc = field(&listening, "grpc")?;
    let admin = field(&listening, "admin")?;
    let dashboard = format!("http://{}/", field(&listening, "dashboard")?);
    let api = Api::new(api_endpoint(&api_addr, state)?);
    // A kept data dir may hold a canary promoted last time: this run's starts afresh
    // (deleting a Canary drops its status). Absent is fine.
    let _ = api
        .delete(&format!(
            "/v1/resources/canary/recommendations?namespace={NAMESPACE}"
        ))
        .await;
    api.post(
        "/v1/apply",
        "application/yaml",
        Bytes::from(RESOURCES.join("---\n")),
    )
    .await?;

    let anchors = data.join("trust-anchors.pem");
    let mut admins = vec![("control-plane".to_string(), parse_addr(&admin)?)];
    let mut apps = Vec::new();
    let mut sidecars = Vec::new();
    for (service, version) in WORKLOADS {
        let name = format!("{service} {version}");
        let token = join_token(&api, state, service).await?;
        // The app calls other services through its sidecar's outbound listener, and the
        // sidecar needs the app's address: the outbound port is chosen first (bound and
        // released; another process taking it in between makes the sidecar fail to
        // start, which is reported).
        let outbound = free_port()?;
        let mut command = Command::new(&marketplace);
        command
            .arg(service)
            .args(["--listen", "127.0.0.1:0"])
            .args(["--mesh", &outbound.to_string()])
            .args(["--version", version]);
        let line = children
            .start(&format!("{service}-{version}"), command)
            .await?;
        let app = parse_addr(&field(&line, "addr")?)?;
        apps.push((name.clone(), app));
        let mut command = Command::new(&proxy);
        command
            .args(["--service", service])
            .args(["--namespace", NAMESPACE])
            .args(["--labels", &format!("version={version}")])
            .args(["--app-addr", &app.to_string()])
            .args(["--inbound-addr", "127.0.0.1:0"])
            .args(["--outbound-addr", &outbound.to_string()])
            .args(["--admin-addr", "127.0.0.1:0"]);
        sidecar_args(&mut command, &grpc, &anchors, &token);
        sidecars.push((name, command));
    }
    for (name, command) in sidecars {
        let line = children
            .start(&format!("{}-sidecar", name.replace(' ', "-")), command)
            .await?;
        admins.push((
            format!("{name} sidecar"),
            parse_addr(&field(&line, "admin")?)?,
        ));
    }
    let token = join_token(&api, state, "gateway").await?;
    let mut command = Command::new(&proxy);
    command
        .args(["--mode", "gateway"])
        .args(["--service", "gateway"])
        .args(["--namespace", NAMESPACE])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0"]);
    sidecar_args(&mut command, &grpc, &anchors, &token);
    let line = children.start("gateway", command).await?;
    let gateway = parse_addr(&field(&line, "gateway")?)?;
    admins.push(("gateway".into(), parse_addr(&field(&line, "admin")?)?));
    Ok(Addresses {
        api: api_addr,
        dashboard,
        gateway,
        admins,
        apps,
    })
}

fn sidecar_args(command: &mut Command, grpc: &str, anchors: &Path, token: &Path) {
    command
        .args(["--control-plane", grpc])
        .arg("--trust-anchors")
        .arg(anchors)
        .arg("--join-token-file")
        .arg(token)
        .args(["--report-interval", REPORT_INTERVAL])
        .args(["--log-format", "json"]);
}

fn api_endpoint(addr: &str, state: &Path) -> Result<Endpoint, CliError> {
    let path = state.join("control-plane").join("api-token");
    let token = std::fs::read_to_string(&path).map_err(|e| CliError::TokenFile {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(Endpoint {
        addr: addr.to_string(),
        addr_origin: Origin::File(path.clone()),
        token: token.trim().to_string(),
        token_origin: Origin::File(path),
        timeout: Duration::from_secs(10),
    })
}

/// A join token for `service`, in a file the sidecar reads.
async fn join_token(api: &Api, state: &Path, service: &str) -> Result<PathBuf, CliError> {
    let body = json!({ "service": service, "namespace": NAMESPACE, "ttl": "24h" });
    let answer = api
        .post(
            "/v1/tokens",
            "application/json",
            Bytes::from(body.to_string()),
        )
        .await?;
    let token = answer["token"]
        .as_str()
        .ok_or_else(|| CliError::Demo(format!("a token answer without a token: {answer}")))?;
    let path = state.join(format!("{service}.token"));
    tokio::fs::write(&path, token)
        .await
        .map_err(|e| CliError::Demo(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

/// Waits until `n` proxies run the latest config.
async fn converge(api: &Api, children: &mut Processes, n: usize) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let proxies = api.get("/v1/proxies").await?;
        let items = proxies["items"].as_array().cloned().unwrap_or_default();
        let settled = items
            .iter()
            .filter(|p| p["state"] == "ACKED" && p["latestVersion"] == p["ackedVersion"])
            .count();
        if settled >= n {
            return Ok(());
        }
        if let Some(crash) = children.crashed() {
            return Err(CliError::Demo(crash));
        }
        if Instant::now() > deadline {
            return Err(CliError::Demo(format!(
                "only {settled} of {n} proxies run the latest config after 60 s; see the logs in {}",
                children.logs().display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn free_port() -> Result<SocketAddr, CliError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| CliError::Demo(format!("cannot find a free loopback port: {e}")))
}

fn parse_addr(text: &str) -> Result<SocketAddr, CliError> {
    text.parse()
        .map_err(|e| CliError::Demo(format!("{text:?} is not an address: {e}")))
}

/// Turns payment v1's failures on and off as the scenario says, through the app's own
/// fault knobs.
#[derive(Debug)]
struct FaultSwitch {
    app: SocketAddr,
    failing: bool,
    done: bool,
}

impl FaultSwitch {
    fn new(app: SocketAddr) -> Self {
        Self {
            app,
            failing: false,
            done: false,
        }
    }

    /// Flips the switch when the scenario says; what happened, to tell.
    async fn follow(&mut self, scenario: &Scenario, at: Duration) -> Option<String> {
        let end = scenario.payment_fails_at + scenario.payment_fails_for;
        if !self.failing && !self.done && at >= scenario.payment_fails_at {
            self.failing = true;
            return Some(match self.set(1.0).await {
                Ok(()) => {
                    "payment v1 starts failing every request (its fault knob: error rate 100%)"
                        .into()
                }
                Err(e) => format!("could not make payment fail: {e}"),
            });
        }
        if self.failing && at >= end {
            self.failing = false;
            self.done = true;
            return Some(match self.set(0.0).await {
                Ok(()) => "payment v1 is healthy again; the breaker lets a probe through once its ejection time is up".into(),
                Err(e) => format!("could not heal payment: {e}"),
            });
        }
        None
    }

    async fn heal(&mut self) {
        if self.failing {
            let _ = self.set(0.0).await;
        }
    }

    async fn set(&self, error_rate: f64) -> Result<(), String> {
        let body = json!({ "errorRate": error_rate, "latencyMs": 0 }).to_string();
        let request = http::Request::put(format!("http://{}/admin/faults", self.app))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let response = tokio::time::timeout(Duration::from_secs(2), client.request(request))
            .await
            .map_err(|_| "payment's admin did not answer".to_string())?
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("payment's admin answered {}", response.status()))
        }
    }
}

/// The run in numbers, and whether the mesh did what the scenario expects.
fn summarize(
    ran: Duration,
    scenario: &Scenario,
    answers: &[load::Answer],
    whole: &Observation,
    last: &Observation,
    story: &view::Story,
) -> Value {
    let all = load::Tally::of(answers.iter());
    let calm = load::Tally::of(answers.iter().filter(|a| !scenario.disturbed(a.at)));
    let declined = answers
        .iter()
        .filter(|a| a.action == load::Action::Checkout && a.status == Some(402))
        .count();
    let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    let services: serde_json::Map<String, Value> = whole
        .services
        .iter()
        .map(|(name, row)| {
            (
                name.clone(),
                json!({
                    "requests": row.requests,
                    "successRate": row.success_rate(),
                    "p99Ms": row.p99_ms,
                }),
            )
        })
        .collect();
    let by_action: serde_json::Map<String, Value> = load::by_action(answers)
        .into_iter()
        .map(|(action, t)| {
            (
                action.name().to_string(),
                json!({"requests": t.requests, "failures": t.failures, "p50Ms": ms(t.p50), "p99Ms": ms(t.p99)}),
            )
        })
        .collect();
    let canary = whole
        .canary
        .clone()
        .or_else(|| last.canary.clone())
        .unwrap_or_default();
    let mut expectations = Vec::new();
    let mut expect = |what: &str, ok: bool, detail: String| {
        expectations.push(json!({ "what": what, "ok": ok, "detail": detail }));
    };
    let quiet: Vec<&str> = SERVICES
        .iter()
        .copied()
        .filter(|s| whole.services.get(*s).is_none_or(|r| r.requests == 0))
        .collect();
    expect(
        "every service got traffic",
        quiet.is_empty(),
        if quiet.is_empty() {
            format!("{} services", SERVICES.len())
        } else {
            format!("no requests reached {}", quiet.join(", "))
        },
    );
    expect(
        "customers were served outside the injected failure",
        calm.requests > 0 && calm.success_rate() >= 99.0,
        format!(
            "{:.2}% of {} requests outside {:.0}–{:.0} s",
            calm.success_rate(),
            calm.requests,
            scenario.payment_fails_at.as_secs_f64(),
            (scenario.payment_fails_at + scenario.payment_fails_for).as_secs_f64() + 8.0
        ),
    );
    expect(
        "the canary moved",
        canary.phase == "Promoted" || canary.weight > 10,
        format!("{} at {}%", canary.phase, canary.weight),
    );
    let failure_ends = scenario.payment_fails_at + scenario.payment_fails_for;
    if ran > failure_ends {
        expect(
            "payment's breaker opened while it failed",
            whole.ejections >= 1.0,
            format!("{} ejections", whole.ejections),
        );
    }
    if ran > failure_ends + Duration::from_secs(12) {
        expect(
            "payment's breaker closed again once it healed",
            whole.ejected.is_empty(),
            if whole.ejected.is_empty() {
                "no endpoint ejected at the end".into()
            } else {
                format!("still ejected: {}", whole.ejected.join(", "))
            },
        );
    }
    expect(
        "the shadow's answers were compared",
        whole.shadow.compared() > 0,
        format!("{} comparisons", whole.shadow.compared()),
    );
    let ok = expectations.iter().all(|e| e["ok"] == true);
    json!({
        "durationSeconds": ran.as_secs(),
        "gateway": {
            "requests": all.requests,
            "failures": all.failures,
            "successRate": all.success_rate(),
            "successRateOutsideFailure": calm.success_rate(),
            "p50Ms": ms(all.p50),
            "p99Ms": ms(all.p99),
            "checkoutsDeclined": declined,
            "byAction": by_action,
        },
        "services": services,
        "canary": {"phase": canary.phase, "weight": canary.weight, "message": canary.message},
        "shadow": whole.shadow,
        "breaker": {"ejections": whole.ejections, "ejectedAtTheEnd": whole.ejected},
        "bulkheadRejections": whole.bulkhead_rejections,
        "story": story.lines(),
        "expectations": expectations,
        "ok": ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_fits_inside_a_short_run() {
        let scenario = Scenario::for_run(Some(Duration::from_secs(30)));
        assert_eq!(scenario.payment_fails_at, Duration::from_secs(9));
        assert_eq!(scenario.payment_fails_for, Duration::from_millis(4500));
        assert!(!scenario.disturbed(Duration::from_secs(8)));
        assert!(scenario.disturbed(Duration::from_secs(9)));
        assert!(scenario.disturbed(Duration::from_secs(21)));
        assert!(!scenario.disturbed(Duration::from_secs(22)));
        let endless = Scenario::for_run(None);
        assert_eq!(endless.payment_fails_for, Duration::from_secs(10));
    }

    #[test]
    fn the_built_in_resources_are_the_examples_and_valid() {
        let documents = trellis_crds::parse_documents(&RESOURCES.join("---\n")).unwrap();
        trellis_crds::validate_batch(&documents, &[]).unwrap();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/examples/marketplace");
        let files = std::fs::read_dir(dir).unwrap().count();
        assert_eq!(
            files + 1,
            RESOURCES.len(),
            "a marketplace example is not built in"
        );
    }
}
