//! The Delivery Service on PostgreSQL: [`LogStore`] for [`PgStore`] (rules in [`super::log`],
//! tables in `sql/0002_delivery.sql`). It behaves exactly like the embedded store; the shared
//! conformance suite checks both.
//!
//! An append batch is one transaction of two round trips, however many requests it holds
//! (statements are pipelined: each is sent without waiting for the one before):
//! 1. `BEGIN`; lock the batch's groups rows in `group_id` order (`FOR UPDATE`) and read their
//!    state; read the memberships the batch depends on (and, when probing, the message ids it
//!    may repeat: see below);
//! 2. then, having decided every request on its own, in batch order, against that state (in
//!    memory: [`Plan::decide`] is the embedded store's row-by-row logic): insert the log rows,
//!    update the groups rows, upsert the changed memberships, store each Welcome once and
//!    append the inbox rows; `COMMIT`.
//!
//! If anything fails, or the caller gives up midway, the connection is closed rather than
//! returned to the pool, and the server rolls the transaction back.
//!
//! Why this keeps the rules when several shards write the same group: every read in step 1
//! happens after the group row locks are held (the server runs pipelined statements in order,
//! each with a fresh snapshot), and the locks are held until commit. So a group's sequence
//! numbers are taken under its row lock and become visible in order, a commit for epoch E
//! finds the group still at E, and a message id is found if any earlier transaction appended
//! it. Locks are taken in one global order (groups by id in one statement, then inbox counters
//! by identity), so concurrent batches cannot deadlock. A refused request writes nothing and
//! does not disturb the others.
//!
//! Repeated message ids are rare (a send retried after a lost answer), so a batch does not
//! look them up first: the unique index on `(group_id, message_id)` checks every inserted row
//! anyway. If it finds a repeat, the transaction fails as a whole (nothing of it is written)
//! and the batch is decided again, this time reading its stored message ids in step 1, so the
//! repeat gets its `Duplicate` outcome. After a repeat the next [`PROBING_AFTER_REPEAT`]
//! batches read them first too, so a stream of retries (or a client replaying ids on purpose)
//! costs at most one wasted attempt in that many batches rather than one each.
//!
//! Reads are one statement each (one snapshot): a log read never sees seq N + 1 without N.

use std::sync::atomic::Ordering;

use quicproquo_core::IdentityKey;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::StoreError;
use super::log::{
    AppendOutcome, AppendRequest, EntryKind, GroupId, GroupSummary, InboxEntry, LogEntry, LogStore,
};
use super::postgres::{PgStore, column, describe};
use super::postgres_plan::{BatchKeys, Plan, State};

/// A database error of a Delivery Service operation: the transaction had no effect (or, if the
/// connection broke during `COMMIT`, possibly did: retrying with the same message ids is safe).
fn db_error(e: &tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(describe(e))
}

/// The error that explains a failed pipeline: the first one other than "the transaction is
/// already aborted", which every statement after the failing one reports.
fn pipeline_error<const N: usize>(errors: [Option<tokio_postgres::Error>; N]) -> StoreError {
    let mut errors = errors.into_iter().flatten().peekable();
    let first = errors.peek().map(db_error);
    errors
        .find(|e| e.code() != Some(&SqlState::IN_FAILED_SQL_TRANSACTION))
        .map(|e| db_error(&e))
        .or(first)
        .unwrap_or_else(|| StoreError::Unavailable("a pipelined statement failed".into()))
}

/// How many batches after one that repeated a stored message id read the stored ids before
/// inserting.
const PROBING_AFTER_REPEAT: u32 = 64;

/// The name of the unique index that makes a message id appear once per group.
const MESSAGE_ID_INDEX: &str = "group_log_message_id";

/// How one attempt at an append batch ended.
enum Attempt {
    /// Committed (or refused request by request): the outcomes, in batch order.
    Done(Vec<AppendOutcome>),
    /// Rolled back because a request repeated a stored message id the attempt did not read.
    RepeatedMessageId,
}

