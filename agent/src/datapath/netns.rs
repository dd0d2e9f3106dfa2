//! A pod's network-namespace cookie, the number the socket hooks know a pod by
//! (`bpf_get_netns_cookie`).
use std::fs::File;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;

use anyhow::{Context as _, Result};

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
