//! Program tests: each tc program is fed crafted packets through `BPF_PROG_TEST_RUN` on the
//! real kernel, and its verdict and output packet are checked (a table of cases, one line of
//! intent each, in the manner of Katran's and Cilium's BPF tests). Needs root and bpffs.
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use etherparse::PacketBuilder;
use ferrovia_agent::datapath::{Datapath, DatapathConfig, FrontendSpec, MapSizes, addr};
use std::sync::Arc;

use ferrovia_agent::model::policy::{
    DirectionRules, PeerEntry, PolicyClass, PolicyDesired, PortSet, Prefix,
};
use ferrovia_common::{POL_DIR_EGRESS, POL_DIR_INGRESS, PROTO_TCP, PROTO_UDP, ServiceKey, verdict};

const TC_ACT_OK: i32 = 0;
const TC_ACT_REDIRECT: i32 = 7;

const POD_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x02];
const GW_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x01];
const CLIENT: [u8; 4] = [10, 244, 0, 2];
const BACKEND: [u8; 4] = [10, 244, 1, 5];
const VIP: [u8; 4] = [10, 96, 0, 10];
const DEAD_VIP: [u8; 4] = [10, 96, 0, 11];

/// A data path loaded under its own bpffs root, removed (pins and all) on drop.
struct Loaded {
    dp: Option<Datapath>,
    root: PathBuf,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        self.dp.take();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn frontend(vip: [u8; 4], port: u16, proto: u8, backends: &[&str]) -> FrontendSpec {
    let (a, family) = addr::encode(vip.into());
    FrontendSpec {
        key: ServiceKey {
            addr: a,
            port: port.to_be(),
            proto,
            family,
            slot: 0,
            _pad: 0,
        },
        flags: 0,
        affinity_timeout_s: 0,
        backends: backends
            .iter()
            .map(|b| b.parse::<SocketAddr>().unwrap())
            .collect(),
    }
}

/// The frontends every test starts with: one backend per protocol, and two without endpoints.
fn base_frontends() -> Vec<FrontendSpec> {
    vec![
        frontend(VIP, 80, PROTO_TCP, &["10.244.1.5:9376"]),
        frontend(VIP, 53, PROTO_UDP, &["10.244.1.5:5353"]),
        frontend(DEAD_VIP, 80, PROTO_TCP, &[]),
        frontend(DEAD_VIP, 53, PROTO_UDP, &[]),
    ]
}

/// Loads the data path on `root`, adopting whatever is pinned there.
fn open(root: &std::path::Path) -> Datapath {
    Datapath::load(DatapathConfig {
        bpffs_root: root.to_path_buf(),
        socket_lb_cgroup: None,
        sizes: MapSizes {
            conntrack: 1024,
            services: 1024,
            backends: 1024,
            ..MapSizes::default()
        },
        prefer_tcx: true,
        network_policy: true,
    })
    .expect("loading the data path (needs root and bpffs at /sys/fs/bpf)")
}

fn load(test: &str) -> Loaded {
    let root = PathBuf::from(format!("/sys/fs/bpf/fv-prog-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut loaded = Loaded {
        dp: None,
        root: root.clone(),
    };
    let dp = loaded.dp.insert(open(&root));
    let (_, errors) = dp.sync_frontends(&base_frontends());
    assert!(errors.is_empty(), "{errors:?}");
    loaded
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(POD_MAC, GW_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 65535);
    let b = if syn { b.syn() } else { b.ack(77) };
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, GW_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// Ones' complement sum of `data`, folded.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from(chunk[0]) << 8
        };
        acc += u32::from(word);
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// A decoded IPv4 packet whose checksums (IP, and TCP/UDP/ICMP) were verified.
#[derive(Debug)]
struct Seen {
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    sport: u16,
    dport: u16,
    l4: Vec<u8>,
    macs: ([u8; 6], [u8; 6]),
}

fn parse(packet: &[u8]) -> Seen {
    assert_eq!(&packet[12..14], &[0x08, 0x00], "not IPv4");
    let ip = &packet[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(tot, ip.len(), "IP total length vs packet length");
    assert_eq!(sum16(&ip[..ihl], 0), 0xffff, "bad IPv4 header checksum");
    let l4 = &ip[ihl..tot];
    let proto = ip[9];
    if proto == PROTO_TCP || (proto == PROTO_UDP && u16::from_be_bytes([l4[6], l4[7]]) != 0) {
        let mut pseudo = Vec::from(&ip[12..20]);
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        assert_eq!(sum16(l4, sum16(&pseudo, 0)), 0xffff, "bad L4 checksum");
    } else if proto == 1 {
        assert_eq!(sum16(l4, 0), 0xffff, "bad ICMP checksum");
    }
    Seen {
        src: ip[12..16].try_into().unwrap(),
        dst: ip[16..20].try_into().unwrap(),
        proto,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        l4: l4.to_vec(),
        macs: (
            packet[0..6].try_into().unwrap(),
            packet[6..12].try_into().unwrap(),
        ),
    }
}

fn counter(t: &Loaded, name: &str) -> u64 {
    t.dp.as_ref().unwrap().counters().unwrap()[name]
}

fn run(t: &Loaded, prog: &str, packet: &[u8]) -> (i32, Vec<u8>) {
    t.dp.as_ref()
        .unwrap()
        .test_run(prog, packet)
        .expect("BPF_PROG_TEST_RUN")
}

#[test]
fn tcp_to_vip_is_dnatted_and_reply_reverse_natted() {
    let t = load("tcp");
    let (verdict, out) = run(&t, "from_pod", &tcp(CLIENT, 40000, VIP, 80, true, b""));
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out);
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (CLIENT, 40000, BACKEND, 9376),
        "SYN to the VIP goes to the backend"
    );
    // A later packet of the same connection, with payload, follows the conntrack entry.
    let (verdict, out) = run(
        &t,
        "from_pod",
        &tcp(CLIENT, 40000, VIP, 80, false, b"GET /\n"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out);
    assert_eq!((p.dst, p.dport), (BACKEND, 9376));
    assert_eq!(&p.l4[20..], b"GET /\n", "payload untouched");
    assert_eq!(counter(&t, "xlate_new"), 1);
    assert_eq!(counter(&t, "xlate_ct"), 1);
    // The backend's reply, on its way into the client pod, is shown as coming from the VIP.
    let (verdict, out) = run(
        &t,
        "to_pod",
        &tcp(BACKEND, 9376, CLIENT, 40000, false, b"pod-a\n"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out);
    assert_eq!((p.src, p.sport, p.dst, p.dport), (VIP, 80, CLIENT, 40000));
}

#[test]
fn udp_to_vip_is_dnatted_and_reply_reverse_natted() {
    let t = load("udp");
    let (verdict, out) = run(&t, "from_pod", &udp(CLIENT, 5000, VIP, 53, b"query"));
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out);
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (CLIENT, 5000, BACKEND, 5353)
    );
    let (verdict, out) = run(&t, "to_pod", &udp(BACKEND, 5353, CLIENT, 5000, b"answer"));
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out);
    assert_eq!((p.src, p.sport, p.dst, p.dport), (VIP, 53, CLIENT, 5000));
    assert_eq!(&p.l4[8..], b"answer", "payload untouched");
}

