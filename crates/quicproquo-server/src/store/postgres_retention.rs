//! Retention in PostgreSQL (see [`super::retention`] for the rules).
//!
//! Each operation is one statement (one implicit transaction) deleting at most one batch. A
//! group's pruned seq is raised by the statement that deletes up to it, so a reader sees
//! either the entries or `history_gone`, never a log with a hole at its start.

use super::StoreError;
use super::postgres::{PgStore, column};
use super::postgres_log::{db_error, stored_u64};
use super::retention::{CandidatePage, RetentionPolicy, RetentionStore, StoredBytes};
use crate::model::group::GroupId;

/// Seconds in `d`, as a `float8` parameter of `make_interval`.
fn seconds(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// A batch size as a `LIMIT` parameter.
fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PgStore {
    /// Runs one statement of this module (prepared and cached per connection).
    async fn retention_query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(|e| db_error(&e))?;
        client
            .query(&statement, params)
            .await
            .map_err(|e| db_error(&e))
    }

    /// The single count a statement of this module returns.
    async fn retention_count(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<usize, StoreError> {
        let rows = self.retention_query(sql, params).await?;
        let n: i64 = match rows.first() {
            Some(row) => column(row, 0)?,
            None => 0,
        };
        usize::try_from(stored_u64(n, "count")?)
            .map_err(|_| StoreError::Corrupt("count out of range".into()))
    }
}

impl RetentionStore for PgStore {
    async fn retention_candidates(
        &self,
        after: Option<&GroupId>,
        limit_groups: usize,
        policy: &RetentionPolicy,
    ) -> Result<CandidatePage, StoreError> {
        let after: &[u8] = after.map_or(&[], GroupId::as_bytes);
        let rows = self
            .retention_query(
                sql::CANDIDATES,
                &[
                    &after,
                    &limit(limit_groups),
                    &seconds(policy.first_cutoff()),
                ],
            )
            .await?;
        let mut page = CandidatePage::default();
        for row in &rows {
            let id = GroupId::new(&column::<Vec<u8>>(row, 0)?)?;
            if column::<bool>(row, 1)? {
                page.groups.push(id.clone());
            }
            page.next = Some(id);
        }
        if rows.len() < limit_groups {
            page.next = None;
        }
        Ok(page)
    }

    async fn prune_group_log(
        &self,
        group: &GroupId,
        policy: &RetentionPolicy,
    ) -> Result<usize, StoreError> {
        self.retention_count(
            sql::PRUNE_LOG,
            &[
                &group.as_bytes(),
                &seconds(policy.log_retention),
                &seconds(policy.log_max_age),
                &limit(policy.batch),
            ],
        )
        .await
    }

    async fn prune_welcomes(&self, policy: &RetentionPolicy) -> Result<usize, StoreError> {
        self.retention_count(
            sql::PRUNE_WELCOMES,
            &[&seconds(policy.log_max_age), &limit(policy.batch)],
        )
        .await
    }

    async fn prune_key_packages(&self, batch: usize) -> Result<usize, StoreError> {
        self.retention_count(sql::PRUNE_KEY_PACKAGES, &[&limit(batch)])
            .await
    }

    async fn stored_bytes(&self) -> Result<StoredBytes, StoreError> {
        let rows = self.retention_query(sql::STORED_BYTES, &[]).await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Corrupt("size query returned no row".into()))?;
        Ok(StoredBytes {
            group_log: stored_u64(column(row, 0)?, "size")?,
            welcomes: stored_u64(column(row, 1)?, "size")?,
            key_packages: stored_u64(column(row, 2)?, "size")?,
            group_views: stored_u64(column(row, 3)?, "size")?,
        })
    }

    async fn pruned_seq(&self, group: &GroupId) -> Result<u64, StoreError> {
        let rows = self
            .retention_query(sql::PRUNED_SEQ, &[&group.as_bytes()])
            .await?;
        rows.first()
            .map_or(Ok(0), |row| stored_u64(column(row, 0)?, "pruned seq"))
    }
}

/// The statements.
mod sql {
    /// Groups after `$1` in id order, at most `$2`, each with whether its oldest kept entry
    /// is older than `$3` seconds.
    pub(super) const CANDIDATES: &str = "
        SELECT g.group_id, EXISTS (
            SELECT 1 FROM group_log AS l
            WHERE l.group_id = g.group_id AND l.seq = g.pruned_seq + 1
              AND l.appended_at < now() - make_interval(secs => $3::float8))
        FROM groups AS g
        WHERE g.group_id > $1
        ORDER BY g.group_id
        LIMIT $2";

