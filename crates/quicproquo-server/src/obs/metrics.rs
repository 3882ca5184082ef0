//! The server's metrics: lock-free counters and fixed-bucket histograms, rendered in the
//! Prometheus text format on `/metrics`.
//!
//! Labels come from small closed sets only (RPC service and method names, error codes,
//! append outcomes): never a user, identity or group, so the number of series is bounded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::pool::PoolStats;

/// Upper bounds (seconds) of the latency histograms' buckets.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds of the batch-size histogram's buckets.
const SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum of observations, in millionths of the unit.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add((value.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Observations recorded so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations recorded so far (to a millionth of the unit).
    pub fn sum(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {total}", braces(labels));
    }
}

/// Calls and latency of one RPC method.
#[derive(Debug)]
struct RpcSeries {
    by_status: BTreeMap<&'static str, u64>,
    latency: Histogram,
}

/// How an append ended, as counted by `qpq_appends_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AppendResult {
    /// Appended at a new sequence number.
    Appended,
    /// A repeated message id.
    Duplicate,
    /// A commit (or proposal) for an old epoch.
    StaleEpoch,
    /// Refused: not a member, or no such group.
    Refused,
    /// The store failed.
    Failed,
}

impl AppendResult {
    fn as_str(self) -> &'static str {
        match self {
            Self::Appended => "appended",
            Self::Duplicate => "duplicate",
            Self::StaleEpoch => "stale_epoch",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }

    const ALL: [Self; 5] = [
        Self::Appended,
        Self::Duplicate,
        Self::StaleEpoch,
        Self::Refused,
        Self::Failed,
    ];
}

/// What the listener and its connections have done.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections accepted and handed to a worker.
    pub accepted: AtomicU64,
    /// Connections closed on accept because a cap was reached.
    pub refused_at_capacity: AtomicU64,
    /// Handshakes completed.
    pub handshakes_ok: AtomicU64,
    /// Handshakes that failed (bad bytes, wrong key, timeout, peer gone).
    pub handshakes_failed: AtomicU64,
    /// Connections that ended with a transport or RPC error after the handshake.
    pub connection_errors: AtomicU64,
    /// Connections closed on accept because their source address had
    /// `max_connections_per_address` open.
    pub address_connections_full: AtomicU64,
    /// Connections closed on accept because their source address had
    /// `max_handshakes_per_address` handshakes in progress.
    pub address_handshakes_full: AtomicU64,
    /// Connections closed because they did not bind an identity within `bind_timeout`.
    pub bind_timeouts: AtomicU64,
    /// Connections closed after `idle_timeout` without a call or a subscription.
    pub idle_timeouts: AtomicU64,
    /// Connections closed because they left the server's writes unread for
    /// `write_stall_timeout`.
    pub write_stalls: AtomicU64,
    /// Connections closed because they sent an RPC message the server refuses (a kind it
    /// would echo back as `unimplemented`, or an oversized or malformed message header).
    pub refused_messages: AtomicU64,
    /// Times a connection's reading paused because it had `max_calls_in_flight` calls in
    /// flight or left the server's writes unread (backpressure).
    pub throttled: Arc<AtomicU64>,
    /// Bytes the connections hold for RPC messages not yet wholly received.
    pub rpc_buffered_bytes: Arc<AtomicU64>,
}

