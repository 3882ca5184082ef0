//! Durable group-log appends per second through the shard's appender on `PgStore`, next to a
//! `pgbench` baseline inserting rows of the same shape in 100-row transactions, in the same run
//! and on the same server.
//!
//! Setup: a fresh database from the testkit (a throwaway server unless `QPQ_TEST_DATABASE_URL`
//! names one), `GROUPS` (200) groups, each created by its own identity.
//!
//! - `PgStore`: `QPQ_BENCH_SHARDS` (default 4) real `Appender`s (as a shard runs), each with
//!   its own `PgStore` (as separate shard processes would have) and owning the groups whose
//!   index is congruent to it; `QPQ_BENCH_SENDERS` (default 2048) tokio tasks, sender `i`
//!   sending application messages of 300 pseudo-random bytes to group `i % 200` through its
//!   shard, one at a time, each waiting for its durable outcome. Each shard's appender writes
//!   whatever is queued (up to `MAX_BATCH` requests) in one transaction, one transaction at a
//!   time: the shards keep `QPQ_BENCH_SHARDS` transactions in flight.
//! - `pgbench -c <shards> -j 2 -T <secs>`: the same concurrency, each transaction inserting 100
//!   rows (`INSERT ... SELECT ... FROM generate_series`) into `bench_log`, a copy of
//!   `group_log` with its keys, indexes and defaults: 16-byte group id spread over 200 groups,
//!   16-byte message id, 300-byte payload (a constant, so it does not even cross the wire), in
//!   simple and prepared protocol modes.
//!
//! Before every measurement both log tables are emptied and vacuumed and a checkpoint is taken
//! (so that none falls inside a measurement); the order alternates between rounds. The figures
//! compare rows made durable per second.
//!
//! Run: `cargo bench -p quicproquo-server --bench log_append` (`QPQ_BENCH_SECS`, default 5,
//! sets each measurement's length). Without `--bench` (e.g. `cargo test --all-targets`) it runs
//! a short smoke version.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use quicproquo_core::{IdentityKey, IdentityKeypair};
use quicproquo_server::model::group::{AppendOutcome, AppendRequest, EntryKind, GroupId};
use quicproquo_server::ordering::Appender;
use quicproquo_server::store::AnyStore;
use quicproquo_server::store::log::LogStore;
use quicproquo_server::store::postgres::{PgStore, migrate};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

const GROUPS: usize = 200;
const PAYLOAD_BYTES: usize = 300;
const PGBENCH_ROWS: usize = 100;
const ROUNDS: usize = 2;

const SCHEMA: &str = "
    CREATE TABLE bench_log (LIKE group_log INCLUDING ALL);
    CREATE SEQUENCE bench_seq;";

const TRUNCATE: &str = "TRUNCATE group_log, bench_log";

struct Settings {
    shards: usize,
    senders: usize,
    run: Duration,
    rounds: usize,
}

fn settings() -> Result<Settings> {
    let benching = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: u64| -> Result<u64> {
        std::env::var(name).ok().map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("{name}={v}"))
        })
    };
    let shards = usize::try_from(env("QPQ_BENCH_SHARDS", 4)?)?;
    ensure!(
        (1..=GROUPS).contains(&shards),
        "QPQ_BENCH_SHARDS must be 1 to {GROUPS}"
    );
    Ok(if benching {
        Settings {
            shards,
            senders: usize::try_from(env("QPQ_BENCH_SENDERS", 2048)?)?.max(1),
            run: Duration::from_secs(env("QPQ_BENCH_SECS", 5)?.max(1)),
            rounds: ROUNDS,
        }
    } else {
        Settings {
            shards,
            senders: 256,
            run: Duration::from_millis(300),
            rounds: 1,
        }
    })
}

