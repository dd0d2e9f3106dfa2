//! `ferrovia-load` against `ferrovia-echo` servers in pods wired by `ptp` alone (no ferrovia):
//! the spread over targets, the counts and percentiles, and that broken targets give counted
//! errors within bounded time. Needs root, and `ferrovia-echo` built (`cargo build --bins`, as
//! `cargo xtask test` does).
//!
//! `direct_path_matrix` (ignored) prints rr, udp-rr and crr (RST and FIN close) rates for 1, 4
//! and 16 connections against two pod IPs, with the CPU split between generator and servers,
//! for picking the benchmark's defaults; build release binaries first, then
//! `cargo test --release -p ferrovia-bench --test load -- --ignored --nocapture`
//! (`FERROVIA_LOAD_MS` sets the window, default 3000).

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use ferrovia_bench::load::{LoadResult, LoadSpec, Mode, run_load};
use ferrovia_tests::{CniMode, Node, NodeOptions, Pod, Server};

const PORT: u16 = 9376;

fn ptp_node() -> Node {
    let echo = ferrovia_tests::paths::bin("ferrovia-echo");
    assert!(
        echo.exists(),
        "{} missing: run `cargo build --bins` first",
        echo.display()
    );
    Node::with_options(NodeOptions {
        cni: CniMode::PtpOnly,
        ..NodeOptions::default()
    })
    .expect("creating node")
}

/// A client pod and two echo server pods, `web-a` and `web-b`, on TCP and UDP `PORT`.
struct Setup {
    client: Pod,
    servers: Vec<(Pod, Server)>,
    _node: Node,
}

impl Setup {
    fn new() -> Self {
        let node = ptp_node();
        let client = node.add_pod("default", "client").expect("client pod");
        let servers = ["web-a", "web-b"]
            .into_iter()
            .map(|name| {
                let pod = node.add_pod("default", name).expect("server pod");
                let srv = pod
                    .serve(&[&format!("tcp:{PORT}"), &format!("udp:{PORT}")])
                    .expect("echo server");
                (pod, srv)
            })
            .collect();
        Self {
            client,
            servers,
            _node: node,
        }
    }

    fn targets(&self, port: u16) -> Vec<SocketAddr> {
        self.servers
            .iter()
            .map(|(pod, _)| SocketAddr::from((pod.ip, port)))
            .collect()
    }

    fn run(&self, spec: &LoadSpec) -> (LoadResult, Duration) {
        let began = Instant::now();
        let r = run_load(&self.client.place(), spec).unwrap_or_else(|e| panic!("{spec:?}: {e:#}"));
        (r, began.elapsed())
    }
}

/// Every operation succeeded, both servers answered, and the percentiles are ordered.
fn assert_healthy(r: &LoadResult, spec: &LoadSpec) {
    assert_eq!(r.mode, spec.mode);
    assert_eq!(r.conns, spec.conns);
    assert!(r.ok > 0, "{r:?}");
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(
        r.by_server.keys().map(String::as_str).collect::<Vec<_>>(),
        ["web-a", "web-b"],
        "{r:?}"
    );
    assert_eq!(r.by_server.values().sum::<u64>(), r.ok, "{r:?}");
    assert!(
        0 < r.p50_us && r.p50_us <= r.p90_us && r.p90_us <= r.p99_us && r.p99_us <= r.max_us,
        "{r:?}"
    );
    assert_eq!((r.rate_per_s * r.duration_s).round() as u64, r.ok, "{r:?}");
}

/// The run ended within its window plus start-up and exit slack: nothing hung.
fn assert_bounded(spec: &LoadSpec, elapsed: Duration) {
    let bound = spec.warmup + spec.duration + Duration::from_secs(3);
    assert!(elapsed < bound, "took {elapsed:?}, bound {bound:?}");
}

#[test]
fn rr_crr_and_udp_rr_spread_over_two_pods() {
    let setup = Setup::new();
    for mode in [Mode::Rr, Mode::Crr, Mode::UdpRr] {
        let spec = LoadSpec::new(mode, setup.targets(PORT))
            .conns(4)
            .duration(Duration::from_secs(1));
        let (r, elapsed) = setup.run(&spec);
        eprintln!("{mode}: {r:?}");
        assert_healthy(&r, &spec);
        assert_bounded(&spec, elapsed);
    }
}

#[test]
fn one_connection_per_target_alternates() {
    let setup = Setup::new();
    // 2 connections over 2 targets: exactly one each, so both get traffic.
    let spec = LoadSpec::new(Mode::Rr, setup.targets(PORT))
        .conns(2)
        .duration(Duration::from_millis(500))
        .payload(1);
    let (r, _) = setup.run(&spec);
    assert_healthy(&r, &spec);
}

