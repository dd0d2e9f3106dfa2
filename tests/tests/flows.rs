//! Flow and verdict events end to end: known traffic between pods in network namespaces,
//! through the real agent and its programs, and the events `ferrovia flows` must show — live
//! (`--follow`) and afterwards with filters — with the right pods, verdicts, drop reasons and
//! service translations. Needs root, bpffs and cgroup v2, as every e2e suite.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use ferrovia_tests::{Agent, AgentOpts, Node, Pod, ProbeSpec, cli, openmetrics};
use serde_json::Value;

const PORT: u16 = 8080;
const METRICS_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9965));
const WEB: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 96, 78, 10), 80));
const EMPTY: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 96, 78, 11), 80));
/// Where the warm-up datagrams go: a port the server's policy does not open.
const WARM_UP_PORT: u16 = 9999;
/// TCP connections of the server to itself through the web VIP (allowed).
const HAIRPINS: u64 = 2;
const SHORT: Duration = Duration::from_millis(300);
const WAIT: Duration = Duration::from_secs(15);

const MANIFESTS: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: echo, image: ferrovia-echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec: {containers: [{name: echo, image: ferrovia-echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: shop, labels: {app: stranger}}
spec: {containers: [{name: echo, image: ferrovia-echo}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-client, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{protocol: TCP, port: 8080}, {protocol: UDP, port: 8080}]
  - from: [{podSelector: {matchLabels: {app: server}}}]
    ports: [{protocol: TCP, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.78.10
  selector: {app: server}
  ports:
  - {name: dns, protocol: UDP, port: 80, targetPort: 8080}
  - {name: http, protocol: TCP, port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec:
  clusterIP: 10.96.78.11
  selector: {app: nobody}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
";

/// What identifies an event for the test: where, what, who, verdict, and service.
fn key(ev: &Value) -> String {
    let s = |f: &str| ev[f].as_str().unwrap_or("?").to_owned();
    format!(
        "{}/{} {} {} {} {}->{} {} {} {} {}",
        s("namespace"),
        s("pod"),
        s("direction"),
        s("type"),
        s("protocol"),
        s("source_pod"),
        s("destination_pod"),
        s("verdict"),
        s("policy_reason"),
        s("drop_reason"),
        s("service"),
    )
}

/// The tally of events by [`key`], leaving out the warm-up's (to [`WARM_UP_PORT`]).
fn tally<'a>(events: impl Iterator<Item = &'a Value>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for ev in events.filter(|e| e["destination_port"] != u64::from(WARM_UP_PORT)) {
        *out.entry(key(ev)).or_insert(0) += 1;
    }
    out
}

/// What the test's traffic must show.
fn expected(n_tcp: u64, n_vip: u64, m: u64) -> BTreeMap<String, u64> {
    let c = "shop/client";
    let s = "shop/server";
    let st = "shop/stranger";
    let open = "allowed allowed-not-isolated";
    let rule = "allowed allowed-by-rule";
    [
        (
            format!("{c} egress new-connection TCP {c}->{s} {open}  "),
            n_tcp,
        ),
        (
            format!("{s} ingress new-connection TCP {c}->{s} {rule}  "),
            n_tcp,
        ),
        (
            format!("{c} egress new-connection UDP {c}->{s} {open}  shop/web"),
            n_vip,
        ),
        (
            format!("{s} ingress new-connection UDP {c}->{s} {rule}  "),
            n_vip,
        ),
        (
            format!("{st} egress new-connection UDP {st}->{s} {open}  "),
            m,
        ),
        (
            format!("{s} ingress drop UDP {st}->{s} denied denied-by-default policy-denied "),
            m,
        ),
        (
            format!("{c} egress drop TCP {c}->   no-endpoints shop/empty"),
            1,
        ),
        // The server through its own VIP: judged at its egress and its ingress in from_pod,
        // one event each (the bounce back into it makes none at its ingress).
        (
            format!("{s} egress new-connection TCP {s}->{s} {rule}  shop/web"),
            HAIRPINS,
        ),
        (
            format!("{s} egress drop UDP {s}->{s} denied denied-by-port policy-denied shop/web"),
            1,
        ),
    ]
    .into_iter()
    .fold(BTreeMap::new(), |mut acc, (k, n)| {
        if n > 0 {
            *acc.entry(k).or_insert(0) += n;
        }
        acc
    })
}

/// The shop: agent (with or without the socket hooks), three pods,
/// the policy and services in force, the server serving.
/// Fields drop in order: the server process, the pods (CNI DEL), the agent, the node.
struct Shop {
    _serving: ferrovia_tests::Server,
    stranger: Pod,
    server: Pod,
    client: Pod,
    agent: Agent,
    node: Node,
}

impl Shop {
    fn new(socket_lb: bool) -> Self {
        Self::with_agent_args(socket_lb, &[])
    }

    fn with_agent_args(socket_lb: bool, args: &[&str]) -> Self {
        let node = Node::new().expect("creating the node");
        let agent = node
            .start_agent(AgentOpts {
                socket_lb,
                metrics_addr: Some(METRICS_ADDR),
                extra_args: args.iter().map(ToString::to_string).collect(),
                ..AgentOpts::default()
            })
            .expect("starting ferrovia-agent");
        let client = node.add_pod("shop", "client").expect("CNI ADD client");
        let server = node.add_pod("shop", "server").expect("CNI ADD server");
        let stranger = node.add_pod("shop", "stranger").expect("CNI ADD stranger");
        node.write_manifest("shop.yaml", MANIFESTS)
            .expect("manifests");
        assert_eq!(agent.sync().expect("sync"), Vec::<String>::new());
        let serving = server
            .serve(&[&format!("tcp:{PORT}"), &format!("udp:{PORT}")])
            .expect("echo server");
        Self {
            _serving: serving,
            stranger,
            server,
            client,
            agent,
            node,
        }
    }

    /// A follower of every event, connected: it has shown a warm-up event (datagrams the
    /// server's policy drops, left out of the tallies).
    fn follow(&self) -> cli::Follow {
        let mut follow =
            cli::Follow::start(&self.node.api_socket(), &["--last", "0"]).expect("following");
        let warm_up = SocketAddr::from((self.server.ip, WARM_UP_PORT));
        for _ in 0..50 {
            let _ = self
                .client
                .probe(&ProbeSpec::udp(warm_up).timeout(Duration::from_millis(50)));
            if !follow.wait_until(SHORT, |seen| !seen.is_empty()).is_empty() {
                break;
            }
        }
        assert!(follow.running(), "ferrovia flows --follow exited");
        follow
    }

    /// n TCP connections client → server, n' UDP flows client → the web VIP, m datagrams of
    /// the stranger, one connection to the service without endpoints.
    fn drive(&self, n_tcp: u64, n_vip: u64, m: u64) {
        let to = SocketAddr::from((self.server.ip, PORT));
        probe_all(&self.client, &ProbeSpec::tcp(to).count(n_tcp), true, "TCP");
        probe_all(
            &self.client,
            &ProbeSpec::udp(WEB).count(n_vip),
            true,
            "UDP via the VIP",
        );
        let denied = ProbeSpec::udp(to).count(m).timeout(SHORT);
        probe_all(
            &self.stranger,
            &denied,
            false,
            "denied by the server's policy",
        );
        probe_all(&self.client, &ProbeSpec::tcp(EMPTY), false, "no endpoints");
        let hairpins = ProbeSpec::tcp(WEB).count(HAIRPINS);
        probe_all(&self.server, &hairpins, true, "the server through its VIP");
        let denied = ProbeSpec::udp(WEB).timeout(SHORT);
        probe_all(
            &self.server,
            &denied,
            false,
            "its policy admits only its TCP",
        );
    }

    /// `ferrovia -o json flows ARGS`: the recent events, one per line.
    fn recent(&self, args: &[&str]) -> Vec<Value> {
        let out = cli::ferrovia(
            &self.node.api_socket(),
            &[&["-o", "json", "flows"], args].concat(),
        )
        .expect("ferrovia flows");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    }
}

/// Runs `spec` from `pod`; every request must be answered, or none (`answered`).
fn probe_all(pod: &Pod, spec: &ProbeSpec, answered: bool, what: &str) {
    let results = pod.probe(spec).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert!(
        results.iter().all(|r| r.ok == answered),
        "{what}: {results:?}"
    );
}

/// The fields the tally leaves out: addresses, ports, the translation, the time.
fn check_fields(shop: &Shop, seen: &[Value]) {
    let via: Vec<&Value> = seen
        .iter()
        .filter(|e| e["service"] == "shop/web" && e["pod"] == "client")
        .collect();
    assert!(!via.is_empty());
    for ev in &via {
        assert_eq!(ev["service_address"], "10.96.78.10", "{ev}");
        assert_eq!(
            (
                ev["service_port"].as_u64(),
                ev["service_port_name"].as_str()
            ),
            (Some(80), Some("dns")),
            "{ev}"
        );
        assert_eq!(ev["destination"], shop.server.ip.to_string(), "{ev}");
        assert_eq!(
            ev["destination_port"].as_u64(),
            Some(u64::from(PORT)),
            "{ev}"
        );
        assert_eq!(ev["source"], shop.client.ip.to_string(), "{ev}");
        assert!(ev["source_port"].as_u64().unwrap_or(0) > 0, "{ev}");
    }
    let refusal = seen
        .iter()
        .find(|e| e["drop_reason"] == "no-endpoints")
        .expect("the refusal");
    assert_eq!(
        (
            refusal["destination"].as_str(),
            refusal["destination_port"].as_u64()
        ),
        (Some("10.96.78.11"), Some(80))
    );
    let now_ns = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap();
    for ev in seen {
        let t = ev["time_unix_nano"].as_u64().unwrap_or(0);
        assert!(
            t <= now_ns && now_ns - t < 120_000_000_000,
            "event time {t} vs now {now_ns}: {ev}"
        );
    }
}

/// The recent events again, with filters, and as the table for people.
fn check_recent(shop: &Shop, want: &BTreeMap<String, u64>, (n_vip, m): (u64, u64)) {
    let count = |args: &[&str]| tally(shop.recent(args).iter()).values().sum::<u64>();
    assert_eq!(
        tally(shop.recent(&["--last", "1000"]).iter()),
        *want,
        "the recent events are the ones followed"
    );
    assert_eq!(
        count(&["--verdict", "denied", "--protocol", "udp"]),
        m + 1,
        "the stranger's and the server's hairpin"
    );
    assert_eq!(
        count(&["--pod", "shop/client", "--port", "80"]),
        n_vip + 1,
        "via the VIP (service port 80) and the refusal"
    );
    assert_eq!(count(&["--verdict", "dropped", "-n", "shop"]), m + 2);
    let hairpins = shop.recent(&["--pod", "shop/server", "--port", "80"]);
    assert_eq!(hairpins.len() as u64, HAIRPINS + 1, "{hairpins:#?}");
    for ev in &hairpins {
        assert_eq!(
            (ev["direction"].as_str(), ev["policy_direction"].as_str()),
            (Some("egress"), Some("ingress")),
            "judged last by its own ingress: {ev}"
        );
        assert_eq!(ev["destination"], shop.server.ip.to_string(), "{ev}");
    }
    assert!(shop.recent(&["--namespace", "elsewhere"]).is_empty());
    assert_eq!(shop.recent(&["--last", "2"]).len(), 2);
    let socket = shop.node.api_socket();
    let bad = cli::ferrovia(&socket, &["flows", "--verdict", "maybe"]).expect("ferrovia");
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("verdict"), "{stderr}");

    let table = cli::ferrovia(
        &socket,
        &[
            "flows",
            "--pod",
            "client",
            "--protocol",
            "udp",
            "--port",
            "80",
        ],
    )
    .expect("table");
    let table = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.lines().count() as u64, n_vip, "{table}");
    assert!(
        table
            .lines()
            .all(|l| l.contains("via 10.96.78.10:80 shop/web")
                && l.contains("allowed (allowed-not-isolated)")),
        "{table}"
    );
}

/// `ferrovia_flow_events_total` by outcome.
fn flow_event_counts(agent: &Agent) -> BTreeMap<String, f64> {
    let reply = agent.http_get("/metrics").expect("GET /metrics");
    let metrics = openmetrics::parse(&reply.body).expect("OpenMetrics");
    metrics
        .samples
        .iter()
        .filter(|s| s.name == "ferrovia_flow_events_total")
        .map(|s| (s.labels["outcome"].clone(), s.value))
        .collect()
}

/// `ferrovia_flow_events_total`: at least the events seen were read; none suppressed or lost.
#[allow(clippy::float_cmp)] // counter values are small integers, exact in f64
fn check_metrics(agent: &Agent, total: u64) {
    let reply = agent.http_get("/metrics").expect("GET /metrics");
    let metrics = openmetrics::parse(&reply.body).expect("OpenMetrics");
    let value = |outcome: &str| {
        metrics
            .samples
            .iter()
            .find(|s| s.name == "ferrovia_flow_events_total" && s.labels["outcome"] == outcome)
            .map_or_else(
                || panic!("no {outcome} sample:\n{}", reply.body),
                |s| s.value,
            )
    };
    assert!(value("read") >= total as f64, "{}", reply.body);
    assert_eq!(
        (value("suppressed"), value("lost")),
        (0.0, 0.0),
        "{}",
        reply.body
    );
}

/// n TCP connections client → server, n' UDP flows client → the web VIP (translated per
/// packet: the socket hooks are off), m datagrams of a stranger the server's policy denies,
/// and one connection to a service without endpoints: every event on a live `--follow`, with
/// pods, verdicts, reasons and the service, and nothing more; then the same events again with
/// filters, the table for people, and the read counter in /metrics.
#[test]
fn flows_show_the_traffic_driven_with_verdicts_and_services() {
    let shop = Shop::new(false);
    let mut follow = shop.follow();
    let (n_tcp, n_vip, m) = (3, 2, 2);
    shop.drive(n_tcp, n_vip, m);

    let want = expected(n_tcp, n_vip, m);
    let total: u64 = want.values().sum();
    let scenario = |seen: &[Value]| tally(seen.iter()).values().sum::<u64>();
    let seen = follow
        .wait_until(WAIT, |seen| scenario(seen) >= total)
        .to_vec();
    assert_eq!(tally(seen.iter()), want, "events on --follow:\n{seen:#?}");
    // Collects for SHORT whatever else comes: nothing.
    let more = follow.wait_until(SHORT, |_| false).to_vec();
    assert_eq!(tally(more.iter()), want, "{more:#?}");
    check_fields(&shop, &seen);
    check_recent(&shop, &want, (n_vip, m));
    check_metrics(&shop.agent, total);
}

/// With the socket hooks, a connection through the VIP is translated at `connect()`: a
/// "translation" event names the calling pod, the service and the backend, and the packets
/// then go to the backend (new-connection events without a service); a connection to the
/// service without endpoints is refused at the socket: a "drop" event naming the service.
#[test]
fn socket_translations_and_refusals_are_events_too() {
    let shop = Shop::new(true);
    let mut follow = shop.follow();
    let n = 2;
    probe_all(
        &shop.client,
        &ProbeSpec::tcp(WEB).count(n),
        true,
        "TCP via the VIP",
    );
    probe_all(&shop.client, &ProbeSpec::tcp(EMPTY), false, "no endpoints");

    let (c, s) = ("shop/client", "shop/server");
    let want: BTreeMap<String, u64> = [
        (
            format!("{c} egress translation TCP {c}->{s}    shop/web"),
            n,
        ),
        (
            format!("{c} egress new-connection TCP {c}->{s} allowed allowed-not-isolated  "),
            n,
        ),
        (
            format!("{s} ingress new-connection TCP {c}->{s} allowed allowed-by-rule  "),
            n,
        ),
        (
            format!("{c} egress drop TCP {c}->   no-endpoints shop/empty"),
            1,
        ),
    ]
    .into_iter()
    .collect();
    let total: u64 = want.values().sum();
    let seen = follow
        .wait_until(WAIT, |seen| {
            tally(seen.iter()).values().sum::<u64>() >= total
        })
        .to_vec();
    assert_eq!(tally(seen.iter()), want, "events on --follow:\n{seen:#?}");
    for ev in seen.iter().filter(|e| e["type"] == "translation") {
        // The pod's address, known from its namespace; no port is chosen yet.
        assert_eq!(
            (ev["source"].as_str(), ev["source_port"].as_u64()),
            (Some(shop.client.ip.to_string().as_str()), Some(0)),
            "{ev}"
        );
        assert_eq!(ev["destination"], shop.server.ip.to_string(), "{ev}");
        assert_eq!(
            ev["destination_port"].as_u64(),
            Some(u64::from(PORT)),
            "{ev}"
        );
        assert_eq!(
            (
                ev["service_address"].as_str(),
                ev["service_port"].as_u64(),
                ev["service_port_name"].as_str()
            ),
            (Some("10.96.78.10"), Some(80), Some("http")),
            "{ev}"
        );
    }
    let translations = shop.recent(&["--pod", "client", "--port", "8080", "--protocol", "tcp"]);
    assert_eq!(
        tally(translations.iter()).values().sum::<u64>(),
        2 * n,
        "the translations and the connections to the backend port: {translations:#?}"
    );
}

/// A flood at one pod costs the agent a bounded number of events: with a rate of 1 per second
/// and bursts of 2, n denied datagrams of the stranger (n new flows at its egress, n drops at
/// the server's ingress) give at most a few events per CPU; every other one is counted as
/// suppressed, exactly (read + suppressed = 2n, none lost), and the suppressed counts the
/// events carry never exceed that.
#[test]
#[allow(clippy::float_cmp)] // counter values are small integers, exact in f64
fn a_flood_is_rate_limited_per_pod_and_counted() {
    let shop = Shop::with_agent_args(false, &["--flow-events-rate=1", "--flow-events-burst=2"]);
    let n = 40;
    let to = SocketAddr::from((shop.server.ip, PORT));
    let started = std::time::Instant::now();
    let denied = shop
        .stranger
        .probe(
            &ProbeSpec::udp(to)
                .count(n)
                .timeout(Duration::from_millis(20)),
        )
        .expect("flood");
    assert!(denied.iter().all(|r| !r.ok), "{denied:?}");
    let attempted = 2.0 * n as f64;
    let deadline = std::time::Instant::now() + WAIT;
    let mut counts = flow_event_counts(&shop.agent);
    while counts["read"] + counts["suppressed"] < attempted && std::time::Instant::now() < deadline
    {
        std::thread::sleep(SHORT);
        counts = flow_event_counts(&shop.agent);
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(
        (counts["read"] + counts["suppressed"], counts["lost"]),
        (attempted, 0.0),
        "{counts:?}"
    );
    // Two buckets (stranger, server), each per CPU: a burst of 2, then 1 per second.
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let bound = 2.0 * cpus * (2.0 + elapsed.ceil());
    assert!(
        counts["read"] <= bound && counts["suppressed"] > 0.0,
        "{counts:?}, bound {bound} after {elapsed:.1} s"
    );
    let events = shop.recent(&["--last", "1000"]);
    assert_eq!(events.len() as f64, counts["read"], "{events:#?}");
    let carried: u64 = events
        .iter()
        .map(|e| e["suppressed"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        carried as f64 <= counts["suppressed"],
        "{carried} carried, {counts:?}"
    );
}
