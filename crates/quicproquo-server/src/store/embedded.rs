//! The embedded store: one redb file (default `qpq.db` in the data directory) for a standalone
//! node without Postgres.
//!
//! redb gives ACID transactions with a crash-safe commit (a commit is durable once it returns;
//! a crash never leaves a half-applied transaction), and one writer at a time, which makes
//! "consume a KeyPackage" atomic without further locking. Calls run on tokio's blocking pool.

use std::path::Path;
use std::sync::Arc;

use quicproquo_core::IdentityKey;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{FetchedKeyPackage, KeyPackageRecord, Store, StoreError};
use crate::model::UserName;

/// Default file name in the data directory.
pub const DEFAULT_FILE: &str = "qpq.db";

/// identity → registration time (Unix seconds).
const IDENTITIES: TableDefinition<&[u8], u64> = TableDefinition::new("identities");
/// name → identity.
const NAMES: TableDefinition<&str, &[u8]> = TableDefinition::new("names");
/// identity → name.
const NAME_OF: TableDefinition<&[u8], &str> = TableDefinition::new("name_of");
/// (identity, sequence) → (hash_ref, KeyPackage); the sequence orders an identity's pool
/// oldest first.
pub(super) const KEY_PACKAGES: TableDefinition<PoolKey, PoolValue> =
    TableDefinition::new("key_packages");
/// (identity, sequence).
pub(super) type PoolKey = (&'static [u8], u64);
/// (hash_ref, KeyPackage).
pub(super) type PoolValue = (&'static [u8], &'static [u8]);
/// hash_ref → (identity, sequence) of a pooled KeyPackage.
pub(super) const KEY_PACKAGE_REFS: TableDefinition<&[u8], (&[u8], u64)> =
    TableDefinition::new("key_package_refs");
/// identity → last-resort KeyPackage.
pub(super) const LAST_RESORT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("last_resort");
/// (identity, sequence) → the pooled KeyPackage's not_after (Unix seconds), when it has one.
pub(super) const KEY_PACKAGE_ENDS: TableDefinition<PoolKey, u64> =
    TableDefinition::new("key_package_ends");
/// (not_after, identity, sequence) → (): pooled KeyPackages by expiry, for the retention job.
pub(super) const KEY_PACKAGE_EXPIRY: TableDefinition<(u64, &[u8], u64), ()> =
    TableDefinition::new("key_package_expiry");
/// identity → its last-resort KeyPackage's not_after (Unix seconds), when it has one.
pub(super) const LAST_RESORT_ENDS: TableDefinition<&[u8], u64> =
    TableDefinition::new("last_resort_ends");
/// counters: "kp_seq" → next KeyPackage sequence number.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

pub(super) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The embedded store. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store file at `path` and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(unavailable)?;
        let txn = db.begin_write().map_err(unavailable)?;
        {
            txn.open_table(IDENTITIES).map_err(unavailable)?;
            txn.open_table(NAMES).map_err(unavailable)?;
            txn.open_table(NAME_OF).map_err(unavailable)?;
            txn.open_table(KEY_PACKAGES).map_err(unavailable)?;
            txn.open_table(KEY_PACKAGE_REFS).map_err(unavailable)?;
            txn.open_table(LAST_RESORT).map_err(unavailable)?;
            txn.open_table(KEY_PACKAGE_ENDS).map_err(unavailable)?;
            txn.open_table(KEY_PACKAGE_EXPIRY).map_err(unavailable)?;
            txn.open_table(LAST_RESORT_ENDS).map_err(unavailable)?;
            txn.open_table(COUNTERS).map_err(unavailable)?;
            super::embedded_log::create_tables(&txn)?;
        }
        txn.commit().map_err(unavailable)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs `f` on the blocking pool with the database.
    /// The database (the store's own tests read its tables).
    #[cfg(test)]
    pub(super) fn database(&self) -> &Database {
        &self.db
    }

    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }
}

/// Now, in Unix microseconds.
pub(crate) fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How many of `identity`'s pooled KeyPackages are unexpired at `now` (Unix seconds).
fn pool_size(
    table: &impl ReadableTable<PoolKey, PoolValue>,
    ends: &impl ReadableTable<PoolKey, u64>,
    identity: &[u8],
    now: u64,
) -> Result<u32, StoreError> {
    let mut n = 0u32;
    for row in table
        .range((identity, 0u64)..=(identity, u64::MAX))
        .map_err(unavailable)?
    {
        let (k, _) = row.map_err(unavailable)?;
        let end = ends.get((identity, k.value().1)).map_err(unavailable)?;
        if end.is_none_or(|e| e.value() > now) {
            n = n.saturating_add(1);
        }
    }
    Ok(n)
}

