//! `ferrovia`: the operator's CLI, a client of the agent's gRPC API on its unix socket.
//! Tables for people, `-o json` for scripts.
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ferrovia_agent::api::{self, AgentStatus, render};
use ferrovia_proto::{AgentClient, v1};
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(version, about = "ferrovia's operator CLI")]
struct Args {
    /// The agent's API socket.
    #[arg(long, global = true, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The agent's node, pods, frontends and programs.
    Status,
    /// Makes the agent re-read its desired state now; prints what the source rejects.
    /// Exits 0 once the maps reflect the state, rejections or not.
    Sync,
    /// The read-only views.
    #[command(flatten)]
    View(View),
    /// Flow and verdict events of this node's pods (new connections, drops with reason):
    /// the most recent ones, then with --follow new ones until interrupted. `-o json`: one
    /// object per line.
    Flows(FlowsArgs),
}

#[derive(clap::Args, Debug)]
struct FlowsArgs {
    /// After the recent events, print new ones as they come.
    #[arg(long, short = 'f')]
    follow: bool,
    /// How many recent events to print first.
    #[arg(long, default_value_t = 100)]
    last: u32,
    /// Only events at this pod's interface: namespace/name, or a name in any namespace.
    #[arg(long)]
    pod: Option<String>,
    /// Only events at pods of this namespace.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// allowed, denied (by `NetworkPolicy`) or dropped (for any reason).
    #[arg(long)]
    verdict: Option<String>,
    /// TCP or UDP.
    #[arg(long)]
    protocol: Option<String>,
    /// The destination port, before or after service translation.
    #[arg(long)]
    port: Option<u16>,
}

/// What the agent serves and holds, as tables or `-o json` (field names: `ferrovia.proto`).
#[derive(Subcommand, Debug)]
enum View {
    /// Every service frontend the data path serves: address, port, type, affinity, backends.
    Services,
    /// Per service port, its endpoints with their conditions and whether each is a backend.
    Endpoints,
    /// The network policies in force, the pods of this node each selects, and rejections.
    Policies,
    /// The pods registered on this node: addresses, interfaces, attachments, isolation.
    Pods,
    /// Every pinned map: type, key and value sizes, capacity, entries, fill.
    Maps,
    /// What the data path would do with a new flow, read from the live maps: the service
    /// translation, its backends, and per backend the source pod's egress and the backend
    /// pod's ingress verdict with the policies and rules behind it.
    /// Example: `ferrovia explain default/client 10.96.0.10 tcp/80`.
    Explain {
        /// An IPv4 address, or a pod of this node as namespace/name.
        source: String,
        /// An IPv4 address (a pod's, a service's...), or a pod of this node as namespace/name.
        destination: String,
        /// The destination's protocol and port: tcp/80, udp/53.
        #[arg(value_name = "PROTO/PORT", value_parser = proto_port)]
        flow: (String, u32),
    },
}

/// `tcp/80` → ("tcp", 80); the agent checks the protocol and the port's range.
fn proto_port(s: &str) -> Result<(String, u32), String> {
    let (protocol, port) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not PROTO/PORT (e.g. tcp/80)"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{s:?}: port {port:?} is not a number"))?;
    Ok((protocol.to_owned(), port))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut client = api::connect(&args.socket).await?;
    match args.command {
        Command::Status => status(&mut client, args.output).await,
        Command::Sync => sync(&mut client, args.output).await,
        Command::Flows(flows) => follow_flows(&mut client, flows, args.output).await,
        Command::View(view) => {
            let (json, table) = read_view(&mut client, view).await?;
            match args.output {
                Output::Json => println!("{json}"),
                Output::Table => print!("{table}"),
            }
            Ok(())
        }
    }
}

