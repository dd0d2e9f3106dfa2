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
use ferrovia_common::{
    DirStats, POL_DIR_EGRESS, POL_DIR_INGRESS, PROTO_TCP, PROTO_UDP, PodStats, ServiceKey, verdict,
};

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

/// The map sizes program tests load with: small.
fn small_maps() -> MapSizes {
    MapSizes {
        conntrack: 1024,
        services: 1024,
        backends: 1024,
        ..MapSizes::default()
    }
}

/// Loads the data path on `root`, adopting whatever is pinned there.
fn open(root: &std::path::Path) -> Datapath {
    open_sized(root, small_maps())
}

fn open_sized(root: &std::path::Path, sizes: MapSizes) -> Datapath {
    Datapath::load(DatapathConfig {
        bpffs_root: root.to_path_buf(),
        socket_lb_cgroup: None,
        sizes,
        prefer_tcx: true,
        network_policy: true,
    })
    .expect("loading the data path (needs root and bpffs at /sys/fs/bpf)")
}

/// A data path of its own for `test`, with the base frontends.
fn load(test: &str) -> Loaded {
    let mut loaded = load_sized(test, small_maps());
    let dp = loaded.dp.as_mut().unwrap();
    let (_, errors) = dp.sync_frontends(&base_frontends());
    assert!(errors.is_empty(), "{errors:?}");
    loaded
}

/// A data path of its own for `test` with map `sizes`, and nothing written.
fn load_sized(test: &str, sizes: MapSizes) -> Loaded {
    let root = PathBuf::from(format!("/sys/fs/bpf/fv-prog-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    Loaded {
        dp: Some(open_sized(&root, sizes)),
        root,
    }
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
    let map = if ["SERVICES", "BACKENDS", "NETNS_PROBE"].contains(&name) {
        aya::maps::Map::HashMap(data)
    } else {
        aya::maps::Map::LruHashMap(data)
    };
    aya::maps::HashMap::try_from(map).expect("hash map")
}

/// `CLOCK_MONOTONIC` in ns: what `bpf_ktime_get_ns` reads (the agent's GC reads it so too).
use ferrovia_agent::datapath::conntrack::monotonic_ns;

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
    spec.affinity_timeout_s = 60;
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
    // The same record, last used 61 s ago (timeout 60 s): flows re-balance over both backends.
    affinity
        .insert(
            key,
            AffinityValue {
                backend_id: slot2,
                _pad: 0,
                last_used_ns: monotonic_ns().wrapping_sub(61_000_000_000),
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
                    // Expired whatever the machine's uptime (ages are signed differences).
                    last_used_ns: monotonic_ns().wrapping_sub(61_000_000_000),
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

/// `pod`, the only local pod, with a class of these rules (`None`: not isolated that way).
fn isolate(
    pod: [u8; 4],
    ingress: Option<DirectionRules>,
    egress: Option<DirectionRules>,
) -> PolicyDesired {
    PolicyDesired {
        endpoints: [(pod.into(), Arc::new(PolicyClass { ingress, egress }))]
            .into_iter()
            .collect(),
        local: [pod.into()].into_iter().collect(),
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
        isolate(CLIENT, None, Some(rules))
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
        isolate(BACKEND, Some(rules), Some(DirectionRules::new()))
    };
    sync_policy(&mut t, &policy(ports(&[(132, 3868, 3868), (6, 80, 80)])));
    assert_eq!(
        to_pod(&t, &sctp(40000, 3868)),
        TC_ACT_OK,
        "SCTP on its port"
    );
    assert_eq!(
        to_pod(&t, &sctp(40000, 3869)),
        TC_ACT_SHOT,
        "SCTP elsewhere"
    );
    assert_eq!(
        to_pod(&t, &echo(CLIENT, BACKEND, 8)),
        TC_ACT_SHOT,
        "ping vs port rules"
    );
    sync_policy(&mut t, &policy(PortSet::Any));
    assert_eq!(
        to_pod(&t, &echo(CLIENT, BACKEND, 8)),
        TC_ACT_OK,
        "ping, rule without ports"
    );
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
    let isolate = isolate(BACKEND, Some(DirectionRules::new()), None);
    sync_policy(&mut t, &isolate);
    assert_eq!(
        to_pod(&t, &query),
        TC_ACT_SHOT,
        "isolated with no rule for the client"
    );
}

// ---- Review: NetworkPolicy edge cases -------------------------------------------------------

/// Only `pod` isolated for ingress, with no rule at all ("default deny ingress"), egress free.
fn deny_ingress(pod: [u8; 4]) -> PolicyDesired {
    PolicyDesired {
        endpoints: [(
            pod.into(),
            Arc::new(PolicyClass {
                ingress: Some(DirectionRules::new()),
                egress: None,
            }),
        )]
        .into_iter()
        .collect(),
        local: [BACKEND.into(), CLIENT.into()].into_iter().collect(),
        policies_in_force: 1,
    }
}

/// A client with "default deny ingress" calls a VIP whose backend runs on the same node (the
/// per-packet path: connected UDP, e.g. glibc's resolver to a node-local `CoreDNS`). The
/// answer is the reply of a flow the client's egress allowed and must pass; policy must not
/// judge the VIP as a new peer. So the backend's `from_pod` leaves the answer as it is (it
/// has the IN conntrack entry too, but only translates hairpins), and the client's `to_pod`
/// judges it as it came, from the backend, then reverse-NATs it to VIP:53 — as it does for a
/// remote backend.
#[test]
fn reply_of_a_local_backend_through_a_vip_reaches_an_ingress_isolated_client() {
    let mut t = load("rv-local-backend");
    sync_policy(&mut t, &deny_ingress(CLIENT));
    // UDP (connected sockets are always on the per-packet path).
    let (v, out) = run(&t, "from_pod", &udp(CLIENT, 5000, VIP, 53, b"q"));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(parse(&out).dst, BACKEND);
    assert_eq!(
        to_pod(&t, &out),
        TC_ACT_OK,
        "query into the (local) backend"
    );
    let (v, answer) = run(&t, "from_pod", &udp(BACKEND, 5353, CLIENT, 5000, b"a"));
    assert_eq!(v, TC_ACT_OK, "the backend answers");
    let p = parse(&answer);
    assert_eq!(
        (p.src, p.sport),
        (BACKEND, 5353),
        "not translated at the backend"
    );
    let (v, delivered) =
        t.dp.as_ref()
            .unwrap()
            .test_run_from("to_pod", &answer, FORWARDED)
            .unwrap();
    assert_eq!(
        v, TC_ACT_OK,
        "the answer is the reply of the client's allowed query"
    );
    let p = parse(&delivered);
    assert_eq!((p.src, p.sport), (VIP, 53), "reverse-NATed at the client");
    // TCP, when the socket-level path is off.
    let (_, syn) = run(&t, "from_pod", &tcp(CLIENT, 40000, VIP, 80, true, b""));
    assert_eq!(to_pod(&t, &syn), TC_ACT_OK);
    let (v, synack) = run(
        &t,
        "from_pod",
        &tcp(BACKEND, 9376, CLIENT, 40000, false, b""),
    );
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(
        to_pod(&t, &synack),
        TC_ACT_OK,
        "TCP reply of a local backend"
    );
    assert_eq!(
        verdicts(&t, CLIENT, POL_DIR_INGRESS, verdict::DENY_NO_RULE),
        0,
        "no reply counted as denied-by-default"
    );
}

/// A pod that is not isolated leaves while the agent is down. After the restart the first
/// sync must forget its verdict counters (they would be exported for a pod that no longer
/// exists, until some other pod comes or goes). `adopt` takes the isolated endpoints as the
/// set of local pods, so when every remaining pod is isolated nothing looks changed.
#[test]
fn verdicts_of_a_pod_that_left_while_the_agent_was_down_are_forgotten() {
    let mut t = load("rv-verdicts-restart");
    sync_policy(&mut t, &backend_policy(false));
    assert_eq!(
        to_pod(&t, &tcp(BACKEND, 40000, CLIENT, 1234, true, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        verdicts(&t, CLIENT, POL_DIR_INGRESS, verdict::ALLOW_NOT_ISOLATED),
        1
    );
    t.dp.take();
    t.dp = Some(open(&t.root));
    let mut after = backend_policy(false);
    after.local.remove(&CLIENT.into());
    sync_policy(&mut t, &after);
    assert_eq!(
        verdicts(&t, CLIENT, POL_DIR_INGRESS, verdict::ALLOW_NOT_ISOLATED),
        0,
        "counters of a pod that is gone"
    );
}

/// Opens the pinned `POLICY_PORTS` trie of a loaded data path (as an interrupted sync or
/// another writer would have left it).
fn ports_trie(
    t: &Loaded,
) -> aya::maps::lpm_trie::LpmTrie<aya::maps::MapData, ferrovia_common::PolicyPortKey, u32> {
    let data = aya::maps::MapData::from_pin(t.root.join("POLICY_PORTS")).expect("pinned map");
    aya::maps::lpm_trie::LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).expect("trie")
}

/// A port set of `n` single, non-adjacent TCP ports from `first`: `n` trie entries.
fn single_ports(first: u16, n: u16) -> PortSet {
    ports(
        &(0..n)
            .map(|i| (6, first + 2 * i, first + 2 * i))
            .collect::<Vec<_>>(),
    )
}

/// A sync whose second new port set fails to write (the trie is full for a reason the
/// writer's count does not know) rolls back its accounting with its entries: the same sync,
/// retried once there is room, succeeds. (Found in review: the count kept the rolled-back
/// entries, and every later sync was refused as "map full" on an empty map.)
#[test]
fn a_failed_port_set_write_leaves_the_capacity_count_as_it_was() {
    use ferrovia_common::PolicyPortKey;
    let mut t = load_sized(
        "rv-ports-full",
        MapSizes {
            policy_ports: 64,
            ..small_maps()
        },
    );
    // 10 foreign entries the writer does not count.
    let mut trie = ports_trie(&t);
    let junk = |i: u16| {
        aya::maps::lpm_trie::Key::new(
            64,
            PolicyPortKey {
                portset_id: 99_999,
                proto: 6,
                _pad: 0,
                port: i.to_be(),
            },
        )
    };
    for i in 0..10 {
        trie.insert(&junk(i), 1, 0).unwrap();
    }
    let rules: DirectionRules = [
        (prefix(CLIENT, 32), allow(single_ports(1001, 30))),
        (prefix(OTHER, 32), allow(single_ports(3001, 30))),
    ]
    .into_iter()
    .collect();
    let desired = isolate(BACKEND, Some(rules), None);
    // 60 entries needed, 0 counted, capacity 64: the check passes, the second set fails.
    let first = t.dp.as_mut().unwrap().sync_policy(&desired);
    assert!(first.is_err(), "the trie is really full: {first:?}");
    assert_eq!(
        ports_trie(&t).keys().count(),
        10,
        "the failed sync left nothing of its own"
    );
    for i in 0..10 {
        trie.remove(&junk(i)).unwrap();
    }
    let again = t.dp.as_mut().unwrap().sync_policy(&desired);
    assert!(again.is_ok(), "60 of 64 entries on an empty map: {again:?}");
}

/// An interrupted sync left a port set nobody references (an orphan, id 500) whose content a
/// class then needs again. Deleting the orphan (by id) must not make the writer forget the
/// live copy, whose entries would otherwise stay in `POLICY_PORTS` for good once the class
/// goes. (Found in review.)
#[test]
fn an_orphan_port_set_equal_to_a_live_one_does_not_leak_the_live_one() {
    use ferrovia_common::{PORT_KEY_FIXED_BITS, PolicyPortKey};
    let mut t = load("rv-orphan-set");
    let set = ports(&[(6, 80, 81)]);
    let mut trie = ports_trie(&t);
    for (bits, proto, port) in ferrovia_agent::datapath::policy::port_prefixes(&set) {
        assert!(bits > PORT_KEY_FIXED_BITS);
        let key = PolicyPortKey {
            portset_id: 500,
            proto,
            _pad: 0,
            port: port.to_be(),
        };
        trie.insert(&aya::maps::lpm_trie::Key::new(bits, key), 1, 0)
            .unwrap();
    }
    t.dp.take();
    t.dp = Some(open(&t.root));
    let rules: DirectionRules = [(prefix(CLIENT, 32), allow(set))].into_iter().collect();
    let desired = isolate(BACKEND, Some(rules), None);
    sync_policy(&mut t, &desired);
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40000, BACKEND, 80, true, b"")),
        TC_ACT_OK
    );
    sync_policy(&mut t, &PolicyDesired::default());
    let left: Vec<_> = ports_trie(&t).keys().map(Result::unwrap).collect();
    assert!(
        left.is_empty(),
        "no policy left, yet POLICY_PORTS holds {} entries",
        left.len()
    );
}

/// A sync that fails half-way through switching endpoints (a map write refused although the
/// capacity check passed) has pointed some pods at their new class: the epoch is bumped all
/// the same, so a packet of an established flow and a new flow with the same peer and port
/// get the same verdict. (Found in review: the error returned before the bump.)
#[test]
fn a_sync_failing_after_switching_some_endpoints_still_rejudges_their_flows() {
    use ferrovia_common::{EndpointKey, EndpointPolicy, FAMILY_V4};
    let mut t = load_sized(
        "rv-switch-fail",
        MapSizes {
            policy_endpoints: 4,
            ..small_maps()
        },
    );
    sync_policy(&mut t, &backend_policy(false));
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40000, BACKEND, 80, true, b"")),
        TC_ACT_OK,
        "allowed under the first policy"
    );
    // Three foreign entries fill POLICY_PODS (4) behind the writer's back.
    let data = aya::maps::MapData::from_pin(t.root.join("POLICY_PODS")).unwrap();
    let mut endpoints: aya::maps::HashMap<_, EndpointKey, EndpointPolicy> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
    for i in 1..=3u8 {
        let key = EndpointKey {
            addr: [u32::from_ne_bytes([192, 168, 7, i]), 0, 0, 0],
            family: FAMILY_V4,
            _pad: [0; 3],
        };
        endpoints.insert(key, EndpointPolicy::default(), 0).unwrap();
    }
    // BACKEND loses port 80 for CLIENT; a new isolated pod, after BACKEND in address order,
    // does not fit.
    let mut changed = backend_policy(false);
    let class = Arc::make_mut(changed.endpoints.get_mut(&BACKEND.into()).unwrap());
    class
        .ingress
        .as_mut()
        .unwrap()
        .insert(prefix(CLIENT, 32), allow(ports(&[(6, 9000, 9000)])));
    let class = Arc::clone(&changed.endpoints[&BACKEND.into()]);
    changed.endpoints.insert([10, 244, 2, 1].into(), class);
    let result = t.dp.as_mut().unwrap().sync_policy(&changed);
    assert!(
        result.is_err(),
        "the new endpoint cannot be written: {result:?}"
    );
    let new_flow = to_pod(&t, &tcp(CLIENT, 40001, BACKEND, 80, true, b""));
    let established = to_pod(&t, &tcp(CLIENT, 40000, BACKEND, 80, false, b"x"));
    assert_eq!(
        established, new_flow,
        "established flow and new flow to the same port judged alike (new flow: {new_flow})"
    );
}

