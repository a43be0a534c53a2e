//! `trellis-proxy init`: the pod's init step on Kubernetes. It installs the iptables
//! `nat` rules that send the app's TCP through the proxy — outbound to the outbound
//! listener (15001), inbound to the inbound listener (15006) — in chains of its own,
//! so running it again (a restarted init container) leaves the same rules.
//!
//! Left alone: the proxy's own traffic (by uid: the owner match), loopback
//! destinations (the app calling itself, the proxy calling the app), the proxy's
//! admin and inbound ports, and any ports the operator names.
//!
//! It runs once, before the app and before any runtime, so it calls `iptables`
//! with blocking `std::process::Command`s.

use std::{
    ffi::OsString,
    io::Write,
    net::SocketAddr,
    process::{Command, ExitCode},
};

use crate::inbound::detect::{Prefixed, Protocol, detect};

/// The chain the `nat OUTPUT` chain jumps to: the app's outbound connections.
pub const OUTPUT_CHAIN: &str = "TRELLIS_OUTPUT";
/// The chain the `nat PREROUTING` chain jumps to: connections from peers.
pub const PREROUTING_CHAIN: &str = "TRELLIS_PREROUTING";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "trellis-proxy init",
    version,
    about = "Install the iptables redirects of a meshed pod (an init container, as root \
             with NET_ADMIN)"
)]
pub struct InitArgs {
    /// The uid the proxy runs as; its connections are never redirected.
    #[arg(long, env = "TRELLIS_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,

    /// The proxy's outbound listener: the app's outbound TCP is redirected here.
    #[arg(long, env = "TRELLIS_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,

    /// The proxy's inbound listener: TCP from outside the pod is redirected here.
    #[arg(long, env = "TRELLIS_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,

    /// The proxy's admin port; the kubelet's probes reach it unredirected.
    #[arg(long, env = "TRELLIS_ADMIN_PORT", default_value_t = 15020)]
    pub admin_port: u16,

    /// Inbound destination ports left alone, comma-separated (e.g. a metrics port
    /// scraped without mTLS).
    #[arg(
        long,
        env = "TRELLIS_SKIP_INBOUND_PORTS",
        value_delimiter = ',',
        value_name = "PORTS"
    )]
    pub skip_inbound_ports: Vec<u16>,

    /// Outbound destination ports left alone, comma-separated (e.g. a database
    /// outside the mesh).
    #[arg(
        long,
        env = "TRELLIS_SKIP_OUTBOUND_PORTS",
        value_delimiter = ',',
        value_name = "PORTS"
    )]
    pub skip_outbound_ports: Vec<u16>,

    /// The iptables program (`iptables-legacy` where the node uses the legacy backend).
    #[arg(long, env = "TRELLIS_IPTABLES", default_value = "iptables")]
    pub iptables: String,

    /// Print the iptables commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("running `{command}`: {source} (is iptables installed in the init image?)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The rules of the two chains, in order, each as the arguments after
/// `iptables -t nat -A`.
pub fn chain_rules(args: &InitArgs) -> Vec<Vec<String>> {
    let InitArgs {
        proxy_uid,
        outbound_port,
        inbound_port,
        admin_port,
        skip_inbound_ports,
        skip_outbound_ports,
        iptables: _,
        dry_run: _,
    } = args;
    let rule = |chain: &str, rest: &[&str]| {
        std::iter::once(chain)
            .chain(rest.iter().copied())
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let mut rules = Vec::new();

    // Outbound: the proxy's own connections (to peers, to the control plane, to the
    // app) keep their destination, or they would loop back into it.
    let uid = proxy_uid.to_string();
    rules.push(rule(
        OUTPUT_CHAIN,
        &["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
    ));
    rules.push(rule(OUTPUT_CHAIN, &["-d", "127.0.0.0/8", "-j", "RETURN"]));
    for port in sorted(skip_outbound_ports) {
        let port = port.to_string();
        rules.push(rule(
            OUTPUT_CHAIN,
            &["-p", "tcp", "--dport", &port, "-j", "RETURN"],
        ));
    }
    let outbound = outbound_port.to_string();
    rules.push(rule(
        OUTPUT_CHAIN,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &outbound],
    ));

    // Inbound: peers dial the inbound port directly and the kubelet probes admin.
    let own = [*inbound_port, *admin_port];
    for port in sorted(&[&own[..], skip_inbound_ports].concat()) {
        let port = port.to_string();
        rules.push(rule(
            PREROUTING_CHAIN,
            &["-p", "tcp", "--dport", &port, "-j", "RETURN"],
        ));
    }
    let inbound = inbound_port.to_string();
    rules.push(rule(
        PREROUTING_CHAIN,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound],
    ));
    rules
}

