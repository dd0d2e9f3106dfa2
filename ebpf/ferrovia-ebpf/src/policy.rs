//! NetworkPolicy enforcement at a pod's interface.
//!
//! Two points judge a flow: the sending pod's egress (`from_pod`) and the receiving pod's
//! ingress (`to_pod`). A flow allowed at a point is remembered in `POLICY_CT` (keyed by its
//! tuple and the point), so its replies pass the pod's other hook whatever the policies say
//! about the reverse direction. Entries carry the policy epoch they were judged under: after
//! any policy change a flow is judged again on its next packet, so an established connection
//! that stays allowed goes on and one that became denied is cut.
use core::cell::Cell;

use aya_ebpf::{btf_maps::lpm_trie::Key, helpers::bpf_ktime_get_ns};
use ferrovia_common::{
    CT_FLAG_CLOSING, CtKey, EndpointKey, EndpointPolicy, FAMILY_V4, FragKey, PEER_KEY_FIXED_BITS,
    POL_CT_EGRESS, POL_CT_FLAG_HOST, POL_CT_INGRESS, POL_DIR_EGRESS, POL_DIR_INGRESS,
    POL_ISOLATED_EGRESS, POL_ISOLATED_INGRESS, PORT_KEY_FIXED_BITS, PROTO_TCP, PolicyCtValue,
    PolicyPeerKey, PolicyPortKey, VerdictKey, VerdictValue, counter, drop, verdict,
};

use crate::{
    conntrack::still_alive,
    maps::{
        POLICY_CT, POLICY_FRAGS, POLICY_PEERS, POLICY_PODS, POLICY_PORTS, POLICY_STATE,
        POLICY_VERDICTS, count,
    },
    packet::{FRAG_FIRST, FRAG_LATER, Ipv4Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// A flow as policy sees it: the real client and the real (translated) server.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// `packet::FRAG_*`, and the IP identification that ties fragments together.
    pub frag: u8,
    pub ip_id: u16,
}

impl Flow {
    /// The packet's own tuple.
    #[inline(always)]
    pub fn of(pkt: &Ipv4Packet) -> Self {
        Self {
            saddr: pkt.saddr,
            daddr: pkt.daddr,
            sport: pkt.sport,
            dport: pkt.dport,
            proto: pkt.proto,
            tcp_flags: pkt.tcp_flags,
            frag: pkt.frag,
            ip_id: pkt.ip_id,
        }
    }

    /// The packet's tuple with the server replaced (after service translation).
    #[inline(always)]
    pub fn to(pkt: &Ipv4Packet, daddr: u32, dport: u16) -> Self {
        Self {
            daddr,
            dport,
            ..Self::of(pkt)
        }
    }

    #[inline(always)]
    fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }

    #[inline(always)]
    fn key(&self, point: u8) -> CtKey {
        CtKey {
            saddr: [self.saddr, 0, 0, 0],
            daddr: [self.daddr, 0, 0, 0],
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            family: FAMILY_V4,
            dir: point,
            _pad: 0,
        }
    }
}

/// Policy for one packet: off, or on under an epoch. Read once per packet. It also carries
/// what the packet's path noted for the pod's counters (`stats`): why it was dropped, and
/// whether it was the reply of a translated flow.
pub struct Gate {
    epoch: u32,
    enabled: bool,
    /// L3 length, for the byte counters.
    len: u64,
    drop: Cell<u8>,
    reply: Cell<bool>,
    /// The last `verdict` reason recorded for the packet (`flow::NOT_JUDGED`: none), the
    /// point (`POL_DIR_*`) that gave it, and the destination it judged (after translation).
    judged: Cell<u8>,
    judged_point: Cell<u8>,
    judged_dport: Cell<u16>,
    judged_daddr: Cell<u32>,
}

impl Gate {
    #[inline(always)]
    pub fn current(pkt: &Ipv4Packet) -> Self {
        let state = POLICY_STATE.get(0).copied().unwrap_or_default();
        Self {
            epoch: state.epoch,
            enabled: state.enabled != 0,
            len: u64::from(pkt.tot_len),
            drop: Cell::new(drop::NONE),
            reply: Cell::new(false),
            judged: Cell::new(ferrovia_common::flow::NOT_JUDGED),
            judged_point: Cell::new(POL_DIR_EGRESS),
            judged_dport: Cell::new(0),
            judged_daddr: Cell::new(0),
        }
    }

