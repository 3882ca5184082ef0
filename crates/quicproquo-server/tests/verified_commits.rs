//! The Delivery Service verifies every commit against its public view of the group (ADR 0012):
//! the attacks a member could run when the server applied declared membership changes, sent
//! through the client library as such a member would, against the real server on both
//! stores. Each is refused, the group's epoch and membership stay as they were, and the
//! members keep talking.

mod support;

use support::both_stores;

use anyhow::{Result, bail, ensure};
use quicproquo_client::ClientError;
use quicproquo_client::chat::random_id;
use quicproquo_client::delivery::{CommitParts, SendOutcome};
use quicproquo_core::NodeRole;
use quicproquo_core::mls::Suite;
use quicproquo_proto::errors::ErrorCode;
use quicproquo_server::store::AnyStore;
use support::groups::{group_of_two, refused, server_view, still_talking};
use support::logs::captured_logs;
use support::{TestServer, User, local};

fn server(store: Option<AnyStore>) -> Result<TestServer> {
    TestServer::start_with(NodeRole::Standalone, store, |_| {})
}

/// Sends `message` to group `id` as `user`, with `parts` if it is a commit.
async fn send(
    user: &User,
    id: &[u8],
    message: &[u8],
    parts: Option<&CommitParts>,
) -> Result<Result<SendOutcome, ClientError>> {
    let mid = random_id()?;
    Ok(user.session.delivery.send(id, &mid, message, parts).await)
}

/// The offset of the epoch in a PublicMessage of group `id` (after version, wire format and
/// the group id's one-byte length).
fn epoch_at(message: &[u8], id: &[u8]) -> Result<usize> {
    let at = message
        .windows(id.len())
        .position(|w| w == id)
        .ok_or_else(|| anyhow::anyhow!("no group id in the message"))?;
    Ok(at + id.len())
}

/// A well-formed PublicMessage application message of group `id` at `epoch` from leaf 0
/// (openmls never sends one: it encrypts every application message).
fn public_application(id: &[u8], epoch: u64) -> Vec<u8> {
    let mut m = vec![0, 1, 0, 1]; // mls10, mls_public_message
    m.push(id.len() as u8);
    m.extend_from_slice(id);
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(&[1, 0, 0, 0, 0]); // sender: member, leaf 0
    m.push(0); // authenticated_data: empty
    m.push(1); // content_type: application
    m.push(5);
    m.extend_from_slice(b"hello");
    m.extend_from_slice(&[0x40, 64]); // signature (a two-byte length)
    m.extend_from_slice(&[7; 64]);
    m.push(32); // membership tag
    m.extend_from_slice(&[9; 32]);
    m
}

