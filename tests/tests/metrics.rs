//! Per-pod metrics end to end: known traffic between pods in network namespaces, through the
//! real agent and its programs, and the exact counter deltas it must leave in `/metrics`
//! (`OpenMetrics`, parsed strictly). Needs root, bpffs and cgroup v2, as every e2e suite.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use ferrovia_tests::{Agent, AgentOpts, Node, Pod, ProbeSpec, openmetrics};
use serde_json::Value;

const METRICS_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9964));
const PORT: u16 = 8080;
/// A probe's UDP request, `hello\n`, as a frame: Ethernet 14 + IPv4 20 + UDP 8 + 6.
const UDP_REQUEST_FRAME: f64 = 48.0;

const MANIFESTS: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: echo, image: ferrovia-echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec: {containers: [{name: echo, image: ferrovia-echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: shop, labels: {app: stranger}}
spec: {containers: [{name: echo, image: ferrovia-echo}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-client, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{protocol: TCP, port: 8080}, {protocol: UDP, port: 8080}]
  - from: [{podSelector: {matchLabels: {app: server}}}]
    ports: [{protocol: TCP, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.77.10
  selector: {app: server}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec:
  clusterIP: 10.96.77.11
  selector: {app: nobody}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
";
const WEB: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 96, 77, 10), 80));
const EMPTY: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 96, 77, 11), 80));

/// Counters by (family, pod, and the other labels as `k=v` joined with `,`).
type Counters = BTreeMap<(String, String, String), f64>;

fn scrape(agent: &Agent) -> (Counters, String) {
    let reply = agent.http_get("/metrics").expect("GET /metrics");
    assert_eq!(reply.status, 200, "{reply:?}");
    let exposition = openmetrics::parse(&reply.body)
        .unwrap_or_else(|e| panic!("/metrics is not OpenMetrics text: {e:#}\n{}", reply.body));
    let mut out = Counters::new();
    for s in &exposition.samples {
        if !s.name.starts_with("ferrovia_pod_") {
            continue;
        }
        assert_eq!(s.labels["namespace"], "shop", "{s:?}");
        let others: Vec<String> = s
            .labels
            .iter()
            .filter(|(k, _)| *k != "namespace" && *k != "pod")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        // Counter samples are the family's name and `_total`.
        let family = s.name.strip_suffix("_total").unwrap_or(&s.name).to_owned();
        out.insert((family, s.labels["pod"].clone(), others.join(",")), s.value);
    }
    (out, reply.body)
}

/// Every sample of a scrape by `name{label=value,...}` (labels sorted).
fn samples(agent: &Agent) -> (BTreeMap<String, f64>, String) {
    let reply = agent.http_get("/metrics").expect("GET /metrics");
    let exposition = openmetrics::parse(&reply.body)
        .unwrap_or_else(|e| panic!("/metrics is not OpenMetrics text: {e:#}\n{}", reply.body));
    let out = exposition
        .samples
        .iter()
        .map(|s| {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            (format!("{}{{{}}}", s.name, labels.join(",")), s.value)
        })
        .collect();
    (out, reply.body)
}

