//! `cargo xtask vm-test`: the test suites on a matrix of pinned kernels, each run in a
//! virtme-ng VM under emulation (see `../shared/TOOLCHAIN.md`, "VMs for the kernel matrix").
//!
//! Everything it makes lives under `target/vm-test/`: `cache/` (the kernel .debs, kept
//! because old versions leave the mirror), `kernels/<label>/` (their extracted trees),
//! `venv/` (virtme-ng) and `<label>/<suite>/` (each run's writable directory and `vm.log`).
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::signal::{self, SigHandler, Signal};
use nix::unistd::Pid;

use crate::{cargo, run_checked, show, step};

/// A kernel of the matrix: Debian packages pinned to one exact version.
struct Kernel {
    /// What `--kernel` and the table call it.
    label: &'static str,
    /// The kernel release (`uname -r`), which names the image and the modules directory.
    release: &'static str,
    /// The packages that together hold the image and the modules: one `linux-image-*` up to
    /// Debian's 6.18; from 7.0 that is an empty metapackage, and the image (`linux-binary-*`),
    /// the modules (`linux-modules-*`) and `modules.order`/`modules.builtin` (`linux-base-*`)
    /// come apart.
    packages: &'static [&'static str],
    /// The version every package in `packages` is pinned to.
    version: &'static str,
    /// Where apt finds it.
    origin: &'static str,
    /// A `deb` line for a private sources list when the system's sources do not carry
    /// `origin` (other Debian suites): used for this download only, never for installs.
    source: Option<&'static str>,
}

const TRIXIE_BACKPORTS: &str = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                                http://deb.debian.org/debian trixie-backports main";

/// The pinned kernels; the default matrix is all of them. The newest 7.x that Debian
/// offered (trixie-backports) when this was written is 7.3.
const KERNELS: &[Kernel] = &[
    Kernel {
        label: "5.10",
        release: "5.10.0-46-amd64",
        packages: &["linux-image-5.10.0-46-amd64"],
        version: "5.10.262-1",
        origin: "bullseye-security",
        source: Some(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://deb.debian.org/debian-security bullseye-security main",
        ),
    },
    Kernel {
        label: "6.1",
        release: "6.1.0-56-amd64",
        packages: &["linux-image-6.1.0-56-amd64"],
        version: "6.1.192-2",
        origin: "bookworm-security",
        source: None,
    },
    Kernel {
        label: "6.12",
        release: "6.12.117+deb12-amd64",
        packages: &["linux-image-6.12.117+deb12-amd64"],
        version: "6.12.117-1~deb12u1",
        origin: "bookworm-security",
        source: None,
    },
    Kernel {
        label: "6.18",
        release: "6.18.15+deb13-amd64",
        packages: &["linux-image-6.18.15+deb13-amd64"],
        version: "6.18.15-1~bpo13+1",
        origin: "trixie-backports",
        source: Some(TRIXIE_BACKPORTS),
    },
    Kernel {
        label: "7.3",
        release: "7.3.4+deb13-amd64",
        packages: &[
            "linux-binary-7.3.4+deb13-amd64",
            "linux-modules-7.3.4+deb13-amd64",
            "linux-base-7.3.4+deb13-amd64",
        ],
        version: "7.3.4-1~bpo13+1",
        origin: "trixie-backports",
        source: Some(TRIXIE_BACKPORTS),
    },
];

/// A named set of tests, built on the host and run inside each VM.
struct Suite {
    name: &'static str,
    /// Builds what the suite needs and returns the shell command the guest runs.
    prepare: fn(&Path) -> anyhow::Result<String>,
}

/// The suites `--suite` knows; the default is all of them.
const SUITES: &[Suite] = &[
    Suite {
        name: "verifier",
        prepare: verifier_suite,
    },
    Suite {
        name: "programs",
        prepare: programs_suite,
    },
    Suite {
        name: "services",
        prepare: |root| e2e_suite(root, "clusterip"),
    },
    Suite {
        name: "policy",
        prepare: |root| e2e_suite(root, "policy"),
    },
    Suite {
        name: "lifecycle",
        prepare: |root| e2e_suite(root, "lifecycle"),
    },
    Suite {
        name: "harness",
        prepare: |root| e2e_suite(root, "harness"),
    },
    Suite {
        name: "metrics",
        prepare: |root| e2e_suite(root, "metrics"),
    },
    Suite {
        name: "health",
        prepare: |root| e2e_suite(root, "health_metrics"),
    },
    Suite {
        name: "flows",
        prepare: |root| e2e_suite(root, "flows"),
    },
    Suite {
        name: "explain",
        prepare: |root| e2e_suite(root, "explain"),
    },
];

/// QEMU from bookworm-backports: bookworm's own conflicts with the installed qemu-utils.
const QEMU_PACKAGE: &str = "qemu-system-x86";
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/ferrovia-backports.sources";
const BACKPORTS: &str = "Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";
/// What virtme-ng needs on the host besides QEMU (the guest sees the host's root
/// filesystem), and `python3-venv` for its venv.
const HOST_PACKAGES: &[&str] = &["busybox-static", "kmod", "udev", "file", "python3-venv"];
const VIRTME_NG: &str = "virtme-ng==1.42";

