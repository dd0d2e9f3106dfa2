//! `ferrovia-agent`: the per-node daemon. Loads and pins the BPF data path, watches the
//! desired state, keeps the maps in sync, and serves the API on a unix socket (and, when
//! asked, metrics and probes over HTTP).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use clap::{ArgAction, Parser};
use ferrovia_agent::{
    api,
    datapath::{Datapath, DatapathConfig, FlowRate, MapSizes},
    flows::FlowHub,
    metrics,
    node::{Node, Reload},
    source::{ManifestsSource, StateSource as _},
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(version, about = "ferrovia's per-node eBPF data plane agent")]
struct Args {
    /// A directory of Kubernetes YAML manifests (Service, `EndpointSlice`, Pod, Namespace),
    /// watched for changes.
    #[arg(long)]
    manifests: PathBuf,
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Where maps and links are pinned (on bpffs). Kept across restarts.
    #[arg(long, default_value = "/sys/fs/bpf/ferrovia")]
    bpffs_root: PathBuf,
    /// The cgroup v2 directory whose processes get socket-level load balancing
    /// (default: the root of the cgroup v2 mount).
    #[arg(long)]
    cgroup_path: Option<PathBuf>,
    /// Socket-level load balancing on the cgroup hooks; with `false` only the per-packet
    /// tc path translates.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    socket_lb: bool,
    /// The API's unix socket (mode 0600).
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// Where the agent keeps what must outlive it (registered pods).
    #[arg(long, default_value = "/run/ferrovia")]
    state_dir: PathBuf,
    /// Serve HTTP on this address, e.g. `127.0.0.1:9963`: `/metrics` (Prometheus, `OpenMetrics`
    /// text), `/healthz`, and `/readyz` (200 once the first sync is done). Default: no HTTP.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Attach tc programs with `clsact/cls_bpf` even where TCX links are available.
    #[arg(long)]
    no_tcx: bool,
    /// Enforce `networking.k8s.io/v1` `NetworkPolicy` on the pods' interfaces.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    network_policy: bool,
    #[arg(long, default_value_t = MapSizes::default().services)]
    map_services: u32,
    #[arg(long, default_value_t = MapSizes::default().backends)]
    map_backends: u32,
    #[arg(long, default_value_t = MapSizes::default().conntrack)]
    map_conntrack: u32,
    #[arg(long, default_value_t = MapSizes::default().affinity)]
    map_affinity: u32,
    /// Capacity of the policy peer trie (one entry per peer prefix per policy class).
    #[arg(long, default_value_t = MapSizes::default().policy_peers)]
    map_policy_peers: u32,
    /// Capacity of the policy conntrack (flows whose replies are allowed back).
    #[arg(long, default_value_t = MapSizes::default().policy_ct)]
    map_policy_ct: u32,
    /// Capacity of the per-pod counters (pods on this node; per-CPU, 144 bytes per pod and
    /// possible CPU).
    #[arg(long, default_value_t = MapSizes::default().pod_stats)]
    map_pod_stats: u32,
    /// Capacity of the per-frontend connection counters (per-CPU, 16 bytes per frontend and
    /// possible CPU).
    #[arg(long, default_value_t = MapSizes::default().frontend_stats)]
    map_frontend_stats: u32,
    /// Capacity of the per-backend selection counters (per-CPU, 8 bytes per backend and
    /// possible CPU).
    #[arg(long, default_value_t = MapSizes::default().backend_stats)]
    map_backend_stats: u32,
    /// Seconds between two sweeps of the flow maps (service and policy conntrack, UDP flows,
    /// affinity) for expired entries, which the programs never delete; 0 leaves them to LRU
    /// eviction. At most a day.
    #[arg(long, default_value_t = 30, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    conntrack_gc_interval: u64,
    /// Flow events (`ferrovia flows`) per pod and CPU per second at most, on average; 0 turns
    /// them off. A pod's events beyond it are counted and dropped in the kernel.
    #[arg(long, default_value_t = FlowRate::default().per_second)]
    flow_events_rate: u32,
    /// Flow events a pod may emit in a burst above the rate (per CPU).
    #[arg(long, default_value_t = FlowRate::default().burst)]
    flow_events_burst: u32,
    /// Flow events the agent keeps for `ferrovia flows` without --follow (and a follower may
    /// lag behind), 1 to 1,000,000.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    flow_events_recent: u32,
    /// Size of the flow events' ring buffer in bytes (a power of two, at least 4096; 48 bytes
    /// an event).
    #[arg(long, default_value_t = MapSizes::default().flow_events_bytes, value_parser = ring_size)]
    map_flow_events: u32,
}

/// A ring buffer's size: a power of two, at least a page.
fn ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n}: must be a power of two of at least 4096"));
    }
    Ok(n)
}

/// The root of the cgroup v2 hierarchy, from /proc/mounts (it is not always /sys/fs/cgroup).
fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .context(
            "no cgroup2 mount found; socket-level LB needs cgroup v2 (or pass --socket-lb=false)",
        )
}

