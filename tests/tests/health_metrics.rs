//! The data path's health in `/metrics`, end to end: map fill as bpftool sees the pinned
//! maps, capacities as the `--map-*` flags set them, attach status as Status reports it, the
//! sync histograms growing with each change, and rejected manifests counted. Needs root,
//! bpffs and cgroup v2, as every e2e suite.
#![allow(clippy::float_cmp)] // the values compared are counts, exact in f64
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    thread::sleep,
    time::{Duration, Instant},
};

use ferrovia_tests::{Agent, AgentOpts, Node, ProbeSpec, openmetrics};

const METRICS_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9965));

/// The capacities the agent is started with (`--map-*`), none of them a default.
const SIZES: [(&str, &str, f64); 3] = [
    ("--map-services", "SERVICES", 4_000.0),
    ("--map-backends", "BACKENDS", 5_000.0),
    ("--map-conntrack", "CONNTRACK", 6_000.0),
];

/// A selector-less Service of two ports and its slice of three endpoints.
const WEB: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.9.1
  ports:
  - {name: tcp, protocol: TCP, port: 80, targetPort: 9376}
  - {name: udp, protocol: UDP, port: 53, targetPort: 9376}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: tcp, protocol: TCP, port: 9376}
- {name: udp, protocol: UDP, port: 9376}
endpoints:
- addresses: [\"10.244.9.1\"]
- addresses: [\"10.244.9.2\"]
- addresses: [\"10.244.9.3\"]
";

/// A Service the source rejects (its cluster IP is no address).
fn invalid_service(name: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: not-an-address
  ports:
  - {{protocol: TCP, port: 80}}
"
    )
}

/// How long a change may take to show in `/metrics` without a `ferrovia sync` (the watcher's
/// debounce is 10-200 ms): a bound on waiting, not a measurement.
const PATIENCE: Duration = Duration::from_secs(20);

fn start(node: &Node) -> Agent {
    let mut extra_args = Vec::new();
    for (flag, _, size) in SIZES {
        extra_args.push(format!("{flag}={size}"));
    }
    node.start_agent(AgentOpts {
        metrics_addr: Some(METRICS_ADDR),
        extra_args,
        ..AgentOpts::default()
    })
    .expect("starting ferrovia-agent with --metrics-addr")
}

fn scrape(agent: &Agent) -> (openmetrics::Exposition, String) {
    let reply = agent.http_get("/metrics").expect("GET /metrics");
    assert_eq!(reply.status, 200, "{reply:?}");
    let exposition = openmetrics::parse(&reply.body)
        .unwrap_or_else(|e| panic!("/metrics is not OpenMetrics text: {e:#}\n{}", reply.body));
    (exposition, reply.body)
}

/// The value of the one sample `name` whose labels include `labels`.
fn value(exposition: &openmetrics::Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = exposition
        .samples_named(name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
    found[0]
}

fn pin(node: &Node, map: &str) -> String {
    node.bpffs_root().join(map).display().to_string()
}

/// Entries of a pinned map as bpftool dumps them.
fn bpftool_entries(node: &Node, map: &str) -> f64 {
    let dump = node
        .bpftool(&["map", "dump", "pinned", &pin(node, map)])
        .unwrap_or_else(|e| panic!("bpftool map dump {map}: {e:#}"));
    dump.as_array()
        .unwrap_or_else(|| panic!("bpftool map dump {map}: not a list: {dump}"))
        .len() as f64
}

fn rejected(exposition: &openmetrics::Exposition) -> f64 {
    value(
        exposition,
        "ferrovia_sync_errors_total",
        &[("kind", "rejected_object")],
    )
}

#[test]
fn map_fill_capacities_and_attach_status_match_the_kernel() {
    let node = Node::new().expect("creating the node");
    let agent = start(&node);
    let _pod = node.add_pod("default", "p").expect("CNI ADD");
    node.write_manifest("web.yaml", WEB).expect("manifest");
    assert_eq!(agent.sync().expect("sync"), Vec::<String>::new());
    let (metrics, body) = scrape(&agent);

    for (flag, map, size) in SIZES {
        assert_eq!(
            value(&metrics, "ferrovia_map_capacity", &[("map", map)]),
            size,
            "{flag}\n{body}"
        );
        let shown = node
            .bpftool(&["map", "show", "pinned", &pin(&node, map)])
            .expect("bpftool map show");
        assert_eq!(shown["max_entries"].as_f64(), Some(size), "{shown}");
    }
    // Two frontends of three backends: entries the watcher and bpftool agree on.
    for map in ["SERVICES", "BACKENDS"] {
        let entries = value(&metrics, "ferrovia_map_entries", &[("map", map)]);
        assert_eq!(entries, bpftool_entries(&node, map), "{map}\n{body}");
        assert!(entries >= 6.0, "{map}: {entries}\n{body}");
    }
    // Every pinned map has its series, and none is fuller than its capacity.
    let maps = metrics.label_values("ferrovia_map_entries", "map");
    assert_eq!(maps, metrics.label_values("ferrovia_map_capacity", "map"));
    for map in ["SERVICES", "CONNTRACK", "POLICY_VERDICTS", "POD_STATS"] {
        assert!(maps.contains(map), "{map} missing\n{body}");
    }
    // One registered pod: one POD_STATS entry.
    assert_eq!(
        value(&metrics, "ferrovia_map_entries", &[("map", "POD_STATS")]),
        1.0,
        "{body}"
    );

    let status = agent.status().expect("ferrovia status");
    assert_eq!(value(&metrics, "ferrovia_pods", &[]), 1.0, "{body}");
    assert_eq!(
        value(&metrics, "ferrovia_pods_attached", &[]),
        1.0,
        "{body}"
    );
    let socket_lb = f64::from(u8::from(status["socket_lb"] == true));
    for program in [
        "sock4_connect",
        "sock4_sendmsg",
        "sock4_recvmsg",
        "sock4_getpeer",
    ] {
        assert_eq!(
            value(
                &metrics,
                "ferrovia_program_attached",
                &[("program", program), ("hook", "cgroup")]
            ),
            socket_lb,
            "Status: {status}\n{body}"
        );
    }
}

/// Waits until `/metrics` satisfies `done`, or fails with the last exposition.
fn wait_for(agent: &Agent, what: &str, done: impl Fn(&openmetrics::Exposition) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (metrics, body) = scrape(agent);
        if done(&metrics) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not after {PATIENCE:?}\n{body}"
        );
        sleep(Duration::from_millis(50));
    }
}

#[test]
fn syncs_are_timed_and_rejections_counted() {
    let node = Node::new().expect("creating the node");
    let agent = start(&node);
    let (before, body) = scrape(&agent);
    let count = |m: &openmetrics::Exposition, name: &str| value(m, name, &[]);
    let syncs = count(&before, "ferrovia_sync_duration_seconds_count");
    let changes = count(&before, "ferrovia_sync_latency_seconds_count");
    assert!(syncs >= 1.0, "the first sync is timed\n{body}");
    assert_eq!(rejected(&before), 0.0, "{body}");

    // A manifest change reaches the node through the watcher alone: both histograms grow, and
    // the maps hold the service.
    node.write_manifest("web.yaml", WEB).expect("manifest");
    wait_for(&agent, "a synced change", |m| {
        count(m, "ferrovia_sync_latency_seconds_count") > changes
            && value(m, "ferrovia_map_entries", &[("map", "SERVICES")]) > 0.0
    });
    let (after, body) = scrape(&agent);
    assert!(
        count(&after, "ferrovia_sync_duration_seconds_count") > syncs,
        "{body}"
    );
    // No error of any kind yet; the kinds are there before the first error.
    let kinds = after.label_values("ferrovia_sync_errors_total", "kind");
    for kind in ["frontend_map_full", "policy_write", "rejected_object"] {
        assert!(kinds.contains(kind), "{kind} missing\n{body}");
    }
    for s in after.samples_named("ferrovia_sync_errors_total") {
        assert_eq!(s.value, 0.0, "{s:?}\n{body}");
    }

    // An invalid object: counted once per rejection `ferrovia sync` reports, however often
    // the agent looks at it after.
    node.write_manifest("bad.yaml", &invalid_service("bad"))
        .expect("manifest");
    let errors = agent.sync().expect("sync");
    assert!(!errors.is_empty(), "the bad Service is rejected");
    let (metrics, body) = scrape(&agent);
    assert_eq!(
        rejected(&metrics),
        errors.len() as f64,
        "{errors:#?}\n{body}"
    );
    let _ = agent.sync().expect("sync");
    let (metrics, body) = scrape(&agent);
    assert_eq!(
        rejected(&metrics),
        errors.len() as f64,
        "{errors:#?}\n{body}"
    );

    // A second one that changes nothing in the desired state starts no sync: scrapes count it.
    node.write_manifest("worse.yaml", &invalid_service("worse"))
        .expect("manifest");
    wait_for(&agent, "the second rejection counted", |m| {
        rejected(m) > errors.len() as f64
    });
}

/// A client and two pods behind one service, TCP and UDP on port 80.
const LB: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: echo, image: ferrovia-echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: default, labels: {app: lb}}
spec: {containers: [{name: echo, image: ferrovia-echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: default, labels: {app: lb}}
spec: {containers: [{name: echo, image: ferrovia-echo}]}
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  clusterIP: 10.96.9.30
  selector: {app: lb}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080}
  - {name: echo, protocol: UDP, port: 80, targetPort: 8080}
";
const LB_VIP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 96, 9, 30), 80));

