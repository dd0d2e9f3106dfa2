//! The manifests source: parsing, validation, last-good retention and the watcher.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::model::ObjRef;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata:
  name: hostnames
spec:
  clusterIP: 10.96.0.10
  selector: {app: hostnames}
  ports:
  - port: 80
    targetPort: 9376
";

fn service_port(state: &ClusterState, name: &str) -> i32 {
    let svc = &state.services[&ObjRef::new("default", name)];
    svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port
}

#[test]
fn parses_several_documents_and_kinds() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "app.yaml",
        &format!(
            "# leading comment\n{SERVICE}
---
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
# an empty document
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels: {{app: web}}
spec:
  containers:
  - name: web
    image: echo
    ports: [{{name: http, containerPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ext-1
  labels: {{kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{{port: 80}}]
endpoints: [{{addresses: [192.168.1.1]}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: all}}
spec: {{podSelector: {{}}}}
"
        ),
    );
    write(
        dir.path(),
        "other.yml",
        SERVICE
            .replace("hostnames", "second")
            .replace("10.96.0.10", "10.96.0.11")
            .as_str(),
    );
    write(dir.path(), "notes.txt", "not a manifest");
    let (state, errors) = load_dir(dir.path());
    assert_eq!(errors, []);
    assert_eq!(service_port(&state, "hostnames"), 80);
    assert_eq!(service_port(&state, "second"), 80);
    // The namespace defaults to `default` and is written into the object, as the API server does.
    let svc = &state.services[&ObjRef::new("default", "hostnames")];
    assert_eq!(svc.metadata.namespace.as_deref(), Some("default"));
    assert!(state.pods.contains_key(&ObjRef::new("shop", "web-0")));
    assert!(
        state
            .endpoint_slices
            .contains_key(&ObjRef::new("default", "ext-1"))
    );
    assert!(state.namespaces.contains_key("shop"));
    assert!(
        state
            .network_policies
            .contains_key(&ObjRef::new("default", "all"))
    );
    assert_eq!(state.len(), 6);
}

/// Loads a one-document file `x.yaml` and returns its only error.
fn only_error(doc: &str) -> ManifestError {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "x.yaml", doc);
    let (state, mut errors) = load_dir(dir.path());
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(state.is_empty(), "an invalid object is left out: {state:?}");
    let mut e = errors.remove(0);
    assert_eq!(e.file, dir.path().join("x.yaml"));
    e.file = "x.yaml".into();
    e
}

fn svc_with(spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: hostnames}}\nspec:\n{spec}")
}

fn slice_with(body: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s\n  labels: {{kubernetes.io/service-name: ext}}\n{body}"
    )
}

fn pod_with(body: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\n{body}")
}

fn policy_with(spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np, namespace: shop}}\nspec:\n{spec}"
    )
}

#[test]
fn error_display_names_file_document_object_and_field() {
    let e = only_error(&format!(
        "---\n# nothing\n---\n{}",
        svc_with("  ports: [{port: 70000}]\n")
    ));
    assert_eq!(
        e.to_string(),
        "x.yaml: document 2: Service default/hostnames: spec.ports[0].port: 70000 is out of range 1..=65535"
    );
}

#[test]
fn document_indices_count_empty_documents() {
    let bad = svc_with("  ports: [{port: 0}]\n").replace("hostnames", "bad");
    let e = only_error(&format!("---\n---\n# only a comment\n---\n{bad}"));
    assert_eq!(e.document, Some(3), "{e}");
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "x.yaml",
        &format!("{SERVICE}---\n---\n{bad}---\n"),
    );
    let (state, errors) = load_dir(dir.path());
    assert_eq!(state.services.len(), 1);
    assert_eq!(
        errors.iter().map(|e| e.document).collect::<Vec<_>>(),
        [Some(3)]
    );
}

