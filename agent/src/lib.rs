//! ferrovia's agent: desired state in, BPF maps out.
//!
//! - [`source`]: where desired state comes from (a manifests directory; the Kubernetes API later).
//! - [`model`]: the pure model — Kubernetes objects in, desired frontends and backends out.
//! - [`datapath`]: loads and attaches the BPF programs, diffs and writes the pinned maps.
//! - [`api`]: the gRPC API on a unix socket (pod registration from the CNI plugin, status).
//! - [`cni`]: the chained CNI plugin's logic (the `ferrovia-cni` binary is a thin shell).
//! - [`flows`]: flow events from the data path's ring buffer, named, kept and fanned out.
//! - [`metrics`]: the HTTP endpoint for Prometheus and probes (`/metrics`, `/healthz`, `/readyz`).
pub mod api;
pub mod cni;
pub mod datapath;
pub mod flows;
pub mod metrics;
pub mod model;
pub mod node;
pub mod source;
