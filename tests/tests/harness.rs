//! The harness proving itself without the agent: pods wired by `ptp` alone, echo traffic
//! between them, and cleanup — after success, after a panic, and of a dead run's leftovers.
//! Needs root (network namespaces, cgroups, bpffs).

use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferrovia_tests::sys::{self, netns_with_prefix};
use ferrovia_tests::{AgentOpts, Chain, CniMode, Node, NodeOptions, ProbeSpec};

fn ptp_node() -> Node {
    Node::with_options(NodeOptions {
        cni: CniMode::PtpOnly,
        ..NodeOptions::default()
    })
    .expect("creating node")
}

/// Everything a node creates, to check it is gone afterwards.
struct Footprint {
    id: String,
    paths: Vec<PathBuf>,
}

impl Footprint {
    fn of(node: &Node) -> Self {
        Self {
            id: node.id().to_owned(),
            paths: vec![
                node.cgroup().to_path_buf(),
                node.bpffs_root().to_path_buf(),
                node.dir().to_path_buf(),
            ],
        }
    }

    fn assert_gone(&self) {
        assert_eq!(
            netns_with_prefix(&format!("{}-", self.id)),
            Vec::<String>::new(),
            "network namespaces left"
        );
        for p in &self.paths {
            assert!(!p.exists(), "{} left behind", p.display());
        }
        let agent_cgroup = sys::cgroup2_root()
            .unwrap()
            .join(format!("{}-agent", self.id));
        assert!(!agent_cgroup.exists(), "{} left", agent_cgroup.display());
    }
}

#[test]
fn two_ptp_pods_talk_tcp_and_udp_then_everything_is_removed() {
    let node = ptp_node();
    let footprint = Footprint::of(&node);
    let client = node.add_pod("default", "client").unwrap();
    let server = node.add_pod("default", "web").unwrap();
    assert_ne!(client.ip, server.ip);
    assert!(
        client.host_ifname.starts_with("veth"),
        "{}",
        client.host_ifname
    );
    let srv = server.serve(&["tcp:9376", "udp:9376"]).unwrap();
    let to = SocketAddr::from((server.ip, 9376));
    // The server joined the pod's cgroup, below the node's (where the agent's hooks attach).
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", srv.pid())).unwrap();
    let rel = node
        .cgroup()
        .strip_prefix(sys::cgroup2_root().unwrap())
        .unwrap();
    assert!(
        cg.contains(&format!("0::/{}/pod-default-web", rel.display())),
        "{cg}"
    );

    for spec in [
        ProbeSpec::tcp(to).count(3),
        ProbeSpec::tcp(to).count(3).persistent(),
        ProbeSpec::udp(to).count(3),
        ProbeSpec::udp(to).count(3).persistent(),
    ] {
        let results = client.probe(&spec).unwrap();
        assert_eq!(results.len(), 3, "{spec:?}");
        for r in &results {
            assert!(r.ok, "{spec:?}: {r:?}");
            assert_eq!(r.server(), Some("web"), "{r:?}");
            let seen = r.seen_from().unwrap();
            assert_eq!(seen.ip(), IpAddr::V4(client.ip), "server saw {seen}");
            // The server saw exactly the client's socket: no NAT on a plain ptp path.
            assert_eq!(Some(seen), r.local_addr(), "{r:?}");
            assert_eq!(r.peer_addr(), Some(to), "{r:?}");
        }
        let conns: Vec<u64> = results.iter().map(|r| r.conn).collect();
        if spec.persistent {
            assert_eq!(conns, [1, 1, 1], "{spec:?}");
        } else {
            assert_eq!(conns, [1, 2, 3], "{spec:?}");
        }
    }

    drop(srv);
    client.delete().unwrap();
    drop(server);
    node.destroy().unwrap();
    footprint.assert_gone();
}

