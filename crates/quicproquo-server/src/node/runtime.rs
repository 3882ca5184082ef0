//! The listener and worker runtime every role shares.
//!
//! Each worker thread runs a single-threaded tokio runtime with a `LocalSet` (capnp-rpc's
//! `RpcSystem` is `!Send`) and accepts from its own registration of the one listening socket,
//! so a connection is served on the thread that accepted it, with no hand-off between threads.
//! A connection first holds a slot of the connection cap and of the handshake cap, both
//! globally and for its source address (an IPv6 /64 counts as one address); a connection
//! arriving when any of them is full is closed at once and counted. After the Noise handshake
//! the connection serves Cap'n Proto RPC over the encrypted channel until the peer leaves or
//! the server shuts down; a peer that is not a node must bind an identity within the bind
//! deadline or be closed. On shutdown, calls in progress get the configured grace period to
//! finish before the connection is closed.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use capnp_rpc::rpc_twoparty_capnp::Side;
use quicproquo_core::channel::ChannelLimits;
use quicproquo_core::gate::{GateLimits, GateState};
use quicproquo_core::mux::PushPort;
use quicproquo_core::rpc::{Reading, rpc_system_pushing};
use quicproquo_core::{NodeVerifier, noise};
use quicproquo_proto::bootstrap_capnp::bootstrap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::{debug, warn};

use super::{ServerError, io_err, runtime as build_runtime};
use crate::auth::AuthContext;
use crate::config::ServerConfig;
use crate::keystore::NodeIdentity;
use crate::obs::Observer;
use crate::obs::calls::InFlight;
use crate::obs::metrics::ConnectionStats;
use crate::ordering::Appender;
use crate::pool::CpuPool;
use crate::rpc::backend::Backend;
use crate::rpc::bootstrap::{BindSignal, BootstrapImpl, SessionHooks, SessionInfo};
use crate::rpc::frames::ConnectionFrames;
use crate::store::AnyStore;

/// What a role serves its connections with.
pub(super) struct Served {
    /// What client-facing Delivery Services forward to (`None` on a shard).
    pub(super) backend: Option<Backend>,
    /// The appender served to cluster nodes (shard role only).
    pub(super) shard: Option<Arc<Appender>>,
    /// The bounded pool CPU-heavy checks run on.
    pub(super) pool: CpuPool,
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
    addresses: Arc<AddressTable>,
}

impl Shared {
    fn stats(&self) -> &ConnectionStats {
        &self.observer.metrics.connections
    }

    /// The slots a new connection from `peer` holds, or `None` (counted) when a cap is full.
    fn admit(&self, peer: SocketAddr) -> Option<Slots> {
        let (address, address_handshake) = match self.addresses.admit(peer.ip()) {
            Ok(slots) => slots,
            Err(full) => {
                ConnectionStats::count(match full {
                    AddressFull::Connections => &self.stats().address_connections_full,
                    AddressFull::Handshakes => &self.stats().address_handshakes_full,
                });
                debug!(%peer, ?full, "source address at capacity; closing new connection");
                return None;
            }
        };
        let global = Arc::clone(&self.connections)
            .try_acquire_owned()
            .and_then(|c| Ok((c, Arc::clone(&self.handshakes).try_acquire_owned()?)));
        let Ok((connection, handshake)) = global else {
            ConnectionStats::count(&self.stats().refused_at_capacity);
            debug!(%peer, "at capacity; closing new connection");
            return None;
        };
        Some(Slots {
            _connection: (connection, address),
            handshake: (handshake, address_handshake),
        })
    }
}

/// What an accepted connection holds: its connection slots for its lifetime, its handshake
/// slots until the handshake ends.
struct Slots {
    _connection: (OwnedSemaphorePermit, AddressSlot),
    handshake: (OwnedSemaphorePermit, AddressSlot),
}

