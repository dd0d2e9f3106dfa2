//! `NetworkPolicy` compilation: the policies, pods and namespaces in, per local pod a policy
//! *class* out — per direction, the peers it may talk to (address prefixes) and the ports
//! each may use. Pods whose compiled rules are equal share a class (and its map entries).
//!
//! Semantics are networking.k8s.io/v1 as the API reference documents them:
//! - a pod is isolated for a direction when some policy of its namespace selects it with that
//!   type in its effective `policyTypes` (absent: `Ingress`, plus `Egress` when the policy has
//!   egress rules); what any selecting policy's rules allow is allowed (a union);
//! - a rule without peers allows every address, one without ports every port and protocol;
//! - `podSelector` peers are pods of the policy's namespace, `namespaceSelector` peers all pods
//!   of the selected namespaces, both together the selected pods of the selected namespaces;
//!   `ipBlock` is by address, pod addresses included, minus its `except` blocks;
//! - a named port is resolved on the destination pod: the subject for ingress, each peer pod
//!   for egress (so an egress named port never matches an address that is not a pod).
//!
//! The output is exact for longest-prefix match: every prefix that bounds a rule (a CIDR, an
//! `except`, a pod's /32) gets an entry with the union of what all rules allow the addresses
//! it covers and no longer prefix does, so one trie lookup answers for any address.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::endpoints::{is_terminal, named_container_port, pod_ip};
use super::{ClusterState, ObjRef, PodIps};

mod attribution;

pub use attribution::{Judgement, RuleRef, judge};

/// The label the API server puts on every namespace (its name): a namespace written in the
/// manifests without it, or not written at all, still has it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// IP protocol numbers policies name.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;

/// An IPv4 prefix: the address with host bits cleared, and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Prefix {
    #[must_use]
    pub fn new(addr: Ipv4Addr, len: u8) -> Self {
        let len = len.min(32);
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask(len)),
            len,
        }
    }

    #[must_use]
    pub fn host(addr: Ipv4Addr) -> Self {
        Self { addr, len: 32 }
    }

    /// Whether `other` lies within this prefix (equal included).
    #[must_use]
    pub fn contains(&self, other: &Prefix) -> bool {
        other.len >= self.len && u32::from(other.addr) & mask(self.len) == u32::from(self.addr)
    }

    #[must_use]
    pub fn contains_addr(&self, addr: Ipv4Addr) -> bool {
        self.contains(&Self::host(addr))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

/// The ports a peer may use: every protocol and port, or per protocol a sorted list of
/// disjoint, non-adjacent inclusive ranges (`0..=65535`: every port of that protocol).
/// Canonical, so equal sets compare equal and can share map entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortSet {
    #[default]
    None,
    Any,
    Ports(BTreeMap<u8, Vec<(u16, u16)>>),
}

impl PortSet {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        matches!(self, Self::None)
    }

    /// Adds a range of one protocol, keeping the set canonical.
    pub fn add(&mut self, proto: u8, lo: u16, hi: u16) {
        match self {
            Self::Any => {}
            Self::None => {
                *self = Self::Ports(BTreeMap::from([(proto, vec![(lo, hi)])]));
            }
            Self::Ports(map) => {
                let ranges = map.entry(proto).or_default();
                ranges.push((lo, hi));
                ranges.sort_unstable();
                let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
                for &(lo, hi) in ranges.iter() {
                    match merged.last_mut() {
                        Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => {
                            last.1 = last.1.max(hi);
                        }
                        _ => merged.push((lo, hi)),
                    }
                }
                *ranges = merged;
            }
        }
    }

    pub fn add_all(&mut self, other: &PortSet) {
        match other {
            Self::None => {}
            Self::Any => *self = Self::Any,
            Self::Ports(map) => {
                for (&proto, ranges) in map {
                    for &(lo, hi) in ranges {
                        self.add(proto, lo, hi);
                    }
                }
            }
        }
    }

    /// Whether the set allows `port` of `proto` (for tests and `explain`).
    #[must_use]
    pub fn allows(&self, proto: u8, port: u16) -> bool {
        match self {
            Self::None => false,
            Self::Any => true,
            Self::Ports(map) => map
                .get(&proto)
                .is_some_and(|r| r.iter().any(|&(lo, hi)| (lo..=hi).contains(&port))),
        }
    }
}

