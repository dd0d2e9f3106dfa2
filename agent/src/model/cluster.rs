//! The model's input: a snapshot of the Kubernetes objects ferrovia cares about.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;

/// The namespace and name of a namespaced object.
///
/// Ordered by namespace first, so all objects of one namespace are a contiguous range of a
/// `BTreeMap<ObjRef, _>` (see [`ClusterState::in_namespace`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjRef {
    pub namespace: String,
    pub name: String,
}

impl ObjRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The IPs the CNI plugin registered for each running pod, by pod.
///
/// Used for a pod whose manifest has no `status.podIPs`/`status.podIP` (the usual case in
/// manifests mode, where nothing writes a status).
pub type PodIps = BTreeMap<ObjRef, Vec<IpAddr>>;

/// A snapshot of desired state, as published by a [`crate::source::StateSource`].
///
/// Objects are behind `Arc` so that a source can keep and re-publish unchanged objects (the
/// manifests source's last-good retention) without deep copies; the whole snapshot is itself
/// shared as `Arc<ClusterState>`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub services: BTreeMap<ObjRef, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjRef, Arc<EndpointSlice>>,
    pub pods: BTreeMap<ObjRef, Arc<Pod>>,
    /// Namespaces are cluster-scoped: keyed by name.
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub network_policies: BTreeMap<ObjRef, Arc<NetworkPolicy>>,
}

impl ClusterState {
    /// The entries of `map` in `namespace`, in name order.
    pub fn in_namespace<'a, T>(
        map: &'a BTreeMap<ObjRef, T>,
        namespace: &'a str,
    ) -> impl Iterator<Item = (&'a ObjRef, &'a T)> + 'a {
        map.range(ObjRef::new(namespace, "")..)
            .take_while(move |(key, _)| key.namespace == namespace)
    }

    /// How many objects the snapshot holds, all kinds together.
    #[must_use]
    pub fn len(&self) -> usize {
        self.services.len()
            + self.endpoint_slices.len()
            + self.pods.len()
            + self.namespaces.len()
            + self.network_policies.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
