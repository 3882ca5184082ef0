//! KeyPackage fetches per second through `PgStore`, next to a `pgbench` baseline running the
//! same consuming single-row transaction, in the same run and on the same server.
//!
//! Setup: a fresh database from the testkit (a throwaway server unless `QPQ_TEST_DATABASE_URL`
//! names one), 32 identities with `QPQ_BENCH_PACKAGES` (default 1500) KeyPackages each of
//! 2668 bytes (the size of a hybrid post-quantum KeyPackage; pseudo-random, so incompressible).
//! Before every measurement both tables are refilled from the same source rows and vacuumed.
//!
//! - `PgStore`: 32 tokio tasks, each fetching one KeyPackage of a random identity per call
//!   through `fetch_key_packages(&[target])`, over a pool of 32 connections;
//! - `pgbench`: `pgbench -n -c 32 -j 2 -T <secs> -f script.sql`, the script deleting the oldest
//!   unlocked row of a random identity (`FOR UPDATE SKIP LOCKED LIMIT 1 ... RETURNING data`) in
//!   a table of the same shape, in simple (the default) and prepared protocol modes.
//!
//! Run: `cargo bench -p quicproquo-server --bench keypackage_fetch` (`QPQ_BENCH_SECS`, default
//! 3, sets each measurement's length). Without `--bench` (e.g. `cargo test --all-targets`) it
//! runs a short smoke version.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use quicproquo_core::{IdentityKey, IdentityKeypair};
use quicproquo_server::store::postgres::{PgStore, migrate};
use quicproquo_server::store::{KeyPackageRecord, Store};
use tokio_postgres::NoTls;

const CLIENTS: usize = 32;
const IDENTITIES: usize = 32;
const PACKAGE_BYTES: usize = 2668;
const ROUNDS: usize = 2;
/// Rows per INSERT while loading the source table.
const LOAD_BATCH: usize = 500;

const SCHEMA: &str = "
    CREATE TABLE bench_source (
        seq      BIGINT PRIMARY KEY,
        n        INT NOT NULL,
        identity BYTEA NOT NULL,
        hash_ref BYTEA NOT NULL,
        data     BYTEA NOT NULL
    );
    CREATE TABLE bench_kp (
        id       BIGSERIAL PRIMARY KEY,
        identity BYTEA NOT NULL,
        hash_ref BYTEA NOT NULL UNIQUE,
        data     BYTEA NOT NULL
    );
    CREATE INDEX bench_kp_identity_id ON bench_kp (identity, id);";

/// pgbench's identities are `n` as 32 big-endian bytes, computed in the statement.
const PGBENCH_SCRIPT: &str = "\\set n random(0, 31)
DELETE FROM bench_kp WHERE id = (SELECT id FROM bench_kp \
WHERE identity = decode(lpad(to_hex(:n::int), 64, '0'), 'hex') \
ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING data;
";

const REFILL: &str = "
    TRUNCATE key_packages, bench_kp;
    INSERT INTO key_packages (identity, hash_ref, data)
        SELECT identity, hash_ref, data FROM bench_source ORDER BY seq;
    INSERT INTO bench_kp (identity, hash_ref, data)
        SELECT decode(lpad(to_hex(n), 64, '0'), 'hex'), hash_ref, data
        FROM bench_source ORDER BY seq;";

/// xorshift64*: cheap, deterministic, good enough for picking targets and filling bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

struct Settings {
    packages_per_identity: usize,
    run: Duration,
    /// Measuring for real: a pool running dry invalidates the run. The smoke version only
    /// checks that everything works.
    strict: bool,
}

fn settings() -> Result<Settings> {
    let benching = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: u64| -> Result<u64> {
        std::env::var(name).ok().map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("{name}={v}"))
        })
    };
    Ok(if benching {
        Settings {
            packages_per_identity: usize::try_from(env("QPQ_BENCH_PACKAGES", 1500)?)?,
            run: Duration::from_secs(env("QPQ_BENCH_SECS", 3)?),
            strict: true,
        }
    } else {
        Settings {
            packages_per_identity: 100,
            run: Duration::from_millis(200),
            strict: false,
        }
    })
}

