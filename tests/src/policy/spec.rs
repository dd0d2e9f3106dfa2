//! The tests' own model of a policy scenario — namespaces, pods, `NetworkPolicy` objects,
//! services — and its rendering to the Kubernetes YAML the agent reads.
//!
//! Deliberately not k8s-openapi's types (which the agent uses): the scenarios, the evaluator
//! and the generator work on this small, closed model, and only the YAML crosses over.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde_json::{Map, Value, json};

pub use super::yaml::to_yaml;

use crate::Proto;

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// Labels from `(key, value)` pairs.
#[must_use]
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A port's protocol as the API names it. SCTP is never probed; policies may still name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// `TCP`, `UDP`, `SCTP`.
    #[must_use]
    pub fn api_name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl From<Proto> for Protocol {
    fn from(p: Proto) -> Self {
        match p {
            Proto::Tcp => Self::Tcp,
            Proto::Udp => Self::Udp,
        }
    }
}

/// A named container port of a pod (what named ports in policies and services resolve to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// A namespace and its labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

/// A pod as policies see it: where it is, its labels, its IP and its named ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ip: Ipv4Addr,
    pub ports: Vec<ContainerPort>,
}

impl PodInfo {
    /// `namespace/name`.
    #[must_use]
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The namespaces and pods of a scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<PodInfo>,
}

impl World {
    /// A namespace's labels; `None` if the namespace does not exist.
    #[must_use]
    pub fn namespace_labels(&self, name: &str) -> Option<&Labels> {
        self.namespaces
            .iter()
            .find(|n| n.name == name)
            .map(|n| &n.labels)
    }

    /// The index of pod `ns/name`.
    #[must_use]
    pub fn index(&self, id: &str) -> usize {
        self.pods
            .iter()
            .position(|p| p.id() == id)
            .unwrap_or_else(|| panic!("no pod {id}"))
    }

    /// Pod `ns/name`.
    #[must_use]
    pub fn pod(&self, id: &str) -> &PodInfo {
        &self.pods[self.index(id)]
    }

    /// Pod `ns/name`, to change its labels.
    pub fn pod_mut(&mut self, id: &str) -> &mut PodInfo {
        let i = self.index(id);
        &mut self.pods[i]
    }

    /// Namespace `name`, to change its labels.
    pub fn namespace_mut(&mut self, name: &str) -> &mut Namespace {
        self.namespaces
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no namespace {name}"))
    }

    /// The pods of namespace `ns`, with their indices.
    pub fn pods_in<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = (usize, &'a PodInfo)> + 'a {
        self.pods
            .iter()
            .enumerate()
            .filter(move |(_, p)| p.namespace == ns)
    }

    /// Namespaces and pods as Kubernetes objects. Pods have no status: the agent takes their
    /// IPs from the CNI plugin. Each named port is a container of its own, as in cyclonus.
    #[must_use]
    pub fn to_json(&self) -> Vec<Value> {
        let namespaces = self.namespaces.iter().map(|n| {
            json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": n.name, "labels": n.labels},
            })
        });
        let pods = self.pods.iter().map(|p| {
            let containers: Vec<Value> = p
                .ports
                .iter()
                .map(|cp| {
                    json!({
                        "name": format!("cont-{}", cp.name),
                        "image": "ferrovia-echo",
                        "ports": [{
                            "name": cp.name,
                            "containerPort": cp.port,
                            "protocol": cp.protocol.api_name(),
                        }],
                    })
                })
                .collect();
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
                "spec": {"containers": containers},
            })
        });
        namespaces.chain(pods).collect()
    }
}

/// The operator of a selector requirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Operator {
    fn api_name(self) -> &'static str {
        match self {
            Self::In => "In",
            Self::NotIn => "NotIn",
            Self::Exists => "Exists",
            Self::DoesNotExist => "DoesNotExist",
        }
    }
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

/// A label selector: every `matchLabels` pair and every `matchExpressions` requirement must
/// hold; empty selects all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    /// `{}`: everything.
    #[must_use]
    pub fn all() -> Self {
        Self::default()
    }

    /// `matchLabels` only.
    #[must_use]
    pub fn labels(pairs: &[(&str, &str)]) -> Self {
        Self {
            match_labels: labels(pairs),
            match_expressions: Vec::new(),
        }
    }

    /// Adds a `matchExpressions` requirement.
    #[must_use]
    pub fn expr(mut self, key: &str, operator: Operator, values: &[&str]) -> Self {
        self.match_expressions.push(Requirement {
            key: key.to_owned(),
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        });
        self
    }

    #[must_use]
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if !self.match_labels.is_empty() {
            m.insert("matchLabels".into(), json!(self.match_labels));
        }
        if !self.match_expressions.is_empty() {
            let exprs: Vec<Value> = self
                .match_expressions
                .iter()
                .map(|r| {
                    let mut e = json!({"key": r.key, "operator": r.operator.api_name()});
                    if !r.values.is_empty() {
                        e["values"] = json!(r.values);
                    }
                    e
                })
                .collect();
            m.insert("matchExpressions".into(), Value::Array(exprs));
        }
        Value::Object(m)
    }
}

