//! A reader of the `OpenMetrics` text format, strict enough to fail a test on a malformed
//! `/metrics`: every sample belongs to a family declared before it by `# TYPE`, no series
//! appears twice, and the exposition ends with `# EOF`.
//!
//! See <https://github.com/OpenObservability/OpenMetrics/blob/main/specification/OpenMetrics.md>.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Family name → type (`gauge`, `counter`, `info`, ...), for every `# TYPE` line.
    pub families: BTreeMap<String, String>,
    /// The samples, in order.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The samples named `name`.
    pub fn samples_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The values of label `label` among the samples named `name`.
    #[must_use]
    pub fn label_values(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.samples_named(name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }
}

/// Suffixes a sample name may add to its family's name, by family type.
fn suffixes(ty: &str) -> &'static [&'static str] {
    match ty {
        "counter" => &["_total", "_created"],
        "info" => &["_info"],
        "histogram" | "gaugehistogram" => {
            &["_bucket", "_count", "_sum", "_created", "_gcount", "_gsum"]
        }
        "summary" => &["", "_count", "_sum", "_created"],
        "stateset" | "gauge" | "unknown" => &[""],
        _ => &[],
    }
}

/// Parses `text`, failing on the first line that breaks the rules above.
pub fn parse(text: &str) -> Result<Exposition> {
    let Some(body) = text.strip_suffix("# EOF\n") else {
        bail!("does not end with \"# EOF\\n\"");
    };
    let mut out = Exposition::default();
    let mut seen = BTreeSet::new();
    for (n, line) in body.lines().enumerate() {
        let n = n + 1;
        if let Some(meta) = line.strip_prefix("# ") {
            let mut words = meta.splitn(3, ' ');
            let (kind, family) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            match kind {
                "TYPE" => {
                    let ty = words.next().unwrap_or("");
                    if suffixes(ty).is_empty() {
                        bail!("line {n}: unknown type {ty:?}: {line:?}");
                    }
                    if out
                        .families
                        .insert(family.to_owned(), ty.to_owned())
                        .is_some()
                    {
                        bail!("line {n}: family {family} declared twice");
                    }
                }
                "HELP" | "UNIT" => {}
                "EOF" => bail!("line {n}: # EOF before the end"),
                _ => bail!("line {n}: unknown descriptor {line:?}"),
            }
            continue;
        }
        let sample = parse_sample(line).with_context(|| format!("line {n}: {line:?}"))?;
        let declared = out.families.iter().any(|(family, ty)| {
            sample
                .name
                .strip_prefix(family.as_str())
                .is_some_and(|suffix| suffixes(ty).contains(&suffix))
        });
        if !declared {
            bail!("line {n}: sample {} of no declared family", sample.name);
        }
        if !seen.insert((sample.name.clone(), sample.labels.clone())) {
            bail!(
                "line {n}: series {} {:?} repeated",
                sample.name,
                sample.labels
            );
        }
        out.samples.push(sample);
    }
    Ok(out)
}

fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line.find(['{', ' ']).context("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        bail!("bad metric name {name:?}");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"").context("a label without =\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().context("an unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().context("a dangling escape")?.1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        c => bail!("bad escape \\{c}"),
                    },
                    (_, c) => value.push(c),
                }
            };
            if labels.insert(key.to_owned(), value).is_some() {
                bail!("label {key} repeated");
            }
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let mut fields = rest
        .strip_prefix(' ')
        .context("no space before the value")?
        .split(' ');
    let value = fields.next().unwrap_or("");
    let value = value
        .parse()
        .with_context(|| format!("bad value {value:?}"))?;
    // An optional timestamp, nothing after it (exemplars are not expected here).
    if let Some(ts) = fields.next() {
        ts.parse::<f64>()
            .with_context(|| format!("bad timestamp {ts:?}"))?;
    }
    if let Some(extra) = fields.next() {
        bail!("unexpected {extra:?} after the value");
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::float_cmp)] // the values are small integers, exact in f64
    fn reads_families_samples_and_escaped_labels() {
        let text = "# HELP x_build The build.\n# TYPE x_build info\n\
                    x_build_info{version=\"1.0\"} 1\n\
                    # TYPE x_degraded gauge\n\
                    x_degraded{feature=\"a\\\"b\",other=\"c\"} 2\n\
                    x_degraded{feature=\"d\"} 1 1700000000\n# EOF\n";
        let e = parse(text).expect("parses");
        assert_eq!(e.families["x_build"], "info");
        assert_eq!(e.samples.len(), 3);
        assert_eq!(
            e.label_values("x_degraded", "feature"),
            ["a\"b".to_owned(), "d".to_owned()].into()
        );
        assert_eq!(
            e.samples_named("x_degraded").map(|s| s.value).sum::<f64>(),
            3.0
        );
    }

    #[test]
    fn rejects_what_is_not_openmetrics() {
        for (text, why) in [
            ("# TYPE a gauge\na 1\n", "no EOF"),
            ("a 1\n# EOF\n", "undeclared family"),
            (
                "# TYPE a gauge\na_total 1\n# EOF\n",
                "suffix of another type",
            ),
            (
                "# TYPE a gauge\na{x=\"1\"} 1\na{x=\"1\"} 2\n# EOF\n",
                "repeated series",
            ),
            ("# TYPE a gauge\na{x=\"1} 1\n# EOF\n", "unterminated label"),
            ("# TYPE a gauge\na one\n# EOF\n", "bad value"),
            ("# EOF\n# TYPE a gauge\n# EOF\n", "early EOF"),
        ] {
            assert!(parse(text).is_err(), "{why}: {text:?} was accepted");
        }
    }
}