#[test]
fn traffic_not_to_a_vip_is_untouched() {
    let t = load("plain");
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&POD_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "from_pod",
            "pod to pod TCP",
            tcp(CLIENT, 40000, BACKEND, 9376, true, b""),
        ),
        (
            "from_pod",
            "pod to pod UDP",
            udp(CLIENT, 5000, BACKEND, 5353, b"x"),
        ),
        (
            "from_pod",
            "VIP, port not in the service",
            tcp(CLIENT, 40000, VIP, 81, true, b""),
        ),
        (
            "from_pod",
            "VIP, UDP to a TCP-only port",
            udp(CLIENT, 5000, VIP, 80, b"x"),
        ),
        (
            "to_pod",
            "reply of no known connection",
            tcp(BACKEND, 9376, CLIENT, 41000, false, b""),
        ),
        ("from_pod", "ARP", arp),
    ];
    for (prog, intent, packet) in cases {
        let (verdict, out) = run(&t, prog, &packet);
        assert_eq!(verdict, TC_ACT_OK, "{intent}");
        assert_eq!(out, packet, "{intent}: packet changed");
    }
    assert_eq!(counter(&t, "xlate_new"), 0);
}

#[test]
fn malformed_and_truncated_packets_pass_without_rewrite() {
    let t = load("malformed");
    let good = tcp(CLIENT, 40000, VIP, 80, true, b"");
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = good.clone();
        f(&mut p);
        p
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // (A frame cut inside the IP header cannot be fed: BPF_PROG_TEST_RUN itself refuses an
        // IPv4 frame shorter than an IP header with EINVAL.)
        ("IHL pointing past the end", with(&|p| p[14] = 0x4f)),
        ("truncated in the TCP header", {
            let mut p = good[..14 + 20 + 10].to_vec();
            p[16..18].copy_from_slice(&30u16.to_be_bytes());
            p
        }),
        ("IHL below 5", with(&|p| p[14] = 0x44)),
        ("IP version 6 in an IPv4 frame", with(&|p| p[14] = 0x65)),
        (
            "total length beyond the packet",
            with(&|p| p[16..18].copy_from_slice(&1500u16.to_be_bytes())),
        ),
    ];
    for (intent, packet) in &cases {
        let (verdict, out) = run(&t, "from_pod", packet);
        assert_eq!(verdict, TC_ACT_OK, "{intent}");
        assert_eq!(&out, packet, "{intent}: packet changed");
    }
    assert_eq!(counter(&t, "malformed"), cases.len() as u64);
    let frag = with(&|p| p[20] = 0x20); // more-fragments flag
    let (verdict, out) = run(&t, "from_pod", &frag);
    assert_eq!((verdict, &out), (TC_ACT_OK, &frag), "fragment untouched");
    assert_eq!(counter(&t, "fragment"), 1);
    assert_eq!(counter(&t, "xlate_new"), 0, "nothing translated");
}

