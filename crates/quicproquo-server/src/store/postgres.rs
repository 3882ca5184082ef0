//! [`PgStore`]: the [`Store`] on PostgreSQL, for a cluster; [`migrate`] brings a database's
//! schema up to date.
//!
//! Connections come from a deadpool pool of tokio-postgres clients (TLS through rustls as the
//! URL's `sslmode` says, required by default off loopback: see `postgres_access`). Their sockets are driven by the store's
//! own I/O thread (`qpq-pg-io`, a one-worker tokio runtime that lives as long as the pool), so
//! the store serves callers on any runtime — the per-core workers, the appender thread, a test's
//! runtime — and none of them has to outlive it or keep polling for the others.
//!
//! The Authentication Service's operations: every statement is prepared once per connection
//! (`prepare_cached`) and every operation is one statement, so one round trip and one implicit
//! transaction:
//! - a fetch deletes the identity's oldest pooled KeyPackage that no one else has locked
//!   (`FOR UPDATE SKIP LOCKED`) and returns it; if there is none it returns the last-resort
//!   KeyPackage, which is kept. Only fetches lock KeyPackage rows, and a fetch deletes every
//!   row it locks, so a row skipped as locked is one being handed out: no KeyPackage is handed
//!   out twice and none is withheld while the pool still has one free;
//! - a batch fetch groups the targets by identity and locks as many rows per identity as it
//!   was asked for (`unnest(..) WITH ORDINALITY` + `LATERAL ... LIMIT n`), so a batch naming an
//!   identity twice gets two different KeyPackages.
//!
//! The Delivery Service's operations ([`LogStore`](super::log::LogStore)) are in
//! `postgres_log.rs`.
//!
//! Errors: a unique violation is [`StoreError::NameTaken`], a foreign-key violation
//! [`StoreError::UnknownIdentity`], anything else (connection, timeout, query)
//! [`StoreError::Unavailable`] with the database's message and SQLSTATE but never its detail
//! (which can quote stored values).

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use quicproquo_core::IdentityKey;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::postgres_io::IoThreadConnect;
use super::{FetchedKeyPackage, KeyPackageRecord, Store, StoreError};
use crate::model::UserName;

/// The migrations compiled into the server, in the order they apply: `(version, SQL)`.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_identities_and_key_packages",
        include_str!("../../../../sql/0001_identities_and_key_packages.sql"),
    ),
    (
        "0002_delivery",
        include_str!("../../../../sql/0002_delivery.sql"),
    ),
    (
        "0003_cluster",
        include_str!("../../../../sql/0003_cluster.sql"),
    ),
    (
        "0004_group_views",
        include_str!("../../../../sql/0004_group_views.sql"),
    ),
    (
        "0005_retention",
        include_str!("../../../../sql/0005_retention.sql"),
    ),
    (
        "0006_commit_reverts",
        include_str!("../../../../sql/0006_commit_reverts.sql"),
    ),
    (
        "0007_view_snapshots",
        include_str!("../../../../sql/0007_view_snapshots.sql"),
    ),
];

/// Advisory lock key that serialises migrators on one database (`qpq-migr` in ASCII).
const MIGRATION_LOCK: i64 = 0x7170_712d_6d69_6772;
/// Settings of every pooled session. Every statement the store runs is a keyed lookup, insert
/// or update, so a sequential scan is never the right plan at scale; but a prepared statement's
/// generic plan is cached per connection, and one cached while a table was small (a new
/// cluster's tables are empty) would keep scanning the whole table after it grew, until an
/// autoanalyze invalidates it. Discouraging sequential scans keeps every cached plan on its
/// index.
///
/// JIT compilation is off for the same sessions: it pays off only for long analytical
/// queries, and it is chosen by estimated cost, which `enable_seqscan=off` puts past every
/// threshold for any statement that must scan (a discouraged scan costs 10^10). The cluster
/// ring's poll reads two tables of a few rows by scanning them, so every poll, on every node,
/// every `ring_refresh` (1 s by default), was compiled with inlining and optimisation: 190 ms
/// of CPU for a query that runs in well under a millisecond, about a third of a core of the
/// database under a `dev-cluster` load test (`docs/benchmarks.md`).
const SESSION_OPTIONS: &str = "-c enable_seqscan=off -c jit=off";
/// Longest wait for a new connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a free connection from the pool.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies the migrations the database lacks, in order, and returns the versions it applied
/// (empty when the schema was current).
///
/// Everything happens in one transaction holding a transaction-scoped advisory lock, so several
/// replicas may run this at once: one applies, the others wait and then find nothing to do. A
/// failing migration rolls back the whole run.
pub async fn migrate(database_url: &str) -> Result<Vec<String>, StoreError> {
    migrate_with(database_url, &MigrateOptions::default()).await
}

