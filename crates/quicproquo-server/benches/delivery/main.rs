//! The Delivery Service end to end: one MLS group of 100 members through the real server.
//!
//! Everything runs in this process: a `standalone` server (its embedded store in a temporary
//! directory, fsync on every commit) on an ephemeral loopback port, and 100 clients, each with
//! its own Noise connection, bound session and MLS state, all on one client thread.
//!
//! 1. **Setup** (timed, but not part of the figures): every user registers (connects, binds,
//!    claims a name, uploads KeyPackages); the first creates the group and adds the other 99 in
//!    one commit (one batch KeyPackage fetch); each of them joins from its Welcome. All members
//!    must then agree on the epoch authenticator.
//! 2. **Appends per second**: a few members send application messages as fast as the server
//!    acknowledges them, each with several sends in flight on its connection. The messages are
//!    real MLS PrivateMessages encrypted *before* the timed run (a pool per sender, replayed
//!    with fresh message ids: the server only reads the public framing, and nobody decrypts
//!    them), so the figure is the server's, not the client's MLS. The encryption cost is
//!    reported on its own line.
//! 3. **Delivery latency**: all members subscribe (live push); other members send at a fixed
//!    rate (pre-encrypted, in order). Latency runs from a message's *planned* send time (so a
//!    stalled sender cannot hide queueing: no coordinated omission) to the moment a
//!    recipient's subscription yields it, for each of the 99 recipients. After the run every
//!    recipient decrypts what it received, checked against what was sent: that MLS cost is
//!    reported separately, as it is client CPU. The latency is also split at the server's
//!    append time (durable), and per message into first and last recipient. Its senders are
//!    other members than the append run's, whose ratchets that run moved further ahead than a
//!    recipient may skip.
//!
//! Client, MLS and server share the machine's cores; the output shows, per phase, the CPU
//! each part used (Linux `/proc`, best effort), how busy the whole machine was, and the CPU
//! per append and per push. A disk probe (small write + fdatasync next to the store, before
//! the appends and every 20 ms during the latency run) tells a slow disk from a slow server.
//!
//! Run: `cargo bench -p quicproquo-server --bench delivery` (add `-- --hybrid`, or set
//! `QPQ_BENCH_SUITE=hybrid`, for the post-quantum hybrid suite). `QPQ_BENCH_MEMBERS` (100),
//! `QPQ_BENCH_SECS` (8, the append run), `QPQ_BENCH_IN_FLIGHT` (16 per sender),
//! `QPQ_BENCH_RATE` (50 messages/s) and `QPQ_BENCH_LATENCY_SECS` (20) change the shape;
//! `QPQ_BENCH_CSV=<file>` writes the latency run's per-message timeline.
//! Without `--bench` (e.g. `cargo test --all-targets`) it runs a small smoke version that
//! fails on any error.
//!
//! The code: `setup` registers the users, creates the group and adds everyone; `measure` runs
//! the append and latency phases; `probe` accounts CPU and probes the disk; `report` prints
//! the results.

mod measure;
mod probe;
mod report;
mod setup;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use quicproquo_client::ConnectOptions;
use quicproquo_core::NodeRole;
use quicproquo_core::mls::Suite;
use quicproquo_server::{NodeIdentity, ServerConfig};

use crate::measure::{AppendReport, LatencyReport, appends, latency};
use crate::probe::disk_probe;
use crate::report::print;
use crate::setup::{SetupReport, setup};

/// The shape of the run: the full benchmark or the smoke version.
struct Settings {
    benching: bool,
    members: usize,
    suite: Suite,
    plaintext_bytes: usize,
    append_senders: usize,
    in_flight: usize,
    pool: usize,
    append_warmup: Duration,
    append_run: Duration,
    latency_senders: usize,
    rate: f64,
    latency_run: Duration,
    drain: Duration,
}

