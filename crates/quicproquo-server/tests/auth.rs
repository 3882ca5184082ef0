//! The Authentication Service through the real server: registration, KeyPackage exchange, and
//! every refused input (typed error, nothing stored, the connection keeps working).

mod support;

use std::collections::HashSet;

use anyhow::{Result, ensure};
use quicproquo_client::{AuthClient, ClientError, Connection};
use quicproquo_core::mls::{KeyPackageChecker, MlsIdentity, MlsProvider, Suite};
use quicproquo_core::{IdentityKeypair, NodeRole};
use quicproquo_proto::errors::ErrorCode;
use quicproquo_server::ServerConfig;
use quicproquo_server::store::AnyStore;
use support::{TestServer, local};

/// A device: identity, MLS signer and the provider holding its KeyPackage secrets.
struct Device {
    keys: IdentityKeypair,
    mls: MlsIdentity,
    provider: MlsProvider,
}

impl Device {
    fn new() -> Result<Self> {
        let keys = IdentityKeypair::generate()?;
        Ok(Self {
            mls: MlsIdentity::new(&keys),
            keys,
            provider: MlsProvider::default(),
        })
    }

    fn key_packages(&self, suite: Suite, n: usize) -> Result<Vec<Vec<u8>>> {
        Ok(self.mls.key_packages(&self.provider, suite, n)?)
    }

