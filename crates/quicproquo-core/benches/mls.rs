//! MLS operations with both ciphersuites, on one core: the bare costs the load test's join and
//! steady-state figures are compared against.
//!
//! - `keygen`: one KeyPackage (HPKE init key + leaf key generation, two Ed25519 signatures).
//! - `kem`: HPKE seal / open of 32 bytes (KEM encapsulation / decapsulation plus a tiny AEAD).
//! - `add`: create a group and add 9 / 99 / 999 members in one commit (10 / 100 / 1000 in
//!   total), KeyPackages validated, commit and Welcome serialized.
//! - `welcome`: process the Welcome of a 1000-member group, through `Group::join` and through
//!   bare openmls (`StagedWelcome` with the same join settings), the baseline for the load
//!   test's join phase.
//! - `commit`: process another member's update commit (full path) in a 1000-member group.
//!
//! Run: `cargo bench -p quicproquo-core --bench mls` (`-- hybrid` or `-- classical` for one
//! suite; `QPQ_BENCH_MAX_MEMBERS=100` for smaller groups). Without `--bench` (as in
//! `cargo test --all-targets`) every routine runs once with 10 members.

#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use anyhow::{Context, Result};
use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    MIXED_PLAINTEXT_WIRE_FORMAT_POLICY, MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn,
    OpenMlsProvider, StagedWelcome,
};
use openmls_traits::crypto::OpenMlsCrypto;
use quicproquo_core::IdentityKeypair;
use quicproquo_core::group::Group;
use quicproquo_core::mls::{MlsIdentity, MlsProvider, Suite};

/// A device: identity and its MLS store.
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

fn copy(provider: &MlsProvider) -> Result<MlsProvider> {
    Ok(MlsProvider::import_storage(&provider.export_storage()?)?)
}

/// `n - 1` joiners with one KeyPackage each.
fn joiners(suite: Suite, n: usize) -> Result<(Vec<Device>, Vec<Vec<u8>>)> {
    let mut devices = Vec::with_capacity(n);
    let mut kps = Vec::with_capacity(n);
    for _ in 1..n {
        let d = device()?;
        kps.push(d.mls.key_packages(&d.provider, suite, 1)?.remove(0));
        devices.push(d);
    }
    Ok((devices, kps))
}

/// A group of `n` built by `creator`; returns the group and the Welcome.
fn build_group(suite: Suite, creator: &Device, kps: &[Vec<u8>]) -> Result<(Group, Vec<u8>)> {
    let id = quicproquo_client_free_id()?;
    let mut g = Group::create(&creator.provider, &creator.mls, suite, &id)?;
    let out = g.add_members(&creator.provider, &creator.mls, kps)?;
    g.merge_pending_commit(&creator.provider)?;
    Ok((g, out.welcome.context("an add commit has a Welcome")?))
}

fn quicproquo_client_free_id() -> Result<Vec<u8>> {
    let mut id = vec![0u8; 16];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("rng: {e}"))?;
    Ok(id)
}

fn bare_join(provider: &MlsProvider, welcome: &[u8]) -> Result<()> {
    let config = MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .build();
    let MlsMessageBodyIn::Welcome(w) = MlsMessageIn::tls_deserialize_exact(welcome)?.extract()
    else {
        anyhow::bail!("not a Welcome");
    };
    let group = StagedWelcome::build_from_welcome(provider, &config, w)?
        .build()?
        .into_group(provider)?;
    black_box(group);
    Ok(())
}

/// The group every benchmark of one suite is reported under.
type Benches<'a> = BenchmarkGroup<'a, WallTime>;

/// One KeyPackage, and HPKE seal / open of 32 bytes.
fn bench_primitives(g: &mut Benches<'_>, suite: Suite) -> Result<()> {
    let d = device()?;
    g.bench_function("keygen (one KeyPackage)", |b| {
        b.iter(|| black_box(d.mls.key_packages(&d.provider, suite, 1)))
    });
    let cs = suite.ciphersuite();
    let crypto = d.provider.crypto();
    let kp = crypto.derive_hpke_keypair(cs.hpke_config(), &[7u8; 64])?;
    let sealed = crypto.hpke_seal(cs.hpke_config(), &kp.public, b"info", b"aad", &[1u8; 32])?;
    g.bench_function("kem encap (hpke seal 32 B)", |b| {
        b.iter(|| {
            black_box(crypto.hpke_seal(cs.hpke_config(), &kp.public, b"info", b"aad", &[1u8; 32]))
        })
    });
    g.bench_function("kem decap (hpke open 32 B)", |b| {
        b.iter(|| {
            black_box(crypto.hpke_open(cs.hpke_config(), &sealed, &kp.private, b"info", b"aad"))
        })
    });
    Ok(())
}