/// `packet` with the IP flags / fragment offset word set to `frag` (IP checksum left stale:
/// the programs do not check it).
fn fragment(mut packet: Vec<u8>, frag: u16) -> Vec<u8> {
    packet[20..22].copy_from_slice(&frag.to_be_bytes());
    packet
}

/// A large UDP answer (DNS over UDP with EDNS, …) comes back fragmented to a client whose
/// ingress is "default deny": it is the reply of a flow the client's egress allowed and
/// passes like its unfragmented replies. The first fragment is judged by its ports; the later
/// ones (no ports) follow it by (source, destination, IP id, protocol).
#[test]
fn fragments_of_an_allowed_flows_reply_pass() {
    let mut t = load("rv-frag-reply");
    sync_policy(&mut t, &deny_ingress(CLIENT));
    let (v, _) = run(&t, "from_pod", &udp(CLIENT, 5000, OTHER, 53, b"q"));
    assert_eq!(v, TC_ACT_OK, "query (egress not isolated)");
    let answer = udp(OTHER, 53, CLIENT, 5000, &[0u8; 64]);
    assert_eq!(to_pod(&t, &answer), TC_ACT_OK, "an unfragmented answer");
    assert_eq!(
        to_pod(&t, &fragment(answer.clone(), 0x2000)),
        TC_ACT_OK,
        "first fragment (more-fragments, offset 0: it has the UDP header)"
    );
    assert_eq!(
        to_pod(&t, &fragment(answer, 0x0009)),
        TC_ACT_OK,
        "last fragment (offset 72 bytes)"
    );
}

/// CLIENT: ingress "default deny", egress allowed to OTHER on UDP 53 only when `allowed`.
fn client_egress_to_other(allowed: bool) -> PolicyDesired {
    let mut rules = DirectionRules::new();
    if allowed {
        rules.insert(prefix(OTHER, 32), allow(ports(&[(17, 53, 53)])));
    }
    isolate(CLIENT, Some(DirectionRules::new()), Some(rules))
}

/// A policy change that denies a flow, then one that allows it again (a label flapping, a
/// policy edited and reverted). A reply arriving in between is dropped, but the flow's entry
/// stays (it expires on its own), so once the flow is allowed again its replies pass at once
/// — a server-push stream does not stall until the client sends.
#[test]
fn replies_resume_when_a_flow_is_allowed_again() {
    let mut t = load("rv-flap");
    sync_policy(&mut t, &client_egress_to_other(true));
    let query = udp(CLIENT, 5000, OTHER, 53, b"q");
    let answer = udp(OTHER, 53, CLIENT, 5000, b"a");
    assert_eq!(run(&t, "from_pod", &query).0, TC_ACT_OK);
    assert_eq!(to_pod(&t, &answer), TC_ACT_OK, "reply");
    sync_policy(&mut t, &client_egress_to_other(false));
    assert_eq!(to_pod(&t, &answer), TC_ACT_SHOT, "flow denied: cut");
    sync_policy(&mut t, &client_egress_to_other(true));
    assert_eq!(
        to_pod(&t, &answer),
        TC_ACT_OK,
        "allowed again: its replies go on, as they would had none come in between"
    );
}

/// A pod isolated for ingress only ("default deny ingress") keeps a TCP connection it opened.
/// When the connection's entry leaves `POLICY_CT` (LRU eviction, or a connection older than
/// enforcement), the client's next packet remembers it again at its (not isolated) egress,
/// since its ingress is isolated, so the server's packets pass as replies again.
#[test]
fn a_connection_whose_entry_was_evicted_recovers_on_the_clients_next_packet() {
    use ferrovia_common::{CtKey, PolicyCtValue};
    let mut t = load("rv-evicted");
    sync_policy(&mut t, &deny_ingress(CLIENT));
    assert_eq!(
        run(&t, "from_pod", &tcp(CLIENT, 40000, OTHER, 80, true, b"")).0,
        TC_ACT_OK
    );
    assert_eq!(
        to_pod(&t, &tcp(OTHER, 80, CLIENT, 40000, false, b"")),
        TC_ACT_OK,
        "SYN-ACK: reply"
    );
    // Evicted (or never seen).
    let mut ct = pinned_map::<CtKey, PolicyCtValue>(&t, "POLICY_CT");
    let keys: Vec<CtKey> = ct.keys().map(Result::unwrap).collect();
    assert!(!keys.is_empty());
    for key in keys {
        ct.remove(&key).unwrap();
    }
    assert_eq!(
        run(
            &t,
            "from_pod",
            &tcp(CLIENT, 40000, OTHER, 80, false, b"GET /")
        )
        .0,
        TC_ACT_OK,
        "the client goes on"
    );
    assert_eq!(
        to_pod(&t, &tcp(OTHER, 80, CLIENT, 40000, false, b"200 OK")),
        TC_ACT_OK,
        "the server's answer to the client's own request"
    );
}

/// A connection a policy change cut stays cut when the server's side speaks next (its
/// retransmission, an ACK): the server's packet, whose connection the ingress point judged
/// and denied, is not remembered as a flow the server opened, whose "replies" the client's
/// packets would then be. (Seen in the kernel matrix: the denied entry was removed, the
/// server's retransmitted answer remembered at its egress, and the connection went on.)
#[test]
fn a_cut_connection_is_not_revived_by_the_servers_next_packet() {
    let mut t = load("pol-revive");
    // Enforcement on; BACKEND not isolated.
    sync_policy(&mut t, &deny_ingress(CLIENT));
    let request =
        |t: &Loaded, syn, data: &[u8]| to_pod(t, &tcp(OTHER, 40000, BACKEND, 80, syn, data));
    let answer = |t: &Loaded, data: &[u8]| {
        run(t, "from_pod", &tcp(BACKEND, 80, OTHER, 40000, false, data)).0
    };
    assert_eq!(request(&t, true, b""), TC_ACT_OK, "SYN");
    assert_eq!(answer(&t, b""), TC_ACT_OK, "SYN-ACK");
    assert_eq!(request(&t, false, b"GET"), TC_ACT_OK);
    assert_eq!(answer(&t, b"200 OK"), TC_ACT_OK);
    // BACKEND becomes isolated for ingress with nothing allowed.
    sync_policy(&mut t, &deny_ingress(BACKEND));
    assert_eq!(
        request(&t, false, b"GET"),
        TC_ACT_SHOT,
        "cut on its next packet"
    );
    assert_eq!(
        answer(&t, b"200 OK"),
        TC_ACT_OK,
        "the server retransmits (its egress is not isolated)"
    );
    for _ in 0..2 {
        assert_eq!(
            request(&t, false, b"GET"),
            TC_ACT_SHOT,
            "still cut: the server's packet did not open a flow of its own"
        );
    }
}

