//! `ferrovia explain SRC DST PROTO/PORT` end to end: the real agent on the x/y/z policy cluster
//! (`ferrovia_tests::policy`), a set of `NetworkPolicy` objects and services applied, then
//!
//! - a table of cases, each with the exact answer expected: the service and its backends, and
//!   per backend the egress and ingress verdict with the policies and rules behind it (allowed
//!   by a named rule, by a named port, denied by default, by port, by an `except`, not
//!   isolated, judged on the backend behind a VIP, a service without endpoints);
//! - every case, and every pod → pod flow of the truth table (TCP and UDP, ports 80 and 81),
//!   checked against the tests' own evaluator of the API (`policy::eval`, no agent code): each
//!   verdict present, and the path's, must be the evaluator's;
//! - a few cases against real traffic;
//! - the errors: a bad end, protocol or port names its field.
//!
//! Needs root and the workspace binaries (`cargo build --bins`).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ferrovia_tests::cli::ferrovia;
use ferrovia_tests::policy::eval::{self, Endpoint};
use ferrovia_tests::policy::spec::{
    Cidr, Peer, PodInfo, Policy, PolicyPort, PolicyType, PortRef, Protocol, Rule, Selector,
    Service, ServicePort, World,
};
use ferrovia_tests::policy::{PolicyCluster, Setup};
use ferrovia_tests::{AgentOpts, ProbeSpec, sys};
use serde_json::Value;

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PAIR_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);

fn pods(name: &str) -> Selector {
    Selector::labels(&[("pod", name)])
}

/// - `x/allow-from-y` on x/a: rule 0 from namespace y on TCP 80 and the named port
///   `serve-81-udp` (UDP 81 on every pod), rule 1 from pod b of x on every port;
/// - `x/deny-ingress`: every pod of x isolated for ingress;
/// - `y/block-except` on y/a: the pod subnet but x/c, on TCP and UDP 80;
/// - `z/egress-81` on z/b: egress to any pod on TCP 81 only.
///
/// Services: `x/web` (`WEB_VIP`) → x/a; `y/pair` (`PAIR_VIP`, TCP 8080 → 80) → y/a and y/b
/// (labelled `app=pair`); `z/empty` (`EMPTY_VIP`) selects nothing.
fn scenario(c: &PolicyCluster) -> Setup {
    let mut world = c.world.clone();
    for id in ["y/a", "y/b"] {
        world.pod_mut(id).labels.insert("app".into(), "pair".into());
    }
    let port = |name: &str, protocol, port, target| ServicePort {
        name: name.to_owned(),
        protocol,
        port,
        target,
    };
    let service = |ns: &str, name: &str, ip, selector: (&str, &str), ports| Service {
        namespace: ns.into(),
        name: name.into(),
        cluster_ip: ip,
        selector: [(selector.0.to_owned(), selector.1.to_owned())].into(),
        ports,
    };
    let x_c = world.pod("x/c").ip;
    Setup::new(&world)
        .policy(
            Policy::new("x", "allow-from-y", pods("a"))
                .ingress(
                    Rule::peers(vec![Peer::namespaces(Selector::labels(&[("ns", "y")]))]).ports(
                        vec![
                            PolicyPort::tcp(80),
                            PolicyPort::named(Protocol::Udp, "serve-81-udp"),
                        ],
                    ),
                )
                .ingress(Rule::peers(vec![Peer::pods(pods("b"))])),
        )
        .policy(Policy::new("x", "deny-ingress", Selector::all()).types(&[PolicyType::Ingress]))
        .policy(
            Policy::new("y", "block-except", pods("a")).ingress(
                Rule::peers(vec![Peer::ip_block(c.subnet(), &[Cidr::host(x_c)])])
                    .ports(vec![PolicyPort::tcp(80), PolicyPort::udp(80)]),
            ),
        )
        .policy(
            Policy::new("z", "egress-81", pods("b"))
                .types(&[PolicyType::Egress])
                .egress(
                    Rule::peers(vec![Peer::namespaces(Selector::all())])
                        .ports(vec![PolicyPort::tcp(81)]),
                ),
        )
        .service(service(
            "x",
            "web",
            WEB_VIP,
            ("pod", "a"),
            vec![port("http", Protocol::Tcp, 80, PortRef::Number(80))],
        ))
        .service(service(
            "y",
            "pair",
            PAIR_VIP,
            ("app", "pair"),
            vec![port("http", Protocol::Tcp, 8080, PortRef::Number(80))],
        ))
        .service(service(
            "z",
            "empty",
            EMPTY_VIP,
            ("pod", "nobody"),
            vec![
                port("dns", Protocol::Udp, 53, PortRef::Number(80)),
                port("http", Protocol::Tcp, 80, PortRef::Number(80)),
            ],
        ))
}

