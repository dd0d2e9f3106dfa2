//! The one place the `SERVICES` and `BACKENDS` maps are written.
//!
//! Ordering keeps the data path consistent at every instant (DESIGN.md): a new or changed
//! frontend gets its backends, then its slots, then its slot 0; a removed one loses slot 0
//! first, then its slots, then its backends. A backend id belongs to one frontend and is
//! never reused while it is installed, so conntrack, affinity and socket entries that name it
//! can be checked with one lookup. The writer's view is rebuilt from the pinned maps when the
//! agent starts, so a restart rewrites nothing that did not change.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use aya::maps::{HashMap, MapData, MapError};
use ferrovia_common::{Backend, ServiceKey, ServiceValue};
use thiserror::Error;

use super::addr;

/// What one frontend should look like in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    /// The frontend's key with `slot` 0.
    pub key: ServiceKey,
    pub flags: u16,
    pub affinity_timeout_s: u32,
    /// Selectable backends; empty means connections are rejected.
    pub backends: Vec<SocketAddr>,
}

/// A frontend as installed: slot 0 and its slots in order (backend id, address).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Installed {
    service: ServiceValue,
    slots: Vec<(u32, SocketAddr)>,
}

#[derive(Debug, Error)]
pub enum WriteError {
    #[error(
        "frontend {frontend}: {map} map is full ({needed} more entries needed, capacity {capacity}); raise its size"
    )]
    Full {
        frontend: String,
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error("frontend {frontend}: writing the {map} map: {source}")]
    Map {
        frontend: String,
        map: &'static str,
        source: MapError,
    },
    #[error("frontend {frontend}: more than {max} backends", max = u16::MAX)]
    TooManyBackends { frontend: String },
}

/// What a sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
}

pub struct ServiceWriter {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    services_capacity: u32,
    backends_capacity: u32,
    installed: BTreeMap<ServiceKey, Installed>,
    /// Entries `installed` takes in (`SERVICES`, `BACKENDS`), kept as it changes: the
    /// capacity check runs per frontend, and recounting would make a sync quadratic.
    used: (usize, usize),
    next_service_id: u32,
    next_backend_id: u32,
    /// Backend ids removed from `BACKENDS` since [`ServiceWriter::take_freed`] last asked.
    freed: Vec<u32>,
}

/// A short name of a frontend for errors and logs.
#[must_use]
pub fn describe(key: &ServiceKey) -> String {
    let proto = match key.proto {
        ferrovia_common::PROTO_TCP => "TCP",
        ferrovia_common::PROTO_UDP => "UDP",
        _ => "?",
    };
    format!(
        "{}/{proto}",
        addr::decode_sock(key.addr, key.family, key.port)
    )
}

impl ServiceWriter {
    /// The service id of every installed frontend.
    #[must_use]
    pub fn service_ids(&self) -> BTreeMap<ServiceKey, u32> {
        self.installed
            .iter()
            .map(|(k, i)| (*k, i.service.service_id))
            .collect()
    }

    /// Every installed backend id, with its frontend (slot 0 key) and address.
    #[must_use]
    pub fn backend_ids(&self) -> BTreeMap<u32, (ServiceKey, SocketAddr)> {
        self.installed
            .iter()
            .flat_map(|(k, i)| i.slots.iter().map(|(id, a)| (*id, (*k, *a))))
            .collect()
    }

