//! Random scenarios from a seed, for the differential test: extra pod and namespace labels and
//! one to four valid policies over them, drawing selectors, peers, ports and types from the
//! labels, IPs and port names the cluster really has (so that most of them select something).
//!
//! The generator has its own PRNG ([`SplitMix64`]) so that a seed printed by a failing run
//! replays the same scenario on any machine and any version of any crate.

use std::net::Ipv4Addr;

use super::spec::{
    Cidr, Operator, Peer, Policy, PolicyPort, PolicyType, PortRef, Protocol, Rule, Selector, World,
};

/// Sebastiano Vigna's `SplitMix64`: tiny, fast, and good enough to pick test inputs.
pub struct SplitMix64(u64);

impl SplitMix64 {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// `min..=max` distinct items of `items`, in their order.
    pub fn some_of<T: Clone>(&mut self, items: &[T], min: usize, max: usize) -> Vec<T> {
        let n = min + self.below(max.min(items.len()) - min + 1);
        let mut idx: Vec<usize> = (0..items.len()).collect();
        for i in 0..n {
            let j = i + self.below(items.len() - i);
            idx.swap(i, j);
        }
        let mut chosen = idx[..n].to_vec();
        chosen.sort_unstable();
        chosen.into_iter().map(|i| items[i].clone()).collect()
    }
}

/// A seed nobody chose: the clock and the pid, mixed.
#[must_use]
pub fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut mix = SplitMix64::new(
        nanos ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed),
    );
    mix.next_u64()
}

/// The label keys and values the generator draws from, pod side. `pod` is fixed by the
/// cluster; `tier` and `color` are what the generator sets (or leaves unset).
const POD_LABELS: &[(&str, &[&str])] = &[
    ("pod", &["a", "b", "c"]),
    ("tier", &["web", "db", "api"]),
    ("color", &["red", "blue"]),
];

/// Namespace side: `ns` and `kubernetes.io/metadata.name` are fixed, `env` and `team` random.
const NAMESPACE_LABELS: &[(&str, &[&str])] = &[
    ("ns", &["x", "y", "z"]),
    ("kubernetes.io/metadata.name", &["x", "y", "z"]),
    ("env", &["prod", "dev"]),
    ("team", &["red", "blue"]),
];

/// Port names a policy may use: the cluster's, plus one no pod has.
const PORT_NAMES: &[&str] = &[
    "serve-80-tcp",
    "serve-80-udp",
    "serve-81-tcp",
    "serve-81-udp",
    "web",
    "nope",
];

/// A generated scenario: the world with random extra labels, and the policies.
#[derive(Clone, Debug)]
pub struct Generated {
    pub world: World,
    pub policies: Vec<Policy>,
}

/// The scenario of `seed` over `base` (whose pods are all in `subnet`).
#[must_use]
pub fn generate(seed: u64, base: &World, subnet: Cidr) -> Generated {
    let mut rng = SplitMix64::new(seed);
    let mut world = base.clone();
    for pod in &mut world.pods {
        relabel(&mut rng, &mut pod.labels, &POD_LABELS[1..]);
    }
    for ns in &mut world.namespaces {
        relabel(&mut rng, &mut ns.labels, &NAMESPACE_LABELS[2..]);
    }
    let g = Generator {
        ips: world.pods.iter().map(|p| p.ip).collect(),
        subnet,
    };
    let namespaces: Vec<String> = world.namespaces.iter().map(|n| n.name.clone()).collect();
    let mut policies = Vec::new();
    for i in 0..=rng.below(4) {
        let namespace = rng.pick(&namespaces).clone();
        policies.push(g.policy(&mut rng, &namespace, i));
    }
    Generated { world, policies }
}

/// Sets each of `keys` to a random value, or removes it.
fn relabel(rng: &mut SplitMix64, labels: &mut super::spec::Labels, keys: &[(&str, &[&str])]) {
    for (key, values) in keys {
        if rng.chance(60) {
            labels.insert((*key).to_owned(), (*rng.pick(values)).to_owned());
        } else {
            labels.remove(*key);
        }
    }
}

struct Generator {
    ips: Vec<Ipv4Addr>,
    subnet: Cidr,
}

