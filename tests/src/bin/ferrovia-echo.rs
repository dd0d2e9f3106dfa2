//! `ferrovia-echo`: the end-to-end tests' workload.
//!
//! `serve` answers every TCP line and every UDP datagram with `NAME <peer-ip>:<peer-port>`, the
//! peer as the server sees it, so a test can tell which pod answered and which source address it
//! saw. It runs on a tokio runtime (current-thread unless `--workers`), a task per connection,
//! so a new connection costs no thread. `probe` sends requests and prints one JSON line per
//! request (see [`ProbeLine`]). `probe-many` sends one request to each of many targets at once
//! and prints one JSON line per target (see [`TargetLine`]): the policy suites' truth tables.
//! `http-get` fetches one URL and prints one JSON line (see [`HttpLine`]): the agent's
//! `/metrics`, `/healthz` and `/readyz`, from inside the node's network namespace.
//!
//! Both first join `--cgroup` and `--netns`, before any thread or runtime exists:
//! `setns(CLONE_NEWNET)` only moves the calling thread, and the agent's cgroup socket hooks only
//! see sockets of processes inside its cgroup.

use std::fs;
use std::io::{self, BufRead, BufReader, Read as _, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::runtime;
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(about = "Echo server and prober for ferrovia's end-to-end tests")]
struct Cli {
    /// Network namespace to enter first, e.g. /run/netns/fv-1-2-web.
    #[arg(long, global = true)]
    netns: Option<PathBuf>,
    /// cgroup v2 directory to move into first (so cgroup socket hooks apply).
    #[arg(long, global = true)]
    cgroup: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer TCP lines and UDP datagrams with `NAME <peer-ip>:<peer-port>`.
    Serve {
        /// Name put in every reply (the pod's name).
        #[arg(long)]
        name: String,
        /// TCP ports to listen on.
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<u16>,
        /// UDP ports to listen on.
        #[arg(long, value_delimiter = ',')]
        udp: Vec<u16>,
        /// Created once every socket is bound and listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Runtime threads: 1 runs everything on the main thread.
        #[arg(long, default_value_t = NonZeroUsize::MIN)]
        workers: NonZeroUsize,
    },
    /// Send requests and print one JSON line per request.
    Probe {
        #[arg(long, value_enum)]
        proto: Proto,
        #[arg(long)]
        to: SocketAddr,
        /// Number of requests; 0 means until killed.
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, value_enum, default_value_t = Mode::New)]
        mode: Mode,
        /// Per-request timeout (connect, and wait for the reply).
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Pause between requests.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// One request to each target, all at once; one JSON line per target, as each finishes.
    ProbeMany {
        /// `tcp:IP:PORT` or `udp:IP:PORT`; repeat for more targets.
        #[arg(long = "target", required = true, value_parser = parse_target)]
        targets: Vec<(Proto, SocketAddr)>,
        /// Time for each target's whole exchange (connect, request, reply).
        #[arg(long, default_value_t = 400)]
        timeout_ms: u64,
    },
    /// `GET` one `http://IP:PORT/PATH` URL; print one JSON line (status, content type, body).
    /// Exits non-zero when no HTTP reply comes back.
    HttpGet {
        url: String,
        /// Time to connect, and for each read or write.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

fn parse_target(s: &str) -> Result<(Proto, SocketAddr), String> {
    let (proto, addr) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not PROTO:IP:PORT"))?;
    let proto = Proto::from_str(proto, true)?;
    let addr = addr.parse().map_err(|e| format!("{addr:?}: {e}"))?;
    Ok((proto, addr))
}

#[derive(Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// A new connection (UDP: a new socket) per request.
    New,
    /// One connection for all requests; after a failure the next request reconnects.
    Persistent,
}

/// One request's outcome, printed as a JSON line; the harness parses it as `ProbeResult`.
#[derive(Serialize, Default)]
struct ProbeLine {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply: Option<String>,
    /// `getpeername()` of the client socket: where the client believes it is connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    local: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Sequence number of the connection (socket) used; it changes when a persistent probe had
    /// to reconnect, which is how tests see that an established connection broke.
    conn: u64,
    /// Sequence number of the request, from 0.
    seq: u64,
    /// `CLOCK_MONOTONIC` when the request began (before a connect it needed).
    started_ns: u64,
}

