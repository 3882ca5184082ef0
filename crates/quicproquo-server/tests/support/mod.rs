//! Shared fixtures for the server's integration tests.

#![allow(dead_code, unreachable_pub)]

pub mod forge;
pub mod groups;
pub mod logs;

use std::time::Duration;

use anyhow::Result;
use quicproquo_client::chat::{Chat, ChatEvent};
use quicproquo_client::{ClientState, ConnectOptions, Connection, Session};
use quicproquo_core::NodeRole;
use quicproquo_core::group::Group;
use quicproquo_core::mls::Suite;
use quicproquo_server::store::AnyStore;
use quicproquo_server::store::embedded::{self, EmbeddedStore};
use quicproquo_server::store::postgres::{PgStore, migrate};
use quicproquo_server::{NodeIdentity, ServerConfig, ServerHandle};
use quicproquo_testkit::postgres::{TestDatabase, fresh_database};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A server running in this process on an ephemeral loopback port, with its own data dir.
pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub addr: std::net::SocketAddr,
    pub options: ConnectOptions,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// A server with its embedded store in a fresh data directory.
    pub fn start(role: NodeRole, tweak: impl FnOnce(&mut ServerConfig)) -> Result<Self> {
        Self::start_with(role, None, tweak)
    }

    /// A server using `store` (or, if `None`, an embedded store in its data directory).
    pub fn start_with(
        role: NodeRole,
        store: Option<AnyStore>,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = ServerConfig::for_role(role, dir.path().join("data"));
        config.workers = 2;
        tweak(&mut config);
        let identity = NodeIdentity::load_or_create(&config.data_dir, role)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let store = match store {
            Some(s) => s,
            // Opened directly: `open_store` keeps edge and shard nodes off the embedded store,
            // but these tests only exercise what the roles share.
            None => AnyStore::Embedded(EmbeddedStore::open(
                &config.data_dir.join(embedded::DEFAULT_FILE),
            )?),
        };
        let handle = quicproquo_server::start(config, listener, identity, store)?;
        let addr = handle.local_addr();
        let mut options = ConnectOptions::new(handle.cluster_key());
        // Tests talk to every role, shards included.
        options.roles.push(NodeRole::Shard);
        Ok(Self {
            handle: Some(handle),
            addr,
            options,
            _dir: dir,
        })
    }

    /// The server's data directory (its cluster and node keys).
    #[allow(dead_code)]
    pub fn data_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("data")
    }

    pub fn handle(&self) -> Result<&ServerHandle> {
        self.handle
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("server already stopped"))
    }

    pub async fn connect(&self) -> Result<Connection> {
        Ok(Connection::connect(self.addr, &self.options).await?)
    }

    /// Shuts the server down and waits for its threads.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(h) = self.handle.take() {
            h.shutdown();
            tokio::task::spawn_blocking(move || h.join()).await??;
        }
        Ok(())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
            let _ = h.join();
        }
    }
}

/// A store for a test server, and the database behind it (hold it while the store is used).
pub type StoreFixture = (Option<AnyStore>, Option<TestDatabase>);

/// No store given: the test server opens its embedded store.
pub async fn embedded_store() -> Result<StoreFixture> {
    Ok((None, None))
}

/// A Postgres store on a fresh, migrated database of its own.
pub async fn postgres_store() -> Result<StoreFixture> {
    let db = fresh_database().await?;
    migrate(db.url()).await?;
    let store = PgStore::connect(db.url(), 8).await?;
    Ok((Some(AnyStore::Postgres(store)), Some(db)))
}

/// Runs `f` inside a `LocalSet` (capnp-rpc clients are `!Send`).
pub async fn local<F: Future>(f: F) -> F::Output {
    tokio::task::LocalSet::new().run_until(f).await
}

/// Waits until the server closes `stream` (EOF or reset), failing after `within`.
pub async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> Result<()> {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("server did not close the connection within {within:?}"))
}

/// Polls `check` until it returns true, failing after `within`.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("condition not met within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A registered user: a device state file and a session bound on its own connection.
pub struct User {
    pub state: ClientState,
    pub path: std::path::PathBuf,
    pub conn: Connection,
    pub session: Session,
}

impl User {
    /// Connects to `server` and registers `name` (see [`User::register_on`]).
    pub async fn register(
        server: &TestServer,
        dir: &std::path::Path,
        name: &str,
        suite: Suite,
    ) -> Result<Self> {
        Self::register_on(server.connect().await?, dir, name, suite).await
    }

    /// Creates a device in `dir`, binds it on `conn`, claims `name` and uploads three
    /// KeyPackages (saved before they are uploaded).
    pub async fn register_on(
        conn: Connection,
        dir: &std::path::Path,
        name: &str,
        suite: Suite,
    ) -> Result<Self> {
        let path = dir.join(format!("{name}.bin"));
        let mut state = ClientState::create(suite)?;
        state.name = Some(name.to_owned());
        let session = conn.bind(state.identity()).await?;
        session.auth.claim_name(name).await?;
        let kps = state.mls_identity().key_packages(&state.mls, suite, 3)?;
        state.save(&path)?;
        session.auth.upload_key_packages(&kps, None).await?;
        Ok(Self {
            state,
            path,
            conn,
            session,
        })
    }

