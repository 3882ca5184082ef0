//! What a member's MLS storage costs per decryption, in a hybrid-suite group of 1000 members
//! (`QPQ_BENCH_MAX_MEMBERS` for another size), on one core.
//!
//! Two members join the same group from the same Welcome, with the join configuration every
//! quicproquo member uses, and decrypt every application message of the group. Messages come
//! from `QPQ_BENCH_SENDERS` members in turn (default 100; the load test's members all send in
//! turn), each of whom has sent one before measuring starts, so the members' message secrets
//! hold that many sender ratchets:
//!
//! - `decrypt/compact`: the member's provider is the client's [`MlsProvider`] (postcard-encoded
//!   entities in zeroizing buffers);
//! - `decrypt/json`: the member's provider keeps its entities in openmls's `MemoryStorage`
//!   (JSON), the client's store before it: the baseline of the same run.
//!
//! Each iteration is one `MlsGroup::process_message` of a 100-byte application message, parse
//! included (openmls writes the group's message secrets to storage after each). Printed once:
//! each member's stored bytes and the size of its message-secrets entry.
//!
//! Run: `cargo bench -p quicproquo-core --bench member_storage`. Without `--bench` (as in
//! `cargo test --all-targets`) every routine runs once with 10 members.

#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use criterion::{BatchSize, Criterion};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    Capabilities, ExtensionType, KeyPackage, MlsGroup, MlsMessageBodyIn, MlsMessageIn,
    OpenMlsProvider, ProcessedMessageContent, ProtocolMessage, StagedWelcome,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use quicproquo_core::IdentityKeypair;
use quicproquo_core::group::{Group, join_config};
use quicproquo_core::mls::{MlsIdentity, MlsProvider, Suite};

/// The client's provider before the compact store: RustCrypto and openmls's JSON store.
#[derive(Default)]
struct JsonProvider {
    crypto: RustCrypto,
    storage: MemoryStorage,
}

impl OpenMlsProvider for JsonProvider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MemoryStorage;

    fn storage(&self) -> &MemoryStorage {
        &self.storage
    }

    fn crypto(&self) -> &RustCrypto {
        &self.crypto
    }

    fn rand(&self) -> &RustCrypto {
        &self.crypto
    }
}

fn random_id() -> Result<Vec<u8>> {
    let mut id = vec![0u8; 16];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("rng: {e}"))?;
    Ok(id)
}

/// A KeyPackage made with `provider` (its private keys stay there), as the client makes them.
fn key_package<P: OpenMlsProvider>(
    provider: &P,
    me: &MlsIdentity,
    suite: Suite,
) -> Result<Vec<u8>> {
    let capabilities = Capabilities::builder()
        .ciphersuites(Suite::ALL.map(Suite::ciphersuite).to_vec())
        .extensions(vec![ExtensionType::LastResort])
        .build();
    let bundle = KeyPackage::builder()
        .leaf_node_capabilities(capabilities)
        .build(
            suite.ciphersuite(),
            provider,
            me.signer(),
            me.credential().clone(),
        )
        .map_err(|e| anyhow::anyhow!("key package: {e}"))?;
    Ok(bundle.key_package().tls_serialize_detached()?)
}

fn join<P: OpenMlsProvider>(provider: &P, welcome: &[u8]) -> Result<MlsGroup> {
    let MlsMessageBodyIn::Welcome(w) = MlsMessageIn::tls_deserialize_exact(welcome)?.extract()
    else {
        bail!("not a Welcome");
    };
    StagedWelcome::build_from_welcome(provider, &join_config(), w)
        .and_then(|s| s.build())
        .and_then(|s| s.into_group(provider))
        .map_err(|e| anyhow::anyhow!("join: {e}"))
}

fn decrypt<P: OpenMlsProvider>(group: &mut MlsGroup, provider: &P, message: &[u8]) -> Result<()> {
    let MlsMessageBodyIn::PrivateMessage(m) =
        MlsMessageIn::tls_deserialize_exact(message)?.extract()
    else {
        bail!("not a PrivateMessage");
    };
    let processed = group
        .process_message(provider, ProtocolMessage::from(m))
        .map_err(|e| anyhow::anyhow!("decrypt: {e}"))?;
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(a) => {
            black_box(a);
            Ok(())
        }
        _ => bail!("not an application message"),
    }
}

/// A member who sends: identity, provider, group.
type Sender = (MlsIdentity, MlsProvider, Group);

/// The senders (the creator first) and both measured members, joined.
struct Setup {
    senders: Vec<Sender>,
    compact: (MlsProvider, MlsGroup),
    json: (JsonProvider, MlsGroup),
}