#[test]
fn service_without_endpoints_answers_tcp_with_rst() {
    let t = load("rst");
    let (verdict, out) = run(&t, "from_pod", &tcp(CLIENT, 40000, DEAD_VIP, 80, true, b""));
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back to the pod");
    let p = parse(&out);
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (DEAD_VIP, 80, CLIENT, 40000)
    );
    assert_eq!(p.macs, (POD_MAC, GW_MAC), "Ethernet addresses swapped");
    assert_eq!(p.l4[13], 0x14, "RST|ACK");
    let ack = u32::from_be_bytes(p.l4[8..12].try_into().unwrap());
    assert_eq!(ack, 1001, "acknowledges the SYN");
    assert_eq!(out.len(), 54);
    assert_eq!(counter(&t, "reject_tcp_rst"), 1);
}

#[test]
fn service_without_endpoints_answers_udp_with_icmp_port_unreachable() {
    let t = load("icmp");
    let sent = udp(CLIENT, 5000, DEAD_VIP, 53, b"a question that goes nowhere");
    let (verdict, out) = run(&t, "from_pod", &sent);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = parse(&out);
    assert_eq!((p.src, p.dst, p.proto), (DEAD_VIP, CLIENT, 1));
    assert_eq!(
        (p.l4[0], p.l4[1]),
        (3, 3),
        "destination unreachable / port unreachable"
    );
    assert_eq!(
        &p.l4[8..36],
        &sent[14..42],
        "quotes the original IP header and 8 bytes"
    );
    assert_eq!(counter(&t, "reject_icmp"), 1);
}

#[test]
fn hairpin_is_snatted_to_the_vip_and_bounced_back() {
    let t = load("hairpin");
    // The backend pod itself calls the VIP and lands on itself.
    let (verdict, out) = run(&t, "from_pod", &tcp(BACKEND, 40000, VIP, 80, true, b""));
    assert_eq!(verdict, TC_ACT_REDIRECT, "straight back into the pod");
    let p = parse(&out);
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (VIP, 40000, BACKEND, 9376),
        "the pod sees the VIP as source"
    );
    assert_eq!(
        p.macs,
        (POD_MAC, GW_MAC),
        "Ethernet addresses swapped: to the pod, from its gateway"
    );
    // Its answer (to the VIP) leaves the pod and is turned back into VIP:80 → pod:40000.
    let (verdict, out) = run(
        &t,
        "from_pod",
        &tcp(BACKEND, 9376, VIP, 40000, false, b"me"),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = parse(&out);
    assert_eq!((p.src, p.sport, p.dst, p.dport), (VIP, 80, BACKEND, 40000));
    assert_eq!(counter(&t, "hairpin"), 2);
}

/// Opens a pinned hash/LRU map of a loaded data path for direct reads and writes.
fn pinned_map<K: aya::Pod, V: aya::Pod>(
    t: &Loaded,
    name: &str,
) -> aya::maps::HashMap<aya::maps::MapData, K, V> {
    let data = aya::maps::MapData::from_pin(t.root.join(name)).expect("pinned map");
    let map = if name == "SERVICES" || name == "BACKENDS" {
        aya::maps::Map::HashMap(data)
    } else {
        aya::maps::Map::LruHashMap(data)
    };
    aya::maps::HashMap::try_from(map).expect("hash map")
}

