//! Every map of the data path. They are BTF-defined (`.maps`), so the kernel knows their key
//! and value types and `bpftool map dump pinned …` shows field names; the agent pins each by
//! name under its bpffs root. Sizes here are defaults; the agent sets them from its
//! configuration at load time. Names stay under 15 characters: the kernel
//! truncates longer ones in `bpftool map show`.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    macros::btf_map,
};
use ferrovia_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, EndpointKey, EndpointPolicy, FlowConfig,
    FlowEvent, FlowLimit, FragKey, FrontendStats, PodStats, PolicyCtValue, PolicyPeerKey,
    PolicyPeerValue, PolicyPortKey, PolicyState, ServiceKey, ServiceValue, SockFwdValue, SockKey,
    SockRevNatValue, VerdictKey, VerdictValue, counter,
};

/// Frontend (VIP, port, protocol, slot) → service (slot 0) or backend id (slots 1..=n).
/// Written by the agent: backends and slots first, slot 0 last.
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, 262_144> = HashMap::new();

/// Backend id → backend address, port and owning frontend. Written by the agent.
#[btf_map]
pub static BACKENDS: HashMap<u32, Backend, 262_144> = HashMap::new();

/// Per-packet conntrack: the client's tuple (OUT) and the backend's reply tuple (IN) → the
/// translation to apply. Written by the tc programs; LRU so a full table evicts the oldest.
#[btf_map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue, 131_072> = LruHashMap::new();

/// (client, frontend) → last backend, for `sessionAffinity: ClientIP`. Written by both paths.
#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, 65_536> = LruHashMap::new();

/// (socket cookie, VIP) → backend this socket's datagrams go to, so an unconnected UDP
/// socket keeps one backend per VIP. Written by the sendmsg/connect hooks.
#[btf_map]
pub static SOCK_FWD: LruHashMap<SockKey, SockFwdValue, 65_536> = LruHashMap::new();

/// (socket cookie, backend) → VIP the application thinks it talks to, for recvmsg and
/// getpeername. Written by the connect/sendmsg hooks.
#[btf_map]
pub static SOCK_REVNAT: LruHashMap<SockKey, SockRevNatValue, 131_072> = LruHashMap::new();

/// Local pod address → its policy class and isolation flags. Written by the agent (a pod's
/// class entries before its endpoint entry; the endpoint entry before the old class goes).
#[btf_map]
pub static POLICY_PODS: HashMap<EndpointKey, EndpointPolicy, 16_384> = HashMap::new();

/// (class, direction, peer address prefix) → the peer's port set. Written by the agent.
#[btf_map]
pub static POLICY_PEERS: LpmTrie<PolicyPeerKey, PolicyPeerValue, 262_144> = LpmTrie::new();

/// (port set, protocol, port prefix) → allowed. Written by the agent.
#[btf_map]
pub static POLICY_PORTS: LpmTrie<PolicyPortKey, u32, 65_536> = LpmTrie::new();

/// `[0]`: the policy epoch and whether enforcement is on. Written by the agent.
#[btf_map]
pub static POLICY_STATE: Array<PolicyState, 1> = Array::new();

/// Flows allowed at a pod's egress or ingress (a `CtKey` with `dir` `POL_CT_*`), so replies
/// come back. Written by the tc programs; LRU.
#[btf_map]
pub static POLICY_CT: LruHashMap<CtKey, PolicyCtValue, 131_072> = LruHashMap::new();

/// Datagrams whose first fragment policy allowed at a point, so their later fragments (which
/// carry no ports) follow it. Written by the tc programs; LRU.
#[btf_map]
pub static POLICY_FRAGS: LruHashMap<FragKey, u8, 8_192> = LruHashMap::new();

/// Per-CPU packets and bytes per (local pod, direction, verdict reason). Written by the tc
/// programs; entries of pods that left are removed by the agent.
#[btf_map]
pub static POLICY_VERDICTS: PerCpuHashMap<VerdictKey, VerdictValue, 65_536> = PerCpuHashMap::new();

/// A local pod's network-namespace cookie → its address, so the socket hooks know when a pod
/// reaches itself through a VIP. Written by the agent when the CNI plugin registers the pod.
#[btf_map]
pub static POD_NETNS: HashMap<u64, EndpointKey, 16_384> = HashMap::new();

/// The agent's network-namespace probes (kernels without `SO_NETNS_COOKIE`, before 5.14):
/// nonce (probe address and port as the hook sees them) → cookie of the namespace whose
/// socket connected there, 0 until then. Entries are created and removed by the agent only;
/// `sock4_connect` fills in an existing one.
#[btf_map]
pub static NETNS_PROBE: HashMap<u64, u64, 64> = HashMap::new();

/// Per-CPU traffic of each local pod, keyed by its host-side interface index. The agent
/// creates an entry when it attaches a pod and removes it when the pod goes; the programs only
/// update existing entries, so the map holds registered pods and nothing traffic could add.
#[btf_map]
pub static POD_STATS: PerCpuHashMap<u32, PodStats, 16_384> = PerCpuHashMap::new();

/// Per-CPU new connections and rejections per frontend (`service_id`). Entries are made by
/// the programs on a frontend's first connection and removed by the agent with the frontend.
#[btf_map]
pub static FRONTEND_STATS: PerCpuHashMap<u32, FrontendStats, 65_536> = PerCpuHashMap::new();

/// Per-CPU backend selections per backend id (`BACKENDS`): new connections given that
/// backend, counted with the frontend's. Entries are made by the programs on a backend's first
/// selection and removed by the agent when it frees the id.
#[btf_map]
pub static BACKEND_STATS: PerCpuHashMap<u32, u64, 65_536> = PerCpuHashMap::new();

/// UDP flows seen at local pods, for `DirStats::conns_udp`: a `CtKey` as the packet was seen,
/// with `dir` the point (`POL_DIR_*`) → last seen (ns). LRU.
#[btf_map]
pub static UDP_FLOWS: LruHashMap<CtKey, u64, 65_536> = LruHashMap::new();

/// Flow events (`FlowEvent`) for the agent: new connections and drops at local pods, with
/// their verdicts. Size in bytes (a power-of-two multiple of the page size); the agent sets it.
/// Not pinned: a stream with one reader, the running agent (a restarted agent's programs get
/// a new one), and nothing `bpftool map dump` could show.
#[btf_map]
pub static FLOW_EVENTS: RingBuf<FlowEvent, 1_048_576> = RingBuf::new();

/// Per-CPU token bucket per local pod (host-side ifindex) limiting its flow events. Entries
/// are made and removed by the agent with the pod's `POD_STATS` entry; the programs only
/// update them, so an interface without one emits nothing.
#[btf_map]
pub static FLOW_LIMIT: PerCpuHashMap<u32, FlowLimit, 16_384> = PerCpuHashMap::new();

/// `[0]`: the flow events' rate limit. Written by the agent at load.
#[btf_map]
pub static FLOW_CONFIG: Array<FlowConfig, 1> = Array::new();

/// Per-CPU verdict counters, indexed by `ferrovia_common::counter`. Summed by the agent.
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { counter::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}
