//! Unit tests of the `NetworkPolicy` compiler (`model::policy`): one rule shape each, written as
//! the Kubernetes objects a manifests directory would hold, asserting on the exact compiled
//! table (prefix → ports and reason) of each direction.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ferrovia_common::verdict::{DENY_EXCEPT, DENY_PORT};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use serde_json::Value;

use super::policy::{
    DirectionRules, PeerEntry, PolicyClass, PolicyDesired, PortSet, Prefix, SCTP, TCP, UDP,
    compile, parse_v4_cidr, selector_matches,
};
use super::{ClusterState, ObjRef, PodIps};

// --- Building the input ----------------------------------------------------------------------

/// The objects of YAML documents (`Namespace`, `Pod`, `NetworkPolicy`), keyed as a source keys them.
fn state(docs: &[String]) -> ClusterState {
    let mut st = ClusterState::default();
    let values: Vec<Value> = serde_saphyr::from_multiple(&docs.concat()).expect("valid YAML");
    for v in values {
        let name = v["metadata"]["name"].as_str().expect("a name").to_owned();
        let namespace = v["metadata"]["namespace"].as_str().unwrap_or("default");
        let key = ObjRef::new(namespace, &name);
        let kind = v["kind"].as_str().expect("a kind").to_owned();
        match kind.as_str() {
            "Namespace" => {
                st.namespaces.insert(name, Arc::new(decode(v)));
            }
            "Pod" => {
                st.pods.insert(key, Arc::new(decode(v)));
            }
            "NetworkPolicy" => {
                st.network_policies.insert(key, Arc::new(decode(v)));
            }
            other => panic!("no such kind in these tests: {other}"),
        }
    }
    st
}

fn decode<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a valid object")
}

/// A Namespace with `labels` (a YAML flow mapping).
fn namespace(name: &str, labels: &str) -> String {
    format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n")
}

/// A pod `namespace/name` with `labels` and, unless `ip` is empty, a `status.podIP` (local pods
/// have none: their address comes from the CNI registration, as in manifests mode).
fn pod(id: &str, labels: &str, ip: &str) -> String {
    pod_with_ports(id, labels, ip, "[]")
}

/// [`pod`] whose container declares `ports` (a YAML flow sequence of `ContainerPort`s).
fn pod_with_ports(id: &str, labels: &str, ip: &str, ports: &str) -> String {
    let (ns, name) = id.split_once('/').unwrap();
    let status = if ip.is_empty() {
        String::new()
    } else {
        format!("status: {{podIP: \"{ip}\"}}\n")
    };
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\n\
         spec:\n  containers: [{{name: c, image: echo, ports: {ports}}}]\n{status}"
    )
}

/// A `NetworkPolicy` `namespace/name`; `spec` is the block under `spec:`, indented two spaces.
fn policy(id: &str, spec: &str) -> String {
    let (ns, name) = id.split_once('/').unwrap();
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: {name}, namespace: {ns}}}\nspec:{spec}"
    )
}

/// The CNI registrations of local pods: `(namespace/name, ip)`.
fn local(pods: &[(&str, &str)]) -> PodIps {
    pods.iter()
        .map(|(id, ip)| {
            let (ns, name) = id.split_once('/').unwrap();
            (ObjRef::new(ns, name), vec![ip.parse::<IpAddr>().unwrap()])
        })
        .collect()
}

/// The subject of most tests: `default/web`, labels `app: web`, local at [`WEB`].
const WEB: &str = "10.0.0.1";

fn web() -> String {
    pod("default/web", "{app: web}", "")
}

/// Compiles `docs` with `default/web` as the only local pod.
fn compile_web(docs: &[String]) -> PolicyDesired {
    compile(&state(docs), &local(&[("default/web", WEB)]))
}

// --- Reading the output ----------------------------------------------------------------------

fn v4(ip: &str) -> Ipv4Addr {
    ip.parse().unwrap()
}

/// The class of the local pod at `ip`, which must be isolated in some direction.
fn class<'a>(d: &'a PolicyDesired, ip: &str) -> &'a PolicyClass {
    d.endpoints
        .get(&v4(ip))
        .unwrap_or_else(|| panic!("{ip} is not isolated: {d:?}"))
}

fn ingress(d: &PolicyDesired, ip: &str) -> DirectionRules {
    class(d, ip).ingress.clone().expect("isolated for ingress")
}

fn egress(d: &PolicyDesired, ip: &str) -> DirectionRules {
    class(d, ip).egress.clone().expect("isolated for egress")
}

fn pfx(cidr: &str) -> Prefix {
    parse_v4_cidr(cidr).unwrap_or_else(|| panic!("{cidr} is an IPv4 CIDR"))
}

fn allow(cidr: &str, ports: PortSet) -> (Prefix, PeerEntry) {
    (pfx(cidr), PeerEntry { ports, reason: 0 })
}

fn deny(cidr: &str, reason: u8) -> (Prefix, PeerEntry) {
    (
        pfx(cidr),
        PeerEntry {
            ports: PortSet::None,
            reason,
        },
    )
}

/// A port set written out in canonical form (not built with `add`, which is under test).
fn ports<const N: usize>(by_proto: [(u8, &[(u16, u16)]); N]) -> PortSet {
    PortSet::Ports(by_proto.into_iter().map(|(p, r)| (p, r.to_vec())).collect())
}

fn tcp(port: u16) -> PortSet {
    ports([(TCP, &[(port, port)])])
}

fn tcps(list: &[u16]) -> PortSet {
    let ranges: Vec<(u16, u16)> = list.iter().map(|&p| (p, p)).collect();
    ports([(TCP, &ranges)])
}

// --- Isolation and policyTypes ---------------------------------------------------------------

#[test]
fn pods_without_policies_are_not_isolated() {
    let d = compile_web(&[web(), pod("default/client", "{app: client}", "10.0.1.1")]);
    assert!(d.endpoints.is_empty());
    assert_eq!(d.local.iter().copied().collect::<Vec<_>>(), [v4(WEB)]);
    assert_eq!(d.policies_in_force, 0);
}

