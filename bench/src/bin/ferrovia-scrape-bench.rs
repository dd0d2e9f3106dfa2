//! `ferrovia-scrape-bench`: what a `/metrics` scrape costs with 0 and with N pods (default
//! 1,000). In-process and real: a private network namespace with N veth pairs, the data
//! path loaded under its own bpffs root, the agent's `Node` with the pods registered as the
//! CNI plugin does (programs attached, a `POD_STATS` entry each), `POLICY_VERDICTS` entries
//! written per pod, and `Endpoint::render()` timed: the median of `--runs` scrapes and the
//! exposition's size. Needs root and bpffs.
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{MapData, PerCpuHashMap, PerCpuValues};
use clap::Parser;
use ferrovia_agent::{
    api::{PodRegistration, PodRegistry as _},
    datapath::{Datapath, DatapathConfig, MapSizes, addr},
    metrics::{Endpoint, MetricsSource},
    model::ClusterState,
    node::Node,
};
use ferrovia_common::{PodStats, VerdictKey, VerdictValue, verdict};

#[derive(Parser)]
#[command(about = "the cost of a /metrics scrape with 0 and N pods, on real BPF maps")]
struct Args {
    /// Pods registered for the second measurement.
    #[arg(long, default_value_t = 1000)]
    pods: u32,
    /// `POLICY_VERDICTS` entries per pod (direction × reason), at most 6.
    #[arg(long, default_value_t = 3)]
    verdicts_per_pod: usize,
    /// Scrapes timed per measurement (the median is reported, with min and max).
    #[arg(long, default_value_t = 21)]
    runs: usize,
}

/// Verdict keys per pod, in the order they are written.
const VERDICTS: [(u8, u8); 6] = [
    (ferrovia_common::POL_DIR_INGRESS, verdict::ALLOW_RULE),
    (ferrovia_common::POL_DIR_INGRESS, verdict::DENY_NO_RULE),
    (ferrovia_common::POL_DIR_EGRESS, verdict::ALLOW_RULE),
    (ferrovia_common::POL_DIR_EGRESS, verdict::DENY_NO_RULE),
    (ferrovia_common::POL_DIR_INGRESS, verdict::ALLOW_REPLY),
    (ferrovia_common::POL_DIR_EGRESS, verdict::ALLOW_REPLY),
];

struct Measurement {
    median: Duration,
    min: Duration,
    max: Duration,
    bytes: usize,
    series: usize,
}

async fn measure(endpoint: &Endpoint, runs: usize) -> Result<Measurement> {
    let mut times = Vec::with_capacity(runs);
    let mut text = String::new();
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        text = endpoint.render().await.context("rendering /metrics")?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(Measurement {
        median: times[times.len() / 2],
        min: times[0],
        max: times[times.len() - 1],
        bytes: text.len(),
        series: text.lines().filter(|l| !l.starts_with('#')).count(),
    })
}

/// The median time of one part of a scrape (what the agent reads before encoding).
async fn median_of<F: std::future::Future>(runs: usize, f: impl Fn() -> F) -> Duration {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        f().await;
        times.push(started.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

fn ifname(i: u32) -> String {
    format!("fvs{i}")
}

fn pod_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i + 1)
}

/// N veth pairs (the pods' host ends; the peers stay unused) in this private network
/// namespace, in one `ip -batch`.
fn make_interfaces(n: u32) -> Result<()> {
    let mut batch = String::new();
    for i in 0..n {
        let _ = writeln!(batch, "link add {} type veth peer name fvp{i}", ifname(i));
    }
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running ip -batch")?;
    std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, batch.as_bytes())?;
    drop(child.stdin.take());
    if !child.wait()?.success() {
        bail!("ip -batch failed");
    }
    Ok(())
}

