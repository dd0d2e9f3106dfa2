//! Running `ferrovia-echo` in a pod (or a node's host namespace): servers, probes, and
//! streaming probes, with their JSON results parsed.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::cmd::{netns_path, tail};
use crate::paths::bin;

/// Where a workload runs: a network namespace and the cgroup its process joins.
#[derive(Debug, Clone)]
pub struct Place {
    /// Name the echo server answers with.
    pub name: String,
    /// Network namespace name (under /run/netns).
    pub netns: String,
    /// cgroup v2 directory (below the node's, so the agent's socket hooks apply).
    pub cgroup: PathBuf,
    /// Directory for ready files and logs (the node's temp dir).
    pub dir: PathBuf,
}

/// Transport of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP: one line per request.
    Tcp,
    /// UDP: one datagram per request.
    Udp,
}

/// What a probe sends; build with [`ProbeSpec::tcp`] or [`ProbeSpec::udp`] and the setters.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    /// Transport.
    pub proto: Proto,
    /// Destination (a pod IP, a `ClusterIP`, ...).
    pub to: SocketAddr,
    /// Number of requests; 0 means until stopped (streams only).
    pub count: u64,
    /// One connection (socket) for all requests instead of one per request.
    pub persistent: bool,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Pause between requests.
    pub interval: Duration,
}

/// A probe's default per-request timeout: an answer expected comes well within it even in an
/// emulated VM on a loaded machine (the kernel matrix); a probe expected to fail sets a short
/// one of its own.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl ProbeSpec {
    /// One TCP request to `to`, a new connection per request, [`REQUEST_TIMEOUT`].
    #[must_use]
    pub fn tcp(to: impl Into<SocketAddr>) -> Self {
        Self {
            proto: Proto::Tcp,
            to: to.into(),
            count: 1,
            persistent: false,
            timeout: REQUEST_TIMEOUT,
            interval: Duration::ZERO,
        }
    }

    /// One UDP request to `to`, a new socket per request, [`REQUEST_TIMEOUT`].
    #[must_use]
    pub fn udp(to: impl Into<SocketAddr>) -> Self {
        Self {
            proto: Proto::Udp,
            ..Self::tcp(to)
        }
    }

    /// Sets the number of requests.
    #[must_use]
    pub fn count(mut self, n: u64) -> Self {
        self.count = n;
        self
    }

    /// Uses one connection for all requests.
    #[must_use]
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// Sets the per-request timeout.
    #[must_use]
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sets the pause between requests.
    #[must_use]
    pub fn interval(mut self, i: Duration) -> Self {
        self.interval = i;
        self
    }

    fn args(&self) -> Vec<String> {
        vec![
            "probe".into(),
            "--proto".into(),
            match self.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            }
            .into(),
            "--to".into(),
            self.to.to_string(),
            "--count".into(),
            self.count.to_string(),
            "--mode".into(),
            if self.persistent { "persistent" } else { "new" }.into(),
            "--timeout-ms".into(),
            self.timeout.as_millis().to_string(),
            "--interval-ms".into(),
            self.interval.as_millis().to_string(),
        ]
    }
}

/// One request's outcome, as printed by `ferrovia-echo probe`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ProbeResult {
    /// Whether a reply came back.
    pub ok: bool,
    /// The reply, `NAME ip:port`.
    pub reply: Option<String>,
    /// `getpeername()` of the client socket.
    pub peer: Option<String>,
    /// `getsockname()` of the client socket.
    pub local: Option<String>,
    /// `ECONNREFUSED`, `timeout`, `eof`, ...
    pub error: Option<String>,
    /// Sequence number of the connection used (changes when a persistent probe reconnected).
    pub conn: u64,
    /// Sequence number of the request.
    pub seq: u64,
    /// `CLOCK_MONOTONIC` when the request began ([`crate::sys::monotonic_ns`]).
    pub started_ns: u64,
}

impl ProbeResult {
    /// The name of the server that answered.
    #[must_use]
    pub fn server(&self) -> Option<&str> {
        self.reply.as_deref()?.split_once(' ').map(|(name, _)| name)
    }

    /// The client address the server saw.
    #[must_use]
    pub fn seen_from(&self) -> Option<SocketAddr> {
        self.reply.as_deref()?.split_once(' ')?.1.parse().ok()
    }

    /// The client socket's peer address (what the client believes it talks to).
    #[must_use]
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer.as_deref()?.parse().ok()
    }

    /// The client socket's local address.
    #[must_use]
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local.as_deref()?.parse().ok()
    }
}

/// One target's outcome, as printed by `ferrovia-echo probe-many`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TargetResult {
    /// Transport.
    pub proto: Proto,
    /// The target.
    pub to: SocketAddr,
    /// Whether a reply came back.
    pub ok: bool,
    /// The reply, `NAME ip:port`.
    pub reply: Option<String>,
    /// `ECONNREFUSED`, `timeout`, ...
    pub error: Option<String>,
}

/// A running echo server; killed on drop.
pub struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    /// The server's pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's stderr so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A probe running in the background whose results are read as they arrive; killed on drop.
pub struct ProbeStream {
    child: Child,
    shared: Arc<(Mutex<Vec<ProbeResult>>, Condvar)>,
    reader: Option<JoinHandle<()>>,
    log: PathBuf,
}