#[test]
fn policy_types_absent_with_only_ingress_rules_isolate_ingress() {
    let d = compile_web(&[
        web(),
        policy(
            "default/np",
            "
  podSelector: {matchLabels: {app: web}}
  ingress:
  - ports: [{port: 80}]
",
        ),
    ]);
    let c = class(&d, WEB);
    assert_eq!(
        c.ingress,
        Some(DirectionRules::from([allow("0.0.0.0/0", tcp(80))]))
    );
    assert_eq!(c.egress, None);
    assert_eq!(d.policies_in_force, 1);
}

#[test]
fn policy_types_absent_with_egress_rules_isolate_both_directions() {
    let d = compile_web(&[
        web(),
        policy(
            "default/np",
            "
  podSelector: {matchLabels: {app: web}}
  egress:
  - ports: [{port: 53, protocol: UDP}]
",
        ),
    ]);
    let c = class(&d, WEB);
    // Every policy affects ingress when its types are defaulted: no ingress rule, deny all.
    assert_eq!(c.ingress, Some(DirectionRules::new()));
    assert_eq!(
        c.egress,
        Some(DirectionRules::from([allow(
            "0.0.0.0/0",
            ports([(UDP, &[(53, 53)])])
        )]))
    );
}

#[test]
fn explicit_egress_type_ignores_ingress_rules() {
    let d = compile_web(&[
        web(),
        policy(
            "default/np",
            "
  podSelector: {}
  policyTypes: [Egress]
  ingress:
  - {}
",
        ),
    ]);
    let c = class(&d, WEB);
    assert_eq!(c.ingress, None);
    assert_eq!(c.egress, Some(DirectionRules::new()));
}

#[test]
fn explicit_ingress_type_ignores_egress_rules() {
    let d = compile_web(&[
        web(),
        policy(
            "default/np",
            "
  podSelector: {}
  policyTypes: [Ingress]
  egress:
  - {}
",
        ),
    ]);
    let c = class(&d, WEB);
    assert_eq!(c.ingress, Some(DirectionRules::new()));
    assert_eq!(c.egress, None);
}

#[test]
fn default_deny_isolates_with_empty_rules() {
    let d = compile_web(&[
        web(),
        pod("default/client", "{app: client}", "10.0.1.1"),
        policy(
            "default/deny-all",
            "
  podSelector: {}
  policyTypes: [Ingress, Egress]
",
        ),
    ]);
    let c = class(&d, WEB);
    assert_eq!(c.ingress, Some(DirectionRules::new()));
    assert_eq!(c.egress, Some(DirectionRules::new()));
}

#[test]
fn empty_pod_selector_selects_every_pod_of_its_namespace_only() {
    let docs = [
        web(),
        pod("default/other", "{app: other}", ""),
        pod("shop/cart", "{app: web}", ""),
        policy("default/deny", "\n  podSelector: {}\n"),
    ];
    let d = compile(
        &state(&docs),
        &local(&[
            ("default/web", WEB),
            ("default/other", "10.0.0.2"),
            ("shop/cart", "10.0.0.3"),
        ]),
    );
    assert_eq!(
        d.endpoints.keys().copied().collect::<Vec<_>>(),
        [v4(WEB), v4("10.0.0.2")]
    );
    assert_eq!(d.local.len(), 3);
}

#[test]
fn policy_selecting_no_pod_has_no_effect() {
    let d = compile_web(&[
        web(),
        policy(
            "default/db-only",
            "\n  podSelector: {matchLabels: {app: db}}\n",
        ),
    ]);
    assert!(d.endpoints.is_empty());
    assert_eq!(d.policies_in_force, 0);
}

#[test]
fn local_pod_absent_from_the_state_is_not_isolated() {
    let d = compile(
        &state(&[policy("default/deny", "\n  podSelector: {}\n")]),
        &local(&[("default/ghost", "10.0.0.9")]),
    );
    assert!(d.endpoints.is_empty());
    assert!(d.local.contains(&v4("10.0.0.9")));
    assert_eq!(d.policies_in_force, 0);
}

// --- Rules without peers or ports, and unions ------------------------------------------------

#[test]
fn rule_without_peers_allows_every_address() {
    let docs = [
        pod("default/a", "{app: a}", ""),
        pod("default/b", "{app: b}", ""),
        pod("default/c", "{app: c}", ""),
        pod("default/client", "{app: client}", "10.0.1.1"),
        // No `from`, no `ports`: everything.
        policy(
            "default/a",
            "\n  podSelector: {matchLabels: {app: a}}\n  ingress: [{}]\n",
        ),
        // No `from`, one port.
        policy(
            "default/b",
            "\n  podSelector: {matchLabels: {app: b}}\n  ingress: [{ports: [{port: 80}]}]\n",
        ),
        // Empty lists mean the same as absent ones.
        policy(
            "default/c",
            "\n  podSelector: {matchLabels: {app: c}}\n  ingress: [{from: [], ports: []}]\n",
        ),
    ];
    let d = compile(
        &state(&docs),
        &local(&[
            ("default/a", "10.0.0.1"),
            ("default/b", "10.0.0.2"),
            ("default/c", "10.0.0.3"),
        ]),
    );
    let all = |ports| DirectionRules::from([allow("0.0.0.0/0", ports)]);
    assert_eq!(ingress(&d, "10.0.0.1"), all(PortSet::Any));
    assert_eq!(ingress(&d, "10.0.0.2"), all(tcp(80)));
    assert_eq!(ingress(&d, "10.0.0.3"), all(PortSet::Any));
}

#[test]
fn policies_selecting_one_pod_are_unioned_per_peer() {
    let d = compile_web(&[
        web(),
        pod("default/client", "{app: client}", "10.0.1.1"),
        pod("default/db", "{app: db}", "10.0.2.1"),
        policy(
            "default/web-http",
            "
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
",
        ),
        policy(
            "default/all-https",
            "
  podSelector: {}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 443}]
  - from: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 5432}]
",
        ),
    ]);
    assert_eq!(
        ingress(&d, WEB),
        DirectionRules::from([
            allow("10.0.1.1/32", tcps(&[80, 443])),
            allow("10.0.2.1/32", tcp(5432)),
        ])
    );
    assert_eq!(d.policies_in_force, 2);
}

