//! The model's output: the frontends (VIP, port, protocol) the data path must serve, and the
//! backends each one balances over.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::ObjRef;

/// A transport protocol the data path balances. SCTP services are skipped (see
/// [`Desired::skipped`]): the BPF programs do not parse SCTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The Kubernetes spelling, as in `spec.ports[].protocol`.
    #[must_use]
    pub fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_k8s())
    }
}

/// What a client connects to: a service VIP, port and protocol.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.vip, self.port),
            self.protocol
        )
    }
}

/// One service port on one VIP, and where its traffic goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// The Service this frontend belongs to.
    pub service: ObjRef,
    /// The service port's name (`""` when unnamed).
    pub port_name: String,
    /// `Some(timeout)` for `sessionAffinity: ClientIP`.
    pub affinity_timeout_s: Option<u32>,
    /// The selected endpoints, sorted and deduplicated, all of the VIP's family. Empty when the
    /// service has no usable endpoint: the data path must then reject, not pass, the traffic.
    pub backends: Vec<SocketAddr>,
}

/// A service (port) that gets no frontend although one might expect it, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub service: ObjRef,
    /// The service port's name, `None` when the whole service is skipped.
    pub port_name: Option<String>,
    pub reason: String,
}

/// Everything the data path should serve, computed by [`super::compute`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Services or ports left out, for status and logs (SCTP, no cluster IP, VIP conflicts…).
    pub skipped: Vec<Skipped>,
}
