//! The store conformance suite: what every [`Store`] must do, as runnable checks.
//!
//! Each check takes a fresh, empty store. Use [`conformance_tests!`](crate::conformance_tests)
//! to generate one `#[tokio::test]` per check for a store constructor.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Result, ensure};
use quicproquo_core::{IdentityKey, IdentityKeypair};
use quicproquo_server::model::UserName;
use quicproquo_server::store::{KeyPackageRecord, Store, StoreError};

/// A fresh random identity.
pub fn identity() -> Result<IdentityKey> {
    Ok(IdentityKeypair::generate()?.public())
}

/// A KeyPackage record whose contents are tagged by `tag` (stores never parse them).
pub fn package(tag: &str) -> KeyPackageRecord {
    KeyPackageRecord {
        hash_ref: format!("ref:{tag}").into_bytes(),
        data: format!("kp:{tag}").into_bytes(),
        not_after: None,
    }
}

fn name(s: &str) -> Result<UserName> {
    Ok(UserName::parse(s)?)
}

/// Identities register idempotently; names are first come, first served, one per identity.
pub async fn names<S: Store>(store: &S) -> Result<()> {
    let (alice, bob, carol) = (identity()?, identity()?, identity()?);
    store.register_identity(&alice).await?;
    store.register_identity(&alice).await?;
    store.register_identity(&bob).await?;
    ensure!(store.resolve_name(&name("alice")?).await?.is_none());
    ensure!(store.names_of(&[alice]).await?[0].is_none());

    store.claim_name(&alice, &name("alice")?).await?;
    ensure!(store.resolve_name(&name("ALICE")?).await? == Some(alice));
    ensure!(store.names_of(&[alice]).await?[0] == Some(name("alice")?));
    // Several at once, in order, repeats and unnamed identities included: one query.
    ensure!(
        store.names_of(&[bob, alice, carol, alice]).await?
            == vec![None, Some(name("alice")?), None, Some(name("alice")?)]
    );
    ensure!(store.names_of(&[]).await?.is_empty());
    // Claiming one's own name again is fine.
    store.claim_name(&alice, &name("alice")?).await?;
    // Another identity cannot take it.
    ensure!(matches!(
        store.claim_name(&bob, &name("alice")?).await,
        Err(StoreError::NameTaken)
    ));
    ensure!(
        store.names_of(&[bob]).await?[0].is_none(),
        "a refused claim stored nothing"
    );
    // An identity keeps its one name.
    ensure!(matches!(
        store.claim_name(&alice, &name("alice2")?).await,
        Err(StoreError::AlreadyNamed)
    ));
    ensure!(store.resolve_name(&name("alice2")?).await?.is_none());
    // Unregistered identities cannot claim names.
    ensure!(matches!(
        store.claim_name(&carol, &name("carol")?).await,
        Err(StoreError::UnknownIdentity)
    ));
    store.claim_name(&bob, &name("bob")?).await?;
    ensure!(store.resolve_name(&name("bob")?).await? == Some(bob));
    Ok(())
}

/// Pooled KeyPackages are handed out once each; then the last-resort one, which is kept.
pub async fn key_package_pool<S: Store>(store: &S) -> Result<()> {
    let alice = identity()?;
    store.register_identity(&alice).await?;
    let batch = [package("a1"), package("a2"), package("a3")];
    ensure!(store.add_key_packages(&alice, &batch, None).await? == 3);
    // Re-uploading a stored KeyPackage does not duplicate it.
    ensure!(store.add_key_packages(&alice, &batch[..1], None).await? == 3);
    ensure!(store.key_package_count(&alice).await? == 3);

    let mut seen = HashSet::new();
    for remaining in [2u32, 1, 0] {
        let got = store.fetch_key_packages(&[alice]).await?;
        ensure!(got.len() == 1);
        let Some(Some(kp)) = got.into_iter().next() else {
            anyhow::bail!("expected a KeyPackage");
        };
        ensure!(kp.identity == alice && !kp.last_resort);
        ensure!(batch.iter().any(|b| b.data == kp.data), "unknown package");
        ensure!(seen.insert(kp.data), "a KeyPackage was handed out twice");
        ensure!(store.key_package_count(&alice).await? == remaining);
    }
    // Empty pool and no last resort: nothing.
    ensure!(store.fetch_key_packages(&[alice]).await? == vec![None]);

    // The last-resort KeyPackage is returned, and kept, while the pool is empty.
    let lr = package("a-last");
    ensure!(store.add_key_packages(&alice, &[], Some(&lr)).await? == 0);
    for _ in 0..2 {
        let got = store.fetch_key_packages(&[alice]).await?;
        let Some(Some(kp)) = got.into_iter().next() else {
            anyhow::bail!("expected the last-resort KeyPackage");
        };
        ensure!(kp.last_resort && kp.data == lr.data);
    }
    ensure!(store.key_package_count(&alice).await? == 0);
    // A new last-resort KeyPackage replaces the old one; pooled ones are preferred again.
    let lr2 = package("a-last-2");
    ensure!(
        store
            .add_key_packages(&alice, &[package("a4")], Some(&lr2))
            .await?
            == 1
    );
    let first = store.fetch_key_packages(&[alice]).await?;
    ensure!(matches!(&first[..], [Some(kp)] if !kp.last_resort && kp.data == package("a4").data));
    let second = store.fetch_key_packages(&[alice]).await?;
    ensure!(matches!(&second[..], [Some(kp)] if kp.last_resort && kp.data == lr2.data));

    // Unknown identities can neither upload nor be fetched.
    let stranger = identity()?;
    ensure!(matches!(
        store
            .add_key_packages(&stranger, &[package("s1")], None)
            .await,
        Err(StoreError::UnknownIdentity)
    ));
    ensure!(store.fetch_key_packages(&[stranger]).await? == vec![None]);
    ensure!(store.key_package_count(&stranger).await? == 0);
    Ok(())
}