/// One target's outcome in `probe-many`, printed as a JSON line; the harness parses it as
/// `TargetResult`.
#[derive(Serialize)]
struct TargetLine {
    proto: Proto,
    to: SocketAddr,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// An HTTP reply, printed as a JSON line by `http-get`; the harness parses it as `HttpReply`.
#[derive(Serialize)]
struct HttpLine {
    status: u16,
    content_type: Option<String>,
    body: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Still single-threaded here: this must happen before any thread is spawned.
    ferrovia_tests::sys::enter(cli.cgroup.as_deref(), cli.netns.as_deref())?;
    match cli.command {
        Command::Serve {
            name,
            tcp,
            udp,
            ready_file,
            workers,
        } => serve(&name, &tcp, &udp, ready_file, workers),
        Command::Probe {
            proto,
            to,
            count,
            mode,
            timeout_ms,
            interval_ms,
        } => {
            probe(
                proto,
                to,
                count,
                mode,
                Duration::from_millis(timeout_ms),
                Duration::from_millis(interval_ms),
            );
            Ok(())
        }
        Command::ProbeMany {
            targets,
            timeout_ms,
        } => probe_many(targets, Duration::from_millis(timeout_ms)),
        Command::HttpGet { url, timeout_ms } => {
            let line = http_get(&url, Duration::from_millis(timeout_ms))
                .with_context(|| format!("GET {url}"))?;
            println!("{}", serde_json::to_string(&line)?);
            Ok(())
        }
    }
}

/// One `GET` over HTTP/1.0: the server closes the connection after the reply and never
/// chunks the body, so reading to EOF is the whole reply.
fn http_get(url: &str, timeout: Duration) -> Result<HttpLine> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url:?} is not http://IP:PORT/PATH"))?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let addr: SocketAddr = authority
        .parse()
        .with_context(|| format!("{authority:?} is not IP:PORT"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let raw = String::from_utf8(raw).context("the reply is not UTF-8")?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {raw:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let content_type = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-type")
            .then(|| value.trim().to_owned())
    });
    Ok(HttpLine {
        status,
        content_type,
        body: body.to_owned(),
    })
}

/// Binds `[::]:port` dual-stack, falling back to `0.0.0.0:port` when the namespace has no IPv6.
fn bind(ty: Type, port: u16) -> Result<Socket> {
    let proto = if ty == Type::STREAM {
        Protocol::TCP
    } else {
        Protocol::UDP
    };
    let dual = Socket::new(Domain::IPV6, ty, Some(proto)).and_then(|s| {
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())?;
        Ok(s)
    });
    if let Ok(s) = dual {
        return Ok(s);
    }
    let s = Socket::new(Domain::IPV4, ty, Some(proto))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
        .with_context(|| format!("binding port {port}"))?;
    Ok(s)
}

/// Writes the reply text into `out` (cleared first); v4-mapped peers of the dual-stack socket
/// are shown as plain IPv4.
fn write_reply(out: &mut Vec<u8>, name: &str, peer: SocketAddr) {
    out.clear();
    // Writing into a Vec cannot fail.
    let _ = writeln!(out, "{name} {}:{}", peer.ip().to_canonical(), peer.port());
}

/// Serves every socket on one tokio runtime: current-thread (the thread that joined the cgroup
/// and netns) when `workers` is 1, else a multi-thread runtime whose workers are spawned from
/// it, after the joins, so they inherit the namespace.
fn serve(
    name: &str,
    tcp: &[u16],
    udp: &[u16],
    ready_file: Option<PathBuf>,
    workers: NonZeroUsize,
) -> Result<()> {
    if tcp.is_empty() && udp.is_empty() {
        bail!("nothing to serve: give --tcp and/or --udp");
    }
    // Bind and listen before the runtime exists, as before; the runtime only adopts the sockets.
    let mut listeners = Vec::new();
    for &port in tcp {
        let sock = bind(Type::STREAM, port)?;
        sock.listen(1024)?;
        sock.set_nonblocking(true)?;
        listeners.push(std::net::TcpListener::from(sock));
    }
    let mut udp_sockets = Vec::new();
    for &port in udp {
        let sock = bind(Type::DGRAM, port)?;
        sock.set_nonblocking(true)?;
        udp_sockets.push(std::net::UdpSocket::from(sock));
    }
    let mut builder = if workers.get() == 1 {
        runtime::Builder::new_current_thread()
    } else {
        let mut b = runtime::Builder::new_multi_thread();
        b.worker_threads(workers.get());
        b
    };
    let rt = builder.enable_io().enable_time().build()?;
    let name: Arc<str> = name.into();
    rt.block_on(async move {
        let mut tasks = JoinSet::new();
        for listener in listeners {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tasks.spawn(accept_loop(listener, Arc::clone(&name)));
        }
        for socket in udp_sockets {
            let socket = tokio::net::UdpSocket::from_std(socket)?;
            tasks.spawn(serve_udp(socket, Arc::clone(&name)));
        }
        if let Some(path) = ready_file {
            fs::write(&path, b"ready\n").with_context(|| format!("writing {}", path.display()))?;
        }
        // The loops never end; this only returns if one panicked.
        while tasks.join_next().await.is_some() {}
        Ok(())
    })
}

