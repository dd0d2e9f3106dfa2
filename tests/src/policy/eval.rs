//! The expected verdicts: `networking.k8s.io/v1` `NetworkPolicy` semantics as the API
//! reference states them, written for the tests alone. It shares no code with the agent's
//! policy compiler, so that a misreading there is not copied here — the two are compared by
//! traffic.
//!
//! - A pod is isolated for ingress (egress) when a policy of its namespace selects it and has
//!   that type among its effective `policyTypes` (absent: `Ingress`, plus `Egress` when the
//!   policy has egress rules).
//! - A connection is allowed when the source's egress allows it (not isolated, or some egress
//!   rule of a policy selecting it matches) and the destination's ingress allows it; policies
//!   are a union, there is no deny rule.
//! - A named port is looked up in the destination pod's container ports, for ingress and for
//!   egress alike: it never matches a destination that is not a pod.

use std::net::Ipv4Addr;

use super::spec::{
    Labels, Operator, Peer, PodInfo, Policy, PolicyPort, PolicyType, PortRef, Protocol, Rule,
    Selector, World,
};

/// One end of a connection: a pod, or an address that is no pod's.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint<'a> {
    Pod(&'a PodInfo),
    External(Ipv4Addr),
}

impl Endpoint<'_> {
    fn ip(&self) -> Ipv4Addr {
        match self {
            Self::Pod(p) => p.ip,
            Self::External(ip) => *ip,
        }
    }

    fn pod(&self) -> Option<&PodInfo> {
        match self {
            Self::Pod(p) => Some(p),
            Self::External(_) => None,
        }
    }
}

/// Whether `selector` matches `labels`: every `matchLabels` pair and every requirement.
#[must_use]
pub fn selects(selector: &Selector, labels: &Labels) -> bool {
    selector
        .match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && selector.match_expressions.iter().all(|r| {
            let value = labels.get(&r.key);
            match r.operator {
                Operator::In => value.is_some_and(|v| r.values.contains(v)),
                // An absent key is "not in" any set.
                Operator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                Operator::Exists => value.is_some(),
                Operator::DoesNotExist => value.is_none(),
            }
        })
}

/// Whether `policy` applies to direction `ty`: its `policyTypes`, or the API server's default
/// when the field is absent or empty (`SetDefaults_NetworkPolicySpec`).
#[must_use]
pub fn has_type(policy: &Policy, ty: PolicyType) -> bool {
    match &policy.policy_types {
        Some(types) if !types.is_empty() => types.contains(&ty),
        _ => ty == PolicyType::Ingress || !policy.egress.is_empty(),
    }
}

/// The policies that select `pod` for direction `ty`: empty means the pod is not isolated.
fn isolating<'a>(
    policies: &'a [Policy],
    pod: &'a PodInfo,
    ty: PolicyType,
) -> impl Iterator<Item = &'a Policy> + 'a {
    policies.iter().filter(move |p| {
        p.namespace == pod.namespace && selects(&p.pod_selector, &pod.labels) && has_type(p, ty)
    })
}

/// Whether pod `from` may open a `proto` connection to pod `to` on `port`.
#[must_use]
pub fn allowed(
    world: &World,
    policies: &[Policy],
    from: &PodInfo,
    to: &PodInfo,
    proto: Protocol,
    port: u16,
) -> bool {
    egress_allowed(world, policies, from, Endpoint::Pod(to), proto, port)
        && ingress_allowed(world, policies, Endpoint::Pod(from), to, proto, port)
}

/// The source side: `from`'s egress towards `to`.
#[must_use]
pub fn egress_allowed(
    world: &World,
    policies: &[Policy],
    from: &PodInfo,
    to: Endpoint<'_>,
    proto: Protocol,
    port: u16,
) -> bool {
    let mut selecting = isolating(policies, from, PolicyType::Egress).peekable();
    selecting.peek().is_none()
        || selecting.any(|p| {
            p.egress
                .iter()
                .any(|r| rule_matches(world, p, r, to, to.pod(), proto, port))
        })
}

/// The destination side: `to`'s ingress from `from`.
#[must_use]
pub fn ingress_allowed(
    world: &World,
    policies: &[Policy],
    from: Endpoint<'_>,
    to: &PodInfo,
    proto: Protocol,
    port: u16,
) -> bool {
    let mut selecting = isolating(policies, to, PolicyType::Ingress).peekable();
    selecting.peek().is_none()
        || selecting.any(|p| {
            p.ingress
                .iter()
                .any(|r| rule_matches(world, p, r, from, Some(to), proto, port))
        })
}

