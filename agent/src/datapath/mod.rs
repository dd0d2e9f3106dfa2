//! The data path driver: loads the BPF object, pins its maps, attaches its programs, and
//! writes the maps from the model's desired state. It diffs and writes; it decides nothing
//! about Kubernetes semantics (that is the model's job).
pub mod addr;
pub mod attach;
pub mod backend_stats;
pub mod conntrack;
pub mod events;
pub mod explain;
pub mod inventory;
pub mod netns;
pub mod policy;
pub mod services;
pub mod stats;
pub mod verifier;

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, lpm_trie::LpmTrie},
    programs::{CgroupSockAddr, SchedClassifier, TcAttachType},
};
use ferrovia_common::{PROTO_TCP, PROTO_UDP, SVC_FLAG_AFFINITY, ServiceKey, counter};
use serde::{Deserialize, Serialize};

use crate::model::{Desired, Protocol, policy::PolicyDesired};
pub use attach::TcMode;
pub use events::FlowRate;
pub use policy::{PolicyError, PolicyReport};
pub use services::{FrontendSpec, SyncReport, WriteError};

/// The BPF object, built by `build.rs` (aya-build). Empty when built with `AYA_BUILD_SKIP=1`.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferrovia"));

/// Starts an error that a kernel's missing feature causes, not ferrovia: the kernel matrix
/// (`cargo xtask vm-test`) counts a test failing with it as an expected degradation.
pub const KERNEL_LACKS: &str = "KERNEL-LACKS:";

/// Map names, as pinned under the bpffs root.
pub const MAP_NAMES: [&str; 22] = [
    "SERVICES",
    "BACKENDS",
    "CONNTRACK",
    "AFFINITY",
    "SOCK_FWD",
    "SOCK_REVNAT",
    "COUNTERS",
    "POLICY_PODS",
    "POLICY_PEERS",
    "POLICY_PORTS",
    "POLICY_STATE",
    "POLICY_CT",
    "POLICY_VERDICTS",
    "POD_NETNS",
    "POLICY_FRAGS",
    "NETNS_PROBE",
    "POD_STATS",
    "UDP_FLOWS",
    "FRONTEND_STATS",
    "BACKEND_STATS",
    "FLOW_LIMIT",
    "FLOW_CONFIG",
];

const SOCK_PROGRAMS: [&str; 4] = [
    "sock4_connect",
    "sock4_sendmsg",
    "sock4_recvmsg",
    "sock4_getpeer",
];

/// Map capacities (entries).
#[derive(Clone, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
    pub affinity: u32,
    pub sock_fwd: u32,
    pub sock_revnat: u32,
    pub policy_endpoints: u32,
    pub policy_peers: u32,
    pub policy_ports: u32,
    pub policy_ct: u32,
    pub policy_verdicts: u32,
    /// Local pods counted (`POD_STATS`, per-CPU: 144 bytes per entry and possible CPU).
    pub pod_stats: u32,
    /// Frontends counted (`FRONTEND_STATS`, per-CPU: 16 bytes per entry and possible CPU).
    pub frontend_stats: u32,
    /// Backends counted (`BACKEND_STATS`, per-CPU: 8 bytes per entry and possible CPU).
    pub backend_stats: u32,
    /// UDP flows remembered for the pods' new-connection counts (`UDP_FLOWS`, LRU).
    pub udp_flows: u32,
    /// The flow events' ring buffer (`FLOW_EVENTS`), in bytes: a power of two, at least a
    /// page. 40-byte events (+ 8 of header each).
    pub flow_events_bytes: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: 262_144,
            backends: 262_144,
            conntrack: 131_072,
            affinity: 65_536,
            sock_fwd: 65_536,
            sock_revnat: 131_072,
            policy_endpoints: 16_384,
            policy_peers: 262_144,
            policy_ports: 65_536,
            policy_ct: 131_072,
            policy_verdicts: 65_536,
            pod_stats: 1_024,
            frontend_stats: 16_384,
            backend_stats: 65_536,
            udp_flows: 65_536,
            flow_events_bytes: 1 << 20,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// Where maps and links are pinned (a directory on bpffs).
    pub bpffs_root: PathBuf,
    /// The cgroup v2 directory whose processes get socket-level LB; `None` turns it off.
    pub socket_lb_cgroup: Option<PathBuf>,
    pub sizes: MapSizes,
    /// Try TCX links before `clsact/cls_bpf`.
    pub prefer_tcx: bool,
    /// Enforce `NetworkPolicy`; when off the tc programs do no policy work at all.
    pub network_policy: bool,
}