// --- Pod and namespace peers -----------------------------------------------------------------

/// The policy `default/np` on `app: web` allowing ingress from `from` (a YAML flow sequence).
fn ingress_from(from: &str) -> String {
    policy(
        "default/np",
        &format!("\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - from: {from}\n"),
    )
}

#[test]
fn pod_selector_peer_is_in_the_policy_namespace_only() {
    let d = compile_web(&[
        web(),
        pod("default/client", "{app: client}", "10.0.1.1"),
        pod("shop/client", "{app: client}", "10.1.0.1"),
        ingress_from("[{podSelector: {matchLabels: {app: client}}}]"),
    ]);
    assert_eq!(
        ingress(&d, WEB),
        DirectionRules::from([allow("10.0.1.1/32", PortSet::Any)])
    );
}

#[test]
fn namespace_selector_peer_is_every_pod_of_matching_namespaces() {
    let d = compile_web(&[
        web(),
        namespace("team-a", "{team: a}"),
        namespace("team-b", "{team: b}"),
        pod("team-a/x", "{app: x}", "10.1.0.1"),
        pod("team-a/unlabelled", "{}", "10.1.0.2"),
        pod("team-b/x", "{app: x}", "10.2.0.1"),
        pod("default/client", "{app: client}", "10.0.1.1"),
        ingress_from("[{namespaceSelector: {matchLabels: {team: a}}}]"),
    ]);
    assert_eq!(
        ingress(&d, WEB),
        DirectionRules::from([
            allow("10.1.0.1/32", PortSet::Any),
            allow("10.1.0.2/32", PortSet::Any),
        ])
    );
}

#[test]
fn empty_namespace_selector_is_every_pod_of_the_cluster() {
    let d = compile_web(&[
        web(),
        pod("team-a/x", "{app: x}", "10.1.0.1"),
        pod("default/client", "{app: client}", "10.0.1.1"),
        ingress_from("[{namespaceSelector: {}}]"),
    ]);
    assert_eq!(
        ingress(&d, WEB),
        DirectionRules::from([
            allow("10.0.0.1/32", PortSet::Any),
            allow("10.0.1.1/32", PortSet::Any),
            allow("10.1.0.1/32", PortSet::Any),
        ])
    );
}

#[test]
fn namespace_selector_sees_the_implicit_name_label() {
    let d = compile_web(&[
        web(),
        // A Namespace written without labels, and `qa`, `dev` not written at all: the API
        // server labels each with its name anyway.
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n".to_owned(),
        pod("prod/p", "{app: p}", "10.1.0.1"),
        pod("qa/q", "{app: q}", "10.2.0.1"),
        pod("dev/d", "{app: d}", "10.3.0.1"),
        ingress_from(
            "[{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: prod}}},
            {namespaceSelector: {matchExpressions: [
              {key: kubernetes.io/metadata.name, operator: In, values: [qa]}]}}]",
        ),
    ]);
    assert_eq!(
        ingress(&d, WEB),
        DirectionRules::from([
            allow("10.1.0.1/32", PortSet::Any),
            allow("10.2.0.1/32", PortSet::Any),
        ])
    );
}

/// Pods `app: db` and `app: cache` in namespaces `team-a` and `team-b`, and a `default/db`.
fn teams() -> Vec<String> {
    vec![
        web(),
        namespace("team-a", "{team: a}"),
        namespace("team-b", "{team: b}"),
        pod("team-a/db", "{app: db}", "10.1.0.1"),
        pod("team-a/cache", "{app: cache}", "10.1.0.2"),
        pod("team-b/db", "{app: db}", "10.2.0.1"),
        pod("default/db", "{app: db}", "10.0.2.1"),
    ]
}

#[test]
fn pod_and_namespace_selector_in_one_peer_intersect() {
    let mut docs = teams();
    docs.push(ingress_from(
        "[{namespaceSelector: {matchLabels: {team: a}}, podSelector: {matchLabels: {app: db}}}]",
    ));
    assert_eq!(
        ingress(&compile_web(&docs), WEB),
        DirectionRules::from([allow("10.1.0.1/32", PortSet::Any)])
    );
}

#[test]
fn pod_and_namespace_selector_in_two_peers_unite() {
    let mut docs = teams();
    docs.push(ingress_from(
        "[{namespaceSelector: {matchLabels: {team: a}}}, {podSelector: {matchLabels: {app: db}}}]",
    ));
    assert_eq!(
        ingress(&compile_web(&docs), WEB),
        DirectionRules::from([
            allow("10.0.2.1/32", PortSet::Any),
            allow("10.1.0.1/32", PortSet::Any),
            allow("10.1.0.2/32", PortSet::Any),
        ])
    );
}

/// The peer addresses a `podSelector` (YAML) admits among `app: client` pods with tier front
/// (10.0.1.1), back (10.0.1.2) and none (10.0.1.3); `web` itself has no tier.
fn clients_selected_by(selector: &str) -> Vec<Prefix> {
    let d = compile_web(&[
        web(),
        pod("default/c1", "{app: client, tier: front}", "10.0.1.1"),
        pod("default/c2", "{app: client, tier: back}", "10.0.1.2"),
        pod("default/c3", "{app: client}", "10.0.1.3"),
        ingress_from(&format!("[{{podSelector: {selector}}}]")),
    ]);
    let rules = ingress(&d, WEB);
    assert!(rules.values().all(|e| e.ports == PortSet::Any));
    rules.into_keys().collect()
}

#[test]
fn match_labels_must_all_hold() {
    assert_eq!(
        clients_selected_by("{matchLabels: {app: client, tier: back}}"),
        [pfx("10.0.1.2/32")]
    );
}

#[test]
fn match_expression_in() {
    assert_eq!(
        clients_selected_by(
            "{matchLabels: {app: client}, \
             matchExpressions: [{key: tier, operator: In, values: [front, middle]}]}"
        ),
        [pfx("10.0.1.1/32")]
    );
}

#[test]
fn match_expression_not_in_matches_an_absent_key() {
    assert_eq!(
        clients_selected_by(
            "{matchLabels: {app: client}, \
             matchExpressions: [{key: tier, operator: NotIn, values: [front]}]}"
        ),
        [pfx("10.0.1.2/32"), pfx("10.0.1.3/32")]
    );
}

