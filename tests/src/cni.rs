//! Runs a CNI plugin chain the way libcni does (CNI spec 1.0, "Section 4: Plugin Delegation"
//! and the conflist execution rules): ADD runs each plugin in order, feeding each the previous
//! one's result as `prevResult`; DEL runs them in reverse with the cached final result.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::cmd::{in_netns, netns_path, run};
use crate::paths::{SYSTEM_CNI_DIR, bin_dir};

/// The CNI version of the conflists the harness writes.
pub const CNI_VERSION: &str = "1.0.0";

/// A network configuration list: a name and plugin configurations, run in order.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The network name (`name` of the conflist); host-local keys its IP store by it.
    pub name: String,
    /// Each plugin's configuration, without `name`, `cniVersion` and `prevResult`.
    pub plugins: Vec<Value>,
}

impl Chain {
    /// `ptp` with `host-local` IPAM on `subnet` (a /24 like `10.100.3.0/24`), default route
    /// through the node, no masquerading. Host-local's store lives in `data_dir`.
    #[must_use]
    pub fn ptp(subnet: &str, data_dir: &Path) -> Self {
        Self {
            name: "ferrovia-test".to_owned(),
            plugins: vec![json!({
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "subnet": subnet,
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": data_dir,
                },
            })],
        }
    }

    /// [`Chain::ptp`] followed by `ferrovia-cni` registering pods with the agent at `agent_socket`.
    #[must_use]
    pub fn ptp_ferrovia(subnet: &str, data_dir: &Path, agent_socket: &Path) -> Self {
        let mut chain = Self::ptp(subnet, data_dir);
        chain.plugins.push(json!({
            "type": "ferrovia-cni",
            "agentSocket": agent_socket,
        }));
        chain
    }

    /// The conflist as a file would hold it.
    #[must_use]
    pub fn to_conflist(&self) -> Value {
        json!({ "cniVersion": CNI_VERSION, "name": self.name, "plugins": self.plugins })
    }

    /// The stdin of one plugin: its conf plus the list's `name`/`cniVersion` and `prevResult`.
    fn plugin_conf(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        let obj = conf.as_object_mut().expect("plugin conf is an object");
        obj.insert("name".into(), json!(self.name));
        obj.insert("cniVersion".into(), json!(CNI_VERSION));
        if let Some(prev) = prev {
            obj.insert("prevResult".into(), prev.clone());
        }
        conf
    }
}

/// Who a chain runs for: the pod's sandbox and the Kubernetes identity passed in `CNI_ARGS`.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// Network namespace of the plugins' "host" side (the node).
    pub host_netns: String,
    /// Name of the pod's network namespace (under /run/netns).
    pub pod_netns: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// Kubernetes namespace of the pod.
    pub k8s_namespace: String,
    /// Kubernetes name of the pod.
    pub k8s_name: String,
}

/// The directories searched for plugin binaries: the reference plugins, then ours.
#[must_use]
pub fn cni_path() -> Vec<PathBuf> {
    vec![PathBuf::from(SYSTEM_CNI_DIR), bin_dir()]
}

fn find_plugin(ty: &str) -> Result<PathBuf> {
    cni_path()
        .into_iter()
        .map(|d| d.join(ty))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("CNI plugin {ty:?} not found in {:?}", cni_path()))
}

/// Runs one plugin; the CNI error JSON on stdout becomes an error naming plugin, code and msg.
fn exec_plugin(command: &str, ty: &str, conf: &Value, inv: &Invocation) -> Result<Option<Value>> {
    let path = find_plugin(ty)?;
    let cni_path = std::env::join_paths(cni_path()).context("joining CNI_PATH")?;
    let mut cmd = in_netns(&inv.host_netns, &path, &[] as &[&str]);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &inv.container_id)
        .env("CNI_NETNS", netns_path(&inv.pod_netns))
        .env("CNI_IFNAME", "eth0")
        // The reference plugins reject unknown args unless IgnoreUnknown=1 is among them.
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                inv.k8s_namespace, inv.k8s_name
            ),
        )
        .env("CNI_PATH", cni_path);
    let stdin = serde_json::to_vec(conf)?;
    let out = run(&mut cmd, Some(&stdin))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if let Ok(err) = serde_json::from_str::<Value>(&stdout) {
            bail!(
                "CNI {command} of plugin {ty} failed: code {} msg {:?}{}{}",
                err["code"],
                err["msg"].as_str().unwrap_or(""),
                err["details"]
                    .as_str()
                    .map(|d| format!(" details {d:?}"))
                    .unwrap_or_default(),
                if stderr.trim().is_empty() {
                    String::new()
                } else {
                    format!(" (stderr: {})", stderr.trim())
                },
            );
        }
        bail!(
            "CNI {command} of plugin {ty} failed ({}): {} {}",
            out.status,
            stdout.trim(),
            stderr.trim()
        );
    }
    if stdout.trim().is_empty() {
        return Ok(None);
    }
    let result = serde_json::from_str(&stdout)
        .with_context(|| format!("CNI {command} of plugin {ty}: result is not JSON: {stdout}"))?;
    Ok(Some(result))
}

