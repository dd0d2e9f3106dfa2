//! kube-proxy's iptables and nftables layouts, proven with traffic: a node made by the
//! harness with plain `ptp` pod networking and no ferrovia, the generated rules loaded into
//! the node's network namespace, and real TCP/UDP requests through the `ClusterIP` from a
//! client pod. Only the probed service's VIP carries traffic; the synthetic services around
//! it only fill the tables. Needs root, and `cargo build -p ferrovia-tests` (for
//! `ferrovia-echo`).
//!
//! `load_timings` (ignored by default) prints the time to program N services from cold:
//! `cargo test --release -p ferrovia-bench --test kubeproxy -- --ignored --nocapture
//! load_timings`, scale points from `FERROVIA_KP_SCALES` (default `1,1000,10000`), back ends
//! from `FERROVIA_KP_MODES` (default `iptables-nft,iptables-legacy,nft`). Expect
//! iptables-nft at 10,000 services to take many minutes (`--noflush` on 1.8.9).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use ferrovia_bench::kubeproxy::{
    self, IptablesBackend, Proto, ProxyConfig, Svc, flush_iptables, flush_nft, load_iptables,
    load_nft,
};
use ferrovia_tests::{CniMode, Node, NodeOptions, Pod, ProbeResult, ProbeSpec, Server};

/// The probed service's `ClusterIP`: outside the synthetic ranges and the pod subnets.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Its TCP port (`default/web:http`) and UDP port (`default/web:dns`).
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
/// Where the echo servers listen (the target port).
const TARGET_PORT: u16 = 9376;

/// A node without ferrovia, two backends serving TCP and UDP, and a client.
struct Fixture {
    client: Pod,
    backends: [Pod; 2],
    _servers: Vec<Server>,
    node: Node,
}

impl Fixture {
    fn new() -> Self {
        let node = Node::with_options(NodeOptions {
            cni: CniMode::PtpOnly,
            ..NodeOptions::default()
        })
        .expect("node");
        let backends = ["web-a", "web-b"].map(|n| node.add_pod("default", n).expect("pod"));
        let listen = [format!("tcp:{TARGET_PORT}"), format!("udp:{TARGET_PORT}")];
        let listen: Vec<&str> = listen.iter().map(String::as_str).collect();
        let servers = backends
            .iter()
            .map(|p| p.serve(&listen).expect("server"))
            .collect();
        let client = node.add_pod("default", "client").expect("pod");
        Self {
            client,
            backends,
            _servers: servers,
            node,
        }
    }

    fn netns(&self) -> &str {
        self.node.netns()
    }

    /// kube-proxy started with `--cluster-cidr` = the node's pod subnet.
    fn config(&self) -> ProxyConfig {
        ProxyConfig::new(self.node.pod_subnet().parse().expect("pod subnet"))
    }

    /// `default/web` (`http` TCP 80 and `dns` UDP 53 → both backends' 9376), then
    /// `synthetic` never-probed services of 10 endpoints each.
    fn services(&self, synthetic: usize) -> Vec<Svc> {
        let endpoints: Vec<SocketAddrV4> = self
            .backends
            .iter()
            .map(|p| SocketAddrV4::new(p.ip, TARGET_PORT))
            .collect();
        let web = |port_name: &str, port, proto| Svc {
            namespace: "default".into(),
            name: "web".into(),
            port_name: port_name.into(),
            vip: VIP,
            port,
            proto,
            endpoints: endpoints.clone(),
        };
        let mut svcs = vec![
            web("http", TCP_PORT, Proto::Tcp),
            web("dns", UDP_PORT, Proto::Udp),
        ];
        svcs.extend(kubeproxy::synthetic(synthetic, 10));
        svcs
    }

