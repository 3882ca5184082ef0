//! Commit verification and reverts through the cluster: members on an edge, their group
//! ordered by its owner shard in another process, Postgres behind both (ADR 0012, ADR 0015).
//! Forged commits sent through the edge are refused with `bad_commit` by the owner shard, and
//! nothing moves; a validly signed commit members cannot process is reported through the edge
//! and reverted by the shard, and the group goes on from the epoch before it.

use anyhow::{Result, bail, ensure};
use quicproquo_client::chat::{ChatEvent, random_id};
use quicproquo_client::delivery::{CommitParts, SendOutcome};
use quicproquo_core::IdentityKey;
use quicproquo_proto::errors::ErrorCode;

use crate::forge::bad_confirmation_tag;
use crate::harness::{Cluster, Member};

/// The group's (epoch, sorted members) as the cluster sees it, asked by `member`.
async fn server_view(member: &Member, id: &[u8]) -> Result<(u64, Vec<IdentityKey>)> {
    let groups = member.session.delivery.groups().await?;
    let g = groups
        .into_iter()
        .find(|g| g.group_id == id)
        .ok_or_else(|| anyhow::anyhow!("not a member"))?;
    let mut members = g.members;
    members.sort();
    Ok((g.epoch, members))
}

/// Reads and processes everything new for `member`; returns what happened.
async fn recv(member: &mut Member) -> Result<Vec<ChatEvent>> {
    let mut events = Vec::new();
    member.chat().receive_all(&mut |e| events.push(e)).await?;
    Ok(events)
}

/// The texts of the messages among `events`.
fn texts(events: &[ChatEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Message { body, .. } => Some(String::from_utf8_lossy(body).into_owned()),
            _ => None,
        })
        .collect()
}

