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
