//! Desired state from a directory of Kubernetes YAML manifests, kept up to date with `notify`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::decode::{self, Decoded, Identity, Kind, Object};
use super::{ManifestError, StateSource};
use crate::model::ClusterState;

/// How long the directory must stay quiet after a change before it is reloaded: an editor's
/// save or a `kubectl`-style rewrite is several events in a burst.
pub const DEBOUNCE: Duration = Duration::from_millis(10);
/// A reload happens at the latest this long after the first change, even if changes keep coming.
pub const MAX_DELAY: Duration = Duration::from_millis(200);

/// The manifests directory as a [`StateSource`].
///
/// Reads every `*.yaml`/`*.yml` file directly in the directory (not in subdirectories; hidden
/// files are skipped, symlinks followed, so a mounted `ConfigMap` works), each with any number of
/// `---`-separated documents of kind `v1 Service`, `discovery.k8s.io/v1 EndpointSlice`,
/// `v1 Pod`, `v1 Namespace` or `networking.k8s.io/v1 NetworkPolicy`.
///
/// Keeps the last good state: a file that cannot be read or parsed keeps contributing the
/// objects it had at its last good load, an invalid object keeps its previous valid version (if
/// any), and a deleted file takes its objects with it. Every rejection is a [`ManifestError`],
/// logged once when it appears and available from [`ManifestsSource::errors`].
pub struct ManifestsSource {
    dir: PathBuf,
    store: Mutex<Store>,
}

#[derive(Default)]
struct Store {
    /// What each file contributed at the last load, kept for when it next fails to parse.
    files: BTreeMap<PathBuf, Vec<Entry>>,
    /// The outcome of parsing each file, by what the file looked like then: a reload parses
    /// only files that changed (a directory with 10,000 services must not be re-read whole
    /// because one endpoint moved).
    parsed: BTreeMap<PathBuf, Parsed>,
    state: Arc<ClusterState>,
    errors: Vec<ManifestError>,
}

/// A file's identity and version as the file system tells them: editors and `kubectl`-like
/// tools either rewrite in place (size/mtime change) or rename a new file over it (inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            inode: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

#[derive(Clone, Debug)]
struct Parsed {
    stamp: Stamp,
    entries: Option<Vec<Entry>>,
    errors: Vec<ManifestError>,
}

#[derive(Clone, Debug)]
struct Entry {
    document: usize,
    identity: Identity,
    object: Object,
}

impl ManifestsSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            store: Mutex::default(),
        }
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the whole directory again, now, and returns the resulting state. Synchronous, for
    /// tests and the agent's first sync; [`StateSource::run`] calls it on every change.
    pub fn reload(&self) -> Arc<ClusterState> {
        let mut store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        let mut errors = Vec::new();
        let paths = match manifest_files(&self.dir) {
            Ok(paths) => paths,
            Err(e) => {
                // Without a listing nothing is known to have changed: keep everything.
                errors.push(ManifestError::file(
                    &self.dir,
                    None,
                    format!("cannot list the directory: {e}"),
                ));
                store.files.keys().cloned().collect()
            }
        };
        let mut files = BTreeMap::new();
        let mut parsed = BTreeMap::new();
        for path in paths {
            let stamp = Stamp::of(&path);
            let outcome = match store.parsed.get(&path) {
                Some(cached) if Some(cached.stamp) == stamp => cached.clone(),
                _ => {
                    let mut file_errors = Vec::new();
                    let entries = load_file(&path, &store.state, &mut file_errors);
                    Parsed {
                        stamp: stamp.unwrap_or(Stamp {
                            inode: 0,
                            len: 0,
                            mtime_ns: -1,
                        }),
                        entries,
                        errors: file_errors,
                    }
                }
            };
            errors.extend(outcome.errors.iter().cloned());
            match &outcome.entries {
                Some(entries) => {
                    files.insert(path.clone(), entries.clone());
                }
                None => {
                    if let Some(kept) = store.files.get(&path) {
                        files.insert(path.clone(), kept.clone());
                    }
                }
            }
            if stamp.is_some() {
                parsed.insert(path, outcome);
            }
        }
        store.parsed = parsed;
        let state = merge(&files, &mut errors);

        for error in errors.iter().filter(|e| !store.errors.contains(e)) {
            tracing::warn!("manifest rejected: {error}");
        }
        if errors.is_empty() && !store.errors.is_empty() {
            tracing::info!("manifests: all earlier errors are resolved");
        }
        store.files = files;
        store.errors = errors;
        if !same_objects(&store.state, &state) {
            store.state = Arc::new(state);
        }
        Arc::clone(&store.state)
    }

    /// The state of the last load.
    #[must_use]
    pub fn state(&self) -> Arc<ClusterState> {
        Arc::clone(
            &self
                .store
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .state,
        )
    }

    /// Loads once, then starts [`StateSource::run`] on the current tokio runtime: the receiver
    /// holds the loaded state at once and sees every change after.
    pub fn spawn(
        self: &Arc<Self>,
    ) -> (
        watch::Receiver<Arc<ClusterState>>,
        JoinHandle<anyhow::Result<()>>,
    ) {
        let (tx, rx) = watch::channel(self.reload());
        let source = Arc::clone(self);
        (rx, tokio::spawn(async move { source.run(tx).await }))
    }
}

