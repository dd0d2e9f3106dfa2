//! kube-proxy `--proxy-mode=nftables` (GA in 1.33): the `nft -f -` transaction of a first,
//! full sync of `table ip kube-proxy`.
//!
//! Mirrors `setupNFTables` and `syncProxyRules` in kubernetes `pkg/proxy/nftables/proxier.go`,
//! written the way `sigs.k8s.io/knftables` serializes a transaction (one `add`/`flush`/`delete`
//! command per line), for `ClusterIP` services with `internalTrafficPolicy: Cluster`, no
//! session affinity and the `ClusterCIDR` local-traffic detector. The layout is the one in
//! `TestOverallNFTablesRules` (`proxier_test.go`, 1.33/1.34: `filter-*-pre-dnat` chains at
//! priority -110, the other filter chains at 0):
//!
//! ```text
//! add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
//! add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
//! add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }
//! add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
//! add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
//! ```
//!
//! Deliberate differences: base chain priorities are written as numbers (-110, 0, -100, 100)
//! rather than knftables' `dstnat-10`-style names, which mean the same; and the mark is
//! `0x4000` (kube-proxy prints `%#08x`, `0x004000`: the same value).

use std::fmt::Write as _;
use std::net::SocketAddrV4;

use super::{MASQUERADE_MARK, ProxyConfig, Svc, hash_base32};

/// kube-proxy's table (`kubeProxyTable`), in the `ip` family.
pub const TABLE: &str = "ip kube-proxy";

