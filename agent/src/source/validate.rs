//! The checks the API server would make before accepting an object, for the fields the model
//! reads: a manifests directory has no API server in front of it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Container, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::endpoints::SERVICE_NAME_LABEL;

/// A problem with one field of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// A JSON path like `spec.ports[0].port`; empty for the object as a whole.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[must_use]
pub fn service(service: &Service) -> Vec<FieldError> {
    let mut out = Vec::new();
    let Some(spec) = &service.spec else {
        return out;
    };
    if let Some(ip) = &spec.cluster_ip {
        cluster_ip(&mut out, "spec.clusterIP", ip);
    }
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        cluster_ip(&mut out, &format!("spec.clusterIPs[{i}]"), ip);
    }
    if let (Some(ip), Some(first)) = (
        &spec.cluster_ip,
        spec.cluster_ips.as_ref().and_then(|ips| ips.first()),
    ) && !ip.is_empty()
        && ip != first
    {
        out.push(FieldError::new(
            "spec.clusterIPs[0]",
            format!("{first:?} must equal spec.clusterIP {ip:?}"),
        ));
    }
    one_of(
        &mut out,
        "spec.type",
        spec.type_.as_deref(),
        &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
    );
    one_of(
        &mut out,
        "spec.sessionAffinity",
        spec.session_affinity.as_deref(),
        &["None", "ClientIP"],
    );
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    if let Some(t) = timeout.filter(|t| !(1..=86_400).contains(t)) {
        out.push(FieldError::new(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            format!("{t} is out of range 1..=86400"),
        ));
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, sp) in ports.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        required_port(&mut out, &field("port"), sp.port);
        protocol(&mut out, &field("protocol"), sp.protocol.as_deref());
        match &sp.target_port {
            Some(IntOrString::Int(n)) => port(&mut out, &field("targetPort"), *n),
            Some(IntOrString::String(name)) if !is_iana_svc_name(name) => {
                out.push(FieldError::new(
                    field("targetPort"),
                    format!(
                        "{name:?} is neither a port number nor a valid port name (IANA_SVC_NAME)"
                    ),
                ));
            }
            _ => {}
        }
        if let Some(n) = sp.node_port {
            port(&mut out, &field("nodePort"), n);
        }
        let name = sp.name.as_deref().unwrap_or("");
        // EndpointSlices are matched to service ports by name: several must be told apart.
        if ports.len() > 1 && name.is_empty() {
            out.push(FieldError::new(
                field("name"),
                "required when the service has more than one port",
            ));
        } else if !names.insert(name) {
            out.push(FieldError::new(
                field("name"),
                format!("duplicate port name {name:?}"),
            ));
        }
        if !numbers.insert((sp.port, sp.protocol.as_deref().unwrap_or("TCP"))) {
            out.push(FieldError::new(
                field("port"),
                format!("duplicate port {} for this protocol", sp.port),
            ));
        }
    }
    out
}

#[must_use]
pub fn endpoint_slice(slice: &EndpointSlice) -> Vec<FieldError> {
    let mut out = Vec::new();
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL));
    if service.is_none_or(String::is_empty) {
        out.push(FieldError::new(
            format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
            "required: it names the Service this slice belongs to",
        ));
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(true),
        "IPv6" => Some(false),
        "FQDN" => None, // valid, and ignored by kube-proxy and ferrovia
        other => {
            out.push(FieldError::new(
                "addressType",
                format!("{other:?} is not one of IPv4, IPv6, FQDN"),
            ));
            None
        }
    };
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        if endpoint.addresses.is_empty() {
            out.push(FieldError::new(
                format!("endpoints[{i}].addresses"),
                "at least one address is required",
            ));
        }
        for (j, address) in endpoint.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            match family {
                Some(true) if address.parse::<Ipv4Addr>().is_err() => {
                    out.push(FieldError::new(
                        field,
                        format!("{address:?} is not an IPv4 address (addressType IPv4)"),
                    ));
                }
                Some(false) if address.parse::<Ipv6Addr>().is_err() => {
                    out.push(FieldError::new(
                        field,
                        format!("{address:?} is not an IPv6 address (addressType IPv6)"),
                    ));
                }
                _ => {}
            }
        }
    }
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(n) = p.port {
            port(&mut out, &format!("ports[{i}].port"), n);
        }
        protocol(
            &mut out,
            &format!("ports[{i}].protocol"),
            p.protocol.as_deref(),
        );
    }
    out
}

#[must_use]
pub fn pod(pod: &Pod) -> Vec<FieldError> {
    let mut out = Vec::new();
    if let Some(spec) = &pod.spec {
        containers(&mut out, "spec.containers", &spec.containers);
        containers(
            &mut out,
            "spec.initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        );
    }
    if let Some(status) = &pod.status {
        if let Some(ip) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty()) {
            address(&mut out, "status.podIP", ip);
        }
        for (i, ip) in status.pod_ips.iter().flatten().enumerate() {
            address(&mut out, &format!("status.podIPs[{i}].ip"), &ip.ip);
        }
    }
    out
}

fn containers(out: &mut Vec<FieldError>, field: &str, containers: &[Container]) {
    for (i, container) in containers.iter().enumerate() {
        for (j, p) in container.ports.iter().flatten().enumerate() {
            let field = |f: &str| format!("{field}[{i}].ports[{j}].{f}");
            required_port(out, &field("containerPort"), p.container_port);
            if let Some(n) = p.host_port {
                port(out, &field("hostPort"), n);
            }
            protocol(out, &field("protocol"), p.protocol.as_deref());
        }
    }
}

fn port(out: &mut Vec<FieldError>, field: &str, n: i32) {
    if !(1..=65_535).contains(&n) {
        out.push(FieldError::new(
            field,
            format!("{n} is out of range 1..=65535"),
        ));
    }
}

/// A port the object must have: k8s-openapi reads a missing one as 0.
fn required_port(out: &mut Vec<FieldError>, field: &str, n: i32) {
    if n == 0 {
        out.push(FieldError::new(field, "required, in range 1..=65535"));
    } else {
        port(out, field, n);
    }
}

fn protocol(out: &mut Vec<FieldError>, field: &str, protocol: Option<&str>) {
    one_of(out, field, protocol, &["TCP", "UDP", "SCTP"]);
}

fn one_of(out: &mut Vec<FieldError>, field: &str, value: Option<&str>, allowed: &[&str]) {
    if let Some(value) = value.filter(|v| !allowed.contains(v)) {
        out.push(FieldError::new(
            field,
            format!("{value:?} is not one of {}", allowed.join(", ")),
        ));
    }
}

/// A cluster IP: an IP, `None` (headless) or empty (unallocated).
fn cluster_ip(out: &mut Vec<FieldError>, field: &str, ip: &str) {
    if !ip.is_empty() && ip != "None" {
        address(out, field, ip);
    }
}

fn address(out: &mut Vec<FieldError>, field: &str, ip: &str) {
    if ip.parse::<IpAddr>().is_err() {
        out.push(FieldError::new(
            field,
            format!("{ip:?} is not a valid IP address"),
        ));
    }
}

/// RFC 6335 service name, as Kubernetes' `IsValidPortName`: at most 15 characters of `a-z`,
/// `0-9` and `-`, at least one letter, no leading, trailing or doubled hyphen.
#[must_use]
pub fn is_iana_svc_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}
