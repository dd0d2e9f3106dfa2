//! Where desired state comes from.
//!
//! One trait, [`StateSource`], two sources: a directory of Kubernetes YAML manifests
//! ([`ManifestsSource`], the embedded default) and, later, the Kubernetes API through kube-rs.
//! Both publish the same [`ClusterState`] snapshots, so the model and the data path cannot tell
//! them apart.
//!
//! - [`manifests`]: the directory, its watcher and its last-good-state bookkeeping.
//! - [`decode`]: a file's YAML documents into typed objects.
//! - [`validate`]: the API server's checks, for the fields ferrovia reads.
//! - [`error`]: [`ManifestError`], located by file, document, object and field.

pub mod decode;
pub mod error;
pub mod manifests;
pub mod validate;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

pub use crate::model::{ClusterState, ObjRef};
pub use error::ManifestError;
pub use manifests::{ManifestsSource, load_dir};

/// A source of desired state.
pub trait StateSource: Send + Sync {
    /// What the source rejects (a manifest error, an API object that fails validation…).
    type Error: std::error::Error + Clone + Send + Sync + 'static;

    /// Publishes the current state into `tx`, then every change, until all receivers are gone.
    /// An error means the source cannot work at all (its directory cannot be watched…); bad
    /// objects are not errors here but [`StateSource::errors`].
    fn run(
        &self,
        tx: watch::Sender<Arc<ClusterState>>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// What the last load rejected, for status and tests.
    fn errors(&self) -> Vec<Self::Error>;
}
