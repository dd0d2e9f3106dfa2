//! The agent's HTTP endpoint (`--metrics-addr`): `/metrics` for Prometheus (`OpenMetrics` text),
//! `/healthz` (the process serves) and `/readyz` (the first full sync is done).
//!
//! Values are read from the agent at scrape time by a [`Collector`], so `/metrics` cannot drift
//! from what `ferrovia status` reports; only the sync metrics ([`SyncMetrics`]) are updated by
//! the agent as it syncs. Labels name kernel features, maps and hooks, never an address.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use ferrovia_common::{DirStats, POL_DIR_EGRESS, POL_DIR_INGRESS, PodStats, verdict};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet, text::encode},
    metrics::{
        MetricType,
        counter::Counter,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::{Registry, Unit},
};

mod conntrack;
mod services;
pub use conntrack::{ConntrackHealth, evictions as conntrack_evictions};
pub use services::ServiceMetrics;

/// The content type of `/metrics` (`OpenMetrics` 1.0 text).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What `/metrics` reads from the agent at each scrape.
pub trait MetricsSource: Send + Sync + 'static {
    /// What runs degraded on this kernel, one line each: `hook: what and why`.
    fn degraded(&self) -> Vec<String>;

    /// Every registered pod's counters, read from the data path's maps now.
    fn pods(&self) -> Pin<Box<dyn Future<Output = Vec<PodMetrics>> + Send + '_>>;

    /// The data path's health now: its maps' fill and what is attached.
    fn health(&self) -> Pin<Box<dyn Future<Output = Health> + Send + '_>>;

    /// Every service port's counters and endpoints now.
    fn services(&self) -> Pin<Box<dyn Future<Output = Vec<ServiceMetrics>> + Send + '_>>;
}

/// The data path's health at a scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Every pinned map that could be read (one that cannot is logged and left out).
    pub maps: Vec<MapFill>,
    /// Whether the socket-level load balancing programs are attached to their cgroup.
    pub socket_lb: bool,
    /// Pods registered by the CNI plugin.
    pub pods: u64,
    /// Of those, pods whose `from_pod` and `to_pod` are confirmed attached to their interface.
    pub pods_attached: u64,
    /// Flow events read by the agent, suppressed by the per-pod rate limit, and lost for want
    /// of room in the ring buffer (since the maps were created; read on the agent's side
    /// since it started).
    pub flow_events: FlowEventCounts,
    /// The service conntrack's entries, creations, evictions, and the garbage collection.
    pub conntrack: ConntrackHealth,
}

/// Flow events by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEventCounts {
    pub read: u64,
    pub suppressed: u64,
    pub lost: u64,
}

/// A pinned map's capacity and current entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// The map's name in the BPF object (a fixed set).
    pub name: &'static str,
    pub capacity: u32,
    pub entries: u32,
}

/// The socket-level load balancing programs, all attached to the cgroup or none.
const SOCKET_PROGRAMS: [&str; 4] = [
    "sock4_connect",
    "sock4_sendmsg",
    "sock4_recvmsg",
    "sock4_getpeer",
];

/// What makes a sync leave part of the desired state unwritten, or the source reject part of
/// it: the values of `ferrovia_sync_errors_total`'s `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum SyncError {
    /// A frontend stayed at its previous state: its map is full.
    FrontendMapFull,
    /// A frontend stayed at its previous state: a map write failed.
    FrontendWrite,
    /// A frontend stayed at its previous state: it has more backends than a slot can number.
    FrontendTooManyBackends,
    /// The policy stayed at its previous state: a policy map is full.
    PolicyMapFull,
    /// The policy stayed at its previous state: a policy map write failed.
    PolicyWrite,
    /// The desired-state source rejected an object or a file (counted once when it appears).
    RejectedObject,
}

impl From<&crate::datapath::WriteError> for SyncError {
    fn from(error: &crate::datapath::WriteError) -> Self {
        match error {
            crate::datapath::WriteError::Full { .. } => Self::FrontendMapFull,
            crate::datapath::WriteError::Map { .. } => Self::FrontendWrite,
            crate::datapath::WriteError::TooManyBackends { .. } => Self::FrontendTooManyBackends,
        }
    }
}

impl From<&crate::datapath::PolicyError> for SyncError {
    fn from(error: &crate::datapath::PolicyError) -> Self {
        match error {
            crate::datapath::PolicyError::Full { .. } => Self::PolicyMapFull,
            crate::datapath::PolicyError::Map { .. } => Self::PolicyWrite,
        }
    }
}

impl SyncError {
    const ALL: [Self; 6] = [
        Self::FrontendMapFull,
        Self::FrontendWrite,
        Self::FrontendTooManyBackends,
        Self::PolicyMapFull,
        Self::PolicyWrite,
        Self::RejectedObject,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::FrontendMapFull => "frontend_map_full",
            Self::FrontendWrite => "frontend_write",
            Self::FrontendTooManyBackends => "frontend_too_many_backends",
            Self::PolicyMapFull => "policy_map_full",
            Self::PolicyWrite => "policy_write",
            Self::RejectedObject => "rejected_object",
        }
    }
}

/// The sync metrics, updated by the agent as it syncs (cheap clones share the values).
#[derive(Clone, Debug)]
pub struct SyncMetrics {
    duration: Histogram,
    latency: Histogram,
    /// Per [`SyncError`], in [`SyncError::ALL`]'s order (exported in it).
    errors: [Counter; SyncError::ALL.len()],
    /// The source's rejections seen last, so each is counted once when it appears.
    rejections: Arc<Mutex<BTreeSet<String>>>,
}

impl Default for SyncMetrics {
    fn default() -> Self {
        // 0.5 ms to ~8 s: a sync of a few services to one of 100,000.
        let buckets = || exponential_buckets(0.000_5, 4.0, 8);
        Self {
            duration: Histogram::new(buckets()),
            latency: Histogram::new(buckets()),
            errors: Default::default(),
            rejections: Arc::default(),
        }
    }
}

