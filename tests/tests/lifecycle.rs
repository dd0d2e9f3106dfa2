//! Lifecycle, end to end: backends leaving and joining under traffic, UDP flows whose backend
//! goes away, the agent restarting under established connections, bad manifests, the CNI
//! plugin's ADD/CHECK/DEL, the maps as bpftool shows them, and the agent's HTTP endpoint
//! (`--metrics-addr`). Real namespaces, the real agent
//! on a manifests directory, the real CNI chain (`ptp` + `ferrovia-cni`), real traffic.
//!
//! Needs root and the workspace binaries (`cargo build --bins`). Each test builds its own node
//! (uniquely named), so the tests run in parallel; every wait is a bounded poll, never a sleep
//! that a slow machine could outrun.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use ferrovia_tests::openmetrics;
use ferrovia_tests::sendto::SendtoClient;
use ferrovia_tests::sys::netns_with_prefix;
use ferrovia_tests::{
    Agent, AgentOpts, Chain, Node, Pod, ProbeResult, ProbeSpec, ProbeStream, Server, cni_check,
};
use serde_json::Value;

/// The VIP and port of the services under test, and the backends' port.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 1);
const PORT: u16 = 80;
const TARGET: u16 = 9376;

/// Bound of every wait for the agent or the traffic: far above what either needs (the agent
/// re-syncs well under a second after a change), so a loaded machine does not fail a test.
const PATIENCE: Duration = Duration::from_secs(20);
/// Pause between the requests of a streaming probe.
const TICK: Duration = Duration::from_millis(50);
/// Per-request timeout of streaming probes: generous, since a timeout reads as a failure.
const STREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests each stream must answer after a change before its history is judged.
const MORE: usize = 20;

/// The maps the agent pins (agent/src/datapath/mod.rs `MAP_NAMES`).
const MAP_NAMES: [&str; 22] = [
    "SERVICES",
    "BACKENDS",
    "CONNTRACK",
    "AFFINITY",
    "SOCK_FWD",
    "SOCK_REVNAT",
    "COUNTERS",
    "POLICY_PODS",
    "POLICY_PEERS",
    "POLICY_PORTS",
    "POLICY_STATE",
    "POLICY_CT",
    "POLICY_VERDICTS",
    "POD_NETNS",
    "POLICY_FRAGS",
    "NETNS_PROBE",
    "POD_STATS",
    "UDP_FLOWS",
    "FRONTEND_STATS",
    "BACKEND_STATS",
    "FLOW_LIMIT",
    "FLOW_CONFIG",
];

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, PORT))
}

// ---------------------------------------------------------------------------------------------
// A one-node cluster
// ---------------------------------------------------------------------------------------------

/// A node with the agent running, backend pods serving TCP and UDP on `TARGET`, and a client
/// pod. Fields drop in order: workloads and pods first (CNI DEL while the agent still answers),
/// then the agent, then the node (which removes whatever is left, also after a panic).
struct Cluster {
    backends: Vec<Backend>,
    client: Pod,
    agent: Agent,
    node: Node,
}

struct Backend {
    _server: Server,
    pod: Pod,
}

impl Cluster {
    fn new(socket_lb: bool, backends: &[&str]) -> Self {
        let node = Node::new().expect("creating the node");
        let agent = node
            .start_agent(AgentOpts {
                socket_lb,
                ..AgentOpts::default()
            })
            .expect("starting ferrovia-agent");
        let backends = backends
            .iter()
            .map(|name| {
                let pod = node
                    .add_pod("default", name)
                    .unwrap_or_else(|e| panic!("adding pod {name}: {e:#}"));
                let server = pod
                    .serve(&[&format!("tcp:{TARGET}"), &format!("udp:{TARGET}")])
                    .unwrap_or_else(|e| panic!("serving in {name}: {e:#}"));
                Backend {
                    _server: server,
                    pod,
                }
            })
            .collect();
        let client = node
            .add_pod("default", "client")
            .expect("adding the client pod");
        Self {
            backends,
            client,
            agent,
            node,
        }
    }

    fn pod(&self, name: &str) -> &Pod {
        self.backends
            .iter()
            .map(|b| &b.pod)
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    fn ips(&self, names: &[&str]) -> Vec<Ipv4Addr> {
        names.iter().map(|n| self.pod(n).ip).collect()
    }

    fn write(&self, file: &str, yaml: &str) {
        self.node
            .write_manifest(file, yaml)
            .unwrap_or_else(|e| panic!("writing {file}: {e:#}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------

/// A `ClusterIP` Service without selector, `port` → `TARGET` on TCP and UDP.
fn service(name: &str, cluster_ip: &str, port: u32) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {cluster_ip}
  ports:
  - {{name: tcp, protocol: TCP, port: {port}, targetPort: {TARGET}}}
  - {{name: udp, protocol: UDP, port: {port}, targetPort: {TARGET}}}
"
    )
}

/// The one `EndpointSlice` of the selector-less Service `service`, listing `addresses`.
fn endpoint_slice(service: &str, addresses: &[String]) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-1
  namespace: default
  labels:
    kubernetes.io/service-name: {service}
addressType: IPv4
ports:
- {{name: tcp, protocol: TCP, port: {TARGET}}}
- {{name: udp, protocol: UDP, port: {TARGET}}}
endpoints:
"
    );
    for a in addresses {
        let _ = writeln!(yaml, "- addresses: [\"{a}\"]");
    }
    yaml
}

/// Service `web` on `VIP:PORT` without selector, and its slice listing `ips`.
fn web(ips: &[Ipv4Addr]) -> String {
    let addresses: Vec<String> = ips.iter().map(ToString::to_string).collect();
    format!(
        "{}---\n{}",
        service("web", &VIP.to_string(), PORT.into()),
        endpoint_slice("web", &addresses)
    )
}

/// Service `web` on `VIP:PORT` selecting `app: web`, with named target ports.
fn selector_web() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: {VIP}
  selector:
    app: web
  ports:
  - {{name: tcp, protocol: TCP, port: {PORT}, targetPort: echo-tcp}}
  - {{name: udp, protocol: UDP, port: {PORT}, targetPort: echo-udp}}
"
    )
}

/// A Pod of `app: web` whose container names its ports (what the named target ports resolve).
fn web_pod(name: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels:
    app: web
spec:
  containers:
  - name: echo
    image: ferrovia-echo
    ports:
    - {{name: echo-tcp, containerPort: {TARGET}, protocol: TCP}}
    - {{name: echo-udp, containerPort: {TARGET}, protocol: UDP}}
"
    )
}

// ---------------------------------------------------------------------------------------------
// Waiting and traffic
// ---------------------------------------------------------------------------------------------

/// Polls until `poll` succeeds, for at most `PATIENCE`; then panics with `what` and the last
/// state `poll` described.
fn wait_for<T>(what: &str, mut poll: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match poll() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not so after {PATIENCE:?}; last seen: {last}")
            }
            Err(_) => sleep(Duration::from_millis(100)),
        }
    }
}