/// Which per-address cap refused a connection.
#[derive(Debug, Clone, Copy)]
enum AddressFull {
    Connections,
    Handshakes,
}

/// Connections and handshakes in progress per source address, shared by the workers. An
/// address has an entry only while it holds a slot, so the table is bounded by the connection
/// cap.
struct AddressTable {
    max_connections: usize,
    max_handshakes: usize,
    counts: Mutex<HashMap<IpAddr, AddressCounts>>,
}

#[derive(Default)]
struct AddressCounts {
    connections: usize,
    handshakes: usize,
}

/// A connection's (or its handshake's) place in its address's count, given back on drop.
struct AddressSlot {
    table: Arc<AddressTable>,
    key: IpAddr,
    handshake: bool,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.table.lock();
        if let Entry::Occupied(mut entry) = counts.entry(self.key) {
            let c = entry.get_mut();
            if self.handshake {
                c.handshakes = c.handshakes.saturating_sub(1);
            } else {
                c.connections = c.connections.saturating_sub(1);
            }
            if c.connections == 0 && c.handshakes == 0 {
                entry.remove();
            }
        }
    }
}

impl AddressTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, AddressCounts>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection slot and a handshake slot for `ip`, or which cap is full.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<(AddressSlot, AddressSlot), AddressFull> {
        let key = address_key(ip);
        {
            let mut counts = self.lock();
            let c = counts.entry(key).or_default();
            if c.connections >= self.max_connections {
                return Err(AddressFull::Connections);
            }
            if c.handshakes >= self.max_handshakes {
                return Err(AddressFull::Handshakes);
            }
            c.connections += 1;
            c.handshakes += 1;
        }
        let slot = |handshake| AddressSlot {
            table: Arc::clone(self),
            key,
            handshake,
        };
        Ok((slot(false), slot(true)))
    }
}

