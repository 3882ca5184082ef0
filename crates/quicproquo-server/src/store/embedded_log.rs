//! The Delivery Service tables of the embedded store (see [`super::log`] for the rules).
//!
//! redb runs one write transaction at a time, so taking a group's next sequence number and
//! checking its epoch inside the transaction is already serialized: commit order is sequence
//! order, and one commit per epoch wins. An append batch reads the state its decision
//! depends on, decides it with the decision both stores share ([`super::decide`]) and writes
//! the result, all in that one write transaction.

use quicproquo_core::IdentityKey;
use redb::{ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::StoreError;
use super::embedded::{EmbeddedStore, now_micros, unavailable};
use super::log::LogStore;
use crate::model::decide::{Decision, GroupHead, Membership, Reads, State, decide};
use crate::model::group::{
    AppendOutcome, AppendRequest, EntryKind, GroupId, GroupSummary, InboxEntry, LogEntry,
    StoredView,
};
use crate::model::page::{Page, log_entry_bytes, welcome_bytes};

/// group → (epoch, last seq, seq of the commit that started the epoch).
pub(super) const GROUPS: TableDefinition<&[u8], (u64, u64, u64)> = TableDefinition::new("groups");
/// (group, identity) → (joined after seq, left at seq; `u64::MAX` while a member).
pub(super) const MEMBERS: TableDefinition<BytesPair, (u64, u64)> = TableDefinition::new("members");
/// Two byte strings, as a composite key.
pub(super) type BytesPair = (&'static [u8], &'static [u8]);
/// (identity, group) → () for current memberships.
pub(super) const MEMBER_GROUPS: TableDefinition<(&[u8], &[u8]), ()> =
    TableDefinition::new("member_groups");
/// (group, seq) → (epoch, kind, message id, payload, appended at µs).
pub(super) const LOG: TableDefinition<(&[u8], u64), LogValue> = TableDefinition::new("group_log");
pub(super) type LogValue = (u64, u8, &'static [u8], &'static [u8], u64);
/// (group, message id) → seq.
pub(super) const MESSAGE_IDS: TableDefinition<(&[u8], &[u8]), u64> =
    TableDefinition::new("message_ids");
/// welcome id → Welcome (stored once however many members it adds).
pub(super) const WELCOMES: TableDefinition<u64, &[u8]> = TableDefinition::new("welcomes");
/// (identity, inbox seq) → (group, commit seq, welcome id).
pub(super) const INBOX: TableDefinition<(&[u8], u64), InboxValue> = TableDefinition::new("inbox");
pub(super) type InboxValue = (&'static [u8], u64, u64);
/// identity → last inbox seq.
const INBOX_LAST: TableDefinition<&[u8], u64> = TableDefinition::new("inbox_last");
/// (identity, group) → cursor.
pub(super) const CURSORS: TableDefinition<(&[u8], &[u8]), u64> = TableDefinition::new("cursors");
/// group → (epoch, empty, empty, GroupInfo): the public view's head (ADR 0012); its state is in
/// snapshots (ADR 0018, [`super::embedded_views`]). The empty slices held the whole state in
/// stores written before snapshots.
pub(super) const VIEWS: TableDefinition<&[u8], ViewValue> = TableDefinition::new("group_views");
pub(super) type ViewValue = (u64, &'static [u8], &'static [u8], &'static [u8]);
/// Shared with the AS tables: "welcome_id" → last welcome id.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// group → pruned seq: entries up to it may have been deleted by retention (ADR 0016).
pub(super) const LOG_FLOORS: TableDefinition<&[u8], u64> = TableDefinition::new("log_floors");
/// welcome id → when it was stored (Unix µs), for retention's maximum age.
pub(super) const WELCOME_TIMES: TableDefinition<u64, u64> = TableDefinition::new("welcome_times");

pub(super) const STILL_MEMBER: u64 = u64::MAX;
/// Exclusive upper bound for byte-string second key components (ids are ≤ 256 bytes).
pub(super) const HIGH: [u8; 258] = [0xff; 258];

/// Creates the Delivery Service tables (called when the store is opened).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(GROUPS).map_err(unavailable)?;
    txn.open_table(MEMBERS).map_err(unavailable)?;
    txn.open_table(MEMBER_GROUPS).map_err(unavailable)?;
    txn.open_table(LOG).map_err(unavailable)?;
    txn.open_table(MESSAGE_IDS).map_err(unavailable)?;
    txn.open_table(WELCOMES).map_err(unavailable)?;
    txn.open_table(INBOX).map_err(unavailable)?;
    txn.open_table(INBOX_LAST).map_err(unavailable)?;
    txn.open_table(CURSORS).map_err(unavailable)?;
    txn.open_table(VIEWS).map_err(unavailable)?;
    txn.open_table(LOG_FLOORS).map_err(unavailable)?;
    txn.open_table(WELCOME_TIMES).map_err(unavailable)?;
    txn.open_table(super::embedded_revert::REVERTS)
        .map_err(unavailable)?;
    super::embedded_views::migrate(txn)
}

/// The sequence numbers `reader` is a member of group `g` for: `(joined, left)`, `left` being
/// [`STILL_MEMBER`] while it is one. [`StoreError::UnknownGroup`] for no such group,
/// [`StoreError::NotMember`] for a group it never joined.
fn membership(
    txn: &ReadTransaction,
    g: &[u8],
    reader: &IdentityKey,
) -> Result<(u64, u64), StoreError> {
    if txn
        .open_table(GROUPS)
        .map_err(unavailable)?
        .get(g)
        .map_err(unavailable)?
        .is_none()
    {
        return Err(StoreError::UnknownGroup);
    }
    txn.open_table(MEMBERS)
        .map_err(unavailable)?
        .get((g, reader.as_bytes().as_slice()))
        .map_err(unavailable)?
        .map(|v| v.value())
        .ok_or(StoreError::NotMember)
}

pub(super) fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

/// Appends `batch` inside its write transaction: reads the state its decision depends on,
/// decides it ([`decide`]), and writes the decided rows.
fn append_batch(
    txn: &WriteTransaction,
    batch: &[AppendRequest],
) -> Result<Vec<AppendOutcome>, StoreError> {
    let reads = Reads::of(batch, true);
    let state = read_state(txn, &reads)?;
    let decision = decide(batch, state)?;
    write_decision(txn, &decision)?;
    Ok(decision.outcomes)
}

/// The stored groups, memberships and message ids `reads` names.
fn read_state<'a>(txn: &WriteTransaction, reads: &Reads<'a>) -> Result<State<'a>, StoreError> {
    let mut state = State::new(reads);
    let groups = txn.open_table(GROUPS).map_err(unavailable)?;
    for &group in &reads.groups {
        if let Some(row) = groups.get(group).map_err(unavailable)? {
            let (epoch, last_seq, last_commit_seq) = row.value();
            let head = GroupHead {
                epoch,
                last_seq,
                last_commit_seq,
            };
            state.set_group(group, head);
        }
    }
    let members = txn.open_table(MEMBERS).map_err(unavailable)?;
    for &(group, identity) in &reads.members {
        let id = identity.as_bytes().as_slice();
        if let Some(row) = members.get((group, id)).map_err(unavailable)? {
            let (joined, left) = row.value();
            let left = (left != STILL_MEMBER).then_some(left);
            state.set_member(group, id, Membership { joined, left })?;
        }
    }
    let ids = txn.open_table(MESSAGE_IDS).map_err(unavailable)?;
    for &(group, message_id) in &reads.message_ids {
        if let Some(seq) = ids.get((group, message_id)).map_err(unavailable)? {
            state.set_message_id(group, message_id, seq.value());
        }
    }
    Ok(state)
}