/// An IPv4 CIDR, kept in canonical form (host bits zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    /// The network of `addr` with prefix length `len` (host bits cleared).
    #[must_use]
    pub fn new(addr: Ipv4Addr, len: u8) -> Self {
        assert!(len <= 32, "prefix length {len}");
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask(len)),
            len,
        }
    }

    /// `ip/32`.
    #[must_use]
    pub fn host(ip: Ipv4Addr) -> Self {
        Self::new(ip, 32)
    }

    fn mask(len: u8) -> u32 {
        if len == 0 { 0 } else { u32::MAX << (32 - len) }
    }

    #[must_use]
    pub fn contains_ip(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == u32::from(self.addr)
    }

    /// Whether `other` lies inside this block (equal counts).
    #[must_use]
    pub fn contains(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains_ip(other.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').ok_or_else(|| format!("{s:?}: no /"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len: u8 = len.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if len > 32 {
            return Err(format!("{s:?}: prefix longer than 32"));
        }
        Ok(Self::new(addr, len))
    }
}

/// `ipBlock`: a CIDR minus exceptions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpBlock {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

/// One `from`/`to` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `podSelector` and/or `namespaceSelector` (at least one is `Some`).
    Selectors {
        pods: Option<Selector>,
        namespaces: Option<Selector>,
    },
    IpBlock(IpBlock),
}

impl Peer {
    /// `podSelector` alone: pods of the policy's namespace.
    #[must_use]
    pub fn pods(selector: Selector) -> Self {
        Self::Selectors {
            pods: Some(selector),
            namespaces: None,
        }
    }

    /// `namespaceSelector` alone: every pod of the matching namespaces.
    #[must_use]
    pub fn namespaces(selector: Selector) -> Self {
        Self::Selectors {
            pods: None,
            namespaces: Some(selector),
        }
    }

    /// Both selectors in one peer: matching pods in matching namespaces.
    #[must_use]
    pub fn pods_in(namespaces: Selector, pods: Selector) -> Self {
        Self::Selectors {
            pods: Some(pods),
            namespaces: Some(namespaces),
        }
    }

    #[must_use]
    pub fn ip_block(cidr: Cidr, except: &[Cidr]) -> Self {
        Self::IpBlock(IpBlock {
            cidr,
            except: except.to_vec(),
        })
    }

    #[must_use]
    pub fn to_json(&self) -> Value {
        match self {
            Self::Selectors { pods, namespaces } => {
                let mut m = Map::new();
                if let Some(s) = pods {
                    m.insert("podSelector".into(), s.to_json());
                }
                if let Some(s) = namespaces {
                    m.insert("namespaceSelector".into(), s.to_json());
                }
                Value::Object(m)
            }
            Self::IpBlock(b) => {
                let mut block = json!({"cidr": b.cidr.to_string()});
                if !b.except.is_empty() {
                    let except: Vec<String> = b.except.iter().map(ToString::to_string).collect();
                    block["except"] = json!(except);
                }
                json!({ "ipBlock": block })
            }
        }
    }
}

/// A port by number or by container port name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl PortRef {
    fn to_json(&self) -> Value {
        match self {
            Self::Number(n) => json!(n),
            Self::Name(s) => json!(s),
        }
    }
}

/// One `ports` entry of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyPort {
    /// `None`: absent, which means TCP.
    pub protocol: Option<Protocol>,
    /// `None`: every port of the protocol.
    pub port: Option<PortRef>,
    /// With a numeric `port`: the inclusive end of a range.
    pub end_port: Option<u16>,
}

impl PolicyPort {
    /// `{port: N}` (TCP by default).
    #[must_use]
    pub fn number(port: u16) -> Self {
        Self {
            protocol: None,
            port: Some(PortRef::Number(port)),
            end_port: None,
        }
    }

    /// `{protocol: TCP, port: N}`.
    #[must_use]
    pub fn tcp(port: u16) -> Self {
        Self::on(Protocol::Tcp, port)
    }

    /// `{protocol: UDP, port: N}`.
    #[must_use]
    pub fn udp(port: u16) -> Self {
        Self::on(Protocol::Udp, port)
    }