/// The address a peer is counted under: IPv4 as is (also when mapped into IPv6), IPv6 by its
/// /64 prefix, the block one host is usually given.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
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
        auth: Arc::new(AuthContext::new(
            store,
            &config.auth,
            &config.limits.rates,
            served.pool.clone(),
            Arc::clone(&observer.metrics.rate_limits),
        )),
        served,
        verifier: identity.verifier(),
        connections: Arc::new(Semaphore::new(config.max_connections)),
        handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
        addresses: Arc::new(AddressTable {
            max_connections: config.limits.max_connections_per_address,
            max_handshakes: config.limits.max_handshakes_per_address,
            counts: Mutex::default(),
        }),
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
            // Dropping the stream closes a connection that finds a cap full.
            let Some(slots) = shared.admit(peer) else {
                continue;
            };
            ConnectionStats::count(&shared.stats().accepted);
            tracker.spawn_local(serve_connection(
                stream,
                peer,
                slots,
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
    slots: Slots,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let _open = shared.observer.metrics.connection_opened();
    let config = &shared.config;
    // The current certificate: a renewed one is presented from the next handshake on.
    let certificate = shared.identity.certificate();
    // Boxed: the handshake's state (about 4 KiB: snow's handshake and two message buffers)
    // lives on the heap while it runs and is freed after, instead of widening this task —
    // which every connection keeps for as long as it is open — by that much.
    let respond = Box::pin(noise::respond(
        &mut stream,
        &shared.identity.noise,
        &certificate,
        config.handshake_timeout,
    ));
    let handshake = tokio::select! {
        () = shutdown.cancelled() => return,
        r = respond => r,
    };
    let Slots {
        _connection: _connection_slots,
        handshake: handshake_slots,
    } = slots;
    drop(handshake_slots);
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
    serve_session(stream, peer, outcome, &shared, &shutdown).await;
}

/// Serves RPC on a connection whose handshake gave `outcome`, until the peer leaves, misses
/// the bind deadline, or the server shuts down (then drains it).
async fn serve_session(
    stream: TcpStream,
    peer: SocketAddr,
    outcome: noise::HandshakeOutcome,
    shared: &Shared,
    shutdown: &CancellationToken,
) {
    let config = &shared.config;
    let in_flight = Rc::new(InFlight::new(Arc::clone(&shared.observer)));
    // A peer that presented a certificate a trusted cluster key vouches for, valid now, is a
    // fellow node; one whose certificate is refused is told why when it asks for a node's
    // interface.
    let (peer_node, refused_certificate) = match &outcome.peer_certificate {
        None => (None, None),
        Some(cert) => match shared.verifier.verify(cert, &outcome.remote_static) {
            Ok(role) => (Some(role), None),
            Err(e) => {
                ConnectionStats::count(&shared.observer.metrics.certificates.peers_refused);
                debug!(%peer, reason = %e, "peer's node certificate refused");
                (None, Some(e.to_string()))
            }
        },
    };
    let session = SessionInfo {
        handshake_hash: outcome.handshake_hash,
        client_static: outcome.remote_static,
        peer_node,
        refused_certificate,
        // Nodes are not rate limited; clients are counted by their address's key.
        peer_address: peer_node.is_none().then(|| address_key(peer.ip())),
    };
    let exempt = peer_node.is_some();
    let frames = ConnectionFrames::default();
    let hooks = SessionHooks {
        max_unbound_ping_bytes: (!exempt).then_some(config.limits.max_unbound_ping_bytes),
        max_reply_bytes: Some(config.reply_budget()),
        max_subscriptions: (!exempt).then_some(config.limits.max_subscriptions_per_connection),
        frames: Some(frames.clone()),
        ..SessionHooks::default()
    };
    let bootstrap: bootstrap::Client = capnp_rpc::new_client(BootstrapImpl::new(
        config.role,
        session,
        Arc::clone(&shared.auth),
        shared.served.backend.clone(),
        shared.served.shard.clone(),
        Rc::clone(&in_flight),
        hooks.clone(),
    ));
    let (r, w) = stream.into_split();
    let limits = ChannelLimits {
        max_frame_bytes: config.max_frame_bytes,
    };
    // A client's calls in flight are capped (backpressure); a node's link carries every
    // group routed through it and is not.
    let gate_limits = GateLimits {
        max_calls_in_flight: (!exempt).then_some(config.limits.max_calls_in_flight),
        throttled: Some(Arc::clone(&shared.stats().throttled)),
        buffered: Some(Arc::clone(&shared.stats().rpc_buffered_bytes)),
        ..GateLimits::default()
    };
    let conn = rpc_system_pushing(
        r,
        w,
        outcome.session,
        limits,
        gate_limits,
        Side::Server,
        Some(bootstrap.client),
        frames.ack_handler(),
        Reading::Inline,
    );
    frames.set_port(conn.port.clone());
    let (rpc, gate, port) = (conn.rpc, conn.gate, conn.port);
    let disconnector = rpc.get_disconnector();
    // The pump writes for the RPC system and the push frames: the connection ends with either.
    // It is a task of its own (ended with the connection), so that a push wakes the pump
    // alone: polled together, every push frame would also poll the RPC system and each of
    // this connection's deadlines below, once per subscriber per entry.
    let mut pump = AbortOnDropHandle::new(tokio::task::spawn_local(conn.pump));
    let rpc = async move {
        tokio::select! {
            r = rpc => r,
            r = &mut pump => match r {
                Ok(written) => written.map_err(|e| capnp::Error::disconnected(e.to_string())),
                Err(e) => Err(capnp::Error::disconnected(format!("the pump stopped: {e}"))),
            },
        }
    };
    let mut rpc = pin!(rpc);

    tokio::select! {
        r = &mut rpc => {
            if let Some(why) = gate.refused() {
                ConnectionStats::count(&shared.stats().refused_messages);
                debug!(%peer, why, "refused an RPC message; closed the connection");
            } else if let Err(e) = r {
                ConnectionStats::count(&shared.stats().connection_errors);
                debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        }
        () = write_stall_deadline(&gate, &port, exempt, config.limits.write_stall_timeout) => {
            ConnectionStats::count(&shared.stats().write_stalls);
            debug!(%peer, "writes unread for too long; closing connection");
            return;
        }
        () = bind_deadline(&hooks.bound, exempt, config.limits.bind_timeout) => {
            ConnectionStats::count(&shared.stats().bind_timeouts);
            debug!(%peer, "no identity bound before the deadline; closing connection");
            return;
        }
        () = idle_deadline(&in_flight, exempt, config.limits.idle_timeout) => {
            ConnectionStats::count(&shared.stats().idle_timeouts);
            debug!(%peer, "idle with no subscription; closing connection");
            return;
        }
        () = shutdown.cancelled() => {}
    }
    // Draining: tell the client to move to another node, keep serving the calls in progress,
    // then close politely.
    hooks.events.draining();
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

/// Resolves when a peer that is not a node (`exempt` false) has not bound an identity within
/// `after`; never otherwise.
/// Resolves once the connection has gone `after` without a call while holding no
/// subscription (never for a cluster node).
async fn idle_deadline(in_flight: &InFlight, exempt: bool, after: Duration) {
    if exempt {
        return std::future::pending().await;
    }
    loop {
        // Checked again at the earliest moment the connection could have become idle long
        // enough; while it is in use, a quarter of the timeout later.
        let wake = match in_flight.idle_since() {
            Some(since) if since.elapsed() >= after => return,
            Some(since) => since + after,
            None => std::time::Instant::now() + after / 4,
        };
        tokio::time::sleep_until(wake.into()).await;
    }
}

/// Resolves once the connection's writes have been refused by the socket (its peer not
/// reading) for `after` (never for a cluster node).
async fn write_stall_deadline(gate: &GateState, port: &PushPort, exempt: bool, after: Duration) {
    if exempt {
        return std::future::pending().await;
    }
    loop {
        // Checked again when a stall could have lasted long enough; while none, a quarter of
        // the timeout later.
        // The RPC stream's writes, or the pump's (push frames too).
        let stalled = match (gate.write_stalled_since(), port.write_stalled_since()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let wake = match stalled {
            Some(since) if since.elapsed() >= after => return,
            Some(since) => since + after,
            None => std::time::Instant::now() + after / 4,
        };
        tokio::time::sleep_until(wake.into()).await;
    }
}

async fn bind_deadline(bound: &BindSignal, exempt: bool, after: Duration) {
    if exempt || tokio::time::timeout(after, bound.bound()).await.is_ok() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn an_ipv6_host_is_counted_by_its_64_and_mapped_ipv4_as_ipv4() -> TestResult {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse()?;
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse()?;
        let c: IpAddr = "2001:db8:1:3::1".parse()?;
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse()?;
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>()?);
        Ok(())
    }

    #[test]
    fn address_slots_are_given_back_and_entries_removed() -> TestResult {
        let table = Arc::new(AddressTable {
            max_connections: 2,
            max_handshakes: 1,
            counts: Mutex::default(),
        });
        let ip: IpAddr = "192.0.2.1".parse()?;
        let full = |f: AddressFull| format!("refused: {f:?}");
        let (conn1, hs1) = table.admit(ip).map_err(full)?;
        assert!(matches!(table.admit(ip), Err(AddressFull::Handshakes)));
        drop(hs1);
        let (conn2, hs2) = table.admit(ip).map_err(full)?;
        drop(hs2);
        assert!(matches!(table.admit(ip), Err(AddressFull::Connections)));
        assert!(table.admit("192.0.2.2".parse()?).is_ok());
        drop((conn1, conn2));
        assert!(table.lock().is_empty(), "no entry outlives its slots");
        Ok(())
    }
}