/// Writes what `decision` decided: log entries and their message ids, group heads,
/// memberships, then Welcomes and inbox entries.
fn write_decision(txn: &WriteTransaction, decision: &Decision<'_>) -> Result<(), StoreError> {
    let now = now_micros();
    let mut log = txn.open_table(LOG).map_err(unavailable)?;
    let mut ids = txn.open_table(MESSAGE_IDS).map_err(unavailable)?;
    for e in &decision.entries {
        let row = (e.epoch, e.kind.code(), e.message_id, e.payload, now);
        log.insert((e.group, e.seq), row).map_err(unavailable)?;
        ids.insert((e.group, e.message_id), e.seq)
            .map_err(unavailable)?;
    }
    let mut groups = txn.open_table(GROUPS).map_err(unavailable)?;
    for h in &decision.heads {
        let row = (h.head.epoch, h.head.last_seq, h.head.last_commit_seq);
        groups.insert(h.group, row).map_err(unavailable)?;
    }
    let mut members = txn.open_table(MEMBERS).map_err(unavailable)?;
    let mut member_groups = txn.open_table(MEMBER_GROUPS).map_err(unavailable)?;
    for m in &decision.members {
        let id = m.identity.as_slice();
        let Membership { joined, left } = m.membership;
        members
            .insert((m.group, id), (joined, left.unwrap_or(STILL_MEMBER)))
            .map_err(unavailable)?;
        if left.is_none() {
            member_groups
                .insert((id, m.group), ())
                .map_err(unavailable)?;
        } else {
            member_groups.remove((id, m.group)).map_err(unavailable)?;
        }
    }
    write_welcomes(txn, decision)?;
    super::embedded_views::write(txn, decision)
}

