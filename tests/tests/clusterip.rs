//! `ClusterIP` behaviour, end to end: a node in a network namespace, pods made by the real CNI
//! chain (`ptp` + `host-local`, then `ferrovia-cni`), the real agent on a manifests directory,
//! and real TCP/UDP traffic from `ferrovia-echo`. Every behaviour is checked on both data
//! paths: socket-level LB (cgroup hooks) and the per-packet tc path (`--socket-lb=false`).
//! Needs root.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use ferrovia_tests::{
    Agent, AgentOpts, KERNEL_LACKS, Node, Pod, ProbeResult, ProbeSpec, Proto, Server,
};

/// A node with its agent, pods by name and their servers (all removed on drop).
struct Cluster {
    pods: BTreeMap<String, Pod>,
    _servers: Vec<Server>,
    agent: Agent,
    node: Node,
}

impl Cluster {
    /// Writes `yaml`, starts the agent, creates `pods` (in namespace `default`) and starts
    /// an echo server in each pod listed in `serve` (`(pod, ["tcp:9376", …])`).
    fn new(socket_lb: bool, yaml: &str, pods: &[&str], serve: &[(&str, &[&str])]) -> Self {
        let node = Node::new().expect("node");
        node.write_manifest("cluster.yaml", yaml).expect("manifest");
        let agent = node
            .start_agent(AgentOpts {
                socket_lb,
                ..AgentOpts::default()
            })
            .expect("agent");
        let pods: BTreeMap<String, Pod> = pods
            .iter()
            .map(|n| ((*n).to_owned(), node.add_pod("default", n).expect("pod")))
            .collect();
        let servers = serve
            .iter()
            .map(|(pod, listen)| pods[*pod].serve(listen).expect("server"))
            .collect();
        Self {
            pods,
            _servers: servers,
            agent,
            node,
        }
    }

    fn pod(&self, name: &str) -> &Pod {
        &self.pods[name]
    }

    fn ip(&self, name: &str) -> IpAddr {
        IpAddr::V4(self.pods[name].ip)
    }
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 96, 0, 10], port))
}

/// Probes until the first success (the agent syncs asynchronously), bounded.
fn wait_served(client: &Pod, spec: &ProbeSpec) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let one = ProbeSpec {
            count: 1,
            timeout: Duration::from_millis(500),
            ..spec.clone()
        };
        let r = client.probe(&one).expect("probe");
        if r.iter().all(|r| r.ok) {
            return;
        }
        assert!(Instant::now() < deadline, "{} never served: {r:?}", spec.to);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Requests per backend name; panics on any failed request.
fn answered_by(results: &[ProbeResult]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for r in results {
        assert!(r.ok, "request failed: {r:?}");
        *by.entry(r.server().expect("reply names its server").to_owned())
            .or_insert(0) += 1;
    }
    by
}

fn pod_yaml(name: &str, labels: &str, ports: &str, status: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{{labels}}}}}\n\
         spec:\n  containers:\n  - name: echo\n    image: ferrovia-echo\n    ports: [{ports}]\n{status}"
    )
}

const SERVICE_TCP_UDP: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 9376}
  - {name: echo, protocol: UDP, port: 53, targetPort: 9376}
";

/// Two ready backends and one that is not ready: traffic spreads over the ready ones only,
/// the client's socket believes it talks to the VIP, and the backend sees the client's IP.
fn spreads_over_ready_endpoints(socket_lb: bool) {
    let mut yaml = SERVICE_TCP_UDP.to_owned();
    for pod in ["web-a", "web-b"] {
        yaml += &pod_yaml(pod, "app: web", "", "");
    }
    yaml += &pod_yaml(
        "web-unready",
        "app: web",
        "",
        "status:\n  conditions: [{type: Ready, status: \"False\"}]\n",
    );
    let listen: &[&str] = &["tcp:9376", "udp:9376"];
    let c = Cluster::new(
        socket_lb,
        &yaml,
        &["web-a", "web-b", "web-unready", "client"],
        &[
            ("web-a", listen),
            ("web-b", listen),
            ("web-unready", listen),
        ],
    );
    let client = c.pod("client");
    for spec in [ProbeSpec::tcp(vip(80)), ProbeSpec::udp(vip(53))] {
        wait_served(client, &spec);
        let results = client.probe(&spec.clone().count(60)).expect("probe");
        let by = answered_by(&results);
        assert_eq!(
            by.keys().collect::<Vec<_>>(),
            ["web-a", "web-b"],
            "{:?}: only the two ready endpoints, both of them: {by:?}",
            spec.proto
        );
        for r in &results {
            assert_eq!(
                r.peer_addr(),
                Some(spec.to),
                "the client's socket shows the VIP: {r:?}"
            );
            assert_eq!(
                r.seen_from().map(|s| s.ip()),
                Some(c.ip("client")),
                "backend sees the client's pod IP: {r:?}"
            );
        }
    }
}

