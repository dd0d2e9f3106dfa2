//! The operator's CLI end to end: the real agent on a manifests directory, pods made by the real
//! CNI chain, and `ferrovia services|endpoints|policies|pods|maps` asked about them. The JSON
//! answers must name exactly what the test wrote; the maps' must agree with what bpftool reads
//! from the same pins. Plus one table per command, and the error when no agent answers.
//!
//! Needs root and the workspace binaries (`cargo build --bins`). The test builds its own node
//! (uniquely named); no traffic runs, so the maps hold only what the agent wrote.

use std::collections::{BTreeMap, BTreeSet};

use ferrovia_tests::cli::{self, ferrovia};
use ferrovia_tests::{Agent, AgentOpts, Node, Pod, sys};
use serde_json::{Value, json};

/// The capacities the agent is started with (`--map-*`), smaller than the defaults so that a
/// map left at its default size would be told apart.
const SIZES: [(&str, &str, u64); 6] = [
    ("--map-services", "SERVICES", 4096),
    ("--map-backends", "BACKENDS", 2048),
    ("--map-conntrack", "CONNTRACK", 8192),
    ("--map-affinity", "AFFINITY", 1024),
    ("--map-policy-peers", "POLICY_PEERS", 4096),
    ("--map-policy-ct", "POLICY_CT", 2048),
];

/// `web` selects web-a (ready) and web-b (terminating: it has a deletion timestamp); `manual`
/// has a hand-written slice with a ready, a terminating and a not-ready endpoint; `drain` has
/// only a terminating one, which kube-proxy falls back to.
const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 9376}
  - {name: dns, protocol: UDP, port: 53, targetPort: 9376}
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, protocol: TCP, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: manual-1, namespace: default, labels: {kubernetes.io/service-name: manual}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
- addresses: ["192.0.2.1"]
  conditions: {ready: true, serving: true, terminating: false}
- addresses: ["192.0.2.2"]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: ["192.0.2.3"]
  conditions: {ready: false, serving: false, terminating: false}
---
apiVersion: v1
kind: Service
metadata: {name: drain, namespace: default}
spec:
  clusterIP: 10.96.0.12
  ports: [{protocol: TCP, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: drain-1, namespace: default, labels: {kubernetes.io/service-name: drain}}
addressType: IPv4
ports: [{protocol: TCP, port: 8080}]
endpoints:
- addresses: ["192.0.2.4"]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: default, labels: {app: web}}
spec: {containers: [{name: echo, image: ferrovia-echo}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-b
  namespace: default
  labels: {app: web}
  deletionTimestamp: "2026-01-01T00:00:00Z"
spec: {containers: [{name: echo, image: ferrovia-echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: echo, image: ferrovia-echo}]}
"#;

/// `web-in` isolates the web pods for ingress, `client-out` the client for egress; `never`
/// has no valid version (an unknown policy type), so it is rejected and not in force.
const POLICIES: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-in, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{protocol: TCP, port: 9376}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-out, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: web}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: never, namespace: default}
spec:
  podSelector: {}
  policyTypes: [Sideways]
";

/// An endpoint's conditions: ready, serving, terminating.
const READY: [bool; 3] = [true, true, false];
const TERMINATING: [bool; 3] = [false, true, true];
const NOT_READY: [bool; 3] = [false, false, false];

/// Fields drop in order: pods first (CNI DEL while the agent still answers), then the agent,
/// then the node.
struct Cluster {
    pods: BTreeMap<String, Pod>,
    agent: Agent,
    node: Node,
}

impl Cluster {
    fn new() -> Self {
        let node = Node::new().expect("node");
        node.write_manifest("services.yaml", SERVICES)
            .expect("manifest");
        node.write_manifest("policies.yaml", POLICIES)
            .expect("manifest");
        let extra_args = SIZES
            .iter()
            .flat_map(|(flag, _, size)| [(*flag).to_owned(), size.to_string()])
            .collect();
        let agent = node
            .start_agent(AgentOpts {
                extra_args,
                ..AgentOpts::default()
            })
            .expect("agent");
        let pods = ["web-a", "web-b", "client"]
            .into_iter()
            .map(|name| (name.to_owned(), node.add_pod("default", name).expect("pod")))
            .collect();
        let c = Self { pods, agent, node };
        // Each ADD resyncs already; this makes sure the maps reflect the whole directory.
        let rejected = c.agent.sync().expect("sync");
        assert_eq!(rejected.len(), 1, "only `never` is rejected: {rejected:?}");
        c
    }

