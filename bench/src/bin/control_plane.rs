//! `trellis-bench-control-plane`: how long the real control plane takes to bring N
//! subscribed proxies onto a new config, and what it costs in memory and CPU.
//!
//! For each N it starts `trellis-control-plane` afresh, simulates N sidecars in this
//! process (certify with a join token, subscribe over mTLS, ACK every push,
//! heartbeat), then applies a TrafficRoute that changes every proxy's config K times
//! and times each apply from the request to the last proxy's ACK. The baseline,
//! taken in the same run, is the apply's HTTP round trip alone (store write, no
//! proxy connected). Prints a table and writes JSON.

#![allow(clippy::print_stdout)] // the table on stdout is this tool's output

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use http::Method;
use serde::Serialize;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use trellis_bench::{
    control_plane::{self, ApiClient, ControlPlane},
    load::Sample,
    procstat,
    simulated_proxy::{self, Event, Fleet, ProxySpec},
};
use trellis_ca::SpiffeId;

const CONTROL_PLANE_ID: &str = "spiffe://cluster.local/ns/trellis-system/sa/trellis-control-plane";
const NAMESPACE: &str = "default";
/// The goal at 1,000 proxies.
const GOAL_PROXIES: usize = 1000;
const GOAL_P99: Duration = Duration::from_secs(1);
const GOAL_RSS_BYTES: u64 = 100_000_000;
/// How long all proxies may take to connect, and one round to reach all of them.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(300);
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(
    name = "trellis-bench-control-plane",
    about = "Apply to last ACK across N simulated proxies, and the control plane's RSS and CPU"
)]
struct Args {
    /// How many proxies to simulate; each count is a separate run on a fresh
    /// control plane.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    proxies: Vec<usize>,
    /// Services the proxies are spread over.
    #[arg(long, default_value_t = 10)]
    services: usize,
    /// Applies timed per run (and as many for the baseline).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// The control plane's `--debounce`; it is part of every apply-to-ACK time.
    #[arg(long, default_value = "50ms")]
    debounce: String,
    /// Seconds between a simulated proxy's heartbeats.
    #[arg(long, default_value_t = 5)]
    heartbeat_seconds: u64,
    /// Proxies certifying and subscribing at once.
    #[arg(long, default_value_t = 32)]
    join_concurrency: usize,
    /// Runtime threads of the simulated proxies; the rest of the machine is the
    /// control plane's.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// The control plane binary; by default the one beside this executable.
    #[arg(long)]
    control_plane_bin: Option<PathBuf>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/control-plane.json")]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Percentiles {
    fn of(latencies: Vec<Duration>) -> Self {
        let mut sample = Sample {
            latencies,
            ..Sample::default()
        };
        let max = sample.percentile(100.0);
        Self {
            p50_ms: ms(sample.percentile(50.0)),
            p99_ms: ms(sample.percentile(99.0)),
            max_ms: ms(max),
        }
    }
}

#[derive(Debug, Serialize)]
struct ControlPlaneCost {
    /// VmRSS, KiB: just started, after the baseline applies (no proxy yet), with
    /// every proxy connected, and after the timed rounds.
    rss_started_kib: u64,
    rss_before_connect_kib: u64,
    rss_connected_kib: u64,
    rss_after_rounds_kib: u64,
    /// VmHWM at the end of the run, KiB.
    peak_rss_kib: u64,
    /// CPU (user + system) while the proxies certified and subscribed.
    cpu_seconds_connect: f64,
    /// CPU over the timed rounds, per round.
    cpu_ms_per_round: f64,
}

#[derive(Debug, Serialize)]
struct Run {
    proxies: usize,
    /// From the first proxy starting to certify to every proxy having ACKed a config.
    connect_seconds: f64,
    /// Size of one pushed config in the last round.
    config_bytes: usize,
    /// Baseline: the apply's HTTP round trip with no proxy connected.
    apply_alone: Percentiles,
    /// The apply's HTTP round trip in the timed rounds.
    apply_with_proxies: Percentiles,
    /// From sending the apply to the first and to the last proxy ACKing the new config.
    first_ack: Percentiles,
    last_ack: Percentiles,
    /// Proxies NACKed or not on their latest config once the rounds were over.
    nacks: u64,
    control_plane: ControlPlaneCost,
}

