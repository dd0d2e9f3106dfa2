//! Running the operator's CLI, `ferrovia`, against an agent's API socket: its JSON answers for
//! assertions, its tables for smoke checks, and its exit and stderr when the agent is not there.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::cmd::{run, run_ok};
use crate::paths::bin;

/// `ferrovia --socket SOCKET ARGS…`, however it exits.
pub fn ferrovia(socket: &Path, args: &[&str]) -> Result<Output> {
    run(
        Command::new(bin("ferrovia"))
            .arg("--socket")
            .arg(socket)
            .args(args),
        None,
    )
}

/// `ferrovia -o json COMMAND`, which must succeed, parsed.
pub fn json(socket: &Path, command: &str) -> Result<Value> {
    let out = run_ok(
        Command::new(bin("ferrovia"))
            .arg("--socket")
            .arg(socket)
            .args(["-o", "json", command]),
    )?;
    serde_json::from_slice(&out.stdout).with_context(|| format!("ferrovia {command}: not JSON"))
}

/// `ferrovia COMMAND` (a table), which must succeed.
pub fn table(socket: &Path, command: &str) -> Result<String> {
    let out = run_ok(
        Command::new(bin("ferrovia"))
            .arg("--socket")
            .arg(socket)
            .arg(command),
    )?;
    String::from_utf8(out.stdout).with_context(|| format!("ferrovia {command}: not UTF-8"))
}

/// A running `ferrovia -o json flows --follow …`: its output lines, parsed, as they come.
/// Killed when dropped.
pub struct Follow {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Follow {
    /// Starts `ferrovia --socket SOCKET -o json flows --follow ARGS…`.
    pub fn start(socket: &Path, args: &[&str]) -> Result<Self> {
        let mut child = Command::new(bin("ferrovia"))
            .arg("--socket")
            .arg(socket)
            .args(["-o", "json", "flows", "--follow"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .context("starting ferrovia flows --follow")?;
        let stdout = child.stdout.take().context("its stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| Value::String(format!("not JSON ({e}): {line}")));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Every event so far, waiting up to `timeout` until `done` holds of them.
    pub fn wait_until(
        &mut self,
        timeout: std::time::Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> &[Value] {
        let deadline = std::time::Instant::now() + timeout;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => break,
            }
        }
        &self.seen
    }

    /// Whether the process is still running (a stream that ended would have exited).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
