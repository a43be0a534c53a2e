//! The demo's child processes: each one's output goes to its own log file, its
//! `listening` line says it is up (and on which ports), a child that dies is reported
//! by name with the end of its log, and every child is stopped on the way out.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

use crate::error::CliError;

/// How long a child may take to bind its listeners.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child gets to finish after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the demo's binaries are: next to `trellisctl` (a cargo build puts them there),
/// else on `PATH`.
pub fn locate(name: &str) -> Result<PathBuf, CliError> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|path| path.is_file());
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|path| path.is_file())
        })
    };
    beside.or_else(on_path).ok_or_else(|| {
        CliError::Demo(format!(
            "{name} is neither next to trellisctl nor on PATH; build every binary first: \
             cargo build --release --bins"
        ))
    })
}

#[derive(Debug)]
struct Running {
    name: String,
    child: Child,
    log: PathBuf,
}

/// Every child the demo started, in start order.
#[derive(Debug)]
pub struct Processes {
    logs: PathBuf,
    running: Vec<Running>,
}

impl Processes {
    pub fn new(logs: PathBuf) -> Result<Self, CliError> {
        std::fs::create_dir_all(&logs).map_err(|e| {
            CliError::Demo(format!(
                "cannot create the log folder {}: {e}",
                logs.display()
            ))
        })?;
        // A kept data dir's earlier run listed its own children here.
        let _ = std::fs::remove_file(logs.join("pids"));
        Ok(Self {
            logs,
            running: Vec::new(),
        })
    }

    /// Starts `command` as `name` and waits for its `listening` log line, which it
    /// returns (the bound addresses are its fields).
    pub async fn start(&mut self, name: &str, mut command: Command) -> Result<Value, CliError> {
        let log = self.logs.join(format!("{name}.log"));
        let file = tokio::fs::File::create(&log)
            .await
            .map_err(|e| CliError::Demo(format!("cannot create the log {}: {e}", log.display())))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own: the terminal's Ctrl-C reaches trellisctl alone, which
            // then stops the children in order (gateway and sidecars first).
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| CliError::Demo(format!("cannot start {name}: {e}")))?;
        let (listening_tx, mut listening) = mpsc::channel::<Value>(1);
        let (lines_tx, lines) = mpsc::channel::<String>(256);
        let (out, err) = (child.stdout.take(), child.stderr.take());
        for stream in [out.map(boxed), err.map(boxed)].into_iter().flatten() {
            tokio::spawn(read_lines(stream, lines_tx.clone()));
        }
        drop(lines_tx);
        tokio::spawn(write_log(lines, file, listening_tx));
        // Which process is which, for whoever wants to check that none outlives us.
        if let Some(pid) = child.id() {
            let pids = self.logs.join("pids");
            let opened = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&pids)
                .await;
            if let Ok(mut file) = opened {
                let _ = file.write_all(format!("{pid} {name}\n").as_bytes()).await;
            }
        }
        self.running.push(Running {
            name: name.to_string(),
            child,
            log: log.clone(),
        });
        match tokio::time::timeout(START_TIMEOUT, listening.recv()).await {
            Ok(Some(line)) => Ok(line),
            Ok(None) => Err(CliError::Demo(format!(
                "{name} exited before it was listening; the end of {}:\n{}",
                log.display(),
                tail(&log)
            ))),
            Err(_) => Err(CliError::Demo(format!(
                "{name} did not start listening within {START_TIMEOUT:?}; see {}",
                log.display()
            ))),
        }
    }

    /// The first child that has exited, named, with how and the end of its log.
    pub fn crashed(&mut self) -> Option<String> {
        self.running
            .iter_mut()
            .find_map(|r| match r.child.try_wait() {
                Ok(Some(status)) => Some(format!(
                    "{} exited unexpectedly ({status}); the end of {}:\n{}",
                    r.name,
                    r.log.display(),
                    tail(&r.log)
                )),
                Ok(None) => None,
                Err(e) => Some(format!("cannot check on {}: {e}", r.name)),
            })
    }

    /// Stops every child, last started first (the gateway and sidecars before the
    /// control plane): SIGTERM, then a kill after the grace period. Returns the names of
    /// children that would not go.
    pub async fn stop_all(&mut self) -> Vec<String> {
        for r in self.running.iter().rev() {
            if let Some(pid) = r.child.id() {
                // tokio can only SIGKILL; `kill` asks politely, so they drain and exit.
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await;
            }
        }
        let mut stuck = Vec::new();
        for r in self.running.iter_mut().rev() {
            if tokio::time::timeout(STOP_TIMEOUT, r.child.wait())
                .await
                .is_err()
            {
                let _ = r.child.start_kill();
                if tokio::time::timeout(STOP_TIMEOUT, r.child.wait())
                    .await
                    .is_err()
                {
                    stuck.push(r.name.clone());
                }
            }
        }
        stuck
    }

    /// Whether every child has exited.
    pub fn all_exited(&mut self) -> bool {
        self.running
            .iter_mut()
            .all(|r| matches!(r.child.try_wait(), Ok(Some(_))))
    }

    pub fn logs(&self) -> &Path {
        &self.logs
    }
}

type Stream = Box<dyn AsyncRead + Send + Unpin>;

fn boxed(stream: impl AsyncRead + Send + Unpin + 'static) -> Stream {
    Box::new(stream)
}

/// Sends a child's output stream line by line to its log writer.
async fn read_lines(stream: Stream, lines: mpsc::Sender<String>) {
    let mut reader = BufReader::new(stream).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        if lines.send(line).await.is_err() {
            return;
        }
    }
}

/// Writes a child's lines (stdout and stderr, as they come) to its log; the first
/// `listening` line also goes to `listening`.
async fn write_log(
    mut lines: mpsc::Receiver<String>,
    mut file: tokio::fs::File,
    listening: mpsc::Sender<Value>,
) {
    while let Some(line) = lines.recv().await {
        let _ = file.write_all(line.as_bytes()).await;
        let _ = file.write_all(b"\n").await;
        if !listening.is_closed()
            && let Ok(value) = serde_json::from_str::<Value>(&line)
            && value["message"] == "listening"
        {
            let _ = listening.try_send(value);
        }
    }
}

/// The last lines of a log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
