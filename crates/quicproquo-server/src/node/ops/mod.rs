//! The HTTP ops listener (`/metrics`, `/livez`, `/readyz`) and what it answers: readiness and
//! the rendering of the node's one metrics registry.
//!
//! The listener is a deliberately tiny HTTP/1.1 responder on a thread of its own: `GET`
//! only, one request per connection, a bounded request head read under a deadline, at most
//! [`MAX_OPS_CONNECTIONS`] at once. It never touches the data path: it reads atomics, the
//! router's ring status and the store's pool, and pings the store for readiness.

mod http;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use quicproquo_core::NodeRole;
use tokio_util::sync::CancellationToken;

use crate::cluster::router::Router;
use crate::obs::Observer;
use crate::obs::metrics::{family, gauge};
use crate::store::AnyStore;

/// Most ops connections served at once; more wait in the accept queue.
pub const MAX_OPS_CONNECTIONS: usize = 32;

/// Everything `/metrics` and `/readyz` read.
pub(crate) struct OpsState {
    pub(crate) role: NodeRole,
    pub(crate) observer: Arc<Observer>,
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
    if let Some(router) = &state.router {
        let ring = router.status();
        if !ring.known {
            return Err("the shard ring is not known yet");
        }
        // Every send would fail: take this edge out of rotation (it stays live, and comes
        // back as soon as a shard registers).
        if ring.shards == 0 {
            return Err("no live shard");
        }
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
