//! Epoch rules end to end through the real server (both stores): application messages stay
//! within the epochs members keep secrets for, and a committer reads what was appended ahead
//! of its commit in the epoch that commit ends.

mod support;

use anyhow::{Result, ensure};
use quicproquo_client::chat::{ChatEvent, random_id};
use quicproquo_client::delivery::{CommitParts, SendOutcome};
use quicproquo_core::NodeRole;
use quicproquo_core::mls::Suite;
use quicproquo_server::model::group::APPLICATION_EPOCH_LAG;
use quicproquo_server::store::AnyStore;
use support::{TestServer, User, local};

fn server(store: Option<AnyStore>) -> Result<TestServer> {
    TestServer::start_with(NodeRole::Standalone, store, |_| {})
}

/// A member that missed more commits than members keep past epochs for is refused, catches up
/// (handing over what it read on the way) and sends again in the current epoch: everyone can
/// read the message instead of no one.
async fn a_sender_too_far_behind_catches_up_and_resends(store: Option<AnyStore>) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
    let mut bob = User::register(&server, dir.path(), "bob", Suite::Classical).await?;
    let id = alice.chat().create_group("g").await?;
    alice
        .chat()
        .invite("g", &["bob".into()], &mut |_| {})
        .await?;
    bob.recv().await?;
    let missed = APPLICATION_EPOCH_LAG + 1;
    for _ in 0..missed {
        alice.chat().update("g", &mut |_| {}).await?;
    }
    ensure!(bob.group(&id)?.epoch() == 1);

    let mut seen = Vec::new();
    let seq = bob
        .chat()
        .send(&hex::encode(&id[..4]), b"late but readable", &mut |e| {
            seen.push(e)
        })
        .await?;
    let epochs: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Epoch { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .collect();
    ensure!(
        epochs == (2..=missed + 1).collect::<Vec<_>>(),
        "refused at epoch 1, then caught up: {seen:?}"
    );
    ensure!(bob.group(&id)?.epoch() == missed + 1);
    let got = User::messages(&alice.recv().await?);
    ensure!(got == [(seq, "late but readable".to_owned())], "{got:?}");
    Ok(())
}

/// A member keeps posting messages of an epoch the group has moved 2 past (still readable)
/// while another member commits: whatever lands between the committer's catch-up and its
/// commit is read by the committer in the epoch it was written for, not one later (3 past,
/// beyond the kept secrets). Every appended message reaches the committer, none unreadable.
async fn a_committer_reads_what_precedes_its_commit(store: Option<AnyStore>) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
    let mut bob = User::register(&server, dir.path(), "bob", Suite::Classical).await?;
    let id = alice.chat().create_group("g").await?;
    alice
        .chat()
        .invite("g", &["bob".into()], &mut |_| {})
        .await?;
    bob.recv().await?;
    // Bob encrypts in epoch 1 and then reads nothing more.
    let mut bob_group = bob.group(&id)?;
    let mut pending = Vec::new();
    for i in 0..200 {
        let text = format!("epoch-1 message {i}");
        let msg = bob_group.encrypt(&bob.state.mls, bob.state.mls_identity(), text.as_bytes())?;
        pending.push((random_id()?, msg, text));
    }
    for _ in 0..APPLICATION_EPOCH_LAG {
        alice.chat().update("g", &mut |_| {}).await?;
    }

    // Bob posts until the group leaves his epoch's window; meanwhile Alice commits.
    let bob_posts = async {
        let mut appended = Vec::new();
        for (mid, msg, text) in &pending {
            match bob.session.delivery.send(&id, mid, msg, None).await? {
                SendOutcome::Appended { seq, .. } => appended.push((seq, text.clone())),
                SendOutcome::StaleEpoch { .. } => break,
                other => anyhow::bail!("unexpected {other:?}"),
            }
        }
        anyhow::Ok(appended)
    };
    let mut seen = Vec::new();
    let (appended, epoch) = {
        let mut on_event = |e| seen.push(e);
        let mut alice_chat = alice.chat();
        tokio::join!(bob_posts, alice_chat.update("g", &mut on_event))
    };
    let (appended, epoch) = (appended?, epoch?);
    ensure!(epoch == APPLICATION_EPOCH_LAG + 2);
    seen.extend(alice.recv().await?);

    let unreadable = seen
        .iter()
        .filter(|e| matches!(e, ChatEvent::Unreadable { .. }))
        .count();
    ensure!(
        unreadable == 0,
        "{unreadable} unreadable of {}",
        appended.len()
    );
    ensure!(
        User::messages(&seen) == appended,
        "alice read {:?}",
        User::messages(&seen)
    );
    Ok(())
}

/// A device that stopped between its commit being appended and merging it finds the commit
/// in the log among its own messages and merges it there, instead of staying an epoch behind.
async fn an_appended_commit_left_pending_is_merged_from_the_log(
    store: Option<AnyStore>,
) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
    let mut bob = User::register(&server, dir.path(), "bob", Suite::Classical).await?;
    let id = alice.chat().create_group("g").await?;
    alice
        .chat()
        .invite("g", &["bob".into()], &mut |_| {})
        .await?;
    bob.recv().await?;

    // Alice's commit is appended; she stops before merging it.
    let out = alice
        .group(&id)?
        .self_update(&alice.state.mls, alice.state.mls_identity())?;
    let mid = random_id()?;
    alice
        .state
        .groups
        .get_mut(&id)
        .ok_or_else(|| anyhow::anyhow!("no group meta"))?
        .own_pending
        .push(mid.clone());
    let sent = alice
        .session
        .delivery
        .send(
            &id,
            &mid,
            &out.commit,
            Some(&CommitParts {
                welcome: None,
                group_info: out.group_info.clone(),
            }),
        )
        .await?;
    ensure!(
        matches!(sent, SendOutcome::Appended { epoch: 2, .. }),
        "{sent:?}"
    );
    ensure!(alice.group(&id)?.has_pending_commit());

    bob.recv().await?;
    let seq = bob
        .chat()
        .send(&hex::encode(&id[..4]), b"after the stop", &mut |_| {})
        .await?;
    let seen = alice.recv().await?;
    ensure!(
        User::messages(&seen) == [(seq, "after the stop".to_owned())],
        "{seen:?}"
    );
    let (a, b) = (alice.group(&id)?, bob.group(&id)?);
    ensure!(a.epoch() == 2 && a.epoch_authenticator() == b.epoch_authenticator());
    Ok(())
}

macro_rules! epoch_tests {
    ($make:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_sender_too_far_behind_catches_up_and_resends() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::a_sender_too_far_behind_catches_up_and_resends(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_appended_commit_left_pending_is_merged_from_the_log() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::an_appended_commit_left_pending_is_merged_from_the_log(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_committer_reads_what_precedes_its_commit() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::a_committer_reads_what_precedes_its_commit(store)).await
        }
    };
}

mod embedded {
    use super::*;
    epoch_tests!(support::embedded_store());
}

mod postgres {
    use super::*;
    epoch_tests!(support::postgres_store());
}