/// A pod interface the tc programs are attached to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachedInterface {
    pub ifname: String,
    /// Its index (the key of the pod's `POD_STATS` entry); 0 in records of older versions.
    #[serde(default)]
    pub ifindex: u32,
    pub ingress: TcMode,
    pub egress: TcMode,
}

pub struct Datapath {
    ebpf: Ebpf,
    cfg: DatapathConfig,
    services: services::ServiceWriter,
    policy: policy::PolicyWriter,
    pod_netns: HashMap<aya::maps::MapData, u64, ferrovia_common::EndpointKey>,
    /// Nonce → cookie rendezvous of [`netns::probe`].
    netns_probe: HashMap<aya::maps::MapData, u64, u64>,
    /// Whether the kernel tells a namespace's cookie to user space (`SO_NETNS_COOKIE`).
    sockopt_cookies: bool,
    policy_ct: HashMap<aya::maps::MapData, ferrovia_common::CtKey, ferrovia_common::PolicyCtValue>,
    counters: PerCpuArray<aya::maps::MapData, u64>,
    pod_stats: stats::PodStatsMap,
    frontend_stats: stats::FrontendStatsMap,
    backend_stats: backend_stats::BackendStatsMap,
    flow_config: Array<aya::maps::MapData, ferrovia_common::FlowConfig>,
    /// The flow events' ring buffer until [`Datapath::take_flow_events`] hands it to a reader.
    flow_events: Option<aya::maps::Map>,
    /// What this kernel cannot do as designed, found by loading (not by version strings).
    degraded: Vec<String>,
}

/// Named totals of the per-CPU `COUNTERS` map.
pub type Counters = BTreeMap<&'static str, u64>;

const COUNTER_NAMES: [(&str, u32); 16] = [
    ("malformed", counter::MALFORMED),
    ("fragment", counter::FRAGMENT),
    ("xlate_new", counter::XLATE_NEW),
    ("xlate_ct", counter::XLATE_CT),
    ("reject_tcp_rst", counter::REJECT_TCP_RST),
    ("reject_icmp", counter::REJECT_ICMP),
    ("drop_no_endpoints", counter::DROP_NO_ENDPOINTS),
    ("drop_ct_full", counter::DROP_CT_FULL),
    ("sock_xlate", counter::SOCK_XLATE),
    ("sock_reject", counter::SOCK_REJECT),
    ("hairpin", counter::HAIRPIN),
    ("drop_xlate_error", counter::DROP_XLATE_ERROR),
    ("drop_policy", counter::DROP_POLICY),
    ("flow_lost", counter::FLOW_LOST),
    ("flow_suppressed", counter::FLOW_SUPPRESSED),
    ("ct_created", counter::CT_CREATED),
];

