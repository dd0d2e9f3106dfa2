//! Endpoints of one service port: computed from pods (services with a selector, where ferrovia
//! plays the `EndpointSlice` controller) or read from `EndpointSlice`s (services without one), then
//! selected as kube-proxy does.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Container, Pod, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ClusterState, ObjRef, PodIps, Protocol};

/// The label tying an `EndpointSlice` to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Objects with this label belong to another service proxy: kube-proxy ignores them, so do we.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set on the `EndpointSlice`s of headless services, which no proxy serves.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// One candidate endpoint with the `EndpointSlice` conditions kube-proxy decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// Whether kube-proxy (and so ferrovia) handles an object with these labels, as its informers'
/// label selector (`!service-proxy-name,!headless`) decides.
#[must_use]
pub fn proxied_by_us(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels.is_none_or(|l| {
        !l.contains_key(SERVICE_PROXY_NAME_LABEL) && !l.contains_key(HEADLESS_LABEL)
    })
}

/// kube-proxy's selection (`CategorizeEndpoints`): the ready endpoints; only when none is ready,
/// the ones that are serving and terminating (graceful termination, KEP-1669).
#[must_use]
pub fn select(endpoints: &[Endpoint]) -> Vec<SocketAddr> {
    let mut chosen: Vec<SocketAddr> = endpoints
        .iter()
        .filter(|e| e.ready)
        .map(|e| e.addr)
        .collect();
    if chosen.is_empty() {
        chosen = endpoints
            .iter()
            .filter(|e| e.serving && e.terminating)
            .map(|e| e.addr)
            .collect();
    }
    chosen.sort_unstable();
    chosen.dedup();
    chosen
}

/// What the `EndpointSlice` controller would publish for `port` of a service with a selector:
/// one endpoint per pod matching it that has an IP of the VIP's family and resolves the target port.
#[must_use]
pub fn from_pods(
    state: &ClusterState,
    pod_ips: &PodIps,
    namespace: &str,
    spec: &ServiceSpec,
    port: &ServicePort,
    protocol: Protocol,
    ipv4: bool,
) -> Vec<Endpoint> {
    let Some(selector) = spec.selector.as_ref() else {
        return Vec::new();
    };
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    ClusterState::in_namespace(&state.pods, namespace)
        .filter(|(_, pod)| matches_selector(pod, selector))
        .filter(|(_, pod)| !is_terminal(pod))
        .filter_map(|(key, pod)| {
            let ip = pod_ip(pod, key, pod_ips, ipv4)?;
            let target = target_port(port, pod, protocol)?;
            // As the controller's podToEndpoint: "ready" is never true while terminating,
            // unless the service publishes not-ready addresses.
            let serving = is_ready(pod);
            let terminating = pod.metadata.deletion_timestamp.is_some();
            Some(Endpoint {
                addr: SocketAddr::new(ip, target),
                ready: publish_not_ready || (serving && !terminating),
                serving,
                terminating,
            })
        })
        .collect()
}

/// The `EndpointSlice`s of a snapshot by the service they belong to (their
/// `kubernetes.io/service-name` label), built once per [`super::compute`] so that finding a
/// service's slices does not scan every slice of its namespace (which made a sync quadratic
/// in the number of services).
#[derive(Default)]
pub struct SliceIndex<'a> {
    /// Namespace → service name → slices.
    by_service: HashMap<&'a str, HashMap<&'a str, Vec<&'a EndpointSlice>>>,
}

impl<'a> SliceIndex<'a> {
    #[must_use]
    pub fn new(state: &'a ClusterState) -> Self {
        let mut by_service: HashMap<&str, HashMap<&str, Vec<&EndpointSlice>>> = HashMap::new();
        for (key, slice) in &state.endpoint_slices {
            let labels = slice.metadata.labels.as_ref();
            if let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL))
                && proxied_by_us(labels)
            {
                by_service
                    .entry(key.namespace.as_str())
                    .or_default()
                    .entry(service.as_str())
                    .or_default()
                    .push(&**slice);
            }
        }
        Self { by_service }
    }

    /// The slices labelled for `svc`, in name order.
    #[must_use]
    pub fn of(&self, svc: &ObjRef) -> &[&'a EndpointSlice] {
        self.by_service
            .get(svc.namespace.as_str())
            .and_then(|services| services.get(svc.name.as_str()))
            .map_or(&[], Vec::as_slice)
    }
}

