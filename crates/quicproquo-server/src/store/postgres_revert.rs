//! Reverting a reported commit on PostgreSQL (ADR 0015; the rules in
//! [`crate::model::revert`]). One transaction: lock the group's row, read what the decision
//! needs, decide ([`judge`]), write. A revert is rare, so it takes a few round trips rather
//! than a pipeline.

use quicproquo_core::IdentityKey;

use super::StoreError;
use super::postgres::{PgStore, column};
use super::postgres_log::{db_error, stored_u64};
use crate::model::decide::GroupHead;
use crate::model::group::EntryKind;
use crate::model::revert::{
    LatestCommit, RevertOutcome, RevertReads, RevertRequest, Reverted, judge, marker_id,
};

fn bigint(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::InvalidArgument("sequence number out of range"))
}

impl PgStore {
    /// [`LogStore::revert`](super::log::LogStore::revert) on PostgreSQL.
    pub(super) async fn revert_commit(
        &self,
        req: &RevertRequest,
    ) -> Result<RevertOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| db_error(&e))?;
        let group = req.group_id.as_bytes();
        let seq = bigint(req.seq)?;
        let marker = marker_id(req.seq);
        let head = tx
            .query_opt(sql::LOCK_GROUP, &[&group])
            .await
            .map_err(|e| db_error(&e))?
            .map(|row| -> Result<GroupHead, StoreError> {
                Ok(GroupHead {
                    epoch: stored_u64(column(&row, 0)?, "epoch")?,
                    last_seq: stored_u64(column(&row, 1)?, "seq")?,
                    last_commit_seq: stored_u64(column(&row, 2)?, "seq")?,
                })
            })
            .transpose()?;
        let marker_seq = tx
            .query_opt(sql::MARKER, &[&group, &marker])
            .await
            .map_err(|e| db_error(&e))?
            .map(|row| stored_u64(column(&row, 0)?, "seq"))
            .transpose()?;
        let reporter = tx
            .query_opt(
                sql::MEMBERSHIP,
                &[&group, &req.reporter.as_bytes().as_slice()],
            )
            .await
            .map_err(|e| db_error(&e))?
            .map(|row| -> Result<(u64, Option<u64>), StoreError> {
                let left: Option<i64> = column(&row, 1)?;
                Ok((
                    stored_u64(column(&row, 0)?, "seq")?,
                    left.map(|l| stored_u64(l, "seq")).transpose()?,
                ))
            })
            .transpose()?;
        let latest = match tx
            .query_opt(sql::LATEST_COMMIT, &[&group])
            .await
            .map_err(|e| db_error(&e))?
        {
            None => None,
            Some(row) => Some(latest_commit(&row)?),
        };
        let acknowledged_by_other: bool = tx
            .query_one(sql::ACKNOWLEDGED_BY_OTHER, &[&group, &seq])
            .await
            .map_err(|e| db_error(&e))
            .and_then(|row| column(&row, 0))?;
        let reads = RevertReads {
            head,
            marker: marker_seq,
            reporter,
            latest,
            acknowledged_by_other,
        };
        let plan = match judge(req, &reads) {
            Ok(plan) => plan,
            Err(outcome) => {
                tx.rollback().await.map_err(|e| db_error(&e))?;
                return Ok(outcome);
            }
        };
        let (marker_seq, epoch) = (bigint(plan.marker_seq)?, bigint(plan.head.epoch)?);
        let kind = i16::from(EntryKind::Revert.code());
        let writes: [(&str, &[&(dyn tokio_postgres::types::ToSql + Sync)]); 8] = [
            (
                sql::INSERT_MARKER,
                &[&group, &marker_seq, &epoch, &kind, &marker, &req.report],
            ),
            (
                sql::UPDATE_GROUP,
                &[
                    &group,
                    &epoch,
                    &marker_seq,
                    &bigint(plan.head.last_commit_seq)?,
                ],
            ),
            (sql::WITHDRAW_WELCOMES, &[&group, &seq]),
            (sql::READMIT_REMOVED, &[&group, &seq]),
            (sql::DISMISS_ADDED, &[&group, &seq]),
            (sql::RESTORE_VIEW, &[&group]),
            (sql::DROP_SNAPSHOTS, &[&group, &seq]),
            (sql::DROP_TAIL, &[&group, &seq]),
        ];
        for (statement, params) in writes {
            tx.execute(statement, params)
                .await
                .map_err(|e| db_error(&e))?;
        }
        tx.commit().await.map_err(|e| db_error(&e))?;
        Ok(RevertOutcome::Reverted(Reverted {
            seq: plan.marker_seq,
            epoch: plan.head.epoch,
            committer: plan.committer,
        }))
    }
}

