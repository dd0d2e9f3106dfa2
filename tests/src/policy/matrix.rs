//! Running a probe matrix and comparing it with the expected truth table, cyclonus style.
//!
//! Every client pod runs one `ferrovia-echo probe-many` for all its targets, all clients at
//! once. The first pass is short ([`FIRST_TIMEOUT`]); cells that were expected open but gave
//! no answer are probed again with each of [`RECHECK_TIMEOUTS`] before they count as wrongly
//! denied (a loaded machine may be slow, never wrong). A cell expected closed that answered is wrong
//! at once: an answer cannot be a fluke.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, anyhow};

use crate::{Pod, Proto, TargetResult};

/// Timeout of the first pass: long enough for any answer on an idle node.
pub const FIRST_TIMEOUT: Duration = Duration::from_millis(400);

/// Timeouts of the re-probes of cells expected open that did not answer in the pass before (a
/// TCP SYN retransmission is 1 s; UDP resends every 250 ms). The last is for an emulated VM on
/// a loaded machine; a cell that is really denied costs them all, once.
pub const RECHECK_TIMEOUTS: [Duration; 2] = [Duration::from_secs(3), Duration::from_secs(10)];

/// One cell: a request from a client pod to a target, and the verdict expected for it.
#[derive(Clone, Debug)]
pub struct Case {
    /// Index of the client in the pod list (and the row).
    pub client: usize,
    /// Column title: the server (`y/b`) or the service (`vip:80`).
    pub column: String,
    /// The table the cell belongs to: protocol and port on the server.
    pub table: (Proto, u16),
    /// What is dialled.
    pub to: SocketAddr,
    pub proto: Proto,
    pub expected: bool,
}

/// What a cell's probe saw.
#[derive(Clone, Debug)]
pub struct Observation {
    pub allowed: bool,
    /// The last probe's result (the re-probe's, if there was one).
    pub result: TargetResult,
    /// Whether the cell was probed again.
    pub rechecked: bool,
}

/// A probed matrix: every case with what was seen.
pub struct Outcome {
    /// Row titles, by client index.
    pub rows: Vec<String>,
    pub cases: Vec<Case>,
    pub observed: Vec<Observation>,
}

/// Probes every case (`pods[i]` is client `i`, titled `rows[i]`).
pub fn run(pods: &[&Pod], rows: Vec<String>, cases: Vec<Case>) -> Result<Outcome> {
    let all: Vec<usize> = (0..cases.len()).collect();
    let first = probe(pods, &cases, &all, FIRST_TIMEOUT)?;
    let mut observed: Vec<Observation> = first
        .into_iter()
        .map(|result| Observation {
            allowed: result.ok,
            result,
            rechecked: false,
        })
        .collect();
    for timeout in RECHECK_TIMEOUTS {
        let recheck: Vec<usize> = (0..cases.len())
            .filter(|&i| cases[i].expected && !observed[i].allowed)
            .collect();
        if recheck.is_empty() {
            break;
        }
        for (i, result) in recheck.iter().zip(probe(pods, &cases, &recheck, timeout)?) {
            observed[*i] = Observation {
                allowed: result.ok,
                result,
                rechecked: true,
            };
        }
    }
    Ok(Outcome {
        rows,
        cases,
        observed,
    })
}

/// Probes `cases[i]` for each `i` of `which`: one process per client, all in parallel.
/// Returns the results in the order of `which`.
fn probe(
    pods: &[&Pod],
    cases: &[Case],
    which: &[usize],
    timeout: Duration,
) -> Result<Vec<TargetResult>> {
    let mut by_client: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &i in which {
        by_client.entry(cases[i].client).or_default().push(i);
    }
    let mut results: BTreeMap<usize, TargetResult> = BTreeMap::new();
    std::thread::scope(|s| -> Result<()> {
        let running: Vec<_> = by_client
            .iter()
            .map(|(&client, idx)| {
                let targets: Vec<(Proto, SocketAddr)> =
                    idx.iter().map(|&i| (cases[i].proto, cases[i].to)).collect();
                let pod = pods[client];
                (idx, s.spawn(move || pod.probe_many(&targets, timeout)))
            })
            .collect();
        for (idx, handle) in running {
            let got = handle
                .join()
                .map_err(|_| anyhow!("probe thread panicked"))??;
            results.extend(idx.iter().copied().zip(got));
        }
        Ok(())
    })?;
    Ok(which
        .iter()
        .map(|i| results.remove(i).expect("every case was probed"))
        .collect())
}

