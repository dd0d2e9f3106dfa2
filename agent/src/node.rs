//! The node controller: owns the data path, the pods registered by the CNI plugin, and the
//! last desired state, and keeps the maps equal to `model::compute(state, pod IPs)`.
//!
//! Registered pods are persisted in `<state dir>/pods.json` so a restarted agent knows which
//! interfaces carry its programs (it swaps in its new programs there without a gap).
use std::{
    collections::BTreeMap,
    fs,
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::{
    api::{AgentStatus, ApiError, PodRegistration, PodRegistry, ProgramState},
    datapath::{AttachedInterface, Datapath, events::FlowReader},
    flows::{FlowHub, Names},
    metrics::SyncMetrics,
    model::{self, ClusterState, ObjRef, PodIps},
};

mod conntrack;
mod explain;
mod inventory;

/// A registered pod as persisted: what the CNI plugin said, and how we attached.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct PodRecord {
    container_id: String,
    netns: String,
    namespace: String,
    name: String,
    ifname: String,
    ips: Vec<std::net::IpAddr>,
    iface: AttachedInterface,
    /// The pod's network-namespace cookie, when it could be read (Linux 5.14+).
    #[serde(default)]
    netns_cookie: Option<u64>,
}

impl PodRecord {
    /// What the CNI plugin registered.
    fn registration(&self) -> PodRegistration {
        PodRegistration {
            container_id: self.container_id.clone(),
            netns: self.netns.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            ifname: self.ifname.clone(),
            host_ifname: self.iface.ifname.clone(),
            ips: self.ips.clone(),
        }
    }
}

struct Inner {
    datapath: Datapath,
    pods: BTreeMap<String, PodRecord>,
    state: Arc<ClusterState>,
    /// Updated at each sync, when the agent serves metrics.
    metrics: Option<SyncMetrics>,
    /// Where flow events are named and served, once started ([`Node::start_flows`]); its
    /// names are refreshed at each sync.
    flows: Option<Arc<FlowHub>>,
}

/// Re-reads the desired-state source now: the snapshot and the source's rejections, one
/// line each. Blocking (it may read files); called outside the node's lock.
pub type Reload = Box<dyn Fn() -> (Arc<ClusterState>, Vec<String>) + Send + Sync>;

pub struct Node {
    name: String,
    /// What runs degraded on this kernel: found when the data path loaded, fixed after, so
    /// status and metrics read it without the lock.
    degraded: Vec<String>,
    reload: Reload,
    state_file: PathBuf,
    /// Where the maps are pinned: the conntrack garbage collection opens them there.
    bpffs_root: PathBuf,
    conntrack_gc: Arc<conntrack::GcTotals>,
    inner: Mutex<Inner>,
}

