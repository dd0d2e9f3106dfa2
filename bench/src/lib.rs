//! ferrovia's benchmarks (`cargo xtask bench`): the same traffic through the direct path,
//! kube-proxy's iptables and nftables layouts, and ferrovia (socket-level and per-packet),
//! side by side in one run on the same simulated pods.
//!
//! - [`kubeproxy`]: the rule sets kube-proxy writes for N services, and loading them.
//! - [`load`]: the load generator's measurement types (the binary is `ferrovia-load`).
//! - [`policy`]: the `NetworkPolicy` section — per-packet cost on/off, change latency.
//! - [`probe`]: a connection every millisecond from a pod, for change → effect latencies.
pub mod cluster;
pub mod kubeproxy;
pub mod load;
pub mod plot;
pub mod policy;
pub mod probe;
pub mod report;
