//! The operator's read-only views: the [`Inventory`] trait the agent implements for
//! `ListServices`, `ListEndpoints`, `ListPolicies`, `ListPods` and `GetMaps`, its plain types,
//! and their conversions to the generated protobuf messages.
use std::future::Future;
use std::path::PathBuf;

use ferrovia_proto::v1;

use super::registry::{ApiError, PodRegistration, saturating_u32};
use crate::datapath::TcMode;
use crate::datapath::inventory::PinnedMap;
use crate::model::endpoints::Endpoint;
use crate::model::{FrontendKey, ObjRef, Protocol, Skipped};

/// What a frontend's address is to its service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontendType {
    /// `spec.clusterIP(s)`.
    ClusterIp,
    /// A node address with `spec.ports[].nodePort`.
    NodePort,
    /// `status.loadBalancer.ingress[].ip`.
    LoadBalancer,
    /// `spec.externalIPs`.
    ExternalIp,
}

impl FrontendType {
    /// The spelling of the API (`type: ClusterIP`…; `externalIP` is not a type but a field).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalIp => "externalIP",
        }
    }
}

/// One frontend the data path serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFrontend {
    pub key: FrontendKey,
    pub service: ObjRef,
    /// The service port's name (`""` when unnamed).
    pub port_name: String,
    pub kind: FrontendType,
    /// `Some(timeout)` for `sessionAffinity: ClientIP`.
    pub affinity_timeout_s: Option<u32>,
    /// Selected backends.
    pub backends: usize,
}

/// Answer of `ListServices`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceList {
    pub frontends: Vec<ServiceFrontend>,
    pub skipped: Vec<Skipped>,
}

/// The candidate endpoints of one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortEndpoints {
    pub service: ObjRef,
    pub port_name: String,
    pub protocol: Protocol,
    /// With whether each is a selected backend, sorted by address.
    pub endpoints: Vec<(Endpoint, bool)>,
}

/// One `NetworkPolicy` in force.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    pub policy: ObjRef,
    /// The effective `policyTypes`.
    pub types: Vec<String>,
    /// Names of the node's pods (of the policy's namespace) it selects.
    pub selected_pods: Vec<String>,
    pub ingress_rules: usize,
    pub egress_rules: usize,
    /// Why its newest version was rejected (the one in force is then older); usually empty.
    pub errors: Vec<String>,
}

/// Answer of `ListPolicies`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyList {
    pub policies: Vec<PolicyState>,
    /// Rejections of `NetworkPolicy` objects with no valid version (so not in force).
    pub rejected: Vec<String>,
}

/// A registered pod, how its programs are attached and whether policy isolates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodState {
    pub pod: PodRegistration,
    pub from_pod: TcMode,
    pub to_pod: TcMode,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    /// Its counters, as `/metrics` exports them.
    pub counters: crate::metrics::PodMetrics,
}

/// Answer of `GetMaps`.
#[derive(Clone, Debug, PartialEq)]
pub struct MapList {
    pub bpffs_root: PathBuf,
    pub maps: Vec<PinnedMap>,
}

/// What the operator's read-only views need from the agent: implemented by the node.
/// Nothing here may change the data path.
pub trait Inventory: Send + Sync + 'static {
    /// The frontends of the current desired state that the data path serves.
    fn services(&self) -> impl Future<Output = ServiceList> + Send;

    /// The endpoints of every service port that has a frontend.
    fn endpoints(&self) -> impl Future<Output = Vec<PortEndpoints>> + Send;

    /// The policies in force, and the source's rejections of policies.
    fn policies(&self) -> impl Future<Output = PolicyList> + Send;

    /// The pods registered on this node.
    fn pods(&self) -> impl Future<Output = Vec<PodState>> + Send;

    /// The pinned maps.
    fn maps(&self) -> impl Future<Output = Result<MapList, ApiError>> + Send;
}

impl From<ServiceList> for v1::ListServicesResponse {
    fn from(list: ServiceList) -> Self {
        Self {
            frontends: list
                .frontends
                .into_iter()
                .map(|f| v1::ServiceFrontend {
                    namespace: f.service.namespace,
                    name: f.service.name,
                    port_name: f.port_name,
                    r#type: f.kind.as_str().to_owned(),
                    address: f.key.vip.to_string(),
                    port: u32::from(f.key.port),
                    protocol: f.key.protocol.as_k8s().to_owned(),
                    session_affinity: if f.affinity_timeout_s.is_some() {
                        "ClientIP"
                    } else {
                        "None"
                    }
                    .to_owned(),
                    affinity_timeout_seconds: f.affinity_timeout_s.unwrap_or(0),
                    backends: saturating_u32(f.backends),
                })
                .collect(),
            skipped: list
                .skipped
                .into_iter()
                .map(|s| v1::SkippedService {
                    namespace: s.service.namespace,
                    name: s.service.name,
                    port_name: s.port_name.unwrap_or_default(),
                    reason: s.reason,
                })
                .collect(),
        }
    }
}

