//! The Postgres log store under concurrency that the conformance suite does not reach: two
//! stores (two shards that both believe they own the same groups) racing on shared groups, and
//! readers that must never see a later entry before an earlier one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail, ensure};
use quicproquo_core::IdentityKey;
use quicproquo_server::model::group::{APPLICATION_EPOCH_LAG, AppendOutcome, EntryKind, GroupId};
use quicproquo_server::store::Store;
use quicproquo_server::store::log::LogStore;
use quicproquo_server::store::postgres::{PgStore, migrate};
use quicproquo_testkit::conformance::identity;
use quicproquo_testkit::log_conformance::{app, commit};
use quicproquo_testkit::postgres::{TestDatabase, fresh_database};

const GROUPS: usize = 4;

async fn two_stores() -> Result<(PgStore, PgStore, IdentityKey, Vec<GroupId>, TestDatabase)> {
    let db = fresh_database().await?;
    migrate(db.url()).await?;
    let (a, b) = (
        PgStore::connect(db.url(), 4).await?,
        PgStore::connect(db.url(), 4).await?,
    );
    let alice = identity()?;
    a.register_identity(&alice).await?;
    let mut groups = Vec::new();
    for g in 0..GROUPS {
        let group = GroupId::new(format!("shared-{g}").as_bytes())?;
        a.create_group(&group, &alice).await?;
        groups.push(group);
    }
    Ok((a, b, alice, groups, db))
}

/// Batches from two stores naming the same groups in opposite orders, with commits racing for
/// each epoch: no deadlock, gap-free logs, exactly one commit per epoch, every outcome true.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_shards_on_the_same_groups_keep_order_and_one_commit_per_epoch() -> Result<()> {
    const WRITERS_PER_STORE: usize = 3;
    const ROUNDS: usize = 15;
    let (a, b, alice, groups, _db) = two_stores().await?;
    let groups = Arc::new(groups);
    let mut tasks = Vec::new();
    for (s, store) in [a.clone(), b].into_iter().enumerate() {
        for w in 0..WRITERS_PER_STORE {
            let (store, groups) = (store.clone(), Arc::clone(&groups));
            tasks.push(tokio::spawn(async move {
                let mut appended = Vec::new();
                for round in 0..ROUNDS {
                    let mut order: Vec<usize> = (0..GROUPS).collect();
                    if (s + w + round) % 2 == 1 {
                        order.reverse();
                    }
                    let mut batch = Vec::new();
                    for &g in &order {
                        let group = &groups[g];
                        // Commit for the epoch this writer last saw; most lose, one wins.
                        let epoch = store.group_summary(group, &alice).await?.epoch;
                        batch.push(app(group, alice, epoch, &format!("m-{s}-{w}-{round}-{g}")));
                        batch.push(commit(
                            group,
                            alice,
                            epoch,
                            &format!("c-{s}-{w}-{round}-{g}"),
                            &[],
                            &[],
                        ));
                    }
                    let out = store.append(&batch).await?;
                    ensure!(out.len() == batch.len());
                    for (req, outcome) in batch.into_iter().zip(out) {
                        match outcome {
                            AppendOutcome::Appended { seq, .. } => {
                                appended.push((req.group_id, req.message_id, seq));
                            }
                            // Commits race; an application message is refused only once
                            // other writers' commits took the group more than the kept past
                            // epochs beyond the epoch it names (read before, epochs only grow).
                            AppendOutcome::StaleEpoch { current_epoch, .. }
                                if req.kind == EntryKind::Commit
                                    || current_epoch > req.epoch + APPLICATION_EPOCH_LAG => {}
                            other => bail!("unexpected {other:?}"),
                        }
                    }
                }
                anyhow::Ok(appended)
            }));
        }
    }
    let mut appended = Vec::new();
    for task in tasks {
        appended.extend(task.await??);
    }
    let mut total = 0;
    for group in groups.iter() {
        let log = a.read_log(group, &alice, 0, 10_000).await?;
        total += log.len();
        ensure!(
            log.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1),
            "gap or reordering in {group:?}"
        );
        let commit_epochs: Vec<u64> = log
            .iter()
            .filter(|e| e.kind == EntryKind::Commit)
            .map(|e| e.epoch)
            .collect();
        ensure!(
            commit_epochs == (0..commit_epochs.len() as u64).collect::<Vec<_>>(),
            "one commit per epoch, epochs in order: {commit_epochs:?}"
        );
        let summary = a.group_summary(group, &alice).await?;
        ensure!(summary.epoch == commit_epochs.len() as u64);
        ensure!(summary.last_seq == log.len() as u64);
        let by_id: HashMap<&[u8], u64> = log
            .iter()
            .map(|e| (e.message_id.as_slice(), e.seq))
            .collect();
        for (g, id, seq) in &appended {
            if g == group {
                ensure!(
                    by_id.get(id.as_slice()) == Some(seq),
                    "outcome seq differs from the log"
                );
            }
        }
    }
    ensure!(
        total == appended.len(),
        "{total} entries, {} appended",
        appended.len()
    );
    Ok(())
}

