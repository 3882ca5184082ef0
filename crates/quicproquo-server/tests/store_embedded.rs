//! The embedded store against the conformance suite, and across reopening.

use anyhow::Result;
use quicproquo_server::model::UserName;
use quicproquo_server::store::Store;
use quicproquo_server::store::embedded::EmbeddedStore;
use quicproquo_testkit::conformance::{identity, package};

async fn fresh() -> Result<EmbeddedStore> {
    let dir = tempfile::tempdir()?;
    // The directory entry is removed when `dir` drops; the open file stays usable.
    Ok(EmbeddedStore::open(&dir.path().join("qpq.db"))?)
}

quicproquo_testkit::conformance_tests!(fresh());

#[tokio::test]
async fn data_survives_reopening_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("qpq.db");
    let alice = identity()?;
    {
        let store = EmbeddedStore::open(&path)?;
        store.register_identity(&alice).await?;
        store.claim_name(&alice, &UserName::parse("alice")?).await?;
        store
            .add_key_packages(&alice, &[package("1"), package("2")], Some(&package("lr")))
            .await?;
        store.fetch_key_packages(&[alice]).await?;
    }
    let store = EmbeddedStore::open(&path)?;
    assert_eq!(
        store.resolve_name(&UserName::parse("alice")?).await?,
        Some(alice)
    );
    assert_eq!(store.key_package_count(&alice).await?, 1);
    let got = store.fetch_key_packages(&[alice, alice]).await?;
    assert_eq!(
        got[0].as_ref().map(|k| k.data.clone()),
        Some(package("2").data)
    );
    assert!(got[1].as_ref().is_some_and(|k| k.last_resort));
    Ok(())
}
quicproquo_testkit::log_conformance_tests!(fresh());
quicproquo_testkit::retention_conformance_tests!(fresh());