/// `CLOCK_MONOTONIC` in ns: what `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `ClientIP` affinity sends a client to its recorded backend while the record is younger than
/// the timeout, and re-balances once it is older (kube-proxy: timed from last use).
#[test]
fn affinity_holds_until_its_timeout_then_rebalances() {
    use ferrovia_common::{AffinityKey, AffinityValue, FAMILY_V4, SVC_FLAG_AFFINITY, ServiceValue};
    let mut t = load("affinity");
    let mut spec = frontend(
        VIP,
        8080,
        PROTO_TCP,
        &["10.244.1.5:9376", "10.244.1.6:9376"],
    );
    spec.flags = SVC_FLAG_AFFINITY;
    spec.affinity_timeout_s = 5;
    let mut specs = base_frontends();
    specs.push(spec.clone());
    let (_, errors) = t.dp.as_mut().unwrap().sync_frontends(&specs);
    assert!(errors.is_empty(), "{errors:?}");
    let services = pinned_map::<ServiceKey, ServiceValue>(&t, "SERVICES");
    let service = services.get(&spec.key, 0).unwrap();
    let slot2 = services
        .get(
            &ServiceKey {
                slot: 2,
                ..spec.key
            },
            0,
        )
        .unwrap()
        .backend_id;
    let mut affinity = pinned_map::<AffinityKey, AffinityValue>(&t, "AFFINITY");
    let key = AffinityKey {
        client: addr::encode(CLIENT.into()).0,
        service_id: service.service_id,
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    let chosen = |t: &Loaded, sport: u16| {
        let (_, out) = run(t, "from_pod", &tcp(CLIENT, sport, VIP, 8080, true, b""));
        parse(&out).dst
    };
    // A fresh record pointing at the backend of slot 2 (10.244.1.6): every new flow goes there.
    affinity
        .insert(
            key,
            AffinityValue {
                backend_id: slot2,
                _pad: 0,
                last_used_ns: monotonic_ns(),
            },
            0,
        )
        .unwrap();
    for sport in 20000..20040 {
        assert_eq!(
            chosen(&t, sport),
            [10, 244, 1, 6],
            "affine backend while the record is fresh"
        );
    }
    // The same record, last used 6 s ago (timeout 5 s): flows re-balance over both backends.
    affinity
        .insert(
            key,
            AffinityValue {
                backend_id: slot2,
                _pad: 0,
                last_used_ns: monotonic_ns() - 6_000_000_000,
            },
            0,
        )
        .unwrap();
    let first = chosen(&t, 30000);
    // The expired record was replaced by the new choice, which now sticks.
    for sport in 30001..30020 {
        assert_eq!(chosen(&t, sport), first, "the new choice is affine in turn");
    }
    let mut seen = std::collections::BTreeSet::new();
    for sport in 31000..31040 {
        affinity
            .insert(
                key,
                AffinityValue {
                    backend_id: slot2,
                    _pad: 0,
                    last_used_ns: 0,
                },
                0,
            )
            .unwrap();
        seen.insert(chosen(&t, sport));
    }
    assert_eq!(
        seen.len(),
        2,
        "expired records re-balance over every backend: {seen:?}"
    );
}

/// Every frontend in the maps as (key, backend addresses by slot, backend ids), checking the
/// layout's invariants on the way: slots 1..=count present and nothing past them, each slot's
/// backend present and owned by that frontend, no backend owned by nobody.
fn installed(t: &Loaded) -> BTreeMap<ServiceKey, (Vec<SocketAddr>, Vec<u32>)> {
    use ferrovia_common::{Backend, ServiceValue};
    let services = pinned_map::<ServiceKey, ServiceValue>(t, "SERVICES");
    let backends = pinned_map::<u32, Backend>(t, "BACKENDS");
    let keys: Vec<ServiceKey> = services.keys().map(Result::unwrap).collect();
    let mut out = BTreeMap::new();
    let mut owned = std::collections::BTreeSet::new();
    for key in keys.iter().filter(|k| k.slot == 0) {
        let svc = services.get(key, 0).unwrap();
        let (mut addrs, mut ids) = (Vec::new(), Vec::new());
        for slot in 1..=svc.count {
            let id = services
                .get(&ServiceKey { slot, ..*key }, 0)
                .expect("slot within count")
                .backend_id;
            let b = backends.get(&id, 0).expect("slot points at a backend");
            assert_eq!(
                b.service_id, svc.service_id,
                "backend owned by its frontend"
            );
            addrs.push(addr::decode_sock(b.addr, b.family, b.port));
            ids.push(id);
            owned.insert(id);
        }
        out.insert(*key, (addrs, ids));
    }
    for key in &keys {
        let base = ServiceKey { slot: 0, ..*key };
        assert!(
            out.get(&base)
                .is_some_and(|(a, _)| usize::from(key.slot) <= a.len()),
            "orphan slot {key:?}"
        );
    }
    for id in backends.keys().map(Result::unwrap) {
        assert!(owned.contains(&id), "orphan backend {id}");
    }
    out
}

#[test]
fn service_map_writes_keep_the_layout_and_a_reload_rewrites_nothing() {
    let mut t = load("writer");
    let key = frontend(VIP, 8080, PROTO_TCP, &[]).key;
    let step = |t: &mut Loaded, backends: &[&str]| {
        let mut specs = base_frontends();
        specs.push(frontend(VIP, 8080, PROTO_TCP, backends));
        let (report, errors) = t.dp.as_mut().unwrap().sync_frontends(&specs);
        assert!(errors.is_empty(), "{errors:?}");
        let now = installed(t);
        let want: Vec<SocketAddr> = backends.iter().map(|b| b.parse().unwrap()).collect();
        assert_eq!(now[&key].0, want, "backends of the frontend");
        (report, now[&key].1.clone())
    };
    let (_, ids) = step(
        &mut t,
        &["10.244.1.5:9376", "10.244.1.6:9376", "10.244.1.7:9376"],
    );
    // Scale: one leaves, one joins; the survivors keep their ids (conntrack and affinity name them).
    let (_, ids2) = step(
        &mut t,
        &["10.244.1.5:9376", "10.244.1.7:9376", "10.244.1.8:9376"],
    );
    assert_eq!(
        (ids2[0], ids2[1]),
        (ids[0], ids[2]),
        "surviving backends keep their ids"
    );
    assert!(!ids.contains(&ids2[2]), "a new backend gets a new id");
    step(&mut t, &["10.244.1.7:9376"]);
    step(&mut t, &[]);
    let (_, final_ids) = step(&mut t, &["10.244.1.5:9376", "10.244.1.9:9376"]);
    let before = installed(&t);

    // A restarted agent adopts the pinned maps: the same desired state rewrites nothing.
    t.dp = None;
    t.dp = Some(open(&t.root));
    assert_eq!(installed(&t), before, "maps survive the reload untouched");
    let (report, ids_after) = step(&mut t, &["10.244.1.5:9376", "10.244.1.9:9376"]);
    assert_eq!(
        (report.added, report.updated, report.removed),
        (0, 0, 0),
        "{report:?}"
    );
    assert_eq!(ids_after, final_ids);

    // Removing the frontend leaves nothing of it.
    let (_, errors) = t.dp.as_mut().unwrap().sync_frontends(&base_frontends());
    assert!(errors.is_empty());
    assert!(!installed(&t).contains_key(&key));
}

#[test]
fn a_full_map_is_reported_and_keeps_the_previous_state() {
    let mut t = load("full");
    // SERVICES holds 1,024 entries: 4 base frontends use 6; a frontend with 1,100 backends
    // does not fit, and must be refused whole, leaving the others as they were.
    let many: Vec<String> = (0..1100)
        .map(|i| format!("10.245.{}.{}:80", i / 250, i % 250 + 1))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let mut specs = base_frontends();
    specs.push(frontend(VIP, 9999, PROTO_TCP, &many));
    let before = installed(&t);
    let (_, errors) = t.dp.as_mut().unwrap().sync_frontends(&specs);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let message = errors[0].to_string();
    assert!(
        message.contains("10.96.0.10:9999/TCP") && message.contains("full"),
        "{message}"
    );
    assert_eq!(installed(&t), before, "nothing half-written");
}

/// When a backend leaves: an established TCP connection keeps it (a terminating pod finishes
/// its work), a new SYN on the same tuple is re-balanced, and a UDP flow moves at once to a
/// live backend instead of being sent into the void (stale UDP conntrack).
#[test]
fn flows_of_a_removed_backend() {
    let mut t = load("removed");
    run(&t, "from_pod", &tcp(CLIENT, 41000, VIP, 80, true, b""));
    run(&t, "from_pod", &udp(CLIENT, 5001, VIP, 53, b"q"));
    let mut specs = base_frontends();
    specs[0] = frontend(VIP, 80, PROTO_TCP, &["10.244.1.6:9376"]);
    specs[1] = frontend(VIP, 53, PROTO_UDP, &["10.244.1.6:5353"]);
    let (_, errors) = t.dp.as_mut().unwrap().sync_frontends(&specs);
    assert!(errors.is_empty(), "{errors:?}");

    let (_, out) = run(&t, "from_pod", &tcp(CLIENT, 41000, VIP, 80, false, b"more"));
    assert_eq!(
        parse(&out).dst,
        BACKEND,
        "established TCP stays on its backend"
    );
    let (_, out) = run(&t, "from_pod", &tcp(CLIENT, 41000, VIP, 80, true, b""));
    assert_eq!(
        parse(&out).dst,
        [10, 244, 1, 6],
        "a new SYN on the reused tuple is re-balanced"
    );
    let (_, out) = run(&t, "from_pod", &udp(CLIENT, 5001, VIP, 53, b"q"));
    assert_eq!(
        parse(&out).dst,
        [10, 244, 1, 6],
        "the UDP flow moves to a live backend"
    );
}

// ---- NetworkPolicy ------------------------------------------------------------------------

const TC_ACT_SHOT: i32 = 2;
/// An interface index packets "came in on" (lo): forwarded traffic, not the node's own.
const FORWARDED: u32 = 1;
const OTHER: [u8; 4] = [10, 244, 0, 9];
const EXCEPTED: [u8; 4] = [10, 244, 0, 66];

fn prefix(a: [u8; 4], len: u8) -> Prefix {
    Prefix::new(a.into(), len)
}

fn ports(ranges: &[(u8, u16, u16)]) -> PortSet {
    let mut set = PortSet::None;
    for &(proto, lo, hi) in ranges {
        set.add(proto, lo, hi);
    }
    set
}

fn allow(set: PortSet) -> PeerEntry {
    PeerEntry {
        ports: set,
        reason: 0,
    }
}

/// BACKEND isolated for ingress: CLIENT may use TCP 80–81 and UDP 53; 10.244.0.0/24 except
/// EXCEPTED may use TCP 9000; and, when `egress_isolated`, no egress rule at all.
fn backend_policy(egress_isolated: bool) -> PolicyDesired {
    let ingress: DirectionRules = [
        (
            prefix(CLIENT, 32),
            allow(ports(&[(6, 80, 81), (17, 53, 53), (6, 9000, 9000)])),
        ),
        (
            prefix([10, 244, 0, 0], 24),
            allow(ports(&[(6, 9000, 9000)])),
        ),
        (
            prefix(EXCEPTED, 32),
            PeerEntry {
                ports: PortSet::None,
                reason: verdict::DENY_EXCEPT,
            },
        ),
    ]
    .into_iter()
    .collect();
    let class = PolicyClass {
        ingress: Some(ingress),
        egress: egress_isolated.then(DirectionRules::new),
    };
    PolicyDesired {
        endpoints: [(BACKEND.into(), Arc::new(class))].into_iter().collect(),
        local: [BACKEND.into(), CLIENT.into()].into_iter().collect(),
        policies_in_force: 1,
    }
}

fn verdicts(t: &Loaded, pod: [u8; 4], dir: u8, reason: u8) -> u64 {
    let all = t.dp.as_ref().unwrap().policy_verdicts().unwrap();
    all.get(&(pod.into(), dir, reason)).map_or(0, |v| v.0)
}

fn sync_policy(t: &mut Loaded, desired: &PolicyDesired) {
    t.dp.as_mut()
        .unwrap()
        .sync_policy(desired)
        .expect("policy sync");
}

fn to_pod(t: &Loaded, packet: &[u8]) -> i32 {
    t.dp.as_ref()
        .unwrap()
        .test_run_from("to_pod", packet, FORWARDED)
        .expect("BPF_PROG_TEST_RUN")
        .0
}

/// Ingress rules by peer prefix and port, with the reason of every drop counted per pod;
/// the node itself is always let in.
#[test]
fn ingress_policy_allows_by_peer_and_port_and_counts_each_reason() {
    let mut t = load("pol-ingress");
    sync_policy(&mut t, &backend_policy(false));
    let cases: [(&str, Vec<u8>, i32, u8); 8] = [
        (
            "client TCP 80",
            tcp(CLIENT, 40000, BACKEND, 80, true, b""),
            TC_ACT_OK,
            verdict::ALLOW_RULE,
        ),
        (
            "client TCP 81 (range)",
            tcp(CLIENT, 40001, BACKEND, 81, true, b""),
            TC_ACT_OK,
            verdict::ALLOW_RULE,
        ),
        (
            "client UDP 53",
            udp(CLIENT, 40002, BACKEND, 53, b"q"),
            TC_ACT_OK,
            verdict::ALLOW_RULE,
        ),
        (
            "client TCP 82",
            tcp(CLIENT, 40003, BACKEND, 82, true, b""),
            TC_ACT_SHOT,
            verdict::DENY_PORT,
        ),
        (
            "client UDP 80",
            udp(CLIENT, 40004, BACKEND, 80, b"q"),
            TC_ACT_SHOT,
            verdict::DENY_PORT,
        ),
        (
            "block TCP 9000",
            tcp(OTHER, 40005, BACKEND, 9000, true, b""),
            TC_ACT_OK,
            verdict::ALLOW_RULE,
        ),
        (
            "except TCP 9000",
            tcp(EXCEPTED, 40006, BACKEND, 9000, true, b""),
            TC_ACT_SHOT,
            verdict::DENY_EXCEPT,
        ),
        (
            "outside TCP 80",
            tcp([192, 168, 1, 1], 40007, BACKEND, 80, true, b""),
            TC_ACT_SHOT,
            verdict::DENY_NO_RULE,
        ),
    ];
    for (what, packet, want, reason) in &cases {
        let before = verdicts(&t, BACKEND, POL_DIR_INGRESS, *reason);
        assert_eq!(to_pod(&t, packet), *want, "{what}");
        assert_eq!(
            verdicts(&t, BACKEND, POL_DIR_INGRESS, *reason),
            before + 1,
            "{what}: counted as {}",
            verdict::name(*reason)
        );
    }
    // Sent by the node itself (no ingress interface): allowed, whatever the rules.
    let (v, _) = run(
        &t,
        "to_pod",
        &tcp([192, 168, 1, 1], 40008, BACKEND, 22, true, b""),
    );
    assert_eq!(v, TC_ACT_OK, "from the node");
    assert_eq!(
        verdicts(&t, BACKEND, POL_DIR_INGRESS, verdict::ALLOW_HOST),
        1
    );
    assert_eq!(counter(&t, "drop_policy"), 4);
    // A pod that is not isolated is not judged.
    assert_eq!(
        to_pod(&t, &tcp(BACKEND, 40009, CLIENT, 1234, true, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        verdicts(&t, CLIENT, POL_DIR_INGRESS, verdict::ALLOW_NOT_ISOLATED),
        1
    );
}

/// Replies of an allowed flow pass the other direction of an isolated pod (egress isolated
/// with no rule: nothing else leaves); later packets are "established".
#[test]
fn replies_of_allowed_flows_pass_the_other_direction() {
    let mut t = load("pol-reply");
    sync_policy(&mut t, &backend_policy(true));
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40000, BACKEND, 80, true, b"")),
        TC_ACT_OK
    );
    let (v, _) = run(
        &t,
        "from_pod",
        &tcp(BACKEND, 80, CLIENT, 40000, false, b"hi"),
    );
    assert_eq!(v, TC_ACT_OK, "TCP reply");
    assert_eq!(
        verdicts(&t, BACKEND, POL_DIR_EGRESS, verdict::ALLOW_REPLY),
        1
    );
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40000, BACKEND, 80, false, b"more")),
        TC_ACT_OK
    );
    assert_eq!(
        verdicts(&t, BACKEND, POL_DIR_INGRESS, verdict::ALLOW_ESTABLISHED),
        1
    );
    assert_eq!(
        to_pod(&t, &udp(CLIENT, 40001, BACKEND, 53, b"q")),
        TC_ACT_OK
    );
    let (v, _) = run(&t, "from_pod", &udp(BACKEND, 53, CLIENT, 40001, b"a"));
    assert_eq!(v, TC_ACT_OK, "UDP reply");
    // Not a reply: a new connection from the pod, which no egress rule allows.
    let (v, _) = run(&t, "from_pod", &tcp(BACKEND, 80, CLIENT, 40099, true, b""));
    assert_eq!(v, TC_ACT_SHOT, "new egress flow");
    let (v, _) = run(&t, "from_pod", &udp(BACKEND, 53, OTHER, 40001, b"a"));
    assert_eq!(v, TC_ACT_SHOT, "UDP to another peer");
    assert_eq!(
        verdicts(&t, BACKEND, POL_DIR_EGRESS, verdict::DENY_NO_RULE),
        2
    );
}

