//! [`run`]: one CNI invocation, from environment and stdin to stdout and exit code.
use std::path::Path;
use std::time::Duration;

use ferrovia_proto::v1;
use serde::Deserialize as _;
use tonic::Code;

use super::env::{CniEnv, Command, PodIdentity, parse_cni_args};
use super::pod::{self, Attachment};
use super::spec::{
    CniError, ErrorCode, FALLBACK_VERSION, NetConf, PrevResult, SUPPORTED_VERSIONS, VersionInfo,
};
use crate::api;

/// How long one call to the agent may take. Attaching a pod's programs takes milliseconds;
/// a wedged agent must not wedge pod creation until the runtime gives up.
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What the binary prints and returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The result, error or version JSON; empty for a successful DEL, CHECK, STATUS or GC.
    pub stdout: String,
    /// 0 on success, 1 with an error on stdout.
    pub exit_code: u8,
    /// Lines for stderr: what a successful invocation wants the operator to know.
    pub log: Vec<String>,
}

impl Outcome {
    /// A failure, for the binary's own errors before [`run`] (e.g. no runtime).
    #[must_use]
    pub fn error(cni_version: &str, err: &CniError) -> Self {
        Self {
            stdout: err.to_json(cni_version),
            exit_code: 1,
            log: Vec::new(),
        }
    }
}

/// Runs one CNI command as the spec describes; never panics on bad input.
pub async fn run(env: &CniEnv, stdin: &[u8]) -> Outcome {
    let mut log = Vec::new();
    // Errors are reported in the version the config speaks, when it says one.
    let conf_version = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned));
    let result = match env.command.parse::<Command>() {
        Ok(Command::Version) => Ok(Some(version(conf_version.as_deref()))),
        Ok(command) => match parse_conf(stdin) {
            Ok(conf) => dispatch(command, env, &conf, &mut log).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match result {
        Ok(stdout) => Outcome {
            stdout: stdout.unwrap_or_default(),
            exit_code: 0,
            log,
        },
        Err(err) => Outcome {
            log,
            ..Outcome::error(conf_version.as_deref().unwrap_or(FALLBACK_VERSION), &err)
        },
    }
}

async fn dispatch(
    command: Command,
    env: &CniEnv,
    conf: &NetConf,
    log: &mut Vec<String>,
) -> Result<Option<String>, CniError> {
    match command {
        Command::Add => add(env, conf).await.map(Some),
        Command::Del => del(env, conf, log).await.map(|()| None),
        Command::Check => check(env, conf).await.map(|()| None),
        Command::Status => status(conf).await.map(|()| None),
        // The agent reconciles its registrations against the pods it sees itself, so there
        // is nothing for the plugin to collect.
        Command::Gc => Ok(None),
        Command::Version => unreachable!("VERSION needs no config and is answered in run()"),
    }
}

/// VERSION: echoes the asked version when supported (as the reference plugins do), else
/// names the newest.
fn version(asked: Option<&str>) -> String {
    let newest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1];
    let cni_version = asked
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(newest);
    serde_json::to_string(&VersionInfo {
        cni_version: cni_version.to_owned(),
        supported_versions: SUPPORTED_VERSIONS,
    })
    .expect("serializing strings cannot fail")
}

/// Parses the config from stdin and checks its version.
pub fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let value: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            ErrorCode::Decode,
            format!("cannot decode the network config on stdin: {e}"),
        )
    })?;
    let conf: NetConf = serde_json::from_value(value).map_err(|e| {
        CniError::new(
            ErrorCode::InvalidConfig,
            format!("invalid network config: {e}"),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "ferrovia-cni does not support CNI version {}",
                conf.cni_version
            ),
        )
        .with_details(format!(
            "supported versions: {}",
            SUPPORTED_VERSIONS.join(", ")
        )));
    }
    Ok(conf)
}

/// The previous plugin's result, which ADD and CHECK cannot do without.
fn prev_result(conf: &NetConf) -> Result<(&serde_json::Value, PrevResult), CniError> {
    let raw = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "no prevResult: ferrovia-cni must be chained after a plugin that creates the \
             interface (e.g. ptp)",
        )
    })?;
    let parsed = PrevResult::deserialize(raw)
        .map_err(|e| CniError::new(ErrorCode::Decode, format!("cannot decode prevResult: {e}")))?;
    Ok((raw, parsed))
}

fn attachment(env: &CniEnv) -> Result<Attachment<'_>, CniError> {
    Ok(Attachment {
        container_id: CniEnv::require(&env.container_id, "CNI_CONTAINERID")?,
        netns: CniEnv::require(&env.netns, "CNI_NETNS")?,
        ifname: CniEnv::require(&env.ifname, "CNI_IFNAME")?,
    })
}

