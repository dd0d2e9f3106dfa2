//! `ferrovia`: the operator's CLI, a client of the agent's gRPC API on its unix socket.
//! Tables for people, `-o json` for scripts.
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ferrovia_agent::api::{self, AgentStatus};
use ferrovia_proto::v1;

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
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut client = api::connect(&args.socket).await?;
    match args.command {
        Command::Status => {
            let resp = client
                .status(v1::StatusRequest {})
                .await
                .context("Status")?
                .into_inner();
            let version = resp.agent_version.clone();
            let status = AgentStatus::from(resp);
            match args.output {
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
        }
        Command::Sync => {
            let errors = client
                .sync(v1::SyncRequest {})
                .await
                .context("Sync")?
                .into_inner()
                .errors;
            match args.output {
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
        }
    }
    Ok(())
}