fn setup(n: usize, senders: usize) -> Result<Setup> {
    let suite = Suite::Hybrid;
    let creator = MlsIdentity::new(&IdentityKeypair::generate()?);
    let creator_provider = MlsProvider::default();
    let compact_me = MlsIdentity::new(&IdentityKeypair::generate()?);
    let compact_provider = MlsProvider::default();
    let json_me = MlsIdentity::new(&IdentityKeypair::generate()?);
    let json_provider = JsonProvider::default();
    let mut kps = vec![
        key_package(&compact_provider, &compact_me, suite)?,
        key_package(&json_provider, &json_me, suite)?,
    ];
    let mut others = Vec::new();
    for i in 3..n {
        let other = MlsIdentity::new(&IdentityKeypair::generate()?);
        let provider = MlsProvider::default();
        kps.push(key_package(&provider, &other, suite)?);
        if i < senders + 2 {
            others.push((other, provider));
        }
    }
    let mut group = Group::create(&creator_provider, &creator, suite, &random_id()?)?;
    let out = group.add_members(&creator_provider, &creator, &kps)?;
    group.merge_pending_commit(&creator_provider)?;
    let welcome = out.welcome.context("an add commit has a Welcome")?;
    let compact_group = join(&compact_provider, &welcome)?;
    let mut compact = (compact_provider, compact_group);
    let json_group = join(&json_provider, &welcome)?;
    let mut json = (json_provider, json_group);
    let mut all = vec![(creator, creator_provider, group)];
    for (mls, provider) in others {
        let group = Group::join(&provider, &welcome)?;
        all.push((mls, provider, group));
    }
    // Every sender's ratchet is in use before measuring.
    for (mls, provider, group) in &mut all {
        let m = group.encrypt(provider, mls, &[0x42; 100])?;
        decrypt(&mut compact.1, &compact.0, &m)?;
        decrypt(&mut json.1, &json.0, &m)?;
    }
    Ok(Setup {
        senders: all,
        compact,
        json,
    })
}

fn print_sizes(s: &Setup, n: usize, senders: usize) -> Result<()> {
    let compact = s.compact.0.entries()?;
    let compact_total: usize = compact.iter().map(|(k, v)| k.len() + v.len()).sum();
    // The message secrets are the entry rewritten per decryption: label 10 in the compact store.
    let compact_secrets = compact
        .iter()
        .filter(|(k, _)| k.first() == Some(&10))
        .map(|(_, v)| v.len())
        .sum::<usize>();
    let values = s
        .json
        .0
        .storage
        .values
        .read()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let json_total: usize = values.iter().map(|(k, v)| k.len() + v.len()).sum();
    let json_secrets = values
        .iter()
        .filter(|(k, _)| k.starts_with(b"MessageSecrets"))
        .map(|(_, v)| v.len())
        .sum::<usize>();
    println!(
        "member of {n} after messages from {senders} senders: stored {compact_total} B compact vs {json_total} B json; \
         message secrets {compact_secrets} B compact vs {json_secrets} B json"
    );
    Ok(())
}

fn main() -> Result<()> {
    let benching = std::env::args().any(|a| a == "--bench");
    let n: usize = match std::env::var("QPQ_BENCH_MAX_MEMBERS") {
        Ok(v) => v.parse()?,
        Err(_) if benching => 1000,
        Err(_) => 10,
    };
    anyhow::ensure!(n >= 3, "QPQ_BENCH_MAX_MEMBERS must be at least 3");
    let senders: usize = match std::env::var("QPQ_BENCH_SENDERS") {
        Ok(v) => v.parse()?,
        Err(_) if benching => 100,
        Err(_) => 2,
    };
    let senders = senders.clamp(1, n - 2);
    let mut c = Criterion::default().configure_from_args();
    if !benching {
        c = c
            .sample_size(10)
            .measurement_time(Duration::from_millis(10));
    }
    let mut s = setup(n, senders)?;
    // A message from the creator; the member not being measured decrypts it too (untimed), so
    // both stay at the same generation.
    let mut g = c.benchmark_group(format!("member_storage/hybrid/{n}/{senders}_senders"));
    g.warm_up_time(Duration::from_millis(500));
    let Setup {
        senders: all,
        compact,
        json,
    } = &mut s;
    let mut turn = 0usize;
    let failures = std::cell::Cell::new(0u32);
    let fail = |ok: Option<bool>| {
        if ok != Some(true) {
            failures.set(failures.get() + 1);
        }
    };
    let mut next = |other: &mut dyn FnMut(&[u8]) -> Result<()>| -> Option<Vec<u8>> {
        let (mls, provider, group) = &mut all[turn % senders];
        turn += 1;
        let m = group.encrypt(provider, mls, &[0x42; 100]).ok()?;
        other(&m).ok()?;
        Some(m)
    };
    g.bench_function("decrypt/compact", |b| {
        b.iter_batched(
            || next(&mut |m| decrypt(&mut json.1, &json.0, m)),
            |m| fail(m.map(|m| decrypt(&mut compact.1, &compact.0, &m).is_ok())),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("decrypt/json", |b| {
        b.iter_batched(
            || next(&mut |m| decrypt(&mut compact.1, &compact.0, m)),
            |m| fail(m.map(|m| decrypt(&mut json.1, &json.0, &m).is_ok())),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    anyhow::ensure!(failures.get() == 0, "{} decryptions failed", failures.get());
    // Both members still decrypt: the routines above did not silently fail.
    let (mls, provider, group) = &mut s.senders[0];
    let m = group.encrypt(provider, mls, b"last")?;
    decrypt(&mut s.compact.1, &s.compact.0, &m)?;
    decrypt(&mut s.json.1, &s.json.0, &m)?;
    print_sizes(&s, n, senders)?;
    c.final_summary();
    Ok(())
}
