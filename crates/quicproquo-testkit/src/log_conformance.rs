//! The Delivery Service part of the store conformance suite (see `LogStore`).

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Result, bail, ensure};
use quicproquo_core::IdentityKey;
use quicproquo_server::model::group::{
    APPLICATION_EPOCH_LAG, AppendOutcome, AppendRequest, CommitChange, EntryKind, GroupId,
};
use quicproquo_server::model::page::{Page, log_entry_bytes, welcome_bytes};
use quicproquo_server::store::log::LogStore;
use quicproquo_server::store::{Store, StoreError};

use crate::conformance::identity;

async fn registered<S: Store>(store: &S) -> Result<IdentityKey> {
    let id = identity()?;
    store.register_identity(&id).await?;
    Ok(id)
}

fn gid(s: &str) -> Result<GroupId> {
    Ok(GroupId::new(s.as_bytes())?)
}

/// An application message from `sender` at `epoch` with message id `mid`.
pub fn app(group: &GroupId, sender: IdentityKey, epoch: u64, mid: &str) -> AppendRequest {
    AppendRequest {
        group_id: group.clone(),
        sender,
        message_id: mid.as_bytes().to_vec(),
        kind: EntryKind::Application,
        epoch,
        payload: format!("payload {mid}").into_bytes(),
        commit: None,
        view: None,
    }
}

/// A commit from `sender` for `epoch` adding and removing members.
pub fn commit(
    group: &GroupId,
    sender: IdentityKey,
    epoch: u64,
    mid: &str,
    added: &[IdentityKey],
    removed: &[IdentityKey],
) -> AppendRequest {
    AppendRequest {
        kind: EntryKind::Commit,
        commit: Some(CommitChange {
            added: added.to_vec(),
            removed: removed.to_vec(),
            welcome: (!added.is_empty()).then(|| format!("welcome {mid}").into_bytes()),
            group_info: None,
        }),
        ..app(group, sender, epoch, mid)
    }
}

async fn one<S: LogStore>(store: &S, req: AppendRequest) -> Result<AppendOutcome> {
    let mut out = store.append(&[req]).await?;
    out.pop().ok_or_else(|| anyhow::anyhow!("no outcome"))
}

/// Creation, membership checks, one commit per epoch, Welcomes, idempotent message ids.
pub async fn group_lifecycle<S: Store + LogStore>(store: &S) -> Result<()> {
    let (alice, bob, eve) = (
        registered(store).await?,
        registered(store).await?,
        registered(store).await?,
    );
    let g = gid("group-1")?;
    store.create_group(&g, &alice).await?;
    ensure!(matches!(
        store.create_group(&g, &eve).await,
        Err(StoreError::GroupExists)
    ));

    ensure!(
        one(store, app(&g, alice, 0, "m1")).await? == AppendOutcome::Appended { seq: 1, epoch: 0 }
    );
    ensure!(one(store, app(&g, eve, 0, "e1")).await? == AppendOutcome::NotMember);
    ensure!(one(store, app(&gid("nope")?, alice, 0, "x")).await? == AppendOutcome::UnknownGroup);
    // A retried send returns the original sequence number and appends nothing.
    ensure!(one(store, app(&g, alice, 0, "m1")).await? == AppendOutcome::Duplicate { seq: 1 });

    let c1 = commit(&g, alice, 0, "c1", &[bob], &[]);
    ensure!(one(store, c1).await? == AppendOutcome::Appended { seq: 2, epoch: 1 });
    // A second commit for epoch 0 loses, and learns the winner.
    let late = commit(&g, alice, 0, "c1-late", &[eve], &[]);
    ensure!(
        one(store, late).await?
            == AppendOutcome::StaleEpoch {
                current_epoch: 1,
                winner_seq: 2
            }
    );
    let mut proposal = app(&g, alice, 0, "p0");
    proposal.kind = EntryKind::Proposal;
    ensure!(matches!(
        one(store, proposal).await?,
        AppendOutcome::StaleEpoch { .. }
    ));
    // Application messages from a future epoch are refused too.
    ensure!(matches!(
        one(store, app(&g, bob, 7, "b-future")).await?,
        AppendOutcome::StaleEpoch { .. }
    ));
    ensure!(
        one(store, app(&g, bob, 1, "b1")).await? == AppendOutcome::Appended { seq: 3, epoch: 1 }
    );

    // Bob's inbox holds the Welcome; Eve's is empty (the losing commit stored nothing).
    let inbox = store.read_inbox(&bob, 0, 10).await?;
    ensure!(inbox.len() == 1 && inbox[0].group_id == g && inbox[0].commit_seq == 2);
    ensure!(inbox[0].welcome == b"welcome c1");
    ensure!(store.read_inbox(&bob, inbox[0].seq, 10).await?.is_empty());
    ensure!(store.read_inbox(&eve, 0, 10).await?.is_empty());

    let summary = store.group_summary(&g, &bob).await?;
    ensure!(summary.epoch == 1 && summary.last_seq == 3);
    let members: HashSet<_> = summary.members.into_iter().collect();
    ensure!(members == HashSet::from([alice, bob]));
    ensure!(matches!(
        store.group_summary(&g, &eve).await,
        Err(StoreError::NotMember)
    ));
    // The one-lookup membership check agrees with the summary.
    store.check_member(&g, &alice).await?;
    store.check_member(&g, &bob).await?;
    ensure!(matches!(
        store.check_member(&g, &eve).await,
        Err(StoreError::NotMember)
    ));
    ensure!(matches!(
        store.check_member(&gid("nope")?, &alice).await,
        Err(StoreError::UnknownGroup)
    ));
    ensure!(store.groups_of(&bob).await? == vec![g.clone()]);
    ensure!(store.groups_of(&eve).await?.is_empty());
    Ok(())
}

