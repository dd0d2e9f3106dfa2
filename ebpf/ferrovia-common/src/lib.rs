//! Map keys, values and constants shared by ferrovia's BPF programs and its agent.
//!
//! One definition serves both sides: every type is `#[repr(C)]` with explicit padding
//! (integer flags, no `bool`), and implements `aya::Pod` behind the `user` feature.
//! Addresses are family-neutral: 16 bytes in network byte order, an IPv4 address in the
//! first four bytes and the rest zero, with a `family` field beside them.
#![no_std]
// Explicit padding fields are public so both sides can build values with struct literals.
#![allow(clippy::pub_underscore_fields)]

/// Address family markers carried in keys (not the kernel's `AF_*`: one byte, explicit).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
/// Marks an [`AffinityKey`] whose `client` is a network-namespace cookie (socket-level LB,
/// where the source address is not known yet at connect time) rather than an address.
pub const FAMILY_NETNS: u8 = 0;

/// IP protocol numbers as on the wire.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An IPv4 or IPv6 address as four 32-bit words in network byte order (IPv4 in word 0).
pub type Addr = [u32; 4];

/// Key of the `SERVICES` map: one frontend (VIP, port, protocol) and a slot.
/// Slot 0 holds the service itself ([`ServiceValue::count`] backends, flags, id); slots
/// `1..=count` each hold one backend id. The agent writes backends and slots before slot 0
/// and removes them after it, so the data path never sees a half-written backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Port in network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub slot: u16,
    pub _pad: u16,
}

/// Session affinity by client IP (`sessionAffinity: ClientIP`).
pub const SVC_FLAG_AFFINITY: u16 = 1;

/// Value of the `SERVICES` map. Slot 0: `count`, `flags`, `service_id`, `affinity_timeout_s`.
/// Slots `1..=count`: `backend_id` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    pub backend_id: u32,
    /// Number of selectable backends; 0 means the service rejects connections.
    pub count: u16,
    pub flags: u16,
    /// Identifies this frontend (reverse NAT, affinity, backend ownership).
    pub service_id: u32,
    pub affinity_timeout_s: u32,
}

/// Value of the `BACKENDS` map, keyed by a `u32` backend id. A backend id belongs to exactly
/// one frontend (`service_id`), so "this id is still a backend of that service" is one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: Addr,
    /// Port in network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub service_id: u32,
}

/// Direction of a conntrack entry: `CT_DIR_OUT` is keyed by the client's original tuple
/// (towards the VIP), `CT_DIR_IN` by the backend's reply tuple.
pub const CT_DIR_OUT: u8 = 0;
pub const CT_DIR_IN: u8 = 1;

/// Key of the `CONNTRACK` map: a 5-tuple as seen on the wire plus a direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    /// Ports in network byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub dir: u8,
    pub _pad: u8,
}

/// The client reached one of its own services' VIPs and landed on itself: its source is
/// rewritten to the VIP and packets are sent straight back into the pod.
pub const CT_FLAG_HAIRPIN: u16 = 1;
/// A FIN or RST was seen: the entry lives for `CT_TIMEOUT_CLOSING_NS` idle only. (A new SYN
/// on the tuple clears it.)
pub const CT_FLAG_CLOSING: u16 = 2;

/// Value of the `CONNTRACK` map.
/// `CT_DIR_OUT`: rewrite the destination to `xlate_addr:xlate_port` and the source address to
/// `peer_addr`. `CT_DIR_IN`: rewrite the source to `xlate_addr:xlate_port` (the VIP) and the
/// destination address to `peer_addr` (the original client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    pub xlate_addr: Addr,
    pub peer_addr: Addr,
    pub xlate_port: u16,
    pub flags: u16,
    pub backend_id: u32,
    pub service_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
}

pub const CT_TIMEOUT_TCP_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_TIMEOUT_UDP_NS: u64 = 120 * 1_000_000_000;
/// Long enough for a half-closed connection's answer (Linux conntrack: 60 s `CLOSE_WAIT`).
pub const CT_TIMEOUT_CLOSING_NS: u64 = 60 * 1_000_000_000;

/// How long a conntrack entry (`CONNTRACK`'s or `POLICY_CT`'s) with `flags` lives idle for a
/// flow of protocol `proto`: the programs' judgement, and the agent's when it collects them.
#[inline]
#[must_use]
pub const fn ct_timeout_ns(flags: u16, proto: u8) -> u64 {
    if flags & CT_FLAG_CLOSING != 0 {
        CT_TIMEOUT_CLOSING_NS
    } else if proto == PROTO_TCP {
        CT_TIMEOUT_TCP_NS
    } else {
        CT_TIMEOUT_UDP_NS
    }
}