/// What [`migrate_with`] does besides migrating.
#[derive(Debug, Clone, Copy, Default)]
pub struct MigrateOptions<'a> {
    /// Grant this role the data operations the nodes need and nothing more, in the same
    /// transaction (see `postgres_access`).
    pub runtime_role: Option<&'a str>,
    /// Trust the certificates in this PEM file for the database's TLS.
    pub ca_file: Option<&'a Path>,
}

/// Like [`migrate`], with `options`.
pub async fn migrate_with(
    database_url: &str,
    options: &MigrateOptions<'_>,
) -> Result<Vec<String>, StoreError> {
    let grants = options
        .runtime_role
        .map(super::postgres_access::runtime_grants)
        .transpose()?;
    let tls = super::postgres_access::tls_connector(options.ca_file)?;
    let mut config = parse_url(database_url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let (mut client, connection) = config.connect(tls).await.map_err(|e| {
        StoreError::Unavailable(format!("cannot connect to the database: {}", describe(&e)))
    })?;
    let driver = tokio::spawn(connection);
    let result = apply_migrations(&mut client, grants.as_deref()).await;
    drop(client);
    // The connection ends once the client is gone; its own error (if any) is already in
    // `result`.
    let _ = driver.await;
    result
}

async fn apply_migrations(
    client: &mut tokio_postgres::Client,
    grants: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    let tx = client.transaction().await.map_err(|e| pg_error(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| pg_error(&e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    TEXT PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(|e| pg_error(&e))?;
    let done = applied_versions(&tx).await?;
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        if done.contains(*version) {
            continue;
        }
        tx.batch_execute(sql).await.map_err(|e| {
            StoreError::Unavailable(format!("migration {version} failed: {}", describe(&e)))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(|e| pg_error(&e))?;
        applied.push((*version).to_owned());
    }
    if let Some(grants) = grants {
        tx.batch_execute(grants).await.map_err(|e| {
            StoreError::Unavailable(format!(
                "granting the runtime role failed: {}",
                describe(&e)
            ))
        })?;
    }
    tx.commit().await.map_err(|e| pg_error(&e))?;
    Ok(applied)
}

async fn applied_versions(
    client: &impl tokio_postgres::GenericClient,
) -> Result<HashSet<String>, StoreError> {
    client
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(|e| pg_error(&e))?
        .iter()
        .map(|row| column::<String>(row, 0))
        .collect()
}

/// The Postgres-backed [`Store`]. Cloning is cheap and shares the connection pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// How many coming append batches look for stored repeats of their message ids before
    /// inserting (see `postgres_log`): set after a batch repeated one, shared by all clones.
    pub(super) probing_batches: Arc<AtomicU32>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PgStore")
            .field("max_size", &status.max_size)
            .field("size", &status.size)
            .field("available", &status.available)
            .finish()
    }
}

impl PgStore {
    /// Opens a pool of up to `pool_size` connections (at least 1) to `database_url` (a libpq
    /// style URL or `key=value` string), and checks that the database is reachable and its
    /// schema current (see [`migrate`]).
    ///
    /// Connections are opened on demand and driven by the store's own I/O thread, so the store
    /// may be opened on a short-lived runtime and used from any other (it starts that thread
    /// itself, and stops it when the last clone is dropped). A connection the server closed is
    /// replaced when next taken from the pool.
    pub async fn connect(database_url: &str, pool_size: usize) -> Result<Self, StoreError> {
        Self::connect_with_ca(database_url, pool_size, None).await
    }

    /// Like [`PgStore::connect`], trusting the certificates in `ca_file` (PEM) for the
    /// database's TLS instead of the public web roots.
    pub async fn connect_with_ca(
        database_url: &str,
        pool_size: usize,
        ca_file: Option<&Path>,
    ) -> Result<Self, StoreError> {
        let store = Self::pool_only(database_url, pool_size, ca_file)?;
        let pending = store.pending().await?;
        if !pending.is_empty() {
            return Err(StoreError::Unavailable(format!(
                "the database schema is not current (missing {}): run `qpq-server migrate`",
                pending.join(", ")
            )));
        }
        Ok(store)
    }

    fn pool_only(
        database_url: &str,
        pool_size: usize,
        ca_file: Option<&Path>,
    ) -> Result<Self, StoreError> {
        let mut config = parse_url(database_url)?;
        let options = match config.get_options().map(str::trim) {
            Some(given) if !given.is_empty() => format!("{given} {SESSION_OPTIONS}"),
            _ => SESSION_OPTIONS.to_owned(),
        };
        config.options(options);
        let manager = Manager::from_connect(
            config,
            IoThreadConnect::start(super::postgres_access::tls_connector(ca_file)?)?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("building the connection pool: {e}")))?;
        Ok(Self {
            pool,
            probing_batches: Arc::default(),
        })
    }

    /// The migrations in [`MIGRATIONS`] the database has not applied.
    async fn pending(&self) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await
            .map_err(|e| pg_error(&e))?;
        let done = if column::<bool>(&row, 0)? {
            applied_versions(&**client).await?
        } else {
            HashSet::new()
        };
        Ok(MIGRATIONS
            .iter()
            .filter(|(v, _)| !done.contains(*v))
            .map(|(v, _)| (*v).to_owned())
            .collect())
    }

    /// One round trip to the database (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map(drop)
            .map_err(|e| pg_error(&e))
    }

    /// The pool's use now.
    pub fn pool_use(&self) -> super::PoolUse {
        let s = self.pool.status();
        super::PoolUse {
            max: s.max_size,
            size: s.size,
            available: s.available,
            waiting: s.waiting,
        }
    }

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Runs one prepared statement and returns its rows.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(|e| pg_error(&e))?;
        client
            .query(&statement, params)
            .await
            .map_err(|e| pg_error(&e))
    }

    /// Runs one prepared statement and returns how many rows it changed.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(|e| pg_error(&e))?;
        client
            .execute(&statement, params)
            .await
            .map_err(|e| pg_error(&e))
    }

    async fn fetch_one(
        &self,
        target: &IdentityKey,
    ) -> Result<Option<FetchedKeyPackage>, StoreError> {
        let rows = self.query(sql::FETCH_ONE, &[&key(target)]).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        Ok(Some(FetchedKeyPackage {
            identity: *target,
            data: column(row, 0)?,
            last_resort: column(row, 1)?,
        }))
    }

    async fn fetch_batch(
        &self,
        targets: &[IdentityKey],
    ) -> Result<Vec<Option<FetchedKeyPackage>>, StoreError> {
        let keys: Vec<&[u8]> = targets.iter().map(key).collect();
        let rows = self.query(sql::FETCH_BATCH, &[&keys]).await?;
        if rows.len() != targets.len() {
            return Err(StoreError::Corrupt(format!(
                "batch fetch returned {} rows for {} targets",
                rows.len(),
                targets.len()
            )));
        }
        targets
            .iter()
            .zip(&rows)
            .map(|(target, row)| {
                let pooled: Option<Vec<u8>> = column(row, 0)?;
                let last_resort: Option<Vec<u8>> = column(row, 1)?;
                Ok(match (pooled, last_resort) {
                    (Some(data), _) => Some(FetchedKeyPackage {
                        identity: *target,
                        data,
                        last_resort: false,
                    }),
                    (None, Some(data)) => Some(FetchedKeyPackage {
                        identity: *target,
                        data,
                        last_resort: true,
                    }),
                    (None, None) => None,
                })
            })
            .collect()
    }
}

