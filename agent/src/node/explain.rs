//! The node's answer to `Explain` ([`Explainer`]): the flow's ends resolved from the registered
//! pods, its fate read from the pinned maps with the data path's own lookups
//! ([`crate::datapath::explain`]), named from the desired state (services, and the policies
//! and rules behind each verdict), with a note wherever the maps and the desired state differ.
//!
//! The state and pods are copied under the node's lock; the lookups and the model run after
//! it, off the async threads. The maps may change in between (a sync): that is a note too.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use ferrovia_common::{PROTO_TCP, PROTO_UDP, verdict};

use super::Node;
use super::inventory::{frontend_type, pod_ips};
use crate::api::ApiError;
use crate::api::explain::{
    ExplainQuery, ExplainedPath, ExplainedService, Explainer, Explanation, FlowEnd, PolicyDecision,
    PolicyRule,
};
use crate::datapath::explain::{Lookups, MapFrontend, PinnedLookups};
use crate::model::policy::{self, Dir};
use crate::model::{self, ClusterState, FrontendKey, ObjRef, PodIps, Protocol};

impl Explainer for Node {
    async fn explain(&self, query: ExplainQuery) -> Result<Explanation, ApiError> {
        let (state, local, root) = {
            let inner = self.inner.lock().await;
            let pods: Vec<_> = inner.pods.values().cloned().collect();
            (
                Arc::clone(&inner.state),
                pod_ips(&pods),
                inner.datapath.bpffs_root().to_path_buf(),
            )
        };
        let view = View::new(state, local);
        let flow = Flow {
            source: view.resolve("source", &query.source)?,
            destination: view.resolve("destination", &query.destination)?,
            protocol: query.protocol,
            port: query.port,
        };
        // A handful of map lookups, and the model: off the async threads.
        tokio::task::spawn_blocking(move || {
            let maps = PinnedLookups::open(&root).map_err(ApiError::internal)?;
            explain(&view, &maps, &flow)
        })
        .await
        .map_err(ApiError::internal)?
    }
}

/// The flow asked about, its ends resolved.
struct Flow {
    source: Ipv4Addr,
    destination: Ipv4Addr,
    protocol: Protocol,
    port: u16,
}

/// The desired state and the registered pods, with every pod the agent can name by address.
struct View {
    state: Arc<ClusterState>,
    /// The registered pods: this node's.
    local: PodIps,
    /// Pods by IPv4 address, and whether each is this node's.
    names: BTreeMap<Ipv4Addr, (ObjRef, bool)>,
}

impl View {
    fn new(state: Arc<ClusterState>, local: PodIps) -> Self {
        let names = crate::model::endpoints::pods_by_ipv4(&state, &local);
        Self {
            state,
            local,
            names,
        }
    }

    /// An end as the request gives it: an IPv4 address, or a pod of this node.
    fn resolve(&self, field: &str, given: &str) -> Result<Ipv4Addr, ApiError> {
        let invalid = |msg: String| ApiError::InvalidArgument(format!("{field}: {msg}"));
        if let Some((namespace, name)) = given.split_once('/') {
            let ips = self
                .local
                .get(&ObjRef::new(namespace, name))
                .ok_or_else(|| invalid(format!("no pod {given} is registered on this node")))?;
            return ips
                .iter()
                .find_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .ok_or_else(|| invalid(format!("pod {given} has no IPv4 address")));
        }
        match given.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => Ok(v4),
            Ok(IpAddr::V6(_)) => Err(invalid(format!(
                "{given} is an IPv6 address; the data path is IPv4 only"
            ))),
            Err(_) => Err(invalid(format!(
                "{given:?} is neither an IPv4 address nor a pod as namespace/name"
            ))),
        }
    }

    fn end(&self, address: Ipv4Addr) -> FlowEnd {
        let (pod, local) = match self.names.get(&address) {
            Some((pod, local)) => (Some(pod.clone()), *local),
            None => (None, false),
        };
        FlowEnd {
            address,
            pod,
            local,
        }
    }

    /// The pod of this node at `address`, whose policy the node enforces.
    fn local_pod(&self, address: Ipv4Addr) -> Option<&ObjRef> {
        self.names
            .get(&address)
            .and_then(|(pod, local)| local.then_some(pod))
    }
}