/// Who can read what: joined-after and left-at windows.
pub async fn read_windows<S: Store + LogStore>(store: &S) -> Result<()> {
    let (alice, bob, carol, eve) = (
        registered(store).await?,
        registered(store).await?,
        registered(store).await?,
        registered(store).await?,
    );
    let g = gid("group-2")?;
    store.create_group(&g, &alice).await?;
    one(store, app(&g, alice, 0, "1")).await?; // seq 1
    one(store, commit(&g, alice, 0, "2", &[bob, carol], &[])).await?; // seq 2, epoch 1
    one(store, app(&g, carol, 1, "3")).await?; // seq 3
    one(store, commit(&g, bob, 1, "4", &[], &[carol])).await?; // seq 4, epoch 2
    one(store, app(&g, alice, 2, "5")).await?; // seq 5

    let seqs = |v: Vec<quicproquo_server::model::group::LogEntry>| {
        v.iter().map(|e| e.seq).collect::<Vec<_>>()
    };
    ensure!(seqs(store.read_log(&g, &alice, 0, 100).await?) == vec![1, 2, 3, 4, 5]);
    ensure!(seqs(store.read_log(&g, &bob, 0, 100).await?) == vec![3, 4, 5]);
    // Carol reads up to and including the commit that removed her, nothing after.
    ensure!(seqs(store.read_log(&g, &carol, 0, 100).await?) == vec![3, 4]);
    ensure!(seqs(store.read_log(&g, &alice, 2, 2).await?) == vec![3, 4]);
    ensure!(one(store, app(&g, carol, 2, "6")).await? == AppendOutcome::NotMember);
    ensure!(matches!(
        store.read_log(&g, &eve, 0, 100).await,
        Err(StoreError::NotMember)
    ));
    ensure!(store.groups_of(&carol).await?.is_empty());
    // A removed member is no longer one; the one who stayed is.
    ensure!(matches!(
        store.check_member(&g, &carol).await,
        Err(StoreError::NotMember)
    ));
    store.check_member(&g, &bob).await?;

    let entries = store.read_log(&g, &alice, 3, 1).await?;
    ensure!(entries[0].kind == EntryKind::Commit && entries[0].epoch == 1);
    ensure!(entries[0].message_id == b"4" && entries[0].appended_at_micros > 0);

    // Cursors never move backwards and are only for readers of the group.
    store.set_cursor(&bob, &g, 5).await?;
    store.set_cursor(&bob, &g, 3).await?;
    ensure!(store.cursor(&bob, &g).await? == 5);
    ensure!(store.cursor(&alice, &g).await? == 0);
    ensure!(matches!(
        store.set_cursor(&eve, &g, 1).await,
        Err(StoreError::NotMember)
    ));
    Ok(())
}

