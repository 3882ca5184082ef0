//! The bounded CPU pool's metrics (the pool itself is `crate::pool`).

use std::sync::atomic::Ordering;

use super::metrics::{counter, gauge};
use crate::pool::PoolStats;

/// Renders the pool's families.
pub(super) fn render(pool: &PoolStats, out: &mut String) {
    gauge(
        out,
        "qpq_cpu_pool_jobs",
        "Jobs admitted to the bounded CPU pool and not yet finished (running or queued).",
        pool.admitted.load(Ordering::Relaxed),
    );
    counter(
        out,
        "qpq_cpu_pool_jobs_total",
        "Jobs the bounded CPU pool finished.",
        pool.completed.load(Ordering::Relaxed),
    );
    counter(
        out,
        "qpq_cpu_pool_waits_total",
        "Callers that found the CPU pool full and waited for a slot.",
        pool.waited.load(Ordering::Relaxed),
    );
    counter(
        out,
        "qpq_cpu_pool_panics_total",
        "CPU pool jobs that panicked (the call failed; the pool lived on).",
        pool.panicked.load(Ordering::Relaxed),
    );
}