/// Create a group and add `n - 1` members in one commit, for each size `n`; returns the
/// largest size with its joiners and their KeyPackages.
fn bench_add(
    g: &mut Benches<'_>,
    suite: Suite,
    sizes: &[usize],
) -> Result<(usize, Vec<Device>, Vec<Vec<u8>>)> {
    let mut last = None;
    for &n in sizes {
        let (devices, kps) = joiners(suite, n)?;
        g.bench_with_input(BenchmarkId::new("create + add members", n), &n, |b, _| {
            b.iter_batched(
                || device().and_then(|c| Ok((c, quicproquo_client_free_id()?))),
                |setup| {
                    let Ok((creator, id)) = setup else { return };
                    let Ok(mut group) = Group::create(&creator.provider, &creator.mls, suite, &id)
                    else {
                        return;
                    };
                    black_box(
                        group
                            .add_members(&creator.provider, &creator.mls, &kps)
                            .is_ok(),
                    );
                },
                BatchSize::PerIteration,
            )
        });
        last = Some((n, devices, kps));
    }
    last.context("no group sizes")
}

/// `joiner` processes the Welcome of an `n`-member group, through `Group::join` and through
/// bare openmls.
fn bench_welcome(g: &mut Benches<'_>, n: usize, joiner: &Device, welcome: &[u8]) -> Result<()> {
    let before_join = joiner.provider.export_storage()?;
    g.bench_with_input(
        BenchmarkId::new("process welcome (Group::join)", n),
        &n,
        |b, _| {
            b.iter_batched(
                || MlsProvider::import_storage(&before_join),
                |p| black_box(p.map(|p| Group::join(&p, welcome).is_ok())),
                BatchSize::PerIteration,
            )
        },
    );
    g.bench_with_input(
        BenchmarkId::new("process welcome (bare openmls)", n),
        &n,
        |b, _| {
            b.iter_batched(
                || MlsProvider::import_storage(&before_join),
                |p| black_box(p.map(|p| bare_join(&p, welcome).is_ok())),
                BatchSize::PerIteration,
            )
        },
    );
    Ok(())
}

/// Another member's update commit (made by `creator` in `group`), processed by `joiner` after
/// joining from `welcome`.
fn bench_commit(
    g: &mut Benches<'_>,
    n: usize,
    creator: &Device,
    group: &mut Group,
    joiner: &Device,
    welcome: &[u8],
) -> Result<()> {
    let member_provider = copy(&joiner.provider)?;
    let joined = Group::join(&member_provider, welcome)?;
    let group_id = joined.group_id();
    let after_join = member_provider.export_storage()?;
    let commit = group.self_update(&creator.provider, &creator.mls)?.commit;
    g.bench_with_input(BenchmarkId::new("process update commit", n), &n, |b, _| {
        b.iter_batched(
            || {
                let p = MlsProvider::import_storage(&after_join).ok()?;
                let g = Group::load(&p, &group_id).ok()??;
                Some((p, g))
            },
            |state| {
                if let Some((p, mut g)) = state {
                    black_box(g.process(&p, &commit).is_ok());
                }
            },
            BatchSize::PerIteration,
        )
    });
    Ok(())
}

fn bench_suite(c: &mut Criterion, suite: Suite, sizes: &[usize]) -> Result<()> {
    let name = suite.as_str();
    let mut g = c.benchmark_group(format!("mls/{name}"));
    // Flat sampling: the slow routines (a 1000-member add takes seconds) run ten times, not
    // the 55 of linear sampling.
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500));
    bench_primitives(&mut g, suite)?;
    let (n, devices, kps) = bench_add(&mut g, suite, sizes)?;
    let creator = device()?;
    let (mut group, welcome) = build_group(suite, &creator, &kps)?;
    let joiner = &devices[0];
    bench_welcome(&mut g, n, joiner, &welcome)?;
    bench_commit(&mut g, n, &creator, &mut group, joiner, &welcome)?;
    g.finish();
    Ok(())
}

fn main() -> Result<()> {
    let benching = std::env::args().any(|a| a == "--bench");
    let max: usize = std::env::var("QPQ_BENCH_MAX_MEMBERS")
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(1000);
    let sizes: Vec<usize> = if benching {
        [10, 100, 1000].into_iter().filter(|&n| n <= max).collect()
    } else {
        vec![10]
    };
    let mut c = Criterion::default().configure_from_args();
    if !benching {
        c = c
            .sample_size(10)
            .measurement_time(Duration::from_millis(10));
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for suite in Suite::ALL {
        // Skip a suite's (expensive) fixtures when the filter names only the other one.
        if !filter.is_empty()
            && !filter.iter().any(|f| {
                f.contains(suite.as_str()) || !Suite::ALL.iter().any(|s| f.contains(s.as_str()))
            })
        {
            continue;
        }
        bench_suite(&mut c, suite, &sizes)?;
    }
    c.final_summary();
    Ok(())
}
