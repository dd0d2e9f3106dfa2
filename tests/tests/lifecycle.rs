use ferrovia_tests::{AgentOpts, Node};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

fn slice(ips: &[std::net::Ipv4Addr]) -> String {
    let mut s = String::from(
        r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.1.1
  ports: [{name: u, port: 80, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: u, port: 9000, protocol: UDP}]
endpoints:
"#,
    );
    for ip in ips {
        s += &format!("- addresses: [\"{ip}\"]\n");
    }
    s
}

#[test]
fn sock() {
    let node = Node::new().unwrap();
    let _agent = node.start_agent(AgentOpts::default()).unwrap();
    let a = node.add_pod("default", "a").unwrap();
    let b = node.add_pod("default", "b").unwrap();
    let c = node.add_pod("default", "client").unwrap();
    let _sa = a.serve(&["udp:9000"]).unwrap();
    let _sb = b.serve(&["udp:9000"]).unwrap();
    node.write_manifest("svc.yaml", &slice(&[a.ip, b.ip]))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let cg = c.place().cgroup;
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec nsenter --net={} socat STDIO UDP-SENDTO:10.96.1.1:80",
        cg.display(),
        c.netns_path()
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdin.write_all(b"hi\n").unwrap();
    stdin.flush().unwrap();
    out.read_line(&mut line).unwrap();
    println!("first: {line}");
    let keep = if line.starts_with("a ") { b.ip } else { a.ip };
    node.write_manifest("svc.yaml", &slice(&[keep])).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..5 {
        line.clear();
        stdin.write_all(b"hi\n").unwrap();
        stdin.flush().unwrap();
        out.read_line(&mut line).unwrap();
        println!("after: {line}");
    }
    child.kill().unwrap();
}
