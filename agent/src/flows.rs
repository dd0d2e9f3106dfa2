//! Flow events as the operator sees them: the data path's raw events (`FLOW_EVENTS`), named
//! with pods and services ([`Names`], refreshed by the node at each sync), kept for late
//! readers (the most recent `capacity`) and fanned out to followers (`Flows --follow`).
//!
//! A slow follower cannot hold the agent back: followers read from a bounded broadcast
//! channel and one that falls behind loses the oldest events (told in the log), while the
//! reader of the ring buffer never waits for them.
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ferrovia_common::{POL_DIR_EGRESS, PROTO_TCP, PROTO_UDP, drop, flow, verdict};
use ferrovia_proto::v1;
use tokio::sync::broadcast;

use crate::datapath::events::FlowReader;
use crate::model::{ClusterState, Desired, ObjRef, PodIps, Protocol};

/// An event as served: shared between the recent buffer and every follower.
pub type Flow = Arc<v1::FlowEvent>;

/// Who is behind the addresses and interfaces of events.
#[derive(Debug, Default)]
pub struct Names {
    /// Registered pods by host-side interface index.
    by_ifindex: HashMap<u32, ObjRef>,
    /// Every pod the agent knows an IPv4 address of (registered here, or in the state).
    by_ip: HashMap<Ipv4Addr, ObjRef>,
    /// Frontends: (VIP, port, IP protocol) → (service, port name).
    frontends: HashMap<(Ipv4Addr, u16, u8), (ObjRef, String)>,
}

impl Names {
    /// From the node's state: `local` the registered pods as (interface index, pod), with
    /// their addresses in `pod_ips`.
    pub fn new(
        state: &ClusterState,
        local: impl Iterator<Item = (u32, ObjRef)>,
        pod_ips: &PodIps,
        desired: &Desired,
    ) -> Self {
        let mut names = Self {
            by_ip: crate::model::endpoints::pods_by_ipv4(state, pod_ips)
                .into_iter()
                .map(|(ip, (pod, _))| (ip, pod))
                .collect(),
            ..Self::default()
        };
        for (ifindex, pod) in local {
            if ifindex != 0 {
                names.by_ifindex.insert(ifindex, pod);
            }
        }
        for (key, frontend) in &desired.frontends {
            if let IpAddr::V4(vip) = key.vip {
                let proto = match key.protocol {
                    Protocol::Tcp => PROTO_TCP,
                    Protocol::Udp => PROTO_UDP,
                };
                names.frontends.insert(
                    (vip, key.port, proto),
                    (frontend.service.clone(), frontend.port_name.clone()),
                );
            }
        }
        names
    }

    fn pod_of(&self, ip: Ipv4Addr) -> String {
        self.by_ip
            .get(&ip)
            .map(ToString::to_string)
            .unwrap_or_default()
    }
}

/// The recent events and the followers'channel.
pub struct FlowHub {
    names: RwLock<Arc<Names>>,
    recent: Mutex<VecDeque<Flow>>,
    capacity: usize,
    tx: broadcast::Sender<Flow>,
    /// Unix time minus `CLOCK_MONOTONIC` (what `bpf_ktime_get_ns` counts), in ns; read again
    /// at each batch, so that a step of the wall clock (NTP) shows in later events.
    clock_offset_ns: std::sync::atomic::AtomicI64,
    /// Events published since the start.
    read: AtomicU64,
}

impl FlowHub {
    /// Keeps the last `capacity` events; a follower may lag `capacity` events behind.
    #[must_use]
    pub fn new(capacity: usize) -> Arc<Self> {
        let capacity = capacity.max(1);
        Arc::new(Self {
            names: RwLock::new(Arc::new(Names::default())),
            recent: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            tx: broadcast::channel(capacity).0,
            clock_offset_ns: std::sync::atomic::AtomicI64::new(clock_offset_ns()),
            read: AtomicU64::new(0),
        })
    }

    /// Replaces the names events are given from now on.
    pub fn set_names(&self, names: Names) {
        *self
            .names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(names);
    }

