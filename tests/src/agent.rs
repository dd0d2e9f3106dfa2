//! Running `ferrovia-agent` for a node: in the node's network namespace, in a cgroup of its own
//! (outside the hooked one, and swept if the test process dies), logging to the node's temp dir.
//! Its gRPC API is reached through the `ferrovia` CLI, its HTTP endpoint (`--metrics-addr`)
//! through `ferrovia-echo http-get` inside the node's network namespace.

use std::ffi::{CString, OsString};
use std::fs;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::cmd::{in_netns, netns_path, run_ok, tail};
use crate::node::NodeInner;
use crate::paths::bin;

/// How long an agent may take to create its API socket; generous for a loaded 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an agent sent SIGTERM may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// How to run the agent.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    /// Socket-level load balancing (`--socket-lb`).
    pub socket_lb: bool,
    /// `--metrics-addr`: where the agent serves HTTP, inside the node's network namespace
    /// (e.g. `127.0.0.1:9963`; every node has its own loopback, so any port will do).
    pub metrics_addr: Option<SocketAddr>,
    /// Further flags, appended.
    pub extra_args: Vec<String>,
    /// The binary; `None` is the workspace's `ferrovia-agent`.
    pub binary: Option<PathBuf>,
}

impl Default for AgentOpts {
    fn default() -> Self {
        Self {
            socket_lb: true,
            metrics_addr: None,
            extra_args: Vec::new(),
            binary: None,
        }
    }
}

/// A reply of the agent's HTTP endpoint, as `ferrovia-echo http-get` prints it.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

/// A running agent. Dropping it kills the agent (and prints its log tail if the test panicked).
pub struct Agent {
    node: Arc<NodeInner>,
    opts: AgentOpts,
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    pub(crate) fn start(node: &Arc<NodeInner>, opts: AgentOpts) -> Result<Self> {
        let mut agent = Self {
            node: Arc::clone(node),
            opts,
            child: None,
            log: node.dir.join("agent.log"),
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn socket(&self) -> PathBuf {
        self.node.dir.join("agent.sock")
    }

    fn spawn(&mut self) -> Result<()> {
        let socket = self.socket();
        // A socket left by a previous run must not count as ready.
        let _ = fs::remove_file(&socket);
        let n = &*self.node;
        let binary = self
            .opts
            .binary
            .clone()
            .unwrap_or_else(|| bin("ferrovia-agent"));
        let mut args: Vec<OsString> = vec![
            "--manifests".into(),
            n.dir.join("manifests").into(),
            "--node-name".into(),
            format!("{}-node", n.id).into(),
            "--bpffs-root".into(),
            n.bpffs.clone().into(),
            "--cgroup-path".into(),
            n.cgroup.clone().into(),
            "--api-socket".into(),
            socket.clone().into(),
            "--state-dir".into(),
            n.dir.join("state").into(),
        ];
        if !self.opts.socket_lb {
            args.push("--socket-lb=false".into());
        }
        if let Some(addr) = self.opts.metrics_addr {
            args.push("--metrics-addr".into());
            args.push(addr.to_string().into());
        }
        args.extend(self.opts.extra_args.iter().map(OsString::from));
        // Appended across restarts, so one file tells the whole story.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let procs = CString::new(n.agent_cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
        let mut cmd = in_netns(&n.netns, &binary, &args);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("RUST_BACKTRACE", "1");
        // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec;
        // writing "0" to cgroup.procs moves the calling process, so no pid needs formatting.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Polls for the API socket, failing early if the agent exits.
    fn wait_ready(&mut self) -> Result<()> {
        let socket = self.socket();
        let deadline = Instant::now() + READY_TIMEOUT;
        let child = self.child.as_mut().expect("spawned");
        loop {
            if socket.exists() {
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!(
                    "ferrovia-agent exited ({status}) before creating {}; log tail:\n{}",
                    socket.display(),
                    tail(&self.log, 40)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "ferrovia-agent did not create {} within {READY_TIMEOUT:?}; log tail:\n{}",
                    socket.display(),
                    tail(&self.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's pid, while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's log (stdout and stderr) so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Makes the agent re-read its manifests now (`ferrovia sync`); returns once its maps
    /// reflect them, with the rejections the agent reports (one line per object or field).
    pub fn sync(&self) -> Result<Vec<String>> {
        let out = crate::cmd::run_ok(
            std::process::Command::new(bin("ferrovia"))
                .arg("--socket")
                .arg(self.socket())
                .args(["-o", "json", "sync"]),
        )
        .context("ferrovia sync")?;
        let reply: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("ferrovia sync output")?;
        Ok(reply["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str().map(str::to_owned))
            .collect())
    }

    /// The agent's Status (`ferrovia -o json status`): node, pods, frontends, programs,
    /// `degraded`, `agent_version`.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = run_ok(
            std::process::Command::new(bin("ferrovia"))
                .arg("--socket")
                .arg(self.socket())
                .args(["-o", "json", "status"]),
        )
        .context("ferrovia status")?;
        serde_json::from_slice(&out.stdout).context("ferrovia status output")
    }

    /// `GET path` (e.g. `/metrics`) from the agent's HTTP endpoint, from inside the node's
    /// network namespace where it listens. Fails when the agent has no `metrics_addr` or no
    /// reply comes back; any HTTP status is a reply.
    pub fn http_get(&self, path: &str) -> Result<HttpReply> {
        let addr = self
            .opts
            .metrics_addr
            .context("the agent was started without AgentOpts::metrics_addr")?;
        let out = run_ok(
            std::process::Command::new(bin("ferrovia-echo"))
                .arg("--netns")
                .arg(netns_path(&self.node.netns))
                .arg("http-get")
                .arg(format!("http://{addr}{path}")),
        )?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("ferrovia-echo http-get output for {path}"))
    }

    /// Sends SIGTERM and waits for the exit (SIGKILL after a timeout, which is an error).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent is not running");
        };
        let pid = Pid::from_raw(i32::try_from(child.id())?);
        kill(pid, Signal::SIGTERM).context("sending SIGTERM to the agent")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "ferrovia-agent ignored SIGTERM for {STOP_TIMEOUT:?}; log tail:\n{}",
                    tail(&self.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the agent (SIGTERM) and starts it again with the same options; waits until ready.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- ferrovia-agent log tail ({}) ----\n{}\n----",
                self.log.display(),
                tail(&self.log, 60)
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
