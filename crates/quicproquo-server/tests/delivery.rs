//! The Delivery Service end to end through the real server: MLS groups over ordered logs.

mod support;

use anyhow::{Result, ensure};
use quicproquo_client::ClientState;
use quicproquo_client::chat::{ChatEvent, random_id};
use quicproquo_client::delivery::SendOutcome;
use quicproquo_core::NodeRole;
use quicproquo_core::mls::Suite;
use quicproquo_proto::errors::ErrorCode;
use quicproquo_server::ServerConfig;
use quicproquo_server::store::AnyStore;
use support::{TestServer, User, local};

fn server(store: Option<AnyStore>, tweak: impl FnOnce(&mut ServerConfig)) -> Result<TestServer> {
    TestServer::start_with(NodeRole::Standalone, store, tweak)
}

async fn three_members_share_epochs_and_order(store: Option<AnyStore>) -> Result<()> {
    let server = server(store, |_| {})?;
    let dir = tempfile::tempdir()?;
    let mut alice = User::register(&server, dir.path(), "alice", Suite::Hybrid).await?;
    let mut bob = User::register(&server, dir.path(), "bob", Suite::Hybrid).await?;
    let mut carol = User::register(&server, dir.path(), "carol", Suite::Hybrid).await?;

    let id = alice.chat().create_group("friends").await?;
    let epoch = alice
        .chat()
        .invite("friends", &["bob".into(), "carol".into()], &mut |_| {})
        .await?;
    ensure!(epoch == 1, "one commit added both");
    for u in [&mut bob, &mut carol] {
        let events = u.recv().await?;
        ensure!(
            matches!(&events[..], [ChatEvent::Joined { epoch: 1, members, .. }] if members.len() == 3)
        );
    }
    let (a, b, c) = (alice.group(&id)?, bob.group(&id)?, carol.group(&id)?);
    ensure!(a.epoch() == 1 && b.epoch() == 1 && c.epoch() == 1);
    ensure!(a.epoch_authenticator() == b.epoch_authenticator());
    ensure!(a.epoch_authenticator() == c.epoch_authenticator());

    // Messages in both directions, interleaved, arrive in the same order for everyone.
    let group = hex::encode(&id[..4]);
    alice
        .chat()
        .send("friends", b"hello from alice", &mut |_| {})
        .await?;
    bob.chat()
        .send(&group, b"hi alice, bob here", &mut |_| {})
        .await?;
    carol.chat().send(&group, b"carol too", &mut |_| {}).await?;
    alice
        .chat()
        .send("friends", b"welcome both", &mut |_| {})
        .await?;
    let a_seen = User::messages(&alice.recv().await?);
    let b_seen = User::messages(&bob.recv().await?);
    let c_seen = User::messages(&carol.recv().await?);
    // Each sees everyone else's messages, in log order.
    ensure!(
        a_seen.iter().map(|m| m.1.as_str()).collect::<Vec<_>>()
            == ["hi alice, bob here", "carol too"]
    );
    ensure!(
        b_seen.iter().map(|m| m.1.as_str()).collect::<Vec<_>>()
            == ["hello from alice", "carol too", "welcome both"]
    );
    ensure!(
        c_seen.iter().map(|m| m.1.as_str()).collect::<Vec<_>>()
            == ["hello from alice", "hi alice, bob here", "welcome both"]
    );
    for seen in [&a_seen, &b_seen, &c_seen] {
        ensure!(seen.windows(2).all(|w| w[0].0 < w[1].0), "log order");
    }
    Ok(())
}

