//! The per-backend selections (`BACKEND_STATS`): new connections given each backend id, made
//! by the programs at a backend's first selection and removed here when the service writer
//! frees the id, read (summed over CPUs) at scrape time.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuHashMap};

/// `BACKEND_STATS`, keyed by backend id.
pub struct BackendStatsMap {
    map: PerCpuHashMap<MapData, u32, u64>,
}

impl BackendStatsMap {
    pub(super) fn new(map: PerCpuHashMap<MapData, u32, u64>) -> Self {
        Self { map }
    }

    /// Forgets the selections of freed backend ids. A connection counted between the id's
    /// `BACKENDS` removal and this one can leave an entry behind: this run never gives the id
    /// out again, and the next start prunes it ([`BackendStatsMap::retain`]).
    pub fn remove(&mut self, ids: &[u32]) {
        for id in ids {
            let _ = self.map.remove(id);
        }
    }

    /// Removes the entries of ids not in `live`; returns how many went.
    pub fn retain(&mut self, live: &BTreeSet<u32>) -> usize {
        let stale: Vec<u32> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !live.contains(id))
            .collect();
        self.remove(&stale);
        stale.len()
    }

    /// Every entry, summed over CPUs.
    pub fn read_all(&self) -> Result<BTreeMap<u32, u64>> {
        self.map
            .iter()
            .map(|item| {
                let (id, values) = item.context("reading BACKEND_STATS")?;
                Ok((id, values.iter().sum()))
            })
            .collect()
    }
}