impl Datapath {
    /// Loads the programs, opening the pinned maps of a previous run if there are any (so
    /// conntrack and services survive a restart), and attaches the socket hooks.
    pub fn load(mut cfg: DatapathConfig) -> Result<Self> {
        if BPF_OBJECT.is_empty() {
            bail!(
                "this binary was built with AYA_BUILD_SKIP=1 and carries no BPF object; rebuild without it"
            );
        }
        raise_memlock();
        fs::create_dir_all(attach::links_dir(&cfg.bpffs_root)).with_context(|| {
            format!(
                "creating {} (is bpffs mounted at its parent?)",
                cfg.bpffs_root.display()
            )
        })?;
        let mut loader = EbpfLoader::new();
        for name in MAP_NAMES {
            loader.map_pin_path(name, cfg.bpffs_root.join(name));
        }
        size_maps(&mut loader, &cfg.sizes);
        let mut ebpf = loader.load(BPF_OBJECT).context("loading the BPF object")?;

        for name in ["from_pod", "to_pod"] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?.try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        let links = attach::links_dir(&cfg.bpffs_root);
        let mut degraded = Vec::new();
        for name in SOCK_PROGRAMS {
            let variant = load_sock_program(&mut ebpf, name, &mut degraded)?;
            let prog: &mut CgroupSockAddr = program(&mut ebpf, variant)?.try_into()?;
            // Pinned under the hook's name, whichever variant: a later run swaps it.
            match &cfg.socket_lb_cgroup {
                Some(cgroup) => attach::attach_cgroup(prog, name, cgroup, &links)?,
                None => attach::detach_cgroup(name, &links),
            }
        }
        probe_kernel(&mut cfg, &mut degraded);

        let services = HashMap::try_from(take(&mut ebpf, "SERVICES")?)?;
        let backends = HashMap::try_from(take(&mut ebpf, "BACKENDS")?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)?;
        let services = services::ServiceWriter::adopt(
            services,
            backends,
            cfg.sizes.services,
            cfg.sizes.backends,
        )
        .context("reading the pinned service maps")?;
        let pod_netns = HashMap::try_from(take(&mut ebpf, "POD_NETNS")?)?;
        let netns_probe = netns::clear_probes(HashMap::try_from(take(&mut ebpf, "NETNS_PROBE")?)?);
        let mut pod_stats = stats::PodStatsMap::new(
            PerCpuHashMap::try_from(take(&mut ebpf, "POD_STATS")?)?,
            PerCpuHashMap::try_from(take(&mut ebpf, "FLOW_LIMIT")?)?,
        );
        pod_stats.ensure_socket_bucket()?;
        let (flow_config, flow_events) = events::take(&mut ebpf)?;
        let (frontend_stats, backend_stats) = service_stats(&mut ebpf, &services)?;
        let policy_ct = HashMap::try_from(take(&mut ebpf, "POLICY_CT")?)?;
        let policy = policy::PolicyWriter::adopt(
            policy::PolicyMaps {
                endpoints: HashMap::try_from(take(&mut ebpf, "POLICY_PODS")?)?,
                peers: LpmTrie::try_from(take(&mut ebpf, "POLICY_PEERS")?)?,
                ports: LpmTrie::try_from(take(&mut ebpf, "POLICY_PORTS")?)?,
                state: Array::try_from(take(&mut ebpf, "POLICY_STATE")?)?,
                verdicts: PerCpuHashMap::try_from(take(&mut ebpf, "POLICY_VERDICTS")?)?,
            },
            policy::PolicyCapacity {
                endpoints: cfg.sizes.policy_endpoints,
                peers: cfg.sizes.policy_peers,
                ports: cfg.sizes.policy_ports,
            },
            cfg.network_policy,
        )
        .context("reading the pinned policy maps")?;
        tracing::info!(
            frontends = services.len(),
            policy_classes = policy.len().0,
            network_policy = cfg.network_policy,
            root = %cfg.bpffs_root.display(),
            "data path loaded"
        );
        let mut dp = Self {
            ebpf,
            cfg,
            services,
            policy,
            pod_netns,
            netns_probe,
            policy_ct,
            sockopt_cookies: netns::cookies_supported(),
            counters,
            pod_stats,
            frontend_stats,
            backend_stats,
            flow_config,
            flow_events,
            degraded,
        };
        dp.probe_netns_cookies();
        for what in &dp.degraded {
            tracing::warn!("degraded on this kernel: {what}");
        }
        Ok(dp)
    }

    /// The socket hooks know a policed pod reaching itself through a VIP by its network
    /// namespace's cookie. Where the kernel does not tell it (`SO_NETNS_COOKIE`, 5.14+), the
    /// agent learns it through the connect hook ([`netns::probe`]); this tries that once on
    /// the agent's own namespace, and reports the hairpin as degraded if it fails.
    fn probe_netns_cookies(&mut self) {
        if self.sockopt_cookies || !self.socket_lb() || !self.cfg.network_policy {
            return;
        }
        match self.netns_cookie(Path::new("/proc/thread-self/ns/net")) {
            Ok(_) => tracing::info!(
                "no SO_NETNS_COOKIE (Linux 5.14+): pods' namespace cookies are learnt through \
                 the connect hook"
            ),
            Err(e) => self.degraded.push(format!(
                "hairpin: no SO_NETNS_COOKIE (Linux 5.14+) and the connect hook's probe \
                 failed ({e:#}): a NetworkPolicy-isolated pod reaching itself through a \
                 service VIP is translated by the socket hooks and not judged by its own \
                 policy"
            )),
        }
    }