/// Whether `e` is the unique index refusing a stored message id again.
fn is_repeated_message_id(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::UNIQUE_VIOLATION && db.constraint() == Some(MESSAGE_ID_INDEX)
    })
}

/// A stored non-negative number as `u64`.
fn stored_u64(n: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative {what}")))
}

/// A caller's position as a `BIGINT` (past `i64::MAX` nothing is stored anyway).
fn position(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn identity_of(bytes: &[u8]) -> Result<IdentityKey, StoreError> {
    IdentityKey::from_slice(bytes).map_err(|_| StoreError::Corrupt("stored identity".into()))
}

/// A transaction begun and ended by statements pipelined with its work rather than round
/// trips of their own. Unless [`finished`](Self::finished) after its `COMMIT` succeeded,
/// dropping it (an error, or the caller giving up) takes the connection out of the pool and
/// closes it, so the server rolls the transaction back and releases its locks, and no later
/// caller is handed a connection in the middle of a transaction.
struct PipelinedTx(Option<deadpool_postgres::Client>);

impl PipelinedTx {
    fn client(&self) -> Result<&deadpool_postgres::Client, StoreError> {
        self.0
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the transaction's connection is gone".into()))
    }

    /// The transaction ended cleanly: the connection goes back to the pool.
    fn finished(mut self) {
        drop(self.0.take());
    }
}

impl Drop for PipelinedTx {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

impl PgStore {
    /// Runs one prepared statement (one round trip, one implicit transaction).
    async fn log_query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(|e| db_error(&e))?;
        client
            .query(&statement, params)
            .await
            .map_err(|e| db_error(&e))
    }

    /// Appends `batch`: without reading stored message ids first unless a recent batch repeated
    /// one, and again with reading them if this one does.
    async fn append_batch(
        &self,
        batch: &[AppendRequest],
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let probing = self
            .probing_batches
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if !probing {
            match self.attempt_batch(batch, false).await? {
                Attempt::Done(outcomes) => return Ok(outcomes),
                Attempt::RepeatedMessageId => {
                    self.probing_batches
                        .store(PROBING_AFTER_REPEAT, Ordering::Relaxed);
                }
            }
        }
        match self.attempt_batch(batch, true).await? {
            Attempt::Done(outcomes) => Ok(outcomes),
            Attempt::RepeatedMessageId => Err(StoreError::Corrupt(
                "a message id read as absent was found by its unique index".into(),
            )),
        }
    }

    /// One transaction for `batch`; `probe` reads the stored message ids it may repeat.
    async fn attempt_batch(
        &self,
        batch: &[AppendRequest],
        probe: bool,
    ) -> Result<Attempt, StoreError> {
        let keys = BatchKeys::of(batch, probe);
        let tx = PipelinedTx(Some(self.client().await?));
        let client = tx.client()?;
        let (lock, members, message_ids, insert_log, update_groups, upsert_members, inbox) =
            tokio::try_join!(
                client.prepare_cached(sql::LOCK_GROUPS),
                client.prepare_cached(sql::READ_MEMBERS),
                client.prepare_cached(sql::READ_MESSAGE_IDS),
                client.prepare_cached(sql::INSERT_LOG),
                client.prepare_cached(sql::UPDATE_GROUPS),
                client.prepare_cached(sql::UPSERT_MEMBERS),
                client.prepare_cached(sql::DELIVER_WELCOMES),
            )
            .map_err(|e| db_error(&e))?;

        // Round trip 1: BEGIN, then lock and read (each request is sent when first polled,
        // so they go out in this order and the server runs them in this order).
        let lock_params: [&(dyn ToSql + Sync); 1] = [&keys.groups];
        let member_params: [&(dyn ToSql + Sync); 2] =
            [&keys.member_groups, &keys.member_identities];
        let id_params: [&(dyn ToSql + Sync); 2] = [&keys.id_groups, &keys.message_ids];
        let stored_ids = async {
            if probe {
                client.query(&message_ids, &id_params).await
            } else {
                Ok(Vec::new())
            }
        };
        let (locked, member_rows, id_rows) = match tokio::join!(
            client.batch_execute("BEGIN"),
            client.query(&lock, &lock_params),
            client.query(&members, &member_params),
            stored_ids,
        ) {
            (Ok(()), Ok(l), Ok(m), Ok(i)) => (l, m, i),
            (b, l, m, i) => return Err(pipeline_error([b.err(), l.err(), m.err(), i.err()])),
        };

        let mut state = State::new(&keys);
        for row in &locked {
            let group: &[u8] = column(row, 0)?;
            state.set_group(
                group,
                stored_u64(column(row, 1)?, "epoch")?,
                stored_u64(column(row, 2)?, "seq")?,
                stored_u64(column(row, 3)?, "seq")?,
            );
        }
        for row in &member_rows {
            let group: &[u8] = column(row, 0)?;
            let left: Option<i64> = column(row, 3)?;
            state.set_member(
                group,
                column(row, 1)?,
                stored_u64(column(row, 2)?, "seq")?,
                left.map(|l| stored_u64(l, "seq")).transpose()?,
            )?;
        }
        for row in &id_rows {
            let group: &[u8] = column(row, 0)?;
            let message_id: &[u8] = column(row, 1)?;
            state.set_message_id(group, message_id, stored_u64(column(row, 2)?, "seq")?);
        }

        let plan = Plan::decide(batch, state)?;
        let log = async {
            if plan.log.seqs.is_empty() {
                return Ok(0);
            }
            let l = &plan.log;
            client
                .execute(
                    &insert_log,
                    &[
                        &l.groups,
                        &l.seqs,
                        &l.epochs,
                        &l.kinds,
                        &l.message_ids,
                        &l.payloads,
                    ],
                )
                .await
        };
        let groups = async {
            if plan.groups.groups.is_empty() {
                return Ok(0);
            }
            let g = &plan.groups;
            client
                .execute(
                    &update_groups,
                    &[&g.groups, &g.epochs, &g.last_seqs, &g.last_commit_seqs],
                )
                .await
        };
        let members = async {
            if plan.members.groups.is_empty() {
                return Ok(0);
            }
            let m = &plan.members;
            client
                .execute(
                    &upsert_members,
                    &[&m.groups, &m.identities, &m.joined, &m.left],
                )
                .await
        };
        let welcomes = async {
            if plan.welcomes.groups.is_empty() {
                return Ok(0);
            }
            let (w, i) = (&plan.welcomes, &plan.inbox);
            client
                .execute(
                    &inbox,
                    &[
                        &w.groups,
                        &w.commit_seqs,
                        &w.payloads,
                        &i.identities,
                        &i.groups,
                        &i.commit_seqs,
                    ],
                )
                .await
        };
        // Round trip 2: the writes, then COMMIT (which the server turns into a rollback if
        // any write failed).
        let (l, g, m, w, c) = tokio::join!(
            log,
            groups,
            members,
            welcomes,
            client.batch_execute("COMMIT")
        );
        if let Err(e) = &l
            && !probe
            && is_repeated_message_id(e)
            && c.is_ok()
        {
            // Every later statement failed as "aborted" and COMMIT rolled back: nothing was
            // written, and the connection is idle again.
            tx.finished();
            return Ok(Attempt::RepeatedMessageId);
        }
        if l.is_err() || g.is_err() || m.is_err() || w.is_err() || c.is_err() {
            return Err(pipeline_error([
                l.err(),
                g.err(),
                m.err(),
                w.err(),
                c.err(),
            ]));
        }
        tx.finished();
        Ok(Attempt::Done(plan.outcomes))
    }
}

impl LogStore for PgStore {
    async fn create_group(
        &self,
        group_id: &GroupId,
        creator: &IdentityKey,
    ) -> Result<(), StoreError> {
        let rows = self
            .log_query(
                sql::CREATE_GROUP,
                &[&group_id.as_bytes(), &creator.as_bytes().as_slice()],
            )
            .await?;
        let created: i64 = rows.first().map_or(Ok(0), |row| column(row, 0))?;
        if created == 1 {
            Ok(())
        } else {
            Err(StoreError::GroupExists)
        }
    }

    async fn append(&self, batch: &[AppendRequest]) -> Result<Vec<AppendOutcome>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.append_batch(batch).await
    }

    async fn read_log(
        &self,
        group_id: &GroupId,
        reader: &IdentityKey,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let rows = self
            .log_query(
                sql::READ_LOG,
                &[
                    &group_id.as_bytes(),
                    &reader.as_bytes().as_slice(),
                    &position(after_seq),
                    &i64::from(limit),
                ],
            )
            .await?;
        let first = rows
            .first()
            .ok_or_else(|| StoreError::Corrupt("log read returned no row".into()))?;
        if !column::<bool>(first, 0)? {
            return Err(StoreError::UnknownGroup);
        }
        if !column::<bool>(first, 1)? {
            return Err(StoreError::NotMember);
        }
        let mut entries = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(seq) = column::<Option<i64>>(row, 2)? else {
                continue;
            };
            let kind: i16 = column(row, 4)?;
            entries.push(LogEntry {
                seq: stored_u64(seq, "seq")?,
                epoch: stored_u64(column(row, 3)?, "epoch")?,
                kind: u8::try_from(kind)
                    .ok()
                    .and_then(EntryKind::from_code)
                    .ok_or_else(|| StoreError::Corrupt("entry kind".into()))?,
                message_id: column(row, 5)?,
                payload: column(row, 6)?,
                appended_at_micros: stored_u64(column(row, 7)?, "time")?,
            });
        }
        Ok(entries)
    }

    async fn group_summary(
        &self,
        group_id: &GroupId,
        reader: &IdentityKey,
    ) -> Result<GroupSummary, StoreError> {
        let rows = self
            .log_query(sql::GROUP_SUMMARY, &[&group_id.as_bytes()])
            .await?;
        let row = rows.first().ok_or(StoreError::UnknownGroup)?;
        let stored: Vec<&[u8]> = column(row, 2)?;
        let members = stored
            .into_iter()
            .map(identity_of)
            .collect::<Result<Vec<_>, _>>()?;
        if !members.contains(reader) {
            return Err(StoreError::NotMember);
        }
        Ok(GroupSummary {
            group_id: group_id.clone(),
            epoch: stored_u64(column(row, 0)?, "epoch")?,
            last_seq: stored_u64(column(row, 1)?, "seq")?,
            members,
        })
    }

    async fn groups_of(&self, identity: &IdentityKey) -> Result<Vec<GroupId>, StoreError> {
        let rows = self
            .log_query(sql::GROUPS_OF, &[&identity.as_bytes().as_slice()])
            .await?;
        rows.iter()
            .map(|row| GroupId::new(column(row, 0)?))
            .collect()
    }

    async fn read_inbox(
        &self,
        identity: &IdentityKey,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let rows = self
            .log_query(
                sql::READ_INBOX,
                &[
                    &identity.as_bytes().as_slice(),
                    &position(after_seq),
                    &i64::from(limit),
                ],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(InboxEntry {
                    seq: stored_u64(column(row, 0)?, "seq")?,
                    group_id: GroupId::new(column(row, 1)?)?,
                    commit_seq: stored_u64(column(row, 2)?, "seq")?,
                    welcome: column(row, 3)?,
                })
            })
            .collect()
    }

    async fn set_cursor(
        &self,
        identity: &IdentityKey,
        group_id: &GroupId,
        seq: u64,
    ) -> Result<(), StoreError> {
        let rows = self
            .log_query(
                sql::SET_CURSOR,
                &[
                    &identity.as_bytes().as_slice(),
                    &group_id.as_bytes(),
                    &position(seq),
                ],
            )
            .await?;
        let known = rows.first().map_or(Ok(false), |row| column(row, 0))?;
        if known {
            Ok(())
        } else {
            Err(StoreError::NotMember)
        }
    }

    async fn cursor(&self, identity: &IdentityKey, group_id: &GroupId) -> Result<u64, StoreError> {
        let rows = self
            .log_query(
                sql::CURSOR,
                &[&identity.as_bytes().as_slice(), &group_id.as_bytes()],
            )
            .await?;
        rows.first()
            .map_or(Ok(0), |row| stored_u64(column(row, 0)?, "cursor"))
    }
}