    /// 40 requests of each protocol from the client through the VIP reach both backends,
    /// un-NATed on the way back and seen by the backends from the client's own address
    /// (kube-proxy masquerades only sources outside the cluster CIDR).
    fn assert_balanced(&self, what: &str) {
        for spec in [
            ProbeSpec::tcp((VIP, TCP_PORT)),
            ProbeSpec::udp((VIP, UDP_PORT)),
        ] {
            let spec = spec.count(40);
            let results = self.client.probe(&spec).expect("probe");
            let label = format!("{what}, {:?} to {}", spec.proto, spec.to);
            assert_eq!(results.len(), 40, "{label}: {results:?}");
            assert!(results.iter().all(|r| r.ok), "{label}: {results:#?}");
            assert_eq!(
                servers(&results),
                BTreeSet::from(["web-a", "web-b"]),
                "{label}: not balanced over both backends"
            );
            for r in &results {
                assert_eq!(
                    r.seen_from().map(|a| a.ip()),
                    Some(IpAddr::V4(self.client.ip)),
                    "{label}: in-cluster client was masqueraded: {r:?}"
                );
                assert_eq!(r.peer_addr(), Some(spec.to), "{label}: {r:?}");
            }
            eprintln!("{label}: {:?}", count_by_server(&results));
        }
    }

    /// A backend calling its own service: when the pick is itself, the endpoint chain's
    /// `-s EP -j KUBE-MARK-MASQ` / `ip saddr EP jump mark-for-masquerade` must masquerade
    /// it (else the reply never leaves the pod); when it is the other backend, it must not.
    fn assert_hairpin(&self, what: &str) {
        let me = &self.backends[0];
        let results = me
            .probe(&ProbeSpec::tcp((VIP, TCP_PORT)).count(40))
            .expect("probe");
        assert!(
            results.iter().all(|r| r.ok),
            "{what}: hairpin: {results:#?}"
        );
        for r in &results {
            let from = r.seen_from().map(|a| a.ip());
            if r.server() == Some(me.name.as_str()) {
                assert_ne!(from, Some(IpAddr::V4(me.ip)), "{what}: hairpin not SNATed");
            } else {
                assert_eq!(from, Some(IpAddr::V4(me.ip)), "{what}: {r:?}");
            }
        }
        assert_eq!(
            servers(&results),
            BTreeSet::from(["web-a", "web-b"]),
            "{what}: hairpin"
        );
    }

    /// Once the rules are removed, the VIP leads nowhere.
    fn assert_vip_gone(&self, what: &str) {
        let spec = ProbeSpec::tcp((VIP, TCP_PORT)).timeout(Duration::from_millis(500));
        let results = self.client.probe(&spec).expect("probe");
        assert!(
            results.iter().all(|r| !r.ok),
            "{what}: VIP still answers after flushing: {results:?}"
        );
    }
}

fn servers(results: &[ProbeResult]) -> BTreeSet<&str> {
    results.iter().filter_map(ProbeResult::server).collect()
}

fn count_by_server(results: &[ProbeResult]) -> Vec<(&str, usize)> {
    servers(results)
        .into_iter()
        .map(|s| (s, results.iter().filter(|r| r.server() == Some(s)).count()))
        .collect()
}

/// Loads the iptables layout with `backend`, checks the traffic, removes it again.
fn iptables_end_to_end(backend: IptablesBackend, synthetic: usize) {
    let f = Fixture::new();
    let what = format!("{} + {synthetic} synthetic services", backend.name());
    let input = kubeproxy::iptables_restore_input(&f.services(synthetic), &f.config());
    let took = load_iptables(f.netns(), backend, &input).expect("load");
    eprintln!("{what}: loaded in {took:?}");
    f.assert_balanced(&what);
    f.assert_hairpin(&what);
    flush_iptables(f.netns(), backend).expect("flush");
    let left = kubeproxy::loader::iptables_save(f.netns(), backend, "nat").expect("save");
    assert!(!left.contains("KUBE-"), "{what}: left behind:\n{left}");
    if backend == IptablesBackend::Nft {
        // Not even iptables-nft's empty tables remain.
        let ruleset = f.node.exec(&["nft", "list", "ruleset"]).expect("nft list");
        assert_eq!(ruleset.trim(), "", "{what}: left behind");
    }
    f.assert_vip_gone(&what);
    flush_iptables(f.netns(), backend).expect("flushing twice");
}

