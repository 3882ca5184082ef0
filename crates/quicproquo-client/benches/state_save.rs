//! What saving `qpq`'s state costs after each message, for a member of a hybrid-suite group of
//! 1000 members (`QPQ_BENCH_MAX_MEMBERS` for another size), on the disk of the temporary
//! directory (every save is fsynced).
//!
//! Messages come from `QPQ_BENCH_SENDERS` members in turn (default 100), each of whom has sent
//! one before measuring starts. Per iteration the member decrypts the next message (untimed)
//! and then, timed:
//!
//! - `save/append`: `ClientState::save`, appending what the decryption changed;
//! - `save/rewrite`: `ClientState::compact`, the whole state rewritten (temporary file, fsync,
//!   rename), as every save did before;
//! - `save/previous_format`: the whole state in the previous format (version 1: openmls's JSON
//!   store) rewritten the same way, kept by a second member decrypting the same messages: the
//!   baseline of the same run.
//!
//! Printed once: the file sizes and the bytes one appended save writes.
//!
//! Run: `cargo bench -p quicproquo-client --bench state_save`. Without `--bench` (as in
//! `cargo test --all-targets`) every routine runs once with 10 members.

#![allow(missing_docs)]

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use criterion::{BatchSize, Criterion};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    Capabilities, ExtensionType, KeyPackage, MlsGroup, MlsMessageBodyIn, MlsMessageIn,
    OpenMlsProvider, ProtocolMessage, StagedWelcome,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use quicproquo_client::ClientState;
use quicproquo_client::state::GroupMeta;
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

/// The previous state file's layout (version 1), as its save wrote it: the whole file, with the
/// MLS storage as `count u64 | (key_len u64, value_len u64, key, value)*` of openmls's JSON
/// store, to a temporary file that is fsynced and renamed over the old one.
fn save_previous_format(path: &Path, seed: &[u8; 32], json: &MemoryStorage) -> Result<u64> {
    let values = json
        .values
        .read()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut mls = Vec::new();
    mls.extend_from_slice(&(values.len() as u64).to_be_bytes());
    for (k, v) in values.iter() {
        mls.extend_from_slice(&(k.len() as u64).to_be_bytes());
        mls.extend_from_slice(&(v.len() as u64).to_be_bytes());
        mls.extend_from_slice(k);
        mls.extend_from_slice(v);
    }
    let mut out = Vec::with_capacity(128 + mls.len());
    out.extend_from_slice(b"QPQSTATE");
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(seed);
    out.push(1);
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&(mls.len() as u64).to_be_bytes());
    out.extend_from_slice(&mls);
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&[0u8; 30]);
    let dir = path.parent().context("a state file has a directory")?;
    let tmp = dir.join(".previous.tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&out)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(out.len() as u64)
}

fn random_id() -> Result<Vec<u8>> {
    let mut id = vec![0u8; 16];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("rng: {e}"))?;
    Ok(id)
}

fn json_key_package(provider: &JsonProvider, me: &MlsIdentity) -> Result<Vec<u8>> {
    let capabilities = Capabilities::builder()
        .ciphersuites(Suite::ALL.map(Suite::ciphersuite).to_vec())
        .extensions(vec![ExtensionType::LastResort])
        .build();
    let bundle = KeyPackage::builder()
        .leaf_node_capabilities(capabilities)
        .build(
            Suite::Hybrid.ciphersuite(),
            provider,
            me.signer(),
            me.credential().clone(),
        )
        .map_err(|e| anyhow::anyhow!("key package: {e}"))?;
    Ok(bundle.key_package().tls_serialize_detached()?)
}

fn json_join(provider: &JsonProvider, welcome: &[u8]) -> Result<MlsGroup> {
    let MlsMessageBodyIn::Welcome(w) = MlsMessageIn::tls_deserialize_exact(welcome)?.extract()
    else {
        bail!("not a Welcome");
    };
    StagedWelcome::build_from_welcome(provider, &join_config(), w)
        .and_then(|s| s.build())
        .and_then(|s| s.into_group(provider))
        .map_err(|e| anyhow::anyhow!("join: {e}"))
}

fn json_decrypt(group: &mut MlsGroup, provider: &JsonProvider, message: &[u8]) -> Result<()> {
    let MlsMessageBodyIn::PrivateMessage(m) =
        MlsMessageIn::tls_deserialize_exact(message)?.extract()
    else {
        bail!("not a PrivateMessage");
    };
    group
        .process_message(provider, ProtocolMessage::from(m))
        .map_err(|e| anyhow::anyhow!("decrypt: {e}"))?;
    Ok(())
}