    /// The cookie of the network namespace at `netns` as the socket hooks see it: asked of
    /// the kernel (`SO_NETNS_COOKIE`, Linux 5.14+) or, before, learnt through the connect
    /// hook ([`netns::probe`]), which needs the socket hooks.
    pub fn netns_cookie(&mut self, netns: &Path) -> Result<u64> {
        if self.sockopt_cookies {
            return netns::cookie(netns);
        }
        let Some(cgroup) = &self.cfg.socket_lb_cgroup else {
            bail!("no SO_NETNS_COOKIE (Linux 5.14+) and no socket hooks to learn it through");
        };
        netns::probe(&mut self.netns_probe, cgroup, netns)
    }

    /// Writes the desired frontends. Errors name the frontends left at their previous state.
    pub fn sync(&mut self, desired: &Desired) -> (SyncReport, Vec<WriteError>) {
        self.sync_frontends(&frontend_specs(desired))
    }

    /// Writes the compiled network policy (make-before-break; on error the previous policy
    /// stays in force).
    pub fn sync_policy(&mut self, desired: &PolicyDesired) -> Result<PolicyReport, PolicyError> {
        self.policy.sync(desired)
    }

    /// Records which pod a network namespace (by cookie) belongs to, for the socket hooks.
    pub fn set_pod_netns(&mut self, cookie: u64, ip: std::net::Ipv4Addr) -> Result<()> {
        let (addr, family) = addr::encode(ip.into());
        self.pod_netns
            .insert(
                cookie,
                ferrovia_common::EndpointKey {
                    addr,
                    family,
                    _pad: [0; 3],
                },
                0,
            )
            .context("writing POD_NETNS")
    }