impl From<PortEndpoints> for v1::ServicePortEndpoints {
    fn from(port: PortEndpoints) -> Self {
        Self {
            namespace: port.service.namespace,
            name: port.service.name,
            port_name: port.port_name,
            protocol: port.protocol.as_k8s().to_owned(),
            endpoints: port
                .endpoints
                .into_iter()
                .map(|(e, selected)| v1::EndpointStatus {
                    address: e.addr.ip().to_string(),
                    port: u32::from(e.addr.port()),
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    selected,
                })
                .collect(),
        }
    }
}

impl From<PolicyList> for v1::ListPoliciesResponse {
    fn from(list: PolicyList) -> Self {
        Self {
            policies: list
                .policies
                .into_iter()
                .map(|p| v1::PolicyInForce {
                    namespace: p.policy.namespace,
                    name: p.policy.name,
                    policy_types: p.types,
                    selected_pods: p.selected_pods,
                    ingress_rules: saturating_u32(p.ingress_rules),
                    egress_rules: saturating_u32(p.egress_rules),
                    errors: p.errors,
                })
                .collect(),
            rejected: list.rejected,
        }
    }
}

impl From<TcMode> for v1::TcAttachment {
    fn from(mode: TcMode) -> Self {
        match mode {
            TcMode::Tcx => Self {
                mode: "tcx".into(),
                priority: 0,
                handle: 0,
            },
            TcMode::Netlink { priority, handle } => Self {
                mode: "cls_bpf".into(),
                priority: u32::from(priority),
                handle,
            },
        }
    }
}

impl From<PodState> for v1::PodStatus {
    fn from(state: PodState) -> Self {
        let pod = state.pod;
        Self {
            namespace: pod.namespace,
            name: pod.name,
            container_id: pod.container_id,
            ips: pod.ips.iter().map(ToString::to_string).collect(),
            ifname: pod.ifname,
            host_ifname: pod.host_ifname,
            netns: pod.netns,
            from_pod: Some(state.from_pod.into()),
            to_pod: Some(state.to_pod.into()),
            ingress_isolated: state.ingress_isolated,
            egress_isolated: state.egress_isolated,
            ingress: Some(traffic(
                &state.counters,
                &state.counters.traffic.ingress,
                ferrovia_common::POL_DIR_INGRESS,
            )),
            egress: Some(traffic(
                &state.counters,
                &state.counters.traffic.egress,
                ferrovia_common::POL_DIR_EGRESS,
            )),
        }
    }
}

/// One direction of a pod's counters, with its policy verdicts summed by outcome.
fn traffic(
    counters: &crate::metrics::PodMetrics,
    d: &ferrovia_common::DirStats,
    dir: u8,
) -> v1::PodTraffic {
    let verdicts = |allowed: bool| {
        counters
            .verdicts
            .iter()
            .filter(|((d, reason), _)| {
                *d == dir && ferrovia_common::verdict::allows(*reason) == allowed
            })
            .map(|(_, packets)| packets)
            .sum()
    };
    v1::PodTraffic {
        packets: d.packets,
        bytes: d.bytes,
        connections_tcp: d.conns_tcp,
        connections_udp: d.conns_udp,
        malformed: d.malformed,
        drops_policy_denied: d.drop_policy,
        drops_no_endpoints: d.drop_no_endpoints,
        drops_conntrack_full: d.drop_ct_full,
        drops_translation_error: d.drop_xlate_error,
        policy_allowed: verdicts(true),
        policy_denied: verdicts(false),
    }
}

impl From<MapList> for v1::GetMapsResponse {
    fn from(list: MapList) -> Self {
        Self {
            bpffs_root: list.bpffs_root.display().to_string(),
            maps: list
                .maps
                .into_iter()
                .map(|m| {
                    let mut out = v1::PinnedMap {
                        name: m.name.to_owned(),
                        pin: m.pin.display().to_string(),
                        ..Default::default()
                    };
                    match m.stats {
                        Ok(s) => {
                            out.fill = s.fill();
                            out.id = s.id;
                            out.r#type = s.kind;
                            out.key_size = s.key_size;
                            out.value_size = s.value_size;
                            out.max_entries = s.max_entries;
                            out.entries = s.entries;
                        }
                        Err(e) => out.error = e,
                    }
                    out
                })
                .collect(),
        }
    }
}
