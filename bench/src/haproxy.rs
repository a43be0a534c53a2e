//! Two HAProxy processes configured as an mTLS sidecar pair, the baseline the
//! Trellis pair is measured against: client -> A (plain HTTP in, TLS + h2 out) ->
//! B (TLS + client-cert verification in) -> backend. One thread each (`nbthread 1`),
//! as one core per sidecar is the budget.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use trellis_tests::mesh::Mesh;

#[derive(Debug)]
pub struct HaproxyPair {
    pub a: Child,
    pub b: Child,
    pub listen: SocketAddr,
}

impl Drop for HaproxyPair {
    fn drop(&mut self) {
        for child in [&mut self.a, &mut self.b] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn installed() -> bool {
    Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A port the kernel just handed out; HAProxy's config needs a number.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// HAProxy wants the chain and the key in one file.
fn combined_pem(mesh: &Mesh, name: &str, dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    let id = format!("spiffe://cluster.local/ns/default/sa/{name}");
    let (cert, key, bundle) = mesh.write_identity(&format!("haproxy-{name}"), &id);
    let combined = dir.join(format!("haproxy-{name}-combined.pem"));
    let text = std::fs::read_to_string(cert)? + &std::fs::read_to_string(key)?;
    std::fs::write(&combined, text)?;
    Ok((combined, bundle))
}

fn spawn(config: &Path) -> std::io::Result<Child> {
    Command::new("haproxy")
        .arg("-f")
        .arg(config)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
}

async fn wait_listening(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    // HAProxy has no readiness signal but its listening socket.
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("haproxy did not listen on {addr}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

pub async fn start(mesh: &Mesh, dir: &Path, backend: SocketAddr) -> Result<HaproxyPair, String> {
    let io = |e: std::io::Error| e.to_string();
    let (a_pem, ca) = combined_pem(mesh, "a", dir).map_err(io)?;
    let (b_pem, _) = combined_pem(mesh, "b", dir).map_err(io)?;
    let (a_port, b_port) = (free_port().map_err(io)?, free_port().map_err(io)?);
    let common = "global\n  nbthread 1\n  maxconn 4096\n\
                  defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  \
                  timeout server 60s\n  http-reuse always\n";
    let a_config = format!(
        "{common}frontend out\n  bind 127.0.0.1:{a_port}\n  default_backend peer\n\
         backend peer\n  server b 127.0.0.1:{b_port} ssl crt {a} ca-file {ca} verify required alpn h2\n",
        a = a_pem.display(),
        ca = ca.display(),
    );
    let b_config = format!(
        "{common}frontend in\n  bind 127.0.0.1:{b_port} ssl crt {b} ca-file {ca} verify required alpn h2\n  \
         default_backend app\n\
         backend app\n  server app {backend}\n",
        b = b_pem.display(),
        ca = ca.display(),
    );
    let a_path = dir.join("haproxy-a.cfg");
    let b_path = dir.join("haproxy-b.cfg");
    std::fs::write(&a_path, a_config).map_err(io)?;
    std::fs::write(&b_path, b_config).map_err(io)?;
    let b = spawn(&b_path).map_err(io)?;
    let a = spawn(&a_path).map_err(io)?;
    let pair = HaproxyPair {
        a,
        b,
        listen: SocketAddr::from(([127, 0, 0, 1], a_port)),
    };
    wait_listening(SocketAddr::from(([127, 0, 0, 1], b_port))).await?;
    wait_listening(pair.listen).await?;
    Ok(pair)
}