/// `ferrovia -o json explain SOURCE DESTINATION FLOW`, which must succeed.
fn explain(c: &PolicyCluster, source: &str, destination: &str, flow: &str) -> Value {
    let out = ferrovia(
        &c.node.api_socket(),
        &["-o", "json", "explain", source, destination, flow],
    )
    .expect("run ferrovia");
    assert!(
        out.status.success(),
        "ferrovia explain {source} {destination} {flow}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// A decision as `reason rule,rule…` (`ns/name[i]` for a rule, `ns/name` for a whole policy),
/// `-` when absent.
fn decision(d: &Value) -> String {
    if d.is_null() {
        return "-".into();
    }
    let rules: Vec<String> = d["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            let policy = format!(
                "{}/{}",
                r["namespace"].as_str().unwrap(),
                r["name"].as_str().unwrap()
            );
            match r["rule"].as_i64().unwrap() {
                -1 => policy,
                i => format!("{policy}[{i}]"),
            }
        })
        .collect();
    let reason = d["reason"].as_str().unwrap();
    let allowed = reason.starts_with("allowed");
    assert_eq!(d["allowed"], allowed, "{d}");
    assert_eq!(d["isolated"], reason != "allowed-not-isolated", "{d}");
    if rules.is_empty() {
        reason.to_owned()
    } else {
        format!("{reason} {}", rules.join(","))
    }
}

/// One path: (backend pod, backend port, egress, ingress, allowed).
type Row = (String, u64, String, String, bool);

