//! Reverting a commit members cannot process (ADR 0015), against the real server on both
//! stores. A member signs a valid commit, flips its confirmation tag and re-signs the GroupInfo
//! to match: the server's public view cannot tell (ADR 0012) and appends it. Every other member
//! fails to process it, reports it with a signed report and stays at its epoch; the first
//! report reverts the group, and the group goes on from the epoch before the commit. Reports
//! that break a rule are refused with `report_refused` naming it, and change nothing.

mod support;

use support::both_stores;

use anyhow::{Result, bail, ensure};
use quicproquo_client::chat::{ChatEvent, random_id};
use quicproquo_client::delivery::{CommitParts, SendOutcome};
use quicproquo_core::NodeRole;
use quicproquo_core::mls::Suite;
use quicproquo_core::report::CommitReport;
use quicproquo_proto::errors::ErrorCode;
use quicproquo_server::model::group::GroupId;
use quicproquo_server::store::AnyStore;
use quicproquo_server::store::embedded::EmbeddedStore;
use quicproquo_server::store::log::LogStore as _;
use support::forge::bad_confirmation_tag;
use support::groups::{group_of_two, server_view};
use support::logs::captured_logs;
use support::{TestServer, User, local};

fn server(store: Option<AnyStore>) -> Result<TestServer> {
    TestServer::start_with(NodeRole::Standalone, store, |_| {})
}

/// Alice, Bob and Carol in group `g` (one commit adds Bob and Carol); Eve registered only.
async fn group_of_three(
    server: &TestServer,
    dir: &std::path::Path,
) -> Result<(User, User, User, User, Vec<u8>)> {
    let mut alice = User::register(server, dir, "alice", Suite::Classical).await?;
    let mut bob = User::register(server, dir, "bob", Suite::Classical).await?;
    let mut carol = User::register(server, dir, "carol", Suite::Classical).await?;
    let eve = User::register(server, dir, "eve", Suite::Classical).await?;
    let id = alice.chat().create_group("g").await?;
    alice
        .chat()
        .invite("g", &["bob".into(), "carol".into()], &mut |_| {})
        .await?;
    bob.recv().await?;
    carol.recv().await?;
    Ok((alice, bob, carol, eve, id))
}

/// `user` sends `commit` (with `group_info`) as it is; returns its seq.
async fn append_commit(user: &User, id: &[u8], commit: &[u8], parts: &CommitParts) -> Result<u64> {
    let sent = user
        .session
        .delivery
        .send(id, &random_id()?, commit, Some(parts))
        .await?;
    match sent {
        SendOutcome::Appended { seq, .. } => Ok(seq),
        other => bail!("the forged commit was not appended: {other:?}"),
    }
}

/// `user` reports the commit at `seq` with `report`; the refusal's rule, or the marker.
async fn report(
    user: &User,
    id: &[u8],
    seq: u64,
    report: &CommitReport,
) -> Result<std::result::Result<(u64, u64), String>> {
    match user
        .session
        .delivery
        .report_commit(id, seq, &report.encode())
        .await
    {
        Ok(marker) => Ok(Ok(marker)),
        Err(e) if e.code() == Some(ErrorCode::ReportRefused) => Ok(Err(e.to_string())),
        Err(e) => bail!("refused without report_refused: {e}"),
    }
}

/// `events` include the marker of the revert of the commit at `seq`.
fn saw_revert(events: &[ChatEvent], seq: u64) -> Result<()> {
    ensure!(
        events
            .iter()
            .any(|e| matches!(e, ChatEvent::Reverted { commit_seq, .. } if *commit_seq == seq)),
        "{events:?}"
    );
    Ok(())
}

fn refused_for(answer: std::result::Result<(u64, u64), String>, rule: &str) -> Result<()> {
    match answer {
        Err(text) if text.contains(&format!("{rule}:")) => Ok(()),
        other => bail!("expected a refusal for {rule}, got {other:?}"),
    }
}

