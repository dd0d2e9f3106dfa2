//! CNI CHECK, which the chain runner of [`crate::cni`] (ADD, DEL) does not do.
//!
//! As libcni runs it (CNI spec 1.0, "CHECK: Check container's networking is as expected"):
//! each plugin of the chain in order, with the same `CNI_*` environment as ADD and the pod's
//! cached final ADD result as `prevResult`.

use std::sync::PoisonError;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::cmd::{in_netns, netns_path, run};
use crate::cni::{CNI_VERSION, Chain, Invocation, cni_path};
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
    for plugin in &chain.plugins {
        check_plugin(chain, plugin, inv, cached)?;
    }
    Ok(())
}

fn check_plugin(chain: &Chain, plugin: &Value, inv: &Invocation, cached: &Value) -> Result<()> {
    let ty = plugin["type"]
        .as_str()
        .ok_or_else(|| anyhow!("plugin conf without a type: {plugin}"))?;
    let path = cni_path()
        .into_iter()
        .map(|d| d.join(ty))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("CNI plugin {ty:?} not found in {:?}", cni_path()))?;
    let mut conf = plugin.clone();
    let obj = conf
        .as_object_mut()
        .ok_or_else(|| anyhow!("plugin conf is not an object: {plugin}"))?;
    obj.insert("name".into(), json!(chain.name));
    obj.insert("cniVersion".into(), json!(CNI_VERSION));
    obj.insert("prevResult".into(), cached.clone());

    let mut cmd = in_netns(&inv.host_netns, &path, &[] as &[&str]);
    cmd.env("CNI_COMMAND", "CHECK")
        .env("CNI_CONTAINERID", &inv.container_id)
        .env("CNI_NETNS", netns_path(&inv.pod_netns))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                inv.k8s_namespace, inv.k8s_name
            ),
        )
        .env(
            "CNI_PATH",
            std::env::join_paths(cni_path()).context("joining CNI_PATH")?,
        );
    let out = run(&mut cmd, Some(&serde_json::to_vec(&conf)?))?;
    if out.status.success() {
        return Ok(());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match serde_json::from_str::<Value>(&stdout) {
        Ok(err) => bail!(
            "CNI CHECK of plugin {ty} failed: code {} msg {:?} (stderr: {})",
            err["code"],
            err["msg"].as_str().unwrap_or(""),
            stderr.trim()
        ),
        Err(_) => bail!(
            "CNI CHECK of plugin {ty} failed ({}): {} {}",
            out.status,
            stdout.trim(),
            stderr.trim()
        ),
    }
}
