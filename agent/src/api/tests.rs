//! Round trips over a real unix socket, against the [`TestRegistry`] double.
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;

use ferrovia_proto::v1;
use tonic::Code;

use super::testing::TestServer;
use super::{AgentStatus, ProgramState, connect};

fn register_request(container_id: &str, name: &str) -> v1::RegisterPodRequest {
    v1::RegisterPodRequest {
        container_id: container_id.into(),
        netns: "/var/run/netns/pod-a".into(),
        pod_namespace: "default".into(),
        pod_name: name.into(),
        ifname: "eth0".into(),
        host_ifname: "veth0a1b2c3d".into(),
        ips: vec!["10.250.0.2".into(), "fd00::2".into()],
    }
}

fn check_request(container_id: &str) -> v1::CheckPodRequest {
    v1::CheckPodRequest {
        container_id: container_id.into(),
        ..Default::default()
    }
}

#[test_log::test(tokio::test)]
async fn register_check_status_unregister_round_trip() {
    let server = TestServer::start().await;
    let mode = std::fs::metadata(&server.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket must be private to root");

    let mut client = connect(&server.socket).await.expect("connect");
    client
        .register_pod(register_request("c1", "web-0"))
        .await
        .expect("register");

    let pod = server.registry.pods.lock().unwrap()["c1"].clone();
    assert_eq!(pod.host_ifname, "veth0a1b2c3d");
    assert_eq!(
        pod.ips,
        [
            "10.250.0.2".parse::<IpAddr>().unwrap(),
            "fd00::2".parse().unwrap()
        ]
    );
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str()),
        ("default", "web-0")
    );

    client
        .check_pod(check_request("c1"))
        .await
        .expect("check a registered pod");

    let status = client
        .status(v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        AgentStatus::from(status),
        AgentStatus {
            node_name: "node-a".into(),
            pods: 1,
            frontends: 3,
            socket_lb: true,
            programs: vec![
                ProgramState {
                    name: "sock4_connect".into(),
                    attach_point: Some("/sys/fs/cgroup".into())
                },
                ProgramState {
                    name: "from_pod".into(),
                    attach_point: None
                },
            ],
            degraded: vec!["sock4_connect: an example degradation".into()],
        }
    );

    let unregister = v1::UnregisterPodRequest {
        container_id: "c1".into(),
        ..Default::default()
    };
    client
        .unregister_pod(unregister.clone())
        .await
        .expect("unregister");
    client
        .unregister_pod(unregister)
        .await
        .expect("unregister is idempotent");
    let err = client.check_pod(check_request("c1")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let socket = server.socket.clone();
    server
        .stop()
        .await
        .expect("serve returns cleanly on shutdown");
    assert!(!socket.exists(), "socket removed on shutdown");
}

#[test_log::test(tokio::test)]
async fn errors_map_to_status_codes() {
    let server = TestServer::start().await;
    let mut client = connect(&server.socket).await.expect("connect");

    let mut bad_ip = register_request("c2", "web-1");
    bad_ip.ips = vec!["10.250.0.2/24".into()];
    let err = client.register_pod(bad_ip).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("10.250.0.2/24"), "{err:?}");

    let mut no_ip = register_request("c2", "web-1");
    no_ip.ips.clear();
    assert_eq!(
        client.register_pod(no_ip).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let mut long_ifname = register_request("c2", "web-1");
    long_ifname.host_ifname = "a-very-long-interface".into();
    assert_eq!(
        client.register_pod(long_ifname).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let err = client.check_pod(check_request("")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    client
        .register_pod(register_request("c3", "unattached"))
        .await
        .unwrap();
    let err = client.check_pod(check_request("c3")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    server.stop().await.unwrap();
}

#[test_log::test(tokio::test)]
async fn connect_error_names_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let err = connect(&socket).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&*socket.to_string_lossy()), "{msg}");
    assert!(msg.contains("is ferrovia-agent running?"), "{msg}");
    assert!(msg.contains("No such file"), "the cause is shown: {msg}");
}

