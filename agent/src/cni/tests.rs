//! The plugin against real reference-plugin results (fixtures recorded from
//! `/usr/lib/cni/ptp` and `/usr/lib/cni/bridge` with host-local IPAM) and, for the commands
//! that talk to the agent, against the API served on a real unix socket.
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use serde_json::{Value, json};

use super::pod::{Attachment, registration};
use super::*;
use crate::api::testing::TestServer;

const PTP_1_0: &str = include_str!("fixtures/ptp-1.0.0.json");
const PTP_0_4: &str = include_str!("fixtures/ptp-0.4.0.json");
const BRIDGE_DUAL_STACK: &str = include_str!("fixtures/bridge-dual-stack-1.0.0.json");
/// The sandbox the fixtures were recorded with.
const FIXTURE_NETNS: &str = "/var/run/netns/cni-try-3542";

fn prev(json: &str) -> PrevResult {
    serde_json::from_str(json).expect("fixture parses")
}

fn at(netns: &str) -> Attachment<'_> {
    Attachment {
        container_id: "ctr1",
        netns,
        ifname: "eth0",
    }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn env(command: &str, args: &str) -> CniEnv {
    let vars: HashMap<&str, String> = HashMap::from([
        ("CNI_COMMAND", command.to_owned()),
        ("CNI_CONTAINERID", "ctr1".to_owned()),
        ("CNI_NETNS", FIXTURE_NETNS.to_owned()),
        ("CNI_IFNAME", "eth0".to_owned()),
        ("CNI_ARGS", args.to_owned()),
        ("CNI_PATH", "/usr/lib/cni".to_owned()),
    ]);
    CniEnv::from_lookup(|k| vars.get(k).cloned())
}

const K8S_ARGS: &str =
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=ctr1";

fn conf(version: &str, socket: &Path, prev_result: Option<&str>) -> Vec<u8> {
    let mut conf = json!({
        "cniVersion": version, "name": "k8s-pod-network", "type": "ferrovia-cni",
        "agentSocket": socket,
    });
    if let Some(prev) = prev_result {
        conf["prevResult"] = serde_json::from_str(prev).unwrap();
    }
    serde_json::to_vec(&conf).unwrap()
}

fn stdout_json(outcome: &Outcome) -> Value {
    serde_json::from_str(&outcome.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", outcome.stdout))
}

// ---- prevResult → registration ----

#[test]
fn ptp_result_gives_host_veth_and_pod_address() {
    let pod = registration(&prev(PTP_1_0), at(FIXTURE_NETNS), PodIdentity::default()).unwrap();
    assert_eq!(pod.host_ifname, "veth18a47169");
    assert_eq!(pod.ifname, "eth0");
    assert_eq!(pod.ips, ips(&["10.250.0.2"]));
    assert_eq!(pod.netns, FIXTURE_NETNS);
    assert_eq!(pod.container_id, "ctr1");
}

#[test]
fn ptp_0_4_result_is_read_the_same_way() {
    let pod = registration(&prev(PTP_0_4), at(FIXTURE_NETNS), PodIdentity::default()).unwrap();
    assert_eq!(
        (pod.host_ifname.as_str(), pod.ips),
        ("veth317e1ad1", ips(&["10.250.0.3"]))
    );
}

#[test]
fn bridge_result_skips_the_bridge_and_keeps_both_families() {
    let pod = registration(
        &prev(BRIDGE_DUAL_STACK),
        at(FIXTURE_NETNS),
        PodIdentity::default(),
    )
    .unwrap();
    assert_eq!(
        pod.host_ifname, "veth67f117d6",
        "the bridge is listed first, the veth next"
    );
    assert_eq!(pod.ips, ips(&["10.251.0.2", "fd00:251::2"]));
}

#[test]
fn interfaces_appended_after_the_pod_are_not_the_host_veth() {
    // As the bandwidth plugin chained before ferrovia would leave it: its ifb comes last.
    let mut result: Value = serde_json::from_str(PTP_1_0).unwrap();
    result["interfaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "bwp0a1b2c3", "mac": "aa:bb:cc:dd:ee:ff"}));
    let prev: PrevResult = serde_json::from_value(result).unwrap();
    let pod = registration(&prev, at(FIXTURE_NETNS), PodIdentity::default()).unwrap();
    assert_eq!(pod.host_ifname, "veth18a47169");
}

#[test]
fn sandbox_path_spelled_differently_still_matches_a_single_candidate() {
    let pod = registration(
        &prev(PTP_1_0),
        at("/proc/4242/ns/net"),
        PodIdentity::default(),
    )
    .unwrap();
    assert_eq!(pod.host_ifname, "veth18a47169");
}

#[test]
fn result_without_host_interface_is_refused() {
    // What macvlan/ipvlan return: only the pod's interface.
    let prev: PrevResult = serde_json::from_value(json!({
        "interfaces": [{"name": "eth0", "sandbox": FIXTURE_NETNS}],
        "ips": [{"address": "10.0.0.5/24", "interface": 0}],
    }))
    .unwrap();
    let err = registration(&prev, at(FIXTURE_NETNS), PodIdentity::default()).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    assert!(err.msg.contains("no host-side interface"), "{}", err.msg);
}

#[test]
fn addresses_of_other_interfaces_are_ignored() {
    let prev: PrevResult = serde_json::from_value(json!({
        "interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox": FIXTURE_NETNS}],
        "ips": [{"address": "192.168.1.1/24", "interface": 0}, {"address": "10.0.0.5/24", "interface": 1}],
    }))
    .unwrap();
    let pod = registration(&prev, at(FIXTURE_NETNS), PodIdentity::default()).unwrap();
    assert_eq!(pod.ips, ips(&["10.0.0.5"]));

    let no_pod_ip: PrevResult = serde_json::from_value(json!({
        "interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox": FIXTURE_NETNS}],
        "ips": [{"address": "192.168.1.1/24", "interface": 0}],
    }))
    .unwrap();
    let err = registration(&no_pod_ip, at(FIXTURE_NETNS), PodIdentity::default()).unwrap_err();
    assert!(err.msg.contains("no IP address"), "{}", err.msg);
}