/// CLIENT: ingress "default deny", egress allowed to OTHER on TCP 80.
fn client_egress_to_other_tcp80() -> PolicyDesired {
    let rules: DirectionRules = [(prefix(OTHER, 32), allow(ports(&[(6, 80, 80)])))]
        .into_iter()
        .collect();
    isolate(CLIENT, Some(DirectionRules::new()), Some(rules))
}

/// A TCP connection closes (FIN: its entry lives `CT_TIMEOUT_CLOSING_NS` idle), and the client
/// opens a new one on the same tuple at once (the server closed first, so the client has no
/// `TIME_WAIT`). The new SYN starts the entry afresh (closing flag cleared, in both
/// conntracks), so the new connection may idle like any other without its replies being
/// dropped later.
#[test]
fn a_new_connection_on_a_closing_tuple_is_not_forgotten_after_ten_seconds() {
    use ferrovia_common::{CtKey, PolicyCtValue};
    let mut t = load("rv-reuse-closing");
    sync_policy(&mut t, &client_egress_to_other_tcp80());
    let out = |syn, data: &[u8]| run(&t, "from_pod", &tcp(CLIENT, 40000, OTHER, 80, syn, data)).0;
    let back = |data: &[u8]| to_pod(&t, &tcp(OTHER, 80, CLIENT, 40000, false, data));
    assert_eq!(out(true, b""), TC_ACT_OK);
    assert_eq!(back(b""), TC_ACT_OK);
    let mut fin = tcp(CLIENT, 40000, OTHER, 80, false, b"");
    fin[14 + 20 + 13] = 0x11; // FIN|ACK
    assert_eq!(
        run(&t, "from_pod", &fin).0,
        TC_ACT_OK,
        "the first connection ends"
    );
    assert_eq!(out(true, b""), TC_ACT_OK, "a new connection, same tuple");
    assert_eq!(back(b""), TC_ACT_OK, "its SYN-ACK");
    assert_eq!(out(false, b"GET /"), TC_ACT_OK);
    assert_eq!(back(b"200 OK"), TC_ACT_OK);
    // Idle for 11 s: every entry last seen 11 s ago.
    let mut ct = pinned_map::<CtKey, PolicyCtValue>(&t, "POLICY_CT");
    let keys: Vec<CtKey> = ct.keys().map(Result::unwrap).collect();
    for key in keys {
        let mut value = ct.get(&key, 0).unwrap();
        value.last_seen_ns = monotonic_ns().wrapping_sub(11_000_000_000);
        ct.insert(key, value, 0).unwrap();
    }
    assert_eq!(
        back(b"server push"),
        TC_ACT_OK,
        "an open connection idle for 11 s is still open"
    );
}

/// Writes port set `id` with the entries of `set` straight into `POLICY_PORTS`, as a run of
/// the agent that stopped half-way through a sync would have left it.
fn write_port_set(t: &Loaded, id: u32, set: &PortSet) {
    let mut trie = ports_trie(t);
    for (bits, proto, port) in ferrovia_agent::datapath::policy::port_prefixes(set) {
        let key = ferrovia_common::PolicyPortKey {
            portset_id: id,
            proto,
            _pad: 0,
            port: port.to_be(),
        };
        trie.insert(&aya::maps::lpm_trie::Key::new(bits, key), 1, 0)
            .unwrap();
    }
}

/// Two copies of one port set are pinned after interrupted syncs: an orphan with a low id and
/// the live copy, with a higher id, that a class's peer entries point at. On restart `adopt`
/// keeps the port sets the adopted classes point at, by id (not the first id met for a
/// content), so the class's traffic keeps its ports.
#[test]
fn adopt_keeps_the_port_set_the_classes_point_at() {
    let mut t = load("rv-adopt-dup-set");
    let with = |set: PortSet| {
        let rules: DirectionRules = [(prefix(CLIENT, 32), allow(set))].into_iter().collect();
        isolate(BACKEND, Some(rules), None)
    };
    let s = ports(&[(6, 80, 80)]);
    // Ids 1 (port set) and 2 (class) are used, then freed: the live copy of `s` gets id 3.
    sync_policy(&mut t, &with(ports(&[(6, 22, 22)])));
    sync_policy(&mut t, &with(s.clone()));
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40000, BACKEND, 80, true, b"")),
        TC_ACT_OK
    );
    write_port_set(&t, 1, &s);
    t.dp.take();
    t.dp = Some(open(&t.root));
    sync_policy(&mut t, &with(s));
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40001, BACKEND, 80, true, b"")),
        TC_ACT_OK,
        "the class's port set survives the restart"
    );
}

/// `default/web` (app=web, local at BACKEND), isolated for ingress by a policy allowing
/// pods labelled app=agent; plus `extra` pods (name, labels, hostNetwork, podIP).
fn web_allowing_agents(
    extra: &[(&str, &str, bool, &str)],
) -> (
    ferrovia_agent::model::ClusterState,
    ferrovia_agent::model::PodIps,
) {
    use ferrovia_agent::model::{ClusterState, ObjRef};
    use serde_json::json;
    let mut st = ClusterState::default();
    let pod = |name: &str, app: &str, host: bool, ip: &str| -> k8s_openapi::api::core::v1::Pod {
        let mut v = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"hostNetwork": host, "containers": [{"name": "c", "image": "i"}]},
        });
        if !ip.is_empty() {
            v["status"] = json!({"podIP": ip, "phase": "Running"});
        }
        serde_json::from_value(v).unwrap()
    };
    st.pods.insert(
        ObjRef::new("default", "web"),
        Arc::new(pod("web", "web", false, "")),
    );
    for &(name, app, host, ip) in extra {
        st.pods.insert(
            ObjRef::new("default", name),
            Arc::new(pod(name, app, host, ip)),
        );
    }
    let policy: k8s_openapi::api::networking::v1::NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-agents", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "agent"}}}]}],
        },
    }))
    .unwrap();
    st.network_policies
        .insert(ObjRef::new("default", "allow-agents"), Arc::new(policy));
    let local = [(
        ObjRef::new("default", "web"),
        vec![std::net::IpAddr::from(BACKEND)],
    )]
    .into_iter()
    .collect();
    (st, local)
}

/// Upstream leaves `NetworkPolicy` and `hostNetwork` pods to two choices: tell their traffic
/// apart (ferrovia cannot), or ignore `hostNetwork` pods when matching `podSelector` /
/// `namespaceSelector`, their traffic being the node's. The compiler ignores them: a
/// `hostNetwork` pod's podIP (its node's address) is never a pod peer, and the verdict does
/// not depend on which of two such pods on one node the index met last.
#[test]
fn host_network_pods_are_not_pod_peers() {
    let node: [u8; 4] = [192, 168, 1, 10];
    let judge = |extra: &[(&str, &str, bool, &str)]| {
        let (st, local) = web_allowing_agents(extra);
        let desired = ferrovia_agent::model::policy::compile(&st, &local);
        let mut t = load("rv-hostnet");
        sync_policy(&mut t, &desired);
        to_pod(&t, &tcp(node, 40000, BACKEND, 80, true, b""))
    };
    let alone = judge(&[("agent-a", "agent", true, "192.168.1.10")]);
    let with_other = judge(&[
        ("agent-a", "agent", true, "192.168.1.10"),
        ("zz-other", "other", true, "192.168.1.10"),
    ]);
    assert_eq!(
        (alone, with_other),
        (TC_ACT_SHOT, TC_ACT_SHOT),
        "the node's address is not allowed by selecting a hostNetwork pod"
    );
}

/// Port ranges are written as aligned LPM
/// blocks over the network-order port: every edge of a range is in, every neighbour out,
/// and a port is not mistaken for its byte-swapped value (1 vs 256).
#[test]
fn port_ranges_by_trie_blocks_have_exact_edges() {
    let mut t = load("rv-port-edges");
    let set = ports(&[
        (6, 1, 1),
        (6, 1000, 2047),
        (6, 65535, 65535),
        (17, 32768, 65534),
    ]);
    let rules: DirectionRules = [(prefix(CLIENT, 32), allow(set.clone()))]
        .into_iter()
        .collect();
    sync_policy(&mut t, &isolate(BACKEND, Some(rules), None));
    let probes: &[(u8, u16)] = &[
        (6, 0),
        (6, 1),
        (6, 2),
        (6, 256),
        (6, 999),
        (6, 1000),
        (6, 1007),
        (6, 1008),
        (6, 1023),
        (6, 1024),
        (6, 2047),
        (6, 2048),
        (6, 59395), // 2047 byte-swapped
        (6, 65534),
        (6, 65535),
        (17, 1),
        (17, 32767),
        (17, 32768),
        (17, 65534),
        (17, 65535),
    ];
    for (i, &(proto, port)) in probes.iter().enumerate() {
        let sport = 30000 + i as u16;
        let packet = if proto == 6 {
            tcp(CLIENT, sport, BACKEND, port, true, b"")
        } else {
            udp(CLIENT, sport, BACKEND, port, b"x")
        };
        let want = if set.allows(proto, port) {
            TC_ACT_OK
        } else {
            TC_ACT_SHOT
        };
        assert_eq!(to_pod(&t, &packet), want, "proto {proto} port {port}");
    }
}

/// An interrupted sync left an orphan class (peer entries of a class no endpoint uses) in a
/// `POLICY_PEERS` that is nearly full. Orphans are removed before a sync installs anything,
/// so they do not count against the new class. (Found in review: they were removed only
/// after a successful install, and the policy was stuck.)
#[test]
fn an_orphan_class_does_not_wedge_later_syncs() {
    use ferrovia_common::{
        PEER_KEY_FIXED_BITS, POL_DIR_INGRESS as IN, PolicyPeerKey, PolicyPeerValue,
    };
    let sizes = MapSizes {
        policy_peers: 8,
        ..small_maps()
    };
    let mut t = load_sized("rv-orphan-wedge", sizes.clone());
    {
        let data = aya::maps::MapData::from_pin(t.root.join("POLICY_PEERS")).unwrap();
        let mut peers: aya::maps::lpm_trie::LpmTrie<_, PolicyPeerKey, PolicyPeerValue> =
            aya::maps::lpm_trie::LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).unwrap();
        for i in 1..=6u8 {
            let key = PolicyPeerKey {
                class_id: 100,
                dir: IN,
                family: ferrovia_common::FAMILY_V4,
                _pad: 0,
                addr: [u32::from_ne_bytes([10, 9, 0, i]), 0, 0, 0],
            };
            let value = PolicyPeerValue {
                portset_id: 0,
                reason: u32::from(verdict::DENY_NO_RULE),
            };
            peers
                .insert(
                    &aya::maps::lpm_trie::Key::new(PEER_KEY_FIXED_BITS + 32, key),
                    value,
                    0,
                )
                .unwrap();
        }
    }
    t.dp.take();
    t.dp = Some(open_sized(&t.root, sizes));
    // 3 live entries (backend_policy: CLIENT, the /24, EXCEPTED) into a map of 8 that holds
    // 6 orphan entries: they fit once the orphans are gone.
    let desired = backend_policy(true);
    let first = t.dp.as_mut().unwrap().sync_policy(&desired);
    let second = t.dp.as_mut().unwrap().sync_policy(&desired);
    assert!(
        first.is_ok() || second.is_ok(),
        "3 live entries in a map of 8, yet: {first:?} then {second:?}"
    );
}

