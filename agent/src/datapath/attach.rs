//! Attaching programs so that they outlive the agent, and replacing them without a gap.
//!
//! - tc with TCX links (kernel 6.6+, found by trying): links are pinned under
//!   `<bpffs root>/links/`; a restarted agent swaps its new program into the pinned link
//!   atomically (`BPF_LINK_UPDATE`). Older kernels get a classic clsact + `cls_bpf` filter,
//!   which lives in the kernel until removed and is replaced in place by priority/handle.
//! - cgroup `sock_addr` hooks: links pinned the same way; a restarted agent attaches its new
//!   program beside the old one (multi-attach), then unpins the old one. Running both for an
//!   instant is harmless: the second sees an address that is no VIP any more.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
};
use serde::{Deserialize, Serialize};

/// How a tc program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TcMode {
    /// A TCX link, pinned.
    Tcx,
    /// A `cls_bpf` filter on the clsact qdisc, at this priority and handle.
    Netlink { priority: u16, handle: u32 },
}

fn pinned(path: &Path) -> Result<Option<PinnedLink>> {
    match PinnedLink::from_pin(path) {
        Ok(link) => Ok(Some(link)),
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening pinned link {}", path.display())),
    }
}

fn direction(attach: TcAttachType) -> &'static str {
    if attach == TcAttachType::Ingress {
        "ingress"
    } else {
        "egress"
    }
}

/// Attaches (or atomically replaces) `prog` on `ifname`. `prefer_tcx` false forces the
/// classic path (used on kernels without TCX, and by tests of that path).
pub fn attach_tc(
    prog: &mut SchedClassifier,
    ifname: &str,
    attach: TcAttachType,
    links_dir: &Path,
    previous: Option<TcMode>,
    prefer_tcx: bool,
) -> Result<TcMode> {
    let pin = links_dir.join(format!("tc-{ifname}-{}", direction(attach)));
    if let Some(old) = pinned(&pin)? {
        let link: SchedClassifierLink = FdLink::from(old).try_into().context("pinned tc link")?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                // The pin keeps the link (now running the new program); our handle may go.
                drop(prog.take_link(id)?);
                return Ok(TcMode::Tcx);
            }
            // The interface was re-created under the same name: its old link is defunct.
            Err(e) => {
                tracing::debug!(%ifname, error = %e, "stale pinned tc link, re-attaching");
                let _ = fs::remove_file(&pin);
            }
        }
    }
    if let Some(TcMode::Netlink { priority, handle }) = previous {
        let link = SchedClassifierLink::attached(ifname, attach, priority, handle.into(), None)
            .with_context(|| format!("interface {ifname}"))?;
        if let Ok(id) = prog.attach_to_link(link) {
            std::mem::forget(prog.take_link(id)?);
            return Ok(TcMode::Netlink { priority, handle });
        }
    }
    if prefer_tcx {
        match prog.attach_with_options(
            ifname,
            attach,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        ) {
            Ok(id) => {
                let link: FdLink = prog.take_link(id)?.try_into().context("tcx link")?;
                link.pin(&pin)
                    .with_context(|| format!("pinning {}", pin.display()))?;
                return Ok(TcMode::Tcx);
            }
            Err(e) => {
                tracing::info!(%ifname, error = %e, "TCX attach unavailable, using clsact/cls_bpf");
            }
        }
    }
    if let Err(e) = tc::qdisc_add_clsact(ifname) {
        // EEXIST: the qdisc is already there, which is what we want.
        if !e.to_string().contains("exists") {
            tracing::debug!(%ifname, error = %e, "adding clsact");
        }
    }
    let id = prog
        .attach_with_options(
            ifname,
            attach,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .with_context(|| format!("attaching tc {} on {ifname}", direction(attach)))?;
    let link = prog.take_link(id)?;
    let mode = TcMode::Netlink {
        priority: link.priority()?,
        handle: link.handle()?.into(),
    };
    // A netlink filter stays attached after we exit only if its link is never dropped.
    std::mem::forget(link);
    Ok(mode)
}

/// Removes what `attach_tc` attached. A missing interface (the pod's veth is gone) is fine.
pub fn detach_tc(ifname: &str, attach: TcAttachType, links_dir: &Path, mode: TcMode) {
    let pin = links_dir.join(format!("tc-{ifname}-{}", direction(attach)));
    if let Ok(Some(link)) = pinned(&pin) {
        let _ = link.unpin();
    }
    if let TcMode::Netlink { .. } = mode {
        let program = if attach == TcAttachType::Ingress {
            "from_pod"
        } else {
            "to_pod"
        };
        let _ = tc::qdisc_detach_program(ifname, attach, program);
    }
}

/// Attaches a cgroup `sock_addr` program, replacing a pinned one from a previous run.
pub fn attach_cgroup(
    prog: &mut CgroupSockAddr,
    name: &str,
    cgroup: &Path,
    links_dir: &Path,
) -> Result<()> {
    let pin = links_dir.join(format!("cgroup-{name}"));
    // bpffs refuses names with a dot.
    let staging = links_dir.join(format!("cgroup-{name}-new"));
    let _ = fs::remove_file(&staging);
    let old = pinned(&pin)?;
    let cgroup_fd =
        fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let id = prog
        // bpf_link_create on a cgroup wants flags 0: link attachments always coexist (the
        // kernel treats them as BPF_F_ALLOW_MULTI), which is what the swap relies on.
        .attach(&cgroup_fd, CgroupAttachMode::Single)
        .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
    let link: FdLink = prog.take_link(id)?.try_into().context("cgroup link")?;
    link.pin(&staging)
        .with_context(|| format!("pinning {}", staging.display()))?;
    if let Some(old) = old {
        old.unpin().context("unpinning the previous cgroup link")?;
    }
    fs::rename(&staging, &pin).with_context(|| format!("renaming pin to {}", pin.display()))?;
    Ok(())
}

/// Detaches the cgroup programs (used when socket-LB is turned off).
pub fn detach_cgroup(name: &str, links_dir: &Path) {
    if let Ok(Some(link)) = pinned(&links_dir.join(format!("cgroup-{name}"))) {
        let _ = link.unpin();
    }
}

#[must_use]
pub fn links_dir(root: &Path) -> PathBuf {
    root.join("links")
}