/// Per service port: connections through the VIP counted once, where translated (the socket
/// hooks here); refusals of a port without endpoints; endpoints by condition.
#[allow(clippy::float_cmp)] // counter values are small integers, exact in f64
fn assert_service_counters(shop: &Shop) {
    let (before, _) = samples(&shop.agent);
    let ok = shop
        .client
        .probe(&ProbeSpec::tcp(WEB).count(3))
        .expect("probe");
    assert!(ok.iter().all(|r| r.ok), "{ok:?}");
    let refused = shop
        .client
        .probe(&ProbeSpec::tcp(EMPTY).count(2))
        .expect("probe");
    assert!(refused.iter().all(|r| !r.ok), "{refused:?}");
    let (after, body) = samples(&shop.agent);
    let port = |svc: &str| format!("namespace=shop,port=http,service={svc}");
    let delta = |name: &str, svc: &str| {
        let key = format!("{name}{{{}}}", port(svc));
        let a = after
            .get(&key)
            .unwrap_or_else(|| panic!("no {key}\n{body}"));
        a - before.get(&key).copied().unwrap_or(0.0)
    };
    let got = [
        delta("ferrovia_service_connections_total", "web"),
        delta("ferrovia_service_rejected_connections_total", "web"),
        delta("ferrovia_service_connections_total", "empty"),
        delta("ferrovia_service_rejected_connections_total", "empty"),
    ];
    assert_eq!(
        got,
        [3.0, 0.0, 0.0, 2.0],
        "web +conn, +rejected; empty the same\n{body}"
    );
    // The server reaching itself through the VIP: the socket hook leaves a policed pod's
    // hairpin to the per-packet path, which counts it — once per connection, not twice.
    let (before_hairpin, _) = samples(&shop.agent);
    let hairpin = shop
        .server
        .probe(&ProbeSpec::tcp(WEB).count(2))
        .expect("probe");
    assert!(hairpin.iter().all(|r| r.ok), "{hairpin:?}");
    let (after_hairpin, hairpin_body) = samples(&shop.agent);
    let key = format!("ferrovia_service_connections_total{{{}}}", port("web"));
    assert_eq!(
        after_hairpin[&key] - before_hairpin[&key],
        2.0,
        "{hairpin_body}"
    );
    let endpoints = |svc: &str, condition: &str| {
        after[&format!(
            "ferrovia_service_endpoints{{condition={condition},{}}}",
            port(svc)
        )]
    };
    assert_eq!(
        [
            endpoints("web", "ready"),
            endpoints("web", "serving"),
            endpoints("web", "terminating"),
            endpoints("empty", "ready"),
        ],
        [1.0, 1.0, 0.0, 0.0],
        "{body}"
    );
}

