//! The node's answers to the operator's read-only views ([`Inventory`]): what the data path
//! serves, computed from the same snapshot and registered pods the maps were written from, and
//! what the pinned maps hold.
//!
//! Each answer copies what it needs under the node's lock and computes after releasing it, so
//! a slow answer does not hold up pod registration or a sync.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicySpec;

use super::{Node, PodRecord};
use crate::api::{
    ApiError, FrontendType, Inventory, MapList, PodState, PolicyList, PolicyState, PortEndpoints,
    ServiceFrontend, ServiceList,
};
use crate::datapath::inventory::pinned_maps;
use crate::model::endpoints::{self, SliceIndex};
use crate::model::policy::selector_matches;
use crate::model::{self, ClusterState, Desired, ObjRef, PodIps};

impl Node {
    /// Every service port's connection counters (summed over its frontends) and endpoints
    /// by condition, for `/metrics`.
    pub(super) async fn service_metrics(&self) -> Vec<crate::metrics::ServiceMetrics> {
        // One lock for the state, the pods and the counters; the model computed once.
        let (state, pods, counters, selections) = {
            let inner = self.inner.lock().await;
            let counters = inner.datapath.frontend_stats().unwrap_or_else(|e| {
                tracing::warn!("reading FRONTEND_STATS: {e:#}");
                BTreeMap::new()
            });
            let selections = inner.datapath.backend_selections().unwrap_or_else(|e| {
                tracing::warn!("reading BACKEND_STATS: {e:#}");
                BTreeMap::new()
            });
            let pods: Vec<PodRecord> = inner.pods.values().cloned().collect();
            (Arc::clone(&inner.state), pods, counters, selections)
        };
        let pod_ips = pod_ips(&pods);
        let names = BackendNames::new(&state, &pod_ips);
        let desired = model::compute(&state, &pod_ips);
        let list = services(&state, &desired);
        let ports = port_endpoints(&state, &pod_ips, &desired);
        let mut out = BTreeMap::<(String, String, String), crate::metrics::ServiceMetrics>::new();
        for f in &list.frontends {
            let port = (
                f.service.namespace.clone(),
                f.service.name.clone(),
                f.port_name.clone(),
            );
            let m = out
                .entry(port)
                .or_insert_with(|| crate::metrics::ServiceMetrics {
                    namespace: f.service.namespace.clone(),
                    service: f.service.name.clone(),
                    port: f.port_name.clone(),
                    ..crate::metrics::ServiceMetrics::default()
                });
            let Some(key) = crate::datapath::service_key(&f.key) else {
                continue;
            };
            if let Some(s) = counters.get(&key) {
                m.connections += s.connections;
                m.rejected += s.rejected;
            }
            for (addr, n) in selections.get(&key).into_iter().flatten() {
                *m.backends.entry(names.name(&f.service, *addr)).or_default() += n;
            }
        }
        for p in &ports {
            let port = (
                p.service.namespace.clone(),
                p.service.name.clone(),
                p.port_name.clone(),
            );
            if let Some(m) = out.get_mut(&port) {
                for (e, _) in &p.endpoints {
                    m.ready += u64::from(e.ready);
                    m.serving += u64::from(e.serving);
                    m.terminating += u64::from(e.terminating);
                }
            }
        }
        out.into_values().collect()
    }

    /// The desired state and the registered pods, as the last resync saw them.
    async fn snapshot(&self) -> (Arc<ClusterState>, Vec<PodRecord>) {
        let inner = self.inner.lock().await;
        (
            Arc::clone(&inner.state),
            inner.pods.values().cloned().collect(),
        )
    }
}

impl Inventory for Node {
    async fn services(&self) -> ServiceList {
        let (state, pods) = self.snapshot().await;
        services(&state, &model::compute(&state, &pod_ips(&pods)))
    }

    async fn endpoints(&self) -> Vec<PortEndpoints> {
        let (state, pods) = self.snapshot().await;
        let pod_ips = pod_ips(&pods);
        port_endpoints(&state, &pod_ips, &model::compute(&state, &pod_ips))
    }

    async fn policies(&self) -> PolicyList {
        let (state, pods) = self.snapshot().await;
        // The source's current rejections (it re-reads only changed files); its state is not
        // taken: what is in force is what the node last synced.
        let (_, errors) = (self.reload)();
        policies(&state, &local_pods(&pods), &errors)
    }

