//! The bootstrap capability every connection gets after the handshake: `ping`, `bind` (which
//! hands a client its Authentication and Delivery Services) and `cluster` (the shard's
//! internal interface, for edges only: a peer whose certificate is refused, or valid for
//! another role, is told why).

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

use super::auth::AuthService;
use super::backend::Backend;
use super::delivery::DeliveryService;
use super::frames::ConnectionFrames;
use super::shard::ShardServiceImpl;
use crate::auth::AuthContext;
use crate::model::page::DEFAULT_PAGE_BYTES;
use crate::obs::calls::InFlight;
use crate::ordering::Appender;
use crate::store::Store;
use crate::wire::errors::auth_error;
use crate::wire::{parse, store_error};

/// What the handshake established about the peer, for the identity binding.
pub struct SessionInfo {
    /// The Noise handshake hash (the channel binding a client signs).
    pub handshake_hash: [u8; 32],
    /// The peer's Noise static key.
    pub client_static: [u8; 32],
    /// The role a valid cluster certificate vouches for, when the peer is a node.
    pub peer_node: Option<NodeRole>,
    /// Why the certificate the peer presented was refused, if it presented one that was.
    pub refused_certificate: Option<String>,
    /// The source address the peer is counted under for rate limits (an IPv6 /64 as one).
    pub peer_address: Option<std::net::IpAddr>,
}

/// Where a connection keeps the client's `SessionEvents` capability, to warn it of a drain.
#[derive(Clone, Default)]
pub struct EventsSlot(Rc<RefCell<Option<session_events::Client>>>);

impl EventsSlot {
    /// Tells the client (if it asked to be told) that this node is draining. Fire and forget:
    /// a client that does not answer is closed at the end of the drain anyway.
    pub fn draining(&self) {
        if let Some(events) = self.0.borrow().clone() {
            let call = events.draining_request().send().promise;
            tokio::task::spawn_local(async move {
                let _ = call.await;
            });
        }
    }
}

/// Set once a connection's session binds an identity; the runtime waits on it for the bind
/// deadline.
#[derive(Clone, Default)]
pub struct BindSignal(Rc<(Cell<bool>, Notify)>);

impl BindSignal {
    /// Marks the session bound and wakes whoever waits.
    fn set(&self) {
        self.0.0.set(true);
        self.0.1.notify_waiters();
    }

    /// Whether the session has bound an identity.
    pub fn is_bound(&self) -> bool {
        self.0.0.get()
    }

    /// Resolves once the session has bound an identity.
    pub async fn bound(&self) {
        loop {
            let notified = self.0.1.notified();
            if self.is_bound() {
                return;
            }
            notified.await;
        }
    }
}

/// What the runtime and the bootstrap of one connection share.
#[derive(Clone, Default)]
pub struct SessionHooks {
    /// The client's `SessionEvents` capability, to warn it of a drain.
    pub events: EventsSlot,
    /// Set when the session binds.
    pub bound: BindSignal,
    /// Largest `ping` payload answered before the session binds (`None`: no limit, for
    /// nodes).
    pub max_unbound_ping_bytes: Option<usize>,
    /// Byte budget of one page of a reply (`fetch`, `inbox`) or push (subscriptions, a
    /// shard's pushes to an edge; also each subscriber's bytes in flight); `None`: the default
    /// [`crate::model::page::DEFAULT_PAGE_BYTES`].
    pub max_reply_bytes: Option<usize>,
    /// Most subscriptions one connection may hold (`None`: no limit).
    pub max_subscriptions: Option<usize>,
    /// The connection's push frames (`None`: it carries none, `subscribeFrames` is refused).
    pub frames: Option<ConnectionFrames>,
}

