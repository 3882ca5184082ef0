//! The retention part of the store conformance suite (see `RetentionStore`): what the
//! retention job may delete, and what readers see afterwards.

use std::time::Duration;

use anyhow::{Result, ensure};
use quicproquo_core::IdentityKey;
use quicproquo_server::model::group::{AppendOutcome, AppendRequest, GroupId};
use quicproquo_server::store::log::LogStore;
use quicproquo_server::store::retention::{RetentionPolicy, RetentionStore};
use quicproquo_server::store::{KeyPackageRecord, Store, StoreError};

use crate::conformance::identity;
use crate::log_conformance::{app, commit};

/// Keep nothing that was acknowledged; keep unread entries for a day.
const ACKED_ONLY: RetentionPolicy = RetentionPolicy {
    log_retention: Duration::ZERO,
    log_max_age: Duration::from_secs(86_400),
    batch: 1000,
};

/// Delete everything already stored, read or not.
const EVERYTHING: RetentionPolicy = RetentionPolicy {
    log_retention: Duration::ZERO,
    log_max_age: Duration::ZERO,
    batch: 1000,
};

async fn registered<S: Store>(store: &S) -> Result<IdentityKey> {
    let id = identity()?;
    store.register_identity(&id).await?;
    Ok(id)
}

async fn append<S: LogStore>(store: &S, req: AppendRequest) -> Result<u64> {
    match store.append(&[req]).await?.pop() {
        Some(AppendOutcome::Appended { seq, .. }) => Ok(seq),
        other => anyhow::bail!("not appended: {other:?}"),
    }
}

/// Runs `prune` until it deletes nothing; the total.
async fn drain<S: RetentionStore>(
    store: &S,
    group: &GroupId,
    p: &RetentionPolicy,
) -> Result<usize> {
    let mut total = 0;
    loop {
        let n = store.prune_group_log(group, p).await?;
        total += n;
        if n < p.batch {
            return Ok(total);
        }
    }
}

fn gone(r: Result<Vec<quicproquo_server::model::group::LogEntry>, StoreError>) -> Option<u64> {
    match r {
        Err(StoreError::HistoryGone { retained_from }) => Some(retained_from),
        _ => None,
    }
}

/// Entries every member acknowledged go, oldest first and in batches; a reader asking for a
/// deleted one gets `HistoryGone`, the others still read theirs.
pub async fn acknowledged_entries_go<S: Store + LogStore + RetentionStore>(
    store: &S,
) -> Result<()> {
    let (alice, bob) = (registered(store).await?, registered(store).await?);
    let g = GroupId::new(b"retained")?;
    store.create_group(&g, &alice).await?;
    ensure!(append(store, commit(&g, alice, 0, "c1", &[bob], &[])).await? == 1);
    for i in 2..=6 {
        append(store, app(&g, alice, 1, &format!("m{i}"))).await?;
    }
    // Nothing acknowledged yet by bob (who joined at 1): only what precedes his join may go,
    // and alice has not acknowledged that either.
    ensure!(drain(store, &g, &ACKED_ONLY).await? == 0);
    ensure!(store.pruned_seq(&g).await? == 0);
    let page = store.retention_candidates(None, 100, &ACKED_ONLY).await?;
    ensure!(
        page.groups.contains(&g),
        "the group's oldest entry is old enough"
    );

    store.set_cursor(&alice, &g, 6).await?;
    store.set_cursor(&bob, &g, 3).await?;
    let small = RetentionPolicy {
        batch: 2,
        ..ACKED_ONLY
    };
    ensure!(
        store.prune_group_log(&g, &small).await? == 2,
        "one batch at a time"
    );
    ensure!(store.prune_group_log(&g, &small).await? == 1);
    ensure!(store.prune_group_log(&g, &small).await? == 0);
    ensure!(store.pruned_seq(&g).await? == 3);

    let bobs = store.read_log(&g, &bob, 3, 100).await?;
    ensure!(bobs.iter().map(|e| e.seq).collect::<Vec<_>>() == vec![4, 5, 6]);
    ensure!(gone(store.read_log(&g, &alice, 0, 100).await) == Some(4));
    ensure!(gone(store.read_log(&g, &bob, 2, 100).await) == Some(4));
    // New entries keep coming after the cut.
    ensure!(append(store, app(&g, bob, 1, "m7")).await? == 7);
    ensure!(store.read_log(&g, &alice, 6, 100).await?.len() == 1);
    Ok(())
}

/// Past the maximum age everything goes, read or not: a member that fell behind gets
/// `HistoryGone`, one that joins afterwards reads from its join on.
pub async fn old_entries_go_unread<S: Store + LogStore + RetentionStore>(store: &S) -> Result<()> {
    let (alice, bob, carol) = (
        registered(store).await?,
        registered(store).await?,
        registered(store).await?,
    );
    let g = GroupId::new(b"old")?;
    store.create_group(&g, &alice).await?;
    append(store, commit(&g, alice, 0, "c1", &[bob], &[])).await?;
    append(store, app(&g, alice, 1, "m2")).await?;
    ensure!(drain(store, &g, &EVERYTHING).await? == 2);
    ensure!(gone(store.read_log(&g, &bob, 1, 100).await) == Some(3));
    let seq = append(store, commit(&g, alice, 1, "c3", &[carol], &[])).await?;
    ensure!(seq == 3);
    append(store, app(&g, alice, 2, "m4")).await?;
    let carols = store.read_log(&g, &carol, 0, 100).await?;
    ensure!(carols.iter().map(|e| e.seq).collect::<Vec<_>>() == vec![4]);
    Ok(())
}