/// ADD: registers the pod, then passes the previous result on unchanged.
async fn add(env: &CniEnv, conf: &NetConf) -> Result<String, CniError> {
    let at = attachment(env)?;
    let args = parse_cni_args(&env.args)?;
    let (raw, prev) = prev_result(conf)?;
    let registration = pod::registration(&prev, at, PodIdentity::from_args(&args))?;

    let mut client = dial(&conf.agent_socket).await?;
    call(
        &conf.agent_socket,
        "register the pod",
        client.register_pod(v1::RegisterPodRequest::from(registration)),
    )
    .await?;

    // A chained plugin's result is the previous result with its own changes (none here),
    // in the config's version.
    let mut result = raw.clone();
    if let Some(obj) = result.as_object_mut() {
        obj.insert("cniVersion".into(), conf.cni_version.clone().into());
    }
    Ok(serde_json::to_string(&result).expect("a JSON value always serializes"))
}

/// DEL: unregisters the pod. Idempotent, and lenient on purpose: when the agent cannot be
/// reached, failing would only make the runtime retry the DEL and hold up the pod's
/// teardown, while the agent drops registrations of vanished pods when it (re)starts.
/// So an unreachable or unresponsive agent is logged and DEL succeeds.
/// An agent that answers with a failure (e.g. a map write failed) fails DEL: the runtime
/// retries, and the agent is there to act on the retry.
async fn del(env: &CniEnv, conf: &NetConf, log: &mut Vec<String>) -> Result<(), CniError> {
    let container_id = CniEnv::require(&env.container_id, "CNI_CONTAINERID")?;
    // Only informational on DEL; a runtime's garbled CNI_ARGS must not block teardown.
    let pod = parse_cni_args(&env.args)
        .map(|a| PodIdentity::from_args(&a))
        .unwrap_or_default();
    let request = v1::UnregisterPodRequest {
        container_id: container_id.to_owned(),
        pod_namespace: pod.namespace,
        pod_name: pod.name,
    };
    let mut client = match api::connect(&conf.agent_socket).await {
        Ok(client) => client,
        Err(e) => {
            log.push(format!(
                "DEL {container_id}: {e}; the agent reconciles on restart"
            ));
            return Ok(());
        }
    };
    match call(
        &conf.agent_socket,
        "unregister the pod",
        client.unregister_pod(request),
    )
    .await
    {
        Err(e) if e.code == ErrorCode::TryAgainLater => {
            log.push(format!(
                "DEL {container_id}: {}; the agent reconciles on restart",
                e.msg
            ));
            Ok(())
        }
        // The agent's unregister is idempotent; a NOT_FOUND is not a failure of DEL either.
        Err(e) if e.code == ErrorCode::UnknownContainer => Ok(()),
        other => other.map(drop),
    }
}

/// CHECK: the previous result still names the pod's interfaces and the agent has its
/// programs attached.
async fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let at = attachment(env)?;
    let args = parse_cni_args(&env.args)?;
    let pod = PodIdentity::from_args(&args);
    let (_, prev) = prev_result(conf)?;
    pod::registration(&prev, at, pod.clone())?;

    let mut client = dial(&conf.agent_socket).await?;
    let request = v1::CheckPodRequest {
        container_id: at.container_id.to_owned(),
        pod_namespace: pod.namespace,
        pod_name: pod.name,
    };
    call(
        &conf.agent_socket,
        "check the pod",
        client.check_pod(request),
    )
    .await
    .map(drop)
}

/// STATUS (spec 1.1): ready when the agent answers.
async fn status(conf: &NetConf) -> Result<(), CniError> {
    let unavailable = |e: CniError| CniError {
        code: ErrorCode::NotAvailable,
        ..e
    };
    let mut client = dial(&conf.agent_socket).await.map_err(unavailable)?;
    call(
        &conf.agent_socket,
        "report its status",
        client.status(v1::StatusRequest {}),
    )
    .await
    .map(drop)
    .map_err(unavailable)
}

async fn dial(
    socket: &Path,
) -> Result<ferrovia_proto::AgentClient<tonic::transport::Channel>, CniError> {
    api::connect(socket)
        .await
        .map_err(|e| CniError::new(ErrorCode::TryAgainLater, e.to_string()))
}

/// One agent call under [`AGENT_CALL_TIMEOUT`], its gRPC status mapped to a CNI error.
async fn call<T>(
    socket: &Path,
    what: &str,
    rpc: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CniError> {
    let socket = socket.display();
    let status = match tokio::time::timeout(AGENT_CALL_TIMEOUT, rpc).await {
        Ok(Ok(response)) => return Ok(response.into_inner()),
        Ok(Err(status)) => status,
        Err(_) => {
            return Err(CniError::new(
                ErrorCode::TryAgainLater,
                format!(
                    "the ferrovia agent at {socket} did not {what} within {}s",
                    AGENT_CALL_TIMEOUT.as_secs()
                ),
            ));
        }
    };
    let code = match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::ResourceExhausted => {
            ErrorCode::TryAgainLater
        }
        Code::NotFound => ErrorCode::UnknownContainer,
        _ => ErrorCode::AgentError,
    };
    Err(CniError::new(
        code,
        format!(
            "the ferrovia agent at {socket} could not {what}: {}",
            status.message()
        ),
    )
    .with_details(format!("gRPC status {:?}", status.code())))
}