async fn forged_commits_are_refused_and_change_nothing(store: Option<AnyStore>) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let (mut alice, mut bob, eve, id) = group_of_two(&server, dir.path()).await?;
    let before = server_view(&alice, &id).await?;
    ensure!(before.0 == 1 && before.1.len() == 2, "{before:?}");

    // Alice stages a commit; the pending commit stays with her while others try it.
    let mut ga = alice.group(&id)?;
    let out = ga.self_update(&alice.state.mls, alice.state.mls_identity())?;
    let parts = CommitParts {
        welcome: None,
        group_info: out.group_info.clone(),
    };

    // A non-member: refused as such.
    let (code, _) = refused(send(&eve, &id, &out.commit, Some(&parts)).await?)?;
    ensure!(code == ErrorCode::NotMember, "{code:?}");
    // Another member's leaf: Bob sends Alice's commit as his own.
    let (code, text) = refused(send(&bob, &id, &out.commit, Some(&parts)).await?)?;
    ensure!(
        code == ErrorCode::BadCommit && text.contains("sender"),
        "{text}"
    );
    // The commit declaring a membership change it does not make can no longer be sent: the
    // change is derived; a commit without the new GroupInfo is refused.
    let (code, text) =
        refused(send(&alice, &id, &out.commit, Some(&CommitParts::default())).await?)?;
    ensure!(
        code == ErrorCode::BadCommit && text.contains("group_info"),
        "{text}"
    );
    // The GroupInfo of the previous epoch (as the server serves it) with a valid commit.
    let (old_info, epoch) = alice.session.delivery.group_info(&id).await?;
    ensure!(epoch == 1);
    let stale = CommitParts {
        welcome: None,
        group_info: old_info,
    };
    let (code, text) = refused(send(&alice, &id, &out.commit, Some(&stale)).await?)?;
    ensure!(
        code == ErrorCode::BadCommit && text.contains("group_info"),
        "{text}"
    );
    // A Welcome where no one is added.
    let with_welcome = CommitParts {
        welcome: Some(out.group_info.clone()),
        group_info: out.group_info.clone(),
    };
    let (code, text) = refused(send(&alice, &id, &out.commit, Some(&with_welcome)).await?)?;
    ensure!(
        code == ErrorCode::BadCommit && text.contains("welcome"),
        "{text}"
    );

    // The epoch rewritten ahead, and a commit of another group with the group id rewritten.
    let mut ahead = out.commit.clone();
    let at = epoch_at(&ahead, &id)?;
    ahead[at..at + 8].copy_from_slice(&2u64.to_be_bytes());
    let (code, text) = refused(send(&alice, &id, &ahead, Some(&parts)).await?)?;
    ensure!(code == ErrorCode::BadCommit, "{text}");
    let other = bob.chat().create_group("other").await?;
    let mut gb = bob.group(&other)?;
    let foreign = gb.self_update(&bob.state.mls, bob.state.mls_identity())?;
    gb.discard_pending_commit(&bob.state.mls)?;
    let mut moved = foreign.commit.clone();
    let at = epoch_at(&moved, &other)? - other.len();
    moved[at..at + id.len()].copy_from_slice(&id);
    let at = epoch_at(&moved, &id)?;
    moved[at..at + 8].copy_from_slice(&1u64.to_be_bytes());
    let (code, text) = refused(send(&bob, &id, &moved, Some(&parts)).await?)?;
    ensure!(code == ErrorCode::BadCommit, "{text}");

    // Unencrypted application messages, and Welcomes or GroupInfos as group messages.
    let (code, text) = refused(send(&bob, &id, &public_application(&id, 1), None).await?)?;
    ensure!(
        code == ErrorCode::BadMessage && text.contains("PrivateMessage"),
        "{text}"
    );
    let (code, text) = refused(send(&bob, &id, &out.group_info, None).await?)?;
    ensure!(
        code == ErrorCode::BadMessage && text.contains("GroupInfo"),
        "{text}"
    );

    // Nothing moved; Alice's own commit still goes through and everyone follows it.
    ensure!(server_view(&alice, &id).await? == before);
    let sent = send(&alice, &id, &out.commit, Some(&parts)).await??;
    ensure!(
        matches!(sent, SendOutcome::Appended { epoch: 2, .. }),
        "{sent:?}"
    );
    ga.merge_pending_commit(&alice.state.mls)?;
    bob.recv().await?;
    ensure!(bob.group(&id)?.epoch() == 2);
    let (info, epoch) = bob.session.delivery.group_info(&id).await?;
    ensure!(epoch == 2 && info == out.group_info);
    still_talking(&mut alice, &mut bob, &id).await?;
    Ok(())
}

/// A refused commit names its sender in the log by the keyed hash of its identity (the
/// server's telemetry key), with the rule, and without the message's content.
async fn the_refused_committer_is_identified_in_the_log(store: Option<AnyStore>) -> Result<()> {
    let logs = captured_logs();
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let (alice, bob, _eve, id) = group_of_two(&server, dir.path()).await?;
    let mut ga = alice.group(&id)?;
    let out = ga.self_update(&alice.state.mls, alice.state.mls_identity())?;
    let parts = CommitParts {
        welcome: None,
        group_info: out.group_info.clone(),
    };
    let (code, _) = refused(send(&bob, &id, &out.commit, Some(&parts)).await?)?;
    ensure!(code == ErrorCode::BadCommit);
    let node =
        quicproquo_server::NodeIdentity::load_or_create(&server.data_dir(), NodeRole::Standalone)?;
    let bob_hash = node.redactor.hash(bob.state.identity().public().as_bytes());
    let group_hash = node.redactor.hash(&id);
    let text = String::from_utf8_lossy(&logs.lock().map_err(|_| anyhow::anyhow!("poisoned"))?)
        .into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("refused by the group's public view") && l.contains(&bob_hash))
        .ok_or_else(|| anyhow::anyhow!("no refusal naming bob in the log:\n{text}"))?;
    ensure!(
        line.contains(&group_hash) && line.contains("sender"),
        "{line}"
    );
    let content = hex::encode(&out.commit[out.commit.len() - 32..]);
    ensure!(
        !line.contains(&content),
        "the log holds message bytes: {line}"
    );
    ga.discard_pending_commit(&alice.state.mls)?;
    Ok(())
}

