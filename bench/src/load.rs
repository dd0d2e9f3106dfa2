//! The load generator's measurement types, and running `ferrovia-load` in a pod.
//!
//! `ferrovia-load` (bench/src/bin/ferrovia-load.rs) speaks `ferrovia-echo serve`'s protocol —
//! a request line, a reply line `NAME peer` — and prints one [`LoadResult`] as JSON. Its modes:
//!
//! - [`Mode::Rr`]: `conns` persistent TCP connections, each looping request → reply; the rate
//!   is requests per second, the latency that of one request/reply.
//! - [`Mode::Crr`]: `conns` loops of connect → one request/reply → close; the rate is
//!   connections per second, the latency the whole connect + request + close.
//! - [`Mode::UdpRr`]: `conns` connected UDP sockets, each looping datagram → reply datagram.
//!
//! [`run_load`] runs it where a workload runs ([`Place`]: a pod's netns and cgroup, so the
//! agent's cgroup socket hooks see its sockets) and returns the parsed result.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrovia_tests::Place;
use ferrovia_tests::cmd::{netns_path, tail};
use serde::{Deserialize, Serialize};

/// What one measured operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Request/response over persistent TCP connections.
    Rr,
    /// Connect, one request/response, close: new connections per second.
    Crr,
    /// Request/response datagrams over connected UDP sockets.
    UdpRr,
}

impl Mode {
    /// The name on the command line and in the JSON (`rr`, `crr`, `udp-rr`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rr => "rr",
            Self::Crr => "crr",
            Self::UdpRr => "udp-rr",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON object `ferrovia-load` prints: counts and latencies of the measured window only
/// (the warm-up is left out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadResult {
    /// What was measured.
    pub mode: Mode,
    /// Length of the measured window, in seconds.
    pub duration_s: f64,
    /// Concurrent connections (UDP: sockets; CRR: connect loops).
    pub conns: u32,
    /// Operations completed in the window: requests (rr, udp-rr) or connections (crr).
    pub ok: u64,
    /// Operations that failed in the window (refused, reset, timed out, ...).
    pub errors: u64,
    /// `ok / duration_s`.
    pub rate_per_s: f64,
    /// Latency percentiles of the completed operations, in microseconds (0 when `ok == 0`).
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Slowest completed operation.
    pub max_us: u64,
    /// Completed operations per answering server (the reply's first word, the pod's name):
    /// shows the spread over backends and that traffic went where intended.
    pub by_server: BTreeMap<String, u64>,
    /// Failed operations by cause: an errno name (`ECONNREFUSED`), `timeout`, `eof`.
    #[serde(default)]
    pub errors_by_kind: BTreeMap<String, u64>,
    /// CPU time the load generator used per second of the window (1.0 = one core busy): near
    /// `workers`, the generator itself is the bottleneck.
    #[serde(default)]
    pub client_cpu: f64,
    /// Busy cores of the whole machine over the window (from /proc/stat: user, system, irq,
    /// softirq, steal), so `host_cpu - client_cpu` is what the servers and the kernel used.
    #[serde(default)]
    pub host_cpu: f64,
    /// Tokio worker threads the generator ran on.
    #[serde(default)]
    pub workers: usize,
}

/// One `ferrovia-load` run; build with [`LoadSpec::new`] and the setters.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// What to measure.
    pub mode: Mode,
    /// Targets; connection `i` goes to `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    /// Concurrent connections.
    pub conns: u32,
    /// Measured window.
    pub duration: Duration,
    /// Time run before the window, not counted (connections set up, caches warm).
    pub warmup: Duration,
    /// Bytes per request, newline included (at least 1).
    pub payload: usize,
    /// Tokio worker threads (1: a current-thread runtime; see the binary's `--workers`).
    pub workers: usize,
    /// Per-operation timeout (connect, and wait for the reply).
    pub timeout: Duration,
    /// CRR: close with RST (`SO_LINGER` 0) so the client keeps no `TIME_WAIT` sockets.
    pub rst_close: bool,
}

impl LoadSpec {
    /// `mode` against `targets`: 1 connection, 1 s measured after 200 ms of warm-up, 16-byte
    /// requests, 1 worker, 1 s per-operation timeout, normal close.
    #[must_use]
    pub fn new(mode: Mode, targets: impl IntoIterator<Item = SocketAddr>) -> Self {
        Self {
            mode,
            targets: targets.into_iter().collect(),
            conns: 1,
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(200),
            payload: 16,
            workers: 1,
            timeout: Duration::from_secs(1),
            rst_close: false,
        }
    }

