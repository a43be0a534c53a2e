//! A child process of a test: one of the workspace's binaries, its JSON log lines on
//! a channel so a test can wait for a readiness line, killed when dropped.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// The workspace binary `name`: `$<env>` if set, else the one cargo built beside the
/// running executable (`target/<profile>/` for binaries, its `deps/` for tests).
pub fn binary(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("executable path");
    let found = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.exists());
    found.unwrap_or_else(|| {
        panic!(
            "no {name} beside {}: run `cargo test --workspace` (tests) or \
             `cargo build --release --workspace` (benchmarks) first",
            exe.display()
        )
    })
}

/// A socket address a log line names in `field`.
pub fn addr_field(line: &serde_json::Value, field: &str) -> std::net::SocketAddr {
    line[field]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {field:?} of {line}"))
}

pub struct Process {
    /// `None` once `wait_exit` took it.
    child: Option<Child>,
    logs: mpsc::Receiver<String>,
    name: String,
}

impl Process {
    /// Starts `command` with stdout (its JSON logs) read on a thread.
    pub fn spawn(name: &str, mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child: Some(child),
            logs,
            name: name.to_string(),
        }
    }

    /// Reads log lines until one matches (or 20 s pass, or the process ends). Blocks
    /// the thread, so async tests run on the multi-thread runtime.
    pub fn wait_for_log(
        &mut self,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return tokio::task::block_in_place(|| self.read_logs_until(matches));
        }
        self.read_logs_until(matches)
    }

    fn read_logs_until(
        &mut self,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.logs.recv_timeout(left).ok()?;
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                && matches(&value)
            {
                return Some(value);
            }
        }
    }

    /// Waits for the `listening` line every binary logs once its listeners are bound.
    pub fn listening(&mut self, what: &str) -> serde_json::Value {
        self.wait_for_log(|l| l["message"] == "listening")
            .unwrap_or_else(|| panic!("{what} did not start listening"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process still owned").id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// Waits for the process to exit on its own; kills it and fails after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("process still owned");
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let waited = if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| rx.recv_timeout(limit))
        } else {
            rx.recv_timeout(limit)
        };
        match waited {
            Ok(status) => status.unwrap(),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("{} did not exit within {limit:?}", self.name);
            }
        }
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A stopped process (SIGSTOP in a test) must not outlive the test.
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}