impl Generator {
    fn policy(&self, rng: &mut SplitMix64, namespace: &str, i: usize) -> Policy {
        let mut p = Policy::new(
            namespace,
            &format!("random-{i}"),
            Self::selector(rng, POD_LABELS),
        );
        for _ in 0..rng.below(3) {
            p.ingress.push(self.rule(rng));
        }
        for _ in 0..rng.below(3) {
            p.egress.push(self.rule(rng));
        }
        p.policy_types = match rng.below(6) {
            0 | 1 => None,
            // An empty list is defaulted like an absent one.
            5 => Some(Vec::new()),
            2 => Some(vec![PolicyType::Ingress]),
            3 => Some(vec![PolicyType::Egress]),
            _ => Some(if rng.chance(50) {
                vec![PolicyType::Ingress, PolicyType::Egress]
            } else {
                vec![PolicyType::Egress, PolicyType::Ingress]
            }),
        };
        p
    }

    /// Mostly narrow selectors (one or two terms), sometimes `{}`.
    fn selector(rng: &mut SplitMix64, pool: &[(&str, &[&str])]) -> Selector {
        let mut s = Selector::all();
        if rng.chance(20) {
            return s;
        }
        for _ in 0..rng.below(2) + usize::from(rng.chance(50)) {
            let (key, values) = rng.pick(pool);
            s.match_labels
                .insert((*key).to_owned(), (*rng.pick(values)).to_owned());
        }
        for _ in 0..rng.below(3) {
            let (key, values) = rng.pick(pool);
            let operator = *rng.pick(&[
                Operator::In,
                Operator::NotIn,
                Operator::Exists,
                Operator::DoesNotExist,
            ]);
            let values = match operator {
                Operator::In | Operator::NotIn => rng
                    .some_of(values, 1, 2)
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
                Operator::Exists | Operator::DoesNotExist => Vec::new(),
            };
            s.match_expressions.push(super::spec::Requirement {
                key: (*key).to_owned(),
                operator,
                values,
            });
        }
        s
    }

    fn rule(&self, rng: &mut SplitMix64) -> Rule {
        let peers = match rng.below(10) {
            0 | 1 => None,
            2 => Some(Vec::new()),
            _ => Some((0..=rng.below(3)).map(|_| self.peer(rng)).collect()),
        };
        let ports = match rng.below(10) {
            0..=2 => None,
            3 => Some(Vec::new()),
            _ => Some((0..=rng.below(2)).map(|_| Self::port(rng)).collect()),
        };
        Rule { peers, ports }
    }

    fn peer(&self, rng: &mut SplitMix64) -> Peer {
        match rng.below(10) {
            0..=3 => Peer::pods(Self::selector(rng, POD_LABELS)),
            4 | 5 => Peer::namespaces(Self::selector(rng, NAMESPACE_LABELS)),
            6 | 7 => Peer::pods_in(
                Self::selector(rng, NAMESPACE_LABELS),
                Self::selector(rng, POD_LABELS),
            ),
            _ => self.ip_block(rng),
        }
    }

    /// A block around the pods (the subnet, a part of it holding some pods, one pod, the
    /// whole internet, or a range with no pod), minus up to three strict sub-blocks that
    /// each hold a pod.
    fn ip_block(&self, rng: &mut SplitMix64) -> Peer {
        let pod = *rng.pick(&self.ips);
        let cidr = match rng.below(6) {
            0 | 1 => self.subnet,
            2 => Cidr::new(pod, 25 + rng.below(5) as u8),
            3 => Cidr::host(pod),
            4 => Cidr::new(Ipv4Addr::UNSPECIFIED, 0),
            _ => Cidr::new(Ipv4Addr::new(192, 168, 0, 0), 16),
        };
        let mut except = Vec::new();
        if cidr.len < 32 {
            for _ in 0..rng.below(4) {
                let inside: Vec<Ipv4Addr> = self
                    .ips
                    .iter()
                    .copied()
                    .filter(|ip| cidr.contains_ip(*ip))
                    .collect();
                let Some(&ip) = (!inside.is_empty()).then(|| rng.pick(&inside)) else {
                    break;
                };
                let len = (cidr.len + 1).max(24) + rng.below(9) as u8;
                let e = Cidr::new(ip, len.min(32));
                if e.len > cidr.len && !except.contains(&e) {
                    except.push(e);
                }
            }
        }
        Peer::ip_block(cidr, &except)
    }