/// What a peer prefix gets: its ports, and when none, why (`ferrovia_common::verdict`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerEntry {
    pub ports: PortSet,
    pub reason: u8,
}

/// Compiled rules of one direction: prefix → entry. An address matching no prefix is denied
/// ("by default").
pub type DirectionRules = BTreeMap<Prefix, PeerEntry>;

/// A policy class: per direction, `None` when pods of the class are not isolated for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyClass {
    pub ingress: Option<DirectionRules>,
    pub egress: Option<DirectionRules>,
}

/// The policy the data path must enforce on this node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyDesired {
    /// Local pods (IPv4) that are isolated in some direction, with their class.
    pub endpoints: BTreeMap<Ipv4Addr, Arc<PolicyClass>>,
    /// Every local pod's IPv4 address, isolated or not (verdict counters are kept for these).
    pub local: BTreeSet<Ipv4Addr>,
    /// Policies that select local pods, for status and logs.
    pub policies_in_force: usize,
}

/// Compiles the policies for the local pods (`local`: the pods the CNI plugin registered on
/// this node, with their addresses).
#[must_use]
pub fn compile(state: &ClusterState, local: &PodIps) -> PolicyDesired {
    let mut out = PolicyDesired::default();
    if state.network_policies.is_empty() {
        // The common case of a cluster without policies: no peer index to build.
        out.local = local
            .values()
            .flatten()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        return out;
    }
    let index = Index::new(state, local);
    let mut memo: HashMap<MemoKey, Arc<PolicyClass>> = HashMap::new();
    let mut in_force = BTreeSet::new();
    for (key, ips) in local {
        let v4 = ips.iter().filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        out.local.extend(v4.clone());
        let Some(pod) = state.pods.get(key) else {
            // Registered by the CNI plugin but not (yet) in the desired state: no labels, so
            // only policies with an empty podSelector could select it; it has no manifest,
            // so treat it as not selected until it appears.
            continue;
        };
        let ingress = selecting(state, key, pod, Dir::Ingress);
        let egress = selecting(state, key, pod, Dir::Egress);
        if ingress.is_empty() && egress.is_empty() {
            continue;
        }
        in_force.extend(ingress.iter().chain(&egress).map(|k| (*k).clone()));
        let memo_key = MemoKey {
            ingress: ingress.iter().map(|k| (*k).clone()).collect(),
            egress: egress.iter().map(|k| (*k).clone()).collect(),
            // Ingress named ports resolve on the subject: pods with other ports differ.
            ports: if ingress.is_empty() {
                Vec::new()
            } else {
                container_ports(pod)
            },
        };
        let class = memo
            .entry(memo_key)
            .or_insert_with(|| {
                Arc::new(PolicyClass {
                    ingress: (!ingress.is_empty())
                        .then(|| index.direction(&ingress, Dir::Ingress, pod)),
                    egress: (!egress.is_empty())
                        .then(|| index.direction(&egress, Dir::Egress, pod)),
                })
            })
            .clone();
        for ip in v4 {
            out.endpoints.insert(ip, Arc::clone(&class));
        }
    }
    out.policies_in_force = in_force.len();
    out
}

/// A direction of policy, as seen from the pod a policy selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Ingress,
    Egress,
}

impl Dir {
    /// The `policyTypes` entry that isolates a pod for this direction.
    #[must_use]
    pub fn policy_type(self) -> &'static str {
        match self {
            Self::Ingress => "Ingress",
            Self::Egress => "Egress",
        }
    }
}

/// The policies of `key`'s namespace that select `pod` for `dir`, in name order: empty when
/// the pod is not isolated for that direction.
fn selecting<'a>(state: &'a ClusterState, key: &'a ObjRef, pod: &Pod, dir: Dir) -> Vec<&'a ObjRef> {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    ClusterState::in_namespace(&state.network_policies, &key.namespace)
        .filter(|(_, p)| {
            let spec = spec(p);
            types(spec).contains(&dir.policy_type())
                && selector_matches(spec.pod_selector.as_ref(), &labels)
        })
        .map(|(k, _)| k)
        .collect()
}