fn rows(answer: &Value) -> Vec<Row> {
    answer["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .map(|p| {
            (
                p["backend"]["pod"].as_str().unwrap().to_owned(),
                p["port"].as_u64().unwrap(),
                decision(&p["egress"]),
                decision(&p["ingress"]),
                p["allowed"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// A path of the table, `pod:port EGRESS | INGRESS`, as a [`Row`]: allowed when both are.
fn row(path: &str) -> Row {
    let (backend, verdicts) = path.split_once(' ').unwrap();
    let (pod, port) = backend.split_once(':').unwrap();
    let (egress, ingress) = verdicts.split_once(" | ").unwrap();
    let allowed = [egress, ingress]
        .iter()
        .all(|d| *d == "-" || d.starts_with("allowed"));
    let port = port.parse().unwrap();
    (pod.into(), port, egress.into(), ingress.into(), allowed)
}

/// The table, every kind of answer at least once: the flow as `ferrovia explain` takes it
/// (`@ns/name`: that pod's address), the service (`ns/name port`; `-`: none), then each path as
/// `pod:port EGRESS | INGRESS`, each verdict as `reason rule,…` (`ns/name[i]` a rule, `ns/name`
/// a whole policy; `-`: not judged here). No path: the service rejects.
#[rustfmt::skip]
const CASES: &[(&str, &str, &[&str])] = &[
    // Allowed by a named rule: namespace y on TCP 80, then on the named port UDP 81.
    ("y/b x/a tcp/80", "-", &["x/a:80 allowed-not-isolated | allowed-by-rule x/allow-from-y[0]"]),
    ("y/b @x/a udp/81", "-", &["x/a:81 allowed-not-isolated | allowed-by-rule x/allow-from-y[0]"]),
    // Pod b of x, every port: the second rule.
    ("x/b x/a udp/80", "-", &["x/a:80 allowed-not-isolated | allowed-by-rule x/allow-from-y[1]"]),
    // Denied by default: only deny-ingress selects x/b.
    ("z/c x/b tcp/80", "-", &["x/b:80 allowed-not-isolated | denied-by-default x/deny-ingress"]),
    // Denied by port: namespace y is a peer of rule 0, not on TCP 81.
    ("y/c x/a tcp/81", "-", &["x/a:81 allowed-not-isolated | denied-by-port x/allow-from-y,x/deny-ingress"]),
    // Denied by except: x/c is carved out of the block.
    ("x/c @y/a tcp/80", "-", &["y/a:80 allowed-not-isolated | denied-by-except y/block-except"]),
    // Not isolated at either end.
    ("z/a y/b udp/81", "-", &["y/b:81 allowed-not-isolated | allowed-not-isolated"]),
    // Egress: z/b only on TCP 81.
    ("z/b y/c tcp/80", "-", &["y/c:80 denied-by-port z/egress-81 | allowed-not-isolated"]),
    ("z/b y/c tcp/81", "-", &["y/c:81 allowed-by-rule z/egress-81[0] | allowed-not-isolated"]),
    // From an address of no pod: only the destination's ingress is judged here.
    ("192.0.2.1 x/a tcp/80", "-", &["x/a:80 - | denied-by-default x/allow-from-y,x/deny-ingress"]),
    // Through a VIP: judged on its backend and target port; a hairpin by the pod's own ingress.
    ("x/b 10.96.0.10 tcp/80", "x/web http", &["x/a:80 allowed-not-isolated | allowed-by-rule x/allow-from-y[1]"]),
    ("x/a 10.96.0.10 tcp/80", "x/web http", &["x/a:80 allowed-not-isolated | denied-by-default x/allow-from-y,x/deny-ingress"]),
    // Each backend of a VIP with its own verdict (listed by address in the answer).
    ("z/c 10.96.0.11 tcp/8080", "y/pair http", &[
        "y/a:80 allowed-not-isolated | allowed-by-rule y/block-except[0]",
        "y/b:80 allowed-not-isolated | allowed-not-isolated",
    ]),
    ("x/c 10.96.0.11 tcp/8080", "y/pair http", &[
        "y/a:80 allowed-not-isolated | denied-by-except y/block-except",
        "y/b:80 allowed-not-isolated | allowed-not-isolated",
    ]),
    // Egress judged on the translated destination: port 80, not 8080.
    ("z/b 10.96.0.11 tcp/8080", "y/pair http", &[
        "y/a:80 denied-by-port z/egress-81 | allowed-by-rule y/block-except[0]",
        "y/b:80 denied-by-port z/egress-81 | allowed-not-isolated",
    ]),
    // A service without endpoints: no path.
    ("x/a 10.96.0.12 udp/53", "z/empty dns", &[]),
    ("x/a 10.96.0.12 tcp/80", "z/empty http", &[]),
];

/// The pod with id or address `end`, if it is one.
fn pod_of<'a>(w: &'a World, end: &str) -> Option<&'a PodInfo> {
    w.pods
        .iter()
        .find(|p| p.id() == end || p.ip.to_string() == end)
}

fn protocol(flow: &str) -> (Protocol, u16) {
    let (proto, port) = flow.split_once('/').unwrap();
    let proto = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => panic!("{other}"),
    };
    (proto, port.parse().unwrap())
}

/// Each path of `answer` for a flow from `source` must carry the evaluator's verdicts: the
/// source's egress and the backend's ingress (where present: every pod here is this node's,
/// so only a source that is no pod has none), and their conjunction. Returns the failures.
fn disagreements(setup: &Setup, source: &str, flow: &str, answer: &Value) -> Vec<String> {
    let w = &setup.world;
    let (proto, _) = protocol(flow);
    let client = pod_of(w, source);
    let from = client.map_or_else(
        || Endpoint::External(source.parse().unwrap()),
        Endpoint::Pod,
    );
    let mut out = Vec::new();
    for p in answer["paths"].as_array().unwrap() {
        let backend = pod_of(w, p["backend"]["pod"].as_str().unwrap()).expect("a pod backend");
        let port = u16::try_from(p["port"].as_u64().unwrap()).unwrap();
        let ingress = eval::ingress_allowed(w, &setup.policies, from, backend, proto, port);
        let egress = client.is_none_or(|c| {
            eval::egress_allowed(w, &setup.policies, c, Endpoint::Pod(backend), proto, port)
        });
        let expected = [
            ("egress", client.map(|_| egress)),
            ("ingress", Some(ingress)),
            ("path", Some(egress && ingress)),
        ];
        let seen = [
            p["egress"]["allowed"].as_bool(),
            p["ingress"]["allowed"].as_bool(),
            p["allowed"].as_bool(),
        ];
        for ((what, want), got) in expected.into_iter().zip(seen) {
            if want != got {
                out.push(format!(
                    "{source} -> {} {flow}: {what} explained {got:?}, the evaluator says {want:?}",
                    backend.id()
                ));
            }
        }
    }
    out
}

/// One case of [`CASES`]: the exact answer, the evaluator's verdicts, no note.
fn check_case(c: &PolicyCluster, setup: &Setup, case: &(&str, &str, &[&str])) -> Vec<String> {
    let &(flow, service, paths) = case;
    let w = &setup.world;
    let [source, destination, flow] = flow.split(' ').collect::<Vec<_>>()[..] else {
        panic!("{flow}: not SOURCE DESTINATION PROTO/PORT")
    };
    let destination = destination
        .strip_prefix('@')
        .map_or_else(|| destination.to_owned(), |id| w.pod(id).ip.to_string());
    let what = format!("{source} -> {destination} {flow}");
    let answer = explain(c, source, &destination, flow);
    let mut failures = Vec::new();
    let mut expected: Vec<Row> = paths.iter().map(|p| row(p)).collect();
    expected.sort_by_key(|r| w.pod(&r.0).ip);
    let got = rows(&answer);
    if got != expected {
        failures.push(format!(
            "{what}: paths\n  got      {got:?}\n  expected {expected:?}"
        ));
    }
    let s = &answer["service"];
    let got_service = s.as_object().map_or_else(
        || "-".to_owned(),
        |_| {
            format!(
                "{}/{} {}",
                s["namespace"].as_str().unwrap(),
                s["name"].as_str().unwrap(),
                s["port_name"].as_str().unwrap()
            )
        },
    );
    if got_service != service || (service != "-" && s["rejects"] != paths.is_empty()) {
        failures.push(format!("{what}: service {s}, expected {service}"));
    }
    let (proto, port) = protocol(flow);
    let client = pod_of(w, source);
    if answer["source"]["pod"] != client.map_or(String::new(), PodInfo::id)
        || answer["source"]["local"] != client.is_some()
        || answer["protocol"] != proto.api_name()
        || answer["port"] != port
        || answer["policy_enforced"] != true
    {
        failures.push(format!("{what}: {answer}"));
    }
    if answer["notes"] != Value::Array(vec![]) {
        failures.push(format!(
            "{what}: the maps and the desired state differ: {}",
            answer["notes"]
        ));
    }
    failures.extend(disagreements(setup, source, flow, &answer));
    failures
}

/// The agent's `Explain` over one gRPC connection, answers as `ferrovia -o json explain`
/// prints them (its own renderer): the CLI itself is checked on the table of cases.
struct Api {
    rt: tokio::runtime::Runtime,
    client: ferrovia_proto::AgentClient<tonic::transport::Channel>,
}

impl Api {
    fn connect(c: &PolicyCluster) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let client = rt
            .block_on(ferrovia_agent::api::connect(&c.node.api_socket()))
            .expect("the agent's API");
        Self { rt, client }
    }

    fn explain(&mut self, source: &str, destination: &str, flow: &str) -> Value {
        let (protocol, port) = flow.split_once('/').expect("PROTO/PORT");
        let request = ferrovia_proto::v1::ExplainRequest {
            source: source.to_owned(),
            destination: destination.to_owned(),
            protocol: protocol.to_owned(),
            port: port.parse().expect("a port"),
        };
        let answer = self
            .rt
            .block_on(self.client.explain(request))
            .unwrap_or_else(|e| panic!("Explain {source} {destination} {flow}: {e}"))
            .into_inner();
        ferrovia_agent::api::render::explain_json(&answer)
    }
}

