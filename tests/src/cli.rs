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
