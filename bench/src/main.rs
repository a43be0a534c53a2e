//! `trellis-bench`: one command that measures, in the same run,
//! (a) client -> backend directly, (b) client -> trellis-proxy -> trellis-proxy ->
//! backend over mTLS, (b') the same pair with every policy layer configured and none
//! acting, and (c) the same through an HAProxy mTLS pair when `haproxy` is installed.
//! (b'') the same pair recording every request's spans and exporting them over OTLP to
//! a receiver in this process. (b), (b') and (b'') run interleaved for several rounds,
//! and each row is the rounds' median, so that machine noise in one run does not
//! decide the policies' or the tracing's overhead. For each: p50/p90/p99 at a fixed open-loop rate, max throughput,
//! and each proxy's RSS and CPU seconds per 1,000 requests. Prints a table with the
//! ratios to direct and to HAProxy, and writes JSON.

#![allow(clippy::print_stdout)] // the table on stdout is this tool's output

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use serde::Serialize;
use trellis_bench::{backend, haproxy, load, policies, procstat};
use trellis_tests::{
    mesh::{Mesh, Sidecar, SidecarSpec, metric_value, scrape, workload_id},
    otlp::Collector,
};

#[derive(Debug, Parser)]
#[command(
    name = "trellis-bench",
    about = "Sidecar pair vs direct vs HAProxy, same run"
)]
struct Args {
    /// Requests per second of the fixed-rate phase.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Length of the fixed-rate phase, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Length of the max-throughput phase, seconds.
    #[arg(long, default_value_t = 5)]
    max_seconds: u64,
    /// Client connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Response body size, bytes.
    #[arg(long, default_value_t = 1024)]
    body: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/proxy.json")]
    out: PathBuf,
    /// Skip HAProxy even when it is installed.
    #[arg(long)]
    no_haproxy: bool,
    /// Also measure one sidecar alone (plaintext into its inbound), to split costs.
    #[arg(long)]
    single_hop: bool,
    /// Rounds of the plain, the policies and the tracing sidecar pair, interleaved;
    /// rows are medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

#[derive(Debug, Serialize)]
struct Scenario {
    name: &'static str,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    fixed_rate_errors: u64,
    max_rps: f64,
    max_errors: u64,
    /// Per proxy process: RSS after the fixed-rate phase and its peak, KiB.
    proxies: Vec<ProxyCost>,
    /// The rounds a repeated scenario's figures are the median of, in run order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rounds: Vec<RoundLatency>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct RoundLatency {
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
struct ProxyCost {
    role: &'static str,
    rss_kib: u64,
    peak_rss_kib: u64,
    cpu_seconds_per_1k_requests: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    rate: u32,
    seconds: u64,
    connections: usize,
    body_bytes: usize,
    scenarios: Vec<Scenario>,
    /// What the policies and the tracing add to the plain pair, medians against medians.
    overheads: Vec<Overhead>,
    rounds: u32,
    /// The run order of the pairs: `P` plain, `Q` with policies, `T` traced.
    order: String,
}

#[derive(Debug, Serialize)]
struct Overhead {
    /// `trellis+policies` or `trellis+tracing`, over `trellis`.
    row: &'static str,
    p50_pct: f64,
    p99_pct: f64,
}

/// The sidecar pairs that run in rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pair {
    Plain,
    /// Every policy configured, none acting (see `policies`).
    Policies,
    /// Every request's spans recorded and exported.
    Traced,
}

impl Pair {
    const ALL: [Self; 3] = [Self::Plain, Self::Policies, Self::Traced];

    fn row(self) -> &'static str {
        match self {
            Self::Plain => "trellis",
            Self::Policies => "trellis+policies",
            Self::Traced => "trellis+tracing",
        }
    }