async fn removal_and_epoch_secrets(store: Option<AnyStore>) -> Result<()> {
    let server = server(store, |_| {})?;
    let dir = tempfile::tempdir()?;
    let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
    let mut bob = User::register(&server, dir.path(), "bob", Suite::Classical).await?;
    let mut carol = User::register(&server, dir.path(), "carol", Suite::Classical).await?;
    let id = alice.chat().create_group("g").await?;
    alice
        .chat()
        .invite("g", &["bob".into(), "carol".into()], &mut |_| {})
        .await?;
    bob.recv().await?;
    carol.recv().await?;
    let secret_1 = alice
        .group(&id)?
        .export_secret(&alice.state.mls, "test", 32)?;

    let epoch = alice
        .chat()
        .remove("g", &["carol".into()], &mut |_| {})
        .await?;
    ensure!(epoch == 2);
    let secret_2 = alice
        .group(&id)?
        .export_secret(&alice.state.mls, "test", 32)?;
    ensure!(
        secret_1.as_slice() != secret_2.as_slice(),
        "key material must change per epoch"
    );
    let events = bob.recv().await?;
    ensure!(
        matches!(&events[..], [ChatEvent::Epoch { epoch: 2, removed, .. }] if removed.len() == 1)
    );
    ensure!(
        bob.group(&id)?
            .export_secret(&bob.state.mls, "test", 32)?
            .as_slice()
            == secret_2.as_slice()
    );
    // Carol learns she was removed, then can neither read nor post.
    let events = carol.recv().await?;
    ensure!(matches!(&events[..], [ChatEvent::Removed { .. }]));
    alice.chat().send("g", b"after carol", &mut |_| {}).await?;
    let fetched = carol.session.delivery.fetch(&id, 0, 100).await;
    ensure!(
        fetched
            .map(|v| v.iter().all(|e| e.seq <= 2))
            .unwrap_or(true)
    );
    let raw = carol.session.delivery.fetch(&id, 2, 100).await?;
    ensure!(raw.is_empty(), "nothing after the removal is readable");
    let post = carol.session.delivery.send(&id, b"m", b"x", None).await;
    ensure!(post.err().and_then(|e| e.code()) == Some(ErrorCode::BadMessage));
    let msg = {
        let mut g = bob.group(&id)?;
        g.encrypt(&bob.state.mls, bob.state.mls_identity(), b"bob speaks")?
    };
    // Carol replays a real message under her identity: refused as a non-member.
    let post = carol
        .session
        .delivery
        .send(&id, b"carol-1", &msg, None)
        .await;
    ensure!(post.err().and_then(|e| e.code()) == Some(ErrorCode::NotMember));
    let sub = carol.session.delivery.subscribe(&id, 0).await;
    ensure!(sub.err().and_then(|e| e.code()) == Some(ErrorCode::NotMember));
    Ok(())
}

async fn offline_member_catches_up_in_order(store: Option<AnyStore>) -> Result<()> {
    const N: usize = 25;
    let server = server(store, |_| {})?;
    let dir = tempfile::tempdir()?;
    let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
    let mut carol = User::register(&server, dir.path(), "carol", Suite::Classical).await?;
    alice.chat().create_group("g").await?;
    alice
        .chat()
        .invite("g", &["carol".into()], &mut |_| {})
        .await?;
    carol.recv().await?;
    // Carol goes offline.
    let carol_path = carol.path.clone();
    drop(carol);
    for i in 0..N {
        alice
            .chat()
            .send("g", format!("message {i}").as_bytes(), &mut |_| {})
            .await?;
    }
    // Carol comes back with her saved state on a new connection.
    let state = ClientState::load(&carol_path)?;
    let conn = server.connect().await?;
    let session = conn.bind(state.identity()).await?;
    let mut carol = User {
        state,
        path: carol_path,
        conn,
        session,
    };
    let seen = User::messages(&carol.recv().await?);
    let expected: Vec<String> = (0..N).map(|i| format!("message {i}")).collect();
    ensure!(seen.iter().map(|m| m.1.clone()).collect::<Vec<_>>() == expected);
    // The cursor was acknowledged: nothing is delivered twice.
    ensure!(carol.recv().await?.is_empty());
    let _ = &carol.conn;
    Ok(())
}