#[test]
fn match_expression_exists() {
    assert_eq!(
        clients_selected_by("{matchExpressions: [{key: tier, operator: Exists}]}"),
        [pfx("10.0.1.1/32"), pfx("10.0.1.2/32")]
    );
}

#[test]
fn match_expression_does_not_exist() {
    assert_eq!(
        clients_selected_by(
            "{matchLabels: {app: client}, \
             matchExpressions: [{key: tier, operator: DoesNotExist}]}"
        ),
        [pfx("10.0.1.3/32")]
    );
}

#[test]
fn match_expressions_must_all_hold() {
    assert_eq!(
        clients_selected_by(
            "{matchExpressions: [{key: tier, operator: Exists}, \
             {key: tier, operator: NotIn, values: [front]}]}"
        ),
        [pfx("10.0.1.2/32")]
    );
}

#[test]
fn terminal_pods_are_not_peers() {
    let client = |name: &str, ip: &str, phase: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: client}}}}\n\
             spec: {{containers: [{{name: c, image: echo}}]}}\n\
             status: {{phase: {phase}, podIP: \"{ip}\"}}\n"
        )
    };
    let d = compile_web(&[
        web(),
        client("running", "10.0.1.1", "Running"),
        client("pending", "10.0.1.2", "Pending"),
        client("done", "10.0.1.3", "Succeeded"),
        client("crashed", "10.0.1.4", "Failed"),
        ingress_from("[{podSelector: {matchLabels: {app: client}}}]"),
    ]);
    assert_eq!(
        ingress(&d, WEB),
        DirectionRules::from([
            allow("10.0.1.1/32", PortSet::Any),
            allow("10.0.1.2/32", PortSet::Any),
        ])
    );
}

#[test]
fn pods_without_an_ipv4_address_are_not_peers() {
    let with_ips = |name: &str, ips: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: client}}}}\n\
             spec: {{containers: [{{name: c, image: echo}}]}}\nstatus: {{podIPs: {ips}}}\n"
        )
    };
    let docs = [
        web(),
        with_ips("v6-only", "[{ip: \"fd00::5\"}]"),
        with_ips("dual-stack", "[{ip: \"fd00::6\"}, {ip: \"10.0.1.6\"}]"),
        // No status and no CNI registration: not running here, no address.
        pod("default/unscheduled", "{app: client}", ""),
        // No status, but registered by the CNI plugin on this node.
        pod("default/local-client", "{app: client}", ""),
        ingress_from("[{podSelector: {matchLabels: {app: client}}}]"),
    ];
    let d = compile(
        &state(&docs),
        &local(&[("default/web", WEB), ("default/local-client", "10.0.0.7")]),
    );
    assert_eq!(
        ingress(&d, WEB),
        DirectionRules::from([
            allow("10.0.0.7/32", PortSet::Any),
            allow("10.0.1.6/32", PortSet::Any),
        ])
    );
}

// --- ipBlock ---------------------------------------------------------------------------------

#[test]
fn ip_block_except_is_denied_by_except() {
    let d = compile_web(&[
        web(),
        policy(
            "default/np",
            "
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.2.3.0/24]}}]
    ports: [{port: 80}]
",
        ),
    ]);
    assert_eq!(
        ingress(&d, WEB),
        DirectionRules::from([
            allow("10.0.0.0/8", tcp(80)),
            deny("10.1.0.0/16", DENY_EXCEPT),
            deny("10.2.3.0/24", DENY_EXCEPT),
        ])
    );
}

#[test]
fn pod_in_an_except_keeps_what_another_rule_allows_it() {
    let d = compile_web(&[
        web(),
        pod("default/db-in-except", "{app: db}", "10.1.0.5"),
        pod("default/db-in-block", "{app: db}", "10.2.0.5"),
        policy(
            "default/np",
            "
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]
    ports: [{port: 80}]
  - from: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 5432}]
",
        ),
    ]);
    assert_eq!(
        ingress(&d, WEB),
        DirectionRules::from([
            allow("10.0.0.0/8", tcp(80)),
            deny("10.1.0.0/16", DENY_EXCEPT),
            // Inside the except: only the pod rule's port.
            allow("10.1.0.5/32", tcp(5432)),
            // Inside the block: the longest prefix holds both rules' ports.
            allow("10.2.0.5/32", tcps(&[80, 5432])),
        ])
    );
}

#[test]
fn overlapping_blocks_of_several_rules_are_exact() {
    let d = compile_web(&[
        web(),
        policy(
            "default/np",
            "
  podSelector: {matchLabels: {app: web}}
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/12]}}]
    ports: [{port: 80}]
  - to: [{ipBlock: {cidr: 10.0.0.0/16}}]
    ports: [{port: 443}]
",
        ),
    ]);
    assert_eq!(
        egress(&d, WEB),
        DirectionRules::from([
            allow("10.0.0.0/8", tcp(80)),
            deny("10.0.0.0/12", DENY_EXCEPT),
            // In the first rule's except, but the second rule's block.
            allow("10.0.0.0/16", tcp(443)),
        ])
    );
}

#[test]
fn ip_block_host_bits_are_cleared() {
    let d = compile_web(&[
        web(),
        ingress_from("[{ipBlock: {cidr: 10.1.2.3/16, except: [10.1.2.3/24]}}]"),
    ]);
    assert_eq!(
        ingress(&d, WEB).into_iter().collect::<Vec<_>>(),
        [
            (
                Prefix {
                    addr: v4("10.1.0.0"),
                    len: 16
                },
                PeerEntry {
                    ports: PortSet::Any,
                    reason: 0
                }
            ),
            (
                Prefix {
                    addr: v4("10.1.2.0"),
                    len: 24
                },
                PeerEntry {
                    ports: PortSet::None,
                    reason: DENY_EXCEPT
                }
            ),
        ]
    );
}

