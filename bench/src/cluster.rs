//! The benchmark's simulated cluster: one node, ten backend pods and a client made by the real
//! CNI chain, and the switches between data paths — none (direct), kube-proxy's iptables or
//! nftables rules, ferrovia with socket-level LB, ferrovia per packet. Only one is in force at
//! a time, on the same pods.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ferrovia_tests::{Agent, AgentOpts, Node, Pod, ProbeSpec, Server};
use ipnet::Ipv4Net;

use crate::kubeproxy::{self, IptablesBackend, Proto, ProxyConfig, Svc};

/// The probed service: ten real backends on port 9376.
pub const PROBE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const PROBE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 9376;
/// One bulk stream (iperf3) to a single backend: iperf3's control and data connections must
/// meet the same server.
pub const IPERF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
pub const IPERF_PORT: u16 = 5201;
/// A one-endpoint service whose endpoint the bench moves between two pods.
pub const FLIP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);

/// A data path under test.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Path4 {
    /// Straight to the pod IPs, no service.
    Direct,
    /// kube-proxy iptables mode through `iptables-nft`.
    IptablesNft,
    /// kube-proxy iptables mode through `iptables-legacy`.
    IptablesLegacy,
    /// kube-proxy nftables mode.
    Nftables,
    /// ferrovia, socket-level LB (with the tc programs attached as in production).
    FerroviaSocket,
    /// ferrovia, per-packet only (`--socket-lb=false`).
    FerroviaTc,
    /// ferrovia per packet with its flow events off (`--flow-events-rate 0`): beside
    /// `FerroviaTc`, what the events cost.
    FerroviaTcNoEvents,
}

impl Path4 {
    pub const ALL: [Self; 7] = [
        Self::Direct,
        Self::IptablesNft,
        Self::IptablesLegacy,
        Self::Nftables,
        Self::FerroviaSocket,
        Self::FerroviaTc,
        Self::FerroviaTcNoEvents,
    ];

    /// Whether the path is ferrovia (its programs' cost is measured).
    #[must_use]
    pub fn is_ferrovia(self) -> bool {
        matches!(
            self,
            Self::FerroviaSocket | Self::FerroviaTc | Self::FerroviaTcNoEvents
        )
    }

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::IptablesNft => "iptables-nft",
            Self::IptablesLegacy => "iptables-legacy",
            Self::Nftables => "nftables",
            Self::FerroviaSocket => "ferrovia-socket",
            Self::FerroviaTc => "ferrovia-tc",
            Self::FerroviaTcNoEvents => "ferrovia-tc-noevents",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .with_context(|| format!("unknown path {s}"))
    }
}

/// How the data path for a scale was put in place.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Programmed {
    /// `iptables-restore` / `nft -f` wall time, or ferrovia's first sync (model + maps).
    pub program_s: Option<f64>,
    /// ferrovia: agent start to ready (BPF load, manifest parsing, first sync).
    pub startup_s: Option<f64>,
    /// ferrovia: agent resident memory after the first sync.
    pub agent_rss_bytes: Option<u64>,
    /// ferrovia: memory of its BPF maps (`bytes_memlock` from bpftool).
    pub map_bytes: Option<u64>,
    /// Why this path has no figures at this scale (e.g. a load that timed out).
    pub skipped: Option<String>,
}

pub struct BenchCluster {
    pub node: Node,
    pub backends: Vec<Pod>,
    pub client: Pod,
    agent: Option<Agent>,
    _servers: Vec<Server>,
    iperf: Option<Child>,
    /// Rules loaded for the current baseline, to flush.
    loaded: Option<Path4>,
}

