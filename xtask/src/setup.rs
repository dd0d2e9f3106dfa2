//! `cargo xtask setup`: what a fresh Debian 12 machine of this kind lacks, installed only
//! when missing (see `../shared/TOOLCHAIN.md` for why each piece and version).
use std::process::{Command, Stdio};

use anyhow::Context;

use crate::{run_checked, show, step};

/// Debian packages the build, the tests and the demo use.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22, nightly's major version (bookworm-security has it).
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    // The reference CNI plugins (ptp, bridge, host-local) the end-to-end tests chain after.
    "containernetworking-plugins",
    // tonic-prost-build runs protoc on proto/ferrovia.proto.
    "protobuf-compiler",
    "curl",
    "socat",
    "busybox-static",
    // The benchmark: one bulk TCP stream, and the font its plots are labelled with.
    "iperf3",
    "fonts-dejavu-core",
];

/// bpf-linker's version and features, pinned by TOOLCHAIN.md: its default feature wants
/// LLVM 23 and fails here.
const BPF_LINKER: &str = "bpf-linker@0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Every setup step, in order.
pub fn run() -> anyhow::Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    bpffs()
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        step("apt packages: all installed");
        return Ok(());
    }
    step(&format!("apt packages: installing {}", missing.join(" ")));
    run_checked(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `dpkg-query` says `install ok installed` for an installed package; anything else (not
/// known, removed, config-files only) counts as missing.
pub(crate) fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.ends_with(b" installed"))
}

/// The BPF crate is built with `-Z build-std=core`, which needs nightly's `rust-src`.
fn nightly_rust_src() -> anyhow::Result<()> {
    match Command::new("rustup")
        .args(["+nightly", "component", "list", "--installed"])
        .output()
    {
        Ok(out) if out.status.success() => {
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
            {
                step("nightly rust-src: installed");
                Ok(())
            } else {
                step("nightly rust-src: installing");
                run_checked(Command::new("rustup").args([
                    "component",
                    "add",
                    "rust-src",
                    "--toolchain",
                    "nightly",
                ]))
            }
        }
        // No nightly toolchain at all (or no rustup answer): install one with rust-src.
        _ => {
            step("nightly toolchain: installing with rust-src");
            run_checked(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
        }
    }
}

fn bpf_linker() -> anyhow::Result<()> {
    let answers = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if answers {
        step("bpf-linker: installed");
        return Ok(());
    }
    step(&format!(
        "bpf-linker: installing {BPF_LINKER} against {LLVM_PREFIX} (3-4 minutes)"
    ));
    run_checked(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                BPF_LINKER,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

const BPFFS: &str = "/sys/fs/bpf";

/// The agent pins its maps under /sys/fs/bpf/ferrovia, which needs bpffs mounted there.
fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == Some(BPFFS) && fstype == Some("bpf")
    });
    if mounted {
        step("bpffs: mounted at /sys/fs/bpf");
        return Ok(());
    }
    step("bpffs: mounting at /sys/fs/bpf");
    let mut mount = Command::new("mount");
    mount.args(["-t", "bpf", "bpf", BPFFS]);
    run_checked(&mut mount).with_context(|| {
        format!(
            "{} (is this a container without CAP_SYS_ADMIN?)",
            show(&mount)
        )
    })
}
