//! `ferrovia-demo`: one simulated node, the real agent, three echo backends behind a
//! `ClusterIP` Service, and a client pod calling it. Prints who answered and which source
//! address each backend saw. Everything lives in network namespaces and is removed on exit.
//!
//! Needs root and the workspace binaries (`cargo build`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferrovia_tests::{AgentOpts, Node, Pod, ProbeResult, ProbeSpec};

/// Where the demo Service lives; inside the node's namespace only, never routed anywhere else.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 9376;

#[derive(Parser)]
#[command(about = "Run a one-node ferrovia demo in network namespaces")]
struct Args {
    /// Requests per protocol.
    #[arg(long, default_value_t = 30)]
    requests: u64,
    /// Socket-level load balancing (false: per-packet only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    socket_lb: bool,
    /// Number of backend pods.
    #[arg(long, default_value_t = 3)]
    backends: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let node = Node::new().context("creating the node")?;
    println!("node {} (pods in {})", node.name(), node.pod_subnet());
    let agent = node
        .start_agent(AgentOpts {
            socket_lb: args.socket_lb,
            ..AgentOpts::default()
        })
        .context("starting ferrovia-agent")?;
    println!(
        "agent running (pid {:?}), log in {}",
        agent.pid(),
        node.dir().display()
    );

    let backends: Vec<Pod> = (0..args.backends)
        .map(|i| node.add_pod("default", &format!("web-{i}")))
        .collect::<Result<_>>()?;
    let client = node.add_pod("default", "client")?;
    let _servers = backends
        .iter()
        .map(|p| p.serve(&[&format!("tcp:{TARGET_PORT}"), &format!("udp:{TARGET_PORT}")]))
        .collect::<Result<Vec<_>>>()?;
    for p in &backends {
        println!(
            "  pod {:<8} {:<15} host side {}",
            p.name, p.ip, p.host_ifname
        );
    }
    println!(
        "  pod {:<8} {:<15} host side {}",
        client.name, client.ip, client.host_ifname
    );

    node.write_manifest("web.yaml", &web_manifests(&backends))?;
    let vip = SocketAddr::from((CLUSTER_IP, SERVICE_PORT));
    println!("\nService default/web {vip} -> :{TARGET_PORT}; waiting for the data path...");
    wait_until_served(&client, vip, Duration::from_secs(15))?;

    for spec in [
        ProbeSpec::tcp(vip).count(args.requests),
        ProbeSpec::udp(vip).count(args.requests),
    ] {
        let results = client.probe(&spec)?;
        report(&format!("{:?} {vip}", spec.proto), &results);
    }
    drop(agent);
    node.destroy()
}

/// Polls the VIP until a backend answers: the agent programs the maps asynchronously.
fn wait_until_served(client: &Pod, vip: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = client.probe(&ProbeSpec::tcp(vip).timeout(Duration::from_millis(500)))?;
        if r.first().is_some_and(|r| r.ok) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{vip} not served after {timeout:?}: {r:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn report(title: &str, results: &[ProbeResult]) {
    let mut by_server: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for r in results {
        match (r.server(), r.seen_from()) {
            (Some(name), Some(seen)) => {
                let e = by_server.entry(name.to_owned()).or_default();
                e.0 += 1;
                e.1 = seen.ip().to_string();
            }
            _ => {
                *errors
                    .entry(r.error.clone().unwrap_or_default())
                    .or_default() += 1;
            }
        }
    }
    println!("\n{title}: {} requests", results.len());
    for (name, (n, seen)) in &by_server {
        println!("  {name:<8} answered {n:>4}   saw the client as {seen}");
    }
    for (err, n) in &errors {
        println!("  failed   {n:>4}   {err}");
    }
}

/// A `ClusterIP` Service and its `EndpointSlice`, as Kubernetes would hold them.
fn web_manifests(backends: &[Pod]) -> String {
    let endpoints = backends.iter().fold(String::new(), |mut out, p| {
        let _ = write!(
            out,
            "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n    targetRef: {{kind: Pod, namespace: default, name: {}}}\n",
            p.ip, p.name
        );
        out
    });
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {CLUSTER_IP}
  selector: {{app: web}}
  ports:
  - {{name: tcp, protocol: TCP, port: {SERVICE_PORT}, targetPort: {TARGET_PORT}}}
  - {{name: udp, protocol: UDP, port: {SERVICE_PORT}, targetPort: {TARGET_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- {{name: tcp, protocol: TCP, port: {TARGET_PORT}}}
- {{name: udp, protocol: UDP, port: {TARGET_PORT}}}
endpoints:
{endpoints}"
    )
}