/// CLIENT: ingress allows everything from OTHER; egress allows OTHER on UDP 53 only when
/// `egress_allowed`.
fn client_open_to_other(egress_allowed: bool) -> PolicyDesired {
    let ingress: DirectionRules = [(prefix(OTHER, 32), allow(PortSet::Any))]
        .into_iter()
        .collect();
    let mut egress = DirectionRules::new();
    if egress_allowed {
        egress.insert(prefix(OTHER, 32), allow(ports(&[(17, 53, 53)])));
    }
    isolate(CLIENT, Some(ingress), Some(egress))
}

/// A packet the pod's own ingress rules allow passes, whatever became of the flow it happens
/// to answer. CLIENT's ingress allows everything from OTHER; its query to OTHER was allowed
/// at its egress, which no longer allows it after a change. OTHER's next datagram matches
/// the stale egress entry as a "reply": judged again there and denied, it is then judged as
/// what it also is, a flow into CLIENT, and its ingress rules allow it.
#[test]
fn a_stale_reply_entry_does_not_override_the_pods_own_rules() {
    let mut t = load("rv-stale-reply");
    sync_policy(&mut t, &client_open_to_other(true));
    assert_eq!(
        run(&t, "from_pod", &udp(CLIENT, 5000, OTHER, 53, b"q")).0,
        TC_ACT_OK
    );
    sync_policy(&mut t, &client_open_to_other(false));
    let from_other = udp(OTHER, 53, CLIENT, 5000, b"a");
    assert_eq!(
        to_pod(&t, &from_other),
        TC_ACT_OK,
        "CLIENT's ingress allows anything from OTHER"
    );
    assert_eq!(to_pod(&t, &from_other), TC_ACT_OK, "and again");
}

/// Adopt round trips. Three classes: BACKEND's and
/// a third pod's share one port set; CLIENT's is "deny all ingress" with no entry at all (its
/// id lives only in `POLICY_PODS`). A restart rewrites nothing; removing one user of the
/// shared port set keeps it for the other; the entry-less class keeps denying; a new class
/// after the restart gets an id that collides with nothing.
#[test]
fn adopt_round_trips_shared_port_sets_and_entry_less_classes() {
    let mut t = load("rv-adopt-shared");
    let third: [u8; 4] = [10, 244, 2, 1];
    let s = ports(&[(6, 80, 80)]);
    let allow_from = |peer: [u8; 4]| {
        Arc::new(PolicyClass {
            ingress: Some([(prefix(peer, 32), allow(s.clone()))].into_iter().collect()),
            egress: None,
        })
    };
    let deny_all = Arc::new(PolicyClass {
        ingress: Some(DirectionRules::new()),
        egress: None,
    });
    let desired = |with_third: bool| {
        let mut endpoints: BTreeMap<std::net::Ipv4Addr, Arc<PolicyClass>> = [
            (BACKEND.into(), allow_from(CLIENT)),
            (CLIENT.into(), Arc::clone(&deny_all)),
        ]
        .into_iter()
        .collect();
        if with_third {
            endpoints.insert(third.into(), allow_from(OTHER));
        }
        PolicyDesired {
            endpoints,
            local: [BACKEND.into(), CLIENT.into(), third.into()]
                .into_iter()
                .collect(),
            policies_in_force: 2,
        }
    };
    sync_policy(&mut t, &desired(true));
    t.dp.take();
    t.dp = Some(open(&t.root));
    let again = t.dp.as_mut().unwrap().sync_policy(&desired(true)).unwrap();
    assert!(!again.changed(), "{again:?}");
    let report = t.dp.as_mut().unwrap().sync_policy(&desired(false)).unwrap();
    assert_eq!(report.classes_removed, 1, "{report:?}");
    assert_eq!(
        ports_trie(&t).keys().count(),
        1,
        "the shared port set stays"
    );
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40000, BACKEND, 80, true, b"")),
        TC_ACT_OK,
        "BACKEND still allows CLIENT on 80"
    );
    assert_eq!(
        to_pod(&t, &tcp(OTHER, 40001, CLIENT, 80, true, b"")),
        TC_ACT_SHOT,
        "CLIENT still denies all"
    );
    // A new class and port set after the restart.
    let mut more = desired(false);
    more.endpoints.insert(
        third.into(),
        Arc::new(PolicyClass {
            ingress: Some(
                [(prefix(OTHER, 32), allow(ports(&[(17, 53, 53)])))]
                    .into_iter()
                    .collect(),
            ),
            egress: None,
        }),
    );
    sync_policy(&mut t, &more);
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40002, BACKEND, 80, true, b"")),
        TC_ACT_OK
    );
    assert_eq!(to_pod(&t, &udp(OTHER, 40003, third, 53, b"q")), TC_ACT_OK);
    assert_eq!(
        to_pod(&t, &tcp(OTHER, 40004, CLIENT, 80, true, b"")),
        TC_ACT_SHOT
    );
}

/// A pod leaves and a new pod gets its address: the flows of the old one must not give the
/// new one "replies" (the agent forgets them at CNI DEL).
#[test]
fn a_pods_flows_are_forgotten_when_it_leaves() {
    let mut t = load("pol-forget");
    sync_policy(&mut t, &backend_policy(true));
    assert_eq!(
        to_pod(&t, &tcp(CLIENT, 40000, BACKEND, 80, true, b"")),
        TC_ACT_OK
    );
    let reply = tcp(BACKEND, 80, CLIENT, 40000, false, b"x");
    assert_eq!(run(&t, "from_pod", &reply).0, TC_ACT_OK, "a reply, before");
    let forgotten = t.dp.as_mut().unwrap().forget_pod_flows(BACKEND.into());
    assert!(forgotten >= 1, "{forgotten}");
    assert_eq!(
        run(&t, "from_pod", &reply).0,
        TC_ACT_SHOT,
        "the same packet from a new pod at that address is not a reply"
    );
}

/// Gives loopback (the interface `BPF_PROG_TEST_RUN` runs packets on) a `POD_STATS` entry, as
/// the agent does for a pod's interface at attach.
fn count_loopback(t: &Loaded) {
    let data = aya::maps::MapData::from_pin(t.root.join("POD_STATS")).expect("pinned POD_STATS");
    let mut map: aya::maps::PerCpuHashMap<_, u32, PodStats> =
        aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data)).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let zeros = aya::maps::PerCpuValues::try_from(vec![PodStats::default(); cpus]).unwrap();
    map.insert(1, zeros, 0).unwrap();
}

fn loopback_stats(t: &Loaded) -> PodStats {
    t.dp.as_ref().unwrap().pod_stats().unwrap()[&1]
}

/// The per-pod counters: packets and bytes (frames, dropped ones included), new TCP
/// connections (SYN), new UDP flows (first datagram of a 4-tuple in either orientation, not a
/// translated reply), drops by reason, malformed packets; nothing counted for an interface
/// without an entry, and traffic never creates one.
/// A packet for the pod counters' test: intent, program, packet, verdict, and what it adds to
/// its direction's counters besides one packet and its bytes.
type StatsCase = (&'static str, &'static str, Vec<u8>, i32, fn(&mut DirStats));

/// Runs `cases` in order, checking both directions' counters after each.
fn check_stats(t: &Loaded, cases: &[StatsCase], expected: &mut PodStats) {
    for (intent, prog, packet, verdict, effect) in cases {
        assert_eq!(run(t, prog, packet).0, *verdict, "{intent}: verdict");
        let d = if *prog == "from_pod" {
            &mut expected.egress
        } else {
            &mut expected.ingress
        };
        d.packets += 1;
        d.bytes += packet.len() as u64;
        effect(d);
        assert_eq!(loopback_stats(t), *expected, "{intent}");
    }
}

/// Traffic of a pod no policy isolates, and what each packet adds.
fn open_stats_cases() -> Vec<StatsCase> {
    let syn = tcp(CLIENT, 40000, OTHER, 80, true, b"");
    let mut bad = syn.clone();
    bad[14] = 0x44;
    let mut arp = syn.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let query = udp(CLIENT, 40000, OTHER, 53, b"q");
    let (out, into) = ("from_pod", "to_pod");
    vec![
        ("a SYN: a new connection", out, syn, TC_ACT_OK, |d| {
            d.conns_tcp += 1;
        }),
        (
            "its ACK: none",
            out,
            tcp(CLIENT, 40000, OTHER, 80, false, b"x"),
            TC_ACT_OK,
            |_| {},
        ),
        (
            "a SYN in",
            into,
            tcp(OTHER, 9000, CLIENT, 40001, true, b""),
            TC_ACT_OK,
            |d| d.conns_tcp += 1,
        ),
        (
            "a UDP flow's first datagram",
            out,
            query.clone(),
            TC_ACT_OK,
            |d| d.conns_udp += 1,
        ),
        ("its second", out, query, TC_ACT_OK, |_| {}),
        (
            "its reply",
            into,
            udp(OTHER, 53, CLIENT, 40000, b"a"),
            TC_ACT_OK,
            |_| {},
        ),
        (
            "a UDP flow in",
            into,
            udp(OTHER, 5000, CLIENT, 6000, b"in"),
            TC_ACT_OK,
            |d| d.conns_udp += 1,
        ),
        (
            "its reply",
            out,
            udp(CLIENT, 6000, OTHER, 5000, b"back"),
            TC_ACT_OK,
            |_| {},
        ),
        (
            "to a VIP: one flow out",
            out,
            udp(CLIENT, 41000, VIP, 53, b"q"),
            TC_ACT_OK,
            |d| d.conns_udp += 1,
        ),
        (
            "the backend's reply (reverse NAT): no flow in",
            into,
            udp(BACKEND, 5353, CLIENT, 41000, b"a"),
            TC_ACT_OK,
            |_| {},
        ),
        (
            "no endpoints: answered, dropped",
            out,
            tcp(CLIENT, 42000, DEAD_VIP, 80, true, b""),
            TC_ACT_REDIRECT,
            |d| d.drop_no_endpoints += 1,
        ),
        ("malformed: passed, counted", out, bad, TC_ACT_OK, |d| {
            d.malformed += 1;
        }),
        ("not IP: traffic only", into, arp, TC_ACT_OK, |_| {}),
    ]
}

