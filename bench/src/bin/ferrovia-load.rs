//! `ferrovia-load`: the benchmarks' load generator.
//!
//! Speaks `ferrovia-echo serve`'s protocol (a request line, a reply line `NAME peer`) over
//! `--conns` concurrent connections spread round-robin over the `--to` targets, runs
//! `--warmup-ms` uncounted, then `--duration-ms` measured, and prints one
//! `ferrovia_bench::load::LoadResult` as JSON. Every operation is bounded by `--timeout-ms` and
//! by the end of the window, and failures are counted, not fatal: the run always ends on time.
//!
//! `--cgroup` and `--netns` are joined first, before any thread or the tokio runtime exists:
//! `setns(CLONE_NEWNET)` only moves the calling thread (threads created later inherit it), and
//! the agent's cgroup socket hooks only see sockets of processes inside its cgroup.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferrovia_bench::load::{LoadResult, Mode};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout_at};

#[derive(Parser)]
#[command(about = "Request/response and connection-rate load against ferrovia-echo servers")]
struct Cli {
    /// Target `IP:PORT`; repeat to spread connections round-robin over several.
    #[arg(long = "to", required = true)]
    targets: Vec<SocketAddr>,
    /// `rr`: persistent connections; `crr`: connect, one request, close; `udp-rr`: datagrams.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Measured window.
    #[arg(long)]
    duration_ms: u64,
    /// Concurrent connections (CRR: concurrent connect loops; UDP: sockets).
    #[arg(long, default_value_t = 1)]
    conns: u32,
    /// Uncounted time before the window.
    #[arg(long, default_value_t = 200)]
    warmup_ms: u64,
    /// Bytes per request, newline included.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=65_000))]
    payload: u32,
    /// Per-operation timeout: connect, and waiting for a reply.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Tokio worker threads. Default 1 (a current-thread runtime): the benchmark machine has 2
    /// cores shared with the echo servers and the kernel's softirq work, and a second worker
    /// would compete with the very servers it measures and add cross-thread wake-ups; with one,
    /// the generator costs at most one core, and `client_cpu` near 1.0 says it saturated.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    workers: u16,
    /// CRR: close with RST (`SO_LINGER` 0), so the client keeps no `TIME_WAIT` sockets and
    /// long runs don't exhaust ephemeral ports towards one destination.
    #[arg(long)]
    rst_close: bool,
    /// Network namespace to enter first, e.g. /run/netns/fv-1-2-client.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// cgroup v2 directory to move into first (so cgroup socket hooks apply).
    #[arg(long)]
    cgroup: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Still single-threaded here: this must happen before any thread is spawned.
    ferrovia_tests::sys::enter(cli.cgroup.as_deref(), cli.netns.as_deref())?;
    if cli.conns == 0 {
        bail!("--conns must be at least 1");
    }
    let runtime = if cli.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.workers.into())
            .enable_all()
            .build()
    }
    .context("building the tokio runtime")?;
    let result = runtime.block_on(run(&cli));
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// Start and end of the measured window; everything stops at `end`.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn counts(&self, at: Instant) -> bool {
        at >= self.start && at <= self.end
    }
}

/// What the connection loops record, sharded so that with several workers they rarely contend
/// (the lock is never held across an await). One histogram per shard rather than per
/// connection: a histogram is ~100 KiB, too much times thousands of connections.
struct Stats {
    ok: u64,
    errors: BTreeMap<String, u64>,
    by_server: BTreeMap<String, u64>,
    latency_us: Histogram<u64>,
}

impl Stats {
    fn new() -> Self {
        Self {
            ok: 0,
            errors: BTreeMap::new(),
            by_server: BTreeMap::new(),
            // 1 µs .. 60 s at 3 significant digits; longer values saturate (the per-operation
            // timeout keeps them far below in practice).
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        }
    }

    fn merge(&mut self, other: &Self) {
        self.ok += other.ok;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.by_server {
            *self.by_server.entry(k.clone()).or_default() += v;
        }
        self.latency_us.add(&other.latency_us).expect("same bounds");
    }
}

/// A connection loop's handle on its shard and the window.
struct Recorder {
    shard: Arc<Mutex<Stats>>,
    window: Window,
    timeout: Duration,
}

impl Recorder {
    /// A completed operation that began at `began`; `reply` is the server's reply line.
    fn ok(&self, began: Instant, reply: &[u8]) {
        let now = Instant::now();
        if !self.window.counts(now) {
            return;
        }
        let name = reply
            .split(|&b| b == b' ' || b == b'\n')
            .next()
            .unwrap_or_default();
        let mut s = self.shard.lock().unwrap_or_else(PoisonError::into_inner);
        s.ok += 1;
        s.latency_us
            .saturating_record(now.duration_since(began).as_micros() as u64);
        // get_mut first: the name is allocated only the first time a server is seen.
        let name = String::from_utf8_lossy(name);
        if let Some(n) = s.by_server.get_mut(name.as_ref()) {
            *n += 1;
        } else {
            s.by_server.insert(name.into_owned(), 1);
        }
    }