#[test]
fn each_invalid_case_names_object_and_field() {
    let svc = "Service default/hostnames";
    let cases: &[(String, &str, &str, &str)] = &[
        (svc_with("  clusterIP: 10.96.0.300\n"), svc, "spec.clusterIP", "not a valid IP"),
        (svc_with("  clusterIPs: [10.96.0.1, 'fd00::zz']\n  clusterIP: 10.96.0.1\n"), svc, "spec.clusterIPs[1]", "not a valid IP"),
        (svc_with("  ports: [{port: 80, targetPort: 0}]\n"), svc, "spec.ports[0].targetPort", "out of range"),
        (svc_with("  ports: [{port: 80, nodePort: 99999}]\n"), svc, "spec.ports[0].nodePort", "out of range"),
        (svc_with("  ports: [{port: 80, protocol: HTTP}]\n"), svc, "spec.ports[0].protocol", "TCP, UDP, SCTP"),
        (svc_with("  ports: [{port: 80, targetPort: Http_Port}]\n"), svc, "spec.ports[0].targetPort", "IANA_SVC_NAME"),
        (svc_with("  ports: [{port: 80, targetPort: '8080'}]\n"), svc, "spec.ports[0].targetPort", "IANA_SVC_NAME"),
        (svc_with("  ports: [{port: eighty}]\n"), svc, "spec.ports[0].port", "invalid type"),
        (svc_with("  selecter: {app: x}\n"), svc, "spec.selecter", "unknown field"),
        (svc_with("  ports: [{port: 80}, {name: b, port: 81}]\n"), svc, "spec.ports[0].name", "required"),
        (
            "apiVersion: v1\nkind: Service\nspec: {clusterIP: 10.96.0.1}\n".to_owned(),
            "Service <unnamed>",
            "metadata.name",
            "required",
        ),
        (slice_with("addressType: IPv4\nendpoints: [{addresses: ['fd00::1']}]\n"), "EndpointSlice default/s", "endpoints[0].addresses[0]", "not an IPv4"),
        (slice_with("addressType: IPv6\nendpoints: [{addresses: [10.0.0.1]}]\n"), "EndpointSlice default/s", "endpoints[0].addresses[0]", "not an IPv6"),
        (slice_with("addressType: IPv4\nendpoints: []\nports: [{port: 0}]\n"), "EndpointSlice default/s", "ports[0].port", "out of range"),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\n".to_owned(),
            "EndpointSlice default/s",
            "metadata.labels[kubernetes.io/service-name]",
            "required",
        ),
        (pod_with("status: {podIPs: [{ip: 10.0.0.1.2}]}\n"), "Pod default/p", "status.podIPs[0].ip", "not a valid IP"),
        (pod_with("status: {podIP: nope}\n"), "Pod default/p", "status.podIP", "not a valid IP"),
        (
            pod_with("spec: {containers: [{name: c, ports: [{containerPort: 65536}]}]}\n"),
            "Pod default/p",
            "spec.containers[0].ports[0].containerPort",
            "out of range",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n".to_owned(),
            "Deployment d",
            "kind",
            "unknown kind apps/v1 Deployment",
        ),
        ("apiVersion: v1\nkind: Endpoints\nmetadata: {name: e}\n".to_owned(), "Endpoints e", "kind", "EndpointSlice"),
    ];
    assert_only_errors(cases);
}

/// Each `(document, object, field, message)` is rejected with exactly that one error.
fn assert_only_errors(cases: &[(String, &str, &str, &str)]) {
    for (doc, object, field, message) in cases {
        let e = only_error(doc);
        assert_eq!(e.document, Some(1), "{e}");
        assert_eq!(e.object.as_deref(), Some(*object), "{e}");
        assert_eq!(e.field.as_deref(), Some(*field), "{e}");
        assert!(e.message.contains(message), "{e} should say {message:?}");
    }
}