/// `member` sends `message` as it is; the error code of its refusal.
async fn refused(
    member: &Member,
    id: &[u8],
    message: &[u8],
    parts: Option<&CommitParts>,
) -> Result<ErrorCode> {
    match member
        .session
        .delivery
        .send(id, &random_id()?, message, parts)
        .await
    {
        Ok(outcome) => bail!("appended through the cluster: {outcome:?}"),
        Err(e) => e
            .code()
            .ok_or_else(|| anyhow::anyhow!("refused without a code: {e}")),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn forged_commits_are_refused_and_a_reported_one_reverted_through_an_edge() -> Result<()> {
    tokio::task::LocalSet::new().run_until(commits()).await
}

async fn commits() -> Result<()> {
    let db = quicproquo_testkit::postgres::fresh_database().await?;
    let tmp = tempfile::tempdir()?;
    let cluster = Cluster::start(db.url(), &tmp.path().join("cluster"), 1, 2)?;
    let options = cluster.options();
    let dir = tmp.path();
    let mut alice = Member::register("alice", dir, cluster.edge_addrs(0)?, &options).await?;
    let mut bob = Member::register("bob", dir, cluster.edge_addrs(0)?, &options).await?;
    let mut carol = Member::register("carol", dir, cluster.edge_addrs(0)?, &options).await?;
    let eve = Member::register("eve", dir, cluster.edge_addrs(0)?, &options).await?;
    let id = alice.chat().create_group("g").await?;
    alice
        .chat()
        .invite("g", &["bob".into(), "carol".into()], &mut |_| {})
        .await?;
    recv(&mut bob).await?;
    recv(&mut carol).await?;
    let g = hex::encode(&id[..4]);
    let before = server_view(&alice, &id).await?;
    ensure!(before.0 == 1 && before.1.len() == 3, "{before:?}");

    // Alice stages a valid commit; others try it, and forgeries of it, through the edge.
    let mut ga = quicproquo_core::group::Group::load(&alice.state.mls, &id)?
        .ok_or_else(|| anyhow::anyhow!("alice's group is not stored"))?;
    let out = ga.self_update(&alice.state.mls, alice.state.mls_identity())?;
    ga.discard_pending_commit(&alice.state.mls)?;
    let parts = CommitParts {
        welcome: None,
        group_info: out.group_info.clone(),
    };
    // A non-member, and another member's leaf.
    let code = refused(&eve, &id, &out.commit, Some(&parts)).await?;
    ensure!(code == ErrorCode::NotMember, "eve: {code:?}");
    let code = refused(&bob, &id, &out.commit, Some(&parts)).await?;
    ensure!(
        code == ErrorCode::BadCommit,
        "bob sends alice's commit: {code:?}"
    );
    // The epoch rewritten ahead (the signature no longer verifies), and a truncated commit.
    let at = out
        .commit
        .windows(id.len())
        .position(|w| w == id.as_slice())
        .ok_or_else(|| anyhow::anyhow!("no group id in the commit"))?
        + id.len();
    let mut ahead = out.commit.clone();
    ahead[at..at + 8].copy_from_slice(&2u64.to_be_bytes());
    let code = refused(&alice, &id, &ahead, Some(&parts)).await?;
    ensure!(code == ErrorCode::BadCommit, "epoch rewritten: {code:?}");
    let code = refused(
        &alice,
        &id,
        &out.commit[..out.commit.len() - 40],
        Some(&parts),
    )
    .await?;
    ensure!(
        matches!(code, ErrorCode::BadCommit | ErrorCode::BadMessage),
        "truncated: {code:?}"
    );
    // Without its GroupInfo.
    let code = refused(&alice, &id, &out.commit, Some(&CommitParts::default())).await?;
    ensure!(code == ErrorCode::BadCommit, "no GroupInfo: {code:?}");
    ensure!(
        server_view(&alice, &id).await? == before,
        "a refused commit moved the group"
    );
    // Others keep sending.
    bob.chat().send(&g, b"still here", &mut |_| {}).await?;
    ensure!(texts(&recv(&mut carol).await?).contains(&"still here".to_owned()));
    recv(&mut alice).await?;

    // A validly signed commit with a bad confirmation tag: appended, reported, reverted.
    let mut ga = quicproquo_core::group::Group::load(&alice.state.mls, &id)?
        .ok_or_else(|| anyhow::anyhow!("alice's group is not stored"))?;
    let out = ga.self_update(&alice.state.mls, alice.state.mls_identity())?;
    ga.discard_pending_commit(&alice.state.mls)?;
    let (commit, group_info) =
        bad_confirmation_tag(alice.state.mls_identity(), &out.commit, &out.group_info)?;
    let sent = alice
        .session
        .delivery
        .send(
            &id,
            &random_id()?,
            &commit,
            Some(&CommitParts {
                welcome: None,
                group_info,
            }),
        )
        .await?;
    let SendOutcome::Appended { seq, epoch: 2 } = sent else {
        bail!("the forged commit was not appended: {sent:?}");
    };
    let events = recv(&mut bob).await?;
    ensure!(
        events.iter().any(|e| matches!(e,
            ChatEvent::Reverted { commit_seq, epoch: 1, in_step: true, .. } if *commit_seq == seq)),
        "bob saw no revert: {events:?}"
    );
    let events = recv(&mut carol).await?;
    ensure!(
        events
            .iter()
            .any(|e| matches!(e, ChatEvent::Reverted { in_step: true, .. })),
        "carol saw no revert: {events:?}"
    );
    recv(&mut alice).await?;
    ensure!(server_view(&alice, &id).await? == before, "not reverted");

    // The group goes on from the epoch before it.
    carol.chat().update(&g, &mut |_| {}).await?;
    recv(&mut alice).await?;
    recv(&mut bob).await?;
    ensure!(server_view(&alice, &id).await?.0 == 2);
    alice
        .chat()
        .send("g", b"after the revert", &mut |_| {})
        .await?;
    for reader in [&mut bob, &mut carol] {
        let got = texts(&recv(reader).await?);
        ensure!(
            got.contains(&"after the revert".to_owned()),
            "a member did not read on: {got:?}"
        );
    }
    cluster.stop()?;
    Ok(())
}