    /// Forgets the policy state of flows to and from `ip` (a pod that left): a new pod given
    /// the same address must not inherit its predecessor's replies. Returns how many went.
    /// Walks the whole policy conntrack (one syscall per entry): a pod deletion is rare.
    pub fn forget_pod_flows(&mut self, ip: std::net::Ipv4Addr) -> usize {
        let word = u32::from_ne_bytes(ip.octets());
        let keys: Vec<ferrovia_common::CtKey> = self
            .policy_ct
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.saddr[0] == word || k.daddr[0] == word)
            .collect();
        for key in &keys {
            let _ = self.policy_ct.remove(key);
        }
        keys.len()
    }

    /// Forgets a network namespace; an unknown cookie is not an error.
    pub fn remove_pod_netns(&mut self, cookie: u64) {
        let _ = self.pod_netns.remove(&cookie);
    }

    /// Policy verdicts per (pod, direction, reason): (packets, bytes), summed over CPUs.
    pub fn policy_verdicts(&self) -> Result<policy::Verdicts> {
        Ok(self.policy.verdicts()?)
    }

    /// Writes frontends given as map entries (what [`Datapath::sync`] derives from the model).
    pub fn sync_frontends(&mut self, specs: &[FrontendSpec]) -> (SyncReport, Vec<WriteError>) {
        let (report, errors) = self.services.sync(specs);
        // The counters of frontends that went go with them (a kept frontend keeps its id, a new
        // one gets a fresh id: only removals leave entries behind).
        if report.removed > 0 {
            let live = self.services.service_ids().into_values().collect();
            self.frontend_stats.retain(&live);
        }
        self.backend_stats.remove(&self.services.take_freed());
        (report, errors)
    }

    /// Backend selections (new connections given the backend) per installed frontend and
    /// backend address, summed over CPUs; backends never selected are absent.
    pub fn backend_selections(&self) -> Result<BTreeMap<ServiceKey, BTreeMap<SocketAddr, u64>>> {
        let by_id = self.backend_stats.read_all()?;
        let mut out = BTreeMap::<ServiceKey, BTreeMap<SocketAddr, u64>>::new();
        for (id, (frontend, addr)) in self.services.backend_ids() {
            if let Some(n) = by_id.get(&id) {
                out.entry(frontend).or_default().insert(addr, *n);
            }
        }
        Ok(out)
    }

    /// New connections and rejections per installed frontend, summed over CPUs; frontends
    /// without any yet are absent.
    pub fn frontend_stats(&self) -> Result<BTreeMap<ServiceKey, ferrovia_common::FrontendStats>> {
        let by_id = self.frontend_stats.read_all()?;
        Ok(self
            .services
            .service_ids()
            .into_iter()
            .filter_map(|(key, id)| by_id.get(&id).map(|s| (key, *s)))
            .collect())
    }

    /// Runs tc program `name` once on `packet` through `BPF_PROG_TEST_RUN`, returning the
    /// verdict and the packet as the program left it (program tests use this).
    pub fn test_run(&self, name: &str, packet: &[u8]) -> Result<(i32, Vec<u8>)> {
        self.test_run_from(name, packet, 0)
    }

    /// [`Datapath::test_run`] with the packet's `ingress_ifindex` set, as for a packet the
    /// node forwarded (0: one the node itself sent).
    pub fn test_run_from(
        &self,
        name: &str,
        packet: &[u8],
        ingress_ifindex: u32,
    ) -> Result<(i32, Vec<u8>)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        // struct __sk_buff up to `ifindex` (include/uapi/linux/bpf.h): only the fields
        // BPF_PROG_TEST_RUN accepts may be non-zero; `ingress_ifindex` is at offset 36.
        let mut ctx = [0u8; 44];
        ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let prog: &SchedClassifier = self
            .ebpf
            .program(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?;
        // Room for programs that grow the packet (the ICMP reject adds 28 bytes).
        let mut out = vec![0u8; packet.len() + 128];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .map_err(|e| {
                let einval =
                    std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                        e.source()
                    })
                    .filter_map(|e| e.downcast_ref::<std::io::Error>())
                    .any(|io| io.raw_os_error() == Some(libc::EINVAL));
                if ingress_ifindex != 0 && einval {
                    // Older kernels (5.10) accept only some `__sk_buff` fields in the context.
                    // The marker lets the kernel matrix count this as the kernel's limit.
                    anyhow::anyhow!(
                        "{KERNEL_LACKS} BPF_PROG_TEST_RUN on this kernel refuses to set \
                         ingress_ifindex in the skb context (EINVAL): {e}"
                    )
                } else {
                    anyhow::Error::from(e)
                }
            })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value.cast_signed(), out))
    }

    /// What runs degraded on this kernel (empty when nothing does).
    #[must_use]
    pub fn degraded(&self) -> &[String] {
        &self.degraded
    }

    /// Frontends installed.
    #[must_use]
    pub fn frontends(&self) -> usize {
        self.services.len()
    }

    /// Where the maps and links are pinned.
    #[must_use]
    pub fn bpffs_root(&self) -> &Path {
        &self.cfg.bpffs_root
    }

    #[must_use]
    pub fn socket_lb(&self) -> bool {
        self.cfg.socket_lb_cgroup.is_some()
    }

    /// Whether the socket-level programs are attached: configured, and each one's cgroup link
    /// pinned under the links directory.
    #[must_use]
    pub fn socket_hooks_attached(&self) -> bool {
        let links = attach::links_dir(&self.cfg.bpffs_root);
        self.socket_lb()
            && SOCK_PROGRAMS
                .iter()
                .all(|name| links.join(format!("cgroup-{name}")).exists())
    }

    /// Whether `NetworkPolicy` is enforced (`--network-policy`).
    #[must_use]
    pub fn network_policy(&self) -> bool {
        self.cfg.network_policy
    }

    /// Attaches `from_pod` / `to_pod` to a pod's host-side interface (or swaps in this
    /// run's programs where a previous run attached them).
    pub fn attach_pod(
        &mut self,
        ifname: &str,
        previous: Option<&AttachedInterface>,
    ) -> Result<AttachedInterface> {
        let links = attach::links_dir(&self.cfg.bpffs_root);
        let mut modes = [TcMode::Tcx; 2];
        for (i, (name, dir)) in [
            ("from_pod", TcAttachType::Ingress),
            ("to_pod", TcAttachType::Egress),
        ]
        .into_iter()
        .enumerate()
        {
            let prev = previous.map(|p| if i == 0 { p.ingress } else { p.egress });
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?.try_into()?;
            modes[i] = attach::attach_tc(prog, ifname, dir, &links, prev, self.cfg.prefer_tcx)
                .with_context(|| format!("attaching {name} to {ifname}"))?;
        }
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .with_context(|| format!("the index of {ifname}"))?;
        // A pod without counters still gets its data path: a full POD_STATS is logged, not
        // fatal to the pod.
        if let Err(e) = self.pod_stats.ensure(ifindex) {
            tracing::warn!("{ifname}: its traffic is not counted: {e:#}");
        }
        Ok(AttachedInterface {
            ifname: ifname.to_owned(),
            ifindex,
            ingress: modes[0],
            egress: modes[1],
        })
    }

    /// Detaches a pod's programs and forgets its counters; a vanished interface is not an
    /// error.
    pub fn detach_pod(&mut self, iface: &AttachedInterface) {
        let links = attach::links_dir(&self.cfg.bpffs_root);
        attach::detach_tc(&iface.ifname, TcAttachType::Ingress, &links, iface.ingress);
        attach::detach_tc(&iface.ifname, TcAttachType::Egress, &links, iface.egress);
        if iface.ifindex != 0 {
            self.pod_stats.remove(iface.ifindex);
        }
    }

    /// Sets the flow events' per-pod rate limit (`FLOW_CONFIG`).
    pub fn set_flow_rate(&mut self, rate: FlowRate) -> Result<()> {
        events::configure(&mut self.flow_config, rate)
    }

    /// The flow events' ring buffer, for the one reader ([`events::FlowReader`]); `None` once
    /// taken.
    pub fn take_flow_events(&mut self) -> Option<aya::maps::Map> {
        self.flow_events.take()
    }

    /// Per-pod traffic counters by interface index, summed over CPUs.
    pub fn pod_stats(&self) -> Result<std::collections::BTreeMap<u32, ferrovia_common::PodStats>> {
        self.pod_stats.read_all()
    }

    /// Forgets the counters of interfaces that are not `attached` (pods that went while the
    /// agent was down); returns how many went.
    pub fn retain_pod_stats(&mut self, attached: &std::collections::BTreeSet<u32>) -> usize {
        self.pod_stats.retain(attached)
    }

    /// Whether a pod's programs are attached, per direction: its pinned TCX link exists, or its
    /// classic filter is on the clsact hook at its priority and handle, running this run's
    /// program. A CNI CHECK asks this, so what cannot be confirmed (a netlink failure) counts
    /// as not attached, logged with its cause: CHECK fails rather than vouch for what it did
    /// not see.
    #[must_use]
    pub fn is_attached(&self, iface: &AttachedInterface) -> bool {
        let links = attach::links_dir(&self.cfg.bpffs_root);
        let ifname = iface.ifname.as_str();
        [
            ("from_pod", TcAttachType::Ingress, iface.ingress),
            ("to_pod", TcAttachType::Egress, iface.egress),
        ]
        .into_iter()
        .all(|(name, dir, mode)| match mode {
            TcMode::Tcx => attach::tcx_link_pinned(&links, ifname, dir),
            TcMode::Netlink { priority, handle } => {
                let prog_id = || -> Result<u32> {
                    let prog: &SchedClassifier = self
                        .ebpf
                        .program(name)
                        .with_context(|| format!("program {name} missing"))?
                        .try_into()?;
                    Ok(prog.info()?.id())
                };
                prog_id()
                    .and_then(|id| {
                        attach::classic_filter_attached(ifname, dir, priority, handle, id)
                    })
                    .unwrap_or_else(|e| {
                        tracing::warn!(%ifname, "cannot confirm that {name} is attached: {e:#}");
                        false
                    })
            }
        })
    }

    /// Totals of the data path's verdict counters.
    pub fn counters(&self) -> Result<Counters> {
        let mut out = Counters::new();
        for (name, index) in COUNTER_NAMES {
            let values = self.counters.get(&index, 0)?;
            out.insert(name, values.iter().sum());
        }
        Ok(out)
    }
}