const POLICY: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector:
    matchLabels: {app.kubernetes.io/name: web}
    matchExpressions:
    - {key: tier, operator: In, values: [frontend, edge]}
    - {key: example.com/canary, operator: NotIn, values: ['true', '']}
    - {key: app, operator: Exists}
    - {key: legacy, operator: DoesNotExist}
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector: {matchLabels: {app: db}}
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}
    - podSelector: {matchLabels: {app: cache}}
      namespaceSelector: {}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.2.3.4/32]}
    - ipBlock: {cidr: 'fd00::/64', except: ['fd00::/96']}
    - ipBlock: {cidr: 192.168.1.7/24}  # host bits set: accepted, as older API servers do
    ports:
    - {port: 5432}
    - {protocol: UDP, port: dns}
    - {protocol: SCTP, port: 30000, endPort: 32767}
    - {protocol: TCP}
";

#[test]
fn network_policies_decode_with_every_rule_shape() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "policy.yaml",
        &format!(
            "{POLICY}---\n{}",
            policy_with(
                "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{namespaceSelector: {}}]\n    ports: [{port: http}]\n  - {}\n"
            )
        ),
    );
    let (state, errors) = load_dir(dir.path());
    assert_eq!(errors, []);
    assert_eq!(state.len(), 2);
    let policy = &state.network_policies[&ObjRef::new("shop", "web")];
    assert_eq!(policy.metadata.namespace.as_deref(), Some("shop"));
    let spec = policy.spec.as_ref().unwrap();
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Egress".to_owned()][..])
    );
    let rule = &spec.egress.as_ref().unwrap()[0];
    assert_eq!(rule.to.as_ref().unwrap().len(), 6);
    let ports = rule.ports.as_ref().unwrap();
    assert_eq!(ports[2].end_port, Some(32767));
    assert_eq!(ports[1].port, Some(IntOrString::String("dns".into())));
    assert!(
        state
            .network_policies
            .contains_key(&ObjRef::new("shop", "np"))
    );
}