/// Alice stages a self-update, forges it with a bad confirmation tag and appends it; her
/// pending commit is dropped (what she merged is not what she sent). Returns its seq.
async fn bad_self_update(alice: &mut User, id: &[u8]) -> Result<u64> {
    let mut ga = alice.group(id)?;
    let out = ga.self_update(&alice.state.mls, alice.state.mls_identity())?;
    ga.discard_pending_commit(&alice.state.mls)?;
    let (commit, group_info) =
        bad_confirmation_tag(alice.state.mls_identity(), &out.commit, &out.group_info)?;
    let parts = CommitParts {
        welcome: None,
        group_info,
    };
    append_commit(alice, id, &commit, &parts).await
}

async fn a_reported_commit_is_reverted_and_the_group_goes_on(
    store: Option<AnyStore>,
) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let (mut alice, mut bob, mut carol, eve, id) = group_of_three(&server, dir.path()).await?;
    // Members who joined name the group by its short id.
    let g = hex::encode(&id[..4]);
    // An honest commit first, so that a report of a commit that is not the latest can be made.
    carol.chat().update(&g, &mut |_| {}).await?;
    alice.recv().await?;
    bob.recv().await?;
    let before = server_view(&alice, &id).await?;
    ensure!(before.0 == 2 && before.1.len() == 3, "{before:?}");
    let seq = bad_self_update(&mut alice, &id).await?;
    let forged = server_view(&alice, &id).await?;
    ensure!(
        forged.0 == 3,
        "the forged commit did not move the epoch: {forged:?}"
    );
    let commit = bob.session.delivery.fetch(&id, seq - 1, 1).await?;
    let logged = &commit
        .first()
        .ok_or_else(|| anyhow::anyhow!("no entry"))?
        .payload;

    // Reports breaking a rule are refused and change nothing.
    let own = CommitReport::sign(alice.state.identity(), &id, seq, logged);
    refused_for(report(&alice, &id, seq, &own).await?, "committer")?;
    let outsider = CommitReport::sign(eve.state.identity(), &id, seq, logged);
    refused_for(report(&eve, &id, seq, &outsider).await?, "not_member")?;
    let wrong_bytes = CommitReport::sign(bob.state.identity(), &id, seq, b"other bytes");
    refused_for(report(&bob, &id, seq, &wrong_bytes).await?, "signature")?;
    let not_his = CommitReport::sign(carol.state.identity(), &id, seq, logged);
    refused_for(report(&bob, &id, seq, &not_his).await?, "signature")?;
    let earlier = bob.session.delivery.fetch(&id, seq - 2, 1).await?;
    let earlier = &earlier
        .first()
        .ok_or_else(|| anyhow::anyhow!("no entry"))?
        .payload;
    let older = CommitReport::sign(bob.state.identity(), &id, seq - 1, earlier);
    refused_for(report(&bob, &id, seq - 1, &older).await?, "not_latest")?;
    ensure!(
        server_view(&alice, &id).await? == forged,
        "a refused report moved the group"
    );

    // Bob reads the log: he cannot process the commit, reports it, and the server reverts it.
    let events = bob.recv().await?;
    let reverted = events.iter().any(|e| {
        matches!(e, ChatEvent::Reverted { commit_seq, epoch: 2, in_step: true, .. }
            if *commit_seq == seq)
    });
    ensure!(reverted, "bob saw no revert: {events:?}");
    ensure!(bob.group(&id)?.epoch() == 2);
    ensure!(
        server_view(&alice, &id).await? == before,
        "the group was not reverted"
    );
    // Carol reports too: the commit is reverted already, and she follows the marker.
    let events = carol.recv().await?;
    ensure!(
        events
            .iter()
            .any(|e| matches!(e, ChatEvent::Reverted { in_step: true, .. })),
        "carol saw no revert: {events:?}"
    );
    // Alice, who signed it, is refused as its committer and stays at the epoch before it.
    let events = alice.recv().await?;
    ensure!(alice.group(&id)?.epoch() == 2, "alice: {events:?}");
    let again = CommitReport::sign(carol.state.identity(), &id, seq, logged);
    let marker = report(&carol, &id, seq, &again).await?;
    ensure!(
        matches!(marker, Ok((m, 2)) if m == seq + 1),
        "a second report: {marker:?}"
    );

    // The group goes on from the epoch before it: Carol commits, everyone follows and reads.
    carol.chat().update(&g, &mut |_| {}).await?;
    alice.recv().await?;
    bob.recv().await?;
    ensure!(server_view(&alice, &id).await?.0 == 3);
    alice
        .chat()
        .send("g", b"after the revert", &mut |_| {})
        .await?;
    for reader in [&mut bob, &mut carol] {
        let got = User::messages(&reader.recv().await?);
        ensure!(
            got.iter().any(|(_, t)| t == "after the revert"),
            "a member did not read on: {got:?}"
        );
    }
    bob.chat().send(&g, b"and back", &mut |_| {}).await?;
    let got = User::messages(&alice.recv().await?);
    ensure!(
        got.iter().any(|(_, t)| t == "and back"),
        "alice got {got:?}"
    );

    // Every report is counted by its outcome: one revert, the repeats, and each refusal by
    // the rule that refused it (the members' own clients report too, so at least these).
    let mut text = String::new();
    server.handle()?.observer().metrics.render(&mut text);
    let count = |outcome: &str| -> u64 {
        let series = format!("qpq_commit_reports_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok())
            .unwrap_or(0)
    };
    ensure!(count("reverted") == 1, "{text}");
    for (outcome, at_least) in [
        ("already_reverted", 1),
        ("committer", 1),
        ("not_member", 1),
        ("signature", 2),
        ("not_latest", 1),
    ] {
        ensure!(count(outcome) >= at_least, "{outcome}: {text}");
    }
    Ok(())
}

