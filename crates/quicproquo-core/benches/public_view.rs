//! The Delivery Service's public view of a group (ADR 0012, ADR 0018), in a hybrid-suite group
//! of 1000 members (`QPQ_BENCH_MAX_MEMBERS` for another size), on one core:
//!
//! - `verify/view`: what the server runs for one commit (another member's update commit with
//!   its full path): `PublicView::stage`, parse included;
//! - `verify/openmls`: bare openmls `PublicGroup::process_message` of the same commit, parse
//!   included: the baseline of the same run;
//! - `merge`: merging that verified commit into the view and checking the committer's
//!   GroupInfo (without the tree), as 15 of 16 commits are: nothing tree-sized is encoded;
//! - `merge/snapshot`: the same when the commit is a snapshot (every 16th): the whole state is
//!   encoded for the store;
//! - `load/snapshot`: decoding a stored snapshot into a view;
//! - `load/replay_15`: the most a restore costs: a snapshot and the 15 commits after it
//!   (a shard taking the group over, or a view evicted from the cache).
//!
//! Printed once: the bytes each store keeps per group (a snapshot, the latest GroupInfo, a
//! commit kept after the snapshot) and the resident memory 100 loaded views of that group take.
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
use quicproquo_core::group::public::{PublicView, StagedView, Verified};
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

/// A group of `n` members as its creator built it, the view the server keeps, restored from
/// the snapshot at epoch 16 (the add, then 15 of the creator's updates), another member's
/// update commit for the next epoch and its GroupInfo, and 15 commits after the snapshot.
struct Setup {
    state: Vec<u8>,
    tree_group_info: Vec<u8>,
    committer: quicproquo_core::IdentityKey,
    commit: Vec<u8>,
    group_info: Vec<u8>,
    later: Vec<Vec<u8>>,
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
    let welcome = add.welcome.clone().context("no welcome")?;
    let mut commits = Vec::new();
    let mut state = None;
    for i in 0..31 {
        let out = if i == 0 {
            add.clone()
        } else {
            group.self_update(&alice.provider, &alice.mls)?
        };
        let Verified::Commit(staged) = view.stage(&alice.mls.identity(), &out.commit)? else {
            anyhow::bail!("not a commit");
        };
        if let Some(s) = view.merge(*staged, &out.group_info)?.state {
            state = Some(s);
        }
        group.merge_pending_commit(&alice.provider)?;
        commits.push(out);
    }
    let state = state.context("no snapshot")?;
    let mut bobs = Group::join(&bob.provider, &welcome)?;
    // Bob follows the creator's updates up to the snapshot (epoch 16).
    for c in &commits[1..16] {
        bobs.process(&bob.provider, &c.commit)?;
    }
    let update = bobs.self_update(&bob.provider, &bob.mls)?;
    // The baseline's public group is built from a GroupInfo with the tree at epoch 16.
    let tree_group_info = bobs.group_info(&bob.provider, &bob.mls)?;
    Ok(Setup {
        state,
        tree_group_info,
        committer: bob.mls.identity(),
        commit: update.commit,
        group_info: update.group_info,
        later: commits[16..].iter().map(|c| c.commit.clone()).collect(),
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

fn staged_view(s: &Setup, snapshot: bool) -> Option<(PublicView, Box<StagedView>)> {
    let mut v = PublicView::load(&s.state, &[]).ok()?;
    if snapshot {
        v.snapshot_next();
    }
    match v.stage(&s.committer, &s.commit) {
        Ok(Verified::Commit(staged)) => Some((v, staged)),
        _ => None,
    }
}

fn bench(c: &mut Criterion, n: usize) -> Result<()> {
    let s = setup(n)?;
    let crypto = RustCrypto::default();
    // The baseline: openmls's public group of the same epoch, from the GroupInfo and tree.
    let message = MlsMessageIn::tls_deserialize_exact(s.tree_group_info.as_slice())?;
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
        "public view, {n} members: snapshot {} bytes, GroupInfo {} bytes (with the tree: {}), \
         a commit kept after the snapshot {} bytes, 100 views resident {} bytes",
        s.state.len(),
        s.group_info.len(),
        s.tree_group_info.len(),
        s.commit.len(),
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
    for (name, snapshot) in [("merge", false), ("merge/snapshot", true)] {
        g.measurement_time(Duration::from_secs(2));
        g.bench_function(name, |b| {
            b.iter_batched(
                || staged_view(&s, snapshot),
                |setup| {
                    // The view is returned, so dropping it is not timed (the server keeps it).
                    setup.map(|(mut v, staged)| {
                        let merged = v.merge(*staged, &s.group_info).ok();
                        (
                            v,
                            black_box(merged.and_then(|m| m.state).map(|st| st.len())),
                        )
                    })
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("load/snapshot", |b| {
        b.iter(|| black_box(PublicView::load(&s.state, &[]).is_ok()))
    });
    g.sample_size(10);
    g.bench_function("load/replay_15", |b| {
        b.iter(|| {
            let mut v = PublicView::load(&s.state, &[]).ok();
            for c in &s.later {
                v = v.and_then(|mut v| v.replay(c).ok().map(|()| v));
            }
            black_box(v.map(|v| v.epoch()))
        })
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