/// How long before `now` the time `then` was, both `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`)
/// readings: their difference read as signed, as the kernel's `time_after` does. A `then`
/// after `now` (another CPU refreshed the entry after this one read the clock) is no age at
/// all, never a wrapped-around huge one; a `then` before boot (`now - age` written by a test
/// in a VM that booted seconds ago) is still its age. The programs and the agent's GC judge
/// every idle timeout with it.
#[inline]
#[must_use]
pub const fn age_ns(now: u64, then: u64) -> u64 {
    let d = now.wrapping_sub(then);
    if d > i64::MAX as u64 { 0 } else { d }
}

/// Key of the `AFFINITY` map: which backend a client IP was last sent to, per frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub client: Addr,
    pub service_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// Key of the socket-LB maps: a socket (by cookie) and an address it talks to.
/// In `SOCK_FWD` the address is the VIP (which backend this socket uses for it); in
/// `SOCK_REVNAT` it is the backend (which VIP to report to the application instead).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    pub cookie: u64,
    pub addr: Addr,
    /// Port in network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u32,
}

/// Value of `SOCK_FWD`: the backend a socket's datagrams to a VIP go to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockFwdValue {
    pub backend_id: u32,
    pub service_id: u32,
}

/// Value of `SOCK_REVNAT`: the VIP and port the application believes it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRevNatValue {
    pub addr: Addr,
    /// Port in network byte order.
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
}

// ---- NetworkPolicy -------------------------------------------------------------------------
//
// The agent compiles the policies that select each local pod into a *class* (pods whose
// compiled rules are equal share one): per direction, a longest-prefix-match trie from peer
// address to a *port set*, and a trie from (port set, protocol, port) to "allowed". A packet
// costs one endpoint lookup and two trie lookups, whatever the number of policies or rules.

/// Key of the `POLICY_PODS` map: a local pod's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EndpointKey {
    pub addr: Addr,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Some policy selects the pod for ingress: only what a rule allows may enter.
pub const POL_ISOLATED_INGRESS: u32 = 1;
/// Some policy selects the pod for egress: only what a rule allows may leave.
pub const POL_ISOLATED_EGRESS: u32 = 2;

/// Value of `POLICY_PODS`: the pod's policy class and isolation flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointPolicy {
    pub class_id: u32,
    pub flags: u32,
}

/// Direction of a policy rule, as seen from the pod the policy selects.
pub const POL_DIR_INGRESS: u8 = 0;
pub const POL_DIR_EGRESS: u8 = 1;

/// Data of a `POLICY_PEERS` trie key (after the kernel's `prefixlen`): the class and direction
/// are always matched whole ([`PEER_KEY_FIXED_BITS`]), the address by prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PolicyPeerKey {
    pub class_id: u32,
    pub dir: u8,
    pub family: u8,
    pub _pad: u16,
    pub addr: Addr,
}

/// Bits of [`PolicyPeerKey`] before the address.
pub const PEER_KEY_FIXED_BITS: u32 = 64;

/// Value of `POLICY_PEERS`: the ports this peer may use (`portset_id` 0: none) and, when
/// none, why (a `verdict::DENY_*`), so a drop can be explained.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyPeerValue {
    pub portset_id: u32,
    pub reason: u32,
}

/// Data of a `POLICY_PORTS` trie key. Prefix lengths: [`PORT_KEY_ANY_PROTO_BITS`] matches
/// every protocol and port (a rule without `ports`), [`PORT_KEY_PROTO_BITS`] every port of
/// one protocol, [`PORT_KEY_FIXED_BITS`] + k a port range aligned on k bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PolicyPortKey {
    pub portset_id: u32,
    pub proto: u8,
    pub _pad: u8,
    /// Port in network byte order, so that the trie's byte-wise prefixes are port ranges.
    pub port: u16,
}

pub const PORT_KEY_ANY_PROTO_BITS: u32 = 32;
pub const PORT_KEY_PROTO_BITS: u32 = 40;
pub const PORT_KEY_FIXED_BITS: u32 = 48;

/// Value of `POLICY_STATE[0]`, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyState {
    /// Bumped after every change of the policy maps: a flow judged under an older epoch is
    /// judged again on its next packet (a connection that became denied is cut).
    pub epoch: u32,
    /// 0: enforcement off (no policy work at all per packet).
    pub enabled: u32,
}

