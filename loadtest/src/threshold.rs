//! Pass/fail rules such as `p99<50ms`, `errors=0` or `rate>=1000`.
//!
//! Latency metrics (`p50`, `p90`, `p99`, `p999`, `max`, `mean`) and `rate` refer to the
//! scenario's headline figure: for `messages`, delivery latency and deliveries per second of
//! the first steady-state phase (the `--rate` one); for `connections`, connect + handshake
//! latency and handshakes per second. `errors` counts errors of every kind in the whole run.

use anyhow::{Result, bail};
use serde::Serialize;

use crate::cli::parse_duration;

/// What a rule measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Metric {
    P50,
    P90,
    P99,
    P999,
    Max,
    Mean,
    Errors,
    Rate,
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Op {
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "=")]
    Eq,
}

/// One rule: `metric op value` (latency values in milliseconds once parsed).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Threshold {
    /// The rule as written.
    pub(crate) rule: String,
    metric: Metric,
    op: Op,
    value: f64,
}

/// The figures rules are checked against.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Figures {
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
    pub(crate) errors: f64,
    pub(crate) rate: f64,
}

/// A rule's outcome.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Verdict {
    /// The rule as written.
    pub(crate) rule: String,
    /// The measured value (ms for latency).
    pub(crate) measured: f64,
    /// Whether it held.
    pub(crate) passed: bool,
}

impl Threshold {
    /// Parses `p99<50ms`, `max<=1s`, `errors=0`, `rate>=1000`.
    pub(crate) fn parse(rule: &str) -> Result<Self> {
        let rule = rule.trim();
        let ops = [
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("<", Op::Lt),
            (">", Op::Gt),
            ("==", Op::Eq),
            ("=", Op::Eq),
        ];
        let Some((at, text, op)) = ops
            .iter()
            .filter_map(|(text, op)| rule.find(text).map(|at| (at, *text, *op)))
            .min_by_key(|(at, text, _)| (*at, std::cmp::Reverse(text.len())))
        else {
            bail!("threshold {rule:?}: expected METRIC<VALUE, e.g. p99<50ms");
        };
        let (name, value) = (rule[..at].trim(), rule[at + text.len()..].trim());
        let metric = match name.to_ascii_lowercase().as_str() {
            "p50" => Metric::P50,
            "p90" => Metric::P90,
            "p99" => Metric::P99,
            "p999" | "p99.9" => Metric::P999,
            "max" => Metric::Max,
            "mean" => Metric::Mean,
            "errors" => Metric::Errors,
            "rate" => Metric::Rate,
            other => bail!(
                "threshold {rule:?}: unknown metric {other:?} \
                 (p50, p90, p99, p999, max, mean, errors, rate)"
            ),
        };
        let value = match metric {
            Metric::Errors | Metric::Rate => value
                .parse::<f64>()
                .map_err(|_| anyhow::anyhow!("threshold {rule:?}: {value:?} is not a number"))?,
            _ => parse_duration(value)?.as_secs_f64() * 1000.0,
        };
        Ok(Self {
            rule: rule.to_owned(),
            metric,
            op,
            value,
        })
    }

    /// Checks the rule against `f`.
    pub(crate) fn check(&self, f: &Figures) -> Verdict {
        let measured = match self.metric {
            Metric::P50 => f.p50,
            Metric::P90 => f.p90,
            Metric::P99 => f.p99,
            Metric::P999 => f.p999,
            Metric::Max => f.max,
            Metric::Mean => f.mean,
            Metric::Errors => f.errors,
            Metric::Rate => f.rate,
        };
        let passed = match self.op {
            Op::Lt => measured < self.value,
            Op::Le => measured <= self.value,
            Op::Gt => measured > self.value,
            Op::Ge => measured >= self.value,
            Op::Eq => (measured - self.value).abs() < f64::EPSILON,
        };
        Verdict {
            rule: self.rule.clone(),
            measured,
            passed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_check() -> Result<()> {
        let f = Figures {
            p99: 42.0,
            errors: 0.0,
            rate: 900.0,
            ..Figures::default()
        };
        assert!(Threshold::parse("p99<50ms")?.check(&f).passed);
        assert!(!Threshold::parse("p99<40ms")?.check(&f).passed);
        assert!(Threshold::parse("p99 <= 1s")?.check(&f).passed);
        assert!(Threshold::parse("errors=0")?.check(&f).passed);
        assert!(!Threshold::parse("rate>=1000")?.check(&f).passed);
        assert!(Threshold::parse("rate>500")?.check(&f).passed);
        assert!(Threshold::parse("p42<1ms").is_err());
        assert!(Threshold::parse("p99").is_err());
        assert!(Threshold::parse("errors<many").is_err());
        Ok(())
    }
}