/// Whether `ifname` exists in this process's network namespace. (Not `/sys/class/net`: that
/// shows the namespace sysfs was mounted in, which differs under `nsenter --net`.)
#[must_use]
pub fn interface_exists(ifname: &str) -> bool {
    nix::net::if_::if_nametoindex(ifname).is_ok()
}

/// What the kernel offers besides helpers, found by asking it (side-effect free), with what
/// runs differently where it lacks something; `cfg` follows what was found.
fn probe_kernel(cfg: &mut DatapathConfig, degraded: &mut Vec<String>) {
    // TCX (Linux 6.6+), probed by a query on loopback (no side effect): without it
    // each pod gets classic filters, which work, but are not links.
    if cfg.prefer_tcx && SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_err() {
        // What the probe says is what pods get: status and attachments agree.
        cfg.prefer_tcx = false;
        degraded.push(
            "tc: no TCX links (Linux 6.6+): programs attach as clsact/cls_bpf filters, \
             replaced in place by priority and handle on restart"
                .into(),
        );
    }
}

/// Map `name` out of the loaded object.
fn take(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing"))
}

/// The per-frontend and per-backend counters, without the entries of frontends and backends
/// gone while the agent was down: before a sync could give their ids out again.
fn service_stats(
    ebpf: &mut Ebpf,
    services: &services::ServiceWriter,
) -> Result<(stats::FrontendStatsMap, backend_stats::BackendStatsMap)> {
    let mut frontends =
        stats::FrontendStatsMap::new(PerCpuHashMap::try_from(take(ebpf, "FRONTEND_STATS")?)?);
    frontends.retain(&services.service_ids().into_values().collect());
    let mut backends =
        backend_stats::BackendStatsMap::new(PerCpuHashMap::try_from(take(ebpf, "BACKEND_STATS")?)?);
    backends.retain(&services.backend_ids().into_keys().collect());
    Ok((frontends, backends))
}