/// A bad commit that adds Dave: once reverted, Dave is no member, cannot read the group and
/// his Welcome is gone from his inbox; the members keep the epoch before it.
///
/// The revert names the committer and the reporter in the log by the keyed hashes of their
/// identities, with the group's, and nothing of the commit.
async fn a_reverted_add_is_undone(store: Option<AnyStore>) -> Result<()> {
    let logs = captured_logs();
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let (alice, mut bob, _carol, _eve, id) = group_of_three(&server, dir.path()).await?;
    let dave = User::register(&server, dir.path(), "dave", Suite::Classical).await?;
    let before = server_view(&alice, &id).await?;
    let dave_key = dave.state.identity().public();
    let fetched = alice.session.auth.fetch_key_packages(&[dave_key]).await?;
    let packages: Vec<Vec<u8>> = fetched.into_iter().map(|k| k.data).collect();
    let mut ga = alice.group(&id)?;
    let out = ga.add_members(&alice.state.mls, alice.state.mls_identity(), &packages)?;
    ga.discard_pending_commit(&alice.state.mls)?;
    let (commit, group_info) =
        bad_confirmation_tag(alice.state.mls_identity(), &out.commit, &out.group_info)?;
    let parts = CommitParts {
        welcome: out.welcome.clone(),
        group_info,
    };
    let seq = append_commit(&alice, &id, &commit, &parts).await?;
    let added = server_view(&alice, &id).await?;
    ensure!(added.1.contains(&dave_key), "{added:?}");
    ensure!(dave.session.delivery.inbox(0, 10).await?.len() == 1);

    saw_revert(&bob.recv().await?, seq)?;
    ensure!(server_view(&alice, &id).await? == before, "not undone");
    let node =
        quicproquo_server::NodeIdentity::load_or_create(&server.data_dir(), NodeRole::Standalone)?;
    let alice_hash = node
        .redactor
        .hash(alice.state.identity().public().as_bytes());
    let bob_hash = node.redactor.hash(bob.state.identity().public().as_bytes());
    let text = String::from_utf8_lossy(&logs.lock().map_err(|_| anyhow::anyhow!("poisoned"))?)
        .into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("commit reverted") && l.contains(&alice_hash))
        .ok_or_else(|| anyhow::anyhow!("no revert naming alice in the log:\n{text}"))?;
    ensure!(
        line.contains(&bob_hash) && line.contains(&node.redactor.hash(&id)),
        "{line}"
    );
    ensure!(
        !line.contains(&hex::encode(&commit[commit.len() - 32..])),
        "the log holds message bytes: {line}"
    );
    ensure!(
        dave.session.delivery.inbox(0, 10).await?.is_empty(),
        "the Welcome stays"
    );
    let read = dave.session.delivery.fetch(&id, 0, 10).await;
    ensure!(
        read.as_ref().map_or(true, Vec::is_empty),
        "dave reads the group: {read:?}"
    );
    let sent = dave
        .session
        .delivery
        .send(&id, &random_id()?, &commit, Some(&parts))
        .await;
    ensure!(
        sent.as_ref().err().and_then(|e| e.code()) == Some(ErrorCode::NotMember),
        "dave can send: {sent:?}"
    );
    Ok(())
}