    /// Notes why the packet is dropped (`ferrovia_common::drop`), for the pod's counters.
    #[inline(always)]
    pub fn note_drop(&self, why: u8) {
        self.drop.set(why);
    }

    /// Why the packet was dropped; `drop::NONE` when nothing dropped it.
    #[inline(always)]
    pub fn dropped(&self) -> u8 {
        self.drop.get()
    }

    /// Notes that the packet is the reply of a translated flow (reverse NAT applies).
    #[inline(always)]
    pub fn note_reply(&self) {
        self.reply.set(true);
    }

    #[inline(always)]
    pub fn replied(&self) -> bool {
        self.reply.get()
    }

    /// The verdict reason policy gave the packet, `flow::NOT_JUDGED` when it did not judge it
    /// (`flow::JUDGED_BEFORE`: a hairpin judged in `from_pod`).
    #[inline(always)]
    pub fn judged(&self) -> u8 {
        self.judged.get()
    }

    /// The point (`POL_DIR_*`) whose verdict [`Gate::judged`] is, and the destination address
    /// and port it judged; meaningful once judged.
    #[inline(always)]
    pub fn judged_at(&self) -> (u8, u32, u16) {
        (
            self.judged_point.get(),
            self.judged_daddr.get(),
            self.judged_dport.get(),
        )
    }

    /// Notes that policy judged this packet before (a hairpin bounced back by `from_pod`).
    #[inline(always)]
    pub fn note_judged_before(&self) {
        self.judged.set(ferrovia_common::flow::JUDGED_BEFORE);
    }

    /// The sending pod's egress point (`from_pod`).
    #[inline(always)]
    pub fn egress(&self, flow: &Flow) -> bool {
        !self.enabled || self.judge(Point::Egress, flow, false)
    }

    /// The receiving pod's ingress point (`to_pod`); `from_host`: the packet was sent by the
    /// node itself, which upstream always allows.
    #[inline(always)]
    pub fn ingress(&self, flow: &Flow, from_host: bool) -> bool {
        !self.enabled || self.judge(Point::Ingress, flow, from_host)
    }

    /// A pod reaching itself through a service on the per-packet path: both its egress and
    /// its ingress judge the flow here, with real addresses (the packet is then bounced back
    /// into the pod, marked so that `to_pod` does not judge it again with the VIP as source).
    #[inline(always)]
    pub fn hairpin(&self, flow: &Flow) -> bool {
        !self.enabled
            || (self.judge(Point::Egress, flow, false) && self.judge(Point::Ingress, flow, false))
    }

    #[inline(always)]
    fn judge(&self, point: Point, flow: &Flow, from_host: bool) -> bool {
        let (subject, dir) = match point {
            Point::Egress => (flow.saddr, POL_DIR_EGRESS),
            Point::Ingress => (flow.daddr, POL_DIR_INGRESS),
        };
        let endpoint = EndpointKey {
            addr: [subject, 0, 0, 0],
            family: FAMILY_V4,
            _pad: [0; 3],
        };
        // SAFETY: value copied out at once; the agent replaces entries whole.
        let policy = unsafe { POLICY_PODS.get(&endpoint).copied() }.unwrap_or_default();
        let reason = if !point.isolated(&policy) {
            if flow.frag != FRAG_LATER {
                self.track(point, flow, from_host, point.other().isolated(&policy));
            }
            verdict::ALLOW_NOT_ISOLATED
        } else if flow.frag == FRAG_LATER {
            // No ports to judge: the fragment follows its first fragment's verdict.
            if POLICY_FRAGS.get_ptr(&frag_key(point, flow)).is_some() {
                verdict::ALLOW_ESTABLISHED
            } else {
                verdict::DENY_NO_RULE
            }
        } else {
            let reason = self.decide(point, &policy, flow, from_host);
            if flow.frag == FRAG_FIRST && verdict::allows(reason) {
                let _ = POLICY_FRAGS.insert(&frag_key(point, flow), &0, 0);
            }
            reason
        };
        self.judged_point.set(dir);
        self.judged_daddr.set(flow.daddr);
        self.judged_dport.set(flow.dport);
        self.record(subject, dir, reason)
    }

