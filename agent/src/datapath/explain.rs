//! The data path's lookups for one new flow, done in user space over the pinned maps (for
//! `ferrovia explain`): the frontend in `SERVICES` (slot 0) and its backends (slots 1..=count,
//! then `BACKENDS`), as `lb.rs` reads them; and a policy point's verdict for a new flow, as
//! `rules()` in `ebpf/ferrovia-ebpf/src/policy.rs` computes it (`POLICY_PODS`, then the
//! `POLICY_PEERS` and `POLICY_PORTS` tries). Lookups only: nothing here writes a map.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::{
    Array, HashMap, Map, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use ferrovia_common::{
    Backend, EndpointKey, EndpointPolicy, FAMILY_V4, PEER_KEY_FIXED_BITS, POL_DIR_EGRESS,
    POL_DIR_INGRESS, POL_ISOLATED_EGRESS, POL_ISOLATED_INGRESS, PORT_KEY_FIXED_BITS, PolicyPeerKey,
    PolicyPeerValue, PolicyPortKey, PolicyState, SVC_FLAG_AFFINITY, ServiceKey, ServiceValue,
    verdict,
};

use super::addr;
use crate::model::policy::Dir;

/// The maps a new flow's fate is read from, opened from their pins.
pub struct PinnedLookups {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    endpoints: HashMap<MapData, EndpointKey, EndpointPolicy>,
    peers: LpmTrie<MapData, PolicyPeerKey, PolicyPeerValue>,
    ports: LpmTrie<MapData, PolicyPortKey, u32>,
    state: Array<MapData, PolicyState>,
}

/// A frontend as `SERVICES` and `BACKENDS` hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFrontend {
    /// Slot 0's frontend id.
    pub service_id: u32,
    /// `Some(timeout)` with the affinity flag.
    pub affinity_timeout_s: Option<u32>,
    /// The backends of slots 1..=count, in slot order: the ones the data path may pick (a
    /// random slot; an affine client keeps its backend while it is one of these).
    pub backends: Vec<SocketAddrV4>,
    /// Slots the data path would find broken (no slot entry, no backend, a backend of another
    /// frontend), one line each: a flow landing there is not translated.
    pub broken: Vec<String>,
}

/// What the data path reads to decide a new flow's fate: the pinned maps ([`PinnedLookups`]),
/// or a table in tests.
pub trait Lookups {
    /// The frontend `vip:port` of IP protocol `proto`, if `SERVICES` has one.
    fn frontend(&self, vip: Ipv4Addr, proto: u8, port: u16) -> Result<Option<MapFrontend>>;

    /// Whether policy is enforced (`POLICY_STATE[0].enabled`): when not, nothing is judged.
    fn enforcing(&self) -> Result<bool>;

    /// The verdict reason (`ferrovia_common::verdict`) the point `dir` of the pod at `subject`
    /// gives a new flow with `peer` (the destination for egress, the source for ingress) to
    /// destination port `port` of IP protocol `proto`.
    fn verdict(
        &self,
        dir: Dir,
        subject: Ipv4Addr,
        peer: Ipv4Addr,
        proto: u8,
        port: u16,
    ) -> Result<u8>;
}

impl PinnedLookups {
    /// Opens the maps pinned under `bpffs_root`.
    pub fn open(bpffs_root: &Path) -> Result<Self> {
        Ok(Self {
            services: pinned(bpffs_root, "SERVICES")?,
            backends: pinned(bpffs_root, "BACKENDS")?,
            endpoints: pinned(bpffs_root, "POLICY_PODS")?,
            peers: pinned(bpffs_root, "POLICY_PEERS")?,
            ports: pinned(bpffs_root, "POLICY_PORTS")?,
            state: pinned(bpffs_root, "POLICY_STATE")?,
        })
    }
}