/// One call fetches for many identities, one KeyPackage per requested slot, in order.
pub async fn batch_fetch<S: Store>(store: &S) -> Result<()> {
    let (alice, bob, nobody) = (identity()?, identity()?, identity()?);
    store.register_identity(&alice).await?;
    store.register_identity(&bob).await?;
    store
        .add_key_packages(&alice, &[package("a1"), package("a2")], None)
        .await?;
    store.add_key_packages(&bob, &[package("b1")], None).await?;
    let got = store
        .fetch_key_packages(&[alice, nobody, bob, alice])
        .await?;
    ensure!(got.len() == 4);
    ensure!(got[0].as_ref().map(|k| k.identity) == Some(alice));
    ensure!(got[1].is_none());
    ensure!(got[2].as_ref().map(|k| k.data.clone()) == Some(package("b1").data));
    ensure!(got[3].as_ref().map(|k| k.identity) == Some(alice));
    ensure!(
        got[0].as_ref().map(|k| &k.data) != got[3].as_ref().map(|k| &k.data),
        "the same KeyPackage twice in one batch"
    );
    ensure!(store.key_package_count(&alice).await? == 0);
    Ok(())
}

/// 64 concurrent fetchers over `K` KeyPackages: each pooled one goes to exactly one fetcher,
/// the others get the last-resort KeyPackage.
pub async fn concurrent_fetchers<S: Store>(store: S) -> Result<()> {
    const K: usize = 20;
    const FETCHERS: usize = 64;
    let store = Arc::new(store);
    let alice = identity()?;
    store.register_identity(&alice).await?;
    let pool: Vec<_> = (0..K).map(|i| package(&format!("c{i}"))).collect();
    store
        .add_key_packages(&alice, &pool, Some(&package("c-last")))
        .await?;
    let tasks: Vec<_> = (0..FETCHERS)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.fetch_key_packages(&[alice]).await })
        })
        .collect();
    let mut pooled = HashSet::new();
    let mut last_resort = 0;
    for t in tasks {
        let got = t.await??;
        let Some(Some(kp)) = got.into_iter().next() else {
            anyhow::bail!("a fetcher got nothing although a last resort exists");
        };
        if kp.last_resort {
            last_resort += 1;
        } else {
            ensure!(pooled.insert(kp.data), "a KeyPackage was handed out twice");
        }
    }
    ensure!(
        pooled.len() == K,
        "{} of {K} pooled handed out",
        pooled.len()
    );
    ensure!(last_resort == FETCHERS - K);
    ensure!(store.key_package_count(&alice).await? == 0);
    Ok(())
}

/// Generates one test per conformance check; `$make` is an async expression yielding
/// `anyhow::Result<impl Store>` for a fresh, empty store.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_names() -> anyhow::Result<()> {
            $crate::conformance::names(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_key_package_pool() -> anyhow::Result<()> {
            $crate::conformance::key_package_pool(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_batch_fetch() -> anyhow::Result<()> {
            $crate::conformance::batch_fetch(&$make.await?).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn conformance_concurrent_fetchers() -> anyhow::Result<()> {
            $crate::conformance::concurrent_fetchers($make.await?).await
        }
    };
}
