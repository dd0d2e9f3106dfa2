//! The per-packet path: conntrack lookups and the translations they carry.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use ferrovia_common::{
    AffinityKey, CT_DIR_IN, CT_DIR_OUT, CT_FLAG_CLOSING, CT_FLAG_HAIRPIN, CtKey, CtValue,
    FAMILY_V4, PROTO_TCP, ServiceKey, age_ns, counter, ct_timeout_ns, drop,
};

use crate::{
    lb::{count_connection, live_backend, lookup_service, select_backend},
    maps::{CONNTRACK, count},
    packet::{
        IP_DADDR_OFF, IP_SADDR_OFF, Ipv4Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, bounce,
        set_addr, set_port,
    },
    policy::{Flow, Gate},
    reject,
};

/// `bpf_map_update_elem` with `BPF_NOEXIST` on a key already in the map.
const EEXIST: i32 = 17;

/// A packet policy dropped: silently, as upstream expects (counted by the gate).
const DENIED: Result<i32, i64> = Ok(aya_ebpf::bindings::TC_ACT_SHOT);

/// The egress judgement of a pod's packet towards `server`: a hairpin (the pod reaching
/// itself) is judged whole here, both directions.
#[inline(always)]
fn allowed(gate: &Gate, flow: &Flow, hairpin: bool) -> bool {
    if hairpin {
        gate.hairpin(flow)
    } else {
        gate.egress(flow)
    }
}

/// The clock, read only where an entry is touched: most packets of a pod match no entry,
/// and reading the clock is not free (a VM's clock source can cost tens of ns).
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without side effects.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn ct_key(pkt: &Ipv4Packet, dir: u8) -> CtKey {
    CtKey {
        saddr: pkt.src(),
        daddr: pkt.dst(),
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: FAMILY_V4,
        dir,
        _pad: 0,
    }
}

/// Whether an entry still applies, refreshing its age (at most once a second, to keep
/// cache lines quiet) and noting a FIN/RST so a closed connection is forgotten soon.
#[inline(always)]
fn alive(entry: &mut CtValue, pkt: &Ipv4Packet, now: u64) -> bool {
    still_alive(
        &mut entry.flags,
        &mut entry.last_seen_ns,
        pkt.proto,
        pkt.tcp_flags,
        now,
    )
}

/// [`alive`] on the fields every conntrack value has (the policy conntrack's too).
#[inline(always)]
pub fn still_alive(
    flags: &mut u16,
    last_seen_ns: &mut u64,
    proto: u8,
    tcp_flags: u8,
    now: u64,
) -> bool {
    if age_ns(now, *last_seen_ns) > ct_timeout_ns(*flags, proto) {
        return false;
    }
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // A new connection on the tuple of a closing one: it starts afresh.
        *flags &= !CT_FLAG_CLOSING;
        *last_seen_ns = now;
    }
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        *flags |= CT_FLAG_CLOSING;
    }
    if age_ns(now, *last_seen_ns) > 1_000_000_000 {
        *last_seen_ns = now;
    }
    true
}

/// Client → VIP, translated: destination to the backend, source to `peer_addr` (the VIP
/// itself on hairpin, so the pod does not see a packet from its own address).
#[inline(always)]
fn xlate_out(ctx: &mut TcContext, pkt: &Ipv4Packet, entry: &CtValue) -> Result<i32, i64> {
    set_addr(ctx, pkt, IP_DADDR_OFF, pkt.daddr, entry.xlate_addr[0])?;
    set_port(ctx, pkt, 2, pkt.dport, entry.xlate_port)?;
    set_addr(ctx, pkt, IP_SADDR_OFF, pkt.saddr, entry.peer_addr[0])?;
    if entry.flags & CT_FLAG_HAIRPIN != 0 {
        count(counter::HAIRPIN);
        return bounce(ctx);
    }
    Ok(TC_ACT_OK)
}

/// Backend → client, translated back: source to the VIP and service port, destination to
/// the original client address.
#[inline(always)]
fn xlate_in(
    ctx: &mut TcContext,
    pkt: &Ipv4Packet,
    entry: &CtValue,
    bounce_hairpin: bool,
) -> Result<i32, i64> {
    set_addr(ctx, pkt, IP_SADDR_OFF, pkt.saddr, entry.xlate_addr[0])?;
    set_port(ctx, pkt, 0, pkt.sport, entry.xlate_port)?;
    set_addr(ctx, pkt, IP_DADDR_OFF, pkt.daddr, entry.peer_addr[0])?;
    if bounce_hairpin && entry.flags & CT_FLAG_HAIRPIN != 0 {
        count(counter::HAIRPIN);
        return bounce(ctx);
    }
    Ok(TC_ACT_OK)
}

/// Writes a conntrack entry, counting it as created (`counter::CT_CREATED`) only when its key
/// was not in the map: the agent derives the LRU's evictions from what was created. A key
/// already there (an expired flow's, a re-balanced one's) is overwritten as before.
#[inline(always)]
fn ct_insert(key: &CtKey, value: &CtValue) -> Result<(), i32> {
    match CONNTRACK.insert(key, value, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            count(counter::CT_CREATED);
            Ok(())
        }
        Err(e) if e == -EEXIST => CONNTRACK.insert(key, value, 0),
        Err(e) => Err(e),
    }
}

