//! Ethernet/IPv4/TCP/UDP parsing and in-place rewriting through the skb helpers
//! (`bpf_skb_load_bytes`, `bpf_skb_store_bytes`, `bpf_l3/l4_csum_replace`), which keep
//! checksums right for every `ip_summed` state, CHECKSUM_PARTIAL from a veth included.
use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
use ferrovia_common::{Addr, PROTO_TCP, PROTO_UDP, counter};

use crate::maps::count;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

// include/uapi/linux/bpf.h
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the data path needs of an IPv4 packet. Addresses and ports are kept as the raw
/// network-order words read from the packet, the same encoding the maps use.
#[derive(Clone, Copy)]
pub struct Ipv4Packet {
    pub ihl_len: usize,
    pub l4_off: usize,
    /// The IP header's total length (L3 bytes, for counters).
    pub tot_len: u16,
    /// A complete, unfragmented TCP or UDP packet: the services may translate it. Anything
    /// else (ICMP, SCTP, fragments) is only judged by policy, with ports 0 when it has none.
    pub translatable: bool,
    /// `FRAG_NONE`, `FRAG_FIRST` (has the L4 header) or `FRAG_LATER` (no ports).
    pub frag: u8,
    /// The IP identification (network order): ties a datagram's fragments together.
    pub ip_id: u16,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
}

impl Ipv4Packet {
    #[inline(always)]
    pub fn src(&self) -> Addr {
        [self.saddr, 0, 0, 0]
    }

    #[inline(always)]
    pub fn dst(&self) -> Addr {
        [self.daddr, 0, 0, 0]
    }

    #[inline(always)]
    fn l4_csum_off(&self) -> usize {
        self.l4_off + if self.proto == PROTO_TCP { 16 } else { 6 }
    }

    #[inline(always)]
    fn l4_csum_flags(&self) -> u64 {
        // A zero UDP checksum means "none" and must stay zero.
        if self.proto == PROTO_UDP {
            BPF_F_MARK_MANGLED_0
        } else {
            0
        }
    }
}

/// Why a packet is not for us. `Malformed` is counted; `NotIp` is not.
pub enum Skip {
    NotIp,
    Malformed,
}

const PROTO_SCTP: u8 = 132;

pub const FRAG_NONE: u8 = 0;
pub const FRAG_FIRST: u8 = 1;
pub const FRAG_LATER: u8 = 2;

/// Parses Ethernet + IPv4 (+ TCP/UDP/SCTP ports). Non-IPv4 frames and truncated or
/// inconsistent headers are reported as a reason to leave the packet untouched; fragments are
/// counted and returned without ports.
#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Result<Ipv4Packet, Skip> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| Skip::NotIp)?);
    if ethertype != ETH_P_IP {
        return Err(Skip::NotIp);
    }
    let ver_ihl: u8 = ctx.load(ETH_HLEN).map_err(|_| Skip::Malformed)?;
    let ihl_len = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl_len < 20 {
        return Err(Skip::Malformed);
    }
    let tot_len = usize::from(u16::from_be(
        ctx.load::<u16>(ETH_HLEN + 2).map_err(|_| Skip::Malformed)?,
    ));
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).map_err(|_| Skip::Malformed)?);
    let proto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| Skip::Malformed)?;
    if tot_len < ihl_len || ETH_HLEN + tot_len > ctx.len() as usize {
        return Err(Skip::Malformed);
    }
    let mut pkt = Ipv4Packet {
        ihl_len,
        l4_off: ETH_HLEN + ihl_len,
        tot_len: tot_len as u16,
        translatable: false,
        frag: FRAG_NONE,
        ip_id: ctx.load(ETH_HLEN + 4).map_err(|_| Skip::Malformed)?,
        proto,
        saddr: ctx.load(IP_SADDR_OFF).map_err(|_| Skip::Malformed)?,
        daddr: ctx.load(IP_DADDR_OFF).map_err(|_| Skip::Malformed)?,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
    };
    // More-fragments flag or a fragment offset: no complete L4 packet to translate; only the
    // first fragment has ports.
    if frag & 0x3fff != 0 {
        count(counter::FRAGMENT);
        if frag & 0x1fff != 0 {
            pkt.frag = FRAG_LATER;
            return Ok(pkt);
        }
        pkt.frag = FRAG_FIRST;
    }
    let l4_len = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        PROTO_SCTP => 12,
        _ => return Ok(pkt),
    };
    if tot_len < ihl_len + l4_len {
        return Err(Skip::Malformed);
    }
    pkt.sport = ctx.load(pkt.l4_off).map_err(|_| Skip::Malformed)?;
    pkt.dport = ctx.load(pkt.l4_off + 2).map_err(|_| Skip::Malformed)?;
    if proto == PROTO_TCP {
        pkt.tcp_flags = ctx
            .load::<u8>(pkt.l4_off + 13)
            .map_err(|_| Skip::Malformed)?;
    }
    pkt.translatable = proto != PROTO_SCTP && pkt.frag == FRAG_NONE;
    Ok(pkt)
}

/// Counts a skipped packet under its reason.
#[inline(always)]
pub fn count_skip(skip: &Skip) {
    match skip {
        Skip::NotIp => {}
        Skip::Malformed => count(counter::MALFORMED),
    }
}

/// Rewrites one IPv4 address (at `off`) and fixes the IP and L4 (pseudo-header) checksums.
#[inline(always)]
pub fn set_addr(
    ctx: &mut TcContext,
    pkt: &Ipv4Packet,
    off: usize,
    old: u32,
    new: u32,
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        pkt.l4_csum_off(),
        u64::from(old),
        u64::from(new),
        BPF_F_PSEUDO_HDR | pkt.l4_csum_flags() | 4,
    )?;
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)?;
    ctx.store(off, &new, 0)
}

/// Rewrites one L4 port (`off` 0 = source, 2 = destination) and fixes the L4 checksum.
#[inline(always)]
pub fn set_port(
    ctx: &mut TcContext,
    pkt: &Ipv4Packet,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        pkt.l4_csum_off(),
        u64::from(old),
        u64::from(new),
        pkt.l4_csum_flags() | 2,
    )?;
    ctx.store(pkt.l4_off + off, &new, 0)
}

/// `skb->mark` of a packet `from_pod` sends back into the pod (a hairpin that policy has
/// judged with real addresses, or our own reject): `to_pod` lets it through unjudged and
/// clears the mark, rather than judge it with the VIP as its source.
pub const MARK_BOUNCED: u32 = 0xfe7a_0001;

/// Sends the packet back out of the interface it came in on (to the pod), swapping the
/// Ethernet addresses so the pod accepts it as coming from its gateway.
#[inline(always)]
pub fn bounce(ctx: &mut TcContext) -> Result<i32, i64> {
    ctx.set_mark(MARK_BOUNCED);
    let dst: [u8; 6] = ctx.load(0)?;
    let src: [u8; 6] = ctx.load(6)?;
    ctx.store(0, &src, 0)?;
    ctx.store(6, &dst, 0)?;
    // SAFETY: plain helper call on our own skb's ingress interface.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