    /// Sets the number of concurrent connections.
    #[must_use]
    pub fn conns(mut self, n: u32) -> Self {
        self.conns = n;
        self
    }

    /// Sets the measured window.
    #[must_use]
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration = d;
        self
    }

    /// Sets the warm-up.
    #[must_use]
    pub fn warmup(mut self, d: Duration) -> Self {
        self.warmup = d;
        self
    }

    /// Sets the request size in bytes.
    #[must_use]
    pub fn payload(mut self, bytes: usize) -> Self {
        self.payload = bytes;
        self
    }

    /// Sets the number of tokio worker threads.
    #[must_use]
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Sets the per-operation timeout.
    #[must_use]
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// CRR closes with RST instead of FIN.
    #[must_use]
    pub fn rst_close(mut self) -> Self {
        self.rst_close = true;
        self
    }

    /// The command-line arguments of `ferrovia-load` for this run (without `--netns`/`--cgroup`).
    #[must_use]
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for t in &self.targets {
            args.extend(["--to".into(), t.to_string()]);
        }
        args.extend([
            "--mode".into(),
            self.mode.to_string(),
            "--duration-ms".into(),
            self.duration.as_millis().to_string(),
            "--warmup-ms".into(),
            self.warmup.as_millis().to_string(),
            "--conns".into(),
            self.conns.to_string(),
            "--payload".into(),
            self.payload.to_string(),
            "--workers".into(),
            self.workers.to_string(),
            "--timeout-ms".into(),
            self.timeout.as_millis().to_string(),
        ]);
        if self.rst_close {
            args.push("--rst-close".into());
        }
        args
    }

    /// The longest a run may take before it is considered hung: warm-up, window, one
    /// operation's timeout, and slack for process start and exit.
    #[must_use]
    pub fn time_limit(&self) -> Duration {
        self.warmup + self.duration + self.timeout + Duration::from_secs(10)
    }
}

/// Path of the `ferrovia-load` binary, found like the harness finds its own binaries
/// (`FERROVIA_BIN_DIR`, else the running cargo profile's directory).
#[must_use]
pub fn load_bin() -> PathBuf {
    ferrovia_tests::paths::bin("ferrovia-load")
}

/// Runs `ferrovia-load` in `place` (its netns and cgroup, joined before the generator starts)
/// and returns its result. Fails if it exits non-zero, prints no result, or outlives
/// [`LoadSpec::time_limit`] (then it is killed).
pub fn run_load(place: &Place, spec: &LoadSpec) -> Result<LoadResult> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let log = place.dir.join(format!(
        "load-{}-{}.log",
        place.name,
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let log_file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let bin = load_bin();
    let mut child = Command::new(&bin)
        .arg("--netns")
        .arg(netns_path(&place.netns))
        .arg("--cgroup")
        .arg(&place.cgroup)
        .args(spec.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    // Read stdout on a thread so the wait below can be bounded (the output is one line).
    let mut stdout = child.stdout.take().expect("stdout was piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let limit = spec.time_limit();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "ferrovia-load in {} still running after {limit:?}, killed: {}",
                place.name,
                tail(&log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = reader
        .join()
        .map_err(|_| anyhow::anyhow!("stdout reader panicked"))?
        .context("reading ferrovia-load's stdout")?;
    if !status.success() {
        bail!(
            "ferrovia-load in {} failed ({status}): {}",
            place.name,
            tail(&log, 20)
        );
    }
    serde_json::from_str(out.trim())
        .with_context(|| format!("parsing ferrovia-load output {:?}", out.trim()))
}

/// The benchmark's pair of data-path measurements from `place` to `targets`: requests over
/// `conns` persistent connections, then new connections (closed with RST: no `TIME_WAIT`
/// pile-up in the client, which would otherwise measure the port allocator rather than the
/// data path, and penalise one-VIP layouts), each a `window` after 300 ms of warm-up. Fails if
/// either completed nothing.
pub fn rr_and_crr(
    place: &Place,
    targets: &[SocketAddr],
    conns: u32,
    window: Duration,
) -> Result<(LoadResult, LoadResult)> {
    let spec = |mode| {
        LoadSpec::new(mode, targets.iter().copied())
            .conns(conns)
            .duration(window)
            .warmup(Duration::from_millis(300))
    };
    let rr = run_load(place, &spec(Mode::Rr))?;
    let crr = run_load(place, &spec(Mode::Crr).rst_close())?;
    for r in [&rr, &crr] {
        anyhow::ensure!(r.ok > 0, "no request completed: {r:?}");
    }
    Ok((rr, crr))
}
