//! A pod's network-namespace cookie, the number the socket hooks know a pod by
//! (`bpf_get_netns_cookie`).
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, MapData};

/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h, Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace at `path` (e.g. `/var/run/netns/cni-…`), read from a
/// socket created inside it on a short-lived thread (`setns` changes only the calling thread).
pub fn cookie(path: &Path) -> Result<u64> {
    let ns = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<u64> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {}", path.display()))?;
            current()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns cookie thread panicked"))?
    })
}

/// Whether this kernel tells a network namespace's cookie to user space (`SO_NETNS_COOKIE`,
/// Linux 5.14+): asked on a socket of the calling thread's own namespace.
#[must_use]
pub fn cookies_supported() -> bool {
    current().is_ok()
}

/// The cookie of the calling thread's network namespace.
fn current() -> Result<u64> {
    // SAFETY: plain syscalls; the fd is owned (closed on drop) once created.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket()");
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("getsockopt(SO_NETNS_COOKIE) (Linux 5.14+)");
    }
    Ok(cookie)
}

/// The cookie of the network namespace at `netns`, learnt through the `sock4_connect` hook
/// where `SO_NETNS_COOKIE` is missing (before Linux 5.14; the hook's `bpf_get_netns_cookie`
/// is 5.7+): the agent registers a random nonce in `NETNS_PROBE`, a forked child joins
/// `cgroup` (where the hook is attached), enters the namespace and connects a UDP socket to
/// the nonce's address in 0.0.0.0/8; the hook records the socket's namespace cookie under the
/// nonce and refuses the connect. Nothing is sent: a UDP connect sends no packet, and no
/// packet can go to 0.0.0.0/8.
pub fn probe(probes: &mut HashMap<MapData, u64, u64>, cgroup: &Path, netns: &Path) -> Result<u64> {
    let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let procs_path = cgroup.join("cgroup.procs");
    let procs =
        CString::new(procs_path.as_os_str().as_bytes()).context("cgroup path holds a NUL byte")?;
    // 0.x.y.z:port, x.y.z and the port random (40 bits): another process cannot guess it
    // to fill the slot first, and a collision with a concurrent probe is negligible.
    // (Never 0.0.0.0, which applications connect to, meaning this host.)
    let (low, port): (u32, u16) = (
        rand::random::<u32>() & 0x00ff_ffff | 1,
        rand::random::<u16>() | 1,
    );
    let ip = std::net::Ipv4Addr::from(low);
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // As the hook reads them: user_ip4 and user_port, both in network byte order.
    let nonce = (u64::from(sin.sin_addr.s_addr) << 32) | u64::from(sin.sin_port);
    // BPF_NOEXIST: a nonce already there is someone else's.
    probes
        .insert(nonce, 0, 1)
        .context("registering the probe in NETNS_PROBE")?;
    let result = run_probe_child(&ns, &procs, &sin);
    let cookie = probes.get(&nonce, 0).unwrap_or(0);
    let _ = probes.remove(&nonce);
    let status = result?;
    if cookie == 0 {
        bail!(
            "the probe's connect did not reach the socket hook ({}); is the hook attached to \
             {} and may the agent join it?",
            describe_probe_exit(status),
            cgroup.display()
        );
    }
    Ok(cookie)
}

/// Empties `NETNS_PROBE` at load: probes of a previous run killed mid-probe would otherwise
/// fill the (small) map for good.
#[must_use]
pub fn clear_probes(mut probes: HashMap<MapData, u64, u64>) -> HashMap<MapData, u64, u64> {
    let stale: Vec<u64> = probes.keys().filter_map(Result::ok).collect();
    for nonce in stale {
        let _ = probes.remove(&nonce);
    }
    probes
}

/// Exit codes of the probe child (bits).
const PROBE_NO_CGROUP: i32 = 1;
const PROBE_NO_SETNS: i32 = 2;
const PROBE_NO_SOCKET: i32 = 4;
const PROBE_NOT_REFUSED: i32 = 8;

/// Forks the probe's child and waits for it; returns its exit code.
fn run_probe_child(ns: &File, procs: &CString, sin: &libc::sockaddr_in) -> Result<i32> {
    // SAFETY: the child runs only async-signal-safe system calls (open, write, close, setns,
    // socket, connect, _exit) on memory prepared before the fork, as a fork of a
    // multi-threaded process must; it never returns from this block.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork() for the netns probe");
    }
    if pid == 0 {
        unsafe {
            let mut code = 0;
            // Writing "0" moves the calling process. Failing that, the connect may still
            // reach the hook if the agent already runs inside its cgroup.
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                code |= PROBE_NO_CGROUP;
            }
            if fd >= 0 {
                libc::close(fd);
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                libc::_exit(code | PROBE_NO_SETNS);
            }
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 {
                libc::_exit(code | PROBE_NO_SOCKET);
            }
            let rc = libc::connect(
                s,
                std::ptr::from_ref(sin).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            if rc == 0 || *libc::__errno_location() != libc::EPERM {
                code |= PROBE_NOT_REFUSED;
            }
            libc::_exit(code);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        if unsafe { libc::waitpid(pid, &raw mut status, 0) } == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("waiting for the netns probe's child");
        }
    }
    if !libc::WIFEXITED(status) {
        bail!("the netns probe's child died (wait status {status:#x})");
    }
    Ok(libc::WEXITSTATUS(status))
}

fn describe_probe_exit(code: i32) -> String {
    let mut what = Vec::new();
    for (bit, text) in [
        (PROBE_NO_CGROUP, "could not join the cgroup"),
        (PROBE_NO_SETNS, "could not enter the namespace"),
        (PROBE_NO_SOCKET, "could not create a socket"),
        (PROBE_NOT_REFUSED, "its connect was not refused by the hook"),
    ] {
        if code & bit != 0 {
            what.push(text);
        }
    }
    if what.is_empty() {
        "its child saw the connect refused, yet no cookie was recorded".into()
    } else {
        format!("its child {}", what.join(", "))
    }
}