async fn concurrent_commits_have_one_winner(store: Option<AnyStore>) -> Result<()> {
    const MEMBERS: usize = 10;
    let server = server(store, |_| {})?;
    let dir = tempfile::tempdir()?;
    let mut users = Vec::new();
    for i in 0..MEMBERS {
        users.push(
            User::register(&server, dir.path(), &format!("user{i}"), Suite::Classical).await?,
        );
    }
    let id = users[0].chat().create_group("race").await?;
    let others: Vec<String> = (1..MEMBERS).map(|i| format!("user{i}")).collect();
    users[0].chat().invite("race", &others, &mut |_| {}).await?;
    for u in users.iter_mut().skip(1) {
        u.recv().await?;
    }
    // Everyone builds a commit for epoch 1 and sends it at once.
    let mut sends = Vec::new();
    for u in users.iter_mut() {
        let mut g = u.group(&id)?;
        let out = g.self_update(&u.state.mls, u.state.mls_identity())?;
        ensure!(out.epoch == 1);
        let parts = quicproquo_client::delivery::CommitParts {
            welcome: None,
            group_info: out.group_info,
        };
        sends.push((out.commit, random_id()?, parts));
    }
    let results =
        futures::future::join_all(users.iter().zip(&sends).map(|(u, (commit, mid, parts))| {
            let id = id.clone();
            async move { u.session.delivery.send(&id, mid, commit, Some(parts)).await }
        }))
        .await;
    let mut winners = 0;
    // The winner merges its commit; every loser drops its own and follows the log.
    for (u, r) in users.iter_mut().zip(results) {
        let mut g = u.group(&id)?;
        match r? {
            SendOutcome::Appended { epoch: 2, .. } => {
                winners += 1;
                g.merge_pending_commit(&u.state.mls)?;
            }
            SendOutcome::StaleEpoch {
                current_epoch: 2, ..
            } => g.discard_pending_commit(&u.state.mls)?,
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    ensure!(
        winners == 1,
        "exactly one commit wins the epoch, got {winners}"
    );
    for u in users.iter_mut() {
        u.recv().await?;
    }
    let reference = users[0].group(&id)?;
    for u in &users {
        let g = u.group(&id)?;
        ensure!(
            g.epoch() == 2 && g.epoch_authenticator() == reference.epoch_authenticator(),
            "fork: epoch {} vs {}",
            g.epoch(),
            reference.epoch()
        );
    }
    // And the retrying path: each member's `update` eventually lands.
    let epoch = users[3]
        .chat()
        .update(&hex::encode(&id[..4]), &mut |_| {})
        .await?;
    ensure!(epoch == 3);
    Ok(())
}

async fn bad_messages_are_refused(store: Option<AnyStore>) -> Result<()> {
    let server = server(store, |_| {})?;
    let dir = tempfile::tempdir()?;
    let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
    let mut bob = User::register(&server, dir.path(), "bob", Suite::Classical).await?;
    let eve = User::register(&server, dir.path(), "eve", Suite::Classical).await?;
    let id = alice.chat().create_group("g").await?;
    let other = alice.chat().create_group("other").await?;
    alice
        .chat()
        .invite("g", &["bob".into()], &mut |_| {})
        .await?;
    bob.recv().await?;
    let d = &alice.session.delivery;

    // Garbage where an MLS message is expected.
    let r = d.send(&id, b"m-garbage", b"not mls at all", None).await;
    ensure!(r.err().and_then(|e| e.code()) == Some(ErrorCode::BadMessage));
    // A real message sent to the wrong group.
    let msg = alice
        .group(&id)?
        .encrypt(&alice.state.mls, alice.state.mls_identity(), b"x")?;
    let r = d.send(&other, b"m-wrong-group", &msg, None).await;
    ensure!(r.err().and_then(|e| e.code()) == Some(ErrorCode::BadMessage));
    // A commit without its membership change.
    let out = alice
        .group(&id)?
        .self_update(&alice.state.mls, alice.state.mls_identity())?;
    let r = d.send(&id, b"m-commit", &out.commit, None).await;
    ensure!(r.err().and_then(|e| e.code()) == Some(ErrorCode::BadMessage));
    alice.group(&id)?.discard_pending_commit(&alice.state.mls)?;
    // A replayed message id: the first seq, nothing appended.
    let first = d.send(&id, b"m-once", &msg, None).await?;
    let again = d.send(&id, b"m-once", &msg, None).await?;
    let SendOutcome::Appended { seq, .. } = first else {
        anyhow::bail!("{first:?}")
    };
    ensure!(again == SendOutcome::Duplicate { seq });
    // A stale-epoch commit: Bob commits epoch 1 after Alice moved to 2.
    alice.chat().update("g", &mut |_| {}).await?;
    let stale = bob
        .group(&id)?
        .self_update(&bob.state.mls, bob.state.mls_identity())?;
    let r = bob
        .session
        .delivery
        .send(&id, b"m-stale", &stale.commit, Some(&Default::default()))
        .await?;
    ensure!(
        matches!(
            r,
            SendOutcome::StaleEpoch {
                current_epoch: 2,
                ..
            }
        ),
        "{r:?}"
    );
    // Non-members can neither post, read nor subscribe.
    let r = eve.session.delivery.send(&id, b"m-eve", &msg, None).await;
    ensure!(r.err().and_then(|e| e.code()) == Some(ErrorCode::NotMember));
    let r = eve.session.delivery.fetch(&id, 0, 10).await;
    ensure!(r.err().and_then(|e| e.code()) == Some(ErrorCode::NotMember));
    let r = eve.session.delivery.subscribe(&id, 0).await;
    ensure!(r.err().and_then(|e| e.code()) == Some(ErrorCode::NotMember));
    // A refused frame subscription is ended too (ADR 0019): asking again on the connection
    // gets the server's answer, not a wait for an end that never comes.
    let r = eve.session.delivery.subscribe(&id, 0).await;
    ensure!(r.err().and_then(|e| e.code()) == Some(ErrorCode::NotMember));
    // Each inbox is its owner's: Eve sees none of the Welcomes sent to Bob.
    ensure!(eve.session.delivery.inbox(0, 100).await?.is_empty());
    ensure!(bob.session.delivery.inbox(0, 100).await?.len() == 1);
    // Nothing above disturbed the group: everyone still agrees.
    bob.group(&id)?.discard_pending_commit(&bob.state.mls)?;
    bob.recv().await?;
    ensure!(bob.group(&id)?.epoch_authenticator() == alice.group(&id)?.epoch_authenticator());
    let _ = &eve.conn;
    Ok(())
}

async fn oversized_messages_are_refused(store: Option<AnyStore>) -> Result<()> {
    let server = server(store, |c| c.max_message_bytes = 8 * 1024)?;
    let dir = tempfile::tempdir()?;
    let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
    let mut bob = User::register(&server, dir.path(), "bob", Suite::Classical).await?;
    let id = alice.chat().create_group("g").await?;
    alice.chat().create_group("other").await?;
    alice
        .chat()
        .invite("g", &["bob".into()], &mut |_| {})
        .await?;
    bob.recv().await?;
    let big = vec![b'x'; 16 * 1024];
    let r = alice.chat().send("g", &big, &mut |_| {}).await;
    let code = match r {
        Err(quicproquo_client::chat::ChatError::Client(e)) => e.code(),
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    };
    ensure!(code == Some(ErrorCode::TooLarge));
    // Nothing was appended and both groups carry on.
    ensure!(bob.recv().await?.is_empty());
    alice.chat().send("g", b"small", &mut |_| {}).await?;
    alice
        .chat()
        .send("other", b"elsewhere", &mut |_| {})
        .await?;
    let seen = User::messages(&bob.recv().await?);
    ensure!(seen.len() == 1 && seen[0].1 == "small");
    let _ = id;
    Ok(())
}

async fn live_subscription_pushes_new_entries(store: Option<AnyStore>) -> Result<()> {
    let server = server(store, |_| {})?;
    let dir = tempfile::tempdir()?;
    let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
    let mut bob = User::register(&server, dir.path(), "bob", Suite::Classical).await?;
    let id = alice.chat().create_group("g").await?;
    alice
        .chat()
        .invite("g", &["bob".into()], &mut |_| {})
        .await?;
    bob.recv().await?;
    let cursor = bob.state.groups.get(&id).map_or(0, |m| m.cursor);
    let mut sub = bob.session.delivery.subscribe(&id, cursor).await?;
    for i in 0..5 {
        alice
            .chat()
            .send("g", format!("live {i}").as_bytes(), &mut |_| {})
            .await?;
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        let batch = tokio::time::timeout(std::time::Duration::from_secs(10), sub.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
        got.extend(batch);
    }
    ensure!(
        got.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "in order, no gap"
    );
    let mut texts = Vec::new();
    for e in &got {
        bob.chat().apply(&id, e, &mut |ev| {
            if let ChatEvent::Message { body, .. } = ev {
                texts.push(String::from_utf8_lossy(&body).into_owned());
            }
        })?;
    }
    ensure!(texts == (0..5).map(|i| format!("live {i}")).collect::<Vec<_>>());
    // Welcomes are pushed too.
    let mut carol = User::register(&server, dir.path(), "carol", Suite::Classical).await?;
    let mut inbox = carol.session.delivery.subscribe_inbox(0).await?;
    alice
        .chat()
        .invite("g", &["carol".into()], &mut |_| {})
        .await?;
    let pushed = tokio::time::timeout(std::time::Duration::from_secs(10), inbox.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("inbox subscription ended"))?;
    ensure!(pushed.len() == 1 && pushed[0].group_id == id);
    ensure!(carol.recv().await?.len() == 1);
    Ok(())
}

macro_rules! delivery_tests {
    ($make:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn three_members_share_epochs_and_order() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::three_members_share_epochs_and_order(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn removal_and_epoch_secrets() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::removal_and_epoch_secrets(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn offline_member_catches_up_in_order() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::offline_member_catches_up_in_order(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_commits_have_one_winner() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::concurrent_commits_have_one_winner(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn bad_messages_are_refused() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::bad_messages_are_refused(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn oversized_messages_are_refused() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::oversized_messages_are_refused(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn live_subscription_pushes_new_entries() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::live_subscription_pushes_new_entries(store)).await
        }
    };
}

mod embedded {
    use super::*;
    delivery_tests!(support::embedded_store());
}

mod postgres {
    use super::*;
    delivery_tests!(support::postgres_store());
}