/// `n` requests, each on a new connection (UDP: a new socket).
fn new_connections(from: &Pod, spec: &ProbeSpec, n: u64) -> Vec<ProbeResult> {
    let results = from
        .probe(&spec.clone().count(n))
        .unwrap_or_else(|e| panic!("probing {spec:?}: {e:#}"));
    assert_eq!(results.len(), n as usize, "{results:?}");
    results
}

/// Who answered, by name (`!error` for a failed request).
fn tally(results: &[ProbeResult]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for r in results {
        let who = r.server().map_or_else(
            || format!("!{}", r.error.as_deref().unwrap_or("?")),
            str::to_owned,
        );
        *by.entry(who).or_default() += 1;
    }
    by
}

fn names(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// Waits until a batch of new connections is all answered, by exactly `expected`.
fn wait_served(from: &Pod, spec: &ProbeSpec, expected: &[&str]) {
    let expected = names(expected);
    wait_for(
        &format!("{spec:?} answered by exactly {expected:?}"),
        || {
            let seen = tally(&new_connections(from, spec, 30));
            if seen.keys().cloned().collect::<BTreeSet<_>>() == expected {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        },
    );
}

/// A persistent TCP stream: one connection, a request every `TICK`, until stopped.
fn stream_spec(to: SocketAddr) -> ProbeSpec {
    ProbeSpec::tcp(to)
        .count(0)
        .persistent()
        .interval(TICK)
        .timeout(STREAM_TIMEOUT)
}

/// A persistent stream and the backend its connection landed on.
struct Pinned {
    backend: String,
    stream: ProbeStream,
}

/// Opens persistent TCP streams through `to` until each of `backends` holds at least one
/// (keeping at most two per backend), within a bounded number of attempts.
fn streams_covering(client: &Pod, to: SocketAddr, backends: &[&str]) -> Vec<Pinned> {
    let mut kept: Vec<Pinned> = Vec::new();
    for _ in 0..40 {
        if backends
            .iter()
            .all(|b| kept.iter().any(|p| p.backend == *b))
        {
            return kept;
        }
        let stream = client
            .probe_stream(&stream_spec(to))
            .expect("starting a stream");
        let first = stream
            .wait_for(1, PATIENCE)
            .expect("the stream's first answer");
        let backend = first[0]
            .server()
            .unwrap_or_else(|| panic!("stream's first request failed: {first:?}"))
            .to_owned();
        assert!(backends.contains(&backend.as_str()), "{first:?}");
        if kept.iter().filter(|p| p.backend == backend).count() < 2 {
            kept.push(Pinned { backend, stream });
        }
    }
    let covered: Vec<&str> = kept.iter().map(|p| p.backend.as_str()).collect();
    panic!("40 streams did not cover {backends:?}: {covered:?}");
}

/// How many results each stream has so far.
fn marks(streams: &[Pinned]) -> Vec<usize> {
    streams.iter().map(|p| p.stream.results().len()).collect()
}

/// Waits until every stream answered `MORE` requests beyond its mark, then checks its whole
/// history: every request answered, on its first connection, by the backend it started on.
fn assert_undisturbed(streams: &[Pinned], marks: &[usize], context: &str) {
    for (p, mark) in streams.iter().zip(marks) {
        let results = p
            .stream
            .wait_for(mark + MORE, PATIENCE)
            .unwrap_or_else(|e| panic!("{context}: stream on {}: {e:#}", p.backend));
        assert_stream(&results, &p.backend, context);
    }
}

fn assert_stream(results: &[ProbeResult], backend: &str, context: &str) {
    if let Some(bad) = results
        .iter()
        .find(|r| !r.ok || r.conn != 1 || r.server() != Some(backend))
    {
        panic!(
            "{context}: the connection pinned to {backend} was disturbed at request {} of {}: \
             {bad:?}",
            bad.seq,
            results.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// bpftool
// ---------------------------------------------------------------------------------------------

fn pin(node: &Node, name: &str) -> String {
    node.bpffs_root().join(name).display().to_string()
}

fn links_dir(node: &Node) -> PathBuf {
    node.bpffs_root().join("links")
}

/// `bpftool map dump pinned` of one of the agent's maps: each entry's BTF-`formatted` form.
fn dump(node: &Node, map: &str) -> Vec<Value> {
    let entries = node
        .bpftool(&["map", "dump", "pinned", &pin(node, map)])
        .unwrap_or_else(|e| panic!("dumping {map}: {e:#}"));
    let entries = entries.as_array().cloned().unwrap_or_default();
    entries
        .into_iter()
        .map(|e| {
            e.get("formatted")
                .cloned()
                .unwrap_or_else(|| panic!("{map}: entry without BTF formatting: {e}"))
        })
        .collect()
}

/// The id of a pinned map (the same id after a restart means the same kernel object).
fn map_id(node: &Node, map: &str) -> u64 {
    let show = node
        .bpftool(&["map", "show", "pinned", &pin(node, map)])
        .unwrap_or_else(|e| panic!("showing {map}: {e:#}"));
    show["id"].as_u64().expect("map id")
}

/// An address field (four `u32` words holding network-order bytes) as IPv4.
fn ipv4(addr: &Value) -> Ipv4Addr {
    let word = addr[0].as_u64().unwrap_or_else(|| panic!("address {addr}")) as u32;
    Ipv4Addr::from(word.to_ne_bytes())
}

/// A port field (network byte order).
fn port(v: &Value) -> u16 {
    u16::from_be(v.as_u64().unwrap_or_else(|| panic!("port {v}")) as u16)
}

/// The `SERVICES` entries of frontend `vip:port/proto`, by slot.
fn frontend(node: &Node, vip: SocketAddr, proto: u64) -> BTreeMap<u64, Value> {
    dump(node, "SERVICES")
        .into_iter()
        .filter(|e| {
            let k = &e["key"];
            SocketAddr::from((ipv4(&k["addr"]), port(&k["port"]))) == vip && k["proto"] == proto
        })
        .map(|e| (e["key"]["slot"].as_u64().expect("slot"), e["value"].clone()))
        .collect()
}

/// Slot 0's backend count of a frontend, if it is installed.
fn backend_count(node: &Node, vip: SocketAddr, proto: u64) -> Option<u64> {
    frontend(node, vip, proto).get(&0)?["count"].as_u64()
}

/// The conntrack entry of the tc path for a client's connection to the VIP (direction OUT).
fn ct_out(node: &Node, client: SocketAddr, to: SocketAddr) -> Option<Value> {
    dump(node, "CONNTRACK").into_iter().find_map(|e| {
        let k = &e["key"];
        let matches = k["dir"] == 0
            && SocketAddr::from((ipv4(&k["saddr"]), port(&k["sport"]))) == client
            && SocketAddr::from((ipv4(&k["daddr"]), port(&k["dport"]))) == to;
        matches.then(|| e["value"].clone())
    })
}

/// A conntrack value without its age (`last_seen_ns` moves with the traffic).
fn ct_translation(value: Option<Value>) -> Option<Value> {
    value.map(|mut v| {
        v.as_object_mut().map(|o| o.remove("last_seen_ns"));
        v
    })
}

/// The agent's pinned links (`<root>/links/*`) as name → (link id, program id).
fn pinned_links(node: &Node) -> BTreeMap<String, (u64, u64)> {
    let dir = links_dir(node);
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("links dir entry").path();
        let link = node
            .bpftool(&["link", "show", "pinned", &path.display().to_string()])
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let name = path.file_name().expect("file name").to_string_lossy();
        out.insert(
            name.into_owned(),
            (
                link["id"].as_u64().expect("link id"),
                link["prog_id"].as_u64().expect("prog id"),
            ),
        );
    }
    out
}

/// The programs on `ifname`'s tc hooks as `hook:program`: TCX links the agent pinned (this
/// bpftool, 7.1, cannot list TCX attachments by device) and classic `cls_bpf` filters.
fn tc_programs(node: &Node, ifname: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for hook in ["ingress", "egress"] {
        let path = links_dir(node).join(format!("tc-{ifname}-{hook}"));
        if path.exists() {
            let link = node
                .bpftool(&["link", "show", "pinned", &path.display().to_string()])
                .expect("bpftool link show");
            let prog = node
                .bpftool(&["prog", "show", "id", &link["prog_id"].to_string()])
                .expect("bpftool prog show");
            out.insert(format!("{hook}:{}", prog["name"].as_str().unwrap_or("?")));
        }
    }
    // Fails once the interface is gone: nothing attached then.
    if let Ok(net) = node.bpftool(&["net", "show", "dev", ifname]) {
        for tc in net[0]["tc"].as_array().into_iter().flatten() {
            let hook = tc["kind"]
                .as_str()
                .unwrap_or("")
                .trim_start_matches("clsact/");
            out.insert(format!("{hook}:{}", tc["name"].as_str().unwrap_or("?")));
        }
    }
    out
}

/// Pods the agent has registered, as persisted in its state dir (`ns/name`).
fn registered(node: &Node) -> BTreeSet<String> {
    let text = std::fs::read_to_string(node.state_dir().join("pods.json")).unwrap_or_default();
    let pods: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    pods.as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{}/{}",
                p["namespace"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or("")
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Scale down during traffic
// ---------------------------------------------------------------------------------------------

/// Three backends, persistent streams on each; one backend leaves the `EndpointSlice`. The
/// streams keep their connections (also the one on the leaving backend: TCP keeps its backend
/// until the connection ends), and new connections only reach the two that stay.
fn scale_down_during_traffic(socket_lb: bool) {
    let all = ["web-0", "web-1", "web-2"];
    let c = Cluster::new(socket_lb, &all);
    c.write("web.yaml", &web(&c.ips(&all)));
    wait_served(&c.client, &ProbeSpec::tcp(vip()), &all);
    let streams = streams_covering(&c.client, vip(), &all);
    let marks = marks(&streams);

    c.write("web.yaml", &web(&c.ips(&["web-0", "web-2"])));
    wait_for(
        "SERVICES lists 2 backends for the TCP frontend",
        || match backend_count(&c.node, vip(), 6) {
            Some(2) => Ok(()),
            other => Err(format!("count {other:?}")),
        },
    );
    let sample = new_connections(&c.client, &ProbeSpec::tcp(vip()), 40);
    let seen = tally(&sample);
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&["web-0", "web-2"]),
        "new connections after web-1 left: {seen:?}"
    );
    assert_undisturbed(&streams, &marks, "after web-1 left the service");
}

#[test]
fn scale_down_keeps_established_streams_and_avoids_the_removed_backend_socket_lb() {
    scale_down_during_traffic(true);
}

#[test]
fn scale_down_keeps_established_streams_and_avoids_the_removed_backend_tc() {
    scale_down_during_traffic(false);
}

// ---------------------------------------------------------------------------------------------
// 2. Scale up during traffic
// ---------------------------------------------------------------------------------------------

/// A selector Service over the Pod manifests of two backends; the third pod runs and is
/// registered by the CNI plugin but joins only when its Pod manifest appears.
fn scale_up_during_traffic(socket_lb: bool) {
    let c = Cluster::new(socket_lb, &["web-0", "web-1", "web-2"]);
    c.write("web.yaml", &selector_web());
    c.write("pod-web-0.yaml", &web_pod("web-0"));
    c.write("pod-web-1.yaml", &web_pod("web-1"));
    wait_served(&c.client, &ProbeSpec::tcp(vip()), &["web-0", "web-1"]);
    let streams = streams_covering(&c.client, vip(), &["web-0", "web-1"]);
    let marks = marks(&streams);

    c.write("pod-web-2.yaml", &web_pod("web-2"));
    wait_for("new connections reach web-2", || {
        let batch = new_connections(&c.client, &ProbeSpec::tcp(vip()), 10);
        let seen = tally(&batch);
        assert!(
            batch.iter().all(|r| r.ok),
            "a new connection failed while web-2 joined: {seen:?}"
        );
        if seen.contains_key("web-2") {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    });
    assert_undisturbed(&streams, &marks, "after web-2 joined the service");
}

#[test]
fn scale_up_keeps_established_streams_and_uses_the_new_backend_socket_lb() {
    scale_up_during_traffic(true);
}

#[test]
fn scale_up_keeps_established_streams_and_uses_the_new_backend_tc() {
    scale_up_during_traffic(false);
}

// ---------------------------------------------------------------------------------------------
// 3. UDP after its backend goes away
// ---------------------------------------------------------------------------------------------

/// One UDP socket (`ferrovia-echo`'s persistent UDP probe: a connected socket, one source port)
/// sending to the VIP of two backends; its backend leaves the `EndpointSlice` (and keeps
/// running, so nothing but ferrovia can move the flow). The same socket must be answered by the
/// other backend within a few seconds, and never fail on the way.
fn udp_flow_moves_when_its_backend_leaves(socket_lb: bool) {
    let c = Cluster::new(socket_lb, &["a", "b"]);
    c.write("web.yaml", &web(&c.ips(&["a", "b"])));
    wait_served(&c.client, &ProbeSpec::udp(vip()), &["a", "b"]);
    let stream = c
        .client
        .probe_stream(
            &ProbeSpec::udp(vip())
                .count(0)
                .persistent()
                .interval(TICK)
                .timeout(STREAM_TIMEOUT),
        )
        .expect("starting the UDP stream");
    let first = stream.wait_for(5, PATIENCE).expect("first UDP answers");
    let gone = first[0].server().expect("first UDP answer").to_owned();
    let stays = if gone == "a" { "b" } else { "a" };
    let mark = stream.results().len();

    c.write("web.yaml", &web(&c.ips(&[stays])));
    let moved_at = wait_for(
        &format!(
            "the same UDP socket ({}) answered by {stays} after {gone} left the service",
            first[0].local.as_deref().unwrap_or("?")
        ),
        || {
            let results = stream.results();
            results[mark..]
                .iter()
                .position(|r| r.server() == Some(stays))
                .map(|i| mark + i)
                .ok_or_else(|| {
                    format!(
                        "{} answers since the change, by {:?}; last {:?}",
                        results.len() - mark,
                        tally(&results[mark..]),
                        results.last()
                    )
                })
        },
    );
    let all = stream
        .wait_for(moved_at + MORE, PATIENCE)
        .expect("UDP answers after the move");
    // One socket throughout: no request failed, the socket was never reopened.
    for r in &all {
        assert!(
            r.ok && r.conn == 1 && r.local == first[0].local,
            "UDP flow disturbed at {r:?}"
        );
    }
    assert!(
        all[moved_at..].iter().all(|r| r.server() == Some(stays)),
        "the flow went back to {gone}: {:?}",
        tally(&all[moved_at..])
    );
}

#[test]
fn udp_flow_moves_to_another_backend_when_its_backend_leaves_tc() {
    udp_flow_moves_when_its_backend_leaves(false);
}

#[test]
fn udp_connected_socket_moves_to_another_backend_when_its_backend_leaves_socket_lb() {
    udp_flow_moves_when_its_backend_leaves(true);
}

/// The socket path's per-socket memory (`SOCK_FWD`): an unconnected UDP socket sending with
/// `sendto()` keeps one backend per VIP while it lives, and is re-balanced on its next datagram
/// when that backend leaves — same socket, same source port.
#[test]
fn udp_unconnected_socket_moves_to_another_backend_when_its_backend_leaves_socket_lb() {
    let c = Cluster::new(true, &["a", "b"]);
    c.write("web.yaml", &web(&c.ips(&["a", "b"])));
    wait_served(&c.client, &ProbeSpec::udp(vip()), &["a", "b"]);
    let mut socket = SendtoClient::start(&c.client.place(), vip()).expect("starting socat");
    // The first reply also waits for socat to start (slow in an emulated VM).
    let mut patience = Duration::from_secs(10);
    let mut ask = || {
        let reply = socket
            .request(patience)
            .expect("socat request")
            .unwrap_or_else(|| panic!("a reply within {patience:?}"));
        patience = STREAM_TIMEOUT;
        let (name, seen) = reply.split_once(' ').expect("NAME ip:port");
        let seen: SocketAddr = seen.parse().expect("ip:port");
        (name.to_owned(), seen)
    };
    let (gone, source) = ask();
    assert_eq!(source.ip(), c.client.ip);
    for _ in 0..10 {
        assert_eq!(
            ask(),
            (gone.clone(), source),
            "one backend per socket and VIP"
        );
    }
    let stays = if gone == "a" { "b" } else { "a" };

    c.write("web.yaml", &web(&c.ips(&[stays])));
    wait_for(&format!("the sendto socket answered by {stays}"), || {
        let (name, seen) = ask();
        assert_eq!(seen, source, "the same socket");
        if name == stays { Ok(()) } else { Err(name) }
    });
    for _ in 0..MORE {
        assert_eq!(ask(), (stays.to_owned(), source), "stays on {stays}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Agent restart under established connections
// ---------------------------------------------------------------------------------------------

/// Every stream of a restart test, with the expectations of its kind.
struct Traffic {
    tcp: Vec<Pinned>,
    /// A persistent UDP stream (one connected socket).
    udp: ProbeStream,
    /// A new TCP connection per request, straight through the stop and the start: no gap.
    fresh: ProbeStream,
}

impl Traffic {
    fn start(client: &Pod) -> Self {
        let tcp = streams_covering(client, vip(), &["a", "b"]);
        let udp = client
            .probe_stream(
                &ProbeSpec::udp(vip())
                    .count(0)
                    .persistent()
                    .interval(TICK)
                    .timeout(STREAM_TIMEOUT),
            )
            .expect("UDP stream");
        let fresh = client
            .probe_stream(
                &ProbeSpec::tcp(vip())
                    .count(0)
                    .interval(TICK)
                    .timeout(STREAM_TIMEOUT),
            )
            .expect("new-connection stream");
        let traffic = Self { tcp, udp, fresh };
        traffic.advance("before the restart");
        traffic
    }

    /// Waits until every stream answered `MORE` more requests, and checks all of them so far.
    fn advance(&self, context: &str) {
        assert_undisturbed(&self.tcp, &marks(&self.tcp), context);
        for (name, stream) in [("UDP", &self.udp), ("new-connection", &self.fresh)] {
            let n = stream.results().len() + MORE;
            let results = stream
                .wait_for(n, PATIENCE)
                .unwrap_or_else(|e| panic!("{context}: {name} stream: {e:#}"));
            if let Some(bad) = results.iter().find(|r| !r.ok) {
                panic!("{context}: {name} stream failed: {bad:?}");
            }
        }
        let udp = self.udp.results();
        assert!(
            udp.iter().all(|r| r.conn == 1),
            "{context}: the UDP socket was reopened"
        );
    }
}

fn connections_survive_agent_restart(socket_lb: bool) {
    let mut c = Cluster::new(socket_lb, &["a", "b"]);
    c.write("web.yaml", &web(&c.ips(&["a", "b"])));
    wait_served(&c.client, &ProbeSpec::tcp(vip()), &["a", "b"]);
    wait_served(&c.client, &ProbeSpec::udp(vip()), &["a", "b"]);
    let traffic = Traffic::start(&c.client);

    let maps_before: Vec<u64> = MAP_NAMES.iter().map(|m| map_id(&c.node, m)).collect();
    let links_before = pinned_links(&c.node);
    // On the tc path each stream has its conntrack entry; the restart must keep them.
    let ct_before: Vec<Option<Value>> = traffic
        .tcp
        .iter()
        .map(|p| {
            let local = p.stream.results()[0].local_addr().expect("local address");
            ct_translation(ct_out(&c.node, local, vip()))
        })
        .collect();
    if !socket_lb {
        assert!(ct_before.iter().all(Option::is_some), "{ct_before:?}");
    }

    let status = c.agent.stop().expect("stopping the agent (SIGTERM)");
    assert!(status.success(), "the agent exited with {status}");
    traffic.advance("while the agent is down");
    let down = new_connections(&c.client, &ProbeSpec::tcp(vip()), 10);
    assert!(down.iter().all(|r| r.ok), "while down: {:?}", tally(&down));

    c.agent.restart().expect("starting the agent again");
    traffic.advance("after the restart");
    let after = new_connections(&c.client, &ProbeSpec::tcp(vip()), 30);
    assert_eq!(
        tally(&after).keys().cloned().collect::<BTreeSet<_>>(),
        names(&["a", "b"]),
        "new connections after the restart"
    );

    // The same kernel objects: maps re-opened from their pins, not re-created.
    let maps_after: Vec<u64> = MAP_NAMES.iter().map(|m| map_id(&c.node, m)).collect();
    assert_eq!(maps_before, maps_after, "map ids of {MAP_NAMES:?}");
    assert_eq!(backend_count(&c.node, vip(), 6), Some(2));
    for (p, before) in traffic.tcp.iter().zip(&ct_before) {
        let local = p.stream.results()[0].local_addr().expect("local address");
        assert_eq!(
            &ct_translation(ct_out(&c.node, local, vip())),
            before,
            "conntrack of {local}"
        );
    }
    // Programs swapped in place: every pin is still there and runs this run's program; a tc
    // link is updated (same link, new program), not re-created.
    let links_after = pinned_links(&c.node);
    assert_eq!(
        links_before.keys().collect::<Vec<_>>(),
        links_after.keys().collect::<Vec<_>>()
    );
    for (name, (link, prog)) in &links_before {
        let (relinked, reloaded) = links_after[name];
        assert_ne!(*prog, reloaded, "{name} still runs the old program");
        if name.starts_with("tc-") {
            assert_eq!(*link, relinked, "{name} was re-created, not updated");
        }
    }
    if socket_lb {
        assert!(
            links_after.contains_key("cgroup-sock4_connect"),
            "{links_after:?}"
        );
        // The application still sees the VIP as its peer: SOCK_REVNAT survived.
        let results = traffic.tcp[0].stream.results();
        assert!(
            results.iter().all(|r| r.peer_addr() == Some(vip())),
            "{results:?}"
        );
    }
}

#[test]
fn established_connections_survive_agent_restart_socket_lb() {
    connections_survive_agent_restart(true);
}

#[test]
fn established_connections_survive_agent_restart_tc() {
    connections_survive_agent_restart(false);
}

// ---------------------------------------------------------------------------------------------
// 5. Bad manifests keep the last good state
// ---------------------------------------------------------------------------------------------

/// Waits for the agent to log `manifest rejected: <manifests dir>/<file>: <rest>`.
fn expect_rejected(c: &Cluster, file: &str, rest: &str) {
    let line = format!(
        "manifest rejected: {}: {rest}",
        c.node.manifests_dir().join(file).display()
    );
    expect_log(c, &line);
}

fn expect_log(c: &Cluster, text: &str) {
    wait_for(&format!("the agent logs {text:?}"), || {
        let log = c.agent.log();
        if log.contains(text) {
            Ok(())
        } else {
            Err(log.lines().rev().take(5).collect::<Vec<_>>().join(" | "))
        }
    });
}

#[test]
fn bad_manifests_are_reported_and_the_last_good_state_is_kept() {
    let c = Cluster::new(true, &["a", "b"]);
    let (a, b) = (c.pod("a").ip, c.pod("b").ip);
    let vip_s = VIP.to_string();
    c.write("web.yaml", &service("web", &vip_s, PORT.into()));
    c.write(
        "web-slice.yaml",
        &endpoint_slice("web", &[a.to_string(), b.to_string()]),
    );
    let tcp = ProbeSpec::tcp(vip());
    wait_served(&c.client, &tcp, &["a", "b"]);

    // A port out of range: the Service keeps its previous version.
    c.write("web.yaml", &service("web", &vip_s, 70_000));
    expect_rejected(
        &c,
        "web.yaml",
        "document 1: Service default/web: spec.ports[0].port: 70000 is out of range 1..=65535",
    );
    wait_served(&c.client, &tcp, &["a", "b"]);

    // An invalid clusterIP: likewise.
    c.write("web.yaml", &service("web", "10.96.0.999", PORT.into()));
    expect_rejected(
        &c,
        "web.yaml",
        "document 1: Service default/web: spec.clusterIP: \"10.96.0.999\" is not a valid IP \
         address",
    );
    wait_served(&c.client, &tcp, &["a", "b"]);

    // An unknown kind is rejected alone: the good documents of its file apply.
    let other = SocketAddr::from(([10, 96, 7, 2], 81));
    c.write(
        "other.yaml",
        &format!(
            "apiVersion: example.com/v1\nkind: Frobnicator\nmetadata: {{name: x}}\n---\n{}---\n{}",
            service("other", &other.ip().to_string(), 81),
            endpoint_slice("other", &[a.to_string()])
        ),
    );
    expect_rejected(
        &c,
        "other.yaml",
        "document 1: Frobnicator x: kind: unknown kind example.com/v1 Frobnicator:",
    );
    wait_served(&c.client, &ProbeSpec::tcp(other), &["a"]);
    wait_served(&c.client, &tcp, &["a", "b"]);

    // A slice with an invalid address keeps its previous version whole: b, listed only there,
    // still serves.
    c.write(
        "web-slice.yaml",
        &endpoint_slice("web", &[a.to_string(), "10.1.2.300".into()]),
    );
    expect_rejected(
        &c,
        "web-slice.yaml",
        "document 1: EndpointSlice default/web-1: endpoints[1].addresses[0]: \"10.1.2.300\" is \
         not an IPv4 address (addressType IPv4)",
    );
    wait_served(&c.client, &tcp, &["a", "b"]);

    // Fixed files apply: the port moves to 8080, the slice shrinks to a, the other service stays.
    c.write("web.yaml", &service("web", &vip_s, 8080));
    c.write("web-slice.yaml", &endpoint_slice("web", &[a.to_string()]));
    c.write(
        "other.yaml",
        &format!(
            "{}---\n{}",
            service("other", &other.ip().to_string(), 81),
            endpoint_slice("other", &[a.to_string()])
        ),
    );
    expect_log(&c, "manifests: all earlier errors are resolved");
    wait_served(&c.client, &ProbeSpec::tcp((VIP, 8080)), &["a"]);
    wait_served(&c.client, &ProbeSpec::tcp(other), &["a"]);
    let old = new_connections(&c.client, &tcp.clone().timeout(Duration::from_secs(1)), 3);
    assert!(
        old.iter().all(|r| !r.ok),
        "{VIP}:{PORT} still served: {old:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. CNI lifecycle
// ---------------------------------------------------------------------------------------------

/// Removes a pod's tc programs behind the agent's back (its pinned TCX links, or the clsact
/// qdisc holding classic filters).
fn detach_behind_the_agents_back(node: &Node, ifname: &str) {
    let mut removed = false;
    for hook in ["ingress", "egress"] {
        let path = links_dir(node).join(format!("tc-{ifname}-{hook}"));
        if path.exists() {
            std::fs::remove_file(&path).expect("unpinning a tc link");
            removed = true;
        }
    }
    if !removed {
        node.exec(&["tc", "qdisc", "del", "dev", ifname, "clsact"])
            .expect("removing clsact");
    }
}

#[test]
fn cni_add_attaches_check_verifies_del_detaches_and_add_needs_the_agent() {
    let node = Node::new().expect("creating the node");
    let mut agent = node.start_agent(AgentOpts::default()).expect("agent");
    let chain = cni_check::chain(&node);
    let pod = node.add_pod("default", "p").expect("CNI ADD");

    // ADD: both programs on the host side of the pod's veth, and the pod registered.
    let expected: BTreeSet<String> = ["egress:to_pod", "ingress:from_pod"]
        .map(String::from)
        .into();
    assert_eq!(tc_programs(&node, &pod.host_ifname), expected);
    assert!(
        registered(&node).contains("default/p"),
        "{:?}",
        registered(&node)
    );

    // CHECK of the whole chain (ptp, then ferrovia-cni asking the agent).
    let inv = cni_check::invocation(&node, &pod).expect("invocation");
    cni_check::check(&chain, &inv, &pod.cni_result).expect("CHECK of a healthy pod");

    // CHECK notices programs that are gone.
    let q = node.add_pod("default", "q").expect("CNI ADD of q");
    detach_behind_the_agents_back(&node, &q.host_ifname);
    let q_inv = cni_check::invocation(&node, &q).expect("invocation");
    let err = format!(
        "{:#}",
        cni_check::check(&chain, &q_inv, &q.cni_result).expect_err("CHECK of a detached pod")
    );
    assert!(
        err.contains("plugin ferrovia-cni")
            && err.contains(&format!("are not attached to {}", q.host_ifname)),
        "{err}"
    );

    // DEL: programs and pins gone, the pod forgotten (CHECK of its container: not registered).
    let (ifname, cached) = (pod.host_ifname.clone(), pod.cni_result.clone());
    pod.delete().expect("CNI DEL");
    assert_eq!(tc_programs(&node, &ifname), BTreeSet::new());
    assert!(
        !links_dir(&node)
            .join(format!("tc-{ifname}-ingress"))
            .exists()
            && !links_dir(&node)
                .join(format!("tc-{ifname}-egress"))
                .exists()
    );
    assert!(
        node.exec(&["ip", "link", "show", &ifname]).is_err(),
        "{ifname} still exists"
    );
    assert!(
        !registered(&node).contains("default/p"),
        "{:?}",
        registered(&node)
    );
    let ferrovia_only = Chain {
        name: chain.name.clone(),
        plugins: chain
            .plugins
            .iter()
            .filter(|p| p["type"] == "ferrovia-cni")
            .cloned()
            .collect(),
    };
    let err = format!(
        "{:#}",
        cni_check::check(&ferrovia_only, &inv, &cached).expect_err("CHECK after DEL")
    );
    assert!(
        err.contains("code 3") && err.contains("is not registered"),
        "{err}"
    );

    // ADD without a running agent fails, naming the agent's socket.
    assert!(agent.stop().expect("stopping the agent").success());
    let err = format!(
        "{:#}",
        node.add_pod("default", "late")
            .err()
            .expect("ADD without an agent must fail")
    );
    let socket = node.api_socket().display().to_string();
    assert!(
        err.contains("CNI ADD of plugin ferrovia-cni failed: code 11") && err.contains(&socket),
        "{err}"
    );
    // The failed ADD was cleaned up as a runtime would (DEL), leaving no namespace behind.
    assert_eq!(
        netns_with_prefix(&format!("{}-late", node.id())),
        Vec::<String>::new()
    );
}

/// On the classic path (`--no-tcx`, as on kernels before 6.6) CHECK looks at the filters
/// themselves, not just at the interface: the clsact qdisc gone, or one direction's filter
/// gone, fails CHECK naming the interface, and an untouched pod still passes.
#[test]
fn cni_check_notices_missing_classic_filters() {
    let node = Node::new().expect("creating the node");
    let mut agent = node
        .start_agent(AgentOpts {
            extra_args: vec!["--no-tcx".into()],
            ..AgentOpts::default()
        })
        .expect("agent");
    let chain = cni_check::chain(&node);
    let check = |pod: &Pod| {
        let inv = cni_check::invocation(&node, pod).expect("invocation");
        cni_check::check(&chain, &inv, &pod.cni_result)
    };
    let expect_detached = |pod: &Pod, what: &str| {
        let err = format!("{:#}", check(pod).expect_err(what));
        assert!(
            err.contains("plugin ferrovia-cni")
                && err.contains(&format!("are not attached to {}", pod.host_ifname)),
            "{what}: {err}"
        );
    };
    let both: BTreeSet<String> = ["egress:to_pod", "ingress:from_pod"]
        .map(String::from)
        .into();

    // Classic filters, no TCX pins; CHECK of a healthy pod passes.
    let healthy = node.add_pod("default", "p").expect("CNI ADD");
    assert_eq!(tc_programs(&node, &healthy.host_ifname), both);
    assert!(
        ["ingress", "egress"].iter().all(|hook| !links_dir(&node)
            .join(format!("tc-{}-{hook}", healthy.host_ifname))
            .exists()),
        "TCX links pinned despite --no-tcx"
    );
    check(&healthy).expect("CHECK of a healthy pod");

    // (a) The clsact qdisc, with both filters, removed.
    let q = node.add_pod("default", "q").expect("CNI ADD of q");
    detach_behind_the_agents_back(&node, &q.host_ifname);
    assert_eq!(tc_programs(&node, &q.host_ifname), BTreeSet::new());
    expect_detached(&q, "CHECK of a pod without clsact");

    // (b) Only the egress filter removed; the qdisc and the ingress filter stay.
    let r = node.add_pod("default", "r").expect("CNI ADD of r");
    node.exec(&["tc", "filter", "del", "dev", &r.host_ifname, "egress"])
        .expect("removing the egress filter");
    assert_eq!(
        tc_programs(&node, &r.host_ifname),
        BTreeSet::from(["ingress:from_pod".to_owned()])
    );
    expect_detached(&r, "CHECK of a pod without its egress filter");

    check(&healthy).expect("CHECK of the untouched pod");

    // A restarted agent swaps its new programs into the same filters (CHECK compares program
    // ids, so this is what keeps it passing), and attaches anew the filter that went missing.
    let prog_ids = || -> BTreeSet<u64> {
        let net = node
            .bpftool(&["net", "show", "dev", &healthy.host_ifname])
            .expect("bpftool net show");
        net[0]["tc"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|tc| tc["id"].as_u64())
            .collect()
    };
    let before = prog_ids();
    agent.restart().expect("restarting the agent");
    let after = prog_ids();
    assert!(
        after.len() == 2 && after.is_disjoint(&before),
        "{before:?} -> {after:?}"
    );
    check(&healthy).expect("CHECK of the untouched pod after a restart");
    assert_eq!(tc_programs(&node, &r.host_ifname), both);
    check(&r).expect("CHECK after a restart re-attached the egress filter");
}

// ---------------------------------------------------------------------------------------------
// 7. bpftool readability
// ---------------------------------------------------------------------------------------------

fn field_names(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn fields(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[test]
fn maps_are_btf_typed_and_readable_with_bpftool_tc() {
    let c = Cluster::new(false, &["a", "b"]);
    c.write("web.yaml", &web(&c.ips(&["a", "b"])));
    wait_served(&c.client, &ProbeSpec::tcp(vip()), &["a", "b"]);
    let stream = c.client.probe_stream(&stream_spec(vip())).expect("stream");
    let first = stream.wait_for(3, PATIENCE).expect("stream answers")[0].clone();
    let local = first.local_addr().expect("local address");
    let backend = c.pod(first.server().expect("answered")).ip;

    for name in MAP_NAMES {
        let show = c
            .node
            .bpftool(&["map", "show", "pinned", &pin(&c.node, name)])
            .expect("bpftool map show");
        assert_eq!(show["name"], name, "{show}");
        assert!(
            show["btf_id"].as_u64().unwrap_or(0) > 0,
            "{name} has no BTF: {show}"
        );
    }

    // SERVICES: slot 0 of the TCP frontend, then its two slots naming backend ids.
    let services = dump(&c.node, "SERVICES");
    for e in &services {
        assert_eq!(
            field_names(&e["key"]),
            fields(&["addr", "port", "proto", "family", "slot", "_pad"])
        );
        assert_eq!(
            field_names(&e["value"]),
            fields(&[
                "backend_id",
                "count",
                "flags",
                "service_id",
                "affinity_timeout_s"
            ])
        );
    }
    let tcp = frontend(&c.node, vip(), 6);
    let service_id = tcp[&0]["service_id"].clone();
    assert_eq!(tcp[&0]["count"], 2, "{tcp:?}");
    let ids: BTreeSet<u64> = [1, 2]
        .iter()
        .map(|s| tcp[s]["backend_id"].as_u64().expect("id"))
        .collect();

    // BACKENDS: those ids are a and b on the target port, owned by that frontend.
    let backends: BTreeMap<u64, Value> = dump(&c.node, "BACKENDS")
        .into_iter()
        .map(|e| (e["key"].as_u64().expect("backend id"), e["value"].clone()))
        .collect();
    let mut addrs = BTreeSet::new();
    for id in &ids {
        let b = &backends[id];
        assert_eq!(
            field_names(b),
            fields(&["addr", "port", "proto", "family", "service_id"])
        );
        assert_eq!(b["service_id"], service_id);
        addrs.insert(SocketAddr::from((ipv4(&b["addr"]), port(&b["port"]))));
    }
    let expected: BTreeSet<SocketAddr> = c
        .ips(&["a", "b"])
        .into_iter()
        .map(|ip| SocketAddr::from((ip, TARGET)))
        .collect();
    assert_eq!(addrs, expected);

    let backend_of = |id: u64| ipv4(&backends[&id]["addr"]);
    assert_conntrack_readable(&c.node, c.client.ip, local, backend, &ids, backend_of);

    // POD_STATS: an entry per pod interface (client, a, b), per CPU both directions' named
    // counters.
    let stats = dump(&c.node, "POD_STATS");
    assert_eq!(stats.len(), 3, "{stats:?}");
    let value = &stats[0]["values"][0]["value"];
    assert_eq!(
        field_names(value),
        fields(&["ingress", "egress"]),
        "{value}"
    );
    assert_eq!(
        field_names(&value["egress"]),
        fields(&[
            "packets",
            "bytes",
            "conns_tcp",
            "conns_udp",
            "malformed",
            "drop_policy",
            "drop_no_endpoints",
            "drop_ct_full",
            "drop_xlate_error"
        ]),
        "{value}"
    );
    assert_flow_maps_readable(&c.node);
}

/// `FLOW_LIMIT`: a flow-event bucket per pod interface (client, a, b) and the socket hooks'
/// (key 0); `FLOW_CONFIG`: the rate the agent set; both with named fields.
fn assert_flow_maps_readable(node: &Node) {
    let buckets = dump(node, "FLOW_LIMIT");
    assert_eq!(buckets.len(), 4, "{buckets:?}");
    let value = &buckets[0]["values"][0]["value"];
    assert_eq!(
        field_names(value),
        fields(&["credit_ns", "last_ns", "suppressed", "_pad"]),
        "{value}"
    );
    let config = dump(node, "FLOW_CONFIG");
    assert_eq!(
        field_names(&config[0]["value"]),
        fields(&["interval_ns", "burst_ns"]),
        "{config:?}"
    );
    assert_eq!(
        config[0]["value"]["interval_ns"], 10_000_000,
        "100 per second"
    );
}

/// CONNTRACK as bpftool shows it: the OUT entry of the connection `local` → VIP translates to
/// `backend` (one of the frontend's backend `ids`), the IN entry of its replies back to the VIP.
fn assert_conntrack_readable(
    node: &Node,
    client: Ipv4Addr,
    local: SocketAddr,
    backend: Ipv4Addr,
    ids: &BTreeSet<u64>,
    backend_of: impl Fn(u64) -> Ipv4Addr,
) {
    let out = ct_out(node, local, vip()).expect("conntrack entry of the stream");
    assert_eq!(
        field_names(&out),
        fields(&[
            "xlate_addr",
            "peer_addr",
            "xlate_port",
            "flags",
            "backend_id",
            "service_id",
            "_pad",
            "last_seen_ns"
        ])
    );
    assert_eq!(
        SocketAddr::from((ipv4(&out["xlate_addr"]), port(&out["xlate_port"]))),
        SocketAddr::from((backend, TARGET))
    );
    assert_eq!(ipv4(&out["peer_addr"]), client);
    let id = out["backend_id"].as_u64().expect("backend id");
    assert!(ids.contains(&id) && backend_of(id) == backend, "{out}");
    let reply = dump(node, "CONNTRACK")
        .into_iter()
        .find(|e| {
            let k = &e["key"];
            k["dir"] == 1
                && SocketAddr::from((ipv4(&k["saddr"]), port(&k["sport"])))
                    == SocketAddr::from((backend, TARGET))
                && SocketAddr::from((ipv4(&k["daddr"]), port(&k["dport"]))) == local
        })
        .expect("the reply's conntrack entry");
    assert_eq!(
        field_names(&reply["key"]),
        fields(&[
            "saddr", "daddr", "sport", "dport", "proto", "family", "dir", "_pad"
        ])
    );
    let v = &reply["value"];
    assert_eq!(
        SocketAddr::from((ipv4(&v["xlate_addr"]), port(&v["xlate_port"]))),
        vip()
    );
    assert_eq!(ipv4(&v["peer_addr"]), client);
}

// ---------------------------------------------------------------------------------------------
// 8. The HTTP endpoint: health, readiness, metrics
// ---------------------------------------------------------------------------------------------

/// `--metrics-addr` of the agents under test: loopback of the node's own network namespace.
const METRICS_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9963));

fn metrics_agent(node: &Node) -> anyhow::Result<Agent> {
    node.start_agent(AgentOpts {
        metrics_addr: Some(METRICS_ADDR),
        ..AgentOpts::default()
    })
}

/// The hook a degradation line of Status is about: the text before its first `:`.
fn hook_of(line: &str) -> String {
    line.split_once(':')
        .map_or(line, |(hook, _)| hook)
        .trim()
        .to_owned()
}

#[test]
#[allow(clippy::float_cmp)] // the values are small integers, exact in f64
fn metrics_endpoint_serves_health_readiness_and_the_kernels_degradations() {
    let node = Node::new().expect("creating the node");
    let agent = metrics_agent(&node).expect("starting ferrovia-agent with --metrics-addr");
    let get = |path: &str| {
        agent
            .http_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    };

    let health = get("/healthz");
    assert_eq!(
        (health.status, health.body.trim()),
        (200, "ok"),
        "{health:?}"
    );
    // The harness saw the API socket, made after the first sync: the agent is ready already.
    let ready = get("/readyz");
    assert_eq!(ready.status, 200, "{ready:?}");

    let metrics = get("/metrics");
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert_eq!(
        metrics.content_type.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let exposition = openmetrics::parse(&metrics.body)
        .unwrap_or_else(|e| panic!("/metrics is not OpenMetrics text: {e:#}\n{}", metrics.body));

    let status = agent.status().expect("ferrovia status");
    let build: Vec<_> = exposition.samples_named("ferrovia_build_info").collect();
    assert_eq!(build.len(), 1, "{}", metrics.body);
    assert_eq!(build[0].value, 1.0);
    assert_eq!(
        Some(build[0].labels["version"].as_str()),
        status["agent_version"].as_str()
    );

    // The family is there on every kernel; its series are Status's degradations, one per hook,
    // and they sum to the number of degradations (empty on a new kernel, not on 5.10).
    assert_eq!(
        exposition
            .families
            .get("ferrovia_datapath_degraded")
            .map(String::as_str),
        Some("gauge"),
        "{}",
        metrics.body
    );
    let degraded: Vec<&str> = status["degraded"]
        .as_array()
        .expect("Status has degraded")
        .iter()
        .map(|d| d.as_str().expect("a degradation is a line"))
        .collect();
    let hooks: BTreeSet<String> = degraded.iter().map(|d| hook_of(d)).collect();
    assert_eq!(
        exposition.label_values("ferrovia_datapath_degraded", "feature"),
        hooks,
        "Status says {degraded:#?}; /metrics says\n{}",
        metrics.body
    );
    let sum: f64 = exposition
        .samples_named("ferrovia_datapath_degraded")
        .map(|s| s.value)
        .sum();
    assert_eq!(sum, degraded.len() as f64, "{}", metrics.body);

    // What the TCX probe reports is what a pod gets: a pinned TCX link, or (`tc` degraded)
    // classic filters and no link.
    let pod = node.add_pod("default", "p").expect("CNI ADD");
    let tcx_link = links_dir(&node)
        .join(format!("tc-{}-ingress", pod.host_ifname))
        .exists();
    assert_eq!(
        tcx_link,
        !hooks.contains("tc"),
        "TCX link pinned: {tcx_link}; Status says {degraded:#?}"
    );
    assert_eq!(
        tc_programs(&node, &pod.host_ifname).len(),
        2,
        "both programs attached to {}",
        pod.host_ifname
    );

    // No label carries an address.
    for sample in &exposition.samples {
        for value in sample.labels.values() {
            assert!(
                value.parse::<IpAddr>().is_err() && value.parse::<SocketAddr>().is_err(),
                "{sample:?} carries an address"
            );
        }
    }
}

#[test]
fn an_agent_whose_metrics_address_is_taken_fails_naming_the_flag() {
    let node = Node::new().expect("creating the node");
    // Something else listens on the port (on all addresses, so on 127.0.0.1 too).
    let _squatter = node
        .serve(&[&format!("tcp:{}", METRICS_ADDR.port())])
        .expect("serving on the metrics port");
    let Err(e) = metrics_agent(&node) else {
        panic!("the agent started although {METRICS_ADDR} is taken");
    };
    let e = format!("{e:#}");
    assert!(e.contains("exited (exit status: 1)"), "{e}");
    // The whole log: the error's tail may be all backtrace (the harness sets RUST_BACKTRACE).
    let log = std::fs::read_to_string(node.dir().join("agent.log")).expect("the agent's log");
    assert!(
        log.contains(&format!(
            "Error: --metrics-addr {METRICS_ADDR}: cannot listen"
        )),
        "{log}"
    );
    assert!(log.contains("Address already in use"), "{log}");
    // It stopped before touching the kernel: nothing pinned.
    let pinned: Vec<_> = std::fs::read_dir(node.bpffs_root())
        .expect("reading the bpffs root")
        .collect();
    assert!(pinned.is_empty(), "pinned although it failed: {pinned:?}");
}

/// A pod registered by an agent that could not read its network-namespace cookie (a kernel
/// before 5.14 with an older version) gets it when the agent restarts: without its
/// `POD_NETNS` entry, its hairpin through its own VIP would not be judged by its policy.
#[test]
fn a_restart_learns_the_netns_cookie_of_pods_registered_without_it() {
    let node = Node::new().expect("creating the node");
    let mut agent = node
        .start_agent(AgentOpts::default())
        .expect("starting ferrovia-agent");
    let _pod = node.add_pod("default", "p").expect("CNI ADD");
    let entries = || {
        dump(&node, "POD_NETNS")
            .into_iter()
            .map(|e| (e["key"].as_u64().expect("a cookie"), e["value"].clone()))
            .collect::<Vec<_>>()
    };
    let before = entries();
    assert_eq!(before.len(), 1, "{before:?}");

    // What such an agent leaves: no cookie in the pod's record, no entry.
    agent.stop().expect("stopping the agent");
    let state = node.state_dir().join("pods.json");
    let mut pods: Value =
        serde_json::from_slice(&std::fs::read(&state).expect("pods.json")).expect("JSON");
    for pod in pods.as_array_mut().expect("a list of pods") {
        pod["netns_cookie"] = Value::Null;
    }
    std::fs::write(&state, serde_json::to_vec(&pods).expect("JSON")).expect("pods.json");
    let key: Vec<String> = before[0]
        .0
        .to_le_bytes()
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut args = vec!["map", "delete", "pinned"];
    let pinned = pin(&node, "POD_NETNS");
    args.push(&pinned);
    args.push("key");
    args.extend(key.iter().map(String::as_str));
    node.bpftool(&args).expect("bpftool map delete");
    assert!(entries().is_empty());

    agent.restart().expect("restarting the agent");
    assert_eq!(entries(), before, "the cookie is learnt again at start");
}