#[test]
fn ipv6_blocks_are_ignored_and_match_nothing() {
    let d = compile_web(&[
        web(),
        policy(
            "default/np",
            "
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{ipBlock: {cidr: \"fd00::/8\"}}]
    ports: [{port: 22}]
  - from: [{ipBlock: {cidr: \"fd00::/8\", except: [\"fd00::/16\"]}}, {ipBlock: {cidr: 192.168.0.0/16}}]
    ports: [{port: 80}]
",
        ),
    ]);
    // The IPv6-only rule allows nothing (not everything, as a rule without peers would).
    assert_eq!(
        ingress(&d, WEB),
        DirectionRules::from([allow("192.168.0.0/16", tcp(80))])
    );
}

// --- Ports -----------------------------------------------------------------------------------

/// The ports `default/client` (10.0.1.1) gets to `web` from a rule with `ports` (YAML).
fn client_ports(rule_ports: &str) -> PortSet {
    let d = compile_web(&[
        web(),
        pod("default/client", "{app: client}", "10.0.1.1"),
        policy(
            "default/np",
            &format!(
                "\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  \
                 - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    \
                 ports: {rule_ports}\n"
            ),
        ),
    ]);
    let mut rules = ingress(&d, WEB);
    let entry = rules
        .remove(&pfx("10.0.1.1/32"))
        .expect("client has an entry");
    assert!(rules.is_empty(), "only the client: {rules:?}");
    assert_eq!(entry.reason, 0);
    entry.ports
}

#[test]
fn numeric_ports_default_to_tcp() {
    assert_eq!(
        client_ports(
            "[{port: 443}, {port: 53, protocol: UDP}, {port: 9, protocol: SCTP}, \
             {port: 80, protocol: TCP}]"
        ),
        ports([
            (TCP, &[(80, 80), (443, 443)]),
            (UDP, &[(53, 53)]),
            (SCTP, &[(9, 9)]),
        ])
    );
}

#[test]
fn port_absent_allows_every_port_of_the_protocol() {
    assert_eq!(
        client_ports("[{protocol: UDP}, {}]"),
        ports([(TCP, &[(0, 65535)]), (UDP, &[(0, 65535)])])
    );
}

#[test]
fn end_port_ranges_merge_into_canonical_form() {
    assert_eq!(
        client_ports(
            "[{port: 80, endPort: 81}, {port: 82}, {port: 95, endPort: 110}, \
             {port: 90, endPort: 100}, {port: 200}, {port: 80, protocol: UDP, endPort: 81}]"
        ),
        ports([
            (TCP, &[(80, 82), (90, 110), (200, 200)]),
            (UDP, &[(80, 81)]),
        ])
    );
}

/// Ingress named ports: `web` pods with different container ports, allowing `client` on
/// `http`, UDP `dns` and 443.
fn named_port_subjects() -> PolicyDesired {
    let docs = [
        pod_with_ports(
            "default/a",
            "{app: web}",
            "",
            "[{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]",
        ),
        pod_with_ports(
            "default/a2",
            "{app: web}",
            "",
            "[{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]",
        ),
        // `dns` is TCP here: the rule's UDP `dns` does not name it.
        pod_with_ports(
            "default/b",
            "{app: web}",
            "",
            "[{name: http, containerPort: 9090}, {name: dns, containerPort: 5353}]",
        ),
        pod("default/c", "{app: web}", ""),
        pod("default/client", "{app: client}", "10.0.1.1"),
        policy(
            "default/np",
            "
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: http}, {port: dns, protocol: UDP}, {port: 443}]
",
        ),
    ];
    compile(
        &state(&docs),
        &local(&[
            ("default/a", "10.0.0.1"),
            ("default/a2", "10.0.0.2"),
            ("default/b", "10.0.0.3"),
            ("default/c", "10.0.0.4"),
        ]),
    )
}

#[test]
fn ingress_named_port_resolves_on_each_subject() {
    let d = named_port_subjects();
    let client = |ports| DirectionRules::from([allow("10.0.1.1/32", ports)]);
    assert_eq!(
        ingress(&d, "10.0.0.1"),
        client(ports([
            (TCP, &[(443, 443), (8080, 8080)]),
            (UDP, &[(5353, 5353)])
        ]))
    );
    assert_eq!(ingress(&d, "10.0.0.3"), client(tcps(&[443, 9090])));
    assert_eq!(ingress(&d, "10.0.0.4"), client(tcp(443)));
}

#[test]
fn ingress_named_ports_split_classes_by_subject_ports() {
    let d = named_port_subjects();
    let (a, a2, b, c) = (
        class(&d, "10.0.0.1"),
        class(&d, "10.0.0.2"),
        class(&d, "10.0.0.3"),
        class(&d, "10.0.0.4"),
    );
    assert_eq!(a, a2);
    assert_ne!(a, b);
    assert_ne!(a, c);
    assert_ne!(b, c);
}

#[test]
fn egress_named_port_resolves_on_each_destination_pod() {
    let d = compile_web(&[
        web(),
        pod_with_ports(
            "default/s1",
            "{app: db}",
            "10.0.2.1",
            "[{name: http, containerPort: 8080}]",
        ),
        pod_with_ports(
            "default/s2",
            "{app: db}",
            "10.0.2.2",
            "[{name: http, containerPort: 9090}]",
        ),
        pod("default/s3", "{app: db}", "10.0.2.3"),
        policy(
            "default/np",
            "
  podSelector: {matchLabels: {app: web}}
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: http}, {port: 443}]
",
        ),
    ]);
    assert_eq!(
        egress(&d, WEB),
        DirectionRules::from([
            allow("10.0.2.1/32", tcps(&[443, 8080])),
            allow("10.0.2.2/32", tcps(&[443, 9090])),
            allow("10.0.2.3/32", tcp(443)),
        ])
    );
}

#[test]
fn egress_named_port_to_an_ip_block_resolves_on_the_pods_inside() {
    let d = compile_web(&[
        web(),
        pod_with_ports(
            "default/s1",
            "{app: s}",
            "10.0.2.1",
            "[{name: http, containerPort: 8080}]",
        ),
        pod("default/s3", "{app: s}", "10.0.2.3"),
        pod_with_ports(
            "default/excepted",
            "{app: s}",
            "10.0.2.130",
            "[{name: http, containerPort: 8080}]",
        ),
        pod_with_ports(
            "default/outside",
            "{app: s}",
            "10.0.3.1",
            "[{name: http, containerPort: 8080}]",
        ),
        policy(
            "default/np",
            "
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.128/25]}}]
    ports: [{port: http}, {port: 443}]
",
        ),
    ]);
    assert_eq!(
        egress(&d, WEB),
        DirectionRules::from([
            // Addresses that are no pod: only the numeric ports.
            allow("10.0.2.0/24", tcp(443)),
            allow("10.0.2.1/32", tcps(&[443, 8080])),
            allow("10.0.2.3/32", tcp(443)),
            deny("10.0.2.128/25", DENY_EXCEPT),
        ])
    );
}