    /// A failed operation; after it the loop pauses briefly (see [`Recorder::backoff`]).
    fn error(&self, kind: &str) {
        if !self.window.counts(Instant::now()) {
            return;
        }
        let mut s = self.shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = s.errors.get_mut(kind) {
            *n += 1;
        } else {
            s.errors.insert(kind.to_owned(), 1);
        }
    }

    /// Classifies an operation that hit its deadline: past the window's end it was merely cut
    /// off (not an error, not counted); before it, it timed out. Returns whether to go on.
    fn timed_out(&self) -> bool {
        if Instant::now() >= self.window.end {
            return false;
        }
        self.error("timeout");
        true
    }

    /// The deadline of an operation starting now: its timeout, or the window's end.
    fn deadline(&self) -> Instant {
        (Instant::now() + self.timeout).min(self.window.end)
    }

    /// A pause after a failure, so an unreachable target (refused at once) doesn't turn the
    /// loop into a busy spin that starves the other connections.
    async fn backoff(&self) {
        sleep_until((Instant::now() + Duration::from_millis(10)).min(self.window.end)).await;
    }

    fn done(&self) -> bool {
        Instant::now() >= self.window.end
    }
}

/// errno name (`ECONNREFUSED`) for OS errors, `eof` for a closed connection, else the message.
fn error_name(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "eof".to_owned(),
        io::ErrorKind::TimedOut => "timeout".to_owned(),
        _ => match e.raw_os_error() {
            Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
            None => e.to_string(),
        },
    }
}

async fn run(cli: &Cli) -> LoadResult {
    let mut request = vec![b'x'; cli.payload as usize - 1];
    request.push(b'\n');
    let request: Arc<[u8]> = request.into();
    let start = Instant::now() + Duration::from_millis(cli.warmup_ms);
    let window = Window {
        start,
        end: start + Duration::from_millis(cli.duration_ms),
    };
    let timeout = Duration::from_millis(cli.timeout_ms);
    let shards: Vec<_> = (0..cli.conns.min(16))
        .map(|_| Arc::new(Mutex::new(Stats::new())))
        .collect();

    let mut loops = JoinSet::new();
    for i in 0..cli.conns as usize {
        let to = cli.targets[i % cli.targets.len()];
        let rec = Recorder {
            shard: Arc::clone(&shards[i % shards.len()]),
            window,
            timeout,
        };
        let request = Arc::clone(&request);
        match cli.mode {
            Mode::Rr => loops.spawn(rr(to, request, rec)),
            Mode::Crr => loops.spawn(crr(to, request, rec, cli.rst_close)),
            Mode::UdpRr => loops.spawn(udp_rr(to, request, rec)),
        };
    }

    sleep_until(window.start).await;
    let cpu_start = CpuSample::now();
    // Every operation is bounded by the window's end, so the loops finish right after it; the
    // extra grace and abort only guard against a bug turning into a hang.
    let grace = window.end + Duration::from_secs(2);
    while let Ok(Some(_)) = timeout_at(grace, loops.join_next()).await {}
    loops.abort_all();
    let cpu = CpuSample::now().since(&cpu_start);

    let mut total = Stats::new();
    for shard in &shards {
        total.merge(&shard.lock().unwrap_or_else(PoisonError::into_inner));
    }
    let duration_s = window.end.duration_since(window.start).as_secs_f64();
    let h = &total.latency_us;
    let pct = |q: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(q)
        }
    };
    LoadResult {
        mode: cli.mode,
        duration_s,
        conns: cli.conns,
        ok: total.ok,
        errors: total.errors.values().sum(),
        // Counts stay far below 2^52, where f64 would round.
        #[allow(clippy::cast_precision_loss)]
        rate_per_s: if duration_s > 0.0 {
            total.ok as f64 / duration_s
        } else {
            0.0
        },
        p50_us: pct(0.50),
        p90_us: pct(0.90),
        p99_us: pct(0.99),
        max_us: if h.is_empty() { 0 } else { h.max() },
        by_server: total.by_server,
        errors_by_kind: total.errors,
        client_cpu: cpu.client,
        host_cpu: cpu.host,
        workers: cli.workers.into(),
    }
}

/// Connects with `TCP_NODELAY`: each request is one small write that must leave at once.
async fn connect(to: SocketAddr) -> io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