/// Options of `cargo xtask vm-test`.
pub struct Options {
    /// Kernel labels; empty means every pinned kernel.
    pub kernels: Vec<String>,
    /// Suite names; empty means every suite.
    pub suites: Vec<String>,
    pub timeout: Duration,
    /// Runs that could not end before this (started now, allowed `timeout`) are skipped and
    /// shown as such: CI's lane has a fixed time.
    pub deadline: Option<Instant>,
    /// Appended to every suite's test command (a filter, `--nocapture`, ...).
    pub test_args: Vec<String>,
}

/// The least time worth booting a VM for (a boot alone takes 15–30 s under emulation).
const MIN_CELL: Duration = Duration::from_mins(2);

/// The CI lane's kernels (in `cargo xtask test`): 6.1, the oldest LTS most clusters still
/// run, and the newest pinned.
pub fn ci_kernels() -> Vec<String> {
    let newest = KERNELS.last().expect("kernels are pinned").label;
    vec!["6.1".to_owned(), newest.to_owned()]
}

/// Every selected suite on every selected kernel (names checked first); the caller has run
/// `setup`.
pub fn run(root: &Path, opts: &Options) -> anyhow::Result<()> {
    let kernels = select(KERNELS, &opts.kernels, |k| k.label, "kernel")?;
    let suites = select(SUITES, &opts.suites, |s| s.name, "suite")?;
    let base = root.join("target/vm-test");

    host_packages()?;
    let venv_bin = virtme_ng(&base.join("venv"))?;
    let mut images = Vec::new();
    for kernel in &kernels {
        images.push(kernel_image(&base, kernel)?);
    }
    let mut commands = Vec::new();
    for suite in &suites {
        step(&format!("suite {}: building", suite.name));
        let mut command = (suite.prepare)(root)?;
        for arg in &opts.test_args {
            let quoted = sh_quote(Path::new(arg));
            // A flag the suite gives already (the verifier's `--nocapture`): libtest refuses
            // one given twice.
            if arg.starts_with("--") && command.split(' ').any(|w| w == arg || w == quoted) {
                continue;
            }
            command.push(' ');
            command.push_str(&quoted);
        }
        commands.push(command);
    }

    on_interrupt_stop_vm()?;
    let host = Host {
        root,
        base: &base,
        venv_bin: &venv_bin,
    };
    let mut cells = Vec::new();
    // Suite by suite across the kernels: when the lane's time runs short, every kernel has
    // had the suites that ran.
    for (suite, command) in suites.iter().zip(&commands) {
        for (kernel, image) in kernels.iter().zip(&images) {
            // A VM gets its timeout, or what is left before the lane's deadline; one cut off
            // by the deadline (not by its own timeout) is reported as such, not as a failure.
            let left = opts
                .deadline
                .map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l < MIN_CELL) {
                println!(
                    "    {}/{}: SKIPPED (no time left before the lane's deadline)",
                    kernel.label, suite.name
                );
                cells.push(Cell::skipped(kernel, suite));
                continue;
            }
            let timeout = left.map_or(opts.timeout, |l| l.min(opts.timeout));
            let mut cell = run_cell(&host, kernel, image, suite, command, timeout)?;
            if cell.outcome == Outcome::Timeout && timeout < opts.timeout {
                cell.outcome = Outcome::CutOff;
            }
            println!(
                "    {}/{}: {} ({} passed, {} failed, {} s)",
                kernel.label,
                suite.name,
                cell.outcome.word(),
                cell.passed,
                cell.failed,
                cell.elapsed.as_secs()
            );
            if matches!(cell.outcome, Outcome::Fail | Outcome::Timeout) {
                // CI keeps this process's output, not the VM's log: what failed, and why.
                let log = host.base.join(kernel.label).join(suite.name).join("vm.log");
                let text = fs::read_to_string(&log).unwrap_or_default();
                if text.trim().is_empty() {
                    println!("    | (no log: {})", log.display());
                }
                for line in failure_excerpt(&text, FAILURE_LINES) {
                    println!("    | {line}");
                }
            }
            cells.push(cell);
        }
    }
    // The table reads kernel by kernel.
    let kernel_rank = |c: &Cell| kernels.iter().position(|k| k.label == c.kernel);
    cells.sort_by_key(|c| kernel_rank(c));
    report(&base, &cells)?;
    let failed = cells
        .iter()
        .filter(|c| {
            !matches!(
                c.outcome,
                Outcome::Pass | Outcome::Degraded | Outcome::Skipped | Outcome::CutOff
            )
        })
        .count();
    ensure!(
        failed == 0,
        "{failed} of {} kernel × suite runs did not pass (logs: target/vm-test/<kernel>/<suite>/vm.log)",
        cells.len()
    );
    Ok(())
}

/// The entries named in `wanted`, in table order, or all of them when none is named.
fn select<'a, T>(
    table: &'a [T],
    wanted: &[String],
    name: fn(&T) -> &'static str,
    what: &str,
) -> anyhow::Result<Vec<&'a T>> {
    let known: Vec<&str> = table.iter().map(name).collect();
    for w in wanted {
        ensure!(
            known.contains(&w.as_str()),
            "unknown {what} {w:?} (known: {})",
            known.join(", ")
        );
    }
    Ok(table
        .iter()
        .filter(|t| wanted.is_empty() || wanted.iter().any(|w| w == name(t)))
        .collect())
}

