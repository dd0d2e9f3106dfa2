//! Per-pod traffic counters (`POD_STATS`): packets, bytes, new connections and drops by
//! reason, per direction, counted in the pod's tc programs on per-CPU values the agent sums
//! at scrape time. A pod's entry exists while the agent has it registered; traffic on any
//! other interface (or in a program test without an entry) is not counted here.
use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_ktime_get_ns, programs::TcContext};
use ferrovia_common::{
    CT_TIMEOUT_UDP_NS, CtKey, DirStats, POL_DIR_EGRESS, POL_DIR_INGRESS, PROTO_TCP, PROTO_UDP,
    age_ns, drop, flow,
};

use crate::{
    conntrack::ct_key,
    events,
    maps::{POD_STATS, UDP_FLOWS},
    packet::{FRAG_LATER, Ipv4Packet, TCP_ACK, TCP_SYN},
    policy::Gate,
};

/// A refresh of a flow's age at most this often (keeps its cache line quiet).
const REFRESH_NS: u64 = 1_000_000_000;

/// The packet as it came, before any rewrite: its interface, length and segments (a reject
/// rebuilds the packet, a GSO aggregate is several packets on the wire).
#[derive(Clone, Copy)]
pub struct Wire {
    ifindex: u32,
    len: u32,
    segs: u32,
}

impl Wire {
    #[inline(always)]
    pub fn of(ctx: &TcContext) -> Self {
        // SAFETY: plain reads of our own skb.
        unsafe {
            let skb = &*ctx.skb.skb;
            Self {
                ifindex: skb.ifindex,
                len: skb.len,
                segs: skb.gso_segs,
            }
        }
    }
}

/// This packet's direction of the pod's counters: the pod is found by the interface the
/// program runs on (`dir`: `POL_DIR_INGRESS` in `to_pod`, `POL_DIR_EGRESS` in `from_pod`).
#[inline(always)]
fn counters(wire: Wire, dir: u8) -> Option<&'static mut DirStats> {
    let stats = POD_STATS.get_ptr_mut(&wire.ifindex)?;
    // SAFETY: this CPU's copy of a live per-CPU value; tc runs with bottom halves off, so
    // nothing else on this CPU writes it while we run.
    let stats = unsafe { &mut *stats };
    let d = if dir == POL_DIR_INGRESS {
        &mut stats.ingress
    } else {
        &mut stats.egress
    };
    d.packets += u64::from(wire.segs.max(1));
    d.bytes += u64::from(wire.len);
    Some(d)
}

/// Counts an IPv4 packet the programs parsed, with its outcome: `action` as returned to tc,
/// and what its path noted on `gate`.
#[inline(always)]
pub fn account(ctx: &TcContext, wire: Wire, dir: u8, pkt: &Ipv4Packet, action: i32, gate: &Gate) {
    let Some(d) = counters(wire, dir) else {
        return;
    };
    let kind = match gate.dropped() {
        drop::NONE => new_connection(d, pkt, dir, action, gate),
        why => {
            match why {
                drop::POLICY => d.drop_policy += 1,
                drop::NO_ENDPOINTS => d.drop_no_endpoints += 1,
                drop::CT_FULL => d.drop_ct_full += 1,
                _ => d.drop_xlate_error += 1,
            }
            flow::DROP
        }
    };
    // One call site: the event code is inlined once per program.
    if kind != 0 {
        events::emit(ctx, wire.ifindex, dir, pkt, kind, gate);
    }
}

/// Counts a packet let through that starts a connection: `flow::NEW` if it did, else 0.
#[inline(always)]
fn new_connection(d: &mut DirStats, pkt: &Ipv4Packet, dir: u8, action: i32, gate: &Gate) -> u8 {
    if action == TC_ACT_SHOT as i32 {
        return 0;
    }
    if pkt.proto == PROTO_TCP {
        if pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            d.conns_tcp += 1;
            return flow::NEW;
        }
    } else if pkt.proto == PROTO_UDP
        && pkt.frag != FRAG_LATER
        && !gate.replied()
        && new_udp_flow(pkt, dir)
    {
        d.conns_udp += 1;
        return flow::NEW;
    }
    0
}

/// Counts a frame the programs did not parse: not IPv4 (ARP, IPv6), or IPv4 whose headers
/// did not parse (`malformed`). Both pass untouched.
#[inline(always)]
pub fn account_unparsed(wire: Wire, dir: u8, malformed: bool) {
    if let Some(d) = counters(wire, dir)
        && malformed
    {
        d.malformed += 1;
    }
}

/// Whether a UDP datagram starts a flow at this pod: its 4-tuple was not seen here within the
/// UDP timeout, in its own orientation at this point or reversed at the pod's other point (a
/// reply of a flow the other side started). Records it when new.
#[inline(always)]
fn new_udp_flow(pkt: &Ipv4Packet, dir: u8) -> bool {
    // SAFETY: helper without side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    // One key on the stack, turned around for the reverse lookup and back.
    let mut key = ct_key(pkt, dir);
    if seen(&key, now) {
        return false;
    }
    reverse(&mut key);
    if seen(&key, now) {
        return false;
    }
    reverse(&mut key);
    // Best effort: an LRU insert fails only under memory pressure (then the next datagram
    // counts again).
    let _ = UDP_FLOWS.insert(&key, &now, 0);
    true
}

/// The same flow seen at the pod's other point, the other way round.
#[inline(always)]
fn reverse(key: &mut CtKey) {
    core::mem::swap(&mut key.saddr, &mut key.daddr);
    core::mem::swap(&mut key.sport, &mut key.dport);
    key.dir = if key.dir == POL_DIR_INGRESS {
        POL_DIR_EGRESS
    } else {
        POL_DIR_INGRESS
    };
}

/// Whether `key` was seen within the UDP timeout, refreshing its age when it was.
#[inline(always)]
fn seen(key: &CtKey, now: u64) -> bool {
    let Some(last) = UDP_FLOWS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: valid map value; racing writers only store a time.
    let last = unsafe { &mut *last };
    let age = age_ns(now, *last);
    if age >= CT_TIMEOUT_UDP_NS {
        return false;
    }
    if age > REFRESH_NS {
        *last = now;
    }
    true
}
