//! The pure model: Kubernetes objects in, desired frontends out. No I/O, no clock, no
//! randomness, so every service semantic is unit-tested in microseconds and the datapath driver
//! only has to diff [`Desired`] against the maps.
//!
//! - [`cluster`]: the input snapshot ([`ClusterState`], [`ObjRef`], [`PodIps`]).
//! - [`frontend`]: the output ([`Desired`], [`FrontendKey`], [`Frontend`], [`Protocol`]).
//! - [`compute`](mod@compute): service → frontends (VIPs × ports, affinity).
//! - [`endpoints`]: endpoints from pods or `EndpointSlice`s, and kube-proxy's selection.
//! - [`policy`]: `NetworkPolicy` → per-pod policy classes (peer prefixes → port sets).

pub mod cluster;
pub mod compute;
pub mod endpoints;
pub mod frontend;
pub mod policy;

#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;

pub use cluster::{ClusterState, ObjRef, PodIps};
pub use compute::{DEFAULT_AFFINITY_TIMEOUT_S, compute};
pub use frontend::{Desired, Frontend, FrontendKey, Protocol, Skipped};
