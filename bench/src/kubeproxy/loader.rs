//! Loading the generated rule sets into a node's network namespace the way kube-proxy does
//! (`iptables-restore` / `nft -f -` fed on stdin), timed, and removing them again.
//!
//! Every command runs through `nsenter --net=/run/netns/NAME` (not `ip netns exec`, which
//! remounts /sys): the rules only ever touch that namespace, never the host's own.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrovia_tests::cmd::in_netns;

/// Which `iptables` kube-proxy's iptables mode drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IptablesBackend {
    /// `iptables-nft`: iptables rules stored as nftables expressions, the default of Debian
    /// 11+, RHEL 8+ and the kube-proxy image's auto-detection on current distributions.
    Nft,
    /// `iptables-legacy`: the `x_tables` kernel interface, kube-proxy on older distributions.
    Legacy,
}

impl IptablesBackend {
    /// Both back ends, for benchmarks that report each.
    pub const ALL: [Self; 2] = [Self::Nft, Self::Legacy];

    /// Its `iptables-restore` binary.
    #[must_use]
    pub fn restore_bin(self) -> &'static str {
        match self {
            Self::Nft => "iptables-nft-restore",
            Self::Legacy => "iptables-legacy-restore",
        }
    }

    /// Its `iptables-save` binary.
    #[must_use]
    pub fn save_bin(self) -> &'static str {
        match self {
            Self::Nft => "iptables-nft-save",
            Self::Legacy => "iptables-legacy-save",
        }
    }

    /// A short name for reports: `iptables-nft` or `iptables-legacy`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Nft => "iptables-nft",
            Self::Legacy => "iptables-legacy",
        }
    }
}

/// Loads an [`super::iptables_restore_input`] payload into `netns` with the flags kube-proxy
/// passes (`pkg/util/iptables`: `-w 5 -W 100000 --noflush --counters`) and returns the
/// wall time of the `iptables-restore` run.
pub fn load_iptables(netns: &str, backend: IptablesBackend, input: &str) -> Result<Duration> {
    timed(
        &mut in_netns(
            netns,
            backend.restore_bin(),
            &["-w", "5", "-W", "100000", "--noflush", "--counters"],
        ),
        input,
    )
    .with_context(|| format!("loading kube-proxy's iptables rules ({})", backend.name()))
}

/// Loads an [`super::nft_input`] transaction into `netns` with `nft -f -`, as knftables runs
/// it, and returns the wall time of the `nft` run.
pub fn load_nft(netns: &str, input: &str) -> Result<Duration> {
    timed(&mut in_netns(netns, "nft", &["-f", "-"]), input)
        .context("loading kube-proxy's nftables rules")
}

