use std::time::Duration;
use ferrovia_tests::{AgentOpts, Node, ProbeSpec};

fn slice(ips: &[std::net::Ipv4Addr]) -> String {
    let mut s = String::from(r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.1.1
  ports: [{name: t, port: 80, protocol: TCP}, {name: u, port: 80, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: t, port: 9000, protocol: TCP}, {name: u, port: 9000, protocol: UDP}]
endpoints:
"#);
    for ip in ips { s += &format!("- addresses: [\"{ip}\"]\n"); }
    s
}

fn run(socket_lb: bool) {
    let node = Node::new().unwrap();
    let _agent = node.start_agent(AgentOpts { socket_lb, ..AgentOpts::default() }).unwrap();
    let a = node.add_pod("default", "a").unwrap();
    let b = node.add_pod("default", "b").unwrap();
    let c = node.add_pod("default", "client").unwrap();
    let _sa = a.serve(&["tcp:9000", "udp:9000"]).unwrap();
    let _sb = b.serve(&["tcp:9000", "udp:9000"]).unwrap();
    node.write_manifest("svc.yaml", &slice(&[a.ip, b.ip])).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let s = c.probe_stream(&ProbeSpec::udp(([10,96,1,1], 80)).count(0).persistent().interval(Duration::from_millis(100)).timeout(Duration::from_millis(500))).unwrap();
    let r = s.wait_for(3, Duration::from_secs(5)).unwrap();
    let on = r[0].server().unwrap().to_owned();
    let keep = if on == "a" { b.ip } else { a.ip };
    println!("socket_lb={socket_lb} first on {on}");
    node.write_manifest("svc.yaml", &slice(&[keep])).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let l = node.bpffs_root().join("links").join(format!("tc-{}-ingress", a.host_ifname));
    let li = node.bpftool(&["link", "show", "pinned", l.to_str().unwrap()]).unwrap();
    println!("link: {li}");
    let r = s.stop();
    for x in r.iter().step_by(5) { println!("{:?} {:?} {:?} {} {:?}", x.ok, x.server(), x.local, x.conn, x.error); }
}

#[test] fn tc() { run(false) }
#[test] fn sock() { run(true) }