#[test]
fn egress_named_port_to_every_peer_resolves_on_every_pod() {
    let d = compile_web(&[
        web(),
        pod_with_ports(
            "default/s1",
            "{app: s}",
            "10.0.2.1",
            "[{name: http, containerPort: 8080}]",
        ),
        pod_with_ports(
            "shop/s2",
            "{app: s}",
            "10.1.0.1",
            "[{name: http, containerPort: 9090}]",
        ),
        pod("default/s3", "{app: s}", "10.0.2.3"),
        policy(
            "default/np",
            "
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - ports: [{port: http}, {port: 443}]
",
        ),
    ]);
    assert_eq!(
        egress(&d, WEB),
        DirectionRules::from([
            allow("0.0.0.0/0", tcp(443)),
            // `web` itself is a pod too, without `http`.
            allow("10.0.0.1/32", tcp(443)),
            allow("10.0.2.1/32", tcps(&[443, 8080])),
            allow("10.0.2.3/32", tcp(443)),
            allow("10.1.0.1/32", tcps(&[443, 9090])),
        ])
    );
}

/// A peer that a rule selects but whose only (named) port does not resolve is denied for its
/// port, and `verdict::DENY_PORT` says so: "rules select the peer, but not for this protocol
/// and port". `DENY_NO_RULE` ("no rule selects the peer") would misexplain the drop.
#[test]
fn peer_selected_without_a_resolved_port_is_denied_by_port() {
    let d = compile_web(&[
        web(),
        pod("default/client", "{app: client}", "10.0.1.1"),
        pod("default/db", "{app: db}", "10.0.2.1"),
        policy(
            "default/np",
            "
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: http}]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: postgres}]
",
        ),
    ]);
    assert_eq!(
        ingress(&d, WEB),
        DirectionRules::from([deny("10.0.1.1/32", DENY_PORT)])
    );
    assert_eq!(
        egress(&d, WEB),
        DirectionRules::from([deny("10.0.2.1/32", DENY_PORT)])
    );
}

// --- Classes ---------------------------------------------------------------------------------

#[test]
fn pods_with_the_same_policies_share_a_class() {
    let docs = [
        pod("default/a", "{app: web}", ""),
        pod("default/b", "{app: web}", ""),
        // Other container ports, but no ingress named port: the same rules.
        pod_with_ports(
            "default/d",
            "{app: web}",
            "",
            "[{name: http, containerPort: 8080}]",
        ),
        pod("default/admin", "{app: web, role: admin}", ""),
        pod("default/client", "{app: client}", "10.0.1.1"),
        policy(
            "default/web",
            "
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
",
        ),
        policy(
            "default/admin",
            "\n  podSelector: {matchLabels: {role: admin}}\n  ingress: [{ports: [{port: 22}]}]\n",
        ),
    ];
    let d = compile(
        &state(&docs),
        &local(&[
            ("default/a", "10.0.0.1"),
            ("default/b", "10.0.0.2"),
            ("default/d", "10.0.0.4"),
            ("default/admin", "10.0.0.5"),
        ]),
    );
    let web = PolicyClass {
        ingress: Some(DirectionRules::from([allow("10.0.1.1/32", tcp(80))])),
        egress: None,
    };
    assert_eq!(class(&d, "10.0.0.1"), &web);
    assert_eq!(class(&d, "10.0.0.2"), &web);
    assert_eq!(class(&d, "10.0.0.4"), &web);
    assert_eq!(
        class(&d, "10.0.0.5"),
        &PolicyClass {
            ingress: Some(DirectionRules::from([
                allow("0.0.0.0/0", tcp(22)),
                allow("10.0.1.1/32", tcps(&[22, 80])),
            ])),
            egress: None,
        }
    );
    assert_eq!(d.policies_in_force, 2);
}

// --- PortSet, Prefix, selectors --------------------------------------------------------------

#[test]
fn port_set_add_keeps_canonical_form() {
    let mut s = PortSet::None;
    assert!(s.is_empty());
    s.add(TCP, 80, 81);
    s.add(TCP, 82, 82);
    assert_eq!(s, ports([(TCP, &[(80, 82)])]), "adjacent ranges merge");
    s.add(TCP, 95, 110);
    s.add(TCP, 90, 100);
    s.add(TCP, 85, 85);
    assert_eq!(
        s,
        ports([(TCP, &[(80, 82), (85, 85), (90, 110)])]),
        "sorted, overlapping ranges merged"
    );
    s.add(TCP, 83, 89);
    s.add(TCP, 100, 105);
    assert_eq!(
        s,
        ports([(TCP, &[(80, 110)])]),
        "a gap filled joins both sides"
    );
    s.add(UDP, 53, 53);
    s.add(TCP, 65535, 65535);
    s.add(TCP, 65534, 65535);
    assert_eq!(
        s,
        ports([(TCP, &[(80, 110), (65534, 65535)]), (UDP, &[(53, 53)])]),
        "protocols apart, no overflow at 65535"
    );
    assert!(!s.is_empty());

    // The same set built in another order compares equal.
    let mut t = PortSet::None;
    for (proto, lo, hi) in [
        (UDP, 53, 53),
        (TCP, 65534, 65535),
        (TCP, 100, 110),
        (TCP, 80, 99),
    ] {
        t.add(proto, lo, hi);
    }
    assert_eq!(s, t);
}

