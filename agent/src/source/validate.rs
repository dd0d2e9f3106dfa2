//! The checks the API server would make before accepting an object, for the fields the model
//! reads: a manifests directory has no API server in front of it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Container, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
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
        if let Some(target) = &sp.target_port {
            number_or_name(&mut out, &field("targetPort"), target);
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

/// The API server's `ValidateNetworkPolicySpec`: selectors, peers, ports and policy types.
#[must_use]
pub fn network_policy(policy: &NetworkPolicy) -> Vec<FieldError> {
    let mut out = Vec::new();
    let Some(spec) = &policy.spec else {
        return out;
    };
    if let Some(selector) = &spec.pod_selector {
        label_selector(&mut out, "spec.podSelector", selector);
    }
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let field = format!("spec.ingress[{i}]");
        policy_ports(&mut out, &field, rule.ports.as_deref());
        peers(&mut out, &format!("{field}.from"), rule.from.as_deref());
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let field = format!("spec.egress[{i}]");
        policy_ports(&mut out, &field, rule.ports.as_deref());
        peers(&mut out, &format!("{field}.to"), rule.to.as_deref());
    }
    policy_types(&mut out, spec.policy_types.as_deref().unwrap_or_default());
    out
}

/// Stricter than the API server, which lets a type repeat: a repeated one is a typo for the other.
fn policy_types(out: &mut Vec<FieldError>, types: &[String]) {
    const ALLOWED: &[&str] = &["Ingress", "Egress"];
    if types.len() > ALLOWED.len() {
        out.push(FieldError::new(
            "spec.policyTypes",
            format!(
                "{} entries: at most Ingress and Egress, once each",
                types.len()
            ),
        ));
        return;
    }
    for (i, t) in types.iter().enumerate() {
        let field = format!("spec.policyTypes[{i}]");
        if types[..i].contains(t) {
            out.push(FieldError::new(field, format!("duplicate {t:?}")));
        } else {
            one_of(out, &field, Some(t), ALLOWED);
        }
    }
}

/// `field` is a rule's path: `spec.ingress[0]`.
fn policy_ports(out: &mut Vec<FieldError>, field: &str, ports: Option<&[NetworkPolicyPort]>) {
    for (i, p) in ports.unwrap_or_default().iter().enumerate() {
        policy_port(out, &format!("{field}.ports[{i}]"), p);
    }
}

fn policy_port(out: &mut Vec<FieldError>, field: &str, p: &NetworkPolicyPort) {
    let field = |f: &str| format!("{field}.{f}");
    protocol(out, &field("protocol"), p.protocol.as_deref());
    if let Some(start) = &p.port {
        number_or_name(out, &field("port"), start);
    }
    let Some(end) = p.end_port else {
        return;
    };
    let problem = match &p.port {
        None => "requires port, the start of the range".to_owned(),
        Some(IntOrString::String(name)) => format!(
            "may not be specified when port is a named port ({name:?}): a range needs a numeric port"
        ),
        Some(IntOrString::Int(start)) if !(*start..=65_535).contains(&end) => {
            format!("{end} is out of range {start}..=65535: at least port, at most 65535")
        }
        Some(IntOrString::Int(_)) => return,
    };
    out.push(FieldError::new(field("endPort"), problem));
}

/// `field` is the list's path: `spec.ingress[0].from`.
fn peers(out: &mut Vec<FieldError>, field: &str, peers: Option<&[NetworkPolicyPeer]>) {
    for (i, p) in peers.unwrap_or_default().iter().enumerate() {
        peer(out, &format!("{field}[{i}]"), p);
    }
}

/// A peer is either an `ipBlock` or selectors (pods, namespaces or both).
fn peer(out: &mut Vec<FieldError>, field: &str, peer: &NetworkPolicyPeer) {
    let selectors = [
        ("podSelector", &peer.pod_selector),
        ("namespaceSelector", &peer.namespace_selector),
    ];
    for (name, selector) in selectors {
        if let Some(selector) = selector {
            label_selector(out, &format!("{field}.{name}"), selector);
        }
    }
    if let Some(block) = &peer.ip_block {
        ip_block(out, &format!("{field}.ipBlock"), block);
    }
    let has_selector = selectors.iter().any(|(_, s)| s.is_some());
    match (&peer.ip_block, has_selector) {
        (None, false) => out.push(FieldError::new(
            field,
            "must specify a peer: ipBlock, or podSelector and/or namespaceSelector",
        )),
        (Some(_), true) => out.push(FieldError::new(
            field,
            "ipBlock may not be combined with podSelector or namespaceSelector",
        )),
        _ => {}
    }
}