/// A Welcome goes once every recipient used it (acknowledged the group at its commit) or is
/// no longer the member it added; an unused one stays until the maximum age.
pub async fn used_welcomes_go<S: Store + LogStore + RetentionStore>(store: &S) -> Result<()> {
    let (alice, bob, carol) = (
        registered(store).await?,
        registered(store).await?,
        registered(store).await?,
    );
    let g = GroupId::new(b"welcomes")?;
    store.create_group(&g, &alice).await?;
    let c1 = append(store, commit(&g, alice, 0, "c1", &[bob, carol], &[])).await?;
    ensure!(
        store.prune_welcomes(&ACKED_ONLY).await? == 0,
        "nobody used it yet"
    );
    store.set_cursor(&bob, &g, c1).await?;
    ensure!(
        store.prune_welcomes(&ACKED_ONLY).await? == 1,
        "bob's inbox entry"
    );
    ensure!(store.read_inbox(&bob, 0, 10).await?.is_empty());
    ensure!(
        store.read_inbox(&carol, 0, 10).await?.len() == 1,
        "carol still waits"
    );
    append(store, commit(&g, alice, 1, "c2", &[], &[carol])).await?;
    ensure!(
        store.prune_welcomes(&ACKED_ONLY).await? == 2,
        "carol's entry and the Welcome"
    );
    ensure!(store.read_inbox(&carol, 0, 10).await?.is_empty());

    let dave = registered(store).await?;
    append(store, commit(&g, alice, 2, "c3", &[dave], &[])).await?;
    ensure!(store.prune_welcomes(&ACKED_ONLY).await? == 0);
    ensure!(
        store.prune_welcomes(&EVERYTHING).await? == 2,
        "too old, used or not"
    );
    ensure!(store.read_inbox(&dave, 0, 10).await?.is_empty());
    Ok(())
}

fn package(tag: &str, not_after: u64) -> KeyPackageRecord {
    KeyPackageRecord {
        hash_ref: format!("ref:{tag}").into_bytes(),
        data: format!("kp:{tag}").into_bytes(),
        not_after: Some(not_after),
    }
}

/// Expired KeyPackages are never handed out or counted, and are deleted.
pub async fn expired_key_packages_go<S: Store + RetentionStore>(store: &S) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let (past, future) = (now - 10, now + 86_400);
    let alice = registered(store).await?;
    let bob = registered(store).await?;
    let carol = registered(store).await?;
    let expired = [package("c-1", past), package("c-2", past)];
    ensure!(store.add_key_packages(&carol, &expired, None).await? == 0);
    let pool = [
        package("a-old", past),
        package("a-new", future),
        package("a-old2", past),
    ];
    ensure!(
        store
            .add_key_packages(&alice, &pool, Some(&package("a-lr", past)))
            .await?
            == 1
    );
    store
        .add_key_packages(
            &bob,
            &[package("b-old", past)],
            Some(&package("b-lr", future)),
        )
        .await?;
    ensure!(store.key_package_count(&alice).await? == 1);
    let got = store.fetch_key_packages(&[alice, alice, bob]).await?;
    ensure!(got[0].as_ref().map(|k| k.data.clone()) == Some(b"kp:a-new".to_vec()));
    ensure!(
        got[1].is_none(),
        "no fresh pooled one and an expired last resort"
    );
    ensure!(
        got[2]
            .as_ref()
            .is_some_and(|k| k.last_resort && k.data == b"kp:b-lr")
    );
    let mut deleted = 0;
    loop {
        let n = store.prune_key_packages(1).await?;
        deleted += n;
        if n == 0 {
            break;
        }
    }
    // Carol's two (no fetch passed them) and alice's expired last resort at least; a store
    // may already have dropped the expired ones a fetch passed.
    ensure!(deleted >= 3, "deleted {deleted}");
    ensure!(store.fetch_key_packages(&[carol]).await?[0].is_none());
    ensure!(store.fetch_key_packages(&[alice]).await?[0].is_none());
    ensure!(store.key_package_count(&bob).await? == 0);
    Ok(())
}

/// The stored bytes grow with the log.
pub async fn stored_bytes_are_measured<S: Store + LogStore + RetentionStore>(
    store: &S,
) -> Result<()> {
    let alice = registered(store).await?;
    let g = GroupId::new(b"sized")?;
    store.create_group(&g, &alice).await?;
    // Bytes that do not compress (Postgres compresses large values).
    let mut x: u32 = 0x9e37_79b9;
    for i in 0..20 {
        let mut m = app(&g, alice, 0, &format!("m{i}"));
        m.payload = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_le_bytes()[0]
            })
            .collect();
        append(store, m).await?;
    }
    let bytes = store.stored_bytes().await?;
    ensure!(bytes.group_log >= 20 * 4096, "{bytes:?}");
    Ok(())
}

/// Instantiates the retention conformance tests for the store `$make` (an expression whose
/// `.await?` yields the store) makes.
#[macro_export]
macro_rules! retention_conformance_tests {
    ($make:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn retention_acknowledged_entries_go() -> anyhow::Result<()> {
            $crate::retention_conformance::acknowledged_entries_go(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn retention_old_entries_go_unread() -> anyhow::Result<()> {
            $crate::retention_conformance::old_entries_go_unread(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn retention_used_welcomes_go() -> anyhow::Result<()> {
            $crate::retention_conformance::used_welcomes_go(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn retention_expired_key_packages_go() -> anyhow::Result<()> {
            $crate::retention_conformance::expired_key_packages_go(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn retention_stored_bytes_are_measured() -> anyhow::Result<()> {
            $crate::retention_conformance::stored_bytes_are_measured(&$make.await?).await
        }
    };
}