/// Traffic the client's egress policy denies.
fn denied_stats_cases() -> Vec<StatsCase> {
    vec![
        (
            "denied UDP",
            "from_pod",
            udp(CLIENT, 43000, OTHER, 53, b"q"),
            TC_ACT_SHOT,
            |d| d.drop_policy += 1,
        ),
        (
            "a denied SYN: no connection",
            "from_pod",
            tcp(CLIENT, 43001, OTHER, 80, true, b""),
            TC_ACT_SHOT,
            |d| d.drop_policy += 1,
        ),
    ]
}

#[test]
fn pod_counters_count_packets_bytes_new_flows_and_drops_by_reason() {
    let mut t = load("pod-stats");
    let syn = tcp(CLIENT, 40000, OTHER, 80, true, b"");
    assert_eq!(run(&t, "from_pod", &syn).0, TC_ACT_OK);
    assert!(
        t.dp.as_ref().unwrap().pod_stats().unwrap().is_empty(),
        "traffic creates no entry"
    );
    count_loopback(&t);
    let mut expected = PodStats::default();
    check_stats(&t, &open_stats_cases(), &mut expected);
    sync_policy(&mut t, &client_egress_to_other(false));
    check_stats(&t, &denied_stats_cases(), &mut expected);

    // Removed: nothing counted any more.
    let data = aya::maps::MapData::from_pin(t.root.join("POD_STATS")).unwrap();
    let mut map: aya::maps::PerCpuHashMap<_, u32, PodStats> =
        aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data)).unwrap();
    map.remove(&1).unwrap();
    assert_eq!(
        run(&t, "from_pod", &syn).0,
        TC_ACT_SHOT,
        "denied by the policy above"
    );
    assert!(t.dp.as_ref().unwrap().pod_stats().unwrap().is_empty());
}

/// Per-frontend counters: a new flow translated by the per-packet path counts once (not its
/// later packets), a connection to a frontend without endpoints counts as rejected, and a
/// removed frontend's counters go with it.
#[test]
fn frontend_counters_count_new_connections_and_rejections_once() {
    let mut t = load("frontend-stats");
    let key = |vip: [u8; 4], port: u16, proto: u8| ServiceKey {
        addr: addr::encode(std::net::Ipv4Addr::from(vip).into()).0,
        port: port.to_be(),
        proto,
        family: addr::encode(std::net::Ipv4Addr::from(vip).into()).1,
        slot: 0,
        _pad: 0,
    };
    let stats = |t: &Loaded| t.dp.as_ref().unwrap().frontend_stats().unwrap();
    assert!(stats(&t).is_empty());
    let syn = tcp(CLIENT, 40000, VIP, 80, true, b"");
    assert_eq!(run(&t, "from_pod", &syn).0, TC_ACT_OK);
    assert_eq!(run(&t, "from_pod", &syn).0, TC_ACT_OK, "retransmitted");
    let s = stats(&t)[&key(VIP, 80, PROTO_TCP)];
    assert_eq!(
        (s.connections, s.rejected),
        (1, 0),
        "the SYN and its retransmission: one flow"
    );
    let _ = run(&t, "from_pod", &tcp(CLIENT, 40000, VIP, 80, false, b"x"));
    let _ = run(&t, "from_pod", &udp(CLIENT, 40001, VIP, 53, b"q"));
    let _ = run(&t, "from_pod", &udp(CLIENT, 40001, VIP, 53, b"q"));
    let _ = run(&t, "from_pod", &tcp(CLIENT, 40002, DEAD_VIP, 80, true, b""));
    let all = stats(&t);
    let s = all[&key(VIP, 80, PROTO_TCP)];
    assert_eq!(
        (s.connections, s.rejected),
        (1, 0),
        "later packets are no new connection"
    );
    let s = all[&key(VIP, 53, PROTO_UDP)];
    assert_eq!((s.connections, s.rejected), (1, 0), "one UDP flow");
    let s = all[&key(DEAD_VIP, 80, PROTO_TCP)];
    assert_eq!((s.connections, s.rejected), (0, 1));
    // The TCP frontend goes: its counters too.
    let rest: Vec<FrontendSpec> = base_frontends().into_iter().skip(1).collect();
    let (_, errors) = t.dp.as_mut().unwrap().sync_frontends(&rest);
    assert!(errors.is_empty(), "{errors:?}");
    let data = aya::maps::MapData::from_pin(t.root.join("FRONTEND_STATS")).unwrap();
    let mut map: aya::maps::PerCpuHashMap<_, u32, ferrovia_common::FrontendStats> =
        aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data)).unwrap();
    assert_eq!(
        map.keys().count(),
        2,
        "only the UDP and dead frontends' entries are left"
    );
    assert!(!stats(&t).contains_key(&key(VIP, 80, PROTO_TCP)));
    // An entry of a frontend that went while the agent was down goes at the next start,
    // before any sync could give its id to a new frontend.
    let cpus = aya::util::nr_cpus().unwrap();
    let zeros =
        aya::maps::PerCpuValues::try_from(vec![ferrovia_common::FrontendStats::default(); cpus])
            .unwrap();
    map.insert(999_999, zeros, 0).unwrap();
    t.dp.take();
    t.dp = Some(open(&t.root));
    assert!(map.get(&999_999, 0).is_err(), "pruned at load");
    assert_eq!(map.keys().count(), 2, "the live frontends' entries stay");
}

/// Test-owned objects for the network-namespace probe: cgroups and named namespaces, removed
/// on drop (also when the test fails).
struct ProbeFixture {
    cgroups: Vec<PathBuf>,
    netns: Vec<String>,
}