/// xorshift64*: cheap and deterministic, for incompressible payloads.
fn pseudo_random(len: usize, mut state: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The pgbench script: one transaction of `PGBENCH_ROWS` rows shaped like the shard's.
fn pgbench_script(payload: &[u8]) -> String {
    format!(
        "INSERT INTO bench_log (group_id, seq, epoch, kind, message_id, payload)\n\
         SELECT decode(lpad(to_hex(1 + n % {GROUPS}), 32, '0'), 'hex'), n, 0, 0,\n\
                decode(lpad(to_hex(n), 32, '0'), 'hex'), '\\x{}'::bytea\n\
         FROM (SELECT nextval('bench_seq') AS n FROM generate_series(1, {PGBENCH_ROWS})) AS s;\n",
        hex::encode(payload)
    )
}

/// Rows per second reported by pgbench (its transactions per second x rows per transaction).
fn run_pgbench(
    url: &str,
    script: &std::path::Path,
    clients: usize,
    run: Duration,
    prepared: bool,
) -> Result<f64> {
    let pgbench = quicproquo_testkit::postgres::pg_binary("pgbench")?;
    let secs = run.as_secs().max(1).to_string();
    let clients = clients.to_string();
    let mut cmd = std::process::Command::new(pgbench);
    cmd.args(["-n", "-c", &clients, "-j", "2", "-T", &secs, "-f"])
        .arg(script);
    if prepared {
        cmd.args(["-M", "prepared"]);
    }
    let out = cmd.arg(url).output().context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "pgbench failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tps: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .with_context(|| format!("no tps in pgbench output: {stdout}"))?;
    Ok(tps * PGBENCH_ROWS as f64)
}

struct Cluster {
    shards: Vec<Arc<Appender>>,
    stop: CancellationToken,
    appenders: Vec<std::thread::JoinHandle<()>>,
    groups: Arc<Vec<(GroupId, IdentityKey)>>,
}

impl Cluster {
    fn shard_of(&self, group: usize) -> &Arc<Appender> {
        &self.shards[group % self.shards.len()]
    }

    fn stop(self) -> Result<()> {
        self.stop.cancel();
        drop(self.shards);
        for appender in self.appenders {
            appender
                .join()
                .map_err(|_| anyhow::anyhow!("an appender panicked"))?;
        }
        Ok(())
    }
}

async fn start_cluster(url: &str, settings: &Settings) -> Result<Cluster> {
    let admin = PgStore::connect(url, 2).await?;
    let mut groups = Vec::with_capacity(GROUPS);
    for g in 0..GROUPS {
        let creator = IdentityKeypair::generate()?.public();
        let group = GroupId::new(format!("bench-group-{g:04}").as_bytes())?;
        admin.create_group(&group, &creator).await?;
        groups.push((group, creator));
    }
    let stop = CancellationToken::new();
    let (mut shards, mut appenders) = (Vec::new(), Vec::new());
    for _ in 0..settings.shards {
        let store = AnyStore::Postgres(PgStore::connect(url, 2).await?);
        let (shard, appender) = Appender::start(
            store,
            quicproquo_server::config::DEFAULT_MAX_MESSAGE_BYTES,
            Arc::default(),
            (
                quicproquo_server::pool::CpuPool::with_defaults()?,
                quicproquo_server::ordering::views::DEFAULT_CACHED_VIEWS,
            ),
            stop.clone(),
        )?;
        shards.push(shard);
        appenders.push(appender);
    }
    Ok(Cluster {
        shards,
        stop,
        appenders,
        groups: Arc::new(groups),
    })
}

/// Appends per second through the shards.
async fn run_store(cluster: &Cluster, settings: &Settings, round: usize) -> Result<f64> {
    let payload = Arc::new(pseudo_random(PAYLOAD_BYTES, 0x9e37_79b9_7f4a_7c15));
    let barrier = Arc::new(tokio::sync::Barrier::new(settings.senders + 1));
    let tasks: Vec<_> = (0..settings.senders)
        .map(|i| {
            let g = i % GROUPS;
            let (shard, groups) = (Arc::clone(cluster.shard_of(g)), Arc::clone(&cluster.groups));
            let (payload, barrier, run) =
                (Arc::clone(&payload), Arc::clone(&barrier), settings.run);
            tokio::spawn(async move {
                let (group, sender) = &groups[g];
                let request = |n: u64| AppendRequest {
                    group_id: group.clone(),
                    sender: *sender,
                    message_id: format!("{round}-{i}-{n}").into_bytes(),
                    kind: EntryKind::Application,
                    epoch: 0,
                    payload: payload.to_vec(),
                    commit: None,
                    view: None,
                };
                barrier.wait().await;
                let until = Instant::now() + run;
                let mut n = 0u64;
                while Instant::now() < until {
                    match shard.append(request(n)).await? {
                        AppendOutcome::Appended { .. } => n += 1,
                        other => bail!("unexpected outcome {other:?}"),
                    }
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    barrier.wait().await;
    let start = Instant::now();
    let mut total = 0u64;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Rows and distinct transaction start times (`appended_at` is the transaction's `now()`) in
/// the log: how many rows each appender transaction carried on average.
async fn mean_batch(client: &tokio_postgres::Client) -> Result<f64> {
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT appended_at) FROM group_log",
            &[],
        )
        .await?;
    let (rows, transactions): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    Ok(rows as f64 / transactions.max(1) as f64)
}

async fn bench() -> Result<()> {
    let settings = settings()?;
    let db = quicproquo_testkit::postgres::fresh_database().await?;
    migrate(db.url()).await?;
    let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await?;
    tokio::spawn(connection);
    client.batch_execute(SCHEMA).await?;
    let cluster = start_cluster(db.url(), &settings).await?;
    let script_dir = tempfile::tempdir()?;
    let script = script_dir.path().join("append.sql");
    std::fs::write(
        &script,
        pgbench_script(&pseudo_random(PAYLOAD_BYTES, 0x5eed)),
    )?;
    println!(
        "{GROUPS} groups, {} shards (= pgbench clients), {} senders, {PAYLOAD_BYTES}-byte \
         payloads, {:?} per measurement",
        settings.shards, settings.senders, settings.run
    );

    let (mut store_rates, mut simple_rates, mut prepared_rates, mut batches) =
        (vec![], vec![], vec![], vec![]);
    for round in 0..settings.rounds {
        for step in 0..3 {
            // Alternate the order between rounds so neither side always runs on a warmer cache.
            let which = if round % 2 == 0 { step } else { 2 - step };
            client.batch_execute(TRUNCATE).await?;
            // VACUUM cannot share a (multi-statement) transaction.
            for table in ["groups", "group_log", "bench_log"] {
                client
                    .batch_execute(&format!("VACUUM ANALYZE {table}"))
                    .await?;
            }
            // A checkpoint now, so that none falls inside the measurement: one writes out the
            // dirty buffers while the phase runs, and whichever side it hit ran slower.
            client
                .batch_execute("CHECKPOINT")
                .await
                .context("CHECKPOINT (the benchmark's role needs the right to run it)")?;
            if which == 0 {
                store_rates.push(run_store(&cluster, &settings, round).await?);
                batches.push(mean_batch(&client).await?);
            } else {
                let (url, script, run, clients) = (
                    db.url().to_owned(),
                    script.clone(),
                    settings.run,
                    settings.shards,
                );
                let rate = tokio::task::spawn_blocking(move || {
                    run_pgbench(&url, &script, clients, run, which == 2)
                })
                .await??;
                [&mut simple_rates, &mut prepared_rates][which - 1].push(rate);
            }
        }
    }
    cluster.stop()?;

    let best = |rates: &[f64]| rates.iter().copied().fold(0.0, f64::max);
    let (ours, simple, prepared) = (
        best(&store_rates),
        best(&simple_rates),
        best(&prepared_rates),
    );
    println!("\n{:<40} {:>12}   rounds", "durable log rows", "best/s");
    for (name, rate, all) in [
        ("Shard appender -> PgStore::append", ours, &store_rates),
        ("pgbench -M simple, 100-row INSERT", simple, &simple_rates),
        (
            "pgbench -M prepared, 100-row INSERT",
            prepared,
            &prepared_rates,
        ),
    ] {
        let rounds: Vec<String> = all.iter().map(|r| format!("{r:.0}")).collect();
        println!("{name:<40} {rate:>12.0}   {}", rounds.join(", "));
    }
    let batches: Vec<String> = batches.iter().map(|b| format!("{b:.0}")).collect();
    println!(
        "\nmean rows per appender transaction: {}\nratio PgStore / pgbench simple:   {:.2}  \
         (target >= 0.70)\nratio PgStore / pgbench prepared: {:.2}",
        batches.join(", "),
        ours / simple,
        ours / prepared
    );
    Ok(())
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench())
}