impl Store for PgStore {
    async fn register_identity(&self, identity: &IdentityKey) -> Result<(), StoreError> {
        self.execute(sql::REGISTER, &[&key(identity)]).await?;
        Ok(())
    }

    async fn claim_name(&self, identity: &IdentityKey, name: &UserName) -> Result<(), StoreError> {
        let inserted = self
            .execute(sql::CLAIM, &[&name.as_str(), &key(identity)])
            .await?;
        if inserted == 1 {
            return Ok(());
        }
        // A conflict with a committed row: find out which (in the embedded store's order of
        // precedence: unknown identity, name taken, identity already named).
        let rows = self
            .query(sql::CLAIM_CONFLICT, &[&name.as_str(), &key(identity)])
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Corrupt("name conflict query returned no row".into()))?;
        let owner: Option<Vec<u8>> = column(row, 0)?;
        let current: Option<String> = column(row, 1)?;
        let registered: bool = column(row, 2)?;
        if !registered {
            Err(StoreError::UnknownIdentity)
        } else if owner.as_deref() == Some(identity.as_bytes().as_slice()) {
            Ok(())
        } else if owner.is_some() {
            Err(StoreError::NameTaken)
        } else if current.is_some() {
            Err(StoreError::AlreadyNamed)
        } else {
            Err(StoreError::Unavailable(
                "the conflicting name claim disappeared; retry".into(),
            ))
        }
    }

    async fn resolve_name(&self, name: &UserName) -> Result<Option<IdentityKey>, StoreError> {
        let rows = self.query(sql::RESOLVE, &[&name.as_str()]).await?;
        rows.first()
            .map(|row| {
                let bytes: Vec<u8> = column(row, 0)?;
                IdentityKey::from_slice(&bytes)
                    .map_err(|e| StoreError::Corrupt(format!("stored identity: {e}")))
            })
            .transpose()
    }

    async fn names_of(
        &self,
        identities: &[IdentityKey],
    ) -> Result<Vec<Option<UserName>>, StoreError> {
        let keys: Vec<&[u8]> = identities.iter().map(|i| i.as_bytes().as_slice()).collect();
        let rows = self.query(sql::NAMES_OF, &[&keys]).await?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let identity: Vec<u8> = column(row, 0)?;
            let name: String = column(row, 1)?;
            let name = UserName::parse(&name)
                .map_err(|_| StoreError::Corrupt("stored user name is invalid".into()))?;
            found.insert(identity, name);
        }
        Ok(identities
            .iter()
            .map(|i| found.get(i.as_bytes().as_slice()).cloned())
            .collect())
    }

    async fn add_key_packages(
        &self,
        identity: &IdentityKey,
        packages: &[KeyPackageRecord],
        last_resort: Option<&KeyPackageRecord>,
    ) -> Result<u32, StoreError> {
        let refs: Vec<&[u8]> = packages.iter().map(|p| p.hash_ref.as_slice()).collect();
        let data: Vec<&[u8]> = packages.iter().map(|p| p.data.as_slice()).collect();
        let ends: Vec<Option<i64>> = packages.iter().map(|p| unix_end(p.not_after)).collect();
        let lr_ref = last_resort.map(|p| p.hash_ref.as_slice());
        let lr_data = last_resort.map(|p| p.data.as_slice());
        let lr_end = last_resort.and_then(|p| unix_end(p.not_after));
        let rows = self
            .query(
                sql::ADD_KEY_PACKAGES,
                &[
                    &key(identity),
                    &refs,
                    &data,
                    &lr_ref,
                    &lr_data,
                    &ends,
                    &lr_end,
                ],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Corrupt("upload query returned no row".into()))?;
        if !column::<bool>(row, 0)? {
            return Err(StoreError::UnknownIdentity);
        }
        Ok(count(column(row, 1)?))
    }

    async fn fetch_key_packages(
        &self,
        targets: &[IdentityKey],
    ) -> Result<Vec<Option<FetchedKeyPackage>>, StoreError> {
        match targets {
            [] => Ok(Vec::new()),
            [one] => Ok(vec![self.fetch_one(one).await?]),
            many => self.fetch_batch(many).await,
        }
    }

    async fn key_package_count(&self, identity: &IdentityKey) -> Result<u32, StoreError> {
        let rows = self.query(sql::COUNT, &[&key(identity)]).await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Corrupt("count query returned no row".into()))?;
        Ok(count(column(row, 0)?))
    }
}

