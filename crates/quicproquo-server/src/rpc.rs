//! The Cap'n Proto services this node serves to a connection.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use quicproquo_core::{IdentityKey, NodeRole};
use quicproquo_proto::auth_capnp::authentication_service;
use quicproquo_proto::bootstrap_capnp::{bootstrap, session_events};
use quicproquo_proto::common_capnp;
use quicproquo_proto::delivery_capnp::delivery_service;
use quicproquo_proto::errors::{ErrorCode, error};
use tokio::sync::Notify;

use crate::auth::{AuthContext, AuthService, store_error};
use crate::cluster::service::ShardServiceImpl;
use crate::delivery::DeliveryService;
use crate::delivery::backend::Backend;
use crate::delivery::shard::Shard;
use crate::ops::Observer;
use crate::ops::spans::{self, trace_of};
use crate::store::Store;
use quicproquo_telemetry::propagation::WireContext;

/// Counts calls in progress on one connection, so a drain can wait for them, and observes
/// each call (its span, metrics) through the server's [`Observer`].
#[derive(Debug)]
pub(crate) struct InFlight {
    calls: Cell<usize>,
    idle: Notify,
    observer: Arc<Observer>,
}

impl InFlight {
    pub(crate) fn new(observer: Arc<Observer>) -> Self {
        Self {
            calls: Cell::new(0),
            idle: Notify::new(),
            observer,
        }
    }

    /// The server's observer (metrics, group hashes).
    pub(crate) fn observer(&self) -> &Arc<Observer> {
        &self.observer
    }

    /// Serves one call of `service`/`method`: counts it in flight, runs it inside a server
    /// span whose parent is the caller's `trace`, and records its status and latency.
    pub(crate) async fn serve<T>(
        self: &Rc<Self>,
        service: &'static str,
        method: &'static str,
        trace: WireContext,
        call: impl Future<Output = Result<T, capnp::Error>>,
    ) -> Result<T, capnp::Error> {
        let _guard = self.enter();
        spans::serve(&self.observer, service, method, trace, call).await
    }

    pub(crate) fn enter(self: &Rc<Self>) -> InFlightGuard {
        self.calls.set(self.calls.get() + 1);
        InFlightGuard(Rc::clone(self))
    }