impl ConnectionStats {
    /// Counts one event.
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        counter(
            out,
            "qpq_connections_throttled_total",
            "Times a connection's reading paused for backpressure (calls in flight at \
             max_calls_in_flight, or the server's writes unread).",
            self.throttled.load(Ordering::Relaxed),
        );
        gauge(
            out,
            "qpq_rpc_buffered_bytes",
            "Bytes held for RPC messages not yet wholly received (they grow with the bytes that \
             arrive, never with what a header announces).",
            self.rpc_buffered_bytes.load(Ordering::Relaxed),
        );
        counter(
            out,
            "qpq_connections_accepted_total",
            "TCP connections accepted and handed to a worker.",
            self.accepted.load(Ordering::Relaxed),
        );
        counter(
            out,
            "qpq_connections_refused_total",
            "Connections closed on accept because the connection or handshake cap was reached.",
            self.refused_at_capacity.load(Ordering::Relaxed),
        );
        counter(
            out,
            "qpq_connection_errors_total",
            "Connections that ended with a transport or RPC error after the handshake.",
            self.connection_errors.load(Ordering::Relaxed),
        );
        family(
            out,
            "qpq_handshakes_total",
            "counter",
            "Noise handshakes, by result (ok, failed: bad bytes, wrong key, timeout).",
        );
        let _ = writeln!(
            out,
            "qpq_handshakes_total{{result=\"ok\"}} {}\nqpq_handshakes_total{{result=\"failed\"}} {}",
            self.handshakes_ok.load(Ordering::Relaxed),
            self.handshakes_failed.load(Ordering::Relaxed)
        );
        family(
            out,
            "qpq_connections_limited_total",
            "counter",
            "Connections closed by a per-address or per-session limit, by reason \
             (address_connections, address_handshakes, bind_timeout, idle_timeout, write_stall, \
             refused_message).",
        );
        for (reason, n) in [
            ("address_connections", &self.address_connections_full),
            ("address_handshakes", &self.address_handshakes_full),
            ("bind_timeout", &self.bind_timeouts),
            ("idle_timeout", &self.idle_timeouts),
            ("write_stall", &self.write_stalls),
            ("refused_message", &self.refused_messages),
        ] {
            let _ = writeln!(
                out,
                "qpq_connections_limited_total{{reason=\"{reason}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}

/// Every metric one server process keeps: the one registry `/metrics` renders.
#[derive(Debug)]
pub struct Metrics {
    /// The listener's and connections' counters.
    pub connections: ConnectionStats,
    rpc: Mutex<BTreeMap<(&'static str, &'static str), RpcSeries>>,
    connections_open: AtomicU64,
    appends: [AtomicU64; 5],
    /// Requests per append transaction.
    pub append_batch_size: Histogram,
    /// Time of one append transaction.
    pub append_batch_seconds: Histogram,
    /// Log entries pushed to subscribers (clients, or edges watching a shard).
    pub fanout_entries: AtomicU64,
    /// Push calls made to subscribers.
    pub fanout_calls: AtomicU64,
    /// Catch-ups of subscriptions from the store (a subscriber that fell behind, missed
    /// entries, or met a commit whose membership effect was not known).
    pub catch_ups: AtomicU64,
    /// Group subscriptions reading the store now (see [`Metrics::catching_up`]).
    catching_up: AtomicU64,
    /// Subscriptions that stalled with a full window and let go of their group's live feed.
    pub feed_releases: AtomicU64,
    /// Calls an edge forwarded to an owner shard.
    pub forwarded: AtomicU64,
    /// The bounded CPU pool's counters (shared with the pool).
    pub pool: Arc<PoolStats>,
    /// Refusals by the Authentication Service's rate limits.
    pub rate_limits: Arc<super::rates::RateLimitStats>,
    /// This node's certificate and its peers'.
    pub certificates: super::certs::CertificateStats,
    /// The retention job's deletions and the stored bytes.
    pub retention: super::retention::RetentionStats,
    /// Time to verify one handshake message against its group's public view (on the pool).
    pub verify_seconds: Histogram,
    /// Group views loaded from the store (not cached), and the handshake messages replayed
    /// after their snapshots to restore them (ADR 0018).
    pub view_loads: AtomicU64,
    /// See [`Metrics::view_loads`].
    pub view_replayed: AtomicU64,
    /// Handshake messages the public view refused, by rule (a closed set of names).
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Members' commit reports, by outcome: `reverted`, `already_reverted` or the rule that
    /// refused it (ADR 0015).
    reports: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connections: ConnectionStats::default(),
            rpc: Mutex::default(),
            connections_open: AtomicU64::new(0),
            appends: Default::default(),
            append_batch_size: Histogram::new(&SIZE_BUCKETS),
            append_batch_seconds: Histogram::new(&LATENCY_BUCKETS),
            fanout_entries: AtomicU64::new(0),
            fanout_calls: AtomicU64::new(0),
            catch_ups: AtomicU64::new(0),
            catching_up: AtomicU64::new(0),
            feed_releases: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            pool: Arc::default(),
            rate_limits: Arc::default(),
            certificates: super::certs::CertificateStats::default(),
            retention: super::retention::RetentionStats::default(),
            verify_seconds: Histogram::new(&LATENCY_BUCKETS),
            view_loads: AtomicU64::new(0),
            view_replayed: AtomicU64::new(0),
            refused: Mutex::default(),
            reports: Mutex::default(),
        }
    }
}

/// Counts an open connection until dropped.
#[derive(Debug)]
pub struct OpenConnection<'a>(&'a Metrics);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a group subscription reading the store until dropped.
#[derive(Debug)]
pub struct CatchingUp<'a>(&'a Metrics);