async fn admin(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Loads `bench_source`: package `i` of every identity before package `i + 1` of any.
async fn load_source(
    client: &tokio_postgres::Client,
    identities: &[IdentityKey],
    per_identity: usize,
) -> Result<()> {
    let insert = client
        .prepare(
            "INSERT INTO bench_source (seq, n, identity, hash_ref, data)
             SELECT * FROM unnest($1::bigint[], $2::int[], $3::bytea[], $4::bytea[], $5::bytea[])",
        )
        .await?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let total = identities.len() * per_identity;
    let mut seq = 0usize;
    while seq < total {
        let end = (seq + LOAD_BATCH).min(total);
        let (mut seqs, mut ns, mut ids, mut refs, mut data) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for s in seq..end {
            let n = s % identities.len();
            let mut bytes = vec![0u8; PACKAGE_BYTES];
            rng.fill(&mut bytes);
            seqs.push(i64::try_from(s)?);
            ns.push(i32::try_from(n)?);
            ids.push(identities[n].as_bytes().to_vec());
            refs.push(format!("ref-{s}").into_bytes());
            data.push(bytes);
        }
        client
            .execute(&insert, &[&seqs, &ns, &ids, &refs, &data])
            .await?;
        seq = end;
    }
    Ok(())
}

/// Fewest rows left for any identity in `table`; a measurement is only valid if none ran dry.
async fn fewest_left(client: &tokio_postgres::Client, table: &str) -> Result<i64> {
    let row = client
        .query_one(
            &format!(
                "SELECT count(DISTINCT identity), coalesce(min(c), 0) FROM
                 (SELECT identity, count(*) AS c FROM {table} GROUP BY identity) AS per"
            ),
            &[],
        )
        .await?;
    let (identities, fewest): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    Ok(if identities == IDENTITIES as i64 {
        fewest
    } else {
        0
    })
}

/// KeyPackage fetches per second through `store`.
async fn run_store(
    store: &PgStore,
    identities: &Arc<Vec<IdentityKey>>,
    run: Duration,
    strict: bool,
) -> Result<f64> {
    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (store, ids, barrier) =
                (store.clone(), Arc::clone(identities), Arc::clone(&barrier));
            tokio::spawn(async move {
                let mut rng = Rng(0x1234_5678 + c as u64);
                // Warm up: open this task's connection and prepare the statement.
                store
                    .fetch_key_packages(&[ids[rng.below(ids.len())]])
                    .await?;
                barrier.wait().await;
                let until = Instant::now() + run;
                let mut fetched = 0u64;
                while Instant::now() < until {
                    let got = store
                        .fetch_key_packages(&[ids[rng.below(ids.len())]])
                        .await?;
                    match got.first() {
                        Some(Some(kp)) if !kp.last_resort || !strict => fetched += 1,
                        _ => bail!("an identity's pool ran dry: raise QPQ_BENCH_PACKAGES"),
                    }
                }
                anyhow::Ok(fetched)
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

/// Transactions per second reported by pgbench.
fn run_pgbench(url: &str, script: &std::path::Path, run: Duration, prepared: bool) -> Result<f64> {
    let pgbench = quicproquo_testkit::postgres::pg_binary("pgbench")?;
    let secs = run.as_secs().max(1).to_string();
    let clients = CLIENTS.to_string();
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
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .with_context(|| format!("no tps in pgbench output: {stdout}"))
}

async fn bench() -> Result<()> {
    let settings = settings()?;
    let db = quicproquo_testkit::postgres::fresh_database().await?;
    migrate(db.url()).await?;
    let store = PgStore::connect(db.url(), CLIENTS).await?;
    let client = admin(db.url()).await?;
    client.batch_execute(SCHEMA).await?;

    let mut identities = Vec::with_capacity(IDENTITIES);
    for i in 0..IDENTITIES {
        let id = IdentityKeypair::generate()?.public();
        store.register_identity(&id).await?;
        let last_resort = KeyPackageRecord {
            hash_ref: format!("last-{i}").into_bytes(),
            data: vec![0u8; PACKAGE_BYTES],
            not_after: None,
        };
        store.add_key_packages(&id, &[], Some(&last_resort)).await?;
        identities.push(id);
    }
    let loading = Instant::now();
    load_source(&client, &identities, settings.packages_per_identity).await?;
    println!(
        "loaded {} identities x {} KeyPackages of {PACKAGE_BYTES} B in {:.1?}; {CLIENTS} clients, \
         {:?} per measurement",
        IDENTITIES,
        settings.packages_per_identity,
        loading.elapsed(),
        settings.run
    );
    let identities = Arc::new(identities);
    let script_dir = tempfile::tempdir()?;
    let script = script_dir.path().join("fetch.sql");
    std::fs::write(&script, PGBENCH_SCRIPT)?;

    let (mut store_rates, mut simple_rates, mut prepared_rates) = (vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        for step in 0..3 {
            // Alternate the order between rounds so neither side always runs on a warmer cache.
            let which = if round % 2 == 0 { step } else { 2 - step };
            client.batch_execute(REFILL).await?;
            // VACUUM cannot share a (multi-statement) transaction.
            client.batch_execute("VACUUM ANALYZE key_packages").await?;
            client.batch_execute("VACUUM ANALYZE bench_kp").await?;
            let url = db.url().to_owned();
            let (rate, table) = match which {
                0 => (
                    run_store(&store, &identities, settings.run, settings.strict).await?,
                    "key_packages",
                ),
                kind => {
                    let (script, run) = (script.clone(), settings.run);
                    let rate = tokio::task::spawn_blocking(move || {
                        run_pgbench(&url, &script, run, kind == 2)
                    })
                    .await??;
                    (rate, "bench_kp")
                }
            };
            ensure!(
                !settings.strict || fewest_left(&client, table).await? > 0,
                "an identity's pool ran dry during the {table} run: raise QPQ_BENCH_PACKAGES"
            );
            [&mut store_rates, &mut simple_rates, &mut prepared_rates][which].push(rate);
        }
    }

    let best = |rates: &[f64]| rates.iter().copied().fold(0.0, f64::max);
    let (ours, simple, prepared) = (
        best(&store_rates),
        best(&simple_rates),
        best(&prepared_rates),
    );
    println!(
        "\n{:<34} {:>12}   rounds",
        "KeyPackage fetch (1 per call)", "best/s"
    );
    for (name, rate, all) in [
        ("PgStore::fetch_key_packages", ours, &store_rates),
        ("pgbench -M simple (baseline)", simple, &simple_rates),
        ("pgbench -M prepared", prepared, &prepared_rates),
    ] {
        let rounds: Vec<String> = all.iter().map(|r| format!("{r:.0}")).collect();
        println!("{name:<34} {rate:>12.0}   {}", rounds.join(", "));
    }
    println!(
        "\nratio PgStore / pgbench simple:   {:.2}  (target >= 0.70)\nratio PgStore / pgbench prepared: {:.2}",
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