impl ProbeFixture {
    fn cgroup(&mut self, name: &str) -> PathBuf {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let root = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| PathBuf::from(f[1]))
            .expect("a cgroup2 mount");
        let dir = root.join(format!("fv-prog-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        self.cgroups.push(dir.clone());
        dir
    }

    fn netns(&mut self, name: &str) -> PathBuf {
        let name = format!("fv-prog-{name}-{}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        self.netns.push(name.clone());
        PathBuf::from("/run/netns").join(name)
    }
}

impl Drop for ProbeFixture {
    fn drop(&mut self) {
        for name in &self.netns {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", name])
                .status();
        }
        for dir in &self.cgroups {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Kernels before 5.14 do not tell a network namespace's cookie to user space; the agent then
/// learns it through `sock4_connect` (a connect from the namespace to a registered nonce in
/// 0.0.0.0/8). What it learns must be what the kernel says (`SO_NETNS_COOKIE`, where the
/// kernel has it; else the same twice) for the agent's own namespace and two others,
/// distinct, with no probe left in the map; a probe from outside the hook's cgroup fails with
/// an error saying so.
#[test]
fn netns_cookies_learnt_through_the_connect_hook_are_the_kernels() {
    use ferrovia_agent::datapath::netns;
    let mut fx = ProbeFixture {
        cgroups: Vec::new(),
        netns: Vec::new(),
    };
    let hooked = fx.cgroup("probe-hooked");
    let elsewhere = fx.cgroup("probe-elsewhere");
    let root = PathBuf::from(format!("/sys/fs/bpf/fv-prog-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let t = Loaded {
        dp: Some(
            Datapath::load(DatapathConfig {
                bpffs_root: root.clone(),
                socket_lb_cgroup: Some(hooked.clone()),
                sizes: small_maps(),
                prefer_tcx: true,
                network_policy: true,
            })
            .expect("loading the data path"),
        ),
        root,
    };
    let mut probes = pinned_map::<u64, u64>(&t, "NETNS_PROBE");
    let spaces = [
        PathBuf::from("/proc/self/ns/net"),
        fx.netns("probe-a"),
        fx.netns("probe-b"),
    ];
    let mut seen = Vec::new();
    for ns in &spaces {
        let learnt = netns::probe(&mut probes, &hooked, ns)
            .unwrap_or_else(|e| panic!("probing {}: {e:#}", ns.display()));
        // Where the kernel tells it (5.14+), it is what the kernel says; before, at least the
        // same on a second probe.
        let told = if netns::cookies_supported() {
            netns::cookie(ns).expect("SO_NETNS_COOKIE")
        } else {
            netns::probe(&mut probes, &hooked, ns).expect("a second probe")
        };
        assert_eq!(learnt, told, "{}", ns.display());
        assert_ne!(learnt, 0);
        seen.push(learnt);
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(
        seen.len(),
        spaces.len(),
        "distinct namespaces, distinct cookies"
    );

    let err = netns::probe(&mut probes, &elsewhere, &spaces[1])
        .expect_err("no hook in that cgroup: the probe must fail");
    assert!(
        format!("{err:#}").contains("did not reach the socket hook"),
        "{err:#}"
    );
    assert_eq!(
        probes.keys().count(),
        0,
        "every probe removes its nonce, failed or not"
    );
}

/// Verifier complexity: every program of the object loads on this kernel, and none uses more
/// than half the verifier's instruction budget. Prints one `VERIFIER-STATS` line per program
/// (the kernel matrix collects them into its per-kernel table: `cargo xtask vm-test`).
#[test]
fn every_program_passes_the_verifier_within_half_its_budget() {
    let stats =
        ferrovia_agent::datapath::verifier::verify_all(&small_maps()).expect("every program loads");
    let names: Vec<&str> = stats.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "from_pod",
        "to_pod",
        "sock4_connect",
        "sock4_sendmsg",
        "sock4_recvmsg",
        "sock4_getpeer",
        "sock4_conn_old",
        "sock4_send_old",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let show = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for s in &stats {
        println!(
            "VERIFIER-STATS\t{}\t{}\t{}\t{}",
            s.name,
            show(s.verified_insns),
            show(s.xlated_insns),
            s.refused.as_deref().unwrap_or("")
        );
    }
    let budget = ferrovia_agent::datapath::verifier::COMPLEXITY_LIMIT / 2;
    for s in &stats {
        if let Some(n) = s.verified_insns {
            assert!(
                n <= budget,
                "{} made the verifier process {n} instructions, over half its limit ({budget})",
                s.name
            );
        }
        // Only hooks with a fallback may be refused, and only for the missing helper
        // (bpf_set_retval, #187); `verify_all` fails on any other refusal.
        if let Some(why) = &s.refused {
            assert!(
                ["sock4_connect", "sock4_sendmsg"].contains(&s.name.as_str())
                    && why.contains("#187"),
                "{} refused: {why}",
                s.name
            );
        }
    }
}

/// Binds the calling thread to CPU 0: per-CPU state (a pod's flow-event bucket) is then one.
fn pin_to_cpu0() {
    let mut set = nix::sched::CpuSet::new();
    set.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

/// Gives the loopback interface (the test runs' `ifindex`) a flow-event bucket, as attaching
/// a pod does.
fn flow_bucket_for_loopback(t: &Loaded) {
    let data = aya::maps::MapData::from_pin(t.root.join("FLOW_LIMIT")).expect("pinned FLOW_LIMIT");
    let mut map: aya::maps::PerCpuHashMap<_, u32, ferrovia_common::FlowLimit> =
        aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data)).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let zeros =
        aya::maps::PerCpuValues::try_from(vec![ferrovia_common::FlowLimit::default(); cpus])
            .unwrap();
    map.insert(1, zeros, 0).unwrap();
}

fn next_events(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
) -> Vec<ferrovia_common::FlowEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<ferrovia_common::FlowEvent>());
        // SAFETY: the programs write whole `FlowEvent`s.
        out.push(unsafe {
            item.as_ptr()
                .cast::<ferrovia_common::FlowEvent>()
                .read_unaligned()
        });
    }
    out
}

fn be(ip: [u8; 4]) -> u32 {
    u32::from_ne_bytes(ip)
}

/// A data path whose loopback (the test runs' interface) is a counted pod, the flow events'
/// ring buffer taken for the test, and the calling thread on CPU 0 (one per-CPU bucket).
fn load_with_events(test: &str) -> (Loaded, aya::maps::RingBuf<aya::maps::MapData>) {
    pin_to_cpu0();
    let mut t = load(test);
    let map =
        t.dp.as_mut()
            .unwrap()
            .take_flow_events()
            .expect("the ring buffer");
    assert!(
        t.dp.as_mut().unwrap().take_flow_events().is_none(),
        "one reader"
    );
    let ring = aya::maps::RingBuf::try_from(map).unwrap();
    count_loopback(&t);
    (t, ring)
}

fn set_rate(t: &mut Loaded, per_second: u32, burst: u32) {
    let rate = ferrovia_agent::datapath::FlowRate { per_second, burst };
    t.dp.as_mut().unwrap().set_flow_rate(rate).unwrap();
}

/// An event's fields but its time and source port.
type EventFields = (u8, u8, u8, [u32; 3], u16, u16, u8, u8, u32, u32);

fn fields(e: &ferrovia_common::FlowEvent) -> EventFields {
    (
        e.kind,
        e.dir,
        e.proto,
        [e.saddr, e.daddr, e.xaddr],
        u16::from_be(e.dport),
        u16::from_be(e.xport),
        e.verdict,
        e.drop,
        e.suppressed,
        e.ifindex,
    )
}

/// Flow events: a new connection through a VIP with its translation and verdict, a connection
/// to a frontend without endpoints and a policy drop with theirs; nothing for an interface
/// without a bucket.
#[test]
fn flow_events_carry_flows_verdicts_and_translations() {
    use ferrovia_common::{drop, flow};
    let (mut t, mut ring) = load_with_events("flow-events");
    set_rate(&mut t, 1000, 100);
    let syn = |sport| tcp(CLIENT, sport, VIP, 80, true, b"");
    assert_eq!(run(&t, "from_pod", &syn(40010)).0, TC_ACT_OK);
    assert!(
        next_events(&mut ring).is_empty(),
        "counted, but no bucket: no events"
    );
    flow_bucket_for_loopback(&t);
    assert_eq!(run(&t, "from_pod", &syn(40011)).0, TC_ACT_OK);
    let _ = run(&t, "from_pod", &syn(40011));
    let _ = run(&t, "from_pod", &tcp(CLIENT, 40011, VIP, 80, false, b"x"));
    let _ = run(&t, "from_pod", &tcp(CLIENT, 40012, DEAD_VIP, 80, true, b""));
    sync_policy(&mut t, &client_egress_to_other(false));
    let denied = udp(CLIENT, 5000, OTHER, 53, b"q");
    assert_eq!(run(&t, "from_pod", &denied).0, TC_ACT_SHOT);
    let evs = next_events(&mut ring);
    let seen: Vec<EventFields> = evs.iter().map(fields).collect();
    let (cl, vip, be_, dead, other) = (be(CLIENT), be(VIP), be(BACKEND), be(DEAD_VIP), be(OTHER));
    let (egress, tcp_, udp_) = (POL_DIR_EGRESS, PROTO_TCP, PROTO_UDP);
    assert_eq!(
        seen,
        [
            (
                flow::NEW,
                egress,
                tcp_,
                [cl, vip, be_],
                80,
                9376,
                verdict::ALLOW_NOT_ISOLATED,
                drop::NONE,
                0,
                1
            ),
            (
                flow::NEW,
                egress,
                tcp_,
                [cl, vip, be_],
                80,
                9376,
                verdict::ALLOW_NOT_ISOLATED,
                drop::NONE,
                0,
                1
            ),
            (
                flow::DROP,
                egress,
                tcp_,
                [cl, dead, dead],
                80,
                80,
                flow::NOT_JUDGED,
                drop::NO_ENDPOINTS,
                0,
                1
            ),
            (
                flow::DROP,
                egress,
                udp_,
                [cl, other, other],
                53,
                53,
                verdict::DENY_NO_RULE,
                drop::POLICY,
                0,
                1
            ),
        ],
        "translated SYN and its retransmission (not its data); rejected SYN; denied datagram"
    );
    assert_eq!(u16::from_be(evs[0].sport), 40011);
    assert!(evs.windows(2).all(|w| w[0].ts_ns <= w[1].ts_ns));
    assert_eq!(counter(&t, "flow_lost") + counter(&t, "flow_suppressed"), 0);
}

/// The per-pod rate limit: a burst of 3 at 1/s lets the first three events through,
/// suppresses and counts the next ten (but for one per second they took), and the next event
/// (a second later) carries that count; a rate of 0 turns events off.
#[test]
fn flow_events_are_rate_limited_per_pod() {
    let (mut t, mut ring) = load_with_events("flow-rate");
    flow_bucket_for_loopback(&t);
    set_rate(&mut t, 1, 3);
    sync_policy(&mut t, &client_egress_to_other(false));
    let denied = udp(CLIENT, 5000, OTHER, 53, b"q");
    let send = |t: &Loaded, n: usize| {
        for _ in 0..n {
            assert_eq!(run(t, "from_pod", &denied).0, TC_ACT_SHOT);
        }
    };
    // Credit for the ten below accrues from the burst's events on: the clock starts before.
    let started = std::time::Instant::now();
    send(&t, 3);
    let burst = next_events(&mut ring);
    assert_eq!(burst.len(), 3, "the burst: {burst:?}");
    assert!(burst.iter().all(|e| e.suppressed == 0));
    // The burst is spent: the next ten are suppressed, but for one event per second they
    // took (none here, unless the machine stalls): exactly, either way.
    send(&t, 10);
    let elapsed = started.elapsed().as_secs_f64().ceil();
    let during = next_events(&mut ring);
    assert!(during.len() as f64 <= elapsed, "{during:?} in {elapsed} s");
    let suppressed = counter(&t, "flow_suppressed");
    assert_eq!(suppressed + during.len() as u64, 10);
    // A second earns one event's credit back; the events after the burst carry every
    // suppressed one.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    send(&t, 1);
    let evs = next_events(&mut ring);
    assert_eq!(evs.len(), 1, "{evs:?}");
    let carried: u64 = during
        .iter()
        .chain(&evs)
        .map(|e| u64::from(e.suppressed))
        .sum();
    assert_eq!(
        carried, suppressed,
        "the suppressed count rides on the next event"
    );
    assert!(suppressed > 0);
    assert_eq!(counter(&t, "flow_lost"), 0);

    set_rate(&mut t, 0, 0);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    send(&t, 1);
    assert!(next_events(&mut ring).is_empty(), "events off");
}

/// The conntrack keys of a UDP flow from the client to `VIP:53` (backend `10.244.1.5:5353`):
/// the client's tuple (OUT) and the backend's reply tuple (IN), as `from_pod` writes them.
fn udp_vip_flow_keys(sport: u16) -> [ferrovia_common::CtKey; 2] {
    use ferrovia_common::{CT_DIR_IN, CT_DIR_OUT, CtKey, FAMILY_V4};
    let a = |ip: [u8; 4]| addr::encode(std::net::Ipv4Addr::from(ip).into()).0;
    let key = |saddr, sport: u16, daddr, dport: u16, dir| CtKey {
        saddr: a(saddr),
        daddr: a(daddr),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: PROTO_UDP,
        family: FAMILY_V4,
        dir,
        _pad: 0,
    };
    [
        key(CLIENT, sport, VIP, 53, CT_DIR_OUT),
        key(BACKEND, 5353, CLIENT, sport, CT_DIR_IN),
    ]
}

/// `CT_CREATED` counts the conntrack entries a new flow creates (two), not a retransmission's
/// (it finds them) nor the overwrite of an expired flow's entries on the same tuple.
#[test]
fn conntrack_creations_count_new_entries_not_overwrites() {
    use ferrovia_common::{CtKey, CtValue};
    let t = load("ct-created");
    let created = |t: &Loaded| counter(t, "ct_created");
    let query = udp(CLIENT, 41000, VIP, 53, b"q");
    assert_eq!(run(&t, "from_pod", &query).0, TC_ACT_OK);
    assert_eq!(created(&t), 2, "a new flow: its OUT and IN entries");
    assert_eq!(run(&t, "from_pod", &query).0, TC_ACT_OK);
    assert_eq!(created(&t), 2, "its next datagram finds them");
    // Both entries idle past the UDP timeout: the next datagram is a new flow on the same
    // tuple, whose entries overwrite the old ones.
    let mut ct = pinned_map::<CtKey, CtValue>(&t, "CONNTRACK");
    for key in udp_vip_flow_keys(41000) {
        let mut value = ct.get(&key, 0).expect("the flow's entry");
        value.last_seen_ns = monotonic_ns().wrapping_sub(121_000_000_000);
        ct.insert(key, value, 0).unwrap();
    }
    assert_eq!(run(&t, "from_pod", &query).0, TC_ACT_OK);
    assert_eq!(created(&t), 2, "overwritten, not created");
    assert_eq!(ct.keys().count(), 2);
    let fresh = ct.get(&udp_vip_flow_keys(41000)[0], 0).unwrap();
    assert!(
        ferrovia_common::age_ns(monotonic_ns(), fresh.last_seen_ns) < 10_000_000_000,
        "the new flow's entry replaced the expired one"
    );
    let _ = run(&t, "from_pod", &tcp(CLIENT, 41001, VIP, 80, true, b""));
    assert_eq!(created(&t), 4, "another flow, two more");
}

/// An entry refreshed by another CPU after this one read the clock has a `last_seen` after
/// "now": it is alive (age 0), not 2^64 ns old. Read as unsigned, the flow was taken for
/// expired and its entry overwritten as a new flow's, with a new backend choice.
#[test]
fn an_entry_last_seen_after_the_programs_clock_is_alive() {
    use ferrovia_common::{CtKey, CtValue};
    let t = load("ct-future");
    let query = udp(CLIENT, 41002, VIP, 53, b"q");
    assert_eq!(run(&t, "from_pod", &query).0, TC_ACT_OK);
    let mut ct = pinned_map::<CtKey, CtValue>(&t, "CONNTRACK");
    let ahead = monotonic_ns() + 60_000_000_000;
    for key in udp_vip_flow_keys(41002) {
        let mut value = ct.get(&key, 0).expect("the flow's entry");
        value.last_seen_ns = ahead;
        ct.insert(key, value, 0).unwrap();
    }
    assert_eq!(run(&t, "from_pod", &query).0, TC_ACT_OK);
    for key in udp_vip_flow_keys(41002) {
        assert_eq!(
            ct.get(&key, 0).expect("the flow's entry").last_seen_ns,
            ahead,
            "found alive and left as it was (not overwritten by a new flow's entry)"
        );
    }
    assert_eq!(counter(&t, "ct_created"), 2, "one flow");
}

/// Backend selections: each new connection counts once for the backend it was given (and the
/// backends' counts add up to the frontend's connections); a backend removed from its frontend
/// loses its entry with its id, and an entry of an id gone while the agent was down is pruned
/// at load.
#[test]
fn backend_selections_count_per_backend_and_go_with_the_backend() {
    let mut t = load("backend-stats");
    let two = frontend(
        VIP,
        8080,
        PROTO_TCP,
        &["10.244.1.5:9376", "10.244.1.6:9376"],
    );
    let mut specs = base_frontends();
    specs.push(two.clone());
    let (_, errors) = t.dp.as_mut().unwrap().sync_frontends(&specs);
    assert!(errors.is_empty(), "{errors:?}");
    let n = 64;
    for sport in 0..n {
        let syn = tcp(CLIENT, 30000 + sport, VIP, 8080, true, b"");
        assert_eq!(run(&t, "from_pod", &syn).0, TC_ACT_OK);
        // Its retransmission and next packet: the same connection.
        let _ = run(&t, "from_pod", &syn);
        let _ = run(
            &t,
            "from_pod",
            &tcp(CLIENT, 30000 + sport, VIP, 8080, false, b"x"),
        );
    }
    let _ = run(&t, "from_pod", &tcp(CLIENT, 40000, DEAD_VIP, 80, true, b""));
    let dp = t.dp.as_ref().unwrap();
    let selections = dp.backend_selections().unwrap();
    let per_backend = &selections[&two.key];
    let (a, b): (SocketAddr, SocketAddr) = (
        "10.244.1.5:9376".parse().unwrap(),
        "10.244.1.6:9376".parse().unwrap(),
    );
    assert_eq!(
        per_backend.values().sum::<u64>(),
        u64::from(n),
        "{per_backend:?}"
    );
    assert!(
        per_backend[&a] > 0 && per_backend[&b] > 0,
        "random slots: both chosen in {n} connections: {per_backend:?}"
    );
    assert_eq!(
        dp.frontend_stats().unwrap()[&two.key].connections,
        u64::from(n),
        "the frontend counts what its backends do"
    );
    assert_eq!(
        selections.len(),
        1,
        "a rejection selects nothing: {selections:?}"
    );
    // 10.244.1.6 leaves the frontend: its entry goes, 10.244.1.5's stays.
    let data = aya::maps::MapData::from_pin(t.root.join("BACKEND_STATS")).unwrap();
    let mut map: aya::maps::PerCpuHashMap<_, u32, u64> =
        aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data)).unwrap();
    assert_eq!(map.keys().count(), 2);
    specs.pop();
    specs.push(frontend(VIP, 8080, PROTO_TCP, &["10.244.1.5:9376"]));
    let (_, errors) = t.dp.as_mut().unwrap().sync_frontends(&specs);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(map.keys().count(), 1, "the freed id's entry is gone");
    let left = &t.dp.as_ref().unwrap().backend_selections().unwrap()[&two.key];
    assert_eq!(left.keys().copied().collect::<Vec<_>>(), [a]);
    assert_eq!(left[&a], per_backend[&a], "the one left keeps its count");
    // An entry of an id that went while the agent was down.
    let cpus = aya::util::nr_cpus().unwrap();
    map.insert(
        999_999,
        aya::maps::PerCpuValues::try_from(vec![5u64; cpus]).unwrap(),
        0,
    )
    .unwrap();
    t.dp.take();
    t.dp = Some(open(&t.root));
    assert!(map.get(&999_999, 0).is_err(), "pruned at load");
    assert_eq!(map.keys().count(), 1, "the live backend's entry stays");
}

/// A flow's key in the flow maps' test: the client to `OTHER:80` from port 20000 + `i`.
fn gc_key(i: usize, proto: u8, dir: u8) -> ferrovia_common::CtKey {
    ferrovia_common::CtKey {
        saddr: addr::encode(std::net::Ipv4Addr::from(CLIENT).into()).0,
        daddr: addr::encode(std::net::Ipv4Addr::from(OTHER).into()).0,
        sport: (20000 + u16::try_from(i).unwrap()).to_be(),
        dport: 80u16.to_be(),
        proto,
        family: ferrovia_common::FAMILY_V4,
        dir,
        _pad: 0,
    }
}

const SECOND: u64 = 1_000_000_000;

/// The garbage collection deletes exactly the conntrack entries the programs judge expired,
/// with their timeouts: UDP 120 s, TCP 6 h, 60 s once closing; the same in the service and
/// the policy conntrack. Entries are written into the pinned maps with the ages wanted.
#[test]
fn the_gc_deletes_exactly_the_expired_conntrack_entries() {
    use ferrovia_agent::datapath::conntrack::{FlowMap, sweep};
    use ferrovia_common::{CT_FLAG_CLOSING, CtKey, CtValue, POL_CT_EGRESS, PolicyCtValue};
    use std::sync::atomic::AtomicU64;
    let t = load("ct-gc");
    // (intent, protocol, flags, idle for (s), whether it survives)
    let cases: [(&str, u8, u16, u64, bool); 7] = [
        ("fresh UDP", PROTO_UDP, 0, 0, true),
        ("UDP idle 60 s", PROTO_UDP, 0, 60, true),
        ("UDP idle 130 s", PROTO_UDP, 0, 130, false),
        ("TCP idle 130 s", PROTO_TCP, 0, 130, true),
        (
            "closing TCP idle 30 s",
            PROTO_TCP,
            CT_FLAG_CLOSING,
            30,
            true,
        ),
        (
            "closing TCP idle 70 s",
            PROTO_TCP,
            CT_FLAG_CLOSING,
            70,
            false,
        ),
        (
            "closing UDP idle 70 s",
            PROTO_UDP,
            CT_FLAG_CLOSING,
            70,
            false,
        ),
    ];
    let now = monotonic_ns();
    let mut ct = pinned_map::<CtKey, CtValue>(&t, "CONNTRACK");
    let mut policy_ct = pinned_map::<CtKey, PolicyCtValue>(&t, "POLICY_CT");
    for (i, &(_, proto, flags, idle, _)) in cases.iter().enumerate() {
        let last_seen_ns = now.wrapping_sub(idle * SECOND);
        let value = CtValue {
            flags,
            last_seen_ns,
            ..CtValue::default()
        };
        ct.insert(gc_key(i, proto, 0), value, 0).unwrap();
        let value = PolicyCtValue {
            flags,
            last_seen_ns,
            ..PolicyCtValue::default()
        };
        let key = gc_key(i, proto, POL_CT_EGRESS);
        policy_ct.insert(key, value, 0).unwrap();
    }
    for map in [FlowMap::Conntrack, FlowMap::PolicyCt] {
        assert_eq!(
            sweep(&t.root, map, &AtomicU64::new(0)).unwrap(),
            3,
            "{}: the 3 dead",
            map.name()
        );
    }
    for (i, &(intent, proto, _, _, survives)) in cases.iter().enumerate() {
        let left = ct.get(&gc_key(i, proto, 0), 0).is_ok();
        assert_eq!(left, survives, "CONNTRACK: {intent}");
        let left = policy_ct.get(&gc_key(i, proto, POL_CT_EGRESS), 0).is_ok();
        assert_eq!(left, survives, "POLICY_CT: {intent}");
    }
    // What is left is what the programs use: a second sweep deletes nothing.
    for map in [FlowMap::Conntrack, FlowMap::PolicyCt] {
        assert_eq!(
            sweep(&t.root, map, &AtomicU64::new(0)).unwrap(),
            0,
            "{}",
            map.name()
        );
    }
}

/// The garbage collection deletes a UDP flow's record once it is 120 s old (the pods' counters
/// count it as new then), and an affinity record past its frontend's timeout or of a frontend
/// without affinity (gone, or never with it).
#[test]
fn the_gc_deletes_exactly_the_expired_udp_flows_and_affinity_records() {
    use ferrovia_agent::datapath::conntrack::{FlowMap, sweep};
    use ferrovia_common::{
        AffinityKey, AffinityValue, CtKey, FAMILY_V4, POL_DIR_EGRESS, SVC_FLAG_AFFINITY,
        ServiceValue,
    };
    use std::sync::atomic::AtomicU64;
    let mut t = load("ct-gc-affinity");
    let mut spec = frontend(VIP, 8080, PROTO_TCP, &["10.244.1.5:9376"]);
    spec.flags = SVC_FLAG_AFFINITY;
    spec.affinity_timeout_s = 60;
    let mut specs = base_frontends();
    specs.push(spec.clone());
    let (_, errors) = t.dp.as_mut().unwrap().sync_frontends(&specs);
    assert!(errors.is_empty(), "{errors:?}");
    let services = pinned_map::<ServiceKey, ServiceValue>(&t, "SERVICES");
    let affine = services.get(&spec.key, 0).unwrap().service_id;
    let plain = services
        .get(&base_frontends()[0].key, 0)
        .unwrap()
        .service_id;
    let now = monotonic_ns();
    // (seen s ago, survives)
    // Survivors at half the timeout: a VM under emulation can be slow, and stall.
    let flows = [(0, true), (60, true), (130, false), (139, false)];
    let mut udp_flows = pinned_map::<CtKey, u64>(&t, "UDP_FLOWS");
    for (i, (age, _)) in flows.iter().enumerate() {
        let key = gc_key(i, PROTO_UDP, POL_DIR_EGRESS);
        udp_flows
            .insert(key, now.wrapping_sub(age * SECOND), 0)
            .unwrap();
    }
    // (frontend, used s ago, survives), with 60 s of affinity on `spec`'s frontend
    let records = [
        (affine, 30, true),
        (affine, 75, false),
        (plain, 0, false),
        (999, 0, false),
    ];
    let mut affinity = pinned_map::<AffinityKey, AffinityValue>(&t, "AFFINITY");
    let record = |i: usize, service_id| AffinityKey {
        client: [u32::try_from(i).unwrap(), 0, 0, 0],
        service_id,
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    for (i, &(service_id, age, _)) in records.iter().enumerate() {
        let value = AffinityValue {
            backend_id: 1,
            _pad: 0,
            last_used_ns: now.wrapping_sub(age * SECOND),
        };
        affinity.insert(record(i, service_id), value, 0).unwrap();
    }
    assert_eq!(
        sweep(&t.root, FlowMap::UdpFlows, &AtomicU64::new(0)).unwrap(),
        2
    );
    assert_eq!(
        sweep(&t.root, FlowMap::Affinity, &AtomicU64::new(0)).unwrap(),
        3
    );
    for (i, (age, survives)) in flows.iter().enumerate() {
        let left = udp_flows
            .get(&gc_key(i, PROTO_UDP, POL_DIR_EGRESS), 0)
            .is_ok();
        assert_eq!(left, *survives, "UDP_FLOWS: a flow seen {age} s ago");
    }
    for (i, &(service_id, age, survives)) in records.iter().enumerate() {
        let left = affinity.get(&record(i, service_id), 0).is_ok();
        assert_eq!(
            left, survives,
            "AFFINITY: service {service_id}, used {age} s ago"
        );
    }
}

/// The kernel does not report LRU evictions: the agent derives them as created − deleted −
/// present. With a 64-entry conntrack and 100 flows (200 entries created), every created entry
/// the map no longer holds was evicted, the garbage collection's deletions aside: the derived
/// count equals the flows' entries found missing, before and after a collection.
#[test]
fn conntrack_evictions_are_created_minus_deleted_minus_present() {
    use ferrovia_agent::datapath::conntrack::{FlowMap, sweep};
    use ferrovia_agent::metrics::conntrack_evictions;
    use ferrovia_common::{CtKey, CtValue};
    use std::sync::atomic::AtomicU64;
    let mut t = load_sized(
        "ct-evictions",
        MapSizes {
            conntrack: 64,
            ..small_maps()
        },
    );
    let (_, errors) = t.dp.as_mut().unwrap().sync_frontends(&base_frontends());
    assert!(errors.is_empty(), "{errors:?}");
    let flows: Vec<u16> = (0..100).map(|i| 42000 + i).collect();
    for &sport in &flows {
        assert_eq!(
            run(&t, "from_pod", &udp(CLIENT, sport, VIP, 53, b"q")).0,
            TC_ACT_OK
        );
    }
    let created = counter(&t, "ct_created");
    assert_eq!(created, 200, "two entries per flow");
    let mut ct = pinned_map::<CtKey, CtValue>(&t, "CONNTRACK");
    let keys: Vec<CtKey> = flows.iter().flat_map(|&s| udp_vip_flow_keys(s)).collect();
    let present = |ct: &aya::maps::HashMap<_, CtKey, CtValue>| {
        keys.iter().filter(|k| ct.get(k, 0).is_ok()).count() as u64
    };
    let entries = ct.keys().count() as u64;
    assert!(entries <= 64, "{entries}");
    assert_eq!(entries, present(&ct), "nothing but the flows' entries");
    assert_eq!(
        conntrack_evictions(created, 0, entries),
        200 - present(&ct),
        "evicted: the flows' entries the map lost"
    );
    // The collection deletes the entries of the last 10 flows that are left, aged past the
    // UDP timeout (each rewrite may evict another entry: the map is full).
    for &sport in &flows[90..] {
        for key in udp_vip_flow_keys(sport) {
            if let Ok(mut value) = ct.get(&key, 0) {
                value.last_seen_ns = monotonic_ns().wrapping_sub(130_000_000_000);
                ct.insert(key, value, 0).unwrap();
            }
        }
    }
    let evicted = 200 - present(&ct);
    let total = AtomicU64::new(7);
    let deleted = sweep(&t.root, FlowMap::Conntrack, &total).unwrap();
    assert!(deleted > 0, "aged entries were left to delete");
    assert_eq!(
        total.into_inner(),
        7 + deleted,
        "added to the running total"
    );
    assert_eq!(
        200 - present(&ct),
        evicted + deleted,
        "the collection deleted them"
    );
    assert_eq!(
        counter(&t, "ct_created"),
        200,
        "the collection creates nothing"
    );
    assert_eq!(
        conntrack_evictions(200, deleted, ct.keys().count() as u64),
        evicted,
        "evictions stay what the LRU took, the collected entries aside"
    );
}

/// `ferrovia explain`'s lookups over the pinned maps give the verdict and the reason the
/// programs give: every (peer, protocol, port) of a table, at BACKEND's ingress (rules by
/// peer prefix and port, an `except` hole) and egress (isolated, no rule), judged by both —
/// the programs on a new flow through `BPF_PROG_TEST_RUN`, counted by reason.
#[test]
fn explain_lookups_agree_with_the_programs_verdicts() {
    use ferrovia_agent::datapath::explain::{Lookups, PinnedLookups};
    use ferrovia_agent::model::policy::Dir;
    let mut t = load("explain-agree");
    sync_policy(&mut t, &backend_policy(true));
    let lookups = PinnedLookups::open(&t.root).expect("the pinned maps");
    assert!(lookups.enforcing().unwrap());
    let peers: [[u8; 4]; 5] = [CLIENT, [10, 244, 0, 7], EXCEPTED, OTHER, [192, 0, 2, 1]];
    let services: [(u8, u16); 6] = [(6, 80), (6, 81), (6, 82), (17, 53), (6, 9000), (17, 9000)];
    let mut sport = 20_000;
    let mut seen = std::collections::BTreeSet::new();
    for peer in peers {
        for (proto, port) in services {
            sport += 1;
            let packet = |src, dst, sport, dport| {
                if proto == PROTO_TCP {
                    tcp(src, sport, dst, dport, true, b"")
                } else {
                    udp(src, sport, dst, dport, b"q")
                }
            };
            for (dir, point) in [
                (Dir::Ingress, POL_DIR_INGRESS),
                (Dir::Egress, POL_DIR_EGRESS),
            ] {
                let explained = lookups
                    .verdict(dir, BACKEND.into(), peer.into(), proto, port)
                    .unwrap();
                let before: Vec<u64> = (0..verdict::COUNT)
                    .map(|r| verdicts(&t, BACKEND, point, r))
                    .collect();
                let action = if point == POL_DIR_INGRESS {
                    to_pod(&t, &packet(peer, BACKEND, sport, port))
                } else {
                    run(&t, "from_pod", &packet(BACKEND, peer, sport, port)).0
                };
                let counted: Vec<u8> = (0..verdict::COUNT)
                    .filter(|&r| verdicts(&t, BACKEND, point, r) > before[usize::from(r)])
                    .collect();
                let case = format!("{peer:?} {proto}/{port} {dir:?}");
                assert_eq!(counted, [explained], "{case}: the programs' reason");
                assert_eq!(
                    action == TC_ACT_OK,
                    verdict::allows(explained),
                    "{case}: {}",
                    verdict::name(explained)
                );
                seen.insert(explained);
            }
        }
    }
    assert_eq!(
        seen,
        [
            verdict::ALLOW_RULE,
            verdict::DENY_NO_RULE,
            verdict::DENY_EXCEPT,
            verdict::DENY_PORT
        ]
        .into_iter()
        .collect(),
        "the table covers every reason of an isolated point"
    );
}

/// A flow translated and then denied is reported with the backend policy judged, not the VIP
/// it carried; a pod reaching itself through a VIP, denied by its own ingress, with the point
/// that denied it (ingress) although `from_pod` saw it.
#[test]
fn flow_events_of_denied_translated_flows_name_the_backend_and_the_judging_point() {
    use ferrovia_common::{drop, flow};
    let (mut t, mut ring) = load_with_events("flow-denied");
    flow_bucket_for_loopback(&t);
    set_rate(&mut t, 1000, 100);
    let mut specs = base_frontends();
    specs.push(frontend(VIP, 8081, PROTO_TCP, &["10.244.0.2:9376"]));
    let (_, errors) = t.dp.as_mut().unwrap().sync_frontends(&specs);
    assert!(errors.is_empty(), "{errors:?}");
    let (cl, vip, be_) = (be(CLIENT), be(VIP), be(BACKEND));

    // CLIENT's egress allows only UDP 53 to OTHER: the SYN to the VIP is judged on BACKEND.
    sync_policy(&mut t, &client_egress_to_other(true));
    assert_eq!(
        run(&t, "from_pod", &tcp(CLIENT, 41000, VIP, 80, true, b"")).0,
        TC_ACT_SHOT
    );
    // CLIENT isolated for ingress only: its hairpin passes its egress, dies at its ingress.
    sync_policy(&mut t, &deny_ingress(CLIENT));
    assert_eq!(
        run(&t, "from_pod", &tcp(CLIENT, 41001, VIP, 8081, true, b"")).0,
        TC_ACT_SHOT
    );
    let evs = next_events(&mut ring);
    let seen: Vec<EventFields> = evs.iter().map(fields).collect();
    let (egress, tcp_) = (POL_DIR_EGRESS, PROTO_TCP);
    assert_eq!(
        seen,
        [
            (
                flow::DROP,
                egress,
                tcp_,
                [cl, vip, be_],
                80,
                9376,
                verdict::DENY_NO_RULE,
                drop::POLICY,
                0,
                1
            ),
            (
                flow::DROP,
                egress,
                tcp_,
                [cl, vip, cl],
                8081,
                9376,
                verdict::DENY_NO_RULE,
                drop::POLICY,
                0,
                1
            ),
        ],
    );
    assert_eq!(
        (evs[0].policy_dir, evs[1].policy_dir),
        (POL_DIR_EGRESS, POL_DIR_INGRESS),
        "the point whose policy denied"
    );

    // Allowed, the hairpin is bounced back into the pod, with its event from from_pod (that
    // to_pod makes none for the bounce is checked end to end: a test run does not deliver).
    t.dp.as_mut()
        .unwrap()
        .sync_policy(&PolicyDesired::default())
        .unwrap();
    let (action, _) = run(&t, "from_pod", &tcp(CLIENT, 41002, VIP, 8081, true, b""));
    assert_eq!(action, TC_ACT_REDIRECT, "bounced back into the pod");
    let evs = next_events(&mut ring);
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(
        (evs[0].kind, evs[0].xaddr, evs[0].verdict),
        (flow::NEW, cl, verdict::ALLOW_NOT_ISOLATED)
    );
}