/// Stores each Welcome once (numbered by the `welcome_id` counter) and appends each inbox
/// entry at its identity's next inbox seq.
fn write_welcomes(txn: &WriteTransaction, decision: &Decision<'_>) -> Result<(), StoreError> {
    if decision.welcomes.is_empty() {
        return Ok(());
    }
    let mut counters = txn.open_table(COUNTERS).map_err(unavailable)?;
    let last = counters
        .get("welcome_id")
        .map_err(unavailable)?
        .map_or(0, |v| v.value());
    let mut welcomes = txn.open_table(WELCOMES).map_err(unavailable)?;
    let mut times = txn.open_table(WELCOME_TIMES).map_err(unavailable)?;
    let now = now_micros();
    let mut welcome_id = last;
    for w in &decision.welcomes {
        welcome_id += 1;
        welcomes
            .insert(welcome_id, w.payload)
            .map_err(unavailable)?;
        times.insert(welcome_id, now).map_err(unavailable)?;
    }
    counters
        .insert("welcome_id", welcome_id)
        .map_err(unavailable)?;
    let mut inbox = txn.open_table(INBOX).map_err(unavailable)?;
    let mut inbox_last = txn.open_table(INBOX_LAST).map_err(unavailable)?;
    for d in &decision.deliveries {
        let id = d.identity.as_bytes().as_slice();
        let n = inbox_last
            .get(id)
            .map_err(unavailable)?
            .map_or(0, |v| v.value())
            + 1;
        inbox_last.insert(id, n).map_err(unavailable)?;
        let wid = last + 1 + d.welcome as u64;
        inbox
            .insert((id, n), (d.group, d.commit_seq, wid))
            .map_err(unavailable)?;
    }
    Ok(())
}