#[test]
fn wrong_ifname_is_refused() {
    let at = Attachment {
        container_id: "ctr1",
        netns: FIXTURE_NETNS,
        ifname: "net1",
    };
    let err = registration(&prev(PTP_1_0), at, PodIdentity::default()).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    assert!(err.msg.contains("no interface net1"), "{}", err.msg);
}

// ---- environment ----

#[test]
fn cni_args_are_parsed() {
    let args = parse_cni_args(K8S_ARGS).unwrap();
    assert_eq!(args[0], ("IgnoreUnknown", "1"));
    assert_eq!(
        PodIdentity::from_args(&args),
        PodIdentity {
            namespace: "default".into(),
            name: "web-0".into()
        }
    );
    assert_eq!(parse_cni_args("").unwrap(), []);
    assert_eq!(
        parse_cni_args("A=1;;B=x=y;").unwrap(),
        [("A", "1"), ("B", "x=y")]
    );
    assert_eq!(PodIdentity::from_args(&[]), PodIdentity::default());
    let err = parse_cni_args("A=1;garbage").unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidEnvironment);
}

#[test]
fn commands_are_parsed() {
    assert_eq!("ADD".parse::<Command>().unwrap(), Command::Add);
    assert_eq!("GC".parse::<Command>().unwrap(), Command::Gc);
    assert_eq!(
        "add".parse::<Command>().unwrap_err().code,
        ErrorCode::InvalidEnvironment
    );
    assert!("".parse::<Command>().unwrap_err().msg.contains("not set"));
}

// ---- whole invocations without an agent ----

#[tokio::test]
async fn version_lists_supported_versions() {
    let out = run(&env("VERSION", ""), br#"{"cniVersion":"1.0.0"}"#).await;
    assert_eq!(out.exit_code, 0);
    assert_eq!(
        stdout_json(&out),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]})
    );
    // An old runtime may send nothing, or a version we do not speak: name the newest.
    let out = run(&env("VERSION", ""), b"").await;
    assert_eq!(stdout_json(&out)["cniVersion"], "1.1.0");
    let out = run(&env("VERSION", ""), br#"{"cniVersion":"0.3.1"}"#).await;
    assert_eq!(stdout_json(&out)["cniVersion"], "1.1.0");
}

#[tokio::test]
async fn add_without_prev_result_says_to_chain() {
    let out = run(
        &env("ADD", K8S_ARGS),
        &conf("1.0.0", Path::new("/nonexistent"), None),
    )
    .await;
    assert_eq!(out.exit_code, 1);
    let err = stdout_json(&out);
    assert_eq!(err["cniVersion"], "1.0.0");
    assert_eq!(err["code"], 7);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains("must be chained after a plugin"),
        "{err}"
    );
    assert_eq!(err.as_object().unwrap().len(), 3, "no empty details: {err}");
}

#[tokio::test]
async fn bad_input_gives_spec_errors() {
    let out = run(&env("ADD", ""), b"{not json").await;
    assert_eq!(
        (out.exit_code, stdout_json(&out)["code"].clone()),
        (1, json!(6))
    );
    assert_eq!(stdout_json(&out)["cniVersion"], "1.0.0");

    let out = run(
        &env("ADD", ""),
        br#"{"cniVersion":"0.3.1","name":"n","type":"ferrovia-cni"}"#,
    )
    .await;
    let err = stdout_json(&out);
    assert_eq!(
        (err["code"].clone(), err["cniVersion"].clone()),
        (json!(1), json!("0.3.1"))
    );
    assert!(err["details"].as_str().unwrap().contains("1.0.0"), "{err}");

    let out = run(
        &env("ADD", ""),
        br#"{"cniVersion":"1.0.0","type":"ferrovia-cni"}"#,
    )
    .await;
    assert_eq!(stdout_json(&out)["code"], 7, "name is required");

    let out = run(&env("", ""), b"{}").await;
    assert_eq!(stdout_json(&out)["code"], 4);

    let mut no_netns = env("ADD", K8S_ARGS);
    no_netns.netns.clear();
    let out = run(&no_netns, &conf("1.0.0", Path::new("/x"), Some(PTP_1_0))).await;
    let err = stdout_json(&out);
    assert_eq!(err["code"], 4);
    assert!(err["msg"].as_str().unwrap().contains("CNI_NETNS"), "{err}");
}