/// The selections of each backend of `lb`'s `port` in a scrape, by the `backend` label.
fn selections(m: &openmetrics::Exposition, port: &str) -> std::collections::BTreeMap<String, f64> {
    m.samples_named("ferrovia_service_backend_selections_total")
        .filter(|s| s.labels["service"] == "lb" && s.labels["port"] == port)
        .map(|s| (s.labels["backend"].clone(), s.value))
        .collect()
}

/// A counter without labels (0 when absent).
fn single(m: &openmetrics::Exposition, name: &str) -> f64 {
    m.samples_named(name).map(|s| s.value).sum()
}

/// Rewrites the UDP entries of the pinned `CONNTRACK` as last seen 130 s ago (expired: UDP's
/// timeout is 120 s); returns how many. Ages are differences of `CLOCK_MONOTONIC` read as
/// signed (`age_ns`), so an entry can be older than the machine's uptime, as in a VM of the
/// kernel matrix that booted seconds ago.
fn expire_udp_conntrack(node: &Node) -> usize {
    let path = pin(node, "CONNTRACK");
    let dump = node
        .bpftool(&["map", "dump", "pinned", &path])
        .expect("bpftool map dump CONNTRACK");
    let hex = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("hex bytes")
            .iter()
            .map(|b| {
                b.as_str()
                    .expect("0x..")
                    .trim_start_matches("0x")
                    .to_owned()
            })
            .collect()
    };
    let mut n = 0;
    for entry in dump.as_array().expect("entries") {
        let key = hex(&entry["key"]);
        let mut value = hex(&entry["value"]);
        // CtKey: two 16-byte addresses, two ports, then the protocol. CtValue ends with
        // `last_seen_ns`.
        if key[36] != "11" {
            continue;
        }
        let len = value.len();
        let last_seen = ferrovia_tests::sys::monotonic_ns().wrapping_sub(130_000_000_000);
        for (byte, b) in value[len - 8..].iter_mut().zip(last_seen.to_le_bytes()) {
            *byte = format!("{b:02x}");
        }
        let mut args = vec!["bpftool", "map", "update", "pinned", &path, "key", "hex"];
        args.extend(key.iter().map(String::as_str));
        args.extend(["value", "hex"]);
        args.extend(value.iter().map(String::as_str));
        node.exec(&args).expect("bpftool map update");
        n += 1;
    }
    n
}

