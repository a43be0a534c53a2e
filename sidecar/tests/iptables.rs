//! `trellis-proxy init` for real: in a network namespace of the test's own, the rules
//! it installs send a client's outbound connection to the proxy's port with the
//! original destination readable via `SO_ORIGINAL_DST`, let the proxy's uid through
//! untouched, and are the same after a second run.
//!
//! Needs root, `ip` (iproute2), `iptables` and `setpriv`; without them the test says
//! why on stderr and passes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

const HELPER_ENV: &str = "TRELLIS_NETNS_HELPER";
/// An address of the namespace's own (on lo), so a connection that is not redirected
/// reaches the helper's "direct" listener instead of hanging.
const TARGET: &str = "10.1.2.3";
const TARGET_PORT: u16 = 8080;

fn skip_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root: network namespaces and iptables need it".into());
    }
    for (program, arg) in [
        ("ip", "-V"),
        ("iptables", "--version"),
        ("iptables-save", "--version"),
        ("setpriv", "--version"),
        ("bash", "--version"),
    ] {
        let ok = Command::new(program)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        // As root the test can run, so a missing tool is a broken machine, not a skip
        // (`.ci/run` installs iptables and iproute2).
        assert!(
            ok,
            "`{program}` is not installed: apt-get install iptables iproute2 util-linux"
        );
    }
    None
}

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Self {
        let name = format!(
            "trellis-test-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(status.success(), "ip netns add {name}");
        Self { name }
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let output = self.command(program).args(args).output().unwrap();
        assert!(
            output.status.success(),
            "{program} {args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// `iptables-save -t nat` without the lines that change by themselves: the
    /// timestamps and the packet counters.
    fn nat_rules(&self) -> String {
        let output = self.run("iptables-save", &["-t", "nat"]);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| match line.find(" [") {
                Some(at) if line.starts_with(':') => &line[..at],
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Connects to the target from inside the namespace, optionally as `uid`, sends
    /// `send` (a printf format) and returns the one line the other side answered.
    fn connect(&self, uid: Option<u32>, send: &str) -> String {
        let script = format!(
            "trap '' PIPE; exec 3<>/dev/tcp/{TARGET}/{TARGET_PORT} && printf '{send}' >&3; head -n1 <&3"
        );
        let mut command = match uid {
            Some(uid) => {
                let mut command = self.command("setpriv");
                let uid = uid.to_string();
                command.args(["--reuid", &uid, "--regid", &uid, "--clear-groups"]);
                command.arg("timeout");
                command
            }
            None => self.command("timeout"),
        };
        let output = command
            .args(["10", "bash", "-c", &script])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "connect as {uid:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The helper listener, running in the namespace; killed on drop.
struct Listener(Child);

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn init_redirects_outbound_to_the_proxy_port_and_lets_the_proxy_uid_through() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED init_redirects_outbound_to_the_proxy_port: {reason}");
        return;
    }
    let netns = Netns::create();
    netns.run("ip", &["link", "set", "lo", "up"]);
    netns.run("ip", &["addr", "add", &format!("{TARGET}/32"), "dev", "lo"]);

    let proxy = env!("CARGO_BIN_EXE_trellis-proxy");
    netns.run(proxy, &["init", "--skip-outbound-ports", "5432"]);
    let first = netns.nat_rules();
    netns.run(proxy, &["init", "--skip-outbound-ports", "5432"]);
    let second = netns.nat_rules();
    assert_eq!(first, second, "a second run changed the rules");
    for rule in [
        "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
        "-A PREROUTING -p tcp -j TRELLIS_PREROUTING",
        "-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A TRELLIS_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        "-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "-A TRELLIS_PREROUTING -p tcp -j REDIRECT --to-ports 15006",
    ] {
        assert_eq!(
            first.lines().filter(|l| *l == rule).count(),
            1,
            "{rule:?} once in\n{first}"
        );
    }

    // The listeners run in the namespace as the proxy's uid, as the proxy does: this
    // test binary again, as the helper below.
    let mut child = netns
        .command("setpriv")
        .args(["--reuid", "1337", "--regid", "1337", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "netns_helper", "--nocapture"])
        .env(HELPER_ENV, "listen")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _listener = Listener(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the helper listener never said READY");
        if line == "READY" {
            break;
        }
    }

    // The app's HTTP lands on the proxy port, which can tell where it was going.
    let http = r"GET / HTTP/1.1\r\nHost: orders\r\n\r\n";
    let redirected = format!("proxy http original={TARGET}:{TARGET_PORT}");
    assert_eq!(netns.connect(None, http), redirected);
    // Any uid but the proxy's is redirected like the app.
    assert_eq!(netns.connect(Some(1000), http), redirected);
    // The proxy's own uid goes where it dials.
    assert_eq!(netns.connect(Some(1337), http), "direct");
    // What is not HTTP (a line of text; a client that waits for the server to speak
    // first) is passed through to the original destination.
    assert_eq!(netns.connect(None, r"hello\n"), "direct");
    assert_eq!(netns.connect(None, ""), "direct");
}

/// Run by the test above inside its namespace: a stand-in for the proxy's outbound
/// listener on 127.0.0.1:15001 that sorts connections with
/// `trellis_sidecar::init::outbound` and answers HTTP with the original destination,
/// and a "direct" listener on the target itself.
#[tokio::test]
#[ignore = "a helper the netns test runs inside its namespace"]
async fn netns_helper() {
    use tokio::{
        io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
        net::TcpListener,
    };
    use trellis_sidecar::init::Outbound;

    /// Replies, then reads what the client sent until it closes: closing with its
    /// bytes unread would reset the connection and could lose the reply.
    async fn answer<T: AsyncRead + AsyncWrite + Unpin>(io: &mut T, reply: &[u8]) {
        let _ = io.write_all(reply).await;
        let _ = io.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut sink)).await;
    }

    if std::env::var(HELPER_ENV).as_deref() != Ok("listen") {
        eprintln!("netns_helper: only meaningful inside the iptables test's namespace");
        return;
    }
    let proxy = TcpListener::bind("127.0.0.1:15001").await.unwrap();
    let direct = TcpListener::bind((TARGET, TARGET_PORT)).await.unwrap();
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "READY").unwrap();
        stdout.flush().unwrap();
    }
    let drain = tokio_util::sync::CancellationToken::new();
    let serve = async {
        loop {
            tokio::select! {
                accepted = proxy.accept() => {
                    let (stream, _) = accepted.unwrap();
                    let drain = drain.clone();
                    tokio::spawn(async move {
                        let original = trellis_sidecar::init::original_destination(&stream)
                            .map_or("none".to_string(), |a| a.to_string());
                        let timeout = Duration::from_millis(300);
                        match trellis_sidecar::init::outbound(stream, timeout, &drain).await {
                            Outbound::Http(mut io) => {
                                let reply = format!("proxy http original={original}\n");
                                answer(&mut io, reply.as_bytes()).await;
                            }
                            Outbound::Direct(mut tcp) => {
                                answer(&mut tcp, b"proxy not redirected\n").await;
                            }
                            Outbound::PassedThrough => {}
                        }
                    });
                }
                accepted = direct.accept() => {
                    let mut stream = accepted.unwrap().0;
                    tokio::spawn(async move { answer(&mut stream, b"direct\n").await });
                }
            }
        }
    };
    // Never outlive a test that failed to kill it.
    let _ = tokio::time::timeout(Duration::from_secs(120), serve).await;
}
