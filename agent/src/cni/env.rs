//! The plugin's environment: `CNI_*` variables and `CNI_ARGS`.
use super::spec::{CniError, ErrorCode};

/// The CNI operation (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    /// Spec 1.1: is the plugin ready for ADDs?
    Status,
    /// Spec 1.1: garbage-collect attachments the runtime no longer knows.
    Gc,
}

impl std::str::FromStr for Command {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "" => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    "CNI_COMMAND is not set",
                ));
            }
            other => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("unknown CNI_COMMAND {other:?}"),
                ));
            }
        })
    }
}

/// The `CNI_*` environment variables; unset ones are empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
}

impl CniEnv {
    /// Reads the variables through `lookup` (the process environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| lookup(name).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
            path: var("CNI_PATH"),
        }
    }

    /// Reads the process environment.
    #[must_use]
    pub fn from_process() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The value of a variable the command cannot do without.
    pub(crate) fn require<'a>(value: &'a str, name: &str) -> Result<&'a str, CniError> {
        if value.is_empty() {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("{name} is not set"),
            ));
        }
        Ok(value)
    }
}

/// Parses `CNI_ARGS` (`K=V;K=V`). Empty segments are skipped; a segment without `=` is an
/// error, as in the reference plugins. Unknown keys (`IgnoreUnknown=1` among them) are
/// kept: the caller picks what it knows.
pub fn parse_cni_args(args: &str) -> Result<Vec<(&str, &str)>, CniError> {
    args.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once('=').ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_ARGS: {pair:?} is not K=V"),
                )
            })
        })
        .collect()
}

/// The pod's Kubernetes identity, from the keys kubelet's runtimes put in `CNI_ARGS`.
/// Both are empty under a runtime that is not Kubernetes'.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
}

impl PodIdentity {
    #[must_use]
    pub fn from_args(args: &[(&str, &str)]) -> Self {
        let get = |key: &str| {
            args.iter()
                .rev()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
                .unwrap_or_default()
        };
        Self {
            namespace: get("K8S_POD_NAMESPACE"),
            name: get("K8S_POD_NAME"),
        }
    }
}