#[test]
fn each_invalid_network_policy_names_object_and_field() {
    let np = "NetworkPolicy shop/np";
    let from = |peer: &str| policy_with(&format!("  ingress: [{{from: [{peer}]}}]\n"));
    let to = |peer: &str| policy_with(&format!("  egress: [{{to: [{peer}]}}]\n"));
    let ports =
        |port: &str| policy_with(&format!("  ingress: [{{ports: [{{port: 80}}, {port}]}}]\n"));
    let pods = |selector: &str| policy_with(&format!("  podSelector: {selector}\n"));
    // One line per case: what is wrong, where, and what the error says.
    #[rustfmt::skip]
    let cases: &[(String, &str, &str, &str)] = &[
        (from("{ipBlock: {cidr: 10.0.0.0/33}}"), np, "spec.ingress[0].from[0].ipBlock.cidr", "\"10.0.0.0/33\" is not a valid CIDR"),
        (from("{ipBlock: {cidr: 10.0.0.1}}"), np, "spec.ingress[0].from[0].ipBlock.cidr", "not a valid CIDR"),
        (from("{ipBlock: {except: [10.0.0.0/24]}}"), np, "spec.ingress[0].from[0].ipBlock.cidr", "required"),
        (from("{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/99]}}"), np, "spec.ingress[0].from[0].ipBlock.except[0]", "not a valid CIDR"),
        (to("{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/16]}}"), np, "spec.egress[0].to[0].ipBlock.except[0]", "\"10.1.0.0/16\" is not a strict subset of cidr \"10.0.0.0/16\""),
        (to("{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24, 10.0.0.0/16]}}"), np, "spec.egress[0].to[0].ipBlock.except[1]", "strict subset"),
        (to("{ipBlock: {cidr: 10.0.0.0/16, except: ['fd00::/64']}}"), np, "spec.egress[0].to[0].ipBlock.except[0]", "same IP family"),
        (ports("{port: 8080, endPort: 8000}"), np, "spec.ingress[0].ports[1].endPort", "8000 is out of range 8080..=65535"),
        (ports("{port: 8080, endPort: 65536}"), np, "spec.ingress[0].ports[1].endPort", "out of range 8080..=65535"),
        (ports("{port: http, endPort: 8000}"), np, "spec.ingress[0].ports[1].endPort", "named port"),
        (ports("{endPort: 8000}"), np, "spec.ingress[0].ports[1].endPort", "requires port"),
        (ports("{protocol: ICMP}"), np, "spec.ingress[0].ports[1].protocol", "TCP, UDP, SCTP"),
        (ports("{port: 70000}"), np, "spec.ingress[0].ports[1].port", "out of range"),
        (ports("{port: Http_Port}"), np, "spec.ingress[0].ports[1].port", "IANA_SVC_NAME"),
        (pods("{matchExpressions: [{key: app, operator: Equals, values: [web]}]}"), np, "spec.podSelector.matchExpressions[0].operator", "\"Equals\" is not one of In, NotIn, Exists, DoesNotExist"),
        (pods("{matchExpressions: [{key: app, operator: In}]}"), np, "spec.podSelector.matchExpressions[0].values", "required"),
        (pods("{matchExpressions: [{key: app, operator: NotIn, values: []}]}"), np, "spec.podSelector.matchExpressions[0].values", "required"),
        (pods("{matchExpressions: [{key: app, operator: Exists, values: [web]}]}"), np, "spec.podSelector.matchExpressions[0].values", "must be empty"),
        (pods("{matchExpressions: [{key: app, operator: In, values: [web, -bad]}]}"), np, "spec.podSelector.matchExpressions[0].values[1]", "not a valid label value"),
        (pods("{matchLabels: {'Bad Key': web}}"), np, "spec.podSelector.matchLabels[Bad Key]", "\"Bad Key\" is not a valid label key"),
        (pods("{matchLabels: {app: web!}}"), np, "spec.podSelector.matchLabels[app]", "not a valid label value"),
        (from("{namespaceSelector: {matchExpressions: [{key: Example.com/team, operator: Exists}]}}"), np, "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].key", "not a valid label key"),
        (from("{podSelector: {matchLabels: {a/b/c: x}}}"), np, "spec.ingress[0].from[0].podSelector.matchLabels[a/b/c]", "not a valid label key"),
        (from("{podSelector: {}}, {}"), np, "spec.ingress[0].from[1]", "must specify a peer"),
        (to("{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}"), np, "spec.egress[0].to[0]", "may not be combined"),
        (policy_with("  policyTypes: [Ingress, Both]\n"), np, "spec.policyTypes[1]", "\"Both\" is not one of Ingress, Egress"),
        (policy_with("  policyTypes: [Egress, Egress]\n"), np, "spec.policyTypes[1]", "duplicate \"Egress\""),
        (policy_with("  policyTypes: [Ingress, Egress, Ingress]\n"), np, "spec.policyTypes", "at most Ingress and Egress"),
        (policy_with("  ingres: []\n"), np, "spec.ingres", "unknown field"),
        (policy_with("  podSelector: {}\n").replace("networking.k8s.io/v1", "extensions/v1beta1"), "NetworkPolicy np", "apiVersion", "networking.k8s.io/v1 NetworkPolicy"),
    ];
    assert_only_errors(cases);
}

#[test]
fn duplicate_objects_keep_the_first_definition() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", SERVICE);
    write(
        dir.path(),
        "b.yaml",
        &SERVICE.replace("port: 80", "port: 81"),
    );
    let (state, errors) = load_dir(dir.path());
    assert_eq!(service_port(&state, "hostnames"), 80);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].file, dir.path().join("b.yaml"));
    assert_eq!(
        errors[0].object.as_deref(),
        Some("Service default/hostnames")
    );
    assert_eq!(errors[0].field.as_deref(), Some("metadata.name"));
    assert!(errors[0].message.contains("duplicate"), "{}", errors[0]);
}

#[test]
fn yaml_syntax_error_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "x.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [oops}\n",
    );
    let (_, errors) = load_dir(dir.path());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].file, dir.path().join("x.yaml"));
    assert_eq!(errors[0].line, Some(3), "{}", errors[0]);
    assert_eq!(errors[0].document, None);
}