/// The statements, each one round trip.
mod sql {
    pub(super) const REGISTER: &str =
        "INSERT INTO identities (identity) VALUES ($1) ON CONFLICT (identity) DO NOTHING";

    /// Inserts unless the name or the identity already has a row (then changes nothing); an
    /// unregistered identity fails the foreign key.
    pub(super) const CLAIM: &str =
        "INSERT INTO user_names (name, identity) VALUES ($1, $2) ON CONFLICT DO NOTHING";

    pub(super) const CLAIM_CONFLICT: &str = "SELECT
            (SELECT identity FROM user_names WHERE name = $1),
            (SELECT name FROM user_names WHERE identity = $2),
            EXISTS (SELECT 1 FROM identities WHERE identity = $2)";

    pub(super) const RESOLVE: &str = "SELECT identity FROM user_names WHERE name = $1";

    pub(super) const NAMES_OF: &str =
        "SELECT identity, name FROM user_names WHERE identity = ANY($1::bytea[])";

    /// Adds the pool (in upload order, skipping stored hash refs) and replaces the last-resort
    /// KeyPackage, only if the identity is registered; returns whether it is and the pool size.
    pub(super) const ADD_KEY_PACKAGES: &str = "
        WITH owner AS (
            SELECT identity FROM identities WHERE identity = $1
        ),
        pooled AS (
            INSERT INTO key_packages (identity, hash_ref, data, not_after)
            SELECT owner.identity, p.hash_ref, p.data, p.not_after
            FROM owner, unnest($2::bytea[], $3::bytea[], $6::bigint[])
                WITH ORDINALITY AS p (hash_ref, data, not_after, ord)
            ORDER BY p.ord
            ON CONFLICT (hash_ref) DO NOTHING
            RETURNING not_after
        ),
        last_resort AS (
            INSERT INTO last_resort_key_packages (identity, hash_ref, data, not_after)
            SELECT owner.identity, $4::bytea, $5::bytea, $7::bigint FROM owner
            WHERE $4::bytea IS NOT NULL
            ON CONFLICT (identity) DO UPDATE
                SET hash_ref = EXCLUDED.hash_ref, data = EXCLUDED.data,
                    not_after = EXCLUDED.not_after, updated_at = now()
            RETURNING 1
        )
        SELECT EXISTS (SELECT 1 FROM owner),
               (SELECT count(*) FROM key_packages
                WHERE identity = $1
                  AND (not_after IS NULL OR not_after > extract(epoch FROM now())::bigint))
                 + (SELECT count(*) FROM pooled
                    WHERE not_after IS NULL
                       OR not_after > extract(epoch FROM now())::bigint)";

