//! A pod: a network namespace wired up by the node's CNI chain, in which workloads run.

use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cni::{self, Invocation};
use crate::node::{NodeInner, PodRecord};
use crate::sys;
use crate::workload::{Place, ProbeResult, ProbeSpec, ProbeStream, Server};

/// A pod on a [`crate::Node`]. Dropping it (or [`Pod::delete`]) kills its workloads, runs
/// CNI DEL and removes its namespace.
pub struct Pod {
    node: Arc<NodeInner>,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes name; also the name the echo server answers with.
    pub name: String,
    /// The pod's IPv4 address, from the CNI result.
    pub ip: Ipv4Addr,
    /// The host-side veth in the node's namespace (where the agent attaches tc programs).
    pub host_ifname: String,
    /// Name of the pod's network namespace (under /run/netns).
    pub netns: String,
    /// The final CNI ADD result.
    pub cni_result: Value,
    cgroup: PathBuf,
    deleted: bool,
}

impl Pod {
    pub(crate) fn create(node: &Arc<NodeInner>, namespace: &str, name: &str) -> Result<Self> {
        Self::create_in(node, namespace, name, format!("{}-{name}", node.id))
    }

    /// Like [`crate::Node::add_pod`], but the pod's network namespace is named after its
    /// Kubernetes namespace too (`<node id>-<namespace>-<name>`), so that pods of one name in
    /// different namespaces (cyclonus' `x/a`, `y/a`) can coexist on a node.
    pub fn add_namespaced(node: &crate::Node, namespace: &str, name: &str) -> Result<Self> {
        let netns = format!("{}-{namespace}-{name}", node.inner.id);
        Self::create_in(&node.inner, namespace, name, netns)
    }

    fn create_in(
        node: &Arc<NodeInner>,
        namespace: &str,
        name: &str,
        netns: String,
    ) -> Result<Self> {
        let inv = Invocation {
            host_netns: node.netns.clone(),
            pod_netns: netns.clone(),
            container_id: format!("{}-{namespace}-{name}", node.id),
            k8s_namespace: namespace.to_owned(),
            k8s_name: name.to_owned(),
        };
        let cgroup = node.cgroup.join(format!("pod-{namespace}-{name}"));
        let key = format!("{namespace}/{name}");
        {
            let mut pods = node.pods.lock().unwrap_or_else(PoisonError::into_inner);
            if pods.contains_key(&key) {
                bail!("pod {key} already exists on node {}", node.id);
            }
            // Registered before anything is created, so the node's cleanup covers a half-made pod.
            pods.insert(
                key.clone(),
                PodRecord {
                    chain: node.chain.clone(),
                    inv: inv.clone(),
                    result: None,
                    cgroup: cgroup.clone(),
                },
            );
        }
        let made = (|| -> Result<Value> {
            fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
            sys::netns_add(&netns)?;
            cni::add(&node.chain, &inv)
        })();
        let result = match made {
            Ok(result) => result,
            Err(e) => {
                let rec = node
                    .pods
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&key);
                // Best effort, as a runtime would after a failed ADD; the ADD error is what matters.
                if let Some(rec) = rec {
                    let _ = rec.delete();
                }
                return Err(e.context(format!("creating pod {key} on node {}", node.id)));
            }
        };
        if let Some(rec) = node
            .pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&key)
        {
            rec.result = Some(result.clone());
        }
        let att = cni::attachment(&result)?;
        Ok(Self {
            node: Arc::clone(node),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ip: att.ip,
            host_ifname: att.host_ifname,
            netns,
            cni_result: result,
            cgroup,
            deleted: false,
        })
    }

    /// Path of the pod's network namespace, as given to CNI (`CNI_NETNS`).
    #[must_use]
    pub fn netns_path(&self) -> String {
        crate::cmd::netns_path(&self.netns)
    }

    /// Where this pod's workloads run.
    #[must_use]
    pub fn place(&self) -> Place {
        Place {
            name: self.name.clone(),
            netns: self.netns.clone(),
            cgroup: self.cgroup.clone(),
            dir: self.node.dir.clone(),
        }
    }

    /// Starts the echo server in the pod, e.g. `pod.serve(&["tcp:9376", "udp:9376"])`, and
    /// waits until it listens. The server is killed when the guard drops.
    pub fn serve(&self, listen: &[&str]) -> Result<Server> {
        self.place().serve(listen)
    }

    /// Runs a probe from the pod to completion and returns one result per request.
    pub fn probe(&self, spec: &ProbeSpec) -> Result<Vec<ProbeResult>> {
        self.place().probe(spec)
    }

    /// Sends one request to each target at once (see [`Place::probe_many`]).
    pub fn probe_many(
        &self,
        targets: &[(crate::Proto, std::net::SocketAddr)],
        timeout: std::time::Duration,
    ) -> Result<Vec<crate::TargetResult>> {
        self.place().probe_many(targets, timeout)
    }

    /// Starts a probe from the pod whose results are read while it runs.
    pub fn probe_stream(&self, spec: &ProbeSpec) -> Result<ProbeStream> {
        self.place().probe_stream(spec)
    }

    /// Runs a command in the pod's network namespace, returning its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let Some((program, rest)) = args.split_first() else {
            bail!("exec: empty command");
        };
        let out = crate::cmd::run_ok(&mut crate::cmd::in_netns(&self.netns, program, rest))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Deletes the pod now, reporting failures (Drop can only print them).
    pub fn delete(mut self) -> Result<()> {
        self.delete_inner()
    }

    fn delete_inner(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.deleted, true) {
            return Ok(());
        }
        let rec = self
            .node
            .pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&format!("{}/{}", self.namespace, self.name));
        // None: the node was destroyed first and already deleted the pod.
        rec.map_or(Ok(()), PodRecord::delete)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Err(e) = self.delete_inner() {
            eprintln!(
                "ferrovia-tests: deleting pod {}/{}: {e:#}",
                self.namespace, self.name
            );
        }
    }
}