    fn letter(self) -> char {
        match self {
            Self::Plain => 'P',
            Self::Policies => 'Q',
            Self::Traced => 'T',
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Warms up, runs the fixed-rate phase (watching `pids`' CPU), then the max phase.
async fn measure(
    name: &'static str,
    target: SocketAddr,
    host: &str,
    pids: &[(&'static str, u32)],
    args: &Args,
) -> Result<Scenario, String> {
    let connections = args.connections;
    load::fixed_rate(target, host, args.rate, Duration::from_secs(2), connections).await?;
    let cpu_before: Vec<f64> = pids
        .iter()
        .map(|(_, pid)| procstat::cpu_seconds(*pid).unwrap_or(0.0))
        .collect();
    let seconds = Duration::from_secs(args.seconds);
    let mut fixed = load::fixed_rate(target, host, args.rate, seconds, connections).await?;
    let requests = fixed.latencies.len().max(1) as f64;
    let proxies = pids
        .iter()
        .zip(cpu_before)
        .map(|((role, pid), before)| {
            let (rss, peak) = procstat::rss_kib(*pid).unwrap_or((0, 0));
            let cpu = procstat::cpu_seconds(*pid).unwrap_or(before) - before;
            ProxyCost {
                role,
                rss_kib: rss,
                peak_rss_kib: peak,
                cpu_seconds_per_1k_requests: cpu / requests * 1000.0,
            }
        })
        .collect();
    let max = load::max_throughput(
        target,
        host,
        Duration::from_secs(args.max_seconds),
        connections,
    )
    .await?;
    eprintln!("  {name}: done");
    Ok(Scenario {
        name,
        p50_ms: ms(fixed.percentile(50.0)),
        p90_ms: ms(fixed.percentile(90.0)),
        p99_ms: ms(fixed.percentile(99.0)),
        fixed_rate_errors: fixed.errors,
        max_rps: max.throughput(),
        max_errors: max.errors,
        proxies,
        rounds: Vec::new(),
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One row from repeated runs of a scenario: each figure is the median over the rounds
/// (the peak RSS is the highest), errors are summed.
fn median_of(name: &'static str, runs: Vec<Scenario>) -> Scenario {
    let of = |field: fn(&Scenario) -> f64| median(runs.iter().map(field).collect());
    let proxies = runs.first().map_or_else(Vec::new, |first| {
        (0..first.proxies.len())
            .map(|i| {
                let costs: Vec<&ProxyCost> = runs.iter().filter_map(|r| r.proxies.get(i)).collect();
                let of =
                    |field: fn(&ProxyCost) -> f64| median(costs.iter().map(|c| field(c)).collect());
                ProxyCost {
                    role: first.proxies[i].role,
                    rss_kib: of(|c| c.rss_kib as f64) as u64,
                    peak_rss_kib: costs.iter().map(|c| c.peak_rss_kib).max().unwrap_or(0),
                    cpu_seconds_per_1k_requests: of(|c| c.cpu_seconds_per_1k_requests),
                }
            })
            .collect()
    });
    Scenario {
        name,
        p50_ms: of(|s| s.p50_ms),
        p90_ms: of(|s| s.p90_ms),
        p99_ms: of(|s| s.p99_ms),
        fixed_rate_errors: runs.iter().map(|s| s.fixed_rate_errors).sum(),
        max_rps: of(|s| s.max_rps),
        max_errors: runs.iter().map(|s| s.max_errors).sum(),
        proxies,
        rounds: runs
            .iter()
            .map(|s| RoundLatency {
                p50_ms: s.p50_ms,
                p99_ms: s.p99_ms,
            })
            .collect(),
    }
}

/// Starts a client-side sidecar `a` calling a server-side `b` in front of `backend`,
/// configured as `pair` says; `collector` receives a traced pair's spans.
fn sidecar_pair(
    mesh: &Mesh,
    backend: SocketAddr,
    pair: Pair,
    collector: &str,
) -> (Sidecar, Sidecar) {
    let mut b_spec = SidecarSpec::new("b", backend);
    match pair {
        Pair::Plain => {}
        Pair::Policies => b_spec = b_spec.inbound(policies::inbound(&workload_id("a"))),
        Pair::Traced => b_spec = b_spec.traced(collector),
    }
    let b = mesh.sidecar(b_spec);
    // The client side's app is never called: port 9 (discard) stands in for it.
    let a_spec = SidecarSpec::new("a", SocketAddr::from(([127, 0, 0, 1], 9)));
    let a_spec = match pair {
        Pair::Plain => a_spec.to("b", vec![b.endpoint()]),
        Pair::Policies => a_spec.service("b", policies::outbound(vec![b.endpoint()])),
        Pair::Traced => a_spec.to("b", vec![b.endpoint()]).traced(collector),
    };
    (mesh.sidecar(a_spec), b)
}

/// The traced pair's spans as (received by the collector, dropped by the sidecars);
/// fails the run if none arrived, as then the tracing row would not be their cost.
/// Drops are no failure: in the max-throughput phase the bounded queue is meant to
/// shed spans rather than slow requests.
async fn spans_of_run(
    a: &Sidecar,
    b: &Sidecar,
    collector: &Collector,
) -> Result<(usize, f64), String> {
    let (client, server) = (scrape(a.admin).await, scrape(b.admin).await);
    let total = |name: &str| -> f64 {
        [&client, &server]
            .iter()
            .map(|s| metric_value(s, name, &[]))
            .sum()
    };
    let (exported, dropped) = (
        total("trellis_trace_spans_exported_total"),
        total("trellis_trace_spans_dropped_total"),
    );
    // Spans exported just before the scrape may still be on their way in.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut received = 0;
    loop {
        received += collector.drain();
        if exported > 0.0 && received as f64 >= exported {
            return Ok((received, dropped));
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the collector received {received} spans of the {exported} the traced pair exported"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fails the run if a policy acted (a retry, an ejection, a refusal) or the allow rule
/// never matched: then the policies row would not be the layers' idle cost.
async fn check_no_policy_acted(a: &Sidecar, b: &Sidecar) -> Result<(), String> {
    let (client, server) = (scrape(a.admin).await, scrape(b.admin).await);
    let acted: Vec<String> = [
        (&client, "trellis_retries_total", &[][..]),
        (&client, "trellis_retry_budget_exhausted_total", &[][..]),
        (&client, "trellis_endpoint_ejections_total", &[][..]),
        (&client, "trellis_bulkhead_rejected_total", &[][..]),
        (&server, "trellis_rate_limited_total", &[][..]),
        (
            &server,
            "trellis_authz_decisions_total",
            &[("decision", "deny")][..],
        ),
    ]
    .into_iter()
    .filter_map(|(scrape, name, labels)| {
        let value = metric_value(scrape, name, labels);
        (value > 0.0).then(|| format!("{name}{labels:?} = {value}"))
    })
    .collect();
    if !acted.is_empty() {
        return Err(format!(
            "a policy acted during the policies run, so that row is not their idle cost: {}",
            acted.join(", ")
        ));
    }
    let allowed = metric_value(
        &server,
        "trellis_authz_decisions_total",
        &[("decision", "allow")],
    );
    if allowed <= 0.0 {
        return Err("the policies run's allow rule matched no request".into());
    }
    Ok(())
}

async fn run(args: Args, collector: &Collector) -> Result<Report, String> {
    let backend = backend::start(args.body).await.map_err(|e| e.to_string())?;
    let mut scenarios = Vec::new();
    eprintln!(
        "measuring: {} rps for {} s, {} connections",
        args.rate, args.seconds, args.connections
    );
    scenarios.push(measure("direct", backend, "backend", &[], &args).await?);

    let mesh = Mesh::new();
    // Rotating which pair goes first (PQT QTP TPQ ...) also cancels a slow drift of the
    // machine's speed, e.g. another build starting, between the rows.
    let mut runs: Vec<Vec<Scenario>> = Pair::ALL.iter().map(|_| Vec::new()).collect();
    let mut order = String::new();
    for round in 0..args.rounds {
        eprintln!("  round {}/{}:", round + 1, args.rounds);
        for i in 0..Pair::ALL.len() {
            let index = (i + round as usize) % Pair::ALL.len();
            let pair = Pair::ALL[index];
            let (a, b) = sidecar_pair(&mesh, backend, pair, &collector.endpoint());
            let pids = [("client-side", a.pid()), ("server-side", b.pid())];
            collector.drain();
            let scenario = measure(pair.row(), a.outbound, "b", &pids, &args).await?;
            match pair {
                Pair::Plain => {}
                Pair::Policies => check_no_policy_acted(&a, &b).await?,
                Pair::Traced => {
                    let (received, dropped) = spans_of_run(&a, &b, collector).await?;
                    eprintln!(
                        "  trellis+tracing: {received} spans received by the collector, {dropped} dropped"
                    );
                }
            }
            runs[index].push(scenario);
            order.push(pair.letter());
        }
    }
    let mut rows: Vec<Scenario> = Pair::ALL
        .iter()
        .zip(runs)
        .map(|(pair, runs)| median_of(pair.row(), runs))
        .collect();
    let added = |with: f64, without: f64| {
        if without > 0.0 {
            (with / without - 1.0) * 100.0
        } else {
            0.0
        }
    };
    let overheads = rows[1..]
        .iter()
        .map(|with| Overhead {
            row: with.name,
            p50_pct: added(with.p50_ms, rows[0].p50_ms),
            p99_pct: added(with.p99_ms, rows[0].p99_ms),
        })
        .collect();
    scenarios.append(&mut rows);

    if args.single_hop {
        // One sidecar only, plaintext in (PERMISSIVE): tells the hop's cost from the pair's.
        let mut spec = SidecarSpec::new("b", backend);
        spec.mtls = trellis_api::config::MtlsMode::Permissive;
        let b = mesh.sidecar(spec);
        let pids = [("server-side", b.pid())];
        scenarios.push(measure("trellis-inbound-only", b.inbound, "b", &pids, &args).await?);
    }

    if args.no_haproxy || !haproxy::installed() {
        eprintln!("haproxy not measured (install it with `apt-get install haproxy`)");
    } else {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let pair = haproxy::start(&mesh, dir.path(), backend).await?;
        let pids = [("client-side", pair.a.id()), ("server-side", pair.b.id())];
        scenarios.push(measure("haproxy", pair.listen, "b", &pids, &args).await?);
    }
    Ok(Report {
        rate: args.rate,
        seconds: args.seconds,
        connections: args.connections,
        body_bytes: args.body,
        scenarios,
        overheads,
        rounds: args.rounds,
        order,
    })
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn print_table(report: &Report) {
    let direct = report.scenarios.iter().find(|s| s.name == "direct");
    let haproxy = report.scenarios.iter().find(|s| s.name == "haproxy");
    println!(
        "{} rps fixed rate for {} s over {} connections, {} B responses\n",
        report.rate, report.seconds, report.connections, report.body_bytes
    );
    println!(
        "| scenario | p50 ms | p90 ms | p99 ms | added p99 vs direct | p99 vs haproxy | max rps | max vs direct | max vs haproxy | errors | RSS KiB (client/server side) | CPU s per 1k req (client/server side) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in &report.scenarios {
        let added = direct.map_or("-".into(), |d| format!("{:+.3} ms", s.p99_ms - d.p99_ms));
        let rss = s
            .proxies
            .iter()
            .map(|p| format!("{} (peak {})", p.rss_kib, p.peak_rss_kib))
            .collect::<Vec<_>>()
            .join(" / ");
        let cpu = s
            .proxies
            .iter()
            .map(|p| format!("{:.3}", p.cpu_seconds_per_1k_requests))
            .collect::<Vec<_>>()
            .join(" / ");
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {} | {} | {:.0} | {} | {} | {} | {} | {} |",
            s.name,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            added,
            haproxy.map_or("-".into(), |h| ratio(s.p99_ms, h.p99_ms)),
            s.max_rps,
            direct.map_or("-".into(), |d| ratio(s.max_rps, d.max_rps)),
            haproxy.map_or("-".into(), |h| ratio(s.max_rps, h.max_rps)),
            s.fixed_rate_errors + s.max_errors,
            if rss.is_empty() { "-".into() } else { rss },
            if cpu.is_empty() { "-".into() } else { cpu },
        );
    }
    let Some(plain) = report.scenarios.iter().find(|s| s.name == "trellis") else {
        return;
    };
    println!();
    for Overhead {
        row,
        p50_pct,
        p99_pct,
    } in &report.overheads
    {
        let Some(with) = report.scenarios.iter().find(|s| s.name == *row) else {
            continue;
        };
        println!(
            "{row} over trellis: p99 {p99_pct:+.1}% ({:.3} -> {:.3} ms), p50 {p50_pct:+.1}% ({:.3} -> {:.3} ms)",
            plain.p99_ms, with.p99_ms, plain.p50_ms, with.p50_ms
        );
    }
    println!(
        "the trellis rows are medians of {} rounds, a fresh sidecar pair each, run interleaved in the order {} (P plain, Q policies, T tracing)",
        report.rounds, report.order
    );
    for s in report
        .scenarios
        .iter()
        .filter(|s| s.name.starts_with("trellis") && !s.rounds.is_empty())
    {
        let p99s: Vec<String> = s
            .rounds
            .iter()
            .map(|r| format!("{:.3}", r.p99_ms))
            .collect();
        println!("  {} p99 per round, ms: {}", s.name, p99s.join(", "));
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let out = args.out.clone();
    // The harness blocks while it starts sidecars, which needs the multi-thread flavour.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trellis-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The traced pair's collector gets a thread of its own: on the load generator's
    // it would slow the client and be billed to the tracing row.
    let collector_runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trellis-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let collector = collector_runtime.block_on(Collector::start());
    let report = match runtime.block_on(run(args, &collector)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("trellis-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_table(&report);
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match serde_json::to_vec_pretty(&report).map(|json| std::fs::write(&out, json)) {
        Ok(Ok(())) => {
            eprintln!("wrote {}", out.display());
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("trellis-bench: writing {}: {e}", out.display());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("trellis-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
