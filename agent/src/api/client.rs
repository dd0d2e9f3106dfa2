//! [`connect`]: a gRPC client for the agent's unix socket.
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrovia_proto::AgentClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long dialing the socket may take. A local socket answers at once or not at all;
/// the CNI plugin runs inside the runtime's own deadline and must fail fast.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The agent did not answer on its socket.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the ferrovia agent at {}: {reason} (is ferrovia-agent running?)", socket.display())]
pub struct ConnectError {
    /// The socket dialed.
    pub socket: PathBuf,
    /// The innermost cause, e.g. "No such file or directory (os error 2)": tonic's own
    /// message is only "transport error".
    pub reason: String,
    #[source]
    source: tonic::transport::Error,
}

/// Connects to the agent listening on the unix socket `socket`.
///
/// The returned client carries no per-request deadline: callers that must not hang (the
/// CNI plugin) put their own timeout around each call, and streaming calls need none.
pub async fn connect(socket: &Path) -> Result<AgentClient<Channel>, ConnectError> {
    let path = socket.to_path_buf();
    // The URI is never dialed (the connector ignores it); it only fills `:authority`.
    let channel = Endpoint::from_static("http://ferrovia-agent")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ConnectError {
            socket: socket.to_path_buf(),
            reason: innermost_cause(&source),
            source,
        })?;
    Ok(AgentClient::new(channel))
}

fn innermost_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
