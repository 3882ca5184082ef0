//! The listener and worker runtime every role shares.
//!
//! Each worker thread runs a single-threaded tokio runtime with a `LocalSet` (capnp-rpc's
//! `RpcSystem` is `!Send`) and accepts from its own registration of the one listening socket,
//! so a connection is served on the thread that accepted it, with no hand-off between threads.
//! A connection first holds a slot of the connection cap and of the handshake cap; a
//! connection arriving when either is full is closed at once. After the Noise handshake the
//! connection serves Cap'n Proto RPC over the encrypted channel until the peer leaves or the
//! server shuts down; on shutdown, calls in progress get the configured grace period to finish
//! before the connection is closed.

use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use capnp::message::ReaderOptions;
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side, twoparty};
use quicproquo_core::channel::{ChannelLimits, channel};
use quicproquo_core::{ClusterPublicKey, NodeRole, NodeVerifier, noise};
use quicproquo_proto::bootstrap_capnp::bootstrap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::AuthContext;
use crate::cluster::lease;
use crate::cluster::link::Dialer;
use crate::cluster::router::{RingStatus, Router, RouterSettings};
use crate::config::{ConfigError, ServerConfig};
use crate::delivery::backend::Backend;
use crate::delivery::shard::Shard;
use crate::keystore::{KeyStoreError, NodeIdentity};
use crate::ops::{self, Observer, OpsState};
use crate::rpc::{BootstrapImpl, EventsSlot, InFlight, SessionInfo};
use crate::store::postgres::PgStore;
use crate::store::postgres_cluster::LeaseClaim;
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

/// Counters describing what the server has done, readable while it runs.
#[derive(Debug, Default)]
pub struct Stats {
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
}

struct Shared {
    config: ServerConfig,
    identity: Arc<NodeIdentity>,
    verifier: NodeVerifier,
    auth: Arc<AuthContext>,
    /// What client-facing Delivery Services forward to (`None` on a shard, which serves no
    /// clients).
    backend: Option<Backend>,
    /// The shard served to cluster nodes (shard role only).
    shard: Option<Arc<Shard>>,
    stats: Arc<Stats>,
    observer: Arc<Observer>,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
}

/// A running server. Dropping it does not stop the server: call [`ServerHandle::shutdown`].
pub struct ServerHandle {
    local_addr: SocketAddr,
    cluster_key: ClusterPublicKey,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
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

