//! The node: what a `qpq-server` process runs. [`start`] opens nothing itself; it starts the
//! role's parts — [`standalone`] (an appender serving its own clients), [`edge`] (a router to
//! the owner shards) or [`shard`] (an appender served to edges, holding a lease) — then the
//! [`ops`] listener and the worker [`runtime`] that accepts connections.
//!
//! What it is not: configuration parsing (`crate::config`) or the command line (the binary).
//! This is the top layer of the crate: nothing else imports it.

mod edge;
pub mod ops;
mod runtime;
mod shard;
mod standalone;
mod trust;

pub use trust::load_identity;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use quicproquo_core::{ClusterPublicKey, NodeRole};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cluster::router::{RingStatus, Router};
use crate::config::{ConfigError, ServerConfig};
use crate::keystore::{KeyStoreError, NodeIdentity};
use crate::obs::Observer;
use crate::obs::metrics::ConnectionStats;
use crate::ordering::Appender;
use crate::pool::CpuPool;
use crate::rpc::backend::Backend;
use crate::store::postgres::PgStore;
use crate::store::{AnyStore, StoreError, embedded};

/// Errors starting or running a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Keys could not be loaded or created.
    #[error(transparent)]
    Keys(#[from] KeyStoreError),
    /// Binding or configuring the listener, or building a runtime, failed.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    /// A server thread panicked (a bug: handlers must not panic).
    #[error("server thread {0} panicked")]
    ThreadPanicked(String),
}

fn io_err(action: &'static str) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| ServerError::Io { action, source }
}

/// What a role starts before the listener: what its connections are served with, and the
/// threads that must stop after the workers.
#[derive(Default)]
struct RoleParts {
    /// What client-facing Delivery Services forward to (`None` on a shard, which serves no
    /// clients).
    backend: Option<Backend>,
    /// The appender served to cluster nodes (shard role only).
    shard: Option<Arc<Appender>>,
    /// The edge's router (edge role only).
    router: Option<Arc<Router>>,
    /// A shard's place on the ring.
    node_id: Option<String>,
    threads: Vec<JoinHandle<()>>,
}

/// A running server. Dropping it does not stop the server: call [`ServerHandle::shutdown`].
pub struct ServerHandle {
    local_addr: SocketAddr,
    cluster_key: ClusterPublicKey,
    shutdown: CancellationToken,
    threads: Vec<JoinHandle<()>>,
    /// Stopped after the workers: the appender or router serving their last calls.
    backend_stop: CancellationToken,
    backend_threads: Vec<JoinHandle<()>>,
    router: Option<Arc<Router>>,
    node_id: Option<String>,
    ops_addr: Option<SocketAddr>,
    observer: Arc<Observer>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The cluster public key clients pin to reach this server.
    pub fn cluster_key(&self) -> ClusterPublicKey {
        self.cluster_key
    }

    /// The listener's and connections' counters.
    pub fn stats(&self) -> &ConnectionStats {
        &self.observer.metrics.connections
    }

    /// Where the ops listener (`/metrics`, `/livez`, `/readyz`) is bound, if it runs.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_addr
    }

    /// The metrics and redaction key this server reports with.
    pub fn observer(&self) -> &Arc<Observer> {
        &self.observer
    }

    /// The ring as this edge knows it (`None` on other roles).
    pub fn ring_status(&self) -> Option<RingStatus> {
        self.router.as_ref().map(|r| r.status())
    }

    /// A shard's place on the ring (`None` on other roles).
    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    /// A token that, when cancelled, shuts the server down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Begins a graceful shutdown: stop accepting, let calls in progress finish.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits (blocking) until every server thread has exited. The appender (or the edge's
    /// router) stops last, after the workers have finished their in-flight calls, so no
    /// acknowledged append is cut off.
    pub fn join(self) -> Result<(), ServerError> {
        let mut result = Ok(());
        let mut join = |t: JoinHandle<()>| {
            let name = t.thread().name().unwrap_or("?").to_owned();
            if t.join().is_err() {
                result = Err(ServerError::ThreadPanicked(name));
            }
        };
        for t in self.threads {
            join(t);
        }
        self.backend_stop.cancel();
        for t in self.backend_threads {
            join(t);
        }
        result
    }
}

/// Connections in the Postgres pool for `workers` workers: the workers' concurrent reads and
/// Authentication Service calls, plus the appender's one transaction at a time.
fn database_pool_size(workers: usize) -> usize {
    (4 * workers + 4).min(64)
}

/// Opens the store the configuration names: the cluster's Postgres database when
/// `database_url` is set (its schema must be current: `qpq-server migrate`), otherwise the
/// embedded store in the data directory, which only a standalone node may use.
pub fn open_store(config: &ServerConfig) -> Result<AnyStore, ServerError> {
    config.validate_store()?;
    if let Some(url) = &config.database_url {
        let store = connect_postgres(
            url,
            database_pool_size(config.workers),
            config.database_ca_file.as_deref(),
        )?;
        info!(
            database = %crate::config::redact_database_url(url),
            "using the PostgreSQL store"
        );
        return Ok(AnyStore::Postgres(store));
    }
    crate::keystore::ensure_data_dir(&config.data_dir)?;
    let path = config.data_dir.join(embedded::DEFAULT_FILE);
    Ok(AnyStore::Embedded(embedded::EmbeddedStore::open(&path)?))
}