    /// `{protocol: P, port: N}`.
    #[must_use]
    pub fn on(protocol: Protocol, port: u16) -> Self {
        Self {
            protocol: Some(protocol),
            ..Self::number(port)
        }
    }

    /// `{protocol: P}`: every port of the protocol.
    #[must_use]
    pub fn protocol(protocol: Protocol) -> Self {
        Self {
            protocol: Some(protocol),
            port: None,
            end_port: None,
        }
    }

    /// `{protocol: P, port: NAME}`.
    #[must_use]
    pub fn named(protocol: Protocol, name: &str) -> Self {
        Self {
            protocol: Some(protocol),
            port: Some(PortRef::Name(name.to_owned())),
            end_port: None,
        }
    }

    /// `{protocol: P, port: START, endPort: END}`.
    #[must_use]
    pub fn range(protocol: Protocol, start: u16, end: u16) -> Self {
        Self {
            end_port: Some(end),
            ..Self::on(protocol, start)
        }
    }

    #[must_use]
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(p) = self.protocol {
            m.insert("protocol".into(), json!(p.api_name()));
        }
        if let Some(p) = &self.port {
            m.insert("port".into(), p.to_json());
        }
        if let Some(e) = self.end_port {
            m.insert("endPort".into(), json!(e));
        }
        Value::Object(m)
    }
}

/// An ingress or egress rule. `None` and an empty list mean the same ("all"); both are kept
/// so that the YAML can say either.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// `from` (ingress) or `to` (egress).
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PolicyPort>>,
}

impl Rule {
    /// `{}`: every peer, every port.
    #[must_use]
    pub fn all() -> Self {
        Self::default()
    }

    /// These peers, every port.
    #[must_use]
    pub fn peers(peers: Vec<Peer>) -> Self {
        Self {
            peers: Some(peers),
            ports: None,
        }
    }

    /// Restricts the rule to `ports`.
    #[must_use]
    pub fn ports(mut self, ports: Vec<PolicyPort>) -> Self {
        self.ports = Some(ports);
        self
    }

    fn to_json(&self, peers_key: &str) -> Value {
        let mut m = Map::new();
        if let Some(peers) = &self.peers {
            m.insert(peers_key.into(), peers.iter().map(Peer::to_json).collect());
        }
        if let Some(ports) = &self.ports {
            m.insert(
                "ports".into(),
                ports.iter().map(PolicyPort::to_json).collect(),
            );
        }
        Value::Object(m)
    }
}

/// `Ingress` or `Egress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyType {
    Ingress,
    Egress,
}

/// A `networking.k8s.io/v1` `NetworkPolicy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    /// `None`: the field is absent (the API server's default applies).
    pub policy_types: Option<Vec<PolicyType>>,
}

impl Policy {
    /// A policy selecting `pod_selector` in `namespace`, with no rules and no `policyTypes`.
    #[must_use]
    pub fn new(namespace: &str, name: &str, pod_selector: Selector) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            pod_selector,
            ingress: Vec::new(),
            egress: Vec::new(),
            policy_types: None,
        }
    }

    /// Sets `policyTypes`.
    #[must_use]
    pub fn types(mut self, types: &[PolicyType]) -> Self {
        self.policy_types = Some(types.to_vec());
        self
    }

    /// Adds an ingress rule.
    #[must_use]
    pub fn ingress(mut self, rule: Rule) -> Self {
        self.ingress.push(rule);
        self
    }

    /// Adds an egress rule.
    #[must_use]
    pub fn egress(mut self, rule: Rule) -> Self {
        self.egress.push(rule);
        self
    }

    #[must_use]
    pub fn to_json(&self) -> Value {
        let mut spec = Map::new();
        spec.insert("podSelector".into(), self.pod_selector.to_json());
        if !self.ingress.is_empty() {
            let rules = self.ingress.iter().map(|r| r.to_json("from")).collect();
            spec.insert("ingress".into(), rules);
        }
        if !self.egress.is_empty() {
            let rules = self.egress.iter().map(|r| r.to_json("to")).collect();
            spec.insert("egress".into(), rules);
        }
        if let Some(types) = &self.policy_types {
            let names: Vec<&str> = types
                .iter()
                .map(|t| match t {
                    PolicyType::Ingress => "Ingress",
                    PolicyType::Egress => "Egress",
                })
                .collect();
            spec.insert("policyTypes".into(), json!(names));
        }
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": spec,
        })
    }

    /// What the API server's validation would reject in this policy (empty: valid). The rules
    /// the generator must respect; the agent has its own copy of them, which this is not.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        selector_problems(&mut out, "spec.podSelector", &self.pod_selector);
        for (dir, rules, key) in [
            ("ingress", &self.ingress, "from"),
            ("egress", &self.egress, "to"),
        ] {
            for (i, rule) in rules.iter().enumerate() {
                let field = format!("spec.{dir}[{i}]");
                for (j, peer) in rule.peers.iter().flatten().enumerate() {
                    peer_problems(&mut out, &format!("{field}.{key}[{j}]"), peer);
                }
                for (j, port) in rule.ports.iter().flatten().enumerate() {
                    port_problems(&mut out, &format!("{field}.ports[{j}]"), port);
                }
            }
        }
        if let Some(types) = &self.policy_types
            // An empty list is valid: the API server defaults it like an absent one.
            && types.len() == 2
            && types[0] == types[1]
        {
            out.push(format!("spec.policyTypes: {types:?}"));
        }
        out
    }
}

