//! The cluster every policy suite runs on: one node with the real agent, namespaces `x`, `y`,
//! `z` and pods `a`, `b`, `c` in each, every pod serving TCP and UDP on ports 80 and 81 with
//! cyclonus' container port names (`serve-80-tcp`, ...).
//!
//! Base labels: namespaces `ns=<name>` and `kubernetes.io/metadata.name=<name>` (as the API
//! server adds), `env` prod (x) / dev (y) / none (z); pods `pod=<name>`, `tier` web (a) / db
//! (b) / none (c). Pods `a` and `b` also name a TCP port `web`: 80 on `a`, 81 on `b`, so a named
//! port resolves differently per destination.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::eval;
use super::matrix::{self, Case, LEGEND, Outcome};
use super::spec::{
    Cidr, ContainerPort, Labels, Namespace, PodInfo, Policy, PortRef, Protocol, Service, World,
    labels, to_yaml,
};
use crate::{Agent, AgentOpts, Node, Pod, Proto, Server};

/// The namespaces, in row order.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// The pods of each namespace, in row order.
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// The ports every pod serves, on both protocols.
pub const PORTS: [u16; 2] = [80, 81];
/// The probed protocols.
pub const PROTOS: [Proto; 2] = [Proto::Tcp, Proto::Udp];

/// What a scenario writes to the manifests: namespaces and pods with their labels, policies,
/// services. Pod IPs come from the cluster (and are not written: the CNI plugin reports them).
#[derive(Clone, Debug)]
pub struct Setup {
    pub world: World,
    pub policies: Vec<Policy>,
    pub services: Vec<Service>,
}

impl Setup {
    /// `world` with no policy and no service.
    #[must_use]
    pub fn new(world: &World) -> Self {
        Self {
            world: world.clone(),
            policies: Vec::new(),
            services: Vec::new(),
        }
    }

    /// Adds a policy.
    #[must_use]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policies.push(policy);
        self
    }

    /// Adds a service.
    #[must_use]
    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    /// The policies' YAML (as written to the manifests).
    #[must_use]
    pub fn policies_yaml(&self) -> String {
        to_yaml(
            &self
                .policies
                .iter()
                .map(Policy::to_json)
                .collect::<Vec<_>>(),
        )
    }

    /// The services' YAML.
    #[must_use]
    pub fn services_yaml(&self) -> String {
        to_yaml(
            &self
                .services
                .iter()
                .map(Service::to_json)
                .collect::<Vec<_>>(),
        )
    }

    /// Labels of every namespace and pod, one line each (what selectors saw).
    #[must_use]
    pub fn labels_summary(&self) -> String {
        let show = |l: &Labels| {
            l.iter()
                .filter(|(k, _)| *k != "kubernetes.io/metadata.name")
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut out = String::new();
        for n in &self.world.namespaces {
            let _ = writeln!(out, "  namespace {}: {}", n.name, show(&n.labels));
        }
        for p in &self.world.pods {
            let _ = writeln!(out, "  pod {} ({}): {}", p.id(), p.ip, show(&p.labels));
        }
        out
    }

    /// The single pod a service's selector picks (the tests use one-backend services so the
    /// expected verdict of a VIP probe is that backend's).
    fn backend(&self, svc: &Service) -> Result<usize> {
        let picked: Vec<usize> = self
            .world
            .pods
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.namespace == svc.namespace
                    && svc.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            })
            .map(|(i, _)| i)
            .collect();
        match picked[..] {
            [one] => Ok(one),
            _ => bail!(
                "service {} selects {} pods, not one",
                svc.name,
                picked.len()
            ),
        }
    }

    /// Every probe of the scenario and its expected verdict: each pod to each other pod on
    /// both protocols and ports, then each pod (the backend too: hairpin) to each service port.
    pub fn cases(&self) -> Result<Vec<Case>> {
        let w = &self.world;
        let mut cases = Vec::new();
        for (ci, client) in w.pods.iter().enumerate() {
            for (si, server) in w.pods.iter().enumerate() {
                // A pod's own IP goes over its loopback: never policed, not probed.
                if ci == si {
                    continue;
                }
                for proto in PROTOS {
                    for port in PORTS {
                        cases.push(Case {
                            client: ci,
                            column: server.id(),
                            table: (proto, port),
                            to: SocketAddr::from((server.ip, port)),
                            proto,
                            expected: eval::allowed(
                                w,
                                &self.policies,
                                client,
                                server,
                                proto.into(),
                                port,
                            ),
                        });
                    }
                }
            }
        }
        for svc in &self.services {
            let backend = &w.pods[self.backend(svc)?];
            for sp in &svc.ports {
                let proto = match sp.protocol {
                    Protocol::Tcp => Proto::Tcp,
                    Protocol::Udp => Proto::Udp,
                    Protocol::Sctp => continue,
                };
                let target = match &sp.target {
                    PortRef::Number(n) => *n,
                    PortRef::Name(name) => {
                        backend
                            .ports
                            .iter()
                            .find(|cp| cp.name == *name && cp.protocol == sp.protocol)
                            .with_context(|| format!("{} has no port {name}", backend.id()))?
                            .port
                    }
                };
                for (ci, client) in w.pods.iter().enumerate() {
                    cases.push(Case {
                        client: ci,
                        column: format!("vip:{}", sp.port),
                        table: (proto, target),
                        to: SocketAddr::from((svc.cluster_ip, sp.port)),
                        proto,
                        // Judged on the backend it lands on, like any connection to it.
                        expected: eval::allowed(
                            w,
                            &self.policies,
                            client,
                            backend,
                            sp.protocol,
                            target,
                        ),
                    });
                }
            }
        }
        Ok(cases)
    }
}