#[test]
fn socket_lb_spreads_tcp_and_udp_over_ready_endpoints() {
    spreads_over_ready_endpoints(true);
}

#[test]
fn tc_path_spreads_tcp_and_udp_over_ready_endpoints() {
    spreads_over_ready_endpoints(false);
}

/// A named targetPort resolves per pod: the two backends expose the name on different
/// numbers. A second service port maps to a port where nothing listens (refused by the pod).
fn named_and_multiple_ports(socket_lb: bool) {
    let mut yaml = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: web}
  - {name: udp, protocol: UDP, port: 80, targetPort: web-udp}
  - {name: closed, protocol: TCP, port: 81, targetPort: 7777}
"
    .to_owned();
    yaml += &pod_yaml(
        "web-a",
        "app: web",
        "{name: web, containerPort: 8080}, {name: web-udp, containerPort: 8080, protocol: UDP}",
        "",
    );
    yaml += &pod_yaml(
        "web-b",
        "app: web",
        "{name: web, containerPort: 9090}, {name: web-udp, containerPort: 9090, protocol: UDP}",
        "",
    );
    let c = Cluster::new(
        socket_lb,
        &yaml,
        &["web-a", "web-b", "client"],
        &[
            ("web-a", &["tcp:8080", "udp:8080"]),
            ("web-b", &["tcp:9090", "udp:9090"]),
        ],
    );
    let client = c.pod("client");
    for spec in [ProbeSpec::tcp(vip(80)), ProbeSpec::udp(vip(80))] {
        wait_served(client, &spec);
        let by = answered_by(&client.probe(&spec.clone().count(40)).expect("probe"));
        assert_eq!(
            by.len(),
            2,
            "{:?}: both pods, each on its own port number: {by:?}",
            spec.proto
        );
    }
    let closed = client
        .probe(&ProbeSpec::tcp(vip(81)).count(3))
        .expect("probe");
    for r in &closed {
        assert_eq!(
            r.error.as_deref(),
            Some("ECONNREFUSED"),
            "port 81 → 7777 where nothing listens: {r:?}"
        );
    }
}

#[test]
fn socket_lb_resolves_named_target_ports_per_pod() {
    named_and_multiple_ports(true);
}

#[test]
fn tc_path_resolves_named_target_ports_per_pod() {
    named_and_multiple_ports(false);
}

/// `sessionAffinity: ClientIP`: every new connection of a client lands on one backend,
/// while the same backends without affinity spread.
fn affinity(socket_lb: bool) {
    let mut yaml = "apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 9376}]
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: default}
spec:
  clusterIP: 10.96.0.11
  selector: {app: web}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 9376}]
"
    .to_owned();
    for pod in ["web-a", "web-b", "web-c"] {
        yaml += &pod_yaml(pod, "app: web", "", "");
    }
    let listen: &[&str] = &["tcp:9376"];
    let c = Cluster::new(
        socket_lb,
        &yaml,
        &["web-a", "web-b", "web-c", "client"],
        &[("web-a", listen), ("web-b", listen), ("web-c", listen)],
    );
    let client = c.pod("client");
    let sticky = ProbeSpec::tcp(vip(80));
    let plain = ProbeSpec::tcp(SocketAddr::from(([10, 96, 0, 11], 80)));
    wait_served(client, &sticky);
    wait_served(client, &plain);
    let by = answered_by(&client.probe(&sticky.count(30)).expect("probe"));
    assert_eq!(
        by.len(),
        1,
        "ClientIP affinity keeps the client on one backend: {by:?}"
    );
    let by = answered_by(&client.probe(&plain.count(30)).expect("probe"));
    assert!(
        by.len() > 1,
        "without affinity the same backends spread: {by:?}"
    );
}

