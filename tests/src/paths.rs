//! Where the binaries under test and the system's tools are.

use std::path::PathBuf;

/// Directory of the reference CNI plugins (Debian's `containernetworking-plugins`).
pub const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";

/// The cargo output directory of the running build profile (`target/debug`).
///
/// Integration-test executables live in `target/<profile>/deps/`, so the profile directory is
/// the parent of the executable's directory; that follows `CARGO_TARGET_DIR` and `--release`
/// without configuration. `FERROVIA_BIN_DIR` overrides it (e.g. installed binaries in a VM).
#[must_use]
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERROVIA_BIN_DIR") {
        return dir.into();
    }
    if let Ok(exe) = std::env::current_exe() {
        let dir = exe.parent().map(std::path::Path::to_path_buf);
        if let Some(dir) = dir {
            if dir.file_name().is_some_and(|n| n == "deps")
                && let Some(profile) = dir.parent()
            {
                return profile.to_path_buf();
            }
            // A binary of this crate (e.g. ferrovia-demo) sits in the profile dir itself.
            if dir.join("ferrovia-echo").exists() {
                return dir;
            }
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("debug")
}

/// Path of a workspace binary, e.g. `bin("ferrovia-agent")`.
#[must_use]
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}