    fn json(&self, command: &str) -> Value {
        cli::json(&self.node.api_socket(), command)
            .unwrap_or_else(|e| panic!("ferrovia -o json {command}: {e:#}"))
    }

    fn table(&self, command: &str) -> String {
        cli::table(&self.node.api_socket(), command)
            .unwrap_or_else(|e| panic!("ferrovia {command}: {e:#}"))
    }

    fn ip(&self, pod: &str) -> String {
        self.pods[pod].ip.to_string()
    }
}

/// The data rows of a table: the lines after the header (which must be `header`, spaces aside)
/// whose first cell is in `keys`.
fn rows<'a>(table: &'a str, header: &str, keys: &[&str]) -> Vec<&'a str> {
    let mut lines = table.lines();
    let first = lines.next().unwrap_or_default();
    assert_eq!(
        first.split_whitespace().collect::<Vec<_>>(),
        header.split_whitespace().collect::<Vec<_>>(),
        "the header of:\n{table}"
    );
    lines
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|c| keys.contains(&c))
        })
        .collect()
}

#[test]
fn services_name_every_frontend_written() {
    let c = Cluster::new();
    let frontend = |name: &str, port_name: &str, address: &str, port: u16, proto: &str| {
        let (affinity, timeout) = if name == "web" {
            ("ClientIP", 600)
        } else {
            ("None", 0)
        };
        json!({
            "namespace": "default", "name": name, "port_name": port_name, "type": "ClusterIP",
            "address": address, "port": port, "protocol": proto,
            "session_affinity": affinity, "affinity_timeout_seconds": timeout,
            // web-b is terminating while web-a is ready: one backend everywhere.
            "backends": 1,
        })
    };
    assert_eq!(
        c.json("services"),
        json!({
            "frontends": [
                frontend("web", "dns", "10.96.0.10", 53, "UDP"),
                frontend("web", "http", "10.96.0.10", 80, "TCP"),
                frontend("manual", "http", "10.96.0.11", 80, "TCP"),
                frontend("drain", "", "10.96.0.12", 8080, "TCP"),
            ],
            "skipped": [],
        })
    );

    let table = c.table("services");
    let rows = rows(
        &table,
        "SERVICE PORT TYPE FRONTEND AFFINITY BACKENDS",
        &["default/web", "default/manual", "default/drain"],
    );
    assert_eq!(rows.len(), 4, "one row per frontend:\n{table}");
    assert!(
        rows.iter()
            .any(|r| r.contains("10.96.0.12:8080/TCP") && r.contains("ClusterIP")),
        "{table}"
    );
}

#[test]
fn endpoints_show_conditions_and_selection() {
    let c = Cluster::new();
    let endpoint = |address: &str, port: u16, conditions: [bool; 3], selected: bool| {
        json!({
            "address": address, "port": port, "ready": conditions[0],
            "serving": conditions[1], "terminating": conditions[2], "selected": selected,
        })
    };
    // Sorted by address, as the answer is.
    let mut web = vec![
        (
            c.pods["web-a"].ip,
            endpoint(&c.ip("web-a"), 9376, READY, true),
        ),
        (
            c.pods["web-b"].ip,
            endpoint(&c.ip("web-b"), 9376, TERMINATING, false),
        ),
    ];
    web.sort_by_key(|(ip, _)| *ip);
    let web: Vec<Value> = web.into_iter().map(|(_, e)| e).collect();
    let port = |name: &str, port_name: &str, protocol: &str, endpoints: Value| {
        json!({"namespace": "default", "name": name, "port_name": port_name,
               "protocol": protocol, "endpoints": endpoints})
    };
    assert_eq!(
        c.json("endpoints"),
        json!({"service_ports": [
            port("drain", "", "TCP", json!([endpoint("192.0.2.4", 8080, TERMINATING, true)])),
            port("manual", "http", "TCP", json!([
                endpoint("192.0.2.1", 8080, READY, true),
                endpoint("192.0.2.2", 8080, TERMINATING, false),
                endpoint("192.0.2.3", 8080, NOT_READY, false),
            ])),
            port("web", "dns", "UDP", json!(web)),
            port("web", "http", "TCP", json!(web)),
        ]})
    );

    let table = c.table("endpoints");
    let rows = rows(
        &table,
        "SERVICE PORT ENDPOINT READY SERVING TERMINATING SELECTED",
        &["default/web", "default/manual", "default/drain"],
    );
    assert_eq!(rows.len(), 8, "one row per endpoint:\n{table}");
    assert!(
        rows.iter().any(|r| r.contains("192.0.2.4:8080")
            && r.split_whitespace().skip(3).collect::<Vec<_>>() == ["no", "yes", "yes", "yes"]),
        "the terminating fallback is selected:\n{table}"
    );
}

