//! `ferrovia-bench` (run by `cargo xtask bench`): the same client and ten backend pods, the
//! probed service behind each data path in turn — direct, kube-proxy iptables (nft and legacy
//! back ends), kube-proxy nftables, ferrovia socket-level, ferrovia per packet — at each
//! number of services, measured side by side in one run; then ferrovia's `NetworkPolicy`
//! enforcement on and off, and policy change latency (`--policy=false` skips it). Writes
//! `target/bench/`.
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{ArgAction, Parser};
use ferrovia_bench::{
    cluster::{
        BenchCluster, IPERF_PORT, IPERF_VIP, PROBE_PORT, PROBE_VIP, Path4, Programmed, prog_delta,
    },
    load::rr_and_crr,
    policy::{self, run::PolicyOpts},
    report::{Cell, Report, Sample},
};

const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

#[derive(Parser)]
#[command(about = "ferrovia against kube-proxy's layouts and the direct path")]
struct Args {
    /// Numbers of services (10 endpoints each).
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    scales: Vec<usize>,
    /// Data paths to measure. `iptables-legacy` runs in a second phase on a fresh node: its
    /// `x_tables` hooks stay registered in a namespace after a flush and would tax every later
    /// measurement there.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,iptables-nft,nftables,ferrovia-socket,ferrovia-tc,iptables-legacy"
    )]
    paths: Vec<String>,
    /// Repetitions of each measurement (the median is reported with min–max).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Measured window of each load run, ms.
    #[arg(long, default_value_t = 2000)]
    window_ms: u64,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 4)]
    conns: u32,
    /// Give up loading a baseline's rules after this many seconds.
    #[arg(long, default_value_t = 600)]
    load_timeout_s: u64,
    /// Scale at which the endpoint-change latency is measured.
    #[arg(long, default_value_t = 10_000)]
    change_scale: usize,
    /// Endpoint changes to time.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// The `NetworkPolicy` section (on ferrovia's socket-level path at 1 service): rr/crr and
    /// per-program ns with enforcement off, on without policies, on with isolating policies,
    /// and with extra policies too; then the policy change → effect latency.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    policy: bool,
    /// Extra policies (matching none of the measured traffic) in the last policy variant.
    #[arg(long, default_value_t = 1000)]
    policy_extra: usize,
    /// Policy changes to time (alternately denying and allowing the client).
    #[arg(long, default_value_t = 20)]
    policy_changes: usize,
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Measure nothing: render `results.md` and the plots again from a `results.json`.
    #[arg(long)]
    from_json: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(json) = &args.from_json {
        let report: Report = serde_json::from_slice(
            &std::fs::read(json).with_context(|| format!("reading {}", json.display()))?,
        )?;
        return report.write(&args.out);
    }
    let paths: Vec<Path4> = args
        .paths
        .iter()
        .map(|p| Path4::parse(p))
        .collect::<Result<_>>()?;
    let mut report = Report {
        machine: machine(),
        repetitions: args.reps,
        window_s: args.window_ms as f64 / 1e3,
        conns: args.conns,
        endpoint_change_services: args.change_scale,
        ..Report::default()
    };
    println!("{}", report.machine);
    // Per-program run time for the profile table (a global sysctl; restored on exit).
    let stats_before = std::fs::read_to_string(STATS).unwrap_or_else(|_| "0".into());
    std::fs::write(STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
    let (legacy, main_paths): (Vec<Path4>, Vec<Path4>) =
        paths.into_iter().partition(|p| *p == Path4::IptablesLegacy);
    let mut outcome = Ok(());
    // The policy section runs on the first phase's node, after its paths.
    let phases = [(main_paths, args.policy), (legacy, false)];
    for (phase, policy) in phases
        .into_iter()
        .filter(|(p, policy)| !p.is_empty() || *policy)
    {
        let mut cluster = BenchCluster::new(10)?;
        outcome = run(&args, &phase, &mut cluster, &mut report);
        if outcome.is_ok() && policy {
            report.write(&args.out)?;
            report.policy = Some(policy::run::run(
                &mut cluster,
                &PolicyOpts {
                    reps: args.reps,
                    window: Duration::from_millis(args.window_ms),
                    conns: args.conns,
                    extra: args.policy_extra,
                    changes: args.policy_changes,
                    probe_interval: Duration::from_millis(1),
                    probe_timeout: Duration::from_millis(50),
                },
            ));
            if let Some(p) = &report.policy {
                println!("\n{}", p.markdown());
            }
        }
        report.write(&args.out)?;
        cluster.destroy()?;
        if outcome.is_err() {
            break;
        }
    }
    let _ = std::fs::write(STATS, stats_before.trim());
    outcome?;
    println!(
        "\nwrote {}/results.md, results.json, rates.png",
        args.out.display()
    );
    Ok(())
}

