//! The public views of the embedded store (ADR 0012, ADR 0018): per group, its epoch and
//! latest GroupInfo ([`VIEWS`]), its latest snapshots ([`SNAPSHOTS`]: the latest and the one
//! before it) and the seqs of the verified handshake messages appended after the older of
//! them ([`TAIL`]; the messages themselves are read from the log, and copied here only if
//! retention deletes them from the log first). A view is the latest snapshot and the messages
//! after it.
//!
//! Stores written before snapshots kept the whole state in [`VIEWS`] (and the state before
//! the latest commit in the revert table); [`migrate`] moves those into snapshots when the
//! store is opened.

use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::StoreError;
use super::embedded::unavailable;
use super::embedded_log::{GROUPS, LOG, LogValue, VIEWS, corrupt};
use super::embedded_revert::REVERTS;
use crate::model::decide::Decision;
use crate::model::group::StoredView;

/// (group, seq of the last message it reflects) → (encoded state, encoded proposals).
pub(super) const SNAPSHOTS: TableDefinition<GroupSeq, Snapshot> =
    TableDefinition::new("group_view_snapshots");
/// A group and a seq in it, as a key.
pub(super) type GroupSeq = (&'static [u8], u64);
/// A snapshot's encoded state and proposals.
pub(super) type Snapshot = (&'static [u8], &'static [u8]);
/// (group, seq) → a verified commit or proposal appended after the group's snapshots: empty
/// while it is in the log at that seq, its bytes once retention deleted it from the log.
pub(super) const TAIL: TableDefinition<(&[u8], u64), &[u8]> =
    TableDefinition::new("group_view_tail");

/// Conversions of the store done so far (name → 1).
const MIGRATIONS: TableDefinition<&str, u64> = TableDefinition::new("migrations");
/// The conversion of views stored whole into snapshots.
const SNAPSHOTS_MIGRATION: &str = "0007_view_snapshots";

/// Creates the tables and moves views stored whole (before snapshots) into snapshots: the
/// stored view becomes the snapshot at the group's last seq, the view kept before its latest
/// commit the snapshot just before that commit. Done once per store (recorded in
/// `migrations`).
pub(super) fn migrate(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut snapshots = txn.open_table(SNAPSHOTS).map_err(unavailable)?;
    txn.open_table(TAIL).map_err(unavailable)?;
    // Once per store: a later open does not scan every group's view again.
    let mut done = txn.open_table(MIGRATIONS).map_err(unavailable)?;
    if done
        .get(SNAPSHOTS_MIGRATION)
        .map_err(unavailable)?
        .is_some()
    {
        return Ok(());
    }
    done.insert(SNAPSHOTS_MIGRATION, 1).map_err(unavailable)?;
    let mut views = txn.open_table(VIEWS).map_err(unavailable)?;
    let groups = txn.open_table(GROUPS).map_err(unavailable)?;
    let mut whole = Vec::new();
    for row in views.iter().map_err(unavailable)? {
        let (k, v) = row.map_err(unavailable)?;
        let (epoch, state, proposals, info) = v.value();
        if !state.is_empty() {
            whole.push((
                k.value().to_vec(),
                epoch,
                state.to_vec(),
                proposals.to_vec(),
                info.to_vec(),
            ));
        }
    }
    for (group, epoch, state, proposals, info) in whole {
        let (_, last_seq, _) = groups
            .get(group.as_slice())
            .map_err(unavailable)?
            .ok_or_else(|| corrupt("a view of no group"))?
            .value();
        snapshots
            .insert(
                (group.as_slice(), last_seq),
                (state.as_slice(), proposals.as_slice()),
            )
            .map_err(unavailable)?;
        views
            .insert(group.as_slice(), (epoch, &[][..], &[][..], info.as_slice()))
            .map_err(unavailable)?;
    }
    let mut reverts = txn.open_table(REVERTS).map_err(unavailable)?;
    let mut earlier = Vec::new();
    for row in reverts.iter().map_err(unavailable)? {
        let (k, v) = row.map_err(unavailable)?;
        let (seq, committer, epoch, previous, state, proposals, info) = v.value();
        if !state.is_empty() {
            earlier.push((
                k.value().to_vec(),
                (seq, committer.to_vec(), epoch, previous),
                state.to_vec(),
                proposals.to_vec(),
                info.to_vec(),
            ));
        }
    }
    for (group, (seq, committer, epoch, previous), state, proposals, info) in earlier {
        if seq > 0 {
            snapshots
                .insert(
                    (group.as_slice(), seq - 1),
                    (state.as_slice(), proposals.as_slice()),
                )
                .map_err(unavailable)?;
        }
        let row = (
            seq,
            committer.as_slice(),
            epoch,
            previous,
            &[][..],
            &[][..],
            info.as_slice(),
        );
        reverts.insert(group.as_slice(), row).map_err(unavailable)?;
    }
    Ok(())
}

/// Writes a new group's view: its epoch and GroupInfo, and its state as the snapshot at seq 0.
pub(super) fn create(
    txn: &WriteTransaction,
    group: &[u8],
    view: &StoredView,
) -> Result<(), StoreError> {
    txn.open_table(VIEWS)
        .map_err(unavailable)?
        .insert(
            group,
            (view.epoch, &[][..], &[][..], view.group_info.as_slice()),
        )
        .map_err(unavailable)?;
    txn.open_table(SNAPSHOTS)
        .map_err(unavailable)?
        .insert(
            (group, 0),
            (view.state.as_slice(), view.proposals.as_slice()),
        )
        .map_err(unavailable)?;
    Ok(())
}

/// Writes the view of each group a verified handshake message was appended to: epoch and
/// GroupInfo, and a snapshot or the message after the snapshots. A new snapshot keeps the one
/// before it and the messages after that (the latest commit may still be reverted) and drops
/// anything older. A commit's also keeps the epoch and GroupInfo it replaces, so the commit
/// can be reverted (ADR 0015).
pub(super) fn write(txn: &WriteTransaction, decision: &Decision<'_>) -> Result<(), StoreError> {
    if decision.views.is_empty() {
        return Ok(());
    }
    let mut views = txn.open_table(VIEWS).map_err(unavailable)?;
    let mut snapshots = txn.open_table(SNAPSHOTS).map_err(unavailable)?;
    let mut tail = txn.open_table(TAIL).map_err(unavailable)?;
    for v in &decision.views {
        let group_info = {
            let stored = views
                .get(v.group)
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("a verified group has no stored view"))?;
            let (epoch, _, _, info) = stored.value();
            if let Some(commit) = v.commit {
                super::embedded_revert::keep_earlier(txn, v.group, commit, epoch, info)?;
            }
            v.group_info.map_or_else(|| info.to_vec(), <[u8]>::to_vec)
        };
        views
            .insert(v.group, (v.epoch, &[][..], &[][..], group_info.as_slice()))
            .map_err(unavailable)?;
        let Some(state) = v.state else {
            tail.insert((v.group, v.seq), &[][..])
                .map_err(unavailable)?;
            continue;
        };
        let latest = latest_snapshot(&snapshots, v.group)?;
        snapshots
            .insert((v.group, v.seq), (state, v.proposals))
            .map_err(unavailable)?;
        if let Some(latest) = latest {
            snapshots
                .retain_in((v.group, 0)..(v.group, latest), |_, _| false)
                .map_err(unavailable)?;
            tail.retain_in((v.group, 0)..=(v.group, latest), |_, _| false)
                .map_err(unavailable)?;
        }
    }
    Ok(())
}