    /// The messenger over this user's state and session.
    pub fn chat(&mut self) -> Chat<'_> {
        Chat::new(&mut self.state, &self.path, &self.session)
    }

    /// Joins pending groups and reads every group; returns what happened.
    pub async fn recv(&mut self) -> Result<Vec<ChatEvent>> {
        let mut events = Vec::new();
        self.chat().receive_all(&mut |e| events.push(e)).await?;
        Ok(events)
    }

    /// This user's MLS state of group `id`.
    pub fn group(&self, id: &[u8]) -> Result<Group> {
        Group::load(&self.state.mls, id)?.ok_or_else(|| anyhow::anyhow!("no group"))
    }

    /// (seq, text) of the messages among `events`.
    pub fn messages(events: &[ChatEvent]) -> Vec<(u64, String)> {
        events
            .iter()
            .filter_map(|e| match e {
                ChatEvent::Message { seq, body, .. } => {
                    Some((*seq, String::from_utf8_lossy(body).into_owned()))
                }
                _ => None,
            })
            .collect()
    }
}

/// A TCP connection to `server` from the loopback address `ip` (e.g. `[127, 0, 0, 2]`), so
/// that tests can play several source addresses.
pub async fn tcp_from(ip: [u8; 4], server: &TestServer) -> Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from((ip, 0)))?;
    Ok(socket.connect(server.addr).await?)
}

/// A connection from `ip` that completes the Noise handshake with `server` and then sends
/// nothing: the stream, and what the handshake established.
pub async fn handshake_from(
    ip: [u8; 4],
    server: &TestServer,
) -> Result<(TcpStream, quicproquo_core::noise::HandshakeOutcome)> {
    let mut stream = tcp_from(ip, server).await?;
    let key = quicproquo_core::NoiseKeypair::generate()?;
    let outcome = quicproquo_core::noise::initiate(
        &mut stream,
        &key,
        &server.options.verifier,
        Duration::from_secs(10),
    )
    .await?;
    Ok((stream, outcome))
}

/// A client session from `ip` at the RPC level (the client library always dials from the
/// default address): the bootstrap capability and the handshake's channel binding. Runs its
/// RPC system as a local task (call inside [`local`]).
pub struct RawClient {
    pub bootstrap: quicproquo_proto::bootstrap_capnp::bootstrap::Client,
    pub handshake_hash: [u8; 32],
    pub client_static: [u8; 32],
}

impl RawClient {
    /// Connects to `server` from `ip` and starts RPC.
    pub async fn connect_from(ip: [u8; 4], server: &TestServer) -> Result<Self> {
        let mut stream = tcp_from(ip, server).await?;
        let key = quicproquo_core::NoiseKeypair::generate()?;
        let outcome = quicproquo_core::noise::initiate(
            &mut stream,
            &key,
            &server.options.verifier,
            Duration::from_secs(10),
        )
        .await?;
        let (r, w) = stream.into_split();
        let mut rpc = quicproquo_core::rpc::rpc_system(
            r,
            w,
            outcome.session,
            quicproquo_core::channel::ChannelLimits::default(),
            capnp_rpc::rpc_twoparty_capnp::Side::Client,
            None,
        );
        let bootstrap = rpc.bootstrap(capnp_rpc::rpc_twoparty_capnp::Side::Server);
        tokio::task::spawn_local(rpc);
        Ok(Self {
            bootstrap,
            handshake_hash: outcome.handshake_hash,
            client_static: *key.public(),
        })
    }

    /// Binds `identity` to this session.
    pub async fn bind(&self, identity: &quicproquo_core::IdentityKeypair) -> Result<()> {
        let signature = identity.sign_binding(&self.handshake_hash, &self.client_static);
        let mut request = self.bootstrap.bind_request();
        request.get().set_identity_key(identity.public().as_bytes());
        request.get().set_signature(&signature);
        request.send().promise.await?;
        Ok(())
    }

    /// Binds `identity` to this session and returns its Delivery Service capability, for
    /// requests the client library does not make.
    pub async fn bind_delivery(
        &self,
        identity: &quicproquo_core::IdentityKeypair,
    ) -> Result<quicproquo_proto::delivery_capnp::delivery_service::Client> {
        let signature = identity.sign_binding(&self.handshake_hash, &self.client_static);
        let mut request = self.bootstrap.bind_request();
        request.get().set_identity_key(identity.public().as_bytes());
        request.get().set_signature(&signature);
        let response = request.send().promise.await?;
        Ok(response.get()?.get_delivery()?)
    }

    /// Pings with `payload`; the payload echoed back.
    pub async fn ping(&self, payload: &[u8]) -> Result<Vec<u8>> {
        let mut request = self.bootstrap.ping_request();
        request.get().set_payload(payload);
        let response = request.send().promise.await?;
        Ok(response.get()?.get_payload()?.to_vec())
    }
}

/// This process's resident memory, in bytes.
pub fn rss() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no VmRSS value"))?
        .parse()?;
    Ok(kb * 1024)
}

/// Runs each named `async fn(Option<AnyStore>) -> Result<()>` of the calling test file as one
/// test on the embedded store (`None`) and one on a fresh Postgres database.
#[allow(unused_macros)]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() -> Result<()> {
                    local(super::$name(None)).await
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() -> Result<()> {
                    let (store, _db) = support::postgres_store().await?;
                    local(super::$name(store)).await
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use both_stores;
