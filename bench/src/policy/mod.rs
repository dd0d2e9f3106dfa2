//! The `NetworkPolicy` section of the benchmark: what enforcement costs per packet, and how soon
//! a policy change takes effect, on ferrovia's socket-level path at 1 service.
//!
//! - Cost: the client's rr and crr load to the probed VIP (the main table's traffic), the same
//!   run measured under each [`Variant`] in turn, repetition after repetition (so drift on the
//!   machine touches all alike), with `from_pod`/`to_pod` ns per run from
//!   `kernel.bpf_stats_enabled`; ratios are against [`Variant::Off`].
//! - Change latency: a policy that denies the client and one that allows it, alternated by
//!   renaming a manifest in place, timed to the first connection that reflects each.
//!
//! - [`manifests`]: the pods' labels and the policies.
//! - [`run`]: the measurements on a [`crate::cluster::BenchCluster`].
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::report::{Stat, fmt, percentile};

pub mod manifests;
pub mod run;

/// One configuration of enforcement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// The agent runs with `--network-policy=false`.
    Off,
    /// Enforcement on, no policy: every pod is non-isolated.
    OnNoPolicies,
    /// The backends isolated for ingress, the client for egress, each allowing just the
    /// measured traffic ([`manifests::isolating`]).
    OnIsolating,
    /// As [`Variant::OnIsolating`], plus many policies that match none of the measured traffic
    /// ([`manifests::extra`]).
    OnIsolatingExtra,
}

impl Variant {
    /// In the order they are measured in each repetition.
    pub const ALL: [Self; 4] = [
        Self::Off,
        Self::OnNoPolicies,
        Self::OnIsolating,
        Self::OnIsolatingExtra,
    ];

    /// The name in tables; `extra` is the number of extra policies.
    #[must_use]
    pub fn label(self, extra: usize) -> String {
        match self {
            Self::Off => "off".into(),
            Self::OnNoPolicies => "on, no policies".into(),
            Self::OnIsolating => "on, isolating".into(),
            Self::OnIsolatingExtra => format!("on, isolating + {} extra", thousands(extra)),
        }
    }

    /// Whether the backends are isolated (a backend cannot reach another).
    #[must_use]
    pub fn isolating(self) -> bool {
        matches!(self, Self::OnIsolating | Self::OnIsolatingExtra)
    }
}

/// One repetition under one variant.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicySample {
    /// Requests/s over persistent connections.
    pub rr_rate: f64,
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
    /// New connections/s (connect, one request, close).
    pub crr_rate: f64,
    /// Each BPF program over this repetition's rr and crr runs: (runs, mean ns per run).
    #[serde(default)]
    pub prog_ns: BTreeMap<String, (u64, f64)>,
}

/// A variant's samples.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyCell {
    pub variant: Variant,
    pub samples: Vec<PolicySample>,
}

/// What the agent's `policy synced` log line says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySyncLog {
    /// Policies that select a pod of the node.
    pub policies: u64,
    pub isolated_pods: u64,
    /// Map entries written by that sync.
    pub entries_written: u64,
}

impl PolicySyncLog {
    /// The last `policy synced` line in `log`.
    #[must_use]
    pub fn last(log: &str) -> Option<Self> {
        let line = log.lines().rev().find(|l| l.contains("policy synced"))?;
        Some(Self {
            policies: field(line, "policies")?,
            isolated_pods: field(line, "isolated_pods")?,
            entries_written: field(line, "entries_written")?,
        })
    }
}