    /// Resolves once no call is in progress.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.calls.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Marks one call as in progress until dropped.
pub(crate) struct InFlightGuard(Rc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let n = self.0.calls.get().saturating_sub(1);
        self.0.calls.set(n);
        if n == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What the handshake established about the peer, for the identity binding.
pub(crate) struct SessionInfo {
    pub(crate) handshake_hash: [u8; 32],
    pub(crate) client_static: [u8; 32],
    /// The role a valid cluster certificate vouches for, when the peer is a node.
    pub(crate) peer_node: Option<NodeRole>,
}

/// Where a connection keeps the client's `SessionEvents` capability, to warn it of a drain.
#[derive(Clone, Default)]
pub(crate) struct EventsSlot(Rc<RefCell<Option<session_events::Client>>>);

impl EventsSlot {
    /// Tells the client (if it asked to be told) that this node is draining. Fire and forget:
    /// a client that does not answer is closed at the end of the drain anyway.
    pub(crate) fn draining(&self) {
        if let Some(events) = self.0.borrow().clone() {
            let call = events.draining_request().send().promise;
            tokio::task::spawn_local(async move {
                let _ = call.await;
            });
        }
    }
}

/// The bootstrap capability handed to every connection after the handshake.
pub(crate) struct BootstrapImpl {
    role: NodeRole,
    session: SessionInfo,
    auth: Arc<AuthContext>,
    backend: Option<Backend>,
    shard: Option<Arc<Shard>>,
    bound: RefCell<Option<(IdentityKey, Services)>>,
    in_flight: Rc<InFlight>,
    events: EventsSlot,
}

/// The capabilities a bound session holds.
#[derive(Clone)]
struct Services {
    auth: authentication_service::Client,
    delivery: delivery_service::Client,
}

impl BootstrapImpl {
    pub(crate) fn new(
        role: NodeRole,
        session: SessionInfo,
        auth: Arc<AuthContext>,
        backend: Option<Backend>,
        shard: Option<Arc<Shard>>,
        in_flight: Rc<InFlight>,
        events: EventsSlot,
    ) -> Self {
        Self {
            role,
            session,
            auth,
            backend,
            shard,
            bound: RefCell::new(None),
            in_flight,
            events,
        }
    }
}

fn wire_role(role: NodeRole) -> common_capnp::NodeRole {
    match role {
        NodeRole::Edge => common_capnp::NodeRole::Edge,
        NodeRole::Shard => common_capnp::NodeRole::Shard,
        _ => common_capnp::NodeRole::Standalone,
    }
}

impl bootstrap::Server for BootstrapImpl {
    async fn ping(
        self: Rc<Self>,
        params: bootstrap::PingParams,
        mut results: bootstrap::PingResults,
    ) -> Result<(), capnp::Error> {
        let trace = trace_of(params.get().and_then(|p| p.get_trace()));
        let in_flight = Rc::clone(&self.in_flight);
        in_flight
            .serve("Bootstrap", "ping", trace, async move {
                let params = params.get()?;
                let payload = params.get_payload()?;
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
                let mut out = results.get();
                out.set_payload(payload);
                out.set_role(wire_role(self.role));
                out.set_server_time_micros(now);
                Ok(())
            })
            .await
    }

    async fn bind(
        self: Rc<Self>,
        params: bootstrap::BindParams,
        mut results: bootstrap::BindResults,
    ) -> Result<(), capnp::Error> {
        let trace = trace_of(params.get().and_then(|p| p.get_trace()));
        let in_flight = Rc::clone(&self.in_flight);
        in_flight
            .serve("Bootstrap", "bind", trace, async move {
                let params = params.get()?;
                let Some(backend) = self.backend.clone() else {
                    return Err(error(
                        ErrorCode::WrongRole,
                        format!("this node is a {}: clients connect to an edge", self.role),
                    ));
                };
                let identity = IdentityKey::from_slice(params.get_identity_key()?)
                    .map_err(|e| error(ErrorCode::InvalidArgument, e))?;
                identity
                    .verify_binding(
                        &self.session.handshake_hash,
                        &self.session.client_static,
                        params.get_signature()?,
                    )
                    .map_err(|e| error(ErrorCode::BadBinding, e))?;
                let existing = self.bound.borrow().clone();
                let services = match existing {
                    Some((bound, client)) if bound == identity => client,
                    Some(_) => {
                        return Err(error(
                            ErrorCode::AlreadyBound,
                            "this session is bound to another identity",
                        ));
                    }
                    None => {
                        self.auth
                            .store
                            .register_identity(&identity)
                            .await
                            .map_err(store_error)?;
                        // Another bind may have completed while the store was answering.
                        if let Some((bound, client)) = self.bound.borrow().clone() {
                            if bound != identity {
                                return Err(error(
                                    ErrorCode::AlreadyBound,
                                    "this session is bound to another identity",
                                ));
                            }
                            client
                        } else {
                            let services = Services {
                                auth: capnp_rpc::new_client(AuthService::new(
                                    identity,
                                    Arc::clone(&self.auth),
                                    Rc::clone(&self.in_flight),
                                )),
                                delivery: capnp_rpc::new_client(DeliveryService::new(
                                    identity,
                                    backend,
                                    Rc::clone(&self.in_flight),
                                )),
                            };
                            *self.bound.borrow_mut() = Some((identity, services.clone()));
                            services
                        }
                    }
                };
                if params.has_events() {
                    *self.events.0.borrow_mut() = Some(params.get_events()?);
                }
                let mut out = results.get();
                out.set_auth(services.auth);
                out.set_delivery(services.delivery);
                Ok(())
            })
            .await
    }

    async fn cluster(
        self: Rc<Self>,
        _: bootstrap::ClusterParams,
        mut results: bootstrap::ClusterResults,
    ) -> Result<(), capnp::Error> {
        if self.session.peer_node.is_none() {
            return Err(error(
                ErrorCode::NotANode,
                "only cluster nodes may use the internal interface",
            ));
        }
        let Some(shard) = self.shard.clone() else {
            return Err(error(
                ErrorCode::WrongRole,
                format!("this node is a {}, not a shard", self.role),
            ));
        };
        results
            .get()
            .set_shard(capnp_rpc::new_client(ShardServiceImpl::new(
                shard,
                Rc::clone(&self.in_flight),
            )));
        Ok(())
    }
}