/// kube-proxy's base chains (`nftablesBaseChains`): name, type, hook, priority.
const BASE_CHAINS: &[(&str, &str, &str, i32)] = &[
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-input", "filter", "input", 0),
    ("filter-forward", "filter", "forward", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// kube-proxy's top-level jumps (`nftablesJumpChains`): destination, source, match.
const JUMP_CHAINS: &[(&str, &str, &str)] = &[
    ("nodeport-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-forward", "ct state new "),
    ("service-endpoints-check", "filter-output", "ct state new "),
    (
        "firewall-check",
        "filter-prerouting-pre-dnat",
        "ct state new ",
    ),
    ("firewall-check", "filter-output-pre-dnat", "ct state new "),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new "),
    ("cluster-ips-check", "filter-output", "ct state new "),
];

/// The name hash of kube-proxy's nftables chains (`hashAndTruncate`): the first 8 characters
/// of base32(sha256(name)), a dash, then the name itself (never longer than its 240-char cap
/// for IPv4).
fn hash_and_truncate(name: &str) -> String {
    format!("{}-{name}", &hash_base32(name)[..8])
}

/// `service-<hash>-ns/name/proto/port`: the service port's cluster-policy chain
/// (`servicePortChainNameBase` with the `service-` prefix).
#[must_use]
pub fn service_chain(svc: &Svc) -> String {
    let base = format!(
        "{}/{}/{}/{}",
        svc.namespace, svc.name, svc.proto, svc.port_name
    );
    format!("service-{}", hash_and_truncate(&base))
}

/// `endpoint-<hash>-ns/name/proto/port__ip/port`: one endpoint's chain
/// (`servicePortEndpointChainNameBase` with the `endpoint-` prefix).
#[must_use]
pub fn endpoint_chain(svc: &Svc, endpoint: SocketAddrV4) -> String {
    let base = format!(
        "{}/{}/{}/{}__{}/{}",
        svc.namespace,
        svc.name,
        svc.proto,
        svc.port_name,
        endpoint.ip(),
        endpoint.port()
    );
    format!("endpoint-{}", hash_and_truncate(&base))
}

/// The transaction text for `nft -f -`: table setup (`setupNFTables`, including the one-time
/// add+delete of the base chains a fresh proxier does), then every service port.
#[must_use]
pub fn transaction(svcs: &[Svc], cfg: &ProxyConfig) -> String {
    let t = TABLE;
    let mark = format!("{MASQUERADE_MARK:#x}");
    // About 2.6 KiB per 10-endpoint service.
    let mut tx = String::with_capacity(8 * 1024 + svcs.len() * 2800);

    let _ = writeln!(tx, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    for (name, ..) in BASE_CHAINS {
        let _ = writeln!(tx, "add chain {t} {name}\ndelete chain {t} {name}");
    }
    for (name, kind, hook, priority) in BASE_CHAINS {
        let _ = writeln!(
            tx,
            "add chain {t} {name} {{ type {kind} hook {hook} priority {priority} ; }}\n\
             flush chain {t} {name}"
        );
    }
    let mut created: Vec<&str> = Vec::new();
    for (dst, src, matches) in JUMP_CHAINS {
        if !created.contains(dst) {
            created.push(dst);
            ensure_chain(&mut tx, dst);
        }
        let _ = writeln!(tx, "add rule {t} {src} {matches}jump {dst}");
    }
    // `services`, `cluster-ips-check` and `masquerading` exist by now.
    ensure_chain(&mut tx, "mark-for-masquerade");
    let _ = writeln!(
        tx,
        "add rule {t} mark-for-masquerade mark set mark or {mark}\n\
         add rule {t} masquerading mark and {mark} == 0 return\n\
         add rule {t} masquerading mark set mark xor {mark}\n\
         add rule {t} masquerading masquerade fully-random\n\
         add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
         add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    if !cfg.service_cidrs.is_empty() {
        let cidrs: Vec<String> = cfg.service_cidrs.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            tx,
            "add rule {t} cluster-ips-check ip daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
            cidrs.join(", ")
        );
    }
    let _ = writeln!(
        tx,
        "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}\n\
         flush set {t} nodeport-ips"
    );
    if let Some(ip) = cfg.node_ip {
        let _ = writeln!(tx, "add element {t} nodeport-ips {{ {ip} }}");
    }
    let _ = writeln!(
        tx,
        "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
         add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}\n\
         flush chain {t} reject-chain\n\
         add rule {t} reject-chain reject\n\
         add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports\n\
         add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}\n\
         add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
         add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
         add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\
         flush set {t} cluster-ips\n\
         flush map {t} service-ips\n\
         flush map {t} firewall-ips\n\
         flush map {t} no-endpoint-services\n\
         flush map {t} no-endpoint-nodeports\n\
         flush map {t} service-nodeports"
    );

    for svc in svcs {
        push_service(&mut tx, svc, cfg);
    }
    tx
}

/// kube-proxy's `ensureChain`: create the chain, and empty it should it exist.
fn ensure_chain(tx: &mut String, chain: &str) {
    let _ = writeln!(tx, "add chain {TABLE} {chain}\nflush chain {TABLE} {chain}");
}

/// One service port's part of `syncProxyRules`: its chains, map elements and rules.
fn push_service(tx: &mut String, svc: &Svc, cfg: &ProxyConfig) {
    let t = TABLE;
    let (vip, port, proto) = (svc.vip, svc.port, svc.proto);
    let endpoints: Vec<String> = svc
        .endpoints
        .iter()
        .map(|ep| endpoint_chain(svc, *ep))
        .collect();
    for chain in &endpoints {
        ensure_chain(tx, chain);
    }
    let _ = writeln!(tx, "add element {t} cluster-ips {{ {vip} }}");
    if endpoints.is_empty() {
        let _ = writeln!(
            tx,
            "add element {t} no-endpoint-services {{ {vip} . {proto} . {port} comment \"{}\" : goto reject-chain }}",
            svc.service_port_name()
        );
        return;
    }
    let chain = service_chain(svc);
    ensure_chain(tx, &chain);
    let _ = writeln!(
        tx,
        "add element {t} service-ips {{ {vip} . {proto} . {port} : goto {chain} }}"
    );
    // Masquerade off-cluster clients of the VIP (`localDetector.IfNotLocalNFT()`).
    let _ = writeln!(
        tx,
        "add rule {t} {chain} ip daddr {vip} ip saddr != {} jump mark-for-masquerade",
        cfg.cluster_cidr
    );
    // writeServiceToEndpointRules: one random pick through a verdict map.
    let _ = write!(
        tx,
        "add rule {t} {chain} numgen random mod {} vmap {{ ",
        endpoints.len()
    );
    for (i, ep_chain) in endpoints.iter().enumerate() {
        let sep = if i + 1 < endpoints.len() { " ," } else { "" };
        let _ = write!(tx, "{i} : goto {ep_chain}{sep} ");
    }
    tx.push_str("}\n");
    for (ep, ep_chain) in svc.endpoints.iter().zip(&endpoints) {
        let _ = writeln!(
            tx,
            "add rule {t} {ep_chain} ip saddr {} jump mark-for-masquerade\n\
             add rule {t} {ep_chain} meta l4proto {proto} dnat to {ep}",
            ep.ip()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubeproxy::synthetic;

    use crate::kubeproxy::fixtures::{cfg, svc};

    #[test]
    fn chain_names_match_kube_proxy() {
        let s1 = svc("ns1", "svc1", "172.30.0.41", &["10.180.0.1:80"]);
        assert_eq!(service_chain(&s1), "service-ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            endpoint_chain(&s1, s1.endpoints[0]),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        let s4 = svc(
            "ns4",
            "svc4",
            "172.30.0.44",
            &["10.180.0.4:80", "10.180.0.5:80"],
        );
        assert_eq!(service_chain(&s4), "service-LAUZTJTB-ns4/svc4/tcp/p80");
        assert_eq!(
            endpoint_chain(&s4, s4.endpoints[1]),
            "endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80"
        );
    }

    #[test]
    fn service_rules_match_kube_proxy_output() {
        let s4 = svc(
            "ns4",
            "svc4",
            "172.30.0.44",
            &["10.180.0.4:80", "10.180.0.5:80"],
        );
        let tx = transaction(&[s4], &cfg());
        for line in [
            "add element ip kube-proxy cluster-ips { 172.30.0.44 }",
            "add element ip kube-proxy service-ips { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }",
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 }",
            "add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 ip saddr 10.180.0.5 jump mark-for-masquerade",
            "add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 meta l4proto tcp dnat to 10.180.0.5:80",
            // setupNFTables, as in TestOverallNFTablesRules' baseRules.
            "add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }",
            "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }",
            "add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check",
            "add rule ip kube-proxy nat-prerouting jump services",
            "add rule ip kube-proxy masquerading mark and 0x4000 == 0 return",
            "add rule ip kube-proxy masquerading masquerade fully-random",
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
        ] {
            assert!(tx.lines().any(|l| l == line), "missing {line:?} in\n{tx}");
        }
    }

    #[test]
    fn rule_counts_scale_with_services_and_endpoints() {
        let tx = transaction(&synthetic(100, 10), &cfg());
        let count = |prefix: &str| tx.lines().filter(|l| l.starts_with(prefix)).count();
        // Per-service chains are the ones with a `/` (kube-proxy's `isServiceChainName`).
        let chains = |prefix: &str| {
            tx.lines()
                .filter_map(|l| l.strip_prefix(prefix))
                .filter(|rest| rest.split(' ').next().unwrap().contains('/'))
                .count()
        };
        let t = TABLE;
        assert_eq!(chains(&format!("add chain {t} service-")), 100);
        assert_eq!(chains(&format!("add chain {t} endpoint-")), 1_000);
        assert_eq!(count(&format!("add element {t} service-ips ")), 100);
        assert_eq!(count(&format!("add element {t} cluster-ips ")), 100);
        // Per service: the masquerade rule and the numgen pick; per endpoint: two rules.
        assert_eq!(chains(&format!("add rule {t} service-")), 200);
        assert_eq!(tx.matches(" numgen random mod 10 vmap ").count(), 100);
        assert_eq!(chains(&format!("add rule {t} endpoint-")), 2_000);
    }

    #[test]
    fn service_cidrs_and_node_ip_are_programmed() {
        let mut cfg = cfg();
        cfg.service_cidrs = vec!["10.96.0.0/12".parse().unwrap()];
        cfg.node_ip = Some("192.168.0.2".parse().unwrap());
        let tx = transaction(&[], &cfg);
        assert!(tx.contains("add rule ip kube-proxy cluster-ips-check ip daddr { 10.96.0.0/12 } drop comment \"Drop traffic to unallocated ClusterIPs\"\n"));
        assert!(tx.contains("add element ip kube-proxy nodeport-ips { 192.168.0.2 }\n"));
    }

    #[test]
    fn services_without_endpoints_go_to_the_reject_chain() {
        let tx = transaction(&[svc("ns6", "svc6", "172.30.0.46", &[])], &cfg());
        assert!(tx.contains(
            "add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment \"ns6/svc6:p80\" : goto reject-chain }\n"
        ));
        assert!(!tx.contains("add element ip kube-proxy service-ips"));
        assert!(!tx.contains("/svc6/"));
    }
}