#[test_log::test(tokio::test)]
async fn stale_socket_is_replaced_but_a_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    // A socket file whose listener is gone, as after an agent crash.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());

    let registry = std::sync::Arc::new(super::testing::TestRegistry::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn({
        let (socket, registry) = (socket.clone(), registry.clone());
        async move {
            super::serve(&socket, registry, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    // Wait until the first server answers, then a second one must refuse the same path.
    let mut client = None;
    for _ in 0..200 {
        if let Ok(c) = connect(&socket).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    client
        .expect("first server answers")
        .status(v1::StatusRequest {})
        .await
        .unwrap();

    let err = super::serve(&socket, registry, std::future::ready(()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already serving"), "{err:#}");
    assert!(socket.exists(), "the live socket was left alone");

    stop.send(()).unwrap();
    first.await.unwrap().unwrap();
}

#[test_log::test(tokio::test)]
async fn refuses_to_remove_a_non_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    std::fs::write(&path, "not a socket").unwrap();
    let registry = std::sync::Arc::new(super::testing::TestRegistry::default());
    let err = super::serve(&path, registry, std::future::ready(()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err:#}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
}

/// The read-only views over the socket: each plain answer of the registry arrives as the
/// messages the CLI prints.
#[test_log::test(tokio::test)]
async fn read_only_views_round_trip() {
    let server = TestServer::start().await;
    let mut client = connect(&server.socket).await.expect("connect");
    client
        .register_pod(register_request("c1", "web-0"))
        .await
        .expect("register");

    let services = client
        .list_services(v1::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        services.frontends,
        [v1::ServiceFrontend {
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
        }]
    );
    assert_eq!(services.skipped[0].port_name, "", "a whole service skipped");

    let endpoints = client
        .list_endpoints(v1::ListEndpointsRequest {})
        .await
        .unwrap()
        .into_inner();
    let port = &endpoints.service_ports[0];
    assert_eq!(
        (port.port_name.as_str(), port.protocol.as_str()),
        ("http", "TCP")
    );
    let terminating = &port.endpoints[1];
    assert_eq!(
        (
            terminating.address.as_str(),
            terminating.port,
            terminating.ready,
            terminating.serving,
            terminating.terminating,
            terminating.selected
        ),
        ("10.250.0.3", 9376, false, true, true, false)
    );

    let policies = client
        .list_policies(v1::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(policies.policies[0].selected_pods, ["web-0"]);
    assert_eq!(policies.policies[0].ingress_rules, 1);
    assert_eq!(policies.rejected.len(), 1);

    let pods = client
        .list_pods(v1::ListPodsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pods;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].ips, ["10.250.0.2", "fd00::2"]);
    assert_eq!(pods[0].host_ifname, "veth0a1b2c3d");
    assert_eq!(pods[0].from_pod.as_ref().unwrap().mode, "tcx");
    assert_eq!(
        pods[0].to_pod,
        Some(v1::TcAttachment {
            mode: "cls_bpf".into(),
            priority: 1,
            handle: 7
        })
    );
    assert!(pods[0].ingress_isolated && !pods[0].egress_isolated);

    let maps = client
        .get_maps(v1::GetMapsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(maps.bpffs_root, "/sys/fs/bpf/test");
    let (services_map, backends_map) = (&maps.maps[0], &maps.maps[1]);
    assert_eq!(
        (
            services_map.r#type.as_str(),
            services_map.max_entries,
            services_map.entries,
            services_map.error.as_str()
        ),
        ("hash", 1024, 256, "")
    );
    assert!((services_map.fill - 0.25).abs() < f64::EPSILON);
    assert_eq!(backends_map.error, "not pinned");

    server.stop().await.unwrap();
}

#[test_log::test(tokio::test)]
async fn explain_answers_with_verdicts_and_refuses_bad_requests_by_field() {
    let server = TestServer::start().await;
    let mut client = connect(&server.socket).await.expect("connect");
    let request = |source: &str, protocol: &str, port| v1::ExplainRequest {
        source: source.into(),
        destination: "10.96.0.10".into(),
        protocol: protocol.into(),
        port,
    };

    let answer = client
        .explain(request("default/client", "tcp", 80))
        .await
        .expect("explain")
        .into_inner();
    assert_eq!((answer.protocol.as_str(), answer.port), ("TCP", 80));
    assert!(answer.policy_enforced);
    let service = answer.service.expect("a frontend");
    assert_eq!(
        (
            service.namespace.as_str(),
            service.name.as_str(),
            service.r#type.as_str(),
            service.service_id,
            service.affinity_timeout_s,
        ),
        ("default", "web", "ClusterIP", 7, 60)
    );
    let verdicts: Vec<_> = answer
        .paths
        .iter()
        .map(|p| {
            let ingress = p.ingress.as_ref().unwrap();
            let rules: Vec<_> = ingress
                .rules
                .iter()
                .map(|r| format!("{}/{}#{}", r.namespace, r.name, r.rule))
                .collect();
            (
                p.backend.as_ref().unwrap().pod.clone(),
                ingress.reason.clone(),
                rules,
                p.allowed,
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            (
                "default/web-a".to_owned(),
                "allowed-by-rule".to_owned(),
                vec!["default/web-in#1".to_owned()],
                true
            ),
            (
                "default/web-b".to_owned(),
                "denied-by-port".to_owned(),
                vec!["default/web-in#-1".to_owned()],
                false
            ),
        ]
    );

    for (bad, field) in [
        (request("default/client", "icmp", 80), "protocol"),
        (request("default/client", "udp", 0), "port"),
        (request("default/client", "udp", 70_000), "port"),
        (request("", "udp", 53), "source"),
        (request("no/such", "udp", 53), "source"),
    ] {
        let err = client.explain(bad.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
        assert!(err.message().starts_with(field), "{bad:?}: {err:?}");
    }
    server.stop().await.unwrap();
}