/// `POLICY_CT` directions: where a flow was allowed, at the pod that sent it (egress) or at
/// the pod that received it (ingress). Keys are [`CtKey`] with `dir` set to one of these.
pub const POL_CT_EGRESS: u8 = 2;
pub const POL_CT_INGRESS: u8 = 3;
/// `PolicyCtValue::flags`: the flow came from the node itself, which is always allowed in, so
/// judging it again after a policy change must allow it too.
pub const POL_CT_FLAG_HOST: u16 = 4;

/// Value of `POLICY_CT`: a flow allowed at one pod's interface, whose replies are allowed back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyCtValue {
    /// [`PolicyState::epoch`] when the flow was last judged.
    pub epoch: u32,
    /// `CT_FLAG_CLOSING` once a FIN/RST was seen; `POL_CT_FLAG_HOST`.
    pub flags: u16,
    pub _pad: u16,
    pub last_seen_ns: u64,
}

/// Key of `POLICY_FRAGS`: the fragments of one IPv4 datagram at one point (`POL_CT_*`),
/// whose first fragment (the one with ports) policy allowed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    pub ip_id: u16,
    pub proto: u8,
    pub point: u8,
}

/// Key of the per-CPU `POLICY_VERDICTS` map: a local pod, a direction, a verdict reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VerdictKey {
    pub addr: Addr,
    pub family: u8,
    /// `POL_DIR_INGRESS` (packets to the pod) or `POL_DIR_EGRESS` (from the pod).
    pub dir: u8,
    pub reason: u8,
    pub _pad: u8,
}

/// Value of `POLICY_VERDICTS`: packets and bytes (L3, from the IP header on).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VerdictValue {
    pub packets: u64,
    pub bytes: u64,
}

/// One direction of a pod's traffic in `POD_STATS`, as the pod's tc programs saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirStats {
    /// Packets on the wire (a GSO/GRO aggregate counts as its segments), dropped ones included.
    pub packets: u64,
    /// Bytes of those frames (Ethernet header on), dropped ones included.
    pub bytes: u64,
    /// New TCP connections let through: SYNs without ACK.
    pub conns_tcp: u64,
    /// New UDP flows let through: a datagram of a 4-tuple not seen, in either orientation, at
    /// this pod within the UDP timeout (`UDP_FLOWS`), and not the reply of a translated flow.
    pub conns_udp: u64,
    /// IPv4 packets whose headers did not parse (truncated, bad IHL or length): passed
    /// untouched, as before; the kernel drops what it cannot use.
    pub malformed: u64,
    /// Dropped by the pod's `NetworkPolicy` (reasons per verdict in `POLICY_VERDICTS`).
    pub drop_policy: u64,
    /// To a service without endpoints: answered with a TCP RST / ICMP unreachable, or dropped.
    pub drop_no_endpoints: u64,
    /// Dropped because a conntrack entry could not be written.
    pub drop_ct_full: u64,
    /// Dropped because a translation failed half-way.
    pub drop_xlate_error: u64,
}

/// Value of the per-CPU `POD_STATS` map (key: the pod's host-side interface index).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodStats {
    /// Packets to the pod (`to_pod`).
    pub ingress: DirStats,
    /// Packets from the pod (`from_pod`).
    pub egress: DirStats,
}

/// Value of the per-CPU `FRONTEND_STATS` map (key: a frontend's `service_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FrontendStats {
    /// New connections given a backend: a TCP connect or first UDP datagram translated by the
    /// socket hooks, or a new flow translated by the per-packet path (each counted once, where
    /// it was translated).
    pub connections: u64,
    /// Connections refused because the frontend had no endpoint.
    pub rejected: u64,
}

/// One flow event of the `FLOW_EVENTS` ring buffer: a packet seen at a pod's interface that
/// started a flow or was dropped (`flow::*`), with the policy verdict that judged it. IPv4
/// addresses in network byte order, as the packet came; for a flow the per-packet path
/// translated, `xaddr:xport` is where it went (the backend), else equal to `daddr:dport`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`).
    pub ts_ns: u64,
    /// The pod's host-side interface.
    pub ifindex: u32,
    /// Events of this interface the rate limit suppressed on this CPU before this one.
    pub suppressed: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub xaddr: u32,
    /// Ports in network byte order (0 for protocols without ports).
    pub sport: u16,
    pub dport: u16,
    pub xport: u16,
    pub proto: u8,
    /// `POL_DIR_INGRESS` (to the pod) or `POL_DIR_EGRESS` (from it).
    pub dir: u8,
    /// `flow::NEW` or `flow::DROP`.
    pub kind: u8,
    /// The `verdict` reason that judged the packet, or `flow::NOT_JUDGED`.
    pub verdict: u8,
    /// `drop::*`.
    pub drop: u8,
    /// The point (`POL_DIR_*`) whose policy gave `verdict`: `dir`, except for a hairpin, which
    /// `from_pod` judges at the pod's egress and then its ingress.
    pub policy_dir: u8,
}