/// The bootstrap capability handed to every connection after the handshake.
pub struct BootstrapImpl {
    role: NodeRole,
    session: SessionInfo,
    auth: Arc<AuthContext>,
    backend: Option<Backend>,
    shard: Option<Arc<Appender>>,
    bound: RefCell<Option<(IdentityKey, Services)>>,
    in_flight: Rc<InFlight>,
    hooks: SessionHooks,
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
        shard: Option<Arc<Appender>>,
        in_flight: Rc<InFlight>,
        hooks: SessionHooks,
    ) -> Self {
        Self {
            role,
            session,
            auth,
            backend,
            shard,
            bound: RefCell::new(None),
            in_flight,
            hooks,
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
        serve!(self.in_flight, "Bootstrap", "ping", params, async move {
            let params = params.get()?;
            let payload = params.get_payload()?;
            // Before bind, a peer that is not a node gets small echoes only: it cannot make
            // the node send MiBs to someone who need not even read them.
            if let Some(max) = self.hooks.max_unbound_ping_bytes
                && payload.len() > max
                && !self.hooks.bound.is_bound()
            {
                return Err(error(
                    ErrorCode::TooLarge,
                    format!("a ping before bind carries at most {max} bytes"),
                ));
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            let mut out = results.get();
            out.set_payload(payload);
            out.set_role(wire_role(self.role));
            out.set_server_time_micros(now);
            Ok(())
        })
    }

    async fn bind(
        self: Rc<Self>,
        params: bootstrap::BindParams,
        mut results: bootstrap::BindResults,
    ) -> Result<(), capnp::Error> {
        serve!(self.in_flight, "Bootstrap", "bind", params, async move {
            let params = params.get()?;
            let Some(backend) = self.backend.clone() else {
                return Err(error(
                    ErrorCode::WrongRole,
                    format!("this node is a {}: clients connect to an edge", self.role),
                ));
            };
            let identity = parse::identity(params.get_identity_key()?)?;
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
                    // Each bind may register a new identity: counted per source address.
                    self.auth
                        .admit_bind(self.session.peer_address)
                        .map_err(auth_error)?;
                    self.auth
                        .store()
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
                                (identity, self.session.peer_address),
                                Arc::clone(&self.auth),
                                Rc::clone(&self.in_flight),
                            )),
                            delivery: capnp_rpc::new_client(DeliveryService::new(
                                identity,
                                backend,
                                Rc::clone(&self.in_flight),
                                (
                                    self.hooks.max_reply_bytes.unwrap_or(DEFAULT_PAGE_BYTES),
                                    self.hooks.max_subscriptions.unwrap_or(usize::MAX),
                                ),
                                self.hooks.frames.clone(),
                            )),
                        };
                        *self.bound.borrow_mut() = Some((identity, services.clone()));
                        self.hooks.bound.set();
                        services
                    }
                }
            };
            if params.has_events() {
                *self.hooks.events.0.borrow_mut() = Some(params.get_events()?);
            }
            let mut out = results.get();
            out.set_auth(services.auth);
            out.set_delivery(services.delivery);
            Ok(())
        })
    }

    async fn cluster(
        self: Rc<Self>,
        _: bootstrap::ClusterParams,
        mut results: bootstrap::ClusterResults,
    ) -> Result<(), capnp::Error> {
        serve!(self.in_flight, "Bootstrap", "cluster", async move {
            let peer = match (self.session.peer_node, &self.session.refused_certificate) {
                (_, Some(reason)) => {
                    return Err(error(
                        ErrorCode::NotANode,
                        format!("node certificate refused: {reason}"),
                    ));
                }
                (None, None) => {
                    return Err(error(
                        ErrorCode::NotANode,
                        "only cluster nodes may use the internal interface",
                    ));
                }
                (Some(role), None) => role,
            };
            // Only edges call a shard: a shard's or a standalone node's certificate does not
            // open its internal interface.
            if peer != NodeRole::Edge {
                return Err(error(
                    ErrorCode::WrongRole,
                    format!("a shard serves edges only, not a {peer}"),
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
                    self.hooks.max_reply_bytes.unwrap_or(DEFAULT_PAGE_BYTES),
                )));
            Ok(())
        })
    }
}