    /// Consumes the oldest unlocked unexpired pooled KeyPackage of `$1`, or reads its
    /// unexpired last-resort one.
    pub(super) const FETCH_ONE: &str = "
        WITH taken AS (
            DELETE FROM key_packages
            WHERE id = (
                SELECT id FROM key_packages
                WHERE identity = $1
                  AND (not_after IS NULL OR not_after > extract(epoch FROM now())::bigint)
                ORDER BY id
                LIMIT 1
                FOR UPDATE SKIP LOCKED
            )
            RETURNING data
        )
        SELECT data, false FROM taken
        UNION ALL
        SELECT data, true FROM last_resort_key_packages
        WHERE identity = $1 AND NOT EXISTS (SELECT 1 FROM taken)
          AND (not_after IS NULL OR not_after > extract(epoch FROM now())::bigint)";

    /// One row per target, in order: `(pooled data, last-resort data)`, at most one non-null.
    /// The n-th request for an identity in the batch gets the n-th KeyPackage locked for it.
    pub(super) const FETCH_BATCH: &str = "
        WITH wanted AS MATERIALIZED (
            SELECT t.target, t.ord,
                   row_number() OVER (PARTITION BY t.target ORDER BY t.ord) AS nth
            FROM unnest($1::bytea[]) WITH ORDINALITY AS t (target, ord)
        ),
        picked AS MATERIALIZED (
            SELECT p.id, p.identity,
                   row_number() OVER (PARTITION BY p.identity ORDER BY p.id) AS nth
            FROM (SELECT target, count(*) AS n FROM wanted GROUP BY target) AS w
            CROSS JOIN LATERAL (
                SELECT k.id, k.identity FROM key_packages AS k
                WHERE k.identity = w.target
                  AND (k.not_after IS NULL OR k.not_after > extract(epoch FROM now())::bigint)
                ORDER BY k.id
                LIMIT w.n
                FOR UPDATE SKIP LOCKED
            ) AS p
        ),
        taken AS (
            DELETE FROM key_packages AS k
            USING picked
            WHERE k.id = picked.id
            RETURNING k.id, k.data
        )
        SELECT tk.data, lr.data
        FROM wanted AS w
        LEFT JOIN picked AS p ON p.identity = w.target AND p.nth = w.nth
        LEFT JOIN taken AS tk ON tk.id = p.id
        LEFT JOIN last_resort_key_packages AS lr ON lr.identity = w.target AND tk.id IS NULL
            AND (lr.not_after IS NULL OR lr.not_after > extract(epoch FROM now())::bigint)
        ORDER BY w.ord";

