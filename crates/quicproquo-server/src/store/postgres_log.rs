//! The Delivery Service on PostgreSQL: [`LogStore`] for [`PgStore`] (rules in [`super::log`],
//! tables in `sql/0002_delivery.sql`). It behaves exactly like the embedded store; the shared
//! conformance suite checks both.
//!
//! An append batch is one transaction of two round trips, however many requests it holds
//! (statements are pipelined: each is sent without waiting for the one before; see
//! `postgres_pipeline`):
//! 1. `BEGIN`; lock the batch's groups rows in `group_id` order (`FOR UPDATE`) and read their
//!    state; read the memberships the batch depends on (and, when probing, the message ids it
//!    may repeat: see below); start a binary `COPY` into the log (ADR 0020);
//! 2. then, having decided every request on its own, in batch order, against that state (in
//!    memory, by [`decide`]: the decision the embedded store makes too): copy the log rows,
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
//! costs at most one wasted attempt in that many batches rather than one each. A repeat that
//! is refused for its epoch inserts nothing for the index to catch (a commit retried after it
//! moved the group): step 2 looks up the ids of the requests refused that way, under the same
//! locks, and answers `Duplicate` for the ones stored before the batch, as the embedded store
//! does. (The lookup runs after the copy, so it can also find a row of the batch itself: one
//! appended later in the batch with the same id. That row's seq is one the batch assigned,
//! which tells it apart.)
//!
//! Reads are one statement each (one snapshot): a log read never sees seq N + 1 without N.

use std::sync::atomic::Ordering;

use quicproquo_core::IdentityKey;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::StoreError;
use super::log::LogStore;
use super::postgres::{PgStore, column, describe};
use super::postgres_pipeline::{AppendStatements, Written, lock_and_read, write_and_commit};
use super::postgres_plan::{BatchKeys, Plan};
use crate::model::decide::{Reads, decide};
use crate::model::group::{
    AppendOutcome, AppendRequest, EntryKind, GroupId, GroupSummary, InboxEntry, LogEntry,
    StoredView,
};
use crate::model::page::{Page, log_entry_bytes, welcome_bytes};

/// A database error of a Delivery Service operation: the transaction had no effect (or, if the
/// connection broke during `COMMIT`, possibly did: retrying with the same message ids is safe).
pub(super) fn db_error(e: &tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(describe(e))
}

/// How many batches after one that repeated a stored message id read the stored ids before
/// inserting.
const PROBING_AFTER_REPEAT: u32 = 64;

/// How one attempt at an append batch ended.
enum Attempt {
    /// Committed (or refused request by request): the outcomes, in batch order.
    Done(Vec<AppendOutcome>),
    /// Rolled back because a request repeated a stored message id the attempt did not read.
    RepeatedMessageId,
}

/// A stored non-negative number as `u64`.
pub(super) fn stored_u64(n: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative {what}")))
}

/// A caller's position as a `BIGINT` (past `i64::MAX` nothing is stored anyway).
/// A page's byte budget as a SQL bigint.
fn page_bytes(page: Page) -> i64 {
    i64::try_from(page.bytes).unwrap_or(i64::MAX)
}

/// The fixed part of an entry's cost in a reply, as a SQL bigint.
fn entry_overhead(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

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
        let reads = Reads::of(batch, probe);
        let keys = BatchKeys::of(&reads);
        let tx = PipelinedTx(Some(self.client().await?));
        let client = tx.client()?;
        let statements = AppendStatements::prepare(client).await?;
        let (state, copy) = lock_and_read(client, &statements, &keys, &reads).await?;
        let mut decision = decide(batch, state)?;
        let plan = Plan::of(&decision)?;
        match write_and_commit(client, &statements, (&plan, copy), probe).await? {
            Written::RepeatedMessageId => {
                tx.finished();
                Ok(Attempt::RepeatedMessageId)
            }
            Written::Committed(found) => {
                for row in &found {
                    let group: &[u8] = column(row, 0)?;
                    let seq = stored_u64(column(row, 2)?, "seq")?;
                    // The lookup ran after the batch's own rows were copied in: a row the
                    // batch appended is not one stored before it.
                    let own = decision
                        .entries
                        .iter()
                        .any(|e| e.group == group && e.seq == seq);
                    if !own {
                        decision.found_stored(group, column(row, 1)?, seq);
                    }
                }
                tx.finished();
                Ok(Attempt::Done(decision.outcomes))
            }
        }
    }
}

