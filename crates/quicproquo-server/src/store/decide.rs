//! The decision of an append batch, shared by both stores and free of any I/O.
//!
//! A store reads the state a batch depends on ([`Reads`]) inside its transaction, fills a
//! [`State`] with it and calls [`decide`]. Each request is judged in batch order against that
//! state and the effects of the requests before it, by these checks in this order:
//! 1. the group must exist ([`AppendOutcome::UnknownGroup`]);
//! 2. the sender must be a current member ([`AppendOutcome::NotMember`]);
//! 3. a message id the group already holds, stored or appended earlier in the batch, answers
//!    its original sequence number ([`AppendOutcome::Duplicate`]);
//! 4. the epoch must be accepted by [`epoch_accepted`] ([`AppendOutcome::StaleEpoch`]);
//! 5. otherwise the request is appended at the group's next sequence number; a commit moves the
//!    group to the next epoch, ends the membership of the members it removes, starts that of
//!    the members it adds, and stores its Welcome (if it adds anyone) for each added member.
//!
//! The [`Decision`] holds one outcome per request and the writes that carry them out; each
//! store turns the writes into its own I/O in the same transaction.
//!
//! A store may decide without reading its stored message ids (the Postgres fast path, ADR
//! 0009): a repeat that would be appended is then caught by the store's unique index, and a
//! repeat refused for its epoch is listed in [`Decision::unchecked`] for the store to look up
//! before it answers, so the outcome is `Duplicate` exactly as if the ids had been read.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use quicproquo_core::IdentityKey;

use super::StoreError;
use super::log::{AppendOutcome, AppendRequest, CommitChange, EntryKind, epoch_accepted};

/// An identity's bytes: memberships are keyed by them (stored keys need no re-validation).
pub(super) type Identity = [u8; 32];

/// A group's head: its epoch, its last sequence number and the commit that started the epoch
/// (0 for epoch 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GroupHead {
    /// The current epoch.
    pub(super) epoch: u64,
    /// The last sequence number appended (0 for an empty log).
    pub(super) last_seq: u64,
    /// The sequence number of the commit that started `epoch`.
    pub(super) last_commit_seq: u64,
}

/// An identity's membership of a group: it may read the entries after `joined`, up to and
/// including `left`, and write while `left` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Membership {
    /// The sequence number of the commit that added it (0 for the creator).
    pub(super) joined: u64,
    /// The sequence number of the commit that removed it; `None` while a member.
    pub(super) left: Option<u64>,
}

/// What deciding a batch reads from the store, each key once, in first-use order.
pub(super) struct Reads<'a> {
    index: HashMap<&'a [u8], usize>,
    /// The batch's distinct groups (a group's index is its position).
    pub(super) groups: Vec<&'a [u8]>,
    /// The memberships the requests depend on: each sender's and each removed member's.
    pub(super) members: Vec<(&'a [u8], &'a IdentityKey)>,
    /// The message ids the requests may repeat (empty unless read).
    pub(super) message_ids: Vec<(&'a [u8], &'a [u8])>,
    with_message_ids: bool,
}

impl<'a> Reads<'a> {
    /// The keys of `batch`; its message ids only if `with_message_ids`.
    pub(super) fn of(batch: &'a [AppendRequest], with_message_ids: bool) -> Self {
        let mut reads = Self {
            index: HashMap::new(),
            groups: Vec::new(),
            members: Vec::new(),
            message_ids: Vec::new(),
            with_message_ids,
        };
        let mut pairs = HashSet::new();
        let mut ids = HashSet::new();
        for req in batch {
            let group = req.group_id.as_bytes();
            let next = reads.groups.len();
            let g = *reads.index.entry(group).or_insert(next);
            if g == next {
                reads.groups.push(group);
            }
            let removed = match commit_change(req) {
                Some(change) => change.removed.as_slice(),
                None => &[],
            };
            for who in std::iter::once(&req.sender).chain(removed) {
                if pairs.insert((g, who)) {
                    reads.members.push((group, who));
                }
            }
            if with_message_ids && ids.insert((g, req.message_id.as_slice())) {
                reads.message_ids.push((group, &req.message_id));
            }
        }
        reads
    }
}

