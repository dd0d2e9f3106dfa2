//! kube-proxy `--proxy-mode=iptables`: the `iptables-restore` payload of a full sync.
//!
//! Mirrors `syncProxyRules` in kubernetes `pkg/proxy/iptables/proxier.go` (1.28+ layout) for
//! `ClusterIP` services with `internalTrafficPolicy: Cluster`, no session affinity, the
//! `ClusterCIDR` local-traffic detector and the default masquerade bit. Its expected output in
//! `TestOverallIPTablesRules` (`proxier_test.go`) is what the unit tests compare against:
//!
//! ```text
//! -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
//! -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
//! -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
//! -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
//! -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
//! -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
//! ```
//!
//! Deliberate differences, none of which touches a packet's path through the service rules:
//! - The jump rules from the built-in chains (`iptablesJumpChains`, plus the `KUBE-FIREWALL`
//!   jumps kube-proxy duplicates from kubelet) are `-I` lines of this payload; kube-proxy
//!   installs them with one `iptables -I` each (`EnsureRule(Prepend, …)`) before its first
//!   restore. The order they end up in is the same.
//! - No `KUBE-PROXY-CANARY` chain in `mangle` (kube-proxy's monitor for flushed tables).
//! - `KUBE-FORWARD`'s invalid-state drop has no `nfacct` counter (`-m nfacct` needs
//!   `xt_nfacct` and only feeds a metric).

use std::fmt::Write as _;

use super::{MASQUERADE_MARK, ProxyConfig, Svc, hash_base32};

/// Above this many endpoints in total, kube-proxy leaves the per-endpoint comments out to
/// make `iptables-restore` faster (`largeClusterEndpointsThreshold`, "large cluster mode").
pub const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

/// `KUBE-SVC-<hash>`: kube-proxy's `servicePortChainName`, the first 16 characters of
/// base32(sha256(`ns/name:port` + protocol)).
#[must_use]
pub fn service_chain(svc: &Svc) -> String {
    let hash = hash_base32(&format!("{}{}", svc.service_port_name(), svc.proto));
    format!("KUBE-SVC-{}", &hash[..16])
}

/// `KUBE-SEP-<hash>`: kube-proxy's `servicePortEndpointChainName`, the same hash with the
/// endpoint's `ip:port` appended to the input.
#[must_use]
pub fn endpoint_chain(svc: &Svc, endpoint: std::net::SocketAddrV4) -> String {
    let hash = hash_base32(&format!(
        "{}{}{endpoint}",
        svc.service_port_name(),
        svc.proto
    ));
    format!("KUBE-SEP-{}", &hash[..16])
}

/// The `--probability` of the rule picking the `i`-th of `n` endpoints: 1/(n-i), printed
/// as Go's `%0.10f` (`computeProbability`), so each endpoint is picked with 1/n overall.
#[must_use]
pub fn probability(remaining: usize) -> String {
    #[allow(clippy::cast_precision_loss)] // Endpoint counts are far below 2^52.
    let p = 1.0 / remaining as f64;
    format!("{p:.10}")
}

/// The jump rules from the built-in chains: kube-proxy's `iptablesJumpChains` and
/// `iptablesKubeletJumpChains`, as `(table, chain, rule)`, in the order kube-proxy prepends
/// them (`-I` each, so the last one ends up first).
const JUMPS: &[(&str, &str, &str)] = &[
    (
        "filter",
        "INPUT",
        r#"-m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES"#,
    ),
    (
        "filter",
        "FORWARD",
        r#"-m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES"#,
    ),
    (
        "filter",
        "INPUT",
        r#"-m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS"#,
    ),
    (
        "filter",
        "FORWARD",
        r#"-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
    ),
    (
        "filter",
        "OUTPUT",
        r#"-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
    ),
    (
        "filter",
        "FORWARD",
        r#"-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD"#,
    ),
    (
        "filter",
        "INPUT",
        r#"-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL"#,
    ),
    (
        "filter",
        "OUTPUT",
        r#"-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL"#,
    ),
    (
        "filter",
        "FORWARD",
        r#"-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL"#,
    ),
    (
        "nat",
        "OUTPUT",
        r#"-m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
    ),
    (
        "nat",
        "PREROUTING",
        r#"-m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
    ),
    (
        "nat",
        "POSTROUTING",
        r#"-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#,
    ),
    ("filter", "INPUT", "-j KUBE-FIREWALL"),
    ("filter", "OUTPUT", "-j KUBE-FIREWALL"),
];

/// The chains kube-proxy owns in each table and declares (so `--noflush` flushes them) on
/// every full sync, before the per-service ones.
pub const FILTER_CHAINS: &[&str] = &[
    "KUBE-NODEPORTS",
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FIREWALL",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
];

