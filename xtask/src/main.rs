//! `cargo xtask`: the project's chores.
//!
//! - `setup`: installs what a fresh Debian 12 machine lacks for building and testing
//!   (see `../shared/TOOLCHAIN.md`), idempotently.
//! - `test [--host-only] [-- ARGS]`: `setup`, a build of the binaries, the workspace's tests,
//!   then every suite in VMs on kernels 6.1 and the newest pinned (`vm.rs`).
//! - `demo [-- ARGS]`: `setup`, a build, then the demo (`ferrovia-demo` in `tests/`).
//! - `bench [--scrape-only|--no-scrape] [-- ARGS]`: `setup`, a release build, then `ferrovia-bench`
//!   (results in `target/bench/`) and `ferrovia-scrape-bench`.
//! - `vm-test [--kernel L] [--suite S]`: `setup`, then the suites in VMs on pinned kernels
//!   (`vm.rs`; what it keeps is under `target/vm-test/`).
//!
//! All of them need root: apt, bpffs, and the tests and demo load BPF programs and create
//! network namespaces.
mod setup;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    bin_name = "cargo xtask",
    about = "ferrovia's build, test and demo chores"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and system packages, mount bpffs (idempotent).
    Setup,
    /// Run setup, then `cargo test`, then the kernel-matrix lane: every suite in VMs on
    /// kernels 6.1 and the newest pinned (`vm-test`); arguments after `--` are passed on to
    /// `cargo test`.
    Test {
        /// Only the host's `cargo test`, no VMs.
        #[arg(long)]
        host_only: bool,
        /// Minutes from the start by which the VM lane must be done: a VM gets at most what is
        /// left, one cut off by the deadline is reported CUT OFF (not failed), and none starts
        /// with less than 2 minutes left (CI allows 90 minutes in all).
        #[arg(long, value_name = "MIN", default_value_t = 80)]
        budget_min: u64,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run setup, build, then run the demo; arguments after `--` are passed on to it.
    Demo {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run setup, a release build, then the benchmarks: the data paths side by side
    /// (`ferrovia-bench`, results in `target/bench/`; arguments after `--` are passed on to
    /// it, `-- --help`), then the cost of a `/metrics` scrape with 0 and 1,000 pods
    /// (`ferrovia-scrape-bench`).
    Bench {
        /// Only the scrape benchmark.
        #[arg(long)]
        scrape_only: bool,
        /// Skip the scrape benchmark.
        #[arg(long, conflicts_with = "scrape_only")]
        no_scrape: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run setup, then test suites inside VMs on a matrix of pinned kernels (virtme-ng under
    /// emulation); prints a kernel × suite table, logs in `target/vm-test/<kernel>/<suite>/`.
    VmTest {
        /// A kernel label to test on (repeatable; default: every pinned kernel).
        #[arg(long = "kernel", value_name = "LABEL")]
        kernels: Vec<String>,
        /// A suite to run (repeatable; default: every suite).
        #[arg(long = "suite", value_name = "NAME")]
        suites: Vec<String>,
        /// Seconds one VM may take, boot included, before its process group is killed.
        #[arg(long, value_name = "N", default_value_t = VM_TIMEOUT_S)]
        timeout_s: u64,
        /// Arguments for each selected suite's test executable, after `--` (`--nocapture`, a
        /// test name to filter on — with `--suite`: a suite that runs no test fails).
        #[arg(last = true, value_name = "TEST_ARGS")]
        test_args: Vec<String>,
    },
}

/// Seconds one VM may take, boot included, before its process group is killed (the policy
/// suite took 231–679 s in one day on this kind of machine, by the host's load; the lane's
/// own deadline bounds the whole).
const VM_TIMEOUT_S: u64 = 1500;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    require_root()?;
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Test {
            host_only,
            budget_min,
            args,
        } => {
            let started = std::time::Instant::now();
            setup::run()?;
            // The end-to-end suites run the agent's binaries (ferrovia-agent, ferrovia-cni),
            // which cargo does not build for another package's tests.
            step("cargo build (binaries)");
            run_checked(cargo(&root).args(["build", "--bins"]))?;
            step("cargo test");
            // Plain `cargo test` at the root covers the workspace's default members, which
            // leave out the no_std BPF crate (`--workspace` would build it for the host).
            run_checked(cargo(&root).arg("test").args(&args))?;
            if host_only {
                return Ok(());
            }
            step("kernel matrix lane (vm-test on the CI kernels)");
            vm::run(
                &root,
                &vm::Options {
                    kernels: vm::ci_kernels(),
                    suites: Vec::new(),
                    timeout: Duration::from_secs(VM_TIMEOUT_S),
                    deadline: Some(started + Duration::from_secs(budget_min * 60)),
                    test_args: Vec::new(),
                },
            )
        }
        Task::Bench {
            scrape_only,
            no_scrape,
            args,
        } => {
            setup::run()?;
            step("cargo build --release (binaries)");
            run_checked(cargo(&root).args(["build", "--release", "--bins"]))?;
            if !scrape_only {
                step("ferrovia-bench");
                let mut bench = Command::new(root.join("target/release/ferrovia-bench"));
                run_checked(bench.current_dir(&root).args(&args))?;
            }
            if no_scrape {
                return Ok(());
            }
            step("ferrovia-scrape-bench");
            let mut scrape = Command::new(root.join("target/release/ferrovia-scrape-bench"));
            scrape.current_dir(&root);
            exec(scrape)
        }
        Task::Demo { args } => {
            setup::run()?;
            step("cargo build (binaries)");
            run_checked(cargo(&root).args(["build", "--bins"]))?;
            step("ferrovia-demo");
            let mut demo = cargo(&root);
            demo.args([
                "run",
                "-p",
                "ferrovia-tests",
                "--bin",
                "ferrovia-demo",
                "--",
            ])
            .args(&args);
            exec(demo)
        }
        Task::VmTest {
            kernels,
            suites,
            timeout_s,
            test_args,
        } => {
            setup::run()?;
            vm::run(
                &root,
                &vm::Options {
                    kernels,
                    suites,
                    timeout: Duration::from_secs(timeout_s),
                    deadline: None,
                    test_args,
                },
            )
        }
    }
}

fn require_root() -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "cargo xtask needs root: it installs packages, mounts bpffs, loads BPF programs and \
         creates network namespaces (try `sudo -E cargo xtask ...`)"
    );
    Ok(())
}

/// The workspace root: xtask's own manifest sits one level below it.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// The cargo that runs us (`$CARGO`), so a rustup override or a pinned toolchain carries over.
pub(crate) fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

/// Prints a step, `==> what`.
pub(crate) fn step(what: &str) {
    println!("==> {what}");
}

/// Runs `cmd` with inherited stdio and fails with the command line when it fails.
pub(crate) fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", show(cmd));
    }
    Ok(())
}

/// Replaces this process with `cmd`, so the demo gets the terminal's signals directly.
fn exec(mut cmd: Command) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec {}", show(&cmd)))
}

/// `prog arg arg`, for messages.
pub(crate) fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
