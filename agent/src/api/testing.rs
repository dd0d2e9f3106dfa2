//! The [`PodRegistry`] test double and a server harness, shared by the API and CNI tests.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{AgentStatus, ApiError, PodRegistration, PodRegistry, ProgramState};

/// Keeps registrations in a map; a pod whose `name` is `"unattached"` registers but fails
/// `check`, to exercise `NotReady`.
#[derive(Default)]
pub(crate) struct TestRegistry {
    pub(crate) pods: Mutex<HashMap<String, PodRegistration>>,
}

impl PodRegistry for TestRegistry {
    async fn register(&self, pod: PodRegistration) -> Result<(), ApiError> {
        self.pods
            .lock()
            .unwrap()
            .insert(pod.container_id.clone(), pod);
        Ok(())
    }

    async fn unregister(&self, container_id: &str) -> Result<(), ApiError> {
        self.pods.lock().unwrap().remove(container_id);
        Ok(())
    }

    async fn check(&self, container_id: &str) -> Result<(), ApiError> {
        match self.pods.lock().unwrap().get(container_id) {
            None => Err(ApiError::NotFound(format!(
                "no pod with container id {container_id}"
            ))),
            Some(pod) if pod.name == "unattached" => Err(ApiError::NotReady(format!(
                "programs not attached on {}",
                pod.host_ifname
            ))),
            Some(_) => Ok(()),
        }
    }

    async fn sync(&self) -> Result<Vec<String>, ApiError> {
        Ok(vec!["manifests/bad.yaml: an example rejection".into()])
    }

    async fn status(&self) -> AgentStatus {
        AgentStatus {
            node_name: "node-a".into(),
            pods: self.pods.lock().unwrap().len(),
            frontends: 3,
            socket_lb: true,
            programs: vec![
                ProgramState {
                    name: "sock4_connect".into(),
                    attach_point: Some("/sys/fs/cgroup".into()),
                },
                ProgramState {
                    name: "from_pod".into(),
                    attach_point: None,
                },
            ],
            degraded: vec!["sock4_connect: an example degradation".into()],
        }
    }
}

/// A [`TestRegistry`] served on a socket in its own temp dir, until [`TestServer::stop`].
pub(crate) struct TestServer {
    pub(crate) registry: Arc<TestRegistry>,
    pub(crate) socket: PathBuf,
    // Held so the directory outlives the server.
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub(crate) async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("run/agent.sock");
        let registry = Arc::new(TestRegistry::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let (socket, registry) = (socket.clone(), Arc::clone(&registry));
            async move {
                super::serve(&socket, registry, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        // `serve` binds before its first await point that waits on clients; poll until the
        // socket file shows up rather than sleeping a guessed time.
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            socket.exists(),
            "server did not create {}",
            socket.display()
        );
        Self {
            registry,
            socket,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server and returns what `serve` returned.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task
            .take()
            .unwrap()
            .await
            .expect("serve task panicked")
    }
}