/// After a policy change, an established flow is judged again on its next packet: one that
/// stays allowed goes on, one that became denied is cut (and so are its replies).
#[test]
fn a_policy_change_cuts_flows_it_denies_on_their_next_packet() {
    let mut t = load("pol-epoch");
    sync_policy(&mut t, &backend_policy(true));
    let to80 = |fin: bool| {
        tcp(
            CLIENT,
            40000,
            BACKEND,
            80,
            false,
            if fin { b"x" } else { b"" },
        )
    };
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40000, BACKEND, 80, true, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40010, BACKEND, 9000, true, b"")),
        TC_ACT_OK
    );
    // The node probes the pod (always let in; no rule names the node).
    let node = [192, 168, 1, 1];
    let (v, _) = run(&t, "to_pod", &tcp(node, 50000, BACKEND, 8080, true, b""));
    assert_eq!(v, TC_ACT_OK);
    // The client keeps 9000 but loses 80.
    let mut changed = backend_policy(true);
    let class = Arc::make_mut(changed.endpoints.get_mut(&BACKEND.into()).unwrap());
    class
        .ingress
        .as_mut()
        .unwrap()
        .insert(prefix(CLIENT, 32), allow(ports(&[(6, 9000, 9000)])));
    sync_policy(&mut t, &changed);
    assert_eq!(to_pod(&t, &to80(true)), TC_ACT_SHOT, "denied flow cut");
    let (v, _) = run(
        &t,
        "from_pod",
        &tcp(BACKEND, 80, CLIENT, 40000, false, b"late"),
    );
    assert_eq!(v, TC_ACT_SHOT, "and its replies");
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40010, BACKEND, 9000, false, b"x")),
        TC_ACT_OK,
        "still-allowed flow goes on"
    );
    let (v, _) = run(
        &t,
        "from_pod",
        &tcp(BACKEND, 9000, CLIENT, 40010, false, b"y"),
    );
    assert_eq!(v, TC_ACT_OK, "its replies too");
    let (v, _) = run(
        &t,
        "from_pod",
        &tcp(BACKEND, 8080, node, 50000, false, b"ok"),
    );
    assert_eq!(v, TC_ACT_OK, "replies to the node survive a policy change");
    // Back as it was: the same tuple is allowed again.
    sync_policy(&mut t, &backend_policy(true));
    assert_eq!(to_pod(&t, &to80(false)), TC_ACT_OK);
}