    /// Events published since the start.
    #[must_use]
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Names `raw` events and hands them to the recent buffer and the followers.
    pub fn publish(&self, raw: &[ferrovia_common::FlowEvent]) {
        self.read.fetch_add(raw.len() as u64, Ordering::Relaxed);
        self.clock_offset_ns
            .store(clock_offset_ns(), Ordering::Relaxed);
        let names = Arc::clone(
            &self
                .names
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ev in raw {
            let ev = Arc::new(self.name(&names, ev));
            if recent.len() == self.capacity {
                recent.pop_front();
            }
            recent.push_back(Arc::clone(&ev));
            // No follower is not an error.
            let _ = self.tx.send(ev);
        }
    }

    /// The last `last` recent events `filter` matches, oldest first, and with `follow` a
    /// receiver of every event published after them (taken under the same lock: no event is
    /// lost or sent twice between the two).
    pub fn subscribe(
        &self,
        filter: &FlowFilter,
        last: usize,
        follow: bool,
    ) -> (Vec<Flow>, Option<broadcast::Receiver<Flow>>) {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut matching: Vec<Flow> = recent
            .iter()
            .rev()
            .filter(|ev| filter.matches(ev))
            .take(last)
            .cloned()
            .collect();
        matching.reverse();
        let rx = follow.then(|| self.tx.subscribe());
        (matching, rx)
    }

    /// One raw event with names.
    fn name(&self, names: &Names, ev: &ferrovia_common::FlowEvent) -> v1::FlowEvent {
        let src = ip(ev.saddr);
        // The socket hooks' events have no interface: the pod is the client.
        let at = if ev.ifindex == 0 {
            names.by_ip.get(&src)
        } else {
            names.by_ifindex.get(&ev.ifindex)
        };
        let (namespace, pod) = at
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .unwrap_or_default();
        let (dst, dport) = (ip(ev.xaddr), u16::from_be(ev.xport));
        let (vip, vport) = (ip(ev.daddr), u16::from_be(ev.dport));
        // Through a service: translated, or addressed to a frontend (a refusal for want of
        // endpoints, a drop before the translation).
        let service = names.frontends.get(&(vip, vport, ev.proto));
        let via = (vip, vport) != (dst, dport) || service.is_some();
        let time = i128::from(ev.ts_ns) + i128::from(self.clock_offset_ns.load(Ordering::Relaxed));
        v1::FlowEvent {
            time_unix_nano: u64::try_from(time.max(0)).unwrap_or(u64::MAX),
            r#type: match ev.kind {
                flow::DROP => "drop",
                flow::TRANSLATE => "translation",
                _ => "new-connection",
            }
            .into(),
            direction: if ev.dir == POL_DIR_EGRESS {
                "egress"
            } else {
                "ingress"
            }
            .into(),
            namespace,
            pod,
            protocol: protocol_name(ev.proto),
            source: if ev.saddr == 0 {
                String::new()
            } else {
                src.to_string()
            },
            source_port: u32::from(u16::from_be(ev.sport)),
            source_pod: names.pod_of(src),
            destination: dst.to_string(),
            destination_port: u32::from(dport),
            destination_pod: names.pod_of(dst),
            verdict: match ev.verdict {
                flow::NOT_JUDGED => String::new(),
                r if verdict::allows(r) => "allowed".into(),
                _ => "denied".into(),
            },
            policy_reason: if ev.verdict == flow::NOT_JUDGED {
                String::new()
            } else {
                verdict::name(ev.verdict).into()
            },
            drop_reason: drop_name(ev.drop).into(),
            service_address: if via { vip.to_string() } else { String::new() },
            service_port: if via { u32::from(vport) } else { 0 },
            service: service.map(|(s, _)| s.to_string()).unwrap_or_default(),
            service_port_name: service.map(|(_, p)| p.clone()).unwrap_or_default(),
            suppressed: ev.suppressed,
            policy_direction: match ev.verdict {
                flow::NOT_JUDGED => String::new(),
                _ if ev.policy_dir == POL_DIR_EGRESS => "egress".into(),
                _ => "ingress".into(),
            },
        }
    }
}