/// An Add needs the added member's Welcome, and the Welcome of another commit does not do.
async fn adds_need_their_own_welcome(store: Option<AnyStore>) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let (mut alice, mut bob, eve, id) = group_of_two(&server, dir.path()).await?;
    let before = server_view(&alice, &id).await?;
    let kps = alice
        .session
        .auth
        .fetch_key_packages(&[eve.state.identity().public()])
        .await?;
    let kp = kps
        .into_iter()
        .next()
        .map(|k| k.data)
        .ok_or_else(|| anyhow::anyhow!("no KeyPackage"))?;
    let mut gb = bob.group(&id)?;
    let out = gb.add_members(&bob.state.mls, bob.state.mls_identity(), &[kp])?;
    let no_welcome = CommitParts {
        welcome: None,
        group_info: out.group_info.clone(),
    };
    let (code, text) = refused(send(&bob, &id, &out.commit, Some(&no_welcome)).await?)?;
    ensure!(
        code == ErrorCode::BadCommit && text.contains("welcome"),
        "{text}"
    );
    ensure!(
        server_view(&alice, &id).await? == before,
        "eve was not added"
    );
    let fetched = eve.session.delivery.fetch(&id, 0, 10).await;
    ensure!(
        fetched.as_ref().err().and_then(ClientError::code) == Some(ErrorCode::NotMember),
        "eve reads the group: {fetched:?}"
    );
    // With its Welcome it is Bob's valid commit: appended, and Eve is in.
    let parts = CommitParts {
        welcome: out.welcome.clone(),
        group_info: out.group_info.clone(),
    };
    let sent = send(&bob, &id, &out.commit, Some(&parts)).await??;
    ensure!(
        matches!(sent, SendOutcome::Appended { epoch: 2, .. }),
        "{sent:?}"
    );
    gb.merge_pending_commit(&bob.state.mls)?;
    let (epoch, members) = server_view(&alice, &id).await?;
    ensure!(epoch == 2 && members.len() == 3, "{members:?}");
    alice.recv().await?;
    still_talking(&mut alice, &mut bob, &id).await?;
    Ok(())
}

/// An Add of a KeyPackage that expired between the commit's making and its sending is refused
/// (openmls checks an added leaf's lifetime), and Eve stays out.
async fn an_expired_key_package_is_not_added(store: Option<AnyStore>) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let (mut alice, mut bob, eve, id) = group_of_two(&server, dir.path()).await?;
    let before = server_view(&alice, &id).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let not_after = now + 2;
    let kp = quicproquo_core::mls::MlsIdentity::new(eve.state.identity())
        .key_package_with_lifetime(
            &eve.state.mls,
            Suite::Classical.ciphersuite(),
            now - 60,
            not_after,
        )?;
    let mut ga = alice.group(&id)?;
    let out = ga.add_members(&alice.state.mls, alice.state.mls_identity(), &[kp])?;
    // Wait for the clock (not for another task) to pass the KeyPackage's end.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        < not_after + 1
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the clock stood still"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let parts = CommitParts {
        welcome: out.welcome.clone(),
        group_info: out.group_info.clone(),
    };
    let (code, text) = refused(send(&alice, &id, &out.commit, Some(&parts)).await?)?;
    ensure!(
        code == ErrorCode::BadCommit && text.contains("mls"),
        "{text}"
    );
    ensure!(server_view(&alice, &id).await? == before);
    ga.discard_pending_commit(&alice.state.mls)?;
    still_talking(&mut alice, &mut bob, &id).await?;
    Ok(())
}