/// See [`FILTER_CHAINS`].
pub const NAT_CHAINS: &[&str] = &[
    "KUBE-NODEPORTS",
    "KUBE-SERVICES",
    "KUBE-MARK-MASQ",
    "KUBE-POSTROUTING",
];

/// The full-sync payload for `iptables-restore --noflush` (kube-proxy's
/// `proxier.iptablesData`: filter chains, filter rules, nat chains, nat rules). Services with
/// no endpoints get kube-proxy's REJECT rule in `filter` instead of nat chains.
#[must_use]
pub fn restore_input(svcs: &[Svc], cfg: &ProxyConfig) -> String {
    let total_endpoints: usize = svcs.iter().map(|s| s.endpoints.len()).sum();
    let mark = format!("{MASQUERADE_MARK:#x}");
    let mut buf = Buffers {
        // Sized from a 10-endpoint service's share (about 2.5 KiB with comments).
        nat_chains: String::with_capacity(64 + svcs.len() * 32 * 11),
        nat_rules: String::with_capacity(1024 + svcs.len() * 200 * 12),
        filter_rules: String::new(),
        large_cluster: total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD,
    };

    let mut out = String::new();
    out.push_str("*filter\n");
    for chain in FILTER_CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    push_jumps(&mut out, "filter");
    // kube-proxy's localhost NodePort protection (`--iptables-localhost-nodeports`, default on).
    buf.filter_rules.push_str(
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" \
         -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
    );
    let _ = writeln!(
        buf.filter_rules,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );

    for chain in NAT_CHAINS {
        let _ = writeln!(buf.nat_chains, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        buf.nat_rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {mark}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {mark}"
    );
    for svc in svcs {
        buf.push_service(svc, cfg);
    }
    buf.nat_rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );

    out.push_str(&buf.filter_rules);
    out.push_str("COMMIT\n*nat\n");
    out.reserve(buf.nat_chains.len() + buf.nat_rules.len() + 64);
    out.push_str(&buf.nat_chains);
    push_jumps(&mut out, "nat");
    out.push_str(&buf.nat_rules);
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's line buffers (`filterRules`, `natChains`, `natRules`; the filter table has
/// no per-service chains) and the mode they are written in.
struct Buffers {
    filter_rules: String,
    nat_chains: String,
    nat_rules: String,
    /// Leave out the per-endpoint comments ([`LARGE_CLUSTER_ENDPOINTS_THRESHOLD`]).
    large_cluster: bool,
}

impl Buffers {
    /// One service port's part of `syncProxyRules`.
    fn push_service(&mut self, svc: &Svc, cfg: &ProxyConfig) {
        let name = svc.service_port_name();
        let (vip, port, proto) = (svc.vip, svc.port, svc.proto);
        if svc.endpoints.is_empty() {
            let _ = writeln!(
                self.filter_rules,
                "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" \
                 -m {proto} -p {proto} -d {vip} --dport {port} -j REJECT"
            );
            return;
        }
        let svc_chain = service_chain(svc);
        let _ = writeln!(self.nat_chains, ":{svc_chain} - [0:0]");
        let matches = format!(
            "-m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {vip} --dport {port}"
        );
        let _ = writeln!(self.nat_rules, "-A KUBE-SERVICES {matches} -j {svc_chain}");
        // Masquerade off-cluster clients of the VIP (`localDetector.IfNotLocal()`).
        let _ = writeln!(
            self.nat_rules,
            "-A {svc_chain} {matches} ! -s {} -j KUBE-MARK-MASQ",
            cfg.cluster_cidr
        );

        // writeServiceToEndpointRules: a random pick among the endpoints still left.
        let n = svc.endpoints.len();
        let sep_chains: Vec<String> = svc
            .endpoints
            .iter()
            .map(|ep| endpoint_chain(svc, *ep))
            .collect();
        for (i, (ep, sep)) in svc.endpoints.iter().zip(&sep_chains).enumerate() {
            let _ = write!(self.nat_rules, "-A {svc_chain}");
            if !self.large_cluster {
                let _ = write!(self.nat_rules, " -m comment --comment \"{name} -> {ep}\"");
            }
            if i + 1 < n {
                let _ = write!(
                    self.nat_rules,
                    " -m statistic --mode random --probability {}",
                    probability(n - i)
                );
            }
            let _ = writeln!(self.nat_rules, " -j {sep}");
        }

        // The per-endpoint chains: hairpin masquerade, then DNAT.
        let comment = if self.large_cluster {
            String::new()
        } else {
            format!(" -m comment --comment {name}")
        };
        for (ep, sep) in svc.endpoints.iter().zip(&sep_chains) {
            let _ = writeln!(self.nat_chains, ":{sep} - [0:0]");
            let _ = writeln!(
                self.nat_rules,
                "-A {sep}{comment} -s {ip} -j KUBE-MARK-MASQ\n\
                 -A {sep}{comment} -m {proto} -p {proto} -j DNAT --to-destination {ep}",
                ip = ep.ip()
            );
        }
    }
}

/// The [`JUMPS`] of `table` as `-I` lines.
fn push_jumps(out: &mut String, table: &str) {
    for (_, chain, rule) in JUMPS.iter().filter(|(t, _, _)| *t == table) {
        let _ = writeln!(out, "-I {chain} {rule}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubeproxy::synthetic;

    /// kube-proxy's `ns1/svc1:p80` with endpoints from `TestOverallIPTablesRules`.
    use crate::kubeproxy::fixtures::{cfg, svc};

    /// kube-proxy's own test service (`ns1/svc1:p80`, 172.30.0.41:80).
    fn svc1(endpoints: &[&str]) -> Svc {
        svc("ns1", "svc1", "172.30.0.41", endpoints)
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        let svc = svc1(&["10.180.0.1:80", "10.180.0.2:80", "10.180.2.1:80"]);
        assert_eq!(service_chain(&svc), "KUBE-SVC-XPGD46QRK7WJZT7O");
        let seps: Vec<_> = svc
            .endpoints
            .iter()
            .map(|e| endpoint_chain(&svc, *e))
            .collect();
        assert_eq!(
            seps,
            [
                "KUBE-SEP-SXIVWICOYRO3J4NJ",
                "KUBE-SEP-LXVODXWDISEETFEF",
                "KUBE-SEP-ZX7GRIZKSNUQ3LAJ"
            ]
        );
    }

    #[test]
    fn probabilities_are_printed_like_go() {
        let p: Vec<_> = (1..=10).rev().map(probability).collect();
        assert_eq!(p[0], "0.1000000000");
        assert_eq!(p[1], "0.1111111111");
        assert_eq!(p[3], "0.1428571429");
        assert_eq!(p[6], "0.2500000000");
        assert_eq!(p[7], "0.3333333333");
        assert_eq!(p[8], "0.5000000000");
        assert_eq!(p[9], "1.0000000000");
    }

    #[test]
    fn service_rules_match_kube_proxy_output() {
        let out = restore_input(&[svc1(&["10.180.0.1:80", "10.180.0.2:80"])], &cfg());
        for line in [
            r#"-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O"#,
            r#"-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"#,
            r#"-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ"#,
            r#"-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF"#,
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80",
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
            r#"-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT"#,
            ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]",
            ":KUBE-SEP-LXVODXWDISEETFEF - [0:0]",
            r#"-I PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
        // Tables in kube-proxy's order; the NodePorts jump closes KUBE-SERVICES.
        assert!(out.starts_with("*filter\n"));
        assert!(out.ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n"));
    }

    #[test]
    fn rule_counts_scale_with_services_and_endpoints() {
        let svcs = synthetic(100, 10);
        let out = restore_input(&svcs, &cfg());
        let count = |prefix: &str| out.lines().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(count(":KUBE-SVC-"), 100);
        assert_eq!(count(":KUBE-SEP-"), 1_000);
        // Per service: the masquerade rule and one rule per endpoint.
        assert_eq!(count("-A KUBE-SVC-"), 100 * 11);
        assert_eq!(count("-A KUBE-SEP-"), 100 * 10 * 2);
        // One per service plus the NodePorts jump.
        assert_eq!(count("-A KUBE-SERVICES "), 101);
        assert_eq!(count("-I "), JUMPS.len());
        assert_eq!(count("COMMIT"), 2);
        assert!(out.contains("-m comment --comment bench/svc-0:http -s 100.64.0.1 "));
    }

    #[test]
    fn large_clusters_drop_per_endpoint_comments() {
        let out = restore_input(&synthetic(101, 10), &cfg());
        let sep = out.lines().find(|l| l.starts_with("-A KUBE-SEP-")).unwrap();
        assert!(!sep.contains("comment"), "{sep}");
        let pick = out
            .lines()
            .find(|l| l.starts_with("-A KUBE-SVC-") && l.contains("statistic"))
            .unwrap();
        assert!(!pick.contains("comment"), "{pick}");
        // The per-service rules keep theirs.
        assert!(out.contains("--comment \"bench/svc-100:http cluster IP\""));
    }

    #[test]
    fn services_without_endpoints_are_rejected_in_filter() {
        let out = restore_input(&[svc1(&[])], &cfg());
        assert!(out.contains(
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j REJECT\n"
        ));
        assert!(!out.contains("KUBE-SVC-"));
    }
}