/// Whether `rule` of `policy` admits `peer` (the other end) on `proto`/`port`; named ports are
/// looked up on `destination`.
fn rule_matches(
    world: &World,
    policy: &Policy,
    rule: &Rule,
    peer: Endpoint<'_>,
    destination: Option<&PodInfo>,
    proto: Protocol,
    port: u16,
) -> bool {
    let peers = rule.peers.as_deref().unwrap_or_default();
    let ports = rule.ports.as_deref().unwrap_or_default();
    (peers.is_empty()
        || peers
            .iter()
            .any(|p| peer_matches(world, &policy.namespace, p, peer)))
        && (ports.is_empty()
            || ports
                .iter()
                .any(|p| port_matches(p, destination, proto, port)))
}

fn peer_matches(world: &World, policy_namespace: &str, peer: &Peer, ep: Endpoint<'_>) -> bool {
    match peer {
        Peer::IpBlock(b) => {
            b.cidr.contains_ip(ep.ip()) && !b.except.iter().any(|e| e.contains_ip(ep.ip()))
        }
        // Selectors only ever match pods.
        Peer::Selectors { pods, namespaces } => ep.pod().is_some_and(|pod| {
            let in_namespace = match namespaces {
                None => pod.namespace == policy_namespace,
                Some(sel) => world
                    .namespace_labels(&pod.namespace)
                    .is_some_and(|labels| selects(sel, labels)),
            };
            in_namespace && pods.as_ref().is_none_or(|sel| selects(sel, &pod.labels))
        }),
    }
}