impl ProbeStream {
    /// The results so far.
    #[must_use]
    pub fn results(&self) -> Vec<ProbeResult> {
        self.shared
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until at least `n` results arrived (or the probe ended), then returns them all.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<ProbeResult>> {
        self.wait_until(&format!("{n} results"), timeout, |r| r.len() >= n)
    }

    /// Waits until `done` holds of the results so far (`what` it waits for, for the error),
    /// then returns them all; fails after `timeout` or when the probe ended.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[ProbeResult]) -> bool,
    ) -> Result<Vec<ProbeResult>> {
        let (lock, cvar) = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut results = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while !done(&results) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.reader.as_ref().is_none_or(JoinHandle::is_finished) {
                bail!(
                    "probe stream: no {what} after {timeout:?} ({} results); stderr: {}",
                    results.len(),
                    tail(&self.log, 20)
                );
            }
            // Bounded waits: the reader's exit is not signalled through the condvar.
            results = cvar
                .wait_timeout(results, left.min(Duration::from_millis(100)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(results.clone())
    }

    /// Stops the probe and returns every result it printed.
    #[must_use]
    pub fn stop(mut self) -> Vec<ProbeResult> {
        self.kill();
        self.results()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for ProbeStream {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unique_suffix() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Place {
    /// `ferrovia-echo` with `--netns` and `--cgroup` set for this place.
    fn echo(&self) -> Command {
        let mut cmd = Command::new(bin("ferrovia-echo"));
        cmd.arg("--netns")
            .arg(netns_path(&self.netns))
            .arg("--cgroup")
            .arg(&self.cgroup)
            .stdin(Stdio::null());
        cmd
    }

    fn log_file(&self, what: &str) -> Result<(PathBuf, fs::File)> {
        let path = self
            .dir
            .join(format!("{what}-{}-{}.log", self.name, unique_suffix()));
        let file =
            fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok((path, file))
    }

    /// Starts the echo server listening on `listen` (`"tcp:PORT"`, `"udp:PORT"`) and waits
    /// for its ready file.
    pub fn serve(&self, listen: &[&str]) -> Result<Server> {
        let (mut tcp, mut udp) = (Vec::new(), Vec::new());
        for l in listen {
            match l.split_once(':') {
                Some(("tcp", port)) => tcp.push(port),
                Some(("udp", port)) => udp.push(port),
                _ => bail!("serve: {l:?} is not tcp:PORT or udp:PORT"),
            }
        }
        let ready = self
            .dir
            .join(format!("ready-{}-{}", self.name, unique_suffix()));
        let (log, file) = self.log_file("serve")?;
        let mut cmd = self.echo();
        cmd.args(["serve", "--name", &self.name])
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(file);
        if !tcp.is_empty() {
            cmd.arg("--tcp").arg(tcp.join(","));
        }
        if !udp.is_empty() {
            cmd.arg("--udp").arg(udp.join(","));
        }
        let child = cmd.spawn().context("spawning ferrovia-echo serve")?;
        let mut server = Server { child, log };
        wait_ready(
            &mut server.child,
            &ready,
            &server.log,
            Duration::from_secs(10),
        )
        .with_context(|| format!("echo server in {}", self.name))?;
        Ok(server)
    }

    /// Runs a probe to completion and parses its result lines.
    pub fn probe(&self, spec: &ProbeSpec) -> Result<Vec<ProbeResult>> {
        if spec.count == 0 {
            bail!("probe: count 0 runs forever; use probe_stream");
        }
        let out = self
            .echo()
            .args(spec.args())
            .output()
            .context("running ferrovia-echo probe")?;
        if !out.status.success() {
            bail!(
                "ferrovia-echo probe from {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("probe output line {l:?}")))
            .collect()
    }

    /// Sends one request to each target, all at once, from one `ferrovia-echo probe-many`
    /// process; each target's exchange (new connection or socket, request, reply) gets
    /// `timeout`. Returns one result per target, in the order given; a target may appear once.
    pub fn probe_many(
        &self,
        targets: &[(Proto, SocketAddr)],
        timeout: Duration,
    ) -> Result<Vec<TargetResult>> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = self.echo();
        cmd.args(["probe-many", "--timeout-ms"])
            .arg(timeout.as_millis().to_string());
        for (proto, to) in targets {
            let proto = match proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            cmd.arg("--target").arg(format!("{proto}:{to}"));
        }
        let out = cmd.output().context("running ferrovia-echo probe-many")?;
        if !out.status.success() {
            bail!(
                "ferrovia-echo probe-many from {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut by_target = std::collections::HashMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let r: TargetResult = serde_json::from_str(line)
                .with_context(|| format!("probe-many output line {line:?}"))?;
            if by_target.insert((r.proto, r.to), r).is_some() {
                bail!("probe-many from {}: a target was given twice", self.name);
            }
        }
        targets
            .iter()
            .map(|t| {
                by_target
                    .remove(t)
                    .with_context(|| format!("probe-many from {}: no result for {t:?}", self.name))
            })
            .collect()
    }

    /// Starts a probe whose results are collected as they are printed.
    pub fn probe_stream(&self, spec: &ProbeSpec) -> Result<ProbeStream> {
        let (log, file) = self.log_file("probe")?;
        let mut child = self
            .echo()
            .args(spec.args())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .context("spawning ferrovia-echo probe")?;
        let stdout = child.stdout.take().expect("stdout was piped");
        let shared = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = Arc::clone(&shared);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str(&line) {
                    Ok(r) => {
                        sink.0
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(r);
                        sink.1.notify_all();
                    }
                    Err(e) => eprintln!("ferrovia-tests: bad probe line {line:?}: {e}"),
                }
            }
        });
        Ok(ProbeStream {
            child,
            shared,
            reader: Some(reader),
            log,
        })
    }
}

/// Polls for `ready` until the deadline, failing early (with the log) if the process exits.
fn wait_ready(child: &mut Child, ready: &Path, log: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready.exists() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("exited ({status}) before ready: {}", tail(log, 20));
        }
        if Instant::now() > deadline {
            bail!("not ready after {timeout:?}: {}", tail(log, 20));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