/// Every ordered pair of pods on TCP and UDP, ports 80 and 81, through `Explain` (the
/// destination alternately by name and by address), against the evaluator.
fn check_truth_table(c: &PolicyCluster, setup: &Setup) -> Vec<String> {
    let mut api = Api::connect(c);
    let w = &setup.world;
    let mut failures = Vec::new();
    let mut n = 0;
    for client in &w.pods {
        for server in w.pods.iter().filter(|s| s.id() != client.id()) {
            for flow in ["tcp/80", "tcp/81", "udp/80", "udp/81"] {
                let destination = if n % 2 == 0 {
                    server.id()
                } else {
                    server.ip.to_string()
                };
                n += 1;
                let answer = api.explain(&client.id(), &destination, flow);
                let (proto, port) = protocol(flow);
                let paths = answer["paths"].as_array().unwrap();
                if paths.len() != 1 || paths[0]["backend"]["pod"] != server.id() {
                    failures.push(format!("{} -> {destination} {flow}: {answer}", client.id()));
                    continue;
                }
                failures.extend(disagreements(setup, &client.id(), flow, &answer));
                // The evaluator's verdict for the whole flow, as the policy suite probes it.
                let expected = eval::allowed(w, &setup.policies, client, server, proto, port);
                if paths[0]["allowed"] != expected {
                    failures.push(format!(
                        "{} -> {} {flow}: not {expected}",
                        client.id(),
                        server.id()
                    ));
                }
            }
        }
    }
    assert_eq!(n, 9 * 8 * 4);
    failures
}

