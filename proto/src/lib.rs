//! The ferrovia agent's gRPC API (`ferrovia.v1`), generated from `proto/ferrovia.proto`.
//!
//! - [`v1::agent_server`]: the service the agent implements (see `ferrovia_agent::api`).
//! - [`v1::agent_client`]: the client the CNI plugin and the CLI use.

/// Package `ferrovia.v1`.
pub mod v1 {
    // Generated code: its style is prost's, not ours.
    #![allow(clippy::pedantic, missing_docs)]
    tonic::include_proto!("ferrovia.v1");
}

pub use v1::agent_client::AgentClient;
pub use v1::agent_server::{Agent, AgentServer};
