//! The agent's HTTP endpoint (`--metrics-addr`): `/metrics` for Prometheus (`OpenMetrics` text),
//! `/healthz` (the process serves) and `/readyz` (the first full sync is done).
//!
//! Values are read from the agent at scrape time by a [`Collector`], so `/metrics` cannot drift
//! from what `ferrovia status` reports. Labels name kernel features and hooks, never an address.
use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
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
    encoding::{DescriptorEncoder, NoLabelSet, text::encode},
    metrics::{MetricType, info::Info},
    registry::Registry,
};

/// The content type of `/metrics` (`OpenMetrics` 1.0 text).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What `/metrics` reads from the agent at each scrape.
pub trait MetricsSource: Send + Sync + 'static {
    /// What runs degraded on this kernel, one line each: `hook: what and why`.
    fn degraded(&self) -> Vec<String>;

    /// Every registered pod's counters, read from the data path's maps now.
    fn pods(&self) -> Pin<Box<dyn Future<Output = Vec<PodMetrics>> + Send + '_>>;
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

/// What the HTTP endpoint serves: the metric registry, and readiness.
pub struct Endpoint {
    registry: Registry,
    agent: Attached,
    /// The pods' counters of the scrape in progress, read before encoding (the collector
    /// encodes synchronously; the agent's state is behind an async lock).
    pods: Arc<Mutex<Vec<PodMetrics>>>,
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
        Self {
            registry,
            agent,
            pods,
            scrape: tokio::sync::Mutex::new(()),
        }
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
        let pods = match self.agent.get() {
            Some(agent) => agent.pods().await,
            None => Vec::new(),
        };
        *self
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pods;
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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;

    struct Fake(Vec<&'static str>, Vec<PodMetrics>);

    impl MetricsSource for Fake {
        fn degraded(&self) -> Vec<String> {
            self.0.iter().map(|&s| s.to_owned()).collect()
        }

        fn pods(&self) -> Pin<Box<dyn Future<Output = Vec<PodMetrics>> + Send + '_>> {
            Box::pin(std::future::ready(self.1.clone()))
        }
    }

    const BUILD: &str = concat!(
        "# HELP ferrovia_build The running agent's version.\n",
        "# TYPE ferrovia_build info\n",
        "ferrovia_build_info{version=\"",
        env!("CARGO_PKG_VERSION"),
        "\"} 1\n",
    );

    /// The per-pod families without series (no pod registered).
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
        # TYPE ferrovia_pod_policy_verdicts counter\n";

    const DEGRADED_HEAD: &str = "# HELP ferrovia_datapath_degraded Degradations of the data path \
        on this kernel, by hook or feature (ferrovia status says what and why).\n\
        # TYPE ferrovia_datapath_degraded gauge\n";

    #[tokio::test]
    async fn degradations_are_one_series_per_hook() {
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake(
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
                 {POD_HEADS}# EOF\n"
            )
        );
    }

    #[tokio::test]
    async fn a_kernel_without_degradations_exports_the_family_without_series() {
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake(vec![], vec![])));
        assert_eq!(
            endpoint.render().await.expect("renders"),
            format!("{BUILD}{DEGRADED_HEAD}{POD_HEADS}# EOF\n")
        );
    }

    #[tokio::test]
    async fn two_degradations_of_one_hook_share_its_series() {
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake(
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
        endpoint.ready(Arc::new(Fake(vec![], vec![pod])));
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
        endpoint.ready(Arc::new(Fake(vec![], vec![])));
        assert_eq!(get(&endpoint, "/readyz").await.0, StatusCode::OK);
        let (status, content_type, body) = get(&endpoint, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert_eq!(get(&endpoint, "/nope").await.0, StatusCode::NOT_FOUND);
    }
}