    /// The backend ids removed since the last call (their per-backend state can go).
    pub fn take_freed(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.freed)
    }

    /// Adopts the (possibly pinned, possibly non-empty) maps and rebuilds the view of what is
    /// installed, removing entries no complete frontend refers to (left by a crash mid-write).
    pub fn adopt(
        services: HashMap<MapData, ServiceKey, ServiceValue>,
        backends: HashMap<MapData, u32, Backend>,
        services_capacity: u32,
        backends_capacity: u32,
    ) -> Result<Self, MapError> {
        let mut writer = Self {
            services,
            backends,
            services_capacity,
            backends_capacity,
            installed: BTreeMap::new(),
            used: (0, 0),
            next_service_id: 1,
            next_backend_id: 1,
            freed: Vec::new(),
        };
        let keys: Vec<ServiceKey> = writer.services.keys().collect::<Result<_, _>>()?;
        let mut referenced = BTreeSet::new();
        for key in keys.iter().filter(|k| k.slot == 0) {
            let service = writer.services.get(key, 0)?;
            let mut slots = Vec::with_capacity(usize::from(service.count));
            for slot in 1..=service.count {
                let id = writer
                    .services
                    .get(&ServiceKey { slot, ..*key }, 0)?
                    .backend_id;
                let backend = writer.backends.get(&id, 0)?;
                slots.push((
                    id,
                    addr::decode_sock(backend.addr, backend.family, backend.port),
                ));
                referenced.insert(id);
            }
            writer.next_service_id = writer.next_service_id.max(service.service_id + 1);
            writer.set_installed(*key, Installed { service, slots });
        }
        for key in &keys {
            let base = ServiceKey { slot: 0, ..*key };
            let keep = writer
                .installed
                .get(&base)
                .is_some_and(|i| usize::from(key.slot) <= i.slots.len());
            if !keep {
                writer.services.remove(key)?;
            }
        }
        let ids: Vec<u32> = writer.backends.keys().collect::<Result<_, _>>()?;
        for id in ids {
            if referenced.contains(&id) {
                writer.next_backend_id = writer.next_backend_id.max(id + 1);
            } else {
                writer.backends.remove(&id)?;
            }
        }
        Ok(writer)
    }

    /// Number of frontends installed.
    #[must_use]
    pub fn len(&self) -> usize {
        self.installed.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
    }

    /// Entries in use in (`SERVICES`, `BACKENDS`).
    #[must_use]
    pub fn entries(&self) -> (usize, usize) {
        self.used
    }

    /// Records `installed` for `key`, keeping the entry counts.
    fn set_installed(&mut self, key: ServiceKey, installed: Installed) {
        let added = (1 + installed.slots.len(), installed.slots.len());
        if let Some(old) = self.installed.insert(key, installed) {
            self.used.0 -= 1 + old.slots.len();
            self.used.1 -= old.slots.len();
        }
        self.used.0 += added.0;
        self.used.1 += added.1;
    }

    fn unset_installed(&mut self, key: &ServiceKey) {
        if let Some(old) = self.installed.remove(key) {
            self.used.0 -= 1 + old.slots.len();
            self.used.1 -= old.slots.len();
        }
    }

    /// Makes the maps hold exactly `desired`. A frontend that cannot be written is reported
    /// and keeps its previous state; the others are applied.
    pub fn sync(&mut self, desired: &[FrontendSpec]) -> (SyncReport, Vec<WriteError>) {
        let mut report = SyncReport::default();
        let mut errors = Vec::new();
        let wanted: BTreeSet<ServiceKey> = desired.iter().map(|f| f.key).collect();
        let stale: Vec<ServiceKey> = self
            .installed
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in stale {
            match self.remove(&key) {
                Ok(()) => report.removed += 1,
                Err(e) => errors.push(e),
            }
        }
        for spec in desired {
            match self.apply(spec) {
                Ok(Some(true)) => report.added += 1,
                Ok(Some(false)) => report.updated += 1,
                Ok(None) => report.unchanged += 1,
                Err(e) => {
                    errors.push(e);
                    // Whatever was written before the failure is consistent by ordering;
                    // re-read it so the next sync diffs against the truth.
                    self.reload(&spec.key);
                }
            }
        }
        (report, errors)
    }

    /// Applies one frontend. `Some(true)`: added, `Some(false)`: updated, `None`: unchanged.
    fn apply(&mut self, spec: &FrontendSpec) -> Result<Option<bool>, WriteError> {
        let Some((old, new)) = self.plan(spec)? else {
            return Ok(None);
        };
        let added = old.is_none();
        self.write(spec, old.as_ref().map_or(&[][..], |o| &o.slots), new)?;
        Ok(Some(added))
    }

    /// What `spec` needs written: the installed and the new state of the frontend (ids of
    /// surviving backends kept, new ones allocated), or `None` when nothing changes. Refuses
    /// a frontend that would not fit, before anything is written.
    fn plan(
        &mut self,
        spec: &FrontendSpec,
    ) -> Result<Option<(Option<Installed>, Installed)>, WriteError> {
        let name = || describe(&spec.key);
        let count = u16::try_from(spec.backends.len())
            .map_err(|_| WriteError::TooManyBackends { frontend: name() })?;
        let old = self.installed.get(&spec.key).cloned();
        let old_slots = old.as_ref().map(|i| i.slots.clone()).unwrap_or_default();
        let by_addr: BTreeMap<SocketAddr, u32> =
            old_slots.iter().map(|(id, a)| (*a, *id)).collect();

        let fresh: Vec<SocketAddr> = spec
            .backends
            .iter()
            .filter(|a| !by_addr.contains_key(a))
            .copied()
            .collect();
        let (used_svc, used_be) = self.entries();
        let svc_needed =
            (1 + spec.backends.len()).saturating_sub(old.as_ref().map_or(0, |i| 1 + i.slots.len()));
        if used_svc + svc_needed > self.services_capacity as usize {
            return Err(WriteError::Full {
                frontend: name(),
                map: "SERVICES",
                needed: svc_needed,
                capacity: self.services_capacity,
            });
        }
        if used_be + fresh.len() > self.backends_capacity as usize {
            return Err(WriteError::Full {
                frontend: name(),
                map: "BACKENDS",
                needed: fresh.len(),
                capacity: self.backends_capacity,
            });
        }

        let service_id = old
            .as_ref()
            .map_or(self.next_service_id, |i| i.service.service_id);
        let service = ServiceValue {
            backend_id: 0,
            count,
            flags: spec.flags,
            service_id,
            affinity_timeout_s: spec.affinity_timeout_s,
        };
        let mut slots = Vec::with_capacity(spec.backends.len());
        for a in &spec.backends {
            let id = if let Some(id) = by_addr.get(a) {
                *id
            } else {
                let id = self.next_backend_id;
                self.next_backend_id += 1;
                id
            };
            slots.push((id, *a));
        }
        let new = Installed { service, slots };
        if old.as_ref() == Some(&new) {
            return Ok(None);
        }
        if old.is_none() {
            self.next_service_id += 1;
        }
        Ok(Some((old, new)))
    }

    /// Writes a frontend in the order that keeps the data path consistent at every instant.
    fn write(
        &mut self,
        spec: &FrontendSpec,
        old_slots: &[(u32, SocketAddr)],
        new: Installed,
    ) -> Result<(), WriteError> {
        let service_id = new.service.service_id;
        let service = new.service;
        let map_err = |map: &'static str| {
            move |source| WriteError::Map {
                frontend: describe(&spec.key),
                map,
                source,
            }
        };
        // 1. Backends new to this frontend.
        for (id, a) in new
            .slots
            .iter()
            .filter(|(id, _)| !old_slots.iter().any(|(o, _)| o == id))
        {
            let (addr, family) = addr::encode(a.ip());
            let backend = Backend {
                addr,
                port: a.port().to_be(),
                proto: spec.key.proto,
                family,
                service_id,
            };
            self.backends
                .insert(id, backend, 0)
                .map_err(map_err("BACKENDS"))?;
        }
        // 2. Slots whose backend changes (the ones past the old count are not visible yet).
        for (i, (id, _)) in new.slots.iter().enumerate() {
            if old_slots.get(i).map(|(o, _)| o) != Some(id) {
                let slot = u16::try_from(i + 1).expect("count checked above");
                let value = ServiceValue {
                    backend_id: *id,
                    ..ServiceValue::default()
                };
                self.services
                    .insert(ServiceKey { slot, ..spec.key }, value, 0)
                    .map_err(map_err("SERVICES"))?;
            }
        }
        // 3. Slot 0: from here on the data path uses the new set.
        self.services
            .insert(spec.key, service, 0)
            .map_err(map_err("SERVICES"))?;
        let new_len = new.slots.len();
        let kept: Vec<u32> = new.slots.iter().map(|(id, _)| *id).collect();
        self.set_installed(spec.key, new);
        // 4. Slots and backends no longer referenced.
        for slot in new_len + 1..=old_slots.len() {
            let slot = u16::try_from(slot).expect("old count fits u16");
            self.services
                .remove(&ServiceKey { slot, ..spec.key })
                .map_err(map_err("SERVICES"))?;
        }
        for (id, _) in old_slots.iter().filter(|(id, _)| !kept.contains(id)) {
            self.backends.remove(id).map_err(map_err("BACKENDS"))?;
            self.freed.push(*id);
        }
        Ok(())
    }

    fn remove(&mut self, key: &ServiceKey) -> Result<(), WriteError> {
        let Some(old) = self.installed.get(key).cloned() else {
            return Ok(());
        };
        let map_err = |map: &'static str| {
            move |source| WriteError::Map {
                frontend: describe(key),
                map,
                source,
            }
        };
        self.services.remove(key).map_err(map_err("SERVICES"))?;
        self.unset_installed(key);
        for slot in 1..=old.slots.len() {
            let slot = u16::try_from(slot).expect("count fits u16");
            self.services
                .remove(&ServiceKey { slot, ..*key })
                .map_err(map_err("SERVICES"))?;
        }
        for (id, _) in &old.slots {
            self.backends.remove(id).map_err(map_err("BACKENDS"))?;
            self.freed.push(*id);
        }
        Ok(())
    }

    /// Re-reads one frontend from the maps after a failed write.
    fn reload(&mut self, key: &ServiceKey) {
        let read = || -> Result<Installed, MapError> {
            let service = self.services.get(key, 0)?;
            let mut slots = Vec::new();
            for slot in 1..=service.count {
                let id = self
                    .services
                    .get(&ServiceKey { slot, ..*key }, 0)?
                    .backend_id;
                let b = self.backends.get(&id, 0)?;
                slots.push((id, addr::decode_sock(b.addr, b.family, b.port)));
            }
            Ok(Installed { service, slots })
        };
        match read() {
            Ok(installed) => {
                self.set_installed(*key, installed);
            }
            Err(_) => {
                self.unset_installed(key);
            }
        }
    }
}
