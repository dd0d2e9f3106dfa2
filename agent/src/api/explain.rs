//! `Explain`: what the data path would do with a new flow. The [`Explainer`] trait the agent
//! implements, its plain types, and their conversions from and to the protobuf messages.
use std::future::Future;
use std::net::Ipv4Addr;

use ferrovia_common::verdict;
use ferrovia_proto::v1;

use super::inventory::FrontendType;
use super::registry::ApiError;
use crate::model::{ObjRef, Protocol};

/// A validated `ExplainRequest`: the flow SOURCE -> DESTINATION PROTOCOL/PORT. The two ends are
/// as given (an address or a pod's `namespace/name`); the agent resolves them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainQuery {
    pub source: String,
    pub destination: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One end of the flow, or a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEnd {
    pub address: Ipv4Addr,
    /// The pod with this address, when the agent knows one.
    pub pod: Option<ObjRef>,
    /// Whether that pod is one of this node's (its policy is enforced here).
    pub local: bool,
}

/// The frontend that translates the flow: ids and flags from `SERVICES`, names from the
/// desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainedService {
    /// The Service; `None` when the desired state has no such frontend (a note says so).
    pub service: Option<ObjRef>,
    pub port_name: String,
    pub kind: Option<FrontendType>,
    pub service_id: u32,
    /// No backend: connections are refused.
    pub rejects: bool,
    /// `Some(timeout)` with `sessionAffinity: ClientIP`.
    pub affinity_timeout_s: Option<u32>,
}

/// A policy, or one of its rules, behind a verdict.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyRule {
    pub policy: ObjRef,
    /// The rule's index in the policy's `ingress` or `egress` list; `None`: the policy as a
    /// whole (it isolates the pod, and none of its rules allows the flow).
    pub rule: Option<usize>,
}

/// One policy point's verdict on the flow: the source pod's egress or the backend's ingress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyDecision {
    /// The pod whose policy judges.
    pub pod: ObjRef,
    /// The data path's reason (`ferrovia_common::verdict`), from the maps.
    pub reason: u8,
    /// Allowed by a rule: the rules that allow it; denied: the policies isolating the pod.
    pub rules: Vec<PolicyRule>,
}

impl PolicyDecision {
    #[must_use]
    pub fn allowed(&self) -> bool {
        verdict::allows(self.reason)
    }

    #[must_use]
    pub fn isolated(&self) -> bool {
        self.reason != verdict::ALLOW_NOT_ISOLATED
    }
}

/// Where the flow may go: a backend (or the destination itself) and the verdicts on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainedPath {
    pub backend: FlowEnd,
    pub port: u16,
    /// `None` where no pod of this node judges (or policy is not enforced).
    pub egress: Option<PolicyDecision>,
    pub ingress: Option<PolicyDecision>,
}

impl ExplainedPath {
    /// Whether every verdict present lets the flow through.
    #[must_use]
    pub fn allowed(&self) -> bool {
        [&self.egress, &self.ingress]
            .into_iter()
            .flatten()
            .all(PolicyDecision::allowed)
    }
}

/// Answer of `Explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub source: FlowEnd,
    pub destination: FlowEnd,
    pub protocol: Protocol,
    pub port: u16,
    pub service: Option<ExplainedService>,
    /// One per backend, sorted by address and port; the destination itself when it is no
    /// frontend; none when the frontend rejects.
    pub paths: Vec<ExplainedPath>,
    /// `POLICY_STATE`'s switch: when off, nothing is judged.
    pub policy_enforced: bool,
    /// Where the maps and the desired state disagree, and what else the answer rests on.
    pub notes: Vec<String>,
}

/// What `Explain` needs from the agent: implemented by the node. Reads only.
pub trait Explainer: Send + Sync + 'static {
    /// The fate of a new flow, from the pinned maps, named from the desired state.
    /// [`ApiError::InvalidArgument`] for an end that is neither an IPv4 address nor a pod of
    /// this node.
    fn explain(
        &self,
        query: ExplainQuery,
    ) -> impl Future<Output = Result<Explanation, ApiError>> + Send;
}

impl TryFrom<v1::ExplainRequest> for ExplainQuery {
    type Error = ApiError;

    /// Checks what does not need the agent's state: both ends given, TCP or UDP, a port.
    fn try_from(req: v1::ExplainRequest) -> Result<Self, ApiError> {
        let invalid = |msg: String| Err(ApiError::InvalidArgument(msg));
        for (field, value) in [("source", &req.source), ("destination", &req.destination)] {
            if value.trim().is_empty() {
                return invalid(format!(
                    "{field} is empty (an IPv4 address or a pod as namespace/name)"
                ));
            }
        }
        let protocol = match req.protocol.to_ascii_uppercase().as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            _ => {
                return invalid(format!(
                    "protocol {:?} is not TCP or UDP (the protocols the data path handles)",
                    req.protocol
                ));
            }
        };
        let port = match u16::try_from(req.port) {
            Ok(port) if port != 0 => port,
            _ => return invalid(format!("port {} is not in 1..=65535", req.port)),
        };
        Ok(Self {
            source: req.source.trim().to_owned(),
            destination: req.destination.trim().to_owned(),
            protocol,
            port,
        })
    }
}