    /// The verdict at an isolating point: a reply of a flow the pod's other point allowed,
    /// an established flow judged under the current epoch, or the rules.
    #[inline(always)]
    fn decide(&self, point: Point, policy: &EndpointPolicy, flow: &Flow, from_host: bool) -> u8 {
        let (here, there) = point.ct_dirs();
        let now = now_ns();
        let back = flow.reversed();
        let back_key = back.key(there);
        if let Some(entry) = POLICY_CT.get_ptr_mut(&back_key) {
            // SAFETY: valid map value; racing writers only touch age, flags and epoch.
            let entry = unsafe { &mut *entry };
            if alive(entry, flow, now) {
                if entry.epoch == self.epoch || entry.flags & POL_CT_FLAG_HOST != 0 {
                    return verdict::ALLOW_REPLY;
                }
                // Judged again where it was allowed: the other point, same pod.
                if verdict::allows(rules(point.other(), policy, &back)) {
                    entry.epoch = self.epoch;
                    return verdict::ALLOW_REPLY;
                }
                // Not a reply of an allowed flow now: judged as what it is below. The entry
                // stays (it expires on its own), so replies resume if the flow is allowed again.
            }
        }
        let key = flow.key(here);
        if let Some(entry) = POLICY_CT.get_ptr_mut(&key) {
            // SAFETY: as above.
            let entry = unsafe { &mut *entry };
            if alive(entry, flow, now) && entry.epoch == self.epoch {
                return verdict::ALLOW_ESTABLISHED;
            }
        }
        let reason = if from_host {
            verdict::ALLOW_HOST
        } else {
            rules(point, policy, flow)
        };
        // A denied flow's entry stays, stale (it expires on its own; an allowed packet
        // rewrites it): it still tells the pod's other point that the peer opened this
        // connection. Removed, the pod's next packet of it (a retransmission, an ACK) would be
        // remembered there as a flow the pod opened, and the peer's packets would pass as its
        // replies: the cut connection revived.
        if verdict::allows(reason) {
            self.remember(&key, flow, from_host, now);
        }
        reason
    }

    /// A pod that this point does not isolate: every flow passes, but is remembered so that
    /// its replies still pass once the pod is isolated on the other side (a policy change must
    /// not break an allowed established connection). A flow is first looked up as a reply (of
    /// one the other point remembered): a reply must not be remembered as a flow of its own,
    /// or the peer's later packets would pass as its "replies".
    ///
    /// Cheap where nothing needs it: while the pod is not isolated on the other side either,
    /// a TCP connection is remembered at its SYN and its later packets cost no lookup. Once
    /// the other side is isolated, every packet is looked up, so that a connection whose
    /// entry is missing (evicted, or older than enforcement) is remembered again on its next
    /// packet from this side.
    #[inline(always)]
    fn track(&self, point: Point, flow: &Flow, from_host: bool, other_isolated: bool) {
        let (here, there) = point.ct_dirs();
        let key = flow.key(here);
        let tcp = flow.proto == PROTO_TCP;
        if tcp && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            self.remember(&key, flow, from_host, now_ns());
            return;
        }
        if tcp && !other_isolated {
            return;
        }
        let now = now_ns();
        if let Some(entry) = POLICY_CT.get_ptr_mut(&flow.reversed().key(there)) {
            // SAFETY: valid map value; racing writers only touch age, flags and epoch.
            if alive(unsafe { &mut *entry }, flow, now) {
                return;
            }
        }
        if let Some(entry) = POLICY_CT.get_ptr_mut(&key) {
            // SAFETY: valid map value; racing writers only touch age, flags and epoch.
            let entry = unsafe { &mut *entry };
            if alive(entry, flow, now) {
                entry.epoch = self.epoch;
                return;
            }
        }
        self.remember(&key, flow, from_host, now);
    }

    /// Records an allowed flow under the current epoch.
    #[inline(always)]
    fn remember(&self, key: &CtKey, flow: &Flow, from_host: bool, now: u64) {
        let mut flags = 0;
        if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            flags |= CT_FLAG_CLOSING;
        }
        if from_host {
            flags |= POL_CT_FLAG_HOST;
        }
        let value = PolicyCtValue {
            epoch: self.epoch,
            flags,
            _pad: 0,
            last_seen_ns: now,
        };
        // Best effort: an LRU insert fails only under memory pressure; the verdict stands
        // (a reply would then be judged on its own).
        let _ = POLICY_CT.insert(key, &value, 0);
    }

    /// Counts the verdict for the pod; whether it lets the packet through.
    #[inline(always)]
    fn record(&self, subject: u32, dir: u8, reason: u8) -> bool {
        let allowed = verdict::allows(reason);
        self.judged.set(reason);
        let key = VerdictKey {
            addr: [subject, 0, 0, 0],
            family: FAMILY_V4,
            dir,
            reason,
            _pad: 0,
        };
        if let Some(value) = POLICY_VERDICTS.get_ptr_mut(&key) {
            // SAFETY: per-CPU value, no other writer on this CPU while we run.
            unsafe {
                (*value).packets += 1;
                (*value).bytes += self.len;
            }
        } else {
            let value = VerdictValue {
                packets: 1,
                bytes: self.len,
            };
            let _ = POLICY_VERDICTS.insert(&key, &value, 0);
        }
        if !allowed {
            count(counter::DROP_POLICY);
            self.note_drop(drop::POLICY);
        }
        allowed
    }
}

