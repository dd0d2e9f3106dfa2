//! The flow events' kernel side as the agent sees it: the per-pod rate limit it configures
//! (`FLOW_CONFIG`) and the reader of the `FLOW_EVENTS` ring buffer.
use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, Map, MapData, RingBuf};
use ferrovia_common::{FlowConfig, FlowEvent};
use tokio::io::{Interest, unix::AsyncFd};

/// Flow events per pod and CPU: at most `per_second` on average, in bursts of up to `burst`.
/// `per_second` 0 turns events off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRate {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for FlowRate {
    fn default() -> Self {
        Self {
            per_second: 100,
            burst: 200,
        }
    }
}

impl FlowRate {
    /// As the programs read it.
    fn config(self) -> Result<FlowConfig> {
        if self.per_second == 0 {
            return Ok(FlowConfig::default());
        }
        if self.burst == 0 {
            bail!(
                "flow events: burst is 0 with a rate of {}/s",
                self.per_second
            );
        }
        let interval_ns = 1_000_000_000 / u64::from(self.per_second);
        Ok(FlowConfig {
            interval_ns: interval_ns.max(1),
            burst_ns: interval_ns.max(1) * u64::from(self.burst),
        })
    }
}

/// Takes the flow events' maps out of the loaded object: the configuration (set to the
/// default rate) and the ring buffer.
pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<(Array<MapData, FlowConfig>, Option<Map>)> {
    let mut config = Array::try_from(
        ebpf.take_map("FLOW_CONFIG")
            .context("map FLOW_CONFIG missing")?,
    )?;
    configure(&mut config, FlowRate::default())?;
    let ring = ebpf
        .take_map("FLOW_EVENTS")
        .context("map FLOW_EVENTS missing")?;
    Ok((config, Some(ring)))
}

/// Writes `rate` where the programs read it.
pub(super) fn configure(map: &mut Array<MapData, FlowConfig>, rate: FlowRate) -> Result<()> {
    map.set(0, rate.config()?, 0).context("writing FLOW_CONFIG")
}

/// Reads `FLOW_EVENTS` as the programs fill it, waking only when there is something to read.
pub struct FlowReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl FlowReader {
    /// Over the ring buffer [`super::Datapath::take_flow_events`] handed out. Needs a tokio
    /// runtime.
    pub fn new(map: Map) -> Result<Self> {
        let ring = RingBuf::try_from(map).context("FLOW_EVENTS is not a ring buffer")?;
        // SAFETY: the ring buffer owns its map's descriptor, which stays open and the same
        // for as long as the `AsyncFd` owns the ring buffer.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("polling FLOW_EVENTS: {e}"))?;
        Ok(Self { ring })
    }

    /// Waits for events and appends every one available to `out` (at least one unless the
    /// wait fails).
    pub async fn read(&mut self, out: &mut Vec<FlowEvent>) -> Result<()> {
        loop {
            let mut guard = self
                .ring
                .readable_mut()
                .await
                .context("polling FLOW_EVENTS")?;
            let ring = guard.get_inner_mut();
            let before = out.len();
            while let Some(item) = ring.next() {
                if let Some(ev) = decode(&item) {
                    out.push(ev);
                }
            }
            guard.clear_ready();
            if out.len() > before {
                return Ok(());
            }
        }
    }

    /// Every event available now, without waiting.
    pub fn drain(&mut self, out: &mut Vec<FlowEvent>) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            if let Some(ev) = decode(&item) {
                out.push(ev);
            }
        }
    }
}

/// A record as the programs wrote it (they write only whole `FlowEvent`s).
fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: `FlowEvent` is plain old data of that size; the read is unaligned-safe.
    Some(unsafe { bytes.as_ptr().cast::<FlowEvent>().read_unaligned() })
}