    /// Live counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
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

fn reader_options(max_frame_bytes: usize) -> ReaderOptions {
    let mut options = ReaderOptions::new();
    options
        .traversal_limit_in_words(Some(max_frame_bytes / 8))
        .nesting_limit(64);
    options
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
        let store = connect_postgres(url, database_pool_size(config.workers))?;
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
fn connect_postgres(url: &str, pool_size: usize) -> Result<PgStore, ServerError> {
    std::thread::scope(|scope| {
        let opener = std::thread::Builder::new()
            .name("qpq-store-open".into())
            .spawn_scoped(scope, || {
                let rt = runtime()?;
                Ok::<_, ServerError>(rt.block_on(PgStore::connect(url, pool_size))?)
            })
            .map_err(io_err("spawning the store opener thread"))?;
        opener
            .join()
            .map_err(|_| ServerError::ThreadPanicked("qpq-store-open".into()))?
    })
}

/// Loads this node's keys from the data directory, opens its store, binds `config.listen`
/// and starts serving.
pub fn bind_and_start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    config.validate()?;
    let identity = NodeIdentity::load(
        &config.data_dir,
        config.cluster.cluster_key_file.as_deref(),
        config.role,
    )?;
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
    let stats = Arc::new(Stats::default());
    let cluster_key = identity.cluster_public;
    let observer = Arc::new(Observer::new(identity.redactor.clone()));
    let identity = Arc::new(identity);
    let backend_stop = CancellationToken::new();
    let mut backend_threads = Vec::new();
    let (mut backend, mut shard, mut router, mut node_id) = (None, None, None, None);
    match config.role {
        NodeRole::Edge => {
            let settings = RouterSettings {
                ring_refresh: config.cluster.ring_refresh,
                dialer: Dialer {
                    identity: Arc::clone(&identity),
                    verifier: NodeVerifier::new(cluster_key),
                    timeout: config.handshake_timeout.min(Duration::from_secs(5)),
                    max_frame_bytes: config.max_frame_bytes,
                },
            };
            let (r, thread) = Router::start(
                store.clone(),
                settings,
                config.max_message_bytes,
                Arc::clone(&observer),
                backend_stop.clone(),
            )
            .map_err(io_err("starting the router"))?;
            backend_threads.push(thread);
            backend = Some(Backend::Routed(Arc::clone(&r)));
            router = Some(r);
        }
        _ => {
            let (s, thread) = Shard::start(
                store.clone(),
                config.max_message_bytes,
                Arc::clone(&observer),
                backend_stop.clone(),
            )
            .map_err(io_err("starting the appender"))?;
            backend_threads.push(thread);
            if config.role == NodeRole::Shard {
                let id = config
                    .cluster
                    .node_id
                    .clone()
                    .unwrap_or_else(|| hex::encode(&identity.noise.public()[..8]));
                if let AnyStore::Postgres(pg) = &store {
                    let claim = LeaseClaim {
                        node_id: id.clone(),
                        address: advertised(&config, local_addr)?,
                        noise_key: *identity.noise.public(),
                        ttl: config.cluster.lease_ttl,
                    };
                    let thread = lease::start(pg.clone(), claim, shutdown.clone())
                        .map_err(io_err("starting the shard lease"))?;
                    backend_threads.push(thread);
                }
                node_id = Some(id);
                shard = Some(s);
            } else {
                backend = Some(Backend::Local(s));
            }
        }
    }
    // The ops listener serves until the backends stop, so /readyz answers 503 while the
    // workers drain and /metrics stays scrapeable until the end.
    let ops_addr = match config.ops_listen {
        Some(addr) => {
            let state = OpsState {
                role: config.role,
                observer: Arc::clone(&observer),
                stats: Arc::clone(&stats),
                store: store.clone(),
                router: router.clone(),
                draining: shutdown.clone(),
            };
            let listener = ops::start(addr, state, backend_stop.clone())
                .map_err(io_err("binding the ops listener"))?;
            backend_threads.push(listener.thread);
            Some(listener.local_addr)
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        auth: Arc::new(AuthContext::new(store, &config.auth)),
        backend,
        shard,
        verifier: NodeVerifier::new(cluster_key),
        connections: Arc::new(Semaphore::new(config.max_connections)),
        handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
        config,
        identity,
        stats: Arc::clone(&stats),
        observer: Arc::clone(&observer),
    });

    let mut threads = Vec::new();
    for i in 0..shared.config.workers {
        let listener = listener
            .try_clone()
            .map_err(io_err("sharing the listener with a worker"))?;
        let rt = runtime()?;
        let (shared, shutdown) = (Arc::clone(&shared), shutdown.clone());
        let t = std::thread::Builder::new()
            .name(format!("qpq-worker-{i}"))
            .spawn(move || worker(rt, listener, shared, shutdown))
            .map_err(io_err("spawning a worker thread"))?;
        threads.push(t);
    }
    info!(role = %shared.config.role, addr = %local_addr, workers = shared.config.workers, "listening");
    Ok(ServerHandle {
        local_addr,
        cluster_key,
        shutdown,
        stats,
        threads,
        backend_stop,
        backend_threads,
        router,
        node_id,
        ops_addr,
        observer,
    })
}

/// The address a shard registers: `advertise`, or the bound address when that is specific.
fn advertised(config: &ServerConfig, local: SocketAddr) -> Result<String, ServerError> {
    if let Some(a) = &config.cluster.advertise {
        return Ok(a.clone());
    }
    if local.ip().is_unspecified() {
        return Err(ServerError::Config(ConfigError::Invalid {
            key: "advertise",
            message: format!(
                "a shard listening on {local} must say where edges reach it (e.g. \
                 advertise = \"shard-0.example:7100\")"
            ),
        }));
    }
    Ok(local.to_string())
}

fn runtime() -> Result<tokio::runtime::Runtime, ServerError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("building a runtime"))
}