#[test]
fn errors_are_named_refused_and_timeout() {
    let node = ptp_node();
    let client = node.add_pod("default", "client").unwrap();
    let server = node.add_pod("default", "idle").unwrap();
    let r = client
        .probe(&ProbeSpec::tcp((server.ip, 9)).count(1))
        .unwrap();
    assert_eq!(r[0].error.as_deref(), Some("ECONNREFUSED"), "{r:?}");
    // Connected UDP learns of the ICMP port unreachable as ECONNREFUSED too.
    let r = client
        .probe(&ProbeSpec::udp((server.ip, 9)).count(1))
        .unwrap();
    assert_eq!(r[0].error.as_deref(), Some("ECONNREFUSED"), "{r:?}");
    // An address in the pod subnet that nobody holds: the node has no route to it.
    let nobody: std::net::Ipv4Addr = node.pod_subnet().replace(".0/24", ".250").parse().unwrap();
    let r = client.probe(&ProbeSpec::tcp((nobody, 80))).unwrap();
    assert_eq!(r[0].error.as_deref(), Some("ENETUNREACH"), "{r:?}");
    // A blackhole route on the node drops silently: the client times out.
    node.exec(&["ip", "route", "add", "blackhole", &format!("{nobody}/32")])
        .unwrap();
    let r = client
        .probe(&ProbeSpec::tcp((nobody, 80)).timeout(Duration::from_millis(300)))
        .unwrap();
    assert_eq!(r[0].error.as_deref(), Some("timeout"), "{r:?}");
}

#[test]
fn probe_stream_keeps_one_connection_until_stopped() {
    let node = ptp_node();
    let client = node.add_pod("default", "client").unwrap();
    let server = node.add_pod("default", "web").unwrap();
    let _srv = server.serve(&["tcp:8080"]).unwrap();
    let stream = client
        .probe_stream(
            &ProbeSpec::tcp((server.ip, 8080))
                .count(0)
                .persistent()
                .interval(Duration::from_millis(20)),
        )
        .unwrap();
    let first = stream.wait_for(5, Duration::from_secs(10)).unwrap();
    assert!(first.iter().all(|r| r.ok && r.conn == 1), "{first:?}");
    let all = stream.stop();
    assert!(all.len() >= 5);
    assert!(all.iter().all(|r| r.server() == Some("web")), "{all:?}");
}

#[test]
fn cni_errors_name_the_plugin_code_and_message() {
    let node = ptp_node();
    let bad = Chain {
        name: "bad".into(),
        plugins: vec![serde_json::json!({
            "type": "ptp",
            "ipam": { "type": "host-local", "subnet": "not-a-subnet",
                      "dataDir": node.dir().join("bad-ipam") },
        })],
    };
    drop(node);
    let node = Node::with_options(NodeOptions {
        cni: CniMode::Custom(bad),
        ..NodeOptions::default()
    })
    .unwrap();
    let footprint = Footprint::of(&node);
    let err = format!(
        "{:#}",
        node.add_pod("default", "p").err().expect("ADD must fail")
    );
    assert!(err.contains("plugin ptp failed: code"), "{err}");
    assert!(err.contains("not-a-subnet"), "{err}");
    // The failed ADD left no pod namespace behind.
    assert_eq!(
        netns_with_prefix(&format!("{}-p", node.id())),
        Vec::<String>::new()
    );
    drop(node);
    footprint.assert_gone();
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let mut footprint = None;
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let node = ptp_node();
        footprint = Some(Footprint::of(&node));
        let a = node.add_pod("default", "a").unwrap();
        let b = node.add_pod("default", "b").unwrap();
        let _srv = b.serve(&["tcp:80"]).unwrap();
        let _stream = a
            .probe_stream(&ProbeSpec::tcp((b.ip, 80)).count(0).persistent())
            .unwrap();
        // A fake agent too, so its cgroup and process are part of what must go.
        let _agent = node.start_agent(fake_agent(&node)).unwrap();
        panic!("deliberate failure mid-test");
    }));
    assert!(outcome.is_err());
    footprint.expect("node was created").assert_gone();
}

/// A stand-in for ferrovia-agent: checks the flags it is given, creates the API socket path
/// and waits for SIGTERM.
fn fake_agent(node: &Node) -> AgentOpts {
    let script = node.dir().join("fake-agent.sh");
    std::fs::write(
        &script,
        r#"#!/bin/sh
set -e
while [ $# -gt 0 ]; do
  case "$1" in
    --api-socket) sock="$2"; shift 2;;
    --manifests|--node-name|--bpffs-root|--cgroup-path|--state-dir) test -n "$2"; shift 2;;
    *) echo "extra arg $1"; shift;;
  esac
done
echo "netns $(readlink /proc/self/ns/net)"
echo "cgroup $(cat /proc/self/cgroup | grep '^0::')"
trap 'echo terminated; rm -f "$sock"; exit 0' TERM
touch "$sock"
while :; do sleep 1 & wait $!; done
"#,
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    AgentOpts {
        binary: Some(script),
        socket_lb: false,
        extra_args: vec!["--log-level=debug".into()],
        ..AgentOpts::default()
    }
}