impl SyncMetrics {
    /// One sync of the maps took `elapsed`.
    pub fn synced(&self, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// The maps reflect a desired-state change noticed `elapsed` ago.
    pub fn reflected(&self, elapsed: Duration) {
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// Counts an error of `kind`.
    pub fn failed(&self, kind: SyncError) {
        self.count(kind, 1);
    }

    fn count(&self, kind: SyncError, n: u64) {
        self.errors[kind as usize].inc_by(n);
    }

    /// The source's rejections now, one line each: those not seen at the previous call count
    /// as `rejected_object` errors.
    pub fn rejections(&self, lines: impl IntoIterator<Item = String>) {
        let now: BTreeSet<String> = lines.into_iter().collect();
        let mut seen = self
            .rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let new = now.difference(&seen).count() as u64;
        if new > 0 {
            self.count(SyncError::RejectedObject, new);
        }
        *seen = now;
    }
}

/// One pod's counters at a scrape: traffic per direction (`POD_STATS`) and its policy
/// verdicts (`POLICY_VERDICTS`), summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMetrics {
    pub namespace: String,
    pub pod: String,
    pub traffic: PodStats,
    /// (direction `POL_DIR_*`, reason `verdict::*`) → packets.
    pub verdicts: BTreeMap<(u8, u8), u64>,
}

/// The agent, once its first full sync is done; unset before.
type Attached = Arc<OnceLock<Arc<dyn MetricsSource>>>;

/// The source's rejections now, one line each (see [`Endpoint::watch_rejections`]).
type Rejections = Box<dyn Fn() -> Vec<String> + Send + Sync>;

/// What the HTTP endpoint serves: the metric registry, and readiness.
pub struct Endpoint {
    registry: Registry,
    agent: Attached,
    /// The pods' counters of the scrape in progress, read before encoding (the collector
    /// encodes synchronously; the agent's state is behind an async lock).
    pods: Arc<Mutex<Vec<PodMetrics>>>,
    /// The data path's health of the scrape in progress, read with the pods.
    health: Arc<Mutex<Health>>,
    /// The service ports' counters of the scrape in progress.
    services: Arc<Mutex<Vec<ServiceMetrics>>>,
    service_counters: services::Monotonic,
    conntrack_evictions: conntrack::Evictions,
    sync: SyncMetrics,
    rejections: OnceLock<Rejections>,
    /// One scrape at a time: each encodes the pods it read.
    scrape: tokio::sync::Mutex<()>,
}

impl Default for Endpoint {
    fn default() -> Self {
        Self::new()
    }
}

impl Endpoint {
    /// An endpoint that is not ready yet: `/metrics` has only `ferrovia_build_info` until
    /// [`Endpoint::ready`] attaches the agent.
    #[must_use]
    pub fn new() -> Self {
        let agent = Attached::default();
        let mut registry = Registry::with_prefix("ferrovia");
        // An `OpenMetrics` info family `ferrovia_build`, sample `ferrovia_build_info{...} 1`.
        registry.register(
            "build",
            "The running agent's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        let pods = Arc::<Mutex<Vec<PodMetrics>>>::default();
        registry.register_collector(Box::new(DatapathCollector {
            agent: Arc::clone(&agent),
        }));
        registry.register_collector(Box::new(PodCollector {
            agent: Arc::clone(&agent),
            pods: Arc::clone(&pods),
        }));
        let services = Arc::<Mutex<Vec<ServiceMetrics>>>::default();
        registry.register_collector(Box::new(services::ServiceCollector {
            agent: Arc::clone(&agent),
            services: Arc::clone(&services),
        }));
        let health = Arc::<Mutex<Health>>::default();
        registry.register_collector(Box::new(HealthCollector {
            agent: Arc::clone(&agent),
            health: Arc::clone(&health),
        }));
        let sync = SyncMetrics::default();
        registry.register_collector(Box::new(SyncCollector {
            agent: Arc::clone(&agent),
            sync: sync.clone(),
        }));
        Self {
            registry,
            agent,
            pods,
            health,
            services,
            service_counters: services::Monotonic::default(),
            conntrack_evictions: conntrack::Evictions::default(),
            sync,
            rejections: OnceLock::new(),
            scrape: tokio::sync::Mutex::new(()),
        }
    }

    /// The sync metrics this endpoint serves, for the agent to update as it syncs.
    #[must_use]
    pub fn sync_metrics(&self) -> SyncMetrics {
        self.sync.clone()
    }

    /// Reads the source's rejections at each scrape too: a bad manifest that changes nothing
    /// in the desired state starts no sync, yet `rejected_object` must count it. Later calls
    /// change nothing.
    pub fn watch_rejections(&self, rejections: impl Fn() -> Vec<String> + Send + Sync + 'static) {
        let _ = self.rejections.set(Box::new(rejections));
    }

    /// Attaches the agent after its first full sync: from now on `/readyz` answers 200 and
    /// `/metrics` reads the agent. Later calls change nothing.
    pub fn ready(&self, agent: Arc<dyn MetricsSource>) {
        let _ = self.agent.set(agent);
    }

    /// Whether [`Endpoint::ready`] was called.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.agent.get().is_some()
    }

    /// The `OpenMetrics` text of a scrape, `# EOF` included.
    pub async fn render(&self) -> Result<String, fmt::Error> {
        let _one_at_a_time = self.scrape.lock().await;
        let (pods, mut health, mut services) = match self.agent.get() {
            Some(agent) => (
                agent.pods().await,
                agent.health().await,
                agent.services().await,
            ),
            None => (Vec::new(), Health::default(), Vec::new()),
        };
        self.service_counters.adjust(&mut services);
        self.conntrack_evictions.observe(&mut health.conntrack);
        *self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = services;
        *self
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pods;
        *self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = health;
        if let Some(rejections) = self.rejections.get() {
            self.sync.rejections(rejections());
        }
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// The routes: `/metrics`, `/healthz`, `/readyz`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(self)
    }
}

/// Serves `endpoint` on `listener` (bound by the caller, so a bad `--metrics-addr` fails before
/// the agent touches the kernel) until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    endpoint: Arc<Endpoint>,
) -> std::io::Result<()> {
    axum::serve(listener, endpoint.router()).await
}