/// The number after `key=` in a `tracing` log line.
fn field(line: &str, key: &str) -> Option<u64> {
    let needle = format!(" {key}=");
    let rest = &line[line.find(&needle)? + needle.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The policy section's results.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyReport {
    /// Services programmed (the probed one among them).
    pub services: usize,
    pub repetitions: usize,
    pub extra_policies: usize,
    pub cells: Vec<PolicyCell>,
    /// Writing the extra policies' manifest → `ferrovia sync` returning with them in the
    /// maps, ms (one per repetition).
    pub extra_apply_ms: Vec<f64>,
    /// `ferrovia sync` with nothing changed (re-read and compile everything, write nothing), ms:
    /// with the isolating pair alone, and with the extra policies too.
    pub resync_isolating_ms: Vec<f64>,
    pub resync_extra_ms: Vec<f64>,
    /// The agent's `policy synced` line after applying the extra policies.
    pub extra_sync_log: Option<PolicySyncLog>,
    /// Policy change to the first connection that reflects it, ms: the first refused after a
    /// deny, the first connected after an allow.
    pub deny_ms: Vec<f64>,
    pub allow_ms: Vec<f64>,
    /// Connections with the old outcome started after the first with the new one, over all
    /// changes (0 when every change was clean).
    pub change_stragglers: usize,
    /// The change prober: a new connection every `probe_interval_ms`, each given
    /// `probe_timeout_ms`.
    pub probe_interval_ms: f64,
    pub probe_timeout_ms: f64,
    /// Why the section (or a part of it) has no figures.
    pub skipped: Option<String>,
}

impl PolicyReport {
    fn cell(&self, v: Variant) -> Option<&PolicyCell> {
        self.cells
            .iter()
            .find(|c| c.variant == v && !c.samples.is_empty())
    }

    fn stat(&self, v: Variant, f: &dyn Fn(&PolicySample) -> Option<f64>) -> Option<Stat> {
        Stat::of(
            &self
                .cell(v)?
                .samples
                .iter()
                .filter_map(f)
                .collect::<Vec<_>>(),
        )
    }

    /// The section of `results.md`.
    #[must_use]
    pub fn markdown(&self) -> String {
        type Figure = (&'static str, fn(&PolicySample) -> Option<f64>);
        let figures: [Figure; 6] = [
            ("rr (req/s)", |s| Some(s.rr_rate)),
            ("crr (conn/s)", |s| Some(s.crr_rate)),
            ("rr p50 (µs)", |s| Some(s.rr_p50_us)),
            ("rr p99 (µs)", |s| Some(s.rr_p99_us)),
            ("from_pod (ns/run)", |s| {
                s.prog_ns.get("from_pod").map(|(_, ns)| *ns)
            }),
            ("to_pod (ns/run)", |s| {
                s.prog_ns.get("to_pod").map(|(_, ns)| *ns)
            }),
        ];
        let mut out = String::new();
        let _ = writeln!(
            out,
            "## NetworkPolicy enforcement, per packet ({} service, ferrovia socket-level path)\n",
            self.services
        );
        let _ = write!(out, "| variant |");
        for (title, _) in &figures {
            let _ = write!(out, " {title} |");
        }
        let _ = writeln!(out, "\n|---|{}", "---|".repeat(figures.len()));
        for v in Variant::ALL {
            let _ = write!(out, "| {} |", v.label(self.extra_policies));
            for (title, f) in &figures {
                // ns in full: `1.0k` hides the differences this table is about.
                let show = |x: f64| {
                    if title.ends_with("(ns/run)") {
                        format!("{x:.0}")
                    } else {
                        fmt(x)
                    }
                };
                match self.stat(v, f) {
                    Some(s) => {
                        let _ =
                            write!(out, " {} [{}–{}]", show(s.median), show(s.min), show(s.max));
                        if v != Variant::Off
                            && let Some(off) = self.stat(Variant::Off, f).filter(|o| o.median > 0.0)
                        {
                            let _ = write!(out, " {:.2}×off", s.median / off.median);
                        }
                        let _ = write!(out, " |");
                    }
                    None => {
                        let _ = write!(out, " — |");
                    }
                }
            }
            let _ = writeln!(out);
        }
        self.cost_method(&mut out);
        self.control_plane(&mut out);
        self.changes(&mut out);
        if let Some(why) = &self.skipped {
            let _ = writeln!(out, "NetworkPolicy section incomplete: {why}\n");
        }
        out
    }

    fn cost_method(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\n{} repetition{}, the four variants measured one after the other in each, on one node: the client's \
             rr and crr load to the probed VIP as in the tables above; median [min–max]; ×off is the median over \
             the median with enforcement off — for ns/run, the per-packet cost of policy as a ratio on/off. \
             `off` is the agent's `--network-policy=false` (the programs still read the policy switch); \
             `isolating`: the backends accept only the client's label on the target port, the client may only \
             reach the backends on it; the {} extra policies (a quarter each) select no pod, select the \
             backends allowing one outside address (`ipBlock` /32) or the client on another port, or select the \
             client allowing egress to one outside address — none matches the measured traffic.\n",
            self.repetitions,
            if self.repetitions == 1 { "" } else { "s" },
            thousands(self.extra_policies)
        );
        let ns = |v, p: &'static str| {
            self.stat(v, &|s: &PolicySample| s.prog_ns.get(p).map(|(_, ns)| *ns))
                .map(|s| s.median)
        };
        let growth = |p| Some(ns(Variant::OnIsolatingExtra, p)? / ns(Variant::OnIsolating, p)?);
        if let (Some(from), Some(to)) = (growth("from_pod"), growth("to_pod")) {
            let _ = writeln!(
                out,
                "Per packet, the {} extra policies cost {from:.2}× (`from_pod`) and {to:.2}× (`to_pod`) the \
                 ns/run of the isolating pair alone (by design a packet makes the same map lookups whatever \
                 the number of policies: they only add entries to the tries a new flow looks up).\n",
                thousands(self.extra_policies)
            );
        }
    }

    fn control_plane(&self, out: &mut String) {
        if let Some(apply) = Stat::of(&self.extra_apply_ms) {
            let _ = write!(
                out,
                "Control plane, {} extra policies: applied in {:.0} ms [{:.0}–{:.0}] (manifest renamed → `ferrovia sync` \
                 returns with the maps written",
                thousands(self.extra_policies),
                apply.median,
                apply.min,
                apply.max
            );
            if let Some(log) = &self.extra_sync_log {
                let _ = write!(
                    out,
                    "; the agent logged `policies={} isolated_pods={} entries_written={}`",
                    log.policies, log.isolated_pods, log.entries_written
                );
            }
            let _ = write!(out, ")");
            if let (Some(with), Some(without)) = (
                Stat::of(&self.resync_extra_ms),
                Stat::of(&self.resync_isolating_ms),
            ) {
                let _ = write!(
                    out,
                    "; a sync with nothing changed (re-read, compile, compare) takes {:.0} ms [{:.0}–{:.0}] with them \
                     and {:.0} ms [{:.0}–{:.0}] with the isolating pair alone (both include starting the `ferrovia` CLI)",
                    with.median, with.min, with.max, without.median, without.min, without.max
                );
            }
            let _ = writeln!(out, ".\n");
        }
    }

    fn changes(&self, out: &mut String) {
        if !self.deny_ms.is_empty() || !self.allow_ms.is_empty() {
            let _ = writeln!(
                out,
                "## NetworkPolicy change to data path (ferrovia)\n\n| change | count | p50 (ms) | p99 (ms) | max (ms) |\n|---|---:|---:|---:|---:|"
            );
            let all: Vec<f64> = self.deny_ms.iter().chain(&self.allow_ms).copied().collect();
            for (what, v) in [
                ("deny the client → first connection dropped", &self.deny_ms),
                (
                    "allow the client → first connection through",
                    &self.allow_ms,
                ),
                ("all", &all),
            ] {
                let p = |q| percentile(v, q).map_or("—".into(), |x| format!("{x:.1}"));
                let _ = writeln!(
                    out,
                    "| {what} | {} | {} | {} | {} |",
                    v.len(),
                    p(50.0),
                    p(99.0),
                    p(100.0)
                );
            }
            let _ = writeln!(
                out,
                "\nThe backends' policy is rewritten to deny the client, then to allow it again (the manifest \
                 renamed in place, picked up by the agent's file watcher, which waits for 10 ms of quiet), {} \
                 times, while the client starts a new TCP connection to a backend's pod IP every {:.0} ms, each \
                 given {:.0} ms to connect: a denied SYN is dropped silently, so a denial shows as a connect \
                 timeout. The latency is from the rename to the start of the first connection with the new \
                 outcome. {}\n",
                all.len(),
                self.probe_interval_ms,
                self.probe_timeout_ms,
                if self.change_stragglers == 0 {
                    "No connection started after that one had the old outcome.".to_owned()
                } else {
                    format!(
                        "{} connections started after that one still had the old outcome (a busy machine can \
                         time a connection out without any policy).",
                        self.change_stragglers
                    )
                }
            );
        }
    }
}

