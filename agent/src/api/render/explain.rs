//! `Explain` as the CLI prints it: `-o json` with the proto's field names, and for people the
//! flow, its service, then a row per path with each policy point's verdict and the rules
//! behind it.
use std::fmt::Write as _;

use ferrovia_proto::v1;
use serde_json::{Value, json};

use super::{or_dash, socket, table};

/// `Explain` as JSON: `{"source": {...}, "destination": {...}, "service": {...} | null,
/// "paths": [...], ...}`; an absent decision is `null`.
#[must_use]
pub fn explain_json(resp: &v1::ExplainResponse) -> Value {
    json!({
        "source": resp.source.as_ref().map(endpoint_json),
        "destination": resp.destination.as_ref().map(endpoint_json),
        "protocol": resp.protocol,
        "port": resp.port,
        "service": resp.service.as_ref().map(|s| json!({
            "namespace": s.namespace,
            "name": s.name,
            "port_name": s.port_name,
            "type": s.r#type,
            "service_id": s.service_id,
            "rejects": s.rejects,
            "affinity_timeout_s": s.affinity_timeout_s,
        })),
        "paths": resp.paths.iter().map(|p| json!({
            "backend": p.backend.as_ref().map(endpoint_json),
            "port": p.port,
            "egress": p.egress.as_ref().map(decision_json),
            "ingress": p.ingress.as_ref().map(decision_json),
            "allowed": p.allowed,
        })).collect::<Vec<_>>(),
        "notes": resp.notes,
        "policy_enforced": resp.policy_enforced,
    })
}

fn endpoint_json(e: &v1::ExplainEndpoint) -> Value {
    json!({"address": e.address, "pod": e.pod, "local": e.local})
}

fn decision_json(d: &v1::PolicyDecision) -> Value {
    json!({
        "pod": d.pod,
        "isolated": d.isolated,
        "allowed": d.allowed,
        "reason": d.reason,
        "rules": d.rules.iter().map(|r| json!({
            "namespace": r.namespace, "name": r.name, "rule": r.rule,
        })).collect::<Vec<_>>(),
    })
}

