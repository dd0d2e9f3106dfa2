//! The operator's read-only views as the `ferrovia` CLI prints them: `-o json` with the proto
//! messages' field names (the names scripts rely on, documented in `proto/ferrovia.proto`),
//! and aligned tables for people, one row per object.
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ferrovia_proto::v1;
use serde_json::{Value, json};

mod explain;

pub use explain::{explain_json, explain_table};

/// `ListServices` as JSON: `{"frontends": [...], "skipped": [...]}`.
#[must_use]
pub fn services_json(resp: &v1::ListServicesResponse) -> Value {
    json!({
        "frontends": resp.frontends.iter().map(|f| json!({
            "namespace": f.namespace,
            "name": f.name,
            "port_name": f.port_name,
            "type": f.r#type,
            "address": f.address,
            "port": f.port,
            "protocol": f.protocol,
            "session_affinity": f.session_affinity,
            "affinity_timeout_seconds": f.affinity_timeout_seconds,
            "backends": f.backends,
        })).collect::<Vec<_>>(),
        "skipped": resp.skipped.iter().map(|s| json!({
            "namespace": s.namespace,
            "name": s.name,
            "port_name": s.port_name,
            "reason": s.reason,
        })).collect::<Vec<_>>(),
    })
}

/// `ListServices` as a table, one row per frontend, then the skipped services.
#[must_use]
pub fn services_table(resp: &v1::ListServicesResponse) -> String {
    let rows: Vec<Vec<String>> = resp
        .frontends
        .iter()
        .map(|f| {
            let affinity = if f.session_affinity == "ClientIP" {
                format!("ClientIP {}s", f.affinity_timeout_seconds)
            } else {
                f.session_affinity.clone()
            };
            vec![
                format!("{}/{}", f.namespace, f.name),
                or_dash(&f.port_name),
                f.r#type.clone(),
                format!("{}/{}", socket(&f.address, f.port), f.protocol),
                affinity,
                f.backends.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "SERVICE", "PORT", "TYPE", "FRONTEND", "AFFINITY", "BACKENDS",
        ],
        &rows,
    );
    for s in &resp.skipped {
        let port = if s.port_name.is_empty() {
            String::new()
        } else {
            format!(" port {}", s.port_name)
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "skipped {}/{}{port}: {}",
            s.namespace, s.name, s.reason
        );
    }
    out
}

/// `ListEndpoints` as JSON: `{"service_ports": [{..., "endpoints": [...]}]}`.
#[must_use]
pub fn endpoints_json(resp: &v1::ListEndpointsResponse) -> Value {
    json!({
        "service_ports": resp.service_ports.iter().map(|p| json!({
            "namespace": p.namespace,
            "name": p.name,
            "port_name": p.port_name,
            "protocol": p.protocol,
            "endpoints": p.endpoints.iter().map(|e| json!({
                "address": e.address,
                "port": e.port,
                "ready": e.ready,
                "serving": e.serving,
                "terminating": e.terminating,
                "selected": e.selected,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// `ListEndpoints` as a table, one row per endpoint (a port without any gets a row of `-`).
#[must_use]
pub fn endpoints_table(resp: &v1::ListEndpointsResponse) -> String {
    let mut rows = Vec::new();
    for p in &resp.service_ports {
        let service = format!("{}/{}", p.namespace, p.name);
        let port = if p.port_name.is_empty() {
            p.protocol.clone()
        } else {
            format!("{}/{}", p.port_name, p.protocol)
        };
        if p.endpoints.is_empty() {
            let mut row = vec![service.clone(), port.clone()];
            row.extend(std::iter::repeat_n("-".to_owned(), 5));
            rows.push(row);
        }
        for e in &p.endpoints {
            rows.push(vec![
                service.clone(),
                port.clone(),
                socket(&e.address, e.port),
                yes_no(e.ready),
                yes_no(e.serving),
                yes_no(e.terminating),
                yes_no(e.selected),
            ]);
        }
    }
    table(
        &[
            "SERVICE",
            "PORT",
            "ENDPOINT",
            "READY",
            "SERVING",
            "TERMINATING",
            "SELECTED",
        ],
        &rows,
    )
}

/// `ListPolicies` as JSON: `{"policies": [...], "rejected": [...]}`.
#[must_use]
pub fn policies_json(resp: &v1::ListPoliciesResponse) -> Value {
    json!({
        "policies": resp.policies.iter().map(|p| json!({
            "namespace": p.namespace,
            "name": p.name,
            "policy_types": p.policy_types,
            "selected_pods": p.selected_pods,
            "ingress_rules": p.ingress_rules,
            "egress_rules": p.egress_rules,
            "errors": p.errors,
        })).collect::<Vec<_>>(),
        "rejected": resp.rejected,
    })
}

/// `ListPolicies` as a table, one row per policy in force, then the rejections.
#[must_use]
pub fn policies_table(resp: &v1::ListPoliciesResponse) -> String {
    let rows: Vec<Vec<String>> = resp
        .policies
        .iter()
        .map(|p| {
            vec![
                format!("{}/{}", p.namespace, p.name),
                p.policy_types.join(","),
                p.ingress_rules.to_string(),
                p.egress_rules.to_string(),
                or_dash(&p.selected_pods.join(",")),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "POLICY",
            "TYPES",
            "INGRESS RULES",
            "EGRESS RULES",
            "SELECTED PODS",
        ],
        &rows,
    );
    for p in &resp.policies {
        for e in &p.errors {
            let _ = writeln!(
                out,
                "{}/{}: in force is its last valid version; the newest was rejected: {e}",
                p.namespace, p.name
            );
        }
    }
    for e in &resp.rejected {
        let _ = writeln!(out, "rejected, not in force: {e}");
    }
    out
}

/// `ListPods` as JSON: `{"pods": [...]}`.
#[must_use]
pub fn pods_json(resp: &v1::ListPodsResponse) -> Value {
    let attachment = |a: Option<&v1::TcAttachment>| {
        a.map(|a| json!({"mode": a.mode, "priority": a.priority, "handle": a.handle}))
    };
    json!({
        "pods": resp.pods.iter().map(|p| json!({
            "namespace": p.namespace,
            "name": p.name,
            "container_id": p.container_id,
            "ips": p.ips,
            "ifname": p.ifname,
            "host_ifname": p.host_ifname,
            "netns": p.netns,
            "from_pod": attachment(p.from_pod.as_ref()),
            "to_pod": attachment(p.to_pod.as_ref()),
            "ingress_isolated": p.ingress_isolated,
            "egress_isolated": p.egress_isolated,
            "ingress": traffic_json(p.ingress.as_ref()),
            "egress": traffic_json(p.egress.as_ref()),
        })).collect::<Vec<_>>(),
    })
}

/// One direction of a pod's traffic counters as JSON (field names as in the proto).
fn traffic_json(t: Option<&v1::PodTraffic>) -> Value {
    let t = t.copied().unwrap_or_default();
    json!({
        "packets": t.packets,
        "bytes": t.bytes,
        "connections_tcp": t.connections_tcp,
        "connections_udp": t.connections_udp,
        "malformed": t.malformed,
        "drops_policy_denied": t.drops_policy_denied,
        "drops_no_endpoints": t.drops_no_endpoints,
        "drops_conntrack_full": t.drops_conntrack_full,
        "drops_translation_error": t.drops_translation_error,
        "policy_allowed": t.policy_allowed,
        "policy_denied": t.policy_denied,
    })
}

/// A direction's packets and drops, for the table: `packets/drops`.
fn traffic_cell(t: Option<&v1::PodTraffic>) -> String {
    let t = t.copied().unwrap_or_default();
    let drops = t.drops_policy_denied
        + t.drops_no_endpoints
        + t.drops_conntrack_full
        + t.drops_translation_error;
    format!("{}/{drops}", t.packets)
}

/// `ListPods` as a table, one row per pod.
#[must_use]
pub fn pods_table(resp: &v1::ListPodsResponse) -> String {
    let attachment = |a: Option<&v1::TcAttachment>| match a {
        None => "-".to_owned(),
        Some(a) if a.mode == "tcx" => a.mode.clone(),
        Some(a) => format!("{} prio {} handle {:#x}", a.mode, a.priority, a.handle),
    };
    let rows: Vec<Vec<String>> = resp
        .pods
        .iter()
        .map(|p| {
            let isolated: Vec<&str> = [
                (p.ingress_isolated, "ingress"),
                (p.egress_isolated, "egress"),
            ]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
            vec![
                format!("{}/{}", p.namespace, p.name),
                or_dash(&p.ips.join(",")),
                p.host_ifname.clone(),
                attachment(p.from_pod.as_ref()),
                attachment(p.to_pod.as_ref()),
                or_dash(&isolated.join(",")),
                traffic_cell(p.ingress.as_ref()),
                traffic_cell(p.egress.as_ref()),
                p.container_id.clone(),
            ]
        })
        .collect();
    table(
        &[
            "POD",
            "IPS",
            "HOST IFACE",
            "FROM_POD",
            "TO_POD",
            "ISOLATED",
            "IN PKTS/DROPS",
            "OUT PKTS/DROPS",
            "CONTAINER",
        ],
        &rows,
    )
}

/// `GetMaps` as JSON: `{"bpffs_root": ..., "maps": [...]}`.
#[must_use]
pub fn maps_json(resp: &v1::GetMapsResponse) -> Value {
    json!({
        "bpffs_root": resp.bpffs_root,
        "maps": resp.maps.iter().map(|m| json!({
            "name": m.name,
            "pin": m.pin,
            "error": m.error,
            "id": m.id,
            "type": m.r#type,
            "key_size": m.key_size,
            "value_size": m.value_size,
            "max_entries": m.max_entries,
            "entries": m.entries,
            "fill": m.fill,
        })).collect::<Vec<_>>(),
    })
}

/// `GetMaps` as a table, one row per map (a map that cannot be read shows its error).
#[must_use]
pub fn maps_table(resp: &v1::GetMapsResponse) -> String {
    let rows: Vec<Vec<String>> = resp
        .maps
        .iter()
        .map(|m| {
            if m.error.is_empty() {
                vec![
                    m.name.clone(),
                    m.r#type.clone(),
                    m.key_size.to_string(),
                    m.value_size.to_string(),
                    m.max_entries.to_string(),
                    m.entries.to_string(),
                    format!("{:.1}%", m.fill * 100.0),
                ]
            } else {
                vec![m.name.clone(), format!("error: {}", m.error)]
            }
        })
        .collect();
    let mut out = table(
        &[
            "MAP",
            "TYPE",
            "KEY",
            "VALUE",
            "MAX ENTRIES",
            "ENTRIES",
            "FILL",
        ],
        &rows,
    );
    let _ = writeln!(out, "pinned under {}", resp.bpffs_root);
    out
}

/// Left-aligned columns two spaces apart, a header line first; a short row leaves its last
/// cells out, and its last cell may run past its column.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        // The last cell of a short row (an error) does not widen the column.
        let full = row.len() == headers.len();
        for (i, cell) in row.iter().enumerate() {
            if full || i + 1 < row.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out += line.trim_end();
        out.push('\n');
    }
    out
}

/// `address:port`, bracketed for IPv6.
fn socket(address: &str, port: u32) -> String {
    match (address.parse::<IpAddr>(), u16::try_from(port)) {
        (Ok(ip), Ok(port)) => SocketAddr::new(ip, port).to_string(),
        _ => format!("{address}:{port}"),
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-" } else { s }.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<&str> {
        s.lines().collect()
    }

    #[test]
    fn tables_align_their_columns() {
        let out = table(
            &["A", "LONGER"],
            &[
                vec!["wide cell".into(), "x".into()],
                vec!["y".into(), "z".into()],
            ],
        );
        assert_eq!(
            lines(&out),
            ["A          LONGER", "wide cell  x", "y          z"]
        );
    }

    #[test]
    fn a_short_rows_last_cell_does_not_widen_its_column() {
        let out = table(
            &["MAP", "TYPE", "KEY"],
            &[
                vec!["SERVICES".into(), "hash".into(), "24".into()],
                vec!["BACKENDS".into(), "error: not pinned here".into()],
            ],
        );
        assert_eq!(
            lines(&out),
            [
                "MAP       TYPE  KEY",
                "SERVICES  hash  24",
                "BACKENDS  error: not pinned here"
            ]
        );
    }

    fn services() -> v1::ListServicesResponse {
        v1::ListServicesResponse {
            frontends: vec![
                v1::ServiceFrontend {
                    namespace: "default".into(),
                    name: "web".into(),
                    port_name: "http".into(),
                    r#type: "ClusterIP".into(),
                    address: "10.96.0.10".into(),
                    port: 80,
                    protocol: "TCP".into(),
                    session_affinity: "ClientIP".into(),
                    affinity_timeout_seconds: 60,
                    backends: 2,
                },
                v1::ServiceFrontend {
                    namespace: "default".into(),
                    name: "dns".into(),
                    r#type: "ClusterIP".into(),
                    address: "fd00::a".into(),
                    port: 53,
                    protocol: "UDP".into(),
                    session_affinity: "None".into(),
                    ..Default::default()
                },
            ],
            skipped: vec![v1::SkippedService {
                namespace: "default".into(),
                name: "sctp".into(),
                port_name: "s".into(),
                reason: "protocol SCTP is not supported".into(),
            }],
        }
    }

    #[test]
    fn services_render_as_rows_and_json() {
        let resp = services();
        assert_eq!(
            lines(&services_table(&resp)),
            [
                "SERVICE      PORT  TYPE       FRONTEND           AFFINITY      BACKENDS",
                "default/web  http  ClusterIP  10.96.0.10:80/TCP  ClientIP 60s  2",
                "default/dns  -     ClusterIP  [fd00::a]:53/UDP   None          0",
                "skipped default/sctp port s: protocol SCTP is not supported",
            ]
        );
        let json = services_json(&resp);
        assert_eq!(
            json["frontends"][0],
            json!({
                "namespace": "default", "name": "web", "port_name": "http",
                "type": "ClusterIP", "address": "10.96.0.10", "port": 80, "protocol": "TCP",
                "session_affinity": "ClientIP", "affinity_timeout_seconds": 60, "backends": 2,
            })
        );
        assert_eq!(
            json["skipped"][0]["reason"],
            "protocol SCTP is not supported"
        );
    }

    #[test]
    fn endpoints_render_one_row_each_and_a_dash_row_for_none() {
        let endpoint = |address: &str, ready, selected| v1::EndpointStatus {
            address: address.into(),
            port: 9376,
            ready,
            serving: true,
            terminating: !ready,
            selected,
        };
        let resp = v1::ListEndpointsResponse {
            service_ports: vec![
                v1::ServicePortEndpoints {
                    namespace: "default".into(),
                    name: "web".into(),
                    port_name: "http".into(),
                    protocol: "TCP".into(),
                    endpoints: vec![
                        endpoint("10.0.0.1", true, true),
                        endpoint("10.0.0.2", false, false),
                    ],
                },
                v1::ServicePortEndpoints {
                    namespace: "default".into(),
                    name: "empty".into(),
                    protocol: "UDP".into(),
                    ..Default::default()
                },
            ],
        };
        assert_eq!(
            lines(&endpoints_table(&resp)),
            [
                "SERVICE        PORT      ENDPOINT       READY  SERVING  TERMINATING  SELECTED",
                "default/web    http/TCP  10.0.0.1:9376  yes    yes      no           yes",
                "default/web    http/TCP  10.0.0.2:9376  no     yes      yes          no",
                "default/empty  UDP       -              -      -        -            -",
            ]
        );
        let json = endpoints_json(&resp);
        assert_eq!(
            json["service_ports"][0]["endpoints"][1],
            json!({"address": "10.0.0.2", "port": 9376, "ready": false, "serving": true,
                   "terminating": true, "selected": false})
        );
        assert_eq!(json["service_ports"][1]["endpoints"], json!([]));
    }

    #[test]
    fn policies_render_with_their_rejections() {
        let resp = v1::ListPoliciesResponse {
            policies: vec![v1::PolicyInForce {
                namespace: "default".into(),
                name: "web-in".into(),
                policy_types: vec!["Ingress".into(), "Egress".into()],
                selected_pods: vec!["web-a".into(), "web-b".into()],
                ingress_rules: 2,
                egress_rules: 1,
                errors: vec!["p.yaml: NetworkPolicy default/web-in: x: bad".into()],
            }],
            rejected: vec!["p.yaml: NetworkPolicy default/never: y: bad".into()],
        };
        assert_eq!(
            lines(&policies_table(&resp)),
            [
                "POLICY          TYPES           INGRESS RULES  EGRESS RULES  SELECTED PODS",
                "default/web-in  Ingress,Egress  2              1             web-a,web-b",
                "default/web-in: in force is its last valid version; the newest was rejected: \
                 p.yaml: NetworkPolicy default/web-in: x: bad",
                "rejected, not in force: p.yaml: NetworkPolicy default/never: y: bad",
            ]
        );
        let json = policies_json(&resp);
        assert_eq!(
            json["policies"][0]["policy_types"],
            json!(["Ingress", "Egress"])
        );
        assert_eq!(
            json["policies"][0]["selected_pods"],
            json!(["web-a", "web-b"])
        );
        assert_eq!(json["rejected"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn pods_render_attachments_and_isolation() {
        let resp = v1::ListPodsResponse {
            pods: vec![v1::PodStatus {
                namespace: "default".into(),
                name: "web-a".into(),
                container_id: "c1".into(),
                ips: vec!["10.0.0.1".into()],
                ifname: "eth0".into(),
                host_ifname: "veth1".into(),
                netns: "/run/netns/a".into(),
                from_pod: Some(v1::TcAttachment {
                    mode: "tcx".into(),
                    priority: 0,
                    handle: 0,
                }),
                to_pod: Some(v1::TcAttachment {
                    mode: "cls_bpf".into(),
                    priority: 1,
                    handle: 16,
                }),
                ingress_isolated: false,
                egress_isolated: true,
                ingress: Some(v1::PodTraffic {
                    packets: 12,
                    drops_policy_denied: 2,
                    drops_no_endpoints: 1,
                    policy_denied: 2,
                    ..v1::PodTraffic::default()
                }),
                egress: None,
            }],
        };
        assert_eq!(
            lines(&pods_table(&resp)),
            [
                "POD            IPS       HOST IFACE  FROM_POD  TO_POD                      ISOLATED  IN PKTS/DROPS  OUT PKTS/DROPS  CONTAINER",
                "default/web-a  10.0.0.1  veth1       tcx       cls_bpf prio 1 handle 0x10  egress    12/3           0/0             c1",
            ]
        );
        let json = pods_json(&resp);
        assert_eq!(
            json["pods"][0]["to_pod"],
            json!({"mode": "cls_bpf", "priority": 1, "handle": 16})
        );
        assert_eq!(json["pods"][0]["ips"], json!(["10.0.0.1"]));
        assert_eq!(json["pods"][0]["egress_isolated"], json!(true));
        assert_eq!(json["pods"][0]["ingress"]["packets"], json!(12));
        assert_eq!(json["pods"][0]["ingress"]["drops_no_endpoints"], json!(1));
        assert_eq!(json["pods"][0]["ingress"]["policy_denied"], json!(2));
        assert_eq!(json["pods"][0]["egress"]["packets"], json!(0));
    }

    #[test]
    fn maps_render_fill_and_errors() {
        let resp = v1::GetMapsResponse {
            bpffs_root: "/sys/fs/bpf/ferrovia".into(),
            maps: vec![
                v1::PinnedMap {
                    name: "SERVICES".into(),
                    pin: "/sys/fs/bpf/ferrovia/SERVICES".into(),
                    id: 7,
                    r#type: "hash".into(),
                    key_size: 24,
                    value_size: 12,
                    max_entries: 1024,
                    entries: 10,
                    fill: 10.0 / 1024.0,
                    ..Default::default()
                },
                v1::PinnedMap {
                    name: "BACKENDS".into(),
                    pin: "/sys/fs/bpf/ferrovia/BACKENDS".into(),
                    error: "opening it: No such file or directory".into(),
                    ..Default::default()
                },
            ],
        };
        assert_eq!(
            lines(&maps_table(&resp)),
            [
                "MAP       TYPE  KEY  VALUE  MAX ENTRIES  ENTRIES  FILL",
                "SERVICES  hash  24   12     1024         10       1.0%",
                "BACKENDS  error: opening it: No such file or directory",
                "pinned under /sys/fs/bpf/ferrovia",
            ]
        );
        let json = maps_json(&resp);
        assert_eq!(json["maps"][0]["max_entries"], 1024);
        assert_eq!(json["maps"][0]["type"], "hash");
        assert_eq!(
            json["maps"][1]["error"],
            "opening it: No such file or directory"
        );
    }
}