#[derive(Debug, Serialize)]
struct Report {
    services: usize,
    rounds: usize,
    debounce: String,
    heartbeat_seconds: u64,
    client_threads: usize,
    runs: Vec<Run>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn service(index: usize, services: usize) -> String {
    format!("svc-{}", index % services)
}

/// A TrafficRoute for `svc-0`: every proxy's config lists every service with its
/// routes, so a new timeout gives each of them a new version.
fn route(timeout_ms: usize) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficRoute\n\
         metadata: {{name: svc-0, namespace: {NAMESPACE}}}\n\
         spec:\n  service: svc-0\n  rules:\n  \
         - backends: [{{service: svc-0, weight: 100}}]\n    timeout: {timeout_ms}ms\n"
    )
}

/// A distinct loopback address per proxy, as each sidecar advertises its own.
fn inbound(index: usize) -> SocketAddr {
    let [_, a, b, c] = (index as u32 + 1).to_be_bytes();
    SocketAddr::from(([127, a, b, c], 15006))
}

fn rss(pid: u32) -> (u64, u64) {
    procstat::rss_kib(pid).unwrap_or((0, 0))
}

fn cpu(pid: u32) -> f64 {
    procstat::cpu_seconds(pid).unwrap_or(0.0)
}

/// Polls `GET /v1/proxies` until `n` proxies run the latest config they were sent
/// and two polls agree (no recompile was pending); returns how many NACKed.
async fn converged(api: &mut ApiClient, n: usize) -> Result<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut previous = None;
    loop {
        let answer = api.call(Method::GET, "/v1/proxies", String::new()).await?;
        let items = answer["items"].as_array().cloned().unwrap_or_default();
        // Config state only: `connectedSeconds` ticks between polls.
        let states: Vec<[serde_json::Value; 4]> = items
            .iter()
            .map(|p| ["instance", "latestVersion", "ackedVersion", "state"].map(|k| p[k].clone()))
            .collect();
        let behind = states
            .iter()
            .filter(|[_, latest, acked, state]| state != "ACKED" || latest != acked)
            .count();
        let nacked = states.iter().filter(|s| s[3] == "NACKED").count();
        if states.len() == n && behind == nacked {
            if previous.as_ref() == Some(&states) {
                return Ok(nacked as u64);
            }
            previous = Some(states);
        } else {
            previous = None;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the control plane did not settle on {n} ACKed proxies within 60s: {} \
                 connected, {behind} not on their latest config",
                items.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run_one(args: &Args, binary: &Path, n: usize) -> Result<Run, String> {
    let cp = ControlPlane::start(binary, &args.debounce).await?;
    let pid = cp.pid();
    eprintln!(
        "N={n}: control plane pid {pid}, gRPC {}, data dir {}",
        cp.grpc,
        cp.data_dir().display()
    );
    let mut api = ApiClient::new(cp.api, cp.token.clone());
    let (rss_started, _) = rss(pid);

    let mut apply_alone = Vec::with_capacity(args.rounds);
    for round in 0..args.rounds {
        let sent = Instant::now();
        api.call(Method::POST, "/v1/apply", route(10_000 + round))
            .await?;
        apply_alone.push(sent.elapsed());
    }
    let (rss_before_connect, _) = rss(pid);

    let mut specs = Vec::with_capacity(n);
    for index in 0..n {
        let service = service(index, args.services);
        let body = serde_json::json!({ "service": service, "namespace": NAMESPACE, "ttl": "2h" });
        let answer = api
            .call(Method::POST, "/v1/tokens", body.to_string())
            .await?;
        let (Some(token), Some(identity)) = (answer["token"].as_str(), answer["identity"].as_str())
        else {
            return Err(format!("POST /v1/tokens: no token or identity in {answer}"));
        };
        let identity = SpiffeId::parse(identity)
            .map_err(|e| format!("POST /v1/tokens: identity {identity:?}: {e}"))?;
        specs.push(ProxySpec {
            index,
            instance: format!("{service}-{index}"),
            service,
            namespace: NAMESPACE.into(),
            identity,
            join_token: token.to_string(),
            inbound: inbound(index),
        });
    }

    let control_plane_id =
        SpiffeId::parse(CONTROL_PLANE_ID).map_err(|e| format!("{CONTROL_PLANE_ID}: {e}"))?;
    let fleet = Arc::new(Fleet::new(
        cp.grpc,
        cp.trust_anchors.clone(),
        control_plane_id,
        Duration::from_secs(args.heartbeat_seconds),
    )?);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let joining = Arc::new(Semaphore::new(args.join_concurrency.max(1)));
    let cpu_start = cpu(pid);
    let started = Instant::now();
    let mut proxies = JoinSet::new();
    for spec in specs {
        let permit = joining
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        proxies.spawn(simulated_proxy::run(
            fleet.clone(),
            spec,
            permit,
            events_tx.clone(),
        ));
    }
    let mut subscribed = vec![false; n];
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    while count < n {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::NewConfig { proxy, .. })) => {
                if !std::mem::replace(&mut subscribed[proxy], true) {
                    count += 1;
                }
            }
            Ok(Some(Event::Failed { proxy, error })) => {
                return Err(format!("proxy {proxy}: {error}"));
            }
            Ok(None) => return Err("every proxy stopped".into()),
            Err(_) => {
                return Err(format!(
                    "{count} of {n} proxies subscribed within {CONNECT_TIMEOUT:?}"
                ));
            }
        }
    }
    eprintln!(
        "N={n}: every proxy has a config after {:.1} s; waiting for the joins to settle",
        started.elapsed().as_secs_f64()
    );
    converged(&mut api, n).await?;
    let connect_seconds = started.elapsed().as_secs_f64();
    let cpu_connect = cpu(pid) - cpu_start;
    let (rss_connected, _) = rss(pid);
    eprintln!("N={n}: all subscribed and ACKed in {connect_seconds:.1} s");
    // The joins' pushes are over; what comes next belongs to the rounds.
    while events.try_recv().is_ok() {}

    let cpu_rounds_start = cpu(pid);
    let mut apply_with_proxies = Vec::with_capacity(args.rounds);
    let mut first_ack = Vec::with_capacity(args.rounds);
    let mut last_ack = Vec::with_capacity(args.rounds);
    let mut config_bytes = 0;
    for round in 0..args.rounds {
        let body = route(20_000 + round);
        let sent = Instant::now();
        api.call(Method::POST, "/v1/apply", body).await?;
        apply_with_proxies.push(sent.elapsed());
        let mut acked = vec![false; n];
        let (mut count, mut first, mut last) = (0, None::<Instant>, sent);
        let deadline = tokio::time::Instant::now() + ROUND_TIMEOUT;
        while count < n {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(Event::NewConfig {
                    proxy,
                    acked: at,
                    bytes,
                })) => {
                    if !std::mem::replace(&mut acked[proxy], true) {
                        count += 1;
                        first = Some(first.map_or(at, |f| f.min(at)));
                        last = last.max(at);
                        config_bytes = bytes;
                    }
                }
                Ok(Some(Event::Failed { proxy, error })) => {
                    return Err(format!("round {round}: proxy {proxy}: {error}"));
                }
                Ok(None) => return Err("every proxy stopped".into()),
                Err(_) => {
                    return Err(format!(
                        "round {round}: {count} of {n} proxies ACKed the new config within \
                         {ROUND_TIMEOUT:?}"
                    ));
                }
            }
        }
        first_ack.push(first.unwrap_or(sent).saturating_duration_since(sent));
        last_ack.push(last.saturating_duration_since(sent));
    }
    let cpu_rounds = cpu(pid) - cpu_rounds_start;
    let (rss_after_rounds, _) = rss(pid);
    let nacks = converged(&mut api, n).await?;
    let (_, peak_rss) = rss(pid);
    proxies.shutdown().await;
    drop(cp);
    Ok(Run {
        proxies: n,
        connect_seconds,
        config_bytes,
        apply_alone: Percentiles::of(apply_alone),
        apply_with_proxies: Percentiles::of(apply_with_proxies),
        first_ack: Percentiles::of(first_ack),
        last_ack: Percentiles::of(last_ack),
        nacks,
        control_plane: ControlPlaneCost {
            rss_started_kib: rss_started,
            rss_before_connect_kib: rss_before_connect,
            rss_connected_kib: rss_connected,
            rss_after_rounds_kib: rss_after_rounds,
            peak_rss_kib: peak_rss,
            cpu_seconds_connect: cpu_connect,
            cpu_ms_per_round: cpu_rounds * 1e3 / args.rounds.max(1) as f64,
        },
    })
}