impl Drop for CatchingUp<'_> {
    fn drop(&mut self) {
        self.0.catching_up.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Records one finished RPC (`status`: `ok` or an error code).
    pub fn rpc(
        &self,
        service: &'static str,
        method: &'static str,
        status: &'static str,
        d: Duration,
    ) {
        let mut rpc = self.rpc.lock().unwrap_or_else(PoisonError::into_inner);
        let series = rpc.entry((service, method)).or_insert_with(|| RpcSeries {
            by_status: BTreeMap::new(),
            latency: Histogram::new(&LATENCY_BUCKETS),
        });
        *series.by_status.entry(status).or_insert(0) += 1;
        series.latency.observe_duration(d);
    }

    /// Marks a connection open; it counts as closed when the guard drops.
    pub fn connection_opened(&self) -> OpenConnection<'_> {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self)
    }

    /// Counts a catch-up of a group subscription from the store, and marks it reading until
    /// the guard drops.
    pub fn catching_up(&self) -> CatchingUp<'_> {
        self.catching_up.fetch_add(1, Ordering::Relaxed);
        self.catch_ups.fetch_add(1, Ordering::Relaxed);
        CatchingUp(self)
    }

    /// Counts one append's outcome.
    pub fn append(&self, result: AppendResult) {
        if let Some(i) = AppendResult::ALL.iter().position(|r| *r == result) {
            self.appends[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one handshake message refused by its group's public view, by the rule it broke.
    pub fn commit_refused(&self, rule: &'static str) {
        let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        *refused.entry(rule).or_insert(0) += 1;
    }

    /// Counts one member's commit report by its outcome (a closed set of names).
    pub fn commit_report(&self, outcome: &'static str) {
        let mut reports = self.reports.lock().unwrap_or_else(PoisonError::into_inner);
        *reports.entry(outcome).or_insert(0) += 1;
    }

    /// Counts one push of `entries` to a subscriber.
    pub fn fanout(&self, entries: usize) {
        self.fanout_calls.fetch_add(1, Ordering::Relaxed);
        self.fanout_entries
            .fetch_add(entries as u64, Ordering::Relaxed);
    }

    /// Renders the connection, RPC, append and fan-out families.
    pub fn render(&self, out: &mut String) {
        self.connections.render(out);
        self.rate_limits.render(out);
        family(
            out,
            "qpq_connections_open",
            "gauge",
            "Client and node connections open now.",
        );
        let _ = writeln!(
            out,
            "qpq_connections_open {}",
            self.connections_open.load(Ordering::Relaxed)
        );
        family(
            out,
            "qpq_rpc_requests_total",
            "counter",
            "RPCs served, by service, method and status (ok or the error code).",
        );
        let rpc = self.rpc.lock().unwrap_or_else(PoisonError::into_inner);
        for ((service, method), s) in rpc.iter() {
            for (status, n) in &s.by_status {
                let _ = writeln!(
                    out,
                    "qpq_rpc_requests_total{{rpc_service=\"{service}\",rpc_method=\"{method}\",status=\"{status}\"}} {n}"
                );
            }
        }
        family(
            out,
            "qpq_rpc_duration_seconds",
            "histogram",
            "Time to serve an RPC, from the call arriving to its answer.",
        );
        for ((service, method), s) in rpc.iter() {
            let labels = format!("rpc_service=\"{service}\",rpc_method=\"{method}\"");
            s.latency.render(out, "qpq_rpc_duration_seconds", &labels);
        }
        drop(rpc);
        family(
            out,
            "qpq_appends_total",
            "counter",
            "Appends decided by this node's appender, by outcome.",
        );
        for (r, n) in AppendResult::ALL.iter().zip(&self.appends) {
            let _ = writeln!(
                out,
                "qpq_appends_total{{outcome=\"{}\"}} {}",
                r.as_str(),
                n.load(Ordering::Relaxed)
            );
        }
        family(
            out,
            "qpq_append_batch_size",
            "histogram",
            "Append requests written per store transaction (group commit).",
        );
        self.append_batch_size
            .render(out, "qpq_append_batch_size", "");
        family(
            out,
            "qpq_append_batch_duration_seconds",
            "histogram",
            "Time of one append transaction, from the store call to its commit.",
        );
        self.append_batch_seconds
            .render(out, "qpq_append_batch_duration_seconds", "");
        family(
            out,
            "qpq_handshake_verify_duration_seconds",
            "histogram",
            "Time to verify one commit or proposal against its group's public view.",
        );
        self.verify_seconds
            .render(out, "qpq_handshake_verify_duration_seconds", "");
        for (name, help, value) in [
            (
                "qpq_group_view_loads_total",
                "Group views loaded from the store because none was cached.",
                &self.view_loads,
            ),
            (
                "qpq_group_view_replayed_total",
                "Commits and proposals replayed after a snapshot to load a group view.",
                &self.view_replayed,
            ),
        ] {
            family(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        family(
            out,
            "qpq_handshake_refused_total",
            "counter",
            "Commits and proposals the group's public view refused, by rule.",
        );
        for (rule, n) in self
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(out, "qpq_handshake_refused_total{{rule=\"{rule}\"}} {n}");
        }
        family(
            out,
            "qpq_commit_reports_total",
            "counter",
            "Members' reports of commits they cannot process, by outcome (reverted, \
             already_reverted, or the rule that refused the report).",
        );
        for (outcome, n) in self
            .reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(out, "qpq_commit_reports_total{{outcome=\"{outcome}\"}} {n}");
        }
        counter(
            out,
            "qpq_fanout_entries_total",
            "Log entries pushed to live subscribers.",
            self.fanout_entries.load(Ordering::Relaxed),
        );
        counter(
            out,
            "qpq_fanout_calls_total",
            "Push calls to live subscribers (each carries a batch of entries).",
            self.fanout_calls.load(Ordering::Relaxed),
        );
        counter(
            out,
            "qpq_subscription_catch_ups_total",
            "Times a live subscription read the store to catch up instead of the live feed.",
            self.catch_ups.load(Ordering::Relaxed),
        );
        gauge(
            out,
            "qpq_subscriptions_catching_up",
            "Group subscriptions reading the store to catch up now.",
            self.catching_up.load(Ordering::Relaxed),
        );
        counter(
            out,
            "qpq_subscription_feed_releases_total",
            "Live subscriptions that stalled with a full window and let go of their group's feed.",
            self.feed_releases.load(Ordering::Relaxed),
        );
        counter(
            out,
            "qpq_forwarded_calls_total",
            "Calls an edge forwarded to an owner shard.",
            self.forwarded.load(Ordering::Relaxed),
        );
        super::pool::render(&self.pool, out);
        self.certificates.render(out);
        self.retention.render(out);
    }
}

/// Writes a metric family's `# HELP` and `# TYPE` lines.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes a label-less counter.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

/// Writes a label-less gauge.
pub fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let h = Histogram::new(&SIZE_BUCKETS);
        h.observe(1.0);
        h.observe(3.0);
        h.observe(1000.0);
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"4\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn rpc_series_render_with_bounded_labels() {
        let m = Metrics::default();
        m.rpc("DeliveryService", "send", "ok", Duration::from_millis(2));
        m.rpc(
            "DeliveryService",
            "send",
            "not_member",
            Duration::from_millis(1),
        );
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains(
            "qpq_rpc_requests_total{rpc_service=\"DeliveryService\",rpc_method=\"send\",status=\"ok\"} 1"
        ));
        assert!(out.contains(
            "qpq_rpc_duration_seconds_count{rpc_service=\"DeliveryService\",rpc_method=\"send\"} 2"
        ));
    }

    #[test]
    fn limit_closes_render_by_reason() {
        let m = Metrics::default();
        ConnectionStats::count(&m.connections.bind_timeouts);
        ConnectionStats::count(&m.connections.address_connections_full);
        ConnectionStats::count(&m.connections.address_connections_full);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("qpq_connections_limited_total{reason=\"address_connections\"} 2\n"));
        assert!(out.contains("qpq_connections_limited_total{reason=\"address_handshakes\"} 0\n"));
        assert!(out.contains("qpq_connections_limited_total{reason=\"bind_timeout\"} 1\n"));
    }
}