    async fn pods(&self) -> Vec<PodState> {
        let (state, pods) = self.snapshot().await;
        let mut counters: BTreeMap<String, crate::metrics::PodMetrics> = {
            let inner = self.inner.lock().await;
            // Both in the order of `inner.pods`, read under one lock.
            inner
                .pods
                .keys()
                .cloned()
                .zip(super::pod_metrics(&inner))
                .collect()
        };
        let in_force = policies(&state, &local_pods(&pods), &[]);
        let selected = |pod: &PodRecord, direction: &str| {
            in_force.policies.iter().any(|p| {
                p.policy.namespace == pod.namespace
                    && p.types.iter().any(|t| t == direction)
                    && p.selected_pods.contains(&pod.name)
            })
        };
        let mut out: Vec<PodState> = pods
            .iter()
            .map(|pod| PodState {
                ingress_isolated: selected(pod, "Ingress"),
                egress_isolated: selected(pod, "Egress"),
                from_pod: pod.iface.ingress,
                to_pod: pod.iface.egress,
                counters: counters.remove(&pod.container_id).unwrap_or_default(),
                pod: pod.registration(),
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.pod.namespace, &a.pod.name, &a.pod.container_id).cmp(&(
                &b.pod.namespace,
                &b.pod.name,
                &b.pod.container_id,
            ))
        });
        out
    }

    async fn maps(&self) -> Result<MapList, ApiError> {
        let root = self.inner.lock().await.datapath.bpffs_root().to_path_buf();
        // One syscall per key: off the async threads.
        let maps = tokio::task::spawn_blocking({
            let root = root.clone();
            move || pinned_maps(&root)
        })
        .await
        .map_err(ApiError::internal)?;
        Ok(MapList {
            bpffs_root: root,
            maps,
        })
    }
}

/// What a backend is called in the metrics (`backend` label): the pod at its address
/// (`namespace/name`, from the pods' status, else the registered pods), else the target
/// reference its service's `EndpointSlice` gives it, else its address — from the desired
/// state, so the series are bounded by the endpoints, never by traffic.
struct BackendNames {
    pods: BTreeMap<IpAddr, ObjRef>,
    /// (service, endpoint address) → its target reference, `namespace/name`.
    targets: BTreeMap<(ObjRef, IpAddr), String>,
}

impl BackendNames {
    fn new(state: &ClusterState, pod_ips: &PodIps) -> Self {
        // Frontends are IPv4 only (no IPv6 data path yet), and so are their backends; this
        // node's pods first, then running pods elsewhere.
        let pods: BTreeMap<IpAddr, ObjRef> = endpoints::pods_by_ipv4(state, pod_ips)
            .into_iter()
            .map(|(ip, (pod, _))| (IpAddr::V4(ip), pod))
            .collect();
        let mut targets = BTreeMap::new();
        for (key, slice) in &state.endpoint_slices {
            let labels = slice.metadata.labels.as_ref();
            let Some(service) = labels.and_then(|l| l.get(endpoints::SERVICE_NAME_LABEL)) else {
                continue;
            };
            for ep in &slice.endpoints {
                let ip = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok());
                let target = ep.target_ref.as_ref();
                let (Some(ip), Some(name)) = (ip, target.and_then(|t| t.name.as_deref())) else {
                    continue;
                };
                let namespace = target
                    .and_then(|t| t.namespace.as_deref())
                    .unwrap_or(&key.namespace);
                targets
                    .entry((ObjRef::new(&key.namespace, service), ip))
                    .or_insert_with(|| format!("{namespace}/{name}"));
            }
        }
        Self { pods, targets }
    }

    fn name(&self, service: &ObjRef, addr: std::net::SocketAddr) -> String {
        if let Some(pod) = self.pods.get(&addr.ip()) {
            return pod.to_string();
        }
        self.targets
            .get(&(service.clone(), addr.ip()))
            .cloned()
            .unwrap_or_else(|| addr.to_string())
    }
}

/// The registered pods' addresses, as the model takes them.
pub(super) fn pod_ips(pods: &[PodRecord]) -> PodIps {
    pods.iter()
        .map(|p| (ObjRef::new(&p.namespace, &p.name), p.ips.clone()))
        .collect()
}

fn local_pods(pods: &[PodRecord]) -> BTreeSet<ObjRef> {
    pods.iter()
        .map(|p| ObjRef::new(&p.namespace, &p.name))
        .collect()
}

