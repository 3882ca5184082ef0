//! The messenger against a real server in this process: pushed batches that do not continue
//! the cursor are never applied past the gap.

use std::net::SocketAddr;
use std::path::PathBuf;

use quicproquo_core::NodeRole;
use quicproquo_core::mls::Suite;
use quicproquo_server::store::AnyStore;
use quicproquo_server::store::embedded::{self, EmbeddedStore};
use quicproquo_server::{NodeIdentity, ServerConfig, ServerHandle};

use super::{Chat, ChatError, ChatEvent, first_gap};
use crate::delivery::{Envelope, EnvelopeKind};
use crate::{ClientState, ConnectOptions, Connection, Session};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A standalone server on an ephemeral loopback port, with its embedded store.
pub(crate) struct TestServer {
    handle: Option<ServerHandle>,
    pub(crate) addr: SocketAddr,
    pub(crate) options: ConnectOptions,
    pub(crate) dir: tempfile::TempDir,
}

impl TestServer {
    pub(crate) fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut config = ServerConfig::for_role(NodeRole::Standalone, dir.path().join("data"));
        config.workers = 1;
        let identity = NodeIdentity::load_or_create(&config.data_dir, NodeRole::Standalone)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let store = AnyStore::Embedded(EmbeddedStore::open(
            &config.data_dir.join(embedded::DEFAULT_FILE),
        )?);
        let handle = quicproquo_server::start(config, listener, identity, store)?;
        let addr = handle.local_addr();
        let options = ConnectOptions::new(handle.cluster_key());
        Ok(Self {
            handle: Some(handle),
            addr,
            options,
            dir,
        })
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

/// A device with a name, its state file and a bound connection.
pub(crate) struct User {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) state: ClientState,
    pub(crate) conn: Connection,
    pub(crate) session: Session,
}

impl User {
    /// Registers `name` on `server` through `addr` (the server's, or a relay's).
    pub(crate) async fn register(
        server: &TestServer,
        addr: SocketAddr,
        name: &str,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let path = server.dir.path().join(format!("{name}.bin"));
        let state = ClientState::create(Suite::Classical)?;
        let conn = Connection::connect(addr, &server.options).await?;
        let session = conn.bind(state.identity()).await?;
        session.auth.claim_name(name).await?;
        let packages = state
            .mls_identity()
            .key_packages(&state.mls, state.suite, 4)?;
        state.save(&path)?;
        session.auth.upload_key_packages(&packages, None).await?;
        Ok(Self {
            name: name.to_owned(),
            path,
            state,
            conn,
            session,
        })
    }

    pub(crate) fn chat(&mut self) -> Chat<'_> {
        Chat::new(&mut self.state, &self.path, &self.session)
    }
}

/// `owner` creates group `name` and adds `members`, who join it. Returns the group id.
pub(crate) async fn group_of(
    name: &str,
    owner: &mut User,
    members: &mut [&mut User],
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let id = owner.chat().create_group(name).await?;
    let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    owner.chat().invite(name, &names, &mut |_| {}).await?;
    for m in members.iter_mut() {
        m.chat().join(&mut |_| {}).await?;
    }
    Ok(id)
}

/// The bodies of the messages among `events`, in order.
pub(crate) fn bodies(events: &[ChatEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Message { body, .. } => Some(String::from_utf8_lossy(body).into_owned()),
            _ => None,
        })
        .collect()
}

fn entry(seq: u64) -> Envelope {
    Envelope {
        group_id: vec![1; 16],
        seq,
        epoch: 0,
        kind: EnvelopeKind::Application,
        message_id: vec![seq as u8],
        payload: Vec::new(),
        appended_at_micros: 0,
    }
}

fn entries(seqs: &[u64]) -> Vec<Envelope> {
    seqs.iter().copied().map(entry).collect()
}

#[test]
fn a_batch_continues_the_cursor_or_names_its_first_gap() {
    assert_eq!(first_gap(4, &entries(&[5, 6, 7])), None);
    assert_eq!(first_gap(4, &[]), None);
    // Repeats at or below the running cursor are no gap.
    assert_eq!(first_gap(4, &entries(&[3, 4, 5, 5, 6])), None);
    assert_eq!(first_gap(4, &entries(&[6, 7])), Some((5, 6)));
    assert_eq!(first_gap(4, &entries(&[5, 7])), Some((6, 7)));
    assert_eq!(first_gap(0, &entries(&[2])), Some((1, 2)));
}

#[tokio::test(flavor = "current_thread")]
async fn a_pushed_batch_past_a_gap_reads_the_missing_entries_from_the_log() -> TestResult {
    tokio::task::LocalSet::new()
        .run_until(async {
            let server = TestServer::start()?;
            let mut alice = User::register(&server, server.addr, "alice").await?;
            let mut bob = User::register(&server, server.addr, "bob").await?;
            let id = group_of("g", &mut alice, &mut [&mut bob]).await?;
            for body in ["one", "two", "three"] {
                alice.chat().send("g", body.as_bytes(), &mut |_| {}).await?;
            }
            let joined_at = bob.state.groups[&id].cursor;
            let log = bob.session.delivery.fetch(&id, joined_at, 10).await?;
            assert_eq!(log.len(), 3, "the log after bob joined: {log:?}");

            // Applying "one" and "three" would skip "two": refused whole, nothing applied.
            let mut events = Vec::new();
            let skipping = [log[0].clone(), log[2].clone()];
            let refused = bob
                .chat()
                .apply_batch(&id, &skipping, &mut |e| events.push(e));
            assert!(
                matches!(refused, Err(ChatError::Gap { expected, got })
                    if expected == log[1].seq && got == log[2].seq),
                "{refused:?}"
            );
            assert!(events.is_empty(), "{events:?}");
            assert_eq!(bob.state.groups[&id].cursor, joined_at);

            // A push of "three" alone: "one" and "two" come from the log first, each once.
            bob.chat()
                .receive_pushed(&id, &log[2..], &mut |e| events.push(e))
                .await?;
            assert_eq!(bodies(&events), ["one", "two", "three"]);
            assert_eq!(bob.state.groups[&id].cursor, log[2].seq);
            // The cursor was saved and acknowledged.
            assert_eq!(ClientState::load(&bob.path)?.groups[&id].cursor, log[2].seq);
            let info = bob.session.delivery.groups().await?;
            assert!(
                info.iter()
                    .any(|g| g.group_id == id && g.cursor == log[2].seq)
            );

            // A push that continues the cursor is applied as it is; repeats are skipped.
            alice.chat().send("g", b"four", &mut |_| {}).await?;
            let more = bob.session.delivery.fetch(&id, log[1].seq, 10).await?;
            events.clear();
            bob.chat()
                .receive_pushed(&id, &more, &mut |e| events.push(e))
                .await?;
            assert_eq!(bodies(&events), ["four"]);
            Ok(())
        })
        .await
}
