//! Reverting a reported commit in the embedded store (ADR 0015; the rules in
//! [`crate::model::revert`]): read what the decision needs, decide ([`judge`]) and write, in
//! one write transaction (redb runs one at a time, so the group cannot move meanwhile).
//!
//! The epoch and GroupInfo before a group's latest commit live in their own table, written by
//! the commit's append transaction ([`keep_earlier`]); the state before it is a snapshot and
//! the messages after it ([`super::embedded_views`]).

use quicproquo_core::IdentityKey;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::StoreError;
use super::embedded::{now_micros, unavailable};
use super::embedded_log::{
    CURSORS, GROUPS, INBOX, LOG, MEMBER_GROUPS, MEMBERS, MESSAGE_IDS, STILL_MEMBER, WELCOME_TIMES,
    WELCOMES, corrupt,
};
use crate::model::decide::{GroupHead, ViewCommit};
use crate::model::group::EntryKind;
use crate::model::revert::{
    LatestCommit, RevertOutcome, RevertReads, RevertRequest, Reverted, judge, marker_id,
};

/// group → (latest commit's seq, its committer, epoch before it, seq of the commit before
/// it, empty, empty, GroupInfo before it). The state before it is a snapshot and the messages
/// after it (ADR 0018); the empty slices held that state in stores written before snapshots.
pub(super) const REVERTS: TableDefinition<&[u8], RevertValue> =
    TableDefinition::new("group_view_reverts");
pub(super) type RevertValue = (
    u64,
    &'static [u8],
    u64,
    u64,
    &'static [u8],
    &'static [u8],
    &'static [u8],
);
/// Keeps the epoch and GroupInfo `commit` replaces in `group`, so the commit can be reverted.
pub(super) fn keep_earlier(
    txn: &WriteTransaction,
    group: &[u8],
    commit: ViewCommit<'_>,
    epoch: u64,
    group_info: &[u8],
) -> Result<(), StoreError> {
    let row = (
        commit.seq,
        commit.committer.as_bytes().as_slice(),
        epoch,
        commit.previous_commit,
        &[][..],
        &[][..],
        group_info,
    );
    txn.open_table(REVERTS)
        .map_err(unavailable)?
        .insert(group, row)
        .map_err(unavailable)?;
    Ok(())
}

/// The group's members: (identity, joined after seq, left at seq).
fn members_of(
    txn: &WriteTransaction,
    group: &[u8],
) -> Result<Vec<(Vec<u8>, u64, u64)>, StoreError> {
    const HIGH: [u8; 33] = [0xff; 33];
    let members = txn.open_table(MEMBERS).map_err(unavailable)?;
    let mut out = Vec::new();
    for row in members
        .range((group, &[][..])..(group, &HIGH[..]))
        .map_err(unavailable)?
    {
        let (k, v) = row.map_err(unavailable)?;
        let (joined, left) = v.value();
        out.push((k.value().1.to_vec(), joined, left));
    }
    Ok(out)
}