/// `ferrovia pods -o json`, by pod name.
fn pods_json(shop: &Shop) -> BTreeMap<String, Value> {
    let answer = ferrovia_tests::cli::json(&shop.node.api_socket(), "pods").expect("ferrovia pods");
    answer["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| (p["name"].as_str().expect("name").to_owned(), p.clone()))
        .collect()
}

/// Makes a pod's only traffic the test's own: no IPv6 on either end of its veth (router
/// solicitations, MLD reports), and the
/// neighbours on both ends of its veth fixed, so no ARP is sent while counting. Needs the
/// neighbours resolved first (one exchange through the gateway).
fn quiet(node: &Node, pod: &Pod) {
    pod.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        .expect("disabling IPv6 in the pod");
    node.exec(&[
        "sysctl",
        "-qw",
        &format!("net.ipv6.conf.{}.disable_ipv6=1", pod.host_ifname),
    ])
    .expect("disabling IPv6 on the pod's host-side interface");
    pin_neighbours(|args| pod.exec(args), "eth0");
    pin_neighbours(|args| node.exec(args), &pod.host_ifname);
}

fn pin_neighbours(run: impl Fn(&[&str]) -> anyhow::Result<String>, dev: &str) {
    let out = run(&["ip", "-j", "neigh", "show", "dev", dev]).expect("ip neigh show");
    let neighbours: serde_json::Value = serde_json::from_str(&out).expect("ip -j neigh");
    let mut pinned = 0;
    for n in neighbours.as_array().expect("a list") {
        let (Some(dst), Some(mac)) = (n["dst"].as_str(), n["lladdr"].as_str()) else {
            continue;
        };
        run(&[
            "ip",
            "neigh",
            "replace",
            dst,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])
        .expect("ip neigh replace");
        pinned += 1;
    }
    assert!(pinned > 0, "no resolved neighbour on {dev}: {out}");
}

fn delta(before: &Counters, after: &Counters, family: &str, pod: &str, labels: &str) -> f64 {
    let key = (family.to_owned(), pod.to_owned(), labels.to_owned());
    let a = after
        .get(&key)
        .unwrap_or_else(|| panic!("no series {key:?} after"));
    a - before.get(&key).copied().unwrap_or(0.0)
}

/// What the traffic of the test must add, as `pod family labels` → delta: a new connection
/// per request, counted where it leaves and where it arrives (answers are none); the
/// stranger's datagrams leave it (it is not isolated) and die at the server, whose verdicts
/// are by the rule for each new flow and by default for each denied datagram; the stranger
/// sent m request frames and received nothing.
fn expected_deltas(n_tcp: f64, n_udp: f64, m: f64) -> Vec<(&'static str, f64)> {
    vec![
        ("client connections direction=egress,protocol=tcp", n_tcp),
        ("client connections direction=egress,protocol=udp", n_udp),
        ("server connections direction=ingress,protocol=tcp", n_tcp),
        ("server connections direction=ingress,protocol=udp", n_udp),
        ("server connections direction=egress,protocol=tcp", 0.0),
        ("server connections direction=egress,protocol=udp", 0.0),
        ("client connections direction=ingress,protocol=tcp", 0.0),
        ("client connections direction=ingress,protocol=udp", 0.0),
        ("stranger connections direction=egress,protocol=udp", m),
        ("server drops direction=ingress,reason=policy_denied", m),
        ("stranger drops direction=egress,reason=policy_denied", 0.0),
        ("client drops direction=egress,reason=policy_denied", 0.0),
        ("server drops direction=ingress,reason=no_endpoints", 0.0),
        (
            "server policy_verdicts direction=ingress,reason=allowed-by-rule,verdict=allowed",
            n_tcp + n_udp,
        ),
        (
            "server policy_verdicts direction=ingress,reason=denied-by-default,verdict=denied",
            m,
        ),
        ("stranger packets direction=egress", m),
        ("stranger bytes direction=egress", m * UDP_REQUEST_FRAME),
        ("stranger packets direction=ingress", 0.0),
        ("client malformed_packets direction=egress", 0.0),
    ]
}

/// A node with the agent (metrics on) and the shop's three pods, policy in force, the server
/// serving, and every pod quiet.
/// Fields drop in order: the server process, the pods (CNI DEL), the agent, the node.
struct Shop {
    _serving: ferrovia_tests::Server,
    stranger: Pod,
    server: Pod,
    client: Pod,
    agent: Agent,
    node: Node,
}

const SHORT: Duration = Duration::from_millis(300);

impl Shop {
    fn new() -> Self {
        let node = Node::new().expect("creating the node");
        let agent = node
            .start_agent(AgentOpts {
                metrics_addr: Some(METRICS_ADDR),
                ..AgentOpts::default()
            })
            .expect("starting ferrovia-agent");
        let client = node.add_pod("shop", "client").expect("CNI ADD client");
        let server = node.add_pod("shop", "server").expect("CNI ADD server");
        let stranger = node.add_pod("shop", "stranger").expect("CNI ADD stranger");
        node.write_manifest("shop.yaml", MANIFESTS)
            .expect("manifests");
        assert_eq!(agent.sync().expect("sync"), Vec::<String>::new());
        let serving = server
            .serve(&[&format!("tcp:{PORT}"), &format!("udp:{PORT}")])
            .expect("echo server");
        let shop = Self {
            node,
            agent,
            client,
            server,
            stranger,
            _serving: serving,
        };
        // Resolve every neighbour once, then fix them and silence IPv6.
        let to = shop.to();
        assert!(shop.client.probe(&ProbeSpec::udp(to)).expect("warm-up")[0].ok);
        let denied = shop
            .stranger
            .probe(&ProbeSpec::udp(to).timeout(SHORT))
            .expect("warm-up");
        assert!(!denied[0].ok, "the policy denies the stranger: {denied:?}");
        for pod in [&shop.client, &shop.server, &shop.stranger] {
            quiet(&shop.node, pod);
        }
        shop
    }

    fn to(&self) -> SocketAddr {
        SocketAddr::from((self.server.ip, PORT))
    }
}

/// n TCP and UDP requests from client to server, m UDP datagrams from a stranger the server's
/// policy denies: the exact deltas of connections, drops, verdicts, and the stranger's
/// packets and bytes, in `/metrics` and in `ferrovia pods -o json`; then the stranger is
/// deleted and its series go.
#[test]
#[allow(clippy::float_cmp)] // counter values are small integers, exact in f64
fn pod_counters_in_metrics_match_the_traffic_driven() {
    let shop = Shop::new();
    let to = shop.to();
    let (before, _) = scrape(&shop.agent);
    let cli_before = pods_json(&shop);
    let (n_tcp, n_udp, m) = (4, 3, 2);
    let tcp = shop
        .client
        .probe(&ProbeSpec::tcp(to).count(n_tcp))
        .expect("TCP probe");
    assert!(tcp.iter().all(|r| r.ok), "{tcp:?}");
    let udp = shop
        .client
        .probe(&ProbeSpec::udp(to).count(n_udp))
        .expect("UDP probe");
    assert!(udp.iter().all(|r| r.ok), "{udp:?}");
    let denied = shop
        .stranger
        .probe(&ProbeSpec::udp(to).count(m).timeout(SHORT))
        .expect("denied probe");
    assert!(denied.iter().all(|r| !r.ok), "{denied:?}");
    let (after, body) = scrape(&shop.agent);
    let cli_after = pods_json(&shop);
    let d = |family: &str, pod: &str, labels: &str| delta(&before, &after, family, pod, labels);

    let wrong: Vec<String> = expected_deltas(n_tcp as f64, n_udp as f64, m as f64)
        .into_iter()
        .filter_map(|(key, want)| {
            let mut parts = key.split(' ');
            let (pod, family, labels) = (parts.next()?, parts.next()?, parts.next()?);
            let got = d(&format!("ferrovia_pod_{family}"), pod, labels);
            (got != want).then(|| format!("{pod} {family} {{{labels}}}: +{got}, expected +{want}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}\n{body}");
    // The server receives what the client sent and the stranger's datagrams; the client's TCP
    // connections took at least three packets each.
    let client_out = d("ferrovia_pod_packets", "client", "direction=egress");
    assert!(client_out >= n_tcp as f64 * 3.0 + n_udp as f64, "{body}");
    assert_eq!(
        d("ferrovia_pod_packets", "server", "direction=ingress"),
        client_out + m as f64,
        "{body}"
    );

    // `ferrovia pods -o json` says the same.
    let cli = |pod: &str, dir: &str, field: &str| {
        let get = |all: &BTreeMap<String, Value>| all[pod][dir][field].as_u64().expect(field);
        get(&cli_after) - get(&cli_before)
    };
    let cli_expected = [
        ("client", "egress", "connections_tcp", n_tcp),
        ("client", "egress", "connections_udp", n_udp),
        ("server", "ingress", "connections_tcp", n_tcp),
        ("server", "ingress", "connections_udp", n_udp),
        ("server", "egress", "connections_udp", 0),
        ("server", "ingress", "drops_policy_denied", m),
        ("server", "ingress", "policy_denied", m),
        ("stranger", "egress", "packets", m),
        ("stranger", "egress", "bytes", m * UDP_REQUEST_FRAME as u64),
        ("stranger", "ingress", "packets", 0),
    ];
    let wrong: Vec<String> = cli_expected
        .iter()
        .filter(|&&(pod, dir, field, want)| cli(pod, dir, field) != want)
        .map(|&(pod, dir, field, want)| {
            format!(
                "{pod} {dir}.{field}: +{}, expected +{want}",
                cli(pod, dir, field)
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "ferrovia pods -o json: {wrong:#?}\n{cli_after:#?}"
    );
    assert_eq!(
        cli("server", "ingress", "packets") as f64,
        d("ferrovia_pod_packets", "server", "direction=ingress"),
        "the CLI and /metrics read the same counters"
    );

    assert_service_counters(&shop);

    // A deleted pod's series disappear; the others stay.
    let Shop {
        agent, stranger, ..
    } = shop;
    stranger.delete().expect("CNI DEL stranger");
    let (gone, body) = scrape(&agent);
    let pods: std::collections::BTreeSet<&str> =
        gone.keys().map(|(_, pod, _)| pod.as_str()).collect();
    assert_eq!(
        pods,
        ["client", "server"].into_iter().collect(),
        "series after deleting the stranger:\n{body}"
    );
}