/// Kinds of [`FlowEvent`].
pub mod flow {
    /// A new connection let through: a TCP SYN without ACK, or a new UDP flow.
    pub const NEW: u8 = 1;
    /// A packet dropped (`FlowEvent::drop` says why), or a socket call refused (no endpoints).
    pub const DROP: u8 = 2;
    /// A service address translated by the socket hooks at `connect()` / `sendmsg()`: no
    /// interface (`ifindex` 0), the client pod's address from its namespace (`POD_NETNS`; 0 when
    /// unknown: the node itself or a pod registered without it), no source port yet.
    pub const TRANSLATE: u8 = 3;
    /// The `FLOW_LIMIT` bucket of the socket hooks' events (no interface has index 0).
    pub const SOCKET_BUCKET: u32 = 0;
    /// `FlowEvent::verdict` when policy did not judge the packet (enforcement off).
    pub const NOT_JUDGED: u8 = 0xff;
    /// A hairpin bounced back into the pod, judged (and its event emitted) in `from_pod`: no
    /// second event at its ingress.
    pub const JUDGED_BEFORE: u8 = 0xfe;
}

/// Value of the per-CPU `FLOW_LIMIT` map (key: a pod's host-side interface index): a token
/// bucket in nanoseconds of credit, so that a flood at one pod cannot starve the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowLimit {
    /// Credit left (an event costs `FlowConfig::interval_ns`), capped at `burst_ns`.
    pub credit_ns: u64,
    /// When credit was last added.
    pub last_ns: u64,
    /// Events suppressed since the last one emitted (on this CPU).
    pub suppressed: u32,
    pub _pad: u32,
}

/// Value of `FLOW_CONFIG[0]`, written by the agent: events per pod and CPU at most one per
/// `interval_ns` on average, bursts up to `burst_ns / interval_ns`. `interval_ns` 0: no events.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowConfig {
    pub interval_ns: u64,
    pub burst_ns: u64,
}

/// Why a pod's packet was dropped (`DirStats` field), as the tc programs note it.
pub mod drop {
    pub const NONE: u8 = 0;
    pub const POLICY: u8 = 1;
    pub const NO_ENDPOINTS: u8 = 2;
    pub const CT_FULL: u8 = 3;
    pub const XLATE_ERROR: u8 = 4;
}

/// Why a packet was allowed or denied (the `reason` of a [`VerdictKey`]).
pub mod verdict {
    /// The pod is not isolated in this direction.
    pub const ALLOW_NOT_ISOLATED: u8 = 0;
    /// A rule allows the peer and port (a new flow, or one judged again after a change).
    pub const ALLOW_RULE: u8 = 1;
    /// A packet of a flow allowed earlier, under the current policies.
    pub const ALLOW_ESTABLISHED: u8 = 2;
    /// A reply of a flow allowed in the other direction.
    pub const ALLOW_REPLY: u8 = 3;
    /// From the node itself (always allowed, as upstream documents).
    pub const ALLOW_HOST: u8 = 4;
    /// Isolated and no rule selects the peer ("denied by default").
    pub const DENY_NO_RULE: u8 = 5;
    /// The peer is inside an ipBlock's `except` and no other rule selects it.
    pub const DENY_EXCEPT: u8 = 6;
    /// Rules select the peer, but not for this protocol and port.
    pub const DENY_PORT: u8 = 7;
    pub const COUNT: u8 = 8;

    /// Whether `reason` lets the packet through.
    #[must_use]
    pub const fn allows(reason: u8) -> bool {
        reason < DENY_NO_RULE
    }

    /// The reason's name in metrics and logs.
    #[must_use]
    pub const fn name(reason: u8) -> &'static str {
        match reason {
            ALLOW_NOT_ISOLATED => "allowed-not-isolated",
            ALLOW_RULE => "allowed-by-rule",
            ALLOW_ESTABLISHED => "allowed-established",
            ALLOW_REPLY => "allowed-reply",
            ALLOW_HOST => "allowed-from-node",
            DENY_NO_RULE => "denied-by-default",
            DENY_EXCEPT => "denied-by-except",
            DENY_PORT => "denied-by-port",
            _ => "unknown",
        }
    }
}

