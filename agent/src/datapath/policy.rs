//! The one place the network-policy maps are written.
//!
//! Classes and port sets are interned: a class (or port set) of equal content has one id and
//! one set of entries, however many pods use it. A sync is make-before-break: new port sets,
//! then new classes' peer entries, then the endpoints switch to their new class, then what no
//! endpoint references any more goes, then the epoch is bumped so flows are judged again. A
//! packet therefore always sees a complete class. The writer's view is rebuilt from the
//! pinned maps when the agent starts, so a restart rewrites nothing that did not change.
use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use aya::maps::{
    Array, HashMap, MapData, MapError, PerCpuHashMap,
    lpm_trie::{Key, LpmTrie},
};
use ferrovia_common::{
    EndpointKey, EndpointPolicy, FAMILY_V4, PEER_KEY_FIXED_BITS, POL_DIR_EGRESS, POL_DIR_INGRESS,
    POL_ISOLATED_EGRESS, POL_ISOLATED_INGRESS, PORT_KEY_ANY_PROTO_BITS, PORT_KEY_FIXED_BITS,
    PORT_KEY_PROTO_BITS, PolicyPeerKey, PolicyPeerValue, PolicyPortKey, PolicyState, VerdictKey,
    VerdictValue,
};
use thiserror::Error;

use crate::model::policy::{
    DirectionRules, PeerEntry, PolicyClass, PolicyDesired, PortSet, Prefix,
};

#[derive(Debug, Error)]
pub enum PolicyError {
    #[error(
        "network policy: the {map} map is full ({needed} more entries needed, {used} used, capacity {capacity}); raise its size. The previous policy stays in force"
    )]
    Full {
        map: &'static str,
        needed: usize,
        used: usize,
        capacity: u32,
    },
    #[error("network policy: writing the {map} map: {source}. The previous policy stays in force")]
    Map { map: &'static str, source: MapError },
}

/// What a policy sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PolicyReport {
    pub classes_added: usize,
    pub classes_removed: usize,
    pub endpoints_changed: usize,
    pub entries_written: usize,
    pub epoch: u32,
}

impl PolicyReport {
    #[must_use]
    pub fn changed(&self) -> bool {
        self.classes_added + self.classes_removed + self.endpoints_changed > 0
    }
}

/// Map capacities of the policy maps (entries).
#[derive(Clone, Copy, Debug)]
pub struct PolicyCapacity {
    pub endpoints: u32,
    pub peers: u32,
    pub ports: u32,
}

/// A class in the maps: its id and the port-set ids its peer entries point at.
#[derive(Clone, Debug)]
struct Installed {
    id: u32,
    sets: BTreeSet<u32>,
}

pub struct PolicyWriter {
    endpoints_map: HashMap<MapData, EndpointKey, EndpointPolicy>,
    peers_map: LpmTrie<MapData, PolicyPeerKey, PolicyPeerValue>,
    ports_map: LpmTrie<MapData, PolicyPortKey, u32>,
    state_map: Array<MapData, PolicyState>,
    verdicts_map: PerCpuHashMap<MapData, VerdictKey, VerdictValue>,
    capacity: PolicyCapacity,
    state: PolicyState,
    /// Port sets in the maps, by id; `set_ids` names the one new classes use for a content.
    sets: BTreeMap<u32, PortSet>,
    set_ids: StdHashMap<PortSet, u32>,
    /// Classes in the maps that endpoints may point at, by content.
    classes: StdHashMap<Arc<PolicyClass>, Installed>,
    /// Classes endpoints still point at that duplicate one in `classes` (left by an
    /// interrupted sync): removed once no endpoint points at them.
    retired: BTreeMap<u32, (PolicyClass, Installed)>,
    /// Classes and port sets nothing points at (an interrupted sync): removed first thing.
    orphan_classes: BTreeMap<u32, PolicyClass>,
    orphan_sets: BTreeMap<u32, PortSet>,
    endpoints: BTreeMap<Ipv4Addr, EndpointPolicy>,
    /// Local pods whose verdicts are kept; `None` until the first sync after `adopt` (pods
    /// may have left while the agent was down).
    local: Option<BTreeSet<Ipv4Addr>>,
    /// Entries in use in (`POLICY_PEERS`, `POLICY_PORTS`).
    used: (usize, usize),
    next_id: u32,
}