/// The frontends the data path serves (IPv4: there is no IPv6 data path yet), and the skipped.
fn services(state: &ClusterState, desired: &Desired) -> ServiceList {
    let frontends = desired
        .frontends
        .iter()
        .filter(|(key, _)| key.vip.is_ipv4())
        .map(|(key, f)| ServiceFrontend {
            key: key.clone(),
            service: f.service.clone(),
            port_name: f.port_name.clone(),
            kind: frontend_type(state.services.get(&f.service).map(|s| &**s), key.vip),
            affinity_timeout_s: f.affinity_timeout_s,
            backends: f.backends.len(),
        })
        .collect();
    ServiceList {
        frontends,
        skipped: desired.skipped.clone(),
    }
}

/// Which of the service's addresses `vip` is. A frontend on none of the service's own
/// addresses is on a node's address: a node port.
pub(super) fn frontend_type(service: Option<&Service>, vip: IpAddr) -> FrontendType {
    let spec = service.and_then(|s| s.spec.as_ref());
    let listed = |ips: Option<&Vec<String>>| {
        ips.into_iter()
            .flatten()
            .any(|ip| ip.parse::<IpAddr>() == Ok(vip))
    };
    let cluster_ip = spec.and_then(|s| s.cluster_ip.clone()).map(|ip| vec![ip]);
    let lb_ips: Vec<String> = service
        .and_then(|s| s.status.as_ref()?.load_balancer.as_ref()?.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect();
    if listed(spec.and_then(|s| s.cluster_ips.as_ref())) || listed(cluster_ip.as_ref()) {
        FrontendType::ClusterIp
    } else if listed(spec.and_then(|s| s.external_ips.as_ref())) {
        FrontendType::ExternalIp
    } else if listed(Some(&lb_ips)) {
        FrontendType::LoadBalancer
    } else {
        FrontendType::NodePort
    }
}

/// The candidates of every service port with an (IPv4) frontend, each marked selected when it
/// is one of that frontend's backends. A port served on several addresses is listed once.
fn port_endpoints(state: &ClusterState, pod_ips: &PodIps, desired: &Desired) -> Vec<PortEndpoints> {
    let slices = SliceIndex::new(state);
    let mut out = BTreeMap::new();
    for (key, frontend) in desired.frontends.iter().filter(|(k, _)| k.vip.is_ipv4()) {
        let id = (
            frontend.service.clone(),
            frontend.port_name.clone(),
            key.protocol,
        );
        if out.contains_key(&id) {
            continue;
        }
        let Some(spec) = state
            .services
            .get(&frontend.service)
            .and_then(|s| s.spec.as_ref())
        else {
            continue;
        };
        // As `model::compute`: the slices labelled for the service, plus, for a service with
        // a selector, the endpoints of the pods it selects.
        let mut candidates = endpoints::from_slices(
            &slices,
            &frontend.service,
            &frontend.port_name,
            key.protocol,
            true,
        );
        let port = spec
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == frontend.port_name);
        if let Some(port) = port
            && spec.selector.as_ref().is_some_and(|s| !s.is_empty())
        {
            candidates.extend(endpoints::from_pods(
                state,
                pod_ips,
                &frontend.service.namespace,
                spec,
                port,
                key.protocol,
                true,
            ));
        }
        candidates.sort_by_key(|e| (e.addr, !e.ready, !e.serving, e.terminating));
        candidates.dedup();
        let endpoints = candidates
            .into_iter()
            .map(|e| (e, frontend.backends.contains(&e.addr)))
            .collect();
        out.insert(id, endpoints);
    }
    out.into_iter()
        .map(
            |((service, port_name, protocol), endpoints)| PortEndpoints {
                service,
                port_name,
                protocol,
                endpoints,
            },
        )
        .collect()
}