/// The membership change of `req` if it is a commit (a change on another kind is ignored).
fn commit_change(req: &AppendRequest) -> Option<&CommitChange> {
    match (req.kind, &req.commit) {
        (EntryKind::Commit, Some(change)) => Some(change),
        _ => None,
    }
}

/// The stored state a batch is decided against, as the store read it, then as the batch
/// changes it.
pub(super) struct State<'a> {
    index: HashMap<&'a [u8], usize>,
    names: Vec<&'a [u8]>,
    /// By group index; `None`: no such group.
    groups: Vec<Option<GroupHead>>,
    changed_groups: Vec<bool>,
    members: HashMap<(usize, Identity), Membership>,
    /// Memberships the batch changed, in first-change order, and as a set.
    changed_members: Vec<(usize, Identity)>,
    touched_members: HashSet<(usize, Identity)>,
    /// By group index: message id → seq (stored ones copied, the batch's borrowed).
    message_ids: Vec<HashMap<Cow<'a, [u8]>, u64>>,
    message_ids_read: bool,
}

impl<'a> State<'a> {
    /// Nothing known yet about the groups of `reads`: each is unknown until
    /// [`set_group`](Self::set_group), each identity no member until
    /// [`set_member`](Self::set_member), each message id new until
    /// [`set_message_id`](Self::set_message_id).
    pub(super) fn new(reads: &Reads<'a>) -> Self {
        let n = reads.groups.len();
        Self {
            index: reads.index.clone(),
            names: reads.groups.clone(),
            groups: vec![None; n],
            changed_groups: vec![false; n],
            members: HashMap::new(),
            changed_members: Vec::new(),
            touched_members: HashSet::new(),
            message_ids: vec![HashMap::new(); n],
            message_ids_read: reads.with_message_ids,
        }
    }

    /// Records a stored group (ignored if the batch does not name it).
    pub(super) fn set_group(&mut self, group: &[u8], head: GroupHead) {
        if let Some(&g) = self.index.get(group) {
            self.groups[g] = Some(head);
        }
    }

    /// Records a stored membership (ignored if the batch does not name the group).
    pub(super) fn set_member(
        &mut self,
        group: &[u8],
        identity: &[u8],
        membership: Membership,
    ) -> Result<(), StoreError> {
        let identity = Identity::try_from(identity)
            .map_err(|_| StoreError::Corrupt("stored identity".into()))?;
        if let Some(&g) = self.index.get(group) {
            self.members.insert((g, identity), membership);
        }
        Ok(())
    }

    /// Records a stored message id (ignored if the batch does not name the group).
    pub(super) fn set_message_id(&mut self, group: &[u8], message_id: &[u8], seq: u64) {
        if let Some(&g) = self.index.get(group) {
            self.message_ids[g].insert(Cow::Owned(message_id.to_vec()), seq);
        }
    }

    /// The outcome of `req` (the `i`-th of the batch), recording its effects.
    fn judge(
        &mut self,
        i: usize,
        req: &'a AppendRequest,
        decision: &mut Decision<'a>,
    ) -> Result<AppendOutcome, StoreError> {
        let group = req.group_id.as_bytes();
        let Some(&g) = self.index.get(group) else {
            return Err(StoreError::Corrupt("a batch group was not read".into()));
        };
        let Some(head) = self.groups[g] else {
            return Ok(AppendOutcome::UnknownGroup);
        };
        let member = self
            .members
            .get(&(g, *req.sender.as_bytes()))
            .is_some_and(|m| m.left.is_none());
        if !member {
            return Ok(AppendOutcome::NotMember);
        }
        if let Some(&seq) = self.message_ids[g].get(req.message_id.as_slice()) {
            return Ok(AppendOutcome::Duplicate { seq });
        }
        if !epoch_accepted(req.kind, req.epoch, head.epoch) {
            if !self.message_ids_read {
                decision.unchecked.push(i);
            }
            return Ok(AppendOutcome::StaleEpoch {
                current_epoch: head.epoch,
                winner_seq: head.last_commit_seq,
            });
        }
        let seq = next(head.last_seq)?;
        decision.entries.push(NewEntry {
            group,
            seq,
            epoch: req.epoch,
            kind: req.kind,
            message_id: &req.message_id,
            payload: &req.payload,
        });
        self.message_ids[g].insert(Cow::Borrowed(&req.message_id), seq);
        let mut new = GroupHead {
            last_seq: seq,
            ..head
        };
        if req.kind == EntryKind::Commit {
            new.epoch = next(head.epoch)?;
            new.last_commit_seq = seq;
        }
        if let Some(change) = commit_change(req) {
            self.apply_commit(g, group, seq, change, decision);
        }
        self.groups[g] = Some(new);
        self.changed_groups[g] = true;
        Ok(AppendOutcome::Appended {
            seq,
            epoch: new.epoch,
        })
    }