/// The capacities of the resizable maps.
fn size_maps(loader: &mut EbpfLoader, s: &MapSizes) {
    loader
        .map_max_entries("SERVICES", s.services)
        .map_max_entries("BACKENDS", s.backends)
        .map_max_entries("CONNTRACK", s.conntrack)
        .map_max_entries("AFFINITY", s.affinity)
        .map_max_entries("SOCK_FWD", s.sock_fwd)
        .map_max_entries("SOCK_REVNAT", s.sock_revnat)
        .map_max_entries("POLICY_PODS", s.policy_endpoints)
        .map_max_entries("POLICY_PEERS", s.policy_peers)
        .map_max_entries("POLICY_PORTS", s.policy_ports)
        .map_max_entries("POLICY_CT", s.policy_ct)
        .map_max_entries("POLICY_VERDICTS", s.policy_verdicts)
        .map_max_entries("POD_STATS", s.pod_stats)
        .map_max_entries("FRONTEND_STATS", s.frontend_stats)
        .map_max_entries("BACKEND_STATS", s.backend_stats)
        .map_max_entries("UDP_FLOWS", s.udp_flows)
        // One token bucket per counted pod, and the socket hooks'.
        .map_max_entries("FLOW_LIMIT", s.pod_stats.saturating_add(1))
        .map_max_entries("FLOW_EVENTS", s.flow_events_bytes);
}

/// The variant of socket hook `name` for kernels without `bpf_set_retval` (Linux 5.18+).
fn fallback_of(name: &str) -> Option<&'static str> {
    match name {
        "sock4_connect" => Some("sock4_conn_old"),
        "sock4_sendmsg" => Some("sock4_send_old"),
        _ => None,
    }
}

