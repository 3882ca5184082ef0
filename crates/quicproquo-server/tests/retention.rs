//! Retention through the real server, on both stores: the job deletes acknowledged history
//! while members keep talking, and a member that fell behind the kept history is told
//! (`history_gone`), forgets the group, and comes back by a fresh invitation.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, ensure};
use quicproquo_client::chat::ChatEvent;
use quicproquo_core::NodeRole;
use quicproquo_core::mls::Suite;
use quicproquo_proto::errors::ErrorCode;
use quicproquo_server::ServerConfig;
use quicproquo_server::store::AnyStore;
use quicproquo_server::store::embedded::EmbeddedStore;
use support::{TestServer, User, both_stores, eventually, local};

/// The store given, or an embedded one in `dir` (opened here so a second server can reuse it).
fn store_in(store: Option<AnyStore>, dir: &std::path::Path) -> Result<AnyStore> {
    Ok(match store {
        Some(s) => s,
        None => AnyStore::Embedded(EmbeddedStore::open(&dir.join("qpq.db"))?),
    })
}

/// A standalone server on `store` whose retention job runs every 100 ms with these limits.
fn server(store: &AnyStore, retention: Duration, max_age: Duration) -> Result<TestServer> {
    TestServer::start_with(
        NodeRole::Standalone,
        Some(store.clone()),
        |c: &mut ServerConfig| {
            c.retention.policy.log_retention = retention;
            c.retention.policy.log_max_age = max_age;
            c.retention.interval = Duration::from_millis(100);
        },
    )
}

/// Log entries the server's retention job has deleted so far.
fn pruned(server: &TestServer) -> Result<u64> {
    Ok(server
        .handle()?
        .observer()
        .metrics
        .retention
        .log_entries
        .load(Ordering::Relaxed))
}

/// Puts `user` on a new connection to `server` (another server process on the same store).
async fn reconnect(user: &mut User, server: &TestServer) -> Result<()> {
    user.conn = server.connect().await?;
    user.session = user.conn.bind(user.state.identity()).await?;
    Ok(())
}

async fn acknowledged_history_goes_while_members_talk(store: Option<AnyStore>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = store_in(store, dir.path())?;
    let server = server(&store, Duration::ZERO, Duration::from_secs(86_400))?;
    let mut alice = User::register(&server, dir.path(), "alice", Suite::Hybrid).await?;
    let mut bob = User::register(&server, dir.path(), "bob", Suite::Hybrid).await?;
    let id = alice.chat().create_group("friends").await?;
    alice
        .chat()
        .invite("friends", &["bob".into()], &mut |_| {})
        .await?;
    bob.recv().await?;
    for text in ["one", "two", "three"] {
        alice
            .chat()
            .send("friends", text.as_bytes(), &mut |_| {})
            .await?;
    }
    let seen = User::messages(&bob.recv().await?);
    ensure!(seen.len() == 3, "{seen:?}");
    alice.recv().await?;

    // Both members acknowledged the commit and the three messages: they go.
    eventually(Duration::from_secs(30), || {
        pruned(&server).unwrap_or(0) >= 4
    })
    .await?;
    let retention = &server.handle()?.observer().metrics.retention;
    ensure!(
        retention.stored[3].load(Ordering::Relaxed) > 0,
        "the views' bytes measured"
    );
    ensure!(retention.passes.load(Ordering::Relaxed) > 0);

    // Reading from the start is refused with a typed error; reading on is not.
    let err = alice
        .session
        .delivery
        .fetch(&id, 0, 10)
        .await
        .err()
        .and_then(|e| e.code());
    ensure!(err == Some(ErrorCode::HistoryGone), "{err:?}");
    bob.chat()
        .send(&hex::encode(&id[..4]), b"four", &mut |_| {})
        .await?;
    let seen = User::messages(&alice.recv().await?);
    ensure!(seen.iter().map(|m| m.1.as_str()).collect::<Vec<_>>() == ["four"]);

    // The commit that added Bob is gone from the log, but the group's view still restores
    // from its snapshot and that commit (ADR 0018: retention copied it out of the log first):
    // on a second server, with no view cached, Bob's commit verifies and Alice follows it.
    let second = crate::server(&store, Duration::ZERO, Duration::from_secs(86_400))?;
    reconnect(&mut bob, &second).await?;
    bob.chat()
        .update(&hex::encode(&id[..4]), &mut |_| {})
        .await?;
    alice.recv().await?;
    ensure!(alice.group(&id)?.epoch() == 2);
    let loads = second
        .handle()?
        .observer()
        .metrics
        .view_replayed
        .load(Ordering::Relaxed);
    ensure!(loads >= 1, "the second server replayed nothing");
    Ok(())
}

async fn a_member_behind_the_kept_history_rejoins_by_invitation(
    store: Option<AnyStore>,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = store_in(store, dir.path())?;
    // Everything older than 2 s goes, read or not.
    let mut short = server(&store, Duration::ZERO, Duration::from_secs(2))?;
    let mut alice = User::register(&short, dir.path(), "alice", Suite::Hybrid).await?;
    let mut carol = User::register(&short, dir.path(), "carol", Suite::Hybrid).await?;
    let id = alice.chat().create_group("friends").await?;
    alice
        .chat()
        .invite("friends", &["carol".into()], &mut |_| {})
        .await?;
    ensure!(matches!(
        &carol.recv().await?[..],
        [ChatEvent::Joined { .. }]
    ));
    alice
        .chat()
        .send("friends", b"while you were away", &mut |_| {})
        .await?;
    // Alice reads on (her own message): only carol falls behind.
    alice.recv().await?;
    // Carol does not read: the message (seq 2) and the commit before it pass the maximum age.
    eventually(Duration::from_secs(30), || pruned(&short).unwrap_or(0) >= 2).await?;

    let events = carol.recv().await?;
    ensure!(
        matches!(&events[..], [ChatEvent::HistoryGone { group, .. }] if group == "friends"
            || group == &hex::encode(&id[..4])),
        "{events:?}"
    );
    ensure!(
        !carol.state.groups.contains_key(&id),
        "the device forgot the group"
    );
    ensure!(carol.group(&id).is_err(), "and its MLS state");
    ensure!(carol.recv().await?.is_empty(), "told once");

    // The rest runs on a server that keeps history (same store), so nothing ages out while
    // the members act, however slow the machine is.
    short.stop().await?;
    let keeping = server(
        &store,
        Duration::from_secs(3600),
        Duration::from_secs(86_400),
    )?;
    reconnect(&mut alice, &keeping).await?;
    reconnect(&mut carol, &keeping).await?;
    alice
        .chat()
        .remove("friends", &["carol".into()], &mut |_| {})
        .await?;
    alice
        .chat()
        .invite("friends", &["carol".into()], &mut |_| {})
        .await?;
    ensure!(matches!(
        &carol.recv().await?[..],
        [ChatEvent::Joined { .. }]
    ));
    alice
        .chat()
        .send("friends", b"welcome back", &mut |_| {})
        .await?;
    let seen = User::messages(&carol.recv().await?);
    ensure!(seen.iter().map(|m| m.1.as_str()).collect::<Vec<_>>() == ["welcome back"]);
    Ok(())
}

both_stores!(
    acknowledged_history_goes_while_members_talk,
    a_member_behind_the_kept_history_rejoins_by_invitation,
);