fn run(
    args: &Args,
    paths: &[Path4],
    cluster: &mut BenchCluster,
    report: &mut Report,
) -> Result<()> {
    for &n in &args.scales {
        for &path in paths {
            let started = Instant::now();
            print!("N={n:<6} {:<16} ", path.name());
            let programmed = cluster
                .program(path, n, Duration::from_secs(args.load_timeout_s))
                .unwrap_or_else(|e| Programmed {
                    skipped: Some(format!("{e:#}")),
                    ..Programmed::default()
                });
            let mut cell = Cell {
                path,
                services: n,
                programmed,
                samples: Vec::new(),
                prog_ns: std::collections::BTreeMap::default(),
            };
            if cell.programmed.skipped.is_none() {
                let ferrovia = path.is_ferrovia();
                let before = if ferrovia {
                    Some(cluster.prog_stats()?)
                } else {
                    None
                };
                match measure(args, cluster, path) {
                    Ok(samples) => cell.samples = samples,
                    Err(e) => cell.programmed.skipped = Some(format!("{e:#}")),
                }
                if let Some(before) = before {
                    cell.prog_ns = prog_delta(&before, &cluster.prog_stats()?);
                }
            }
            if path == Path4::FerroviaSocket
                && n == args.change_scale
                && cell.programmed.skipped.is_none()
            {
                report.endpoint_change_ms = cluster.endpoint_changes(args.changes)?;
            }
            match (&cell.programmed.skipped, cell.samples.first()) {
                (Some(why), _) => println!("skipped: {why}"),
                (None, Some(s)) => println!(
                    "rr {:>8.0}/s  crr {:>7.0}/s  p50 {:>5.0}µs p99 {:>6.0}µs  {:>5.2} Gbit/s  ({:.0} s)",
                    s.rr_rate,
                    s.crr_rate,
                    s.rr_p50_us,
                    s.rr_p99_us,
                    s.gbps,
                    started.elapsed().as_secs_f64()
                ),
                (None, None) => println!(),
            }
            report.cells.push(cell);
            cluster.rules_off()?;
            // Partial results survive a later failure.
            report.write(&args.out)?;
        }
    }
    Ok(())
}

fn measure(args: &Args, cluster: &BenchCluster, path: Path4) -> Result<Vec<Sample>> {
    let targets: Vec<SocketAddr> = if path == Path4::Direct {
        cluster
            .endpoints()
            .into_iter()
            .map(SocketAddr::V4)
            .collect()
    } else {
        vec![SocketAddr::from((PROBE_VIP, PROBE_PORT))]
    };
    let iperf_to = if path == Path4::Direct {
        cluster.backends[0].ip
    } else {
        IPERF_VIP
    };
    cluster.wait_served(targets[0])?;
    let window = Duration::from_millis(args.window_ms);
    let place = cluster.client.place();
    let mut samples = Vec::with_capacity(args.reps);
    for _ in 0..args.reps {
        let (rr, crr) = rr_and_crr(&place, &targets, args.conns, window)?;
        samples.push(Sample {
            rr_rate: rr.rate_per_s,
            rr_p50_us: rr.p50_us as f64,
            rr_p99_us: rr.p99_us as f64,
            crr_rate: crr.rate_per_s,
            gbps: iperf(cluster, iperf_to, window)?,
        });
    }
    Ok(samples)
}

/// One iperf3 stream from the client to `to`, Gbit/s.
fn iperf(cluster: &BenchCluster, to: std::net::Ipv4Addr, window: Duration) -> Result<f64> {
    let secs = window.as_secs().max(1).to_string();
    let child = cluster.spawn_in(
        &cluster.client,
        "iperf3",
        &[
            "-c",
            &to.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs,
            "-J",
        ],
    )?;
    let out = child.wait_with_output()?;
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    json.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .map(|bps| bps / 1e9)
        .with_context(|| {
            format!(
                "iperf3 gave no result: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
}

/// What the figures were measured on.
fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let mem_kb: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    format!(
        "Machine: {} × {cpu}, {:.0} GiB, kernel {kernel}; one node in a network namespace, 10 backend pods and a client made by the ptp CNI plugin (veth pairs).",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        mem_kb as f64 / 1_048_576.0
    )
}
