//! Retention in the embedded store (see [`super::retention`] for the rules).
//!
//! Each operation is one redb write transaction deleting at most one batch; redb's single
//! writer makes "raise the pruned seq, then delete up to it" atomic with respect to appends
//! and reads.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::StoreError;
use super::embedded::{
    EmbeddedStore, KEY_PACKAGE_EXPIRY, KEY_PACKAGES, LAST_RESORT, LAST_RESORT_ENDS, now_micros,
    now_secs, remove_pooled, unavailable,
};
use super::embedded_log::{
    CURSORS, GROUPS, HIGH, INBOX, LOG, LOG_FLOORS, MEMBERS, MESSAGE_IDS, STILL_MEMBER, VIEWS,
    WELCOME_TIMES, WELCOMES,
};
use super::retention::{CandidatePage, RetentionPolicy, RetentionStore, StoredBytes, micros};
use crate::model::group::GroupId;

/// The time before which an entry stored at a time (Unix µs) is older than `age`.
fn cutoff(now: u64, age: std::time::Duration) -> u64 {
    now.saturating_sub(micros(age))
}

/// The highest seq every current member of `group` has processed: the least, over current
/// members, of the later of their cursor (capped at `last_seq`) and the commit that added them.
/// A group without current members has nobody left to wait for.
fn acknowledged_floor(
    txn: &WriteTransaction,
    group: &[u8],
    last_seq: u64,
) -> Result<u64, StoreError> {
    let members = txn.open_table(MEMBERS).map_err(unavailable)?;
    let cursors = txn.open_table(CURSORS).map_err(unavailable)?;
    let mut floor = last_seq;
    for row in members
        .range((group, &[][..])..(group, &HIGH[..]))
        .map_err(unavailable)?
    {
        let (k, v) = row.map_err(unavailable)?;
        let (joined, left) = v.value();
        if left != STILL_MEMBER {
            continue;
        }
        let cursor = cursors
            .get((k.value().1, group))
            .map_err(unavailable)?
            .map_or(0, |c| c.value());
        floor = floor.min(cursor.min(last_seq).max(joined));
    }
    Ok(floor)
}

/// One batch of `group`'s log (see [`RetentionStore::prune_group_log`]).
fn prune_log(
    txn: &WriteTransaction,
    group: &[u8],
    policy: &RetentionPolicy,
) -> Result<usize, StoreError> {
    let Some(last_seq) = txn
        .open_table(GROUPS)
        .map_err(unavailable)?
        .get(group)
        .map_err(unavailable)?
        .map(|v| v.value().1)
    else {
        return Ok(0);
    };
    let now = now_micros();
    let (acked_before, any_before) = (
        cutoff(now, policy.log_retention),
        cutoff(now, policy.log_max_age),
    );
    let acked = acknowledged_floor(txn, group, last_seq)?;
    let mut floors = txn.open_table(LOG_FLOORS).map_err(unavailable)?;
    let floor = floors
        .get(group)
        .map_err(unavailable)?
        .map_or(0, |v| v.value());
    let mut log = txn.open_table(LOG).map_err(unavailable)?;
    let mut gone = Vec::new();
    for row in log
        .range((group, floor.saturating_add(1))..=(group, u64::MAX))
        .map_err(unavailable)?
        .take(policy.batch)
    {
        let (k, v) = row.map_err(unavailable)?;
        let seq = k.value().1;
        let (_, _, message_id, _, at) = v.value();
        if (seq <= acked && at < acked_before) || at < any_before {
            gone.push((seq, message_id.to_vec()));
        } else {
            break;
        }
    }
    let Some(&(top, _)) = gone.last() else {
        return Ok(0);
    };
    floors.insert(group, top).map_err(unavailable)?;
    super::embedded_views::keep_tail_before_pruning(txn, &log, group, floor, top)?;
    let mut ids = txn.open_table(MESSAGE_IDS).map_err(unavailable)?;
    for (seq, message_id) in &gone {
        log.remove((group, *seq)).map_err(unavailable)?;
        ids.remove((group, message_id.as_slice()))
            .map_err(unavailable)?;
    }
    Ok(gone.len())
}

