//! Socket-level load balancing on the cgroup v2 sock_addr hooks: a VIP is translated once
//! per connect (or per datagram for unconnected UDP), and translated back for recvmsg and
//! getpeername, so applications see the VIP while packets carry the backend's address.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use ferrovia_common::{
    AffinityKey, FAMILY_NETNS, FAMILY_V4, POL_ISOLATED_EGRESS, POL_ISOLATED_INGRESS, PROTO_TCP,
    PROTO_UDP, ServiceKey, SockFwdValue, SockKey, SockRevNatValue, counter, drop, flow,
};

use crate::{
    events,
    lb::{count_connection, live_backend, lookup_service, select_backend},
    maps::{NETNS_PROBE, POD_NETNS, POLICY_PODS, POLICY_STATE, SOCK_FWD, SOCK_REVNAT, count},
};

/// Verdicts of sock_addr programs: 1 lets the call proceed, 0 fails it (with the errno
/// set by `bpf_set_retval`, else EPERM).
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Which hook runs [`forward`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    Sendmsg,
}

/// How a call to a service without endpoints fails.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// ECONNREFUSED, as kube-proxy's REJECT (`bpf_set_retval`, Linux 5.18+).
    Econnrefused,
    /// The kernel's default for a denied call, EPERM, where `bpf_set_retval` is missing.
    Eperm,
}

/// connect4 / sendmsg4: VIP → backend. Unconnected datagram sockets remember their backend
/// per VIP in `SOCK_FWD` (while it lives), so a UDP "flow" does not hop between backends.
///
/// A UDP `connect()` is left alone: the kernel runs sendmsg4 only for sends that carry an
/// address, so a connected socket translated once would keep a removed backend forever.
/// Its datagrams go to the VIP and the per-packet path balances them, per flow, moving the
/// flow when its backend leaves.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, hook: Hook, refusal: Refusal) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if hook == Hook::Connect && netns_probe(ctx, sa.user_ip4, sa.user_port) {
        // The agent's probe: refused, so it goes nowhere (a UDP connect sends nothing anyway).
        return DENY;
    }
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP || (proto == PROTO_UDP && hook == Hook::Connect) {
        return ALLOW;
    }
    let frontend = ServiceKey {
        addr: [sa.user_ip4, 0, 0, 0],
        port: sa.user_port as u16,
        proto,
        family: FAMILY_V4,
        slot: 0,
        _pad: 0,
    };
    let Some(service) = lookup_service(&frontend) else {
        return ALLOW;
    };
    // SAFETY: helpers valid for sock_addr programs (cookie: 4.12+, netns cookie: 5.7+).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let fwd_key = SockKey {
        cookie,
        addr: frontend.addr,
        port: frontend.port,
        proto,
        family: FAMILY_V4,
        _pad: 0,
    };
    // SAFETY: helper valid for sock_addr programs (5.7+).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let sticky = proto == PROTO_UDP;
    let mut chosen = None;
    if sticky {
        // SAFETY: value copied out at once.
        if let Some(prev) = unsafe { SOCK_FWD.get(&fwd_key).copied() } {
            chosen =
                live_backend(prev.backend_id, service.service_id).map(|b| (prev.backend_id, b));
        }
    }
    let remembered = chosen.is_some();
    if chosen.is_none() {
        // The source address is not chosen yet at connect time: the client pod is known by
        // its network namespace instead.
        let client = AffinityKey {
            client: [netns as u32, (netns >> 32) as u32, 0, 0],
            service_id: service.service_id,
            family: FAMILY_NETNS,
            _pad: [0; 3],
        };
        chosen = select_backend(&frontend, &service, &client);
    }
    let Some((backend_id, backend)) = chosen else {
        count(counter::SOCK_REJECT);
        count_connection(service.service_id, None);
        let vip = (frontend.addr[0], frontend.port);
        events::emit_sock(netns, flow::DROP, proto, vip, vip, drop::NO_ENDPOINTS);
        // As kube-proxy's REJECT would: the caller sees ECONNREFUSED, not a black hole.
        if refusal == Refusal::Econnrefused {
            // SAFETY: cgroup helper (5.18+), sets the errno of the denied call.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
        }
        return DENY;
    };
    if policed_hairpin(netns, backend.addr[0]) {
        // Left to the per-packet path, where policy judges it like any connection.
        return ALLOW;
    }
    if !remembered {
        // A new connection, or a datagram that needed a new backend (not a repeat of an
        // unconnected socket's flow).
        count_connection(service.service_id, Some(backend_id));
        let (vip, to) = (
            (frontend.addr[0], frontend.port),
            (backend.addr[0], backend.port),
        );
        events::emit_sock(netns, flow::TRANSLATE, proto, vip, to, drop::NONE);
    }
    if sticky {
        let value = SockFwdValue {
            backend_id,
            service_id: service.service_id,
        };
        let _ = SOCK_FWD.insert(&fwd_key, &value, 0);
    }
    let rev_key = SockKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        proto,
        family: FAMILY_V4,
        _pad: 0,
    };
    let rev = SockRevNatValue {
        addr: frontend.addr,
        port: frontend.port,
        _pad: 0,
        service_id: service.service_id,
    };
    // Best effort: without it only getpeername/recvmsg would show the backend's address.
    let _ = SOCK_REVNAT.insert(&rev_key, &rev, 0);
    sa.user_ip4 = backend.addr[0];
    sa.user_port = u32::from(backend.port);
    count(counter::SOCK_XLATE);
    ALLOW
}