#[derive(Clone, Copy)]
enum Point {
    Egress,
    Ingress,
}

impl Point {
    /// `POLICY_CT` directions: (flows allowed here, flows allowed at the pod's other point).
    #[inline(always)]
    fn ct_dirs(self) -> (u8, u8) {
        match self {
            Self::Egress => (POL_CT_EGRESS, POL_CT_INGRESS),
            Self::Ingress => (POL_CT_INGRESS, POL_CT_EGRESS),
        }
    }

    #[inline(always)]
    fn isolated(self, policy: &EndpointPolicy) -> bool {
        let bit = match self {
            Self::Egress => POL_ISOLATED_EGRESS,
            Self::Ingress => POL_ISOLATED_INGRESS,
        };
        policy.flags & bit != 0
    }

    #[inline(always)]
    fn other(self) -> Self {
        match self {
            Self::Egress => Self::Ingress,
            Self::Ingress => Self::Egress,
        }
    }
}

/// The rules of a local pod (its `policy`) for `flow` at `point`: a `verdict` reason.
#[inline(always)]
fn rules(point: Point, policy: &EndpointPolicy, flow: &Flow) -> u8 {
    if !point.isolated(policy) {
        return verdict::ALLOW_NOT_ISOLATED;
    }
    let (dir, peer) = match point {
        Point::Egress => (POL_DIR_EGRESS, flow.daddr),
        Point::Ingress => (POL_DIR_INGRESS, flow.saddr),
    };
    let peer_key = Key::new(
        PEER_KEY_FIXED_BITS + 32,
        PolicyPeerKey {
            class_id: policy.class_id,
            dir,
            family: FAMILY_V4,
            _pad: 0,
            addr: [peer, 0, 0, 0],
        },
    );
    let Some(peer) = POLICY_PEERS.get(&peer_key).copied() else {
        return verdict::DENY_NO_RULE;
    };
    if peer.portset_id == 0 {
        return peer.reason as u8;
    }
    let port_key = Key::new(
        PORT_KEY_FIXED_BITS + 16,
        PolicyPortKey {
            portset_id: peer.portset_id,
            proto: flow.proto,
            _pad: 0,
            port: flow.dport,
        },
    );
    if POLICY_PORTS.get(&port_key).is_some() {
        verdict::ALLOW_RULE
    } else {
        verdict::DENY_PORT
    }
}

/// The `POLICY_FRAGS` key of a flow's fragments at one point.
#[inline(always)]
fn frag_key(point: Point, flow: &Flow) -> FragKey {
    FragKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        ip_id: flow.ip_id,
        proto: flow.proto,
        point: point.ct_dirs().0,
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// Whether an entry still applies (timeouts as the service conntrack's).
#[inline(always)]
fn alive(entry: &mut PolicyCtValue, flow: &Flow, now: u64) -> bool {
    still_alive(
        &mut entry.flags,
        &mut entry.last_seen_ns,
        flow.proto,
        flow.tcp_flags,
        now,
    )
}