/// Writes one request line and reads one reply line into `reply`.
async fn request(
    conn: &mut BufReader<TcpStream>,
    req: &[u8],
    reply: &mut Vec<u8>,
) -> io::Result<()> {
    conn.get_mut().write_all(req).await?;
    reply.clear();
    // A reply without its newline means the server closed mid-line: the same as no reply.
    if conn.read_until(b'\n', reply).await? == 0 || reply.last() != Some(&b'\n') {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Persistent connection: (re)connect when needed, then request after request; a failed
/// request drops the connection, since its stream may hold a late reply.
async fn rr(to: SocketAddr, req: Arc<[u8]>, rec: Recorder) {
    let mut conn = None;
    let mut reply = Vec::with_capacity(64);
    while !rec.done() {
        let Some(c) = conn.as_mut() else {
            match timeout_at(rec.deadline(), connect(to)).await {
                Ok(Ok(c)) => conn = Some(c),
                Ok(Err(e)) => {
                    rec.error(&error_name(&e));
                    rec.backoff().await;
                }
                Err(_) if rec.timed_out() => {}
                Err(_) => break,
            }
            continue;
        };
        let began = Instant::now();
        match timeout_at(rec.deadline(), request(c, &req, &mut reply)).await {
            Ok(Ok(())) => rec.ok(began, &reply),
            Ok(Err(e)) => {
                rec.error(&error_name(&e));
                conn = None;
                rec.backoff().await;
            }
            Err(_) if rec.timed_out() => conn = None,
            Err(_) => break,
        }
    }
}

/// Connect, one request, close, in a loop; the latency covers all three.
async fn crr(to: SocketAddr, req: Arc<[u8]>, rec: Recorder, rst_close: bool) {
    let mut reply = Vec::with_capacity(64);
    while !rec.done() {
        let began = Instant::now();
        let once = async {
            let mut conn = connect(to).await?;
            if rst_close {
                conn.get_ref().set_zero_linger()?;
            }
            request(&mut conn, &req, &mut reply).await
            // Dropped here: close() (FIN, or RST with zero linger) does not block.
        };
        match timeout_at(rec.deadline(), once).await {
            Ok(Ok(())) => rec.ok(began, &reply),
            Ok(Err(e)) => {
                rec.error(&error_name(&e));
                rec.backoff().await;
            }
            Err(_) if rec.timed_out() => {}
            Err(_) => break,
        }
    }
}

/// A connected UDP socket, datagram after datagram. After a timeout the socket is replaced, so
/// a late reply to the old request is never taken for the next one's.
async fn udp_rr(to: SocketAddr, req: Arc<[u8]>, rec: Recorder) {
    let mut sock: Option<UdpSocket> = None;
    let mut buf = vec![0u8; 2048];
    while !rec.done() {
        let Some(s) = sock.as_ref() else {
            match udp_socket(to).await {
                Ok(s) => sock = Some(s),
                Err(e) => {
                    rec.error(&error_name(&e));
                    rec.backoff().await;
                }
            }
            continue;
        };
        let began = Instant::now();
        let once = async {
            s.send(&req).await?;
            let n = s.recv(&mut buf).await?;
            io::Result::Ok(n)
        };
        match timeout_at(rec.deadline(), once).await {
            Ok(Ok(n)) => rec.ok(began, &buf[..n]),
            Ok(Err(e)) => {
                // e.g. ECONNREFUSED from an ICMP port unreachable; the socket stays usable.
                rec.error(&error_name(&e));
                rec.backoff().await;
            }
            Err(_) if rec.timed_out() => sock = None,
            Err(_) => break,
        }
    }
}

async fn udp_socket(to: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any).await?;
    s.connect(to).await?;
    Ok(s)
}

/// CPU time of this process and busy time of the whole machine, in seconds, at one instant.
struct CpuSample {
    at: Instant,
    process_s: f64,
    host_busy_s: f64,
}

/// Cores' worth of CPU used over an interval.
struct CpuUse {
    client: f64,
    host: f64,
}

impl CpuSample {
    fn now() -> Self {
        Self {
            at: Instant::now(),
            process_s: process_cpu_s(),
            host_busy_s: host_busy_s().unwrap_or(0.0),
        }
    }

    fn since(&self, earlier: &Self) -> CpuUse {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        if wall <= 0.0 {
            return CpuUse {
                client: 0.0,
                host: 0.0,
            };
        }
        CpuUse {
            client: (self.process_s - earlier.process_s) / wall,
            host: (self.host_busy_s - earlier.host_busy_s) / wall,
        }
    }
}

/// User + system CPU time of this process (all threads).
fn process_cpu_s() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF cannot fail.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return 0.0;
        }
        usage.assume_init()
    };
    let secs =
        |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000).as_secs_f64();
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Busy time of all CPUs since boot from /proc/stat's `cpu` line: user, nice, system, irq,
/// softirq and steal (idle and iowait left out). /proc/stat counts in `USER_HZ`, 100 on Linux.
fn host_busy_s() -> Option<f64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| f.get(i).copied().unwrap_or(0))
        .sum::<u64>();
    Some(Duration::from_millis(busy * 10).as_secs_f64())
}