fn selector_problems(out: &mut Vec<String>, field: &str, s: &Selector) {
    for (k, v) in &s.match_labels {
        if !valid_label_key(k) || !valid_label_value(v) {
            out.push(format!("{field}.matchLabels: {k:?}: {v:?}"));
        }
    }
    for (i, r) in s.match_expressions.iter().enumerate() {
        let needs_values = matches!(r.operator, Operator::In | Operator::NotIn);
        if needs_values == r.values.is_empty()
            || !valid_label_key(&r.key)
            || !r.values.iter().all(|v| valid_label_value(v))
        {
            out.push(format!("{field}.matchExpressions[{i}]: {r:?}"));
        }
    }
}

fn peer_problems(out: &mut Vec<String>, field: &str, peer: &Peer) {
    match peer {
        Peer::Selectors {
            pods: None,
            namespaces: None,
        } => out.push(format!("{field}: no selector")),
        Peer::Selectors { pods, namespaces } => {
            for s in pods.iter().chain(namespaces) {
                selector_problems(out, field, s);
            }
        }
        Peer::IpBlock(b) => {
            for (i, e) in b.except.iter().enumerate() {
                if !(b.cidr.contains(e) && e.len > b.cidr.len) {
                    out.push(format!(
                        "{field}.ipBlock.except[{i}]: {e} not strictly inside {}",
                        b.cidr
                    ));
                }
            }
        }
    }
}

fn port_problems(out: &mut Vec<String>, field: &str, p: &PolicyPort) {
    match (&p.port, p.end_port) {
        (Some(PortRef::Number(0)), _) => out.push(format!("{field}.port: 0")),
        (Some(PortRef::Name(name)), end) => {
            if !valid_port_name(name) {
                out.push(format!("{field}.port: {name:?}"));
            }
            if end.is_some() {
                out.push(format!("{field}.endPort: with a named port"));
            }
        }
        (Some(PortRef::Number(start)), Some(end)) if end < *start => {
            out.push(format!("{field}.endPort: {end} < {start}"));
        }
        (None, Some(_)) => out.push(format!("{field}.endPort: without port")),
        _ => {}
    }
}

/// `IANA_SVC_NAME`: 1–15 of `[a-z0-9-]`, at least one letter, no `-` at either end or twice.
fn valid_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn valid_label_value(v: &str) -> bool {
    v.is_empty() || valid_label_name(v)
}

/// `[prefix/]name`, the prefix a DNS subdomain.
fn valid_label_key(k: &str) -> bool {
    match k.split_once('/') {
        Some((prefix, name)) => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|part| {
                    !part.is_empty()
                        && part
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                })
                && valid_label_name(name)
        }
        None => valid_label_name(k),
    }
}

/// 1–63 of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
fn valid_label_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// A `v1` `ClusterIP` Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target: PortRef,
}

/// A `v1` `ClusterIP` Service with a selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub selector: Labels,
    pub ports: Vec<ServicePort>,
}

