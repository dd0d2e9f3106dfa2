//! The per-pod traffic counters (`POD_STATS`): an entry per attached pod interface, created
//! at attach and removed when the pod goes, read (summed over CPUs) at scrape time.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuHashMap, PerCpuValues};
use ferrovia_common::{DirStats, FrontendStats, PodStats};

/// `POD_STATS`, keyed by the pod's host-side interface index.
pub struct PodStatsMap {
    map: PerCpuHashMap<MapData, u32, PodStats>,
}

impl PodStatsMap {
    pub(super) fn new(map: PerCpuHashMap<MapData, u32, PodStats>) -> Self {
        Self { map }
    }

    /// Makes sure `ifindex` has an entry (zeros when new; a restarted agent keeps counting
    /// where the previous run left off).
    pub fn ensure(&mut self, ifindex: u32) -> Result<()> {
        if self.map.get(&ifindex, 0).is_ok() {
            return Ok(());
        }
        let zeros = PerCpuValues::try_from(vec![PodStats::default(); nr_cpus()?])
            .context("per-CPU zero values for POD_STATS")?;
        self.map
            .insert(ifindex, zeros, 0)
            .with_context(|| format!("creating the POD_STATS entry of ifindex {ifindex}"))
    }

    /// Forgets `ifindex`'s counters; an unknown index is not an error.
    pub fn remove(&mut self, ifindex: u32) {
        let _ = self.map.remove(&ifindex);
    }

    /// Removes the entries of interfaces not in `keep` (pods gone while the agent was down).
    pub fn retain(&mut self, keep: &BTreeSet<u32>) -> usize {
        retain_keys(&mut self.map, keep)
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