#[tokio::test]
async fn add_with_agent_down_is_try_again_later_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let out = run(
        &env("ADD", K8S_ARGS),
        &conf("1.0.0", &socket, Some(PTP_1_0)),
    )
    .await;
    assert_eq!(out.exit_code, 1);
    let err = stdout_json(&out);
    assert_eq!(err["code"], 11);
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains(&*socket.to_string_lossy()) && msg.contains("is ferrovia-agent running?"),
        "{msg}"
    );
}

#[tokio::test]
async fn del_with_agent_down_succeeds_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let out = run(&env("DEL", K8S_ARGS), &conf("1.0.0", &socket, None)).await;
    assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""));
    assert_eq!(out.log.len(), 1);
    assert!(
        out.log[0].contains("reconciles on restart"),
        "{:?}",
        out.log
    );
}

#[test]
fn agent_socket_defaults_to_the_agents() {
    let conf =
        run::parse_conf(br#"{"cniVersion":"1.0.0","name":"n","type":"ferrovia-cni"}"#).unwrap();
    assert_eq!(conf.agent_socket, Path::new("/run/ferrovia/agent.sock"));
    assert!(conf.prev_result.is_none());
}

// ---- whole invocations against the API on a real socket ----

#[test_log::test(tokio::test)]
async fn add_check_del_against_the_agent_api() {
    let server = TestServer::start().await;
    let conf_with_prev = conf("1.0.0", &server.socket, Some(PTP_1_0));

    let out = run(&env("ADD", K8S_ARGS), &conf_with_prev).await;
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    assert_eq!(
        stdout_json(&out),
        serde_json::from_str::<Value>(PTP_1_0).unwrap(),
        "prevResult passed on"
    );
    let pod = server.registry.pods.lock().unwrap()["ctr1"].clone();
    assert_eq!(
        (
            pod.namespace.as_str(),
            pod.name.as_str(),
            pod.host_ifname.as_str()
        ),
        ("default", "web-0", "veth18a47169")
    );
    assert_eq!(pod.ips, ips(&["10.250.0.2"]));

    let out = run(&env("CHECK", K8S_ARGS), &conf_with_prev).await;
    assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""));

    let out = run(&env("STATUS", ""), &conf("1.1.0", &server.socket, None)).await;
    assert_eq!(out.exit_code, 0, "{}", out.stdout);

    for _ in 0..2 {
        let out = run(&env("DEL", K8S_ARGS), &conf("1.0.0", &server.socket, None)).await;
        assert_eq!(
            (out.exit_code, out.stdout.as_str(), out.log.len()),
            (0, "", 0),
            "DEL is idempotent"
        );
    }
    assert!(server.registry.pods.lock().unwrap().is_empty());

    let out = run(&env("CHECK", K8S_ARGS), &conf_with_prev).await;
    let err = stdout_json(&out);
    assert_eq!((out.exit_code, err["code"].clone()), (1, json!(3)), "{err}");

    server.stop().await.unwrap();
}

#[test_log::test(tokio::test)]
async fn add_0_4_result_is_returned_in_the_conf_version() {
    let server = TestServer::start().await;
    let out = run(
        &env("ADD", K8S_ARGS),
        &conf("0.4.0", &server.socket, Some(PTP_0_4)),
    )
    .await;
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    let result = stdout_json(&out);
    assert_eq!(result["cniVersion"], "0.4.0");
    assert_eq!(
        result["ips"][0]["version"], "4",
        "fields ferrovia does not model are kept"
    );
    server.stop().await.unwrap();
}

#[test_log::test(tokio::test)]
async fn check_fails_when_the_agent_says_not_attached() {
    let server = TestServer::start().await;
    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=unattached";
    let conf_with_prev = conf("1.0.0", &server.socket, Some(PTP_1_0));
    assert_eq!(run(&env("ADD", args), &conf_with_prev).await.exit_code, 0);
    let out = run(&env("CHECK", args), &conf_with_prev).await;
    let err = stdout_json(&out);
    assert_eq!(
        (out.exit_code, err["code"].clone()),
        (1, json!(100)),
        "{err}"
    );
    assert!(
        err["msg"].as_str().unwrap().contains("not attached"),
        "{err}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn status_with_agent_down_is_not_available() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &env("STATUS", ""),
        &conf("1.1.0", &dir.path().join("a.sock"), None),
    )
    .await;
    assert_eq!(stdout_json(&out)["code"], 50);
}
