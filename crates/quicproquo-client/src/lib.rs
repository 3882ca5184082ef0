//! The quicproquo client library, and the `qpq` command-line client built on it.
//!
//! What it is: [`Connection`] opens a TCP connection to a server node, runs the Noise_XX
//! handshake (refusing any node the pinned cluster key does not vouch for), and speaks Cap'n
//! Proto RPC over the encrypted channel. [`connect_any`] tries a list of servers in order.
//! [`Connection::bind`] binds the session to the device identity and yields the
//! [`AuthClient`] (names, KeyPackages). [`ClientState`] is the device's state file.
//!
//! What it is not: thread-safe. capnp-rpc is single-threaded, so a [`Connection`] must be
//! created and used inside a `tokio::task::LocalSet`.
//!
//! # Layout
//!
//! Modules by role, lowest first: a module imports only from its own row and the rows above
//! it, never from a row below. The crate root holds two rows (the errors every module uses,
//! and the connection that hands out the service clients).
//!
//! | Role | Module | What lives there |
//! |------|--------|------------------|
//! | Errors | crate root | [`ClientError`] and the deadline and error mapping of every call |
//! | Wire, tracing | `wire`, `trace` (private) | one reader/writer per wire type several calls share (identity lists, group ids); a client span per call, its context written into the request |
//! | Service clients | [`auth`], [`delivery`], [`events`] | one method per RPC of the served interfaces, typed results; no MLS, no state file |
//! | Connection | crate root | [`Connection`] (TCP, Noise_XX against the pinned cluster key, the RPC session), [`Session`], [`connect_any`] |
//! | Device state | [`state`] | the state file (identity, MLS secrets, cursors, own message ids); no network |
//! | Commit protocol | [`commit`] | the one commit driver (a pure state machine and its thin I/O layer), the one batched log reader, the rule for an own commit coming back |
//! | Messenger | [`chat`] | MLS groups over the Delivery Service and the state file; commits only through [`commit`] |
//! | Live following | [`follow`] | a device's groups and inbox followed across node failures, on top of [`chat`] |
//! | Binary | `cli/` and `main.rs` (`qpq`) | one function per command, and the printing; the library's public API only |
//!
//! Rules with one home: a group's log is processed in order and an own commit still pending
//! is merged where the log holds it ([`commit::is_pending_own_commit`]); a pending commit is
//! discarded only on a definite refusal ([`commit::CommitDriver`]); durations are parsed by
//! `quicproquo_core::duration`. The load test (`loadtest/`) drives its members through this
//! same API and commit driver.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capnp_rpc::rpc_twoparty_capnp::Side;
use quicproquo_core::channel::ChannelLimits;
use quicproquo_core::gate::GateLimits;
use quicproquo_core::rpc::{Reading, rpc_system_pushing};
use quicproquo_core::{
    ClusterPublicKey, IdentityKey, IdentityKeypair, NodeRole, NodeVerifier, NoiseKeypair,
    TransportError, noise,
};
use quicproquo_proto::bootstrap_capnp::bootstrap;
use quicproquo_proto::errors::{ErrorCode, code_of};

pub mod auth;
pub mod chat;
pub mod commit;
pub mod delivery;
pub mod events;
pub mod follow;
mod frames;
pub mod state;
mod trace;
mod wire;

use frames::ClientFrames;

pub use auth::{AuthClient, FetchedKeyPackage};
pub use delivery::{DeliveryClient, Envelope, SendOutcome};
pub use state::ClientState;
use tokio::net::TcpStream;
pub use wire::short_group_id;