impl Lookups for PinnedLookups {
    /// `lb.rs`: slot 0, then each slot's backend, alive and of this frontend.
    fn frontend(&self, vip: Ipv4Addr, proto: u8, port: u16) -> Result<Option<MapFrontend>> {
        let (addr, family) = addr::encode(vip.into());
        let key = ServiceKey {
            addr,
            port: port.to_be(),
            proto,
            family,
            slot: 0,
            _pad: 0,
        };
        let Some(service) = found(self.services.get(&key, 0)).context("SERVICES")? else {
            return Ok(None);
        };
        let mut frontend = MapFrontend {
            service_id: service.service_id,
            affinity_timeout_s: (service.flags & SVC_FLAG_AFFINITY != 0)
                .then_some(service.affinity_timeout_s),
            backends: Vec::with_capacity(usize::from(service.count)),
            broken: Vec::new(),
        };
        for slot in 1..=service.count {
            let slot_key = ServiceKey { slot, ..key };
            let Some(entry) = found(self.services.get(&slot_key, 0)).context("SERVICES")? else {
                frontend.broken.push(format!("slot {slot}: no entry"));
                continue;
            };
            let id = entry.backend_id;
            // `lb::live_backend`: the backend must exist and belong to this frontend.
            match found(self.backends.get(&id, 0)).context("BACKENDS")? {
                Some(b) if b.service_id == service.service_id && b.family == FAMILY_V4 => {
                    let ip = Ipv4Addr::from(b.addr[0].to_ne_bytes());
                    frontend
                        .backends
                        .push(SocketAddrV4::new(ip, u16::from_be(b.port)));
                }
                Some(b) => frontend.broken.push(format!(
                    "slot {slot}: backend {id} belongs to frontend {}",
                    b.service_id
                )),
                None => frontend
                    .broken
                    .push(format!("slot {slot}: backend {id} is not in BACKENDS")),
            }
        }
        Ok(Some(frontend))
    }

    fn enforcing(&self) -> Result<bool> {
        let state = self.state.get(&0, 0).context("POLICY_STATE")?;
        Ok(state.enabled != 0)
    }

    /// `rules()` of the programs (`Gate::judge` for a new flow), line by line.
    fn verdict(
        &self,
        dir: Dir,
        subject: Ipv4Addr,
        peer: Ipv4Addr,
        proto: u8,
        port: u16,
    ) -> Result<u8> {
        let endpoint = EndpointKey {
            addr: addr::encode(subject.into()).0,
            family: FAMILY_V4,
            _pad: [0; 3],
        };
        let policy = found(self.endpoints.get(&endpoint, 0))
            .context("POLICY_PODS")?
            .unwrap_or_default();
        let (isolated, dir) = match dir {
            Dir::Egress => (POL_ISOLATED_EGRESS, POL_DIR_EGRESS),
            Dir::Ingress => (POL_ISOLATED_INGRESS, POL_DIR_INGRESS),
        };
        if policy.flags & isolated == 0 {
            return Ok(verdict::ALLOW_NOT_ISOLATED);
        }
        let peer_key = Key::new(
            PEER_KEY_FIXED_BITS + 32,
            PolicyPeerKey {
                class_id: policy.class_id,
                dir,
                family: FAMILY_V4,
                _pad: 0,
                addr: addr::encode(peer.into()).0,
            },
        );
        let Some(peer) = found(self.peers.get(&peer_key, 0)).context("POLICY_PEERS")? else {
            return Ok(verdict::DENY_NO_RULE);
        };
        if peer.portset_id == 0 {
            return Ok(peer.reason as u8);
        }
        let port_key = Key::new(
            PORT_KEY_FIXED_BITS + 16,
            PolicyPortKey {
                portset_id: peer.portset_id,
                proto,
                _pad: 0,
                port: port.to_be(),
            },
        );
        Ok(
            if found(self.ports.get(&port_key, 0))
                .context("POLICY_PORTS")?
                .is_some()
            {
                verdict::ALLOW_RULE
            } else {
                verdict::DENY_PORT
            },
        )
    }
}

/// The map pinned as `name` under `root`, as its typed view (whose key and value sizes aya
/// checks against the kernel's).
fn pinned<T: TryFrom<Map, Error = MapError>>(root: &Path, name: &str) -> Result<T> {
    let pin = root.join(name);
    let data = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
    let map = Map::from_map_data(data).with_context(|| format!("{name}: map type"))?;
    T::try_from(map).with_context(|| format!("{name}: not the map this agent expects"))
}

/// A lookup's value, `None` when the key is absent.
fn found<V>(lookup: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match lookup {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}