/// The reverse-NAT entry of a reply of a translated connection, if the tuple is known.
#[inline(always)]
fn reply_entry(pkt: &Ipv4Packet) -> Option<&'static mut CtValue> {
    let entry = CONNTRACK.get_ptr_mut(&ct_key(pkt, CT_DIR_IN))?;
    // SAFETY: valid map value; racing writers only touch age and flags.
    let entry = unsafe { &mut *entry };
    alive(entry, pkt, now_ns()).then_some(entry)
}

/// A reply of a translated connection arriving at the client pod: reverse NAT when the tuple
/// is known (policy has judged the packet as it came, before).
#[inline(always)]
pub fn to_pod(ctx: &mut TcContext, pkt: &Ipv4Packet, gate: &Gate) -> Result<i32, i64> {
    let Some(entry) = reply_entry(pkt) else {
        return Ok(TC_ACT_OK);
    };
    gate.note_reply();
    count(counter::XLATE_CT);
    xlate_in(ctx, pkt, entry, false)
}

/// A packet leaving a pod: an established translated flow, a reply of one (the pod is the
/// backend), or the first packet of a new connection to a VIP. Policy judges each with the
/// real addresses: the client's own and the backend's, never the VIP.
#[inline(always)]
pub fn from_pod(ctx: &mut TcContext, pkt: &Ipv4Packet, gate: &Gate) -> Result<i32, i64> {
    let out_key = ct_key(pkt, CT_DIR_OUT);
    if let Some(entry) = CONNTRACK.get_ptr_mut(&out_key) {
        // SAFETY: valid map value; racing writers only touch age and flags.
        let entry = unsafe { &mut *entry };
        let now = now_ns();
        // UDP has no end: a flow whose backend is gone is re-balanced rather than sent on
        // into the void (the stale-UDP-conntrack problem). An established TCP connection keeps
        // its backend until it ends, so a terminating pod can finish its work; but a new SYN
        // on a reused tuple is a new connection and must not go to a backend that left.
        let new_syn = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let keeps_backend = pkt.proto == PROTO_TCP && !new_syn;
        if alive(entry, pkt, now)
            && (keeps_backend || live_backend(entry.backend_id, entry.service_id).is_some())
        {
            let flow = Flow::to(pkt, entry.xlate_addr[0], entry.xlate_port);
            if !allowed(gate, &flow, entry.flags & CT_FLAG_HAIRPIN != 0) {
                return DENIED;
            }
            count(counter::XLATE_CT);
            return xlate_out(ctx, pkt, entry);
        }
    }
    if let Some(entry) = reply_entry(pkt) {
        // The pod answers as a backend. Only a hairpin is translated back here (it goes
        // straight back into the pod); any other reply goes on as it is, and the client's
        // to_pod translates it after its ingress policy has seen it as it came.
        if entry.flags & CT_FLAG_HAIRPIN == 0 {
            return if gate.egress(&Flow::of(pkt)) {
                Ok(TC_ACT_OK)
            } else {
                DENIED
            };
        }
        if !gate.hairpin(&Flow::to(pkt, entry.peer_addr[0], pkt.dport)) {
            return DENIED;
        }
        count(counter::XLATE_CT);
        return xlate_in(ctx, pkt, entry, true);
    }
    let frontend = ServiceKey {
        addr: pkt.dst(),
        port: pkt.dport,
        proto: pkt.proto,
        family: FAMILY_V4,
        slot: 0,
        _pad: 0,
    };
    let Some(service) = lookup_service(&frontend) else {
        return if gate.egress(&Flow::of(pkt)) {
            Ok(TC_ACT_OK)
        } else {
            DENIED
        };
    };
    let client = AffinityKey {
        client: pkt.src(),
        service_id: service.service_id,
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    let Some((backend_id, backend)) = select_backend(&frontend, &service, &client) else {
        count_connection(service.service_id, None);
        gate.note_drop(drop::NO_ENDPOINTS);
        return reject::no_endpoints(ctx, pkt);
    };
    let hairpin = backend.addr[0] == pkt.saddr;
    if !allowed(gate, &Flow::to(pkt, backend.addr[0], backend.port), hairpin) {
        return DENIED;
    }
    let source = if hairpin { pkt.daddr } else { pkt.saddr };
    let mut flags = if hairpin { CT_FLAG_HAIRPIN } else { 0 };
    if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        flags |= CT_FLAG_CLOSING;
    }
    let now = now_ns();
    // Reply entry first: once the first packet is out, its answer must find its way back.
    let in_key = CtKey {
        saddr: backend.addr,
        daddr: [source, 0, 0, 0],
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        family: FAMILY_V4,
        dir: CT_DIR_IN,
        _pad: 0,
    };
    let in_value = CtValue {
        xlate_addr: pkt.dst(),
        peer_addr: pkt.src(),
        xlate_port: pkt.dport,
        flags,
        backend_id,
        service_id: service.service_id,
        _pad: 0,
        last_seen_ns: now,
    };
    let out_value = CtValue {
        xlate_addr: backend.addr,
        peer_addr: [source, 0, 0, 0],
        xlate_port: backend.port,
        ..in_value
    };
    if ct_insert(&in_key, &in_value).is_err() || ct_insert(&out_key, &out_value).is_err() {
        count(counter::DROP_CT_FULL);
        gate.note_drop(drop::CT_FULL);
        return Ok(aya_ebpf::bindings::TC_ACT_SHOT);
    }
    count(counter::XLATE_NEW);
    count_connection(service.service_id, Some(backend_id));
    xlate_out(ctx, pkt, &out_value)
}
