//! The agent's HTTP endpoint (`--metrics-addr`): `/metrics` for Prometheus (`OpenMetrics` text),
//! `/healthz` (the process serves) and `/readyz` (the first full sync is done).
//!
//! Values are read from the agent at scrape time by a [`Collector`], so `/metrics` cannot drift
//! from what `ferrovia status` reports. Labels name kernel features and hooks, never an address.
use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, OnceLock},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, text::encode},
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
}

/// The agent, once its first full sync is done; unset before.
type Attached = Arc<OnceLock<Arc<dyn MetricsSource>>>;

/// What the HTTP endpoint serves: the metric registry, and readiness.
pub struct Endpoint {
    registry: Registry,
    agent: Attached,
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
        registry.register_collector(Box::new(DatapathCollector {
            agent: Arc::clone(&agent),
        }));
        Self { registry, agent }
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
    pub fn render(&self) -> Result<String, fmt::Error> {
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
    if let Ok(text) = endpoint.render() {
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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;

    struct Fake(Vec<&'static str>);

    impl MetricsSource for Fake {
        fn degraded(&self) -> Vec<String> {
            self.0.iter().map(|&s| s.to_owned()).collect()
        }
    }

    const BUILD: &str = concat!(
        "# HELP ferrovia_build The running agent's version.\n",
        "# TYPE ferrovia_build info\n",
        "ferrovia_build_info{version=\"",
        env!("CARGO_PKG_VERSION"),
        "\"} 1\n",
    );

    const DEGRADED_HEAD: &str = "# HELP ferrovia_datapath_degraded Degradations of the data path \
        on this kernel, by hook or feature (ferrovia status says what and why).\n\
        # TYPE ferrovia_datapath_degraded gauge\n";

    #[test]
    fn degradations_are_one_series_per_hook() {
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake(vec![
            "sock4_sendmsg: an unconnected UDP send to a service without endpoints fails with \
             EPERM (no bpf_set_retval: Linux 5.18+); verifier said: a: b",
            "sock4_connect: a call to a service without endpoints fails with EPERM, not \
             ECONNREFUSED (no bpf_set_retval: Linux 5.18+); verifier said: 10.0.0.1:80",
        ])));
        assert_eq!(
            endpoint.render().expect("renders"),
            format!(
                "{BUILD}{DEGRADED_HEAD}\
                 ferrovia_datapath_degraded{{feature=\"sock4_connect\"}} 1\n\
                 ferrovia_datapath_degraded{{feature=\"sock4_sendmsg\"}} 1\n\
                 # EOF\n"
            )
        );
    }

    #[test]
    fn a_kernel_without_degradations_exports_the_family_without_series() {
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake(vec![])));
        assert_eq!(
            endpoint.render().expect("renders"),
            format!("{BUILD}{DEGRADED_HEAD}# EOF\n")
        );
    }

    #[test]
    fn two_degradations_of_one_hook_share_its_series() {
        let endpoint = Endpoint::new();
        endpoint.ready(Arc::new(Fake(vec![
            "sock4_connect: one",
            "sock4_connect: two",
            "odd",
        ])));
        let text = endpoint.render().expect("renders");
        assert!(
            text.contains("ferrovia_datapath_degraded{feature=\"sock4_connect\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("ferrovia_datapath_degraded{feature=\"odd\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn before_the_first_sync_only_the_build_is_known() {
        assert_eq!(
            Endpoint::new().render().expect("renders"),
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
        endpoint.ready(Arc::new(Fake(vec![])));
        assert_eq!(get(&endpoint, "/readyz").await.0, StatusCode::OK);
        let (status, content_type, body) = get(&endpoint, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert_eq!(get(&endpoint, "/nope").await.0, StatusCode::NOT_FOUND);
    }
}