/// Readers polling the log while two stores append: each read continues exactly where the
/// previous ended (seq N + 1 never shows before N commits).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_never_see_a_later_entry_first() -> Result<()> {
    const PER_WRITER: usize = 60;
    const WRITERS: usize = 4;
    let (a, b, alice, groups, _db) = two_stores().await?;
    let group = groups[0].clone();
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (store, group, done) = (a.clone(), group.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            let mut cursor = 0u64;
            loop {
                // Read the flag first: a read after it was set sees every append.
                let finished = done.load(Ordering::Acquire);
                for entry in store.read_log(&group, &alice, cursor, 1000).await? {
                    ensure!(entry.seq == cursor + 1, "read {} after {cursor}", entry.seq);
                    cursor = entry.seq;
                }
                if finished {
                    return anyhow::Ok(cursor);
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = if w % 2 == 0 { a.clone() } else { b.clone() };
            let group = group.clone();
            tokio::spawn(async move {
                for i in 0..PER_WRITER {
                    let out = store
                        .append(&[app(&group, alice, 0, &format!("{w}-{i}"))])
                        .await?;
                    ensure!(
                        matches!(out[..], [AppendOutcome::Appended { .. }]),
                        "{out:?}"
                    );
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for w in writers {
        w.await??;
    }
    done.store(true, Ordering::Release);
    let read = reader.await??;
    ensure!(read == (WRITERS * PER_WRITER) as u64, "read up to {read}");
    Ok(())
}

async fn admin(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// An append whose caller gives up while its transaction is open (it has sent `BEGIN` and the
/// group lock, and waits for the lock) must not leave that transaction open on a pooled
/// connection, where it would keep the group locked: the group stays writable by every store,
/// and nothing of the abandoned batch is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_append_releases_its_locks_and_commits_nothing() -> Result<()> {
    let (a, b, alice, groups, db) = two_stores().await?;
    let group = groups[0].clone();
    a.append(&[app(&group, alice, 0, "warm")]).await?;

    // Hold the group's row lock elsewhere, so the append stops inside its transaction.
    let holder = admin(db.url()).await?;
    holder.batch_execute("BEGIN").await?;
    holder
        .execute(
            "SELECT 1 FROM groups WHERE group_id = $1 FOR UPDATE",
            &[&group.as_bytes()],
        )
        .await?;
    let abandoned = {
        let (a, group) = (a.clone(), group.clone());
        tokio::spawn(async move { a.append(&[app(&group, alice, 0, "abandoned")]).await })
    };
    let watcher = admin(db.url()).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await?
            .try_get(0)?;
        if waiting > 0 {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the append never waited for the group lock"
        );
        tokio::task::yield_now().await;
    }
    abandoned.abort();
    ensure!(abandoned.await.is_err_and(|e| e.is_cancelled()));
    holder.batch_execute("COMMIT").await?;

    for (name, store) in [("after-b", &b), ("after-a", &a)] {
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            store.append(&[app(&group, alice, 0, name)]),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the group stayed locked ({name})"))??;
        ensure!(
            matches!(out[..], [AppendOutcome::Appended { .. }]),
            "{out:?}"
        );
    }
    let ids: Vec<String> = b
        .read_log(&group, &alice, 0, 10)
        .await?
        .into_iter()
        .map(|e| String::from_utf8_lossy(&e.message_id).into_owned())
        .collect();
    ensure!(ids == ["warm", "after-b", "after-a"], "{ids:?}");
    Ok(())
}

/// A batch of many KiB of log rows (sent by `COPY`, ADR 0020) that repeats a stored message
/// id in its middle and has two commits racing for one epoch: the first attempt fails at the
/// unique index and rolls back whole (none of the rows copied before the repeat stays), the
/// batch is decided again (the repeat `Duplicate`, the late commit `StaleEpoch`, the rest
/// appended with dense seqs), and the store's only connection is clean for the next batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_batch_with_a_repeat_rolls_back_whole_and_is_decided_again() -> Result<()> {
    let db = fresh_database().await?;
    migrate(db.url()).await?;
    // One connection: every batch below, and the retry, run on the one the failed copy used.
    let store = PgStore::connect(db.url(), 1).await?;
    let alice = identity()?;
    store.register_identity(&alice).await?;
    let group = GroupId::new(b"copied")?;
    store.create_group(&group, &alice).await?;
    let out = store.append(&[app(&group, alice, 0, "stored")]).await?;
    ensure!(
        out == [AppendOutcome::Appended { seq: 1, epoch: 0 }],
        "{out:?}"
    );

    let mut batch: Vec<_> = (0..100u8)
        .map(|i| {
            let mut req = app(&group, alice, 0, &format!("a{i}"));
            req.payload = vec![i; 1024];
            req
        })
        .collect();
    batch.insert(50, app(&group, alice, 0, "stored"));
    batch.push(commit(&group, alice, 0, "c1", &[], &[]));
    batch.push(commit(&group, alice, 0, "c2", &[], &[]));
    batch.push(app(&group, alice, 1, "after"));
    let out = store.append(&batch).await?;

    let mut expected: Vec<AppendOutcome> = (2..=101)
        .map(|seq| AppendOutcome::Appended { seq, epoch: 0 })
        .collect();
    expected.insert(50, AppendOutcome::Duplicate { seq: 1 });
    expected.extend([
        AppendOutcome::Appended { seq: 102, epoch: 1 },
        AppendOutcome::StaleEpoch {
            current_epoch: 1,
            winner_seq: 102,
        },
        AppendOutcome::Appended { seq: 103, epoch: 1 },
    ]);
    ensure!(out == expected, "{out:?}");

    let out = store.append(&[app(&group, alice, 1, "next")]).await?;
    ensure!(
        out == [AppendOutcome::Appended { seq: 104, epoch: 1 }],
        "{out:?}"
    );
    let log = store.read_log(&group, &alice, 0, 1000).await?;
    let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
    ensure!(seqs == (1..=104).collect::<Vec<_>>(), "{seqs:?}");
    let ids: Vec<String> = log
        .iter()
        .map(|e| String::from_utf8_lossy(&e.message_id).into_owned())
        .collect();
    let mut want = vec!["stored".to_owned()];
    want.extend((0..100).map(|i| format!("a{i}")));
    want.extend(["c1", "after", "next"].map(str::to_owned));
    ensure!(ids == want, "{ids:?}");
    ensure!(log[1].payload == vec![0u8; 1024] && log[100].payload == vec![99u8; 1024]);
    let rows: i64 = admin(db.url())
        .await?
        .query_one("SELECT count(*) FROM group_log", &[])
        .await?
        .try_get(0)?;
    ensure!(rows == 104, "{rows} rows in the log");
    Ok(())
}