impl LogStore for PgStore {
    async fn create_group_with_view(
        &self,
        group_id: &GroupId,
        creator: &IdentityKey,
        view: Option<&StoredView>,
    ) -> Result<(), StoreError> {
        let epoch = view.map(|v| i64::try_from(v.epoch).unwrap_or(i64::MAX));
        let rows = self
            .log_query(
                sql::CREATE_GROUP,
                &[
                    &group_id.as_bytes(),
                    &creator.as_bytes().as_slice(),
                    &epoch,
                    &view.map(|v| v.state.as_slice()),
                    &view.map(|v| v.proposals.as_slice()),
                    &view.map(|v| v.group_info.as_slice()),
                ],
            )
            .await?;
        let created: i64 = rows.first().map_or(Ok(0), |row| column(row, 0))?;
        if created == 1 {
            Ok(())
        } else {
            Err(StoreError::GroupExists)
        }
    }

    async fn load_view(&self, group_id: &GroupId) -> Result<Option<StoredView>, StoreError> {
        let rows = self
            .log_query(sql::LOAD_VIEW, &[&group_id.as_bytes()])
            .await?;
        let Some((row, tail)) = rows.split_first() else {
            return Ok(None);
        };
        Ok(Some(StoredView {
            epoch: stored_u64(column(row, 0)?, "epoch")?,
            group_info: column(row, 1)?,
            state: column(row, 2)?,
            proposals: column(row, 3)?,
            tail: tail
                .iter()
                .map(|row| column(row, 4))
                .collect::<Result<_, _>>()?,
        }))
    }

    async fn group_info(&self, group_id: &GroupId) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let rows = self
            .log_query(sql::GROUP_INFO, &[&group_id.as_bytes()])
            .await?;
        rows.first()
            .map(|row| Ok((column(row, 0)?, stored_u64(column(row, 1)?, "epoch")?)))
            .transpose()
    }

    async fn revert(
        &self,
        req: &crate::model::revert::RevertRequest,
    ) -> Result<crate::model::revert::RevertOutcome, StoreError> {
        self.revert_commit(req).await
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
        page: impl Into<Page> + Send,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let page = page.into();
        let rows = self
            .log_query(
                sql::READ_LOG,
                &[
                    &group_id.as_bytes(),
                    &reader.as_bytes().as_slice(),
                    &position(after_seq),
                    &i64::from(page.entries),
                    &page_bytes(page),
                    &entry_overhead(log_entry_bytes(0, 0)),
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
        if let Some(pruned) = column::<Option<i64>>(first, 8)? {
            return Err(StoreError::HistoryGone {
                retained_from: stored_u64(pruned, "pruned seq")?.saturating_add(1),
            });
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

    async fn check_member(
        &self,
        group_id: &GroupId,
        reader: &IdentityKey,
    ) -> Result<(), StoreError> {
        let rows = self
            .log_query(
                sql::CHECK_MEMBER,
                &[&group_id.as_bytes(), &reader.as_bytes().as_slice()],
            )
            .await?;
        let row = rows.first().ok_or(StoreError::UnknownGroup)?;
        let (known, member): (bool, bool) = (column(row, 0)?, column(row, 1)?);
        match (known, member) {
            (false, _) => Err(StoreError::UnknownGroup),
            (true, false) => Err(StoreError::NotMember),
            (true, true) => Ok(()),
        }
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
        let mut groups = Vec::with_capacity(rows.len());
        for row in &rows {
            let group: &[u8] = column(row, 0)?;
            groups.push(GroupId::new(group)?);
        }
        Ok(groups)
    }

    async fn read_inbox(
        &self,
        identity: &IdentityKey,
        after_seq: u64,
        page: impl Into<Page> + Send,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let page = page.into();
        let rows = self
            .log_query(
                sql::READ_INBOX,
                &[
                    &identity.as_bytes().as_slice(),
                    &position(after_seq),
                    &i64::from(page.entries),
                    &page_bytes(page),
                    &entry_overhead(welcome_bytes(0)),
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
mod sql;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::checks;
    use crate::store::postgres::migrate;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repeat_refused_for_its_epoch_is_a_duplicate() -> anyhow::Result<()> {
        let db = quicproquo_testkit::postgres::fresh_database().await?;
        migrate(db.url()).await?;
        let store = PgStore::connect(db.url(), 2).await?;
        checks::a_repeat_refused_for_its_epoch_is_a_duplicate(&store).await?;
        // Decided without reading stored ids: no repeat reached the unique index.
        anyhow::ensure!(store.probing_batches.load(Ordering::Relaxed) == 0);
        Ok(())
    }
}