/// Traffic to a VIP is judged on the backend it is translated to, not on the VIP: the
/// client's egress rules name the backend.
#[test]
fn egress_to_a_vip_is_judged_against_the_backend() {
    let mut t = load("pol-vip");
    let egress = |peer: [u8; 4], port: u16| -> PolicyDesired {
        let rules: DirectionRules = [(prefix(peer, 32), allow(ports(&[(6, port, port)])))]
            .into_iter()
            .collect();
        PolicyDesired {
            endpoints: [(
                CLIENT.into(),
                Arc::new(PolicyClass {
                    ingress: None,
                    egress: Some(rules),
                }),
            )]
            .into_iter()
            .collect(),
            local: [CLIENT.into()].into_iter().collect(),
            policies_in_force: 1,
        }
    };
    sync_policy(&mut t, &egress(BACKEND, 9376));
    let (v, out) = run(&t, "from_pod", &tcp(CLIENT, 40000, VIP, 80, true, b""));
    assert_eq!(v, TC_ACT_OK, "backend allowed");
    assert_eq!(parse(&out).dst, BACKEND);
    sync_policy(&mut t, &egress(VIP, 80));
    let (v, _) = run(&t, "from_pod", &tcp(CLIENT, 40001, VIP, 80, true, b""));
    assert_eq!(v, TC_ACT_SHOT, "allowing the VIP itself allows nothing");
    assert_eq!(
        verdicts(&t, CLIENT, POL_DIR_EGRESS, verdict::DENY_NO_RULE),
        1
    );
}