    /// The membership change and Welcome of the commit appended to group `g` at `seq`.
    fn apply_commit(
        &mut self,
        g: usize,
        group: &'a [u8],
        seq: u64,
        change: &'a CommitChange,
        decision: &mut Decision<'a>,
    ) {
        for gone in &change.removed {
            let key = (g, *gone.as_bytes());
            if let Some(&m) = self.members.get(&key)
                && m.left.is_none()
            {
                self.change_member(
                    key,
                    Membership {
                        left: Some(seq),
                        ..m
                    },
                );
            }
        }
        let welcome = change
            .welcome
            .as_deref()
            .filter(|_| !change.added.is_empty())
            .map(|payload| {
                decision.welcomes.push(NewWelcome {
                    group,
                    commit_seq: seq,
                    payload,
                });
                decision.welcomes.len() - 1
            });
        for new in &change.added {
            let joined = Membership {
                joined: seq,
                left: None,
            };
            self.change_member((g, *new.as_bytes()), joined);
            if let Some(welcome) = welcome {
                decision.deliveries.push(Delivery {
                    identity: new,
                    group,
                    commit_seq: seq,
                    welcome,
                });
            }
        }
    }

    fn change_member(&mut self, key: (usize, Identity), membership: Membership) {
        self.members.insert(key, membership);
        if self.touched_members.insert(key) {
            self.changed_members.push(key);
        }
    }

    /// The final heads and memberships the batch changed.
    fn finish(self, decision: &mut Decision<'a>) {
        for (g, head) in self.groups.iter().enumerate() {
            if let Some(head) = head.filter(|_| self.changed_groups[g]) {
                decision.heads.push(NewHead {
                    group: self.names[g],
                    head,
                });
            }
        }
        for key in self.changed_members {
            if let Some(&membership) = self.members.get(&key) {
                decision.members.push(NewMembership {
                    group: self.names[key.0],
                    identity: key.1,
                    membership,
                });
            }
        }
    }
}

/// The number after `n` (a sequence number or epoch).
fn next(n: u64) -> Result<u64, StoreError> {
    n.checked_add(1)
        .ok_or_else(|| StoreError::Corrupt("a sequence number or epoch overflowed".into()))
}

/// A log entry to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NewEntry<'a> {
    /// The group.
    pub(super) group: &'a [u8],
    /// Its sequence number.
    pub(super) seq: u64,
    /// The epoch from the message's framing.
    pub(super) epoch: u64,
    /// The kind of message.
    pub(super) kind: EntryKind,
    /// The sender's message id.
    pub(super) message_id: &'a [u8],
    /// The serialized MLS message.
    pub(super) payload: &'a [u8],
}

/// A group's new head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NewHead<'a> {
    /// The group.
    pub(super) group: &'a [u8],
    /// Its head after the batch.
    pub(super) head: GroupHead,
}

/// A membership to write (its state after the batch; each once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NewMembership<'a> {
    /// The group.
    pub(super) group: &'a [u8],
    /// The member.
    pub(super) identity: Identity,
    /// The membership after the batch.
    pub(super) membership: Membership,
}

/// A Welcome to store once, for the members its commit adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NewWelcome<'a> {
    /// The group.
    pub(super) group: &'a [u8],
    /// The sequence number of the commit it travels with.
    pub(super) commit_seq: u64,
    /// The serialized Welcome.
    pub(super) payload: &'a [u8],
}