#[derive(PartialEq, Eq, Hash)]
struct MemoKey {
    ingress: Vec<ObjRef>,
    egress: Vec<ObjRef>,
    ports: Vec<(String, String, i32)>,
}

fn container_ports(pod: &Pod) -> Vec<(String, String, i32)> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let mut out: Vec<_> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some((
                p.name.clone()?,
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                p.container_port,
            ))
        })
        .collect();
    out.sort();
    out
}

fn spec(policy: &NetworkPolicy) -> &NetworkPolicySpec {
    static EMPTY: std::sync::OnceLock<NetworkPolicySpec> = std::sync::OnceLock::new();
    policy
        .spec
        .as_ref()
        .unwrap_or_else(|| EMPTY.get_or_init(NetworkPolicySpec::default))
}

/// The effective `policyTypes`.
fn types(spec: &NetworkPolicySpec) -> Vec<&str> {
    match &spec.policy_types {
        Some(types) if !types.is_empty() => types.iter().map(String::as_str).collect(),
        _ => {
            let mut t = vec!["Ingress"];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress");
            }
            t
        }
    }
}

/// Label selector semantics (`metav1.LabelSelectorAsSelector`): `matchLabels` and every
/// `matchExpressions` requirement must hold; an empty selector matches everything.
#[must_use]
pub fn selector_matches(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && selector.match_expressions.iter().flatten().all(|e| {
            let value = labels.get(&e.key);
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                // Rejected by validation; match nothing rather than everything.
                _ => false,
            }
        })
}

/// A pod as a peer: where it lives and what it is.
struct PeerPod<'a> {
    namespace: &'a str,
    pod: &'a Pod,
    labels: BTreeMap<String, String>,
    ip: Ipv4Addr,
}

/// The cluster's pods (with an IPv4 address) and namespace labels, read once per compile.
struct Index<'a> {
    state: &'a ClusterState,
    pods: Vec<PeerPod<'a>>,
    by_ip: HashMap<Ipv4Addr, usize>,
    namespaces: BTreeMap<&'a str, BTreeMap<String, String>>,
}

/// A rule's peers and ports as written (`from`/`to`, `ports`).
type RuleParts<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

/// One peer of a rule, resolved.
enum Peer {
    All,
    /// Pods by index into [`Index::pods`].
    Pods(BTreeSet<usize>),
    Block {
        cidr: Prefix,
        except: Vec<Prefix>,
    },
}

/// One port entry of a rule.
enum PortRule {
    Range { proto: u8, lo: u16, hi: u16 },
    Named { proto: u8, name: String },
}

/// A rule of a selecting policy: its peers (`None`: all) and ports (`None`: all).
struct Item {
    peers: Vec<Peer>,
    ports: Option<Vec<PortRule>>,
}

