//! A simulated node: a network namespace with forwarding on, a cgroup v2 subtree whose sockets
//! the agent hooks, a bpffs root for the agent's pins, and a temp dir with its manifests, CNI
//! state and agent socket. Dropping it removes all of them.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::agent::{Agent, AgentOpts};
use crate::cmd::{in_netns, run_ok};
use crate::cni::{self, Chain, Invocation};
use crate::pod::Pod;
use crate::sys;
use crate::workload::{Place, ProbeResult, ProbeSpec, ProbeStream, Server};

/// Which CNI chain a node's pods are created with.
#[derive(Debug, Clone, Default)]
pub enum CniMode {
    /// `ptp` + `host-local`, then `ferrovia-cni` (the real setup; needs a running agent).
    #[default]
    PtpFerrovia,
    /// `ptp` + `host-local` alone: plain pod networking, no ferrovia involved.
    PtpOnly,
    /// Any chain, e.g. to test how plugin errors are reported.
    Custom(Chain),
}

/// How to build a node.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// The pods' /24, e.g. `10.100.3.0/24`; by default a fresh one per node of this process,
    /// so nodes joined into one cluster never overlap.
    pub pod_subnet: Option<String>,
    /// The CNI chain.
    pub cni: CniMode,
}

/// A pod's CNI state, kept by the node so it can DEL pods a test leaked.
pub(crate) struct PodRecord {
    pub(crate) chain: Chain,
    pub(crate) inv: Invocation,
    pub(crate) result: Option<Value>,
    pub(crate) cgroup: PathBuf,
}

/// State shared by a node and its pods and agent.
pub(crate) struct NodeInner {
    pub(crate) id: String,
    pub(crate) netns: String,
    pub(crate) cgroup: PathBuf,
    pub(crate) agent_cgroup: PathBuf,
    pub(crate) bpffs: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) subnet: String,
    pub(crate) chain: Chain,
    pub(crate) pods: Mutex<BTreeMap<String, PodRecord>>,
    destroyed: AtomicBool,
}

/// A node of the simulated cluster. See the module docs.
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
}

impl Node {
    /// A node whose pods get the full chain (`ptp` then `ferrovia-cni`).
    pub fn new() -> Result<Self> {
        Self::with_options(NodeOptions::default())
    }

    /// A node built as `opts` says.
    pub fn with_options(opts: NodeOptions) -> Result<Self> {
        sys::ensure_bpffs()?;
        sys::sweep_stale();
        let id = sys::unique_id();
        let cg_root = sys::cgroup2_root()?;
        let dir = sys::temp_root().join(&id);
        let subnet = opts.pod_subnet.unwrap_or_else(next_subnet);
        let cni_data = dir.join("cni-data");
        let socket = dir.join("agent.sock");
        let chain = match opts.cni {
            CniMode::PtpFerrovia => Chain::ptp_ferrovia(&subnet, &cni_data, &socket),
            CniMode::PtpOnly => Chain::ptp(&subnet, &cni_data),
            CniMode::Custom(chain) => chain,
        };
        let inner = Arc::new(NodeInner {
            netns: format!("{id}-node"),
            cgroup: cg_root.join(&id),
            agent_cgroup: cg_root.join(format!("{id}-agent")),
            bpffs: PathBuf::from(sys::BPFFS).join(&id),
            dir,
            subnet,
            chain,
            pods: Mutex::new(BTreeMap::new()),
            destroyed: AtomicBool::new(false),
            id,
        });
        // From here on, Drop of the Node cleans up whatever part was created.
        let node = Self { inner };
        node.create()
            .with_context(|| format!("creating node {}", node.inner.id))?;
        Ok(node)
    }

    fn create(&self) -> Result<()> {
        let n = &*self.inner;
        for d in [
            &n.dir,
            &self.manifests_dir(),
            &self.state_dir(),
            &n.dir.join("cni-data"),
        ] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        fs::write(
            self.conflist_path(),
            serde_json::to_vec_pretty(&n.chain.to_conflist())?,
        )?;
        for d in [&n.cgroup, &n.agent_cgroup, &n.bpffs] {
            fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
        }
        sys::netns_add(&n.netns)?;
        // Pods reach each other and the world through the node: it must route.
        self.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        Ok(())
    }

    /// The node's unique id, `fv-<pid>-<n>`; every object of the node is named after it.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Name of the node's network namespace (under /run/netns).
    #[must_use]
    pub fn netns(&self) -> &str {
        &self.inner.netns
    }

