//! What persisting a group's public view adds to the append of a commit (ADR 0018), on both
//! stores, for a 1000-member hybrid group's sizes (from `cargo bench -p quicproquo-core
//! --bench public_view`): a 1,386,762-byte snapshot, a 1,422-byte GroupInfo without the tree
//! (1,401,948 bytes with it), commits of 16 KiB (a path through a full tree) and 1,183,612
//! bytes (the first update after 999 adds, when most parents are blank).
//!
//! Each row appends `COMMITS` commits to a fresh group, one at a time, each waiting for its
//! durable outcome (redb: a committed write transaction; Postgres: a committed transaction),
//! and reports the mean time per append:
//! - `log only`: the commit without any view write (the baseline of the same run);
//! - `kept after the snapshot`: what 15 commits in 16 write now: a tail row naming the
//!   commit's seq (its bytes are the log's), the new epoch and the tree-less GroupInfo;
//! - `snapshot`: what every 16th commit writes now: the whole encoded state;
//! - `whole view per commit`: what every commit wrote before ADR 0018: the whole state and
//!   the GroupInfo with the tree (the copy of the previous state kept for a revert not
//!   included, so this understates it).
//!
//! The persistence figure of a commit is its row minus `log only`.
//!
//! Run: `cargo bench -p quicproquo-server --bench view_persist` (Postgres: the testkit's
//! server, `QPQ_TEST_DATABASE_URL` or a throwaway one). Without `--bench` (as in `cargo test
//! --all-targets`) each row appends 2 commits on the embedded store only.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use quicproquo_core::{IdentityKey, IdentityKeypair};
use quicproquo_server::model::group::{
    AppendOutcome, AppendRequest, CommitChange, EntryKind, GroupId, StoredView, ViewWrite,
};
use quicproquo_server::store::AnyStore;
use quicproquo_server::store::embedded::EmbeddedStore;
use quicproquo_server::store::log::LogStore;
use quicproquo_server::store::postgres::{PgStore, migrate};

const SNAPSHOT: usize = 1_386_762;
const GROUP_INFO: usize = 1_422;
const TREE_GROUP_INFO: usize = 1_401_948;
const COMMIT_SIZES: [usize; 2] = [16 * 1024, 1_183_612];

/// Incompressible-looking bytes (xorshift), so neither store stores less than it is given.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Mode {
    LogOnly,
    Tail,
    Snapshot,
    WholeView,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::LogOnly => "log only (baseline)",
            Self::Tail => "kept after the snapshot (15 in 16)",
            Self::Snapshot => "snapshot (1 in 16)",
            Self::WholeView => "whole view per commit (before)",
        }
    }

    fn view(self, epoch: u64) -> Option<ViewWrite> {
        let (state, info) = match self {
            Self::LogOnly => return None,
            Self::Tail => (None, GROUP_INFO),
            Self::Snapshot => (Some(bytes(SNAPSHOT, epoch + 7)), GROUP_INFO),
            Self::WholeView => (Some(bytes(SNAPSHOT, epoch + 7)), TREE_GROUP_INFO),
        };
        Some(ViewWrite {
            epoch: epoch + 1,
            state,
            proposals: Vec::new(),
            group_info: Some(bytes(info, epoch + 11)),
            unverified: false,
        })
    }
}

/// Mean time per append of `commits` commits of `size` bytes to a fresh group.
async fn measure(
    store: &AnyStore,
    mode: Mode,
    size: usize,
    commits: u64,
    n: usize,
) -> Result<Duration> {
    let creator: IdentityKey = IdentityKeypair::generate()?.public();
    let group = GroupId::new(format!("view persist {n}").as_bytes())?;
    let view = StoredView {
        epoch: 0,
        state: bytes(SNAPSHOT, 1),
        proposals: Vec::new(),
        group_info: bytes(GROUP_INFO, 2),
        tail: Vec::new(),
    };
    store
        .create_group_with_view(&group, &creator, Some(&view))
        .await?;
    let mut total = Duration::ZERO;
    for epoch in 0..commits {
        // Built outside the timed part.
        let req = AppendRequest {
            group_id: group.clone(),
            sender: creator,
            message_id: bytes(16, epoch * 2 + 1),
            kind: EntryKind::Commit,
            epoch,
            payload: bytes(size, epoch + 5),
            commit: Some(CommitChange::default()),
            view: mode.view(epoch),
        };
        let started = Instant::now();
        let outcome = store.append(std::slice::from_ref(&req)).await?;
        total += started.elapsed();
        if !matches!(outcome.as_slice(), [AppendOutcome::Appended { .. }]) {
            bail!("not appended: {outcome:?}");
        }
    }
    Ok(total / u32::try_from(commits)?)
}

async fn run(name: &str, store: &AnyStore, commits: u64) -> Result<()> {
    let mut n = 0;
    for size in COMMIT_SIZES {
        println!("{name}, commits of {size} bytes, {commits} per row, mean per append:");
        let mut base = Duration::ZERO;
        let mut rows = Vec::new();
        for mode in [Mode::LogOnly, Mode::Tail, Mode::Snapshot, Mode::WholeView] {
            n += 1;
            let mean = measure(store, mode, size, commits, n).await?;
            if matches!(mode, Mode::LogOnly) {
                base = mean;
            }
            rows.push((mode, mean));
        }
        let extra = |m: Duration| m.saturating_sub(base).as_secs_f64() * 1e3;
        for (mode, mean) in &rows {
            println!(
                "  {:<40} {:>9.3} ms  (+{:.3} ms over the log only)",
                mode.name(),
                mean.as_secs_f64() * 1e3,
                extra(*mean)
            );
        }
        let amortized = (15.0 * extra(rows[1].1) + extra(rows[2].1)) / 16.0;
        println!(
            "  view persistence now, amortized over 16 commits: +{amortized:.3} ms per commit"
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let benching = std::env::args().any(|a| a == "--bench");
    let commits = if benching { 32 } else { 2 };
    let dir = tempfile::tempdir()?;
    let embedded = AnyStore::Embedded(EmbeddedStore::open(&dir.path().join("qpq.db"))?);
    run("embedded store (redb)", &embedded, commits).await?;
    if benching {
        let db = quicproquo_testkit::postgres::fresh_database().await?;
        migrate(db.url()).await?;
        let pg = AnyStore::Postgres(PgStore::connect(db.url(), 4).await?);
        run("PostgreSQL", &pg, commits).await?;
    }
    Ok(())
}