impl BenchCluster {
    /// Creates the node and pods (with ferrovia's agent running, so `ferrovia-cni` can register
    /// them), starts an echo server in every backend and iperf3 in the first.
    pub fn new(backends: usize) -> Result<Self> {
        let node = Node::new().context("creating the node")?;
        let agent = node
            .start_agent(AgentOpts::default())
            .context("starting the agent")?;
        let backends: Vec<Pod> = (0..backends)
            .map(|i| node.add_pod("bench", &format!("backend-{i}")))
            .collect::<Result<_>>()?;
        let client = node.add_pod("bench", "client")?;
        let servers = backends
            .iter()
            .map(|p| p.serve(&[&format!("tcp:{TARGET_PORT}")]))
            .collect::<Result<Vec<_>>>()?;
        let mut cluster = Self {
            node,
            backends,
            client,
            agent: Some(agent),
            _servers: servers,
            iperf: None,
            loaded: None,
        };
        cluster.iperf = Some(cluster.spawn_in(
            &cluster.backends[0],
            "iperf3",
            &["-s", "-p", &IPERF_PORT.to_string()],
        )?);
        Ok(cluster)
    }

    /// Spawns `program` in `pod`'s network namespace and cgroup (so socket hooks apply).
    pub fn spawn_in(&self, pod: &Pod, program: &str, args: &[&str]) -> Result<Child> {
        let place = pod.place();
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{} \"$@\"",
            place.cgroup.display(),
            place.netns
        );
        Command::new("sh")
            .args(["-c", &script, "sh", program])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {program} in {}", pod.name))
    }

    /// The probed service's backends.
    #[must_use]
    pub fn endpoints(&self) -> Vec<SocketAddrV4> {
        self.backends
            .iter()
            .map(|p| SocketAddrV4::new(p.ip, TARGET_PORT))
            .collect()
    }

    /// The services of scale `n`: the probed one, the iperf one, and `n - 1` synthetic ones
    /// whose VIPs and endpoints are in ranges nothing routes or probes.
    #[must_use]
    pub fn services(&self, n: usize) -> Vec<Svc> {
        let mut svcs = kubeproxy::synthetic(n.saturating_sub(1), 10);
        // In the middle: kube-proxy writes services in Go map order (effectively random), and
        // iptables walks KUBE-SERVICES linearly, so the first position would hide the cost of
        // every other service from the iptables baselines; the middle is the average case.
        let middle = svcs.len() / 2;
        let iperf = vec![SocketAddrV4::new(self.backends[0].ip, IPERF_PORT)];
        svcs.splice(
            middle..middle,
            [
                bench_svc("probe", PROBE_VIP, PROBE_PORT, self.endpoints()),
                bench_svc("iperf", IPERF_VIP, IPERF_PORT, iperf),
            ],
        );
        svcs
    }

    /// The one-endpoint service whose endpoint moves, on backend `to`. (ferrovia keeps it in a
    /// file of its own, as an `EndpointSlice` change touches one object.)
    #[must_use]
    pub fn flip(&self, to: usize) -> Svc {
        bench_svc(
            "flip",
            FLIP_VIP,
            PROBE_PORT,
            vec![SocketAddrV4::new(self.backends[to].ip, TARGET_PORT)],
        )
    }

    fn proxy_config(&self) -> Result<ProxyConfig> {
        let cidr: Ipv4Net = self.node.pod_subnet().parse().context("pod subnet")?;
        Ok(ProxyConfig::new(cidr))
    }

    /// Takes ferrovia out of the data path: stops the agent and unpins its links (which
    /// detaches every program) and maps. Registered pods stay in its state dir.
    pub fn ferrovia_off(&mut self) -> Result<()> {
        if let Some(mut agent) = self.agent.take() {
            agent.stop()?;
        }
        let root = self.node.bpffs_root();
        if root.exists() {
            std::fs::remove_dir_all(root)
                .with_context(|| format!("removing {}", root.display()))?;
        }
        Ok(())
    }

    /// Removes whatever baseline rules are loaded.
    pub fn rules_off(&mut self) -> Result<()> {
        let netns = self.node.netns().to_owned();
        match self.loaded.take() {
            Some(Path4::IptablesNft) => kubeproxy::flush_iptables(&netns, IptablesBackend::Nft)?,
            Some(Path4::IptablesLegacy) => {
                kubeproxy::flush_iptables(&netns, IptablesBackend::Legacy)?;
            }
            Some(Path4::Nftables) => kubeproxy::flush_nft(&netns)?,
            _ => {}
        }
        Ok(())
    }

    /// Puts `path` in place for `n` services and says how that went.
    pub fn program(&mut self, path: Path4, n: usize, load_timeout: Duration) -> Result<Programmed> {
        self.rules_off()?;
        let netns = self.node.netns().to_owned();
        let mut svcs = self.services(n);
        match path {
            Path4::Direct => {
                self.ferrovia_off()?;
                Ok(Programmed::default())
            }
            Path4::IptablesNft | Path4::IptablesLegacy => {
                self.ferrovia_off()?;
                svcs.push(self.flip(1));
                let backend = if path == Path4::IptablesNft {
                    IptablesBackend::Nft
                } else {
                    IptablesBackend::Legacy
                };
                let input = kubeproxy::iptables_restore_input(&svcs, &self.proxy_config()?);
                self.loaded = Some(path);
                let took = with_timeout(&netns.clone(), load_timeout, move || {
                    kubeproxy::load_iptables(&netns, backend, &input)
                })?;
                Ok(Programmed {
                    program_s: Some(took.as_secs_f64()),
                    ..Programmed::default()
                })
            }
            Path4::Nftables => {
                self.ferrovia_off()?;
                svcs.push(self.flip(1));
                let input = kubeproxy::nft_input(&svcs, &self.proxy_config()?);
                self.loaded = Some(path);
                let took = with_timeout(&netns.clone(), load_timeout, move || {
                    kubeproxy::load_nft(&netns, &input)
                })?;
                Ok(Programmed {
                    program_s: Some(took.as_secs_f64()),
                    ..Programmed::default()
                })
            }
            Path4::FerroviaSocket | Path4::FerroviaTc => {
                self.ferrovia_on(path == Path4::FerroviaSocket, &svcs, &[])
            }
            Path4::FerroviaTcNoEvents => {
                self.ferrovia_on(false, &svcs, &["--flow-events-rate=0".to_owned()])
            }
        }
    }

    /// Puts ferrovia in place for `n` services, its agent started with `agent_args` added
    /// (e.g. `--network-policy=false`).
    pub fn ferrovia(
        &mut self,
        socket_lb: bool,
        n: usize,
        agent_args: &[String],
    ) -> Result<Programmed> {
        self.rules_off()?;
        let svcs = self.services(n);
        self.ferrovia_on(socket_lb, &svcs, agent_args)
    }

    /// Starts ferrovia from cold (no pinned maps) on manifests for `svcs`.
    fn ferrovia_on(
        &mut self,
        socket_lb: bool,
        svcs: &[Svc],
        agent_args: &[String],
    ) -> Result<Programmed> {
        self.ferrovia_off()?;
        self.node
            .write_manifest("services.yaml", &manifests(svcs))?;
        self.node
            .write_manifest("flip.yaml", &manifests(&[self.flip(1)]))?;
        let frontends = svcs.len();
        let backends: usize = svcs.iter().map(|s| s.endpoints.len()).sum();
        // Room for the whole scale with a margin; the maps are created at this size.
        let mut extra = vec![
            format!(
                "--map-services={}",
                (frontends + backends).max(1024) * 5 / 4
            ),
            format!("--map-backends={}", backends.max(1024) * 5 / 4),
        ];
        extra.extend_from_slice(agent_args);
        let started = Instant::now();
        let agent = self.node.start_agent(AgentOpts {
            socket_lb,
            extra_args: extra,
            ..AgentOpts::default()
        })?;
        let startup = started.elapsed();
        let pid = agent.pid().context("agent pid")?;
        let sync = first_sync_seconds(&agent.log());
        self.agent = Some(agent);
        Ok(Programmed {
            program_s: sync,
            startup_s: Some(startup.as_secs_f64()),
            agent_rss_bytes: rss_bytes(pid),
            map_bytes: map_bytes(&self.node, self.node.bpffs_root()),
            skipped: None,
        })
    }

    /// Moves the flip service's endpoint back and forth `count` times while the client opens a
    /// new connection to it every millisecond, and returns for each change the time from the
    /// manifest's rename to the first connection answered by the new endpoint, in ms.
    pub fn endpoint_changes(&self, count: usize) -> Result<Vec<f64>> {
        let flip = SocketAddr::from((FLIP_VIP, PROBE_PORT));
        self.wait_served(flip)?;
        let stream = self.client.probe_stream(
            &ProbeSpec::tcp(flip)
                .count(0)
                .interval(Duration::from_millis(1))
                .timeout(Duration::from_millis(200)),
        )?;
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let to = if i % 2 == 0 { 2 } else { 1 };
            let target = self.backends[to].name.clone();
            let seen = stream.results().len();
            let started = Instant::now();
            self.node
                .write_manifest("flip.yaml", &manifests(&[self.flip(to)]))?;
            loop {
                if stream.results()[seen..]
                    .iter()
                    .any(|r| r.server() == Some(target.as_str()))
                {
                    out.push(started.elapsed().as_secs_f64() * 1e3);
                    break;
                }
                if started.elapsed() > Duration::from_secs(10) {
                    bail!("endpoint change {i} to {target} not seen in 10 s");
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        drop(stream.stop());
        Ok(out)
    }

    /// Waits until `to` answers from the client (the path was just programmed).
    pub fn wait_served(&self, to: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self
                .client
                .probe(&ProbeSpec::tcp(to).timeout(Duration::from_millis(500)))?;
            if r.iter().all(|r| r.ok) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{to} not served: {r:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run count and run time (ns) of each of ferrovia's programs behind this node's pinned
    /// links, by program name, as `kernel.bpf_stats_enabled` counts them.
    pub fn prog_stats(&self) -> Result<std::collections::BTreeMap<String, (u64, u64)>> {
        let mut out = std::collections::BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        let links = self.node.bpffs_root().join("links");
        for entry in
            std::fs::read_dir(&links).with_context(|| format!("reading {}", links.display()))?
        {
            let path = entry?.path();
            let link =
                self.node
                    .bpftool(&["link", "show", "pinned", path.to_str().context("path")?])?;
            let Some(id) = link.get("prog_id").and_then(serde_json::Value::as_u64) else {
                continue;
            };
            if !seen.insert(id) {
                continue;
            }
            let prog = self
                .node
                .bpftool(&["prog", "show", "id", &id.to_string()])?;
            let name = prog
                .get("name")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("?")
                .to_owned();
            let field = |k: &str| prog.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            let e = out.entry(name).or_insert((0, 0));
            e.0 += field("run_cnt");
            e.1 += field("run_time_ns");
        }
        Ok(out)
    }

    /// Makes the agent re-read its manifests now; returns once its maps reflect them, failing
    /// if ferrovia is off or the agent rejected something.
    pub fn sync(&self) -> Result<()> {
        let rejected = self.agent.as_ref().context("ferrovia is off")?.sync()?;
        anyhow::ensure!(rejected.is_empty(), "the agent rejected: {rejected:#?}");
        Ok(())
    }

    /// The agent, if ferrovia is on.
    #[must_use]
    pub fn agent(&self) -> Option<&Agent> {
        self.agent.as_ref()
    }

    /// Tears everything down.
    pub fn destroy(mut self) -> Result<()> {
        if let Some(mut child) = self.iperf.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.rules_off()?;
        // The agent must run for the CNI DELs of the pods' teardown.
        if self.agent.is_none() {
            self.agent = Some(self.node.start_agent(AgentOpts::default())?);
        }
        let Self {
            node,
            backends,
            client,
            agent,
            _servers: servers,
            ..
        } = self;
        drop(servers);
        drop(client);
        drop(backends);
        drop(agent);
        node.destroy()
    }
}

/// Per program, the runs and mean ns per run between two [`BenchCluster::prog_stats`] readings
/// of the same agent (programs that did not run are left out).
#[must_use]
pub fn prog_delta(
    before: &std::collections::BTreeMap<String, (u64, u64)>,
    after: &std::collections::BTreeMap<String, (u64, u64)>,
) -> std::collections::BTreeMap<String, (u64, f64)> {
    after
        .iter()
        .filter_map(|(name, &(runs, ns))| {
            let (r0, n0) = before.get(name).copied().unwrap_or((0, 0));
            (runs > r0).then(|| {
                let runs = runs - r0;
                (
                    name.clone(),
                    (runs, ns.saturating_sub(n0) as f64 / runs as f64),
                )
            })
        })
        .collect()
}

fn bench_svc(name: &str, vip: Ipv4Addr, port: u16, endpoints: Vec<SocketAddrV4>) -> Svc {
    Svc {
        namespace: "bench".into(),
        name: name.into(),
        port_name: "tcp".into(),
        vip,
        port,
        proto: Proto::Tcp,
        endpoints,
    }
}

/// Ordinary Kubernetes YAML for `svcs`: a selector-less Service and its `EndpointSlice` each.
#[must_use]
pub fn manifests(svcs: &[Svc]) -> String {
    let mut out = String::with_capacity(svcs.len() * 700);
    for s in svcs {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterIP: {vip}\n  ports: [{{name: {pn}, protocol: TCP, port: {port}}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: {pn}, protocol: TCP, port: {tport}}}]\nendpoints:\n",
            name = s.name,
            ns = s.namespace,
            vip = s.vip,
            pn = s.port_name,
            port = s.port,
            tport = s.endpoints.first().map_or(s.port, SocketAddrV4::port),
        );
        for e in &s.endpoints {
            let _ = writeln!(out, "- addresses: [\"{}\"]", e.ip());
        }
    }
    out
}

/// The first `maps synced … elapsed_us=N` after the agent's latest start (the log is
/// appended to across restarts), in seconds.
#[must_use]
pub fn first_sync_seconds(log: &str) -> Option<f64> {
    let latest = log.rfind("data path loaded").unwrap_or(0);
    log[latest..]
        .lines()
        .find(|l| l.contains("maps synced"))
        .and_then(|l| l.split("elapsed_us=").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|us| us.parse::<f64>().ok())
        .map(|us| us / 1e6)
}

/// Resident memory of a process.
#[must_use]
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// Sum of `bytes_memlock` of the maps pinned directly under `root`.
#[must_use]
pub fn map_bytes(node: &Node, root: &Path) -> Option<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(root).ok()? {
        let path: PathBuf = entry.ok()?.path();
        if path.is_dir() {
            continue;
        }
        let info = node
            .bpftool(&["map", "show", "pinned", path.to_str()?])
            .ok()?;
        total += info
            .get("bytes_memlock")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
    }
    Some(total)
}