/// The flow's fate from `maps`, named from `view`.
fn explain(view: &View, maps: &impl Lookups, flow: &Flow) -> Result<Explanation, ApiError> {
    let proto = match flow.protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    };
    let mut notes = Vec::new();
    let frontend = maps
        .frontend(flow.destination, proto, flow.port)
        .map_err(ApiError::internal)?;
    let (service, targets) = if let Some(frontend) = frontend {
        let mut targets = frontend.backends.clone();
        targets.sort_unstable();
        targets.dedup();
        (Some(service(view, flow, &frontend, &mut notes)), targets)
    } else {
        if let Some(f) = desired_frontend(view, flow) {
            notes.push(format!(
                "the desired state has frontend {} of {}, SERVICES does not: the flow is not translated",
                frontend_key(flow),
                f.service
            ));
        }
        (None, vec![SocketAddrV4::new(flow.destination, flow.port)])
    };
    let policy_enforced = maps.enforcing().map_err(ApiError::internal)?;
    let paths = targets
        .into_iter()
        .map(|target| {
            let backend = *target.ip();
            // A pod's own address goes over its loopback: no interface of ours sees it.
            let looped = service.is_none() && backend == flow.source;
            if looped {
                notes.push(format!(
                    "{} is the source's own address: the flow goes over the pod's loopback, the data path does not see it",
                    flow.source
                ));
            }
            let judged = policy_enforced && !looped;
            let mut decide = |subject: Option<&ObjRef>, dir, at, peer| {
                subject
                    .filter(|_| judged)
                    .map(|pod| {
                        let point = Point { pod, dir, at, peer };
                        decision(view, maps, &point, proto, target.port(), &mut notes)
                    })
                    .transpose()
            };
            let egress = decide(
                view.local_pod(flow.source),
                Dir::Egress,
                flow.source,
                backend,
            )?;
            let ingress = decide(view.local_pod(backend), Dir::Ingress, backend, flow.source)?;
            Ok(ExplainedPath {
                backend: view.end(backend),
                port: target.port(),
                egress,
                ingress,
            })
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(Explanation {
        source: view.end(flow.source),
        destination: view.end(flow.destination),
        protocol: flow.protocol,
        port: flow.port,
        service,
        paths,
        policy_enforced,
        notes,
    })
}

fn frontend_key(flow: &Flow) -> FrontendKey {
    FrontendKey {
        vip: flow.destination.into(),
        port: flow.port,
        protocol: flow.protocol,
    }
}

/// The desired state's frontend for the flow's destination, if any.
fn desired_frontend(view: &View, flow: &Flow) -> Option<model::Frontend> {
    let desired = model::compute(&view.state, &view.local);
    desired.frontends.get(&frontend_key(flow)).cloned()
}

/// The frontend `SERVICES` holds, named from the desired state; notes where the two differ.
fn service(
    view: &View,
    flow: &Flow,
    frontend: &MapFrontend,
    notes: &mut Vec<String>,
) -> ExplainedService {
    let key = frontend_key(flow);
    notes.extend(
        frontend
            .broken
            .iter()
            .map(|b| format!("frontend {key}: {b}")),
    );
    let desired = desired_frontend(view, flow);
    match &desired {
        None => notes.push(format!(
            "SERVICES has frontend {key} (id {}), the desired state does not",
            frontend.service_id
        )),
        Some(f) => {
            let mut want: Vec<SocketAddrV4> = f
                .backends
                .iter()
                .filter_map(|b| match b {
                    std::net::SocketAddr::V4(v4) => Some(*v4),
                    std::net::SocketAddr::V6(_) => None,
                })
                .collect();
            want.sort_unstable();
            let mut have = frontend.backends.clone();
            have.sort_unstable();
            if want != have {
                notes.push(format!(
                    "frontend {key}: the maps have backends {have:?}, the desired state {want:?}"
                ));
            }
        }
    }
    ExplainedService {
        kind: desired.as_ref().map(|f| {
            let svc = view.state.services.get(&f.service).map(|s| &**s);
            frontend_type(svc, key.vip)
        }),
        port_name: desired
            .as_ref()
            .map(|f| f.port_name.clone())
            .unwrap_or_default(),
        service: desired.map(|f| f.service),
        service_id: frontend.service_id,
        // Slot 0's count is the slots': no slot at all is what the data path rejects.
        rejects: frontend.backends.is_empty() && frontend.broken.is_empty(),
        affinity_timeout_s: frontend.affinity_timeout_s,
    }
}

/// A policy point: pod `pod` at address `at` judging direction `dir`, `peer` the other end.
struct Point<'a> {
    pod: &'a ObjRef,
    dir: Dir,
    at: Ipv4Addr,
    peer: Ipv4Addr,
}

