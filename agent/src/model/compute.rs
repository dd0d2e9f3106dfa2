//! Services in, frontends out: kube-proxy's service semantics for `ClusterIP` frontends.

use std::collections::btree_map::Entry;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::endpoints::{self, proxied_by_us};
use super::{ClusterState, Desired, Frontend, FrontendKey, ObjRef, PodIps, Protocol, Skipped};

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset: 3 hours, as upstream.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// Computes the frontends for every service of `state`.
///
/// Pure: the same inputs always give the same output. `pod_ips` are the pod IPs the CNI plugin
/// registered, used for pods whose manifest carries no IP in its status.
#[must_use]
pub fn compute(state: &ClusterState, pod_ips: &PodIps) -> Desired {
    let mut desired = Desired::default();
    let slices = endpoints::SliceIndex::new(state);
    for (key, service) in &state.services {
        add_service(&mut desired, state, &slices, pod_ips, key, service);
    }
    desired
}

fn add_service(
    desired: &mut Desired,
    state: &ClusterState,
    slices: &endpoints::SliceIndex<'_>,
    pod_ips: &PodIps,
    key: &ObjRef,
    service: &Service,
) {
    let Some(spec) = service.spec.as_ref() else {
        return;
    };
    let skip = |desired: &mut Desired, port_name: Option<&str>, reason: String| {
        desired.skipped.push(Skipped {
            service: key.clone(),
            port_name: port_name.map(str::to_owned),
            reason,
        });
    };
    if !proxied_by_us(service.metadata.labels.as_ref()) {
        skip(
            desired,
            None,
            "labelled for another service proxy".to_owned(),
        );
        return;
    }
    if spec.type_.as_deref() == Some("ExternalName") {
        return;
    }
    let Some(vips) = cluster_ips(spec) else {
        return;
    }; // headless: DNS only, no VIP
    if vips.is_empty() {
        // In a cluster the API server allocates one; in manifests mode nothing does.
        skip(desired, None, "no spec.clusterIP".to_owned());
        return;
    }
    let mut parsed = Vec::with_capacity(vips.len());
    for vip in vips {
        match vip.parse::<IpAddr>() {
            Ok(ip) => parsed.push(ip),
            Err(_) => skip(desired, None, format!("invalid cluster IP {vip:?}")),
        }
    }
    let affinity_timeout_s = affinity_timeout_s(spec);
    let has_selector = spec.selector.as_ref().is_some_and(|s| !s.is_empty());

    for port in spec.ports.iter().flatten() {
        let port_name = port.name.as_deref().unwrap_or("");
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                skip(
                    desired,
                    Some(port_name),
                    format!("protocol {other} is not supported"),
                );
                continue;
            }
        };
        let Some(number) = u16::try_from(port.port).ok().filter(|&n| n != 0) else {
            skip(
                desired,
                Some(port_name),
                format!("invalid port {}", port.port),
            );
            continue;
        };
        for &vip in &parsed {
            // kube-proxy consumes every EndpointSlice labelled with the service's name,
            // whoever wrote it; for a service with a selector, ferrovia (in manifests mode)
            // also plays the EndpointSlice controller and derives endpoints from the pods.
            let mut candidates =
                endpoints::from_slices(slices, key, port_name, protocol, vip.is_ipv4());
            if has_selector {
                candidates.extend(endpoints::from_pods(
                    state,
                    pod_ips,
                    &key.namespace,
                    spec,
                    port,
                    protocol,
                    vip.is_ipv4(),
                ));
            }
            let frontend = Frontend {
                service: key.clone(),
                port_name: port_name.to_owned(),
                affinity_timeout_s,
                backends: endpoints::select(&candidates),
            };
            let fkey = FrontendKey {
                vip,
                port: number,
                protocol,
            };
            match desired.frontends.entry(fkey) {
                Entry::Vacant(slot) => {
                    slot.insert(frontend);
                }
                // Services are visited in key order, so the same one always wins.
                Entry::Occupied(taken) => {
                    let reason = format!(
                        "{} is already served by {}",
                        taken.key(),
                        taken.get().service
                    );
                    skip(desired, Some(port_name), reason);
                }
            }
        }
    }
    // Extension point: NodePort (node addresses × spec.ports[].nodePort), LoadBalancer
    // (status.loadBalancer.ingress) and spec.externalIPs frontends are added here, over the
    // same candidates but filtered by externalTrafficPolicy.
}

/// The service's cluster IPs (`spec.clusterIPs`, else `spec.clusterIP`), or `None` for a
/// headless service. Empty when none is set.
fn cluster_ips(spec: &ServiceSpec) -> Option<Vec<&str>> {
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_deref());
    }
    ips.retain(|ip| !ip.is_empty());
    if ips.contains(&"None") {
        None
    } else {
        Some(ips)
    }
}

fn affinity_timeout_s(spec: &ServiceSpec) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let configured = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    Some(
        configured
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S),
    )
}