fn port_matches(p: &PolicyPort, destination: Option<&PodInfo>, proto: Protocol, port: u16) -> bool {
    if p.protocol.unwrap_or(Protocol::Tcp) != proto {
        return false;
    }
    match &p.port {
        None => true,
        Some(PortRef::Number(start)) => match p.end_port {
            None => port == *start,
            Some(end) => (*start..=end).contains(&port),
        },
        Some(PortRef::Name(name)) => destination.is_some_and(|pod| {
            pod.ports
                .iter()
                .any(|cp| cp.name == *name && cp.protocol == proto && cp.port == port)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::spec::{Cidr, ContainerPort, Namespace, labels};

    /// Namespaces x (team=blue) and y; pods x/a (web on 80), x/b (web on 81), y/a (no web).
    fn world() -> World {
        let ns = |name: &str, extra: &[(&str, &str)]| {
            let mut l = labels(&[("ns", name)]);
            l.extend(labels(extra));
            Namespace {
                name: name.into(),
                labels: l,
            }
        };
        let pod = |ns: &str, name: &str, ip: u8, web: Option<u16>| PodInfo {
            namespace: ns.into(),
            name: name.into(),
            labels: labels(&[("pod", name)]),
            ip: Ipv4Addr::new(10, 0, 0, ip),
            ports: web
                .map(|port| ContainerPort {
                    name: "web".into(),
                    port,
                    protocol: Protocol::Tcp,
                })
                .into_iter()
                .collect(),
        };
        World {
            namespaces: vec![ns("x", &[("team", "blue")]), ns("y", &[])],
            pods: vec![
                pod("x", "a", 2, Some(80)),
                pod("x", "b", 3, Some(81)),
                pod("y", "a", 4, None),
            ],
        }
    }

    /// `from → to` over TCP on `port`.
    fn tcp(w: &World, ps: &[Policy], from: &str, to: &str, port: u16) -> bool {
        allowed(w, ps, w.pod(from), w.pod(to), Protocol::Tcp, port)
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(selects(&Selector::all(), &l));
        assert!(selects(&Selector::labels(&[("app", "web")]), &l));
        assert!(!selects(
            &Selector::labels(&[("app", "web"), ("x", "y")]),
            &l
        ));
        let e = |op, v: &[&str]| Selector::all().expr("tier", op, v);
        assert!(selects(&e(Operator::In, &["front", "back"]), &l));
        assert!(!selects(&e(Operator::In, &["back"]), &l));
        assert!(!selects(&e(Operator::NotIn, &["front"]), &l));
        assert!(selects(&e(Operator::NotIn, &["back"]), &l));
        assert!(selects(&e(Operator::Exists, &[]), &l));
        assert!(!selects(&e(Operator::DoesNotExist, &[]), &l));
        let none = labels(&[("app", "web")]);
        assert!(
            selects(&e(Operator::NotIn, &["front"]), &none),
            "absent key is not in"
        );
        assert!(!selects(&e(Operator::In, &["front"]), &none));
        assert!(selects(&e(Operator::DoesNotExist, &[]), &none));
        // Requirements are ANDed with each other and with matchLabels.
        let both = Selector::labels(&[("app", "web")])
            .expr("tier", Operator::Exists, &[])
            .expr("tier", Operator::NotIn, &["front"]);
        assert!(!selects(&both, &l));
    }

    #[test]
    fn no_policy_allows_everything_and_unselected_pods_are_open() {
        let w = world();
        assert!(tcp(&w, &[], "x/a", "y/a", 80));
        let deny_y = Policy::new("y", "deny", Selector::labels(&[("pod", "nobody")]));
        assert!(
            tcp(&w, &[deny_y], "x/a", "y/a", 80),
            "selects no pod: no effect"
        );
    }

    #[test]
    fn default_policy_types() {
        let ingress_only = Policy::new("x", "p", Selector::all());
        assert!(has_type(&ingress_only, PolicyType::Ingress));
        assert!(!has_type(&ingress_only, PolicyType::Egress));
        let with_egress = ingress_only.clone().egress(Rule::all());
        assert!(has_type(&with_egress, PolicyType::Egress));
        let egress_type = Policy::new("x", "p", Selector::all()).types(&[PolicyType::Egress]);
        assert!(!has_type(&egress_type, PolicyType::Ingress));
    }

    #[test]
    fn deny_ingress_is_per_destination_namespace() {
        let w = world();
        let deny = [Policy::new("x", "deny", Selector::all()).types(&[PolicyType::Ingress])];
        assert!(!tcp(&w, &deny, "y/a", "x/a", 80));
        assert!(!tcp(&w, &deny, "x/b", "x/a", 80), "same namespace too");
        assert!(tcp(&w, &deny, "x/a", "y/a", 80), "egress untouched");
        let egress = [Policy::new("x", "deny", Selector::all()).types(&[PolicyType::Egress])];
        assert!(!tcp(&w, &egress, "x/a", "y/a", 80));
        assert!(tcp(&w, &egress, "y/a", "x/a", 80));
    }

    #[test]
    fn ingress_types_ignore_egress_rules_and_vice_versa() {
        let w = world();
        // policyTypes [Egress] with an ingress rule: the rule is ignored, ingress stays open.
        let p = [Policy::new("x", "p", Selector::all())
            .types(&[PolicyType::Egress])
            .ingress(Rule::peers(vec![Peer::pods(Selector::labels(&[(
                "pod", "b",
            )]))]))];
        assert!(tcp(&w, &p, "y/a", "x/a", 80));
        assert!(
            !tcp(&w, &p, "x/a", "y/a", 80),
            "egress isolated, no egress rule"
        );
    }

    #[test]
    fn pod_selector_peer_is_the_policys_namespace() {
        let w = world();
        let p = [
            Policy::new("x", "p", Selector::all()).ingress(Rule::peers(vec![Peer::pods(
                Selector::labels(&[("pod", "a")]),
            )])),
        ];
        assert!(tcp(&w, &p, "x/a", "x/b", 80));
        assert!(!tcp(&w, &p, "y/a", "x/b", 80), "y/a has pod=a but is in y");
    }

    #[test]
    fn both_selectors_in_one_peer_versus_two_peers() {
        let w = world();
        let ns_blue = Selector::labels(&[("team", "blue")]);
        let pod_b = Selector::labels(&[("pod", "b")]);
        let one = [
            Policy::new("y", "p", Selector::all()).ingress(Rule::peers(vec![Peer::pods_in(
                ns_blue.clone(),
                pod_b.clone(),
            )])),
        ];
        assert!(tcp(&w, &one, "x/b", "y/a", 80));
        assert!(!tcp(&w, &one, "x/a", "y/a", 80), "in x but not pod=b");
        let two = [
            Policy::new("y", "p", Selector::all()).ingress(Rule::peers(vec![
                Peer::namespaces(ns_blue),
                Peer::pods(pod_b),
            ])),
        ];
        assert!(tcp(&w, &two, "x/a", "y/a", 80), "any pod of x");
    }

    #[test]
    fn ports_protocols_ranges_and_named_ports() {
        let w = world();
        let only = |ports: Vec<PolicyPort>| {
            [Policy::new("x", "p", Selector::all()).ingress(Rule::all().ports(ports))]
        };
        let p = only(vec![PolicyPort::number(80)]);
        assert!(tcp(&w, &p, "y/a", "x/a", 80));
        assert!(!tcp(&w, &p, "y/a", "x/a", 81));
        assert!(
            !allowed(&w, &p, w.pod("y/a"), w.pod("x/a"), Protocol::Udp, 80),
            "TCP by default"
        );
        let p = only(vec![PolicyPort::protocol(Protocol::Udp)]);
        assert!(allowed(
            &w,
            &p,
            w.pod("y/a"),
            w.pod("x/a"),
            Protocol::Udp,
            4242
        ));
        assert!(!tcp(&w, &p, "y/a", "x/a", 80));
        let p = only(vec![PolicyPort::range(Protocol::Tcp, 81, 90)]);
        assert!(!tcp(&w, &p, "y/a", "x/a", 80));
        assert!(tcp(&w, &p, "y/a", "x/a", 81));
        assert!(tcp(&w, &p, "y/a", "x/a", 90));
        assert!(!tcp(&w, &p, "y/a", "x/a", 91));
        // The name resolves on the destination: 80 on x/a, 81 on x/b.
        let p = only(vec![PolicyPort::named(Protocol::Tcp, "web")]);
        assert!(tcp(&w, &p, "y/a", "x/a", 80));
        assert!(!tcp(&w, &p, "y/a", "x/a", 81));
        assert!(tcp(&w, &p, "y/a", "x/b", 81));
        assert!(!tcp(&w, &p, "y/a", "x/b", 80));
        let p = only(vec![PolicyPort::named(Protocol::Udp, "web")]);
        assert!(
            !allowed(&w, &p, w.pod("y/a"), w.pod("x/a"), Protocol::Udp, 80),
            "web is TCP"
        );
    }

    #[test]
    fn named_port_in_egress_resolves_on_the_destination() {
        let w = world();
        let p = [Policy::new("x", "p", Selector::labels(&[("pod", "a")]))
            .types(&[PolicyType::Egress])
            .egress(Rule::all().ports(vec![PolicyPort::named(Protocol::Tcp, "web")]))];
        assert!(tcp(&w, &p, "x/a", "x/b", 81), "x/b's web is 81");
        assert!(!tcp(&w, &p, "x/a", "x/b", 80));
        assert!(!tcp(&w, &p, "x/a", "y/a", 80), "y/a has no port named web");
        let outside = Endpoint::External(Ipv4Addr::new(192, 168, 0, 1));
        assert!(!egress_allowed(
            &w,
            &p,
            w.pod("x/a"),
            outside,
            Protocol::Tcp,
            80
        ));
    }

    #[test]
    fn ip_blocks_match_pod_ips_minus_excepts() {
        let w = world();
        let net: Cidr = "10.0.0.0/24".parse().unwrap();
        let p = [
            Policy::new("x", "p", Selector::all()).ingress(Rule::peers(vec![Peer::ip_block(
                net,
                &[Cidr::host(Ipv4Addr::new(10, 0, 0, 4))],
            )])),
        ];
        assert!(tcp(&w, &p, "x/b", "x/a", 80));
        assert!(!tcp(&w, &p, "y/a", "x/a", 80), "y/a is the except");
        let outside = Endpoint::External(Ipv4Addr::new(10, 0, 0, 200));
        assert!(ingress_allowed(
            &w,
            &p,
            outside,
            w.pod("x/a"),
            Protocol::Tcp,
            80
        ));
        let selector_peer = [Policy::new("x", "p", Selector::all())
            .ingress(Rule::peers(vec![Peer::namespaces(Selector::all())]))];
        assert!(
            !ingress_allowed(&w, &selector_peer, outside, w.pod("x/a"), Protocol::Tcp, 80),
            "a selector never matches a non-pod"
        );
    }

    #[test]
    fn policies_are_a_union() {
        let w = world();
        let p = [
            Policy::new("x", "from-x", Selector::labels(&[("pod", "a")])).ingress(
                Rule::peers(vec![Peer::pods(Selector::all())]).ports(vec![PolicyPort::number(80)]),
            ),
            Policy::new("x", "from-y", Selector::labels(&[("pod", "a")])).ingress(
                Rule::peers(vec![Peer::namespaces(Selector::labels(&[("ns", "y")]))])
                    .ports(vec![PolicyPort::number(81)]),
            ),
        ];
        assert!(tcp(&w, &p, "x/b", "x/a", 80));
        assert!(!tcp(&w, &p, "x/b", "x/a", 81));
        assert!(tcp(&w, &p, "y/a", "x/a", 81));
        assert!(!tcp(&w, &p, "y/a", "x/a", 80));
    }

    #[test]
    fn both_directions_must_allow() {
        let w = world();
        let p = [
            Policy::new("x", "egress", Selector::labels(&[("pod", "a")])).egress(Rule::peers(
                vec![Peer::namespaces(Selector::labels(&[("ns", "y")]))],
            )),
            Policy::new("y", "ingress", Selector::all()).ingress(Rule::peers(vec![Peer::pods_in(
                Selector::all(),
                Selector::labels(&[("pod", "b")]),
            )])),
        ];
        assert!(
            !tcp(&w, &p, "x/a", "y/a", 80),
            "egress allows, ingress does not"
        );
        assert!(
            !tcp(&w, &p, "x/b", "x/a", 80),
            "policy 'egress' isolates x/a's ingress too"
        );
        assert!(tcp(&w, &p, "x/b", "y/a", 80), "x/b is not egress-isolated");
    }
}