/// A bad commit that removes Carol: once reverted, Carol is a member again and the group talks
/// with her.
async fn a_reverted_remove_readmits(store: Option<AnyStore>) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let (alice, mut bob, mut carol, _eve, id) = group_of_three(&server, dir.path()).await?;
    let before = server_view(&alice, &id).await?;
    let carol_key = carol.state.identity().public();
    let mut ga = alice.group(&id)?;
    let out = ga.remove_members(&alice.state.mls, alice.state.mls_identity(), &[carol_key])?;
    ga.discard_pending_commit(&alice.state.mls)?;
    let (commit, group_info) =
        bad_confirmation_tag(alice.state.mls_identity(), &out.commit, &out.group_info)?;
    let parts = CommitParts {
        welcome: None,
        group_info,
    };
    append_commit(&alice, &id, &commit, &parts).await?;
    ensure!(!server_view(&alice, &id).await?.1.contains(&carol_key));
    bob.recv().await?;
    ensure!(
        server_view(&alice, &id).await? == before,
        "carol was not readmitted"
    );
    let events = carol.recv().await?;
    ensure!(
        events
            .iter()
            .any(|e| matches!(e, ChatEvent::Reverted { in_step: true, .. })),
        "carol: {events:?}"
    );
    let g = hex::encode(&id[..4]);
    carol.chat().send(&g, b"still in", &mut |_| {}).await?;
    let got = User::messages(&bob.recv().await?);
    ensure!(got.iter().any(|(_, t)| t == "still in"), "bob got {got:?}");
    Ok(())
}

/// Once a member other than the committer acknowledged the commit, it processed it: a report
/// (a false one, or from a member out of step) no longer reverts it.
async fn a_processed_commit_is_not_reverted(store: Option<AnyStore>) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let (mut alice, bob, carol, _eve, id) = group_of_three(&server, dir.path()).await?;
    let seq = bad_self_update(&mut alice, &id).await?;
    let moved = server_view(&alice, &id).await?;
    carol.session.delivery.acknowledge(&id, seq).await?;
    let logged = bob.session.delivery.fetch(&id, seq - 1, 1).await?;
    let logged = &logged
        .first()
        .ok_or_else(|| anyhow::anyhow!("no entry"))?
        .payload;
    let r = CommitReport::sign(bob.state.identity(), &id, seq, logged);
    refused_for(report(&bob, &id, seq, &r).await?, "processed")?;
    ensure!(server_view(&alice, &id).await? == moved, "moved");
    Ok(())
}