/// The statements.
mod sql {
    /// Creates the group and its creator's membership, unless the group exists; returns how
    /// many groups it created.
    pub(super) const CREATE_GROUP: &str = "
        WITH g AS (
            INSERT INTO groups (group_id) VALUES ($1)
            ON CONFLICT (group_id) DO NOTHING
            RETURNING group_id
        ),
        m AS (
            INSERT INTO members (group_id, identity, joined_seq)
            SELECT group_id, $2, 0 FROM g
        )
        SELECT count(*) FROM g";

    /// Locks the batch's groups in one order (no deadlock between batches) and reads them.
    /// `FOR UPDATE` after a wait returns the row as the previous holder committed it.
    pub(super) const LOCK_GROUPS: &str = "
        SELECT group_id, epoch, last_seq, last_commit_seq FROM groups
        WHERE group_id = ANY($1::bytea[])
        ORDER BY group_id
        FOR UPDATE";

    /// The memberships named by `($1[i], $2[i])`. The `LIMIT` keeps the planner from turning
    /// the lateral lookup into a join (which, with a plan cached while the table was small,
    /// could become a scan of the whole table): each lookup is one primary-key probe.
    pub(super) const READ_MEMBERS: &str = "
        SELECT k.group_id, k.identity, m.joined_seq, m.left_seq
        FROM unnest($1::bytea[], $2::bytea[]) AS k (group_id, identity)
        CROSS JOIN LATERAL (
            SELECT joined_seq, left_seq FROM members
            WHERE group_id = k.group_id AND identity = k.identity
            LIMIT 1
        ) AS m";