/// Counts in every pod's `POD_STATS` entry (made at attach) and `per_pod` verdict entries.
fn write_counters(root: &std::path::Path, pods: u32, per_pod: usize) -> Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let mut stats: PerCpuHashMap<MapData, u32, PodStats> = PerCpuHashMap::try_from(
        aya::maps::Map::PerCpuHashMap(MapData::from_pin(root.join("POD_STATS"))?),
    )?;
    let keys: Vec<u32> = stats.keys().collect::<Result<_, _>>()?;
    for (n, ifindex) in keys.iter().enumerate() {
        let mut value = PodStats::default();
        value.ingress.packets = 1_000 + n as u64;
        value.ingress.bytes = 1_500_000 + n as u64;
        value.egress.packets = 900 + n as u64;
        value.egress.conns_tcp = 12;
        let values = PerCpuValues::try_from(vec![value; cpus])?;
        stats.insert(ifindex, values, 0)?;
    }
    let mut verdicts: PerCpuHashMap<MapData, VerdictKey, VerdictValue> = PerCpuHashMap::try_from(
        aya::maps::Map::PerCpuHashMap(MapData::from_pin(root.join("POLICY_VERDICTS"))?),
    )?;
    for i in 0..pods {
        let (a, family) = addr::encode(IpAddr::V4(pod_ip(i)));
        for &(dir, reason) in VERDICTS.iter().take(per_pod) {
            let key = VerdictKey {
                addr: a,
                family,
                dir,
                reason,
                _pad: 0,
            };
            let value = VerdictValue {
                packets: 40 + u64::from(i),
                bytes: 4_000,
            };
            verdicts.insert(key, PerCpuValues::try_from(vec![value; cpus])?, 0)?;
        }
    }
    Ok(())
}

async fn register(node: &Node, pods: u32) -> Result<()> {
    for i in 0..pods {
        node.register(PodRegistration {
            container_id: format!("bench-{i}"),
            netns: "/proc/self/ns/net".into(),
            namespace: "bench".into(),
            name: format!("pod-{i}"),
            ifname: "eth0".into(),
            host_ifname: ifname(i),
            ips: vec![IpAddr::V4(pod_ip(i))],
        })
        .await
        .map_err(|e| anyhow::anyhow!("registering pod {i}: {e}"))?;
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

async fn run(args: &Args, root: &std::path::Path, state: &std::path::Path) -> Result<()> {
    let datapath = Datapath::load(DatapathConfig {
        bpffs_root: root.to_path_buf(),
        socket_lb_cgroup: None,
        sizes: MapSizes::default(),
        prefer_tcx: true,
        network_policy: true,
    })?;
    let empty = Arc::new(ClusterState::default());
    let node = Arc::new(Node::new(
        "bench".into(),
        state,
        datapath,
        Box::new(move || (Arc::clone(&empty), Vec::new())),
        None,
    )?);
    node.resync_now().await;
    let endpoint = Endpoint::new();
    endpoint.ready(Arc::clone(&node) as Arc<dyn MetricsSource>);

    let zero = measure(&endpoint, args.runs).await?;
    let zero_health = median_of(args.runs, || node.health()).await;
    eprintln!("registering {} pods…", args.pods);
    make_interfaces(args.pods)?;
    register(&node, args.pods).await?;
    write_counters(root, args.pods, args.verdicts_per_pod.min(VERDICTS.len()))?;
    let many = measure(&endpoint, args.runs).await?;
    let many_pods = median_of(args.runs, || node.pods()).await;
    let many_health = median_of(args.runs, || node.health()).await;

    println!(
        "/metrics render, median of {} (min–max); health = map walk + attach checks",
        args.runs
    );
    println!("| pods | median ms | min–max ms | bytes | samples | pods() ms | health() ms |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (pods, m, p, h) in [
        (0, &zero, None, zero_health),
        (args.pods, &many, Some(many_pods), many_health),
    ] {
        println!(
            "| {pods} | {} | {}–{} | {} | {} | {} | {} |",
            ms(m.median),
            ms(m.min),
            ms(m.max),
            m.bytes,
            m.series,
            p.map_or_else(|| "-".into(), ms),
            ms(h),
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Before any thread exists: every thread after (the runtime's, spawn_blocking's) is in it,
    // and the interfaces vanish with the process.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET): needs root")?;
    let root = PathBuf::from(format!(
        "/sys/fs/bpf/fv-scrape-bench-{}",
        std::process::id()
    ));
    let state = std::env::temp_dir().join(format!("fv-scrape-bench-{}", std::process::id()));
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(&args, &root, &state));
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&state);
    outcome
}