    fn port(rng: &mut SplitMix64) -> PolicyPort {
        let protocol = match rng.below(10) {
            0..=2 => None,
            3..=5 => Some(Protocol::Tcp),
            6..=8 => Some(Protocol::Udp),
            _ => Some(Protocol::Sctp),
        };
        let (port, end_port) = match rng.below(10) {
            0 | 1 => (None, None),
            2..=4 => (
                Some(PortRef::Name((*rng.pick(PORT_NAMES)).to_owned())),
                None,
            ),
            _ => {
                let start = *rng.pick(&[79, 80, 80, 81, 81, 82]);
                let end = rng.chance(35).then(|| start + *rng.pick(&[0, 1, 1, 2, 10]));
                (Some(PortRef::Number(start)), end)
            }
        };
        PolicyPort {
            protocol,
            port,
            end_port,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::spec::{ContainerPort, Namespace, PodInfo, labels};

    fn base() -> (World, Cidr) {
        let mut pods = Vec::new();
        for (n, ns) in ["x", "y", "z"].iter().enumerate() {
            for (m, name) in ["a", "b", "c"].iter().enumerate() {
                pods.push(PodInfo {
                    namespace: (*ns).into(),
                    name: (*name).into(),
                    labels: labels(&[("pod", name)]),
                    ip: Ipv4Addr::new(10, 100, 0, 2 + (3 * n + m) as u8),
                    ports: vec![ContainerPort {
                        name: "serve-80-tcp".into(),
                        port: 80,
                        protocol: Protocol::Tcp,
                    }],
                });
            }
        }
        let namespaces = ["x", "y", "z"]
            .iter()
            .map(|n| Namespace {
                name: (*n).into(),
                labels: labels(&[("ns", n), ("kubernetes.io/metadata.name", n)]),
            })
            .collect();
        (World { namespaces, pods }, "10.100.0.0/24".parse().unwrap())
    }

    #[test]
    fn generated_policies_are_valid_and_varied() {
        let (world, subnet) = base();
        let (mut excepts, mut named, mut ranges, mut exprs, mut absent_types) = (0, 0, 0, 0, 0);
        for seed in 0..2000 {
            let g = generate(seed, &world, subnet);
            assert!((1..=4).contains(&g.policies.len()));
            for p in &g.policies {
                assert_eq!(p.problems(), Vec::<String>::new(), "seed {seed}: {p:#?}");
                absent_types += usize::from(p.policy_types.is_none());
                exprs += p.pod_selector.match_expressions.len();
                for rule in p.ingress.iter().chain(&p.egress) {
                    for peer in rule.peers.iter().flatten() {
                        if let Peer::IpBlock(b) = peer {
                            excepts += b.except.len();
                            for e in &b.except {
                                assert!(b.cidr.contains(e) && e.len > b.cidr.len, "seed {seed}");
                            }
                        }
                    }
                    for port in rule.ports.iter().flatten() {
                        match (&port.port, port.end_port) {
                            (Some(PortRef::Name(_)), end) => {
                                assert_eq!(end, None, "seed {seed}: endPort with a named port");
                                named += 1;
                            }
                            (Some(PortRef::Number(s)), Some(e)) => {
                                assert!(e >= *s, "seed {seed}");
                                ranges += 1;
                            }
                            (None, end) => assert_eq!(end, None, "seed {seed}"),
                            _ => {}
                        }
                    }
                }
            }
            for (pod, base_pod) in g.world.pods.iter().zip(&world.pods) {
                assert_eq!(
                    pod.labels.get("pod"),
                    base_pod.labels.get("pod"),
                    "fixed label"
                );
            }
        }
        for (what, n) in [
            ("excepts", excepts),
            ("named ports", named),
            ("ranges", ranges),
            ("expressions", exprs),
            ("absent policyTypes", absent_types),
        ] {
            assert!(n > 100, "only {n} {what} in 2000 scenarios");
        }
    }

    #[test]
    fn a_seed_replays_the_same_scenario() {
        let (world, subnet) = base();
        let (a, b) = (generate(42, &world, subnet), generate(42, &world, subnet));
        assert_eq!(a.policies, b.policies);
        assert_eq!(a.world, b.world);
        assert_ne!(generate(43, &world, subnet).policies, a.policies);
    }
}