/// A few cases with real traffic: whether a request from `source` to `to` gets an answer.
fn check_traffic(c: &PolicyCluster) -> Vec<String> {
    let ip = |id: &str| c.world.pod(id).ip;
    let cases: [(&str, SocketAddr, bool); 7] = [
        ("y/b", (ip("x/a"), 80).into(), true),
        ("z/c", (ip("x/b"), 80).into(), false),
        ("y/c", (ip("x/a"), 81).into(), false),
        ("x/c", (ip("y/a"), 80).into(), false),
        ("z/b", (ip("y/c"), 80).into(), false),
        ("z/b", (ip("y/c"), 81).into(), true),
        ("x/b", (WEB_VIP, 80).into(), true),
    ];
    let mut failures = Vec::new();
    for (source, to, allowed) in cases {
        let flow = if to.port() == 81 { "tcp/81" } else { "tcp/80" };
        let explained =
            explain(c, source, &to.ip().to_string(), flow)["paths"][0]["allowed"] == true;
        // A denied SYN gets no answer: a short wait tells it; an allowed one may be slow.
        let timeout = Duration::from_secs(if allowed { 10 } else { 1 });
        let probe = c
            .pod(source)
            .probe(&ProbeSpec::tcp(to).timeout(timeout))
            .expect("probe");
        let answered = probe.first().is_some_and(|r| r.ok);
        if (explained, answered) != (allowed, allowed) {
            failures.push(format!("{source} -> {to}: explained {explained}, answered {answered}, expected {allowed}: {probe:?}"));
        }
    }
    failures
}