/// The endpoints that the `EndpointSlice`s of service `svc` list for the service port named
/// `port_name` with `protocol`, of the VIP's family — kube-proxy's `EndpointSliceCache`.
#[must_use]
pub fn from_slices(
    slices: &SliceIndex<'_>,
    svc: &ObjRef,
    port_name: &str,
    protocol: Protocol,
    ipv4: bool,
) -> Vec<Endpoint> {
    let address_type = if ipv4 { "IPv4" } else { "IPv6" };
    slices
        .of(svc)
        .iter()
        .copied()
        .filter(|slice| slice.address_type == address_type)
        .filter_map(|slice| Some((slice, slice_port(slice, port_name, protocol)?)))
        .flat_map(|(slice, target)| {
            slice.endpoints.iter().filter_map(move |ep| {
                // kube-proxy only ever uses the first address of an endpoint.
                let ip: IpAddr = ep.addresses.first()?.parse().ok()?;
                if ip.is_ipv4() != ipv4 {
                    return None;
                }
                let conditions = ep.conditions.as_ref();
                // API contract (and kube-proxy): ready nil ⇒ true, serving nil ⇒ true,
                // terminating nil ⇒ false.
                Some(Endpoint {
                    addr: SocketAddr::new(ip, target),
                    ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                    serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                    terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                })
            })
        })
        .collect()
}

/// The port number a slice lists under the service port's name and protocol. A missing name or
/// protocol is what the API server would default it to (`""`, TCP).
fn slice_port(slice: &EndpointSlice, port_name: &str, protocol: Protocol) -> Option<u16> {
    slice.ports.as_ref()?.iter().find_map(|p| {
        let same = p.name.as_deref().unwrap_or("") == port_name
            && p.protocol.as_deref().unwrap_or("TCP") == protocol.as_k8s();
        same.then_some(p.port)
            .flatten()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n != 0)
    })
}

fn matches_selector(pod: &Pod, selector: &BTreeMap<String, String>) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// Succeeded or Failed: the pod will never serve again.
/// Who has each IPv4 address, as far as the agent knows: the pods this node registered
/// (`local`, `true`), then other pods by their status — not host-network pods (they have
/// their node's address) nor finished ones (their address may have passed on).
#[must_use]
pub fn pods_by_ipv4(
    state: &ClusterState,
    local: &PodIps,
) -> BTreeMap<std::net::Ipv4Addr, (ObjRef, bool)> {
    let mut names = BTreeMap::new();
    for (pod, ips) in local {
        for ip in ips {
            if let IpAddr::V4(v4) = ip {
                names.entry(*v4).or_insert_with(|| (pod.clone(), true));
            }
        }
    }
    for (key, pod) in &state.pods {
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        if host_network || is_terminal(pod) {
            continue;
        }
        if let Some(IpAddr::V4(v4)) = pod_ip(pod, key, local, true) {
            names.entry(v4).or_insert_with(|| (key.clone(), false));
        }
    }
    names
}

pub(crate) fn is_terminal(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// The pod's Ready condition. Unlike upstream (no condition ⇒ not ready), a pod without one is
/// ready: in manifests mode nothing writes pod status, and a pod written there is meant to run.
fn is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_none_or(|c| c.status == "True")
}

/// The pod's first IP of the wanted family: from its status when the manifest has one
/// (`podIPs`, else `podIP`, as the controller reads them), else from the CNI registration.
pub(crate) fn pod_ip(pod: &Pod, key: &ObjRef, pod_ips: &PodIps, ipv4: bool) -> Option<IpAddr> {
    let status = pod.status.as_ref();
    let mut listed: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .filter(|ip| !ip.is_empty())
        .collect();
    if listed.is_empty() {
        listed.extend(
            status
                .and_then(|s| s.pod_ip.as_deref())
                .filter(|ip| !ip.is_empty()),
        );
    }
    if listed.is_empty() {
        return pod_ips
            .get(key)?
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == ipv4);
    }
    listed
        .into_iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .find(|ip| ip.is_ipv4() == ipv4)
}

/// The endpoint port for `port` on `pod`: the numeric `targetPort` (default: `port`), or the
/// pod's container port of that name and protocol (`FindPort` upstream: regular containers,
/// then sidecars, i.e. init containers with `restartPolicy: Always`).
fn target_port(port: &ServicePort, pod: &Pod, protocol: Protocol) -> Option<u16> {
    let number = match &port.target_port {
        None => port.port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => {
            return named_container_port(pod, name, protocol.as_k8s());
        }
    };
    u16::try_from(number).ok().filter(|&n| n != 0)
}

/// The pod's container port named `name` for `protocol` (`"TCP"`, `"UDP"`, `"SCTP"`), as
/// `FindPort` upstream: regular containers, then sidecars (init containers with
/// `restartPolicy: Always`).
pub(crate) fn named_container_port(pod: &Pod, name: &str, protocol: &str) -> Option<u16> {
    let spec = pod.spec.as_ref()?;
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let number = spec
        .containers
        .iter()
        .chain(sidecars)
        .find_map(|c| named_port(c, name, protocol))?;
    u16::try_from(number).ok().filter(|&n| n != 0)
}

fn named_port(container: &Container, name: &str, protocol: &str) -> Option<i32> {
    container.ports.iter().flatten().find_map(|p| {
        let same =
            p.name.as_deref() == Some(name) && p.protocol.as_deref().unwrap_or("TCP") == protocol;
        same.then_some(p.container_port)
    })
}
