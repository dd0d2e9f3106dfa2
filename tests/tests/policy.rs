//! `NetworkPolicy` enforcement, end to end, cyclonus style: namespaces x, y, z with pods a, b,
//! c each (see `ferrovia_tests::policy`), every pod probing every other on TCP and UDP ports 80
//! and 81; each scenario's observed truth table must equal the one the tests' own evaluator of
//! the API semantics computes. Plus a randomized differential test, label changes,
//! established connections and invalid policies. Needs root.
//!
//! Replay a random scenario: `FERROVIA_POLICY_SEED=<seed> cargo test -p ferrovia-tests --test
//! policy random`; more rounds: `FERROVIA_POLICY_ROUNDS=20`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ferrovia_tests::policy::PolicyCluster;
use ferrovia_tests::policy::cluster::Setup;
use ferrovia_tests::policy::random::{self, fresh_seed};
use ferrovia_tests::policy::spec::{
    Cidr, Operator, Peer, Policy, PolicyPort, PolicyType, PortRef, Protocol, Rule, Selector,
    Service, ServicePort, World,
};
use ferrovia_tests::sys::monotonic_ns;
use ferrovia_tests::{AgentOpts, ProbeResult, ProbeSpec};

use PolicyType::{Egress, Ingress};

/// A scenario: its name and how it is built from the cluster's base world and pod subnet.
type Scenario = (&'static str, fn(&World, Cidr) -> Setup);

// ---- selectors and peers, shorthand ----

fn pod(name: &str) -> Selector {
    Selector::labels(&[("pod", name)])
}

fn ns(name: &str) -> Selector {
    Selector::labels(&[("ns", name)])
}

fn all() -> Selector {
    Selector::all()
}

fn ip(w: &World, id: &str) -> Ipv4Addr {
    w.pod(id).ip
}

/// A policy in `namespace` selecting `selector` whose only rule is the ingress `rule`.
fn allow_in(namespace: &str, name: &str, selector: Selector, rule: Rule) -> Policy {
    Policy::new(namespace, name, selector).ingress(rule)
}

fn deny_ingress(namespace: &str) -> Policy {
    Policy::new(namespace, "deny-ingress", all()).types(&[Ingress])
}

fn deny_egress(namespace: &str) -> Policy {
    Policy::new(namespace, "deny-egress", all()).types(&[Egress])
}

/// The service of x/a: port 80 → 80 on TCP and UDP, and 8081 → the named port 81.
fn web_service() -> Service {
    let port = |name: &str, protocol, port, target| ServicePort {
        name: name.to_owned(),
        protocol,
        port,
        target,
    };
    Service {
        namespace: "x".into(),
        name: "web".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
        selector: [("pod".to_owned(), "a".to_owned())].into(),
        ports: vec![
            port("tcp-80", Protocol::Tcp, 80, PortRef::Number(80)),
            port("udp-80", Protocol::Udp, 80, PortRef::Number(80)),
            port(
                "tcp-81",
                Protocol::Tcp,
                8081,
                PortRef::Name("serve-81-tcp".into()),
            ),
            port(
                "udp-81",
                Protocol::Udp,
                8081,
                PortRef::Name("serve-81-udp".into()),
            ),
        ],
    }
}

// ---- the scenarios ----

fn no_policy(w: &World, _: Cidr) -> Setup {
    Setup::new(w)
}

fn default_deny_ingress(w: &World, _: Cidr) -> Setup {
    Setup::new(w).policy(deny_ingress("x"))
}

fn default_deny_egress(w: &World, _: Cidr) -> Setup {
    Setup::new(w).policy(deny_egress("x"))
}

fn deny_all_both_directions(w: &World, _: Cidr) -> Setup {
    Setup::new(w).policy(Policy::new("x", "deny-all", all()).types(&[Ingress, Egress]))
}

fn allow_all_ingress_over_deny(w: &World, _: Cidr) -> Setup {
    Setup::new(w)
        .policy(deny_ingress("x"))
        .policy(allow_in("x", "allow-all", all(), Rule::all()))
}

fn allow_all_egress_over_deny(w: &World, _: Cidr) -> Setup {
    Setup::new(w).policy(deny_egress("x")).policy(
        Policy::new("x", "allow-all", all())
            .types(&[Egress])
            .egress(Rule::all()),
    )
}

fn allow_from_pod_b_same_namespace(w: &World, _: Cidr) -> Setup {
    Setup::new(w).policy(allow_in(
        "x",
        "from-b",
        all(),
        Rule::peers(vec![Peer::pods(pod("b"))]),
    ))
}

fn allow_from_namespace_y(w: &World, _: Cidr) -> Setup {
    Setup::new(w).policy(allow_in(
        "x",
        "from-y",
        all(),
        Rule::peers(vec![Peer::namespaces(ns("y"))]),
    ))
}

fn allow_from_metadata_name_label(w: &World, _: Cidr) -> Setup {
    let by_name = Selector::labels(&[("kubernetes.io/metadata.name", "z")]);
    Setup::new(w).policy(allow_in(
        "x",
        "from-z",
        all(),
        Rule::peers(vec![Peer::namespaces(by_name)]),
    ))
}

fn yz() -> Selector {
    all().expr("ns", Operator::In, &["y", "z"])
}

fn allow_pod_a_in_yz_one_peer(w: &World, _: Cidr) -> Setup {
    let peer = Peer::pods_in(yz(), pod("a"));
    Setup::new(w).policy(allow_in("x", "a-in-yz", all(), Rule::peers(vec![peer])))
}

fn allow_pod_a_or_yz_two_peers(w: &World, _: Cidr) -> Setup {
    let peers = vec![Peer::namespaces(yz()), Peer::pods(pod("a"))];
    Setup::new(w).policy(allow_in("x", "a-or-yz", all(), Rule::peers(peers)))
}

fn pod_expression_in(w: &World, _: Cidr) -> Setup {
    let from = all().expr("pod", Operator::In, &["a", "c"]);
    Setup::new(w).policy(allow_in(
        "x",
        "in",
        pod("a"),
        Rule::peers(vec![Peer::pods(from)]),
    ))
}

fn pod_expression_not_in_absent_key(w: &World, _: Cidr) -> Setup {
    // c has no tier: NotIn matches it.
    let from = all().expr("tier", Operator::NotIn, &["web"]);
    Setup::new(w).policy(allow_in(
        "x",
        "not-in",
        all(),
        Rule::peers(vec![Peer::pods(from)]),
    ))
}

fn pod_expression_exists(w: &World, _: Cidr) -> Setup {
    let from = all().expr("tier", Operator::Exists, &[]);
    Setup::new(w).policy(allow_in(
        "y",
        "exists",
        all(),
        Rule::peers(vec![Peer::pods_in(all(), from)]),
    ))
}

fn pod_expression_does_not_exist(w: &World, _: Cidr) -> Setup {
    let target = all().expr("tier", Operator::DoesNotExist, &[]);
    Setup::new(w).policy(Policy::new("z", "untiered-isolated", target).types(&[Ingress, Egress]))
}

fn expressions_and_labels_combined(w: &World, _: Cidr) -> Setup {
    let from_ns = Selector::labels(&[("ns", "y")]).expr("env", Operator::Exists, &[]);
    let from_pods =
        all()
            .expr("pod", Operator::NotIn, &["a"])
            .expr("tier", Operator::In, &["db", "web"]);
    Setup::new(w).policy(allow_in(
        "x",
        "combined",
        all(),
        Rule::peers(vec![Peer::pods_in(from_ns, from_pods)]),
    ))
}

fn namespace_expression_not_in(w: &World, _: Cidr) -> Setup {
    // z has no env label: NotIn [prod] selects y and z.
    let from = all().expr("env", Operator::NotIn, &["prod"]);
    Setup::new(w).policy(allow_in(
        "x",
        "not-prod",
        all(),
        Rule::peers(vec![Peer::namespaces(from)]),
    ))
}

fn namespace_selector_empty_is_all_namespaces(w: &World, _: Cidr) -> Setup {
    Setup::new(w).policy(allow_in(
        "x",
        "any-ns",
        all(),
        Rule::peers(vec![Peer::namespaces(all())]),
    ))
}

fn namespace_selector_empty_with_pod_c(w: &World, _: Cidr) -> Setup {
    Setup::new(w).policy(allow_in(
        "x",
        "c-anywhere",
        pod("a"),
        Rule::peers(vec![Peer::pods_in(all(), pod("c"))]),
    ))
}

fn ingress_tcp_80_only(w: &World, _: Cidr) -> Setup {
    Setup::new(w).policy(allow_in(
        "x",
        "tcp-80",
        all(),
        Rule::all().ports(vec![PolicyPort::number(80)]),
    ))
}

fn ingress_udp_81_only(w: &World, _: Cidr) -> Setup {
    Setup::new(w).policy(allow_in(
        "x",
        "udp-81",
        all(),
        Rule::all().ports(vec![PolicyPort::udp(81)]),
    ))
}

fn protocol_only_all_udp_ports(w: &World, _: Cidr) -> Setup {
    let rule = Rule::peers(vec![Peer::namespaces(ns("y"))])
        .ports(vec![PolicyPort::protocol(Protocol::Udp)]);
    Setup::new(w).policy(allow_in("x", "all-udp", all(), rule))
}

fn mixed_ports_in_one_rule(w: &World, _: Cidr) -> Setup {
    let rule = Rule::all().ports(vec![PolicyPort::udp(80), PolicyPort::tcp(81)]);
    Setup::new(w).policy(allow_in("y", "udp80-tcp81", all(), rule))
}

fn named_port_ingress(w: &World, _: Cidr) -> Setup {
    let rule = Rule::all().ports(vec![PolicyPort::named(Protocol::Tcp, "serve-81-tcp")]);
    Setup::new(w).policy(allow_in("x", "named-81", all(), rule))
}

fn named_port_ingress_per_pod(w: &World, _: Cidr) -> Setup {
    // "web" is 80 on a, 81 on b, absent on c.
    let rule = Rule::all().ports(vec![PolicyPort::named(Protocol::Tcp, "web")]);
    Setup::new(w).policy(allow_in("y", "named-web", all(), rule))
}

fn named_port_egress_per_destination(w: &World, _: Cidr) -> Setup {
    let rule = Rule::all().ports(vec![PolicyPort::named(Protocol::Tcp, "web")]);
    Setup::new(w).policy(
        Policy::new("x", "egress-web", all())
            .types(&[Egress])
            .egress(rule),
    )
}

fn named_port_udp_name_on_tcp(w: &World, _: Cidr) -> Setup {
    // serve-80-udp is a UDP port: asked for over TCP it names nothing.
    let rule = Rule::all().ports(vec![PolicyPort::named(Protocol::Tcp, "serve-80-udp")]);
    Setup::new(w).policy(allow_in("x", "wrong-proto-name", all(), rule))
}

fn end_port_range_80_81(w: &World, _: Cidr) -> Setup {
    let rule = Rule::all().ports(vec![PolicyPort::range(Protocol::Tcp, 80, 81)]);
    Setup::new(w).policy(allow_in("x", "range-80-81", all(), rule))
}

fn end_port_range_81_90(w: &World, _: Cidr) -> Setup {
    let rule = Rule::all().ports(vec![PolicyPort::range(Protocol::Udp, 81, 90)]);
    Setup::new(w).policy(allow_in("x", "range-81-90", all(), rule))
}

fn ip_block_except_ingress(w: &World, subnet: Cidr) -> Setup {
    let block = Peer::ip_block(subnet, &[Cidr::host(ip(w, "y/b"))]);
    Setup::new(w).policy(allow_in(
        "x",
        "subnet-but-yb",
        all(),
        Rule::peers(vec![block]),
    ))
}

fn ip_block_except_egress(w: &World, subnet: Cidr) -> Setup {
    let block = Peer::ip_block(subnet, &[Cidr::host(ip(w, "z/c"))]);
    Setup::new(w).policy(
        Policy::new("x", "to-subnet-but-zc", all())
            .types(&[Egress])
            .egress(Rule::peers(vec![block])),
    )
}

fn ip_block_single_pod(w: &World, _: Cidr) -> Setup {
    let block = Peer::ip_block(Cidr::host(ip(w, "y/a")), &[]);
    Setup::new(w).policy(allow_in("x", "only-ya", all(), Rule::peers(vec![block])))
}

/// The subnet minus every sub-block that does not hold z/b: eight excepts, one pod left.
fn ip_block_excepts_all_but_one_pod(w: &World, subnet: Cidr) -> Setup {
    let keep = ip(w, "z/b");
    let excepts: Vec<Cidr> = (subnet.len + 1..=32)
        .map(|len| {
            // The sibling, at this length, of the block holding `keep`.
            let bit = 1u32 << (32 - len);
            Cidr::new(Ipv4Addr::from(u32::from(keep) ^ bit), len)
        })
        .collect();
    let block = Peer::ip_block(subnet, &excepts);
    Setup::new(w).policy(allow_in("y", "only-zb", all(), Rule::peers(vec![block])))
}

fn ip_block_outside_the_pods(w: &World, subnet: Cidr) -> Setup {
    // Everything but the pod subnet: no pod matches, so x's ingress is closed to pods.
    let block = Peer::ip_block("0.0.0.0/0".parse().unwrap(), &[subnet]);
    Setup::new(w).policy(allow_in(
        "x",
        "world-not-pods",
        all(),
        Rule::peers(vec![block]),
    ))
}

fn egress_to_namespace_y_on_81(w: &World, _: Cidr) -> Setup {
    let rule = Rule::peers(vec![Peer::namespaces(ns("y"))]).ports(vec![PolicyPort::number(81)]);
    Setup::new(w).policy(
        Policy::new("x", "to-y-81", all())
            .types(&[Egress])
            .egress(rule),
    )
}

fn two_policies_union_on_one_pod(w: &World, _: Cidr) -> Setup {
    let from = |n: &str| Rule::peers(vec![Peer::namespaces(ns(n))]);
    Setup::new(w)
        .policy(allow_in(
            "x",
            "a-80-from-y",
            pod("a"),
            from("y").ports(vec![PolicyPort::number(80)]),
        ))
        .policy(allow_in(
            "x",
            "a-81-from-z",
            pod("a"),
            from("z").ports(vec![PolicyPort::number(81)]),
        ))
}

fn egress_type_only_ignores_ingress_rules(w: &World, _: Cidr) -> Setup {
    let p = Policy::new("x", "egress-only", all())
        .types(&[Egress])
        .ingress(Rule::peers(vec![Peer::pods(pod("b"))]))
        .egress(Rule::peers(vec![Peer::namespaces(ns("y"))]));
    Setup::new(w).policy(p)
}

fn types_absent_with_egress_rules_isolate_both(w: &World, _: Cidr) -> Setup {
    let p = Policy::new("x", "both-by-default", pod("b"))
        .ingress(Rule::peers(vec![Peer::namespaces(ns("y"))]))
        .egress(Rule::peers(vec![Peer::namespaces(ns("z"))]));
    Setup::new(w).policy(p)
}

fn selector_matching_no_pod_has_no_effect(w: &World, _: Cidr) -> Setup {
    Setup::new(w).policy(Policy::new("x", "nobody", pod("nobody")).types(&[Ingress, Egress]))
}

fn explicit_empty_lists_mean_all(w: &World, _: Cidr) -> Setup {
    let rule = Rule {
        peers: Some(vec![]),
        ports: Some(vec![]),
    };
    Setup::new(w)
        .policy(Policy::new("y", "deny-all", all()).types(&[Ingress, Egress]))
        .policy(allow_in("y", "empty-lists", pod("a"), rule.clone()))
        .policy(
            Policy::new("y", "empty-lists-egress", pod("b"))
                .types(&[Egress])
                .egress(rule),
        )
}

fn policies_in_two_namespaces_meet(w: &World, _: Cidr) -> Setup {
    // x may only talk to y; y only accepts x/c on 80.
    Setup::new(w)
        .policy(
            Policy::new("x", "to-y", all())
                .types(&[Egress])
                .egress(Rule::peers(vec![Peer::namespaces(ns("y"))])),
        )
        .policy(allow_in(
            "y",
            "from-xc",
            all(),
            Rule::peers(vec![Peer::pods_in(ns("x"), pod("c"))]).ports(vec![PolicyPort::number(80)]),
        ))
}

fn cluster_ip_judged_on_its_backend(w: &World, _: Cidr) -> Setup {
    // x/a accepts only y on TCP 80 (and x/b on everything): the VIP follows x/a's verdicts.
    Setup::new(w)
        .service(web_service())
        .policy(allow_in(
            "x",
            "a-from-y-80",
            pod("a"),
            Rule::peers(vec![Peer::namespaces(ns("y"))]).ports(vec![PolicyPort::tcp(80)]),
        ))
        .policy(allow_in(
            "x",
            "a-from-b",
            pod("a"),
            Rule::peers(vec![Peer::pods(pod("b"))]),
        ))
}

fn cluster_ip_with_egress_policy(w: &World, _: Cidr) -> Setup {
    // z may reach x/a on 81 only (the service's 8081): egress is judged on the backend port.
    Setup::new(w).service(web_service()).policy(
        Policy::new("z", "to-xa-81", all()).types(&[Egress]).egress(
            Rule::peers(vec![Peer::pods_in(ns("x"), pod("a"))])
                .ports(vec![PolicyPort::number(81), PolicyPort::udp(81)]),
        ),
    )
}

fn hairpin_denied(w: &World, _: Cidr) -> Setup {
    // x/a accepts x/b and x/c, not itself: its own call through the VIP is denied.
    let others = all().expr("pod", Operator::NotIn, &["a"]);
    Setup::new(w).service(web_service()).policy(allow_in(
        "x",
        "a-not-from-itself",
        pod("a"),
        Rule::peers(vec![Peer::pods(others)]),
    ))
}

fn hairpin_allowed(w: &World, _: Cidr) -> Setup {
    Setup::new(w)
        .service(web_service())
        .policy(allow_in(
            "x",
            "a-from-itself",
            pod("a"),
            Rule::peers(vec![Peer::pods(pod("a"))]),
        ))
        .policy(
            Policy::new("x", "a-egress-itself", pod("a"))
                .types(&[Egress])
                .egress(Rule::peers(vec![Peer::pods(pod("a"))])),
        )
}

fn hairpin_denied_by_egress(w: &World, _: Cidr) -> Setup {
    // x/a may send only to y: its egress to itself is denied, though its ingress is open.
    Setup::new(w).service(web_service()).policy(
        Policy::new("x", "a-to-y", pod("a"))
            .types(&[Egress])
            .egress(Rule::peers(vec![Peer::namespaces(ns("y"))])),
    )
}

const SCENARIOS: &[Scenario] = &[
    ("no policy", no_policy),
    ("default deny ingress in x", default_deny_ingress),
    ("default deny egress in x", default_deny_egress),
    ("deny all both directions in x", deny_all_both_directions),
    ("allow all ingress over a deny", allow_all_ingress_over_deny),
    ("allow all egress over a deny", allow_all_egress_over_deny),
    (
        "allow from pod=b in the same namespace",
        allow_from_pod_b_same_namespace,
    ),
    ("allow from namespace y", allow_from_namespace_y),
    (
        "allow from kubernetes.io/metadata.name=z",
        allow_from_metadata_name_label,
    ),
    ("pod=a in ns In (y,z): one peer", allow_pod_a_in_yz_one_peer),
    (
        "pod=a or ns In (y,z): two peers",
        allow_pod_a_or_yz_two_peers,
    ),
    ("podSelector In", pod_expression_in),
    (
        "podSelector NotIn, key absent",
        pod_expression_not_in_absent_key,
    ),
    ("podSelector Exists", pod_expression_exists),
    ("podSelector DoesNotExist", pod_expression_does_not_exist),
    (
        "matchLabels and expressions ANDed",
        expressions_and_labels_combined,
    ),
    (
        "namespaceSelector NotIn, key absent",
        namespace_expression_not_in,
    ),
    (
        "namespaceSelector {}: all namespaces",
        namespace_selector_empty_is_all_namespaces,
    ),
    (
        "namespaceSelector {} with pod=c",
        namespace_selector_empty_with_pod_c,
    ),
    ("ingress TCP 80 only", ingress_tcp_80_only),
    ("ingress UDP 81 only", ingress_udp_81_only),
    ("protocol only: all UDP ports", protocol_only_all_udp_ports),
    ("UDP 80 and TCP 81 in one rule", mixed_ports_in_one_rule),
    ("named port serve-81-tcp, ingress", named_port_ingress),
    (
        "named port web resolved per pod, ingress",
        named_port_ingress_per_pod,
    ),
    (
        "named port web in egress, per destination",
        named_port_egress_per_destination,
    ),
    ("named UDP port asked over TCP", named_port_udp_name_on_tcp),
    ("endPort range 80-81", end_port_range_80_81),
    ("endPort range 81-90 covers 81 only", end_port_range_81_90),
    (
        "ipBlock subnet except one pod, ingress",
        ip_block_except_ingress,
    ),
    (
        "ipBlock subnet except one pod, egress",
        ip_block_except_egress,
    ),
    ("ipBlock one pod /32", ip_block_single_pod),
    (
        "ipBlock excepts all but one pod",
        ip_block_excepts_all_but_one_pod,
    ),
    ("ipBlock outside the pod subnet", ip_block_outside_the_pods),
    (
        "egress to namespace y on port 81",
        egress_to_namespace_y_on_81,
    ),
    (
        "two policies unioned on one pod",
        two_policies_union_on_one_pod,
    ),
    (
        "policyTypes [Egress] ignores ingress rules",
        egress_type_only_ignores_ingress_rules,
    ),
    (
        "policyTypes absent with egress rules",
        types_absent_with_egress_rules_isolate_both,
    ),
    (
        "selector matching no pod",
        selector_matching_no_pod_has_no_effect,
    ),
    (
        "explicit empty from/to/ports lists",
        explicit_empty_lists_mean_all,
    ),
    (
        "egress of x meets ingress of y",
        policies_in_two_namespaces_meet,
    ),
    (
        "ClusterIP judged on its backend",
        cluster_ip_judged_on_its_backend,
    ),
    (
        "ClusterIP with an egress policy",
        cluster_ip_with_egress_policy,
    ),
    ("hairpin through the VIP, ingress denied", hairpin_denied),
    ("hairpin through the VIP, allowed", hairpin_allowed),
    (
        "hairpin through the VIP, egress denied",
        hairpin_denied_by_egress,
    ),
];

/// Runs `scenarios` on `cluster`, then fails once, with every failing scenario's report.
fn run_all(cluster: &PolicyCluster, scenarios: &[Scenario]) {
    let started = Instant::now();
    let mut failures = Vec::new();
    for (name, build) in scenarios {
        let setup = build(&cluster.world, cluster.subnet());
        match cluster.check(name, &setup) {
            Ok(None) => {}
            Ok(Some(report)) => failures.push(report),
            Err(e) => failures.push(format!("=== scenario {name:?}: {e:#}\n")),
        }
    }
    eprintln!("{} scenarios in {:.1?}", scenarios.len(), started.elapsed());
    assert!(
        failures.is_empty(),
        "{} of {} scenarios failed:\n\n{}",
        failures.len(),
        scenarios.len(),
        failures.join("\n")
    );
}

/// Every scenario, on the default data path (socket-level LB), in two halves on a cluster each
/// so that the test threads share them (the whole list is the longest test by far; in a VM of
/// the kernel matrix it alone took most of the suite's time).
#[test]
fn truth_tables_1_of_2() {
    truth_tables_part(0);
}

/// See [`truth_tables_1_of_2`].
#[test]
fn truth_tables_2_of_2() {
    truth_tables_part(1);
}

/// Part `part` (from 0) of two of [`SCENARIOS`].
fn truth_tables_part(part: usize) {
    let half = SCENARIOS.len().div_ceil(2);
    let scenarios = &SCENARIOS[part * half..SCENARIOS.len().min((part + 1) * half)];
    assert!(!scenarios.is_empty());
    let cluster = PolicyCluster::new(AgentOpts::default()).expect("policy cluster");
    run_all(&cluster, scenarios);
}

/// The scenarios with a service again on the per-packet path (`--socket-lb=false`), where the
/// VIP is translated at the client's veth and a hairpin is `SNATed` to the VIP.
#[test]
fn truth_tables_through_services_on_the_tc_path() {
    let opts = AgentOpts {
        socket_lb: false,
        ..AgentOpts::default()
    };
    let cluster = PolicyCluster::new(opts).expect("policy cluster");
    let with_services: Vec<Scenario> = SCENARIOS
        .iter()
        .copied()
        .filter(|(_, build)| !build(&cluster.world, cluster.subnet()).services.is_empty())
        .collect();
    assert!(with_services.len() >= 4);
    run_all(&cluster, &with_services);
}

/// Labels change under a policy: a peer pod and a peer namespace lose or gain the labels the
/// policy selects on, then the selected pod itself changes; each step's table follows.
#[test]
fn label_changes_take_effect() {
    let cluster = PolicyCluster::new(AgentOpts::default()).expect("policy cluster");
    let policy = allow_in(
        "x",
        "protected",
        Selector::labels(&[("protected", "yes")]),
        Rule::peers(vec![Peer::pods_in(
            Selector::labels(&[("team", "blue")]),
            Selector::labels(&[("role", "client")]),
        )]),
    );
    let mut world = cluster.world.clone();
    world
        .pod_mut("x/a")
        .labels
        .insert("protected".into(), "yes".into());
    world
        .namespace_mut("y")
        .labels
        .insert("team".into(), "blue".into());
    world
        .pod_mut("y/b")
        .labels
        .insert("role".into(), "client".into());
    world
        .pod_mut("z/c")
        .labels
        .insert("role".into(), "client".into());
    let mut failures = Vec::new();
    let mut step = |name: &str, world: &World| {
        let setup = Setup::new(world).policy(policy.clone());
        match cluster.check(name, &setup) {
            Ok(None) => {}
            Ok(Some(report)) => failures.push(report),
            Err(e) => failures.push(format!("=== {name}: {e:#}")),
        }
    };
    step("before: y/b may reach x/a", &world);
    // The team moves from y to z: now z/c is the one allowed, y/b no longer.
    world.namespace_mut("y").labels.remove("team");
    world
        .namespace_mut("z")
        .labels
        .insert("team".into(), "blue".into());
    step("namespace labels moved: z/c may reach x/a", &world);
    // z/c stops being a client; y/b is one again but y is no team's.
    world.pod_mut("z/c").labels.remove("role");
    step("pod label removed: nobody may reach x/a", &world);
    // The protection moves from x/a to x/b.
    world.pod_mut("x/a").labels.remove("protected");
    world
        .pod_mut("x/b")
        .labels
        .insert("protected".into(), "yes".into());
    world
        .pod_mut("z/c")
        .labels
        .insert("role".into(), "client".into());
    step("selected pod changed: x/b protected, x/a open", &world);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Established TCP connections and a policy change: one that stays allowed keeps working (no
/// failed request, no reconnect); one that becomes denied fails on its next request after
/// the sync. Among those kept: z/a → z/b while z/a becomes isolated for ingress and z/b for
/// egress, both with no rule — the connection is still allowed (z/a's egress and z/b's
/// ingress are open), so its replies must keep passing, though no packet of it was judged
/// by a policy before.
#[test]
fn established_connections_follow_policy_changes() {
    let cluster = PolicyCluster::new(AgentOpts::default()).expect("policy cluster");
    // A request has 5 s while its connection is allowed (an emulated VM on a loaded machine
    // can be slow, never wrong); the connection to be cut 3 s, so its failures come sooner.
    let stream = |from: &str, to: &str, timeout: Duration| {
        let spec = ProbeSpec::tcp(SocketAddr::from((cluster.world.pod(to).ip, 80)))
            .persistent()
            .count(0)
            .interval(Duration::from_millis(50))
            .timeout(timeout);
        cluster.pod(from).probe_stream(&spec).expect("probe stream")
    };
    let kept = stream("y/a", "x/b", Duration::from_secs(5));
    let cut = stream("y/a", "x/a", Duration::from_secs(3));
    let replies = stream("z/a", "z/b", Duration::from_secs(5));
    for s in [&kept, &cut, &replies] {
        let r = s
            .wait_for(5, Duration::from_secs(20))
            .expect("stream results");
        assert!(r.iter().all(|r| r.ok), "before any policy: {r:?}");
    }
    // x/b: a policy that still admits y (unrelated to the stream's verdict); x/a: closed to y.
    let setup = Setup::new(&cluster.world)
        .policy(allow_in(
            "x",
            "b-from-y",
            pod("b"),
            Rule::peers(vec![Peer::namespaces(ns("y"))]),
        ))
        .policy(allow_in(
            "x",
            "a-from-x",
            pod("a"),
            Rule::peers(vec![Peer::pods(all())]),
        ))
        .policy(Policy::new("z", "a-no-ingress", pod("a")).types(&[Ingress]))
        .policy(Policy::new("z", "b-no-egress", pod("b")).types(&[Egress]));
    let rejected = cluster.apply(&setup).expect("apply");
    assert_eq!(rejected, Vec::<String>::new());
    // The sync has returned: the maps hold the new policies. Requests are placed against it
    // by the time they began (one clock for the probes and the test), not by how many results
    // the reader had seen, which lags the probe.
    let synced = monotonic_ns();
    let after_sync =
        |n: usize| move |r: &[ProbeResult]| r.iter().filter(|r| r.started_ns > synced).count() >= n;
    let started_after = |r: Vec<ProbeResult>| -> Vec<ProbeResult> {
        r.into_iter().filter(|r| r.started_ns > synced).collect()
    };
    let cut_after = started_after(
        cut.wait_until(
            "3 requests after the sync",
            Duration::from_mins(1),
            after_sync(3),
        )
        .expect("stream results"),
    );
    assert!(
        cut_after.iter().all(|r| !r.ok),
        "every request to x/a begun after the sync returned must fail: {cut_after:?}"
    );
    let kept_all = kept
        .wait_until(
            "10 requests after the sync",
            Duration::from_mins(1),
            after_sync(10),
        )
        .expect("stream results");
    let failed: Vec<_> = kept_all.iter().filter(|r| !r.ok || r.conn != 1).collect();
    assert!(
        failed.is_empty(),
        "the connection to x/b, still allowed, must carry on untouched: {failed:?}"
    );
    let replies_all = replies
        .wait_until(
            "10 requests after the sync",
            Duration::from_mins(1),
            after_sync(10),
        )
        .expect("stream results");
    let failed: Vec<_> = replies_all
        .iter()
        .filter(|r| !r.ok || r.conn != 1)
        .collect();
    assert!(
        failed.is_empty(),
        "z/a → z/b is still allowed: its replies must pass the newly isolated sides: {failed:?}"
    );
    // The matrix agrees too (the streams are still running).
    if let Some(report) = cluster
        .verify("after the change", &setup, &[])
        .expect("probe")
    {
        panic!("{report}");
    }
}

/// Invalid policies are rejected with their object and field named, the valid ones are still
/// enforced, and a policy made invalid keeps its last good version in force.
#[test]
fn invalid_policies_are_rejected_and_the_last_good_version_stays() {
    let cluster = PolicyCluster::new(AgentOpts::default()).expect("policy cluster");
    let subnet = cluster.subnet();
    let valid = allow_in(
        "x",
        "from-y",
        all(),
        Rule::peers(vec![Peer::namespaces(ns("y"))]),
    );
    let setup = Setup::new(&cluster.world).policy(valid);
    cluster.write(&setup).expect("write");
    // Each would close y to everyone if it were (wrongly) taken in. (`"y"` is quoted: a plain
    // y is YAML 1.1's true, for Kubernetes' reader and the agent's alike.)
    let invalid = |name: &str, rule: &str| {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: {name}, namespace: \"y\"}}\n\
             spec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n  ingress:\n  - {rule}\n"
        )
    };
    let docs = [
        invalid("bad-cidr", "from: [{ipBlock: {cidr: 10.0.0.0/33}}]"),
        invalid(
            "except-outside",
            &format!("from: [{{ipBlock: {{cidr: \"{subnet}\", except: [192.168.0.0/24]}}}}]"),
        ),
        invalid("end-below-start", "ports: [{port: 81, endPort: 80}]"),
        invalid(
            "named-with-end",
            "ports: [{port: serve-80-tcp, endPort: 81}]",
        ),
    ];
    cluster
        .node
        .write_manifest("invalid.yaml", &docs.concat())
        .expect("write");
    let rejected = cluster.sync().expect("sync");
    let expect = [
        ("y/bad-cidr", "spec.ingress[0].from[0].ipBlock.cidr"),
        (
            "y/except-outside",
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        ("y/end-below-start", "spec.ingress[0].ports[0].endPort"),
        ("y/named-with-end", "spec.ingress[0].ports[0].endPort"),
    ];
    let mut problems = Vec::new();
    for (object, field) in expect {
        if !rejected
            .iter()
            .any(|r| r.contains(object) && r.contains(field))
        {
            problems.push(format!("no rejection names {object} and {field}"));
        }
    }
    if rejected.len() != expect.len() {
        problems.push(format!(
            "{} rejections for {} bad objects",
            rejected.len(),
            expect.len()
        ));
    }
    if let Some(report) = cluster
        .verify("valid policy beside invalid ones", &setup, &[])
        .expect("probe")
    {
        problems.push(report);
    }

    // The valid policy turns invalid (and would allow z instead): from-y stays in force.
    let broken = invalid("from-y", "from: [{namespaceSelector: {matchLabels: {ns: z}}}, {ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]")
        .replace("namespace: \"y\"", "namespace: x")
        .replace("  podSelector: {}\n  policyTypes: [Ingress]\n", "  podSelector: {}\n");
    cluster
        .node
        .write_manifest("policies.yaml", &broken)
        .expect("write");
    let rejected = cluster.sync().expect("sync");
    if !rejected
        .iter()
        .any(|r| r.contains("x/from-y") && r.contains("spec.ingress[0].from[1].ipBlock.except[0]"))
    {
        problems.push(format!(
            "the broken x/from-y is not reported: {rejected:#?}"
        ));
    }
    if let Some(report) = cluster
        .verify("last good version in force", &setup, &[])
        .expect("probe")
    {
        problems.push(report);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Randomized differential test: random labels and one to four random valid policies per
/// seed; the agent must accept them all and enforce exactly what the evaluator computes.
#[test]
fn random_policies_match_the_evaluator() {
    let seeds: Vec<u64> = if let Ok(s) = std::env::var("FERROVIA_POLICY_SEED") {
        vec![parse_seed(&s)]
    } else {
        let rounds = std::env::var("FERROVIA_POLICY_ROUNDS").ok().map_or(6, |r| {
            r.parse().expect("FERROVIA_POLICY_ROUNDS is a number")
        });
        (0..rounds).map(|_| fresh_seed()).collect()
    };
    eprintln!("random policy seeds: {seeds:?}");
    let cluster = PolicyCluster::new(AgentOpts::default()).expect("policy cluster");
    let mut failures = Vec::new();
    for seed in seeds {
        let generated = random::generate(seed, &cluster.world, cluster.subnet());
        let setup = Setup {
            world: generated.world,
            policies: generated.policies,
            services: Vec::new(),
        };
        let name = format!("random seed {seed}");
        match cluster.check(&name, &setup) {
            Ok(None) => {}
            Ok(Some(report)) => failures.push(format!(
                "{report}replay: FERROVIA_POLICY_SEED={seed} cargo test -p ferrovia-tests --test policy random\n"
            )),
            Err(e) => failures.push(format!("=== {name}: {e:#}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A seed in decimal or `0x` hex.
fn parse_seed(s: &str) -> u64 {
    let s = s.trim();
    s.strip_prefix("0x")
        .map_or_else(|| s.parse(), |hex| u64::from_str_radix(hex, 16))
        .unwrap_or_else(|e| panic!("FERROVIA_POLICY_SEED={s:?}: {e}"))
}