    /// The cgroup v2 directory the agent hooks; pods' workloads run in sub-cgroups of it.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.inner.cgroup
    }

    /// The agent's bpffs root (`--bpffs-root`).
    #[must_use]
    pub fn bpffs_root(&self) -> &Path {
        &self.inner.bpffs
    }

    /// The node's temp dir (logs, manifests, CNI state).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// `--manifests` of the agent.
    #[must_use]
    pub fn manifests_dir(&self) -> PathBuf {
        self.inner.dir.join("manifests")
    }

    /// `--api-socket` of the agent, also `agentSocket` of `ferrovia-cni`.
    #[must_use]
    pub fn api_socket(&self) -> PathBuf {
        self.inner.dir.join("agent.sock")
    }

    /// `--state-dir` of the agent.
    #[must_use]
    pub fn state_dir(&self) -> PathBuf {
        self.inner.dir.join("state")
    }

    /// The conflist the node's pods are created with, as written to disk.
    #[must_use]
    pub fn conflist_path(&self) -> PathBuf {
        self.inner.dir.join("ferrovia.conflist")
    }

    /// The pods' subnet, e.g. `10.100.3.0/24`.
    #[must_use]
    pub fn pod_subnet(&self) -> &str {
        &self.inner.subnet
    }

    /// The `--node-name` given to the agent.
    #[must_use]
    pub fn name(&self) -> String {
        format!("{}-node", self.inner.id)
    }

    /// Creates a pod: its network namespace, then a CNI ADD through the node's chain.
    pub fn add_pod(&self, namespace: &str, name: &str) -> Result<Pod> {
        Pod::create(&self.inner, namespace, name)
    }

    /// Starts `ferrovia-agent` for this node and waits until its API socket exists.
    pub fn start_agent(&self, opts: AgentOpts) -> Result<Agent> {
        Agent::start(&self.inner, opts)
    }

    /// Writes a manifest file atomically (written aside, then renamed into the manifests
    /// dir), so the agent's watcher never reads half a file.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.inner.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        let dst = self.manifests_dir().join(file);
        fs::rename(&tmp, &dst).with_context(|| format!("renaming to {}", dst.display()))
    }

    /// Removes a manifest file.
    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        let path = self.manifests_dir().join(file);
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }

    /// `bpftool -j ARGS` in the node's network namespace (so `net show` sees its interfaces).
    pub fn bpftool(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["bpftool", "-j"];
        all.extend_from_slice(args);
        let stdout = self.exec(&all)?;
        serde_json::from_str(&stdout).with_context(|| format!("bpftool {args:?}: not JSON"))
    }

    /// Runs a command in the network namespace `ns`; returns its stdout, fails on non-zero exit.
    pub fn exec_in(&self, ns: &str, args: &[&str]) -> Result<String> {
        let Some((program, rest)) = args.split_first() else {
            bail!("exec_in: empty command");
        };
        let out = run_ok(&mut in_netns(ns, program, rest))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a command in the node's network namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        self.exec_in(self.netns(), args)
    }

    /// Probes from the node's own network namespace (host-network traffic), in the node's
    /// `host` sub-cgroup so the agent's socket hooks apply.
    pub fn probe(&self, spec: &ProbeSpec) -> Result<Vec<ProbeResult>> {
        self.host_place()?.probe(spec)
    }

    /// Starts the echo server in the node's own network namespace (host-network workloads),
    /// answering with the node's name.
    pub fn serve(&self, listen: &[&str]) -> Result<Server> {
        self.host_place()?.serve(listen)
    }

    /// Starts a streaming probe from the node's own network namespace.
    pub fn probe_stream(&self, spec: &ProbeSpec) -> Result<ProbeStream> {
        self.host_place()?.probe_stream(spec)
    }

    /// Where host-network workloads of this node run.
    pub fn host_place(&self) -> Result<Place> {
        let cgroup = self.inner.cgroup.join("host");
        fs::create_dir_all(&cgroup)?;
        Ok(Place {
            name: self.name(),
            netns: self.inner.netns.clone(),
            cgroup,
            dir: self.inner.dir.clone(),
        })
    }

    /// Removes everything the node created, reporting the first failure (Drop does the same
    /// but can only print).
    pub fn destroy(self) -> Result<()> {
        self.inner.destroy()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(e) = self.inner.destroy() {
            eprintln!("ferrovia-tests: cleaning up node {}: {e:#}", self.inner.id);
        }
    }
}

impl NodeInner {
    fn destroy(&self) -> Result<()> {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut errors = Vec::new();
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                errors.push(format!("{e:#}"));
            }
        };
        // Workloads first, then pods (DEL, while the agent may still answer ferrovia-cni),
        // then the agent, then namespaces and files.
        note(sys::cgroup_destroy(&self.cgroup));
        let pods = std::mem::take(&mut *self.pods.lock().unwrap_or_else(PoisonError::into_inner));
        for (_, rec) in pods {
            note(rec.delete());
        }
        note(sys::cgroup_destroy(&self.agent_cgroup));
        for ns in sys::netns_with_prefix(&format!("{}-", self.id)) {
            note(sys::netns_del(&ns));
        }
        note(sys::remove_bpffs_dir(&self.bpffs));
        if std::env::var_os("FERROVIA_KEEP_TMP").is_none() {
            note(match fs::remove_dir_all(&self.dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", errors.join("; "))
        }
    }
}

impl PodRecord {
    /// Kills the pod's workloads, runs CNI DEL and removes its namespace and cgroup.
    pub(crate) fn delete(self) -> Result<()> {
        let killed = sys::cgroup_destroy(&self.cgroup);
        let del = cni::del(&self.chain, &self.inv, self.result.as_ref());
        let ns = sys::netns_del(&self.inv.pod_netns);
        killed.and(del).and(ns)
    }
}

/// A fresh pod /24 for each node of this process: 10.100.0.0/24, 10.100.1.0/24, ...
fn next_subnet() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("10.{}.{}.0/24", 100 + (n / 256) % 100, n % 256)
}
