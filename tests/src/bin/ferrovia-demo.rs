//! `ferrovia-demo`: one simulated node, the real agent on the example manifests of
//! `deploy/examples/`, two echo backends behind the `hostnames` `ClusterIP` Service and a client
//! pod. Shows the spread of requests over the backends, the hairpin case, on the socket-level
//! path and then on the per-packet path, and which source address each backend saw; then a
//! `NetworkPolicy` (`deploy/policies/`) that admits only the client's TCP, what
//! `ferrovia explain` says of a denied flow, and the last flow events (`ferrovia flows`).
//! Everything lives in network namespaces and is removed on exit.
//!
//! Needs root and the workspace binaries (`cargo xtask demo` builds them).
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferrovia_tests::{AgentOpts, Node, Pod, ProbeResult, ProbeSpec};

/// The example Service's VIP and port (deploy/examples/hostnames.yaml).
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 9376;

#[derive(Parser)]
#[command(about = "Run a one-node ferrovia demo in network namespaces")]
struct Args {
    /// Requests per protocol and path.
    #[arg(long, default_value_t = 20)]
    requests: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let node = Node::new().context("creating the node")?;
    println!("== node {} (pod subnet {})", node.name(), node.pod_subnet());
    for entry in
        std::fs::read_dir(&examples).with_context(|| format!("reading {}", examples.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        node.write_manifest(&name, &std::fs::read_to_string(&path)?)?;
        println!("   manifests: {}", path.display());
    }
    let mut agent = node
        .start_agent(AgentOpts::default())
        .context("starting ferrovia-agent")?;
    println!(
        "== ferrovia-agent running, socket-level LB on (log: {}/agent.log)",
        node.dir().display()
    );

    // Pods are created through the real CNI chain (ptp + host-local, then ferrovia-cni),
    // named as in the manifests so the agent can match their registered IPs.
    let backends: Vec<Pod> = ["hostnames-0", "hostnames-1"]
        .iter()
        .map(|n| node.add_pod("default", n))
        .collect::<Result<_>>()?;
    let client = node.add_pod("default", "client")?;
    let _servers = backends
        .iter()
        .map(|p| p.serve(&[&format!("tcp:{TARGET_PORT}"), &format!("udp:{TARGET_PORT}")]))
        .collect::<Result<Vec<_>>>()?;
    for p in backends.iter().chain([&client]) {
        println!(
            "   pod default/{:<12} {:<15} host side {}",
            p.name, p.ip, p.host_ifname
        );
    }

    let vip = SocketAddr::from((CLUSTER_IP, SERVICE_PORT));
    wait_until_served(&client, vip, Duration::from_secs(15))?;
    show_paths(
        &client,
        &backends[0],
        vip,
        args.requests,
        "socket-level LB (cgroup connect/sendmsg hooks)",
    )?;

    agent.stop()?;
    drop(agent);
    let agent = node
        .start_agent(AgentOpts {
            socket_lb: false,
            ..AgentOpts::default()
        })
        .context("restarting ferrovia-agent with --socket-lb=false")?;
    println!("\n== agent restarted with --socket-lb=false: the per-packet tc path translates");
    wait_until_served(&client, vip, Duration::from_secs(15))?;
    show_paths(
        &client,
        &backends[0],
        vip,
        args.requests,
        "per-packet LB (tc on the pods' host-side veths)",
    )?;

    let policy_file = "deploy/policies/hostnames-from-client.yaml";
    let policy = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(policy_file);
    node.write_manifest("policy.yaml", &std::fs::read_to_string(&policy)?)?;
    let rejected = agent.sync()?;
    if !rejected.is_empty() {
        bail!("the demo's policy was rejected: {rejected:?}");
    }
    println!("\n== NetworkPolicy {policy_file} (applied, agent synced)");
    println!("   hostnames pods admit only app=client, only on their port named http (TCP 9376)");
    // Denied requests wait for their timeout (drops are silent): a few, with a short one.
    let short = |spec: ProbeSpec| spec.count(5).timeout(Duration::from_millis(300));
    report(
        &format!("client -> {vip} TCP"),
        &client.probe(&ProbeSpec::tcp(vip).count(args.requests))?,
    );
    report(
        &format!("client -> {vip} UDP"),
        &client.probe(&short(ProbeSpec::udp(vip)))?,
    );
    report(
        &format!("{} -> {vip} TCP (not app=client)", backends[0].name),
        &backends[0].probe(&short(ProbeSpec::tcp(vip)))?,
    );

    operator_views(&node.api_socket(), &backends[0], vip)?;

    println!("\n== cleaning up");
    drop(agent);
    node.destroy()?;
    println!("   done: namespaces, veths, pins and processes removed");
    Ok(())
}

/// What the operator CLI says of the denied hairpin (`explain`) and the last flow events.
fn operator_views(socket: &Path, backend: &Pod, vip: SocketAddr) -> Result<()> {
    println!(
        "\n== ferrovia explain {}/{} {} tcp/{SERVICE_PORT}   (from the live maps)",
        backend.namespace,
        backend.name,
        vip.ip()
    );
    let source = format!("{}/{}", backend.namespace, backend.name);
    let target = format!("tcp/{SERVICE_PORT}");
    print_cli(
        socket,
        &["explain", &source, &vip.ip().to_string(), &target],
    )?;
    println!("\n== ferrovia flows --last 6   (events of the data path, named by the agent)");
    print_cli(socket, &["flows", "--last", "6"])
}

/// Runs the operator CLI against the agent and prints its table, indented.
fn print_cli(socket: &Path, args: &[&str]) -> Result<()> {
    let out = ferrovia_tests::cli::ferrovia(socket, args)?;
    if !out.status.success() {
        bail!(
            "ferrovia {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("   {line}");
    }
    Ok(())
}

fn show_paths(client: &Pod, backend: &Pod, vip: SocketAddr, n: u64, path: &str) -> Result<()> {
    println!("\n== {path}");
    report(
        &format!("client -> {vip} TCP"),
        &client.probe(&ProbeSpec::tcp(vip).count(n))?,
    );
    report(
        &format!("client -> {vip} UDP"),
        &client.probe(&ProbeSpec::udp(vip).count(n))?,
    );
    report(
        &format!(
            "hairpin: {} ({}) -> its own service {vip} TCP",
            backend.name, backend.ip
        ),
        &backend.probe(&ProbeSpec::tcp(vip).count(n))?,
    );
    Ok(())
}

/// Polls the VIP until a backend answers: pods register asynchronously.
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
    let mut by_server: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for r in results {
        match (r.server(), r.seen_from()) {
            (Some(name), Some(seen)) => {
                *by_server
                    .entry((name.to_owned(), seen.ip().to_string()))
                    .or_default() += 1;
            }
            _ => {
                *errors
                    .entry(r.error.clone().unwrap_or_default())
                    .or_default() += 1;
            }
        }
    }
    let peer = results.iter().find_map(ProbeResult::peer_addr);
    println!(
        "   {title}: {} requests (client's socket shows its peer as {})",
        results.len(),
        peer.map_or("-".into(), |p| p.to_string())
    );
    for ((name, seen), n) in &by_server {
        println!("     {name:<12} answered {n:>3}   and saw the request coming from {seen}");
    }
    for (err, n) in &errors {
        println!("     failed       {n:>3}   {err}");
    }
}