/// The x/y/z cluster (see the module docs). Dropping it stops everything and removes the node.
pub struct PolicyCluster {
    _servers: Vec<Server>,
    /// Same order as `world.pods`.
    pub pods: Vec<Pod>,
    pub agent: Agent,
    pub node: Node,
    /// The base world: base labels and the pods' IPs.
    pub world: World,
}

impl PolicyCluster {
    /// Starts the node and agent, creates the nine pods through the CNI chain, starts their
    /// servers and writes the base manifests (no policy).
    pub fn new(opts: AgentOpts) -> Result<Self> {
        let started = Instant::now();
        let node = Node::new()?;
        let agent = node.start_agent(opts)?;
        let mut pods = Vec::new();
        let mut infos = Vec::new();
        for ns in NAMESPACES {
            for name in PODS {
                let pod = Pod::add_namespaced(&node, ns, name)?;
                infos.push(base_pod(ns, name, pod.ip));
                pods.push(pod);
            }
        }
        let servers = pods
            .iter()
            .map(|p| p.serve(&["tcp:80", "tcp:81", "udp:80", "udp:81"]))
            .collect::<Result<Vec<_>>>()?;
        let namespaces = NAMESPACES
            .iter()
            .map(|ns| {
                let mut l = labels(&[("ns", ns), ("kubernetes.io/metadata.name", ns)]);
                let env = match *ns {
                    "x" => Some("prod"),
                    "y" => Some("dev"),
                    _ => None,
                };
                l.extend(env.map(|e| ("env".to_owned(), e.to_owned())));
                Namespace {
                    name: (*ns).to_owned(),
                    labels: l,
                }
            })
            .collect();
        let cluster = Self {
            _servers: servers,
            pods,
            agent,
            node,
            world: World {
                namespaces,
                pods: infos,
            },
        };
        let rejected = cluster.apply(&Setup::new(&cluster.world))?;
        if !rejected.is_empty() {
            bail!("the agent rejected the base manifests: {rejected:#?}");
        }
        eprintln!(
            "policy cluster {} up in {:.1?} (pod subnet {})",
            cluster.node.id(),
            started.elapsed(),
            cluster.node.pod_subnet()
        );
        Ok(cluster)
    }

    /// The pods' subnet.
    #[must_use]
    pub fn subnet(&self) -> Cidr {
        self.node
            .pod_subnet()
            .parse()
            .expect("the node's subnet is a CIDR")
    }

    /// Pod `ns/name`.
    #[must_use]
    pub fn pod(&self, id: &str) -> &Pod {
        &self.pods[self.world.index(id)]
    }