#[test]
fn agent_runner_starts_stops_and_restarts() {
    let node = ptp_node();
    let mut agent = node.start_agent(fake_agent(&node)).unwrap();
    assert!(node.api_socket().exists());
    let log = agent.log();
    assert!(log.contains("extra arg --socket-lb=false"), "{log}");
    assert!(log.contains("extra arg --log-level=debug"), "{log}");
    assert!(
        log.contains(&format!("/{}-agent", node.id())),
        "agent cgroup: {log}"
    );
    let node_ns = Command::new("stat")
        .args(["-L", "-c", "%i", &format!("/run/netns/{}", node.netns())])
        .output()
        .unwrap();
    let node_ns = format!(
        "netns net:[{}]",
        String::from_utf8_lossy(&node_ns.stdout).trim()
    );
    assert!(
        log.contains(&node_ns),
        "agent not in the node netns ({node_ns}): {log}"
    );
    agent.restart().unwrap();
    assert!(agent.stop().unwrap().success());
    assert_eq!(
        agent.log().matches("terminated").count(),
        2,
        "{}",
        agent.log()
    );
    node.write_manifest("svc.yaml", "kind: Service\n").unwrap();
    assert!(node.manifests_dir().join("svc.yaml").exists());
    node.remove_manifest("svc.yaml").unwrap();
}

#[test]
fn sweep_removes_what_a_dead_run_left() {
    sys::ensure_bpffs().unwrap();
    // A pid that no longer runs (reuse within the test is vanishingly unlikely).
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let id = format!("fv-{dead}-0");
    let netns = format!("{id}-node");
    sys::netns_add(&netns).unwrap();
    let cgroup = sys::cgroup2_root().unwrap().join(&id);
    std::fs::create_dir_all(cgroup.join("pod-x")).unwrap();
    let mut orphan = Command::new("sleep").arg("600").spawn().unwrap();
    std::fs::write(cgroup.join("pod-x/cgroup.procs"), orphan.id().to_string()).unwrap();
    let bpffs = Path::new(sys::BPFFS).join(&id);
    std::fs::create_dir_all(&bpffs).unwrap();
    let tmp = sys::temp_root().join(&id);
    std::fs::create_dir_all(tmp.join("x")).unwrap();

    sys::sweep_stale_now().unwrap();

    assert_eq!(netns_with_prefix(&netns), Vec::<String>::new());
    for p in [&cgroup, &bpffs, &tmp] {
        assert!(!p.exists(), "{} not swept", p.display());
    }
    let status = orphan.wait().unwrap();
    assert!(!status.success(), "orphan was killed: {status}");
    // Our own live objects are untouched.
    let node = ptp_node();
    sys::sweep_stale_now().unwrap();
    assert!(node.cgroup().exists());
}

#[test]
fn host_network_workloads_run_in_the_node() {
    let node = ptp_node();
    let pod = node.add_pod("kube-system", "p").unwrap();
    let _host_srv = node.serve(&["tcp:7000"]).unwrap();
    let _pod_srv = pod.serve(&["udp:7001"]).unwrap();
    // ptp gives the host side of each pod's veth the pod's gateway address.
    let gw: std::net::Ipv4Addr = pod.cni_result["ips"][0]["gateway"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let r = pod.probe(&ProbeSpec::tcp((gw, 7000))).unwrap();
    assert_eq!(r[0].server(), Some(node.name().as_str()), "{r:?}");
    let r = node.probe(&ProbeSpec::udp((pod.ip, 7001))).unwrap();
    assert_eq!(r[0].server(), Some("p"), "{r:?}");
    assert_eq!(
        r[0].seen_from().map(|a| a.ip()),
        Some(IpAddr::V4(gw)),
        "{r:?}"
    );
}

#[test]
fn many_concurrent_connections_are_served() {
    let node = ptp_node();
    let client = node.add_pod("default", "client").unwrap();
    let server = node.add_pod("default", "web").unwrap();
    let _srv = server.serve(&["tcp:80"]).unwrap();
    let streams: Vec<_> = (0..8)
        .map(|_| {
            client
                .probe_stream(&ProbeSpec::tcp((server.ip, 80)).count(20).persistent())
                .unwrap()
        })
        .collect();
    let mut ports = std::collections::BTreeSet::new();
    for s in &streams {
        let results = s.wait_for(20, Duration::from_secs(20)).unwrap();
        assert!(results.iter().all(|r| r.ok && r.conn == 1), "{results:?}");
        ports.insert(results[0].seen_from().unwrap().port());
    }
    assert_eq!(ports.len(), 8, "one connection per stream");
}