/// A member whose leaf came from a short-lived KeyPackage renews it (at half its lifetime, on
/// its next send), so the group stays joinable after that lifetime has ended: openmls refuses
/// to join a tree holding an expired leaf.
async fn a_group_stays_joinable_past_a_leaf_lifetime(store: Option<AnyStore>) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
    let mut carol = User::register(&server, dir.path(), "carol", Suite::Classical).await?;
    // Bob's only KeyPackage lives 16 seconds, half of them already gone.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let not_after = now + 8;
    let conn = server.connect().await?;
    let path = dir.path().join("bob.bin");
    let mut state = quicproquo_client::ClientState::create(Suite::Classical)?;
    state.name = Some("bob".into());
    let session = conn.bind(state.identity()).await?;
    session.auth.claim_name("bob").await?;
    let kp = state.mls_identity().key_package_with_lifetime(
        &state.mls,
        Suite::Classical.ciphersuite(),
        now - 8,
        not_after,
    )?;
    state.save(&path)?;
    session.auth.upload_key_packages(&[kp], None).await?;
    let mut bob = User {
        state,
        path,
        conn,
        session,
    };

    let id = alice.chat().create_group("g").await?;
    alice
        .chat()
        .invite("g", &["bob".into()], &mut |_| {})
        .await?;
    bob.recv().await?;
    ensure!(bob.group(&id)?.own_leaf_lifetime().is_some());
    // Bob's next send renews his leaf first.
    let g = hex::encode(&id[..4]);
    bob.chat().send(&g, b"renewed", &mut |_| {}).await?;
    ensure!(bob.group(&id)?.own_leaf_lifetime().is_none(), "not renewed");
    // Past the end of Bob's KeyPackage, Carol still joins.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        <= not_after
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the clock stood still"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    alice
        .chat()
        .invite("g", &["carol".into()], &mut |_| {})
        .await?;
    carol.recv().await?;
    ensure!(carol.group(&id)?.members().len() == 3);
    alice.chat().send(&g, b"welcome carol", &mut |_| {}).await?;
    let got = User::messages(&carol.recv().await?);
    ensure!(got.iter().any(|(_, t)| t == "welcome carol"), "{got:?}");
    Ok(())
}

/// 1000 random mutations of a valid commit: none is appended, the server never fails, and the
/// valid commit is appended afterwards. The membership tag (the last 33 bytes) is left alone:
/// the server has no key to check it (ADR 0012).
async fn random_mutations_are_never_appended(store: Option<AnyStore>) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let (mut alice, mut bob, _eve, id) = group_of_two(&server, dir.path()).await?;
    let mut gb = bob.group(&id)?;
    let out = gb.self_update(&bob.state.mls, bob.state.mls_identity())?;
    let parts = CommitParts {
        welcome: None,
        group_info: out.group_info.clone(),
    };
    let mut rng = Rng(u64::from_le_bytes(random_id()?[..8].try_into()?));
    let body = out.commit.len() - 33;
    let mut refusals = std::collections::BTreeMap::new();
    for _ in 0..1000 {
        let mut m = out.commit.clone();
        match rng.below(4) {
            0 => {
                let at = rng.below(body);
                m[at] ^= 1 << rng.below(8);
            }
            1 => {
                let at = rng.below(body);
                m[at] = rng.below(256) as u8;
            }
            2 => m.truncate(rng.below(m.len())),
            _ => {
                let at = rng.below(body);
                m.insert(at, rng.below(256) as u8);
            }
        }
        if m == out.commit {
            continue;
        }
        match send(&bob, &id, &m, Some(&parts)).await? {
            Ok(SendOutcome::Appended { .. }) => bail!("a mutated commit was appended"),
            Ok(other) => {
                let name = format!("{other:?}");
                let name = name.split(' ').next().unwrap_or_default().to_owned();
                *refusals.entry(name).or_insert(0) += 1;
            }
            Err(e) => {
                let code = e
                    .code()
                    .ok_or_else(|| anyhow::anyhow!("uncoded error: {e}"))?;
                ensure!(
                    matches!(code, ErrorCode::BadCommit | ErrorCode::BadMessage),
                    "unexpected refusal {code:?}: {e}"
                );
                *refusals.entry(code.to_string()).or_insert(0) += 1;
            }
        }
    }
    ensure!(server_view(&alice, &id).await?.0 == 1, "{refusals:?}");
    let sent = send(&bob, &id, &out.commit, Some(&parts)).await??;
    ensure!(
        matches!(sent, SendOutcome::Appended { epoch: 2, .. }),
        "{sent:?}"
    );
    gb.merge_pending_commit(&bob.state.mls)?;
    alice.recv().await?;
    still_talking(&mut alice, &mut bob, &id).await?;
    Ok(())
}

/// xorshift64: reproducible from its seed, which a failure prints through the mutation.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

both_stores!(
    forged_commits_are_refused_and_change_nothing,
    the_refused_committer_is_identified_in_the_log,
    adds_need_their_own_welcome,
    an_expired_key_package_is_not_added,
    a_group_stays_joinable_past_a_leaf_lifetime,
    random_mutations_are_never_appended,
);