/// The server keeps a group's view as snapshots plus the verified messages after them (ADR
/// 0018): with one view cached, each commit to the group reloads its view from the store (the
/// latest snapshot, then the messages after it replayed), and every 16th commit writes a
/// snapshot. A bad commit that took a snapshot is reverted like any other: the view goes back
/// to the snapshot before it and the 15 commits after that, and the group goes on.
async fn a_commit_that_took_a_snapshot_is_reverted(store: Option<AnyStore>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = match store {
        Some(s) => s,
        None => AnyStore::Embedded(EmbeddedStore::open(&dir.path().join("qpq.db"))?),
    };
    let server = TestServer::start_with(NodeRole::Standalone, Some(store.clone()), |c| {
        c.limits.max_cached_group_views = 1;
    })?;
    let (mut alice, mut bob, _eve, id) = group_of_two(&server, dir.path()).await?;
    let g = hex::encode(&id[..4]);
    // Commits to a second group evict the first one's view from the cache.
    alice.chat().create_group("other").await?;
    let gid = GroupId::new(&id)?;
    let stored = || async {
        store
            .load_view(&gid)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no stored view"))
    };
    // Honest commits, each verified against a reloaded view, until the next one takes a
    // snapshot (15 commits are kept after the latest).
    for _ in 0..40 {
        let kept = stored().await?.tail.len();
        if kept == 15 {
            break;
        }
        bob.chat().update(&g, &mut |_| {}).await?;
        alice.recv().await?;
        alice.chat().update("other", &mut |_| {}).await?;
    }
    let before = stored().await?;
    ensure!(before.tail.len() == 15, "{} kept", before.tail.len());
    // Each of those commits loaded the group's view and replayed what was kept after the
    // snapshot: 0 + 1 + ... + 14 messages at least.
    let counter = |name: &str| -> Result<u64> {
        let mut text = String::new();
        server.handle()?.observer().metrics.render(&mut text);
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0))
    };
    ensure!(counter("qpq_group_view_loads_total ")? >= 15);
    ensure!(counter("qpq_group_view_replayed_total ")? >= (0..15).sum::<u64>());
    let seq = bad_self_update(&mut alice, &id).await?;
    let snapshot = stored().await?;
    ensure!(
        snapshot.tail.is_empty() && snapshot.epoch == before.epoch + 1,
        "the bad commit took no snapshot: {} kept, epoch {}",
        snapshot.tail.len(),
        snapshot.epoch
    );
    alice.chat().update("other", &mut |_| {}).await?;

    // Bob cannot process it and reports it: the view is the one before it again.
    saw_revert(&bob.recv().await?, seq)?;
    ensure!(
        stored().await? == before,
        "the view before the bad commit was not restored"
    );
    alice.recv().await?;

    // The group goes on from it: Bob's commit (now the snapshot), then one kept after it,
    // each verified against a reloaded view; they talk.
    for kept in [0, 1] {
        bob.chat().update(&g, &mut |_| {}).await?;
        alice.recv().await?;
        alice.chat().update("other", &mut |_| {}).await?;
        let now = stored().await?;
        ensure!(
            now.tail.len() == kept,
            "{} kept, not {kept}",
            now.tail.len()
        );
        ensure!(now.epoch == before.epoch + 1 + kept as u64);
    }
    alice
        .chat()
        .send("g", b"after the snapshot", &mut |_| {})
        .await?;
    let got = User::messages(&bob.recv().await?);
    ensure!(
        got.iter().any(|(_, t)| t == "after the snapshot"),
        "bob got {got:?}"
    );
    Ok(())
}

both_stores!(
    a_reported_commit_is_reverted_and_the_group_goes_on,
    a_reverted_add_is_undone,
    a_reverted_remove_readmits,
    a_processed_commit_is_not_reverted,
    a_commit_that_took_a_snapshot_is_reverted
);