/// Accepts forever, one task per connection.
async fn accept_loop(listener: tokio::net::TcpListener, name: Arc<str>) {
    loop {
        match listener.accept().await {
            Ok((conn, peer)) => {
                tokio::spawn(serve_tcp_conn(conn, peer, Arc::clone(&name)));
            }
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning on a still-pending connection.
                eprintln!("tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Answers each line (`\n`-terminated, or a final unterminated one at EOF) with the reply,
/// until EOF or an error (a client reset is just the end of the connection).
async fn serve_tcp_conn(mut conn: tokio::net::TcpStream, peer: SocketAddr, name: Arc<str>) {
    let mut reply = Vec::with_capacity(name.len() + 48);
    write_reply(&mut reply, &name, peer);
    let mut buf = [0u8; 4096];
    // Replies for several lines read at once, written with one call.
    let mut batch = Vec::new();
    // Bytes of a line seen whose newline has not arrived yet.
    let mut partial = false;
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => return,
        };
        let data = &buf[..n];
        let lines: usize = data.iter().map(|&b| usize::from(b == b'\n')).sum();
        partial = data.last() != Some(&b'\n');
        let out = if lines <= 1 {
            &reply[..]
        } else {
            batch.clear();
            for _ in 0..lines {
                batch.extend_from_slice(&reply);
            }
            &batch[..]
        };
        if lines > 0 && conn.write_all(out).await.is_err() {
            return;
        }
    }
    // Like `BufRead::lines`, a last line without a newline still gets its reply.
    if partial {
        let _ = conn.write_all(&reply).await;
    }
}

/// A reply per datagram, to its sender.
async fn serve_udp(socket: tokio::net::UdpSocket, name: Arc<str>) {
    let mut buf = [0u8; 2048];
    let mut reply = Vec::with_capacity(name.len() + 48);
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((_, peer)) => {
                write_reply(&mut reply, &name, peer);
                let _ = socket.send_to(&reply, peer).await;
            }
            Err(e) => eprintln!("udp recv: {e}"),
        }
    }
}

/// errno name (`ECONNREFUSED`) for OS errors, `timeout` for timeouts, else the message.
fn error_name(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout".to_owned(),
        io::ErrorKind::UnexpectedEof => "eof".to_owned(),
        _ => match e.raw_os_error() {
            Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
            None => e.to_string(),
        },
    }
}

/// A client connection: TCP stream (with a line reader) or connected UDP socket.
enum Conn {
    Tcp(BufReader<TcpStream>),
    Udp(UdpSocket),
}

impl Conn {
    fn open(proto: Proto, to: SocketAddr, timeout: Duration) -> io::Result<Self> {
        match proto {
            Proto::Tcp => {
                let s = TcpStream::connect_timeout(&to, timeout)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                s.set_nodelay(true)?;
                Ok(Self::Tcp(BufReader::new(s)))
            }
            Proto::Udp => {
                let bind: SocketAddr = if to.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = UdpSocket::bind(bind)?;
                s.connect(to)?;
                s.set_read_timeout(Some(timeout))?;
                Ok(Self::Udp(s))
            }
        }
    }

    fn addrs(&self) -> (Option<String>, Option<String>) {
        let (peer, local) = match self {
            Self::Tcp(r) => (r.get_ref().peer_addr(), r.get_ref().local_addr()),
            Self::Udp(s) => (s.peer_addr(), s.local_addr()),
        };
        (
            peer.ok().map(|a| a.to_string()),
            local.ok().map(|a| a.to_string()),
        )
    }

