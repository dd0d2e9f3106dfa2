//! The conntrack's health families: entries now, entries the programs created, entries the
//! LRU evicted (derived: the kernel does not report evictions), and what the agent's garbage
//! collection deleted per flow map.
use std::{fmt, sync::Mutex};

use prometheus_client::{
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};

/// The service conntrack (`CONNTRACK`) at a scrape, as the agent read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackHealth {
    /// Entries now, counted by walking the map's keys; `None` when it could not be read.
    pub entries: Option<u64>,
    /// Entries the programs created (`counter::CT_CREATED`), since the maps were created.
    pub created: u64,
    /// Entries the agent's garbage collection deleted since the agent started, per flow map
    /// (`CONNTRACK`'s among them).
    pub gc_deleted: Vec<(&'static str, u64)>,
    /// Entries the LRU evicted since the first scrape of this agent ([`Evictions`]); set by
    /// the endpoint at each scrape.
    pub evictions: u64,
}

impl ConntrackHealth {
    /// What the garbage collection deleted from `CONNTRACK`.
    fn gc_deleted_conntrack(&self) -> u64 {
        self.gc_deleted
            .iter()
            .find(|(map, _)| *map == "CONNTRACK")
            .map_or(0, |(_, n)| *n)
    }
}

/// Entries gone from a map other than by deletion: `created - deleted - entries`, clamped at
/// 0. Exact when nothing changes the map while `entries` is counted: every entry the programs
/// created is there still, was deleted (the programs never delete `CONNTRACK` entries; the
/// garbage collection does), or was evicted.
#[must_use]
pub fn evictions(created: u64, deleted: u64, entries: u64) -> u64 {
    created.saturating_sub(deleted).saturating_sub(entries)
}

/// Keeps `ferrovia_conntrack_evictions_total` a counter. Counted from the first scrape with the
/// map readable: the garbage collection's deletions restart at 0 with the agent while the
/// created count and the entries live on in the pinned maps, so what a previous run deleted
/// (or the LRU evicted then) is the baseline, not evictions of this run. A walk of a busy map
/// is a snapshot: a scrape's value never goes below the last one's.
#[derive(Debug, Default)]
pub(super) struct Evictions {
    /// (baseline, last value exported).
    state: Mutex<Option<(u64, u64)>>,
}

impl Evictions {
    /// Sets `ct.evictions` from this scrape's counts.
    pub(super) fn observe(&self, ct: &mut ConntrackHealth) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entries) = ct.entries {
            let total = evictions(ct.created, ct.gc_deleted_conntrack(), entries);
            let (baseline, last) = state.get_or_insert((total, 0));
            *last = (*last).max(total.saturating_sub(*baseline));
        }
        ct.evictions = state.map_or(0, |(_, last)| last);
    }
}

/// The conntrack families, at the end of the health families.
pub(super) fn encode(encoder: &mut DescriptorEncoder, ct: &ConntrackHealth) -> fmt::Result {
    if let Some(entries) = ct.entries {
        encoder
            .encode_descriptor(
                "conntrack_entries",
                "Entries in the service conntrack (CONNTRACK) now, two per translated flow.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&entries)?;
    }
    for (name, help, value) in [
        (
            "conntrack_created",
            "Service conntrack entries the programs created (an overwrite of an existing \
             tuple's entry is none), since the pinned maps were created.",
            ct.created,
        ),
        (
            "conntrack_evictions",
            "Service conntrack entries the LRU evicted, derived (the kernel does not report \
             evictions): created - deleted by the garbage collection - entries now, since the \
             agent's first scrape; exact when the map is quiescent while counted.",
            ct.evictions,
        ),
    ] {
        encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    let mut family = encoder.encode_descriptor(
        "conntrack_gc_deleted",
        "Expired entries the agent's garbage collection deleted, per flow map \
         (--conntrack-gc-interval), since the agent started.",
        None,
        MetricType::Counter,
    )?;
    for (map, n) in &ct.gc_deleted {
        family
            .encode_family(&[("map", *map)])?
            .encode_counter::<NoLabelSet, _, u64>(n, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(entries: Option<u64>, created: u64, deleted: u64) -> ConntrackHealth {
        ConntrackHealth {
            entries,
            created,
            gc_deleted: vec![("CONNTRACK", deleted), ("POLICY_CT", 1_000)],
            evictions: 0,
        }
    }

    #[test]
    fn evictions_are_what_was_created_and_neither_deleted_nor_left() {
        assert_eq!(evictions(200, 0, 64), 136);
        assert_eq!(evictions(200, 30, 64), 106);
        assert_eq!(
            evictions(10, 0, 12),
            0,
            "clamped (entries not counted as created)"
        );
    }

    #[test]
    fn exported_evictions_start_at_the_first_scrape_and_never_go_down() {
        let e = Evictions::default();
        let scrape = |c: ConntrackHealth| {
            let mut c = c;
            e.observe(&mut c);
            c.evictions
        };
        assert_eq!(scrape(ct(None, 50, 0)), 0, "unknown before the map is read");
        // A restarted agent: 500 created, 100 entries left, the rest gone before it started.
        assert_eq!(scrape(ct(Some(100), 500, 0)), 0);
        // 100 more created, 20 collected, 150 entries: 30 evicted since.
        assert_eq!(scrape(ct(Some(150), 600, 20)), 30);
        // A walk that saw more entries than there were: no decrease.
        assert_eq!(scrape(ct(Some(160), 600, 20)), 30);
        // An unreadable map changes nothing.
        assert_eq!(scrape(ct(None, 700, 20)), 30);
        assert_eq!(scrape(ct(Some(150), 700, 40)), 110);
    }
}
