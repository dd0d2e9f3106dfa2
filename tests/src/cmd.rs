//! Running commands, inside a network namespace when asked, with errors that show their output.

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Path of a named network namespace, as created by `ip netns add`.
#[must_use]
pub fn netns_path(name: &str) -> String {
    format!("/run/netns/{name}")
}

/// A command run inside the named network namespace.
///
/// `nsenter --net` rather than `ip netns exec`: the latter remounts /sys for the namespace,
/// which hides the bpffs pins under /sys/fs/bpf (see shared/TOOLCHAIN.md, Pitfalls).
pub fn in_netns<S: AsRef<OsStr>>(netns: &str, program: impl AsRef<OsStr>, args: &[S]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns_path(netns)))
        .arg("--")
        .arg(program)
        .args(args);
    cmd
}

/// Runs `cmd` (with `stdin` when given), failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Output> {
    let desc = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {desc}"))?;
    if let Some(input) = stdin {
        // Dropping the pipe after writing gives the child its EOF.
        let mut pipe = child.stdin.take().expect("stdin was piped");
        pipe.write_all(input)
            .with_context(|| format!("writing stdin of {desc}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {desc}"))?;
    Ok(out)
}

/// Like [`run`], but a non-zero exit is an error carrying stdout and stderr.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let out = run(cmd, None)?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Last `lines` lines of a log file, for failure reports.
#[must_use]
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