impl Node {
    /// Takes over a loaded data path, re-attaching this run's programs to the pods a
    /// previous run registered (pods whose interface is gone are forgotten). `metrics`, when
    /// given, are updated at each sync.
    pub fn new(
        name: String,
        state_dir: &Path,
        mut datapath: Datapath,
        reload: Reload,
        metrics: Option<SyncMetrics>,
    ) -> Result<Self> {
        let (state, _) = reload();
        fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state dir {}", state_dir.display()))?;
        let state_file = state_dir.join("pods.json");
        let previous: Vec<PodRecord> = match fs::read(&state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", state_file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", state_file.display())),
        };
        let mut pods = BTreeMap::new();
        for mut pod in previous {
            if !crate::datapath::interface_exists(&pod.iface.ifname) {
                tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), "interface gone since last run; forgetting the pod");
                continue;
            }
            match datapath.attach_pod(&pod.iface.ifname, Some(&pod.iface)) {
                Ok(iface) => {
                    pod.iface = iface;
                    if pod.netns_cookie.is_none() {
                        // Registered by a version (or on a kernel path) that could not read
                        // the cookie: learn it now, or its hairpin stays unjudged by policy.
                        pod.netns_cookie = learn_netns_cookie(&mut datapath, &pod.registration());
                    }
                    pods.insert(pod.container_id.clone(), pod);
                }
                Err(e) => {
                    tracing::warn!(ifname = %pod.iface.ifname, "re-attaching a known pod failed: {e:#}");
                }
            }
        }
        let attached = pods.values().map(|p| p.iface.ifindex).collect();
        let gone = datapath.retain_pod_stats(&attached);
        if gone > 0 {
            tracing::info!(gone, "forgot the counters of pods gone since the last run");
        }
        let node = Self {
            name,
            degraded: datapath.degraded().to_vec(),
            reload,
            state_file,
            bpffs_root: datapath.bpffs_root().to_path_buf(),
            conntrack_gc: Arc::default(),
            inner: Mutex::new(Inner {
                datapath,
                pods,
                state,
                metrics,
                flows: None,
            }),
        };
        Ok(node)
    }

    /// Replaces the desired state and writes the maps. The sync latency is measured from
    /// this call, waiting for the node's lock included.
    pub async fn set_state(&self, state: Arc<ClusterState>) {
        let noticed = Instant::now();
        let mut inner = self.inner.lock().await;
        inner.state = state;
        Self::resync(&mut inner);
        if let Some(metrics) = &inner.metrics {
            metrics.reflected(noticed.elapsed());
        }
    }

    /// Writes the maps from the current state and pods.
    pub async fn resync_now(&self) {
        Self::resync(&mut *self.inner.lock().await);
    }

    fn resync(inner: &mut Inner) {
        let started = Instant::now();
        let pod_ips: PodIps = inner
            .pods
            .values()
            .map(|p| {
                (
                    ObjRef::new(p.namespace.clone(), p.name.clone()),
                    p.ips.clone(),
                )
            })
            .collect();
        let desired = model::compute(&inner.state, &pod_ips);
        let policy = model::policy::compile(&inner.state, &pod_ips);
        let computed = started.elapsed();
        if let Some(hub) = &inner.flows {
            hub.set_names(flow_names(inner, &pod_ips, &desired));
        }
        let (report, errors) = inner.datapath.sync(&desired);
        for error in &errors {
            tracing::error!("data path kept the previous state: {error}");
            if let Some(metrics) = &inner.metrics {
                metrics.failed(error.into());
            }
        }
        let policy_report = inner.datapath.sync_policy(&policy);
        if let (Err(error), Some(metrics)) = (&policy_report, &inner.metrics) {
            metrics.failed(error.into());
        }
        match policy_report {
            Ok(r) if r.changed() => tracing::info!(
                policies = policy.policies_in_force,
                isolated_pods = policy.endpoints.len(),
                classes_added = r.classes_added,
                classes_removed = r.classes_removed,
                endpoints_changed = r.endpoints_changed,
                entries_written = r.entries_written,
                epoch = r.epoch,
                "policy synced"
            ),
            Ok(_) => {}
            Err(error) => tracing::error!("{error}"),
        }
        if report.added + report.updated + report.removed > 0 {
            tracing::info!(
                added = report.added,
                updated = report.updated,
                removed = report.removed,
                unchanged = report.unchanged,
                model_us = computed.as_micros() as u64,
                elapsed_us = started.elapsed().as_micros() as u64,
                "maps synced"
            );
        }
        if let Some(metrics) = &inner.metrics {
            metrics.synced(started.elapsed());
        }
    }

    fn persist(&self, inner: &Inner) -> Result<()> {
        let records: Vec<&PodRecord> = inner.pods.values().collect();
        let tmp = self.state_file.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&records)?)?;
        fs::rename(&tmp, &self.state_file)?;
        Ok(())
    }

    /// Starts reading the data path's flow events into `hub`, named from the next sync on
    /// (start it before the first). Once: the ring buffer has one reader.
    pub async fn start_flows(&self, hub: Arc<FlowHub>) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let map = inner
            .datapath
            .take_flow_events()
            .context("the flow events' ring buffer is already read")?;
        let reader = FlowReader::new(map)?;
        inner.flows = Some(Arc::clone(&hub));
        tokio::spawn(crate::flows::run(reader, hub));
        Ok(())
    }

    /// The data path's verdict counters (for status and tests).
    pub async fn counters(&self) -> Result<crate::datapath::Counters> {
        self.inner.lock().await.datapath.counters()
    }
}