async fn metrics(State(endpoint): State<Arc<Endpoint>>) -> Response {
    if let Ok(text) = endpoint.render().await {
        ([(CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response()
    } else {
        // Only a collector can fail (writing into a String cannot).
        tracing::error!("encoding the metrics failed");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n",
        )
            .into_response()
    }
}

async fn readyz(State(endpoint): State<Arc<Endpoint>>) -> (StatusCode, &'static str) {
    if endpoint.is_ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the first sync is not done yet\n",
        )
    }
}

/// The hook or feature a degradation line is about: the text before its first `:`.
fn feature_of(line: &str) -> &str {
    line.split_once(':')
        .map_or(line, |(feature, _)| feature)
        .trim()
}

/// Reads the data path's state from the agent at scrape time.
struct DatapathCollector {
    agent: Attached,
}

impl fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatapathCollector")
            .field("attached", &self.agent.get().is_some())
            .finish()
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // Before the first sync nothing is known: the family is absent, not empty.
        let Some(agent) = self.agent.get() else {
            return Ok(());
        };
        // One series per feature; two degradations of one hook count 2, so the sum over the
        // family is the number of degradations and no series is duplicated.
        let mut by_feature = BTreeMap::<String, u64>::new();
        for line in agent.degraded() {
            *by_feature.entry(feature_of(&line).to_owned()).or_default() += 1;
        }
        let mut family = encoder.encode_descriptor(
            "datapath_degraded",
            "Degradations of the data path on this kernel, by hook or feature \
             (ferrovia status says what and why).",
            None,
            MetricType::Gauge,
        )?;
        for (feature, count) in &by_feature {
            family
                .encode_family(&[("feature", feature.as_str())])?
                .encode_gauge(count)?;
        }
        Ok(())
    }
}

/// The per-pod families, from the counters read at the start of the scrape. Only pods
/// registered now have series: a deleted pod's disappear with it.
struct PodCollector {
    agent: Attached,
    pods: Arc<Mutex<Vec<PodMetrics>>>,
}

impl fmt::Debug for PodCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodCollector").finish_non_exhaustive()
    }
}

/// One direction's counter of a pod (a `DirStats` field).
type Field = fn(&DirStats) -> u64;

/// A per-pod counter family: its series per pod and direction, one per value of `label`
/// (none: a single series).
struct PodFamily {
    name: &'static str,
    help: &'static str,
    label: Option<&'static str>,
    series: &'static [(&'static str, Field)],
}

const POD_FAMILIES: [PodFamily; 5] = [
    PodFamily {
        name: "pod_packets",
        help: "Packets to (ingress) and from (egress) the pod, dropped ones included.",
        label: None,
        series: &[("", |d| d.packets)],
    },
    PodFamily {
        name: "pod_bytes",
        help: "Bytes (Ethernet frames) to and from the pod, dropped ones included.",
        label: None,
        series: &[("", |d| d.bytes)],
    },
    PodFamily {
        name: "pod_malformed_packets",
        help: "IPv4 packets to or from the pod whose headers did not parse (passed untouched).",
        label: None,
        series: &[("", |d| d.malformed)],
    },
    PodFamily {
        name: "pod_connections",
        help: "New connections to (ingress) and from (egress) the pod: TCP SYNs, and UDP flows \
               (a datagram of a 4-tuple not seen within the UDP timeout).",
        label: Some("protocol"),
        series: &[("tcp", |d| d.conns_tcp), ("udp", |d| d.conns_udp)],
    },
    PodFamily {
        name: "pod_drops",
        help: "Packets to or from the pod the data path dropped, by reason (no_endpoints: \
               answered with a TCP reset or ICMP unreachable).",
        label: Some("reason"),
        series: &[
            ("policy_denied", |d| d.drop_policy),
            ("no_endpoints", |d| d.drop_no_endpoints),
            ("conntrack_full", |d| d.drop_ct_full),
            ("translation_error", |d| d.drop_xlate_error),
        ],
    },
];

const DIRECTIONS: [(&str, u8); 2] = [("ingress", POL_DIR_INGRESS), ("egress", POL_DIR_EGRESS)];

fn direction_name(dir: u8) -> &'static str {
    if dir == POL_DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

fn direction(stats: &PodStats, dir: u8) -> &DirStats {
    if dir == POL_DIR_INGRESS {
        &stats.ingress
    } else {
        &stats.egress
    }
}

impl PodFamily {
    fn encode(&self, encoder: &mut DescriptorEncoder, pods: &[PodMetrics]) -> fmt::Result {
        let mut family =
            encoder.encode_descriptor(self.name, self.help, None, MetricType::Counter)?;
        for p in pods {
            for (dir_name, dir) in DIRECTIONS {
                for (value_name, field) in self.series {
                    let mut labels = vec![
                        ("namespace", p.namespace.as_str()),
                        ("pod", p.pod.as_str()),
                        ("direction", dir_name),
                    ];
                    if let Some(label) = self.label {
                        labels.push((label, value_name));
                    }
                    family
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(
                            &field(direction(&p.traffic, dir)),
                            None,
                        )?;
                }
            }
        }
        Ok(())
    }
}

/// `ferrovia_pod_policy_verdicts`: only verdicts that happened have series.
fn encode_verdicts(encoder: &mut DescriptorEncoder, pods: &[PodMetrics]) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "pod_policy_verdicts",
        "NetworkPolicy verdicts on packets to (ingress) and from (egress) the pod, by verdict \
         and reason; only verdicts that happened have series.",
        None,
        MetricType::Counter,
    )?;
    for p in pods {
        for (&(dir, reason), packets) in &p.verdicts {
            let outcome = if verdict::allows(reason) {
                "allowed"
            } else {
                "denied"
            };
            let labels = [
                ("namespace", p.namespace.as_str()),
                ("pod", p.pod.as_str()),
                ("direction", direction_name(dir)),
                ("verdict", outcome),
                ("reason", verdict::name(reason)),
            ];
            family
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(packets, None)?;
        }
    }
    Ok(())
}