    fn request(&mut self) -> io::Result<String> {
        match self {
            Self::Tcp(r) => {
                r.get_mut().write_all(b"hello\n")?;
                let mut line = String::new();
                if r.read_line(&mut line)? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                Ok(line.trim_end().to_owned())
            }
            Self::Udp(s) => {
                s.send(b"hello\n")?;
                let mut buf = [0u8; 2048];
                let n = s.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
            }
        }
    }
}

fn probe(
    proto: Proto,
    to: SocketAddr,
    count: u64,
    mode: Mode,
    timeout: Duration,
    interval: Duration,
) {
    let stdout = io::stdout();
    let mut conn: Option<Conn> = None;
    let mut conn_seq = 0;
    let mut seq = 0;
    while count == 0 || seq < count {
        if seq > 0 && !interval.is_zero() {
            thread::sleep(interval);
        }
        let mut line = ProbeLine {
            seq,
            started_ns: ferrovia_tests::sys::monotonic_ns(),
            ..ProbeLine::default()
        };
        if conn.is_none() {
            conn_seq += 1;
            match Conn::open(proto, to, timeout) {
                Ok(c) => conn = Some(c),
                Err(e) => line.error = Some(error_name(&e)),
            }
        }
        line.conn = conn_seq;
        if let Some(c) = conn.as_mut() {
            (line.peer, line.local) = c.addrs();
            match c.request() {
                Ok(reply) => {
                    line.ok = true;
                    line.reply = Some(reply);
                }
                Err(e) => {
                    line.error = Some(error_name(&e));
                    conn = None;
                }
            }
        }
        if mode == Mode::New {
            conn = None;
        }
        let mut out = stdout.lock();
        // Flush per line: a streaming probe's reader acts on each result as it arrives.
        if serde_json::to_writer(&mut out, &line).is_err()
            || out.write_all(b"\n").is_err()
            || out.flush().is_err()
        {
            return; // the reader is gone
        }
        seq += 1;
    }
}

/// How often `probe-many` resends an unanswered UDP request within its timeout: a lost datagram
/// must not read as "denied" on a long re-probe.
const UDP_RESEND: Duration = Duration::from_millis(250);

/// Probes every target concurrently on one current-thread runtime (a task each, so hundreds of
/// targets cost no threads) and prints each outcome as soon as it is known.
fn probe_many(targets: Vec<(Proto, SocketAddr)>, timeout: Duration) -> Result<()> {
    let rt = runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    rt.block_on(async move {
        let mut tasks = JoinSet::new();
        for (proto, to) in targets {
            tasks.spawn(async move {
                let outcome = tokio::time::timeout(timeout, exchange(proto, to)).await;
                let mut line = TargetLine {
                    proto,
                    to,
                    ok: false,
                    reply: None,
                    error: None,
                };
                match outcome {
                    Ok(Ok(reply)) => {
                        line.ok = true;
                        line.reply = Some(reply);
                    }
                    Ok(Err(e)) => line.error = Some(error_name(&e)),
                    Err(_) => line.error = Some("timeout".to_owned()),
                }
                line
            });
        }
        let mut out = io::stdout().lock();
        while let Some(line) = tasks.join_next().await {
            serde_json::to_writer(&mut out, &line?)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        Ok(())
    })
}

/// One request and its reply: a new TCP connection, or a new connected UDP socket that resends
/// every [`UDP_RESEND`] until a reply (or an error such as ECONNREFUSED) comes back.
async fn exchange(proto: Proto, to: SocketAddr) -> io::Result<String> {
    match proto {
        Proto::Tcp => {
            let stream = tokio::net::TcpStream::connect(to).await?;
            stream.set_nodelay(true)?;
            let mut stream = tokio::io::BufReader::new(stream);
            stream.get_mut().write_all(b"hello\n").await?;
            let mut line = String::new();
            if stream.read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Ok(line.trim_end().to_owned())
        }
        Proto::Udp => {
            let bind: SocketAddr = if to.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = tokio::net::UdpSocket::bind(bind).await?;
            socket.connect(to).await?;
            let mut buf = [0u8; 2048];
            loop {
                socket.send(b"hello\n").await?;
                if let Ok(n) = tokio::time::timeout(UDP_RESEND, socket.recv(&mut buf)).await {
                    return Ok(String::from_utf8_lossy(&buf[..n?]).trim_end().to_owned());
                }
            }
        }
    }
}