impl<'a> Index<'a> {
    fn new(state: &'a ClusterState, local: &'a PodIps) -> Self {
        let mut namespaces: BTreeMap<&str, BTreeMap<String, String>> = state
            .namespaces
            .iter()
            .map(|(name, ns)| {
                let mut labels = ns.metadata.labels.clone().unwrap_or_default();
                labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
                (name.as_str(), labels)
            })
            .collect();
        let mut pods = Vec::new();
        let mut by_ip = HashMap::new();
        for (key, pod) in &state.pods {
            // A host-network pod has its node's address, not one of its own: it is not a pod
            // peer (upstream leaves host-network traffic to the node rules; ferrovia allows
            // it in as the node's).
            let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
            if is_terminal(pod) || host_network {
                continue;
            }
            let Some(IpAddr::V4(ip)) = pod_ip(pod, key, local, true) else {
                continue;
            };
            namespaces.entry(key.namespace.as_str()).or_insert_with(|| {
                BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), key.namespace.clone())])
            });
            by_ip.insert(ip, pods.len());
            pods.push(PeerPod {
                namespace: key.namespace.as_str(),
                pod,
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                ip,
            });
        }
        Self {
            state,
            pods,
            by_ip,
            namespaces,
        }
    }

    /// The rules of direction `dir` of the `policies` (all selecting `subject`).
    fn direction(&self, policies: &[&ObjRef], dir: Dir, subject: &Pod) -> DirectionRules {
        let items: Vec<Item> = policies
            .iter()
            .flat_map(|key| self.items(key, dir))
            .collect();
        self.rules(&items, dir, subject)
    }

    /// The rules of direction `dir` of policy `key`, resolved, in the policy's order.
    fn items(&self, key: &ObjRef, dir: Dir) -> Vec<Item> {
        let spec = spec(&self.state.network_policies[key]);
        let rules: Vec<RuleParts<'_>> = match dir {
            Dir::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Dir::Egress => spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        rules
            .into_iter()
            .map(|(peers, ports)| {
                let peers = match peers.filter(|p| !p.is_empty()) {
                    None => vec![Peer::All],
                    Some(peers) => peers
                        .iter()
                        .filter_map(|p| self.peer(&key.namespace, p))
                        .collect(),
                };
                let ports = ports
                    .filter(|p| !p.is_empty())
                    .map(|ports| ports.iter().filter_map(port_rule).collect());
                Item { peers, ports }
            })
            .collect()
    }

    fn peer(&self, namespace: &str, peer: &NetworkPolicyPeer) -> Option<Peer> {
        if let Some(block) = &peer.ip_block {
            // IPv6 blocks never match this IPv4 data path; invalid ones were rejected.
            let cidr = parse_v4_cidr(&block.cidr)?;
            let except = block
                .except
                .iter()
                .flatten()
                .filter_map(|e| parse_v4_cidr(e))
                .collect();
            return Some(Peer::Block { cidr, except });
        }
        let pods = self
            .pods
            .iter()
            .enumerate()
            .filter(|(_, p)| match &peer.namespace_selector {
                None => p.namespace == namespace,
                Some(sel) => self
                    .namespaces
                    .get(p.namespace)
                    .is_some_and(|labels| selector_matches(Some(sel), labels)),
            })
            .filter(|(_, p)| selector_matches(peer.pod_selector.as_ref(), &p.labels))
            .map(|(i, _)| i)
            .collect();
        Some(Peer::Pods(pods))
    }

    /// The exact longest-prefix-match table of `items` (see the module docs).
    fn rules(&self, items: &[Item], dir: Dir, subject: &Pod) -> DirectionRules {
        let mut prefixes = BTreeSet::new();
        for item in items {
            let named = item
                .ports
                .as_ref()
                .is_some_and(|p| p.iter().any(|p| matches!(p, PortRule::Named { .. })));
            for peer in &item.peers {
                match peer {
                    Peer::All => {
                        prefixes.insert(Prefix::new(Ipv4Addr::UNSPECIFIED, 0));
                    }
                    Peer::Pods(pods) => {
                        prefixes.extend(pods.iter().map(|&i| Prefix::host(self.pods[i].ip)));
                    }
                    Peer::Block { cidr, except } => {
                        prefixes.insert(*cidr);
                        prefixes.extend(except.iter().copied());
                    }
                }
                // An egress named port resolves per destination pod: every pod the peer
                // covers needs its own entry.
                if named && dir == Dir::Egress && !matches!(peer, Peer::Pods(_)) {
                    prefixes.extend(
                        self.pods
                            .iter()
                            .filter(|p| covers(peer, p.ip, &self.by_ip))
                            .map(|p| Prefix::host(p.ip)),
                    );
                }
            }
        }
        prefixes
            .into_iter()
            .map(|prefix| {
                let peer_pod = (prefix.len == 32)
                    .then(|| self.by_ip.get(&prefix.addr))
                    .flatten()
                    .map(|&i| self.pods[i].pod);
                let mut ports = PortSet::None;
                let (mut selected, mut excepted) = (false, false);
                for item in items {
                    let (matched, carved) = item.covers(prefix, &self.by_ip);
                    excepted |= carved;
                    if !matched {
                        continue;
                    }
                    selected = true;
                    let destination = match dir {
                        Dir::Ingress => Some(subject),
                        Dir::Egress => peer_pod,
                    };
                    ports.add_all(&item_ports(item, destination));
                }
                // Empty ports: a rule selected the peer for no port it has (a named port the
                // destination lacks), or only an `except` carved it out.
                let reason = if ports.is_empty() {
                    denial(selected, excepted)
                } else {
                    0
                };
                (prefix, PeerEntry { ports, reason })
            })
            .collect()
    }
}