/// The view's latest commit from a [`sql::LATEST_COMMIT`] row.
fn latest_commit(row: &tokio_postgres::Row) -> Result<LatestCommit, StoreError> {
    let committer: Option<&[u8]> = column(row, 1)?;
    let committer = committer
        .map(IdentityKey::from_slice)
        .transpose()
        .map_err(|_| StoreError::Corrupt("stored committer".into()))?;
    let prev_epoch: Option<i64> = column(row, 2)?;
    let prev_commit: Option<i64> = column(row, 3)?;
    let kept: bool = column(row, 4)?;
    let before = match (prev_epoch, prev_commit, kept) {
        (Some(e), Some(c), true) => Some((stored_u64(e, "epoch")?, stored_u64(c, "seq")?)),
        _ => None,
    };
    Ok(LatestCommit {
        seq: stored_u64(column(row, 0)?, "seq")?,
        committer,
        before,
    })
}

/// The statements.
mod sql {
    pub(super) const LOCK_GROUP: &str =
        "SELECT epoch, last_seq, last_commit_seq FROM groups WHERE group_id = $1 FOR UPDATE";

    pub(super) const MARKER: &str =
        "SELECT seq FROM group_log WHERE group_id = $1 AND message_id = $2";

    pub(super) const MEMBERSHIP: &str =
        "SELECT joined_seq, left_seq FROM members WHERE group_id = $1 AND identity = $2";

    /// The latest commit, and whether the view before it can be restored: a snapshot from
    /// before it is kept (with the messages after that snapshot: ADR 0018).
    pub(super) const LATEST_COMMIT: &str = "
        SELECT v.commit_seq, v.committer, v.prev_epoch, v.prev_commit_seq,
               EXISTS (SELECT 1 FROM view_snapshots AS s
                       WHERE s.group_id = v.group_id AND s.seq < v.commit_seq)
        FROM group_views AS v WHERE v.group_id = $1";

    /// Whether a member from before the commit at `$2`, other than its committer, has
    /// acknowledged a cursor at or past it: one probe of `cursors` per member of the group.
    pub(super) const ACKNOWLEDGED_BY_OTHER: &str = "
        SELECT EXISTS (
            SELECT 1 FROM members AS m
            JOIN cursors AS c ON c.identity = m.identity AND c.group_id = m.group_id
            WHERE m.group_id = $1 AND m.joined_seq < $2 AND c.seq >= $2
              AND m.identity IS DISTINCT FROM
                  (SELECT committer FROM group_views WHERE group_id = $1)
        )";

    pub(super) const INSERT_MARKER: &str = "
        INSERT INTO group_log (group_id, seq, epoch, kind, message_id, payload)
        VALUES ($1, $2, $3, $4, $5, $6)";

    pub(super) const UPDATE_GROUP: &str =
        "UPDATE groups SET epoch = $2, last_seq = $3, last_commit_seq = $4 WHERE group_id = $1";

    /// The commit's Welcome, and with it (the foreign key's cascade, by the inbox's Welcome
    /// index) its inbox rows.
    pub(super) const WITHDRAW_WELCOMES: &str =
        "DELETE FROM welcomes WHERE group_id = $1 AND commit_seq = $2";

    /// Members the commit removed are members again.
    pub(super) const READMIT_REMOVED: &str = "
        UPDATE members SET left_seq = NULL
        WHERE group_id = $1 AND left_seq = $2 AND joined_seq < $2";

    /// Members the commit added read nothing: they joined and left at the commit.
    pub(super) const DISMISS_ADDED: &str = "
        UPDATE members SET left_seq = $2
        WHERE group_id = $1 AND joined_seq = $2 AND left_seq IS NULL";

    /// The view before the commit is the view again; nothing earlier is kept.
    pub(super) const RESTORE_VIEW: &str = "
        UPDATE group_views SET
            epoch = prev_epoch, group_info = prev_group_info, commit_seq = prev_commit_seq,
            committer = NULL, prev_epoch = NULL, prev_group_info = NULL, prev_commit_seq = NULL
        WHERE group_id = $1";

    /// A snapshot the commit took (ADR 0018): the one before it is the latest again.
    pub(super) const DROP_SNAPSHOTS: &str =
        "DELETE FROM view_snapshots WHERE group_id = $1 AND seq >= $2";

    /// The commit and the proposals after it (for the epoch it started) leave the view.
    pub(super) const DROP_TAIL: &str = "DELETE FROM view_tail WHERE group_id = $1 AND seq >= $2";
}