async fn run(args: &Args) -> Result<Report, String> {
    let binary = match &args.control_plane_bin {
        Some(path) => path.clone(),
        None => control_plane::binary_beside_this_one()?,
    };
    if args.services == 0 {
        return Err("--services must be at least 1".into());
    }
    if let Some(&zero) = args.proxies.iter().find(|&&n| n == 0) {
        return Err(format!("--proxies {zero}: simulate at least one proxy"));
    }
    let most = args.proxies.iter().copied().max().unwrap_or(0);
    // Each proxy holds one connection here and one in the control plane (which
    // inherits the limit), plus the joins in flight and a margin.
    control_plane::ensure_open_files((most + 2 * args.join_concurrency + 256) as u64)?;
    let mut runs = Vec::new();
    for &n in &args.proxies {
        runs.push(run_one(args, &binary, n).await?);
    }
    Ok(Report {
        services: args.services,
        rounds: args.rounds,
        debounce: args.debounce.clone(),
        heartbeat_seconds: args.heartbeat_seconds,
        client_threads: args.client_threads,
        runs,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_table(report: &Report) {
    println!(
        "{} rounds per run, proxies spread over {} services, control plane --debounce {}, \
         simulated proxies on {} thread(s) of the same machine\n",
        report.rounds, report.services, report.debounce, report.client_threads
    );
    println!(
        "| proxies | connect s | config KiB | apply alone p50/p99 ms | apply p50/p99 ms | \
         first ACK p50 ms | last ACK p50 / p99 / max ms | last ACK / apply alone (p50) | \
         RSS MiB before / connected / peak | CPU s connect | CPU ms per round | NACKs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &report.runs {
        let c = &r.control_plane;
        let ratio = if r.apply_alone.p50_ms > 0.0 {
            format!("{:.1}x", r.last_ack.p50_ms / r.apply_alone.p50_ms)
        } else {
            "-".into()
        };
        println!(
            "| {} | {:.1} | {:.1} | {:.2} / {:.2} | {:.2} / {:.2} | {:.1} | {:.1} / {:.1} / {:.1} | \
             {} | {:.1} / {:.1} / {:.1} | {:.2} | {:.1} | {} |",
            r.proxies,
            r.connect_seconds,
            r.config_bytes as f64 / 1024.0,
            r.apply_alone.p50_ms,
            r.apply_alone.p99_ms,
            r.apply_with_proxies.p50_ms,
            r.apply_with_proxies.p99_ms,
            r.first_ack.p50_ms,
            r.last_ack.p50_ms,
            r.last_ack.p99_ms,
            r.last_ack.max_ms,
            ratio,
            mib(c.rss_before_connect_kib),
            mib(c.rss_connected_kib),
            mib(c.peak_rss_kib),
            c.cpu_seconds_connect,
            c.cpu_ms_per_round,
            r.nacks,
        );
    }
    if report.rounds < 100 {
        println!("\n(with fewer than 100 rounds, p99 is the slowest round)");
    }
    if let Some(r) = report.runs.iter().find(|r| r.proxies == GOAL_PROXIES) {
        let p99_ok = r.last_ack.p99_ms <= ms(GOAL_P99);
        let rss_ok = r.control_plane.peak_rss_kib * 1024 <= GOAL_RSS_BYTES;
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        println!(
            "goal at {GOAL_PROXIES} proxies: last-ACK p99 {:.0} ms <= 1000 ms: {}; \
             peak RSS {:.1} MB <= 100 MB: {}",
            r.last_ack.p99_ms,
            verdict(p99_ok),
            (r.control_plane.peak_rss_kib * 1024) as f64 / 1e6,
            verdict(rss_ok),
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trellis-bench-control-plane: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(run(&args)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("trellis-bench-control-plane: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_table(&report);
    if let Some(dir) = args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match serde_json::to_vec_pretty(&report).map(|json| std::fs::write(&args.out, json)) {
        Ok(Ok(())) => {
            eprintln!("wrote {}", args.out.display());
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!(
                "trellis-bench-control-plane: writing {}: {e}",
                args.out.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("trellis-bench-control-plane: {e}");
            ExitCode::FAILURE
        }
    }
}