/// One batch mixing groups: each request is judged on its own, in batch order.
pub async fn batched_appends<S: Store + LogStore>(store: &S) -> Result<()> {
    let (alice, bob) = (registered(store).await?, registered(store).await?);
    let (g1, g2) = (gid("batch-1")?, gid("batch-2")?);
    store.create_group(&g1, &alice).await?;
    store.create_group(&g2, &bob).await?;
    let batch = vec![
        app(&g1, alice, 0, "a"),
        commit(&g1, alice, 0, "c-win", &[bob], &[]),
        commit(&g1, alice, 0, "c-lose", &[], &[]),
        app(&g2, bob, 0, "b"),
        app(&g2, alice, 0, "not-member"),
        app(&g1, bob, 1, "bob-in-g1"),
        app(&g1, alice, 0, "a"),
    ];
    let out = store.append(&batch).await?;
    let expected = vec![
        AppendOutcome::Appended { seq: 1, epoch: 0 },
        AppendOutcome::Appended { seq: 2, epoch: 1 },
        AppendOutcome::StaleEpoch {
            current_epoch: 1,
            winner_seq: 2,
        },
        AppendOutcome::Appended { seq: 1, epoch: 0 },
        AppendOutcome::NotMember,
        AppendOutcome::Appended { seq: 3, epoch: 1 },
        AppendOutcome::Duplicate { seq: 1 },
    ];
    if out != expected {
        bail!("batch outcomes {out:?}");
    }
    Ok(())
}

/// Application messages are accepted from the group's epoch and the
/// [`APPLICATION_EPOCH_LAG`] before it, in a batch as alone; older and future ones are
/// refused with the current epoch and its commit, and change nothing.
pub async fn application_epoch_window<S: Store + LogStore>(store: &S) -> Result<()> {
    let alice = registered(store).await?;
    let g = gid("window")?;
    store.create_group(&g, &alice).await?;
    let mut seq = 0;
    for epoch in 0..=APPLICATION_EPOCH_LAG {
        seq += 1;
        let c = commit(&g, alice, epoch, &format!("c{epoch}"), &[], &[]);
        ensure!(
            one(store, c).await?
                == AppendOutcome::Appended {
                    seq,
                    epoch: epoch + 1
                }
        );
    }
    let (current, winner) = (APPLICATION_EPOCH_LAG + 1, seq);
    let stale = AppendOutcome::StaleEpoch {
        current_epoch: current,
        winner_seq: winner,
    };
    ensure!(one(store, app(&g, alice, 0, "too-old")).await? == stale);
    ensure!(one(store, app(&g, alice, current + 1, "future")).await? == stale);
    let batch: Vec<_> = (0..=current)
        .rev()
        .map(|epoch| app(&g, alice, epoch, &format!("at-{epoch}")))
        .collect();
    let out = store.append(&batch).await?;
    let mut expected: Vec<_> = (1..=APPLICATION_EPOCH_LAG + 1)
        .map(|n| AppendOutcome::Appended {
            seq: seq + n,
            epoch: current,
        })
        .collect();
    expected.push(stale);
    ensure!(out == expected, "window outcomes {out:?}");
    let log = store.read_log(&g, &alice, winner, 100).await?;
    let epochs: Vec<u64> = log.iter().map(|e| e.epoch).collect();
    ensure!(
        epochs == (1..=current).rev().collect::<Vec<_>>(),
        "stored {epochs:?}"
    );
    Ok(())
}

