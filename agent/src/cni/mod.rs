//! The chained CNI plugin (`ferrovia-cni`): ADD, DEL, CHECK and VERSION of CNI spec 1.0,
//! plus STATUS and GC of 1.1.
//!
//! It runs after the cluster's main plugin (`ptp`, `bridge`), reads the host-side veth and
//! the pod's addresses from `prevResult`, and registers the pod with the agent over its
//! unix socket; the agent attaches the per-pod programs. The binary only gathers the
//! environment and stdin and calls [`run()`](fn@run).
//!
//! - [`spec`]: the spec's wire types (config, previous result, error, version).
//! - [`env`](mod@env): the `CNI_*` variables and `CNI_ARGS`.
//! - [`pod`]: from a previous result to the [`PodRegistration`](crate::api::PodRegistration).
//! - [`run`](mod@run): one function per command, talking to the agent.
pub mod env;
pub mod pod;
pub mod run;
pub mod spec;

pub use env::{CniEnv, Command, PodIdentity, parse_cni_args};
pub use run::{Outcome, run};
pub use spec::{CniError, ErrorCode, NetConf, PrevResult, SUPPORTED_VERSIONS};

#[cfg(test)]
mod tests;