/// The policy maps are adopted on restart: the same policy rewrites nothing, and the
/// verdicts of pods that left are forgotten.
#[test]
fn a_restart_adopts_the_policy_maps() {
    let mut t = load("pol-adopt");
    let desired = backend_policy(true);
    let first = t.dp.as_mut().unwrap().sync_policy(&desired).unwrap();
    assert!(
        first.classes_added == 1 && first.entries_written > 0,
        "{first:?}"
    );
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40000, BACKEND, 80, true, b"")),
        TC_ACT_OK
    );
    t.dp.take();
    t.dp = Some(open(&t.root));
    let again = t.dp.as_mut().unwrap().sync_policy(&desired).unwrap();
    assert!(
        !again.changed(),
        "a restart with the same policy rewrote: {again:?}"
    );
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40000, BACKEND, 80, false, b"x")),
        TC_ACT_OK
    );
    let mut gone = desired.clone();
    gone.local.remove(&BACKEND.into());
    gone.endpoints.clear();
    let report = t.dp.as_mut().unwrap().sync_policy(&gone).unwrap();
    assert_eq!(report.classes_removed, 1);
    assert_eq!(
        verdicts(&t, BACKEND, POL_DIR_INGRESS, verdict::ALLOW_RULE),
        0
    );
    assert_eq!(
        to_pod(&t, &tcp(OTHER, 40001, BACKEND, 22, true, b"")),
        TC_ACT_OK,
        "no longer isolated"
    );
}