/// CNI ADD through the whole chain; returns the final result.
pub fn add(chain: &Chain, inv: &Invocation) -> Result<Value> {
    let mut prev: Option<Value> = None;
    for plugin in &chain.plugins {
        let ty = plugin_type(plugin)?;
        let conf = chain.plugin_conf(plugin, prev.as_ref());
        let result = exec_plugin("ADD", ty, &conf, inv)?
            .ok_or_else(|| anyhow!("CNI ADD of plugin {ty} printed no result"))?;
        prev = Some(result);
    }
    prev.ok_or_else(|| anyhow!("CNI chain {} has no plugins", chain.name))
}

/// CNI DEL through the chain in reverse, each plugin given the cached ADD result. Every plugin
/// runs even if one fails (so cleanup goes as far as it can); the first error is returned.
pub fn del(chain: &Chain, inv: &Invocation, cached: Option<&Value>) -> Result<()> {
    let mut first_err = None;
    for plugin in chain.plugins.iter().rev() {
        let res = plugin_type(plugin)
            .and_then(|ty| exec_plugin("DEL", ty, &chain.plugin_conf(plugin, cached), inv));
        if let Err(e) = res {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// CNI CHECK through the chain in order, each plugin given the cached ADD result (as libcni
/// runs it); the first failure is returned.
pub fn check(chain: &Chain, inv: &Invocation, cached: &Value) -> Result<()> {
    for plugin in &chain.plugins {
        exec_plugin(
            "CHECK",
            plugin_type(plugin)?,
            &chain.plugin_conf(plugin, Some(cached)),
            inv,
        )?;
    }
    Ok(())
}

fn plugin_type(plugin: &Value) -> Result<&str> {
    plugin["type"]
        .as_str()
        .ok_or_else(|| anyhow!("plugin conf without a type: {plugin}"))
}

/// What the tests need from a CNI result: the pod's address and the host-side interface.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// The pod's first IPv4 address.
    pub ip: Ipv4Addr,
    /// Name of the host-side veth (the interface without a `sandbox`).
    pub host_ifname: String,
}

/// Extracts the [`Attachment`] from a CNI 1.0 result.
pub fn attachment(result: &Value) -> Result<Attachment> {
    let ip = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .ok_or_else(|| anyhow!("no IPv4 address in CNI result {result}"))?;
    let host_ifname = result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| {
            i.get("sandbox")
                .is_none_or(|s| s.as_str().is_none_or(str::is_empty))
        })
        .and_then(|i| i["name"].as_str())
        .ok_or_else(|| anyhow!("no host-side interface in CNI result {result}"))?
        .to_owned();
    Ok(Attachment { ip, host_ifname })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_from_ptp_result() {
        let result = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                { "name": "veth1234", "mac": "aa:bb:cc:dd:ee:ff" },
                { "name": "eth0", "mac": "aa:bb:cc:dd:ee:00", "sandbox": "/run/netns/x" },
            ],
            "ips": [{ "interface": 1, "address": "10.100.0.2/24", "gateway": "10.100.0.1" }],
        });
        let a = attachment(&result).unwrap();
        assert_eq!(a.ip, Ipv4Addr::new(10, 100, 0, 2));
        assert_eq!(a.host_ifname, "veth1234");
    }

    #[test]
    fn plugin_conf_carries_list_fields_and_prev_result() {
        let chain = Chain::ptp("10.1.2.0/24", Path::new("/tmp/x"));
        let prev = json!({ "cniVersion": "1.0.0" });
        let conf = chain.plugin_conf(&chain.plugins[0], Some(&prev));
        assert_eq!(conf["name"], "ferrovia-test");
        assert_eq!(conf["cniVersion"], CNI_VERSION);
        assert_eq!(conf["prevResult"], prev);
        assert!(
            chain
                .plugin_conf(&chain.plugins[0], None)
                .get("prevResult")
                .is_none()
        );
    }
}
