//! Every map of the data path. They are BTF-defined (`.maps`), so the kernel knows their key
//! and value types and `bpftool map dump pinned …` shows field names; the agent pins each by
//! name under its bpffs root. Sizes here are defaults; the agent sets them from its
//! configuration at load time. Names stay under 15 characters: the kernel
//! truncates longer ones in `bpftool map show`.
use aya_ebpf::{
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use ferrovia_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, ServiceKey, ServiceValue, SockFwdValue,
    SockKey, SockRevNatValue, counter,
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