/// A Welcome to append to an identity's inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Delivery<'a> {
    /// Whose inbox.
    pub(super) identity: &'a IdentityKey,
    /// The group.
    pub(super) group: &'a [u8],
    /// The sequence number of the commit that added the identity.
    pub(super) commit_seq: u64,
    /// The Welcome: its index in [`Decision::welcomes`].
    pub(super) welcome: usize,
}

/// A decided batch: one outcome per request, and the writes that carry them out.
#[derive(Debug)]
pub(super) struct Decision<'a> {
    batch: &'a [AppendRequest],
    /// One per request, in batch order.
    pub(super) outcomes: Vec<AppendOutcome>,
    /// The log entries, in batch order.
    pub(super) entries: Vec<NewEntry<'a>>,
    /// The final head of every group the batch appended to, in first-use order.
    pub(super) heads: Vec<NewHead<'a>>,
    /// The final state of every membership the batch changed, in first-change order.
    pub(super) members: Vec<NewMembership<'a>>,
    /// The Welcomes to store, in batch order.
    pub(super) welcomes: Vec<NewWelcome<'a>>,
    /// The inbox entries, in batch order (each identity's in the order it gets them).
    pub(super) deliveries: Vec<Delivery<'a>>,
    /// When decided without the stored message ids: the requests refused for their epoch,
    /// whose ids may be stored ones (then their outcome is `Duplicate`: see
    /// [`found_stored`](Self::found_stored)).
    pub(super) unchecked: Vec<usize>,
}

impl<'a> Decision<'a> {
    /// The (group, message id) of each [`unchecked`](Self::unchecked) request.
    pub(super) fn unchecked_ids(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + '_ {
        self.unchecked.iter().filter_map(|&i| {
            let req = self.batch.get(i)?;
            Some((req.group_id.as_bytes(), req.message_id.as_slice()))
        })
    }

    /// The store holds `message_id` in `group` at `seq` (from before the batch): the unchecked
    /// requests repeating it are duplicates, not stale. Their refusal wrote nothing, and
    /// neither does a duplicate, so no other outcome or write changes.
    pub(super) fn found_stored(&mut self, group: &[u8], message_id: &[u8], seq: u64) {
        for &i in &self.unchecked {
            let repeats = self.batch.get(i).is_some_and(|req| {
                req.group_id.as_bytes() == group && req.message_id == message_id
            });
            if repeats && let Some(outcome) = self.outcomes.get_mut(i) {
                *outcome = AppendOutcome::Duplicate { seq };
            }
        }
    }
}

