//! The model's rules, one test each. Objects are written as JSON, as in a manifest.

// The helpers take the `json!` they are handed.
#![allow(clippy::needless_pass_by_value)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde_json::{Value, json};

use super::*;

fn service(name: &str, spec: Value) -> (ObjRef, Arc<k8s_openapi::api::core::v1::Service>) {
    let svc = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
    .unwrap();
    (ObjRef::new("default", name), Arc::new(svc))
}

/// A pod in `default` with labels `app: web`, extra JSON merged into its top level.
fn pod(name: &str, extra: Value) -> (ObjRef, Arc<k8s_openapi::api::core::v1::Pod>) {
    let mut v = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "echo"}]},
    });
    merge(&mut v, extra);
    (
        ObjRef::new("default", name),
        Arc::new(serde_json::from_value(v).unwrap()),
    )
}

fn slice(name: &str, body: Value) -> (ObjRef, Arc<k8s_openapi::api::discovery::v1::EndpointSlice>) {
    let mut v = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "ext"}},
        "addressType": "IPv4",
    });
    merge(&mut v, body);
    (
        ObjRef::new("default", name),
        Arc::new(serde_json::from_value(v).unwrap()),
    )
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

fn web_service(ports: Value) -> (ObjRef, Arc<k8s_openapi::api::core::v1::Service>) {
    service(
        "web",
        json!({"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "ports": ports}),
    )
}

fn state(
    services: impl IntoIterator<Item = (ObjRef, Arc<k8s_openapi::api::core::v1::Service>)>,
    pods: impl IntoIterator<Item = (ObjRef, Arc<k8s_openapi::api::core::v1::Pod>)>,
) -> ClusterState {
    ClusterState {
        services: services.into_iter().collect(),
        pods: pods.into_iter().collect(),
        ..ClusterState::default()
    }
}

fn with_ip(ip: &str) -> Value {
    json!({"status": {"podIPs": [{"ip": ip}]}})
}

fn key(vip: &str, port: u16, protocol: Protocol) -> FrontendKey {
    FrontendKey {
        vip: vip.parse().unwrap(),
        port,
        protocol,
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn backends(d: &Desired, vip: &str, port: u16, protocol: Protocol) -> Vec<SocketAddr> {
    d.frontends
        .get(&key(vip, port, protocol))
        .expect("frontend exists")
        .backends
        .clone()
}

#[test]
fn numeric_target_port_defaults_to_port() {
    let st = state(
        [web_service(
            json!([{"port": 80}, {"name": "alt", "port": 81, "targetPort": 8081}]),
        )],
        [pod("a", with_ip("10.0.0.1"))],
    );
    let d = compute(&st, &PodIps::new());
    assert_eq!(
        backends(&d, "10.96.0.10", 80, Protocol::Tcp),
        [sa("10.0.0.1:80")]
    );
    assert_eq!(
        backends(&d, "10.96.0.10", 81, Protocol::Tcp),
        [sa("10.0.0.1:8081")]
    );
    let f = &d.frontends[&key("10.96.0.10", 81, Protocol::Tcp)];
    assert_eq!(
        (f.service.to_string().as_str(), f.port_name.as_str()),
        ("default/web", "alt")
    );
    assert_eq!(f.affinity_timeout_s, None);
}

#[test]
fn named_target_port_resolves_per_pod_and_protocol() {
    let ports = |n: u16| {
        json!({"spec": {"containers": [{"name": "c", "ports": [
            {"name": "http", "containerPort": n},
            {"name": "dns", "containerPort": 5353, "protocol": "UDP"},
        ]}]}})
    };
    let mut a = ports(8080);
    merge(&mut a, with_ip("10.0.0.1"));
    let mut b = ports(9090);
    merge(&mut b, with_ip("10.0.0.2"));
    let st = state(
        [web_service(json!([
            {"name": "web", "port": 80, "targetPort": "http"},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
            // Same name, wrong protocol: no container port matches.
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns"},
        ]))],
        // Pod c has no port named http: not an endpoint for that service port.
        [pod("a", a), pod("b", b), pod("c", with_ip("10.0.0.3"))],
    );
    let d = compute(&st, &PodIps::new());
    assert_eq!(
        backends(&d, "10.96.0.10", 80, Protocol::Tcp),
        [sa("10.0.0.1:8080"), sa("10.0.0.2:9090")]
    );
    assert_eq!(
        backends(&d, "10.96.0.10", 53, Protocol::Udp),
        [sa("10.0.0.1:5353"), sa("10.0.0.2:5353")]
    );
    assert_eq!(backends(&d, "10.96.0.10", 53, Protocol::Tcp), []);
}

#[test]
fn named_port_found_on_sidecar_init_container() {
    let p = json!({"spec": {"initContainers": [
        {"name": "once", "ports": [{"name": "http", "containerPort": 1111}]},
        {"name": "side", "restartPolicy": "Always", "ports": [{"name": "http", "containerPort": 2222}]},
    ]}, "status": {"podIP": "10.0.0.1"}});
    let st = state(
        [web_service(json!([{"port": 80, "targetPort": "http"}]))],
        [pod("a", p)],
    );
    assert_eq!(
        backends(
            &compute(&st, &PodIps::new()),
            "10.96.0.10",
            80,
            Protocol::Tcp
        ),
        [sa("10.0.0.1:2222")]
    );
}

#[test]
fn selector_matches_all_labels_in_the_same_namespace() {
    let svc = service(
        "web",
        json!({"clusterIP": "10.96.0.10",
        "selector": {"app": "web", "tier": "front"}, "ports": [{"port": 80}]}),
    );
    let (_, other_ns) = pod(
        "x",
        json!({"metadata": {"namespace": "other", "labels": {"tier": "front"}},
        "status": {"podIP": "10.0.0.9"}}),
    );
    let st = state(
        [svc],
        [
            pod(
                "a",
                json!({"metadata": {"labels": {"tier": "front"}}, "status": {"podIP": "10.0.0.1"}}),
            ),
            pod("b", with_ip("10.0.0.2")), // lacks tier
            (ObjRef::new("other", "x"), other_ns),
        ],
    );
    assert_eq!(
        backends(
            &compute(&st, &PodIps::new()),
            "10.96.0.10",
            80,
            Protocol::Tcp
        ),
        [sa("10.0.0.1:80")]
    );
}

#[test]
fn protocols_default_tcp_udp_and_sctp_skipped() {
    let st = state(
        [web_service(json!([
            {"name": "a", "port": 53},
            {"name": "b", "port": 53, "protocol": "UDP"},
            {"name": "c", "port": 99, "protocol": "SCTP"},
        ]))],
        [pod("a", with_ip("10.0.0.1"))],
    );
    let d = compute(&st, &PodIps::new());
    let keys: Vec<_> = d.frontends.keys().cloned().collect();
    assert_eq!(
        keys,
        [
            key("10.96.0.10", 53, Protocol::Tcp),
            key("10.96.0.10", 53, Protocol::Udp)
        ]
    );
    assert_eq!(d.skipped.len(), 1);
    assert_eq!(d.skipped[0].port_name.as_deref(), Some("c"));
    assert!(d.skipped[0].reason.contains("SCTP"), "{:?}", d.skipped);
}

#[test]
fn dual_stack_cluster_ips_get_backends_of_their_family() {
    let svc = service(
        "web",
        json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
        "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}),
    );
    let st = state(
        [svc],
        [pod(
            "a",
            json!({"status": {"podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}}),
        )],
    );
    let d = compute(&st, &PodIps::new());
    assert_eq!(
        backends(&d, "10.96.0.10", 80, Protocol::Tcp),
        [sa("10.0.0.1:8080")]
    );
    assert_eq!(
        backends(&d, "fd00::10", 80, Protocol::Tcp),
        [sa("[fd00::1]:8080")]
    );
}

#[test]
fn cluster_ip_alone_is_used_when_cluster_ips_is_absent() {
    let st = state([web_service(json!([{"port": 80}]))], []);
    let d = compute(&st, &PodIps::new());
    assert_eq!(
        d.frontends.keys().cloned().collect::<Vec<_>>(),
        [key("10.96.0.10", 80, Protocol::Tcp)]
    );
}

#[test]
fn headless_external_name_and_unallocated_services_get_no_frontend() {
    let st = state(
        [
            service(
                "headless",
                json!({"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 80}]}),
            ),
            service(
                "ext",
                json!({"type": "ExternalName", "externalName": "example.com"}),
            ),
            service(
                "noip",
                json!({"selector": {"app": "web"}, "ports": [{"port": 80}]}),
            ),
        ],
        [pod("a", with_ip("10.0.0.1"))],
    );
    let d = compute(&st, &PodIps::new());
    assert!(d.frontends.is_empty(), "{:?}", d.frontends);
    // Only the unallocated one is surprising enough to report.
    assert_eq!(d.skipped.len(), 1);
    assert_eq!(d.skipped[0].service, ObjRef::new("default", "noip"));
}

#[test]
fn node_port_and_load_balancer_services_have_cluster_ip_frontends() {
    let st = state(
        [
            service(
                "np",
                json!({"type": "NodePort", "clusterIP": "10.96.0.1", "ports": [{"port": 80, "nodePort": 30080}]}),
            ),
            service(
                "lb",
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.2", "ports": [{"port": 80}]}),
            ),
        ],
        [],
    );
    let d = compute(&st, &PodIps::new());
    assert_eq!(d.frontends.len(), 2);
    assert_eq!(
        d.frontends[&key("10.96.0.1", 80, Protocol::Tcp)].backends,
        []
    );
}

#[test]
fn service_without_endpoints_still_has_a_frontend() {
    let st = state([web_service(json!([{"port": 80}]))], []);
    assert_eq!(
        backends(
            &compute(&st, &PodIps::new()),
            "10.96.0.10",
            80,
            Protocol::Tcp
        ),
        []
    );
}

#[test]
fn readiness_from_the_ready_condition() {
    let cond = |s: &str| json!({"status": {"conditions": [{"type": "Ready", "status": s}]}});
    let mut ready = cond("True");
    merge(&mut ready, with_ip("10.0.0.1"));
    let mut not_ready = cond("False");
    merge(&mut not_ready, with_ip("10.0.0.2"));
    let st = state(
        [web_service(json!([{"port": 80}]))],
        // No Ready condition at all (a plain manifest): ready.
        [
            pod("a", ready),
            pod("b", not_ready),
            pod("c", with_ip("10.0.0.3")),
        ],
    );
    assert_eq!(
        backends(
            &compute(&st, &PodIps::new()),
            "10.96.0.10",
            80,
            Protocol::Tcp
        ),
        [sa("10.0.0.1:80"), sa("10.0.0.3:80")]
    );
}

#[test]
fn publish_not_ready_addresses_makes_every_pod_ready() {
    let svc = service(
        "web",
        json!({"clusterIP": "10.96.0.10", "selector": {"app": "web"},
        "publishNotReadyAddresses": true, "ports": [{"port": 80}]}),
    );
    let p = json!({"status": {"podIP": "10.0.0.2", "conditions": [{"type": "Ready", "status": "False"}]}});
    let st = state([svc], [pod("b", p)]);
    assert_eq!(
        backends(
            &compute(&st, &PodIps::new()),
            "10.96.0.10",
            80,
            Protocol::Tcp
        ),
        [sa("10.0.0.2:80")]
    );
}

#[test]
fn terminal_pods_are_no_endpoints() {
    let st = state(
        [web_service(json!([{"port": 80}]))],
        [
            pod(
                "a",
                json!({"status": {"phase": "Succeeded", "podIP": "10.0.0.1"}}),
            ),
            pod(
                "b",
                json!({"status": {"phase": "Failed", "podIP": "10.0.0.2"}}),
            ),
            pod(
                "c",
                json!({"status": {"phase": "Running", "podIP": "10.0.0.3"}}),
            ),
        ],
    );
    assert_eq!(
        backends(
            &compute(&st, &PodIps::new()),
            "10.96.0.10",
            80,
            Protocol::Tcp
        ),
        [sa("10.0.0.3:80")]
    );
}

#[test]
fn terminating_pods_are_used_only_when_nothing_is_ready() {
    let terminating = |ip: &str, ready: &str| {
        json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"},
               "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}})
    };
    let svc = || web_service(json!([{"port": 80}]));
    // A ready pod exists: terminating ones are not used.
    let st = state(
        [svc()],
        [
            pod("a", with_ip("10.0.0.1")),
            pod("t", terminating("10.0.0.9", "True")),
        ],
    );
    assert_eq!(
        backends(
            &compute(&st, &PodIps::new()),
            "10.96.0.10",
            80,
            Protocol::Tcp
        ),
        [sa("10.0.0.1:80")]
    );
    // Only terminating pods left: the serving ones are used, the non-serving one is not.
    let st = state(
        [svc()],
        [
            pod("t", terminating("10.0.0.9", "True")),
            pod("u", terminating("10.0.0.8", "False")),
        ],
    );
    assert_eq!(
        backends(
            &compute(&st, &PodIps::new()),
            "10.96.0.10",
            80,
            Protocol::Tcp
        ),
        [sa("10.0.0.9:80")]
    );
}

#[test]
fn session_affinity_default_and_explicit_timeout() {
    let st = state(
        [
            service(
                "d",
                json!({"clusterIP": "10.96.0.1", "sessionAffinity": "ClientIP", "ports": [{"port": 80}]}),
            ),
            service(
                "e",
                json!({"clusterIP": "10.96.0.2", "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}, "ports": [{"port": 80}]}),
            ),
            service(
                "n",
                json!({"clusterIP": "10.96.0.3", "sessionAffinity": "None", "ports": [{"port": 80}]}),
            ),
        ],
        [],
    );
    let d = compute(&st, &PodIps::new());
    let t = |vip| d.frontends[&key(vip, 80, Protocol::Tcp)].affinity_timeout_s;
    assert_eq!(t("10.96.0.1"), Some(DEFAULT_AFFINITY_TIMEOUT_S));
    assert_eq!(t("10.96.0.2"), Some(60));
    assert_eq!(t("10.96.0.3"), None);
}

#[test]
fn pod_ip_from_status_else_from_cni_registration() {
    let st = state(
        [web_service(json!([{"port": 80}]))],
        [
            pod("a", with_ip("10.0.0.1")),
            pod("b", json!({})), // registered below
            pod("c", json!({})), // neither: no endpoint
        ],
    );
    let mut ips = PodIps::new();
    ips.insert(
        ObjRef::new("default", "b"),
        vec!["10.0.0.2".parse::<IpAddr>().unwrap()],
    );
    // The status wins over the registration.
    ips.insert(
        ObjRef::new("default", "a"),
        vec!["10.0.0.100".parse::<IpAddr>().unwrap()],
    );
    assert_eq!(
        backends(&compute(&st, &ips), "10.96.0.10", 80, Protocol::Tcp),
        [sa("10.0.0.1:80"), sa("10.0.0.2:80")]
    );
}

fn ext_service(ports: Value) -> (ObjRef, Arc<k8s_openapi::api::core::v1::Service>) {
    service("ext", json!({"clusterIP": "10.96.0.20", "ports": ports}))
}

#[test]
fn selectorless_service_uses_slices_by_port_name_and_protocol() {
    let mut st = state(
        [ext_service(json!([
            {"name": "http", "port": 80, "targetPort": 9999},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]))],
        [pod("a", with_ip("10.0.0.1"))], // not selected: the service has no selector
    );
    st.endpoint_slices.extend([
        slice("ext-1", json!({
            "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["192.168.1.1"]}, {"addresses": ["192.168.1.2", "192.168.1.99"]}],
        })),
        slice("ext-2", json!({
            "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [{"addresses": ["192.168.1.3"]}],
        })),
        // Another service's slice.
        slice("other", json!({"metadata": {"labels": {"kubernetes.io/service-name": "other"}},
            "ports": [{"name": "http", "port": 1}], "endpoints": [{"addresses": ["192.168.9.9"]}]})),
        // Wrong address family for the VIP.
        slice("ext-v6", json!({"addressType": "IPv6", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["fd00::1"]}]})),
    ]);
    let d = compute(&st, &PodIps::new());
    // The slice's port number is used (targetPort is the controller's business), and only the
    // first address of an endpoint counts.
    assert_eq!(
        backends(&d, "10.96.0.20", 80, Protocol::Tcp),
        [sa("192.168.1.1:8080"), sa("192.168.1.2:8080")]
    );
    assert_eq!(
        backends(&d, "10.96.0.20", 53, Protocol::Udp),
        [sa("192.168.1.3:5353")]
    );
}

#[test]
fn selectorless_unnamed_port_matches_unnamed_slice_port() {
    let mut st = state([ext_service(json!([{"port": 80}]))], []);
    st.endpoint_slices.extend([slice(
        "ext-1",
        json!({
            "ports": [{"port": 8080}], "endpoints": [{"addresses": ["192.168.1.1"]}],
        }),
    )]);
    assert_eq!(
        backends(
            &compute(&st, &PodIps::new()),
            "10.96.0.20",
            80,
            Protocol::Tcp
        ),
        [sa("192.168.1.1:8080")]
    );
}

#[test]
fn slice_conditions_and_terminating_fallback() {
    let ep = |ip: &str, c: Value| json!({"addresses": [ip], "conditions": c});
    let st_with = |endpoints: Value| {
        let mut st = state([ext_service(json!([{"port": 80}]))], []);
        st.endpoint_slices.extend([slice(
            "ext-1",
            json!({"ports": [{"port": 80}], "endpoints": endpoints}),
        )]);
        compute(&st, &PodIps::new())
    };
    // ready nil ⇒ ready; ready false ⇒ not; terminating serving ones unused while any is ready.
    let d = st_with(json!([
        ep("192.168.1.1", json!({})),
        ep("192.168.1.2", json!({"ready": false})),
        ep(
            "192.168.1.3",
            json!({"ready": false, "serving": true, "terminating": true})
        ),
    ]));
    assert_eq!(
        backends(&d, "10.96.0.20", 80, Protocol::Tcp),
        [sa("192.168.1.1:80")]
    );
    // No ready endpoint: fall back to serving-and-terminating (serving nil ⇒ true, as
    // kube-proxy reads it); not-serving and not-terminating ones stay out.
    let d = st_with(json!([
        ep("192.168.1.2", json!({"ready": false})),
        ep(
            "192.168.1.3",
            json!({"ready": false, "serving": true, "terminating": true})
        ),
        ep(
            "192.168.1.4",
            json!({"ready": false, "serving": false, "terminating": true})
        ),
        ep("192.168.1.5", json!({"ready": false, "terminating": true})),
    ]));
    assert_eq!(
        backends(&d, "10.96.0.20", 80, Protocol::Tcp),
        [sa("192.168.1.3:80"), sa("192.168.1.5:80")]
    );
}

#[test]
fn backends_are_sorted_and_deduplicated() {
    let mut st = state([ext_service(json!([{"port": 80}]))], []);
    st.endpoint_slices.extend([
        slice(
            "ext-1",
            json!({"ports": [{"port": 80}],
            "endpoints": [{"addresses": ["192.168.1.9"]}, {"addresses": ["192.168.1.1"]}]}),
        ),
        slice(
            "ext-2",
            json!({"ports": [{"port": 80}], "endpoints": [{"addresses": ["192.168.1.9"]}]}),
        ),
    ]);
    assert_eq!(
        backends(
            &compute(&st, &PodIps::new()),
            "10.96.0.20",
            80,
            Protocol::Tcp
        ),
        [sa("192.168.1.1:80"), sa("192.168.1.9:80")]
    );
}

#[test]
fn objects_for_another_proxy_are_ignored() {
    let mut st = state([ext_service(json!([{"port": 80}]))], []);
    st.endpoint_slices.extend([slice(
        "ext-1",
        json!({
            "metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "other"}},
            "ports": [{"port": 80}], "endpoints": [{"addresses": ["192.168.1.1"]}],
        }),
    )]);
    assert_eq!(
        backends(
            &compute(&st, &PodIps::new()),
            "10.96.0.20",
            80,
            Protocol::Tcp
        ),
        []
    );
}

#[test]
fn conflicting_vips_keep_the_first_service() {
    let st = state(
        [
            service(
                "a",
                json!({"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}),
            ),
            service(
                "b",
                json!({"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}),
            ),
        ],
        [],
    );
    let d = compute(&st, &PodIps::new());
    assert_eq!(
        d.frontends[&key("10.96.0.1", 80, Protocol::Tcp)].service,
        ObjRef::new("default", "a")
    );
    assert_eq!(d.skipped[0].service, ObjRef::new("default", "b"));
}