/// The jumps from the built-in chains into ours.
pub fn jumps() -> [[&'static str; 5]; 2] {
    [
        ["OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN],
        ["PREROUTING", "-p", "tcp", "-j", PREROUTING_CHAIN],
    ]
}

fn sorted(ports: &[u16]) -> Vec<u16> {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Installs the rules: our chains are created or flushed and refilled, and the jumps
/// into them are added only where `-C` finds none, so a second run changes nothing.
pub fn install(args: &InitArgs) -> Result<(), InitError> {
    let runner = Runner {
        program: &args.iptables,
        dry_run: args.dry_run,
    };
    for chain in [OUTPUT_CHAIN, PREROUTING_CHAIN] {
        // -N fails when the chain exists; then it is flushed instead.
        if args.dry_run {
            runner.run(&["-N", chain])?;
        } else {
            match runner.exec(&["-N", chain]) {
                Ok(()) => {}
                // It exists already (a second run): start it over.
                Err(InitError::Failed { .. }) => runner.run(&["-F", chain])?,
                Err(spawn) => return Err(spawn),
            }
        }
    }
    for rule in chain_rules(args) {
        let mut command = vec!["-A"];
        command.extend(rule.iter().map(String::as_str));
        runner.run(&command)?;
    }
    for [builtin, rest @ ..] in jumps() {
        let mut check = vec!["-C", builtin];
        check.extend(rest);
        // A dry run shows what a first run does: no jump exists yet.
        if args.dry_run || runner.exec(&check).is_err() {
            let mut append = vec!["-A", builtin];
            append.extend(rest);
            runner.run(&append)?;
        }
    }
    Ok(())
}

struct Runner<'a> {
    program: &'a str,
    dry_run: bool,
}

impl Runner<'_> {
    fn describe(&self, args: &[&str]) -> String {
        format!("{} -t nat {}", self.program, args.join(" "))
    }

    fn run(&self, args: &[&str]) -> Result<(), InitError> {
        if self.dry_run {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{}", self.describe(args));
            return Ok(());
        }
        self.exec(args)
    }

    fn exec(&self, args: &[&str]) -> Result<(), InitError> {
        let command = self.describe(args);
        let output = Command::new(self.program)
            // -w: wait for the xtables lock rather than fail beside another writer.
            .args(["-w", "-t", "nat"])
            .args(args)
            .output()
            .map_err(|source| InitError::Spawn {
                command: command.clone(),
                source,
            })?;
        if output.status.success() {
            Ok(())
        } else {
            Err(InitError::Failed {
                command,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            })
        }
    }
}

/// `trellis-proxy init ARGS...`: `args` starts with the program name, then `init`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    use clap::Parser;
    // Drop `init` so clap sees the flags after it.
    let mut args: Vec<OsString> = args.into_iter().collect();
    if args.len() > 1 {
        args.remove(1);
    }
    let args = InitArgs::parse_from(args);
    match install(&args) {
        Ok(()) => {
            if !args.dry_run {
                eprintln!(
                    "trellis-proxy init: outbound TCP -> :{}, inbound TCP -> :{}, uid {} \
                     and loopback left alone",
                    args.outbound_port, args.inbound_port, args.proxy_uid
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trellis-proxy init: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where a connection redirected by the rules above was going (`SO_ORIGINAL_DST`):
/// the outbound listener routes by it when the request's authority names no mesh
/// service. `None` when the connection was not redirected (it came straight to the
/// listener) or the socket is IPv6.
pub fn original_destination(stream: &tokio::net::TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    if !local.is_ipv4() {
        return None;
    }
    let original = socket2::SockRef::from(stream)
        .original_dst_v4()
        .ok()?
        .as_socket()?;
    // Without a redirect the kernel reports the listener's own address.
    (original != local).then_some(original)
}

/// How the outbound listener takes a connection.
#[derive(Debug)]
pub enum Outbound {
    /// Came straight to the listener (universal mode, or an app that dials it):
    /// HTTP routed by its authority, as always.
    Direct(tokio::net::TcpStream),
    /// Redirected here and speaking HTTP: routed by its authority too; the bytes
    /// read to tell are replayed.
    Http(Prefixed<tokio::net::TcpStream>),
    /// Redirected here but not HTTP (TLS to a host outside the mesh, a database
    /// protocol, a server-first protocol that says nothing): sent on, as it is, to
    /// where the app was connecting; nothing is left to serve.
    PassedThrough,
}

/// Sorts an accepted outbound connection (see [`Outbound`]). A passed-through
/// connection is forwarded here until either side closes or `drain` fires; the
/// proxy's own connection to the original destination runs as the proxy's uid, so
/// the rules do not redirect it back.
pub async fn outbound(
    tcp: tokio::net::TcpStream,
    detect_timeout: std::time::Duration,
    drain: &tokio_util::sync::CancellationToken,
) -> Outbound {
    let Some(original) = original_destination(&tcp) else {
        return Outbound::Direct(tcp);
    };
    let (protocol, mut io) = match detect(tcp, detect_timeout).await {
        Ok(detected) => detected,
        Err(error) => {
            tracing::debug!(%error, %original, "redirected connection lost before its first bytes");
            return Outbound::PassedThrough;
        }
    };
    if matches!(protocol, Protocol::Http1 | Protocol::Http2) {
        return Outbound::Http(io);
    }
    let mut upstream = match tokio::net::TcpStream::connect(original).await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::debug!(%error, %original, "passthrough connect failed");
            return Outbound::PassedThrough;
        }
    };
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        () = drain.cancelled() => {}
        copied = tokio::io::copy_bidirectional(&mut io, &mut upstream) => {
            if let Err(error) = copied {
                tracing::debug!(%error, %original, "passthrough ended");
            }
        }
    }
    Outbound::PassedThrough
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(extra: &[&str]) -> InitArgs {
        InitArgs::try_parse_from(["trellis-proxy init"].iter().chain(extra)).unwrap()
    }

    #[test]
    fn rules_skip_the_proxy_loopback_and_named_ports_then_redirect() {
        let rules = chain_rules(&parse(&[
            "--skip-inbound-ports",
            "9090,15020",
            "--skip-outbound-ports",
            "5432",
        ]));
        let text: Vec<String> = rules.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            text,
            [
                "TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "TRELLIS_OUTPUT -p tcp --dport 5432 -j RETURN",
                "TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
                "TRELLIS_PREROUTING -p tcp --dport 9090 -j RETURN",
                "TRELLIS_PREROUTING -p tcp --dport 15006 -j RETURN",
                "TRELLIS_PREROUTING -p tcp --dport 15020 -j RETURN",
                "TRELLIS_PREROUTING -p tcp -j REDIRECT --to-ports 15006",
            ]
        );
    }

    #[test]
    fn bad_ports_are_refused_by_name() {
        let error = InitArgs::try_parse_from(["init", "--skip-outbound-ports", "80,http"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--skip-outbound-ports"), "{error}");
    }

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(original_destination(&accepted), None);
    }
}