/// `1000` as `1,000`.
#[must_use]
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn policy_synced_line() {
        let log = "2026-01-01T00:00:00.000001Z  INFO ferrovia_agent::node: policy synced policies=2 isolated_pods=11 classes_added=2 classes_removed=0 endpoints_changed=11 entries_written=40 epoch=3\n\
                   2026-01-01T00:00:01.000001Z  INFO ferrovia_agent::node: policy synced policies=752 isolated_pods=11 classes_added=2 classes_removed=2 endpoints_changed=11 entries_written=1290 epoch=4\n\
                   2026-01-01T00:00:01.000002Z  INFO ferrovia_agent::node: maps synced added=0";
        assert_eq!(
            PolicySyncLog::last(log),
            Some(PolicySyncLog {
                policies: 752,
                isolated_pods: 11,
                entries_written: 1290
            })
        );
        assert_eq!(PolicySyncLog::last("nothing"), None);
        // `policies=` is not found inside another key.
        assert_eq!(field("x not_policies=5 policies=7", "policies"), Some(7));
    }

    #[test]
    fn table_has_ratios_to_off() {
        let sample = |crr: f64, from_pod: f64| PolicySample {
            rr_rate: 100.0,
            crr_rate: crr,
            prog_ns: [
                ("from_pod".to_owned(), (10, from_pod)),
                ("to_pod".to_owned(), (10, 400.0)),
            ]
            .into(),
            ..PolicySample::default()
        };
        let r = PolicyReport {
            services: 1,
            repetitions: 2,
            extra_policies: 1000,
            cells: vec![
                PolicyCell {
                    variant: Variant::Off,
                    samples: vec![sample(1000.0, 500.0), sample(1200.0, 500.0)],
                },
                PolicyCell {
                    variant: Variant::OnIsolating,
                    samples: vec![sample(1000.0, 580.0)],
                },
                PolicyCell {
                    variant: Variant::OnIsolatingExtra,
                    samples: vec![sample(990.0, 600.0), sample(1000.0, 600.0)],
                },
            ],
            deny_ms: vec![20.0, 30.0],
            allow_ms: vec![25.0],
            ..PolicyReport::default()
        };
        let md = r.markdown();
        assert!(
            md.contains(
                "| on, isolating + 1,000 extra | 100 [100–100] 1.00×off | 995 [990–1.0k] 0.90×off |"
            ),
            "{md}"
        );
        assert!(md.contains("| 600 [600–600] 1.20×off |"), "{md}");
        assert!(md.contains("| on, no policies | — |"), "{md}");
        assert!(
            md.contains("cost 1.03× (`from_pod`) and 1.00× (`to_pod`) the ns/run"),
            "{md}"
        );
        assert!(md.contains("| all | 3 | 25.0 | 30.0 | 30.0 |"), "{md}");
    }
}