/// Every policy of `state` (the version in force) with the `local` pods it selects, and the
/// `rejections` (the source's, one line each) of policies: on the policy they name when it is
/// in force, else in [`PolicyList::rejected`].
fn policies(state: &ClusterState, local: &BTreeSet<ObjRef>, rejections: &[String]) -> PolicyList {
    let mut list = PolicyList::default();
    for (key, policy) in &state.network_policies {
        let empty = NetworkPolicySpec::default();
        let spec = policy.spec.as_ref().unwrap_or(&empty);
        // Registered pods absent from the desired state have no labels: not selected, as in
        // the policy compiler.
        let selected_pods = ClusterState::in_namespace(&state.pods, &key.namespace)
            .filter(|(pod_key, _)| local.contains(pod_key))
            .filter(|(_, pod)| {
                let labels = pod.metadata.labels.clone().unwrap_or_default();
                selector_matches(spec.pod_selector.as_ref(), &labels)
            })
            .map(|(pod_key, _)| pod_key.name.clone())
            .collect();
        list.policies.push(PolicyState {
            policy: key.clone(),
            types: policy_types(spec),
            selected_pods,
            ingress_rules: spec.ingress.as_ref().map_or(0, Vec::len),
            egress_rules: spec.egress.as_ref().map_or(0, Vec::len),
            errors: Vec::new(),
        });
    }
    for line in rejections {
        let in_force = match rejected(line) {
            Rejected::Other => continue,
            Rejected::UnknownPolicy => None,
            Rejected::Policy(named) => list.policies.iter_mut().find(|p| p.policy == named),
        };
        match in_force {
            Some(policy) => policy.errors.push(line.clone()),
            None => list.rejected.push(line.clone()),
        }
    }
    list
}

/// The effective `policyTypes`: as written, else `Ingress`, plus `Egress` when the policy has
/// egress rules (the API's defaulting).
fn policy_types(spec: &NetworkPolicySpec) -> Vec<String> {
    if let Some(types) = spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        return types.clone();
    }
    let mut types = vec!["Ingress".to_owned()];
    if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
        types.push("Egress".to_owned());
    }
    types
}

/// What a rejection of the source is about.
#[derive(Debug, PartialEq, Eq)]
enum Rejected {
    /// A `NetworkPolicy` of this namespace and name.
    Policy(ObjRef),
    /// A `NetworkPolicy` without a namespace/name to tell (unnamed, unsupported version).
    UnknownPolicy,
    /// Another kind of object, or a whole file.
    Other,
}

