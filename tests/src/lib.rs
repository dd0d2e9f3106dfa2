//! ferrovia's end-to-end harness: a simulated cluster on this machine.
//!
//! A [`Node`] is a network namespace with a cgroup subtree, a bpffs root and a temp dir; a
//! [`Pod`] is a network namespace wired by the real reference CNI plugins (`ptp` + `host-local`)
//! with `ferrovia-cni` chained after them; workloads are `ferrovia-echo` processes joined to the
//! pod's namespace and cgroup; the real `ferrovia-agent` runs per node ([`Agent`]).
//!
//! Everything is named `fv-<pid>-<n>…` and removed on drop, also when a test panics; objects
//! of dead test processes are swept by the first [`Node::new`] ([`sweep_stale`]).
//!
//! ```no_run
//! use ferrovia_tests::{CniMode, Node, NodeOptions, ProbeSpec};
//! let node = Node::with_options(NodeOptions { cni: CniMode::PtpOnly, ..Default::default() })?;
//! let (client, server) = (node.add_pod("default", "client")?, node.add_pod("default", "web")?);
//! let _srv = server.serve(&["tcp:9376"])?;
//! let r = client.probe(&ProbeSpec::tcp((server.ip, 9376)))?;
//! assert_eq!(r[0].server(), Some("web"));
//! # anyhow::Ok(())
//! ```

pub mod agent;
pub mod cli;
pub mod cmd;
pub mod cni;
pub mod node;
pub mod openmetrics;
pub mod paths;
pub mod pod;
pub mod policy;
pub mod sys;
pub mod workload;

pub use agent::{Agent, AgentOpts, HttpReply};
pub use cni::Chain;
pub use node::{CniMode, Node, NodeOptions};
pub use pod::Pod;
pub use sys::sweep_stale;
pub use workload::{Place, ProbeResult, ProbeSpec, ProbeStream, Proto, Server, TargetResult};
pub mod cni_check;

/// Starts a failure that the kernel's missing feature causes, where the agent reports the
/// degradation and the behaviour is the documented degraded one: the kernel matrix
/// (`cargo xtask vm-test`) counts such a test as an expected degradation, not a failure.
/// The same marker as `ferrovia_agent::datapath::KERNEL_LACKS`.
pub const KERNEL_LACKS: &str = "KERNEL-LACKS:";
pub mod sendto;