fn worker(
    rt: tokio::runtime::Runtime,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot register the listener; shutting down");
                shutdown.cancel();
                return;
            }
        };
        let tracker = TaskTracker::new();
        loop {
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        }
                    }
                },
            };
            let slots = Arc::clone(&shared.connections)
                .try_acquire_owned()
                .and_then(|c| Ok((c, Arc::clone(&shared.handshakes).try_acquire_owned()?)));
            let Ok((connection_slot, handshake_slot)) = slots else {
                shared
                    .stats
                    .refused_at_capacity
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%peer, "at capacity; closing new connection");
                continue;
            };
            shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
            tracker.spawn_local(serve_connection(
                stream,
                peer,
                (connection_slot, handshake_slot),
                Arc::clone(&shared),
                shutdown.clone(),
            ));
        }
        drop(listener);
        tracker.close();
        // Connections drain themselves within the grace period; this bound is a backstop.
        let backstop = shared.config.shutdown_grace + Duration::from_secs(1);
        if tokio::time::timeout(backstop, tracker.wait())
            .await
            .is_err()
        {
            warn!("connections still open after the grace period; closing them");
        }
    });
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    (_connection_slot, handshake_slot): (OwnedSemaphorePermit, OwnedSemaphorePermit),
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let _open = shared.observer.metrics.connection_opened();
    let config = &shared.config;
    let handshake = tokio::select! {
        () = shutdown.cancelled() => return,
        r = noise::respond(
            &mut stream,
            &shared.identity.noise,
            &shared.identity.certificate,
            config.handshake_timeout,
        ) => r,
    };
    drop(handshake_slot);
    let outcome = match handshake {
        Ok(o) => {
            shared.stats.handshakes_ok.fetch_add(1, Ordering::Relaxed);
            o
        }
        Err(e) => {
            shared
                .stats
                .handshakes_failed
                .fetch_add(1, Ordering::Relaxed);
            debug!(%peer, error = %e, "handshake failed");
            return;
        }
    };

    let (r, w) = stream.into_split();
    let limits = ChannelLimits {
        max_frame_bytes: config.max_frame_bytes,
    };
    let (reader, writer) = channel(r, w, outcome.session, limits);
    let network = twoparty::VatNetwork::new(
        reader.compat(),
        writer.compat_write(),
        Side::Server,
        reader_options(config.max_frame_bytes),
    );
    let in_flight = Rc::new(InFlight::new(Arc::clone(&shared.observer)));
    // A peer that presented a certificate the cluster key vouches for is a fellow node.
    let peer_node = outcome
        .peer_certificate
        .and_then(|cert| shared.verifier.verify(&cert, &outcome.remote_static).ok());
    let session = SessionInfo {
        handshake_hash: outcome.handshake_hash,
        client_static: outcome.remote_static,
        peer_node,
    };
    let events = EventsSlot::default();
    let bootstrap: bootstrap::Client = capnp_rpc::new_client(BootstrapImpl::new(
        config.role,
        session,
        Arc::clone(&shared.auth),
        shared.backend.clone(),
        shared.shard.clone(),
        Rc::clone(&in_flight),
        events.clone(),
    ));
    let rpc = RpcSystem::new(Box::new(network), Some(bootstrap.client));
    let disconnector = rpc.get_disconnector();
    let mut rpc = pin!(rpc);

    tokio::select! {
        r = &mut rpc => {
            if let Err(e) = r {
                shared.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        }
        () = shutdown.cancelled() => {}
    }
    // Draining: tell the client to move to another node, keep serving the calls in progress,
    // then close politely.
    events.draining();
    let drain = async {
        in_flight.idle().await;
        let _ = disconnector.await;
    };
    tokio::select! {
        _ = &mut rpc => {}
        () = drain => {}
        () = tokio::time::sleep(config.shutdown_grace) => {
            debug!(%peer, "grace period over; closing connection");
        }
    }
}
