//! The policy section's manifests: the bench pods with labels (policies select pods by label,
//! and the agent takes labels from `Pod` objects), the isolating policies, their "deny the
//! client" twin, and the extra policies that must not change any verdict of the measured traffic.
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// The namespace of every bench pod.
pub const NAMESPACE: &str = "bench";
/// Label values (`app=…`) of the backends and the client.
pub const BACKEND_APP: &str = "backend";
pub const CLIENT_APP: &str = "client";

/// `Pod` objects for `backends` and `client` (names as the CNI plugin registered them), labelled
/// `app=backend` / `app=client`. No status: the agent takes the IPs from the CNI plugin.
#[must_use]
pub fn pods(backends: &[&str], client: &str) -> String {
    let mut out = String::new();
    let all = backends
        .iter()
        .map(|b| (*b, BACKEND_APP))
        .chain([(client, CLIENT_APP)]);
    for (name, app) in all {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NAMESPACE}, labels: {{app: {app}}}}}\n\
             spec: {{containers: [{{name: echo, image: ferrovia-echo}}]}}\n"
        );
    }
    out
}

/// One `NetworkPolicy` of the bench namespace; `rules` is the YAML under `spec:` after the
/// selector and types (already indented by two spaces).
fn policy(out: &mut String, name: &str, selects: &str, types: &str, rules: &str) {
    let _ = write!(
        out,
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: {selects}}}}}\n  policyTypes: [{types}]\n{rules}"
    );
}

/// The isolating pair: the backends accept only the client's pods on `port`, and the client may
/// only reach the backends on `port` (with socket-level LB its connections leave it already
/// addressed to a backend; it needs no DNS or anything else). With `deny_client`, the backends'
/// policy allows a label no pod has instead, so the client's connections are dropped.
#[must_use]
pub fn isolating(port: u16, deny_client: bool) -> String {
    let from = if deny_client { "nobody" } else { CLIENT_APP };
    let mut out = String::new();
    policy(
        &mut out,
        "backends-allow-client",
        BACKEND_APP,
        "Ingress",
        &format!(
            "  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}]\n    ports: [{{protocol: TCP, port: {port}}}]\n"
        ),
    );
    policy(
        &mut out,
        "client-to-backends",
        CLIENT_APP,
        "Egress",
        &format!(
            "  egress:\n  - to: [{{podSelector: {{matchLabels: {{app: {BACKEND_APP}}}}}}}]\n    ports: [{{protocol: TCP, port: {port}}}]\n"
        ),
    );
    out
}

/// What extra policy `i` is, in turn: none of them allows or denies anything the client's
/// traffic to the backends on the target port depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extra {
    /// Selects no pod (`app=unused-i`).
    SelectsNoPod,
    /// Selects the backends; allows ingress from one address outside the cluster (an
    /// `ipBlock` /32 in 172.16.0.0/12): one more prefix in the backends' peer trie.
    BackendsFromBlock,
    /// Selects the backends; allows the client on another port: one more port range for the
    /// client's entry in the backends' rules.
    BackendsOtherPort,
    /// Selects the client; allows egress to one address that is no pod (198.18.0.0/15): one
    /// more prefix in the client's egress trie.
    ClientToBlock,
}

impl Extra {
    /// Kind of extra policy `i` (a quarter each).
    #[must_use]
    pub fn of(i: usize) -> Self {
        match i % 4 {
            0 => Self::SelectsNoPod,
            1 => Self::BackendsFromBlock,
            2 => Self::BackendsOtherPort,
            _ => Self::ClientToBlock,
        }
    }
}

/// The `i`-th address of a /16-aligned range, for `i < 65,536`.
fn nth(base: Ipv4Addr, i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + u32::try_from(i % 65_536).unwrap_or(0))
}