pub struct PolicyMaps {
    pub endpoints: HashMap<MapData, EndpointKey, EndpointPolicy>,
    pub peers: LpmTrie<MapData, PolicyPeerKey, PolicyPeerValue>,
    pub ports: LpmTrie<MapData, PolicyPortKey, u32>,
    pub state: Array<MapData, PolicyState>,
    pub verdicts: PerCpuHashMap<MapData, VerdictKey, VerdictValue>,
}

impl PolicyWriter {
    /// Takes over the maps, reading what a previous run installed, and turns enforcement on or
    /// off (`enabled`).
    pub fn adopt(
        maps: PolicyMaps,
        capacity: PolicyCapacity,
        enabled: bool,
    ) -> Result<Self, MapError> {
        let (sets_by_id, port_entries) = read_portsets(&maps.ports)?;
        let (mut classes_by_id, peer_entries) = read_classes(&maps.peers, &sets_by_id)?;
        let mut endpoints = BTreeMap::new();
        for item in &maps.endpoints {
            let (key, value) = item?;
            endpoints.insert(Ipv4Addr::from(key.addr[0].to_ne_bytes()), value);
            // Isolation with no rule at all has no peer entry: the flags say it.
            let (class, _) = classes_by_id.entry(value.class_id).or_default();
            if value.flags & POL_ISOLATED_INGRESS != 0 {
                class.ingress.get_or_insert_default();
            }
            if value.flags & POL_ISOLATED_EGRESS != 0 {
                class.egress.get_or_insert_default();
            }
        }
        let referenced: BTreeSet<u32> = endpoints.values().map(|e| e.class_id).collect();
        let mut classes = StdHashMap::new();
        let mut retired = BTreeMap::new();
        let mut orphan_classes = BTreeMap::new();
        for (id, (class, sets)) in classes_by_id {
            let installed = Installed { id, sets };
            if !referenced.contains(&id) {
                orphan_classes.insert(id, class);
            } else if classes.contains_key(&class) {
                retired.insert(id, (class, installed));
            } else {
                classes.insert(Arc::new(class), installed);
            }
        }
        // Port sets live by the ids classes point at, not by content: two copies of one
        // content may both be pointed at.
        let live: BTreeSet<u32> = classes
            .values()
            .chain(retired.values().map(|(_, i)| i))
            .flat_map(|i| i.sets.iter().copied())
            .collect();
        let (sets, orphan_sets): (BTreeMap<u32, PortSet>, BTreeMap<u32, PortSet>) = sets_by_id
            .into_iter()
            .partition(|(id, _)| live.contains(id));
        let mut set_ids = StdHashMap::new();
        for (id, set) in &sets {
            set_ids.entry(set.clone()).or_insert(*id);
        }
        let next_id = classes
            .values()
            .map(|i| i.id)
            .chain(retired.keys().copied())
            .chain(orphan_classes.keys().copied())
            .chain(sets.keys().copied())
            .chain(orphan_sets.keys().copied())
            .max()
            .map_or(1, |m| m + 1);
        let mut state_map = maps.state;
        let previous = state_map.get(&0, 0)?;
        let state = PolicyState {
            epoch: previous.epoch.wrapping_add(1),
            enabled: u32::from(enabled),
        };
        state_map.set(0, state, 0)?;
        Ok(Self {
            endpoints_map: maps.endpoints,
            peers_map: maps.peers,
            ports_map: maps.ports,
            state_map,
            verdicts_map: maps.verdicts,
            capacity,
            state,
            sets,
            set_ids,
            classes,
            retired,
            orphan_classes,
            orphan_sets,
            endpoints,
            local: None,
            used: (peer_entries, port_entries),
            next_id,
        })
    }

    /// Installed classes (distinct compiled rule sets) and isolated endpoints.
    #[must_use]
    pub fn len(&self) -> (usize, usize) {
        (self.classes.len(), self.endpoints.len())
    }

