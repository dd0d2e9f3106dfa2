//! What the pinned maps hold, for `ferrovia maps`: each map of [`MAP_NAMES`] opened from its
//! pin under the bpffs root, with the kernel's view of it (`BPF_OBJ_GET_INFO_BY_FD`: type,
//! sizes, capacity) and its current entries, counted by walking its keys
//! (`BPF_MAP_GET_NEXT_KEY`). Read-only: nothing here writes a map.
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, MapType};

use super::MAP_NAMES;

/// One map the agent pins, and what the kernel says of it.
#[derive(Clone, Debug, PartialEq)]
pub struct PinnedMap {
    /// The map's name in the BPF object, also its pin's file name.
    pub name: &'static str,
    pub pin: PathBuf,
    /// The map, or why it could not be read (e.g. the pin is missing).
    pub stats: Result<MapStats, String>,
}

/// The kernel's view of a map and how full it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapStats {
    /// The kernel's map id.
    pub id: u32,
    /// The map type as bpftool spells it (`hash`, `lru_hash`, `lpm_trie`, `percpu_array`…).
    pub kind: String,
    pub key_size: u32,
    /// One CPU's value size for per-CPU maps.
    pub value_size: u32,
    pub max_entries: u32,
    /// Keys present (a per-CPU map's keys count once; an array always has `max_entries`).
    pub entries: u32,
}

impl MapStats {
    /// `entries / max_entries`, 0 to 1 (0 for a map without capacity).
    #[must_use]
    pub fn fill(&self) -> f64 {
        if self.max_entries == 0 {
            0.0
        } else {
            f64::from(self.entries) / f64::from(self.max_entries)
        }
    }
}

/// Every map of [`MAP_NAMES`] pinned under `bpffs_root`, in that order. A map that cannot be
/// read is reported with its error, not left out. Blocking: one syscall per key.
#[must_use]
pub fn pinned_maps(bpffs_root: &Path) -> Vec<PinnedMap> {
    MAP_NAMES
        .iter()
        .map(|&name| {
            let pin = bpffs_root.join(name);
            let stats = stats(&pin).map_err(|e| format!("{e:#}"));
            PinnedMap { name, pin, stats }
        })
        .collect()
}

/// Opens the pin and asks the kernel about the map.
fn stats(pin: &Path) -> Result<MapStats> {
    let map = MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let info = map.info().context("BPF_OBJ_GET_INFO_BY_FD")?;
    let kind = info
        .map_type()
        .map_or_else(|e| format!("unknown ({e})"), |t| kind_name(t).to_owned());
    // Maps without keys (ring buffers, queues) hold no entries one could count.
    let entries = if info.key_size() == 0 {
        0
    } else {
        count_keys(map.fd().as_fd(), info.key_size(), info.max_entries())
            .context("BPF_MAP_GET_NEXT_KEY")?
    };
    Ok(MapStats {
        id: info.id(),
        kind,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        entries,
    })
}

/// bpftool's name of a map type (`libbpf_bpf_map_type_str`), for the types the agent uses
/// and their relatives; others by aya's name.
fn kind_name(kind: MapType) -> &'static str {
    match kind {
        MapType::Hash => "hash",
        MapType::Array => "array",
        MapType::PerCpuHash => "percpu_hash",
        MapType::PerCpuArray => "percpu_array",
        MapType::LruHash => "lru_hash",
        MapType::LruPerCpuHash => "lru_percpu_hash",
        MapType::LpmTrie => "lpm_trie",
        MapType::RingBuf => "ringbuf",
        MapType::PerfEventArray => "perf_event_array",
        MapType::ProgramArray => "prog_array",
        MapType::Queue => "queue",
        MapType::Stack => "stack",
        MapType::BloomFilter => "bloom_filter",
        _ => "other",
    }
}

/// `BPF_MAP_GET_NEXT_KEY`'s part of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// Counts the map's keys by walking them. The data path may delete a key meanwhile, after
/// which the kernel starts again from the first key: the count stops at `max_entries`, so a
/// busy map's count is a snapshot, never a hang.
fn count_keys(fd: BorrowedFd<'_>, key_size: u32, max_entries: u32) -> io::Result<u32> {
    // Key sizes are fixed per map; aya's typed iterators need them at compile time.
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut count = 0;
    let mut first = true;
    while count < max_entries {
        let attr = NextKeyAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            // NULL asks for the first key.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `attr` is a valid BPF_MAP_GET_NEXT_KEY attribute whose key pointers address
        // buffers of the map's key size, alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &raw const attr,
                size_of::<NextKeyAttr>(),
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::ENOENT) {
                Ok(count)
            } else {
                Err(err)
            };
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_a_ratio_of_capacity() {
        let stats = MapStats {
            id: 1,
            kind: "hash".into(),
            key_size: 4,
            value_size: 8,
            max_entries: 200,
            entries: 50,
        };
        assert!((stats.fill() - 0.25).abs() < f64::EPSILON);
        let empty = MapStats {
            max_entries: 0,
            entries: 0,
            ..stats
        };
        assert!(empty.fill().abs() < f64::EPSILON);
    }

    #[test]
    fn a_missing_pin_is_reported_per_map() {
        let dir = tempfile::tempdir().unwrap();
        let maps = pinned_maps(dir.path());
        assert_eq!(
            maps.iter().map(|m| m.name).collect::<Vec<_>>(),
            MAP_NAMES.to_vec()
        );
        for map in &maps {
            assert_eq!(map.pin, dir.path().join(map.name));
            let err = map.stats.as_ref().unwrap_err();
            assert!(err.contains(&*map.pin.to_string_lossy()), "{err}");
        }
    }
}
