use std::net::Ipv4Addr;

use ferrovia_common::{
    FlowEvent, POL_DIR_EGRESS, POL_DIR_INGRESS, PROTO_TCP, PROTO_UDP, drop, flow, verdict,
};
use ferrovia_proto::v1;

use super::{FlowFilter, FlowHub, Names};
use crate::model::ObjRef;

fn raw(kind: u8, dir: u8, proto: u8, dport: u16) -> FlowEvent {
    let be = |ip: [u8; 4]| u32::from(Ipv4Addr::from(ip)).to_be();
    FlowEvent {
        ts_ns: 1_000,
        ifindex: 7,
        suppressed: 3,
        saddr: be([10, 0, 0, 2]),
        daddr: be([10, 96, 0, 10]),
        xaddr: be([10, 0, 0, 3]),
        sport: 40_000u16.to_be(),
        dport: dport.to_be(),
        xport: 8080u16.to_be(),
        proto,
        dir,
        kind,
        verdict: if kind == flow::DROP {
            verdict::DENY_PORT
        } else {
            verdict::ALLOW_RULE
        },
        drop: if kind == flow::DROP {
            drop::POLICY
        } else {
            drop::NONE
        },
        policy_dir: dir,
    }
}

fn names() -> Names {
    let mut n = Names::default();
    n.by_ifindex.insert(7, ObjRef::new("default", "client"));
    n.by_ip
        .insert([10, 0, 0, 2].into(), ObjRef::new("default", "client"));
    n.by_ip
        .insert([10, 0, 0, 3].into(), ObjRef::new("web", "server-0"));
    n.frontends.insert(
        ([10, 96, 0, 10].into(), 80, PROTO_TCP),
        (ObjRef::new("web", "web"), "http".into()),
    );
    n
}