    /// One batch of group `$1`'s log: from the oldest kept entry on, while each entry is
    /// acknowledged by every current member and older than `$2` seconds, or older than `$3`
    /// seconds; at most `$4`. Raises the pruned seq to the last of them and deletes them;
    /// returns how many.
    pub(super) const PRUNE_LOG: &str = "
        WITH g AS (
            SELECT last_seq, pruned_seq FROM groups WHERE group_id = $1
        ),
        acked AS (
            SELECT coalesce(
                (SELECT min(greatest(least(coalesce(c.seq, 0), g.last_seq), m.joined_seq))
                 FROM members AS m
                 LEFT JOIN cursors AS c ON c.identity = m.identity AND c.group_id = m.group_id
                 WHERE m.group_id = $1 AND m.left_seq IS NULL),
                g.last_seq) AS seq
            FROM g
        ),
        batch AS (
            SELECT l.seq,
                   (l.seq <= acked.seq
                        AND l.appended_at < now() - make_interval(secs => $2::float8))
                   OR l.appended_at < now() - make_interval(secs => $3::float8) AS gone
            FROM g, acked, group_log AS l
            WHERE l.group_id = $1 AND l.seq > g.pruned_seq
            ORDER BY l.seq
            LIMIT $4
        ),
        top AS (
            SELECT coalesce((SELECT min(seq) - 1 FROM batch WHERE NOT gone),
                            (SELECT max(seq) FROM batch)) AS seq
        ),
        raised AS (
            UPDATE groups AS r SET pruned_seq = top.seq
            FROM top, g
            WHERE r.group_id = $1 AND top.seq > g.pruned_seq
            RETURNING 1
        ),
        -- A group view's messages are copied out of the log first (ADR 0018); this reads
        -- the log as it was before the statement, like the deletion.
        kept AS (
            UPDATE view_tail AS t SET payload = l.payload
            FROM group_log AS l, top, g
            WHERE t.group_id = $1 AND t.payload IS NULL AND t.seq > g.pruned_seq
              AND t.seq <= top.seq AND l.group_id = t.group_id AND l.seq = t.seq
            RETURNING 1
        ),
        deleted AS (
            DELETE FROM group_log AS l
            USING top, g
            WHERE l.group_id = $1 AND l.seq > g.pruned_seq AND l.seq <= top.seq
            RETURNING 1
        )
        SELECT count(*) FROM deleted";

    /// One batch (at most `$2`) of inbox entries whose Welcome is consumed (the recipient
    /// acknowledged the group at or past the commit, or is no longer the member it added) or
    /// older than `$1` seconds, and the Welcomes no other inbox entry uses; returns how many
    /// rows went.
    pub(super) const PRUNE_WELCOMES: &str = "
        WITH doomed AS MATERIALIZED (
            SELECT i.identity, i.seq, i.welcome_id
            FROM inbox AS i
            JOIN welcomes AS w ON w.id = i.welcome_id
            WHERE w.created_at < now() - make_interval(secs => $1::float8)
               OR NOT EXISTS (
                    SELECT 1 FROM members AS m
                    WHERE m.group_id = i.group_id AND m.identity = i.identity
                      AND m.joined_seq = i.commit_seq AND m.left_seq IS NULL)
               OR EXISTS (
                    SELECT 1 FROM cursors AS c
                    WHERE c.identity = i.identity AND c.group_id = i.group_id
                      AND c.seq >= i.commit_seq)
            LIMIT $2
        ),
        gone AS (
            DELETE FROM inbox AS i
            USING doomed AS d
            WHERE i.identity = d.identity AND i.seq = d.seq
            RETURNING 1
        ),
        orphans AS (
            DELETE FROM welcomes AS w
            WHERE w.id IN (SELECT welcome_id FROM doomed)
              AND NOT EXISTS (
                    SELECT 1 FROM inbox AS i
                    WHERE i.welcome_id = w.id
                      AND NOT EXISTS (
                            SELECT 1 FROM doomed AS d
                            WHERE d.identity = i.identity AND d.seq = i.seq))
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM orphans)";

    /// One batch (at most `$1` of each) of expired pooled and last-resort KeyPackages.
    pub(super) const PRUNE_KEY_PACKAGES: &str = "
        WITH pooled AS (
            DELETE FROM key_packages
            WHERE id IN (
                SELECT id FROM key_packages
                WHERE not_after <= extract(epoch FROM now())::bigint
                ORDER BY not_after
                LIMIT $1)
            RETURNING 1
        ),
        last_resort AS (
            DELETE FROM last_resort_key_packages
            WHERE identity IN (
                SELECT identity FROM last_resort_key_packages
                WHERE not_after <= extract(epoch FROM now())::bigint
                ORDER BY not_after
                LIMIT $1)
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM pooled) + (SELECT count(*) FROM last_resort)";

    /// Bytes on disk (with indexes and out-of-line storage) by kind.
    pub(super) const STORED_BYTES: &str = "
        SELECT pg_total_relation_size('group_log'),
               pg_total_relation_size('welcomes') + pg_total_relation_size('inbox'),
               pg_total_relation_size('key_packages')
                 + pg_total_relation_size('last_resort_key_packages'),
               pg_total_relation_size('group_views') + pg_total_relation_size('view_snapshots')
                 + pg_total_relation_size('view_tail')";

    pub(super) const PRUNED_SEQ: &str = "SELECT pruned_seq FROM groups WHERE group_id = $1";
}
