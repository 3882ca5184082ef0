//! Shard leases and the ring version in PostgreSQL (`sql/0003_cluster.sql`).
//!
//! A shard calls [`PgStore::renew_lease`] every third of its lease; edges (and
//! `qpq-server ring`) call [`PgStore::ring`], which first drops expired leases. Any change to
//! the set of shards bumps the ring version in the same transaction, so a version names
//! exactly one set. Expiry is judged by the database clock.

use std::time::Duration;

use super::StoreError;
use super::postgres::{PgStore, column, pg_error};

/// One live shard as recorded in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRecord {
    /// The shard's stable identity: its place on the ring.
    pub node_id: String,
    /// Where edges reach it (`host:port`).
    pub address: String,
    /// Its Noise static public key: an edge checks it reaches the node it means.
    pub noise_key: [u8; 32],
    /// Milliseconds until its lease expires, by the database clock.
    pub expires_in_ms: i64,
}

/// The live shards and the version naming that set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RingSnapshot {
    /// Bumped by every change to the set of shards.
    pub version: u64,
    /// The live shards, ordered by node id.
    pub shards: Vec<ShardRecord>,
}

/// What a shard registers about itself.
#[derive(Debug, Clone)]
pub struct LeaseClaim {
    /// See [`ShardRecord::node_id`].
    pub node_id: String,
    /// See [`ShardRecord::address`].
    pub address: String,
    /// See [`ShardRecord::noise_key`].
    pub noise_key: [u8; 32],
    /// How long the lease lasts after each renewal.
    pub ttl: Duration,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl PgStore {
    /// Registers or renews `claim`'s lease. Returns `true` when this changed the ring (the
    /// shard joined, came back after expiring, or moved to another address or key).
    pub async fn renew_lease(&self, claim: &LeaseClaim) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| pg_error(&e))?;
        let current = tx
            .query_opt(
                "SELECT address, noise_key, lease_until > now() FROM shard_leases
                 WHERE node_id = $1 FOR UPDATE",
                &[&claim.node_id],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        let unchanged = match &current {
            Some(row) => {
                let address: String = column(row, 0)?;
                let key: Vec<u8> = column(row, 1)?;
                let live: bool = column(row, 2)?;
                live && address == claim.address && key == claim.noise_key
            }
            None => false,
        };
        let ttl = millis(claim.ttl);
        if unchanged {
            tx.execute(
                "UPDATE shard_leases SET lease_until = now() + $2::bigint * interval '1 millisecond'
                 WHERE node_id = $1",
                &[&claim.node_id, &ttl],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        } else {
            tx.execute(
                "INSERT INTO shard_leases (node_id, address, noise_key, lease_until)
                 VALUES ($1, $2, $3, now() + $4::bigint * interval '1 millisecond')
                 ON CONFLICT (node_id) DO UPDATE SET address = EXCLUDED.address,
                     noise_key = EXCLUDED.noise_key, lease_until = EXCLUDED.lease_until,
                     joined_at = now()",
                &[&claim.node_id, &claim.address, &&claim.noise_key[..], &ttl],
            )
            .await
            .map_err(|e| pg_error(&e))?;
            tx.execute("UPDATE ring_version SET version = version + 1", &[])
                .await
                .map_err(|e| pg_error(&e))?;
        }
        tx.commit().await.map_err(|e| pg_error(&e))?;
        Ok(!unchanged)
    }

    /// Gives up `node_id`'s lease (a shard shutting down), so edges move its groups at once
    /// instead of waiting for the lease to expire.
    pub async fn drop_lease(&self, node_id: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "WITH gone AS (DELETE FROM shard_leases WHERE node_id = $1 RETURNING 1)
                 UPDATE ring_version SET version = version + 1 WHERE EXISTS (SELECT 1 FROM gone)",
                &[&node_id],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        Ok(())
    }

    /// Drops expired leases (bumping the version if any), then reads the version and the
    /// live shards in one snapshot.
    pub async fn ring(&self) -> Result<RingSnapshot, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "WITH gone AS (DELETE FROM shard_leases WHERE lease_until <= now() RETURNING 1)
                 UPDATE ring_version SET version = version + 1 WHERE EXISTS (SELECT 1 FROM gone)",
                &[],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        let rows = client
            .query(
                "SELECT v.version, l.node_id, l.address, l.noise_key,
                        (extract(epoch FROM l.lease_until - now()) * 1000)::bigint
                 FROM ring_version v LEFT JOIN shard_leases l ON l.lease_until > now()
                 ORDER BY l.node_id",
                &[],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        let mut snapshot = RingSnapshot::default();
        for row in &rows {
            let version: i64 = column(row, 0)?;
            snapshot.version = u64::try_from(version).unwrap_or(0);
            let Some(node_id) = column::<Option<String>>(row, 1)? else {
                continue;
            };
            let key: Vec<u8> = column(row, 3)?;
            let noise_key: [u8; 32] = key
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("shard noise key is not 32 bytes".into()))?;
            snapshot.shards.push(ShardRecord {
                node_id,
                address: column(row, 2)?,
                noise_key,
                expires_in_ms: column(row, 4)?,
            });
        }
        Ok(snapshot)
    }
}
