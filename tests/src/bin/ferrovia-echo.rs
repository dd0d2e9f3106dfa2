//! `ferrovia-echo`: the end-to-end tests' workload.
//!
//! `serve` answers every TCP line and every UDP datagram with `NAME <peer-ip>:<peer-port>`, the
//! peer as the server sees it, so a test can tell which pod answered and which source address it
//! saw. `probe` sends requests and prints one JSON line per request (see [`ProbeLine`]).
//!
//! Both first join `--cgroup` and `--netns`, before any thread exists: `setns(CLONE_NEWNET)`
//! only moves the calling thread, and the agent's cgroup socket hooks only see sockets of
//! processes inside its cgroup.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

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
}

#[derive(Clone, Copy, ValueEnum)]
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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Still single-threaded here: both steps must happen before any thread is spawned.
    if let Some(cgroup) = &cli.cgroup {
        let procs = cgroup.join("cgroup.procs");
        fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", procs.display()))?;
    }
    if let Some(netns) = &cli.netns {
        let file = fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into {}", netns.display()))?;
    }
    match cli.command {
        Command::Serve {
            name,
            tcp,
            udp,
            ready_file,
        } => serve(&name, &tcp, &udp, ready_file),
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
    }
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

/// The reply text; v4-mapped peers of the dual-stack socket are shown as plain IPv4.
fn reply_for(name: &str, peer: SocketAddr) -> String {
    format!("{name} {}:{}\n", peer.ip().to_canonical(), peer.port())
}

fn serve(name: &str, tcp: &[u16], udp: &[u16], ready_file: Option<PathBuf>) -> Result<()> {
    if tcp.is_empty() && udp.is_empty() {
        bail!("nothing to serve: give --tcp and/or --udp");
    }
    let mut handles = Vec::new();
    for &port in tcp {
        let sock = bind(Type::STREAM, port)?;
        sock.listen(1024)?;
        let listener: TcpListener = sock.into();
        let name = name.to_owned();
        handles.push(thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let name = name.clone();
                thread::spawn(move || serve_tcp_conn(&name, conn));
            }
        }));
    }
    for &port in udp {
        let socket: UdpSocket = bind(Type::DGRAM, port)?.into();
        let name = name.to_owned();
        handles.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                match socket.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        let _ = socket.send_to(reply_for(&name, peer).as_bytes(), peer);
                    }
                    Err(e) => eprintln!("udp recv: {e}"),
                }
            }
        }));
    }
    if let Some(path) = ready_file {
        fs::write(&path, b"ready\n").with_context(|| format!("writing {}", path.display()))?;
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn serve_tcp_conn(name: &str, conn: TcpStream) {
    let Ok(peer) = conn.peer_addr() else { return };
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let reply = reply_for(name, peer);
    for line in BufReader::new(conn).lines() {
        if line.is_err() || writer.write_all(reply.as_bytes()).is_err() {
            return;
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