/// `count` extra policies (see [`Extra`]); `port` is the measured target port, which the
/// [`Extra::BackendsOtherPort`] ones leave out.
#[must_use]
pub fn extra(count: usize, port: u16) -> String {
    let mut out = String::with_capacity(count * 330);
    for i in 0..count {
        let name = format!("extra-{i}");
        match Extra::of(i) {
            Extra::SelectsNoPod => policy(
                &mut out,
                &name,
                &format!("unused-{i}"),
                "Ingress",
                &format!(
                    "  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: {CLIENT_APP}}}}}}}]\n    ports: [{{protocol: TCP, port: {port}}}]\n"
                ),
            ),
            Extra::BackendsFromBlock => policy(
                &mut out,
                &name,
                BACKEND_APP,
                "Ingress",
                &format!(
                    "  ingress:\n  - from: [{{ipBlock: {{cidr: {}/32}}}}]\n    ports: [{{protocol: TCP, port: {port}}}]\n",
                    nth(Ipv4Addr::new(172, 16, 0, 0), i)
                ),
            ),
            Extra::BackendsOtherPort => policy(
                &mut out,
                &name,
                BACKEND_APP,
                "Ingress",
                &format!(
                    "  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: {CLIENT_APP}}}}}}}]\n    ports: [{{protocol: TCP, port: {}}}]\n",
                    other_port(port, i)
                ),
            ),
            Extra::ClientToBlock => policy(
                &mut out,
                &name,
                CLIENT_APP,
                "Egress",
                &format!(
                    "  egress:\n  - to: [{{ipBlock: {{cidr: {}/32}}}}]\n    ports: [{{protocol: TCP, port: {port}}}]\n",
                    nth(Ipv4Addr::new(198, 18, 0, 0), i)
                ),
            ),
        }
    }
    out
}

/// A port for extra policy `i` that is never `port`: 20,000 + 2·i (every other port, so the
/// ranges stay apart instead of merging into one).
fn other_port(port: u16, i: usize) -> u16 {
    let p = 20_000 + 2 * (i % 20_000);
    let p = u16::try_from(p).unwrap_or(u16::MAX);
    if p == port { p + 1 } else { p }
}

/// How many of `count` extra policies select a pod of this node (the agent's `policies=`).
#[must_use]
pub fn extra_selecting(count: usize) -> usize {
    (0..count)
        .filter(|&i| Extra::of(i) != Extra::SelectsNoPod)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolating_pair_and_its_deny_twin_differ_only_in_the_allowed_label() {
        let allow = isolating(9376, false);
        let deny = isolating(9376, true);
        assert_eq!(allow.matches("kind: NetworkPolicy").count(), 2);
        assert!(
            allow.contains("from: [{podSelector: {matchLabels: {app: client}}}]"),
            "{allow}"
        );
        assert!(
            deny.contains("from: [{podSelector: {matchLabels: {app: nobody}}}]"),
            "{deny}"
        );
        assert_eq!(
            allow.replace("app: client}}}]\n    ports", "app: nobody}}}]\n    ports"),
            deny
        );
    }

    #[test]
    fn extras_are_distinct_and_never_name_the_target_port_for_the_client() {
        let yaml = extra(1000, 9376);
        assert_eq!(yaml.matches("kind: NetworkPolicy").count(), 1000);
        assert!(yaml.contains("name: extra-999,"));
        assert!(
            yaml.contains("cidr: 172.16.3.229/32"),
            "extra-997 is 172.16.0.0 + 997"
        );
        assert!(
            yaml.contains("cidr: 198.18.3.231/32"),
            "extra-999 is 198.18.0.0 + 999"
        );
        assert_eq!(extra_selecting(1000), 750);
        assert_eq!(extra_selecting(3), 2);
        for i in 0..40_000 {
            assert_ne!(other_port(20_000, i), 20_000);
        }
        assert_eq!(other_port(9376, 2), 20_004);
    }

    #[test]
    fn pods_carry_their_app_label() {
        let yaml = pods(&["backend-0", "backend-1"], "client");
        assert_eq!(yaml.matches("kind: Pod").count(), 3);
        assert!(yaml.contains("name: backend-1, namespace: bench, labels: {app: backend}"));
        assert!(yaml.contains("name: client, namespace: bench, labels: {app: client}"));
    }
}