#[test]
fn policies_show_selected_pods_and_rejections() {
    let c = Cluster::new();
    let policy = |name: &str, types: &[&str], pods: &[&str], rules: [u64; 2], errors: &[&str]| {
        json!({
            "namespace": "default", "name": name, "policy_types": types,
            "selected_pods": pods, "ingress_rules": rules[0], "egress_rules": rules[1],
            "errors": errors,
        })
    };
    let answer = c.json("policies");
    assert_eq!(
        answer["policies"],
        json!([
            policy("client-out", &["Egress"], &["client"], [0, 1], &[]),
            policy("web-in", &["Ingress"], &["web-a", "web-b"], [1, 0], &[]),
        ])
    );
    let rejected = answer["rejected"].as_array().expect("rejected");
    assert_eq!(rejected.len(), 1, "{answer}");
    let line = rejected[0].as_str().unwrap();
    assert!(
        line.contains("policies.yaml") && line.contains("NetworkPolicy default/never"),
        "{line}"
    );

    let table = c.table("policies");
    let rows = rows(
        &table,
        "POLICY TYPES INGRESS RULES EGRESS RULES SELECTED PODS",
        &["default/web-in", "default/client-out"],
    );
    assert_eq!(rows.len(), 2, "one row per policy:\n{table}");
    assert!(
        table.contains("rejected, not in force:"),
        "the rejection is shown:\n{table}"
    );

    // web-in edited into an invalid version: its last valid version stays in force, with
    // the rejection on it.
    c.node
        .write_manifest(
            "policies.yaml",
            &POLICIES.replace("port: 9376", "port: 70000"),
        )
        .unwrap();
    let errors = c.agent.sync().expect("sync");
    assert_eq!(errors.len(), 2, "{errors:?}");
    let answer = c.json("policies");
    let web_in = &answer["policies"][1];
    assert_eq!(web_in["name"], "web-in", "{answer}");
    assert_eq!(web_in["ingress_rules"], 1);
    assert_eq!(web_in["selected_pods"], json!(["web-a", "web-b"]));
    let errors = web_in["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{answer}");
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .contains("spec.ingress[0].ports[0].port"),
        "{answer}"
    );
    assert_eq!(answer["rejected"].as_array().map(Vec::len), Some(1));
}

#[test]
fn pods_show_addresses_interfaces_attachments_and_isolation() {
    let c = Cluster::new();
    // What the kernel gives the pods: TCX links, unless the agent reports their absence.
    let status = c.agent.status().expect("status");
    let tcx = !status["degraded"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|d| d.as_str().is_some_and(|d| d.contains("no TCX links")));
    let answer = c.json("pods");
    let pods = answer["pods"].as_array().expect("pods");
    assert_eq!(
        pods.iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["client", "web-a", "web-b"],
        "{answer}"
    );
    for p in pods {
        let name = p["name"].as_str().unwrap();
        let pod = &c.pods[name];
        // The harness's container ids (tests/src/pod.rs).
        let container_id = format!("{}-default-{name}", c.node.id());
        assert_eq!(
            (
                &p["namespace"],
                &p["container_id"],
                &p["ips"],
                &p["ifname"],
                &p["host_ifname"],
                &p["netns"]
            ),
            (
                &json!("default"),
                &json!(container_id),
                &json!([pod.ip.to_string()]),
                &json!("eth0"),
                &json!(pod.host_ifname),
                &json!(pod.netns_path())
            ),
            "{p}"
        );
        for program in ["from_pod", "to_pod"] {
            let attachment = &p[program];
            if tcx {
                assert_eq!(
                    attachment,
                    &json!({"mode": "tcx", "priority": 0, "handle": 0})
                );
            } else {
                assert_eq!(attachment["mode"], "cls_bpf", "{p}");
                assert_ne!(attachment["priority"], 0, "{p}");
            }
        }
        let client = name == "client";
        assert_eq!(p["ingress_isolated"], !client, "{p}");
        assert_eq!(p["egress_isolated"], client, "{p}");
    }

    let table = c.table("pods");
    let rows = rows(
        &table,
        "POD IPS HOST IFACE FROM_POD TO_POD ISOLATED IN PKTS/DROPS OUT PKTS/DROPS CONTAINER",
        &["default/web-a", "default/web-b", "default/client"],
    );
    assert_eq!(rows.len(), 3, "one row per pod:\n{table}");
    for pod in c.pods.values() {
        assert!(
            rows.iter()
                .any(|r| r.contains(&pod.host_ifname) && r.contains(&pod.ip.to_string())),
            "{} in:\n{table}",
            pod.name
        );
    }
}

