//! Conntrack garbage collection. The programs never delete an expired flow: they ignore it, and
//! overwrite it when its tuple comes again, so a table fills with the dead until LRU pressure
//! evicts, the live and the dead alike. [`sweep`] walks one of the flow maps from its pin and
//! deletes the entries the programs judge expired, with their own timeouts
//! ([`ferrovia_common::ct_timeout_ns`]).
//!
//! Blocking (two or three syscalls per entry): run it on a blocking thread, without the node's
//! lock. Nothing stops the programs meanwhile: the walk collects keys, and each entry is then
//! read and judged (with the clock read after it) just before it is deleted, so one a packet
//! refreshed during the walk stays.
use std::{
    collections::BTreeMap,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context as _, Result};
use aya::{
    Pod,
    maps::{HashMap, Map, MapData},
};
use ferrovia_common::{
    AffinityKey, AffinityValue, CT_TIMEOUT_UDP_NS, CtKey, CtValue, PolicyCtValue,
    SVC_FLAG_AFFINITY, ServiceKey, ServiceValue, age_ns, ct_timeout_ns,
};

/// A map the sweep cleans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FlowMap {
    /// The service conntrack (translations).
    Conntrack,
    /// The policy conntrack (flows whose replies are allowed back).
    PolicyCt,
    /// UDP flows seen at pods, for their new-connection counts.
    UdpFlows,
    /// `ClientIP` affinity records.
    Affinity,
}

impl FlowMap {
    pub const ALL: [Self; 4] = [
        Self::Conntrack,
        Self::PolicyCt,
        Self::UdpFlows,
        Self::Affinity,
    ];