impl LogStore for EmbeddedStore {
    async fn create_group_with_view(
        &self,
        group_id: &GroupId,
        creator: &IdentityKey,
        view: Option<&StoredView>,
    ) -> Result<(), StoreError> {
        let (gid, creator, view) = (group_id.clone(), *creator, view.cloned());
        self.run(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut groups = txn.open_table(GROUPS).map_err(unavailable)?;
                if groups.get(gid.as_bytes()).map_err(unavailable)?.is_some() {
                    return Err(StoreError::GroupExists);
                }
                groups
                    .insert(gid.as_bytes(), (0, 0, 0))
                    .map_err(unavailable)?;
                let id = creator.as_bytes().as_slice();
                txn.open_table(MEMBERS)
                    .map_err(unavailable)?
                    .insert((gid.as_bytes(), id), (0, STILL_MEMBER))
                    .map_err(unavailable)?;
                txn.open_table(MEMBER_GROUPS)
                    .map_err(unavailable)?
                    .insert((id, gid.as_bytes()), ())
                    .map_err(unavailable)?;
                if let Some(v) = &view {
                    super::embedded_views::create(&txn, gid.as_bytes(), v)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn load_view(&self, group_id: &GroupId) -> Result<Option<StoredView>, StoreError> {
        let gid = group_id.clone();
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            super::embedded_views::load(&txn, gid.as_bytes())
        })
        .await
    }

    async fn group_info(&self, group_id: &GroupId) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let gid = group_id.clone();
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let views = txn.open_table(VIEWS).map_err(unavailable)?;
            let row = views.get(gid.as_bytes()).map_err(unavailable)?;
            Ok(row.map(|row| {
                let (epoch, _, _, info) = row.value();
                (info.to_vec(), epoch)
            }))
        })
        .await
    }

    async fn revert(
        &self,
        req: &crate::model::revert::RevertRequest,
    ) -> Result<crate::model::revert::RevertOutcome, StoreError> {
        let req = req.clone();
        self.run(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let outcome = super::embedded_revert::revert(&txn, &req)?;
            txn.commit().map_err(unavailable)?;
            Ok(outcome)
        })
        .await
    }

    async fn append(&self, batch: &[AppendRequest]) -> Result<Vec<AppendOutcome>, StoreError> {
        let batch = batch.to_vec();
        self.run(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let outcomes = append_batch(&txn, &batch)?;
            txn.commit().map_err(unavailable)?;
            Ok(outcomes)
        })
        .await
    }

    async fn read_log(
        &self,
        group_id: &GroupId,
        reader: &IdentityKey,
        after_seq: u64,
        page: impl Into<Page> + Send,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let page = page.into();
        let (gid, reader) = (group_id.clone(), *reader);
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let gid = gid.as_bytes();
            let (joined, left) = membership(&txn, gid, &reader)?;
            let from = after_seq.max(joined).saturating_add(1);
            if from > left {
                return Ok(Vec::new());
            }
            let floor = txn
                .open_table(LOG_FLOORS)
                .map_err(unavailable)?
                .get(gid)
                .map_err(unavailable)?
                .map_or(0, |v| v.value());
            if from <= floor {
                return Err(StoreError::HistoryGone {
                    retained_from: floor.saturating_add(1),
                });
            }
            let log = txn.open_table(LOG).map_err(unavailable)?;
            let (mut out, mut used) = (Vec::new(), 0usize);
            for row in log.range((gid, from)..=(gid, left)).map_err(unavailable)? {
                let (k, v) = row.map_err(unavailable)?;
                let (epoch, kind, message_id, payload, at) = v.value();
                let size = log_entry_bytes(message_id.len(), payload.len());
                if !page.admits(out.len(), used, size) {
                    break;
                }
                used += size;
                out.push(LogEntry {
                    seq: k.value().1,
                    epoch,
                    kind: EntryKind::from_code(kind).ok_or_else(|| corrupt("entry kind"))?,
                    message_id: message_id.to_vec(),
                    payload: payload.to_vec(),
                    appended_at_micros: at,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn check_member(
        &self,
        group_id: &GroupId,
        reader: &IdentityKey,
    ) -> Result<(), StoreError> {
        let (gid, reader) = (group_id.clone(), *reader);
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            match membership(&txn, gid.as_bytes(), &reader)? {
                (_, STILL_MEMBER) => Ok(()),
                _ => Err(StoreError::NotMember),
            }
        })
        .await
    }

    async fn group_summary(
        &self,
        group_id: &GroupId,
        reader: &IdentityKey,
    ) -> Result<GroupSummary, StoreError> {
        let (gid, reader) = (group_id.clone(), *reader);
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let g = gid.as_bytes();
            let Some((epoch, last_seq, _)) = txn
                .open_table(GROUPS)
                .map_err(unavailable)?
                .get(g)
                .map_err(unavailable)?
                .map(|v| v.value())
            else {
                return Err(StoreError::UnknownGroup);
            };
            let table = txn.open_table(MEMBERS).map_err(unavailable)?;
            let mut members = Vec::new();
            for row in table
                .range((g, &[][..])..(g, &HIGH[..]))
                .map_err(unavailable)?
            {
                let (k, v) = row.map_err(unavailable)?;
                if v.value().1 == STILL_MEMBER {
                    members
                        .push(IdentityKey::from_slice(k.value().1).map_err(|_| corrupt("member"))?);
                }
            }
            if !members.contains(&reader) {
                return Err(StoreError::NotMember);
            }
            Ok(GroupSummary {
                group_id: gid,
                epoch,
                last_seq,
                members,
            })
        })
        .await
    }

    async fn groups_of(&self, identity: &IdentityKey) -> Result<Vec<GroupId>, StoreError> {
        let identity = *identity;
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(MEMBER_GROUPS).map_err(unavailable)?;
            let id = identity.as_bytes().as_slice();
            let mut out = Vec::new();
            for row in table
                .range((id, &[][..])..(id, &HIGH[..]))
                .map_err(unavailable)?
            {
                let (k, _) = row.map_err(unavailable)?;
                out.push(GroupId::new(k.value().1)?);
            }
            Ok(out)
        })
        .await
    }

    async fn read_inbox(
        &self,
        identity: &IdentityKey,
        after_seq: u64,
        page: impl Into<Page> + Send,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let page = page.into();
        let identity = *identity;
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let inbox = txn.open_table(INBOX).map_err(unavailable)?;
            let welcomes = txn.open_table(WELCOMES).map_err(unavailable)?;
            let id = identity.as_bytes().as_slice();
            let (mut out, mut used) = (Vec::new(), 0usize);
            let from = after_seq.saturating_add(1);
            for row in inbox
                .range((id, from)..=(id, u64::MAX))
                .map_err(unavailable)?
            {
                let (k, v) = row.map_err(unavailable)?;
                let (gid, commit_seq, wid) = v.value();
                let stored = welcomes
                    .get(wid)
                    .map_err(unavailable)?
                    .ok_or_else(|| corrupt("welcome"))?;
                let size = welcome_bytes(stored.value().len());
                if !page.admits(out.len(), used, size) {
                    break;
                }
                used += size;
                let welcome = stored.value().to_vec();
                out.push(InboxEntry {
                    seq: k.value().1,
                    group_id: GroupId::new(gid)?,
                    commit_seq,
                    welcome,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn set_cursor(
        &self,
        identity: &IdentityKey,
        group_id: &GroupId,
        seq: u64,
    ) -> Result<(), StoreError> {
        let (identity, gid) = (*identity, group_id.clone());
        self.run(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let id = identity.as_bytes().as_slice();
                let g = gid.as_bytes();
                let members = txn.open_table(MEMBERS).map_err(unavailable)?;
                if members.get((g, id)).map_err(unavailable)?.is_none() {
                    return Err(StoreError::NotMember);
                }
                let mut cursors = txn.open_table(CURSORS).map_err(unavailable)?;
                let old = cursors
                    .get((id, g))
                    .map_err(unavailable)?
                    .map_or(0, |v| v.value());
                if seq > old {
                    cursors.insert((id, g), seq).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn cursor(&self, identity: &IdentityKey, group_id: &GroupId) -> Result<u64, StoreError> {
        let (identity, gid) = (*identity, group_id.clone());
        self.run(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let cursors = txn.open_table(CURSORS).map_err(unavailable)?;
            Ok(cursors
                .get((identity.as_bytes().as_slice(), gid.as_bytes()))
                .map_err(unavailable)?
                .map_or(0, |v| v.value()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::checks;

    #[tokio::test]
    async fn a_repeat_refused_for_its_epoch_is_a_duplicate() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(&dir.path().join("qpq.db"))?;
        checks::a_repeat_refused_for_its_epoch_is_a_duplicate(&store).await
    }
}