// ---- host setup -------------------------------------------------------------------------

fn host_packages() -> anyhow::Result<()> {
    let qemu_missing = !crate::setup::dpkg_installed(QEMU_PACKAGE);
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .copied()
        .filter(|p| !crate::setup::dpkg_installed(p))
        .collect();
    if !qemu_missing && missing.is_empty() {
        step("vm host packages: all installed");
        return Ok(());
    }
    if qemu_missing && !Path::new(BACKPORTS_SOURCES).exists() {
        step(&format!(
            "apt: adding bookworm-backports ({BACKPORTS_SOURCES})"
        ));
        fs::write(BACKPORTS_SOURCES, BACKPORTS)
            .with_context(|| format!("writing {BACKPORTS_SOURCES}"))?;
    }
    step("vm host packages: installing");
    run_checked(apt_get().arg("update"))?;
    if qemu_missing {
        run_checked(apt_get().args(["install", "-y", "-t", "bookworm-backports", QEMU_PACKAGE]))?;
    }
    if !missing.is_empty() {
        run_checked(apt_get().args(["install", "-y"]).args(&missing))?;
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// virtme-ng in its own venv (bookworm has no package of it); returns the venv's `bin/`,
/// which must come first on PATH: vng calls `virtme-run` through `sh`.
fn virtme_ng(venv: &Path) -> anyhow::Result<PathBuf> {
    let bin = venv.join("bin");
    let version = Command::new(bin.join("vng")).arg("--version").output();
    let wanted = VIRTME_NG
        .rsplit("==")
        .next()
        .expect("pinned as name==version");
    if version.is_ok_and(|out| {
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(wanted)
    }) {
        step(&format!("{VIRTME_NG}: installed"));
        return Ok(bin);
    }
    step(&format!("{VIRTME_NG}: installing in {}", venv.display()));
    // The system python: a pyenv or other shim on PATH may come and go.
    run_checked(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(venv),
    )?;
    run_checked(
        Command::new(bin.join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(VIRTME_NG),
    )?;
    Ok(bin)
}

/// The kernel's image, downloading and extracting its packages when not done before.
fn kernel_image(base: &Path, kernel: &Kernel) -> anyhow::Result<PathBuf> {
    let debs = kernel_debs(&base.join("cache"), kernel)?;
    let tree = base.join("kernels").join(kernel.label);
    let stamp = tree.join(".package");
    let want_stamp = format!("{} {}\n", kernel.packages.join(" "), kernel.version);
    if fs::read_to_string(&stamp).is_ok_and(|s| s == want_stamp)
        && let Some(image) = image_in(&tree, kernel.release)
    {
        step(&format!("kernel {}: {}", kernel.label, tree.display()));
        return Ok(image);
    }
    step(&format!(
        "kernel {}: extracting into {}",
        kernel.label,
        tree.display()
    ));
    // Extract beside it and rename, so an interrupted extraction is never taken as done.
    let partial = base
        .join("kernels")
        .join(format!(".{}.partial", kernel.label));
    for dir in [&partial, &tree] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    for deb in &debs {
        run_checked(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&partial))?;
    }
    modules_in_place(&partial, kernel.release)?;
    ensure!(
        image_in(&partial, kernel.release).is_some(),
        "{} hold no boot/vmlinuz-{release} or usr/lib/modules/{release}/vmlinuz",
        kernel.packages.join(", "),
        release = kernel.release
    );
    fs::write(partial.join(".package"), &want_stamp)?;
    fs::rename(&partial, &tree).with_context(|| format!("renaming into {}", tree.display()))?;
    image_in(&tree, kernel.release).context("the image went missing in the rename")
}

/// Where a Debian kernel tree keeps its image: `boot/vmlinuz-R` up to 6.x, the modules
/// directory from 7.0 (`linux-binary-*`).
fn image_in(tree: &Path, release: &str) -> Option<PathBuf> {
    [
        tree.join("boot").join(format!("vmlinuz-{release}")),
        tree.join("usr/lib/modules").join(release).join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// Makes `tree/lib/modules/R` hold the modules with their index, as the guest's `modprobe`
/// and virtme-ng expect: packages of merged-/usr Debian (trixie) ship `usr/lib/modules` and
/// no `modules.dep` (their postinst runs depmod), so link `lib` to `usr/lib` and run depmod
/// on the tree (bookworm's depmod reads `BASE/lib/modules`).
fn modules_in_place(tree: &Path, release: &str) -> anyhow::Result<()> {
    let lib = tree.join("lib");
    if !lib.exists() && tree.join("usr/lib/modules").join(release).is_dir() {
        std::os::unix::fs::symlink("usr/lib", &lib)
            .with_context(|| format!("linking {} to usr/lib", lib.display()))?;
    }
    let modules = lib.join("modules").join(release);
    ensure!(
        modules.join("kernel").is_dir(),
        "no modules at {} (nor under usr/)",
        modules.display()
    );
    if !modules.join("modules.dep").is_file() {
        run_checked(Command::new("depmod").arg("-b").arg(tree).arg(release))?;
    }
    Ok(())
}

/// The kernel's .debs in `cache`, the missing ones downloaded, each version checked against
/// the pin.
fn kernel_debs(cache: &Path, kernel: &Kernel) -> anyhow::Result<Vec<PathBuf>> {
    let cached = |package: &str| cache.join(format!("{package}_{}_amd64.deb", kernel.version));
    let missing: Vec<&str> = kernel
        .packages
        .iter()
        .copied()
        .filter(|p| !cached(p).is_file())
        .collect();
    if !missing.is_empty() {
        step(&format!(
            "kernel {}: downloading {} {} ({})",
            kernel.label,
            missing.join(" "),
            kernel.version,
            kernel.origin
        ));
        let partial = cache.join(".partial");
        if partial.exists() {
            fs::remove_dir_all(&partial)?;
        }
        fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
        let private = private_sources(cache, kernel)?;
        if !private.is_empty() {
            run_checked(apt_get().args(&private).arg("update"))?;
        }
        let download = || {
            run_checked(
                apt_get()
                    .current_dir(&partial)
                    .args(&private)
                    // Root writes the file: `_apt` may not reach target/.
                    .args(["-o", "APT::Sandbox::User=root", "download"])
                    .args(missing.iter().map(|p| format!("{p}={}", kernel.version))),
            )
        };
        // Stale package lists are the usual reason; a version gone from the mirror is the other.
        if download().is_err() {
            run_checked(apt_get().args(&private).arg("update"))?;
            download().with_context(|| {
                format!(
                    "{} {} is not in the configured apt sources (needs {}); if it has left the \
                     mirror, put the .debs in {} or pin a newer one in xtask/src/vm.rs",
                    missing.join(" "),
                    kernel.version,
                    kernel.origin,
                    cache.display()
                )
            })?;
        }
        // apt names the files its own way (URL-escaped); each goes to its pinned name.
        for got in debs_in(&partial)? {
            let (package, _) = deb_fields(&got)?;
            ensure!(
                missing.contains(&package.as_str()),
                "apt-get download fetched {package}, which was not asked for"
            );
            fs::rename(&got, cached(&package))
                .with_context(|| format!("moving {} into {}", got.display(), cache.display()))?;
        }
        fs::remove_dir(&partial)?;
    }
    let mut debs = Vec::new();
    for package in kernel.packages {
        let deb = cached(package);
        let (got_package, got_version) = deb_fields(&deb)?;
        ensure!(
            got_package == *package && got_version == kernel.version,
            "{} is {got_package} {got_version}, but kernel {} is pinned to {package} {}; \
             delete the file to download it again",
            deb.display(),
            kernel.label,
            kernel.version
        );
        debs.push(deb);
    }
    Ok(debs)
}

/// A .deb's `Package` and `Version` fields.
fn deb_fields(deb: &Path) -> anyhow::Result<(String, String)> {
    let out = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(deb)
        .args(["Package", "Version"])
        .output()
        .context("cannot start dpkg-deb")?;
    ensure!(out.status.success(), "dpkg-deb -f {} failed", deb.display());
    let fields = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        fields
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    Ok((field("Package"), field("Version")))
}

/// apt options for a kernel from another Debian suite: its own sources list and package
/// lists under `cache`, so the system's apt sees nothing of it. Empty for the system's sources.
fn private_sources(cache: &Path, kernel: &Kernel) -> anyhow::Result<Vec<String>> {
    let Some(line) = kernel.source else {
        return Ok(Vec::new());
    };
    let dir = cache.join(format!("apt-{}", kernel.origin));
    fs::create_dir_all(dir.join("lists/partial"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let list = dir.join("sources.list");
    fs::write(&list, format!("{line}\n"))?;
    Ok(vec![
        "-o".into(),
        format!("Dir::Etc::SourceList={}", list.display()),
        "-o".into(),
        "Dir::Etc::SourceParts=/dev/null".into(),
        "-o".into(),
        format!("Dir::State::Lists={}", dir.join("lists").display()),
    ])
}

fn debs_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect())
}

// ---- suites -----------------------------------------------------------------------------

/// The verifier check: every program loaded, its instruction counts printed as
/// [`VERIFIER_MARK`] lines for the table.
fn verifier_suite(root: &Path) -> anyhow::Result<String> {
    let exe = test_executable(root, "ferrovia-agent", "programs")?;
    let exe = snapshot(root, "verifier", &[exe])?.remove(0);
    Ok(format!(
        "{} {VERIFIER_TEST} --exact --nocapture",
        sh_quote(&exe)
    ))
}

/// The test that loads every program and prints its verifier statistics
/// (`agent/tests/programs.rs`).
const VERIFIER_TEST: &str = "every_program_passes_the_verifier_within_half_its_budget";
/// Starts each statistics line: `VERIFIER-STATS\tprogram\tverified\txlated\trefused`.
const VERIFIER_MARK: &str = "VERIFIER-STATS\t";

/// The BPF program tests (`agent/tests/programs.rs`): one libtest binary, as many test threads
/// as the guest has CPUs, as on the host (each test loads its own programs and maps on its own
/// bpffs root; loading them — the verifier, emulated — is most of the suite's time).
fn programs_suite(root: &Path) -> anyhow::Result<String> {
    let exe = test_executable(root, "ferrovia-agent", "programs")?;
    let exe = snapshot(root, "programs", &[exe])?.remove(0);
    Ok(sh_quote(&exe))
}

/// The binaries the end-to-end suites run (`tests/src/paths.rs` finds them in
/// `FERROVIA_BIN_DIR`).
const E2E_BINARIES: &[&str] = &[
    "ferrovia-agent",
    "ferrovia-cni",
    "ferrovia",
    "ferrovia-echo",
];

/// An end-to-end suite of `tests/tests/`: the same executable as on the host, running the
/// workspace's binaries, pods made by the host's CNI plugins, traffic inside the guest's
/// namespaces.
fn e2e_suite(root: &Path, test: &str) -> anyhow::Result<String> {
    run_checked(cargo(root).args(["build", "--bins"]))?;
    let exe = test_executable(root, "ferrovia-tests", test)?;
    // The binaries sit in the profile directory above the test's `deps/` (which follows
    // CARGO_TARGET_DIR).
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .context("a test executable lives in <profile>/deps/")?
        .to_path_buf();
    let mut files = vec![exe];
    files.extend(E2E_BINARIES.iter().map(|b| profile.join(b)));
    let files = snapshot(root, test, &files)?;
    let bins = files[1].parent().expect("a file in a directory");
    Ok(format!(
        "env FERROVIA_BIN_DIR={} {}",
        sh_quote(bins),
        sh_quote(&files[0])
    ))
}

/// Hard links of `files` in `target/vm-test/bin/<name>/`, which the guests run: the guest
/// reads the host's files as they are, and a binary the host rebuilds while a VM runs it
/// would change under its mapped pages (processes in the guest died of SIGSEGV that way).
/// The linker and cargo write new files rather than rewrite these, so the links keep what
/// was built.
fn snapshot(root: &Path, name: &str, files: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let dir = root.join("target/vm-test/bin").join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    files
        .iter()
        .map(|f| {
            let to = dir.join(f.file_name().context("a file name")?);
            fs::hard_link(f, &to)
                .or_else(|_| fs::copy(f, &to).map(drop))
                .with_context(|| format!("linking {} into {}", f.display(), dir.display()))?;
            Ok(to)
        })
        .collect()
}

/// Builds one integration test of `package` and returns its executable, as cargo reports
/// it in its JSON messages (the hash in the name changes with the build).
fn test_executable(root: &Path, package: &str, test: &str) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo(root);
    cmd.args([
        "test",
        "-p",
        package,
        "--test",
        test,
        "--no-run",
        "--message-format=json",
    ])
    .stderr(Stdio::inherit());
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(&cmd)))?;
    ensure!(
        out.status.success(),
        "{} failed ({})",
        show(&cmd),
        out.status
    );
    let mut found = Vec::new();
    for line in out.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let msg: serde_json::Value = serde_json::from_slice(line)
            .with_context(|| format!("{} printed a line that is not JSON", show(&cmd)))?;
        let is_test = msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == test
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe)) = (is_test, msg["executable"].as_str()) {
            found.push(PathBuf::from(exe));
        }
    }
    match found.as_slice() {
        [exe] => Ok(exe.clone()),
        _ => bail!(
            "{} reported {} executables for test {test}, expected one",
            show(&cmd),
            found.len()
        ),
    }
}