#[test]
fn port_set_any_absorbs_and_add_all_unites() {
    let mut any = PortSet::Any;
    any.add(TCP, 80, 80);
    assert_eq!(any, PortSet::Any);

    let mut s = tcp(80);
    s.add_all(&PortSet::None);
    assert_eq!(s, tcp(80));
    s.add_all(&ports([(TCP, &[(81, 90)]), (SCTP, &[(1, 1)])]));
    assert_eq!(s, ports([(TCP, &[(80, 90)]), (SCTP, &[(1, 1)])]));
    s.add_all(&PortSet::Any);
    assert_eq!(s, PortSet::Any);
}

#[test]
fn port_set_allows() {
    assert!(!PortSet::None.allows(TCP, 80));
    assert!(PortSet::Any.allows(UDP, 0));
    assert!(PortSet::Any.allows(SCTP, 65535));
    let s = ports([(TCP, &[(80, 82), (65535, 65535)]), (UDP, &[(53, 53)])]);
    for (proto, port, allowed) in [
        (TCP, 79, false),
        (TCP, 80, true),
        (TCP, 82, true),
        (TCP, 83, false),
        (TCP, 65535, true),
        (TCP, 53, false),
        (UDP, 53, true),
        (UDP, 80, false),
        (SCTP, 80, false),
    ] {
        assert_eq!(s.allows(proto, port), allowed, "{proto}/{port}");
    }
}

#[test]
fn prefix_new_clears_host_bits_and_contains_what_lies_within() {
    let p = Prefix::new(v4("10.1.2.3"), 16);
    assert_eq!((p.addr, p.len), (v4("10.1.0.0"), 16));
    assert_eq!(p.to_string(), "10.1.0.0/16");
    assert_eq!(Prefix::new(v4("10.1.2.3"), 0), pfx("0.0.0.0/0"));
    assert_eq!(
        Prefix::new(v4("10.1.2.3"), 40),
        Prefix::host(v4("10.1.2.3"))
    );

    assert!(p.contains(&p));
    assert!(p.contains(&Prefix::new(v4("10.1.200.0"), 24)));
    assert!(
        !p.contains(&Prefix::new(v4("10.0.0.0"), 8)),
        "not its parent"
    );
    assert!(
        !p.contains(&Prefix::new(v4("10.2.0.0"), 16)),
        "not a sibling"
    );
    assert!(p.contains_addr(v4("10.1.255.255")));
    assert!(!p.contains_addr(v4("10.2.0.0")));
    assert!(pfx("0.0.0.0/0").contains(&Prefix::host(v4("255.255.255.255"))));
}

#[test]
fn parse_v4_cidr_accepts_ipv4_only() {
    assert_eq!(
        parse_v4_cidr("10.1.2.3/16"),
        Some(Prefix::new(v4("10.1.0.0"), 16))
    );
    assert_eq!(
        parse_v4_cidr("10.1.2.3/32"),
        Some(Prefix::host(v4("10.1.2.3")))
    );
    assert_eq!(parse_v4_cidr("fd00::/8"), None);
    assert_eq!(parse_v4_cidr("10.0.0.0/33"), None);
    assert_eq!(parse_v4_cidr("10.0.0.0"), None);
}

#[test]
fn selector_matches_absent_and_empty_selectors_match_all() {
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    assert!(selector_matches(None, &labels));
    assert!(selector_matches(None, &BTreeMap::new()));
    assert!(selector_matches(Some(&LabelSelector::default()), &labels));

    let app = |value: &str| LabelSelector {
        match_labels: Some(BTreeMap::from([("app".to_owned(), value.to_owned())])),
        ..LabelSelector::default()
    };
    assert!(selector_matches(Some(&app("web")), &labels));
    assert!(!selector_matches(Some(&app("db")), &labels));
    assert!(!selector_matches(Some(&app("web")), &BTreeMap::new()));
}

#[test]
fn selector_with_an_unknown_operator_matches_nothing() {
    let sel = LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "app".into(),
            operator: "Matches".into(),
            values: Some(vec!["web".into()]),
        }]),
        ..LabelSelector::default()
    };
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    assert!(!selector_matches(Some(&sel), &labels));
}

// --- Attribution (`ferrovia explain`) --------------------------------------------------------

/// Local pods `default/web` (app: web, TCP port `http` = 8080) at 10.0.0.1, `default/api` (app:
/// web, `http` = 9090) at 10.0.0.2 and `default/client` at 10.0.0.3; a remote pod `other/peer`
/// at 10.0.1.1 (team: blue). `web-in` and `also-in` both isolate the web pods for ingress,
/// `web-out` for egress; `db-in` selects no local pod; `elsewhere` is another namespace's.
fn attribution_docs() -> Vec<String> {
    vec![
        namespace("other", "{team: blue}"),
        pod_with_ports(
            "default/web",
            "{app: web}",
            "",
            "[{name: http, containerPort: 8080}]",
        ),
        pod_with_ports(
            "default/api",
            "{app: web}",
            "",
            "[{name: http, containerPort: 9090}]",
        ),
        pod("default/client", "{app: client}", ""),
        pod_with_ports(
            "other/peer",
            "{app: peer}",
            "10.0.1.1",
            "[{name: http, containerPort: 8081}]",
        ),
        policy(
            "default/web-in",
            "
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 8080}]
  - from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.5.0/24]}}]
    ports: [{port: http}]
  - from: [{namespaceSelector: {matchLabels: {team: blue}}}]
    ports: [{port: 53, protocol: UDP}]
",
        ),
        policy(
            "default/also-in",
            "
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
",
        ),
        policy(
            "default/web-out",
            "
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}}]
    ports: [{port: http}]
  - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]
",
        ),
        policy(
            "default/db-in",
            "\n  podSelector: {matchLabels: {app: db}}\n",
        ),
        policy("elsewhere/all", "\n  podSelector: {}\n"),
    ]
}

fn attribution_local() -> PodIps {
    local(&[
        ("default/web", "10.0.0.1"),
        ("default/api", "10.0.0.2"),
        ("default/client", "10.0.0.3"),
    ])
}

fn rule_refs(j: &super::policy::Judgement) -> Vec<String> {
    j.allowing
        .iter()
        .map(|r| format!("{}#{}", r.policy, r.index))
        .collect()
}

