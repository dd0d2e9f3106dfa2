//! Running the policy section on a [`BenchCluster`]: the variants' rr/crr runs interleaved
//! repetition by repetition, the control plane's cost of the extra policies, and the change
//! latency. See the module docs of [`crate::policy`].
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrovia_tests::ProbeSpec;

use super::manifests::{self, extra, isolating};
use super::{PolicyCell, PolicyReport, PolicySample, PolicySyncLog, Variant};
use crate::cluster::{BenchCluster, PROBE_PORT, PROBE_VIP, TARGET_PORT, prog_delta};
use crate::load::rr_and_crr;
use crate::probe::{ConnectProbe, first_outcome};

/// The section's manifest files, beside the services' (`# none` when unused: an empty
/// manifest is valid, and a file that always exists can always be renamed over).
const PODS: &str = "policy-pods.yaml";
const POLICIES: &str = "policies.yaml";
const EXTRA: &str = "policies-extra.yaml";
const NONE: &str = "# none\n";

/// How the section runs.
#[derive(Clone, Debug)]
pub struct PolicyOpts {
    /// Repetitions of each variant.
    pub reps: usize,
    /// Measured window of each load run.
    pub window: Duration,
    /// Concurrent connections of the load generator.
    pub conns: u32,
    /// Extra policies of [`Variant::OnIsolatingExtra`].
    pub extra: usize,
    /// Policy changes to time (alternately deny, allow).
    pub changes: usize,
    /// The change prober's interval and per-connection timeout.
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
}

/// Services programmed for the section: the probed one (and the bench's iperf one).
const SERVICES: usize = 1;

/// No-op syncs timed per repetition with and without the extra policies.
const RESYNCS: usize = 3;

/// Runs the section. Figures gathered before a failure are kept: the failure is recorded in
/// `skipped` and the cluster is left with enforcement on and no policy.
pub fn run(cluster: &mut BenchCluster, opts: &PolicyOpts) -> PolicyReport {
    let mut report = PolicyReport {
        services: SERVICES,
        repetitions: opts.reps,
        extra_policies: opts.extra,
        cells: Variant::ALL
            .iter()
            .map(|&variant| PolicyCell {
                variant,
                samples: Vec::new(),
            })
            .collect(),
        probe_interval_ms: opts.probe_interval.as_secs_f64() * 1e3,
        probe_timeout_ms: opts.probe_timeout.as_secs_f64() * 1e3,
        ..PolicyReport::default()
    };
    let mut section = Section {
        cluster,
        opts,
        current: None,
        written: HashMap::new(),
    };
    let outcome = section
        .variants(&mut report)
        .context("per-packet cost")
        .and_then(|()| section.changes(&mut report).context("change latency"));
    if let Err(e) = outcome {
        println!("policy: {e:#}");
        report.skipped = Some(format!("{e:#}"));
    }
    if let Err(e) = section.clean_up() {
        println!("policy: cleaning up: {e:#}");
    }
    report
}

struct Section<'a> {
    cluster: &'a mut BenchCluster,
    opts: &'a PolicyOpts,
    /// The variant in force, `None` before the first.
    current: Option<Variant>,
    /// What the section's manifest files hold.
    written: HashMap<&'static str, String>,
}

