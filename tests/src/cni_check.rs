//! CNI CHECK, which the chain runner of [`crate::cni`] (ADD, DEL) does not do.
//!
//! As libcni runs it (CNI spec 1.0, "CHECK: Check container's networking is as expected"):
//! each plugin of the chain in order, with the same `CNI_*` environment as ADD and the pod's
//! cached final ADD result as `prevResult`.

use std::sync::PoisonError;

use anyhow::{Result, anyhow};
use serde_json::Value;

use crate::cni::{Chain, Invocation};
use crate::node::Node;
use crate::pod::Pod;

/// The chain a node creates its pods with.
#[must_use]
pub fn chain(node: &Node) -> Chain {
    node.inner.chain.clone()
}

/// How the node invoked its chain for `pod` (container id, namespaces, Kubernetes identity).
/// Kept by the caller, it allows a CHECK after the pod is deleted.
pub fn invocation(node: &Node, pod: &Pod) -> Result<Invocation> {
    let key = format!("{}/{}", pod.namespace, pod.name);
    node.inner
        .pods
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
        .map(|rec| rec.inv.clone())
        .ok_or_else(|| anyhow!("pod {key} is not on node {}", node.id()))
}

/// CNI CHECK of every plugin of `chain`, in order, with `cached` (the final ADD result) as
/// `prevResult`. The first failure is returned as `CNI CHECK of plugin TYPE failed: code N
/// msg "..."`.
pub fn check(chain: &Chain, inv: &Invocation, cached: &Value) -> Result<()> {
    crate::cni::check(chain, inv, cached)
}