    async fn bind(&self, server: &TestServer) -> Result<(Connection, AuthClient)> {
        let conn = server.connect().await?;
        let auth = conn.bind(&self.keys).await?.auth;
        Ok((conn, auth))
    }
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> Option<ErrorCode> {
    r.err().and_then(|e| e.code())
}

fn server(store: Option<AnyStore>, tweak: impl FnOnce(&mut ServerConfig)) -> Result<TestServer> {
    TestServer::start_with(NodeRole::Standalone, store, tweak)
}

async fn alice_registers_and_bob_fetches(store: Option<AnyStore>) -> Result<()> {
    let server = server(store, |_| {})?;
    let (alice, bob) = (Device::new()?, Device::new()?);
    let (_ac, alice_auth) = alice.bind(&server).await?;
    alice_auth.claim_name("Alice").await?;
    let kps = alice.key_packages(Suite::Hybrid, 5)?;
    let lr = alice
        .mls
        .last_resort_key_package(&alice.provider, Suite::Hybrid)?;
    ensure!(alice_auth.upload_key_packages(&kps, Some(&lr)).await? == 5);
    // The upload's checks ran as one job on the bounded CPU pool, not on the worker.
    let pool = &server.handle()?.observer().metrics.pool;
    ensure!(pool.completed.load(std::sync::atomic::Ordering::Relaxed) == 1);
    ensure!(
        alice_auth.key_package_count().await? == (5, true),
        "5 < low watermark 10"
    );

    let (_bc, bob_auth) = bob.bind(&server).await?;
    let alice_id = bob_auth.resolve_name("alice").await?;
    ensure!(alice_id == alice.keys.public());
    let fetched = bob_auth.fetch_key_packages(&[alice_id]).await?;
    ensure!(fetched.len() == 1 && !fetched[0].last_resort);
    ensure!(kps.contains(&fetched[0].data), "not one of Alice's uploads");
    // Bob checks the KeyPackage himself: its credential's fingerprint is the one Alice shows.
    let checked = KeyPackageChecker::new(&Suite::ALL).check(&fetched[0].data)?;
    ensure!(checked.identity.fingerprint() == alice.keys.public().fingerprint());
    ensure!(alice_auth.key_package_count().await?.0 == 4);
    Ok(())
}

async fn concurrent_fetchers_never_share(store: Option<AnyStore>) -> Result<()> {
    const K: usize = 12;
    const FETCHERS: usize = 64;
    let server = server(store, |_| {})?;
    let alice = Device::new()?;
    let (_ac, alice_auth) = alice.bind(&server).await?;
    let kps = alice.key_packages(Suite::Classical, K)?;
    let lr = alice
        .mls
        .last_resort_key_package(&alice.provider, Suite::Classical)?;
    alice_auth.upload_key_packages(&kps, Some(&lr)).await?;

    let mut sessions = Vec::new();
    for _ in 0..FETCHERS {
        let d = Device::new()?;
        sessions.push(d.bind(&server).await?);
    }
    let target = alice.keys.public();
    let fetches = sessions
        .iter()
        .map(|(_, auth)| async move { auth.fetch_key_packages(&[target]).await });
    let results = futures::future::join_all(fetches).await;
    let mut pooled = HashSet::new();
    let mut last_resort = 0;
    for r in results {
        let got = r?;
        ensure!(got.len() == 1, "every fetcher gets a KeyPackage");
        if got[0].last_resort {
            ensure!(got[0].data == lr);
            last_resort += 1;
        } else {
            ensure!(
                pooled.insert(got[0].data.clone()),
                "a KeyPackage was handed out twice"
            );
        }
    }
    ensure!(pooled.len() == K && last_resort == FETCHERS - K);
    ensure!(alice_auth.key_package_count().await?.0 == 0);
    Ok(())
}

async fn bad_uploads_are_refused_and_store_nothing(store: Option<AnyStore>) -> Result<()> {
    let server = server(store, |c| c.auth.suites = vec![Suite::Hybrid])?;
    let (alice, mallory) = (Device::new()?, Device::new()?);
    let (alice_conn, alice_auth) = alice.bind(&server).await?;
    let good = alice.key_packages(Suite::Hybrid, 1)?;

    // A KeyPackage for another identity.
    let others = mallory.key_packages(Suite::Hybrid, 1)?;
    ensure!(
        code(alice_auth.upload_key_packages(&others, None).await) == Some(ErrorCode::WrongIdentity)
    );
    // A batch with one bad KeyPackage stores none of it.
    let mixed = vec![good[0].clone(), others[0].clone()];
    ensure!(
        code(alice_auth.upload_key_packages(&mixed, None).await) == Some(ErrorCode::WrongIdentity)
    );
    // A bad signature.
    let mut tampered = good[0].clone();
    if let Some(b) = tampered.last_mut() {
        *b ^= 1;
    }
    ensure!(
        code(alice_auth.upload_key_packages(&[tampered], None).await)
            == Some(ErrorCode::BadKeyPackage)
    );
    // The wrong ciphersuite for this deployment.
    let classical = alice.key_packages(Suite::Classical, 1)?;
    ensure!(
        code(alice_auth.upload_key_packages(&classical, None).await)
            == Some(ErrorCode::BadKeyPackage)
    );
    // Expired.
    let expired = alice.mls.key_package_with_lifetime(
        &alice.provider,
        Suite::Hybrid.ciphersuite(),
        1_000_000,
        1_000_100,
    )?;
    ensure!(
        code(alice_auth.upload_key_packages(&[expired], None).await)
            == Some(ErrorCode::BadKeyPackage)
    );
    // Garbage, also as the last-resort KeyPackage.
    ensure!(
        code(
            alice_auth
                .upload_key_packages(&[b"garbage".to_vec()], None)
                .await
        ) == Some(ErrorCode::BadKeyPackage)
    );
    ensure!(
        code(
            alice_auth
                .upload_key_packages(&good, Some(b"garbage"))
                .await
        ) == Some(ErrorCode::BadKeyPackage)
    );

    ensure!(
        alice_auth.key_package_count().await?.0 == 0,
        "nothing was stored"
    );
    // The connection still works, and a good upload goes through.
    alice_conn.ping(b"still here").await?;
    ensure!(alice_auth.upload_key_packages(&good, None).await? == 1);
    Ok(())
}

async fn bad_bindings_are_refused(store: Option<AnyStore>) -> Result<()> {
    let server = server(store, |_| {})?;
    let (alice, mallory) = (Device::new()?, Device::new()?);

    // A binding made for one session and replayed on another: the handshake hash differs.
    let first = server.connect().await?;
    let second = server.connect().await?;
    let sig = alice
        .keys
        .sign_binding(first.handshake_hash(), first.client_static());
    first
        .bind_with_signature(&alice.keys.public(), &sig)
        .await?;
    ensure!(
        code(second.bind_with_signature(&alice.keys.public(), &sig).await)
            == Some(ErrorCode::BadBinding)
    );
    // A binding signed by another identity than the one claimed.
    let conn = server.connect().await?;
    let forged = mallory
        .keys
        .sign_binding(conn.handshake_hash(), conn.client_static());
    ensure!(
        code(
            conn.bind_with_signature(&alice.keys.public(), &forged)
                .await
        ) == Some(ErrorCode::BadBinding)
    );
    // A malformed identity key.
    ensure!(
        code(conn.bind_with_signature_bytes(&[1u8; 5], &forged).await)
            == Some(ErrorCode::InvalidArgument)
    );
    // Nothing was bound: the same connection can still bind properly...
    let session = conn.bind(&alice.keys).await?;
    session.auth.key_package_count().await?;
    // ...once: binding another identity afterwards is refused, the same one is fine.
    ensure!(code(conn.bind(&mallory.keys).await) == Some(ErrorCode::AlreadyBound));
    conn.bind(&alice.keys)
        .await?
        .auth
        .key_package_count()
        .await?;
    conn.ping(b"ok").await?;
    Ok(())
}

async fn names_are_first_come_first_served(store: Option<AnyStore>) -> Result<()> {
    let server = server(store, |_| {})?;
    let (alice, bob) = (Device::new()?, Device::new()?);
    let (_a, alice_auth) = alice.bind(&server).await?;
    let (_b, bob_auth) = bob.bind(&server).await?;
    alice_auth.claim_name("alice").await?;
    ensure!(code(bob_auth.claim_name("ALICE").await) == Some(ErrorCode::NameTaken));
    ensure!(code(bob_auth.claim_name("x").await) == Some(ErrorCode::InvalidName));
    ensure!(code(alice_auth.claim_name("alice2").await) == Some(ErrorCode::AlreadyNamed));
    ensure!(code(bob_auth.resolve_name("nobody").await) == Some(ErrorCode::UnknownName));
    bob_auth.claim_name("bob").await?;
    ensure!(alice_auth.resolve_name("bob").await? == bob.keys.public());
    Ok(())
}

async fn a_fetch_flood_is_rate_limited(store: Option<AnyStore>) -> Result<()> {
    let server = server(store, |c| c.auth.fetch_limit_per_minute = 3)?;
    let (alice, mallory, bob) = (Device::new()?, Device::new()?, Device::new()?);
    let (_a, alice_auth) = alice.bind(&server).await?;
    alice_auth
        .upload_key_packages(&alice.key_packages(Suite::Classical, 10)?, None)
        .await?;
    let (m_conn, m_auth) = mallory.bind(&server).await?;
    let target = alice.keys.public();
    for _ in 0..3 {
        ensure!(m_auth.fetch_key_packages(&[target]).await?.len() == 1);
    }
    ensure!(code(m_auth.fetch_key_packages(&[target]).await) == Some(ErrorCode::RateLimited));
    ensure!(
        code(m_auth.fetch_key_packages(&[target, target]).await) == Some(ErrorCode::RateLimited)
    );
    ensure!(
        alice_auth.key_package_count().await?.0 == 7,
        "refused fetches consume nothing"
    );
    m_conn.ping(b"still here").await?;
    // Another requester is not affected.
    let (_b, bob_auth) = bob.bind(&server).await?;
    ensure!(bob_auth.fetch_key_packages(&[target]).await?.len() == 1);
    Ok(())
}

macro_rules! auth_tests {
    ($make:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn alice_registers_and_bob_fetches_her_key_package() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::alice_registers_and_bob_fetches(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn sixty_four_concurrent_fetchers_never_share_a_key_package() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::concurrent_fetchers_never_share(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn bad_uploads_are_refused_and_store_nothing() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::bad_uploads_are_refused_and_store_nothing(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn bad_bindings_are_refused() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::bad_bindings_are_refused(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn names_are_first_come_first_served() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::names_are_first_come_first_served(store)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_fetch_flood_is_rate_limited() -> Result<()> {
            let (store, _db) = $make.await?;
            local(super::a_fetch_flood_is_rate_limited(store)).await
        }
    };
}

mod embedded {
    use super::*;
    auth_tests!(support::embedded_store());
}

mod postgres {
    use super::*;
    auth_tests!(support::postgres_store());
}