impl Section<'_> {
    /// Writes a manifest file unless it already holds `yaml`: every write wakes the agent's
    /// file watcher, whose reload would overlap the syncs being timed.
    fn write(&mut self, file: &'static str, yaml: &str) -> Result<()> {
        if self.written.get(file).is_some_and(|w| w == yaml) {
            return Ok(());
        }
        self.cluster.node.write_manifest(file, yaml)?;
        self.written.insert(file, yaml.to_owned());
        Ok(())
    }

    fn vip() -> SocketAddr {
        SocketAddr::from((PROBE_VIP, PROBE_PORT))
    }

    /// Every repetition measures every variant once, in [`Variant::ALL`]'s order.
    fn variants(&mut self, report: &mut PolicyReport) -> Result<()> {
        let backends: Vec<&str> = self
            .cluster
            .backends
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        self.write(PODS, &manifests::pods(&backends, &self.cluster.client.name))?;
        for rep in 0..self.opts.reps {
            for (i, variant) in Variant::ALL.into_iter().enumerate() {
                let started = Instant::now();
                print!(
                    "policy rep {}/{} {:<32} ",
                    rep + 1,
                    self.opts.reps,
                    variant.label(self.opts.extra)
                );
                self.enter(variant, report)?;
                self.resyncs(variant, report)?;
                self.cluster.wait_served(Self::vip())?;
                if rep == 0 {
                    self.check_isolation(variant)?;
                }
                let sample = self.measure()?;
                let ns = |p: &str| sample.prog_ns.get(p).map_or(0.0, |(_, ns)| *ns);
                println!(
                    "rr {:>8.0}/s  crr {:>7.0}/s  p50 {:>5.0}µs p99 {:>6.0}µs  from_pod {:>4.0} ns  to_pod {:>4.0} ns  ({:.0} s)",
                    sample.rr_rate,
                    sample.crr_rate,
                    sample.rr_p50_us,
                    sample.rr_p99_us,
                    ns("from_pod"),
                    ns("to_pod"),
                    started.elapsed().as_secs_f64()
                );
                report.cells[i].samples.push(sample);
            }
        }
        Ok(())
    }

    /// Puts `variant` in force: restarting the agent when enforcement switches on or off,
    /// else rewriting the policy manifests and syncing.
    fn enter(&mut self, variant: Variant, report: &mut PolicyReport) -> Result<()> {
        let (policies, extras) = match variant {
            Variant::Off | Variant::OnNoPolicies => (NONE.to_owned(), NONE.to_owned()),
            Variant::OnIsolating => (isolating(TARGET_PORT, false), NONE.to_owned()),
            Variant::OnIsolatingExtra => (
                isolating(TARGET_PORT, false),
                extra(self.opts.extra, TARGET_PORT),
            ),
        };
        let was_on = self.current.is_some_and(|v| v != Variant::Off);
        let on = variant != Variant::Off;
        self.write(POLICIES, &policies)?;
        if was_on && on {
            let started = Instant::now();
            self.write(EXTRA, &extras)?;
            self.cluster.sync()?;
            let took = started.elapsed();
            if variant == Variant::OnIsolatingExtra {
                report.extra_apply_ms.push(took.as_secs_f64() * 1e3);
                let log = self.cluster.agent().map(ferrovia_tests::Agent::log);
                report.extra_sync_log = log.as_deref().and_then(PolicySyncLog::last);
            }
        } else {
            self.write(EXTRA, &extras)?;
            let args = if on {
                Vec::new()
            } else {
                vec!["--network-policy=false".to_owned()]
            };
            self.cluster.ferrovia(true, SERVICES, &args)?;
        }
        self.current = Some(variant);
        Ok(())
    }

    /// Times syncs that change nothing (the agent re-reads and compiles every manifest and
    /// finds the maps up to date), with the isolating policies and with the extras.
    fn resyncs(&self, variant: Variant, report: &mut PolicyReport) -> Result<()> {
        let into = match variant {
            Variant::OnIsolating => &mut report.resync_isolating_ms,
            Variant::OnIsolatingExtra => &mut report.resync_extra_ms,
            Variant::Off | Variant::OnNoPolicies => return Ok(()),
        };
        // Past the file watcher's own reload of what was just written (at most 200 ms after
        // the write), so it does not overlap the timed syncs.
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..RESYNCS {
            let started = Instant::now();
            self.cluster.sync()?;
            into.push(started.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    }

    /// A backend reaching another backend on the target port: refused under the isolating
    /// policies, served otherwise — else the variant is not what it claims to be.
    fn check_isolation(&self, variant: Variant) -> Result<()> {
        let [from, to, ..] = &self.cluster.backends[..] else {
            bail!("the isolation check needs two backends");
        };
        let r =
            from.probe(&ProbeSpec::tcp((to.ip, TARGET_PORT)).timeout(Duration::from_millis(300)))?;
        let served = r.iter().all(|r| r.ok);
        if served == variant.isolating() {
            bail!(
                "{}: {} → {}:{TARGET_PORT} {} ({r:?})",
                variant.label(self.opts.extra),
                from.name,
                to.name,
                if served {
                    "served, not isolated"
                } else {
                    "refused"
                }
            );
        }
        Ok(())
    }

    /// One repetition: the rr and crr runs, with the programs' run time over them.
    fn measure(&self) -> Result<PolicySample> {
        let before = self.cluster.prog_stats()?;
        let (rr, crr) = rr_and_crr(
            &self.cluster.client.place(),
            &[Self::vip()],
            self.opts.conns,
            self.opts.window,
        )?;
        Ok(PolicySample {
            rr_rate: rr.rate_per_s,
            rr_p50_us: rr.p50_us as f64,
            rr_p99_us: rr.p99_us as f64,
            crr_rate: crr.rate_per_s,
            prog_ns: prog_delta(&before, &self.cluster.prog_stats()?),
        })
    }

    /// Alternates the backends' policy between denying and allowing the client, timing each
    /// change to the first connection that reflects it.
    fn changes(&mut self, report: &mut PolicyReport) -> Result<()> {
        if self.opts.changes == 0 {
            return Ok(());
        }
        print!("policy changes ×{} ", self.opts.changes);
        let started = Instant::now();
        self.enter(Variant::OnIsolating, report)?;
        let to = SocketAddr::from((self.cluster.backends[1].ip, TARGET_PORT));
        let probe = ConnectProbe::start(
            Path::new(&self.cluster.client.netns_path()),
            to,
            self.opts.probe_interval,
            self.opts.probe_timeout,
        )?;
        // Steady first: the allowed connections go through.
        wait_for(&probe, Instant::now(), true, 20)?;
        for i in 0..self.opts.changes {
            let deny = i % 2 == 0;
            let since = Instant::now();
            self.write(POLICIES, &isolating(TARGET_PORT, deny))?;
            wait_for(&probe, since, !deny, 1)
                .with_context(|| format!("change {i} ({})", if deny { "deny" } else { "allow" }))?;
            // Every connection started before the one seen has its outcome by now.
            std::thread::sleep(self.opts.probe_timeout + Duration::from_millis(20));
            let (took, stragglers) = first_outcome(&probe.attempts(), since, !deny)
                .context("the change's first outcome vanished")?;
            report.change_stragglers += stragglers;
            let ms = took.as_secs_f64() * 1e3;
            if deny {
                report.deny_ms.push(ms);
            } else {
                report.allow_ms.push(ms);
            }
        }
        probe.stop()?;
        let all: Vec<f64> = report
            .deny_ms
            .iter()
            .chain(&report.allow_ms)
            .copied()
            .collect();
        println!(
            "p50 {:.1} ms  max {:.1} ms  ({:.0} s)",
            crate::report::percentile(&all, 50.0).unwrap_or(0.0),
            crate::report::percentile(&all, 100.0).unwrap_or(0.0),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Enforcement on, no policy, the section's manifests gone (as the other paths expect).
    fn clean_up(&mut self) -> Result<()> {
        for file in [POLICIES, EXTRA, PODS] {
            if self.written.remove(file).is_some() {
                self.cluster.node.remove_manifest(file)?;
            }
        }
        if self.current == Some(Variant::Off) {
            self.cluster.ferrovia(true, SERVICES, &[])?;
        } else if self.current.is_some() {
            self.cluster.sync()?;
        }
        Ok(())
    }
}

/// Waits (up to 10 s) until `n` attempts started at or after `since` had outcome `ok`.
fn wait_for(probe: &ConnectProbe, since: Instant, ok: bool, n: usize) -> Result<()> {
    let deadline = since + Duration::from_secs(10);
    loop {
        let seen = probe
            .attempts()
            .iter()
            .filter(|a| a.started >= since && a.ok == ok)
            .count();
        if seen >= n {
            return Ok(());
        }
        if probe.failed() || Instant::now() > deadline {
            let last: Vec<bool> = probe
                .attempts()
                .iter()
                .rev()
                .take(10)
                .map(|a| a.ok)
                .collect();
            bail!(
                "no connection {} within 10 s (prober {}; last outcomes, newest first: {last:?})",
                if ok { "through" } else { "dropped" },
                if probe.failed() { "ended" } else { "running" }
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