    /// Writes `desired`. On error the data path stays consistent (every endpoint points at
    /// a complete class, flows of switched endpoints are judged again) and what could not be
    /// written is reported.
    pub fn sync(&mut self, desired: &PolicyDesired) -> Result<PolicyReport, PolicyError> {
        let mut report = PolicyReport::default();
        // Room first: what an interrupted sync left and nothing points at.
        self.remove_orphans(&mut report);
        let mut result = self.install_new(desired, &mut report);
        if result.is_ok() {
            result = self.switch_endpoints(desired, &mut report);
        }
        self.remove_unreferenced(&mut report);
        // Flows judged under the old rules are judged again on their next packet (also when
        // a failed switch changed only some endpoints).
        if report.changed() {
            self.state.epoch = self.state.epoch.wrapping_add(1);
            // The epoch only has to differ from the flows' recorded ones; a failed write
            // leaves them to be judged again at the next change.
            let _ = self.state_map.set(0, self.state, 0);
        }
        report.epoch = self.state.epoch;
        if self.local.as_ref() != Some(&desired.local) {
            self.forget_verdicts(&desired.local);
            self.local = Some(desired.local.clone());
        }
        result.map(|()| report)
    }

    /// Writes the port sets and classes `desired` needs and the maps lack; nothing
    /// references them yet. All or nothing: capacity is checked first, a failed write undoes
    /// the others.
    fn install_new(
        &mut self,
        desired: &PolicyDesired,
        report: &mut PolicyReport,
    ) -> Result<(), PolicyError> {
        let mut new_classes: Vec<Arc<PolicyClass>> = Vec::new();
        for class in desired.endpoints.values() {
            if !self.classes.contains_key(class) && !new_classes.contains(class) {
                new_classes.push(Arc::clone(class));
            }
        }
        let mut new_sets: Vec<&PortSet> = Vec::new();
        for class in &new_classes {
            for set in class_portsets(class) {
                if !self.set_ids.contains_key(set) && !new_sets.contains(&set) {
                    new_sets.push(set);
                }
            }
        }
        let peer_needed: usize = new_classes.iter().map(|c| class_entries(c)).sum();
        let port_needed: usize = new_sets.iter().map(|s| port_prefixes(s).len()).sum();
        let endpoints_needed = desired
            .endpoints
            .keys()
            .filter(|ip| !self.endpoints.contains_key(ip))
            .count();
        check(
            "POLICY_PEERS",
            peer_needed,
            self.used.0,
            self.capacity.peers,
        )?;
        check(
            "POLICY_PORTS",
            port_needed,
            self.used.1,
            self.capacity.ports,
        )?;
        check(
            "POLICY_PODS",
            endpoints_needed,
            self.endpoints.len(),
            self.capacity.endpoints,
        )?;

        let mut written_sets: Vec<u32> = Vec::new();
        for set in new_sets {
            let id = self.alloc_id();
            if let Err(e) = self.write_portset(id, set) {
                self.delete_portset(id, set);
                for id in written_sets {
                    self.drop_set(id);
                }
                return Err(e);
            }
            self.used.1 += port_prefixes(set).len();
            report.entries_written += port_prefixes(set).len();
            self.sets.insert(id, set.clone());
            self.set_ids.insert(set.clone(), id);
            written_sets.push(id);
        }
        let mut written: Vec<Arc<PolicyClass>> = Vec::new();
        for class in new_classes {
            let id = self.alloc_id();
            if let Err(e) = self.write_class(id, &class) {
                self.delete_class(id, &class);
                for class in written {
                    if let Some(installed) = self.classes.remove(&class) {
                        self.delete_class(installed.id, &class);
                        self.used.0 -= class_entries(&class);
                    }
                }
                for id in written_sets {
                    self.drop_set(id);
                }
                return Err(e);
            }
            let sets = class_portsets(&class).map(|s| self.set_ids[s]).collect();
            self.used.0 += class_entries(&class);
            report.entries_written += class_entries(&class);
            report.classes_added += 1;
            self.classes
                .insert(Arc::clone(&class), Installed { id, sets });
            written.push(class);
        }
        Ok(())
    }

    /// Points every isolated pod at its (complete) class; forgets pods no longer isolated.
    fn switch_endpoints(
        &mut self,
        desired: &PolicyDesired,
        report: &mut PolicyReport,
    ) -> Result<(), PolicyError> {
        for (ip, class) in &desired.endpoints {
            let value = EndpointPolicy {
                class_id: self.classes[class].id,
                flags: flags(class),
            };
            if self.endpoints.get(ip) == Some(&value) {
                continue;
            }
            self.endpoints_map
                .insert(endpoint_key(*ip), value, 0)
                .map_err(|source| PolicyError::Map {
                    map: "POLICY_PODS",
                    source,
                })?;
            self.endpoints.insert(*ip, value);
            report.endpoints_changed += 1;
        }
        let gone: Vec<Ipv4Addr> = self
            .endpoints
            .keys()
            .filter(|ip| !desired.endpoints.contains_key(ip))
            .copied()
            .collect();
        for ip in gone {
            // Best effort: an entry that cannot be removed is already gone.
            let _ = self.endpoints_map.remove(&endpoint_key(ip));
            self.endpoints.remove(&ip);
            report.endpoints_changed += 1;
        }
        Ok(())
    }