    /// The map's name (in the object, its pin, the metrics' `map` label).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Conntrack => "CONNTRACK",
            Self::PolicyCt => "POLICY_CT",
            Self::UdpFlows => "UDP_FLOWS",
            Self::Affinity => "AFFINITY",
        }
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`, which the entries' ages count in.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// A `CONNTRACK` entry is dead as `still_alive` judges it: idle longer than its timeout
/// (closing, else TCP or UDP by the key's protocol).
#[must_use]
pub fn conntrack_expired(key: &CtKey, value: &CtValue, now: u64) -> bool {
    age_ns(now, value.last_seen_ns) > ct_timeout_ns(value.flags, key.proto)
}

/// A `POLICY_CT` entry: the same judgement (`policy.rs`'s `alive` is `still_alive`).
#[must_use]
pub fn policy_ct_expired(key: &CtKey, value: &PolicyCtValue, now: u64) -> bool {
    age_ns(now, value.last_seen_ns) > ct_timeout_ns(value.flags, key.proto)
}

/// A `UDP_FLOWS` entry: `stats.rs`'s `seen` takes a flow as new once its age reaches the UDP
/// timeout.
#[must_use]
pub fn udp_flow_expired(last_seen_ns: u64, now: u64) -> bool {
    age_ns(now, last_seen_ns) >= CT_TIMEOUT_UDP_NS
}

/// An `AFFINITY` record, given the affinity timeout (s) of each frontend that has affinity now
/// (by service id): dead when older than its frontend's timeout, as `select_backend` judges
/// it, or when its frontend is gone or has no affinity any more (nothing reads it then).
#[must_use]
pub fn affinity_expired(
    key: &AffinityKey,
    value: &AffinityValue,
    timeouts_s: &BTreeMap<u32, u32>,
    now: u64,
) -> bool {
    timeouts_s
        .get(&key.service_id)
        .is_none_or(|&s| age_ns(now, value.last_used_ns) > u64::from(s) * 1_000_000_000)
}

/// Deletes the expired entries of `map` pinned under `bpffs_root`; returns how many went.
///
/// Each deletion is added to `deleted` as it happens, before its syscall (and taken back if
/// it fails): a scrape that counts the map's entries meanwhile never sees an entry gone that
/// `deleted` does not account for, which would pass for an eviction.
pub fn sweep(bpffs_root: &Path, map: FlowMap, deleted: &AtomicU64) -> Result<u64> {
    let pin = bpffs_root.join(map.name());
    let nothing = || Ok(());
    match map {
        FlowMap::Conntrack => sweep_map(&pin, deleted, nothing, |(), k, v: &CtValue, now| {
            conntrack_expired(k, v, now)
        }),
        FlowMap::PolicyCt => sweep_map(&pin, deleted, nothing, |(), k, v: &PolicyCtValue, now| {
            policy_ct_expired(k, v, now)
        }),
        FlowMap::UdpFlows => sweep_map(&pin, deleted, nothing, |(), _: &CtKey, v: &u64, now| {
            udp_flow_expired(*v, now)
        }),
        // `SERVICES` is read after the walk: a record the walk found names a frontend that
        // existed before, so one missing from that read is gone (ids are not reused while the
        // agent runs), never one too new to have been seen.
        FlowMap::Affinity => sweep_map(
            &pin,
            deleted,
            || affinity_timeouts(bpffs_root),
            |timeouts, k, v: &AffinityValue, now| affinity_expired(k, v, timeouts, now),
        ),
    }
}

/// The affinity timeout of every frontend with affinity, by service id, from `SERVICES`.
fn affinity_timeouts(bpffs_root: &Path) -> Result<BTreeMap<u32, u32>> {
    let (services, _) = open::<ServiceKey, ServiceValue>(&bpffs_root.join("SERVICES"))?;
    let mut out = BTreeMap::new();
    for item in &services {
        let (key, value) = item.context("reading SERVICES")?;
        if key.slot == 0 && value.flags & SVC_FLAG_AFFINITY != 0 {
            out.insert(value.service_id, value.affinity_timeout_s);
        }
    }
    Ok(out)
}

/// The hash (or LRU hash) map pinned at `pin`, and its capacity.
fn open<K: Pod, V: Pod>(pin: &Path) -> Result<(HashMap<MapData, K, V>, usize)> {
    let data = MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let capacity = data.info().map_or(usize::MAX, |i| i.max_entries() as usize);
    let map = Map::from_map_data(data).with_context(|| pin.display().to_string())?;
    let map =
        HashMap::try_from(map).with_context(|| format!("{}: not a hash map", pin.display()))?;
    Ok((map, capacity))
}

/// Walks the keys of the map at `pin`, then (with what `after_walk` read) reads each entry
/// again and deletes it when `expired` (context, key, value, now) says it is dead. The walk
/// visits at most as many keys as the map holds: a key deleted under it (LRU pressure)
/// restarts the kernel's walk from the first key, so a busy map may be swept in part, never
/// endlessly.
fn sweep_map<K: Pod, V: Pod, J>(
    pin: &Path,
    total: &AtomicU64,
    after_walk: impl FnOnce() -> Result<J>,
    expired: impl Fn(&J, &K, &V, u64) -> bool,
) -> Result<u64> {
    let (mut map, capacity) = open::<K, V>(pin)?;
    let keys: Vec<K> = map
        .keys()
        .take(capacity)
        .collect::<Result<_, _>>()
        .with_context(|| format!("walking {}", pin.display()))?;
    let context = after_walk()?;
    let mut deleted = 0;
    for key in &keys {
        // Read now, with the clock after it: a packet may have refreshed it during the walk.
        let Ok(value) = map.get(key, 0) else {
            continue;
        };
        if !expired(&context, key, &value, monotonic_ns()) {
            continue;
        }
        // A race the kernel gives no way to close (no compare-and-delete): a packet starting
        // a new flow on this tuple between the read and the delete loses its fresh entry; its
        // next packet makes another (a TCP connection may then be balanced anew).
        total.fetch_add(1, Ordering::Relaxed);
        if map.remove(key).is_ok() {
            deleted += 1;
        } else {
            total.fetch_sub(1, Ordering::Relaxed);
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use ferrovia_common::{
        CT_FLAG_CLOSING, CT_TIMEOUT_CLOSING_NS, CT_TIMEOUT_TCP_NS, PROTO_TCP, PROTO_UDP,
    };

    use super::*;

    const S: u64 = 1_000_000_000;

    fn ct(proto: u8, flags: u16, last_seen_ns: u64) -> (CtKey, CtValue) {
        (
            CtKey {
                proto,
                ..CtKey::default()
            },
            CtValue {
                flags,
                last_seen_ns,
                ..CtValue::default()
            },
        )
    }

    #[test]
    fn conntrack_entries_expire_after_the_programs_timeouts() {
        let now = 100_000 * S;
        let cases = [
            ("TCP at its timeout", PROTO_TCP, 0, CT_TIMEOUT_TCP_NS, false),
            ("TCP past it", PROTO_TCP, 0, CT_TIMEOUT_TCP_NS + 1, true),
            ("UDP at 120 s", PROTO_UDP, 0, 120 * S, false),
            ("UDP past 120 s", PROTO_UDP, 0, 120 * S + 1, true),
            (
                "closing TCP past 60 s",
                PROTO_TCP,
                CT_FLAG_CLOSING,
                CT_TIMEOUT_CLOSING_NS + 1,
                true,
            ),
            (
                "closing TCP at 60 s",
                PROTO_TCP,
                CT_FLAG_CLOSING,
                CT_TIMEOUT_CLOSING_NS,
                false,
            ),
        ];
        for (intent, proto, flags, age_ns, expired) in cases {
            let (k, v) = ct(proto, flags, now - age_ns);
            assert_eq!(conntrack_expired(&k, &v, now), expired, "{intent}");
            let p = PolicyCtValue {
                flags,
                last_seen_ns: now - age_ns,
                ..PolicyCtValue::default()
            };
            assert_eq!(policy_ct_expired(&k, &p, now), expired, "{intent} (policy)");
        }
        // Refreshed after the clock was read: alive, not 2^64 ns old.
        let (k, v) = ct(PROTO_UDP, 0, now + 5);
        assert!(!conntrack_expired(&k, &v, now));
    }

    #[test]
    fn udp_flows_expire_when_their_age_reaches_the_timeout() {
        let now = 1_000 * S;
        assert!(!udp_flow_expired(now - CT_TIMEOUT_UDP_NS + 1, now));
        assert!(udp_flow_expired(now - CT_TIMEOUT_UDP_NS, now));
        assert!(!udp_flow_expired(now + 1, now));
        // Written as `now - age` on a machine up for less than that age (a test's entry, a
        // VM that just booted): the age is still that, as the programs read it.
        let early = 5 * S;
        assert!(udp_flow_expired(
            early.wrapping_sub(CT_TIMEOUT_UDP_NS),
            early
        ));
        assert!(!udp_flow_expired(
            early.wrapping_sub(CT_TIMEOUT_UDP_NS - 1),
            early
        ));
    }

    #[test]
    fn affinity_records_live_while_their_frontend_keeps_affinity_and_their_timeout() {
        let now = 1_000 * S;
        let timeouts: BTreeMap<u32, u32> = [(7, 10)].into_iter().collect();
        let record = |service_id, age_s: u64| {
            (
                AffinityKey {
                    service_id,
                    ..AffinityKey::default()
                },
                AffinityValue {
                    last_used_ns: now - age_s * S,
                    ..AffinityValue::default()
                },
            )
        };
        let (k, v) = record(7, 10);
        assert!(!affinity_expired(&k, &v, &timeouts, now), "at its timeout");
        let (k, v) = record(7, 11);
        assert!(affinity_expired(&k, &v, &timeouts, now), "past it");
        let (k, v) = record(8, 0);
        assert!(
            affinity_expired(&k, &v, &timeouts, now),
            "its frontend is gone or has no affinity"
        );
    }
}