/// The seq of `group`'s latest snapshot.
fn latest_snapshot(
    snapshots: &impl ReadableTable<GroupSeq, Snapshot>,
    group: &[u8],
) -> Result<Option<u64>, StoreError> {
    Ok(snapshots
        .range((group, 0)..=(group, u64::MAX))
        .map_err(unavailable)?
        .next_back()
        .transpose()
        .map_err(unavailable)?
        .map(|(k, _)| k.value().1))
}

/// `group`'s view: epoch and GroupInfo, the latest snapshot and the messages after it.
pub(super) fn load(
    txn: &redb::ReadTransaction,
    group: &[u8],
) -> Result<Option<StoredView>, StoreError> {
    let views = txn.open_table(VIEWS).map_err(unavailable)?;
    let Some(row) = views.get(group).map_err(unavailable)? else {
        return Ok(None);
    };
    let (epoch, _, _, group_info) = row.value();
    let snapshots = txn.open_table(SNAPSHOTS).map_err(unavailable)?;
    let Some(latest) = latest_snapshot(&snapshots, group)? else {
        return Err(corrupt("a group view has no snapshot"));
    };
    let snapshot = snapshots
        .get((group, latest))
        .map_err(unavailable)?
        .ok_or_else(|| corrupt("a group view's snapshot is gone"))?;
    let (state, proposals) = snapshot.value();
    let mut tail = Vec::new();
    let kept = txn.open_table(TAIL).map_err(unavailable)?;
    let log = txn.open_table(LOG).map_err(unavailable)?;
    for row in kept
        .range((group, latest.saturating_add(1))..=(group, u64::MAX))
        .map_err(unavailable)?
    {
        let (k, v) = row.map_err(unavailable)?;
        let copied = v.value();
        if !copied.is_empty() {
            tail.push(copied.to_vec());
            continue;
        }
        let entry = log
            .get((group, k.value().1))
            .map_err(unavailable)?
            .ok_or_else(|| corrupt("a group view's message is gone from the log"))?;
        tail.push(entry.value().3.to_vec());
    }
    Ok(Some(StoredView {
        epoch,
        state: state.to_vec(),
        proposals: proposals.to_vec(),
        group_info: group_info.to_vec(),
        tail,
    }))
}

