//! Conversions between `std::net` addresses and the maps' family-neutral encoding
//! (four network-order words, IPv4 in word 0; ports in network byte order).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ferrovia_common::{Addr, FAMILY_V4, FAMILY_V6};

/// The map encoding of `ip`, with its family marker.
#[must_use]
pub fn encode(ip: IpAddr) -> (Addr, u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// The address a map entry encodes.
#[must_use]
pub fn decode(addr: Addr, family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        IpAddr::V4(Ipv4Addr::from(addr[0].to_ne_bytes()))
    }
}

#[must_use]
pub fn decode_sock(addr: Addr, family: u8, port_be: u16) -> SocketAddr {
    SocketAddr::new(decode(addr, family), u16::from_be(port_be))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for ip in ["10.96.0.10", "::1", "fd00::a:b"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (a, f) = encode(ip);
            assert_eq!(decode(a, f), ip);
        }
        // Word 0 holds the bytes in wire order, as the BPF side reads them from packets.
        let (a, _) = encode("1.2.3.4".parse().unwrap());
        assert_eq!(a[0].to_ne_bytes(), [1, 2, 3, 4]);
    }
}
