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

use ferrovia_tests::{Agent, AgentOpts, Node, openmetrics};

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