impl Service {
    #[must_use]
    pub fn to_json(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "protocol": p.protocol.api_name(),
                    "port": p.port,
                    "targetPort": p.target.to_json(),
                })
            })
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {"clusterIP": self.cluster_ip.to_string(), "selector": self.selector, "ports": ports},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_block_style_and_reads_back_as_the_same_json() {
        let p = Policy::new("x", "mixed", Selector::labels(&[("pod", "a")]))
            .types(&[PolicyType::Ingress, PolicyType::Egress])
            .ingress(
                Rule::peers(vec![
                    Peer::pods_in(
                        Selector::all().expr("ns", Operator::In, &["y", "z"]),
                        Selector::labels(&[("pod", "b")]),
                    ),
                    Peer::ip_block(
                        "10.0.0.0/24".parse().unwrap(),
                        &["10.0.0.4/32".parse().unwrap()],
                    ),
                ])
                .ports(vec![
                    PolicyPort::range(Protocol::Tcp, 80, 81),
                    PolicyPort::named(Protocol::Udp, "serve-80-udp"),
                ]),
            )
            .egress(Rule {
                peers: Some(vec![]),
                ports: Some(vec![]),
            });
        let yaml = to_yaml(&[p.to_json()]);
        assert!(
            yaml.contains("  podSelector:\n    matchLabels:\n      pod: a\n"),
            "{yaml}"
        );
        assert!(
            yaml.contains("  - from:\n    - namespaceSelector:"),
            "{yaml}"
        );
        assert!(yaml.contains("cidr: \"10.0.0.0/24\""), "{yaml}");
        assert!(yaml.contains("  - ports: []\n    to: []\n"), "{yaml}");
        assert_eq!(read_back(&yaml), [p.to_json()]);
        let tricky =
            json!({"a": {"b": [1, "80", "yes", {"c": true, "d": []}], "e": {}, "f g": "-x"}});
        let yaml = to_yaml(&[tricky.clone(), json!({"z": [[1, 2], []]})]);
        assert_eq!(
            yaml,
            "---\na:\n  b:\n  - 1\n  - \"80\"\n  - \"yes\"\n  - c: true\n    d: []\n  e: {}\n  \"f g\": \"-x\"\n\
             ---\nz:\n- \n  - 1\n  - 2\n- []\n"
        );
        assert_eq!(read_back(&yaml), [tricky, json!({"z": [[1, 2], []]})]);
    }

    /// The documents of `yaml` as the agent's YAML reader sees them.
    fn read_back(yaml: &str) -> Vec<Value> {
        serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    #[test]
    fn generated_scenarios_read_back_as_written() {
        let world = World {
            namespaces: vec![Namespace {
                name: "x".into(),
                labels: labels(&[("kubernetes.io/metadata.name", "x")]),
            }],
            pods: vec![PodInfo {
                namespace: "x".into(),
                name: "a".into(),
                labels: labels(&[("pod", "a")]),
                ip: Ipv4Addr::new(10, 1, 0, 2),
                ports: vec![ContainerPort {
                    name: "serve-80-tcp".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                }],
            }],
        };
        let subnet: Cidr = "10.1.0.0/24".parse().unwrap();
        for seed in 0..300 {
            let g = crate::policy::random::generate(seed, &world, subnet);
            let mut docs = g.world.to_json();
            docs.extend(g.policies.iter().map(Policy::to_json));
            assert_eq!(read_back(&to_yaml(&docs)), docs, "seed {seed}");
        }
    }

    #[test]
    fn cidr_canonical_and_containment() {
        let c: Cidr = "10.1.2.3/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.2.0/24");
        assert!(c.contains_ip(Ipv4Addr::new(10, 1, 2, 255)));
        assert!(!c.contains_ip(Ipv4Addr::new(10, 1, 3, 0)));
        assert!(c.contains(&"10.1.2.128/25".parse().unwrap()));
        assert!(!c.contains(&"10.1.0.0/16".parse().unwrap()));
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains_ip(Ipv4Addr::BROADCAST)
        );
    }

    #[test]
    fn problems_catch_what_the_api_server_rejects() {
        let bad = |port: PolicyPort| {
            Policy::new("x", "p", Selector::all()).ingress(Rule::all().ports(vec![port]))
        };
        assert_eq!(
            bad(PolicyPort::range(Protocol::Tcp, 81, 80))
                .problems()
                .len(),
            1
        );
        let mut named = PolicyPort::named(Protocol::Tcp, "serve-80-tcp");
        named.end_port = Some(81);
        assert_eq!(bad(named).problems().len(), 1);
        assert!(
            bad(PolicyPort::range(Protocol::Tcp, 80, 80))
                .problems()
                .is_empty()
        );
        let outside =
            Policy::new("x", "p", Selector::all()).ingress(Rule::peers(vec![Peer::ip_block(
                "10.0.0.0/24".parse().unwrap(),
                &[
                    "10.0.0.0/24".parse().unwrap(),
                    "10.0.1.0/28".parse().unwrap(),
                ],
            )]));
        assert_eq!(outside.problems().len(), 2, "{:?}", outside.problems());
        let no_values = Policy::new("x", "p", Selector::all().expr("a", Operator::In, &[]));
        assert_eq!(no_values.problems().len(), 1);
        assert!(valid_label_key("kubernetes.io/metadata.name"));
        assert!(!valid_label_key("-bad"));
    }
}
