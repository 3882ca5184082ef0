//! The Delivery Service's public view of a group (ADR 0012), in a hybrid-suite group of 1000
//! members (`QPQ_BENCH_MAX_MEMBERS` for another size), on one core:
//!
//! - `verify/view`: what the server runs for one commit (another member's update commit with
//!   its full path): `PublicView::stage`, parse included;
//! - `verify/openmls`: bare openmls `PublicGroup::process_message` of the same commit, parse
//!   included: the baseline of the same run;
//! - `merge_and_encode`: merging that verified commit into the view, checking the committer's
//!   GroupInfo and encoding the new state (what the server writes with the commit);
//! - `load`: decoding a stored state into a view (a shard taking a group over).
//!
//! Printed once: the encoded state's bytes (what each store keeps per group, plus the GroupInfo)
//! and the resident memory 100 loaded views of that group take.
//!
//! Run: `cargo bench -p quicproquo-core --bench public_view`. Without `--bench` (as in
//! `cargo test --all-targets`) every routine runs once with 10 members.

#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use anyhow::{Context, Result};
use criterion::{BatchSize, Criterion};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    MlsMessageBodyIn, MlsMessageIn, ProposalStore, ProtocolMessage, PublicGroup,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use quicproquo_core::IdentityKeypair;
use quicproquo_core::group::Group;
use quicproquo_core::group::public::{PublicView, Verified};
use quicproquo_core::mls::{MlsIdentity, MlsProvider, Suite};

struct Device {
    mls: MlsIdentity,
    provider: MlsProvider,
}

fn device() -> Result<Device> {
    Ok(Device {
        mls: MlsIdentity::new(&IdentityKeypair::generate()?),
        provider: MlsProvider::default(),
    })
}

/// A group of `n` members as its creator built it, the view the server built at creation and
/// moved by the add, another member's update commit for the next epoch and its GroupInfo.
struct Setup {
    state: Vec<u8>,
    view_group_info: Vec<u8>,
    committer: quicproquo_core::IdentityKey,
    commit: Vec<u8>,
    group_info: Vec<u8>,
}

fn setup(n: usize) -> Result<Setup> {
    let suite = Suite::Hybrid;
    let alice = device()?;
    let mut group = Group::create(&alice.provider, &alice.mls, suite, b"bench group")?;
    let info = group.group_info(&alice.provider, &alice.mls)?;
    let (mut view, _) = PublicView::create(&info, b"bench group", &alice.mls.identity())?;
    let bob = device()?;
    let mut kps = vec![bob.mls.key_packages(&bob.provider, suite, 1)?.remove(0)];
    for _ in 2..n {
        let d = device()?;
        kps.push(d.mls.key_packages(&d.provider, suite, 1)?.remove(0));
    }
    let add = group.add_members(&alice.provider, &alice.mls, &kps)?;
    let Verified::Commit(staged) = view.stage(&alice.mls.identity(), &add.commit)? else {
        anyhow::bail!("the add is not a commit");
    };
    let state = view.merge(*staged, &add.group_info)?;
    group.merge_pending_commit(&alice.provider)?;
    let welcome = add.welcome.context("no welcome")?;
    let mut bobs = Group::join(&bob.provider, &welcome)?;
    let update = bobs.self_update(&bob.provider, &bob.mls)?;
    Ok(Setup {
        state,
        view_group_info: add.group_info,
        committer: bob.mls.identity(),
        commit: update.commit,
        group_info: update.group_info,
    })
}

fn protocol(bytes: &[u8]) -> Result<ProtocolMessage> {
    match MlsMessageIn::tls_deserialize_exact(bytes)?.extract() {
        MlsMessageBodyIn::PublicMessage(m) => Ok(m.into()),
        _ => anyhow::bail!("not a PublicMessage"),
    }
}

/// Resident set size in bytes (Linux), for the memory figure.
fn resident() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn bench(c: &mut Criterion, n: usize) -> Result<()> {
    let s = setup(n)?;
    let crypto = RustCrypto::default();
    // The baseline: openmls's public group of the same epoch, from the GroupInfo and tree.
    let message = MlsMessageIn::tls_deserialize_exact(s.view_group_info.as_slice())?;
    let MlsMessageBodyIn::GroupInfo(info) = message.extract() else {
        anyhow::bail!("not a GroupInfo");
    };
    let tree = info
        .extensions()
        .ratchet_tree()
        .context("no tree")?
        .ratchet_tree()
        .clone();
    let storage = MemoryStorage::default();
    let (bare, _) =
        PublicGroup::from_external(&crypto, &storage, tree, info, ProposalStore::new())?;
    let view = PublicView::load(&s.state, &[])?;

    let before = resident();
    let views: Vec<PublicView> = (0..100)
        .map(|_| PublicView::load(&s.state, &[]))
        .collect::<Result<_, _>>()?;
    let after = resident();
    println!(
        "public view, {n} members: state {} bytes, GroupInfo {} bytes, 100 views resident {} bytes",
        s.state.len(),
        s.group_info.len(),
        after.zip(before).map_or(0, |(a, b)| a.saturating_sub(b))
    );
    drop(views);

    let mut g = c.benchmark_group(format!("public_view/{n}"));
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    g.bench_function("verify/view", |b| {
        b.iter(|| black_box(view.stage(&s.committer, &s.commit).is_ok()))
    });
    g.bench_function("verify/openmls", |b| {
        b.iter(|| {
            let m = protocol(&s.commit).ok();
            black_box(m.map(|m| bare.process_message(&crypto, m).is_ok()))
        })
    });
    g.bench_function("merge_and_encode", |b| {
        b.iter_batched(
            || {
                let v = PublicView::load(&s.state, &[]).ok();
                let staged = v
                    .as_ref()
                    .and_then(|v| match v.stage(&s.committer, &s.commit) {
                        Ok(Verified::Commit(staged)) => Some(staged),
                        _ => None,
                    });
                (v, staged)
            },
            |(v, staged)| {
                if let (Some(mut v), Some(staged)) = (v, staged) {
                    black_box(v.merge(*staged, &s.group_info).map(|st| st.len()).ok());
                }
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("load", |b| {
        b.iter(|| black_box(PublicView::load(&s.state, &[]).is_ok()))
    });
    g.finish();
    Ok(())
}

fn main() -> Result<()> {
    let benching = std::env::args().any(|a| a == "--bench");
    let n = if benching {
        std::env::var("QPQ_BENCH_MAX_MEMBERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000)
    } else {
        10
    };
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, n)?;
    c.final_summary();
    Ok(())
}