#[test]
fn socket_lb_honours_client_ip_affinity() {
    affinity(true);
}

#[test]
fn tc_path_honours_client_ip_affinity() {
    affinity(false);
}

/// A service without endpoints rejects, as kube-proxy does: TCP is refused at once (socket
/// path: `connect()` fails with ECONNREFUSED; tc path: a RST), UDP gets port unreachable
/// (ECONNREFUSED on a connected socket) — not a timeout into a black hole. Also for a client
/// that `NetworkPolicy` isolates for ingress: the refusal is the data path's own answer, as the
/// node's would be under kube-proxy, not traffic from a peer.
fn rejects_without_endpoints(socket_lb: bool) {
    let yaml = SERVICE_TCP_UDP.to_owned()
        + &pod_yaml("other", "app: other", "", "")
        + &pod_yaml("client", "app: client", "", "")
        + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
           metadata: {name: client-deny-ingress, namespace: default}\n\
           spec: {podSelector: {matchLabels: {app: client}}, policyTypes: [Ingress]}\n";
    let c = Cluster::new(
        socket_lb,
        &yaml,
        &["other", "client"],
        &[("other", &["tcp:9376", "udp:9376"])],
    );
    let client = c.pod("client");
    // The agent is ready once its socket exists and the CNI ADD returned: no wait needed,
    // but allow the first sync a moment by polling for the refusal itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    // Kernels before 5.18 lack bpf_set_retval: the socket hooks' fallback refuses with
    // EPERM, and the agent says so in its status. Both protocols are probed either way.
    let mut lacking = Vec::new();
    for spec in [ProbeSpec::tcp(vip(80)), ProbeSpec::udp(vip(53))] {
        let spec = spec.count(3).timeout(Duration::from_secs(3));
        let hook = match spec.proto {
            Proto::Tcp => "sock4_connect",
            Proto::Udp => "sock4_sendmsg",
        };
        loop {
            let results = client.probe(&spec).expect("probe");
            if results
                .iter()
                .all(|r| r.error.as_deref() == Some("ECONNREFUSED"))
            {
                break;
            }
            if socket_lb
                && results.iter().all(|r| r.error.as_deref() == Some("EPERM"))
                && c.agent.status().expect("agent status")["degraded"]
                    .to_string()
                    .contains(&format!("\"{hook}:"))
            {
                lacking.push(format!(
                    "{:?} (the agent reports {hook} degraded)",
                    spec.proto
                ));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} to a service without endpoints: {results:?}",
                spec.proto
            );
        }
    }
    assert!(
        lacking.is_empty(),
        "{KERNEL_LACKS} bpf_set_retval (Linux 5.18+): {} to a service without endpoints \
         failed with EPERM as documented, not ECONNREFUSED",
        lacking.join(", ")
    );
}

#[test]
fn socket_lb_rejects_when_no_endpoints() {
    rejects_without_endpoints(true);
}

#[test]
fn tc_path_rejects_when_no_endpoints() {
    rejects_without_endpoints(false);
}

/// kube-proxy's terminating fallback, from hand-written `EndpointSlices` of a selector-less
/// service: a serving-but-terminating endpoint is used only once no ready one is left.
#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let service = "apiVersion: v1
kind: Service
metadata: {name: manual, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 9376}]
";
    let slice = |a_ready: bool, b: &str| {
        format!(
            "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: manual-1
  namespace: default
  labels: {{kubernetes.io/service-name: manual}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 9376}}]
