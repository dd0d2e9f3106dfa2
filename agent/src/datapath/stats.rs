//! The per-pod traffic counters (`POD_STATS`): an entry per attached pod interface, created
//! at attach and removed when the pod goes, read (summed over CPUs) at scrape time.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuHashMap, PerCpuValues};
use ferrovia_common::{DirStats, FlowLimit, FrontendStats, PodStats, flow};

/// `POD_STATS`, keyed by the pod's host-side interface index, and beside it the pod's flow
/// events' token bucket (`FLOW_LIMIT`, same key, same life).
pub struct PodStatsMap {
    map: PerCpuHashMap<MapData, u32, PodStats>,
    limits: PerCpuHashMap<MapData, u32, FlowLimit>,
}

impl PodStatsMap {
    pub(super) fn new(
        map: PerCpuHashMap<MapData, u32, PodStats>,
        limits: PerCpuHashMap<MapData, u32, FlowLimit>,
    ) -> Self {
        Self { map, limits }
    }

    /// Makes sure `ifindex` has its entries (zeros when new; a restarted agent keeps counting
    /// where the previous run left off). A bucket starts full (its last refill at time 0).
    pub fn ensure(&mut self, ifindex: u32) -> Result<()> {
        ensure_zeroed(&mut self.map, ifindex, "POD_STATS")?;
        ensure_zeroed(&mut self.limits, ifindex, "FLOW_LIMIT")
    }

    /// Forgets `ifindex`'s counters; an unknown index is not an error.
    pub fn remove(&mut self, ifindex: u32) {
        let _ = self.map.remove(&ifindex);
        let _ = self.limits.remove(&ifindex);
    }

    /// Removes the entries of interfaces not in `keep` (pods gone while the agent was down).
    /// The socket hooks' flow-event bucket stays.
    pub fn retain(&mut self, keep: &BTreeSet<u32>) -> usize {
        let mut limits = keep.clone();
        limits.insert(flow::SOCKET_BUCKET);
        retain_keys(&mut self.limits, &limits);
        retain_keys(&mut self.map, keep)
    }

    /// Makes sure the socket hooks' flow-event bucket exists.
    pub fn ensure_socket_bucket(&mut self) -> Result<()> {
        ensure_zeroed(&mut self.limits, flow::SOCKET_BUCKET, "FLOW_LIMIT")
    }

    /// Every entry, summed over CPUs.
    pub fn read_all(&self) -> Result<BTreeMap<u32, PodStats>> {
        let mut out = BTreeMap::new();
        for item in &self.map {
            let (ifindex, values) = item.context("reading POD_STATS")?;
            out.insert(ifindex, sum(values.iter()));
        }
        Ok(out)
    }
}

/// Makes sure `map` has a (zeroed) entry for `key`.
fn ensure_zeroed<V: aya::Pod + Default>(
    map: &mut PerCpuHashMap<MapData, u32, V>,
    key: u32,
    name: &str,
) -> Result<()> {
    if map.get(&key, 0).is_ok() {
        return Ok(());
    }
    let zeros = PerCpuValues::try_from(vec![V::default(); nr_cpus()?])
        .with_context(|| format!("per-CPU zero values for {name}"))?;
    map.insert(key, zeros, 0)
        .with_context(|| format!("creating the {name} entry of ifindex {key}"))
}

/// Removes the keys of `map` not in `keep`; returns how many went.
fn retain_keys<V: aya::Pod>(
    map: &mut PerCpuHashMap<MapData, u32, V>,
    keep: &BTreeSet<u32>,
) -> usize {
    let stale: Vec<u32> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep.contains(k))
        .collect();
    for k in &stale {
        let _ = map.remove(k);
    }
    stale.len()
}

/// The sum of per-CPU values.
fn sum<'a>(values: impl Iterator<Item = &'a PodStats>) -> PodStats {
    let mut total = PodStats::default();
    for v in values {
        add(&mut total.ingress, &v.ingress);
        add(&mut total.egress, &v.egress);
    }
    total
}

fn add(to: &mut DirStats, v: &DirStats) {
    to.packets += v.packets;
    to.bytes += v.bytes;
    to.conns_tcp += v.conns_tcp;
    to.conns_udp += v.conns_udp;
    to.malformed += v.malformed;
    to.drop_policy += v.drop_policy;
    to.drop_no_endpoints += v.drop_no_endpoints;
    to.drop_ct_full += v.drop_ct_full;
    to.drop_xlate_error += v.drop_xlate_error;
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| anyhow::anyhow!("possible CPUs: {e}"))
}

/// `FRONTEND_STATS`, keyed by a frontend's `service_id`: entries made by the programs,
/// removed here when their frontend goes.
pub struct FrontendStatsMap {
    map: PerCpuHashMap<MapData, u32, FrontendStats>,
}

impl FrontendStatsMap {
    pub(super) fn new(map: PerCpuHashMap<MapData, u32, FrontendStats>) -> Self {
        Self { map }
    }

    /// Removes the entries of frontends not in `live` (service ids); returns how many went.
    pub fn retain(&mut self, live: &BTreeSet<u32>) -> usize {
        retain_keys(&mut self.map, live)
    }

    /// Every entry, summed over CPUs.
    pub fn read_all(&self) -> Result<BTreeMap<u32, FrontendStats>> {
        let mut out = BTreeMap::new();
        for item in &self.map {
            let (id, values) = item.context("reading FRONTEND_STATS")?;
            let mut total = FrontendStats::default();
            for v in values.iter() {
                total.connections += v.connections;
                total.rejected += v.rejected;
            }
            out.insert(id, total);
        }
        Ok(out)
    }
}
