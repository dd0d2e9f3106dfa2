//! The conntrack garbage collection's schedule and totals (the sweep itself is
//! `datapath::conntrack`'s): every flow map swept on a blocking thread over handles opened from
//! the pins, so neither the node's lock nor an async thread waits for the walk.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use super::Node;
use crate::datapath::conntrack::{FlowMap, sweep};

/// Entries the garbage collection deleted since the agent started, per flow map.
#[derive(Debug, Default)]
pub(super) struct GcTotals([AtomicU64; FlowMap::ALL.len()]);

impl GcTotals {
    /// `map`'s total, which the sweep adds to as it deletes.
    fn of(&self, map: FlowMap) -> &AtomicU64 {
        &self.0[map as usize]
    }

    /// Per map, in [`FlowMap::ALL`]'s order.
    pub(super) fn read(&self) -> Vec<(&'static str, u64)> {
        FlowMap::ALL
            .iter()
            .map(|m| (m.name(), self.of(*m).load(Ordering::Relaxed)))
            .collect()
    }
}

impl Node {
    /// Sweeps the flow maps every `every`, the first time one period from now, for as long as
    /// the agent runs.
    pub fn start_conntrack_gc(self: &Arc<Self>, every: Duration) {
        let node = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            // A sweep longer than the period delays the next one rather than bunching them.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                node.collect_conntrack().await;
            }
        });
    }

    /// Deletes the expired entries of every flow map now; returns what went from each (in
    /// [`FlowMap::ALL`]'s order; a map that could not be swept is logged and counts 0).
    pub async fn collect_conntrack(&self) -> Vec<(FlowMap, u64)> {
        let root = self.bpffs_root.clone();
        let totals = Arc::clone(&self.conntrack_gc);
        let swept = tokio::task::spawn_blocking(move || {
            FlowMap::ALL.map(|map| (map, sweep(&root, map, totals.of(map))))
        })
        .await;
        let Ok(swept) = swept else {
            tracing::warn!("the conntrack garbage collection's thread failed");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (map, result) in swept {
            match result {
                Ok(n) => out.push((map, n)),
                Err(e) => tracing::warn!(map = map.name(), "conntrack garbage collection: {e:#}"),
            }
        }
        tracing::debug!(?out, "expired flows collected");
        out
    }
}