impl PodRegistry for Node {
    async fn register(&self, pod: PodRegistration) -> Result<(), ApiError> {
        let mut inner = self.inner.lock().await;
        let previous = inner.pods.get(&pod.container_id).map(|p| p.iface.clone());
        let iface = inner
            .datapath
            .attach_pod(&pod.host_ifname, previous.as_ref())
            .map_err(|e| {
                ApiError::Internal(format!("pod {}/{}: {e:#}", pod.namespace, pod.name))
            })?;
        tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), ifname = %pod.host_ifname, ips = ?pod.ips, "pod registered");
        let netns_cookie = learn_netns_cookie(&mut inner.datapath, &pod);
        let record = PodRecord {
            container_id: pod.container_id,
            netns: pod.netns,
            namespace: pod.namespace,
            name: pod.name,
            ifname: pod.ifname,
            ips: pod.ips,
            iface,
            netns_cookie,
        };
        inner.pods.insert(record.container_id.clone(), record);
        self.persist(&inner).map_err(ApiError::internal)?;
        // The pod's IPs may complete endpoints: its services must reach it before ADD returns.
        Self::resync(&mut inner);
        Ok(())
    }

    async fn unregister(&self, container_id: &str) -> Result<(), ApiError> {
        let mut inner = self.inner.lock().await;
        let Some(record) = inner.pods.remove(container_id) else {
            return Ok(());
        };
        inner.datapath.detach_pod(&record.iface);
        if let Some(cookie) = record.netns_cookie {
            inner.datapath.remove_pod_netns(cookie);
        }
        for ip in &record.ips {
            if let std::net::IpAddr::V4(v4) = ip {
                inner.datapath.forget_pod_flows(*v4);
            }
        }
        tracing::info!(pod = %format!("{}/{}", record.namespace, record.name), "pod unregistered");
        self.persist(&inner).map_err(ApiError::internal)?;
        Self::resync(&mut inner);
        Ok(())
    }

    async fn check(&self, container_id: &str) -> Result<(), ApiError> {
        let inner = self.inner.lock().await;
        let record = inner.pods.get(container_id).ok_or_else(|| {
            ApiError::NotFound(format!("container {container_id} is not registered"))
        })?;
        if inner.datapath.is_attached(&record.iface) {
            Ok(())
        } else {
            Err(ApiError::NotReady(format!(
                "programs of {}/{} are not attached to {}",
                record.namespace, record.name, record.iface.ifname
            )))
        }
    }

    async fn sync(&self) -> Result<Vec<String>, ApiError> {
        let (state, errors) = (self.reload)();
        self.set_state(state).await;
        Ok(errors)
    }

    async fn status(&self) -> AgentStatus {
        let inner = self.inner.lock().await;
        let mut programs = vec![ProgramState {
            name: "sock4_*".into(),
            attach_point: inner.datapath.socket_lb().then(|| "cgroup".to_owned()),
        }];
        for pod in inner.pods.values() {
            for (name, mode) in [
                ("from_pod", pod.iface.ingress),
                ("to_pod", pod.iface.egress),
            ] {
                programs.push(ProgramState {
                    name: name.into(),
                    attach_point: Some(format!("{} ({mode:?})", pod.iface.ifname)),
                });
            }
        }
        AgentStatus {
            node_name: self.name.clone(),
            pods: inner.pods.len(),
            frontends: inner.datapath.frontends(),
            socket_lb: inner.datapath.socket_lb(),
            programs,
            degraded: self.degraded.clone(),
        }
    }
}

impl crate::api::FlowFeed for Node {
    async fn flow_hub(&self) -> Option<Arc<FlowHub>> {
        self.inner.lock().await.flows.clone()
    }
}

impl crate::metrics::MetricsSource for Node {
    fn degraded(&self) -> Vec<String> {
        self.degraded.clone()
    }

    fn pods(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Vec<crate::metrics::PodMetrics>> + Send + '_>> {
        Box::pin(async move {
            let inner = self.inner.lock().await;
            pod_metrics(&inner)
        })
    }

    fn services(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Vec<crate::metrics::ServiceMetrics>> + Send + '_>>
    {
        Box::pin(self.service_metrics())
    }

    /// Attach status under the node's lock (a netlink dump per pod and direction on kernels
    /// without TCX, as CNI CHECK does); the maps' keys are walked after, without the lock.
    fn health(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = crate::metrics::Health> + Send + '_>> {
        Box::pin(async move {
            let (root, mut health) = {
                let inner = self.inner.lock().await;
                let attached = inner
                    .pods
                    .values()
                    .filter(|p| inner.datapath.is_attached(&p.iface))
                    .count();
                let counters = inner.datapath.counters().unwrap_or_default();
                let health = crate::metrics::Health {
                    maps: Vec::new(),
                    socket_lb: inner.datapath.socket_hooks_attached(),
                    pods: inner.pods.len() as u64,
                    pods_attached: attached as u64,
                    flow_events: crate::metrics::FlowEventCounts {
                        read: inner.flows.as_ref().map_or(0, |hub| hub.read()),
                        suppressed: counters.get("flow_suppressed").copied().unwrap_or(0),
                        lost: counters.get("flow_lost").copied().unwrap_or(0),
                    },
                    // Created read before the entries are counted, deletions after: an entry
                    // created or deleted meanwhile cannot pass for an eviction.
                    conntrack: crate::metrics::ConntrackHealth {
                        created: counters.get("ct_created").copied().unwrap_or(0),
                        ..crate::metrics::ConntrackHealth::default()
                    },
                };
                (inner.datapath.bpffs_root().to_path_buf(), health)
            };
            health.maps = tokio::task::spawn_blocking(move || map_fill(&root))
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!("reading the maps' fill: {e}");
                    Vec::new()
                });
            health.conntrack.entries = health
                .maps
                .iter()
                .find(|m| m.name == "CONNTRACK")
                .map(|m| u64::from(m.entries));
            health.conntrack.gc_deleted = self.conntrack_gc.read();
            health
        })
    }
}