/// `s` as one word for `sh`.
fn sh_quote(s: &Path) -> String {
    format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"))
}

// ---- one VM run -------------------------------------------------------------------------

#[derive(PartialEq, Eq, Clone, Copy)]
enum Outcome {
    Pass,
    /// Every failure is an expected degradation (the kernel lacks a feature, `KERNEL_LACKS`).
    Degraded,
    Fail,
    Timeout,
    /// Not run: no time left in the lane.
    Skipped,
    /// Stopped by the lane's deadline before its own timeout.
    CutOff,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Degraded => "DEGRADED (expected)",
            Outcome::Fail => "FAIL",
            Outcome::Timeout => "TIMEOUT",
            Outcome::Skipped => "SKIPPED (no time left)",
            Outcome::CutOff => "CUT OFF (lane's deadline)",
        }
    }
}

/// One kernel × suite run.
struct Cell {
    kernel: &'static str,
    suite: &'static str,
    /// What `uname -r` said in the guest, when it got that far.
    guest_release: Option<String>,
    passed: u64,
    failed: u64,
    elapsed: Duration,
    outcome: Outcome,
    /// The verifier's statistics per program, from the `verifier` suite.
    programs: Vec<ProgramLine>,
}

impl Cell {
    fn skipped(kernel: &Kernel, suite: &Suite) -> Self {
        Cell {
            kernel: kernel.label,
            suite: suite.name,
            guest_release: None,
            passed: 0,
            failed: 0,
            elapsed: Duration::ZERO,
            outcome: Outcome::Skipped,
            programs: Vec::new(),
        }
    }
}

