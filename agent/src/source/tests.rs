//! The manifests source: parsing, validation, last-good retention and the watcher.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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
metadata: {{name: later}}
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
    assert_eq!(state.len(), 5);
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
    for (doc, object, field, message) in cases {
        let e = only_error(doc);
        assert_eq!(e.document, Some(1), "{e}");
        assert_eq!(e.object.as_deref(), Some(*object), "{e}");
        assert_eq!(e.field.as_deref(), Some(*field), "{e}");
        assert!(e.message.contains(message), "{e} should say {message:?}");
    }
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