impl From<ExplainQuery> for v1::ExplainRequest {
    fn from(q: ExplainQuery) -> Self {
        Self {
            source: q.source,
            destination: q.destination,
            protocol: q.protocol.as_k8s().to_owned(),
            port: u32::from(q.port),
        }
    }
}

impl From<Explanation> for v1::ExplainResponse {
    fn from(e: Explanation) -> Self {
        Self {
            source: Some(e.source.into()),
            destination: Some(e.destination.into()),
            protocol: e.protocol.as_k8s().to_owned(),
            port: u32::from(e.port),
            service: e.service.map(|s| v1::ExplainService {
                namespace: s
                    .service
                    .as_ref()
                    .map(|r| r.namespace.clone())
                    .unwrap_or_default(),
                name: s.service.map(|r| r.name).unwrap_or_default(),
                port_name: s.port_name,
                r#type: s.kind.map(|k| k.as_str().to_owned()).unwrap_or_default(),
                service_id: s.service_id,
                rejects: s.rejects,
                affinity_timeout_s: s.affinity_timeout_s.unwrap_or(0),
            }),
            paths: e
                .paths
                .into_iter()
                .map(|p| v1::ExplainPath {
                    allowed: p.allowed(),
                    backend: Some(p.backend.into()),
                    port: u32::from(p.port),
                    egress: p.egress.map(Into::into),
                    ingress: p.ingress.map(Into::into),
                })
                .collect(),
            notes: e.notes,
            policy_enforced: e.policy_enforced,
        }
    }
}

impl From<FlowEnd> for v1::ExplainEndpoint {
    fn from(end: FlowEnd) -> Self {
        Self {
            address: end.address.to_string(),
            pod: end.pod.map(|p| p.to_string()).unwrap_or_default(),
            local: end.local,
        }
    }
}

impl From<PolicyDecision> for v1::PolicyDecision {
    fn from(d: PolicyDecision) -> Self {
        Self {
            isolated: d.isolated(),
            allowed: d.allowed(),
            pod: d.pod.to_string(),
            reason: verdict::name(d.reason).to_owned(),
            rules: d
                .rules
                .into_iter()
                .map(|r| v1::PolicyRuleRef {
                    namespace: r.policy.namespace,
                    name: r.policy.name,
                    rule: r.rule.map_or(-1, |i| i32::try_from(i).unwrap_or(i32::MAX)),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(protocol: &str, port: u32) -> v1::ExplainRequest {
        v1::ExplainRequest {
            source: "default/client".into(),
            destination: "10.96.0.10".into(),
            protocol: protocol.into(),
            port,
        }
    }

    #[test]
    fn a_request_is_checked_field_by_field() {
        let ok = ExplainQuery::try_from(request("tcp", 80)).unwrap();
        assert_eq!(
            ok,
            ExplainQuery {
                source: "default/client".into(),
                destination: "10.96.0.10".into(),
                protocol: Protocol::Tcp,
                port: 80,
            }
        );
        assert_eq!(
            ExplainQuery::try_from(request("Udp", 65535))
                .unwrap()
                .protocol,
            Protocol::Udp
        );
        for (req, field) in [
            (request("sctp", 80), "protocol"),
            (request("", 80), "protocol"),
            (request("tcp", 0), "port"),
            (request("tcp", 65536), "port"),
            (
                v1::ExplainRequest {
                    source: " ".into(),
                    ..request("tcp", 80)
                },
                "source",
            ),
            (
                v1::ExplainRequest {
                    destination: String::new(),
                    ..request("tcp", 80)
                },
                "destination",
            ),
        ] {
            match ExplainQuery::try_from(req.clone()) {
                Err(ApiError::InvalidArgument(msg)) => {
                    assert!(msg.starts_with(field), "{req:?}: {msg}");
                }
                other => panic!("{req:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_path_is_allowed_when_every_verdict_present_is() {
        let decision = |reason| PolicyDecision {
            pod: ObjRef::new("default", "a"),
            reason,
            rules: Vec::new(),
        };
        let path = |egress, ingress| ExplainedPath {
            backend: FlowEnd {
                address: Ipv4Addr::new(10, 0, 0, 2),
                pod: None,
                local: false,
            },
            port: 80,
            egress,
            ingress,
        };
        assert!(path(None, None).allowed());
        assert!(path(Some(decision(verdict::ALLOW_RULE)), None).allowed());
        assert!(
            path(
                Some(decision(verdict::ALLOW_NOT_ISOLATED)),
                Some(decision(verdict::ALLOW_RULE))
            )
            .allowed()
        );
        assert!(!path(None, Some(decision(verdict::DENY_PORT))).allowed());
        assert!(
            !path(
                Some(decision(verdict::DENY_NO_RULE)),
                Some(decision(verdict::ALLOW_RULE))
            )
            .allowed()
        );
        let proto: v1::PolicyDecision = PolicyDecision {
            rules: vec![
                PolicyRule {
                    policy: ObjRef::new("x", "p"),
                    rule: Some(2),
                },
                PolicyRule {
                    policy: ObjRef::new("x", "q"),
                    rule: None,
                },
            ],
            ..decision(verdict::DENY_EXCEPT)
        }
        .into();
        assert_eq!(
            (proto.reason.as_str(), proto.allowed, proto.isolated),
            ("denied-by-except", false, true)
        );
        assert_eq!(
            proto.rules.iter().map(|r| r.rule).collect::<Vec<_>>(),
            [2, -1]
        );
    }
}
