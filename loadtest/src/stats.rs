//! What the members measure: HDR histograms (microseconds) by name, errors by kind, counters.
//! Each worker thread fills its own [`Stats`]; the controller merges them per phase.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use quicproquo_client::ClientError;
use serde::Serialize;

/// Largest value a histogram records: one hour in microseconds (larger values saturate).
const MAX_MICROS: u64 = 3_600_000_000;

/// Names of the histograms (all in microseconds).
pub(crate) mod metric {
    /// TCP connect + Noise_XX handshake (node certificate checked).
    pub(crate) const CONNECT: &str = "connect+handshake";
    /// `Bootstrap.bind`: the identity binding.
    pub(crate) const BIND: &str = "identity binding";
    /// Ping of an idle connection (connections scenario).
    pub(crate) const PING: &str = "ping idle connection";
    /// KeyPackage generation (per member).
    pub(crate) const KP_GENERATE: &str = "keypackage generation";
    /// Claim a name and upload KeyPackages.
    pub(crate) const REGISTER: &str = "register+upload";
    /// Batch KeyPackage fetch by a group's creator.
    pub(crate) const KP_FETCH: &str = "keypackage batch fetch";
    /// Building a commit (MLS, client CPU).
    pub(crate) const COMMIT_BUILD: &str = "commit build";
    /// From starting to build a commit to the server's acknowledgement.
    pub(crate) const COMMIT: &str = "commit (build+send+ack)";
    /// Fetching a Welcome from the inbox.
    pub(crate) const WELCOME_FETCH: &str = "welcome fetch";
    /// Processing a Welcome (`Group::join`, client CPU).
    pub(crate) const WELCOME_PROCESS: &str = "welcome processing";
    /// Fetch + process, and catching up to the end of the log.
    pub(crate) const JOIN: &str = "join (fetch+process+catch-up)";
    /// Processing another member's commit.
    pub(crate) const COMMIT_PROCESS: &str = "commit processing";
    /// Planned send time → a recipient has it: decrypted by the decrypting members, received
    /// by the others.
    pub(crate) const DELIVERY: &str = "delivery (planned send -> received or decrypted)";
    /// Planned send time → a decrypting member has decrypted it (a subset of [`DELIVERY`]).
    pub(crate) const DELIVERY_DECRYPTED: &str = "delivery (planned send -> decrypted)";
    /// Planned send time → the server acknowledged the append.
    pub(crate) const SEND_ACK: &str = "send ack (planned -> appended)";
    /// How late the generator issued a send after its planned time.
    pub(crate) const SEND_LAG: &str = "send issue lag";
    /// Encrypting an application message.
    pub(crate) const ENCRYPT: &str = "encrypt";
    /// Decrypting an application message.
    pub(crate) const DECRYPT: &str = "decrypt";
    /// Removed by churn → joined again from the new Welcome.
    pub(crate) const REJOIN: &str = "churn rejoin (removed -> joined)";
}

/// Names of the counters.
pub(crate) mod counter {
    /// Application messages the server acknowledged.
    pub(crate) const SENT: &str = "messages sent";
    /// Application messages a recipient received (and decrypted, if it is a decrypting one).
    pub(crate) const DELIVERED: &str = "deliveries";
    /// Deliveries to members that do not decrypt (checked by sequence number and message id).
    pub(crate) const UNDECRYPTED: &str = "deliveries received without decrypting";
    /// Deliveries expected (no churn: every message to every other member).
    pub(crate) const EXPECTED: &str = "deliveries expected";
    /// Planned sends skipped because the sender had been removed by churn.
    pub(crate) const SKIPPED: &str = "sends skipped while removed";
    /// Messages from epochs before a re-added member's join, skipped by it.
    pub(crate) const BEFORE_JOIN: &str = "messages from before a rejoin (not for the rejoiner)";
    /// Sends refused because churn had removed the sender (it had not processed that yet).
    pub(crate) const REFUSED_REMOVED: &str = "sends refused: sender removed meanwhile";
    /// Sends refused because churn moved the group on beyond the epochs members keep secrets
    /// for before the sender had processed the commits (the sender is told; nothing is lost).
    pub(crate) const REFUSED_BEHIND: &str = "sends refused: sender too many epochs behind";
    /// Churn: members in the group at the end of the drain that had processed its whole log.
    pub(crate) const CAUGHT_UP: &str = "members at the end of the log after the drain (churn)";
    /// Churn: members removed and not yet added back when the drain ended.
    pub(crate) const OUT_AT_END: &str = "members removed and not yet re-added after the drain";
    /// Subscriptions the server ended that the member opened again.
    pub(crate) const RESUBSCRIBED: &str = "subscriptions ended by the server and reopened";
    /// Members joined from a Welcome.
    pub(crate) const JOINED: &str = "joins";
    /// Churn removals and re-additions.
    pub(crate) const CHURN: &str = "churn commits";
    /// When the last connection of the connect phase was bound, µs after the phase began.
    pub(crate) const LAST_BOUND_US: &str = "last connection bound at (us into the phase)";
    /// Size of the largest commit sent (bytes).
    pub(crate) const COMMIT_BYTES: &str = "largest commit bytes";
    /// Size of the largest Welcome (bytes).
    pub(crate) const WELCOME_BYTES: &str = "largest welcome bytes";
}

/// Counters that hold a maximum rather than a sum.
const MAX_COUNTERS: [&str; 3] = [
    counter::COMMIT_BYTES,
    counter::WELCOME_BYTES,
    counter::LAST_BOUND_US,
];