#[test]
fn last_good_state_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let source = ManifestsSource::new(dir.path());
    write(dir.path(), "svc.yaml", SERVICE);
    write(
        dir.path(),
        "other.yaml",
        &SERVICE.replace("hostnames", "other"),
    );
    let state = source.reload();
    assert_eq!(source.errors(), []);
    assert_eq!(state.services.len(), 2);

    // An object edited to invalid keeps its previous version; a new invalid one is left out.
    write(
        dir.path(),
        "svc.yaml",
        &format!(
            "{}---\n{}",
            SERVICE.replace("port: 80", "port: 70000"),
            svc_with("  clusterIP: bad\n").replace("hostnames", "new")
        ),
    );
    let state = source.reload();
    assert_eq!(service_port(&state, "hostnames"), 80);
    assert!(!state.services.contains_key(&ObjRef::new("default", "new")));
    assert_eq!(source.errors().len(), 2, "{:?}", source.errors());

    // A file that no longer parses keeps all its previous objects.
    write(dir.path(), "other.yaml", "kind: [broken\n");
    let state = source.reload();
    assert!(
        state
            .services
            .contains_key(&ObjRef::new("default", "other"))
    );
    assert_eq!(source.errors().len(), 3);

    // Fixed again: the new version is taken.
    write(
        dir.path(),
        "svc.yaml",
        &SERVICE.replace("port: 80", "port: 8080"),
    );
    assert_eq!(service_port(&source.reload(), "hostnames"), 8080);

    // A deleted file takes its objects with it, even if it was broken.
    std::fs::remove_file(dir.path().join("other.yaml")).unwrap();
    let state = source.reload();
    assert_eq!(
        state
            .services
            .keys()
            .map(|k| k.name.as_str())
            .collect::<Vec<_>>(),
        ["hostnames"]
    );
    assert_eq!(source.errors(), []);
}

#[test]
fn last_good_network_policy_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let source = ManifestsSource::new(dir.path());
    let web = ObjRef::new("shop", "web");
    let first_port = |state: &ClusterState| {
        let spec = state.network_policies[&web].spec.clone().unwrap();
        spec.egress.unwrap()[0].ports.clone().unwrap()[0]
            .port
            .clone()
    };
    write(dir.path(), "policy.yaml", POLICY);
    let state = source.reload();
    assert_eq!(source.errors(), []);
    let valid = Arc::clone(&state.network_policies[&web]);

    // Edited to invalid: the previous version stays, and the error names object and field.
    write(
        dir.path(),
        "policy.yaml",
        &POLICY.replace("10.1.0.0/16", "11.0.0.0/16"),
    );
    let state = source.reload();
    assert!(Arc::ptr_eq(&state.network_policies[&web], &valid));
    let errors = source.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].object.as_deref(), Some("NetworkPolicy shop/web"));
    assert_eq!(
        errors[0].field.as_deref(),
        Some("spec.egress[0].to[3].ipBlock.except[0]")
    );

    // Fixed with a change: the new version is published.
    write(
        dir.path(),
        "policy.yaml",
        &POLICY.replace("port: 5432", "port: 5433"),
    );
    let state = source.reload();
    assert_eq!(source.errors(), []);
    assert_eq!(first_port(&state), Some(IntOrString::Int(5433)));
}

#[test]
fn unchanged_reload_returns_the_same_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", SERVICE);
    let source = ManifestsSource::new(dir.path());
    let first = source.reload();
    assert!(Arc::ptr_eq(&first, &source.reload()));
}

