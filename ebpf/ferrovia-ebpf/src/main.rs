//! ferrovia's BPF programs. Each entry point is thin: parse, call the logic, and choose the
//! verdict in one place.
//!
//! - `from_pod` / `to_pod`: tc on a pod's host-side interface (its ingress / egress), the
//!   per-packet service translation with conntrack and reverse NAT, and NetworkPolicy: the
//!   pod's egress rules in `from_pod`, its ingress rules in `to_pod`.
//! - `sock4_*`: cgroup v2 sock_addr hooks, socket-level service translation.
#![no_std]
#![no_main]

mod conntrack;
mod events;
mod lb;
mod maps;
mod packet;
mod policy;
mod reject;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};
use ferrovia_common::{POL_DIR_EGRESS, POL_DIR_INGRESS, counter, drop};

use crate::{
    maps::count,
    policy::{Flow, Gate},
};

/// Packets from the pod (tc ingress of its host-side interface): service translation, then
/// the pod's egress policy on the translated flow.
///
/// Inlined into the entry point the macro generates: one frame less in the verifier's
/// 512-byte bound on a call chain's stack (the entry, this body, `memset`).
#[classifier]
#[inline(always)]
pub fn from_pod(mut ctx: TcContext) -> i32 {
    let wire = stats::Wire::of(&ctx);
    match packet::parse_ipv4(&ctx) {
        Ok(pkt) => {
            let gate = Gate::current(&pkt);
            let result = if pkt.translatable {
                conntrack::from_pod(&mut ctx, &pkt, &gate)
            } else {
                Ok(pass_if(gate.egress(&Flow::of(&pkt))))
            };
            let action = verdict(result, &gate);
            stats::account(&ctx, wire, POL_DIR_EGRESS, &pkt, action, &gate);
            action
        }
        Err(skip) => unparsed(wire, POL_DIR_EGRESS, &skip),
    }
}

/// Packets to the pod (tc egress of its host-side interface): the pod's ingress policy on the
/// packet as it came, then reverse NAT of replies.
#[classifier]
#[inline(always)]
pub fn to_pod(mut ctx: TcContext) -> i32 {
    let wire = stats::Wire::of(&ctx);
    match packet::parse_ipv4(&ctx) {
        Ok(pkt) => {
            // SAFETY: plain reads of our own skb.
            let (mark, ingress_ifindex) =
                unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ingress_ifindex) };
            let judged = mark == packet::MARK_BOUNCED;
            if judged {
                ctx.set_mark(0);
            }
            // After the mark: read first, LLVM reuses the skb field's address for the write,
            // which the verifier refuses ("dereference of modified ctx ptr").
            let gate = Gate::current(&pkt);
            if judged {
                gate.note_judged_before();
            }
            // A packet the node itself sent has not come in through any interface.
            let from_host = ingress_ifindex == 0;
            let result = if !judged && !gate.ingress(&Flow::of(&pkt), from_host) {
                Ok(TC_ACT_SHOT as i32)
            } else if pkt.translatable {
                conntrack::to_pod(&mut ctx, &pkt, &gate)
            } else {
                Ok(TC_ACT_OK as i32)
            };
            let action = verdict(result, &gate);
            stats::account(&ctx, wire, POL_DIR_INGRESS, &pkt, action, &gate);
            action
        }
        Err(skip) => unparsed(wire, POL_DIR_INGRESS, &skip),
    }
}

/// A frame left untouched because it is not IPv4 or its headers did not parse.
#[inline(always)]
fn unparsed(wire: stats::Wire, dir: u8, skip: &packet::Skip) -> i32 {
    packet::count_skip(skip);
    stats::account_unparsed(wire, dir, matches!(skip, packet::Skip::Malformed));
    TC_ACT_OK as i32
}

#[inline(always)]
fn pass_if(allowed: bool) -> i32 {
    if allowed {
        TC_ACT_OK as i32
    } else {
        TC_ACT_SHOT as i32
    }
}

/// A packet whose rewrite failed half-way is dropped (and counted) rather than sent on.
#[inline(always)]
fn verdict(result: Result<i32, i64>, gate: &Gate) -> i32 {
    result.unwrap_or_else(|_| {
        count(counter::DROP_XLATE_ERROR);
        gate.note_drop(drop::XLATE_ERROR);
        TC_ACT_SHOT as i32
    })
}

#[cgroup_sock_addr(connect4)]
pub fn sock4_connect(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, sock::Hook::Connect, sock::Refusal::Econnrefused)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock4_sendmsg(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, sock::Hook::Sendmsg, sock::Refusal::Econnrefused)
}

/// `sock4_connect` for kernels without `bpf_set_retval` (before 5.18): the agent loads it when
/// the verifier refuses the first; a refused connect then fails with EPERM.
#[cgroup_sock_addr(connect4)]
pub fn sock4_conn_old(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, sock::Hook::Connect, sock::Refusal::Eperm)
}

/// `sock4_sendmsg` for kernels without `bpf_set_retval`, as `sock4_conn_old`.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock4_send_old(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, sock::Hook::Sendmsg, sock::Refusal::Eperm)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock4_recvmsg(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock4_getpeer(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