fn settings() -> Result<Settings> {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    let env = |name: &str, default: u64| -> Result<u64> {
        std::env::var(name).ok().map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("{name}={v}"))
        })
    };
    let hybrid = args.iter().any(|a| a == "--hybrid")
        || std::env::var("QPQ_BENCH_SUITE").is_ok_and(|s| s.eq_ignore_ascii_case("hybrid"));
    let suite = if hybrid {
        Suite::Hybrid
    } else {
        Suite::Classical
    };
    let s = if benching {
        Settings {
            benching,
            members: usize::try_from(env("QPQ_BENCH_MEMBERS", 100)?)?,
            suite,
            plaintext_bytes: 128,
            append_senders: 4,
            in_flight: usize::try_from(env("QPQ_BENCH_IN_FLIGHT", 16)?)?,
            pool: 256,
            append_warmup: Duration::from_secs(1),
            append_run: Duration::from_secs(env("QPQ_BENCH_SECS", 8)?),
            latency_senders: 5,
            rate: env("QPQ_BENCH_RATE", 50)? as f64,
            latency_run: Duration::from_secs(env("QPQ_BENCH_LATENCY_SECS", 20)?),
            drain: Duration::from_secs(10),
        }
    } else {
        Settings {
            benching,
            members: 4,
            suite,
            plaintext_bytes: 128,
            append_senders: 1,
            in_flight: 4,
            pool: 8,
            append_warmup: Duration::from_millis(100),
            append_run: Duration::from_millis(300),
            latency_senders: 1,
            rate: 50.0,
            latency_run: Duration::from_millis(400),
            drain: Duration::from_secs(10),
        }
    };
    ensure!(
        s.append_senders + s.latency_senders < s.members,
        "the senders of both runs are distinct members other than the creator: \
         raise QPQ_BENCH_MEMBERS"
    );
    ensure!(
        s.in_flight > 0 && s.rate > 0.0,
        "in-flight and rate must be positive"
    );
    Ok(s)
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Everything the run measured.
struct Report {
    setup: SetupReport,
    fsync: Vec<u64>,
    appends: AppendReport,
    latency: LatencyReport,
}

async fn run(
    s: &Settings,
    addr: SocketAddr,
    options: ConnectOptions,
    data_dir: &Path,
) -> Result<Report> {
    let dir = tempfile::tempdir()?;
    let (members, id, setup) = setup(s, addr, &options, dir.path()).await?;
    let samples = if s.benching { 200 } else { 5 };
    let fsync = disk_probe(data_dir, samples, Duration::ZERO, &AtomicBool::new(false))?;
    let appends = appends(s, &members, &id).await?;
    let last_seq = members[0]
        .session
        .delivery
        .groups()
        .await?
        .into_iter()
        .find(|g| g.group_id == id)
        .map(|g| g.last_seq)
        .context("the creator does not see the group")?;
    ensure!(
        last_seq >= appends.last_seq,
        "the log ends at {last_seq} before an acknowledged append {}",
        appends.last_seq
    );
    let latency = latency(s, &members, &id, last_seq, data_dir).await?;
    Ok(Report {
        setup,
        fsync,
        appends,
        latency,
    })
}

fn main() -> Result<()> {
    let s = settings()?;
    let dir = tempfile::tempdir()?;
    let mut config = ServerConfig::for_role(NodeRole::Standalone, dir.path().join("data"));
    config.shutdown_grace = Duration::from_secs(2);
    let (workers, data_dir) = (config.workers, config.data_dir.clone());
    let identity = NodeIdentity::load_or_create(&config.data_dir, NodeRole::Standalone)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let store = quicproquo_server::open_store(&config)?;
    let server = quicproquo_server::start(config, listener, identity, store)?;
    let options = ConnectOptions::new(server.cluster_key());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("bench-client")
        .build()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&rt, run(&s, server.local_addr(), options, &data_dir));
    // Close every client connection before stopping the server.
    drop(local);
    drop(rt);
    server.shutdown();
    server.join()?;
    let errors = print(&s, workers, &mut report?);
    ensure!(
        s.benching || errors == 0,
        "the smoke run saw {errors} error(s)"
    );
    Ok(())
}
