//! kube-proxy's two netfilter back ends as benchmark baselines: the rule sets it writes for N
//! `ClusterIP` services, and loading them into a node's network namespace the way it does.
//!
//! - [`iptables`]: `--proxy-mode=iptables`, an `iptables-restore` payload (KUBE-SERVICES →
//!   KUBE-SVC-* → KUBE-SEP-*, `statistic --mode random`, DNAT, masquerade marks).
//! - [`nftables`]: `--proxy-mode=nftables`, an `nft -f` transaction on `table ip kube-proxy`
//!   (the `service-ips` verdict map, `numgen random` over endpoint chains).
//! - [`loader`]: running `iptables-restore` / `nft -f -` inside a named network namespace,
//!   timed, and removing the rules again.
//!
//! The model here ([`Svc`]) is deliberately independent of ferrovia's own: it carries exactly
//! what kube-proxy's proxiers read from a Service port and its `EndpointSlice`s, so the
//! generators can be checked against kube-proxy's own expected output.
//!
//! ```no_run
//! use ferrovia_bench::kubeproxy::{self, IptablesBackend, ProxyConfig, Proto, Svc};
//! let cfg = ProxyConfig::new("10.100.0.0/24".parse()?);
//! let mut svcs = vec![Svc {
//!     namespace: "default".into(), name: "web".into(), port_name: "http".into(),
//!     vip: "10.96.0.10".parse()?, port: 80, proto: Proto::Tcp,
//!     endpoints: vec!["10.100.0.2:9376".parse()?],
//! }];
//! svcs.extend(kubeproxy::synthetic(1_000, 10));
//! let took = kubeproxy::load_iptables("node-netns", IptablesBackend::Nft,
//!     &kubeproxy::iptables_restore_input(&svcs, &cfg))?;
//! # anyhow::Ok(())
//! ```

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use data_encoding::BASE32;
use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

pub mod iptables;
pub mod loader;
pub mod nftables;

pub use iptables::restore_input as iptables_restore_input;
pub use loader::{IptablesBackend, flush_iptables, flush_nft, load_iptables, load_nft};
pub use nftables::transaction as nft_input;

/// A service's transport protocol, as kube-proxy spells it in rules and chain names
/// (`strings.ToLower(string(svcInfo.Protocol()))`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One service port with its ready endpoints: what kube-proxy programs per
/// `proxy.ServicePortName` (a Service with two ports is two `Svc`s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Svc {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The port's name (`spec.ports[].name`); may be empty for a single-port Service.
    pub port_name: String,
    /// The `ClusterIP`.
    pub vip: Ipv4Addr,
    /// The service port.
    pub port: u16,
    /// The port's protocol.
    pub proto: Proto,
    /// Ready endpoints (pod IP and target port), in the order kube-proxy would list them.
    pub endpoints: Vec<SocketAddrV4>,
}

impl Svc {
    /// kube-proxy's `ServicePortName.String()`: `namespace/name:port`, or `namespace/name`
    /// when the port is unnamed (`pkg/proxy/types.go`, `fmtPortName`). It names the chains
    /// and is the comment on most rules.
    #[must_use]
    pub fn service_port_name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

/// The node- and cluster-wide kube-proxy settings the generated rules depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `--cluster-cidr` (the `ClusterCIDR` local-traffic detector): traffic to a `ClusterIP`
    /// from outside it is masqueraded, pod-to-service traffic from inside it is not.
    pub cluster_cidr: Ipv4Net,
    /// The cluster's `ServiceCIDR`s. nftables mode drops new connections to unallocated
    /// addresses in them (`cluster-ips-check`); empty leaves that rule out, as kube-proxy
    /// does until it has seen a `ServiceCIDR`.
    pub service_cidrs: Vec<Ipv4Net>,
    /// The node IP that accepts `NodePort` traffic (nftables' `nodeport-ips` set, filled from
    /// `--nodeport-addresses=primary`, the default); `None` leaves the set empty.
    pub node_ip: Option<Ipv4Addr>,
}

impl ProxyConfig {
    /// kube-proxy's defaults with `--cluster-cidr=cluster_cidr`.
    #[must_use]
    pub fn new(cluster_cidr: Ipv4Net) -> Self {
        Self {
            cluster_cidr,
            service_cidrs: Vec::new(),
            node_ip: None,
        }
    }
}

/// The mark kube-proxy sets on packets to masquerade: bit 14, `--iptables-masquerade-bit`
/// / `--nftables-masquerade-bit` default (`pkg/proxy/apis/config`).
pub const MASQUERADE_MARK: u32 = 0x4000;

/// Where [`synthetic`] puts `ClusterIP`s: 198.18.0.0/15, reserved for network benchmarks
/// (RFC 2544). Never routed anywhere, never probed: these services exist only to fill the
/// tables. It is disjoint from the harness's pod subnets (10.100.0.0–10.199.255.255).
pub const SYNTHETIC_VIPS: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(198, 18, 0, 0), 15);

/// Where [`synthetic`] puts endpoint IPs: 100.64.0.0/10, shared address space (RFC 6598).
/// No pod has such an address and nothing ever sends to one.
pub const SYNTHETIC_ENDPOINTS: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10);

