//! The [`PodRegistry`] test double and a server harness, shared by the API and CNI tests.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::explain::{
    ExplainQuery, ExplainedPath, ExplainedService, Explainer, Explanation, FlowEnd, PolicyDecision,
    PolicyRule,
};
use super::inventory::{
    FrontendType, Inventory, MapList, PodState, PolicyList, PolicyState, PortEndpoints,
    ServiceFrontend, ServiceList,
};
use super::{AgentStatus, ApiError, PodRegistration, PodRegistry, ProgramState};
use crate::datapath::TcMode;
use crate::datapath::inventory::{MapStats, PinnedMap};
use crate::model::endpoints::Endpoint;
use crate::model::{FrontendKey, ObjRef, Protocol, Skipped};
use ferrovia_common::verdict;

/// Keeps registrations in a map; a pod whose `name` is `"unattached"` registers but fails
/// `check`, to exercise `NotReady`.
pub(crate) struct TestRegistry {
    pub(crate) pods: Mutex<HashMap<String, PodRegistration>>,
    /// The flow events `Flows` serves (events published by the test itself).
    pub(crate) flows: Arc<crate::flows::FlowHub>,
}

impl Default for TestRegistry {
    fn default() -> Self {
        Self {
            pods: Mutex::default(),
            flows: crate::flows::FlowHub::new(16),
        }
    }
}

impl super::FlowFeed for TestRegistry {
    async fn flow_hub(&self) -> Option<Arc<crate::flows::FlowHub>> {
        Some(Arc::clone(&self.flows))
    }
}

impl PodRegistry for TestRegistry {
    async fn register(&self, pod: PodRegistration) -> Result<(), ApiError> {
        self.pods
            .lock()
            .unwrap()
            .insert(pod.container_id.clone(), pod);
        Ok(())
    }

    async fn unregister(&self, container_id: &str) -> Result<(), ApiError> {
        self.pods.lock().unwrap().remove(container_id);
        Ok(())
    }

    async fn check(&self, container_id: &str) -> Result<(), ApiError> {
        match self.pods.lock().unwrap().get(container_id) {
            None => Err(ApiError::NotFound(format!(
                "no pod with container id {container_id}"
            ))),
            Some(pod) if pod.name == "unattached" => Err(ApiError::NotReady(format!(
                "programs not attached on {}",
                pod.host_ifname
            ))),
            Some(_) => Ok(()),
        }
    }

    async fn sync(&self) -> Result<Vec<String>, ApiError> {
        Ok(vec!["manifests/bad.yaml: an example rejection".into()])
    }

    async fn status(&self) -> AgentStatus {
        AgentStatus {
            node_name: "node-a".into(),
            pods: self.pods.lock().unwrap().len(),
            frontends: 3,
            socket_lb: true,
            programs: vec![
                ProgramState {
                    name: "sock4_connect".into(),
                    attach_point: Some("/sys/fs/cgroup".into()),
                },
                ProgramState {
                    name: "from_pod".into(),
                    attach_point: None,
                },
            ],
            degraded: vec!["sock4_connect: an example degradation".into()],
        }
    }
}

