//! The per-service families: new connections and rejections per service port, counted by the
//! programs per frontend (`FRONTEND_STATS`) and summed over a port's frontends, the selections
//! of each of its backends (`BACKEND_STATS`), and the port's endpoints by condition. Labels:
//! `namespace`, `service`, `port` (the port's name, empty when unnamed), and `backend` (the
//! endpoint's pod) — never an address from traffic.
use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};

use super::Attached;

/// One service port at a scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceMetrics {
    pub namespace: String,
    pub service: String,
    /// The service port's name (`""` when unnamed).
    pub port: String,
    /// New connections given a backend, over all of the port's frontends (each translated
    /// connection once, by the socket hooks or the per-packet path).
    pub connections: u64,
    /// Connections refused because the port had no endpoint.
    pub rejected: u64,
    /// New connections given each backend, over the port's frontends, by the backend's name:
    /// its pod (`namespace/name`) when known, else its `EndpointSlice` target reference, else
    /// its address (from the desired state, bounded by the endpoints). Backends never selected
    /// are absent.
    pub backends: BTreeMap<String, u64>,
    /// The port's endpoints by condition (an endpoint may be serving and terminating).
    pub ready: u64,
    pub serving: u64,
    pub terminating: u64,
}

/// Encodes the services read at the start of the scrape.
pub(super) struct ServiceCollector {
    pub(super) agent: Attached,
    pub(super) services: Arc<Mutex<Vec<ServiceMetrics>>>,
}

impl fmt::Debug for ServiceCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceCollector").finish_non_exhaustive()
    }
}

type Field = fn(&ServiceMetrics) -> u64;

const COUNTERS: [(&str, &str, Field); 2] = [
    (
        "service_connections",
        "New connections to the service port given a backend (backend selections), by the \
         socket hooks or the per-packet path.",
        |s| s.connections,
    ),
    (
        "service_rejected_connections",
        "Connections to the service port refused because it had no endpoint.",
        |s| s.rejected,
    ),
];

const CONDITIONS: [(&str, Field); 3] = [
    ("ready", |s| s.ready),
    ("serving", |s| s.serving),
    ("terminating", |s| s.terminating),
];

impl Collector for ServiceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        if self.agent.get().is_none() {
            return Ok(());
        }
        let services = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let labels = |s: &'_ ServiceMetrics| {
            [
                ("namespace", s.namespace.clone()),
                ("service", s.service.clone()),
                ("port", s.port.clone()),
            ]
        };
        for (name, help, field) in COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in services.iter() {
                family
                    .encode_family(&labels(s))?
                    .encode_counter::<NoLabelSet, _, u64>(&field(s), None)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "service_backend_selections",
            "New connections to the service port given each backend (a selection by the socket \
             hooks or the per-packet path), by the backend's pod; backends never selected have \
             no series.",
            None,
            MetricType::Counter,
        )?;
        for s in services.iter() {
            for (backend, n) in &s.backends {
                let [ns, svc, port] = labels(s);
                let labels = [ns, svc, port, ("backend", backend.clone())];
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "service_endpoints",
            "Endpoints of the service port by condition (EndpointSlice ready, serving, \
             terminating).",
            None,
            MetricType::Gauge,
        )?;
        for s in services.iter() {
            for (condition, field) in CONDITIONS {
                let [ns, svc, port] = labels(s);
                let labels = [ns, svc, port, ("condition", condition.to_owned())];
                family
                    .encode_family(&labels)?
                    .encode_gauge(&i64::try_from(field(s)).unwrap_or(i64::MAX))?;
            }
        }
        Ok(())
    }
}

/// Keeps the service counters monotonic while their series live: a port's count is the sum
/// over its frontends' entries (a backend's over its ids, one per frontend), and a frontend
/// that goes (a `NodePort` switched off, an external IP removed) takes its entries with it.
/// What a drop would lose is carried as an offset, so Prometheus never sees a false counter
/// reset. Increments a removed frontend got after the last scrape are lost; a series that
/// disappears starts again from its sum.
#[derive(Debug, Default)]
pub(super) struct Monotonic {
    /// Per series: (last raw value, offset).
    seen: Mutex<BTreeMap<SeriesKey, (u64, u64)>>,
}

/// A service port: namespace, service, port name.
type PortKey = (String, String, String);

/// One counter series of a port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Series {
    Connections,
    Rejected,
    /// One backend's selections, by its label.
    Backend(String),
}

type SeriesKey = (PortKey, Series);

impl Monotonic {
    pub(super) fn adjust(&self, services: &mut [ServiceMetrics]) {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = BTreeMap::new();
        let mut keep = |key: SeriesKey, value: &mut u64| {
            let (mut last, mut offset) = seen.get(&key).copied().unwrap_or_default();
            if *value < last {
                offset += last - *value;
            }
            last = *value;
            *value += offset;
            next.insert(key, (last, offset));
        };
        for s in services.iter_mut() {
            let port = (s.namespace.clone(), s.service.clone(), s.port.clone());
            keep((port.clone(), Series::Connections), &mut s.connections);
            keep((port.clone(), Series::Rejected), &mut s.rejected);
            for (backend, n) in &mut s.backends {
                keep((port.clone(), Series::Backend(backend.clone())), n);
            }
        }
        *seen = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(connections: u64, rejected: u64) -> ServiceMetrics {
        ServiceMetrics {
            namespace: "shop".into(),
            service: "web".into(),
            port: "http".into(),
            connections,
            rejected,
            ..ServiceMetrics::default()
        }
    }

    #[test]
    fn a_frontend_that_goes_does_not_make_the_counters_go_down() {
        let m = Monotonic::default();
        let scrape = |raw: ServiceMetrics| {
            let mut v = vec![raw];
            m.adjust(&mut v);
            (v[0].connections, v[0].rejected)
        };
        assert_eq!(scrape(port(1000, 3)), (1000, 3));
        // The NodePort (200 of them, 1 rejection) goes: the sum drops to 800.
        assert_eq!(scrape(port(800, 2)), (1000, 3));
        assert_eq!(scrape(port(810, 2)), (1010, 3));
        // The series disappears, then comes back: it starts from its sum.
        let mut none: Vec<ServiceMetrics> = Vec::new();
        m.adjust(&mut none);
        assert_eq!(scrape(port(5, 0)), (5, 0));
    }

    #[test]
    fn a_backends_selections_do_not_go_down_when_one_of_its_frontends_goes() {
        let m = Monotonic::default();
        let scrape = |a: u64, b: u64| {
            let mut p = port(a + b, 0);
            p.backends = [("shop/a".to_owned(), a), ("shop/b".to_owned(), b)].into();
            let mut v = vec![p];
            m.adjust(&mut v);
            let b = &v[0].backends;
            (b["shop/a"], b["shop/b"])
        };
        assert_eq!(scrape(60, 40), (60, 40));
        // The NodePort goes with 10 of a's selections: a stays, b counts on.
        assert_eq!(scrape(50, 45), (60, 45));
        assert_eq!(scrape(52, 45), (62, 45));
    }
}