/// One [`VERIFIER_MARK`] line of a guest's log.
#[derive(Debug, PartialEq, Eq)]
struct ProgramLine {
    program: String,
    /// Instructions the verifier processed; `None` where the kernel does not report it.
    verified: Option<u64>,
    /// Instructions after the verifier's rewrites.
    xlated: Option<u64>,
    /// The verifier refused it (on this kernel its fallback variant runs instead).
    refused: bool,
}

/// Written into the log by the guest, before the suite's command.
const UNAME_MARK: &str = "# guest uname -r: ";

/// What every VM run shares.
struct Host<'a> {
    root: &'a Path,
    /// `target/vm-test`.
    base: &'a Path,
    /// virtme-ng's venv `bin/`.
    venv_bin: &'a Path,
}

fn run_cell(
    host: &Host,
    kernel: &Kernel,
    image: &Path,
    suite: &Suite,
    command: &str,
    timeout: Duration,
) -> anyhow::Result<Cell> {
    let outdir = host.base.join(kernel.label).join(suite.name);
    if outdir.exists() {
        fs::remove_dir_all(&outdir).with_context(|| format!("removing {}", outdir.display()))?;
    }
    fs::create_dir_all(&outdir).with_context(|| format!("creating {}", outdir.display()))?;
    let log_path = outdir.join("vm.log");

    // bpffs is not mounted in a virtme-ng guest; the tests need it.
    let guest =
        format!("echo \"{UNAME_MARK}$(uname -r)\"; mount -t bpf bpf /sys/fs/bpf && exec {command}");
    let path = std::env::join_paths(
        std::iter::once(host.venv_bin.to_path_buf()).chain(
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths),
        ),
    )?;
    let mut vng = Command::new(host.venv_bin.join("vng"));
    vng.current_dir(host.root)
        .env("PATH", path)
        // No KVM: this host is itself a VM and QEMU aborts under its /dev/kvm.
        .args(["--disable-kvm", "--cpus", "2", "--memory", "2G"])
        // Drivers the emulated guest has no use for, as in TOOLCHAIN.md's verified command.
        .args(["--append", "modprobe.blacklist=kvm_amd,kvm,ccp,ahci,libata"])
        .arg(format!("--rwdir={}", outdir.display()))
        .arg("--run")
        .arg(image)
        .args(["--exec", &guest]);

    let mut log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    writeln!(
        log,
        "# kernel {} ({} {}, {}), suite {}\n# {}",
        kernel.label,
        kernel.packages.join(" "),
        kernel.version,
        kernel.origin,
        suite.name,
        show(&vng)
    )?;
    // Through a pipe, not the file itself: QEMU reopens its stdout and stderr by path
    // (`/proc/self/fd/N`) several times over, each truncating and writing from offset 0.
    let (mut from_vm, to_log) = std::io::pipe().context("creating a pipe")?;
    vng.stdin(Stdio::null())
        .stdout(to_log.try_clone()?)
        .stderr(to_log);
    // A session of its own, so a timeout can kill vng, QEMU and all they started at once,
    // and QEMU never touches our terminal.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        vng.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }

    step(&format!(
        "{}/{}: running in a VM (log: {})",
        kernel.label,
        suite.name,
        log_path.display()
    ));
    let started = Instant::now();
    let mut child = vng
        .spawn()
        .with_context(|| format!("cannot start {}", show(&vng)))?;
    // Our copies of the pipe's write end go with the Command, so the copy sees EOF.
    drop(vng);
    let copier = std::thread::spawn(move || std::io::copy(&mut from_vm, &mut log));
    let status = wait_or_kill(&mut child, started + timeout)?;
    let elapsed = started.elapsed();
    copier
        .join()
        .expect("the log copier does not panic")
        .with_context(|| format!("writing {}", log_path.display()))?;

    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let guest_release = text
        .lines()
        .find_map(|l| l.trim_end().strip_prefix(UNAME_MARK))
        .map(str::to_owned);
    let summary = libtest_summary(&text);
    let (passed, failed) = summary.unwrap_or((0, 0));
    let degraded = kernel_lacks(&text);
    let right_kernel = guest_release.as_deref() == Some(kernel.release);
    // The verifier suite's point is its statistics; any suite must have run something
    // (a renamed test filtered to nothing passes vacuously otherwise).
    let programs = if suite.name == "verifier" {
        verifier_lines(&text)
    } else {
        Vec::new()
    };
    let ran = passed > 0 && (suite.name != "verifier" || !programs.is_empty());
    let outcome = match status {
        None => Outcome::Timeout,
        Some(s) if s.success() && summary.is_some() && failed == 0 && right_kernel && ran => {
            Outcome::Pass
        }
        // Every failure is the kernel's missing feature: expected, recorded, not a failure.
        Some(_) if summary.is_some() && failed > 0 && failed == degraded && right_kernel => {
            Outcome::Degraded
        }
        Some(_) => Outcome::Fail,
    };
    Ok(Cell {
        kernel: kernel.label,
        suite: suite.name,
        guest_release,
        passed,
        failed,
        elapsed,
        outcome,
        programs,
    })
}

