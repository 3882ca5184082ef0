//! Refusals by the Authentication Service's rate limits, for the metrics.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::metrics::family;

/// Refusals by each rate limit, for the metrics.
#[derive(Debug, Default)]
pub struct RateLimitStats {
    /// Binds refused for their address.
    pub bind_address: AtomicU64,
    /// Fetches refused for a (requester, target) pair.
    pub fetch_pair: AtomicU64,
    /// Fetches refused for the requester's total.
    pub fetch_identity: AtomicU64,
    /// Fetches refused for the source address's total.
    pub fetch_address: AtomicU64,
}

impl RateLimitStats {
    pub(super) fn render(&self, out: &mut String) {
        family(
            out,
            "qpq_rate_limited_total",
            "counter",
            "Calls refused by a rate limit, by limit (bind_address, fetch_pair, fetch_identity, \
             fetch_address).",
        );
        for (limit, n) in [
            ("bind_address", &self.bind_address),
            ("fetch_pair", &self.fetch_pair),
            ("fetch_identity", &self.fetch_identity),
            ("fetch_address", &self.fetch_address),
        ] {
            let _ = writeln!(
                out,
                "qpq_rate_limited_total{{limit=\"{limit}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}