#[test]
fn no_listener_gives_refused_errors_in_bounded_time() {
    let setup = Setup::new();
    // Port 9 on the server pods: the pods exist, nothing listens, so the kernel refuses.
    for mode in [Mode::Rr, Mode::Crr] {
        let spec = LoadSpec::new(mode, setup.targets(9))
            .conns(2)
            .duration(Duration::from_millis(500));
        let (r, elapsed) = setup.run(&spec);
        assert_eq!(r.ok, 0, "{r:?}");
        assert!(r.errors > 0, "{r:?}");
        assert_eq!(
            r.errors_by_kind.keys().collect::<Vec<_>>(),
            ["ECONNREFUSED"],
            "{r:?}"
        );
        assert!(r.by_server.is_empty(), "{r:?}");
        assert_eq!((r.p50_us, r.max_us), (0, 0), "{r:?}");
        assert_bounded(&spec, elapsed);
    }
}

#[test]
fn silent_server_times_out_in_bounded_time() {
    let setup = Setup::new();
    let (pod, _) = &setup.servers[0];
    // A listener in the server pod that never accepts: connects complete (the kernel queues
    // them) but no reply ever comes, so only the per-operation timeout ends each request.
    let netns = pod.netns_path();
    let listener = std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).expect("open netns");
        // Only this short-lived thread moves; the socket stays in the pod's namespace.
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        TcpListener::bind(("0.0.0.0", 9377)).expect("bind silent listener")
    })
    .join()
    .expect("listener thread");
    for mode in [Mode::Rr, Mode::Crr] {
        let spec = LoadSpec::new(mode, [SocketAddr::from((pod.ip, 9377))])
            .conns(2)
            .warmup(Duration::ZERO)
            .duration(Duration::from_secs(1))
            .timeout(Duration::from_millis(200));
        let (r, elapsed) = setup.run(&spec);
        assert_eq!(r.ok, 0, "{r:?}");
        assert!(r.errors_by_kind.get("timeout") >= Some(&2), "{r:?}");
        assert_eq!(r.errors, r.errors_by_kind["timeout"], "{r:?}");
        assert_bounded(&spec, elapsed);
    }
    drop(listener);
}

/// CPU seconds (user + system, all threads) a process has used so far.
fn process_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10).as_secs_f64() // USER_HZ is 100
}

/// Not a check: rates on this machine for choosing defaults (see the module docs).
/// `server_cpu` is both echo servers' CPU over the whole run (warm-up included), in cores.
#[test]
#[ignore = "measurement, prints a table"]
fn direct_path_matrix() {
    let setup = Setup::new();
    let window = std::env::var("FERROVIA_LOAD_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(3), Duration::from_millis);
    let cpu_of_servers = || -> f64 {
        setup
            .servers
            .iter()
            .map(|(_, s)| process_cpu_s(s.pid()))
            .sum()
    };
    println!(
        "mode        conns  rate/s     p50us  p90us  p99us  maxus  errs  client_cpu server_cpu host_cpu"
    );
    // CRR with RST first: a FIN-closing CRR run leaves thousands of TIME_WAIT sockets in the
    // client pod that make every later connect() search longer for a free port.
    for (mode, rst) in [
        (Mode::Rr, false),
        (Mode::UdpRr, false),
        (Mode::Crr, true),
        (Mode::Crr, false),
    ] {
        for conns in [1, 4, 16] {
            let mut spec = LoadSpec::new(mode, setup.targets(PORT))
                .conns(conns)
                .duration(window)
                .warmup(Duration::from_millis(500));
            spec.rst_close = rst;
            let before = cpu_of_servers();
            let (r, elapsed) = setup.run(&spec);
            let server_cpu = (cpu_of_servers() - before) / elapsed.as_secs_f64();
            println!(
                "{:<7}{} {:>5}  {:>9.0}  {:>5}  {:>5}  {:>5}  {:>5}  {:>4}  {:>10.2} {:>10.2} {:>8.2}  {:?}",
                r.mode.as_str(),
                if rst { "+rst" } else { "    " },
                r.conns,
                r.rate_per_s,
                r.p50_us,
                r.p90_us,
                r.p99_us,
                r.max_us,
                r.errors,
                r.client_cpu,
                server_cpu,
                r.host_cpu,
                r.errors_by_kind,
            );
            if mode == Mode::Crr {
                let tw = setup.client.exec(&["ss", "-Htan", "state", "time-wait"]);
                println!(
                    "  client TIME_WAIT sockets: {}",
                    tw.map_or(0, |t| t.lines().count())
                );
            }
        }
    }
}
