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
use std::thread::JoinHandle;
use std::time::Duration;

use capnp_rpc::rpc_twoparty_capnp::Side;
use quicproquo_core::channel::ChannelLimits;
use quicproquo_core::rpc::rpc_system;
use quicproquo_core::{NodeVerifier, noise};
use quicproquo_proto::bootstrap_capnp::bootstrap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{ServerError, io_err, runtime as build_runtime};
use crate::auth::AuthContext;
use crate::config::ServerConfig;
use crate::keystore::NodeIdentity;
use crate::obs::Observer;
use crate::obs::calls::InFlight;
use crate::obs::metrics::ConnectionStats;
use crate::ordering::Appender;
use crate::rpc::backend::Backend;
use crate::rpc::bootstrap::{BootstrapImpl, EventsSlot, SessionInfo};
use crate::store::AnyStore;

/// What a role serves its connections with.
pub(super) struct Served {
    /// What client-facing Delivery Services forward to (`None` on a shard).
    pub(super) backend: Option<Backend>,
    /// The appender served to cluster nodes (shard role only).
    pub(super) shard: Option<Arc<Appender>>,
}

struct Shared {
    config: ServerConfig,
    identity: Arc<NodeIdentity>,
    verifier: NodeVerifier,
    auth: Arc<AuthContext>,
    served: Served,
    observer: Arc<Observer>,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
}

impl Shared {
    fn stats(&self) -> &ConnectionStats {
        &self.observer.metrics.connections
    }
}

/// Starts one worker thread per configured worker, each accepting from `listener` until
/// `shutdown`.
pub(super) fn start(
    config: ServerConfig,
    listener: std::net::TcpListener,
    identity: Arc<NodeIdentity>,
    store: AnyStore,
    served: Served,
    observer: &Arc<Observer>,
    shutdown: &CancellationToken,
) -> Result<Vec<JoinHandle<()>>, ServerError> {
    let shared = Arc::new(Shared {
        auth: Arc::new(AuthContext::new(store, &config.auth)),
        served,
        verifier: NodeVerifier::new(identity.cluster_public),
        connections: Arc::new(Semaphore::new(config.max_connections)),
        handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
        config,
        identity,
        observer: Arc::clone(observer),
    });
    let mut threads = Vec::new();
    for i in 0..shared.config.workers {
        let listener = listener
            .try_clone()
            .map_err(io_err("sharing the listener with a worker"))?;
        let rt = build_runtime()?;
        let (shared, shutdown) = (Arc::clone(&shared), shutdown.clone());
        let t = std::thread::Builder::new()
            .name(format!("qpq-worker-{i}"))
            .spawn(move || worker(rt, listener, shared, shutdown))
            .map_err(io_err("spawning a worker thread"))?;
        threads.push(t);
    }
    Ok(threads)
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
                ConnectionStats::count(&shared.stats().refused_at_capacity);
                debug!(%peer, "at capacity; closing new connection");
                continue;
            };
            ConnectionStats::count(&shared.stats().accepted);
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
            ConnectionStats::count(&shared.stats().handshakes_ok);
            o
        }
        Err(e) => {
            ConnectionStats::count(&shared.stats().handshakes_failed);
            debug!(%peer, error = %e, "handshake failed");
            return;
        }
    };

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
        shared.served.backend.clone(),
        shared.served.shard.clone(),
        Rc::clone(&in_flight),
        events.clone(),
    ));
    let (r, w) = stream.into_split();
    let limits = ChannelLimits {
        max_frame_bytes: config.max_frame_bytes,
    };
    let rpc = rpc_system(
        r,
        w,
        outcome.session,
        limits,
        Side::Server,
        Some(bootstrap.client),
    );
    let disconnector = rpc.get_disconnector();
    let mut rpc = pin!(rpc);

    tokio::select! {
        r = &mut rpc => {
            if let Err(e) = r {
                ConnectionStats::count(&shared.stats().connection_errors);
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