/// Removes one pooled KeyPackage and its index rows.
pub(super) fn remove_pooled(
    txn: &redb::WriteTransaction,
    identity: &[u8],
    seq: u64,
) -> Result<(), StoreError> {
    let mut kps = txn.open_table(KEY_PACKAGES).map_err(unavailable)?;
    let mut refs = txn.open_table(KEY_PACKAGE_REFS).map_err(unavailable)?;
    let mut ends = txn.open_table(KEY_PACKAGE_ENDS).map_err(unavailable)?;
    let mut expiry = txn.open_table(KEY_PACKAGE_EXPIRY).map_err(unavailable)?;
    let hash_ref = kps
        .remove((identity, seq))
        .map_err(unavailable)?
        .map(|v| v.value().0.to_vec());
    if let Some(hash_ref) = hash_ref {
        refs.remove(hash_ref.as_slice()).map_err(unavailable)?;
    }
    if let Some(end) = ends.remove((identity, seq)).map_err(unavailable)? {
        expiry
            .remove((end.value(), identity, seq))
            .map_err(unavailable)?;
    }
    Ok(())
}

impl Store for EmbeddedStore {
    async fn register_identity(&self, identity: &IdentityKey) -> Result<(), StoreError> {
        let id = *identity.as_bytes();
        self.run(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut t = txn.open_table(IDENTITIES).map_err(unavailable)?;
                if t.get(id.as_slice()).map_err(unavailable)?.is_none() {
                    t.insert(id.as_slice(), now_secs()).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn claim_name(&self, identity: &IdentityKey, name: &UserName) -> Result<(), StoreError> {
        let id = *identity.as_bytes();
        let name = name.as_str().to_owned();
        self.run(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let ids = txn.open_table(IDENTITIES).map_err(unavailable)?;
                if ids.get(id.as_slice()).map_err(unavailable)?.is_none() {
                    return Err(StoreError::UnknownIdentity);
                }
                let mut names = txn.open_table(NAMES).map_err(unavailable)?;
                let mut name_of = txn.open_table(NAME_OF).map_err(unavailable)?;
                if let Some(owner) = names.get(name.as_str()).map_err(unavailable)? {
                    return if owner.value() == id.as_slice() {
                        Ok(())
                    } else {
                        Err(StoreError::NameTaken)
                    };
                }
                if name_of.get(id.as_slice()).map_err(unavailable)?.is_some() {
                    return Err(StoreError::AlreadyNamed);
                }
                names
                    .insert(name.as_str(), id.as_slice())
                    .map_err(unavailable)?;
                name_of
                    .insert(id.as_slice(), name.as_str())
                    .map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn resolve_name(&self, name: &UserName) -> Result<Option<IdentityKey>, StoreError> {
        let name = name.as_str().to_owned();
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let names = txn.open_table(NAMES).map_err(unavailable)?;
            let Some(id) = names.get(name.as_str()).map_err(unavailable)? else {
                return Ok(None);
            };
            IdentityKey::from_slice(id.value())
                .map(Some)
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .await
    }

    async fn names_of(
        &self,
        identities: &[IdentityKey],
    ) -> Result<Vec<Option<UserName>>, StoreError> {
        let ids: Vec<[u8; 32]> = identities.iter().map(|i| *i.as_bytes()).collect();
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let name_of = txn.open_table(NAME_OF).map_err(unavailable)?;
            ids.iter()
                .map(|id| {
                    let Some(name) = name_of.get(id.as_slice()).map_err(unavailable)? else {
                        return Ok(None);
                    };
                    UserName::parse(name.value())
                        .map(Some)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))
                })
                .collect()
        })
        .await
    }

    async fn add_key_packages(
        &self,
        identity: &IdentityKey,
        packages: &[KeyPackageRecord],
        last_resort: Option<&KeyPackageRecord>,
    ) -> Result<u32, StoreError> {
        let id = *identity.as_bytes();
        let packages = packages.to_vec();
        let last_resort = last_resort.cloned();
        self.run(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let size = {
                let ids = txn.open_table(IDENTITIES).map_err(unavailable)?;
                if ids.get(id.as_slice()).map_err(unavailable)?.is_none() {
                    return Err(StoreError::UnknownIdentity);
                }
                let mut kps = txn.open_table(KEY_PACKAGES).map_err(unavailable)?;
                let mut refs = txn.open_table(KEY_PACKAGE_REFS).map_err(unavailable)?;
                let mut ends = txn.open_table(KEY_PACKAGE_ENDS).map_err(unavailable)?;
                let mut expiry = txn.open_table(KEY_PACKAGE_EXPIRY).map_err(unavailable)?;
                let mut counters = txn.open_table(COUNTERS).map_err(unavailable)?;
                let mut seq = counters
                    .get("kp_seq")
                    .map_err(unavailable)?
                    .map_or(0, |v| v.value());
                for kp in &packages {
                    if refs
                        .get(kp.hash_ref.as_slice())
                        .map_err(unavailable)?
                        .is_some()
                    {
                        continue;
                    }
                    seq += 1;
                    kps.insert(
                        (id.as_slice(), seq),
                        (kp.hash_ref.as_slice(), kp.data.as_slice()),
                    )
                    .map_err(unavailable)?;
                    refs.insert(kp.hash_ref.as_slice(), (id.as_slice(), seq))
                        .map_err(unavailable)?;
                    if let Some(end) = kp.not_after {
                        ends.insert((id.as_slice(), seq), end)
                            .map_err(unavailable)?;
                        expiry
                            .insert((end, id.as_slice(), seq), ())
                            .map_err(unavailable)?;
                    }
                }
                counters.insert("kp_seq", seq).map_err(unavailable)?;
                if let Some(lr) = &last_resort {
                    let mut t = txn.open_table(LAST_RESORT).map_err(unavailable)?;
                    t.insert(id.as_slice(), lr.data.as_slice())
                        .map_err(unavailable)?;
                    let mut lr_ends = txn.open_table(LAST_RESORT_ENDS).map_err(unavailable)?;
                    match lr.not_after {
                        Some(end) => lr_ends.insert(id.as_slice(), end).map(drop),
                        None => lr_ends.remove(id.as_slice()).map(drop),
                    }
                    .map_err(unavailable)?;
                }
                pool_size(&kps, &ends, &id, now_secs())?
            };
            txn.commit().map_err(unavailable)?;
            Ok(size)
        })
        .await
    }