/// Opens (and checks) the Postgres store on a current-thread runtime built for the purpose, on
/// a thread of its own so that this also works when called from inside another runtime. The
/// runtime may go afterwards: the store drives its connections on its own I/O thread, so they
/// serve the workers and the appender for as long as the store lives.
fn connect_postgres(
    url: &str,
    pool_size: usize,
    ca_file: Option<&std::path::Path>,
) -> Result<PgStore, ServerError> {
    std::thread::scope(|scope| {
        let opener = std::thread::Builder::new()
            .name("qpq-store-open".into())
            .spawn_scoped(scope, || {
                let rt = runtime()?;
                Ok::<_, ServerError>(
                    rt.block_on(PgStore::connect_with_ca(url, pool_size, ca_file))?,
                )
            })
            .map_err(io_err("spawning the store opener thread"))?;
        opener
            .join()
            .map_err(|_| ServerError::ThreadPanicked("qpq-store-open".into()))?
    })
}

/// This node's id: `node_id` from the configuration, or the one its certificate names (for a
/// self-certified node, the first 8 bytes of its Noise key in hex). A shard's place on the
/// ring, and every node's `service.instance.id` in its traces.
pub fn node_id(config: &ServerConfig, identity: &NodeIdentity) -> String {
    config
        .cluster
        .node_id
        .clone()
        .unwrap_or_else(|| identity.certificate().node_id().to_owned())
}

/// Loads this node's keys and certificate, opens its store, binds `config.listen` and starts
/// serving.
pub fn bind_and_start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    config.validate()?;
    let identity = load_identity(&config)?;
    let store = open_store(&config)?;
    let listener =
        std::net::TcpListener::bind(config.listen).map_err(io_err("binding the listener"))?;
    start(config, listener, identity, store)
}

/// Starts serving on an already bound `listener` (tests bind port 0) with `store`.
pub fn start(
    config: ServerConfig,
    listener: std::net::TcpListener,
    identity: NodeIdentity,
    store: AnyStore,
) -> Result<ServerHandle, ServerError> {
    config.validate()?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("configuring the listener"))?;
    let local_addr = listener
        .local_addr()
        .map_err(io_err("reading the listen address"))?;
    let shutdown = CancellationToken::new();
    let cluster_key = identity.cluster_public();
    let observer = Arc::new(
        Observer::new(identity.redactor.clone()).with_client_trace_ratio(config.client_trace_ratio),
    );
    let identity = Arc::new(identity);
    let pool = CpuPool::new(
        config.limits.cpu_pool_threads,
        config.limits.cpu_pool_queue,
        Arc::clone(&observer.metrics.pool),
    )
    .map_err(io_err("starting the CPU pool"))?;
    let backend_stop = CancellationToken::new();
    let mut parts = match config.role {
        NodeRole::Edge => edge::start(&config, &identity, &store, &observer, &backend_stop)?,
        NodeRole::Shard => shard::start(
            &config,
            &identity,
            &store,
            &observer,
            &pool,
            (&backend_stop, &shutdown),
            local_addr,
        )?,
        _ => standalone::start(&config, &store, &observer, &pool, &backend_stop)?,
    };
    if let Some(watcher) = trust::start_watcher(&identity, &observer, &config, &backend_stop)? {
        parts.threads.push(watcher);
    }
    // The ops listener serves until the backends stop, so /readyz answers 503 while the
    // workers drain and /metrics stays scrapeable until the end.
    let ops_addr = match config.ops_listen {
        Some(addr) => {
            let state = ops::OpsState {
                role: config.role,
                observer: Arc::clone(&observer),
                store: store.clone(),
                router: parts.router.clone(),
                draining: shutdown.clone(),
            };
            let listener = ops::start(addr, state, backend_stop.clone())
                .map_err(io_err("binding the ops listener"))?;
            parts.threads.push(listener.thread);
            Some(listener.local_addr)
        }
        None => None,
    };
    let role = config.role;
    let workers = config.workers;
    let served = runtime::Served {
        backend: parts.backend,
        shard: parts.shard,
        pool,
    };
    let threads = runtime::start(
        config, listener, identity, store, served, &observer, &shutdown,
    )?;
    info!(%role, addr = %local_addr, workers, "listening");
    Ok(ServerHandle {
        local_addr,
        cluster_key,
        shutdown,
        threads,
        backend_stop,
        backend_threads: parts.threads,
        router: parts.router,
        node_id: parts.node_id,
        ops_addr,
        observer,
    })
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, ServerError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("building a runtime"))
}