/// Whether the inbox entry of `identity` for the commit at `commit_seq` in `group` is consumed:
/// the recipient acknowledged the group at or past that commit, or is no longer the member
/// that commit added.
fn consumed(
    txn: &WriteTransaction,
    identity: &[u8],
    group: &[u8],
    commit_seq: u64,
) -> Result<bool, StoreError> {
    let still_added = txn
        .open_table(MEMBERS)
        .map_err(unavailable)?
        .get((group, identity))
        .map_err(unavailable)?
        .is_some_and(|m| {
            let (joined, left) = m.value();
            joined == commit_seq && left == STILL_MEMBER
        });
    if !still_added {
        return Ok(true);
    }
    let cursor = txn
        .open_table(CURSORS)
        .map_err(unavailable)?
        .get((identity, group))
        .map_err(unavailable)?
        .map_or(0, |c| c.value());
    Ok(cursor >= commit_seq)
}

/// One batch of inbox entries and Welcomes (see [`RetentionStore::prune_welcomes`]).
fn prune_inboxes(txn: &WriteTransaction, policy: &RetentionPolicy) -> Result<usize, StoreError> {
    let old_before = cutoff(now_micros(), policy.log_max_age);
    let mut doomed = Vec::new();
    let mut still_used = std::collections::HashSet::new();
    {
        let inbox = txn.open_table(INBOX).map_err(unavailable)?;
        let times = txn.open_table(WELCOME_TIMES).map_err(unavailable)?;
        for row in inbox.iter().map_err(unavailable)? {
            let (k, v) = row.map_err(unavailable)?;
            let (identity, seq) = k.value();
            let (group, commit_seq, wid) = v.value();
            let old = times
                .get(wid)
                .map_err(unavailable)?
                .is_some_and(|t| t.value() < old_before);
            if doomed.len() < policy.batch && (old || consumed(txn, identity, group, commit_seq)?) {
                doomed.push((identity.to_vec(), seq, wid));
            } else {
                still_used.insert(wid);
            }
        }
    }
    let mut inbox = txn.open_table(INBOX).map_err(unavailable)?;
    let mut welcomes = txn.open_table(WELCOMES).map_err(unavailable)?;
    let mut times = txn.open_table(WELCOME_TIMES).map_err(unavailable)?;
    let mut deleted = 0;
    for (identity, seq, _) in &doomed {
        inbox
            .remove((identity.as_slice(), *seq))
            .map_err(unavailable)?;
        deleted += 1;
    }
    for wid in doomed.iter().map(|d| d.2) {
        if !still_used.contains(&wid) && welcomes.remove(wid).map_err(unavailable)?.is_some() {
            times.remove(wid).map_err(unavailable)?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// One batch of expired KeyPackages.
fn prune_expired(txn: &WriteTransaction, batch: usize) -> Result<usize, StoreError> {
    let now = now_secs();
    let expired: Vec<(Vec<u8>, u64)> = {
        let expiry = txn.open_table(KEY_PACKAGE_EXPIRY).map_err(unavailable)?;
        let mut out = Vec::new();
        for row in expiry
            .range((0u64, &[][..], 0u64)..(now.saturating_add(1), &[][..], 0u64))
            .map_err(unavailable)?
            .take(batch)
        {
            let (k, _) = row.map_err(unavailable)?;
            let (_, identity, seq) = k.value();
            out.push((identity.to_vec(), seq));
        }
        out
    };
    for (identity, seq) in &expired {
        remove_pooled(txn, identity, *seq)?;
    }
    let mut deleted = expired.len();
    if deleted < batch {
        let lr_expired: Vec<Vec<u8>> = {
            let ends = txn.open_table(LAST_RESORT_ENDS).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in ends.iter().map_err(unavailable)? {
                let (k, v) = row.map_err(unavailable)?;
                if v.value() <= now && out.len() < batch - deleted {
                    out.push(k.value().to_vec());
                }
            }
            out
        };
        let mut last = txn.open_table(LAST_RESORT).map_err(unavailable)?;
        let mut ends = txn.open_table(LAST_RESORT_ENDS).map_err(unavailable)?;
        for identity in &lr_expired {
            last.remove(identity.as_slice()).map_err(unavailable)?;
            ends.remove(identity.as_slice()).map_err(unavailable)?;
        }
        deleted += lr_expired.len();
    }
    Ok(deleted)
}

impl RetentionStore for EmbeddedStore {
    async fn retention_candidates(
        &self,
        after: Option<&GroupId>,
        limit: usize,
        policy: &RetentionPolicy,
    ) -> Result<CandidatePage, StoreError> {
        let after = after.cloned();
        let first_cutoff = policy.first_cutoff();
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let groups = txn.open_table(GROUPS).map_err(unavailable)?;
            let floors = txn.open_table(LOG_FLOORS).map_err(unavailable)?;
            let log = txn.open_table(LOG).map_err(unavailable)?;
            let before = cutoff(now_micros(), first_cutoff);
            let range = match &after {
                Some(g) => groups.range::<&[u8]>((
                    std::ops::Bound::Excluded(g.as_bytes()),
                    std::ops::Bound::Unbounded,
                )),
                None => groups.range::<&[u8]>(..),
            }
            .map_err(unavailable)?;
            let mut page = CandidatePage::default();
            let mut seen = 0;
            for row in range {
                if seen == limit {
                    break;
                }
                seen += 1;
                let (k, _) = row.map_err(unavailable)?;
                let id = GroupId::new(k.value())?;
                let floor = floors
                    .get(k.value())
                    .map_err(unavailable)?
                    .map_or(0, |v| v.value());
                let oldest = log
                    .get((k.value(), floor.saturating_add(1)))
                    .map_err(unavailable)?
                    .map(|v| v.value().4);
                if oldest.is_some_and(|at| at < before) {
                    page.groups.push(id.clone());
                }
                page.next = Some(id);
            }
            if seen < limit {
                page.next = None;
            }
            Ok(page)
        })
        .await
    }

    async fn prune_group_log(
        &self,
        group: &GroupId,
        policy: &RetentionPolicy,
    ) -> Result<usize, StoreError> {
        let (group, policy) = (group.clone(), *policy);
        self.run(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let n = prune_log(&txn, group.as_bytes(), &policy)?;
            txn.commit().map_err(unavailable)?;
            Ok(n)
        })
        .await
    }

    async fn prune_welcomes(&self, policy: &RetentionPolicy) -> Result<usize, StoreError> {
        let policy = *policy;
        self.run(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let n = prune_inboxes(&txn, &policy)?;
            txn.commit().map_err(unavailable)?;
            Ok(n)
        })
        .await
    }

    async fn prune_key_packages(&self, batch: usize) -> Result<usize, StoreError> {
        self.run(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let n = prune_expired(&txn, batch)?;
            txn.commit().map_err(unavailable)?;
            Ok(n)
        })
        .await
    }

    async fn stored_bytes(&self) -> Result<StoredBytes, StoreError> {
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let bytes = |stats: redb::TableStats| stats.stored_bytes() + stats.metadata_bytes();
            Ok(StoredBytes {
                group_log: bytes(
                    txn.open_table(LOG)
                        .map_err(unavailable)?
                        .stats()
                        .map_err(unavailable)?,
                ) + bytes(
                    txn.open_table(MESSAGE_IDS)
                        .map_err(unavailable)?
                        .stats()
                        .map_err(unavailable)?,
                ),
                welcomes: bytes(
                    txn.open_table(WELCOMES)
                        .map_err(unavailable)?
                        .stats()
                        .map_err(unavailable)?,
                ) + bytes(
                    txn.open_table(INBOX)
                        .map_err(unavailable)?
                        .stats()
                        .map_err(unavailable)?,
                ),
                key_packages: bytes(
                    txn.open_table(KEY_PACKAGES)
                        .map_err(unavailable)?
                        .stats()
                        .map_err(unavailable)?,
                ) + bytes(
                    txn.open_table(LAST_RESORT)
                        .map_err(unavailable)?
                        .stats()
                        .map_err(unavailable)?,
                ),
                group_views: bytes(
                    txn.open_table(VIEWS)
                        .map_err(unavailable)?
                        .stats()
                        .map_err(unavailable)?,
                ) + bytes(
                    txn.open_table(super::embedded_views::SNAPSHOTS)
                        .map_err(unavailable)?
                        .stats()
                        .map_err(unavailable)?,
                ) + bytes(
                    txn.open_table(super::embedded_views::TAIL)
                        .map_err(unavailable)?
                        .stats()
                        .map_err(unavailable)?,
                ),
            })
        })
        .await
    }

    async fn pruned_seq(&self, group: &GroupId) -> Result<u64, StoreError> {
        let group = group.clone();
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            Ok(txn
                .open_table(LOG_FLOORS)
                .map_err(unavailable)?
                .get(group.as_bytes())
                .map_err(unavailable)?
                .map_or(0, |v| v.value()))
        })
        .await
    }
}