/// Indices of the per-CPU `COUNTERS` array: one named reason per verdict of the data path.
pub mod counter {
    /// Packets whose headers could not be parsed (truncated, bad IHL/length); passed untouched.
    pub const MALFORMED: u32 = 0;
    /// IPv4 fragments; passed untouched (no L4 header to translate in non-first fragments).
    pub const FRAGMENT: u32 = 1;
    /// New connections translated to a backend by the per-packet path.
    pub const XLATE_NEW: u32 = 2;
    /// Packets translated by an existing conntrack entry (either direction).
    pub const XLATE_CT: u32 = 3;
    /// Connections to a service without endpoints, answered with a TCP RST.
    pub const REJECT_TCP_RST: u32 = 4;
    /// Datagrams to a service without endpoints, answered with ICMP port unreachable.
    pub const REJECT_ICMP: u32 = 5;
    /// Packets to a service without endpoints that could not be answered, dropped.
    pub const DROP_NO_ENDPOINTS: u32 = 6;
    /// A conntrack entry could not be written (map full and not LRU-evictable).
    pub const DROP_CT_FULL: u32 = 7;
    /// Socket-level translations (connect, sendmsg).
    pub const SOCK_XLATE: u32 = 8;
    /// Socket-level rejections (no endpoints) with ECONNREFUSED.
    pub const SOCK_REJECT: u32 = 9;
    /// Hairpin packets sent straight back into the pod.
    pub const HAIRPIN: u32 = 10;
    /// A translation failed half-way (a helper refused a write); dropped rather than sent on.
    pub const DROP_XLATE_ERROR: u32 = 11;
    /// Packets dropped by network policy (per pod and reason in `POLICY_VERDICTS`).
    pub const DROP_POLICY: u32 = 12;
    /// Flow events the ring buffer had no room for (the agent reads too slowly).
    pub const FLOW_LOST: u32 = 13;
    /// Flow events the per-pod rate limit suppressed.
    pub const FLOW_SUPPRESSED: u32 = 14;
    /// Conntrack (`CONNTRACK`) entries created by the per-packet path: an insert of a key that
    /// was not in the map (an overwrite of an existing one is not counted), so that the
    /// agent can tell how many the LRU evicted (created − deleted − present).
    pub const CT_CREATED: u32 = 15;
    pub const COUNT: u32 = 16;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], Copy, has explicit padding fields and no pointers.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::SockFwdValue {}
    unsafe impl aya::Pod for super::SockRevNatValue {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::EndpointPolicy {}
    unsafe impl aya::Pod for super::PolicyPeerKey {}
    unsafe impl aya::Pod for super::PolicyPeerValue {}
    unsafe impl aya::Pod for super::PolicyPortKey {}
    unsafe impl aya::Pod for super::PolicyState {}
    unsafe impl aya::Pod for super::PolicyCtValue {}
    unsafe impl aya::Pod for super::VerdictKey {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::VerdictValue {}
    unsafe impl aya::Pod for super::DirStats {}
    unsafe impl aya::Pod for super::PodStats {}
    unsafe impl aya::Pod for super::FrontendStats {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::FlowLimit {}
    unsafe impl aya::Pod for super::FlowConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The kernel sees these sizes: any change is an ABI change for pinned maps.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 24);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtValue>(), 56);
        assert_eq!(size_of::<AffinityKey>(), 24);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<SockKey>(), 32);
        assert_eq!(size_of::<SockFwdValue>(), 8);
        assert_eq!(size_of::<SockRevNatValue>(), 24);
        assert_eq!(size_of::<EndpointKey>(), 20);
        assert_eq!(size_of::<EndpointPolicy>(), 8);
        assert_eq!(size_of::<PolicyPeerKey>(), 24);
        assert_eq!(size_of::<PolicyPeerValue>(), 8);
        assert_eq!(size_of::<PolicyPortKey>(), 8);
        assert_eq!(size_of::<PolicyState>(), 8);
        assert_eq!(size_of::<PolicyCtValue>(), 16);
        assert_eq!(size_of::<VerdictKey>(), 20);
        assert_eq!(size_of::<VerdictValue>(), 16);
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(size_of::<DirStats>(), 72);
        assert_eq!(size_of::<PodStats>(), 144);
        assert_eq!(size_of::<FlowEvent>(), 40);
        assert_eq!(size_of::<FlowLimit>(), 24);
        assert_eq!(size_of::<FlowConfig>(), 16);
    }
}