    /// Writes the scenario's manifests (namespaces and pods, policies, services), each kind to
    /// its own file.
    pub fn write(&self, setup: &Setup) -> Result<()> {
        let none = "# none\n".to_owned();
        let or_none = |s: String| if s.is_empty() { none.clone() } else { s };
        self.node
            .write_manifest("cluster.yaml", &to_yaml(&setup.world.to_json()))?;
        self.node
            .write_manifest("policies.yaml", &or_none(setup.policies_yaml()))?;
        self.node
            .write_manifest("services.yaml", &or_none(setup.services_yaml()))
    }

    /// Has the agent re-read its manifests; returns its rejections once the maps reflect them.
    pub fn sync(&self) -> Result<Vec<String>> {
        self.agent.sync()
    }

    /// Writes the scenario and syncs; returns the agent's rejections.
    pub fn apply(&self, setup: &Setup) -> Result<Vec<String>> {
        self.write(setup)?;
        self.sync()
    }

    /// Probes the scenario's matrix as it stands (no write, no sync).
    pub fn probe(&self, setup: &Setup) -> Result<Outcome> {
        let rows = setup.world.pods.iter().map(PodInfo::id).collect();
        let pods: Vec<&Pod> = self.pods.iter().collect();
        matrix::run(&pods, rows, setup.cases()?)
    }

    /// Applies the scenario, probes it and compares: `None` when every cell agrees and the
    /// agent rejected nothing, else the failure report.
    pub fn check(&self, name: &str, setup: &Setup) -> Result<Option<String>> {
        let rejected = self.apply(setup)?;
        self.verify(name, setup, &rejected)
    }

    /// Probes the scenario as applied and compares; `rejected` (the agent's rejections from
    /// the sync) counts as a failure when not empty.
    pub fn verify(&self, name: &str, setup: &Setup, rejected: &[String]) -> Result<Option<String>> {
        let started = Instant::now();
        let outcome = self.probe(setup)?;
        let wrong = outcome.mismatches().len();
        eprintln!(
            "  {name}: {} probes ({} expected denied, {} re-probed), {wrong} wrong, {:.1?}",
            outcome.cases.len(),
            outcome.cases.iter().filter(|c| !c.expected).count(),
            outcome.observed.iter().filter(|o| o.rechecked).count(),
            started.elapsed()
        );
        if wrong == 0 && rejected.is_empty() {
            return Ok(None);
        }
        Ok(Some(report(name, setup, &outcome, rejected)))
    }
}

/// A scenario's failure: what disagrees, the tables, and the manifests that produced them.
#[must_use]
pub fn report(name: &str, setup: &Setup, outcome: &Outcome, rejected: &[String]) -> String {
    let mut out = String::new();
    let wrong = outcome.mismatches().len();
    let _ = writeln!(
        out,
        "=== scenario {name:?}: {wrong} of {} probes disagree with the evaluator",
        outcome.cases.len()
    );
    if !rejected.is_empty() {
        let _ = writeln!(out, "the agent rejected:");
        for r in rejected {
            let _ = writeln!(out, "  {r}");
        }
    }
    if wrong > 0 {
        let _ = writeln!(out, "{LEGEND}");
        out.push_str(&outcome.tables());
        out.push_str(&outcome.details(24));
    }
    let _ = writeln!(out, "labels:\n{}", setup.labels_summary());
    let _ = writeln!(out, "policies:\n{}", setup.policies_yaml());
    if !setup.services.is_empty() {
        let _ = writeln!(out, "services:\n{}", setup.services_yaml());
    }
    out
}

/// Pod `ns/name` with its base labels and container ports.
fn base_pod(ns: &str, name: &str, ip: Ipv4Addr) -> PodInfo {
    let mut l = labels(&[("pod", name)]);
    let tier = match name {
        "a" => Some("web"),
        "b" => Some("db"),
        _ => None,
    };
    l.extend(tier.map(|t| ("tier".to_owned(), t.to_owned())));
    let mut ports = Vec::new();
    for port in PORTS {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            ports.push(ContainerPort {
                name: format!("serve-{port}-{}", protocol.api_name().to_ascii_lowercase()),
                port,
                protocol,
            });
        }
    }
    let web = match name {
        "a" => Some(80),
        "b" => Some(81),
        _ => None,
    };
    ports.extend(web.map(|port| ContainerPort {
        name: "web".to_owned(),
        port,
        protocol: Protocol::Tcp,
    }));
    PodInfo {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        labels: l,
        ip,
        ports,
    }
}