/// Whether this connect is one of the agent's network-namespace probes (a connect to an
/// address in 0.0.0.0/8, which no packet can be sent to, whose address and port the agent
/// registered in `NETNS_PROBE`): if so, records the caller's namespace cookie there. This is
/// how the agent learns a pod's cookie where the kernel does not tell user space
/// (`SO_NETNS_COOKIE` is Linux 5.14+; `bpf_get_netns_cookie` here is 5.7+). Costs nothing
/// for other connects but a byte comparison.
#[inline(always)]
fn netns_probe(ctx: &SockAddrContext, addr: u32, port: u32) -> bool {
    // Network byte order: the first octet is the lowest byte in memory.
    if addr.to_ne_bytes()[0] != 0 {
        return false;
    }
    let nonce = (u64::from(addr) << 32) | u64::from(port);
    let Some(slot) = NETNS_PROBE.get_ptr_mut(&nonce) else {
        return false;
    };
    // SAFETY: helper valid for sock_addr programs (5.7+); the slot is a live map value.
    unsafe {
        if *slot == 0 {
            *slot = bpf_get_netns_cookie(ctx.as_ptr());
        }
    }
    true
}

/// Whether the caller is a pod that policy isolates and `backend` is the pod itself. Such a
/// hairpin never leaves the pod once translated here (its own address is local), so no tc
/// program would see it: it goes to the VIP untranslated instead, and the per-packet path
/// translates and judges it.
#[inline(always)]
fn policed_hairpin(netns: u64, backend: u32) -> bool {
    if POLICY_STATE.get(0).is_none_or(|s| s.enabled == 0) {
        return false;
    }
    // SAFETY: values copied out at once.
    let Some(pod) = (unsafe { POD_NETNS.get(&netns).copied() }) else {
        return false;
    };
    if pod.addr[0] != backend {
        return false;
    }
    let policy = unsafe { POLICY_PODS.get(&pod).copied() };
    policy.is_some_and(|p| p.flags & (POL_ISOLATED_INGRESS | POL_ISOLATED_EGRESS) != 0)
}

/// recvmsg4 / getpeername4: backend → VIP, for sockets `forward` translated.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockKey {
        cookie,
        addr: [sa.user_ip4, 0, 0, 0],
        port: sa.user_port as u16,
        proto,
        family: FAMILY_V4,
        _pad: 0,
    };
    // SAFETY: value copied out at once.
    if let Some(vip) = unsafe { SOCK_REVNAT.get(&key).copied() } {
        sa.user_ip4 = vip.addr[0];
        sa.user_port = u32::from(vip.port);
    }
    ALLOW
}