/// Batches repeating stored message ids among new requests: each repeat gets its original
/// sequence number, the rest are appended as if the repeats were not there (no gap), and
/// nothing is written twice. Also after many batches without repeats, and right after one.
pub async fn repeats_among_new<S: Store + LogStore>(store: &S) -> Result<()> {
    let (alice, bob) = (registered(store).await?, registered(store).await?);
    let (g1, g2) = (gid("repeat-1")?, gid("repeat-2")?);
    store.create_group(&g1, &alice).await?;
    store.create_group(&g2, &alice).await?;
    let first = store
        .append(&[app(&g1, alice, 0, "m1"), app(&g2, alice, 0, "n1")])
        .await?;
    ensure!(first == vec![AppendOutcome::Appended { seq: 1, epoch: 0 }; 2]);

    let mixed = vec![
        app(&g1, alice, 0, "a1"),
        app(&g1, alice, 0, "m1"),
        commit(&g2, alice, 0, "c1", &[bob], &[]),
        app(&g2, alice, 0, "n1"),
        app(&g1, alice, 0, "a1"),
    ];
    let out = store.append(&mixed).await?;
    let expected = vec![
        AppendOutcome::Appended { seq: 2, epoch: 0 },
        AppendOutcome::Duplicate { seq: 1 },
        AppendOutcome::Appended { seq: 2, epoch: 1 },
        AppendOutcome::Duplicate { seq: 1 },
        AppendOutcome::Duplicate { seq: 2 },
    ];
    ensure!(out == expected, "mixed batch outcomes {out:?}");

    // Many clean batches, then repeats again (of an old entry and of the last one).
    let mut last = 2;
    for i in 0..70 {
        last += 1;
        let out = store
            .append(&[app(&g1, alice, 0, &format!("b{i}"))])
            .await?;
        ensure!(
            out == vec![AppendOutcome::Appended {
                seq: last,
                epoch: 0
            }]
        );
    }
    let out = store
        .append(&[
            app(&g1, alice, 0, "m1"),
            app(&g1, alice, 0, "b69"),
            app(&g1, alice, 0, "z"),
        ])
        .await?;
    let expected = vec![
        AppendOutcome::Duplicate { seq: 1 },
        AppendOutcome::Duplicate { seq: last },
        AppendOutcome::Appended {
            seq: last + 1,
            epoch: 0,
        },
    ];
    ensure!(out == expected, "late repeat outcomes {out:?}");

    let log = store.read_log(&g1, &alice, 0, 1000).await?;
    ensure!(log.len() as u64 == last + 1);
    ensure!(log.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1));
    let ids: HashSet<_> = log.iter().map(|e| e.message_id.clone()).collect();
    ensure!(ids.len() == log.len(), "a message id was written twice");
    ensure!(store.read_inbox(&bob, 0, 10).await?.len() == 1);
    let summary = store.group_summary(&g2, &alice).await?;
    ensure!(summary.epoch == 1 && summary.last_seq == 2);
    Ok(())
}