/// Copies into the tail the messages of `group`'s view that retention is about to delete from
/// the log (seqs in `(floor, top]`), so the view can still be restored.
pub(super) fn keep_tail_before_pruning(
    txn: &WriteTransaction,
    log: &impl ReadableTable<(&'static [u8], u64), LogValue>,
    group: &[u8],
    floor: u64,
    top: u64,
) -> Result<(), StoreError> {
    let mut tail = txn.open_table(TAIL).map_err(unavailable)?;
    let mut copies = Vec::new();
    for row in tail
        .range((group, floor.saturating_add(1))..=(group, top))
        .map_err(unavailable)?
    {
        let (k, v) = row.map_err(unavailable)?;
        if v.value().is_empty() {
            let seq = k.value().1;
            let entry = log
                .get((group, seq))
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("a group view's message is gone from the log"))?;
            copies.push((seq, entry.value().3.to_vec()));
        }
    }
    for (seq, payload) in copies {
        tail.insert((group, seq), payload.as_slice())
            .map_err(unavailable)?;
    }
    Ok(())
}

/// Whether the view before the commit at `seq` can be restored: a snapshot from before it is
/// kept.
pub(super) fn restorable_before(
    txn: &WriteTransaction,
    group: &[u8],
    seq: u64,
) -> Result<bool, StoreError> {
    Ok(txn
        .open_table(SNAPSHOTS)
        .map_err(unavailable)?
        .range((group, 0)..(group, seq))
        .map_err(unavailable)?
        .next()
        .is_some())
}

/// The group's view goes back to before the commit at `seq` (a revert): `epoch` and
/// `group_info` as they were, and the commit, any snapshot it took and the messages after it
/// leave the view.
pub(super) fn restore(
    txn: &WriteTransaction,
    group: &[u8],
    seq: u64,
    epoch: u64,
    group_info: &[u8],
) -> Result<(), StoreError> {
    txn.open_table(VIEWS)
        .map_err(unavailable)?
        .insert(group, (epoch, &[][..], &[][..], group_info))
        .map_err(unavailable)?;
    txn.open_table(SNAPSHOTS)
        .map_err(unavailable)?
        .retain_in((group, seq)..=(group, u64::MAX), |_, _| false)
        .map_err(unavailable)?;
    txn.open_table(TAIL)
        .map_err(unavailable)?
        .retain_in((group, seq)..=(group, u64::MAX), |_, _| false)
        .map_err(unavailable)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase, ReadableTableMetadata};

    use super::*;
    use crate::model::group::GroupId;
    use crate::store::embedded::EmbeddedStore;
    use crate::store::log::LogStore;

    /// A store written before snapshots (the whole state in `group_views`, the state before
    /// the latest commit in the revert table) opens with both as snapshots, once.
    #[tokio::test]
    async fn views_stored_whole_become_snapshots_when_opened()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("qpq.db");
        let group = b"legacy group".as_slice();
        {
            let db = Database::create(&path)?;
            let txn = db.begin_write()?;
            // Epoch 4, last seq 9, latest commit at seq 7.
            txn.open_table(GROUPS)?.insert(group, (4, 9, 7))?;
            txn.open_table(VIEWS)?.insert(
                group,
                (4, &b"state at 9"[..], &b"proposals"[..], &b"info 4"[..]),
            )?;
            let committer = [7u8; 32];
            txn.open_table(REVERTS)?.insert(
                group,
                (
                    7,
                    &committer[..],
                    3,
                    2,
                    &b"state at 6"[..],
                    &b""[..],
                    &b"info 3"[..],
                ),
            )?;
            txn.commit()?;
        }
        // Opened twice: the second open finds the conversion recorded and changes nothing.
        for _ in 0..2 {
            let store = EmbeddedStore::open(&path)?;
            let view = store
                .load_view(&GroupId::new(group)?)
                .await?
                .ok_or("no view")?;
            assert_eq!(view.epoch, 4);
            assert_eq!(view.state, b"state at 9");
            assert_eq!(view.proposals, b"proposals");
            assert_eq!(view.group_info, b"info 4");
            assert!(view.tail.is_empty());
            let db = store.database();
            let txn = db.begin_read()?;
            let snapshots = txn.open_table(SNAPSHOTS)?;
            let earlier = snapshots.get((group, 6))?.ok_or("no earlier snapshot")?;
            assert_eq!(earlier.value(), (&b"state at 6"[..], &b""[..]));
            assert_eq!(snapshots.len()?, 2);
            let reverts = txn.open_table(REVERTS)?;
            let kept = reverts.get(group)?.ok_or("no revert row")?;
            let (_, _, _, _, state, _, info) = kept.value();
            assert!(state.is_empty());
            assert_eq!(info, b"info 3");
        }
        Ok(())
    }
}