/// The maps' verdict at `point`, attributed to policies and rules from the desired state; a
/// note when the desired state judges otherwise.
fn decision(
    view: &View,
    maps: &impl Lookups,
    point: &Point<'_>,
    proto: u8,
    port: u16,
    notes: &mut Vec<String>,
) -> Result<PolicyDecision, ApiError> {
    let Point { pod, dir, at, peer } = *point;
    let reason = maps
        .verdict(dir, at, peer, proto, port)
        .map_err(ApiError::internal)?;
    let model = policy::judge(&view.state, &view.local, pod, dir, peer, proto, port);
    if model.reason != reason {
        let (what, towards) = match dir {
            Dir::Egress => ("egress", "to"),
            Dir::Ingress => ("ingress", "from"),
        };
        notes.push(format!(
            "{what} of {pod} {towards} {peer}, port {port}: the maps say {}, the desired state {} (the maps' verdict is the one enforced)",
            verdict::name(reason),
            verdict::name(model.reason)
        ));
    }
    let rules = if reason == verdict::ALLOW_NOT_ISOLATED {
        Vec::new()
    } else if verdict::allows(reason) {
        model
            .allowing
            .into_iter()
            .map(|r| PolicyRule {
                policy: r.policy,
                rule: Some(r.index),
            })
            .collect()
    } else {
        model
            .isolating
            .into_iter()
            .map(|policy| PolicyRule { policy, rule: None })
            .collect()
    };
    Ok(PolicyDecision {
        pod: pod.clone(),
        reason,
        rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ManifestsSource;

    /// `web` (affinity 600 s) selects web-a and web-b of this node and `remote` of another
    /// (its status gives its address); `empty` selects nothing. `web-in` lets the client into
    /// the web pods on 9376 only; `client-out` lets the client reach the web pods.
    const CLUSTER: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 9376}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.12
  selector: {app: nothing}
  ports: [{protocol: UDP, port: 53}]
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
---
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: default, labels: {app: web}}
spec: {containers: [{name: c, image: echo}]}
status: {podIP: 10.200.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: c, image: echo}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-in, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 9376}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-out, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: web}}}]
";

    const WEB_A: [u8; 4] = [10, 100, 0, 1];
    const WEB_B: [u8; 4] = [10, 100, 0, 2];
    const CLIENT: [u8; 4] = [10, 100, 0, 3];
    const REMOTE: [u8; 4] = [10, 200, 0, 5];
    const VIP: [u8; 4] = [10, 96, 0, 10];
    const EMPTY_VIP: [u8; 4] = [10, 96, 0, 12];

    fn view() -> View {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).unwrap();
        let source = ManifestsSource::new(dir.path());
        source.reload();
        let local = [("web-a", WEB_A), ("web-b", WEB_B), ("client", CLIENT)]
            .into_iter()
            .map(|(name, ip)| (ObjRef::new("default", name), vec![IpAddr::from(ip)]))
            .collect();
        View::new(source.state(), local)
    }

    /// The maps as a table: `web` and `empty` as the agent writes them, verdicts as the
    /// desired state judges unless `verdict` says otherwise.
    struct Maps<'a> {
        view: &'a View,
        frontends: BTreeMap<Ipv4Addr, MapFrontend>,
        enforcing: bool,
        verdict: Option<u8>,
    }

    impl<'a> Maps<'a> {
        fn new(view: &'a View) -> Self {
            let web = MapFrontend {
                service_id: 3,
                affinity_timeout_s: Some(600),
                // Slot order is not address order.
                backends: [REMOTE, WEB_B, WEB_A]
                    .map(|ip| SocketAddrV4::new(ip.into(), 9376))
                    .to_vec(),
                broken: Vec::new(),
            };
            let empty = MapFrontend {
                service_id: 4,
                affinity_timeout_s: None,
                backends: Vec::new(),
                broken: Vec::new(),
            };
            Self {
                view,
                frontends: BTreeMap::from([(VIP.into(), web), (EMPTY_VIP.into(), empty)]),
                enforcing: true,
                verdict: None,
            }
        }
    }

    impl Lookups for Maps<'_> {
        fn frontend(
            &self,
            vip: Ipv4Addr,
            proto: u8,
            port: u16,
        ) -> anyhow::Result<Option<MapFrontend>> {
            let listed = matches!((proto, port), (PROTO_TCP, 80) | (PROTO_UDP, 53));
            Ok(self.frontends.get(&vip).filter(|_| listed).cloned())
        }

        fn enforcing(&self) -> anyhow::Result<bool> {
            Ok(self.enforcing)
        }

        fn verdict(
            &self,
            dir: Dir,
            subject: Ipv4Addr,
            peer: Ipv4Addr,
            proto: u8,
            port: u16,
        ) -> anyhow::Result<u8> {
            let pod = self.view.local_pod(subject).expect("a local subject");
            let v = self.view;
            Ok(self.verdict.unwrap_or_else(|| {
                policy::judge(&v.state, &v.local, pod, dir, peer, proto, port).reason
            }))
        }
    }

    fn flow(source: [u8; 4], destination: [u8; 4], protocol: Protocol, port: u16) -> Flow {
        Flow {
            source: source.into(),
            destination: destination.into(),
            protocol,
            port,
        }
    }

    /// A path as `(backend pod, egress, ingress, allowed)`, each decision as `reason rules`.
    fn summary(p: &ExplainedPath) -> (String, String, String, bool) {
        let decision = |d: &Option<PolicyDecision>| {
            d.as_ref().map_or("-".to_owned(), |d| {
                let rules: Vec<String> = d
                    .rules
                    .iter()
                    .map(|r| match r.rule {
                        Some(i) => format!("{}[{i}]", r.policy),
                        None => r.policy.to_string(),
                    })
                    .collect();
                format!("{} {}", verdict::name(d.reason), rules.join(","))
            })
        };
        (
            p.backend
                .pod
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            decision(&p.egress),
            decision(&p.ingress),
            p.allowed(),
        )
    }

    fn row(
        pod: &str,
        egress: &str,
        ingress: &str,
        allowed: bool,
    ) -> (String, String, String, bool) {
        (pod.into(), egress.into(), ingress.into(), allowed)
    }

    #[test]
    fn through_a_service_every_backend_is_judged_where_it_lives() {
        let view = view();
        let maps = Maps::new(&view);
        let e = explain(&view, &maps, &flow(CLIENT, VIP, Protocol::Tcp, 80)).unwrap();
        assert_eq!(
            e.service,
            Some(ExplainedService {
                service: Some(ObjRef::new("default", "web")),
                port_name: "http".into(),
                kind: Some(crate::api::FrontendType::ClusterIp),
                service_id: 3,
                rejects: false,
                affinity_timeout_s: Some(600),
            })
        );
        let out = "allowed-by-rule default/client-out[0]";
        let inward = "allowed-by-rule default/web-in[0]";
        assert_eq!(
            e.paths.iter().map(summary).collect::<Vec<_>>(),
            [
                row("default/web-a", out, inward, true),
                row("default/web-b", out, inward, true),
                // Another node's pod: its own node judges its ingress.
                row("default/remote", out, "-", true),
            ]
        );
        assert!(e.paths.iter().all(|p| p.port == 9376));
        assert_eq!(
            (e.source.pod.clone(), e.source.local),
            (Some(ObjRef::new("default", "client")), true)
        );
        assert!(!e.paths[2].backend.local);
        assert_eq!(e.destination.pod, None);
        assert!(e.policy_enforced);
        assert!(e.notes.is_empty(), "{:?}", e.notes);
    }

    #[test]
    fn pod_to_pod_is_one_path_judged_at_both_ends() {
        let view = view();
        let maps = Maps::new(&view);
        // web-in admits the client on 9376 only.
        let e = explain(&view, &maps, &flow(CLIENT, WEB_A, Protocol::Tcp, 80)).unwrap();
        assert_eq!(e.service, None);
        assert_eq!(
            e.paths.iter().map(summary).collect::<Vec<_>>(),
            [row(
                "default/web-a",
                "allowed-by-rule default/client-out[0]",
                "denied-by-port default/web-in",
                false
            )]
        );
        assert_eq!(e.destination.pod, Some(ObjRef::new("default", "web-a")));
        // From web-a (not isolated for egress) to the client (not isolated for ingress).
        let e = explain(&view, &maps, &flow(WEB_A, CLIENT, Protocol::Udp, 53)).unwrap();
        assert_eq!(
            e.paths.iter().map(summary).collect::<Vec<_>>(),
            [row(
                "default/client",
                "allowed-not-isolated ",
                "allowed-not-isolated ",
                true
            )]
        );
        // From an address of no pod: only the local end judges.
        let e = explain(
            &view,
            &maps,
            &flow([192, 0, 2, 1], WEB_B, Protocol::Tcp, 9376),
        )
        .unwrap();
        assert_eq!(
            e.paths.iter().map(summary).collect::<Vec<_>>(),
            [row(
                "default/web-b",
                "-",
                "denied-by-default default/web-in",
                false
            )]
        );
        assert_eq!((e.source.pod.clone(), e.source.local), (None, false));
    }

    #[test]
    fn a_service_without_endpoints_rejects_and_has_no_path() {
        let view = view();
        let maps = Maps::new(&view);
        let e = explain(&view, &maps, &flow(CLIENT, EMPTY_VIP, Protocol::Udp, 53)).unwrap();
        let service = e.service.expect("a frontend");
        assert!(service.rejects);
        assert_eq!(service.service, Some(ObjRef::new("default", "empty")));
        assert!(e.paths.is_empty());
        assert!(e.notes.is_empty(), "{:?}", e.notes);
    }

    #[test]
    fn without_enforcement_or_over_loopback_nothing_is_judged() {
        let view = view();
        let mut maps = Maps::new(&view);
        maps.enforcing = false;
        let e = explain(&view, &maps, &flow(CLIENT, WEB_A, Protocol::Tcp, 80)).unwrap();
        assert!(!e.policy_enforced);
        assert_eq!(
            e.paths.iter().map(summary).collect::<Vec<_>>(),
            [row("default/web-a", "-", "-", true)]
        );
        let maps = Maps::new(&view);
        let e = explain(&view, &maps, &flow(CLIENT, CLIENT, Protocol::Tcp, 80)).unwrap();
        assert_eq!(
            e.paths.iter().map(summary).collect::<Vec<_>>(),
            [row("default/client", "-", "-", true)]
        );
        assert!(e.notes[0].contains("loopback"), "{:?}", e.notes);
    }

    #[test]
    fn where_the_maps_and_the_desired_state_differ_the_maps_answer_with_a_note() {
        let view = view();
        let mut maps = Maps::new(&view);
        maps.verdict = Some(verdict::DENY_NO_RULE);
        let e = explain(&view, &maps, &flow(CLIENT, WEB_A, Protocol::Tcp, 9376)).unwrap();
        assert_eq!(
            e.paths.iter().map(summary).collect::<Vec<_>>(),
            [row(
                "default/web-a",
                "denied-by-default default/client-out",
                "denied-by-default default/web-in",
                false
            )]
        );
        assert_eq!(e.notes.len(), 2, "{:?}", e.notes);
        assert!(
            e.notes[1].starts_with("ingress of default/web-a from 10.100.0.3, port 9376: the maps say denied-by-default, the desired state allowed-by-rule"),
            "{:?}",
            e.notes
        );

        // A frontend only the desired state has, one only the maps have, other backends.
        let mut maps = Maps::new(&view);
        let web = maps.frontends.remove(&VIP.into()).unwrap();
        let e = explain(&view, &maps, &flow(CLIENT, VIP, Protocol::Tcp, 80)).unwrap();
        assert_eq!(e.service, None);
        assert_eq!(e.paths.len(), 1);
        assert!(e.notes[0].contains("SERVICES does not"), "{:?}", e.notes);
        let stray = MapFrontend {
            backends: vec![SocketAddrV4::new(WEB_A.into(), 9376)],
            broken: vec!["slot 2: no entry".into()],
            ..web
        };
        maps.frontends.insert(VIP.into(), stray.clone());
        maps.frontends.insert([10, 96, 0, 99].into(), stray);
        let e = explain(&view, &maps, &flow(CLIENT, VIP, Protocol::Tcp, 80)).unwrap();
        assert_eq!(e.paths.len(), 1);
        assert_eq!(
            e.notes,
            [
                "frontend 10.96.0.10:80/TCP: slot 2: no entry",
                "frontend 10.96.0.10:80/TCP: the maps have backends [10.100.0.1:9376], the desired state [10.100.0.1:9376, 10.100.0.2:9376, 10.200.0.5:9376]",
            ]
        );
        let e = explain(
            &view,
            &maps,
            &flow(CLIENT, [10, 96, 0, 99], Protocol::Tcp, 80),
        )
        .unwrap();
        let service = e.service.expect("the maps' frontend");
        assert_eq!((service.service, service.kind), (None, None));
        assert!(
            e.notes[1].contains("the desired state does not"),
            "{:?}",
            e.notes
        );
    }

    #[test]
    fn ends_are_addresses_or_pods_of_this_node() {
        let view = view();
        assert_eq!(view.resolve("source", "default/client"), Ok(CLIENT.into()));
        assert_eq!(
            view.resolve("source", " 10.0.0.7"),
            Err(ApiError::InvalidArgument(
                "source: \" 10.0.0.7\" is neither an IPv4 address nor a pod as namespace/name"
                    .into()
            ))
        );
        for (given, why) in [
            (
                "default/remote",
                "no pod default/remote is registered on this node",
            ),
            (
                "default",
                "\"default\" is neither an IPv4 address nor a pod as namespace/name",
            ),
            (
                "fd00::1",
                "fd00::1 is an IPv6 address; the data path is IPv4 only",
            ),
        ] {
            assert_eq!(
                view.resolve("destination", given),
                Err(ApiError::InvalidArgument(format!("destination: {why}")))
            );
        }
        // Names: this node's pods, and another's by its status.
        assert_eq!(
            view.end(REMOTE.into()).pod,
            Some(ObjRef::new("default", "remote"))
        );
        assert!(!view.end(REMOTE.into()).local && view.end(WEB_A.into()).local);
    }
}