#[test]
fn maps_agree_with_bpftool_and_hold_what_was_written() {
    let c = Cluster::new();
    let answer = c.json("maps");
    let root = c.node.bpffs_root();
    assert_eq!(answer["bpffs_root"], json!(root.display().to_string()));
    let maps: BTreeMap<String, &Value> = answer["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_owned(), m))
        .collect();
    // Every pinned map is listed, and nothing else: the pins are the files under the root.
    let pinned: BTreeSet<String> = std::fs::read_dir(root)
        .expect("bpffs root")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        maps.keys().cloned().collect::<BTreeSet<_>>(),
        pinned,
        "{answer}"
    );

    for (name, map) in &maps {
        let pin = root.join(name);
        assert_eq!(map["pin"], json!(pin.display().to_string()));
        assert_eq!(map["error"], "", "{map}");
        let pin = pin.display().to_string();
        let show = c
            .node
            .bpftool(&["map", "show", "pinned", &pin])
            .expect("bpftool map show");
        let dump = c
            .node
            .bpftool(&["map", "dump", "pinned", &pin])
            .expect("bpftool map dump");
        let entries = dump.as_array().map_or(0, Vec::len) as u64;
        assert_eq!(
            [
                &map["id"],
                &map["type"],
                &map["key_size"],
                &map["value_size"],
                &map["max_entries"],
                &map["entries"]
            ],
            [
                &show["id"],
                &show["type"],
                &show["bytes_key"],
                &show["bytes_value"],
                &show["max_entries"],
                &json!(entries)
            ],
            "{name}: ferrovia says {map}, bpftool shows {show}"
        );
        let (max, held) = (
            map["max_entries"].as_f64().unwrap(),
            map["entries"].as_f64().unwrap(),
        );
        assert!(
            (map["fill"].as_f64().unwrap() - held / max).abs() < 1e-9,
            "{map}"
        );
    }
    for (_, name, size) in SIZES {
        assert_eq!(maps[name]["max_entries"], size, "{name}: --map-* size");
    }
    // What was written: 4 frontends with one backend each (slot 0 and a slot apiece), and
    // the three pods isolated by policy.
    for (name, entries) in [("SERVICES", 8), ("BACKENDS", 4), ("POLICY_PODS", 3)] {
        assert_eq!(maps[name]["entries"], entries, "{name}: {}", maps[name]);
    }

    let table = c.table("maps");
    let names: Vec<&str> = maps.keys().map(String::as_str).collect();
    let rows = rows(
        &table,
        "MAP TYPE KEY VALUE MAX ENTRIES ENTRIES FILL",
        &names,
    );
    assert_eq!(rows.len(), maps.len(), "one row per map:\n{table}");
    assert!(
        rows.iter()
            .any(|r| r.starts_with("SERVICES ") && r.contains(" 4096 ")),
        "{table}"
    );
}

/// Without an agent every command fails, naming the socket it dialed: a path with no socket,
/// and a socket file nobody listens on (an agent that crashed).
#[test]
fn unreachable_agent_is_an_error_naming_the_socket() {
    // Named as the harness names its objects, so a sweep removes it if this test dies.
    let dir = sys::temp_root().join(sys::unique_id());
    std::fs::create_dir_all(&dir).unwrap();
    let absent = dir.join("absent.sock");
    let stale = dir.join("stale.sock");
    let _ = std::fs::remove_file(&stale);
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for socket in [&absent, &stale] {
        for command in [
            "status",
            "services",
            "endpoints",
            "policies",
            "pods",
            "maps",
        ] {
            for output in ["table", "json"] {
                let out = ferrovia(socket, &["-o", output, command]).expect("run ferrovia");
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(
                    !out.status.success(),
                    "{command} succeeded without an agent"
                );
                assert!(
                    stderr.contains(&*socket.to_string_lossy())
                        && stderr.contains("cannot reach the ferrovia agent"),
                    "{command}: {stderr}"
                );
                assert!(out.stdout.is_empty(), "{command} printed to stdout");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
