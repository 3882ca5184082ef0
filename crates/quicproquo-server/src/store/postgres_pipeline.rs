//! The two pipelined round trips of an append batch (see `postgres_log` for the transaction
//! and its rules, `postgres_plan` for the arrays and statements they send).
//!
//! Round trip 1 ends by starting the binary `COPY` of the batch's log rows (ADR 0020): the
//! server answers it once the locks and reads before it are done, and then waits for the
//! rows. Round trip 2 sends them first, then the other writes and `COMMIT`; so the rows go in
//! by `COPY` without a round trip of its own.

use std::pin::Pin;

use bytes::Bytes;
use futures::SinkExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{CopyInSink, Row, Statement};

use super::StoreError;
use super::postgres::column;
use super::postgres_copy::{COPY_LOG, encode_log_rows};
use super::postgres_log::{db_error, stored_u64};
use super::postgres_plan::{BatchKeys, Plan, append_sql};
use crate::model::decide::{GroupHead, Membership, Reads, State};

/// The copy of a batch's log rows, started by round trip 1: the server is waiting for them.
pub(super) type LogCopy = Pin<Box<CopyInSink<Bytes>>>;

/// The error that explains a failed pipeline: the first one other than "the transaction is
/// already aborted", which every statement after the failing one reports.
pub(super) fn pipeline_error<const N: usize>(
    errors: [Option<tokio_postgres::Error>; N],
) -> StoreError {
    let mut errors = errors.into_iter().flatten().peekable();
    let first = errors.peek().map(db_error);
    errors
        .find(|e| e.code() != Some(&SqlState::IN_FAILED_SQL_TRANSACTION))
        .map(|e| db_error(&e))
        .or(first)
        .unwrap_or_else(|| StoreError::Unavailable("a pipelined statement failed".into()))
}

/// The name of the unique index that makes a message id appear once per group.
const MESSAGE_ID_INDEX: &str = "group_log_message_id";

/// Whether `e` is the unique index refusing a stored message id again.
fn is_repeated_message_id(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::UNIQUE_VIOLATION && db.constraint() == Some(MESSAGE_ID_INDEX)
    })
}

/// The prepared statements of an append batch.
pub(super) struct AppendStatements {
    lock: Statement,
    members: Statement,
    message_ids: Statement,
    copy_log: Statement,
    update_groups: Statement,
    upsert_members: Statement,
    deliver_welcomes: Statement,
    update_views: Statement,
}

impl AppendStatements {
    /// Prepares them on `client` (cached per connection).
    pub(super) async fn prepare(client: &deadpool_postgres::Client) -> Result<Self, StoreError> {
        let (lock, members, message_ids, copy_log, update_groups, upsert_members, welcomes, views) =
            tokio::try_join!(
                client.prepare_cached(append_sql::LOCK_GROUPS),
                client.prepare_cached(append_sql::READ_MEMBERS),
                client.prepare_cached(append_sql::READ_MESSAGE_IDS),
                client.prepare_cached(COPY_LOG),
                client.prepare_cached(append_sql::UPDATE_GROUPS),
                client.prepare_cached(append_sql::UPSERT_MEMBERS),
                client.prepare_cached(append_sql::DELIVER_WELCOMES),
                client.prepare_cached(append_sql::UPDATE_VIEWS),
            )
            .map_err(|e| db_error(&e))?;
        Ok(Self {
            lock,
            members,
            message_ids,
            copy_log,
            update_groups,
            upsert_members,
            deliver_welcomes: welcomes,
            update_views: views,
        })
    }
}

/// Round trip 1: `BEGIN`, then lock the batch's groups and read the state its decision
/// depends on, then start the copy of its log rows (each request is sent when first polled, so
/// they go out in this order and the server runs them in this order: the copy starts once
/// the locks are held).
pub(super) async fn lock_and_read<'a>(
    client: &deadpool_postgres::Client,
    statements: &AppendStatements,
    keys: &BatchKeys<'_>,
    reads: &Reads<'a>,
) -> Result<(State<'a>, LogCopy), StoreError> {
    let lock_params: [&(dyn ToSql + Sync); 1] = [&keys.groups];
    let member_params: [&(dyn ToSql + Sync); 2] = [&keys.member_groups, &keys.member_identities];
    let id_params: [&(dyn ToSql + Sync); 2] = [&keys.id_groups, &keys.message_ids];
    let stored_ids = async {
        if keys.message_ids.is_empty() {
            Ok(Vec::new())
        } else {
            client.query(&statements.message_ids, &id_params).await
        }
    };
    let (locked, member_rows, id_rows, copy) = match tokio::join!(
        client.batch_execute("BEGIN"),
        client.query(&statements.lock, &lock_params),
        client.query(&statements.members, &member_params),
        stored_ids,
        client.copy_in::<_, Bytes>(&statements.copy_log),
    ) {
        (Ok(()), Ok(l), Ok(m), Ok(i), Ok(c)) => (l, m, i, c),
        (b, l, m, i, c) => {
            return Err(pipeline_error([
                b.err(),
                l.err(),
                m.err(),
                i.err(),
                c.err(),
            ]));
        }
    };
    let mut state = State::new(reads);
    for row in &locked {
        let head = GroupHead {
            epoch: stored_u64(column(row, 1)?, "epoch")?,
            last_seq: stored_u64(column(row, 2)?, "seq")?,
            last_commit_seq: stored_u64(column(row, 3)?, "seq")?,
        };
        state.set_group(column(row, 0)?, head);
    }
    for row in &member_rows {
        let left: Option<i64> = column(row, 3)?;
        let membership = Membership {
            joined: stored_u64(column(row, 2)?, "seq")?,
            left: left.map(|l| stored_u64(l, "seq")).transpose()?,
        };
        state.set_member(column(row, 0)?, column(row, 1)?, membership)?;
    }
    for row in &id_rows {
        let seq = stored_u64(column(row, 2)?, "seq")?;
        state.set_message_id(column(row, 0)?, column(row, 1)?, seq);
    }
    Ok((state, Box::pin(copy)))
}

