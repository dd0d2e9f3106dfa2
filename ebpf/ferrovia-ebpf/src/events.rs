//! Flow events (`FLOW_EVENTS`): a packet at a pod's interface that started a flow or was
//! dropped, with the verdict that judged it, for the agent's `Flows` stream. Rate-limited per
//! pod and CPU (`FLOW_LIMIT`, a token bucket the agent configures in `FLOW_CONFIG`), so that a
//! flood at one pod costs the agent a bounded number of events; the events a pod's bucket
//! suppressed are counted and carried by its next event.
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    programs::TcContext,
};
use ferrovia_common::{FlowEvent, POL_DIR_EGRESS, counter, flow, verdict};

use crate::{
    maps::{FLOW_CONFIG, FLOW_EVENTS, FLOW_LIMIT, POD_NETNS, count},
    packet::{IP_DADDR_OFF, Ipv4Packet},
    policy::Gate,
};

/// Offset of the destination port in the TCP/UDP header.
const L4_DPORT_OFF: usize = 2;

/// Emits a `kind` event for the packet seen at `ifindex` in direction `dir`, if the pod's
/// bucket has credit: its destination as policy judged it (after translation), or, with
/// policy off, as the per-packet path rewrote it (a new connection leaving the pod).
#[inline(always)]
pub fn emit(ctx: &TcContext, ifindex: u32, dir: u8, pkt: &Ipv4Packet, kind: u8, gate: &Gate) {
    let judged = gate.judged();
    if judged == flow::JUDGED_BEFORE && kind == flow::NEW {
        // A hairpin bounced back into the pod: its event came from `from_pod`.
        return;
    }
    // SAFETY: helper without side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(suppressed) = admit(ifindex, now) else {
        return;
    };
    let Some(mut entry) = FLOW_EVENTS.reserve(0) else {
        count(counter::FLOW_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    let (point, daddr, dport) = gate.judged_at();
    let by_policy = judged < verdict::COUNT;
    // SAFETY: `ev` points to a reserved, writable record of the ring buffer of our size;
    // every field is written before it is submitted.
    unsafe {
        (*ev).ts_ns = now;
        (*ev).ifindex = ifindex;
        (*ev).suppressed = suppressed;
        (*ev).saddr = pkt.saddr;
        (*ev).daddr = pkt.daddr;
        (*ev).sport = pkt.sport;
        (*ev).dport = pkt.dport;
        (*ev).proto = pkt.proto;
        (*ev).dir = dir;
        (*ev).kind = kind;
        (*ev).drop = gate.dropped();
        if by_policy {
            // Where the flow goes as policy judged it: after translation, before any rewrite
            // (a denied flow is not rewritten).
            (*ev).verdict = judged;
            (*ev).policy_dir = point;
            (*ev).xaddr = daddr;
            (*ev).xport = dport;
        } else {
            (*ev).verdict = flow::NOT_JUDGED;
            (*ev).policy_dir = dir;
            (*ev).xaddr = pkt.daddr;
            (*ev).xport = pkt.dport;
            if kind == flow::NEW && dir == POL_DIR_EGRESS {
                // Policy off: where the rewrite sent it, read straight into the record (no
                // stack). A failed read zeroes the field.
                let skb = ctx.skb.skb.cast();
                let _ =
                    bpf_skb_load_bytes(skb, IP_DADDR_OFF as u32, (&raw mut (*ev).xaddr).cast(), 4);
                let _ = bpf_skb_load_bytes(
                    skb,
                    (pkt.l4_off + L4_DPORT_OFF) as u32,
                    (&raw mut (*ev).xport).cast(),
                    2,
                );
            }
        }
    }
    entry.submit(0);
}

/// Emits a socket hook's event (`flow::TRANSLATE`, or `flow::DROP` for a refusal): the
/// calling namespace's pod as the source, `daddr:dport` the VIP, `xaddr:xport` the backend.
/// The socket hooks share one bucket per CPU (`flow::SOCKET_BUCKET`).
#[inline(always)]
pub fn emit_sock(netns: u64, kind: u8, proto: u8, vip: (u32, u16), backend: (u32, u16), why: u8) {
    // SAFETY: helper without side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(suppressed) = admit(flow::SOCKET_BUCKET, now) else {
        return;
    };
    // SAFETY: value copied out at once.
    let saddr = unsafe { POD_NETNS.get(&netns) }.map_or(0, |pod| pod.addr[0]);
    let ev = FlowEvent {
        ts_ns: now,
        ifindex: 0,
        suppressed,
        saddr,
        daddr: vip.0,
        xaddr: backend.0,
        sport: 0,
        dport: vip.1,
        xport: backend.1,
        proto,
        dir: POL_DIR_EGRESS,
        kind,
        verdict: flow::NOT_JUDGED,
        drop: why,
        policy_dir: POL_DIR_EGRESS,
    };
    if FLOW_EVENTS.output(&ev, 0).is_err() {
        count(counter::FLOW_LOST);
    }
}

/// Takes one event's credit from the pod's bucket on this CPU: `Some(events suppressed
/// before)` when it had it, `None` (and one more suppressed) when not, or when the interface
/// has no bucket or events are off.
#[inline(always)]
fn admit(ifindex: u32, now: u64) -> Option<u32> {
    let cfg = FLOW_CONFIG.get(0)?;
    let (interval, burst) = (cfg.interval_ns, cfg.burst_ns);
    if interval == 0 {
        return None;
    }
    let limit = FLOW_LIMIT.get_ptr_mut(&ifindex)?;
    // SAFETY: this CPU's copy of a live per-CPU value; tc runs with bottom halves off.
    let limit = unsafe { &mut *limit };
    let credit = limit
        .credit_ns
        .saturating_add(now.saturating_sub(limit.last_ns))
        .min(burst);
    limit.last_ns = now;
    if credit < interval {
        limit.credit_ns = credit;
        limit.suppressed = limit.suppressed.saturating_add(1);
        count(counter::FLOW_SUPPRESSED);
        return None;
    }
    limit.credit_ns = credit - interval;
    let suppressed = limit.suppressed;
    limit.suppressed = 0;
    Some(suppressed)
}