/// `iptables-save -t TABLE` in `netns`.
pub fn iptables_save(netns: &str, backend: IptablesBackend, table: &str) -> Result<String> {
    let mut cmd = in_netns(netns, backend.save_bin(), &["-t", table]);
    let out = run_stdin(&mut cmd, "")?;
    check(&cmd, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes kube-proxy's iptables rules from `netns` (its `CleanupLeftovers`): the jumps
/// from the built-in chains to `KUBE-*` chains, then every `KUBE-*` chain of `filter` and
/// `nat`, in one `iptables-restore --noflush`. Others' rules stay. Idempotent.
///
/// With [`IptablesBackend::Nft`], a `filter`/`nat` table holding nothing but kube-proxy's
/// rules is deleted whole instead (`nft delete table`): much faster than the chain-by-chain
/// restore at scale, and its hooks then don't tax whatever is measured next. The legacy
/// tables can't be unregistered from a namespace: measure the data path after
/// `iptables-legacy` on a fresh node.
pub fn flush_iptables(netns: &str, backend: IptablesBackend) -> Result<()> {
    let context = || format!("removing kube-proxy's iptables rules ({})", backend.name());
    let mut input = String::new();
    for table in ["filter", "nat"] {
        let saved = iptables_save(netns, backend, table)?;
        if backend == IptablesBackend::Nft && only_kube_proxy(&saved) {
            // (iptables-nft-save shows a table's built-in chains even when it doesn't exist.)
            delete_nft_table(netns, table).with_context(context)?;
        } else {
            input.push_str(&cleanup_input(table, &saved));
        }
    }
    if input.is_empty() {
        return Ok(());
    }
    run_ok_stdin(
        &mut in_netns(netns, backend.restore_bin(), &["-w", "5", "--noflush"]),
        &input,
    )
    .with_context(context)
}

/// Whether an `iptables-save` dump of one table holds nothing but kube-proxy's chains and
/// jumps, and accepting built-in chains.
fn only_kube_proxy(saved: &str) -> bool {
    saved.lines().all(|l| {
        if let Some(chain) = l.strip_prefix(':') {
            let mut words = chain.split_whitespace();
            let (name, policy) = (words.next().unwrap_or_default(), words.next());
            name.starts_with("KUBE-") || policy == Some("ACCEPT")
        } else if let Some(rule) = l.strip_prefix("-A ") {
            rule.starts_with("KUBE-") || rule.contains(" -j KUBE-")
        } else {
            true
        }
    })
}

/// Removes `table ip kube-proxy` from `netns` (nftables mode's `CleanupLeftovers`).
/// Idempotent.
pub fn flush_nft(netns: &str) -> Result<()> {
    delete_nft_table(netns, "kube-proxy").context("removing kube-proxy's nftables table")
}

/// `nft delete table ip NAME` in `netns`; a table that doesn't exist is fine.
fn delete_nft_table(netns: &str, name: &str) -> Result<()> {
    let mut cmd = in_netns(netns, "nft", &["delete", "table", "ip", name]);
    let out = run_stdin(&mut cmd, "")?;
    if String::from_utf8_lossy(&out.stderr).contains("No such file or directory") {
        return Ok(());
    }
    check(&cmd, &out)
}

/// The `iptables-restore --noflush` input undoing kube-proxy in one table of an
/// `iptables-save` dump: declaring a chain flushes it, so the `KUBE-*` chains are declared
/// (emptied), unhooked from the built-in chains, then deleted.
fn cleanup_input(table: &str, saved: &str) -> String {
    let chains: Vec<&str> = saved
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("KUBE-"))
        .collect();
    let jumps: Vec<&str> = saved
        .lines()
        .filter_map(|l| l.strip_prefix("-A "))
        .filter(|rule| {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            !chain.starts_with("KUBE-") && rule.contains(" -j KUBE-")
        })
        .collect();
    if chains.is_empty() && jumps.is_empty() {
        return String::new();
    }
    let mut input = format!("*{table}\n");
    for chain in &chains {
        let _ = writeln!(input, ":{chain} - [0:0]");
    }
    for rule in jumps {
        let _ = writeln!(input, "-D {rule}");
    }
    for chain in &chains {
        let _ = writeln!(input, "-X {chain}");
    }
    input.push_str("COMMIT\n");
    input
}

/// Runs `cmd` with `input` on stdin and returns its wall time; a failure carries its stderr.
fn timed(cmd: &mut Command, input: &str) -> Result<Duration> {
    let start = Instant::now();
    let out = run_stdin(cmd, input)?;
    let took = start.elapsed();
    check(cmd, &out)?;
    Ok(took)
}

fn run_ok_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    let out = run_stdin(cmd, input)?;
    check(cmd, &out)
}

/// Runs `cmd` feeding `input` on stdin from another thread, so a child that writes its
/// errors before reading all of a large input can't deadlock us.
fn run_stdin(cmd: &mut Command, input: &str) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {desc}"))?;
    let mut stdin = child.stdin.take().expect("stdin was piped");
    std::thread::scope(|s| {
        // A child that exits early closes the pipe: its stderr says why, not our EPIPE.
        s.spawn(move || stdin.write_all(input.as_bytes()));
        child
            .wait_with_output()
            .with_context(|| format!("waiting for {desc}"))
    })
}

fn check(cmd: &Command, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A rejected payload may echo huge parts of itself.
    let stderr: String = stderr.chars().take(4000).collect();
    bail!("{cmd:?} failed ({}): {}", out.status, stderr.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_unhooks_and_deletes_only_kube_chains() {
        let saved = "\
# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-1234 - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -j CNI-1234
-A KUBE-SERVICES -d 172.30.0.41/32 -j KUBE-SVC-XPGD46QRK7WJZT7O
COMMIT
";
        assert_eq!(
            cleanup_input("nat", saved),
            "*nat\n\
             :KUBE-SERVICES - [0:0]\n\
             :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -X KUBE-SERVICES\n\
             -X KUBE-SVC-XPGD46QRK7WJZT7O\n\
             COMMIT\n"
        );
        assert_eq!(cleanup_input("filter", "*filter\nCOMMIT\n"), "");
    }

    #[test]
    fn tables_of_kube_proxy_alone_are_recognised() {
        let empty = "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [3:180]\nCOMMIT\n";
        let with = |extra: &str| empty.replace("COMMIT", &format!("{extra}\nCOMMIT"));
        assert!(only_kube_proxy(empty));
        assert!(only_kube_proxy(&with(
            ":KUBE-SERVICES - [0:0]\n\
             -A PREROUTING -m comment --comment \"x\" -j KUBE-SERVICES\n\
             -A KUBE-SERVICES -d 10.96.0.10/32 -j DROP"
        )));
        assert!(!only_kube_proxy(&with("-A PREROUTING -j DROP")));
        assert!(!only_kube_proxy(&with(":CNI-1 - [0:0]")));
        assert!(!only_kube_proxy(
            &empty.replace("POSTROUTING ACCEPT", "POSTROUTING DROP")
        ));
    }
}