/// What a rejection (`file: document 2: NetworkPolicy ns/name: field: message`, see
/// [`crate::source::ManifestError`]) is about, from the object it names.
fn rejected(line: &str) -> Rejected {
    let Some((_, rest)) = line.split_once(": NetworkPolicy ") else {
        return Rejected::Other;
    };
    let object = rest.split(':').next().unwrap_or_default();
    match object.split_once('/') {
        Some((namespace, name)) => Rejected::Policy(ObjRef::new(namespace, name)),
        None => Rejected::UnknownPolicy,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::model::Protocol;
    use crate::source::{ManifestsSource, StateSource as _};

    /// Two labelled pods and a client; `web` (`ClusterIP`, two ports, one with affinity) selects
    /// the first two, one of them not ready; `manual` has a hand-written slice with a ready
    /// and a terminating endpoint, `drain` one with only a terminating one; `dual` is
    /// dual-stack; `nameless` has no cluster IP.
    const CLUSTER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 9376}
  - {name: dns, protocol: UDP, port: 53, targetPort: 9376}
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, protocol: TCP, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: manual-1, namespace: default, labels: {kubernetes.io/service-name: manual}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
- addresses: ["192.0.2.2"]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: ["192.0.2.1"]
  conditions: {ready: true}
---
apiVersion: v1
kind: Service
metadata: {name: drain, namespace: default}
spec:
  clusterIP: 10.96.0.12
  ports: [{protocol: TCP, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: drain-1, namespace: default, labels: {kubernetes.io/service-name: drain}}
addressType: IPv4
ports: [{protocol: TCP, port: 8080}]
endpoints:
- addresses: ["192.0.2.3"]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: default}
spec:
  clusterIP: 10.96.0.13
  clusterIPs: [10.96.0.13, "fd00::13"]
  selector: {app: web}
  ports: [{protocol: TCP, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: nameless, namespace: default}
spec:
  selector: {app: web}
  ports: [{protocol: TCP, port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: default, labels: {app: web}}
spec: {containers: [{name: c, image: echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: default, labels: {app: web}}
spec: {containers: [{name: c, image: echo}]}
status:
  conditions: [{type: Ready, status: "False"}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: c, image: echo}]}
"#;

    const POLICIES: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-in, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
  - ports: [{port: 9376}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: all-out, namespace: default}
spec:
  podSelector: {}
  egress: [{}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: elsewhere, namespace: other}
spec:
  podSelector: {}
  policyTypes: [Egress]
";

    fn load(files: &[(&str, &str)]) -> (ManifestsSource, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let source = ManifestsSource::new(dir.path());
        source.reload();
        (source, dir)
    }

    /// The pods registered on the node: web-a, web-b and the client, by address.
    fn local() -> PodIps {
        ["web-a", "web-b", "client"]
            .into_iter()
            .zip(1u8..)
            .map(|(name, i)| {
                (
                    ObjRef::new("default", name),
                    vec![IpAddr::from([10, 100, 0, i])],
                )
            })
            .collect()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn services_list_the_ipv4_frontends_with_type_affinity_and_backends() {
        let (source, _dir) = load(&[("cluster.yaml", CLUSTER)]);
        let state = source.state();
        let list = services(&state, &model::compute(&state, &local()));
        let rows: Vec<_> = list
            .frontends
            .iter()
            .map(|f| {
                (
                    f.service.name.as_str(),
                    f.port_name.as_str(),
                    f.key.to_string(),
                    f.kind,
                    f.affinity_timeout_s,
                    f.backends,
                )
            })
            .collect();
        let cluster_ip = FrontendType::ClusterIp;
        assert_eq!(
            rows,
            [
                (
                    "web",
                    "dns",
                    "10.96.0.10:53/UDP".into(),
                    cluster_ip,
                    Some(60),
                    1
                ),
                (
                    "web",
                    "http",
                    "10.96.0.10:80/TCP".into(),
                    cluster_ip,
                    Some(60),
                    1
                ),
                (
                    "manual",
                    "http",
                    "10.96.0.11:80/TCP".into(),
                    cluster_ip,
                    None,
                    1
                ),
                ("drain", "", "10.96.0.12:80/TCP".into(), cluster_ip, None, 1),
                ("dual", "", "10.96.0.13:80/TCP".into(), cluster_ip, None, 1),
            ]
        );
        assert_eq!(list.skipped.len(), 1, "{:?}", list.skipped);
        assert_eq!(list.skipped[0].service, ObjRef::new("default", "nameless"));
    }

    #[test]
    fn a_frontend_type_is_which_of_the_services_addresses_it_is() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "lb", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20",
                     "clusterIPs": ["10.96.0.20"], "externalIPs": ["198.51.100.1"]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}},
        }))
        .unwrap();
        for (vip, kind) in [
            ("10.96.0.20", FrontendType::ClusterIp),
            ("198.51.100.1", FrontendType::ExternalIp),
            ("203.0.113.7", FrontendType::LoadBalancer),
            ("172.18.0.2", FrontendType::NodePort),
        ] {
            assert_eq!(
                frontend_type(Some(&service), vip.parse().unwrap()),
                kind,
                "{vip}"
            );
        }
    }

    #[test]
    fn endpoints_carry_their_conditions_and_whether_they_are_selected() {
        let (source, _dir) = load(&[("cluster.yaml", CLUSTER)]);
        let state = source.state();
        let local = local();
        let ports = port_endpoints(&state, &local, &model::compute(&state, &local));
        let rows: Vec<_> = ports
            .iter()
            .map(|p| {
                let endpoints: Vec<_> = p
                    .endpoints
                    .iter()
                    .map(|(e, selected)| (e.addr, e.ready, e.serving, e.terminating, *selected))
                    .collect();
                (
                    p.service.name.as_str(),
                    p.port_name.as_str(),
                    p.protocol,
                    endpoints,
                )
            })
            .collect();
        let (web_a, web_b) = (addr("10.100.0.1:9376"), addr("10.100.0.2:9376"));
        assert_eq!(
            rows,
            [
                (
                    "drain",
                    "",
                    Protocol::Tcp,
                    // The only endpoint is terminating but serving: kube-proxy falls back to it.
                    vec![(addr("192.0.2.3:8080"), false, true, true, true)]
                ),
                (
                    "dual",
                    "",
                    Protocol::Tcp,
                    vec![
                        (addr("10.100.0.1:80"), true, true, false, true),
                        (addr("10.100.0.2:80"), false, false, false, false),
                    ]
                ),
                (
                    "manual",
                    "http",
                    Protocol::Tcp,
                    vec![
                        (addr("192.0.2.1:8080"), true, true, false, true),
                        (addr("192.0.2.2:8080"), false, true, true, false),
                    ]
                ),
                (
                    "web",
                    "dns",
                    Protocol::Udp,
                    vec![
                        (web_a, true, true, false, true),
                        (web_b, false, false, false, false)
                    ]
                ),
                (
                    "web",
                    "http",
                    Protocol::Tcp,
                    vec![
                        (web_a, true, true, false, true),
                        (web_b, false, false, false, false)
                    ]
                ),
            ]
        );
    }

    #[test]
    fn policies_name_the_local_pods_they_select_and_their_rejections() {
        let (source, dir) = load(&[("cluster.yaml", CLUSTER), ("policies.yaml", POLICIES)]);
        // web-in is edited into an invalid version (its valid one stays in force), and a
        // policy that was never valid appears.
        let broken = POLICIES.replace("port: 9376", "port: 70000")
            + "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: never, namespace: default}
spec:
  podSelector: {}
  policyTypes: [Sideways]
";
        std::fs::write(dir.path().join("policies.yaml"), broken).unwrap();
        let state = source.reload();
        let errors: Vec<String> = source.errors().iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");

        // client and web-a are registered here, web-b is not.
        let local = BTreeSet::from([
            ObjRef::new("default", "client"),
            ObjRef::new("default", "web-a"),
        ]);
        let list = policies(&state, &local, &errors);
        let rows: Vec<_> = list
            .policies
            .iter()
            .map(|p| {
                (
                    p.policy.to_string(),
                    p.types.clone(),
                    p.selected_pods.clone(),
                    p.ingress_rules,
                    p.egress_rules,
                    p.errors.len(),
                )
            })
            .collect();
        let strings = |s: &[&str]| s.iter().map(|&s| s.to_owned()).collect::<Vec<_>>();
        assert_eq!(
            rows,
            [
                (
                    "default/all-out".into(),
                    strings(&["Ingress", "Egress"]),
                    strings(&["client", "web-a"]),
                    0,
                    1,
                    0
                ),
                (
                    "default/web-in".into(),
                    strings(&["Ingress"]),
                    strings(&["web-a"]),
                    2,
                    0,
                    1
                ),
                (
                    "other/elsewhere".into(),
                    strings(&["Egress"]),
                    vec![],
                    0,
                    0,
                    0
                ),
            ]
        );
        assert!(
            list.policies[1].errors[0].contains("spec.ingress[1].ports[0].port"),
            "{:?}",
            list.policies[1].errors
        );
        assert_eq!(list.rejected.len(), 1, "{:?}", list.rejected);
        assert!(
            list.rejected[0].contains("NetworkPolicy default/never"),
            "{:?}",
            list.rejected
        );
    }

    #[test]
    fn rejections_are_told_apart_by_the_object_they_name() {
        for (line, about) in [
            (
                "p.yaml: document 2: NetworkPolicy ns/a: spec.x: bad",
                Rejected::Policy(ObjRef::new("ns", "a")),
            ),
            (
                "p.yaml: document 1: NetworkPolicy <unnamed>: metadata.name: required",
                Rejected::UnknownPolicy,
            ),
            (
                "s.yaml: document 1: Service ns/a: spec.ports[0].port: bad",
                Rejected::Other,
            ),
            (
                "p.yaml: line 3: mapping values are not allowed",
                Rejected::Other,
            ),
        ] {
            assert_eq!(rejected(line), about, "{line}");
        }
    }

    /// A backend is named by the pod at its address, else by its slice's target reference,
    /// else by its address.
    #[test]
    fn backends_are_named_by_pod_then_target_reference_then_address() {
        let (source, _dir) = load(&[(
            "ext.yaml",
            r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec:
  clusterIP: 10.96.0.50
  ports: [{name: db, protocol: TCP, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-1, namespace: default, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{name: db, protocol: TCP, port: 5432}]
endpoints:
- addresses: ["192.0.2.7"]
  targetRef: {kind: Pod, name: db-0}
- addresses: ["10.100.0.1"]
  targetRef: {kind: Pod, name: stale}
- addresses: ["192.0.2.8"]
"#,
        )]);
        let state = source.state();
        let pod_ips = local();
        let names = BackendNames::new(&state, &pod_ips);
        let ext = ObjRef::new("default", "ext");
        for (backend, name) in [
            ("10.100.0.1:5432", "default/web-a"),
            ("192.0.2.7:5432", "default/db-0"),
            ("192.0.2.8:5432", "192.0.2.8:5432"),
        ] {
            assert_eq!(names.name(&ext, addr(backend)), name, "{backend}");
        }
    }
}
