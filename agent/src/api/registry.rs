//! The contract between the API and the agent: [`PodRegistry`] and its plain types, plus
//! their conversions from and to the generated protobuf messages.
use std::future::Future;
use std::net::IpAddr;

use ferrovia_proto::v1;

/// A pod whose interfaces the cluster's CNI plugin has just created (CNI ADD).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRegistration {
    /// The runtime's container (sandbox) id: the key of the registration.
    pub container_id: String,
    /// Path of the pod's network namespace.
    pub netns: String,
    /// Kubernetes namespace of the pod; empty when the runtime did not say (not Kubernetes).
    pub namespace: String,
    /// Kubernetes name of the pod; empty when the runtime did not say.
    pub name: String,
    /// Interface name inside the pod (usually `eth0`).
    pub ifname: String,
    /// Host-side end of the pod's veth, where the per-pod tc programs attach.
    pub host_ifname: String,
    /// The pod's addresses (at least one).
    pub ips: Vec<IpAddr>,
}

/// One BPF program the agent manages and where it is attached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgramState {
    /// The program's name in the BPF object (e.g. `from_pod`).
    pub name: String,
    /// Where it is attached (a cgroup path, `tc ingress veth1234`); `None` when detached.
    pub attach_point: Option<String>,
}

/// A summary of the agent's state, answered by `Status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStatus {
    pub node_name: String,
    /// Pods registered through the CNI plugin.
    pub pods: usize,
    /// Service frontends (address, port, protocol) programmed into the maps.
    pub frontends: usize,
    /// Whether the socket-level load balancer is attached.
    pub socket_lb: bool,
    pub programs: Vec<ProgramState>,
    /// What runs degraded on this kernel, one line each.
    pub degraded: Vec<String>,
}

/// Why a request failed; each variant is one gRPC status code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    /// The request is malformed (`INVALID_ARGUMENT`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The pod is not registered (`NOT_FOUND`).
    #[error("not found: {0}")]
    NotFound(String),
    /// The pod is registered but not (yet) in the state asked for, e.g. its programs are
    /// not attached (`FAILED_PRECONDITION`).
    #[error("not ready: {0}")]
    NotReady(String),
    /// The agent failed to do its part, e.g. a map write or an attach (`INTERNAL`).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// An [`ApiError::Internal`] from any error, keeping an `anyhow` chain (`{:#}`).
    pub fn internal(err: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{err:#}"))
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::InvalidArgument(msg) => tonic::Status::invalid_argument(msg),
            ApiError::NotFound(msg) => tonic::Status::not_found(msg),
            ApiError::NotReady(msg) => tonic::Status::failed_precondition(msg),
            ApiError::Internal(msg) => tonic::Status::internal(msg),
        }
    }
}

/// What the API needs from the agent: implemented by the datapath driver.
///
/// The methods are called concurrently from the server's tasks; an implementation
/// serializes what must be serialized itself.
pub trait PodRegistry: Send + Sync + 'static {
    /// Attaches the pod's programs and records its addresses. Registering a container id
    /// again replaces the earlier registration (a runtime may retry ADD).
    fn register(&self, pod: PodRegistration) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Forgets a pod. Idempotent: an unknown container id is `Ok` (CNI DEL may be repeated).
    fn unregister(&self, container_id: &str) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// `Ok` when the pod is registered and its programs are attached; [`ApiError::NotFound`]
    /// for an unknown container id, [`ApiError::NotReady`] when something is missing.
    fn check(&self, container_id: &str) -> impl Future<Output = Result<(), ApiError>> + Send;

    fn status(&self) -> impl Future<Output = AgentStatus> + Send;

    /// Re-reads the desired-state source now and returns once the maps reflect it, with the
    /// source's current rejections (one line each).
    fn sync(&self) -> impl Future<Output = Result<Vec<String>, ApiError>> + Send;
}

/// Linux's `IFNAMSIZ` minus the terminating NUL: a longer name cannot exist.
const MAX_IFNAME_LEN: usize = 15;

impl TryFrom<v1::RegisterPodRequest> for PodRegistration {
    type Error = ApiError;

    /// Validates what the datapath relies on: a container id, a host interface name the
    /// kernel could have, and at least one parseable address.
    fn try_from(req: v1::RegisterPodRequest) -> Result<Self, ApiError> {
        if req.container_id.is_empty() {
            return Err(ApiError::InvalidArgument("container_id is empty".into()));
        }
        if req.host_ifname.is_empty() || req.host_ifname.len() > MAX_IFNAME_LEN {
            return Err(ApiError::InvalidArgument(format!(
                "host_ifname {:?} is not a valid interface name",
                req.host_ifname
            )));
        }
        if req.ips.is_empty() {
            return Err(ApiError::InvalidArgument(format!(
                "pod {} has no IP address",
                req.container_id
            )));
        }
        let ips = req
            .ips
            .iter()
            .map(|ip| {
                ip.parse().map_err(|_| {
                    ApiError::InvalidArgument(format!(
                        "{ip:?} is not an IP address (expected one without prefix length)"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            container_id: req.container_id,
            netns: req.netns,
            namespace: req.pod_namespace,
            name: req.pod_name,
            ifname: req.ifname,
            host_ifname: req.host_ifname,
            ips,
        })
    }
}

impl From<PodRegistration> for v1::RegisterPodRequest {
    fn from(pod: PodRegistration) -> Self {
        Self {
            container_id: pod.container_id,
            netns: pod.netns,
            pod_namespace: pod.namespace,
            pod_name: pod.name,
            ifname: pod.ifname,
            host_ifname: pod.host_ifname,
            ips: pod.ips.iter().map(ToString::to_string).collect(),
        }
    }
}

impl From<AgentStatus> for v1::StatusResponse {
    fn from(status: AgentStatus) -> Self {
        Self {
            node_name: status.node_name,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            pods: saturating_u32(status.pods),
            frontends: saturating_u32(status.frontends),
            socket_lb: status.socket_lb,
            programs: status
                .programs
                .into_iter()
                .map(|p| v1::ProgramStatus {
                    name: p.name,
                    attached: p.attach_point.is_some(),
                    attach_point: p.attach_point.unwrap_or_default(),
                })
                .collect(),
            degraded: status.degraded,
        }
    }
}

/// The client side's view of a `StatusResponse` (the agent version is dropped: it is the
/// server's, read it from the response when needed).
impl From<v1::StatusResponse> for AgentStatus {
    fn from(resp: v1::StatusResponse) -> Self {
        Self {
            node_name: resp.node_name,
            pods: resp.pods as usize,
            frontends: resp.frontends as usize,
            socket_lb: resp.socket_lb,
            programs: resp
                .programs
                .into_iter()
                .map(|p| ProgramState {
                    name: p.name,
                    attach_point: p.attached.then_some(p.attach_point),
                })
                .collect(),
            degraded: resp.degraded,
        }
    }
}

pub(super) fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