/// Only changed files are parsed again, and "changed" includes an in-place rewrite of the
/// same length (size and inode stay, mtime moves) and a rename over the file (inode moves).
#[test]
fn reload_reparses_changed_files_only() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", SERVICE);
    write(
        dir.path(),
        "other.yaml",
        &SERVICE
            .replace("hostnames", "other")
            .replace("10.96.0.10", "10.96.0.11"),
    );
    let source = ManifestsSource::new(dir.path());
    let first = source.reload();
    let other = ObjRef::new("default", "other");

    // Same length, new content, written in place a little later (mtime has a coarse clock).
    std::thread::sleep(Duration::from_millis(20));
    write(
        dir.path(),
        "svc.yaml",
        &SERVICE.replace("port: 80", "port: 81"),
    );
    let second = source.reload();
    assert_eq!(service_port(&first, "hostnames"), 80);
    assert_eq!(
        service_port(&second, "hostnames"),
        81,
        "in-place edit of the same length is seen"
    );
    assert!(
        Arc::ptr_eq(&first.services[&other], &second.services[&other]),
        "the unchanged file was not parsed again"
    );

    // A new file renamed over the old one.
    let tmp = dir.path().join(".svc.tmp");
    std::fs::write(&tmp, SERVICE.replace("port: 80", "port: 82")).unwrap();
    std::fs::rename(&tmp, dir.path().join("svc.yaml")).unwrap();
    assert_eq!(service_port(&source.reload(), "hostnames"), 82);
}

/// Waits, generously, until the published state satisfies `done`.
async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<Arc<ClusterState>>,
    what: &str,
    done: impl Fn(&ClusterState) -> bool,
) {
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if done(&rx.borrow_and_update()) {
                return;
            }
            rx.changed().await.expect("the source is running");
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "timed out waiting for {what}: {:?}",
        rx.borrow()
    );
}

#[tokio::test]
async fn watcher_sees_created_edited_replaced_and_deleted_files() {
    let dir = tempfile::tempdir().unwrap();
    let source = Arc::new(ManifestsSource::new(dir.path()));
    let (mut rx, task) = source.spawn();
    assert!(rx.borrow().is_empty());
    let port = |s: &ClusterState| {
        s.services
            .get(&ObjRef::new("default", "hostnames"))
            .map(|_| service_port(s, "hostnames"))
    };

    write(dir.path(), "svc.yaml", SERVICE);
    wait_for(&mut rx, "the created file", |s| port(s) == Some(80)).await;

    write(
        dir.path(),
        "svc.yaml",
        &SERVICE.replace("port: 80", "port: 81"),
    );
    wait_for(&mut rx, "the edited file", |s| port(s) == Some(81)).await;

    // As editors save: write a temporary file, rename it over the original.
    write(
        dir.path(),
        ".svc.yaml.tmp",
        &SERVICE.replace("port: 80", "port: 82"),
    );
    std::fs::rename(
        dir.path().join(".svc.yaml.tmp"),
        dir.path().join("svc.yaml"),
    )
    .unwrap();
    wait_for(&mut rx, "the replaced file", |s| port(s) == Some(82)).await;

    std::fs::remove_file(dir.path().join("svc.yaml")).unwrap();
    wait_for(&mut rx, "the deleted file", ClusterState::is_empty).await;

    // Dropping the last receiver stops the source.
    drop(rx);
    let stopped = tokio::time::timeout(Duration::from_secs(20), task).await;
    stopped
        .expect("run returns once nobody listens")
        .unwrap()
        .unwrap();
}

/// A large manifests file (here 3,000 Services and their `EndpointSlice`s, 6,000 documents)
/// loads whole: the YAML parser's budget scales with the file instead of its defaults for
/// untrusted input (1,024 documents).
#[test]
fn large_files_load_whole() {
    use std::fmt::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..3000 {
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: big}}\nspec:\n  clusterIP: 10.{}.{}.{}\n  ports: [{{name: http, port: 80}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: big, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n- addresses: [\"10.200.{}.{}\"]\n",
            96 + i / 65536,
            (i / 256) % 256,
            i % 256,
            i / 250,
            i % 250 + 1
        );
    }
    write(dir.path(), "big.yaml", &text);
    let (state, errors) = load_dir(dir.path());
    assert!(errors.is_empty(), "{:?}", errors.first());
    assert_eq!(
        (state.services.len(), state.endpoint_slices.len()),
        (3000, 3000)
    );
}
