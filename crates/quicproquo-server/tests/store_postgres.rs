//! The Postgres store: the conformance suite, migrations, durability and Postgres specifics.
//!
//! Each test gets its own fresh database (see `quicproquo_testkit::postgres`).

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Result, ensure};
use quicproquo_server::model::UserName;
use quicproquo_server::store::postgres::{MIGRATIONS, PgStore, migrate};
use quicproquo_server::store::{Store, StoreError};
use quicproquo_testkit::conformance::{identity, package};
use quicproquo_testkit::postgres::{TestDatabase, fresh_database};

/// A fresh, migrated database.
async fn migrated_database() -> Result<TestDatabase> {
    let db = fresh_database().await?;
    migrate(db.url()).await?;
    Ok(db)
}

async fn fresh_store() -> Result<PgStore> {
    let db = migrated_database().await?;
    Ok(PgStore::connect(db.url(), 8).await?)
}

quicproquo_testkit::conformance_tests!(fresh_store());
quicproquo_testkit::log_conformance_tests!(fresh_store());
quicproquo_testkit::retention_conformance_tests!(fresh_store());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent() -> Result<()> {
    let db = fresh_database().await?;
    let all: Vec<String> = MIGRATIONS.iter().map(|(v, _)| (*v).to_owned()).collect();
    ensure!(
        migrate(db.url()).await? == all,
        "the first run applies everything"
    );
    ensure!(
        migrate(db.url()).await?.is_empty(),
        "a second run applies nothing"
    );
    let store = PgStore::connect(db.url(), 2).await?;
    let alice = identity()?;
    store.register_identity(&alice).await?;
    ensure!(migrate(db.url()).await?.is_empty());
    ensure!(store.key_package_count(&alice).await? == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_each_migration_once() -> Result<()> {
    let db = fresh_database().await?;
    let url = Arc::new(db.url().to_owned());
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let url = Arc::clone(&url);
            tokio::spawn(async move { migrate(&url).await })
        })
        .collect();
    let mut applied = Vec::new();
    for task in tasks {
        applied.extend(task.await??);
    }
    let all: Vec<String> = MIGRATIONS.iter().map(|(v, _)| (*v).to_owned()).collect();
    ensure!(
        applied == all,
        "each migration applied exactly once: {applied:?}"
    );
    PgStore::connect(db.url(), 1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmigrated_database_is_refused() -> Result<()> {
    let db = fresh_database().await?;
    let refused = PgStore::connect(db.url(), 1).await;
    ensure!(
        matches!(&refused, Err(StoreError::Unavailable(m)) if m.contains("qpq-server migrate")),
        "{refused:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_unavailable() -> Result<()> {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("postgres://qpq:secret-password@127.0.0.1:{port}/none");
    for result in [
        PgStore::connect(&url, 1).await.map(|_| ()),
        migrate(&url).await.map(|_| ()),
    ] {
        let Err(StoreError::Unavailable(message)) = result else {
            anyhow::bail!("expected Unavailable, got {result:?}");
        };
        ensure!(!message.contains("secret-password"), "{message}");
    }
    ensure!(matches!(
        PgStore::connect("not a url", 1).await,
        Err(StoreError::Unavailable(_))
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_a_new_pool() -> Result<()> {
    let db = migrated_database().await?;
    let (alice, bob) = (identity()?, identity()?);
    {
        let store = PgStore::connect(db.url(), 2).await?;
        store.register_identity(&alice).await?;
        store.register_identity(&bob).await?;
        store.claim_name(&alice, &UserName::parse("alice")?).await?;
        store
            .add_key_packages(
                &alice,
                &[package("d1"), package("d2")],
                Some(&package("d-last")),
            )
            .await?;
        store.fetch_key_packages(&[alice]).await?;
    }
    let store = PgStore::connect(db.url(), 2).await?;
    ensure!(store.resolve_name(&UserName::parse("alice")?).await? == Some(alice));
    ensure!(store.names_of(&[bob]).await?[0].is_none());
    ensure!(store.key_package_count(&alice).await? == 1);
    let got = store.fetch_key_packages(&[alice, alice]).await?;
    ensure!(
        matches!(&got[..], [Some(a), Some(b)]
            if a.data == package("d2").data && !a.last_resort
            && b.data == package("d-last").data && b.last_resort),
        "{got:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batch_fetchers_never_share_a_key_package() -> Result<()> {
    const PER_IDENTITY: usize = 30;
    const FETCHERS: usize = 24;
    let store = Arc::new(fresh_store().await?);
    let (alice, bob) = (identity()?, identity()?);
    for (who, tag) in [(alice, "a"), (bob, "b")] {
        store.register_identity(&who).await?;
        let pool: Vec<_> = (0..PER_IDENTITY)
            .map(|i| package(&format!("{tag}{i}")))
            .collect();
        store
            .add_key_packages(&who, &pool, Some(&package(&format!("{tag}-last"))))
            .await?;
    }
    // Each batch asks for alice twice and bob once: 72 slots for alice's 30, 24 for bob's 30.
    let tasks: Vec<_> = (0..FETCHERS)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.fetch_key_packages(&[alice, bob, alice]).await })
        })
        .collect();
    let mut pooled = HashSet::new();
    let mut last_resort = [0usize; 2];
    for task in tasks {
        let got = task.await??;
        ensure!(got.len() == 3);
        for (slot, kp) in got.into_iter().enumerate() {
            let Some(kp) = kp else {
                anyhow::bail!("slot {slot} got nothing although a last resort exists");
            };
            ensure!(kp.identity == if slot == 1 { bob } else { alice });
            if kp.last_resort {
                last_resort[usize::from(slot == 1)] += 1;
            } else {
                ensure!(pooled.insert(kp.data), "a KeyPackage was handed out twice");
            }
        }
    }
    ensure!(
        pooled.len() == PER_IDENTITY + FETCHERS,
        "all of alice's and 24 of bob's"
    );
    ensure!(last_resort == [2 * FETCHERS - PER_IDENTITY, 0]);
    ensure!(store.key_package_count(&alice).await? == 0);
    ensure!(store.key_package_count(&bob).await? == u32::try_from(PER_IDENTITY - FETCHERS)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_claim_errors_have_the_embedded_stores_precedence() -> Result<()> {
    let store = fresh_store().await?;
    let (alice, bob, stranger) = (identity()?, identity()?, identity()?);
    store.register_identity(&alice).await?;
    store.register_identity(&bob).await?;
    store.claim_name(&alice, &UserName::parse("alice")?).await?;
    store.claim_name(&bob, &UserName::parse("bob")?).await?;
    // Unknown identity first, then a taken name, then an identity that has a name.
    ensure!(matches!(
        store
            .claim_name(&stranger, &UserName::parse("alice")?)
            .await,
        Err(StoreError::UnknownIdentity)
    ));
    ensure!(matches!(
        store.claim_name(&bob, &UserName::parse("alice")?).await,
        Err(StoreError::NameTaken)
    ));
    ensure!(matches!(
        store.claim_name(&bob, &UserName::parse("bobby")?).await,
        Err(StoreError::AlreadyNamed)
    ));
    ensure!(store.names_of(&[bob]).await?[0] == Some(UserName::parse("bob")?));
    Ok(())
}

/// The pool's connections are driven by the store's own I/O thread: a store opened on a
/// runtime that is then never polled again (as `open_store` does) keeps working elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_does_not_depend_on_the_runtime_that_opened_it() -> Result<()> {
    let db = migrated_database().await?;
    let url = db.url().to_owned();
    let (store_tx, store_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let opener = std::thread::spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Connect (and so open a pooled connection) on this runtime, then stop polling it.
        let store = rt.block_on(PgStore::connect(&url, 1))?;
        store_tx.send(store)?;
        let _ = done_rx.recv();
        drop(rt);
        Ok(())
    });
    let store = tokio::task::spawn_blocking(move || store_rx.recv()).await??;
    let alice = identity()?;
    let used = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        store.register_identity(&alice).await?;
        store.key_package_count(&alice).await
    })
    .await;
    done_tx.send(())?;
    opener
        .join()
        .map_err(|_| anyhow::anyhow!("opener thread panicked"))??;
    ensure!(
        matches!(used, Ok(Ok(0))),
        "the pooled connection hung with its runtime: {used:?}"
    );
    Ok(())
}

/// A database whose views were stored whole (migrations up to 0006, ADR 0012/0015) is
/// migrated to snapshots (0007, ADR 0018): the stored view becomes the snapshot at the
/// group's last seq and the view kept before its latest commit the snapshot just before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_stored_whole_become_snapshots() -> Result<()> {
    use quicproquo_server::model::group::GroupId;
    use quicproquo_server::store::log::LogStore;
    let db = fresh_database().await?;
    let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TABLE schema_migrations (
                 version TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await?;
    let before = MIGRATIONS
        .iter()
        .take_while(|(v, _)| *v != "0007_view_snapshots");
    for (version, sql) in before {
        client.batch_execute(sql).await?;
        client
            .execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
    }
    let group = b"legacy group".as_slice();
    client
        .execute(
            "INSERT INTO groups (group_id, epoch, last_seq, last_commit_seq) VALUES ($1, 4, 9, 7)",
            &[&group],
        )
        .await?;
    client
        .execute(
            "INSERT INTO group_views (group_id, epoch, state, proposals, group_info, commit_seq,
                 committer, prev_epoch, prev_state, prev_proposals, prev_group_info,
                 prev_commit_seq)
             VALUES ($1, 4, 'state at 9', 'proposals', 'info 4', 7, $2, 3, 'state at 6', '',
                     'info 3', 2)",
            &[&group, &[7u8; 32].as_slice()],
        )
        .await?;
    ensure!(migrate(db.url()).await? == ["0007_view_snapshots"]);
    let snapshots: Vec<(i64, Vec<u8>)> = client
        .query(
            "SELECT seq, state FROM view_snapshots WHERE group_id = $1 ORDER BY seq",
            &[&group],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    ensure!(
        snapshots == [(6, b"state at 6".to_vec()), (9, b"state at 9".to_vec())],
        "{snapshots:?}"
    );
    drop(client);
    let _ = driver.await;
    let store = PgStore::connect(db.url(), 2).await?;
    let view = store
        .load_view(&GroupId::new(group)?)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no view"))?;
    ensure!(view.epoch == 4 && view.state == b"state at 9" && view.proposals == b"proposals");
    ensure!(view.group_info == b"info 4" && view.tail.is_empty());
    ensure!(store.group_info(&GroupId::new(group)?).await? == Some((b"info 4".to_vec(), 4)));
    Ok(())
}
