//! Kernel objects the harness creates (network namespaces, cgroups, bpffs and temp dirs), how
//! they are named, and how stale ones are swept.
//!
//! Every object is named `fv-<pid>-<n>[-<suffix>]`, `<pid>` being the creating test process:
//! a sweep removes the objects whose creator no longer runs, so a test killed by SIGKILL leaves
//! nothing behind for the next run, and parallel tests never collide.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd::run_ok;

/// Prefix of every object the harness creates.
pub const PREFIX: &str = "fv-";

/// Where the harness keeps its bpffs roots.
pub const BPFFS: &str = "/sys/fs/bpf";

const NETNS_DIR: &str = "/run/netns";

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of the machine (or VM), so
/// that a probe's request times and a test's events can be put in one order.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0)
}

/// Puts the calling process into a workload's place: its pid into `cgroup`'s
/// `cgroup.procs` (so the agent's socket hooks apply to it), then its thread into the network
/// namespace `netns`. `setns` moves only the calling thread, so this must run while the
/// process is still single-threaded — before any runtime or thread exists.
pub fn enter(cgroup: Option<&Path>, netns: Option<&Path>) -> Result<()> {
    if let Some(cgroup) = cgroup {
        let procs = cgroup.join("cgroup.procs");
        fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", procs.display()))?;
    }
    if let Some(netns) = netns {
        let file = fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into {}", netns.display()))?;
    }
    Ok(())
}

/// A new id, unique on this machine while this process runs: `fv-<pid>-<n>`.
#[must_use]
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid encoded in a harness object's name, if it is one.
fn creator_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Whether `name` belongs to a process that no longer runs.
fn is_stale(name: &str) -> bool {
    creator_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// The cgroup v2 mount point, read from /proc/mounts (here /sys/fs/cgroup/unified, not
/// /sys/fs/cgroup: the host runs a hybrid hierarchy).
pub fn cgroup2_root() -> Result<PathBuf> {
    static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
    ROOT.get_or_init(|| mount_of_type("cgroup2"))
        .clone()
        .context("no cgroup2 mount in /proc/mounts")
}

fn mount_of_type(fstype: &str) -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == fstype).then(|| PathBuf::from(dir))
    })
}

/// Mounts bpffs on /sys/fs/bpf unless it is mounted there already.
pub fn ensure_bpffs() -> Result<()> {
    // Serialized: two concurrent mounts would stack, and the upper one hides the lower's pins.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == BPFFS && f[2] == "bpf"
    });
    if !mounted {
        run_ok(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    }
    Ok(())
}

/// Creates a named network namespace with `lo` up.
pub fn netns_add(name: &str) -> Result<()> {
    run_ok(Command::new("ip").args(["netns", "add", name]))?;
    run_ok(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
    Ok(())
}

/// Deletes a named network namespace; a missing one is not an error.
pub fn netns_del(name: &str) -> Result<()> {
    if !Path::new(NETNS_DIR).join(name).exists() {
        return Ok(());
    }
    run_ok(Command::new("ip").args(["netns", "del", name]))?;
    Ok(())
}

/// Names of the existing network namespaces whose name starts with `prefix`.
#[must_use]
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// SIGKILLs every process in the cgroup tree at `dir` and removes it, children first.
pub fn cgroup_destroy(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let kill = dir.join("cgroup.kill");
    if kill.exists() {
        // cgroup.kill (5.14+) kills the whole subtree atomically, including forking processes.
        fs::write(&kill, "1").with_context(|| format!("writing {}", kill.display()))?;
    } else {
        kill_procs_recursive(dir);
    }
    remove_cgroup_tree(dir)
}

fn kill_procs_recursive(dir: &Path) {
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for child in subdirs(dir) {
        kill_procs_recursive(&child);
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    for child in subdirs(dir) {
        remove_cgroup_tree(&child)?;
    }
    // rmdir fails with EBUSY until the killed processes have exited: poll with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("removing cgroup {}", dir.display()));
            }
            Err(_) => {
                kill_procs_recursive(dir);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Removes everything under a bpffs dir (unlinking pins) and the dir itself.
pub fn remove_bpffs_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The directory temp dirs are made in.
#[must_use]
pub fn temp_root() -> PathBuf {
    std::env::temp_dir()
}

/// Removes the objects left by harness processes that no longer run: network namespaces,
/// cgroups (killing their processes, e.g. an orphaned agent), bpffs dirs and temp dirs.
///
/// Runs once per process, from the first `Node::new`; call it directly to run it earlier.
pub fn sweep_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = sweep_stale_now() {
            eprintln!("ferrovia-tests: sweeping stale objects: {e:#}");
        }
    });
}

/// [`sweep_stale`] now, every time it is called, reporting failures.
pub fn sweep_stale_now() -> Result<()> {
    let stale_in = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_str().is_some_and(is_stale))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut errors = Vec::new();
    // Processes first (they may hold the namespaces), then the namespaces, then files.
    if let Ok(root) = cgroup2_root() {
        for dir in stale_in(&root) {
            if let Err(e) = cgroup_destroy(&dir) {
                errors.push(format!("{e:#}"));
            }
        }
    }
    for name in netns_with_prefix(PREFIX)
        .into_iter()
        .filter(|n| is_stale(n))
    {
        if let Err(e) = netns_del(&name) {
            errors.push(format!("{e:#}"));
        }
    }
    for dir in stale_in(Path::new(BPFFS)) {
        if let Err(e) = remove_bpffs_dir(&dir) {
            errors.push(format!("{e:#}"));
        }
    }
    for dir in stale_in(&temp_root()) {
        let _ = fs::remove_dir_all(&dir);
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creator_pid_parses_harness_names_only() {
        assert_eq!(creator_pid("fv-123-4-node"), Some(123));
        assert_eq!(creator_pid("fv-123-4"), Some(123));
        assert_eq!(creator_pid("fvx-123"), None);
        assert_eq!(creator_pid("cni-1234"), None);
    }

    #[test]
    fn own_objects_are_not_stale() {
        assert!(!is_stale(&unique_id()));
        assert!(!is_stale("not-ours"));
    }
}
