//! From a previous plugin's result to the pod the agent registers.
use super::env::PodIdentity;
use super::spec::{CniError, ErrorCode, PrevResult};
use crate::api::PodRegistration;

/// Where the pod is, from the runtime's view (`CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`).
#[derive(Clone, Copy, Debug)]
pub struct Attachment<'a> {
    pub container_id: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
}

/// Finds the pod's interfaces and addresses in `prev` and builds its registration.
///
/// - The container interface is the one named `ifname` in a sandbox, preferring the
///   sandbox `netns` (a runtime may spell the namespace path differently from the plugin,
///   so a single candidate by name is accepted too).
/// - The host interface is the last host-side (sandbox-less) interface listed before it:
///   `ptp` lists `[host veth, container]`, `bridge` lists `[bridge, host veth, container]`,
///   and plugins chained later append theirs (`bandwidth`'s ifb) after the container's.
/// - The addresses are those whose `interface` index is the container interface's, or
///   that carry no index (the field is optional in the spec).
pub fn registration(
    prev: &PrevResult,
    at: Attachment<'_>,
    pod: PodIdentity,
) -> Result<PodRegistration, CniError> {
    let in_pod: Vec<usize> = (0..prev.interfaces.len())
        .filter(|&i| prev.interfaces[i].in_sandbox() && prev.interfaces[i].name == at.ifname)
        .collect();
    let container = in_pod
        .iter()
        .copied()
        .find(|&i| prev.interfaces[i].sandbox.as_deref() == Some(at.netns))
        .or_else(|| (in_pod.len() == 1).then(|| in_pod[0]))
        .ok_or_else(|| {
            invalid(format!(
                "prevResult has no interface {} in sandbox {}: {}",
                at.ifname,
                at.netns,
                describe(prev)
            ))
        })?;

    let host = prev.interfaces[..container]
        .iter()
        .rposition(|i| !i.in_sandbox())
        .or_else(|| {
            let mut on_host =
                (0..prev.interfaces.len()).filter(|&i| !prev.interfaces[i].in_sandbox());
            on_host.next().filter(|_| on_host.next().is_none())
        })
        .ok_or_else(|| {
            invalid(format!(
                "prevResult has no host-side interface for {}: ferrovia needs a veth-based \
                 plugin before it (ptp, bridge): {}",
                at.ifname,
                describe(prev)
            ))
        })?;

    let ips: Vec<_> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none_or(|i| i == container))
        .map(|ip| ip.address.addr())
        .collect();
    if ips.is_empty() {
        return Err(invalid(format!(
            "prevResult has no IP address on interface {}: chain ferrovia-cni after the plugin \
             that does IPAM",
            at.ifname
        )));
    }

    Ok(PodRegistration {
        container_id: at.container_id.to_owned(),
        netns: at.netns.to_owned(),
        namespace: pod.namespace,
        name: pod.name,
        ifname: at.ifname.to_owned(),
        host_ifname: prev.interfaces[host].name.clone(),
        ips,
    })
}

fn invalid(msg: String) -> CniError {
    CniError::new(ErrorCode::InvalidConfig, msg)
}

/// `[veth1(host), eth0(/var/run/netns/x)]`, for error messages.
fn describe(prev: &PrevResult) -> String {
    let names: Vec<String> = prev
        .interfaces
        .iter()
        .map(|i| {
            format!(
                "{}({})",
                i.name,
                i.sandbox
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .unwrap_or("host")
            )
        })
        .collect();
    format!("interfaces [{}]", names.join(", "))
}