/// The service port of synthetic services.
pub const SYNTHETIC_PORT: u16 = 80;

/// The endpoint (target) port of synthetic services.
pub const SYNTHETIC_TARGET_PORT: u16 = 8080;

/// `n` TCP services `bench/svc-<i>:http` with `endpoints` endpoints each, `ClusterIP`s from
/// [`SYNTHETIC_VIPS`] and endpoints from [`SYNTHETIC_ENDPOINTS`], in that order. Pass the
/// service that is actually probed separately, with an address of its own.
///
/// # Panics
/// When the ranges are too small: more than 131,070 services or 4,194,302 endpoints.
#[must_use]
pub fn synthetic(n: usize, endpoints: usize) -> Vec<Svc> {
    synthetic_in(n, endpoints, SYNTHETIC_VIPS, SYNTHETIC_ENDPOINTS)
}

/// [`synthetic`] with the ranges given; VIPs and endpoints are taken from the start of each
/// range, skipping its network address.
///
/// # Panics
/// When `n` services or `n * endpoints` endpoints don't fit in their range.
#[must_use]
pub fn synthetic_in(n: usize, endpoints: usize, vips: Ipv4Net, eps: Ipv4Net) -> Vec<Svc> {
    let host = |net: Ipv4Net, i: usize, what: &str| {
        // Hosts of the range: network address + 1 ..= broadcast - 1.
        let size = 1u64 << (32 - net.prefix_len());
        let i = u64::try_from(i).expect("usize fits u64");
        assert!(
            i + 2 < size,
            "{what} range {net} holds fewer than {i} + 1 hosts"
        );
        Ipv4Addr::from(u32::from(net.network()) + 1 + i as u32)
    };
    (0..n)
        .map(|i| Svc {
            namespace: "bench".to_owned(),
            name: format!("svc-{i}"),
            port_name: "http".to_owned(),
            vip: host(vips, i, "VIP"),
            port: SYNTHETIC_PORT,
            proto: Proto::Tcp,
            endpoints: (0..endpoints)
                .map(|j| {
                    SocketAddrV4::new(
                        host(eps, i * endpoints + j, "endpoint"),
                        SYNTHETIC_TARGET_PORT,
                    )
                })
                .collect(),
        })
        .collect()
}

/// Standard base32 (RFC 4648, Go's `base32.StdEncoding`) of the SHA-256 of `input`: the hash
/// both proxiers put in chain names.
fn hash_base32(input: &str) -> String {
    BASE32.encode(&Sha256::digest(input.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_port_name_matches_kube_proxy() {
        let mut svc = synthetic(1, 1).remove(0);
        assert_eq!(svc.service_port_name(), "bench/svc-0:http");
        svc.port_name.clear();
        assert_eq!(svc.service_port_name(), "bench/svc-0");
    }

    #[test]
    fn synthetic_addresses_are_distinct_and_in_range() {
        let svcs = synthetic(1_000, 10);
        assert_eq!(svcs.len(), 1_000);
        assert_eq!(svcs[0].vip, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(svcs[999].vip, Ipv4Addr::new(198, 18, 3, 232));
        assert_eq!(
            svcs[1].endpoints[0],
            "100.64.0.11:8080".parse::<SocketAddrV4>().unwrap()
        );
        let mut vips: Vec<_> = svcs.iter().map(|s| s.vip).collect();
        let mut eps: Vec<_> = svcs.iter().flat_map(|s| s.endpoints.clone()).collect();
        vips.dedup();
        eps.sort_unstable();
        eps.dedup();
        assert_eq!((vips.len(), eps.len()), (1_000, 10_000));
        assert!(svcs.iter().all(|s| SYNTHETIC_VIPS.contains(&s.vip)));
        assert!(eps.iter().all(|e| SYNTHETIC_ENDPOINTS.contains(e.ip())));
    }

    #[test]
    fn synthetic_fits_the_largest_scale_point() {
        let svcs = synthetic(100_000, 10);
        let last = svcs.last().unwrap();
        assert!(SYNTHETIC_VIPS.contains(&last.vip));
        assert!(SYNTHETIC_ENDPOINTS.contains(last.endpoints.last().unwrap().ip()));
    }

    #[test]
    #[should_panic(expected = "range")]
    fn synthetic_refuses_to_overflow_its_range() {
        let _ = synthetic_in(
            3,
            1,
            "10.0.0.0/30".parse().unwrap(),
            "10.1.0.0/16".parse().unwrap(),
        );
    }
}

/// Test fixtures shared by the iptables and nftables generators' tests, in the shape of
/// kube-proxy's own tests (TCP port `p80` on 80, cluster CIDR 10.0.0.0/8).
#[cfg(test)]
pub(crate) mod fixtures {
    use super::{Proto, ProxyConfig, Svc};

    pub fn svc(ns: &str, name: &str, vip: &str, endpoints: &[&str]) -> Svc {
        Svc {
            namespace: ns.into(),
            name: name.into(),
            port_name: "p80".into(),
            vip: vip.parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    pub fn cfg() -> ProxyConfig {
        ProxyConfig::new("10.0.0.0/8".parse().unwrap())
    }
}