/// The verifier's statistics a guest printed ([`VERIFIER_MARK`] lines).
fn verifier_lines(log: &str) -> Vec<ProgramLine> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split_once(VERIFIER_MARK)?.1.trim_end_matches('\r');
            let mut f = rest.split('\t');
            let program = f.next()?.to_owned();
            let verified = f.next()?.parse().ok();
            let xlated = f.next()?.parse().ok();
            let refused = f.next().is_some_and(|r| !r.trim().is_empty());
            Some(ProgramLine {
                program,
                verified,
                xlated,
                refused,
            })
        })
        .collect()
}

/// Set by SIGINT or SIGTERM, so the VM in its own session is killed before we leave.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupted(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn on_interrupt_stop_vm() -> anyhow::Result<()> {
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { signal::signal(sig, SigHandler::Handler(interrupted)) }
            .with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

/// Waits for the VM until `deadline`; past it, or on an interrupt, kills its whole process
/// group and returns `None` (or fails, when interrupted).
fn wait_or_kill(child: &mut Child, deadline: Instant) -> anyhow::Result<Option<ExitStatus>> {
    let group = Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"));
    loop {
        if let Some(status) = child.try_wait()? {
            // Anything vng left behind in its group would hold the log pipe open.
            let _ = signal::killpg(group, Signal::SIGKILL);
            return Ok(Some(status));
        }
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        if interrupted || Instant::now() >= deadline {
            // TERM lets QEMU and vng clean up; KILL whatever is left after a grace period.
            let _ = signal::killpg(group, Signal::SIGTERM);
            let grace = Instant::now() + Duration::from_secs(5);
            while child.try_wait()?.is_none() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = signal::killpg(group, Signal::SIGKILL);
            child.wait()?;
            if interrupted {
                bail!("interrupted; the VM was stopped");
            }
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The marker the data path puts on an error a kernel's missing feature causes
/// (`ferrovia_agent::datapath::KERNEL_LACKS`; xtask does not depend on the agent).
const KERNEL_LACKS: &str = "KERNEL-LACKS:";

/// How many failed tests failed because of the kernel: libtest's `---- NAME stdout ----`
/// sections whose panic message carries [`KERNEL_LACKS`] (not merely their output: an agent's
/// log tail printed after the panic may quote anything).
fn kernel_lacks(log: &str) -> u64 {
    let mut count = 0;
    let mut in_section = false;
    let mut in_panic = false;
    let mut marked = false;
    for line in log.lines() {
        let line = line.trim_end();
        let header = line.starts_with("---- ") && line.ends_with(" stdout ----");
        if header || line == "failures:" {
            count += u64::from(in_section && marked);
            in_section = header;
            in_panic = false;
            marked = false;
        } else if in_section && line.contains("panicked at ") {
            in_panic = true;
        } else if line.starts_with("note: run with")
            || line.starts_with("stack backtrace:")
            || line.starts_with("---- ")
        {
            in_panic = false;
        } else if in_panic && line.contains(KERNEL_LACKS) {
            marked = true;
        }
    }
    count + u64::from(in_section && marked)
}

/// Lines of a failed run's log printed with its result (the failures can be long tables).
const FAILURE_LINES: usize = 400;

/// What to show of a failed run's log: libtest's `failures:` sections (each failed test's
/// output and panic), or, when the run never got there (a timeout, a crash, a boot that
/// failed), its last lines; at most `limit` lines either way.
fn failure_excerpt(log: &str, limit: usize) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().map(str::trim_end).collect();
    let sections: Vec<&str> = match lines.iter().position(|l| *l == "failures:") {
        Some(start) => {
            let end = lines[start..]
                .iter()
                .position(|l| l.contains("test result: "))
                .map_or(lines.len(), |e| start + e + 1);
            lines[start..end].to_vec()
        }
        None => lines[lines.len().saturating_sub(60)..].to_vec(),
    };
    if sections.len() <= limit {
        return sections;
    }
    // The start of the first failures, then always libtest's closing list of every failed
    // test and its `test result:` line (from the last `failures:`).
    let names = sections
        .iter()
        .rposition(|l| *l == "failures:")
        .filter(|&i| i > 0)
        .unwrap_or(sections.len());
    let head = limit.saturating_sub(sections.len() - names).min(names);
    let mut cut = sections[..head].to_vec();
    cut.push("… (cut; the whole log is the run's vm.log)");
    cut.extend_from_slice(&sections[names..]);
    cut
}

/// Passed and failed tests summed over libtest's `test result: ok. N passed; M failed; ...`
/// lines, or `None` when there is none (the guest never got to the end).
fn libtest_summary(log: &str) -> Option<(u64, u64)> {
    let mut total: Option<(u64, u64)> = None;
    for line in log.lines() {
        let Some((_, rest)) = line.split_once("test result: ") else {
            continue;
        };
        let count = |what: &str| {
            rest.split(';').find_map(|part| {
                part.trim()
                    .strip_suffix(what)?
                    .trim()
                    .rsplit(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
        };
        let (Some(passed), Some(failed)) = (count("passed"), count("failed")) else {
            continue;
        };
        let (p, f) = total.unwrap_or((0, 0));
        total = Some((p + passed, f + failed));
    }
    total
}

/// The kernel × suite table, then the verifier's instruction counts per program × kernel;
/// both printed and written to `target/vm-test/results.md`.
fn report(base: &Path, cells: &[Cell]) -> anyhow::Result<()> {
    let mut md =
        String::from("| kernel | suite | guest `uname -r` | passed | failed | time | result |\n");
    md.push_str("|---|---|---|---:|---:|---:|---|\n");
    for c in cells {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} s | {} |",
            c.kernel,
            c.suite,
            c.guest_release.as_deref().unwrap_or("-"),
            c.passed,
            c.failed,
            c.elapsed.as_secs(),
            c.outcome.word()
        );
    }
    let kernels: Vec<&Cell> = cells.iter().filter(|c| !c.programs.is_empty()).collect();
    if !kernels.is_empty() {
        let mut programs: Vec<&str> = kernels
            .iter()
            .flat_map(|c| c.programs.iter().map(|p| p.program.as_str()))
            .collect();
        programs.sort_unstable();
        programs.dedup();
        md.push_str(
            "\nVerifier: instructions processed per program (`verified_insns`, limit 1,000,000; \
             the test fails past half of it); in parentheses the instructions after the \
             verifier's rewrites. `n/a`: the kernel does not report the count (before 5.16); \
             `refused`: the kernel lacks a helper it calls, its fallback variant runs there.\n\n| program |",
        );
        for c in &kernels {
            let _ = write!(md, " {} |", c.kernel);
        }
        md.push_str("\n|---|");
        md.push_str(&"---:|".repeat(kernels.len()));
        md.push('\n');
        for program in programs {
            let _ = write!(md, "| {program} |");
            for c in &kernels {
                let cell = c
                    .programs
                    .iter()
                    .find(|p| p.program == program)
                    .map_or_else(
                        || "-".to_owned(),
                        |p| match (p.refused, p.verified, p.xlated) {
                            (true, ..) => "refused".to_owned(),
                            (false, Some(v), Some(x)) => format!("{v} ({x})"),
                            (false, None, Some(x)) => format!("n/a ({x})"),
                            (false, v, None) => {
                                v.map_or_else(|| "n/a".to_owned(), |v| v.to_string())
                            }
                        },
                    );
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
    }
    println!("\n{md}");
    let path = base.join("results.md");
    fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("(also in {})", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::libtest_summary;

    #[test]
    fn summary_lines_are_summed() {
        let log = "running 2 tests\n\
                   test result: ok. 34 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 134.02s\n\
                   test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out\r\n";
        assert_eq!(libtest_summary(log), Some((35, 2)));
    }

    #[test]
    fn failures_the_kernel_causes_are_counted() {
        let log = "---- a stdout ----\nthread 'a' panicked at x.rs:1:1:\nBPF_PROG_TEST_RUN\n\n\
                   Caused by:\n    KERNEL-LACKS: no ingress_ifindex\n\n\
                   ---- b stdout ----\nthread 'b' panicked at x.rs:2:1:\nassertion failed\n\n\
                   failures:\n    a\n    b\n";
        assert_eq!(super::kernel_lacks(log), 1);
    }

    #[test]
    fn a_marker_outside_the_panic_message_does_not_count() {
        let log = "---- a stdout ----\nthread 'a' panicked at x.rs:1:1:\nassertion failed\n\
                   note: run with `RUST_BACKTRACE=1`\n\
                   ---- ferrovia-agent log tail (/tmp/x/agent.log) ----\n\
                   WARN KERNEL-LACKS: quoted by the agent\n\nfailures:\n    a\n";
        assert_eq!(super::kernel_lacks(log), 0);
    }

    #[test]
    fn verifier_lines_are_read() {
        let log = "noise\nVERIFIER-STATS\tfrom_pod\t55002\t8428\t\r\n\
                   [ 3.1] VERIFIER-STATS\tsock4_connect\t-\t-\tinvalid func unknown#187\n\
                   VERIFIER-STATS\tto_pod\t-\t1093\t\n";
        let lines = super::verifier_lines(log);
        assert_eq!(lines.len(), 3);
        assert_eq!(
            (
                lines[0].program.as_str(),
                lines[0].verified,
                lines[0].xlated,
                lines[0].refused
            ),
            ("from_pod", Some(55002), Some(8428), false)
        );
        assert_eq!((lines[1].verified, lines[1].refused), (None, true));
        assert_eq!((lines[2].verified, lines[2].xlated), (None, Some(1093)));
    }

    #[test]
    fn a_failure_is_shown_from_its_section() {
        let log = "boot noise\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n---- b stdout ----\n\
                   seed 7\nthread 'b' panicked at x.rs:2:1:\nmismatch\n\nfailures:\n    b\n\n\
                   test result: FAILED. 1 passed; 1 failed; 0 ignored\n[ 9.0] reboot: Power down\n";
        let shown = super::failure_excerpt(log, 100);
        assert_eq!(shown.first(), Some(&"failures:"));
        assert!(shown.contains(&"seed 7") && shown.contains(&"mismatch"));
        assert!(
            shown
                .last()
                .is_some_and(|l| l.starts_with("test result: FAILED"))
        );
        let cut = super::failure_excerpt(log, 6);
        assert_eq!(cut.len(), 7, "cut to the limit, and says so: {cut:?}");
        assert_eq!(cut[0], "failures:");
        assert!(
            cut.contains(&"    b"),
            "the failed tests' names are kept: {cut:?}"
        );
        assert!(
            cut.last()
                .is_some_and(|l| l.starts_with("test result: FAILED"))
        );
        // No libtest failures section (a crash or a timeout): the log's tail.
        let crash = "a\nb\nKernel panic - not syncing\n";
        assert_eq!(
            super::failure_excerpt(crash, 100),
            ["a", "b", "Kernel panic - not syncing"]
        );
    }

    #[test]
    fn no_summary_is_none() {
        assert_eq!(libtest_summary("Kernel panic - not syncing"), None);
    }
}