/// The names flow events are given: pods (registered here and in the state) and frontends.
fn flow_names(inner: &Inner, pod_ips: &PodIps, desired: &model::Desired) -> Names {
    let local = inner.pods.values().map(|p| {
        (
            p.iface.ifindex,
            ObjRef::new(p.namespace.clone(), p.name.clone()),
        )
    });
    Names::new(&inner.state, local, pod_ips, desired)
}

/// Every pinned map's capacity and entries; a map that cannot be read is logged and left out.
/// Blocking: one syscall per entry (the conntrack maps' walk dominates when they are full).
fn map_fill(bpffs_root: &Path) -> Vec<crate::metrics::MapFill> {
    crate::datapath::inventory::pinned_maps(bpffs_root)
        .into_iter()
        .filter_map(|map| match map.stats {
            Ok(stats) => Some(crate::metrics::MapFill {
                name: map.name,
                capacity: stats.max_entries,
                entries: stats.entries,
            }),
            Err(e) => {
                tracing::warn!(map = map.name, "reading the map's fill: {e}");
                None
            }
        })
        .collect()
}

/// Every registered pod's counters from the data path's maps (one walk of each map). A pod
/// whose counters cannot be read is exported with what could be (logged): a scrape never
/// fails as a whole for one map.
fn pod_metrics(inner: &Inner) -> Vec<crate::metrics::PodMetrics> {
    let traffic = inner.datapath.pod_stats().unwrap_or_else(|e| {
        tracing::warn!("reading POD_STATS: {e:#}");
        BTreeMap::new()
    });
    let mut verdicts = BTreeMap::<std::net::IpAddr, BTreeMap<(u8, u8), u64>>::new();
    match inner.datapath.policy_verdicts() {
        Ok(all) => {
            for ((addr, dir, reason), (packets, _)) in all {
                verdicts
                    .entry(addr.into())
                    .or_default()
                    .insert((dir, reason), packets);
            }
        }
        Err(e) => tracing::warn!("reading POLICY_VERDICTS: {e:#}"),
    }
    inner
        .pods
        .values()
        .map(|p| crate::metrics::PodMetrics {
            namespace: p.namespace.clone(),
            pod: p.name.clone(),
            traffic: traffic.get(&p.iface.ifindex).copied().unwrap_or_default(),
            verdicts: p
                .ips
                .iter()
                .filter_map(|ip| verdicts.get(ip))
                .flatten()
                .map(|(&k, &v)| (k, v))
                .collect(),
        })
        .collect()
}

/// Records `pod`'s network-namespace cookie for the socket hooks, which tell a policed pod
/// reaching itself through a VIP by it; best effort (a failure is logged: that hairpin is then
/// not judged by the pod's policy). None without socket hooks or without policy.
fn learn_netns_cookie(datapath: &mut Datapath, pod: &PodRegistration) -> Option<u64> {
    // Only the socket hooks' policy check uses it.
    if !datapath.socket_lb() || !datapath.network_policy() {
        return None;
    }
    let cookie = datapath
        .netns_cookie(std::path::Path::new(&pod.netns))
        .inspect_err(|e| {
            tracing::warn!(
                "pod {}/{}: no network-namespace cookie ({e:#}); a hairpin of this pod through the socket hooks is not judged by policy",
                pod.namespace,
                pod.name
            );
        })
        .ok()?;
    let v4 = pod.ips.iter().find_map(|ip| match ip {
        std::net::IpAddr::V4(v4) => Some(*v4),
        std::net::IpAddr::V6(_) => None,
    });
    if let Some(v4) = v4
        && let Err(e) = datapath.set_pod_netns(cookie, v4)
    {
        tracing::warn!("pod {}/{}: {e:#}", pod.namespace, pod.name);
    }
    Some(cookie)
}
