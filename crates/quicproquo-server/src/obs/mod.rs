//! Observability: the one metrics registry, the spans of RPCs, pushes and store calls (their
//! names, attributes, links and error rules after the OpenTelemetry semantic conventions, in
//! `spans` and `db`), and the accounting of calls in flight on a connection
//! ([`calls::InFlight`], through which every served method runs).
//!
//! What it is not: the HTTP listener that exposes these (`crate::node::ops`) or the tracing
//! and log setup (`quicproquo-telemetry`). It imports only the model and the pool (whose counters it renders).

pub mod calls;
pub mod certs;
mod db;
pub mod metrics;
mod pool;
pub mod rates;
pub mod retention;
pub(crate) mod spans;

use quicproquo_telemetry::{Redactor, sampling};

pub use metrics::Metrics;

/// What the RPC services, the appender and the router share for observability: the
/// metrics, and the keyed hash that names groups in spans.
#[derive(Debug)]
pub struct Observer {
    /// The process's metrics.
    pub metrics: Metrics,
    /// Hashes group ids and identities for spans and logs.
    pub redactor: Redactor,
    /// The fraction of client-sampled traces this node continues (see
    /// [`quicproquo_telemetry::sampling::admit`]).
    pub client_trace_ratio: f64,
}

impl Observer {
    /// An observer hashing with `redactor`, honouring clients' sampled flags at the node's own
    /// sampling ratio.
    pub fn new(redactor: Redactor) -> Self {
        Self {
            metrics: Metrics::default(),
            redactor,
            client_trace_ratio: sampling::root_ratio(),
        }
    }

    /// Honours clients' sampled flags for `ratio` of trace ids (`None`: the node's own ratio).
    pub fn with_client_trace_ratio(mut self, ratio: Option<f64>) -> Self {
        if let Some(r) = ratio {
            self.client_trace_ratio = r.clamp(0.0, 1.0);
        }
        self
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
