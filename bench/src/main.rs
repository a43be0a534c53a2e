//! `trellis-bench`: one command that measures, in the same run,
//! (a) client -> backend directly, (b) client -> trellis-proxy -> trellis-proxy ->
//! backend over mTLS, and (c) the same through an HAProxy mTLS pair when `haproxy`
//! is installed. For each: p50/p90/p99 at a fixed open-loop rate, max throughput,
//! and each proxy's RSS and CPU seconds per 1,000 requests. Prints a table with the
//! ratios to direct and to HAProxy, and writes JSON.

#![allow(clippy::print_stdout)] // the table on stdout is this tool's output

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use serde::Serialize;
use trellis_bench::{backend, haproxy, load, procstat};
use trellis_tests::mesh::{Mesh, SidecarSpec};

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
}

#[derive(Debug, Serialize)]
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
    })
}

async fn run(args: Args) -> Result<Report, String> {
    let backend = backend::start(args.body).await.map_err(|e| e.to_string())?;
    let mut scenarios = Vec::new();
    eprintln!(
        "measuring: {} rps for {} s, {} connections",
        args.rate, args.seconds, args.connections
    );
    scenarios.push(measure("direct", backend, "backend", &[], &args).await?);

    let mesh = Mesh::new();
    let b = mesh.sidecar(SidecarSpec::new("b", backend));
    let a = mesh.sidecar(
        SidecarSpec::new("a", SocketAddr::from(([127, 0, 0, 1], 9))).to("b", vec![b.endpoint()]),
    );
    let pids = [("client-side", a.pid()), ("server-side", b.pid())];
    scenarios.push(measure("trellis", a.outbound, "b", &pids, &args).await?);
    drop((a, b));

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
    let report = match runtime.block_on(run(args)) {
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