/// Reads, decides and, if the rules allow it, carries out the revert of `req`.
pub(super) fn revert(
    txn: &WriteTransaction,
    req: &RevertRequest,
) -> Result<RevertOutcome, StoreError> {
    let group = req.group_id.as_bytes();
    let head = txn
        .open_table(GROUPS)
        .map_err(unavailable)?
        .get(group)
        .map_err(unavailable)?
        .map(|row| {
            let (epoch, last_seq, last_commit_seq) = row.value();
            GroupHead {
                epoch,
                last_seq,
                last_commit_seq,
            }
        });
    let marker = marker_id(req.seq);
    let marker_seq = txn
        .open_table(MESSAGE_IDS)
        .map_err(unavailable)?
        .get((group, marker.as_slice()))
        .map_err(unavailable)?
        .map(|v| v.value());
    let members = members_of(txn, group)?;
    let reporter = members
        .iter()
        .find(|(id, _, _)| id.as_slice() == req.reporter.as_bytes())
        .map(|&(_, joined, left)| (joined, (left != STILL_MEMBER).then_some(left)));
    let latest = match txn
        .open_table(REVERTS)
        .map_err(unavailable)?
        .get(group)
        .map_err(unavailable)?
    {
        None => None,
        Some(row) => {
            let (seq, committer, epoch, previous, ..) = row.value();
            let committer =
                IdentityKey::from_slice(committer).map_err(|_| corrupt("stored committer"))?;
            let kept = super::embedded_views::restorable_before(txn, group, seq)?;
            Some(LatestCommit {
                seq,
                committer: Some(committer),
                before: kept.then_some((epoch, previous)),
            })
        }
    };
    let committer = latest.and_then(|l| l.committer);
    let mut acknowledged_by_other = false;
    {
        let cursors = txn.open_table(CURSORS).map_err(unavailable)?;
        for (id, joined, _) in &members {
            if *joined >= req.seq || committer.is_some_and(|c| c.as_bytes() == id.as_slice()) {
                continue;
            }
            let cursor = cursors
                .get((id.as_slice(), group))
                .map_err(unavailable)?
                .map_or(0, |v| v.value());
            acknowledged_by_other |= cursor >= req.seq;
        }
    }
    let reads = RevertReads {
        head,
        marker: marker_seq,
        reporter,
        latest,
        acknowledged_by_other,
    };
    let plan = match judge(req, &reads) {
        Ok(plan) => plan,
        Err(outcome) => return Ok(outcome),
    };
    {
        let mut log = txn.open_table(LOG).map_err(unavailable)?;
        let row = (
            plan.head.epoch,
            EntryKind::Revert.code(),
            marker.as_slice(),
            req.report.as_slice(),
            now_micros(),
        );
        log.insert((group, plan.marker_seq), row)
            .map_err(unavailable)?;
        txn.open_table(MESSAGE_IDS)
            .map_err(unavailable)?
            .insert((group, marker.as_slice()), plan.marker_seq)
            .map_err(unavailable)?;
        let h = plan.head;
        txn.open_table(GROUPS)
            .map_err(unavailable)?
            .insert(group, (h.epoch, h.last_seq, h.last_commit_seq))
            .map_err(unavailable)?;
    }
    undo_membership(txn, group, req.seq, &members)?;
    restore_view(txn, group, req.seq)?;
    Ok(RevertOutcome::Reverted(Reverted {
        seq: plan.marker_seq,
        epoch: plan.head.epoch,
        committer: plan.committer,
    }))
}

/// Members the commit at `seq` removed are members again; members it added read nothing
/// (they joined and left at the commit) and its Welcome leaves their inboxes.
fn undo_membership(
    txn: &WriteTransaction,
    group: &[u8],
    seq: u64,
    members: &[(Vec<u8>, u64, u64)],
) -> Result<(), StoreError> {
    let mut table = txn.open_table(MEMBERS).map_err(unavailable)?;
    let mut current = txn.open_table(MEMBER_GROUPS).map_err(unavailable)?;
    let mut inbox = txn.open_table(INBOX).map_err(unavailable)?;
    let mut welcome = None;
    for (id, joined, left) in members {
        let id = id.as_slice();
        if *left == seq && *joined < seq {
            table
                .insert((group, id), (*joined, STILL_MEMBER))
                .map_err(unavailable)?;
            current.insert((id, group), ()).map_err(unavailable)?;
        } else if *joined == seq && *left == STILL_MEMBER {
            table.insert((group, id), (seq, seq)).map_err(unavailable)?;
            current.remove((id, group)).map_err(unavailable)?;
            let mut withdrawn = Vec::new();
            for row in inbox.range((id, 0)..=(id, u64::MAX)).map_err(unavailable)? {
                let (k, v) = row.map_err(unavailable)?;
                let (g, commit_seq, wid) = v.value();
                if g == group && commit_seq == seq {
                    withdrawn.push(k.value().1);
                    welcome = Some(wid);
                }
            }
            for n in withdrawn {
                inbox.remove((id, n)).map_err(unavailable)?;
            }
        }
    }
    // The Welcome itself: no inbox entry names it any more.
    if let Some(wid) = welcome {
        txn.open_table(WELCOMES)
            .map_err(unavailable)?
            .remove(wid)
            .map_err(unavailable)?;
        txn.open_table(WELCOME_TIMES)
            .map_err(unavailable)?
            .remove(wid)
            .map_err(unavailable)?;
    }
    Ok(())
}

/// The view before the commit is the view again; nothing earlier is kept.
fn restore_view(txn: &WriteTransaction, group: &[u8], seq: u64) -> Result<(), StoreError> {
    let mut reverts = txn.open_table(REVERTS).map_err(unavailable)?;
    let earlier = reverts
        .remove(group)
        .map_err(unavailable)?
        .ok_or_else(|| corrupt("a reverted commit's earlier view is gone"))?;
    let (_, _, epoch, _, _, _, group_info) = earlier.value();
    super::embedded_views::restore(txn, group, seq, epoch, group_info)
}
