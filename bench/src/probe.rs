//! A connection prober for "change → effect" latencies: from inside a pod's network namespace
//! it starts a new TCP connection every `interval`, each bounded by a short timeout, and
//! records when each started and whether it connected.
//!
//! Unlike `ferrovia-echo probe` (one connection after the other), attempts overlap: a dropped
//! SYN (how a policy denies a TCP connection: silently) holds up only its own attempt, so the
//! prober keeps starting one every interval while the denied ones wait out their timeout. The
//! start times share the bench's clock, so they compare directly with when a manifest was
//! written. It runs on a thread of the bench itself, moved into the pod's network namespace
//! (`setns` moves only the calling thread): not in the pod's cgroup, so it must address a pod
//! IP, not a service VIP (the socket-level LB would not see its connections).
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// One connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// When `connect` was called.
    pub started: Instant,
    /// Whether it connected within the timeout.
    pub ok: bool,
}

/// A running prober; stopped on drop.
pub struct ConnectProbe {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl ConnectProbe {
    /// Starts connecting to `to` from the network namespace at `netns` every `interval`,
    /// giving each attempt `timeout`.
    pub fn start(
        netns: &Path,
        to: SocketAddr,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Self> {
        let file =
            std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, attempts) = (Arc::clone(&stop), Arc::clone(&attempts));
            std::thread::Builder::new()
                .name("connect-probe".into())
                .spawn(move || -> Result<()> {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("setns into the prober's network namespace")?;
                    // Current-thread: every socket is created on this thread, in that namespace.
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                        .block_on(run(to, interval, timeout, &stop, &attempts));
                    Ok(())
                })?
        };
        Ok(Self {
            stop,
            attempts,
            thread: Some(thread),
        })
    }

    /// The attempts finished so far, by start time.
    #[must_use]
    pub fn attempts(&self) -> Vec<Attempt> {
        let mut v = self
            .attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        v.sort_by_key(|a| a.started);
        v
    }

    /// Whether the prober thread ended early (it failed to enter the namespace).
    #[must_use]
    pub fn failed(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the prober, returning its error if it failed.
    pub fn stop(mut self) -> Result<Vec<Attempt>> {
        self.halt()?;
        Ok(self.attempts())
    }

    fn halt(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => anyhow::bail!("the connect prober panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for ConnectProbe {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

async fn run(
    to: SocketAddr,
    interval: Duration,
    timeout: Duration,
    stop: &AtomicBool,
    attempts: &Arc<Mutex<Vec<Attempt>>>,
) {
    let mut tick = tokio::time::interval(interval);
    // A late tick (a busy machine) starts one attempt, not a burst to catch up.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let attempts = Arc::clone(attempts);
        running.spawn(async move {
            let started = Instant::now();
            let ok = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(to)).await {
                Ok(Ok(conn)) => {
                    // RST on close: thousands of probes leave no TIME_WAIT behind.
                    let _ = conn.set_zero_linger();
                    true
                }
                _ => false,
            };
            attempts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Attempt { started, ok });
        });
        // Reap finished attempts so the set stays small.
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

/// When the outcome changed to `ok` after `since`: the time from `since` to the start of the
/// first attempt started at or after it with that outcome (`attempts` by start time), and how
/// many attempts started later still had the old outcome (0 when the change was clean).
#[must_use]
pub fn first_outcome(attempts: &[Attempt], since: Instant, ok: bool) -> Option<(Duration, usize)> {
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.started >= since).collect();
    let first = after.iter().position(|a| a.ok == ok)?;
    let stragglers = after[first..].iter().filter(|a| a.ok != ok).count();
    Some((after[first].started - since, stragglers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_outcome_after_a_change() {
        let t0 = Instant::now();
        let at = |ms: u64, ok: bool| Attempt {
            started: t0 + Duration::from_millis(ms),
            ok,
        };
        // Allowed until 12 ms after the change at 5 ms; one straggler at 14 ms.
        let v = vec![
            at(0, false),
            at(4, true),
            at(6, true),
            at(11, true),
            at(12, false),
            at(13, false),
            at(14, true),
            at(15, false),
        ];
        let since = t0 + Duration::from_millis(5);
        assert_eq!(
            first_outcome(&v, since, false),
            Some((Duration::from_millis(7), 1))
        );
        // Attempts before the change do not count.
        assert_eq!(first_outcome(&v[..2], since, true), None);
        assert_eq!(
            first_outcome(&v, since, true),
            Some((Duration::from_millis(1), 3))
        );
    }
}