    async fn fetch_key_packages(
        &self,
        targets: &[IdentityKey],
    ) -> Result<Vec<Option<FetchedKeyPackage>>, StoreError> {
        let targets = targets.to_vec();
        self.run(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let now = now_secs();
            let mut out = Vec::with_capacity(targets.len());
            for target in &targets {
                out.push(take_one(&txn, target, now)?);
            }
            txn.commit().map_err(unavailable)?;
            Ok(out)
        })
        .await
    }

    async fn key_package_count(&self, identity: &IdentityKey) -> Result<u32, StoreError> {
        let id = *identity.as_bytes();
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let kps = txn.open_table(KEY_PACKAGES).map_err(unavailable)?;
            let ends = txn.open_table(KEY_PACKAGE_ENDS).map_err(unavailable)?;
            pool_size(&kps, &ends, &id, now_secs())
        })
        .await
    }
}

/// Takes `target`'s oldest unexpired pooled KeyPackage (deleting expired ones it passes), or
/// reads its unexpired last-resort one.
fn take_one(
    txn: &redb::WriteTransaction,
    target: &IdentityKey,
    now: u64,
) -> Result<Option<FetchedKeyPackage>, StoreError> {
    let id = target.as_bytes().as_slice();
    loop {
        let oldest = {
            let kps = txn.open_table(KEY_PACKAGES).map_err(unavailable)?;
            let ends = txn.open_table(KEY_PACKAGE_ENDS).map_err(unavailable)?;
            let first = kps
                .range((id, 0u64)..=(id, u64::MAX))
                .map_err(unavailable)?
                .next()
                .transpose()
                .map_err(unavailable)?
                .map(|(k, v)| (k.value().1, v.value().1.to_vec()));
            match first {
                Some((seq, data)) => {
                    let end = ends.get((id, seq)).map_err(unavailable)?.map(|e| e.value());
                    Some((seq, data, end.is_none_or(|e| e > now)))
                }
                None => None,
            }
        };
        match oldest {
            Some((seq, data, fresh)) => {
                remove_pooled(txn, id, seq)?;
                if fresh {
                    return Ok(Some(FetchedKeyPackage {
                        identity: *target,
                        data,
                        last_resort: false,
                    }));
                }
            }
            None => break,
        }
    }
    let last = txn.open_table(LAST_RESORT).map_err(unavailable)?;
    let lr_ends = txn.open_table(LAST_RESORT_ENDS).map_err(unavailable)?;
    let Some(lr) = last.get(id).map_err(unavailable)? else {
        return Ok(None);
    };
    let end = lr_ends.get(id).map_err(unavailable)?.map(|e| e.value());
    if end.is_some_and(|e| e <= now) {
        return Ok(None);
    }
    Ok(Some(FetchedKeyPackage {
        identity: *target,
        data: lr.value().to_vec(),
        last_resort: true,
    }))
}