/// `Explain` as text: what the flow is, its service, one row per path, then the notes.
#[must_use]
pub fn explain_table(resp: &v1::ExplainResponse) -> String {
    let mut out = String::new();
    let source = resp.source.clone().unwrap_or_default();
    let destination = resp.destination.clone().unwrap_or_default();
    let to = format!(
        "{}/{}",
        socket(&destination.address, resp.port),
        resp.protocol
    );
    let _ = writeln!(out, "FROM     {}", named(source.address.clone(), &source));
    let _ = writeln!(out, "TO       {}", named(to, &destination));
    if let Some(s) = &resp.service {
        let _ = writeln!(out, "SERVICE  {}", service(s));
    }
    if !resp.policy_enforced {
        let _ = writeln!(out, "POLICY   not enforced on this node: nothing is judged");
    }
    if resp.paths.is_empty() {
        let _ = writeln!(
            out,
            "no backend: a TCP connect is refused, a datagram answered with ICMP port unreachable"
        );
    } else {
        let rows: Vec<Vec<String>> = resp
            .paths
            .iter()
            .map(|p| {
                let backend = p.backend.clone().unwrap_or_default();
                vec![
                    socket(&backend.address, p.port),
                    or_dash(&backend.pod),
                    decision(p.egress.as_ref()),
                    decision(p.ingress.as_ref()),
                    if p.allowed { "allowed" } else { "denied" }.to_owned(),
                ]
            })
            .collect();
        out += &table(&["BACKEND", "POD", "EGRESS", "INGRESS", "VERDICT"], &rows);
    }
    for note in &resp.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

/// `what` followed by the end's pod, if it is one: `10.0.0.2 default/web-a (this node)`.
fn named(mut out: String, e: &v1::ExplainEndpoint) -> String {
    if !e.pod.is_empty() {
        let _ = write!(out, " {}", e.pod);
        if e.local {
            out += " (this node)";
        }
    }
    out
}

/// `default/web, port http (ClusterIP, frontend 3), affinity ClientIP 600s`.
fn service(s: &v1::ExplainService) -> String {
    let mut out = if s.name.is_empty() {
        "(not in the desired state)".to_owned()
    } else {
        format!("{}/{}", s.namespace, s.name)
    };
    if !s.port_name.is_empty() {
        let _ = write!(out, ", port {}", s.port_name);
    }
    let kind = if s.r#type.is_empty() { "?" } else { &s.r#type };
    let _ = write!(out, " ({kind}, frontend {})", s.service_id);
    if s.affinity_timeout_s > 0 {
        let _ = write!(out, ", affinity ClientIP {}s", s.affinity_timeout_s);
    }
    if s.rejects {
        out += ", no endpoints: rejects";
    }
    out
}

/// A point's verdict: `denied-by-port default/web-in`, `allowed-by-rule default/a[0],default/b[2]`;
/// `-` where no pod of this node judges.
fn decision(d: Option<&v1::PolicyDecision>) -> String {
    let Some(d) = d else {
        return "-".to_owned();
    };
    let rules: Vec<String> = d
        .rules
        .iter()
        .map(|r| {
            if r.rule < 0 {
                format!("{}/{}", r.namespace, r.name)
            } else {
                format!("{}/{}[{}]", r.namespace, r.name, r.rule)
            }
        })
        .collect();
    if rules.is_empty() {
        d.reason.clone()
    } else {
        format!("{} {}", d.reason, rules.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(address: &str, pod: &str, local: bool) -> v1::ExplainEndpoint {
        v1::ExplainEndpoint {
            address: address.into(),
            pod: pod.into(),
            local,
        }
    }

    fn rule(name: &str, rule: i32) -> v1::PolicyRuleRef {
        v1::PolicyRuleRef {
            namespace: "default".into(),
            name: name.into(),
            rule,
        }
    }

    fn decision(pod: &str, reason: &str, rules: Vec<v1::PolicyRuleRef>) -> v1::PolicyDecision {
        let allowed = reason.starts_with("allowed");
        v1::PolicyDecision {
            pod: pod.into(),
            isolated: reason != "allowed-not-isolated",
            allowed,
            reason: reason.into(),
            rules,
        }
    }

    /// A client through a VIP with affinity to two backends: one allowed by a rule at each
    /// end, one denied by its ingress policy's ports; a third on another node.
    fn through_a_service() -> v1::ExplainResponse {
        let egress = decision(
            "default/client",
            "allowed-by-rule",
            vec![rule("client-out", 0), rule("all-out", 2)],
        );
        v1::ExplainResponse {
            source: Some(endpoint("10.0.0.9", "default/client", true)),
            destination: Some(endpoint("10.96.0.10", "", false)),
            protocol: "TCP".into(),
            port: 80,
            service: Some(v1::ExplainService {
                namespace: "default".into(),
                name: "web".into(),
                port_name: "http".into(),
                r#type: "ClusterIP".into(),
                service_id: 3,
                rejects: false,
                affinity_timeout_s: 600,
            }),
            paths: vec![
                v1::ExplainPath {
                    backend: Some(endpoint("10.0.0.2", "default/web-a", true)),
                    port: 9376,
                    egress: Some(egress.clone()),
                    ingress: Some(decision(
                        "default/web-a",
                        "allowed-by-rule",
                        vec![rule("web-in", 1)],
                    )),
                    allowed: true,
                },
                v1::ExplainPath {
                    backend: Some(endpoint("10.0.0.3", "default/web-b", true)),
                    port: 9376,
                    egress: Some(egress.clone()),
                    ingress: Some(decision(
                        "default/web-b",
                        "denied-by-port",
                        vec![rule("web-in", -1)],
                    )),
                    allowed: false,
                },
                v1::ExplainPath {
                    backend: Some(endpoint("10.1.0.4", "", false)),
                    port: 9376,
                    egress: Some(egress),
                    ingress: None,
                    allowed: true,
                },
            ],
            notes: vec!["frontend 10.96.0.10:80/TCP: slot 3: no entry".into()],
            policy_enforced: true,
        }
    }

    #[test]
    fn a_flow_through_a_service_renders_a_row_per_backend() {
        let resp = through_a_service();
        assert_eq!(
            explain_table(&resp).lines().collect::<Vec<_>>(),
            [
                "FROM     10.0.0.9 default/client (this node)",
                "TO       10.96.0.10:80/TCP",
                "SERVICE  default/web, port http (ClusterIP, frontend 3), affinity ClientIP 600s",
                "BACKEND        POD            EGRESS                                                    INGRESS                            VERDICT",
                "10.0.0.2:9376  default/web-a  allowed-by-rule default/client-out[0],default/all-out[2]  allowed-by-rule default/web-in[1]  allowed",
                "10.0.0.3:9376  default/web-b  allowed-by-rule default/client-out[0],default/all-out[2]  denied-by-port default/web-in      denied",
                "10.1.0.4:9376  -              allowed-by-rule default/client-out[0],default/all-out[2]  -                                  allowed",
                "note: frontend 10.96.0.10:80/TCP: slot 3: no entry",
            ]
        );
        let json = explain_json(&resp);
        assert_eq!(
            json["paths"][1],
            json!({
                "backend": {"address": "10.0.0.3", "pod": "default/web-b", "local": true},
                "port": 9376,
                "egress": {
                    "pod": "default/client", "isolated": true, "allowed": true,
                    "reason": "allowed-by-rule",
                    "rules": [
                        {"namespace": "default", "name": "client-out", "rule": 0},
                        {"namespace": "default", "name": "all-out", "rule": 2},
                    ],
                },
                "ingress": {
                    "pod": "default/web-b", "isolated": true, "allowed": false,
                    "reason": "denied-by-port",
                    "rules": [{"namespace": "default", "name": "web-in", "rule": -1}],
                },
                "allowed": false,
            })
        );
        assert_eq!(json["paths"][2]["ingress"], Value::Null);
        assert_eq!(
            json["service"],
            json!({"namespace": "default", "name": "web", "port_name": "http",
                   "type": "ClusterIP", "service_id": 3, "rejects": false,
                   "affinity_timeout_s": 600})
        );
        assert_eq!(
            json["source"],
            json!({"address": "10.0.0.9", "pod": "default/client", "local": true})
        );
        assert_eq!(
            (&json["protocol"], &json["port"], &json["policy_enforced"]),
            (&json!("TCP"), &json!(80), &json!(true))
        );
        assert_eq!(json["notes"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn a_rejecting_service_and_a_node_without_policy_say_so() {
        let resp = v1::ExplainResponse {
            source: Some(endpoint("10.0.0.9", "default/client", true)),
            destination: Some(endpoint("10.96.0.12", "", false)),
            protocol: "UDP".into(),
            port: 53,
            service: Some(v1::ExplainService {
                namespace: "default".into(),
                name: "empty".into(),
                r#type: "ClusterIP".into(),
                service_id: 5,
                rejects: true,
                ..Default::default()
            }),
            paths: vec![],
            notes: vec![],
            policy_enforced: false,
        };
        assert_eq!(
            explain_table(&resp).lines().collect::<Vec<_>>(),
            [
                "FROM     10.0.0.9 default/client (this node)",
                "TO       10.96.0.12:53/UDP",
                "SERVICE  default/empty (ClusterIP, frontend 5), no endpoints: rejects",
                "POLICY   not enforced on this node: nothing is judged",
                "no backend: a TCP connect is refused, a datagram answered with ICMP port unreachable",
            ]
        );
        let json = explain_json(&resp);
        assert_eq!(json["paths"], json!([]));
        assert_eq!(json["service"]["rejects"], json!(true));
        assert_eq!(json["policy_enforced"], json!(false));
    }

    #[test]
    fn a_pod_to_pod_flow_names_the_destination_pod() {
        let resp = v1::ExplainResponse {
            source: Some(endpoint("10.0.0.9", "default/client", true)),
            destination: Some(endpoint("10.0.0.2", "default/web-a", true)),
            protocol: "TCP".into(),
            port: 81,
            paths: vec![v1::ExplainPath {
                backend: Some(endpoint("10.0.0.2", "default/web-a", true)),
                port: 81,
                egress: Some(decision("default/client", "allowed-not-isolated", vec![])),
                ingress: Some(decision(
                    "default/web-a",
                    "denied-by-default",
                    vec![rule("deny-all", -1)],
                )),
                allowed: false,
            }],
            policy_enforced: true,
            ..Default::default()
        };
        let table = explain_table(&resp);
        assert_eq!(
            table.lines().collect::<Vec<_>>(),
            [
                "FROM     10.0.0.9 default/client (this node)",
                "TO       10.0.0.2:81/TCP default/web-a (this node)",
                "BACKEND      POD            EGRESS                INGRESS                             VERDICT",
                "10.0.0.2:81  default/web-a  allowed-not-isolated  denied-by-default default/deny-all  denied",
            ]
        );
    }
}
