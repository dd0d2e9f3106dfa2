//! Results of a benchmark run: raw samples, medians with min–max, ratios to the direct path
//! and to the iptables layout at the same scale, as JSON, a markdown table and PNG plots.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::cluster::{Path4, Programmed};

/// One repetition of the data-path measurements.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    /// Requests/s over persistent connections.
    pub rr_rate: f64,
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
    /// New connections/s (connect, one request, close).
    pub crr_rate: f64,
    /// One bulk TCP stream, Gbit/s.
    pub gbps: f64,
}

/// One data path at one scale.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    pub path: Path4,
    pub services: usize,
    pub programmed: Programmed,
    pub samples: Vec<Sample>,
    /// ferrovia: mean run time of each BPF program over the measurements, ns per run
    /// (`kernel.bpf_stats_enabled`), with its run count.
    #[serde(default)]
    pub prog_ns: std::collections::BTreeMap<String, (u64, f64)>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub machine: String,
    pub repetitions: usize,
    pub window_s: f64,
    pub conns: u32,
    pub cells: Vec<Cell>,
    /// ferrovia: `EndpointSlice` change to the first new connection on the new backend, ms.
    pub endpoint_change_ms: Vec<f64>,
    pub endpoint_change_services: usize,
    /// The `NetworkPolicy` section (absent from runs before it existed, or with `--policy=false`).
    #[serde(default)]
    pub policy: Option<crate::policy::PolicyReport>,
}