/// An IPv4 packet of protocol `proto` with `l4` as its payload (no L4 checksum: the programs
/// do not check one), for protocols etherparse does not build (SCTP) and ICMP.
fn raw_ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = Vec::from(POD_MAC);
    p.extend_from_slice(&GW_MAC);
    p.extend_from_slice(&[0x08, 0x00]);
    let tot = (20 + l4.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let csum = !(sum16(&ip, 0) as u16);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(l4);
    p
}

/// SCTP is judged by its ports like TCP and UDP (the kernel here has no SCTP to send real
/// traffic with); protocols without ports (ICMP) only by rules without ports, and an echo
/// reply comes back as the reply of an allowed flow.
#[test]
fn sctp_by_port_and_icmp_only_by_rules_without_ports() {
    let mut t = load("pol-sctp-icmp");
    let sctp = |sport: u16, dport: u16| {
        let mut l4 = Vec::from(sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&[0; 8]); // verification tag, checksum
        raw_ipv4(CLIENT, BACKEND, 132, &l4)
    };
    let echo = |src, dst, ty: u8| raw_ipv4(src, dst, 1, &[ty, 0, 0, 0, 0, 1, 0, 1]);
    let policy = |client: PortSet| {
        let rules: DirectionRules = [(prefix(CLIENT, 32), allow(client))].into_iter().collect();
        PolicyDesired {
            endpoints: [(
                BACKEND.into(),
                Arc::new(PolicyClass {
                    ingress: Some(rules),
                    egress: Some(DirectionRules::new()),
                }),
            )]
            .into_iter()
            .collect(),
            local: [BACKEND.into()].into_iter().collect(),
            policies_in_force: 1,
        }
    };
    sync_policy(&mut t, &policy(ports(&[(132, 3868, 3868), (6, 80, 80)])));
    assert_eq!(to_pod(&t, &sctp(40000, 3868)), TC_ACT_OK, "SCTP on its port");
    assert_eq!(to_pod(&t, &sctp(40000, 3869)), TC_ACT_SHOT, "SCTP elsewhere");
    assert_eq!(to_pod(&t, &echo(CLIENT, BACKEND, 8)), TC_ACT_SHOT, "ping vs port rules");
    sync_policy(&mut t, &policy(PortSet::Any));
    assert_eq!(to_pod(&t, &echo(CLIENT, BACKEND, 8)), TC_ACT_OK, "ping, rule without ports");
    let (v, _) = run(&t, "from_pod", &echo(BACKEND, CLIENT, 0));
    assert_eq!(v, TC_ACT_OK, "echo reply");
    let (v, _) = run(&t, "from_pod", &echo(BACKEND, OTHER, 8));
    assert_eq!(v, TC_ACT_SHOT, "a ping of its own (egress isolated)");
}

/// A UDP flow allowed while its server was not isolated, whose server then becomes isolated
/// without a rule for the client: the client's next datagram (same ports) is dropped. The
/// server's earlier replies must not have been remembered as flows the server started, or
/// the datagram would pass as their "reply".
#[test]
fn a_udp_flow_from_before_isolation_is_judged_not_taken_for_a_reply() {
    let mut t = load("pol-udp-isolate");
    let query = udp(CLIENT, 40000, BACKEND, 53, b"q");
    assert_eq!(to_pod(&t, &query), TC_ACT_OK, "not isolated yet");
    let (v, _) = run(&t, "from_pod", &udp(BACKEND, 53, CLIENT, 40000, b"a"));
    assert_eq!(v, TC_ACT_OK, "its answer");
    let isolate = PolicyDesired {
        endpoints: [(
            BACKEND.into(),
            Arc::new(PolicyClass {
                ingress: Some(DirectionRules::new()),
                egress: None,
            }),
        )]
        .into_iter()
        .collect(),
        local: [BACKEND.into()].into_iter().collect(),
        policies_in_force: 1,
    };
    sync_policy(&mut t, &isolate);
    assert_eq!(to_pod(&t, &query), TC_ACT_SHOT, "isolated with no rule for the client");
}