#[test]
fn events_are_named_with_pods_service_and_verdict() {
    let hub = FlowHub::new(4);
    hub.set_names(names());
    hub.publish(&[
        raw(flow::NEW, POL_DIR_EGRESS, PROTO_TCP, 80),
        raw(flow::DROP, POL_DIR_INGRESS, PROTO_UDP, 53),
    ]);
    let (got, rx) = hub.subscribe(&FlowFilter::default(), 10, false);
    assert!(rx.is_none());
    let new = &*got[0];
    assert_eq!(
        (new.r#type.as_str(), new.direction.as_str()),
        ("new-connection", "egress")
    );
    assert_eq!(
        (new.namespace.as_str(), new.pod.as_str()),
        ("default", "client")
    );
    assert_eq!(
        (
            new.source.as_str(),
            new.source_port,
            new.source_pod.as_str()
        ),
        ("10.0.0.2", 40_000, "default/client")
    );
    assert_eq!(
        (
            new.destination.as_str(),
            new.destination_port,
            new.destination_pod.as_str()
        ),
        ("10.0.0.3", 8080, "web/server-0")
    );
    assert_eq!(
        (new.service_address.as_str(), new.service_port),
        ("10.96.0.10", 80)
    );
    assert_eq!(
        (new.service.as_str(), new.service_port_name.as_str()),
        ("web/web", "http")
    );
    assert_eq!(
        (
            new.verdict.as_str(),
            new.policy_reason.as_str(),
            new.drop_reason.as_str()
        ),
        ("allowed", "allowed-by-rule", "")
    );
    assert_eq!(new.suppressed, 3);
    let dropped = &*got[1];
    assert_eq!(
        (
            dropped.r#type.as_str(),
            dropped.direction.as_str(),
            dropped.protocol.as_str()
        ),
        ("drop", "ingress", "UDP")
    );
    assert_eq!(
        (
            dropped.verdict.as_str(),
            dropped.policy_reason.as_str(),
            dropped.drop_reason.as_str()
        ),
        ("denied", "denied-by-port", "policy-denied")
    );
    // No frontend 10.96.0.10:53/UDP: translated, but no service name.
    assert_eq!(
        (dropped.service_address.as_str(), dropped.service.as_str()),
        ("10.96.0.10", "")
    );
}

#[test]
fn the_recent_buffer_keeps_the_last_events_and_followers_get_the_rest_once() {
    let hub = FlowHub::new(3);
    hub.set_names(names());
    for port in 1..=5 {
        hub.publish(&[raw(flow::NEW, POL_DIR_EGRESS, PROTO_TCP, port)]);
    }
    let ports = |evs: &[super::Flow]| evs.iter().map(|e| e.service_port).collect::<Vec<_>>();
    let (recent, rx) = hub.subscribe(&FlowFilter::default(), 2, true);
    assert_eq!(ports(&recent), [4, 5]);
    let (all, _) = hub.subscribe(&FlowFilter::default(), 100, false);
    assert_eq!(ports(&all), [3, 4, 5], "capacity 3");
    let mut rx = rx.expect("following");
    hub.publish(&[raw(flow::NEW, POL_DIR_EGRESS, PROTO_TCP, 6)]);
    assert_eq!(rx.try_recv().expect("the new event").service_port, 6);
    assert!(rx.try_recv().is_err(), "nothing sent twice");
}

fn req(f: impl FnOnce(&mut v1::FlowsRequest)) -> v1::FlowsRequest {
    let mut r = v1::FlowsRequest::default();
    f(&mut r);
    r
}

#[test]
fn filters_match_pod_namespace_verdict_protocol_and_port() {
    let hub = FlowHub::new(8);
    hub.set_names(names());
    hub.publish(&[
        raw(flow::NEW, POL_DIR_EGRESS, PROTO_TCP, 80),
        raw(flow::DROP, POL_DIR_INGRESS, PROTO_UDP, 53),
    ]);
    let count = |r: v1::FlowsRequest| {
        hub.subscribe(&FlowFilter::parse(&r).expect("valid"), 10, false)
            .0
            .len()
    };
    assert_eq!(count(req(|_| {})), 2);
    assert_eq!(count(req(|r| r.pod = "client".into())), 2);
    assert_eq!(count(req(|r| r.pod = "default/client".into())), 2);
    assert_eq!(count(req(|r| r.pod = "other/client".into())), 0);
    assert_eq!(count(req(|r| r.namespace = "web".into())), 0);
    assert_eq!(count(req(|r| r.verdict = "allowed".into())), 1);
    assert_eq!(count(req(|r| r.verdict = "denied".into())), 1);
    assert_eq!(count(req(|r| r.verdict = "Dropped".into())), 1);
    assert_eq!(count(req(|r| r.protocol = "udp".into())), 1);
    // Before translation (80, 53) or after (8080).
    assert_eq!(count(req(|r| r.port = 80)), 1);
    assert_eq!(count(req(|r| r.port = 8080)), 2);
    assert_eq!(count(req(|r| r.port = 81)), 0);
}

#[test]
fn bad_filters_name_their_field() {
    for (r, field) in [
        (req(|r| r.verdict = "maybe".into()), "verdict"),
        (req(|r| r.protocol = "sctp".into()), "protocol"),
        (req(|r| r.port = 70_000), "port"),
        (req(|r| r.pod = "a/".into()), "pod"),
    ] {
        let err = FlowFilter::parse(&r).expect_err("invalid");
        assert!(err.starts_with(field), "{err}");
    }
}

#[test]
fn an_event_renders_as_one_line_for_people() {
    let hub = FlowHub::new(4);
    hub.set_names(names());
    let mut ev = raw(flow::NEW, POL_DIR_EGRESS, PROTO_TCP, 80);
    ev.ts_ns = 0;
    hub.publish(&[ev, raw(flow::DROP, POL_DIR_INGRESS, PROTO_UDP, 53)]);
    let (got, _) = hub.subscribe(&FlowFilter::default(), 10, false);
    let mut new = (*got[0]).clone();
    new.time_unix_nano = 3_723_004_000_000; // 01:02:03.004
    assert_eq!(
        crate::api::flows::flow_line(&new),
        "01:02:03.004 egress  default/client new-connection TCP 10.0.0.2:40000 (default/client) \
         -> 10.0.0.3:8080 (web/server-0) via 10.96.0.10:80 web/web allowed (allowed-by-rule) \
         [+3 suppressed]"
    );
    let line = crate::api::flows::flow_line(&got[1]);
    assert!(
        line.ends_with("denied (denied-by-port) dropped (policy-denied) [+3 suppressed]"),
        "{line}"
    );
    let json = crate::api::flows::flow_json(&got[1]);
    assert_eq!(json["drop_reason"], "policy-denied");
    assert_eq!(json["destination_port"], 8080);
    assert_eq!(
        json.as_object().map(serde_json::Map::len),
        Some(21),
        "every field"
    );
    assert_eq!(json["policy_direction"], "ingress");
}

#[test]
fn a_hairpin_denied_by_its_own_ingress_says_so() {
    let hub = FlowHub::new(4);
    hub.set_names(names());
    // client -> the VIP -> client itself, judged in from_pod at its egress, then its ingress.
    let mut ev = raw(flow::DROP, POL_DIR_EGRESS, PROTO_TCP, 80);
    ev.xaddr = ev.saddr;
    ev.verdict = verdict::DENY_NO_RULE;
    ev.policy_dir = POL_DIR_INGRESS;
    hub.publish(&[ev]);
    let (got, _) = hub.subscribe(&FlowFilter::default(), 10, false);
    assert_eq!(
        (got[0].direction.as_str(), got[0].policy_direction.as_str()),
        ("egress", "ingress")
    );
    assert_eq!(got[0].destination_pod, "default/client");
    let line = crate::api::flows::flow_line(&got[0]);
    assert!(
        line.contains("via 10.96.0.10:80 web/web denied (denied-by-default at ingress)"),
        "{line}"
    );
}

#[test]
fn socket_hook_events_name_the_calling_pod_and_the_service() {
    let hub = FlowHub::new(4);
    hub.set_names(names());
    let mut ev = raw(flow::TRANSLATE, POL_DIR_EGRESS, PROTO_TCP, 80);
    ev.ifindex = 0;
    ev.sport = 0;
    ev.verdict = flow::NOT_JUDGED;
    let mut refused = ev;
    refused.kind = flow::DROP;
    refused.drop = drop::NO_ENDPOINTS;
    refused.xaddr = refused.daddr;
    refused.xport = refused.dport;
    let mut unknown = ev;
    unknown.saddr = 0;
    hub.publish(&[ev, refused, unknown]);
    let (got, _) = hub.subscribe(&FlowFilter::default(), 10, false);
    let e = &*got[0];
    assert_eq!(
        (e.r#type.as_str(), e.namespace.as_str(), e.pod.as_str()),
        ("translation", "default", "client")
    );
    assert_eq!(
        (
            e.verdict.as_str(),
            e.service.as_str(),
            e.destination_pod.as_str()
        ),
        ("", "web/web", "web/server-0")
    );
    let r = &*got[1];
    assert_eq!(
        (
            r.r#type.as_str(),
            r.drop_reason.as_str(),
            r.service.as_str()
        ),
        ("drop", "no-endpoints", "web/web")
    );
    assert_eq!(
        (r.destination.as_str(), r.service_address.as_str()),
        ("10.96.0.10", "10.96.0.10")
    );
    let u = &*got[2];
    assert_eq!(
        (u.source.as_str(), u.pod.as_str(), u.namespace.as_str()),
        ("", "", ""),
        "the node's own process"
    );
}

#[test]
fn a_drop_addressed_to_a_frontend_names_its_service() {
    let hub = FlowHub::new(4);
    hub.set_names(names());
    // Dropped by policy before its translation: the packet still carries the VIP.
    let mut ev = raw(flow::DROP, POL_DIR_EGRESS, PROTO_TCP, 80);
    ev.xaddr = ev.daddr;
    ev.xport = ev.dport;
    let mut other = ev;
    other.dport = 81u16.to_be();
    other.xport = other.dport;
    hub.publish(&[ev, other]);
    let (got, _) = hub.subscribe(&FlowFilter::default(), 10, false);
    assert_eq!(
        (
            got[0].service.as_str(),
            got[0].service_address.as_str(),
            got[0].service_port
        ),
        ("web/web", "10.96.0.10", 80)
    );
    assert_eq!(
        (
            got[1].service.as_str(),
            got[1].service_address.as_str(),
            got[1].service_port
        ),
        ("", "", 0),
        "no frontend on port 81, not translated"
    );
    let line = crate::api::flows::flow_line(&got[0]);
    assert!(
        line.contains("-> 10.96.0.10:80 (web/web) denied (denied-by-port)")
            && !line.contains("via"),
        "{line}"
    );
}