/// Runs the rule loader `f` (for the node namespace `netns`) on a thread and gives up after
/// `timeout`, killing the loader processes in that namespace: a restore still running would
/// burn CPU and hold the xtables lock through every later measurement.
fn with_timeout<T: Send + 'static>(
    netns: &str,
    timeout: Duration,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    if let Ok(result) = rx.recv_timeout(timeout) {
        let _ = worker.join();
        return result;
    }
    let pids = Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    for pid in String::from_utf8_lossy(&pids).split_whitespace() {
        // The program's path from cmdline: `comm` is cut at 15 characters ("iptables-nft-re").
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let program = cmdline
            .split(|b| *b == 0)
            .next()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        let program = program.rsplit('/').next().unwrap_or_default();
        if program.ends_with("-restore") || program == "nft" {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = worker.join();
    bail!("did not load within {} s", timeout.as_secs())
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact quotients of small integers
mod tests {
    use super::*;

    #[test]
    fn prog_delta_is_per_run_between_readings() {
        let before = [
            ("from_pod".to_owned(), (10, 1000)),
            ("to_pod".to_owned(), (5, 500)),
        ]
        .into();
        let after = [
            ("from_pod".to_owned(), (30, 5000)),
            ("to_pod".to_owned(), (5, 500)),
            ("sock4_connect".to_owned(), (2, 3000)),
        ]
        .into();
        let d = prog_delta(&before, &after);
        assert_eq!(d.len(), 2, "to_pod did not run: {d:?}");
        assert_eq!(d["from_pod"], (20, 200.0));
        assert_eq!(d["sock4_connect"], (2, 1500.0));
    }
}