    /// Removes what an interrupted sync left that nothing points at.
    fn remove_orphans(&mut self, report: &mut PolicyReport) {
        for (id, class) in std::mem::take(&mut self.orphan_classes) {
            self.delete_class(id, &class);
            self.used.0 = self.used.0.saturating_sub(class_entries(&class));
            report.classes_removed += 1;
        }
        for (id, set) in std::mem::take(&mut self.orphan_sets) {
            self.delete_portset(id, &set);
            self.used.1 = self.used.1.saturating_sub(port_prefixes(&set).len());
        }
    }

    /// Removes classes no endpoint points at any more, then port sets no class points at.
    fn remove_unreferenced(&mut self, report: &mut PolicyReport) {
        let referenced: BTreeSet<u32> = self.endpoints.values().map(|e| e.class_id).collect();
        let unused: Vec<(Arc<PolicyClass>, u32)> = self
            .classes
            .iter()
            .filter(|(_, i)| !referenced.contains(&i.id))
            .map(|(c, i)| (Arc::clone(c), i.id))
            .collect();
        for (class, id) in unused {
            self.delete_class(id, &class);
            self.used.0 = self.used.0.saturating_sub(class_entries(&class));
            self.classes.remove(&class);
            report.classes_removed += 1;
        }
        let retired: Vec<u32> = self
            .retired
            .keys()
            .filter(|id| !referenced.contains(id))
            .copied()
            .collect();
        for id in retired {
            if let Some((class, _)) = self.retired.remove(&id) {
                self.delete_class(id, &class);
                self.used.0 = self.used.0.saturating_sub(class_entries(&class));
                report.classes_removed += 1;
            }
        }
        let live: BTreeSet<u32> = self
            .classes
            .values()
            .chain(self.retired.values().map(|(_, i)| i))
            .flat_map(|i| i.sets.iter().copied())
            .collect();
        let dead: Vec<u32> = self
            .sets
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in dead {
            self.drop_set(id);
        }
    }

    /// Deletes port set `id` from the map and the writer's view (by id: another id may hold
    /// the same content).
    fn drop_set(&mut self, id: u32) {
        if let Some(set) = self.sets.remove(&id) {
            self.delete_portset(id, &set);
            self.used.1 = self.used.1.saturating_sub(port_prefixes(&set).len());
            if self.set_ids.get(&set) == Some(&id) {
                self.set_ids.remove(&set);
                // Another live copy, if any, serves new classes from now on.
                if let Some((other, _)) = self.sets.iter().find(|(_, s)| **s == set) {
                    self.set_ids.insert(set, *other);
                }
            }
        }
    }

    /// Summed per-CPU verdict counters: (pod, direction, reason) → (packets, bytes).
    pub fn verdicts(&self) -> Result<Verdicts, MapError> {
        let mut out = BTreeMap::new();
        for item in &self.verdicts_map {
            let (key, values) = item?;
            let (packets, bytes) = values
                .iter()
                .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes));
            out.insert(
                (
                    Ipv4Addr::from(key.addr[0].to_ne_bytes()),
                    key.dir,
                    key.reason,
                ),
                (packets, bytes),
            );
        }
        Ok(out)
    }

    fn alloc_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    fn write_portset(&mut self, id: u32, set: &PortSet) -> Result<(), PolicyError> {
        for (bits, proto, port) in port_prefixes(set) {
            let key = Key::new(bits, port_key(id, proto, port));
            self.ports_map
                .insert(&key, 1, 0)
                .map_err(|source| PolicyError::Map {
                    map: "POLICY_PORTS",
                    source,
                })?;
        }
        Ok(())
    }

    fn delete_portset(&mut self, id: u32, set: &PortSet) {
        for (bits, proto, port) in port_prefixes(set) {
            let _ = self
                .ports_map
                .remove(&Key::new(bits, port_key(id, proto, port)));
        }
    }

    fn write_class(&mut self, id: u32, class: &PolicyClass) -> Result<(), PolicyError> {
        for (dir, rules) in directions(class) {
            for (prefix, entry) in rules {
                let value = PolicyPeerValue {
                    portset_id: if entry.ports.is_empty() {
                        0
                    } else {
                        self.set_ids[&entry.ports]
                    },
                    reason: u32::from(entry.reason),
                };
                self.peers_map
                    .insert(&peer_key(id, dir, *prefix), value, 0)
                    .map_err(|source| PolicyError::Map {
                        map: "POLICY_PEERS",
                        source,
                    })?;
            }
        }
        Ok(())
    }

    fn delete_class(&mut self, id: u32, class: &PolicyClass) {
        for (dir, rules) in directions(class) {
            for prefix in rules.keys() {
                let _ = self.peers_map.remove(&peer_key(id, dir, *prefix));
            }
        }
    }

    fn forget_verdicts(&mut self, local: &BTreeSet<Ipv4Addr>) {
        let stale: Vec<VerdictKey> = self
            .verdicts_map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !local.contains(&Ipv4Addr::from(k.addr[0].to_ne_bytes())))
            .collect();
        for key in stale {
            let _ = self.verdicts_map.remove(&key);
        }
    }
}