impl StateSource for ManifestsSource {
    type Error = ManifestError;

    /// Watches the directory (creations, writes, deletions, renames — editors save by renaming
    /// a temporary file) and reloads it all once it has been quiet for [`DEBOUNCE`]. Returns
    /// when every receiver is gone.
    async fn run(&self, tx: watch::Sender<Arc<ClusterState>>) -> anyhow::Result<()> {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            // Fails only once run() has returned and nobody listens.
            let _ = events_tx.send(event);
        })
        .context("cannot create a file watcher")?;
        watcher
            .watch(&self.dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", self.dir.display()))?;
        // Load after the watch is in place, so no change slips in between.
        publish(&tx, self.reload());
        loop {
            let event = tokio::select! {
                () = tx.closed() => return Ok(()),
                event = events.recv() => event,
            };
            match event {
                None => return Ok(()),
                Some(Ok(event)) if matches!(event.kind, EventKind::Access(_)) => continue,
                Some(Ok(_)) => {}
                // Events were lost (queue overflow…): the full reload below covers them.
                Some(Err(e)) => tracing::warn!("watching {}: {e}", self.dir.display()),
            }
            let deadline = Instant::now() + MAX_DELAY;
            while let Ok(Some(_)) = tokio::time::timeout(DEBOUNCE, events.recv()).await {
                if Instant::now() >= deadline {
                    break;
                }
            }
            // Synchronous; only changed files are parsed again.
            let started = Instant::now();
            let state = self.reload();
            tracing::debug!(
                elapsed_us = started.elapsed().as_micros() as u64,
                "manifests reloaded"
            );
            publish(&tx, state);
        }
    }

    fn errors(&self) -> Vec<ManifestError> {
        self.store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .errors
            .clone()
    }
}

/// Loads `dir` once, without keeping anything: the state and every error.
pub fn load_dir(dir: impl Into<PathBuf>) -> (Arc<ClusterState>, Vec<ManifestError>) {
    let source = ManifestsSource::new(dir);
    let state = source.reload();
    (state, source.errors())
}

/// Publishes `state` unless the receivers already have it.
fn publish(tx: &watch::Sender<Arc<ClusterState>>, state: Arc<ClusterState>) {
    tx.send_if_modified(|current| {
        let changed = !Arc::ptr_eq(current, &state) && **current != *state;
        if changed {
            *current = state;
        }
        changed
    });
}

