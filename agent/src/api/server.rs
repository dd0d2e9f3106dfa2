//! [`serve`]: the gRPC service on the agent's unix socket.
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use ferrovia_proto::v1;
use ferrovia_proto::{Agent, AgentServer};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use super::explain::{ExplainQuery, Explainer};
use super::flows::FlowFeed;
use super::inventory::Inventory;
use super::registry::{PodRegistration, PodRegistry};

/// Serves the agent API for `registry` (pods and the operator's read-only views) on the unix
/// socket `socket` until `shutdown` resolves.
///
/// Creates the socket's directory (mode 0700) when missing, replaces a stale socket left by
/// a previous agent, refuses to start when another agent still answers on it, and makes the
/// socket 0600. The socket file is removed when serving ends, however it ends.
pub async fn serve<R: PodRegistry + Inventory + Explainer + FlowFeed>(
    socket: &Path,
    registry: Arc<R>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    prepare_socket_path(socket)?;
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("binding the API socket {}", socket.display()))?;
    let _socket_file = SocketFile(socket.to_path_buf());
    // Only root may talk to the agent: registering a pod attaches programs to interfaces.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "serving the agent API");

    tonic::transport::Server::builder()
        .add_service(AgentServer::new(AgentService { registry }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .with_context(|| format!("serving the agent API on {}", socket.display()))
}

/// Makes `socket` bindable: its directory exists and no stale socket file is in the way.
fn prepare_socket_path(socket: &Path) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", socket.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; not removing it",
            socket.display()
        );
    }
    // A socket file outlives its agent after a crash; one that still accepts belongs to a
    // running agent, and unlinking it would silently take that agent off the air.
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!(
            "another ferrovia-agent is already serving on {}",
            socket.display()
        );
    }
    std::fs::remove_file(socket)
        .with_context(|| format!("removing the stale socket {}", socket.display()))
}

/// Unlinks the socket when serving ends, also on error or when the future is dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(socket = %self.0.display(), error = %e, "cannot remove the API socket");
        }
    }
}

/// The generated service trait over a [`PodRegistry`].
struct AgentService<R> {
    registry: Arc<R>,
}

#[tonic::async_trait]
impl<R: PodRegistry + Inventory + Explainer + FlowFeed> Agent for AgentService<R> {
    async fn register_pod(
        &self,
        request: Request<v1::RegisterPodRequest>,
    ) -> Result<Response<v1::RegisterPodResponse>, Status> {
        let pod = PodRegistration::try_from(request.into_inner())?;
        tracing::info!(
            container = %pod.container_id, pod = %format_args!("{}/{}", pod.namespace, pod.name),
            host_ifname = %pod.host_ifname, ips = ?pod.ips, "register pod"
        );
        self.registry.register(pod).await?;
        Ok(Response::new(v1::RegisterPodResponse {}))
    }

    async fn unregister_pod(
        &self,
        request: Request<v1::UnregisterPodRequest>,
    ) -> Result<Response<v1::UnregisterPodResponse>, Status> {
        let req = request.into_inner();
        require_container_id(&req.container_id)?;
        tracing::info!(
            container = %req.container_id,
            pod = %format_args!("{}/{}", req.pod_namespace, req.pod_name), "unregister pod"
        );
        self.registry.unregister(&req.container_id).await?;
        Ok(Response::new(v1::UnregisterPodResponse {}))
    }

    async fn check_pod(
        &self,
        request: Request<v1::CheckPodRequest>,
    ) -> Result<Response<v1::CheckPodResponse>, Status> {
        let req = request.into_inner();
        require_container_id(&req.container_id)?;
        self.registry.check(&req.container_id).await?;
        Ok(Response::new(v1::CheckPodResponse {}))
    }

    async fn status(
        &self,
        _request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        Ok(Response::new(self.registry.status().await.into()))
    }

    async fn sync(
        &self,
        _request: Request<v1::SyncRequest>,
    ) -> Result<Response<v1::SyncResponse>, Status> {
        let errors = self.registry.sync().await?;
        Ok(Response::new(v1::SyncResponse { errors }))
    }

    async fn list_services(
        &self,
        _request: Request<v1::ListServicesRequest>,
    ) -> Result<Response<v1::ListServicesResponse>, Status> {
        Ok(Response::new(self.registry.services().await.into()))
    }

    async fn list_endpoints(
        &self,
        _request: Request<v1::ListEndpointsRequest>,
    ) -> Result<Response<v1::ListEndpointsResponse>, Status> {
        let ports = self.registry.endpoints().await;
        Ok(Response::new(v1::ListEndpointsResponse {
            service_ports: ports.into_iter().map(Into::into).collect(),
        }))
    }

    async fn list_policies(
        &self,
        _request: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        Ok(Response::new(self.registry.policies().await.into()))
    }

    async fn list_pods(
        &self,
        _request: Request<v1::ListPodsRequest>,
    ) -> Result<Response<v1::ListPodsResponse>, Status> {
        let pods = self.registry.pods().await;
        Ok(Response::new(v1::ListPodsResponse {
            pods: pods.into_iter().map(Into::into).collect(),
        }))
    }

    async fn get_maps(
        &self,
        _request: Request<v1::GetMapsRequest>,
    ) -> Result<Response<v1::GetMapsResponse>, Status> {
        Ok(Response::new(self.registry.maps().await?.into()))
    }

    async fn explain(
        &self,
        request: Request<v1::ExplainRequest>,
    ) -> Result<Response<v1::ExplainResponse>, Status> {
        let query = ExplainQuery::try_from(request.into_inner())?;
        Ok(Response::new(self.registry.explain(query).await?.into()))
    }

    type FlowsStream = super::flows::FlowStream;

    async fn flows(
        &self,
        request: Request<v1::FlowsRequest>,
    ) -> Result<Response<Self::FlowsStream>, Status> {
        let hub = self.registry.flow_hub().await;
        super::flows::stream(hub, request.get_ref()).map(Response::new)
    }
}

fn require_container_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("container_id is empty"));
    }
    Ok(())
}