endpoints:
- addresses: [\"{ip_a}\"]
  conditions: {{ready: {a_ready}, serving: true, terminating: {a_term}}}
- addresses: [\"{b}\"]
  conditions: {{ready: false, serving: true, terminating: true}}
",
            ip_a = "IP_A",
            a_term = !a_ready,
        )
    };
    let c = Cluster::new(
        true,
        service,
        &["web-a", "web-b", "client"],
        &[("web-a", &["tcp:9376"]), ("web-b", &["tcp:9376"])],
    );
    let (a, b) = (c.ip("web-a").to_string(), c.ip("web-b").to_string());
    let client = c.pod("client");
    c.node
        .write_manifest(
            "cluster.yaml",
            &(service.to_owned() + &slice(true, &b).replace("IP_A", &a)),
        )
        .unwrap();
    wait_served(client, &ProbeSpec::tcp(vip(80)));
    let by = answered_by(&client.probe(&ProbeSpec::tcp(vip(80)).count(30)).unwrap());
    assert_eq!(
        by.keys().collect::<Vec<_>>(),
        ["web-a"],
        "the ready endpoint only: {by:?}"
    );

    // web-a starts terminating too: now both are serving-and-terminating, and both are used.
    c.node
        .write_manifest(
            "cluster.yaml",
            &(service.to_owned() + &slice(false, &b).replace("IP_A", &a)),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let by = answered_by(&client.probe(&ProbeSpec::tcp(vip(80)).count(30)).unwrap());
        if by.contains_key("web-b") {
            assert_eq!(
                by.len(),
                2,
                "fallback to every serving terminating endpoint: {by:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "terminating fallback never used web-b: {by:?}"
        );
    }
}

/// Hairpin: the only backend calls its own service and gets its own answer. Which source
/// address it sees depends on the path (README, "Hairpin"): its own pod IP when the socket
/// hooks translated (a TCP connection is made straight to itself), the VIP when the per-packet
/// path did (`SNATed` to the VIP, since a packet from its own address would be dropped as
/// martian) — always on the tc path, and for connected UDP sockets on both (see `sock.rs`).
fn hairpin(socket_lb: bool) {
    let yaml = SERVICE_TCP_UDP.to_owned() + &pod_yaml("web-a", "app: web", "", "");
    let c = Cluster::new(
        socket_lb,
        &yaml,
        &["web-a"],
        &[("web-a", &["tcp:9376", "udp:9376"])],
    );
    let me = c.pod("web-a");
    for spec in [ProbeSpec::tcp(vip(80)), ProbeSpec::udp(vip(53))] {
        let socket_translated = socket_lb && spec.proto == Proto::Tcp;
        let expected_source = if socket_translated {
            c.ip("web-a")
        } else {
            vip(80).ip()
        };
        wait_served(me, &spec);
        let results = me.probe(&spec.clone().count(10)).expect("probe");
        let by = answered_by(&results);
        assert_eq!(by.keys().collect::<Vec<_>>(), ["web-a"], "{by:?}");
        let sources: BTreeSet<IpAddr> = results
            .iter()
            .filter_map(|r| r.seen_from().map(|s| s.ip()))
            .collect();
        assert_eq!(
            sources,
            BTreeSet::from([expected_source]),
            "{:?}: source the pod sees",
            spec.proto
        );
        for r in &results {
            assert_eq!(
                r.peer_addr(),
                Some(spec.to),
                "the pod's socket shows the VIP: {r:?}"
            );
        }
    }
}

#[test]
fn socket_lb_hairpin_reaches_itself() {
    hairpin(true);
}

#[test]
fn tc_path_hairpin_reaches_itself_from_the_vip() {
    hairpin(false);
}

/// The manifests directory is watched: a service created after the agent started is
/// served, and removing it stops the translation.
#[test]
fn services_follow_the_manifests_directory() {
    let c = Cluster::new(true, "", &["web-a", "client"], &[("web-a", &["tcp:9376"])]);
    let client = c.pod("client");
    c.node
        .write_manifest(
            "later.yaml",
            &(SERVICE_TCP_UDP.replace("app: web", "app: later")
                + &pod_yaml("web-a", "app: later", "", "")),
        )
        .unwrap();
    wait_served(client, &ProbeSpec::tcp(vip(80)));
    c.node.remove_manifest("later.yaml").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client
            .probe(&ProbeSpec::tcp(vip(80)).timeout(Duration::from_millis(500)))
            .unwrap();
        if !r[0].ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "service still translated after its manifest was removed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