/// Reads the ring buffer until it fails, publishing every batch.
pub async fn run(mut reader: FlowReader, hub: Arc<FlowHub>) {
    let mut batch = Vec::new();
    loop {
        batch.clear();
        if let Err(e) = reader.read(&mut batch).await {
            tracing::error!("flow events stopped: {e:#}");
            return;
        }
        reader.drain(&mut batch);
        hub.publish(&batch);
    }
}

/// Which events a `Flows` reader wants (every field optional).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// (namespace, name): a name alone matches in any namespace.
    pub pod: Option<(Option<String>, String)>,
    pub namespace: Option<String>,
    pub verdict: Option<VerdictFilter>,
    pub protocol: Option<String>,
    pub port: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictFilter {
    /// Let through.
    Allowed,
    /// Dropped by `NetworkPolicy`.
    Denied,
    /// Dropped for any reason.
    Dropped,
}

impl FlowFilter {
    /// From a request; the error names the field.
    pub fn parse(req: &v1::FlowsRequest) -> Result<Self, String> {
        let pod = match req.pod.split_once('/') {
            _ if req.pod.is_empty() => None,
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
                Some((Some(ns.to_owned()), name.to_owned()))
            }
            Some(_) => {
                return Err(format!(
                    "pod {:?}: expected namespace/name or name",
                    req.pod
                ));
            }
            None => Some((None, req.pod.clone())),
        };
        let verdict = match req.verdict.to_ascii_lowercase().as_str() {
            "" => None,
            "allowed" => Some(VerdictFilter::Allowed),
            "denied" => Some(VerdictFilter::Denied),
            "dropped" => Some(VerdictFilter::Dropped),
            other => {
                return Err(format!(
                    "verdict {other:?}: expected allowed, denied or dropped"
                ));
            }
        };
        let protocol = match req.protocol.to_ascii_uppercase().as_str() {
            "" => None,
            p @ ("TCP" | "UDP") => Some(p.to_owned()),
            other => return Err(format!("protocol {other:?}: expected TCP or UDP")),
        };
        if req.port > u32::from(u16::MAX) {
            return Err(format!("port {}: expected 1 to 65535", req.port));
        }
        Ok(Self {
            pod,
            namespace: (!req.namespace.is_empty()).then(|| req.namespace.clone()),
            verdict,
            protocol,
            port: (req.port != 0).then_some(req.port),
        })
    }

    #[must_use]
    pub fn matches(&self, ev: &v1::FlowEvent) -> bool {
        if let Some((ns, name)) = &self.pod
            && (ev.pod != *name || ns.as_ref().is_some_and(|ns| ev.namespace != *ns))
        {
            return false;
        }
        if self
            .namespace
            .as_ref()
            .is_some_and(|ns| ev.namespace != *ns)
        {
            return false;
        }
        let dropped = ev.r#type == "drop";
        match self.verdict {
            Some(VerdictFilter::Allowed) if dropped => return false,
            Some(VerdictFilter::Denied) if ev.verdict != "denied" => return false,
            Some(VerdictFilter::Dropped) if !dropped => return false,
            _ => {}
        }
        if self.protocol.as_ref().is_some_and(|p| ev.protocol != *p) {
            return false;
        }
        self.port
            .is_none_or(|p| ev.destination_port == p || ev.service_port == p)
    }
}

fn ip(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(raw))
}

fn protocol_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        1 => "ICMP".into(),
        p => p.to_string(),
    }
}

fn drop_name(why: u8) -> &'static str {
    match why {
        drop::NONE => "",
        drop::POLICY => "policy-denied",
        drop::NO_ENDPOINTS => "no-endpoints",
        drop::CT_FULL => "conntrack-full",
        _ => "translation-error",
    }
}

/// Unix time minus `CLOCK_MONOTONIC`, in ns (fits: the Unix time in ns does until 2262).
fn clock_offset_ns() -> i64 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write.
        unsafe { libc::clock_gettime(clock, &raw mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    i64::try_from(read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}

#[cfg(test)]
mod tests;
