//! The agent's gRPC API (`ferrovia.v1.Agent`, see `proto/ferrovia.proto`) on a unix socket.
//!
//! - [`registry`]: what the API asks of the agent — the [`PodRegistry`] trait the datapath
//!   implements, and the plain types it receives and returns.
//! - [`inventory`]: the operator's read-only views — the [`Inventory`] trait and its types.
//! - [`explain`]: what the data path would do with a flow — the [`Explainer`] trait and its
//!   types.
//! - [`render`]: those views as the CLI prints them: JSON and tables.
//! - [`flows`]: the `Flows` stream over the agent's [`crate::flows::FlowHub`].
//! - [`server`]: [`serve`] puts a [`PodRegistry`] and [`Inventory`] behind the socket.
//! - [`client`]: [`connect`] dials the socket (the CNI plugin, the CLI).
//!
//! The socket is the only way in: mode 0600, owned by root, so there is no authentication
//! beyond file permissions.
pub mod client;
pub mod explain;
pub mod flows;
pub mod inventory;
pub mod registry;
pub mod render;
pub mod server;

pub use client::{ConnectError, connect};
pub use explain::{ExplainQuery, Explainer, Explanation};
pub use flows::FlowFeed;
pub use inventory::{
    FrontendType, Inventory, MapList, PodState, PolicyList, PolicyState, PortEndpoints,
    ServiceFrontend, ServiceList,
};
pub use registry::{AgentStatus, ApiError, PodRegistration, PodRegistry, ProgramState};
pub use server::serve;

/// Where the agent listens and the CNI plugin dials unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ferrovia/agent.sock";

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