/// The manifests source, the node's reload of it (new rejections counted in `sync`), and
/// what it rejects now, one line each.
fn manifests(
    dir: &Path,
    sync: &metrics::SyncMetrics,
) -> (
    Arc<ManifestsSource>,
    Reload,
    impl Fn() -> Vec<String> + Clone + Send + Sync + 'static,
) {
    let source = Arc::new(ManifestsSource::new(dir));
    let rejections = {
        let source = Arc::clone(&source);
        move || -> Vec<String> { source.errors().iter().map(ToString::to_string).collect() }
    };
    let reload: Reload = {
        let source = Arc::clone(&source);
        let rejections = rejections.clone();
        let sync = sync.clone();
        Box::new(move || {
            let state = source.reload();
            let errors = rejections();
            sync.rejections(errors.clone());
            (state, errors)
        })
    };
    (source, reload, rejections)
}

/// Loads the data path as the flags say, with the flow events' rate set.
fn load_datapath(args: &Args) -> Result<(Datapath, FlowRate)> {
    let cgroup = if args.socket_lb {
        Some(args.cgroup_path.clone().map_or_else(cgroup2_root, Ok)?)
    } else {
        None
    };
    let sizes = MapSizes {
        services: args.map_services,
        backends: args.map_backends,
        conntrack: args.map_conntrack,
        affinity: args.map_affinity,
        policy_peers: args.map_policy_peers,
        policy_ct: args.map_policy_ct,
        pod_stats: args.map_pod_stats,
        frontend_stats: args.map_frontend_stats,
        backend_stats: args.map_backend_stats,
        flow_events_bytes: args.map_flow_events,
        ..MapSizes::default()
    };
    let mut datapath = Datapath::load(DatapathConfig {
        bpffs_root: args.bpffs_root.clone(),
        socket_lb_cgroup: cgroup,
        sizes,
        prefer_tcx: !args.no_tcx,
        network_policy: args.network_policy,
    })?;

    let flow_rate = FlowRate {
        per_second: args.flow_events_rate,
        burst: args.flow_events_burst,
    };
    datapath
        .set_flow_rate(flow_rate)
        .context("--flow-events-rate/--flow-events-burst")?;
    Ok((datapath, flow_rate))
}

#[tokio::main]
async fn main() -> Result<()> {
    // Colours only on a terminal: a DaemonSet's log or a file gets plain text.
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();

    // Bound first: a taken or bad address fails the start before the kernel is touched, and
    // /healthz answers while the data path loads.
    let endpoint = Arc::new(metrics::Endpoint::new());
    if let Some(addr) = args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        let endpoint = Arc::clone(&endpoint);
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, endpoint).await {
                tracing::error!("the metrics endpoint stopped: {e}");
            }
        });
    }

    let (datapath, flow_rate) = load_datapath(&args)?;

    let sync_metrics = endpoint.sync_metrics();
    let (source, reload, rejections) = manifests(&args.manifests, &sync_metrics);
    let node = Arc::new(Node::new(
        args.node_name.clone(),
        &args.state_dir,
        datapath,
        reload,
        Some(sync_metrics.clone()),
    )?);
    // The first full sync happens before the API socket exists: its presence means ready,
    // and so does /readyz.
    if flow_rate.per_second > 0 {
        node.start_flows(FlowHub::new(args.flow_events_recent as usize))
            .await?;
    }
    node.resync_now().await;
    if args.conntrack_gc_interval > 0 {
        node.start_conntrack_gc(std::time::Duration::from_secs(args.conntrack_gc_interval));
    }
    endpoint.ready(Arc::clone(&node) as Arc<dyn metrics::MetricsSource>);
    // A rejection that changes nothing in the desired state starts no sync: scrapes see it.
    endpoint.watch_rejections(rejections.clone());

    let (tx, mut rx) = tokio::sync::watch::channel(source.state());
    let watcher = {
        let source = Arc::clone(&source);
        tokio::spawn(async move { source.run(tx).await })
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let node = Arc::clone(&node);
        let socket = args.api_socket.clone();
        tokio::spawn(async move {
            api::serve(&socket, node, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    tracing::info!(node = %args.node_name, manifests = %args.manifests.display(), "ferrovia-agent running");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    // The watcher ended: report why and stop rather than serve stale state silently.
                    let outcome = watcher.await;
                    anyhow::bail!("the manifests watcher stopped: {outcome:?}");
                }
                let state = rx.borrow_and_update().clone();
                sync_metrics.rejections(rejections());
                node.set_state(state).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping; pinned maps and links stay for the next start");
    let _ = stop_tx.send(());
    // Graceful shutdown waits for open API connections; a client that hangs on must not keep
    // the agent from stopping (the data path does not need it: maps and links stay pinned).
    if let Ok(result) = tokio::time::timeout(std::time::Duration::from_secs(2), server).await {
        result.context("API server task")??;
    } else {
        tracing::warn!("API connections still open after 2 s; stopping anyway");
    }
    Ok(())
}