/// Histograms, errors and counters of one worker (or merged).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    hist: BTreeMap<&'static str, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    counters: BTreeMap<&'static str, u64>,
}

/// A histogram of 3 significant digits over 1 µs .. 1 h (valid constant bounds: the
/// constructor's error cannot happen).
fn new_histogram() -> Option<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).ok()
}

impl Stats {
    /// Records a duration in microseconds.
    pub(crate) fn record(&mut self, name: &'static str, d: Duration) {
        self.record_micros(name, u64::try_from(d.as_micros()).unwrap_or(MAX_MICROS));
    }

    /// Records a value in microseconds.
    pub(crate) fn record_micros(&mut self, name: &'static str, micros: u64) {
        let value = micros.clamp(1, MAX_MICROS);
        if let Some(h) = self.hist.get_mut(name) {
            h.saturating_record(value);
        } else if let Some(mut h) = new_histogram() {
            h.saturating_record(value);
            self.hist.insert(name, h);
        } else {
            self.error("histogram creation");
        }
    }

    /// Counts an error of this kind.
    pub(crate) fn error(&mut self, kind: impl Into<String>) {
        self.error_times(kind, 1);
    }

    /// Counts `n` errors of this kind at once (however large `n` is, one step).
    pub(crate) fn error_times(&mut self, kind: impl Into<String>, n: u64) {
        let count = self.errors.entry(kind.into()).or_default();
        *count = count.saturating_add(n);
    }

    /// Adds to a counter.
    pub(crate) fn count(&mut self, name: &'static str, n: u64) {
        *self.counters.entry(name).or_default() += n;
    }

    /// Raises a maximum counter.
    pub(crate) fn max(&mut self, name: &'static str, n: u64) {
        let c = self.counters.entry(name).or_default();
        *c = (*c).max(n);
    }

    /// Adds everything of `other` into `self`.
    pub(crate) fn merge(&mut self, other: Self) {
        for (k, h) in other.hist {
            match self.hist.get_mut(k) {
                Some(mine) => {
                    // Same bounds everywhere: adding cannot fail; count it if it does.
                    if mine.add(&h).is_err() {
                        *self.errors.entry("histogram merge".into()).or_default() += 1;
                    }
                }
                None => {
                    self.hist.insert(k, h);
                }
            }
        }
        for (k, n) in other.errors {
            self.error_times(k, n);
        }
        for (k, n) in other.counters {
            let c = self.counters.entry(k).or_default();
            if MAX_COUNTERS.contains(&k) {
                *c = (*c).max(n);
            } else {
                *c += n;
            }
        }
    }

    /// A counter's value (0 when never counted).
    pub(crate) fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// Total errors of every kind.
    pub(crate) fn error_count(&self) -> u64 {
        self.errors
            .values()
            .fold(0, |all, n| all.saturating_add(*n))
    }

    /// The summary of a histogram, if anything was recorded in it.
    pub(crate) fn summary(&self, name: &str) -> Option<Summary> {
        self.hist.get(name).map(Summary::of)
    }

    /// Summaries of every histogram, errors and counters, for the report.
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            latency_ms: self
                .hist
                .iter()
                .map(|(k, h)| ((*k).to_owned(), Summary::of(h)))
                .collect(),
            errors: self.errors.clone(),
            counters: self
                .counters
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        }
    }
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Summary {
    /// Values recorded.
    pub(crate) count: u64,
    /// Mean.
    pub(crate) mean: f64,
    /// Median.
    pub(crate) p50: f64,
    /// 90th percentile.
    pub(crate) p90: f64,
    /// 99th percentile.
    pub(crate) p99: f64,
    /// 99.9th percentile.
    pub(crate) p999: f64,
    /// Largest value.
    pub(crate) max: f64,
}

impl Summary {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// A phase's measurements as they go into the report.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct StatsSnapshot {
    /// Histogram name → percentiles (ms).
    pub(crate) latency_ms: BTreeMap<String, Summary>,
    /// Error kind → count.
    pub(crate) errors: BTreeMap<String, u64>,
    /// Counter name → value.
    pub(crate) counters: BTreeMap<String, u64>,
}

/// A short kind for an error, without message content or secrets: what failed, not the
/// server's explanation.
pub(crate) fn error_kind(stage: &str, e: &ClientError) -> String {
    let kind = match e {
        ClientError::Connect { source, .. } => format!("connect: {:?}", source.kind()),
        ClientError::Timeout { stage, .. } => format!("timeout ({stage})"),
        ClientError::WrongClusterKey { .. } => "wrong cluster key".into(),
        ClientError::Transport { .. } => "transport".into(),
        ClientError::Rpc(e) => format!("rpc {:?}", e.kind),
        ClientError::Service { code, .. } => format!("service {code}"),
        ClientError::AllFailed(inner) => return error_kind(stage, inner),
        _ => "client".into(),
    };
    format!("{stage}: {kind}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_counted_at_once_add_up_with_single_ones() {
        let mut stats = Stats::default();
        stats.error("behind");
        stats.error_times("behind", 41);
        stats.error_times("other", u64::MAX);
        stats.error_times("other", 1);
        assert_eq!(stats.errors["behind"], 42);
        assert_eq!(stats.errors["other"], u64::MAX);
        assert_eq!(stats.error_count(), 42u64.saturating_add(u64::MAX));
    }
}
