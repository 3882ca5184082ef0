//! Operations: the metrics registry, RPC and store spans, and the HTTP ops listener
//! (`/metrics`, `/livez`, `/readyz`).
//!
//! The listener is a deliberately tiny HTTP/1.1 responder on a thread of its own: `GET`
//! only, one request per connection, a bounded request head read under a deadline, at most
//! [`MAX_OPS_CONNECTIONS`] at once. It never touches the data path: it reads atomics, the
//! router's ring status and the store's pool, and pings the store for readiness.

mod http;
pub mod metrics;
pub(crate) mod spans;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use quicproquo_core::NodeRole;
use quicproquo_telemetry::Redactor;
use tokio_util::sync::CancellationToken;

use crate::cluster::router::Router;
use crate::server::Stats;
use crate::store::AnyStore;
pub use metrics::Metrics;
use metrics::{counter, family, gauge};

/// Most ops connections served at once; more wait in the accept queue.
pub const MAX_OPS_CONNECTIONS: usize = 32;

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

/// Everything `/metrics` and `/readyz` read.
pub(crate) struct OpsState {
    pub(crate) role: NodeRole,
    pub(crate) observer: Arc<Observer>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) store: AnyStore,
    pub(crate) router: Option<Arc<Router>>,
    /// Cancelled when the server starts draining.
    pub(crate) draining: CancellationToken,
}

/// Whether the node should receive traffic, and why not.
pub(crate) async fn readiness(state: &OpsState) -> Result<(), &'static str> {
    if state.draining.is_cancelled() {
        return Err("draining");
    }
    if let Some(router) = &state.router
        && !router.status().known
    {
        return Err("the shard ring is not known yet");
    }
    let check = tokio::time::timeout(std::time::Duration::from_secs(2), state.store.check());
    match check.await {
        Ok(Ok(())) => Ok(()),
        _ => Err("the store is unreachable"),
    }
}

/// Renders every metric family in the Prometheus text format (version 0.0.4).
pub(crate) fn render(state: &OpsState) -> String {
    let mut out = String::with_capacity(8 * 1024);
    family(
        &mut out,
        "qpq_info",
        "gauge",
        "The node's role and version (always 1).",
    );
    out.push_str(&format!(
        "qpq_info{{role=\"{}\",version=\"{}\"}} 1\n",
        state.role,
        env!("CARGO_PKG_VERSION")
    ));
    gauge(
        &mut out,
        "qpq_draining",
        "1 while the node drains before exiting.",
        u8::from(state.draining.is_cancelled()),
    );
    let s = &state.stats;
    counter(
        &mut out,
        "qpq_connections_accepted_total",
        "TCP connections accepted and handed to a worker.",
        s.accepted.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "qpq_connections_refused_total",
        "Connections closed on accept because the connection or handshake cap was reached.",
        s.refused_at_capacity.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "qpq_connection_errors_total",
        "Connections that ended with a transport or RPC error after the handshake.",
        s.connection_errors.load(Ordering::Relaxed),
    );
    family(
        &mut out,
        "qpq_handshakes_total",
        "counter",
        "Noise handshakes, by result (ok, failed: bad bytes, wrong key, timeout).",
    );
    out.push_str(&format!(
        "qpq_handshakes_total{{result=\"ok\"}} {}\nqpq_handshakes_total{{result=\"failed\"}} {}\n",
        s.handshakes_ok.load(Ordering::Relaxed),
        s.handshakes_failed.load(Ordering::Relaxed)
    ));
    state.observer.metrics.render(&mut out);
    if let Some(router) = &state.router {
        let ring = router.status();
        gauge(
            &mut out,
            "qpq_ring_known",
            "1 once this edge has read the shard set.",
            u8::from(ring.known),
        );
        gauge(
            &mut out,
            "qpq_ring_version",
            "Version of the shard ring this edge routes with.",
            ring.version,
        );
        gauge(
            &mut out,
            "qpq_ring_shards",
            "Live shards in that ring.",
            ring.shards,
        );
    }
    if let Some(pool) = state.store.pool_use() {
        gauge(
            &mut out,
            "qpq_store_pool_max",
            "Most connections the store's pool may open.",
            pool.max,
        );
        gauge(
            &mut out,
            "qpq_store_pool_connections",
            "Connections the pool holds now.",
            pool.size,
        );
        gauge(
            &mut out,
            "qpq_store_pool_in_use",
            "Pool connections taken by a call now.",
            pool.size.saturating_sub(pool.available),
        );
        gauge(
            &mut out,
            "qpq_store_pool_waiting",
            "Calls waiting for a pool connection.",
            pool.waiting,
        );
    }
    out
}

/// The running ops listener.
pub(crate) struct OpsListener {
    /// Where it listens.
    pub(crate) local_addr: SocketAddr,
    /// Its thread (stops when the server's backends stop).
    pub(crate) thread: JoinHandle<()>,
}

/// Binds `addr` and serves the ops endpoints on a thread of its own until `stop`.
pub(crate) fn start(
    addr: SocketAddr,
    state: OpsState,
    stop: CancellationToken,
) -> std::io::Result<OpsListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("qpq-ops".into())
        .spawn(move || rt.block_on(http::serve(listener, Arc::new(state), stop)))?;
    Ok(OpsListener { local_addr, thread })
}
