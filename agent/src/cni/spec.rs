//! The CNI spec's wire types (SPEC.md of containernetworking/cni, v1.0 and v1.1), only the
//! parts a chained plugin reads or writes.
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Spec versions this plugin speaks. 0.4.0 is the oldest with CHECK and a `prevResult`
/// on DEL; its result layout (interfaces, ips with an `interface` index) is 1.0's.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// The version used in an error when the config did not say which one it speaks.
pub const FALLBACK_VERSION: &str = "1.0.0";

/// This plugin's network configuration, as the runtime passes it on stdin.
///
/// In a conflist the runtime copies `name` and `cniVersion` into each plugin's config and
/// adds `prevResult`, the result of the plugins before this one.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The agent's API socket.
    #[serde(default = "default_agent_socket")]
    pub agent_socket: PathBuf,
    /// Kept as raw JSON: ADD prints it back unchanged, fields we do not model included.
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
}

fn default_agent_socket() -> PathBuf {
    crate::api::DEFAULT_SOCKET.into()
}

/// The parts of a previous plugin's result ferrovia reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PrevResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
}

/// An interface a previous plugin created; `sandbox` is set for those inside the pod.
#[derive(Clone, Debug, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub sandbox: Option<String>,
}

impl Interface {
    /// True for an interface inside a sandbox (the pod), false for one on the host.
    #[must_use]
    pub fn in_sandbox(&self) -> bool {
        self.sandbox.as_deref().is_some_and(|s| !s.is_empty())
    }
}

/// An address a previous plugin assigned, with its prefix length (`10.250.0.2/24`).
#[derive(Clone, Debug, Deserialize)]
pub struct IpConfig {
    pub address: ipnet::IpNet,
    /// Index into `interfaces` of the interface carrying the address.
    #[serde(default)]
    pub interface: Option<usize>,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
}

/// The spec's well-known error codes (SPEC.md "Error"), plus ferrovia's own from 100 on
/// (the spec leaves 100 and up to plugins).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// Spec 1.1, STATUS: the plugin cannot serve ADDs now.
    NotAvailable = 50,
    /// The agent refused or failed the request.
    AgentError = 100,
}

/// A CNI error: printed on stdout as `{"cniVersion","code","msg","details"}` with a
/// non-zero exit code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    #[must_use]
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error's JSON as the spec lays it out.
    #[must_use]
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code as u32,
            msg: &self.msg,
            details: &self.details,
        })
        .expect("serializing strings and integers cannot fail")
    }
}

/// The answer to VERSION.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub cni_version: String,
    pub supported_versions: &'static [&'static str],
}