enum Region {
    In,
    Out,
    Excepted,
}

impl Item {
    /// Whether a peer of the item covers the addresses `prefix` stands for, and whether an
    /// `except` of one carves them out.
    fn covers(&self, prefix: Prefix, by_ip: &HashMap<Ipv4Addr, usize>) -> (bool, bool) {
        let (mut matched, mut excepted) = (false, false);
        for peer in &self.peers {
            match region_in(peer, prefix, by_ip) {
                Region::In => matched = true,
                Region::Excepted => excepted = true,
                Region::Out => {}
            }
        }
        (matched, excepted)
    }
}

/// Why no rule allows a peer: `selected`, some rule selects it (for other ports); `excepted`,
/// an `except` carves it out of a block.
fn denial(selected: bool, excepted: bool) -> u8 {
    if selected {
        ferrovia_common::verdict::DENY_PORT
    } else if excepted {
        ferrovia_common::verdict::DENY_EXCEPT
    } else {
        ferrovia_common::verdict::DENY_NO_RULE
    }
}

/// Whether the addresses `prefix` stands for (those it covers that no longer collected prefix
/// does) belong to `peer`. Exact because every bound of every peer is a collected prefix.
fn region_in(peer: &Peer, prefix: Prefix, by_ip: &HashMap<Ipv4Addr, usize>) -> Region {
    match peer {
        Peer::All => Region::In,
        Peer::Pods(pods) => {
            if prefix.len == 32 && by_ip.get(&prefix.addr).is_some_and(|i| pods.contains(i)) {
                Region::In
            } else {
                Region::Out
            }
        }
        Peer::Block { cidr, except } => {
            if !cidr.contains(&prefix) {
                Region::Out
            } else if except.iter().any(|e| e.contains(&prefix)) {
                Region::Excepted
            } else {
                Region::In
            }
        }
    }
}

/// Whether `peer` covers address `ip`.
fn covers(peer: &Peer, ip: Ipv4Addr, by_ip: &HashMap<Ipv4Addr, usize>) -> bool {
    matches!(region_in(peer, Prefix::host(ip), by_ip), Region::In)
}

/// The ports an item allows towards `destination` (the pod named ports resolve on, if any).
fn item_ports(item: &Item, destination: Option<&Pod>) -> PortSet {
    let Some(rules) = &item.ports else {
        return PortSet::Any;
    };
    let mut set = PortSet::None;
    for rule in rules {
        match rule {
            PortRule::Range { proto, lo, hi } => set.add(*proto, *lo, *hi),
            PortRule::Named { proto, name } => {
                if let Some(port) =
                    destination.and_then(|pod| named_container_port(pod, name, proto_name(*proto)))
                {
                    set.add(*proto, port, port);
                }
            }
        }
    }
    set
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        UDP => "UDP",
        SCTP => "SCTP",
        _ => "TCP",
    }
}

/// A port entry; `None` for what validation rejects (it never reaches here).
fn port_rule(port: &NetworkPolicyPort) -> Option<PortRule> {
    let proto = match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => TCP,
        "UDP" => UDP,
        "SCTP" => SCTP,
        _ => return None,
    };
    Some(match &port.port {
        None => PortRule::Range {
            proto,
            lo: 0,
            hi: u16::MAX,
        },
        Some(IntOrString::Int(n)) => {
            let lo = u16::try_from(*n).ok()?;
            let hi = match port.end_port {
                Some(end) => u16::try_from(end).ok()?,
                None => lo,
            };
            PortRule::Range { proto, lo, hi }
        }
        Some(IntOrString::String(name)) => PortRule::Named {
            proto,
            name: name.clone(),
        },
    })
}

/// An IPv4 CIDR (host bits cleared, as older API servers accepted them); `None` for IPv6.
#[must_use]
pub fn parse_v4_cidr(cidr: &str) -> Option<Prefix> {
    let (addr, len) = cidr.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let len: u8 = len.parse().ok().filter(|&l| l <= 32)?;
    Some(Prefix::new(addr, len))
}