    /// The message ids among `($1[i], $2[i])` already in the log: one probe of the unique index
    /// each, never a scan of the log (see `READ_MEMBERS`).
    pub(super) const READ_MESSAGE_IDS: &str = "
        SELECT k.group_id, k.message_id, l.seq
        FROM unnest($1::bytea[], $2::bytea[]) AS k (group_id, message_id)
        CROSS JOIN LATERAL (
            SELECT seq FROM group_log
            WHERE group_id = k.group_id AND message_id = k.message_id
            LIMIT 1
        ) AS l";

    pub(super) const INSERT_LOG: &str = "
        INSERT INTO group_log (group_id, seq, epoch, kind, message_id, payload)
        SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::smallint[],
                             $5::bytea[], $6::bytea[])";

    /// The redundant `ANY` gives the groups side an index condition whatever join the
    /// planner picks.
    pub(super) const UPDATE_GROUPS: &str = "
        UPDATE groups AS g
        SET epoch = u.epoch, last_seq = u.last_seq, last_commit_seq = u.last_commit_seq
        FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bigint[])
            AS u (group_id, epoch, last_seq, last_commit_seq)
        WHERE g.group_id = u.group_id AND g.group_id = ANY($1::bytea[])";

    /// Writes the final state of every membership the batch changed (each key once).
    pub(super) const UPSERT_MEMBERS: &str = "
        INSERT INTO members (group_id, identity, joined_seq, left_seq)
        SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bigint[], $4::bigint[])
        ON CONFLICT (group_id, identity)
        DO UPDATE SET joined_seq = EXCLUDED.joined_seq, left_seq = EXCLUDED.left_seq";

    /// Stores each Welcome once and appends one inbox row per added member: the n-th entry for
    /// an identity in the batch gets its counter's old value + n, the counters being locked in
    /// identity order.
    pub(super) const DELIVER_WELCOMES: &str = "
        WITH w AS (
            INSERT INTO welcomes (group_id, commit_seq, payload)
            SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bytea[])
            RETURNING id, group_id, commit_seq
        ),
        e AS (
            SELECT identity, group_id, commit_seq,
                   row_number() OVER (PARTITION BY identity ORDER BY ord) AS nth,
                   count(*) OVER (PARTITION BY identity) AS n
            FROM unnest($4::bytea[], $5::bytea[], $6::bigint[]) WITH ORDINALITY
                AS e (identity, group_id, commit_seq, ord)
        ),
        heads AS (
            INSERT INTO inbox_heads AS h (identity, last_seq)
            SELECT identity, count(*) FROM e GROUP BY identity ORDER BY identity
            ON CONFLICT (identity) DO UPDATE SET last_seq = h.last_seq + EXCLUDED.last_seq
            RETURNING identity, last_seq
        )
        INSERT INTO inbox (identity, seq, group_id, commit_seq, welcome_id)
        SELECT e.identity, heads.last_seq - e.n + e.nth, e.group_id, e.commit_seq, w.id
        FROM e
        JOIN heads ON heads.identity = e.identity
        JOIN w ON w.group_id = e.group_id AND w.commit_seq = e.commit_seq";

    /// One row telling whether the group exists and the reader may read it, joined with the
    /// entries it may read (none: a single row of NULL entry columns).
    pub(super) const READ_LOG: &str = "
        SELECT s.known, s.joined_seq IS NOT NULL, l.seq, l.epoch, l.kind, l.message_id,
               l.payload, (extract(epoch FROM l.appended_at) * 1000000)::bigint
        FROM (
            SELECT EXISTS (SELECT 1 FROM groups WHERE group_id = $1) AS known,
                   m.joined_seq, m.left_seq
            FROM (SELECT 1) AS one
            LEFT JOIN members AS m ON m.group_id = $1 AND m.identity = $2
        ) AS s
        LEFT JOIN LATERAL (
            SELECT * FROM group_log
            WHERE s.joined_seq IS NOT NULL
              AND group_id = $1
              AND seq > greatest($3::bigint, s.joined_seq)
              AND (s.left_seq IS NULL OR seq <= s.left_seq)
            ORDER BY seq
            LIMIT $4
        ) AS l ON true
        ORDER BY l.seq";

    pub(super) const GROUP_SUMMARY: &str = "
        SELECT g.epoch, g.last_seq,
               ARRAY(SELECT identity FROM members
                     WHERE group_id = $1 AND left_seq IS NULL ORDER BY identity)
        FROM groups AS g WHERE g.group_id = $1";

    pub(super) const GROUPS_OF: &str = "
        SELECT group_id FROM members WHERE identity = $1 AND left_seq IS NULL ORDER BY group_id";

    pub(super) const READ_INBOX: &str = "
        SELECT i.seq, i.group_id, i.commit_seq, w.payload
        FROM inbox AS i JOIN welcomes AS w ON w.id = i.welcome_id
        WHERE i.identity = $1 AND i.seq > $2
        ORDER BY i.seq
        LIMIT $3";

    /// Raises the cursor of anyone who is or was a member; returns whether they are.
    pub(super) const SET_CURSOR: &str = "
        WITH m AS (
            SELECT 1 FROM members WHERE group_id = $2 AND identity = $1
        ),
        up AS (
            INSERT INTO cursors AS c (identity, group_id, seq)
            SELECT $1, $2, $3 FROM m
            ON CONFLICT (identity, group_id) DO UPDATE SET seq = EXCLUDED.seq
            WHERE c.seq < EXCLUDED.seq
        )
        SELECT EXISTS (SELECT 1 FROM m)";

    pub(super) const CURSOR: &str = "SELECT seq FROM cursors WHERE identity = $1 AND group_id = $2";
}