    pub(super) const COUNT: &str = "
        SELECT count(*) FROM key_packages
        WHERE identity = $1
          AND (not_after IS NULL OR not_after > extract(epoch FROM now())::bigint)";
}

fn parse_url(database_url: &str) -> Result<tokio_postgres::Config, StoreError> {
    // The parser's message can quote the URL, which may hold a password: keep it out.
    super::postgres_access::connection_config(database_url)
}

/// A lifetime's end as a `BIGINT` (Unix seconds; ends past `i64::MAX` are stored as that).
fn unix_end(not_after: Option<u64>) -> Option<i64> {
    not_after.map(|t| i64::try_from(t).unwrap_or(i64::MAX))
}

/// An identity as a `BYTEA` parameter.
fn key(identity: &IdentityKey) -> &[u8] {
    identity.as_bytes()
}

/// A column of a result row, as `T`.
pub(super) fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    index: usize,
) -> Result<T, StoreError> {
    row.try_get(index)
        .map_err(|e| StoreError::Corrupt(format!("column {index}: {e}")))
}

/// A `count(*)` as `u32` (saturating; negative counts cannot happen).
fn count(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// Maps a database error to a [`StoreError`].
pub(super) fn pg_error(e: &tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => StoreError::NameTaken,
        Some(code) if *code == SqlState::FOREIGN_KEY_VIOLATION => StoreError::UnknownIdentity,
        _ => StoreError::Unavailable(describe(e)),
    }
}

pub(super) fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => {
            StoreError::Unavailable(format!("cannot connect to the database: {}", describe(&e)))
        }
        other => StoreError::Unavailable(format!("database connection pool: {other}")),
    }
}

/// A description of a database error without values from the data: the server's message and
/// SQLSTATE (not its DETAIL, which can quote key values), or the client-side error chain.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