/// Summed per-CPU verdict counters: (pod, direction, reason) → (packets, bytes).
pub type Verdicts = BTreeMap<(Ipv4Addr, u8, u8), (u64, u64)>;

type PortsTrie = LpmTrie<MapData, PolicyPortKey, u32>;
/// Pinned classes by id: the class and the port-set ids its entries point at.
type AdoptedClasses = BTreeMap<u32, (PolicyClass, BTreeSet<u32>)>;
type PeersTrie = LpmTrie<MapData, PolicyPeerKey, PolicyPeerValue>;

/// The port sets a previous run installed, by id, and the number of trie entries.
fn read_portsets(ports: &PortsTrie) -> Result<(BTreeMap<u32, PortSet>, usize), MapError> {
    let mut sets: BTreeMap<u32, PortSet> = BTreeMap::new();
    let mut entries = 0;
    for item in ports {
        let (key, _) = item?;
        entries += 1;
        let data = key.data();
        let set = sets.entry(data.portset_id).or_default();
        add_port_prefix(set, key.prefix_len(), data.proto, u16::from_be(data.port));
    }
    Ok((sets, entries))
}

/// The classes a previous run installed, by id, with the port-set ids they point at
/// (isolation without rules comes from the endpoints, see `adopt`), and the number of trie
/// entries.
fn read_classes(
    peers: &PeersTrie,
    portsets: &BTreeMap<u32, PortSet>,
) -> Result<(AdoptedClasses, usize), MapError> {
    let mut classes = AdoptedClasses::new();
    let mut entries = 0;
    for item in peers {
        let (key, value) = item?;
        entries += 1;
        let data = key.data();
        let (class, sets) = classes.entry(data.class_id).or_default();
        if value.portset_id != 0 {
            sets.insert(value.portset_id);
        }
        let rules = if data.dir == POL_DIR_EGRESS {
            class.egress.get_or_insert_default()
        } else {
            class.ingress.get_or_insert_default()
        };
        let bits = key.prefix_len().saturating_sub(PEER_KEY_FIXED_BITS);
        let prefix = Prefix::new(
            Ipv4Addr::from(data.addr[0].to_ne_bytes()),
            u8::try_from(bits).unwrap_or(32),
        );
        let entry = if value.portset_id == 0 {
            PeerEntry {
                ports: PortSet::None,
                reason: u8::try_from(value.reason).unwrap_or(0),
            }
        } else {
            PeerEntry {
                ports: portsets.get(&value.portset_id).cloned().unwrap_or_default(),
                reason: 0,
            }
        };
        rules.insert(prefix, entry);
    }
    Ok((classes, entries))
}

fn check(map: &'static str, needed: usize, used: usize, capacity: u32) -> Result<(), PolicyError> {
    if used + needed > capacity as usize {
        return Err(PolicyError::Full {
            map,
            needed,
            used,
            capacity,
        });
    }
    Ok(())
}

fn flags(class: &PolicyClass) -> u32 {
    let mut flags = 0;
    if class.ingress.is_some() {
        flags |= POL_ISOLATED_INGRESS;
    }
    if class.egress.is_some() {
        flags |= POL_ISOLATED_EGRESS;
    }
    flags
}