/// Each backend of `lb`'s ports was selected, labelled by its pod, and the selections added
/// between the two scrapes are the port's new connections (`(port, connections)`); in all,
/// they add up to the port's connections.
fn assert_selections(
    before: &openmetrics::Exposition,
    after: &openmetrics::Exposition,
    body: &str,
    ports: [(&str, f64); 2],
) {
    let pods: std::collections::BTreeSet<String> =
        ["default/web-a", "default/web-b"].map(str::to_owned).into();
    for (port, connections) in ports {
        let (was, now) = (selections(before, port), selections(after, port));
        assert_eq!(
            now.keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            pods,
            "{port}: every backend chosen, by its pod\n{body}"
        );
        let added: f64 = now
            .iter()
            .map(|(b, v)| v - was.get(b).copied().unwrap_or(0.0))
            .sum();
        assert_eq!(added, connections, "{port}\n{body}");
        let total: f64 = after
            .samples_named("ferrovia_service_connections_total")
            .filter(|s| s.labels["service"] == "lb" && s.labels["port"] == port)
            .map(|s| s.value)
            .sum();
        assert_eq!(
            now.values().sum::<f64>(),
            total,
            "{port}: the selections add up to the port's connections\n{body}"
        );
    }
}

/// Expires the UDP flows' conntrack entries (`flows` flows, two entries each) and waits for
/// the agent's garbage collection to delete and count them.
fn assert_collected(node: &Node, agent: &Agent, flows: f64) {
    let collected = |m: &openmetrics::Exposition| {
        value(
            m,
            "ferrovia_conntrack_gc_deleted_total",
            &[("map", "CONNTRACK")],
        )
    };
    let (was, _) = scrape(agent);
    let expired = expire_udp_conntrack(node) as f64;
    assert_eq!(expired, 2.0 * flows, "the UDP flows' entries");
    wait_for(agent, "the expired entries collected", |m| {
        collected(m) - collected(&was) >= expired
    });
    let (now, body) = scrape(agent);
    assert_eq!(collected(&now) - collected(&was), expired, "{body}");
    assert_eq!(
        value(&now, "ferrovia_conntrack_entries", &[]),
        value(&was, "ferrovia_conntrack_entries", &[]) - expired,
        "{body}"
    );
    assert_eq!(
        single(&now, "ferrovia_conntrack_evictions_total"),
        0.0,
        "collected, not evicted\n{body}"
    );
}