/// Decides `batch` against `state`: each request in order, seeing the effects of the ones
/// before it.
pub(super) fn decide<'a>(
    batch: &'a [AppendRequest],
    mut state: State<'a>,
) -> Result<Decision<'a>, StoreError> {
    let mut decision = Decision {
        batch,
        outcomes: Vec::with_capacity(batch.len()),
        entries: Vec::new(),
        heads: Vec::new(),
        members: Vec::new(),
        welcomes: Vec::new(),
        deliveries: Vec::new(),
        unchecked: Vec::new(),
    };
    for (i, req) in batch.iter().enumerate() {
        let outcome = state.judge(i, req, &mut decision)?;
        decision.outcomes.push(outcome);
    }
    state.finish(&mut decision);
    Ok(decision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::log::{APPLICATION_EPOCH_LAG, GroupId};
    use anyhow::{Result, ensure};
    use quicproquo_core::IdentityKeypair;

    fn who() -> Result<IdentityKey> {
        Ok(IdentityKeypair::generate()?.public())
    }

    fn req(
        group: &str,
        sender: IdentityKey,
        kind: EntryKind,
        epoch: u64,
        mid: &str,
    ) -> AppendRequest {
        AppendRequest {
            group_id: GroupId::new(group.as_bytes()).unwrap_or_else(|e| panic!("{e}")),
            sender,
            message_id: mid.as_bytes().to_vec(),
            kind,
            epoch,
            payload: format!("payload {mid}").into_bytes(),
            commit: None,
        }
    }

    fn app(sender: IdentityKey, epoch: u64, mid: &str) -> AppendRequest {
        req("g", sender, EntryKind::Application, epoch, mid)
    }

    fn commit(
        sender: IdentityKey,
        epoch: u64,
        mid: &str,
        added: &[IdentityKey],
        removed: &[IdentityKey],
    ) -> AppendRequest {
        AppendRequest {
            commit: Some(CommitChange {
                added: added.to_vec(),
                removed: removed.to_vec(),
                welcome: Some(format!("welcome {mid}").into_bytes()),
            }),
            ..req("g", sender, EntryKind::Commit, epoch, mid)
        }
    }

    fn head(epoch: u64, last_seq: u64, last_commit_seq: u64) -> GroupHead {
        GroupHead {
            epoch,
            last_seq,
            last_commit_seq,
        }
    }

    fn member(joined: u64, left: Option<u64>) -> Membership {
        Membership { joined, left }
    }

    /// Decides `batch` against group "g" at `at` with `members` and the `stored` message ids
    /// (read only if `read_ids`, as a store would).
    fn decide_on<'a>(
        batch: &'a [AppendRequest],
        at: GroupHead,
        members: &[(IdentityKey, Membership)],
        stored: &[(&str, u64)],
        read_ids: bool,
    ) -> Result<Decision<'a>> {
        let reads = Reads::of(batch, read_ids);
        let mut state = State::new(&reads);
        state.set_group(b"g", at);
        for (identity, membership) in members {
            state.set_member(b"g", identity.as_bytes(), *membership)?;
        }
        for (mid, seq) in stored.iter().filter(|_| read_ids) {
            state.set_message_id(b"g", mid.as_bytes(), *seq);
        }
        Ok(decide(batch, state)?)
    }

    fn appended(seq: u64, epoch: u64) -> AppendOutcome {
        AppendOutcome::Appended { seq, epoch }
    }

    fn stale(current_epoch: u64, winner_seq: u64) -> AppendOutcome {
        AppendOutcome::StaleEpoch {
            current_epoch,
            winner_seq,
        }
    }

    #[test]
    fn a_batch_sees_its_own_commits() -> Result<()> {
        let (alice, bob) = (who()?, who()?);
        let mut proposal = app(alice, 3, "p");
        proposal.kind = EntryKind::Proposal;
        let batch = vec![
            app(bob, 3, "b0"),
            commit(alice, 3, "c1", &[bob], &[]),
            app(bob, 4, "b1"),
            proposal,
            commit(alice, 4, "c2", &[], &[]),
            app(alice, 3, "a3"),
        ];
        let d = decide_on(
            &batch,
            head(3, 10, 7),
            &[(alice, member(0, None))],
            &[],
            true,
        )?;
        let expected = vec![
            AppendOutcome::NotMember,
            appended(11, 4),
            appended(12, 4),
            stale(4, 11),
            appended(13, 5),
            appended(14, 5),
        ];
        ensure!(d.outcomes == expected, "{:?}", d.outcomes);
        let seqs: Vec<u64> = d.entries.iter().map(|e| e.seq).collect();
        ensure!(seqs == vec![11, 12, 13, 14]);
        ensure!(d.entries[2].kind == EntryKind::Commit && d.entries[2].epoch == 4);
        ensure!(d.entries[1].message_id == b"b1" && d.entries[1].payload == b"payload b1");
        ensure!(d.heads.len() == 1 && d.heads[0].group == b"g");
        ensure!(d.heads[0].head == head(5, 14, 13));
        ensure!(d.unchecked.is_empty(), "ids were read");
        Ok(())
    }

    #[test]
    fn repeated_ids_answer_the_first_seq_stored_or_in_the_batch() -> Result<()> {
        let alice = who()?;
        let mut elsewhere = app(alice, 0, "m1");
        elsewhere.group_id = GroupId::new(b"h")?;
        let batch = vec![
            app(alice, 2, "m1"),
            app(alice, 2, "new"),
            app(alice, 2, "new"),
            // A retried commit whose epoch has passed: the repeat is found first.
            commit(alice, 1, "c1", &[], &[]),
            elsewhere,
        ];
        let members = [(alice, member(0, None))];
        let stored = [("m1", 5), ("c1", 8)];
        let d = decide_on(&batch, head(2, 9, 8), &members, &stored, true)?;
        let expected = vec![
            AppendOutcome::Duplicate { seq: 5 },
            appended(10, 2),
            AppendOutcome::Duplicate { seq: 10 },
            AppendOutcome::Duplicate { seq: 8 },
            AppendOutcome::UnknownGroup,
        ];
        ensure!(d.outcomes == expected, "{:?}", d.outcomes);
        ensure!(d.entries.len() == 1 && d.entries[0].message_id == b"new");
        ensure!(d.heads.len() == 1 && d.heads[0].head == head(2, 10, 8));
        Ok(())
    }

    #[test]
    fn epochs_outside_the_window_are_stale() -> Result<()> {
        let alice = who()?;
        let current = APPLICATION_EPOCH_LAG + 3;
        let oldest = current - APPLICATION_EPOCH_LAG;
        let mut late_proposal = app(alice, current - 1, "p-late");
        late_proposal.kind = EntryKind::Proposal;
        let mut proposal = app(alice, current, "p");
        proposal.kind = EntryKind::Proposal;
        let batch = vec![
            app(alice, oldest, "oldest"),
            app(alice, oldest - 1, "too-old"),
            app(alice, current + 1, "future"),
            late_proposal,
            commit(alice, current - 1, "c-late", &[], &[]),
            commit(alice, current + 1, "c-early", &[], &[]),
            proposal,
            commit(alice, current, "c", &[], &[]),
            // The commit moved the window: the oldest kept epoch is now one later.
            app(alice, oldest, "oldest-again"),
            app(alice, oldest + 1, "kept"),
        ];
        let members = [(alice, member(0, None))];
        let d = decide_on(&batch, head(current, 20, 18), &members, &[], true)?;
        let before = stale(current, 18);
        let expected = vec![
            appended(21, current),
            before,
            before,
            before,
            before,
            before,
            appended(22, current),
            appended(23, current + 1),
            stale(current + 1, 23),
            appended(24, current + 1),
        ];
        ensure!(d.outcomes == expected, "{:?}", d.outcomes);
        ensure!(d.heads[0].head == head(current + 1, 24, 23));
        Ok(())
    }

    #[test]
    fn only_current_members_of_known_groups_write() -> Result<()> {
        let (alice, gone, stranger) = (who()?, who()?, who()?);
        let batch = vec![
            app(gone, 0, "a"),
            app(stranger, 0, "b"),
            req("nope", alice, EntryKind::Application, 0, "c"),
        ];
        let members = [(alice, member(0, None)), (gone, member(1, Some(3)))];
        let d = decide_on(&batch, head(0, 3, 0), &members, &[], true)?;
        let expected = vec![
            AppendOutcome::NotMember,
            AppendOutcome::NotMember,
            AppendOutcome::UnknownGroup,
        ];
        ensure!(d.outcomes == expected, "{:?}", d.outcomes);
        ensure!(d.entries.is_empty() && d.heads.is_empty() && d.members.is_empty());
        Ok(())
    }

    #[test]
    fn a_removed_member_cannot_write_later_in_the_batch() -> Result<()> {
        let (alice, bob, stranger) = (who()?, who()?, who()?);
        let batch = vec![
            app(bob, 1, "b1"),
            commit(alice, 1, "c1", &[], &[bob, stranger]),
            app(bob, 1, "b2"),
            // Removing bob again changes nothing.
            commit(alice, 2, "c2", &[], &[bob]),
        ];
        let members = [(alice, member(0, None)), (bob, member(4, None))];
        let d = decide_on(&batch, head(1, 5, 4), &members, &[], true)?;
        let expected = vec![
            appended(6, 1),
            appended(7, 2),
            AppendOutcome::NotMember,
            appended(8, 3),
        ];
        ensure!(d.outcomes == expected, "{:?}", d.outcomes);
        let changed: Vec<_> = d
            .members
            .iter()
            .map(|m| (m.identity, m.membership))
            .collect();
        ensure!(
            changed == vec![(*bob.as_bytes(), member(4, Some(7)))],
            "{changed:?}"
        );
        ensure!(
            d.welcomes.is_empty() && d.deliveries.is_empty(),
            "no one added"
        );
        Ok(())
    }

    #[test]
    fn welcomes_are_stored_once_and_delivered_to_each_added_member() -> Result<()> {
        let (alice, bob, carol, dave) = (who()?, who()?, who()?, who()?);
        let mut ignored = app(alice, 0, "not-a-commit");
        ignored.commit = Some(CommitChange {
            added: vec![dave],
            removed: vec![alice],
            welcome: Some(b"ignored".to_vec()),
        });
        let batch = vec![
            commit(alice, 0, "c1", &[bob, carol], &[]),
            ignored,
            commit(bob, 1, "c2", &[], &[carol]),
            commit(alice, 2, "c3", &[carol, dave], &[]),
            app(carol, 3, "back"),
            app(dave, 3, "hi"),
        ];
        let d = decide_on(
            &batch,
            head(0, 0, 0),
            &[(alice, member(0, None))],
            &[],
            true,
        )?;
        let expected = vec![
            appended(1, 1),
            appended(2, 1),
            appended(3, 2),
            appended(4, 3),
            appended(5, 3),
            appended(6, 3),
        ];
        ensure!(d.outcomes == expected, "{:?}", d.outcomes);
        let welcomes: Vec<_> = d
            .welcomes
            .iter()
            .map(|w| (w.commit_seq, w.payload))
            .collect();
        ensure!(welcomes == vec![(1, &b"welcome c1"[..]), (4, &b"welcome c3"[..])]);
        let deliveries: Vec<_> = d
            .deliveries
            .iter()
            .map(|e| (*e.identity, e.commit_seq, e.welcome))
            .collect();
        let to = vec![(bob, 1, 0), (carol, 1, 0), (carol, 4, 1), (dave, 4, 1)];
        ensure!(deliveries == to, "{deliveries:?}");
        let changed: Vec<_> = d
            .members
            .iter()
            .map(|m| (m.identity, m.membership))
            .collect();
        let final_state = vec![
            (*bob.as_bytes(), member(1, None)),
            (*carol.as_bytes(), member(4, None)),
            (*dave.as_bytes(), member(4, None)),
        ];
        ensure!(changed == final_state, "{changed:?}");

        // A commit that adds no one stores no Welcome, even if it carries one.
        let lone = vec![commit(alice, 0, "c", &[], &[])];
        let d = decide_on(&lone, head(0, 0, 0), &[(alice, member(0, None))], &[], true)?;
        ensure!(d.outcomes == vec![appended(1, 1)] && d.welcomes.is_empty());
        Ok(())
    }

    #[test]
    fn stale_refusals_decided_without_stored_ids_are_left_to_check() -> Result<()> {
        let alice = who()?;
        let batch = vec![
            commit(alice, 1, "c1", &[], &[]),
            app(alice, 2, "new"),
            app(alice, 9, "future"),
        ];
        let members = [(alice, member(0, None))];
        let stored = [("c1", 8)];
        let mut d = decide_on(&batch, head(2, 9, 8), &members, &stored, false)?;
        ensure!(d.outcomes == vec![stale(2, 8), appended(10, 2), stale(2, 8)]);
        ensure!(d.unchecked == vec![0, 2]);
        let ids: Vec<_> = d.unchecked_ids().collect();
        ensure!(ids == vec![(&b"g"[..], &b"c1"[..]), (&b"g"[..], &b"future"[..])]);
        d.found_stored(b"g", b"c1", 8);
        d.found_stored(b"g", b"new", 3);
        d.found_stored(b"h", b"future", 4);
        let expected = vec![
            AppendOutcome::Duplicate { seq: 8 },
            appended(10, 2),
            stale(2, 8),
        ];
        ensure!(d.outcomes == expected, "{:?}", d.outcomes);
        // Read first, the same batch has nothing left to check and the same outcomes.
        let read = decide_on(&batch, head(2, 9, 8), &members, &stored, true)?;
        ensure!(read.unchecked.is_empty() && read.outcomes == expected);
        Ok(())
    }

    #[test]
    fn reads_name_each_key_once() -> Result<()> {
        let (alice, bob) = (who()?, who()?);
        let mut not_commit = app(alice, 0, "x");
        not_commit.commit = Some(CommitChange {
            added: vec![],
            removed: vec![who()?],
            welcome: None,
        });
        let batch = vec![
            app(alice, 0, "a"),
            commit(alice, 0, "c", &[bob], &[bob]),
            app(alice, 0, "a"),
            not_commit,
            req("h", alice, EntryKind::Application, 0, "a"),
        ];
        let reads = Reads::of(&batch, true);
        ensure!(reads.groups == vec![&b"g"[..], &b"h"[..]]);
        let members: Vec<_> = reads.members.iter().map(|(g, i)| (*g, **i)).collect();
        ensure!(members == vec![(&b"g"[..], alice), (&b"g"[..], bob), (&b"h"[..], alice)]);
        ensure!(reads.message_ids.len() == 4, "{:?}", reads.message_ids);
        ensure!(Reads::of(&batch, false).message_ids.is_empty());
        Ok(())
    }

    #[test]
    fn state_the_store_could_not_have_read_is_an_error() -> Result<()> {
        let alice = who()?;
        let batch = vec![app(alice, 0, "a")];
        let other = vec![req("other", alice, EntryKind::Application, 0, "a")];
        let state = State::new(&Reads::of(&other, true));
        ensure!(matches!(decide(&batch, state), Err(StoreError::Corrupt(_))));
        let full = head(0, u64::MAX, 0);
        let overflow = decide_on(&batch, full, &[(alice, member(0, None))], &[], true);
        ensure!(overflow.is_err(), "a full log takes no more entries");
        let mut state = State::new(&Reads::of(&batch, true));
        ensure!(state.set_member(b"g", b"short", member(0, None)).is_err());
        Ok(())
    }
}