fn directions(class: &PolicyClass) -> impl Iterator<Item = (u8, &DirectionRules)> {
    [
        (POL_DIR_INGRESS, class.ingress.as_ref()),
        (POL_DIR_EGRESS, class.egress.as_ref()),
    ]
    .into_iter()
    .filter_map(|(dir, rules)| Some((dir, rules?)))
}

fn class_entries(class: &PolicyClass) -> usize {
    directions(class).map(|(_, r)| r.len()).sum()
}

fn class_portsets(class: &PolicyClass) -> impl Iterator<Item = &PortSet> {
    directions(class)
        .flat_map(|(_, rules)| rules.values())
        .map(|e| &e.ports)
        .filter(|p| !p.is_empty())
}

fn endpoint_key(ip: Ipv4Addr) -> EndpointKey {
    EndpointKey {
        addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
        family: FAMILY_V4,
        _pad: [0; 3],
    }
}

fn peer_key(class_id: u32, dir: u8, prefix: Prefix) -> Key<PolicyPeerKey> {
    Key::new(
        PEER_KEY_FIXED_BITS + u32::from(prefix.len),
        PolicyPeerKey {
            class_id,
            dir,
            family: FAMILY_V4,
            _pad: 0,
            addr: [u32::from_ne_bytes(prefix.addr.octets()), 0, 0, 0],
        },
    )
}

fn port_key(portset_id: u32, proto: u8, port: u16) -> PolicyPortKey {
    PolicyPortKey {
        portset_id,
        proto,
        _pad: 0,
        port: port.to_be(),
    }
}

/// The trie entries of a port set: (prefix length, protocol, first port of the block).
#[must_use]
pub fn port_prefixes(set: &PortSet) -> Vec<(u32, u8, u16)> {
    match set {
        PortSet::None => Vec::new(),
        PortSet::Any => vec![(PORT_KEY_ANY_PROTO_BITS, 0, 0)],
        PortSet::Ports(map) => map
            .iter()
            .flat_map(|(&proto, ranges)| {
                ranges.iter().flat_map(move |&(lo, hi)| {
                    if (lo, hi) == (0, u16::MAX) {
                        vec![(PORT_KEY_PROTO_BITS, proto, 0)]
                    } else {
                        range_blocks(lo, hi)
                            .into_iter()
                            .map(|(start, bits)| (PORT_KEY_FIXED_BITS + bits, proto, start))
                            .collect()
                    }
                })
            })
            .collect(),
    }
}

/// The fewest aligned blocks covering `lo..=hi`: (first port, prefix bits of 16).
#[must_use]
pub fn range_blocks(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let (mut start, end) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while start <= end {
        let mut size: u32 = if start == 0 {
            1 << 16
        } else {
            start & start.wrapping_neg()
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        out.push((start as u16, 16 - size.trailing_zeros()));
        start += size;
    }
    out
}

/// Inverse of [`port_prefixes`] for one entry.
fn add_port_prefix(set: &mut PortSet, bits: u32, proto: u8, start: u16) {
    if bits <= PORT_KEY_ANY_PROTO_BITS {
        *set = PortSet::Any;
    } else if bits <= PORT_KEY_FIXED_BITS {
        set.add(proto, 0, u16::MAX);
    } else {
        let size = 1u32 << (16 - (bits - PORT_KEY_FIXED_BITS));
        let hi = (u32::from(start) + size - 1) as u16;
        set.add(proto, start, hi);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_round_trip_through_trie_blocks() {
        for (lo, hi) in [
            (80, 80),
            (80, 81),
            (81, 90),
            (1, 65535),
            (0, 65535),
            (1024, 2047),
            (0, 0),
        ] {
            let mut set = PortSet::None;
            set.add(6, lo, hi);
            let mut back = PortSet::None;
            for (bits, proto, start) in port_prefixes(&set) {
                add_port_prefix(&mut back, bits, proto, start);
            }
            assert_eq!(back, set, "{lo}..={hi}");
            let blocks = range_blocks(lo, hi);
            let covered: u32 = blocks.iter().map(|(_, b)| 1u32 << (16 - b)).sum();
            assert_eq!(
                covered,
                u32::from(hi) - u32::from(lo) + 1,
                "{lo}..={hi}: {blocks:?}"
            );
        }
        // 1..=65535 needs one block per bit: 16.
        assert_eq!(range_blocks(1, 65535).len(), 16);
        assert_eq!(range_blocks(1024, 2047), vec![(1024, 6)]);
    }
}