#[test]
fn judgements_name_every_rule_that_allows_or_the_isolating_policies() {
    use super::policy::{Dir, judge};
    use ferrovia_common::verdict::{ALLOW_NOT_ISOLATED, ALLOW_RULE, DENY_NO_RULE};
    let (st, local) = (state(&attribution_docs()), attribution_local());
    let web = ObjRef::new("default", "web");
    let at = |subject: &ObjRef, dir, peer: &str, proto, port| {
        judge(&st, &local, subject, dir, v4(peer), proto, port)
    };

    // The client on web's `http`: a pod rule, the block (named port on web) and `also-in`.
    let j = at(&web, Dir::Ingress, "10.0.0.3", TCP, 8080);
    assert_eq!(j.reason, ALLOW_RULE);
    assert_eq!(
        j.isolating,
        [
            ObjRef::new("default", "also-in"),
            ObjRef::new("default", "web-in")
        ]
    );
    assert_eq!(
        rule_refs(&j),
        ["default/also-in#0", "default/web-in#0", "default/web-in#1"]
    );
    // On api, `http` is 9090: 8080 is only the pod rule's (and also-in's), 9090 the block's.
    let api = ObjRef::new("default", "api");
    let j = at(&api, Dir::Ingress, "10.0.0.3", TCP, 8080);
    assert_eq!(rule_refs(&j), ["default/also-in#0", "default/web-in#0"]);
    let j = at(&api, Dir::Ingress, "10.0.9.9", TCP, 9090);
    assert_eq!(rule_refs(&j), ["default/web-in#1"]);
    // The namespace rule, for the remote pod in a blue namespace.
    let j = at(&web, Dir::Ingress, "10.0.1.1", UDP, 53);
    assert_eq!(rule_refs(&j), ["default/web-in#2"]);

    // Denied: why, and no rule.
    for (peer, proto, port, reason) in [
        ("10.0.5.7", TCP, 8080, DENY_EXCEPT),
        ("10.0.9.9", TCP, 9999, DENY_PORT),
        ("10.0.1.1", TCP, 53, DENY_PORT),
        ("192.0.2.1", TCP, 8080, DENY_NO_RULE),
    ] {
        let j = at(&web, Dir::Ingress, peer, proto, port);
        assert_eq!(j.reason, reason, "{peer} {proto}/{port}: {j:?}");
        assert!(j.allowing.is_empty() && !j.allowed(), "{j:?}");
        assert_eq!(j.isolating.len(), 2, "{j:?}");
    }

    // Egress: a named port resolves on the destination pod, an except carves the cluster out.
    let j = at(&web, Dir::Egress, "10.0.1.1", TCP, 8081);
    assert_eq!(rule_refs(&j), ["default/web-out#0"]);
    assert_eq!(
        at(&web, Dir::Egress, "10.0.1.1", TCP, 8080).reason,
        DENY_PORT
    );
    let j = at(&web, Dir::Egress, "198.51.100.7", UDP, 123);
    assert_eq!(rule_refs(&j), ["default/web-out#1"]);
    assert_eq!(
        at(&web, Dir::Egress, "10.9.9.9", UDP, 123).reason,
        DENY_EXCEPT
    );

    // Not isolated: the client's egress, and a pod the desired state does not have.
    let client = ObjRef::new("default", "client");
    for subject in [client, ObjRef::new("default", "ghost")] {
        let j = at(&subject, Dir::Egress, "10.0.0.1", TCP, 8080);
        assert_eq!(j.reason, ALLOW_NOT_ISOLATED, "{subject}");
        assert!(j.isolating.is_empty() && j.allowing.is_empty() && j.allowed());
    }
}

/// The compiled table's answer for `peer`, as the data path's two trie lookups give it.
fn table_reason(rules: &DirectionRules, peer: Ipv4Addr, proto: u8, port: u16) -> u8 {
    use ferrovia_common::verdict::{ALLOW_RULE, DENY_NO_RULE};
    let longest = rules
        .iter()
        .filter(|(prefix, _)| prefix.contains_addr(peer))
        .max_by_key(|(prefix, _)| prefix.len);
    match longest {
        None => DENY_NO_RULE,
        Some((_, entry)) if entry.ports.is_empty() => entry.reason,
        Some((_, entry)) if entry.ports.allows(proto, port) => ALLOW_RULE,
        Some(_) => DENY_PORT,
    }
}

/// The attribution's reason is the compiled table's, for every local pod, direction, and a
/// spread of peers (pods, block and except edges, outside) on both protocols and several ports.
#[test]
fn judgements_agree_with_the_compiled_table_everywhere() {
    use super::policy::{Dir, judge};
    use ferrovia_common::verdict::{ALLOW_NOT_ISOLATED, ALLOW_RULE};
    let (st, local) = (state(&attribution_docs()), attribution_local());
    let compiled = compile(&st, &local);
    let peers = [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.1.1",
        "10.0.0.0",
        "10.0.255.255",
        "10.0.4.255",
        "10.0.5.0",
        "10.0.5.255",
        "10.0.6.0",
        "10.1.0.0",
        "9.255.255.255",
        "11.0.0.0",
        "192.0.2.1",
    ];
    let mut checked = 0;
    for (subject, ips) in &local {
        let IpAddr::V4(ip) = ips[0] else { continue };
        let class = compiled.endpoints.get(&ip);
        for dir in [Dir::Ingress, Dir::Egress] {
            let rules = class.and_then(|c| match dir {
                Dir::Ingress => c.ingress.as_ref(),
                Dir::Egress => c.egress.as_ref(),
            });
            for peer in peers.map(v4) {
                for proto in [TCP, UDP] {
                    for port in [53, 80, 8080, 8081, 9090, 9999] {
                        let want = rules
                            .map_or(ALLOW_NOT_ISOLATED, |r| table_reason(r, peer, proto, port));
                        let j = judge(&st, &local, subject, dir, peer, proto, port);
                        assert_eq!(
                            j.reason, want,
                            "{subject} {dir:?} peer {peer} {proto}/{port}: {j:?}"
                        );
                        assert_eq!(j.allowing.is_empty(), want != ALLOW_RULE, "{j:?}");
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 3 * 2 * peers.len() * 2 * 6);
}
