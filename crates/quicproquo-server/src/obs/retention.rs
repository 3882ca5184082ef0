//! The retention job's metrics: rows it deleted by kind, its passes, and the bytes the store
//! holds by kind (gauges over the whole store: no per-user or per-group labels).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::metrics::{counter, family, gauge};

/// What the retention job reports.
#[derive(Debug, Default)]
pub struct RetentionStats {
    /// Group log entries deleted.
    pub log_entries: AtomicU64,
    /// Inbox entries and Welcomes deleted.
    pub welcomes: AtomicU64,
    /// Expired KeyPackages deleted.
    pub key_packages: AtomicU64,
    /// Passes finished.
    pub passes: AtomicU64,
    /// Passes that stopped on a store error (the next one starts over).
    pub failed_passes: AtomicU64,
    /// When the last pass finished (Unix seconds; 0: none yet).
    pub last_pass: AtomicU64,
    /// Bytes stored, by kind, as last measured: group logs, Welcomes and inboxes,
    /// KeyPackages, public views.
    pub stored: [AtomicU64; 4],
}

/// The kinds of [`RetentionStats::stored`], in order.
const STORED_KINDS: [&str; 4] = ["group_log", "welcomes", "key_packages", "group_views"];

impl RetentionStats {
    /// Renders the families.
    pub fn render(&self, out: &mut String) {
        family(
            out,
            "qpq_retention_deleted_total",
            "counter",
            "Rows the retention job deleted, by kind (log_entries, welcomes, key_packages).",
        );
        for (kind, n) in [
            ("log_entries", &self.log_entries),
            ("welcomes", &self.welcomes),
            ("key_packages", &self.key_packages),
        ] {
            let _ = writeln!(
                out,
                "qpq_retention_deleted_total{{kind=\"{kind}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        counter(
            out,
            "qpq_retention_passes_total",
            "Retention passes finished.",
            self.passes.load(Ordering::Relaxed),
        );
        counter(
            out,
            "qpq_retention_failed_passes_total",
            "Retention passes stopped by a store error.",
            self.failed_passes.load(Ordering::Relaxed),
        );
        gauge(
            out,
            "qpq_retention_last_pass_timestamp_seconds",
            "When the last retention pass finished (Unix seconds).",
            self.last_pass.load(Ordering::Relaxed),
        );
        family(
            out,
            "qpq_stored_bytes",
            "gauge",
            "Bytes the store holds, by kind (group_log, welcomes, key_packages, group_views); \
             on Postgres the whole database's tables, with indexes.",
        );
        for (kind, n) in STORED_KINDS.iter().zip(&self.stored) {
            let _ = writeln!(
                out,
                "qpq_stored_bytes{{kind=\"{kind}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}
