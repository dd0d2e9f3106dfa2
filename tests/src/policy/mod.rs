//! `NetworkPolicy` conformance, the way the upstream tool cyclonus checks a CNI: pods `a`, `b`,
//! `c` in namespaces `x`, `y`, `z`, each serving TCP and UDP on ports 80 and 81; for a
//! scenario (labels, policies, services) every client probes every other pod on every
//! protocol and port, and the observed truth table is compared cell by cell with the one an
//! independent evaluator of the API's semantics expects.
//!
//! - [`spec`]: the scenario model, the API's validity rules, and its Kubernetes objects.
//! - [`yaml`]: writing those objects as YAML.
//! - [`eval`]: the expected verdicts, from the API reference (no code shared with the agent).
//! - [`random`]: seeded random scenarios for the differential test.
//! - [`matrix`]: probing a matrix and printing the tables.
//! - [`cluster`]: the x/y/z cluster on one node with the real agent.

pub mod cluster;
pub mod eval;
pub mod matrix;
pub mod random;
pub mod spec;
pub mod yaml;

pub use cluster::{PolicyCluster, Setup};
