//! Backend selection, shared by the socket hooks and the per-packet path.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use ferrovia_common::{
    AffinityKey, AffinityValue, Backend, FrontendStats, SVC_FLAG_AFFINITY, ServiceKey,
    ServiceValue, age_ns,
};

use crate::maps::{AFFINITY, BACKEND_STATS, BACKENDS, FRONTEND_STATS, SERVICES};

/// The service entry (slot 0) of a frontend, if the frontend exists.
#[inline(always)]
pub fn lookup_service(key: &ServiceKey) -> Option<ServiceValue> {
    // SAFETY: value copied out at once; the agent replaces entries whole.
    unsafe { SERVICES.get(key).copied() }
}

/// Counts a new connection to frontend `service_id`: given backend `Some(id)` (a backend
/// selection, counted for the backend too), or rejected (`None`).
#[inline(always)]
pub fn count_connection(service_id: u32, backend: Option<u32>) {
    let rejected = backend.is_none();
    if let Some(stats) = FRONTEND_STATS.get_ptr_mut(&service_id) {
        // SAFETY: this CPU's copy of a live per-CPU value. Not atomic (the BPF target has no
        // 64-bit atomics here): a socket hook (process context) interrupted on this CPU by a
        // tc program counting the same frontend can lose one increment — rare, and only a
        // count.
        let stats = unsafe { &mut *stats };
        if rejected {
            stats.rejected += 1;
        } else {
            stats.connections += 1;
        }
    } else {
        let stats = FrontendStats {
            connections: u64::from(!rejected),
            rejected: u64::from(rejected),
        };
        // Best effort: a full map only loses the count.
        let _ = FRONTEND_STATS.insert(&service_id, &stats, 0);
    }
    if let Some(id) = backend {
        count_selection(id);
    }
}

/// Counts a selection of backend `id` (`BACKEND_STATS`), as [`count_connection`] its frontend's.
#[inline(always)]
fn count_selection(id: u32) {
    if let Some(n) = BACKEND_STATS.get_ptr_mut(&id) {
        // SAFETY: this CPU's copy of a live per-CPU value; not atomic, as above.
        unsafe { *n += 1 };
    } else {
        // Best effort: a full map only loses the count.
        let _ = BACKEND_STATS.insert(&id, &1, 0);
    }
}

/// The backend `id`, if it still exists and still belongs to frontend `service_id`.
#[inline(always)]
pub fn live_backend(id: u32, service_id: u32) -> Option<Backend> {
    // SAFETY: as above.
    let backend = unsafe { BACKENDS.get(&id).copied() }?;
    (backend.service_id == service_id).then_some(backend)
}

/// Picks a backend of a frontend with `count > 0`: the client's affine backend while its
/// affinity lasts (kube-proxy's `recent --rcheck --seconds`: timed from last use), else a
/// uniformly random slot. `client` identifies the client for affinity.
#[inline(always)]
pub fn select_backend(
    frontend: &ServiceKey,
    service: &ServiceValue,
    client: &AffinityKey,
) -> Option<(u32, Backend)> {
    let affinity = service.flags & SVC_FLAG_AFFINITY != 0;
    // The clock only matters to affinity.
    // SAFETY: helper without side effects.
    let now = if affinity {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    if affinity && let Some(entry) = AFFINITY.get_ptr_mut(client) {
        // SAFETY: valid map value pointer; a racing update only changes which backend wins.
        let entry = unsafe { &mut *entry };
        let timeout_ns = u64::from(service.affinity_timeout_s) * 1_000_000_000;
        if age_ns(now, entry.last_used_ns) <= timeout_ns
            && let Some(backend) = live_backend(entry.backend_id, service.service_id)
        {
            entry.last_used_ns = now;
            return Some((entry.backend_id, backend));
        }
    }
    if service.count == 0 {
        return None;
    }
    // SAFETY: helper without side effects.
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(service.count)) as u16 + 1;
    let slot_key = ServiceKey { slot, ..*frontend };
    // SAFETY: as above.
    let id = unsafe { SERVICES.get(&slot_key) }?.backend_id;
    let backend = live_backend(id, service.service_id)?;
    if affinity {
        let value = AffinityValue {
            backend_id: id,
            _pad: 0,
            last_used_ns: now,
        };
        // Best effort: LRU insert only fails on memory pressure; selection still stands.
        let _ = AFFINITY.insert(client, &value, 0);
    }
    Some((id, backend))
}