impl Collector for PodCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // Before the first sync nothing is known: the families are absent, not empty.
        if self.agent.get().is_none() {
            return Ok(());
        }
        let pods = self
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for family in &POD_FAMILIES {
            family.encode(&mut encoder, &pods)?;
        }
        encode_verdicts(&mut encoder, &pods)
    }
}

/// Map fill and attach status, from the health read at the start of the scrape.
struct HealthCollector {
    agent: Attached,
    health: Arc<Mutex<Health>>,
}

impl fmt::Debug for HealthCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthCollector").finish_non_exhaustive()
    }
}

/// A gauge family of one series per map.
fn encode_maps(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    maps: &[MapFill],
    value: fn(&MapFill) -> u32,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for map in maps {
        family
            .encode_family(&[("map", map.name)])?
            .encode_gauge(&u64::from(value(map)))?;
    }
    Ok(())
}

/// A gauge family of one series without labels.
fn encode_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // Before the first sync nothing is known: the families are absent, not empty.
        if self.agent.get().is_none() {
            return Ok(());
        }
        let health = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        encode_maps(
            &mut encoder,
            "map_capacity",
            "Capacity (max entries) of each pinned BPF map.",
            &health.maps,
            |m| m.capacity,
        )?;
        encode_maps(
            &mut encoder,
            "map_entries",
            "Entries in each pinned BPF map now, counted by walking its keys (an array always \
             has its capacity; a map changing meanwhile gives an approximate count).",
            &health.maps,
            |m| m.entries,
        )?;
        let mut family = encoder.encode_descriptor(
            "program_attached",
            "Whether each socket-level load balancing program is attached to its cgroup (1) \
             or not (0); the per-pod tc programs are ferrovia_pods_attached.",
            None,
            MetricType::Gauge,
        )?;
        for program in SOCKET_PROGRAMS {
            family
                .encode_family(&[("program", program), ("hook", "cgroup")])?
                .encode_gauge(&u64::from(health.socket_lb))?;
        }
        encode_gauge(
            &mut encoder,
            "pods",
            "Pods registered by the CNI plugin on this node.",
            health.pods,
        )?;
        encode_gauge(
            &mut encoder,
            "pods_attached",
            "Registered pods whose from_pod and to_pod programs are confirmed attached to \
             their interface (what a CNI CHECK asks).",
            health.pods_attached,
        )?;
        let mut family = encoder.encode_descriptor(
            "flow_events",
            "Flow events by outcome: read by the agent (ferrovia flows), suppressed by the \
             per-pod rate limit in the kernel, lost for want of room in the ring buffer.",
            None,
            MetricType::Counter,
        )?;
        let f = health.flow_events;
        for (outcome, n) in [
            ("read", f.read),
            ("suppressed", f.suppressed),
            ("lost", f.lost),
        ] {
            family
                .encode_family(&[("outcome", outcome)])?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        conntrack::encode(&mut encoder, &health.conntrack)
    }
}

/// The sync metrics; absent before the first sync, as the agent's other families.
struct SyncCollector {
    agent: Attached,
    sync: SyncMetrics,
}

impl fmt::Debug for SyncCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncCollector").finish_non_exhaustive()
    }
}