async fn status(client: &mut AgentClient<Channel>, output: Output) -> Result<()> {
    let resp = client
        .status(v1::StatusRequest {})
        .await
        .context("Status")?
        .into_inner();
    let version = resp.agent_version.clone();
    let status = AgentStatus::from(resp);
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "node": status.node_name,
                "agent_version": version,
                "pods": status.pods,
                "frontends": status.frontends,
                "socket_lb": status.socket_lb,
                "programs": status.programs.iter().map(|p| serde_json::json!({
                    "name": p.name, "attach_point": p.attach_point,
                })).collect::<Vec<_>>(),
                "degraded": status.degraded,
            })
        ),
        Output::Table => {
            println!("node:       {}", status.node_name);
            println!("version:    {version}");
            println!("pods:       {}", status.pods);
            println!("frontends:  {}", status.frontends);
            println!("socket LB:  {}", status.socket_lb);
            for d in &status.degraded {
                println!("degraded:   {d}");
            }
            for p in &status.programs {
                println!(
                    "program     {:<14} {}",
                    p.name,
                    p.attach_point.as_deref().unwrap_or("(detached)")
                );
            }
        }
    }
    Ok(())
}

async fn sync(client: &mut AgentClient<Channel>, output: Output) -> Result<()> {
    let errors = client
        .sync(v1::SyncRequest {})
        .await
        .context("Sync")?
        .into_inner()
        .errors;
    match output {
        Output::Json => println!("{}", serde_json::json!({ "errors": errors })),
        Output::Table => {
            if errors.is_empty() {
                println!("synced; nothing rejected");
            } else {
                println!(
                    "synced; {} rejected (last valid versions in force):",
                    errors.len()
                );
                for e in &errors {
                    println!("  {e}");
                }
            }
        }
    }
    Ok(())
}

async fn follow_flows(
    client: &mut AgentClient<Channel>,
    args: FlowsArgs,
    output: Output,
) -> Result<()> {
    let req = v1::FlowsRequest {
        pod: args.pod.unwrap_or_default(),
        namespace: args.namespace.unwrap_or_default(),
        verdict: args.verdict.unwrap_or_default(),
        protocol: args.protocol.unwrap_or_default(),
        port: args.port.map_or(0, u32::from),
        follow: args.follow,
        last: args.last,
    };
    let mut stream = client.flows(req).await.context("Flows")?.into_inner();
    while let Some(ev) = stream.message().await.context("Flows")? {
        match output {
            Output::Json => println!("{}", api::flows::flow_json(&ev)),
            Output::Table => println!("{}", api::flows::flow_line(&ev)),
        }
    }
    Ok(())
}

/// One of the read-only views, rendered both ways: (JSON, table).
async fn read_view(
    client: &mut AgentClient<Channel>,
    view: View,
) -> Result<(serde_json::Value, String)> {
    Ok(match view {
        View::Services => {
            let r = client.list_services(v1::ListServicesRequest {});
            let r = r.await.context("ListServices")?.into_inner();
            (render::services_json(&r), render::services_table(&r))
        }
        View::Endpoints => {
            let r = client.list_endpoints(v1::ListEndpointsRequest {});
            let r = r.await.context("ListEndpoints")?.into_inner();
            (render::endpoints_json(&r), render::endpoints_table(&r))
        }
        View::Policies => {
            let r = client.list_policies(v1::ListPoliciesRequest {});
            let r = r.await.context("ListPolicies")?.into_inner();
            (render::policies_json(&r), render::policies_table(&r))
        }
        View::Pods => {
            let r = client.list_pods(v1::ListPodsRequest {});
            let r = r.await.context("ListPods")?.into_inner();
            (render::pods_json(&r), render::pods_table(&r))
        }
        View::Maps => {
            let r = client.get_maps(v1::GetMapsRequest {});
            let r = r.await.context("GetMaps")?.into_inner();
            (render::maps_json(&r), render::maps_table(&r))
        }
        View::Explain {
            source,
            destination,
            flow: (protocol, port),
        } => {
            let r = client.explain(v1::ExplainRequest {
                source,
                destination,
                protocol,
                port,
            });
            let r = r.await.context("Explain")?.into_inner();
            (render::explain_json(&r), render::explain_table(&r))
        }
    })
}