fn ip_block(out: &mut Vec<FieldError>, field: &str, block: &IPBlock) {
    let cidr_field = format!("{field}.cidr");
    if block.cidr.is_empty() {
        out.push(FieldError::new(
            cidr_field,
            "required: a CIDR like 10.0.0.0/16 or fd00::/64",
        ));
        return;
    }
    let Some(cidr) = parse_cidr(out, &cidr_field, &block.cidr) else {
        return;
    };
    for (i, except) in block.except.iter().flatten().enumerate() {
        let field = format!("{field}.except[{i}]");
        let Some(net) = parse_cidr(out, &field, except) else {
            continue;
        };
        let problem = if net.addr().is_ipv4() != cidr.addr().is_ipv4() {
            format!(
                "{except:?} is not of the same IP family as cidr {:?}",
                block.cidr
            )
        } else if !cidr.contains(&net) || net.prefix_len() <= cidr.prefix_len() {
            format!("{except:?} is not a strict subset of cidr {:?}", block.cidr)
        } else {
            continue;
        };
        out.push(FieldError::new(field, problem));
    }
}

/// An IPv4 or IPv6 CIDR, reduced to its network. Host bits (`10.0.0.1/24`) are accepted, as API
/// servers accept them unless their `StrictIPCIDRValidation` feature gate (1.33+) is on.
fn parse_cidr(out: &mut Vec<FieldError>, field: &str, cidr: &str) -> Option<ipnet::IpNet> {
    let net = cidr.parse::<ipnet::IpNet>().ok().map(|n| n.trunc());
    if net.is_none() {
        out.push(FieldError::new(
            field,
            format!("{cidr:?} is not a valid CIDR: like 10.0.0.0/16 or fd00::/64"),
        ));
    }
    net
}

/// The API server's `ValidateLabelSelector`.
fn label_selector(out: &mut Vec<FieldError>, field: &str, selector: &LabelSelector) {
    for (key, value) in selector.match_labels.iter().flatten() {
        let field = format!("{field}.matchLabels[{key}]");
        label_key(out, &field, key);
        label_value(out, &field, value);
    }
    for (i, r) in selector.match_expressions.iter().flatten().enumerate() {
        let field = |f: &str| format!("{field}.matchExpressions[{i}].{f}");
        let values = r.values.as_deref().unwrap_or_default();
        let operator = r.operator.as_str();
        match operator {
            "In" | "NotIn" if values.is_empty() => out.push(FieldError::new(
                field("values"),
                format!("required, non-empty, when operator is {operator}"),
            )),
            "Exists" | "DoesNotExist" if !values.is_empty() => out.push(FieldError::new(
                field("values"),
                format!("must be empty when operator is {operator}"),
            )),
            _ => one_of(
                out,
                &field("operator"),
                Some(operator),
                &["In", "NotIn", "Exists", "DoesNotExist"],
            ),
        }
        label_key(out, &field("key"), &r.key);
        for (j, value) in values.iter().enumerate() {
            label_value(out, &format!("{}[{j}]", field("values")), value);
        }
    }
}

/// A qualified name, as Kubernetes' `IsQualifiedName`: `[prefix/]name`, the prefix a DNS
/// subdomain.
fn label_key(out: &mut Vec<FieldError>, field: &str, key: &str) {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if !prefix.is_none_or(is_dns_subdomain) || name.is_empty() || !is_label_value(name) {
        out.push(FieldError::new(
            field,
            format!(
                "{key:?} is not a valid label key: an optional DNS subdomain and '/', then at \
                 most 63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
            ),
        ));
    }
}

fn label_value(out: &mut Vec<FieldError>, field: &str, value: &str) {
    if !is_label_value(value) {
        out.push(FieldError::new(
            field,
            format!(
                "{value:?} is not a valid label value: empty, or at most 63 alphanumerics, '-', \
                 '_' or '.', starting and ending with an alphanumeric"
            ),
        ));
    }
}

/// Empty, or at most 63 of `A-Za-z0-9-_.` starting and ending with an alphanumeric: a label
/// value, and (when not empty) the name part of a label key.
fn is_label_value(value: &str) -> bool {
    let alnum = |b: Option<&u8>| b.is_none_or(u8::is_ascii_alphanumeric);
    value.len() <= 63
        && alnum(value.as_bytes().first())
        && alnum(value.as_bytes().last())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// RFC 1123 subdomain, as Kubernetes' `IsDNS1123Subdomain`: at most 253 characters, dot-separated
/// labels of `a-z`, `0-9` and `-` that start and end with an alphanumeric.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
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

/// A port number, or a port's name as containers declare it.
fn number_or_name(out: &mut Vec<FieldError>, field: &str, p: &IntOrString) {
    match p {
        IntOrString::Int(n) => port(out, field, *n),
        IntOrString::String(name) if !is_iana_svc_name(name) => {
            out.push(FieldError::new(
                field,
                format!("{name:?} is neither a port number nor a valid port name (IANA_SVC_NAME)"),
            ));
        }
        IntOrString::String(_) => {}
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
