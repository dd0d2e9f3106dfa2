//! Attaching programs so that they outlive the agent, and replacing them without a gap.
//!
//! - tc with TCX links (kernel 6.6+, found by trying): links are pinned under
//!   `<bpffs root>/links/`; a restarted agent swaps its new program into the pinned link
//!   atomically (`BPF_LINK_UPDATE`). Older kernels get a classic clsact + `cls_bpf` filter,
//!   which lives in the kernel until removed and is replaced in place by priority/handle.
//! - cgroup `sock_addr` hooks: links pinned the same way; a restarted agent attaches its new
//!   program beside the old one (multi-attach), then unpins the old one. Running both for an
//!   instant is harmless: the second sees an address that is no VIP any more.
//!
//! It also answers whether what it attached is still there (a CNI CHECK asks): a pinned link
//! for TCX, an `RTM_GETTFILTER` dump for classic filters.
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
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
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

/// Where the TCX link of `ifname`'s `attach` hook is pinned.
fn tcx_pin(links_dir: &Path, ifname: &str, attach: TcAttachType) -> PathBuf {
    links_dir.join(format!("tc-{ifname}-{}", direction(attach)))
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
    let pin = tcx_pin(links_dir, ifname, attach);
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
    let pin = tcx_pin(links_dir, ifname, attach);
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

/// Whether `ifname`'s `attach` hook still has the TCX link `attach_tc` pinned.
#[must_use]
pub fn tcx_link_pinned(links_dir: &Path, ifname: &str, attach: TcAttachType) -> bool {
    tcx_pin(links_dir, ifname, attach).exists()
}

/// Whether `ifname`'s clsact `attach` hook still holds the classic filter `attach_tc` made: a
/// `bpf` filter at `priority`/`handle` running the program whose id is `prog_id`.
///
/// By id rather than by name (`TCA_BPF_NAME`): a stale filter of an older run is named
/// `from_pod` too. The id of this run's program is the right one, because `attach_tc` swaps
/// this run's program into a previous run's filter in place (`RTM_NEWTFILTER` at the same
/// priority and handle, without `NLM_F_CREATE`) or else makes a new filter with it.
/// A missing interface or clsact qdisc is `Ok(false)`; a netlink failure is an error.
pub fn classic_filter_attached(
    ifname: &str,
    attach: TcAttachType,
    priority: u16,
    handle: u32,
    prog_id: u32,
) -> Result<bool> {
    let Ok(ifindex) = nix::net::if_::if_nametoindex(ifname) else {
        return Ok(false);
    };
    let filters = dump_tc_filters(ifindex, clsact_parent(attach))
        .with_context(|| format!("listing the tc filters of {ifname} {}", direction(attach)))?;
    let mut slot = filters.iter().filter(|f| {
        (f.header.info >> 16) as u16 == priority && u32::from(f.header.handle) == handle
    });
    Ok(slot.any(|f| {
        let id = bpf_filter_prog_id(f);
        if id != Some(prog_id) {
            tracing::debug!(%ifname, priority, handle, found = ?id, expected = prog_id,
                "the tc filter in our place runs another program");
        }
        id == Some(prog_id)
    }))
}

/// The parent of the filters on a clsact hook: `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)` or
/// `..._EGRESS` (`include/uapi/linux/pkt_sched.h`), as aya attaches them.
fn clsact_parent(attach: TcAttachType) -> TcHandle {
    let minor = match attach {
        TcAttachType::Ingress => TcHandle::MIN_INGRESS,
        TcAttachType::Egress => TcHandle::MIN_EGRESS,
        TcAttachType::Custom(parent) => return parent.into(),
    };
    TcHandle {
        major: TcHandle::CLSACT.major,
        minor,
    }
}

/// The program id (`TCA_BPF_ID`) of a `bpf` filter; `None` for filters of other kinds.
fn bpf_filter_prog_id(filter: &TcMessage) -> Option<u32> {
    filter.attributes.iter().find_map(|attr| match attr {
        TcAttribute::Options(options) => options.iter().find_map(|o| match o {
            TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => Some(*id),
            _ => None,
        }),
        _ => None,
    })
}

/// The tc filters under `parent` on interface `ifindex` (`RTM_GETTFILTER` with `NLM_F_DUMP`).
///
/// netlink-packet-route (de)serialises the messages; the socket is netlink-sys's synchronous
/// one, since callers (a CNI CHECK) are synchronous and a dump is a few small datagrams.
fn dump_tc_filters(ifindex: u32, parent: TcHandle) -> Result<Vec<TcMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting the netlink socket")?;

    let mut request = TcMessage::with_index(ifindex.cast_signed());
    request.header.parent = parent;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetTrafficFilter(request)),
    );
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0).context("sending RTM_GETTFILTER")?;

    // A dump comes as datagrams of whole messages, until NLMSG_DONE (or NLMSG_ERROR).
    let mut filters = Vec::new();
    loop {
        let (datagram, _) = socket
            .recv_from_full()
            .context("receiving the RTM_GETTFILTER dump")?;
        let mut rest = datagram.as_slice();
        while !rest.is_empty() {
            // The header alone first (checked: at least a header, at most what is left).
            let len = NetlinkBuffer::new_checked(rest)
                .context("a malformed message in the RTM_GETTFILTER dump")?
                .length() as usize;
            match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len]) {
                Ok(reply) => match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(filters),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(e.to_io()).context("the kernel refused RTM_GETTFILTER");
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(f)) => {
                        filters.push(f);
                    }
                    _ => {}
                },
                // Someone else's filter with options this crate cannot decode: not ours, so
                // skipping it can only make a check fail, never pass.
                Err(e) => tracing::debug!("skipping an undecodable tc filter: {e}"),
            }
            // Messages are 4-byte aligned (NLMSG_ALIGN).
            rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        }
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

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Runs `tc` with the words of `args`, then `last` (which may hold spaces).
    fn tc(args: &str, last: Option<&str>) {
        let status = Command::new("tc")
            .args(args.split(' ').chain(last))
            .status()
            .expect("running tc");
        assert!(status.success(), "tc {args} {last:?}: {status}");
    }

    /// The dump and its decoding against a real kernel, in a network namespace of a thread of
    /// its own (`unshare` moves only the calling thread). Our programs in their filters are
    /// tested end to end (tests/tests/lifecycle.rs); here, what is not ours never counts.
    #[test_log::test]
    fn classic_filter_check_needs_our_bpf_filter_in_its_slot() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (a network namespace, tc)");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let attached =
                |ifname| classic_filter_attached(ifname, TcAttachType::Ingress, 7, 3, 42);

            assert!(!attached("ferrovia-none").expect("missing interface"));
            assert!(!attached("lo").expect("no clsact qdisc"));

            tc("qdisc add dev lo clsact", None);
            // A classic (cBPF) program: a `bpf` filter in our slot, but no program of ours.
            let filter = "filter add dev lo ingress pref 7 handle 3 bpf bytecode";
            tc(filter, Some("1,6 0 0 0,"));
            let lo = nix::net::if_::if_nametoindex("lo").expect("lo");
            let slots: Vec<_> = dump_tc_filters(lo, clsact_parent(TcAttachType::Ingress))
                .expect("dump")
                .iter()
                .map(|f| {
                    (
                        f.header.info >> 16,
                        u32::from(f.header.handle),
                        bpf_filter_prog_id(f),
                    )
                })
                .collect();
            assert!(slots.contains(&(7, 3, None)), "{slots:?}");
            assert!(
                !attached("lo").expect("a cBPF filter in our slot"),
                "a filter running no program of ours counted as ours"
            );
            let egress = dump_tc_filters(lo, clsact_parent(TcAttachType::Egress)).expect("dump");
            assert!(egress.is_empty(), "{egress:?}");
        })
        .join()
        .expect("the test's thread");
    }
}