/// Real traffic through a VIP with two backends: each TCP connection (socket hooks) and each
/// UDP flow (per-packet path, two conntrack entries) is one selection, labelled by the pod it
/// went to, and the selections add up to the port's connections; the conntrack families agree
/// with the map and see no eviction; entries that expire are collected by the agent's
/// garbage collection (every second here) and counted.
#[test]
fn backend_selections_and_conntrack_follow_real_traffic() {
    let node = Node::new().expect("creating the node");
    let agent = node
        .start_agent(AgentOpts {
            metrics_addr: Some(METRICS_ADDR),
            extra_args: vec!["--conntrack-gc-interval=1".into()],
            ..AgentOpts::default()
        })
        .expect("starting ferrovia-agent");
    let client = node.add_pod("default", "client").expect("CNI ADD client");
    let backends = ["web-a", "web-b"].map(|name| node.add_pod("default", name).expect("CNI ADD"));
    node.write_manifest("lb.yaml", LB).expect("manifest");
    assert_eq!(agent.sync().expect("sync"), Vec::<String>::new());
    let _serving: Vec<_> = backends
        .iter()
        .map(|p| p.serve(&["tcp:8080", "udp:8080"]).expect("echo server"))
        .collect();
    let (before, _) = scrape(&agent);
    let n = 20;
    let tcp = client
        .probe(&ProbeSpec::tcp(LB_VIP).count(n))
        .expect("TCP probe");
    assert!(tcp.iter().all(|r| r.ok), "{tcp:?}");
    let udp = client
        .probe(&ProbeSpec::udp(LB_VIP).count(n))
        .expect("UDP probe");
    assert!(udp.iter().all(|r| r.ok), "{udp:?}");
    // A new socket per request; the kernel may give a closed one's port again, and a datagram
    // on a live flow's tuple is no new flow.
    let flows = udp
        .iter()
        .map(|r| r.local_addr().expect("the probe's address"))
        .collect::<std::collections::BTreeSet<_>>()
        .len() as f64;
    let (after, body) = scrape(&agent);

    assert_selections(
        &before,
        &after,
        &body,
        [("http", n as f64), ("echo", flows)],
    );
    // The UDP flows went through the per-packet path: two entries each, none evicted.
    let created = |m| single(m, "ferrovia_conntrack_created_total");
    assert_eq!(created(&after) - created(&before), 2.0 * flows, "{body}");
    let entries = value(&after, "ferrovia_conntrack_entries", &[]);
    assert_eq!(
        entries,
        value(&after, "ferrovia_map_entries", &[("map", "CONNTRACK")]),
        "{body}"
    );
    assert!(entries >= 2.0 * flows, "{body}");
    assert_eq!(
        single(&after, "ferrovia_conntrack_evictions_total"),
        0.0,
        "{body}"
    );
    let maps = after.label_values("ferrovia_conntrack_gc_deleted_total", "map");
    for map in ["CONNTRACK", "POLICY_CT", "UDP_FLOWS", "AFFINITY"] {
        assert!(maps.contains(map), "{map}\n{body}");
    }

    assert_collected(&node, &agent, flows);
}