/// A member who sends: identity, provider, group.
type Sender = (MlsIdentity, MlsProvider, Group);

struct Setup {
    senders: Vec<Sender>,
    turn: usize,
    state: ClientState,
    group: Group,
    json: (JsonProvider, MlsGroup),
}

impl Setup {
    /// The next sender's message, decrypted by both members.
    fn next(&mut self) -> Result<()> {
        let n = self.senders.len();
        let (mls, provider, group) = &mut self.senders[self.turn % n];
        self.turn += 1;
        let m = group.encrypt(provider, mls, &[0x42; 100])?;
        self.group.process(&self.state.mls, &m)?;
        json_decrypt(&mut self.json.1, &self.json.0, &m)
    }
}

fn setup(n: usize, senders: usize) -> Result<Setup> {
    let suite = Suite::Hybrid;
    let mut state = ClientState::create(suite)?;
    let json_me = MlsIdentity::new(&IdentityKeypair::generate()?);
    let json_provider = JsonProvider::default();
    let mut kps = vec![
        state
            .mls_identity()
            .key_packages(&state.mls, suite, 1)?
            .remove(0),
        json_key_package(&json_provider, &json_me)?,
    ];
    let mut others = Vec::new();
    for i in 3..n {
        let other = MlsIdentity::new(&IdentityKeypair::generate()?);
        let provider = MlsProvider::default();
        kps.push(other.key_packages(&provider, suite, 1)?.remove(0));
        if i < senders + 2 {
            others.push((other, provider));
        }
    }
    let creator = MlsIdentity::new(&IdentityKeypair::generate()?);
    let creator_provider = MlsProvider::default();
    let id = random_id()?;
    let mut group = Group::create(&creator_provider, &creator, suite, &id)?;
    let out = group.add_members(&creator_provider, &creator, &kps)?;
    group.merge_pending_commit(&creator_provider)?;
    let welcome = out.welcome.context("an add commit has a Welcome")?;
    let member_group = Group::join(&state.mls, &welcome)?;
    state.groups.insert(
        id,
        GroupMeta {
            name: "bench".into(),
            cursor: 1,
            own_pending: Vec::new(),
        },
    );
    let json_group = json_join(&json_provider, &welcome)?;
    let mut all = vec![(creator, creator_provider, group)];
    for (mls, provider) in others {
        let group = Group::join(&provider, &welcome)?;
        all.push((mls, provider, group));
    }
    let mut s = Setup {
        senders: all,
        turn: 0,
        state,
        group: member_group,
        json: (json_provider, json_group),
    };
    for _ in 0..s.senders.len() {
        s.next()?;
    }
    Ok(s)
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
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("qpq-state.bin");
    let previous = dir.path().join("qpq-state-v1.bin");
    let mut s = setup(n, senders)?;
    let seed = *s.state.identity().seed();
    s.state.save(&path)?;
    let compact_size = fs::metadata(&path)?.len();
    let previous_size = save_previous_format(&previous, &seed, &s.json.0.storage)?;
    s.next()?;
    s.state.save(&path)?;
    let one_append = fs::metadata(&path)?.len() - compact_size;

    let failures = std::cell::Cell::new(0u32);
    let fail = |ok: bool| {
        if !ok {
            failures.set(failures.get() + 1);
        }
    };
    let mut g = c.benchmark_group(format!("state_save/hybrid/{n}/{senders}_senders"));
    g.warm_up_time(Duration::from_millis(500));
    let s = std::cell::RefCell::new(s);
    let step = || fail(s.borrow_mut().next().is_ok());
    g.bench_function("save/append", |b| {
        b.iter_batched(
            step,
            |()| fail(s.borrow().state.save(&path).is_ok()),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("save/rewrite", |b| {
        b.iter_batched(
            step,
            |()| fail(s.borrow().state.compact(&path).is_ok()),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("save/previous_format", |b| {
        b.iter_batched(
            step,
            |()| fail(save_previous_format(&previous, &seed, &s.borrow().json.0.storage).is_ok()),
            BatchSize::PerIteration,
        )
    });
    g.finish();
    anyhow::ensure!(failures.get() == 0, "{} steps failed", failures.get());
    // The state on disk is the state in memory.
    let s = s.into_inner();
    s.state.save(&path)?;
    let loaded = ClientState::load(&path)?;
    anyhow::ensure!(
        loaded.mls.entries()? == s.state.mls.entries()?,
        "state differs"
    );
    println!(
        "member of {n} after messages from {senders} senders: state file {compact_size} B \
         (previous format {previous_size} B); one message's save appends {one_append} B"
    );
    c.final_summary();
    Ok(())
}
