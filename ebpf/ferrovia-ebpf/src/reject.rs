//! Answers for a service without endpoints, as kube-proxy's REJECT gives them: a TCP RST to
//! a SYN, an ICMP port unreachable to a datagram. The packet is rebuilt in place and sent
//! back into the pod; anything that cannot be answered is dropped and counted.
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_csum_diff, bpf_skb_change_tail},
    programs::TcContext,
};
use ferrovia_common::{PROTO_TCP, counter};

use crate::{
    maps::count,
    packet::{ETH_HLEN, Ipv4Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, bounce},
};

const IPPROTO_ICMP: u8 = 1;

/// Internet checksum of `len` bytes (a multiple of 4) at `buf`, plus a 32-bit `seed`.
#[inline(always)]
fn csum(buf: *mut u8, len: u32, seed: u32) -> u16 {
    // SAFETY: `buf` points at `len` bytes of our own stack.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf.cast(), len, seed) } as u64;
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(((sum & 0xffff) + (sum >> 16)) as u16)
}

#[inline(always)]
fn put16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// An IPv4 header without options, checksummed, for a reply from `saddr` to `daddr`
/// (both raw network-order words).
#[inline(always)]
fn ipv4_header(buf: &mut [u8; 20], proto: u8, tot_len: u16, saddr: u32, daddr: u32) {
    buf[0] = 0x45;
    put16(buf, 2, tot_len);
    buf[8] = 64; // TTL
    buf[9] = proto;
    buf[12..16].copy_from_slice(&saddr.to_ne_bytes());
    buf[16..20].copy_from_slice(&daddr.to_ne_bytes());
    let sum = csum(buf.as_mut_ptr(), 20, 0);
    buf[10..12].copy_from_slice(&sum.to_ne_bytes());
}

/// Rejects a packet to a frontend that has no endpoint.
#[inline(always)]
pub fn no_endpoints(ctx: &mut TcContext, pkt: &Ipv4Packet) -> Result<i32, i64> {
    // Only headers without IP options are rebuilt; the rest is rare enough to just drop.
    if pkt.ihl_len == 20 {
        if pkt.proto == PROTO_TCP {
            if pkt.tcp_flags & TCP_RST == 0 {
                return tcp_rst(ctx, pkt);
            }
        } else {
            return icmp_port_unreachable(ctx, pkt);
        }
    }
    count(counter::DROP_NO_ENDPOINTS);
    Ok(TC_ACT_SHOT as i32)
}

/// RFC 9293 3.10.7.1: to a segment without ACK answer `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><RST,ACK>`,
/// to one with ACK answer `<SEQ=SEG.ACK><RST>`.
#[inline(always)]
fn tcp_rst(ctx: &mut TcContext, pkt: &Ipv4Packet) -> Result<i32, i64> {
    let l4 = pkt.l4_off;
    let seq = u32::from_be(ctx.load::<u32>(l4 + 4)?);
    let ack = u32::from_be(ctx.load::<u32>(l4 + 8)?);
    let doff = usize::from(ctx.load::<u8>(l4 + 12)? >> 4) * 4;
    let tot_len = usize::from(u16::from_be(ctx.load::<u16>(ETH_HLEN + 2)?));
    let macs: [u8; 12] = ctx.load(0)?;

    // Pseudo header (12 bytes) followed by the TCP header (20 bytes), summed together.
    let mut seg = [0u8; 32];
    seg[0..4].copy_from_slice(&pkt.daddr.to_ne_bytes());
    seg[4..8].copy_from_slice(&pkt.saddr.to_ne_bytes());
    seg[9] = PROTO_TCP;
    put16(&mut seg, 10, 20);
    let tcp = &mut seg[12..32];
    tcp[0..2].copy_from_slice(&pkt.dport.to_ne_bytes());
    tcp[2..4].copy_from_slice(&pkt.sport.to_ne_bytes());
    if pkt.tcp_flags & TCP_ACK != 0 {
        tcp[4..8].copy_from_slice(&ack.to_be_bytes());
        tcp[13] = TCP_RST;
    } else {
        let payload = tot_len.saturating_sub(pkt.ihl_len + doff) as u32;
        let mut seg_len = payload;
        if pkt.tcp_flags & TCP_SYN != 0 {
            seg_len += 1;
        }
        if pkt.tcp_flags & TCP_FIN != 0 {
            seg_len += 1;
        }
        tcp[8..12].copy_from_slice(&seq.wrapping_add(seg_len).to_be_bytes());
        tcp[13] = TCP_RST | TCP_ACK;
    }
    tcp[12] = 5 << 4;
    let sum = csum(seg.as_mut_ptr(), 32, 0);
    seg[28..30].copy_from_slice(&sum.to_ne_bytes());

    let mut frame = [0u8; ETH_HLEN + 40];
    frame[0..12].copy_from_slice(&macs);
    put16(&mut frame, 12, crate::packet::ETH_P_IP);
    let mut ip = [0u8; 20];
    ipv4_header(&mut ip, PROTO_TCP, 40, pkt.daddr, pkt.saddr);
    frame[ETH_HLEN..ETH_HLEN + 20].copy_from_slice(&ip);
    frame[ETH_HLEN + 20..].copy_from_slice(&seg[12..32]);
    // SAFETY: plain helper on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, frame.len() as u32, 0) } != 0 {
        count(counter::DROP_NO_ENDPOINTS);
        return Ok(TC_ACT_SHOT as i32);
    }
    ctx.store(0, &frame, 0)?;
    count(counter::REJECT_TCP_RST);
    // The MACs were stored as received: `bounce` swaps them.
    bounce(ctx)
}

/// ICMP destination unreachable / port unreachable (RFC 792), quoting the IP header and the
/// first 8 bytes of the datagram, from the VIP so the client's socket matches it.
#[inline(always)]
fn icmp_port_unreachable(ctx: &mut TcContext, pkt: &Ipv4Packet) -> Result<i32, i64> {
    const QUOTE: usize = 28;
    let macs: [u8; 12] = ctx.load(0)?;
    // Room for the new IP + ICMP headers between Ethernet and the original IP header.
    ctx.adjust_room(QUOTE as i32, BPF_ADJ_ROOM_MAC, 0)?;
    // SAFETY: plain helper on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + 2 * QUOTE) as u32, 0) } != 0 {
        count(counter::DROP_NO_ENDPOINTS);
        return Ok(TC_ACT_SHOT as i32);
    }
    let mut icmp = [0u8; 8 + QUOTE];
    icmp[0] = 3; // destination unreachable
    icmp[1] = 3; // port unreachable
    let quoted: [u8; QUOTE] = ctx.load(ETH_HLEN + QUOTE)?;
    icmp[8..].copy_from_slice(&quoted);
    let sum = csum(icmp.as_mut_ptr(), (8 + QUOTE) as u32, 0);
    icmp[2..4].copy_from_slice(&sum.to_ne_bytes());

    let mut head = [0u8; ETH_HLEN + 28];
    head[0..12].copy_from_slice(&macs);
    put16(&mut head, 12, crate::packet::ETH_P_IP);
    let mut ip = [0u8; 20];
    ipv4_header(
        &mut ip,
        IPPROTO_ICMP,
        (20 + 8 + QUOTE) as u16,
        pkt.daddr,
        pkt.saddr,
    );
    head[ETH_HLEN..ETH_HLEN + 20].copy_from_slice(&ip);
    head[ETH_HLEN + 20..].copy_from_slice(&icmp[0..8]);
    ctx.store(0, &head, 0)?;
    count(counter::REJECT_ICMP);
    bounce(ctx)
}