/// Loads socket hook `name`, or, when the verifier refuses it for a helper this kernel lacks,
/// its variant without that helper (noting the degradation). Returns the loaded program's name.
fn load_sock_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    degraded: &mut Vec<String>,
) -> Result<&'static str> {
    let prog: &mut CgroupSockAddr = program(ebpf, name)?.try_into()?;
    let err = match prog.load() {
        Ok(()) => return Ok(name),
        Err(e) => anyhow::Error::from(e),
    };
    let refusal = format!("{err:#}");
    // Only the missing helper makes a fallback right: any other refusal is a bug to fix,
    // which a silent fallback would hide (and the kernel matrix would call expected).
    let (Some(fallback), true) = (fallback_of(name), lacks_set_retval(&refusal)) else {
        return Err(err).with_context(|| format!("verifying {name}"));
    };
    let prog: &mut CgroupSockAddr = program(ebpf, fallback)?.try_into()?;
    prog.load().map_err(|e| {
        anyhow::anyhow!("verifying {name}: {refusal}; and its variant {fallback}: {e:#}")
    })?;
    let what = if name == "sock4_connect" {
        "connect() to a service without endpoints"
    } else {
        "a datagram sent to a service without endpoints"
    };
    degraded.push(format!(
        "{name}: {what} fails with EPERM, not ECONNREFUSED (no bpf_set_retval: Linux 5.18+); \
         verifier said: {}",
        verifier_reason(&refusal)
    ));
    Ok(fallback)
}

/// Whether the verifier refused a program for calling `bpf_set_retval`, helper number 187
/// (stable ABI): `invalid func unknown#187` where the kernel does not know it,
/// `unknown func bpf_set_retval#187` where the program type may not call it.
fn lacks_set_retval(verifier_log: &str) -> bool {
    verifier_log
        .lines()
        .any(|l| (l.contains("invalid func") || l.contains("unknown func")) && l.contains("#187"))
}

/// The line of a verifier log that says why it refused (an unknown helper), else its first.
fn verifier_reason(log: &str) -> &str {
    log.lines()
        .map(str::trim)
        .find(|l| l.contains("invalid func") || l.contains("unknown func"))
        .unwrap_or_else(|| log.lines().next().unwrap_or(log))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the BPF object"))
}

/// A frontend's `SERVICES` key (slot 0); `None` for an IPv6 one (no IPv6 data path yet).
#[must_use]
pub fn service_key(key: &crate::model::FrontendKey) -> Option<ServiceKey> {
    if key.vip.is_ipv6() {
        return None;
    }
    let (addr, family) = addr::encode(key.vip);
    let proto = match key.protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    };
    Some(ServiceKey {
        addr,
        port: key.port.to_be(),
        proto,
        family,
        slot: 0,
        _pad: 0,
    })
}

/// The model's frontends as map entries. IPv6 frontends are skipped (and logged): the
/// IPv6 programs do not exist yet, and entries nothing reads would only mislead.
#[must_use]
pub fn frontend_specs(desired: &Desired) -> Vec<FrontendSpec> {
    let mut out = Vec::with_capacity(desired.frontends.len());
    for (key, frontend) in &desired.frontends {
        let Some(service_key) = service_key(key) else {
            tracing::debug!(vip = %key.vip, "IPv6 frontend skipped: no IPv6 data path yet");
            continue;
        };
        out.push(FrontendSpec {
            key: service_key,
            flags: if frontend.affinity_timeout_s.is_some() {
                SVC_FLAG_AFFINITY
            } else {
                0
            },
            affinity_timeout_s: frontend.affinity_timeout_s.unwrap_or(0),
            backends: frontend
                .backends
                .iter()
                .filter(|b| b.is_ipv4())
                .copied()
                .collect(),
        });
    }
    out
}

/// Kernels before 5.11 charge BPF memory to `RLIMIT_MEMLOCK`. Raising it fails without
/// `CAP_SYS_RESOURCE`, which is harmless on newer kernels (memcg accounting): not fatal.
fn raise_memlock() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_missing_set_retval_helper_allows_the_fallback() {
        assert!(super::lacks_set_retval(
            "0: (85) call unknown#187\ninvalid func unknown#187"
        ));
        assert!(super::lacks_set_retval("unknown func bpf_set_retval#187"));
        assert!(!super::lacks_set_retval("invalid func unknown#186"));
        assert!(!super::lacks_set_retval("R1 invalid mem access 'scalar'"));
        assert!(!super::lacks_set_retval(
            "BPF program is too large. Processed 1000001 insn"
        ));
    }
}