/// Errors a client sees.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The TCP connection could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The server address.
        addr: SocketAddr,
        /// The OS error (refused, unreachable, ...).
        source: std::io::Error,
    },
    /// The server did not answer within the deadline.
    #[error("{addr} did not answer within {after:?} ({stage})")]
    Timeout {
        /// The server address.
        addr: SocketAddr,
        /// The deadline.
        after: Duration,
        /// What was being waited for.
        stage: &'static str,
    },
    /// The server is not vouched for by the pinned cluster key.
    #[error("{addr} is not vouched for by the pinned cluster key (wrong --server-key?)")]
    WrongClusterKey {
        /// The server address.
        addr: SocketAddr,
    },
    /// The server's certificate is valid but for a role these options do not connect to
    /// (a shard serves only edges).
    #[error("{addr} is a {role} node, not one that serves clients")]
    WrongRole {
        /// The server address.
        addr: SocketAddr,
        /// The role its certificate names.
        role: NodeRole,
    },
    /// The handshake or the encrypted channel failed.
    #[error("{addr}: {source}")]
    Transport {
        /// The server address.
        addr: SocketAddr,
        /// What failed.
        source: TransportError,
    },
    /// An RPC failed (the server answered with an error, or the connection broke).
    #[error("rpc failed: {0}")]
    Rpc(#[from] capnp::Error),
    /// No server address was given, or a name resolved to nothing.
    #[error("no server address to connect to")]
    NoServers,
    /// Every server in the list failed; the last error is kept.
    #[error("no server could be reached; last error: {0}")]
    AllFailed(Box<Self>),
    /// A key could not be generated.
    #[error(transparent)]
    Key(#[from] quicproquo_core::KeyError),
    /// The server refused the call with a typed error.
    #[error("{code}: {message}")]
    Service {
        /// The stable error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The node announced it is draining: connect to another one.
    #[error("{0} is draining: connect to another node")]
    Draining(SocketAddr),
    /// MLS key material could not be created or read.
    #[error(transparent)]
    Mls(#[from] quicproquo_core::mls::MlsError),
    /// The client state file could not be read or written.
    #[error(transparent)]
    State(#[from] state::StateError),
}

impl ClientError {
    /// The server's error code, when the server refused a call.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Service { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Turns a failed call into a typed [`ClientError::Service`] when the server sent a code.
pub(crate) fn call_error(e: capnp::Error) -> ClientError {
    match code_of(&e) {
        Some(code) => {
            let message = e
                .extra
                .split_once("] ")
                .map_or(e.extra.as_str(), |(_, m)| m)
                .to_owned();
            ClientError::Service { code, message }
        }
        None => ClientError::Rpc(e),
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Checks servers' certificates (issuer among the pinned cluster keys, signature,
    /// validity) — shared, with its cache, by every connection made with these options.
    pub verifier: Arc<NodeVerifier>,
    /// Deadline for the TCP connection, the handshake and each call, each separately.
    pub timeout: Duration,
    /// Largest frame accepted from the server.
    pub max_frame_bytes: usize,
    /// The roles of the servers these options connect to, checked at the handshake: edges
    /// and standalone nodes by default (a shard serves only edges).
    pub roles: Vec<NodeRole>,
}

impl ConnectOptions {
    /// Options with a 10 s timeout and the default 16 MiB frame limit.
    pub fn new(cluster_key: ClusterPublicKey) -> Self {
        Self::with_verifier(NodeVerifier::new(cluster_key))
    }

    /// Options pinning every key of `cluster_keys` (during a rollover: the old and the new
    /// cluster key), otherwise like [`ConnectOptions::new`].
    pub fn with_keys(
        cluster_keys: impl IntoIterator<Item = ClusterPublicKey>,
    ) -> Result<Self, quicproquo_core::KeyError> {
        Ok(Self::with_verifier(NodeVerifier::with_keys(cluster_keys)?))
    }

    fn with_verifier(verifier: NodeVerifier) -> Self {
        Self {
            verifier: Arc::new(verifier),
            timeout: Duration::from_secs(10),
            max_frame_bytes: quicproquo_core::channel::DEFAULT_MAX_FRAME_BYTES,
            roles: vec![NodeRole::Edge, NodeRole::Standalone],
        }
    }
}

/// The answer to a ping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    /// The echoed payload.
    pub payload: Vec<u8>,
    /// Round-trip time measured by the client.
    pub rtt: Duration,
}

/// The services of a session bound to an identity.
#[derive(Debug, Clone)]
pub struct Session {
    /// Names and KeyPackages.
    pub auth: AuthClient,
    /// Group logs and Welcomes.
    pub delivery: DeliveryClient,
    /// Set when the node announces it is draining.
    pub draining: events::Draining,
}

/// An authenticated connection to one server node.
pub struct Connection {
    addr: SocketAddr,
    client_static: [u8; 32],
    server_role: NodeRole,
    handshake_hash: [u8; 32],
    timeout: Duration,
    bootstrap: bootstrap::Client,
    disconnector: capnp_rpc::Disconnector<Side>,
    frames: ClientFrames,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("server_role", &self.server_role)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `addr`, authenticates it against the pinned cluster key and starts RPC.
    ///
    /// Must be called inside a `tokio::task::LocalSet`: the RPC system runs as a local task.
    pub async fn connect(addr: SocketAddr, options: &ConnectOptions) -> Result<Self, ClientError> {
        let local = NoiseKeypair::generate()?;
        Self::connect_with_key(addr, options, &local).await
    }

    /// Like [`Connection::connect`], presenting `local` as the client's Noise static key.
    pub async fn connect_with_key(
        addr: SocketAddr,
        options: &ConnectOptions,
        local: &NoiseKeypair,
    ) -> Result<Self, ClientError> {
        let timeout = options.timeout;
        let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout {
                addr,
                after: timeout,
                stage: "tcp connect",
            })?
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let outcome = noise::initiate(&mut stream, local, &options.verifier, timeout)
            .await
            .map_err(|e| match e {
                TransportError::WrongClusterKey => ClientError::WrongClusterKey { addr },
                TransportError::HandshakeTimeout => ClientError::Timeout {
                    addr,
                    after: timeout,
                    stage: "handshake",
                },
                source => ClientError::Transport { addr, source },
            })?;
        let server_role = outcome.server_role.unwrap_or(NodeRole::Standalone);
        if !options.roles.contains(&server_role) {
            return Err(ClientError::WrongRole {
                addr,
                role: server_role,
            });
        }
        let (r, w) = stream.into_split();
        let limits = ChannelLimits {
            max_frame_bytes: options.max_frame_bytes,
        };
        let frames = ClientFrames::default();
        let conn = rpc_system_pushing(
            r,
            w,
            outcome.session,
            limits,
            GateLimits::default(),
            Side::Client,
            None,
            frames.handler(limits),
            Reading::Task,
        );
        frames.set_port(conn.port);
        let mut rpc = conn.rpc;
        let bootstrap: bootstrap::Client = rpc.bootstrap(Side::Server);
        let disconnector = rpc.get_disconnector();
        // The pump writes for the RPC system and the acknowledgements: the connection ends
        // with either. The read pump reads for both; the RPC system sees the end of the stream
        // (or its error) once it has read every RPC byte before it. Each pump is a task of
        // its own (ended with the connection), so that a push frame wakes the read pump alone,
        // not the RPC system, which a subscriber's connection would otherwise poll per entry.
        let (pump, read_pump) = (conn.pump, conn.read_pump);
        tokio::task::spawn_local(async move {
            use tokio_util::task::AbortOnDropHandle;
            let pump = AbortOnDropHandle::new(tokio::task::spawn_local(pump));
            let _reading = read_pump.map(|r| AbortOnDropHandle::new(tokio::task::spawn_local(r)));
            tokio::select! {
                _ = rpc => {}
                _ = pump => {}
            }
        });
        Ok(Self {
            addr,
            client_static: *local.public(),
            server_role,
            handshake_hash: outcome.handshake_hash,
            timeout,
            bootstrap,
            disconnector,
            frames,
        })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The role the cluster key vouches for.
    pub fn server_role(&self) -> NodeRole {
        self.server_role
    }

    /// The Noise handshake hash of this session (for channel binding).
    pub fn handshake_hash(&self) -> &[u8; 32] {
        &self.handshake_hash
    }

    /// Sends `payload` and waits for it to be echoed back.
    pub async fn ping(&self, payload: &[u8]) -> Result<Pong, ClientError> {
        let span = trace::rpc_span(self.addr, "Bootstrap", "ping");
        let mut request = self.bootstrap.ping_request();
        trace::write_trace(request.get().init_trace(), &span);
        request.get().set_payload(payload);
        let started = Instant::now();
        let response = trace::traced(&span, self.timed("ping", request.send().promise)).await?;
        let rtt = started.elapsed();
        let payload = response.get()?.get_payload()?.to_vec();
        Ok(Pong { payload, rtt })
    }

    /// Our Noise static public key for this session.
    pub fn client_static(&self) -> &[u8; 32] {
        &self.client_static
    }

    /// Binds this session to `identity` and returns its services.
    pub async fn bind(&self, identity: &IdentityKeypair) -> Result<Session, ClientError> {
        let signature = identity.sign_binding(&self.handshake_hash, &self.client_static);
        self.bind_with_signature(&identity.public(), &signature)
            .await
    }

    /// Binds with a binding signature made elsewhere (see [`IdentityKeypair::sign_binding`]).
    pub async fn bind_with_signature(
        &self,
        identity: &IdentityKey,
        signature: &[u8],
    ) -> Result<Session, ClientError> {
        self.bind_with_signature_bytes(identity.as_bytes(), signature)
            .await
    }

    /// Sends a bind request with raw bytes; lets tests present malformed keys.
    #[doc(hidden)]
    pub async fn bind_with_signature_bytes(
        &self,
        identity: &[u8],
        signature: &[u8],
    ) -> Result<Session, ClientError> {
        let draining = events::Draining::default();
        let span = trace::rpc_span(self.addr, "Bootstrap", "bind");
        let mut request = self.bootstrap.bind_request();
        {
            let mut p = request.get();
            trace::write_trace(p.reborrow().init_trace(), &span);
            p.set_identity_key(identity);
            p.set_signature(signature);
            p.set_events(capnp_rpc::new_client(events::Events(draining.clone())));
        }
        let response = trace::traced(&span, self.timed("bind", request.send().promise)).await?;
        let r = response.get().map_err(call_error)?;
        Ok(Session {
            auth: AuthClient::new(r.get_auth().map_err(call_error)?, self.addr, self.timeout),
            delivery: DeliveryClient::new(
                r.get_delivery().map_err(call_error)?,
                self.addr,
                self.timeout,
                self.frames.clone(),
            ),
            draining,
        })
    }

    pub(crate) async fn timed<T>(
        &self,
        stage: &'static str,
        fut: impl Future<Output = Result<T, capnp::Error>>,
    ) -> Result<T, ClientError> {
        timed(self.addr, self.timeout, stage, fut).await
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        let _ = self.disconnector.await;
    }
}

/// Awaits `fut` under `timeout`, turning errors into [`ClientError`]s.
pub(crate) async fn timed<T>(
    addr: SocketAddr,
    timeout: Duration,
    stage: &'static str,
    fut: impl Future<Output = Result<T, capnp::Error>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout {
            addr,
            after: timeout,
            stage,
        })?
        .map_err(call_error)
}

/// Resolves `host:port` names in `servers` (in order, duplicates kept).
pub async fn resolve(servers: &[String]) -> Result<Vec<SocketAddr>, ClientError> {
    let mut out = Vec::new();
    for s in servers {
        let s = s.trim();
        if s.is_empty() {
            continue;
        }
        let addrs = tokio::net::lookup_host(s)
            .await
            .map_err(|_| ClientError::NoServers)?;
        out.extend(addrs);
    }
    if out.is_empty() {
        return Err(ClientError::NoServers);
    }
    Ok(out)
}

/// Like [`connect_any`], but starts with the server after `after` in `addrs` and tries
/// `after` itself last: how a client moves off a node that failed or is draining.
pub async fn connect_any_after(
    addrs: &[SocketAddr],
    after: Option<SocketAddr>,
    options: &ConnectOptions,
) -> Result<Connection, ClientError> {
    let start = after
        .and_then(|a| addrs.iter().position(|x| *x == a))
        .map_or(0, |i| i + 1);
    let rotated: Vec<SocketAddr> = addrs[start.min(addrs.len())..]
        .iter()
        .chain(&addrs[..start.min(addrs.len())])
        .copied()
        .collect();
    connect_any(&rotated, options).await
}

/// Connects to the first server in `addrs` that answers and is vouched for.
///
/// A server that presents the wrong cluster key ends the attempt at once: the pinned key is
/// wrong for the whole list, and trying the others would only hide that.
pub async fn connect_any(
    addrs: &[SocketAddr],
    options: &ConnectOptions,
) -> Result<Connection, ClientError> {
    let mut last = None;
    for &addr in addrs {
        match Connection::connect(addr, options).await {
            Ok(c) => return Ok(c),
            Err(e @ ClientError::WrongClusterKey { .. }) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or(ClientError::NoServers, |e| {
        ClientError::AllFailed(Box::new(e))
    }))
}
