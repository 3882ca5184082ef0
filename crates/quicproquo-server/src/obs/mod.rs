//! Observability: the one metrics registry, the spans of RPCs, pushes and store calls, and the
//! accounting of calls in flight on a connection ([`calls::InFlight`], through which every
//! served method runs).
//!
//! What it is not: the HTTP listener that exposes these (`crate::node::ops`) or the tracing
//! and log setup (`quicproquo-telemetry`). It imports only the model.

pub mod calls;
pub mod metrics;
pub(crate) mod spans;

use quicproquo_telemetry::Redactor;

pub use metrics::Metrics;

/// What the RPC services, the appender and the router share for observability: the
/// metrics, and the keyed hash that names groups in spans.
#[derive(Debug)]
pub struct Observer {
    /// The process's metrics.
    pub metrics: Metrics,
    /// Hashes group ids and identities for spans and logs.
    pub redactor: Redactor,
}

impl Observer {
    /// An observer hashing with `redactor`.
    pub fn new(redactor: Redactor) -> Self {
        Self {
            metrics: Metrics::default(),
            redactor,
        }
    }
}

impl Default for Observer {
    /// An observer with a random redaction key (tests, benches).
    fn default() -> Self {
        let mut seed = [0u8; 32];
        // A fixed key only weakens correlation resistance; never fail over it.
        let _ = getrandom::fill(&mut seed);
        Self::new(Redactor::new(&seed))
    }
}