/// How round trip 2 ended.
pub(super) enum Written {
    /// Committed; with the stored message ids among the plan's unchecked ones (the lookup
    /// runs after the copy, so it also finds the batch's own rows with such an id: see
    /// `postgres_log`).
    Committed(Vec<Row>),
    /// The log insert repeated a stored message id (only when not `probe`): every later
    /// statement failed as "aborted" and `COMMIT` rolled back, so nothing was written and the
    /// connection is idle again.
    RepeatedMessageId,
}

/// Round trip 2: the log rows into the copy `copy` (it must come first: the server is in the
/// middle of it), then look up the unchecked message ids, write the rest of the plan and
/// `COMMIT` (which the server turns into a rollback if any statement failed).
pub(super) async fn write_and_commit(
    client: &deadpool_postgres::Client,
    statements: &AppendStatements,
    (plan, mut copy): (&Plan<'_>, LogCopy),
    probe: bool,
) -> Result<Written, StoreError> {
    let Plan {
        log,
        groups,
        members,
        welcomes,
        inbox,
        views,
        unchecked,
    } = plan;
    let st = statements;
    let unchecked_params: [&(dyn ToSql + Sync); 2] = [&unchecked.groups, &unchecked.message_ids];
    let rows = encode_log_rows(log)?;
    let copied = async move {
        copy.send(rows).await?;
        copy.as_mut().finish().await
    };
    let group_params: [&(dyn ToSql + Sync); 4] = [
        &groups.groups,
        &groups.epochs,
        &groups.last_seqs,
        &groups.last_commit_seqs,
    ];
    let member_params: [&(dyn ToSql + Sync); 4] = [
        &members.groups,
        &members.identities,
        &members.joined,
        &members.left,
    ];
    let welcome_params: [&(dyn ToSql + Sync); 6] = [
        &welcomes.groups,
        &welcomes.commit_seqs,
        &welcomes.payloads,
        &inbox.identities,
        &inbox.groups,
        &inbox.commit_seqs,
    ];
    let view_params: [&(dyn ToSql + Sync); 9] = [
        &views.groups,
        &views.epochs,
        &views.states,
        &views.proposals,
        &views.group_infos,
        &views.commit_seqs,
        &views.committers,
        &views.previous_commits,
        &views.seqs,
    ];
    let (l, found, g, m, w, v, c) = tokio::join!(
        copied,
        query_unless(
            unchecked.groups.is_empty(),
            client,
            &st.message_ids,
            &unchecked_params
        ),
        execute_unless(
            groups.groups.is_empty(),
            client,
            &st.update_groups,
            &group_params
        ),
        execute_unless(
            members.groups.is_empty(),
            client,
            &st.upsert_members,
            &member_params
        ),
        execute_unless(
            welcomes.groups.is_empty(),
            client,
            &st.deliver_welcomes,
            &welcome_params
        ),
        execute_unless(
            views.groups.is_empty(),
            client,
            &st.update_views,
            &view_params
        ),
        client.batch_execute("COMMIT"),
    );
    if let Err(e) = &l
        && !probe
        && is_repeated_message_id(e)
        && c.is_ok()
    {
        return Ok(Written::RepeatedMessageId);
    }
    match (l, found, g, m, w, v, c) {
        (Ok(_), Ok(found), Ok(_), Ok(_), Ok(_), Ok(_), Ok(())) => Ok(Written::Committed(found)),
        (l, f, g, m, w, v, c) => Err(pipeline_error([
            l.err(),
            f.err(),
            g.err(),
            m.err(),
            w.err(),
            v.err(),
            c.err(),
        ])),
    }
}

/// Runs `statement` unless `skip` (nothing to send).
async fn query_unless(
    skip: bool,
    client: &deadpool_postgres::Client,
    statement: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    if skip {
        return Ok(Vec::new());
    }
    client.query(statement, params).await
}

/// Executes `statement` unless `skip` (nothing to write).
async fn execute_unless(
    skip: bool,
    client: &deadpool_postgres::Client,
    statement: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    if skip {
        return Ok(0);
    }
    client.execute(statement, params).await
}