/// Whether two snapshots hold the very same objects. Objects of files that were not parsed
/// again are the same `Arc`s, so pointer equality answers without a deep comparison of every
/// object (tens of milliseconds at 10,000 services); a file rewritten with identical content
/// counts as a change, which only costs a no-op sync.
fn same_objects(a: &ClusterState, b: &ClusterState) -> bool {
    fn same<K: PartialEq, V>(a: &BTreeMap<K, Arc<V>>, b: &BTreeMap<K, Arc<V>>) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((ka, va), (kb, vb))| ka == kb && Arc::ptr_eq(va, vb))
    }
    same(&a.services, &b.services)
        && same(&a.endpoint_slices, &b.endpoint_slices)
        && same(&a.pods, &b.pods)
        && same(&a.namespaces, &b.namespaces)
        && same(&a.network_policies, &b.network_policies)
}

fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let yaml = Path::new(name)
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml");
        // Follows symlinks: a mounted ConfigMap's files are symlinks. A dangling one (an
        // editor's lock file) is skipped.
        if yaml && !name.starts_with('.') && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// The objects `path` contributes now, or `None` when it cannot be read or parsed (the caller
/// then keeps its previous contribution).
fn load_file(
    path: &Path,
    previous: &ClusterState,
    errors: &mut Vec<ManifestError>,
) -> Option<Vec<Entry>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        // Deleted since the listing: it contributes nothing.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(Vec::new()),
        Err(e) => {
            errors.push(ManifestError::file(path, None, format!("cannot read: {e}")));
            return None;
        }
    };
    let documents = match decode::documents(path, &text) {
        Ok(documents) => documents,
        Err(e) => {
            errors.push(*e);
            return None;
        }
    };
    let mut entries = Vec::new();
    for (document, value) in documents {
        match decode::decode(path, document, &value) {
            Decoded::Valid(identity, object) => entries.push(Entry {
                document,
                identity,
                object,
            }),
            Decoded::Invalid(identity, problems) => {
                errors.extend(problems);
                if let Some(identity) = identity
                    && let Some(object) = previous_version(previous, &identity)
                {
                    entries.push(Entry {
                        document,
                        identity,
                        object,
                    });
                }
            }
            Decoded::Ignored => {}
        }
    }
    Some(entries)
}

fn previous_version(state: &ClusterState, id: &Identity) -> Option<Object> {
    match id.kind {
        Kind::Service => state.services.get(&id.key).cloned().map(Object::Service),
        Kind::EndpointSlice => state
            .endpoint_slices
            .get(&id.key)
            .cloned()
            .map(Object::EndpointSlice),
        Kind::Pod => state.pods.get(&id.key).cloned().map(Object::Pod),
        Kind::Namespace => state
            .namespaces
            .get(&id.key.name)
            .cloned()
            .map(Object::Namespace),
        Kind::NetworkPolicy => state
            .network_policies
            .get(&id.key)
            .cloned()
            .map(Object::NetworkPolicy),
    }
}

/// Builds the state from every file's objects, in file then document order; an object defined
/// twice keeps its first definition.
fn merge(files: &BTreeMap<PathBuf, Vec<Entry>>, errors: &mut Vec<ManifestError>) -> ClusterState {
    let mut state = ClusterState::default();
    let mut first: HashMap<&Identity, (&Path, usize)> = HashMap::new();
    for (path, entries) in files {
        for entry in entries {
            if let Some((file, document)) = first.get(&entry.identity) {
                errors.push(ManifestError {
                    file: path.clone(),
                    line: None,
                    document: Some(entry.document),
                    object: Some(entry.identity.to_string()),
                    field: Some("metadata.name".to_owned()),
                    message: format!(
                        "duplicate: already defined in {} document {document}",
                        file.display()
                    ),
                });
                continue;
            }
            first.insert(&entry.identity, (path, entry.document));
            let key = entry.identity.key.clone();
            match &entry.object {
                Object::Service(o) => drop(state.services.insert(key, Arc::clone(o))),
                Object::EndpointSlice(o) => drop(state.endpoint_slices.insert(key, Arc::clone(o))),
                Object::Pod(o) => drop(state.pods.insert(key, Arc::clone(o))),
                Object::Namespace(o) => drop(state.namespaces.insert(key.name, Arc::clone(o))),
                Object::NetworkPolicy(o) => {
                    drop(state.network_policies.insert(key, Arc::clone(o)));
                }
            }
        }
    }
    state
}