impl Collector for SyncCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        if self.agent.get().is_none() {
            return Ok(());
        }
        let histograms = [
            (
                "sync_duration",
                "Time to write the maps from the desired state and the pods, per sync (a \
                 desired-state change, a pod's registration or removal, ferrovia sync).",
                Some(&Unit::Seconds),
                &self.sync.duration,
            ),
            (
                "sync_latency",
                "Time from a desired-state change reaching the node (after the manifests \
                 watcher's debounce) to the maps reflecting it, waiting for the node included.",
                Some(&Unit::Seconds),
                &self.sync.latency,
            ),
        ];
        for (name, help, unit, histogram) in histograms {
            histogram.encode(encoder.encode_descriptor(
                name,
                help,
                unit,
                MetricType::Histogram,
            )?)?;
        }
        // Every kind has its series from the start, so a rate over it is defined.
        let mut family = encoder.encode_descriptor(
            "sync_errors",
            "Syncs that left part of the desired state unwritten, by kind (a frontend per \
             frontend, the policy once), and objects the source rejected (once each, when they \
             appear).",
            None,
            MetricType::Counter,
        )?;
        for (kind, counter) in SyncError::ALL.iter().zip(&self.sync.errors) {
            family
                .encode_family(&[("kind", kind.label())])?
                .encode_counter::<NoLabelSet, _, u64>(&counter.get(), None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;

    struct Fake(
        Vec<&'static str>,
        Vec<PodMetrics>,
        Health,
        Vec<ServiceMetrics>,
    );

    impl Fake {
        fn new(degraded: Vec<&'static str>, pods: Vec<PodMetrics>) -> Self {
            Self(degraded, pods, Health::default(), Vec::new())
        }
    }

    impl MetricsSource for Fake {
        fn degraded(&self) -> Vec<String> {
            self.0.iter().map(|&s| s.to_owned()).collect()
        }

        fn pods(&self) -> Pin<Box<dyn Future<Output = Vec<PodMetrics>> + Send + '_>> {
            Box::pin(std::future::ready(self.1.clone()))
        }

        fn services(&self) -> Pin<Box<dyn Future<Output = Vec<ServiceMetrics>> + Send + '_>> {
            Box::pin(std::future::ready(self.3.clone()))
        }

        fn health(&self) -> Pin<Box<dyn Future<Output = Health> + Send + '_>> {
            Box::pin(std::future::ready(self.2.clone()))
        }
    }

    const BUILD: &str = concat!(
        "# HELP ferrovia_build The running agent's version.\n",
        "# TYPE ferrovia_build info\n",
        "ferrovia_build_info{version=\"",
        env!("CARGO_PKG_VERSION"),
        "\"} 1\n",
    );

    /// The per-pod and per-service families without series (no pod, no service).
    const POD_HEADS: &str = "\
        # HELP ferrovia_pod_packets Packets to (ingress) and from (egress) the pod, dropped ones included.\n\
        # TYPE ferrovia_pod_packets counter\n\
        # HELP ferrovia_pod_bytes Bytes (Ethernet frames) to and from the pod, dropped ones included.\n\
        # TYPE ferrovia_pod_bytes counter\n\
        # HELP ferrovia_pod_malformed_packets IPv4 packets to or from the pod whose headers did not parse (passed untouched).\n\
        # TYPE ferrovia_pod_malformed_packets counter\n\
        # HELP ferrovia_pod_connections New connections to (ingress) and from (egress) the pod: TCP SYNs, and UDP flows (a datagram of a 4-tuple not seen within the UDP timeout).\n\
        # TYPE ferrovia_pod_connections counter\n\
        # HELP ferrovia_pod_drops Packets to or from the pod the data path dropped, by reason (no_endpoints: answered with a TCP reset or ICMP unreachable).\n\
        # TYPE ferrovia_pod_drops counter\n\
        # HELP ferrovia_pod_policy_verdicts NetworkPolicy verdicts on packets to (ingress) and from (egress) the pod, by verdict and reason; only verdicts that happened have series.\n\
        # TYPE ferrovia_pod_policy_verdicts counter\n\
        # HELP ferrovia_service_connections New connections to the service port given a backend (backend selections), by the socket hooks or the per-packet path.\n\
        # TYPE ferrovia_service_connections counter\n\
        # HELP ferrovia_service_rejected_connections Connections to the service port refused because it had no endpoint.\n\
        # TYPE ferrovia_service_rejected_connections counter\n\
        # HELP ferrovia_service_backend_selections New connections to the service port given each backend (a selection by the socket hooks or the per-packet path), by the backend's pod; backends never selected have no series.\n\
        # TYPE ferrovia_service_backend_selections counter\n\
        # HELP ferrovia_service_endpoints Endpoints of the service port by condition (EndpointSlice ready, serving, terminating).\n\
        # TYPE ferrovia_service_endpoints gauge\n";

    const DEGRADED_HEAD: &str = "# HELP ferrovia_datapath_degraded Degradations of the data path \
        on this kernel, by hook or feature (ferrovia status says what and why).\n\
        # TYPE ferrovia_datapath_degraded gauge\n";

    const MAP_CAPACITY_HEAD: &str = "\
        # HELP ferrovia_map_capacity Capacity (max entries) of each pinned BPF map.\n\
        # TYPE ferrovia_map_capacity gauge\n";

    const MAP_ENTRIES_HEAD: &str = "\
        # HELP ferrovia_map_entries Entries in each pinned BPF map now, counted by walking its keys (an array always has its capacity; a map changing meanwhile gives an approximate count).\n\
        # TYPE ferrovia_map_entries gauge\n";

    const ATTACHED_HEAD: &str = "\
        # HELP ferrovia_program_attached Whether each socket-level load balancing program is attached to its cgroup (1) or not (0); the per-pod tc programs are ferrovia_pods_attached.\n\
        # TYPE ferrovia_program_attached gauge\n";

    const PODS_HEAD: &str = "\
        # HELP ferrovia_pods Pods registered by the CNI plugin on this node.\n\
        # TYPE ferrovia_pods gauge\n";

    const PODS_ATTACHED_HEAD: &str = "\
        # HELP ferrovia_pods_attached Registered pods whose from_pod and to_pod programs are confirmed attached to their interface (what a CNI CHECK asks).\n\
        # TYPE ferrovia_pods_attached gauge\n";

    const FLOW_EVENTS_HEAD: &str = "\
        # HELP ferrovia_flow_events Flow events by outcome: read by the agent (ferrovia flows), suppressed by the per-pod rate limit in the kernel, lost for want of room in the ring buffer.\n\
        # TYPE ferrovia_flow_events counter\n";

    /// The health families of a data path without maps, socket hooks or pods.
    fn no_health() -> String {
        format!(
            "{MAP_CAPACITY_HEAD}{MAP_ENTRIES_HEAD}{ATTACHED_HEAD}\
             ferrovia_program_attached{{program=\"sock4_connect\",hook=\"cgroup\"}} 0\n\
             ferrovia_program_attached{{program=\"sock4_sendmsg\",hook=\"cgroup\"}} 0\n\
             ferrovia_program_attached{{program=\"sock4_recvmsg\",hook=\"cgroup\"}} 0\n\
             ferrovia_program_attached{{program=\"sock4_getpeer\",hook=\"cgroup\"}} 0\n\
             {PODS_HEAD}ferrovia_pods 0\n{PODS_ATTACHED_HEAD}ferrovia_pods_attached 0\n\
             {FLOW_EVENTS_HEAD}\
             ferrovia_flow_events_total{{outcome=\"read\"}} 0\n\
             ferrovia_flow_events_total{{outcome=\"suppressed\"}} 0\n\
             ferrovia_flow_events_total{{outcome=\"lost\"}} 0\n\
             {}",
            no_conntrack()
        )
    }

    const CONNTRACK_ENTRIES_HEAD: &str = "\
        # HELP ferrovia_conntrack_entries Entries in the service conntrack (CONNTRACK) now, two per translated flow.\n\
        # TYPE ferrovia_conntrack_entries gauge\n";

    const CONNTRACK_CREATED_HEAD: &str = "\
        # HELP ferrovia_conntrack_created Service conntrack entries the programs created (an overwrite of an existing tuple's entry is none), since the pinned maps were created.\n\
        # TYPE ferrovia_conntrack_created counter\n";

    const CONNTRACK_EVICTIONS_HEAD: &str = "\
        # HELP ferrovia_conntrack_evictions Service conntrack entries the LRU evicted, derived (the kernel does not report evictions): created - deleted by the garbage collection - entries now, since the agent's first scrape; exact when the map is quiescent while counted.\n\
        # TYPE ferrovia_conntrack_evictions counter\n";

    const CONNTRACK_GC_HEAD: &str = "\
        # HELP ferrovia_conntrack_gc_deleted Expired entries the agent's garbage collection deleted, per flow map (--conntrack-gc-interval), since the agent started.\n\
        # TYPE ferrovia_conntrack_gc_deleted counter\n";

    /// The conntrack families of an agent that could not read `CONNTRACK` and collected nothing.
    fn no_conntrack() -> String {
        format!(
            "{CONNTRACK_CREATED_HEAD}ferrovia_conntrack_created_total 0\n\
             {CONNTRACK_EVICTIONS_HEAD}ferrovia_conntrack_evictions_total 0\n\
             {CONNTRACK_GC_HEAD}"
        )
    }

    const BUCKETS: [&str; 9] = [
        "0.0005", "0.002", "0.008", "0.032", "0.128", "0.512", "2.048", "8.192", "+Inf",
    ];

    /// A histogram's samples: `(sum, count, cumulative count per bucket of BUCKETS)`.
    fn histogram(name: &str, help: &str, sum: &str, count: u64, buckets: [u64; 9]) -> String {
        let mut text = format!(
            "# HELP {name} {help}\n# TYPE {name} histogram\n# UNIT {name} seconds\n\
             {name}_sum {sum}\n{name}_count {count}\n"
        );
        for (le, n) in BUCKETS.iter().zip(buckets) {
            let _ = writeln!(text, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        text
    }

    const DURATION_HELP: &str = "Time to write the maps from the desired state and the pods, \
        per sync (a desired-state change, a pod's registration or removal, ferrovia sync).";
    const LATENCY_HELP: &str = "Time from a desired-state change reaching the node (after the \
        manifests watcher's debounce) to the maps reflecting it, waiting for the node included.";

    const ERRORS_HEAD: &str = "\
        # HELP ferrovia_sync_errors Syncs that left part of the desired state unwritten, by kind (a frontend per frontend, the policy once), and objects the source rejected (once each, when they appear).\n\
        # TYPE ferrovia_sync_errors counter\n";

    /// The sync families after `duration` syncs, `latency` observed changes and `errors`
    /// errors per kind, in `SyncError::ALL`'s order; every observation 3 ms.
    fn sync_text(duration: u64, latency: u64, errors: [u64; 6]) -> String {
        let three_ms = |n: u64| [0, 0, n, n, n, n, n, n, n];
        let sum = |n: u64| {
            if n == 0 {
                "0.0".to_owned()
            } else {
                format!("{}", 0.003 * n as f64)
            }
        };
        let mut text = histogram(
            "ferrovia_sync_duration_seconds",
            DURATION_HELP,
            &sum(duration),
            duration,
            three_ms(duration),
        );
        text.push_str(&histogram(
            "ferrovia_sync_latency_seconds",
            LATENCY_HELP,
            &sum(latency),
            latency,
            three_ms(latency),
        ));
        text.push_str(ERRORS_HEAD);
        for (kind, n) in [
            "frontend_map_full",
            "frontend_write",
            "frontend_too_many_backends",
            "policy_map_full",
            "policy_write",
            "rejected_object",
        ]
        .into_iter()
        .zip(errors)
        {
            let _ = writeln!(text, "ferrovia_sync_errors_total{{kind=\"{kind}\"}} {n}");
        }
        text
    }

    /// Every family after the pods' of an agent with no health and no syncs yet.
    fn quiet_rest() -> String {
        format!("{}{}", no_health(), sync_text(0, 0, [0; 6]))
    }

    #[tokio::test]
    async fn degradations_are_one_series_per_hook() {
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake::new(
            vec![
                "sock4_sendmsg: an unconnected UDP send to a service without endpoints fails with \
             EPERM (no bpf_set_retval: Linux 5.18+); verifier said: a: b",
                "sock4_connect: a call to a service without endpoints fails with EPERM, not \
             ECONNREFUSED (no bpf_set_retval: Linux 5.18+); verifier said: 10.0.0.1:80",
            ],
            vec![],
        )));
        assert_eq!(
            endpoint.render().await.expect("renders"),
            format!(
                "{BUILD}{DEGRADED_HEAD}\
                 ferrovia_datapath_degraded{{feature=\"sock4_connect\"}} 1\n\
                 ferrovia_datapath_degraded{{feature=\"sock4_sendmsg\"}} 1\n\
                 {POD_HEADS}{}# EOF\n",
                quiet_rest()
            )
        );
    }

    #[tokio::test]
    async fn a_kernel_without_degradations_exports_the_family_without_series() {
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake::new(vec![], vec![])));
        assert_eq!(
            endpoint.render().await.expect("renders"),
            format!("{BUILD}{DEGRADED_HEAD}{POD_HEADS}{}# EOF\n", quiet_rest())
        );
    }

    #[tokio::test]
    async fn two_degradations_of_one_hook_share_its_series() {
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake::new(
            vec!["sock4_connect: one", "sock4_connect: two", "odd"],
            vec![],
        )));
        let text = endpoint.render().await.expect("renders");
        assert!(
            text.contains("ferrovia_datapath_degraded{feature=\"sock4_connect\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("ferrovia_datapath_degraded{feature=\"odd\"} 1\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn pod_counters_are_series_per_pod_direction_and_reason() {
        let mut traffic = PodStats::default();
        traffic.ingress.packets = 7;
        traffic.ingress.drop_policy = 2;
        traffic.egress.bytes = 480;
        traffic.egress.conns_udp = 3;
        let pod = PodMetrics {
            namespace: "shop".into(),
            pod: "server".into(),
            traffic,
            verdicts: [
                ((POL_DIR_INGRESS, verdict::DENY_NO_RULE), 2),
                ((POL_DIR_INGRESS, verdict::ALLOW_RULE), 5),
            ]
            .into_iter()
            .collect(),
        };
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake::new(vec![], vec![pod])));
        let text = endpoint.render().await.expect("renders");
        let labels = |dir: &str| format!("namespace=\"shop\",pod=\"server\",direction=\"{dir}\"");
        for line in [
            "# TYPE ferrovia_pod_packets counter".to_owned(),
            format!("ferrovia_pod_packets_total{{{}}} 7", labels("ingress")),
            format!("ferrovia_pod_packets_total{{{}}} 0", labels("egress")),
            format!("ferrovia_pod_bytes_total{{{}}} 480", labels("egress")),
            format!(
                "ferrovia_pod_connections_total{{{},protocol=\"udp\"}} 3",
                labels("egress")
            ),
            format!(
                "ferrovia_pod_drops_total{{{},reason=\"policy_denied\"}} 2",
                labels("ingress")
            ),
            format!(
                "ferrovia_pod_drops_total{{{},reason=\"conntrack_full\"}} 0",
                labels("ingress")
            ),
            format!(
                "ferrovia_pod_policy_verdicts_total{{{},verdict=\"denied\",reason=\"denied-by-default\"}} 2",
                labels("ingress")
            ),
            format!(
                "ferrovia_pod_policy_verdicts_total{{{},verdict=\"allowed\",reason=\"allowed-by-rule\"}} 5",
                labels("ingress")
            ),
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line}\n---\n{text}");
        }
        // 2 directions × (packets, bytes, malformed) + 2 × 2 protocols + 2 × 4 reasons + 2
        // verdicts: every series of the pod, none of another.
        assert_eq!(
            text.matches("pod=\"server\"").count(),
            6 + 4 + 8 + 2,
            "{text}"
        );
    }

    #[tokio::test]
    async fn map_fill_and_attach_status_are_exported_per_map_and_program() {
        let health = Health {
            maps: vec![
                MapFill {
                    name: "SERVICES",
                    capacity: 1024,
                    entries: 3,
                },
                MapFill {
                    name: "COUNTERS",
                    capacity: 16,
                    entries: 16,
                },
            ],
            socket_lb: true,
            pods: 2,
            pods_attached: 1,
            flow_events: FlowEventCounts {
                read: 5,
                suppressed: 3,
                lost: 1,
            },
            conntrack: ConntrackHealth::default(),
        };
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake(vec![], vec![], health, vec![])));
        assert_eq!(
            endpoint.render().await.expect("renders"),
            format!(
                "{BUILD}{DEGRADED_HEAD}{POD_HEADS}\
                 {MAP_CAPACITY_HEAD}\
                 ferrovia_map_capacity{{map=\"SERVICES\"}} 1024\n\
                 ferrovia_map_capacity{{map=\"COUNTERS\"}} 16\n\
                 {MAP_ENTRIES_HEAD}\
                 ferrovia_map_entries{{map=\"SERVICES\"}} 3\n\
                 ferrovia_map_entries{{map=\"COUNTERS\"}} 16\n\
                 {ATTACHED_HEAD}\
                 ferrovia_program_attached{{program=\"sock4_connect\",hook=\"cgroup\"}} 1\n\
                 ferrovia_program_attached{{program=\"sock4_sendmsg\",hook=\"cgroup\"}} 1\n\
                 ferrovia_program_attached{{program=\"sock4_recvmsg\",hook=\"cgroup\"}} 1\n\
                 ferrovia_program_attached{{program=\"sock4_getpeer\",hook=\"cgroup\"}} 1\n\
                 {PODS_HEAD}ferrovia_pods 2\n{PODS_ATTACHED_HEAD}ferrovia_pods_attached 1\n\
                 {FLOW_EVENTS_HEAD}\
                 ferrovia_flow_events_total{{outcome=\"read\"}} 5\n\
                 ferrovia_flow_events_total{{outcome=\"suppressed\"}} 3\n\
                 ferrovia_flow_events_total{{outcome=\"lost\"}} 1\n\
                 {}{}# EOF\n",
                no_conntrack(),
                sync_text(0, 0, [0; 6])
            )
        );
    }

    #[tokio::test]
    async fn syncs_fill_the_histograms_and_errors_count_by_kind() {
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake::new(vec![], vec![])));
        let sync = endpoint.sync_metrics();
        for _ in 0..3 {
            sync.synced(Duration::from_millis(3));
        }
        sync.reflected(Duration::from_millis(3));
        sync.failed(SyncError::FrontendMapFull);
        sync.failed(SyncError::PolicyWrite);
        sync.failed(SyncError::PolicyWrite);
        assert_eq!(
            endpoint.render().await.expect("renders"),
            format!(
                "{BUILD}{DEGRADED_HEAD}{POD_HEADS}{}{}# EOF\n",
                no_health(),
                sync_text(3, 1, [1, 0, 0, 0, 2, 0])
            )
        );
    }

    #[tokio::test]
    async fn a_rejection_counts_once_when_it_appears() {
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake::new(vec![], vec![])));
        let lines = Arc::new(Mutex::new(vec!["a.yaml: bad".to_owned()]));
        let sync = endpoint.sync_metrics();
        // Seen by a sync, then by the scrape: once.
        sync.rejections(lines.lock().unwrap().clone());
        endpoint.watch_rejections({
            let lines = Arc::clone(&lines);
            move || lines.lock().unwrap().clone()
        });
        let rejected = |text: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("ferrovia_sync_errors_total{kind=\"rejected_object\"} ")
                })
                .map(str::to_owned)
        };
        let text = endpoint.render().await.expect("renders");
        assert_eq!(rejected(&text).as_deref(), Some("1"), "{text}");
        // A second rejection appears and the first stays: one more.
        lines.lock().unwrap().push("b.yaml: worse".to_owned());
        let text = endpoint.render().await.expect("renders");
        assert_eq!(rejected(&text).as_deref(), Some("2"), "{text}");
        // Fixed, then broken again: it appears again.
        lines.lock().unwrap().clear();
        let _ = endpoint.render().await.expect("renders");
        lines.lock().unwrap().push("a.yaml: bad".to_owned());
        let text = endpoint.render().await.expect("renders");
        assert_eq!(rejected(&text).as_deref(), Some("3"), "{text}");
    }

    #[tokio::test]
    async fn service_ports_have_connections_backend_selections_and_endpoints_by_condition() {
        let mut fake = Fake::new(vec![], vec![]);
        fake.3 = vec![ServiceMetrics {
            namespace: "shop".into(),
            service: "web".into(),
            port: "http".into(),
            connections: 5,
            rejected: 1,
            backends: [("shop/web-1".to_owned(), 4), ("shop/web-2".to_owned(), 1)].into(),
            ready: 2,
            serving: 3,
            terminating: 1,
        }];
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(fake));
        let text = endpoint.render().await.expect("renders");
        let port = "namespace=\"shop\",service=\"web\",port=\"http\"";
        let expected = format!(
            "# HELP ferrovia_service_connections New connections to the service port given a \
             backend (backend selections), by the socket hooks or the per-packet path.\n\
             # TYPE ferrovia_service_connections counter\n\
             ferrovia_service_connections_total{{{port}}} 5\n\
             # HELP ferrovia_service_rejected_connections Connections to the service port \
             refused because it had no endpoint.\n\
             # TYPE ferrovia_service_rejected_connections counter\n\
             ferrovia_service_rejected_connections_total{{{port}}} 1\n\
             # HELP ferrovia_service_backend_selections New connections to the service port \
             given each backend (a selection by the socket hooks or the per-packet path), by \
             the backend's pod; backends never selected have no series.\n\
             # TYPE ferrovia_service_backend_selections counter\n\
             ferrovia_service_backend_selections_total{{{port},backend=\"shop/web-1\"}} 4\n\
             ferrovia_service_backend_selections_total{{{port},backend=\"shop/web-2\"}} 1\n\
             # HELP ferrovia_service_endpoints Endpoints of the service port by condition \
             (EndpointSlice ready, serving, terminating).\n\
             # TYPE ferrovia_service_endpoints gauge\n\
             ferrovia_service_endpoints{{{port},condition=\"ready\"}} 2\n\
             ferrovia_service_endpoints{{{port},condition=\"serving\"}} 3\n\
             ferrovia_service_endpoints{{{port},condition=\"terminating\"}} 1\n"
        );
        assert!(text.contains(&expected), "{text}");
    }

    /// A source whose conntrack changes at each scrape (the next of its list).
    struct Conntrack(Mutex<Vec<ConntrackHealth>>);

    impl MetricsSource for Conntrack {
        fn degraded(&self) -> Vec<String> {
            Vec::new()
        }

        fn pods(&self) -> Pin<Box<dyn Future<Output = Vec<PodMetrics>> + Send + '_>> {
            Box::pin(std::future::ready(Vec::new()))
        }

        fn services(&self) -> Pin<Box<dyn Future<Output = Vec<ServiceMetrics>> + Send + '_>> {
            Box::pin(std::future::ready(Vec::new()))
        }

        fn health(&self) -> Pin<Box<dyn Future<Output = Health> + Send + '_>> {
            let conntrack = self.0.lock().unwrap().remove(0);
            Box::pin(std::future::ready(Health {
                conntrack,
                ..Health::default()
            }))
        }
    }

    #[tokio::test]
    async fn conntrack_entries_creations_evictions_and_collections_are_exported() {
        let ct = |entries, created, collected| ConntrackHealth {
            entries: Some(entries),
            created,
            gc_deleted: vec![("CONNTRACK", collected), ("POLICY_CT", 7)],
            evictions: 0,
        };
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Conntrack(Mutex::new(vec![
            ct(100, 500, 0),
            ct(150, 600, 20),
        ]))));
        let first = endpoint.render().await.expect("renders");
        assert!(
            first.contains("ferrovia_conntrack_evictions_total 0\n"),
            "the first scrape is the baseline\n{first}"
        );
        let text = endpoint.render().await.expect("renders");
        let expected = format!(
            "{CONNTRACK_ENTRIES_HEAD}ferrovia_conntrack_entries 150\n\
             {CONNTRACK_CREATED_HEAD}ferrovia_conntrack_created_total 600\n\
             {CONNTRACK_EVICTIONS_HEAD}ferrovia_conntrack_evictions_total 30\n\
             {CONNTRACK_GC_HEAD}\
             ferrovia_conntrack_gc_deleted_total{{map=\"CONNTRACK\"}} 20\n\
             ferrovia_conntrack_gc_deleted_total{{map=\"POLICY_CT\"}} 7\n"
        );
        assert!(text.contains(&expected), "{expected}\n---\n{text}");
    }

    #[tokio::test]
    async fn before_the_first_sync_only_the_build_is_known() {
        assert_eq!(
            Endpoint::new().render().await.expect("renders"),
            format!("{BUILD}# EOF\n")
        );
    }

    async fn get(endpoint: &Arc<Endpoint>, path: &str) -> (StatusCode, Option<String>, String) {
        let response = Arc::clone(endpoint)
            .router()
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            content_type,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    #[tokio::test]
    async fn readyz_turns_200_when_the_agent_is_attached() {
        let endpoint = Arc::new(Endpoint::new());
        assert_eq!(get(&endpoint, "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get(&endpoint, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        endpoint.ready(Arc::new(Fake::new(vec![], vec![])));
        assert_eq!(get(&endpoint, "/readyz").await.0, StatusCode::OK);
        let (status, content_type, body) = get(&endpoint, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert_eq!(get(&endpoint, "/nope").await.0, StatusCode::NOT_FOUND);
    }
}