/// One of each kind of answer, fixed; the pods are the registered ones, isolated for ingress.
impl Inventory for TestRegistry {
    async fn services(&self) -> ServiceList {
        ServiceList {
            frontends: vec![ServiceFrontend {
                key: FrontendKey {
                    vip: [10, 96, 0, 10].into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                service: ObjRef::new("default", "web"),
                port_name: "http".into(),
                kind: FrontendType::ClusterIp,
                affinity_timeout_s: Some(60),
                backends: 2,
            }],
            skipped: vec![Skipped {
                service: ObjRef::new("default", "headless-ish"),
                port_name: None,
                reason: "no spec.clusterIP".into(),
            }],
        }
    }

    async fn endpoints(&self) -> Vec<PortEndpoints> {
        let endpoint = |addr: &str, ready, terminating| Endpoint {
            addr: addr.parse().unwrap(),
            ready,
            serving: true,
            terminating,
        };
        vec![PortEndpoints {
            service: ObjRef::new("default", "web"),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
            endpoints: vec![
                (endpoint("10.250.0.2:9376", true, false), true),
                (endpoint("10.250.0.3:9376", false, true), false),
            ],
        }]
    }

    async fn policies(&self) -> PolicyList {
        PolicyList {
            policies: vec![PolicyState {
                policy: ObjRef::new("default", "web-in"),
                types: vec!["Ingress".into()],
                selected_pods: vec!["web-0".into()],
                ingress_rules: 1,
                egress_rules: 0,
                errors: vec![],
            }],
            rejected: vec![
                "policies.yaml: document 2: NetworkPolicy default/bad: spec: an example".into(),
            ],
        }
    }

    async fn pods(&self) -> Vec<PodState> {
        let mut pods: Vec<PodState> = self
            .pods
            .lock()
            .unwrap()
            .values()
            .map(|pod| PodState {
                pod: pod.clone(),
                from_pod: TcMode::Tcx,
                to_pod: TcMode::Netlink {
                    priority: 1,
                    handle: 7,
                },
                ingress_isolated: true,
                egress_isolated: false,
                counters: crate::metrics::PodMetrics::default(),
            })
            .collect();
        pods.sort_by(|a, b| a.pod.container_id.cmp(&b.pod.container_id));
        pods
    }

    async fn maps(&self) -> Result<MapList, ApiError> {
        Ok(MapList {
            bpffs_root: "/sys/fs/bpf/test".into(),
            maps: vec![
                PinnedMap {
                    name: "SERVICES",
                    pin: "/sys/fs/bpf/test/SERVICES".into(),
                    stats: Ok(MapStats {
                        id: 42,
                        kind: "hash".into(),
                        key_size: 24,
                        value_size: 12,
                        max_entries: 1024,
                        entries: 256,
                    }),
                },
                PinnedMap {
                    name: "BACKENDS",
                    pin: "/sys/fs/bpf/test/BACKENDS".into(),
                    stats: Err("not pinned".into()),
                },
            ],
        })
    }
}

/// A fixed answer for any flow: the source is the client pod of this node; a destination
/// `10.96.0.10` is the `web` frontend with two backends, one denied by ingress policy, any other
/// the destination itself; `"no/such"` as an end is an unknown pod.
impl Explainer for TestRegistry {
    async fn explain(&self, query: ExplainQuery) -> Result<Explanation, ApiError> {
        for (field, end) in [
            ("source", &query.source),
            ("destination", &query.destination),
        ] {
            if end == "no/such" {
                return Err(ApiError::InvalidArgument(format!(
                    "{field}: no pod {end} is registered on this node"
                )));
            }
        }
        let pod = |name: &str| Some(ObjRef::new("default", name));
        let end = |address: [u8; 4], name: &str| FlowEnd {
            address: address.into(),
            pod: pod(name),
            local: true,
        };
        let decision = |name: &str, reason, rules: Vec<PolicyRule>| PolicyDecision {
            pod: ObjRef::new("default", name),
            reason,
            rules,
        };
        let rule = |name: &str, rule| PolicyRule {
            policy: ObjRef::new("default", name),
            rule,
        };
        let egress = decision(
            "client",
            verdict::ALLOW_RULE,
            vec![rule("client-out", Some(0))],
        );
        let web = query.destination == "10.96.0.10";
        let paths = if web {
            vec![
                ExplainedPath {
                    backend: end([10, 250, 0, 2], "web-a"),
                    port: 9376,
                    egress: Some(egress.clone()),
                    ingress: Some(decision(
                        "web-a",
                        verdict::ALLOW_RULE,
                        vec![rule("web-in", Some(1))],
                    )),
                },
                ExplainedPath {
                    backend: end([10, 250, 0, 3], "web-b"),
                    port: 9376,
                    egress: Some(egress),
                    ingress: Some(decision(
                        "web-b",
                        verdict::DENY_PORT,
                        vec![rule("web-in", None)],
                    )),
                },
            ]
        } else {
            vec![ExplainedPath {
                backend: FlowEnd {
                    address: [192, 0, 2, 1].into(),
                    pod: None,
                    local: false,
                },
                port: query.port,
                egress: Some(egress),
                ingress: None,
            }]
        };
        Ok(Explanation {
            source: end([10, 250, 0, 9], "client"),
            destination: FlowEnd {
                address: if web { [10, 96, 0, 10] } else { [192, 0, 2, 1] }.into(),
                pod: None,
                local: false,
            },
            protocol: query.protocol,
            port: query.port,
            service: web.then(|| ExplainedService {
                service: pod("web"),
                port_name: "http".into(),
                kind: Some(FrontendType::ClusterIp),
                service_id: 7,
                rejects: false,
                affinity_timeout_s: Some(60),
            }),
            paths,
            policy_enforced: true,
            notes: vec!["an example note".into()],
        })
    }
}

/// A [`TestRegistry`] served on a socket in its own temp dir, until [`TestServer::stop`].
pub(crate) struct TestServer {
    pub(crate) registry: Arc<TestRegistry>,
    pub(crate) socket: PathBuf,
    // Held so the directory outlives the server.
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub(crate) async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("run/agent.sock");
        let registry = Arc::new(TestRegistry::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let (socket, registry) = (socket.clone(), Arc::clone(&registry));
            async move {
                super::serve(&socket, registry, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        // `serve` binds before its first await point that waits on clients; poll until the
        // socket file shows up rather than sleeping a guessed time.
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            socket.exists(),
            "server did not create {}",
            socket.display()
        );
        Self {
            registry,
            socket,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server and returns what `serve` returned.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task
            .take()
            .unwrap()
            .await
            .expect("serve task panicked")
    }
}