/// Concurrent appenders to one group: gap-free sequence numbers, each message once.
pub async fn concurrent_appends<S: Store + LogStore>(store: S) -> Result<()> {
    const TASKS: usize = 8;
    const EACH: usize = 25;
    let store = Arc::new(store);
    let alice = registered(&*store).await?;
    let g = gid("busy")?;
    store.create_group(&g, &alice).await?;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (store, g) = (Arc::clone(&store), g.clone());
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..EACH {
                    let out = store
                        .append(&[app(&g, alice, 0, &format!("{t}-{i}"))])
                        .await?;
                    match out.as_slice() {
                        [AppendOutcome::Appended { seq, .. }] => seqs.push(*seq),
                        other => bail!("unexpected {other:?}"),
                    }
                }
                Ok(seqs)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort_unstable();
    ensure!(
        all == (1..=(TASKS * EACH) as u64).collect::<Vec<_>>(),
        "gap or duplicate"
    );
    let log = store.read_log(&g, &alice, 0, 1000).await?;
    let ids: HashSet<_> = log.iter().map(|e| e.message_id.clone()).collect();
    ensure!(log.len() == TASKS * EACH && ids.len() == TASKS * EACH);
    ensure!(log.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    Ok(())
}

/// Reads are paged by bytes as well as count: a page stops before the entry that would pass
/// its byte budget, and the first entry always fits, however large.
pub async fn pages_by_bytes<S: Store + LogStore>(store: &S) -> Result<()> {
    let (alice, bob) = (registered(store).await?, registered(store).await?);
    let g = gid("group-pages")?;
    store.create_group(&g, &alice).await?;
    let sized = |mid: &str, n: usize| AppendRequest {
        payload: vec![7u8; n],
        ..app(&g, alice, 0, mid)
    };
    for (mid, n) in [("a", 10_000), ("b", 10_000), ("c", 50_000), ("d", 10)] {
        one(store, sized(mid, n)).await?;
    }
    let size = |n: usize| log_entry_bytes(1, n);
    let seqs = |v: Vec<quicproquo_server::model::group::LogEntry>| {
        v.iter().map(|e| e.seq).collect::<Vec<_>>()
    };
    // Two 10 kB entries fit a budget of exactly their size; the 50 kB one does not.
    let two = Page::new(1000, 2 * size(10_000));
    ensure!(seqs(store.read_log(&g, &alice, 0, two).await?) == vec![1, 2]);
    // The next page starts with the large entry, alone: the first entry always fits.
    ensure!(seqs(store.read_log(&g, &alice, 2, two).await?) == vec![3]);
    ensure!(seqs(store.read_log(&g, &alice, 3, two).await?) == vec![4]);
    // One byte less than two entries: one per page.
    let tight = Page::new(1000, 2 * size(10_000) - 1);
    ensure!(seqs(store.read_log(&g, &alice, 0, tight).await?) == vec![1]);
    // The count still applies.
    ensure!(
        seqs(
            store
                .read_log(&g, &alice, 0, Page::new(1, usize::MAX))
                .await?
        ) == vec![1]
    );
    ensure!(store.read_log(&g, &alice, 0, 1000).await?.len() == 4);

    // Inboxes are paged the same way: Bob is invited to three groups.
    for (i, n) in [20_000usize, 20_000, 1].into_iter().enumerate() {
        let gi = gid(&format!("group-pages-{i}"))?;
        store.create_group(&gi, &alice).await?;
        let mut add = commit(&gi, alice, 0, "add-bob", &[bob], &[]);
        if let Some(c) = add.commit.as_mut() {
            c.welcome = Some(vec![1u8; n]);
        }
        one(store, add).await?;
    }
    let w = |v: Vec<quicproquo_server::model::group::InboxEntry>| {
        v.iter().map(|e| e.welcome.len()).collect::<Vec<_>>()
    };
    let one_welcome = Page::new(1000, welcome_bytes(20_000));
    ensure!(w(store.read_inbox(&bob, 0, one_welcome).await?) == vec![20_000]);
    let both = Page::new(1000, 2 * welcome_bytes(20_000));
    let first = store.read_inbox(&bob, 0, both).await?;
    ensure!(w(first.clone()) == vec![20_000, 20_000]);
    let rest = store.read_inbox(&bob, first[1].seq, both).await?;
    ensure!(w(rest) == vec![1]);
    Ok(())
}

/// Generates one test per Delivery Service conformance check (see
/// [`conformance_tests!`](crate::conformance_tests)).
#[macro_export]
macro_rules! log_conformance_tests {
    ($make:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn log_conformance_group_lifecycle() -> anyhow::Result<()> {
            $crate::log_conformance::group_lifecycle(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn log_conformance_pages_by_bytes() -> anyhow::Result<()> {
            $crate::log_conformance::pages_by_bytes(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn log_conformance_read_windows() -> anyhow::Result<()> {
            $crate::log_conformance::read_windows(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn log_conformance_batched_appends() -> anyhow::Result<()> {
            $crate::log_conformance::batched_appends(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn log_conformance_application_epoch_window() -> anyhow::Result<()> {
            $crate::log_conformance::application_epoch_window(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn log_conformance_repeats_among_new() -> anyhow::Result<()> {
            $crate::log_conformance::repeats_among_new(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn log_conformance_concurrent_appends() -> anyhow::Result<()> {
            $crate::log_conformance::concurrent_appends($make.await?).await
        }
    };
}