/// Median and range of a figure.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    #[must_use]
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            f64::midpoint(v[v.len() / 2 - 1], v[v.len() / 2])
        };
        Some(Self {
            median,
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

/// Percentile (nearest rank) of `values`.
#[must_use]
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

impl Cell {
    fn stat(&self, f: impl Fn(&Sample) -> f64) -> Option<Stat> {
        Stat::of(&self.samples.iter().map(f).collect::<Vec<_>>())
    }
}

impl Report {
    fn cell(&self, path: Path4, services: usize) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.path == path && c.services == services)
    }

    fn scales(&self) -> Vec<usize> {
        let mut s: Vec<usize> = self.cells.iter().map(|c| c.services).collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// The median of `f` for `path` at `services`, if measured.
    fn median(&self, path: Path4, services: usize, f: &dyn Fn(&Sample) -> f64) -> Option<f64> {
        self.cell(path, services)?.stat(f).map(|s| s.median)
    }

    /// The markdown report.
    #[must_use]
    #[allow(clippy::too_many_lines)] // one linear report, section after section
    pub fn markdown(&self) -> String {
        type Figure = (&'static str, &'static str, fn(&Sample) -> f64, bool);
        let mut out = String::new();
        let _ = writeln!(out, "# ferrovia benchmark\n\n{}\n", self.machine);
        let _ = writeln!(
            out,
            "{} repetitions of {:.1} s windows, {} concurrent connections; median [min–max]; \
             ratios are medians over the direct path (×direct) and over kube-proxy's iptables \
             layout through iptables-nft (×ipt-nft) and iptables-legacy (×ipt-legacy) at the same \
             number of services. iptables-legacy is measured on a fresh node after the others \
             (its hooks cannot be removed from a namespace).\n",
            self.repetitions, self.window_s, self.conns
        );
        let figures: [Figure; 5] = [
            (
                "Request/response over persistent connections",
                "req/s",
                |s| s.rr_rate,
                true,
            ),
            (
                "New connections (connect, 1 request, close)",
                "conn/s",
                |s| s.crr_rate,
                true,
            ),
            ("Request/response latency p50", "µs", |s| s.rr_p50_us, false),
            ("Request/response latency p99", "µs", |s| s.rr_p99_us, false),
            ("One bulk TCP stream (iperf3)", "Gbit/s", |s| s.gbps, true),
        ];
        for (title, unit, f, ratios) in figures {
            let _ = writeln!(out, "## {title} ({unit})\n");
            let _ = write!(out, "| services |");
            for p in Path4::ALL {
                let _ = write!(out, " {} |", p.name());
            }
            let _ = writeln!(out);
            let _ = writeln!(out, "|---:|{}", "---|".repeat(Path4::ALL.len()));
            for n in self.scales() {
                let _ = write!(out, "| {n} |");
                for p in Path4::ALL {
                    match self.cell(p, n) {
                        Some(c) if c.programmed.skipped.is_some() => {
                            let _ = write!(
                                out,
                                " — ({}) |",
                                c.programmed.skipped.as_deref().unwrap_or_default()
                            );
                        }
                        Some(c) => match c.stat(f) {
                            Some(s) => {
                                let _ = write!(
                                    out,
                                    " {} [{}–{}]",
                                    fmt(s.median),
                                    fmt(s.min),
                                    fmt(s.max)
                                );
                                if ratios {
                                    for (label, base) in [
                                        ("direct", Path4::Direct),
                                        ("ipt-nft", Path4::IptablesNft),
                                        ("ipt-legacy", Path4::IptablesLegacy),
                                    ] {
                                        if p != base
                                            && let Some(b) =
                                                self.median(base, n, &f).filter(|b| *b > 0.0)
                                        {
                                            let _ = write!(out, " {:.2}×{label}", s.median / b);
                                        }
                                    }
                                }
                                let _ = write!(out, " |");
                            }
                            None => {
                                let _ = write!(out, " — |");
                            }
                        },
                        None => {
                            let _ = write!(out, " — |");
                        }
                    }
                }
                let _ = writeln!(out);
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out, "## Control plane\n");
        let _ = writeln!(
            out,
            "| services | path | program (s) | agent start to ready (s) | agent RSS (MiB) | BPF maps (MiB) |\n|---:|---|---:|---:|---:|---:|"
        );
        for n in self.scales() {
            for p in Path4::ALL.into_iter().filter(|p| *p != Path4::Direct) {
                if let Some(c) = self.cell(p, n) {
                    let g = &c.programmed;
                    let mib = |b: Option<u64>| {
                        b.map_or("—".into(), |b| format!("{:.1}", b as f64 / 1_048_576.0))
                    };
                    let secs = |s: Option<f64>| s.map_or("—".into(), |s| format!("{s:.3}"));
                    let _ = writeln!(
                        out,
                        "| {n} | {} | {} | {} | {} | {} |",
                        p.name(),
                        g.skipped
                            .as_ref()
                            .map_or_else(|| secs(g.program_s), |why| format!("— ({why})")),
                        secs(g.startup_s),
                        mib(g.agent_rss_bytes),
                        mib(g.map_bytes)
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "\n\"program\" is `iptables-restore` / `nft -f` wall time for the baselines, and for ferrovia its first \
             sync (the pure model plus every map write, from its log); \"start to ready\" adds loading and verifying \
             the BPF programs and parsing the manifests.\n"
        );
        let profiled: Vec<&Cell> = self
            .cells
            .iter()
            .filter(|c| !c.prog_ns.is_empty())
            .collect();
        if !profiled.is_empty() {
            let _ = writeln!(
                out,
                "## BPF program cost (ns per run, `kernel.bpf_stats_enabled`)\n\n| services | path | program | runs | ns/run |\n|---:|---|---|---:|---:|"
            );
            for c in profiled {
                for (name, (runs, ns)) in &c.prog_ns {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {name} | {runs} | {ns:.0} |",
                        c.services,
                        c.path.name()
                    );
                }
            }
            let _ = writeln!(out);
        }
        if let (Some(p50), Some(p99)) = (
            percentile(&self.endpoint_change_ms, 50.0),
            percentile(&self.endpoint_change_ms, 99.0),
        ) {
            let _ = writeln!(
                out,
                "## Endpoint change to data path, {} services (ferrovia, socket-level path)\n\n\
                 {} changes: p50 {p50:.1} ms, p99 {p99:.1} ms, max {:.1} ms — from the renamed EndpointSlice file to the \
                 first new connection answered by the new backend (probes every 1 ms; includes the file watcher's \
                 10 ms quiet period).\n",
                self.endpoint_change_services,
                self.endpoint_change_ms.len(),
                percentile(&self.endpoint_change_ms, 100.0).unwrap_or(0.0)
            );
        }
        if let Some(policy) = &self.policy {
            out.push_str(&policy.markdown());
        }
        out
    }

    /// Writes `results.json`, `results.md` and the plots into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        crate::plot::rates(self, &dir.join("rates.png"))?;
        Ok(())
    }

    /// Medians of `f` per path, by scale, for plotting.
    #[must_use]
    pub fn series(&self, f: &dyn Fn(&Sample) -> f64) -> Vec<(Path4, Vec<(usize, f64)>)> {
        Path4::ALL
            .into_iter()
            .map(|p| {
                (
                    p,
                    self.scales()
                        .into_iter()
                        .filter_map(|n| self.median(p, n, f).map(|m| (n, m)))
                        .collect(),
                )
            })
            .filter(|(_, pts): &(Path4, Vec<(usize, f64)>)| !pts.is_empty())
            .collect()
    }
}

/// A rate or time for a table: `12.3k`, `123`, `1.23`.
pub(crate) fn fmt(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact medians of small integers
mod tests {
    use super::*;

    #[test]
    fn stats_and_percentiles() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[1.0, 2.0, 3.0, 10.0]).unwrap().median, 2.5);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn committed_results_still_load() {
        let r: Report = serde_json::from_str(include_str!("../../docs/bench/results.json"))
            .expect("docs/bench/results.json loads");
        assert!(r.policy.is_none());
        assert!(!r.markdown().contains("NetworkPolicy"));
    }

    #[test]
    fn table_has_ratios_to_both_baselines() {
        let sample = |rr: f64| Sample {
            rr_rate: rr,
            crr_rate: rr / 10.0,
            ..Sample::default()
        };
        let cell = |path, rr| Cell {
            path,
            services: 1000,
            programmed: Programmed::default(),
            samples: vec![sample(rr)],
            prog_ns: std::collections::BTreeMap::new(),
        };
        let r = Report {
            cells: vec![
                cell(Path4::Direct, 100.0),
                cell(Path4::IptablesNft, 50.0),
                cell(Path4::FerroviaSocket, 99.0),
            ],
            repetitions: 1,
            ..Report::default()
        };
        let md = r.markdown();
        assert!(md.contains("0.99×direct 1.98×ipt-nft"), "{md}");
    }
}