/// Bad requests fail, naming the field; nothing is printed on stdout.
fn check_errors(c: &PolicyCluster) -> Vec<String> {
    let mut failures = Vec::new();
    for (args, says) in [
        (
            ["x/nope", "x/a", "tcp/80"],
            "source: no pod x/nope is registered on this node",
        ),
        (
            ["x/a", "10.0.0.300", "tcp/80"],
            "destination: \\\"10.0.0.300\\\" is neither",
        ),
        (
            ["x/a", "fd00::1", "tcp/80"],
            "destination: fd00::1 is an IPv6 address",
        ),
        (
            ["x/a", "x/b", "sctp/80"],
            "protocol \\\"sctp\\\" is not TCP or UDP",
        ),
        (["x/a", "x/b", "tcp/0"], "port 0 is not in 1..=65535"),
        (
            ["x/a", "x/b", "udp/65536"],
            "port 65536 is not in 1..=65535",
        ),
        (["x/a", "x/b", "tcp-80"], "\"tcp-80\" is not PROTO/PORT"),
    ] {
        let mut argv = vec!["-o", "json", "explain"];
        argv.extend(args);
        let out = ferrovia(&c.node.api_socket(), &argv).expect("run ferrovia");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains(says) || !out.stdout.is_empty() {
            failures.push(format!(
                "explain {args:?}: exit {}, stderr {stderr}",
                out.status
            ));
        }
    }
    failures
}

#[test]
fn explain_agrees_with_the_truth_table_and_names_the_rules() {
    let cluster = PolicyCluster::new(AgentOpts::default()).expect("policy cluster");
    let setup = scenario(&cluster);
    let rejected = cluster.apply(&setup).expect("apply");
    assert!(rejected.is_empty(), "{rejected:#?}");

    let started = Instant::now();
    let mut failures = Vec::new();
    for case in CASES {
        failures.extend(check_case(&cluster, &setup, case));
    }
    eprintln!("{} cases in {:.1?}", CASES.len(), started.elapsed());
    let started = Instant::now();
    failures.extend(check_truth_table(&cluster, &setup));
    eprintln!("the truth table (288 flows) in {:.1?}", started.elapsed());
    failures.extend(check_traffic(&cluster));
    failures.extend(check_errors(&cluster));

    // The table for people: a row per backend, the verdicts named.
    let out = ferrovia(
        &cluster.node.api_socket(),
        &["explain", "x/c", &PAIR_VIP.to_string(), "tcp/8080"],
    )
    .expect("run ferrovia");
    let table = String::from_utf8_lossy(&out.stdout);
    let expected_lines = [
        "SERVICE  y/pair, port http (ClusterIP, frontend",
        "BACKEND ",
        "denied-by-except y/block-except  denied",
    ];
    if !out.status.success() || !expected_lines.iter().all(|l| table.contains(l)) {
        failures.push(format!("the table:\n{table}"));
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}\nlabels:\n{}policies:\n{}",
        failures.len(),
        failures.join("\n"),
        setup.labels_summary(),
        setup.policies_yaml()
    );
}

/// Without an agent, `explain` fails naming the socket it dialed.
#[test]
fn explain_without_an_agent_names_the_socket() {
    let dir = sys::temp_root().join(sys::unique_id());
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("absent.sock");
    let out = ferrovia(&socket, &["explain", "x/a", "10.96.0.10", "tcp/80"]).expect("run ferrovia");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&*socket.to_string_lossy())
            && stderr.contains("cannot reach the ferrovia agent"),
        "{stderr}"
    );
}