/// A store-level check both stores run in their unit tests: the conformance suite's cases
/// repeat message ids only within the epoch window, and the Postgres store decides those
/// without reading its stored ids.
#[cfg(test)]
pub(super) mod store_checks {
    use anyhow::{Result, ensure};
    use quicproquo_core::{IdentityKey, IdentityKeypair};

    use crate::store::Store;
    use crate::store::log::{AppendOutcome, AppendRequest, CommitChange, EntryKind};
    use crate::store::log::{GroupId, LogStore};

    fn request(
        group: &GroupId,
        sender: IdentityKey,
        kind: EntryKind,
        epoch: u64,
        mid: &str,
    ) -> AppendRequest {
        AppendRequest {
            group_id: group.clone(),
            sender,
            message_id: mid.as_bytes().to_vec(),
            kind,
            epoch,
            payload: mid.as_bytes().to_vec(),
            commit: (kind == EntryKind::Commit).then(CommitChange::default),
        }
    }

    /// A commit retried after it moved the group (its answer was lost) is a `Duplicate` with
    /// its seq, not `StaleEpoch`; a new request refused for its epoch stays refused even when
    /// a later request of the batch appends its id.
    pub(in crate::store) async fn a_repeat_refused_for_its_epoch_is_a_duplicate<S>(
        store: &S,
    ) -> Result<()>
    where
        S: Store + LogStore,
    {
        let group = GroupId::new(b"retried")?;
        let alice = IdentityKeypair::generate()?.public();
        store.register_identity(&alice).await?;
        store.create_group(&group, &alice).await?;
        let mut first = request(&group, alice, EntryKind::Commit, 0, "c1");
        let out = store.append(std::slice::from_ref(&first)).await?;
        ensure!(out == vec![AppendOutcome::Appended { seq: 1, epoch: 1 }]);

        let batch = vec![
            first.clone(),
            request(&group, alice, EntryKind::Commit, 0, "x"),
            request(&group, alice, EntryKind::Application, 1, "x"),
        ];
        let out = store.append(&batch).await?;
        let expected = vec![
            AppendOutcome::Duplicate { seq: 1 },
            AppendOutcome::StaleEpoch {
                current_epoch: 1,
                winner_seq: 1,
            },
            AppendOutcome::Appended { seq: 2, epoch: 1 },
        ];
        ensure!(out == expected, "{out:?}");
        first.kind = EntryKind::Proposal;
        let out = store.append(&[first]).await?;
        ensure!(out == vec![AppendOutcome::Duplicate { seq: 1 }], "{out:?}");
        let log = store.read_log(&group, &alice, 0, 10).await?;
        let ids: Vec<&[u8]> = log.iter().map(|e| e.message_id.as_slice()).collect();
        ensure!(ids == vec![&b"c1"[..], &b"x"[..]], "{ids:?}");
        Ok(())
    }
}