/// The mark of a cell in a table.
fn mark(expected: bool, observed: bool) -> char {
    match (expected, observed) {
        (true, true) => '.',
        (false, false) => 'X',
        (true, false) => 'D',
        (false, true) => 'A',
    }
}

/// A table being drawn: its columns, and the mark of each (row, column) cell.
type Table = (Vec<String>, BTreeMap<(usize, String), char>);

/// The legend printed with tables.
pub const LEGEND: &str = "'.' allowed as expected, 'X' denied as expected, \
     'D' expected allow but observed DENY, 'A' expected deny but observed ALLOW, ' ' not probed";

impl Outcome {
    /// Indices of the cases whose observation differs from the expectation.
    #[must_use]
    pub fn mismatches(&self) -> Vec<usize> {
        (0..self.cases.len())
            .filter(|&i| self.cases[i].expected != self.observed[i].allowed)
            .collect()
    }

    /// One table per (protocol, server port): rows are clients, columns servers (then
    /// services), each cell a mark (see [`LEGEND`]).
    #[must_use]
    pub fn tables(&self) -> String {
        let mut tables: BTreeMap<(Proto, u16), Table> = BTreeMap::new();
        for (case, seen) in self.cases.iter().zip(&self.observed) {
            let (columns, cells) = tables.entry(case.table).or_default();
            if !columns.contains(&case.column) {
                columns.push(case.column.clone());
            }
            cells.insert(
                (case.client, case.column.clone()),
                mark(case.expected, seen.allowed),
            );
        }
        let row_width = self.rows.iter().map(String::len).max().unwrap_or(0);
        let mut out = String::new();
        for (columns, _) in tables.values_mut() {
            // Servers in row order (a client's own column is missing from its first row), then
            // services in the order probed.
            columns.sort_by_key(|c| self.rows.iter().position(|r| r == c).unwrap_or(usize::MAX));
        }
        for ((proto, port), (columns, cells)) in &tables {
            let _ = writeln!(out, "{proto:?}/{port}");
            let _ = write!(out, "{:row_width$}", "");
            for c in columns {
                let _ = write!(out, " {c:>3}");
            }
            out.push('\n');
            for (r, row) in self.rows.iter().enumerate() {
                let _ = write!(out, "{row:row_width$}");
                for c in columns {
                    let m = cells.get(&(r, c.clone())).copied().unwrap_or(' ');
                    let _ = write!(out, " {m:>w$}", w = c.len().max(3));
                }
                out.push('\n');
            }
        }
        out
    }

    /// Every mismatch on a line: who, what, expected, and what the probe said.
    #[must_use]
    pub fn details(&self, limit: usize) -> String {
        let wrong = self.mismatches();
        let mut out = String::new();
        for &i in wrong.iter().take(limit) {
            let (c, o) = (&self.cases[i], &self.observed[i]);
            let _ = writeln!(
                out,
                "  {} -> {} ({:?} {}): expected {}, observed {}{}",
                self.rows[c.client],
                c.column,
                c.proto,
                c.to,
                if c.expected { "allow" } else { "deny" },
                if o.allowed { "allow" } else { "deny" },
                match (&o.result.reply, &o.result.error) {
                    (Some(r), _) => format!(" (reply {r:?})"),
                    (None, Some(e)) =>
                        format!(" ({e}{})", if o.rechecked { ", re-probed" } else { "" }),
                    (None, None) => String::new(),
                }
            );
        }
        if wrong.len() > limit {
            let _ = writeln!(out, "  ... and {} more", wrong.len() - limit);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_mark_each_cell() {
        let result = |ok| TargetResult {
            proto: Proto::Tcp,
            to: "10.0.0.1:80".parse().unwrap(),
            ok,
            reply: None,
            error: None,
        };
        let case = |client, column: &str, expected| Case {
            client,
            column: column.into(),
            table: (Proto::Tcp, 80),
            to: "10.0.0.1:80".parse().unwrap(),
            proto: Proto::Tcp,
            expected,
        };
        let outcome = Outcome {
            rows: vec!["x/a".into(), "x/b".into()],
            cases: vec![
                case(0, "x/b", true),
                case(1, "x/a", false),
                case(0, "vip:80", true),
                case(1, "vip:80", false),
            ],
            observed: [true, false, false, true]
                .into_iter()
                .map(|ok| Observation {
                    allowed: ok,
                    result: result(ok),
                    rechecked: false,
                })
                .collect(),
        };
        assert_eq!(outcome.mismatches(), [2, 3]);
        assert_eq!(
            outcome.tables(),
            "Tcp/80\n    x/a x/b vip:80\nx/a       .      D\nx/b   X          A\n"
        );
    }
}