#[test]
fn iptables_nft_backend_balances_tcp_and_udp() {
    // 20 synthetic services: 202 endpoints, so rules keep their comments.
    iptables_end_to_end(IptablesBackend::Nft, 20);
}

#[test]
fn iptables_legacy_backend_balances_tcp_and_udp() {
    // 200 synthetic services: 2,002 endpoints, kube-proxy's "large cluster mode".
    iptables_end_to_end(IptablesBackend::Legacy, 200);
}

#[test]
fn iptables_large_cluster_mode_balances_tcp_and_udp() {
    iptables_end_to_end(IptablesBackend::Nft, 200);
}

#[test]
fn nftables_balances_tcp_and_udp() {
    let f = Fixture::new();
    let what = "nftables + 200 synthetic services";
    let mut cfg = f.config();
    // Exercises `cluster-ips-check`: the VIP is allocated, the rest of the range is not.
    cfg.service_cidrs = vec!["10.96.0.0/16".parse().unwrap()];
    let took = load_nft(f.netns(), &kubeproxy::nft_input(&f.services(200), &cfg)).expect("load");
    eprintln!("{what}: loaded in {took:?}");
    f.assert_balanced(what);
    f.assert_hairpin(what);
    flush_nft(f.netns()).expect("flush");
    let left = f.node.exec(&["nft", "list", "ruleset"]).expect("nft list");
    assert!(!left.contains("kube-proxy"), "{what}: left behind:\n{left}");
    f.assert_vip_gone(what);
    flush_nft(f.netns()).expect("flushing twice");
}

/// Cold programming time of N services × 10 endpoints, each back end in turn on one node.
#[test]
#[ignore = "timing report, run explicitly"]
fn load_timings() {
    let scales: Vec<usize> = std::env::var("FERROVIA_KP_SCALES")
        .unwrap_or_else(|_| "1,1000,10000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("FERROVIA_KP_SCALES: comma-separated counts")
        })
        .collect();
    let node = Node::with_options(NodeOptions {
        cni: CniMode::PtpOnly,
        ..NodeOptions::default()
    })
    .expect("node");
    let modes = std::env::var("FERROVIA_KP_MODES")
        .unwrap_or_else(|_| "iptables-nft,iptables-legacy,nft".into());
    let modes: Vec<&str> = modes.split(',').map(str::trim).collect();
    let ns = node.netns();
    let cfg = ProxyConfig::new(node.pod_subnet().parse().unwrap());
    for n in scales {
        let svcs = kubeproxy::synthetic(n, 10);
        let t = Instant::now();
        let ipt = kubeproxy::iptables_restore_input(&svcs, &cfg);
        let nft = kubeproxy::nft_input(&svcs, &cfg);
        eprintln!(
            "N={n}: generated in {:?} (iptables {} MiB, nft {} MiB)",
            t.elapsed(),
            ipt.len() >> 20,
            nft.len() >> 20
        );
        for backend in IptablesBackend::ALL {
            if !modes.contains(&backend.name()) {
                continue;
            }
            let took = load_iptables(ns, backend, &ipt).expect("load");
            if n <= 10_000 {
                let saved = kubeproxy::loader::iptables_save(ns, backend, "nat").expect("save");
                assert_eq!(
                    saved.matches(":KUBE-SEP-").count(),
                    n * 10,
                    "{}",
                    backend.name()
                );
            }
            let t = Instant::now();
            flush_iptables(ns, backend).expect("flush");
            eprintln!(
                "N={n}: {} restore {took:?} (flush {:?})",
                backend.name(),
                t.elapsed()
            );
        }
        if !modes.contains(&"nft") {
            continue;
        }
        let took = load_nft(ns, &nft).expect("load");
        if n <= 10_000 {
            let chains = node
                .exec(&["nft", "list", "chains", "ip"])
                .expect("nft list");
            assert_eq!(chains.matches("chain endpoint-").count(), n * 10);
        }
        let t = Instant::now();
        flush_nft(ns).expect("flush");
        eprintln!("N={n}: nft -f {took:?} (flush {:?})", t.elapsed());
    }
}
