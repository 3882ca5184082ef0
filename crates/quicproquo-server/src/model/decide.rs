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
// Keyed by foldhash rather than SipHash: every request of a batch hashes its group, sender and
// message id several times while the shard's appender decides it, and SipHash was a seventh of
// that thread's time. foldhash's per-process random seed still keeps the keys (chosen by
// clients) from steering collisions, and a batch is at most a thousand requests.
use foldhash::{HashMap, HashSet};

use quicproquo_core::IdentityKey;

use super::ModelError;
use super::group::{AppendOutcome, AppendRequest, CommitChange, EntryKind, epoch_accepted};

/// An identity's bytes: memberships are keyed by them (stored keys need no re-validation).
pub type Identity = [u8; 32];

/// A group's head: its epoch, its last sequence number and the commit that started the epoch
/// (0 for epoch 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupHead {
    /// The current epoch.
    pub epoch: u64,
    /// The last sequence number appended (0 for an empty log).
    pub last_seq: u64,
    /// The sequence number of the commit that started `epoch`.
    pub last_commit_seq: u64,
}

/// An identity's membership of a group: it may read the entries after `joined`, up to and
/// including `left`, and write while `left` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    /// The sequence number of the commit that added it (0 for the creator).
    pub joined: u64,
    /// The sequence number of the commit that removed it; `None` while a member.
    pub left: Option<u64>,
}

/// What deciding a batch reads from the store, each key once, in first-use order.
pub struct Reads<'a> {
    index: HashMap<&'a [u8], usize>,
    /// The batch's distinct groups (a group's index is its position).
    pub groups: Vec<&'a [u8]>,
    /// The memberships the requests depend on: each sender's and each removed member's.
    pub members: Vec<(&'a [u8], &'a IdentityKey)>,
    /// The message ids the requests may repeat (empty unless read).
    pub message_ids: Vec<(&'a [u8], &'a [u8])>,
    with_message_ids: bool,
}

impl<'a> Reads<'a> {
    /// The keys of `batch`; its message ids only if `with_message_ids`.
    pub fn of(batch: &'a [AppendRequest], with_message_ids: bool) -> Self {
        let mut reads = Self {
            index: HashMap::default(),
            groups: Vec::new(),
            members: Vec::new(),
            message_ids: Vec::new(),
            with_message_ids,
        };
        let mut pairs = HashSet::default();
        let mut ids = HashSet::default();
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
pub struct State<'a> {
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
    pub fn new(reads: &Reads<'a>) -> Self {
        let n = reads.groups.len();
        Self {
            index: reads.index.clone(),
            names: reads.groups.clone(),
            groups: vec![None; n],
            changed_groups: vec![false; n],
            members: HashMap::default(),
            changed_members: Vec::new(),
            touched_members: HashSet::default(),
            message_ids: vec![HashMap::default(); n],
            message_ids_read: reads.with_message_ids,
        }
    }

    /// Records a stored group (ignored if the batch does not name it).
    pub fn set_group(&mut self, group: &[u8], head: GroupHead) {
        if let Some(&g) = self.index.get(group) {
            self.groups[g] = Some(head);
        }
    }

    /// Records a stored membership (ignored if the batch does not name the group).
    pub fn set_member(
        &mut self,
        group: &[u8],
        identity: &[u8],
        membership: Membership,
    ) -> Result<(), ModelError> {
        let identity = Identity::try_from(identity)
            .map_err(|_| ModelError::Inconsistent("a stored identity is not a valid key"))?;
        if let Some(&g) = self.index.get(group) {
            self.members.insert((g, identity), membership);
        }
        Ok(())
    }

    /// Records a stored message id (ignored if the batch does not name the group).
    pub fn set_message_id(&mut self, group: &[u8], message_id: &[u8], seq: u64) {
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
    ) -> Result<AppendOutcome, ModelError> {
        let group = req.group_id.as_bytes();
        let Some(&g) = self.index.get(group) else {
            return Err(ModelError::Inconsistent("a batch group was not read"));
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
        let unverified = req.view.as_ref().is_some_and(|v| v.unverified);
        if unverified || !epoch_accepted(req.kind, req.epoch, head.epoch) {
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
        if let Some(view) = &req.view {
            decision.views.push(NewView {
                group,
                seq,
                commit: (req.kind == EntryKind::Commit).then_some(ViewCommit {
                    seq,
                    committer: &req.sender,
                    previous_commit: head.last_commit_seq,
                }),
                epoch: view.epoch,
                state: view.state.as_deref(),
                proposals: &view.proposals,
                group_info: view.group_info.as_deref(),
            });
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
fn next(n: u64) -> Result<u64, ModelError> {
    n.checked_add(1).ok_or(ModelError::Inconsistent(
        "a sequence number or epoch overflowed",
    ))
}

/// A log entry to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewEntry<'a> {
    /// The group.
    pub group: &'a [u8],
    /// Its sequence number.
    pub seq: u64,
    /// The epoch from the message's framing.
    pub epoch: u64,
    /// The kind of message.
    pub kind: EntryKind,
    /// The sender's message id.
    pub message_id: &'a [u8],
    /// The serialized MLS message.
    pub payload: &'a [u8],
}

/// A group's new head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewHead<'a> {
    /// The group.
    pub group: &'a [u8],
    /// Its head after the batch.
    pub head: GroupHead,
}

/// A membership to write (its state after the batch; each once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewMembership<'a> {
    /// The group.
    pub group: &'a [u8],
    /// The member.
    pub identity: Identity,
    /// The membership after the batch.
    pub membership: Membership,
}

/// A Welcome to store once, for the members its commit adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewWelcome<'a> {
    /// The group.
    pub group: &'a [u8],
    /// The sequence number of the commit it travels with.
    pub commit_seq: u64,
    /// The serialized Welcome.
    pub payload: &'a [u8],
}

/// A Welcome to append to an identity's inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery<'a> {
    /// Whose inbox.
    pub identity: &'a IdentityKey,
    /// The group.
    pub group: &'a [u8],
    /// The sequence number of the commit that added the identity.
    pub commit_seq: u64,
    /// The Welcome: its index in [`Decision::welcomes`].
    pub welcome: usize,
}

/// The commit a new view comes from (ADR 0015).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewCommit<'a> {
    /// The commit's seq.
    pub seq: u64,
    /// Who made it.
    pub committer: &'a IdentityKey,
    /// The seq of the commit that started the epoch it ends (0 for epoch 0).
    pub previous_commit: u64,
}

/// A group's public view to write (after the verified handshake message appended with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewView<'a> {
    /// The group.
    pub group: &'a [u8],
    /// The verified message's seq: a snapshot's, or the one kept after the latest snapshot
    /// (ADR 0018).
    pub seq: u64,
    /// With a commit: its seq, committer and the commit before it. The stored view then keeps
    /// the state it replaces, so the commit can be reverted (ADR 0015).
    pub commit: Option<ViewCommit<'a>>,
    /// Its epoch after the message.
    pub epoch: u64,
    /// A snapshot's encoded state; `None`: the message's seq is kept after the latest
    /// snapshot.
    pub state: Option<&'a [u8]>,
    /// With a snapshot: the epoch's encoded proposals.
    pub proposals: &'a [u8],
    /// The new GroupInfo; `None`: unchanged.
    pub group_info: Option<&'a [u8]>,
}

/// A decided batch: one outcome per request, and the writes that carry them out.
#[derive(Debug)]
pub struct Decision<'a> {
    batch: &'a [AppendRequest],
    /// One per request, in batch order.
    pub outcomes: Vec<AppendOutcome>,
    /// The log entries, in batch order.
    pub entries: Vec<NewEntry<'a>>,
    /// The final head of every group the batch appended to, in first-use order.
    pub heads: Vec<NewHead<'a>>,
    /// The final state of every membership the batch changed, in first-change order.
    pub members: Vec<NewMembership<'a>>,
    /// The Welcomes to store, in batch order.
    pub welcomes: Vec<NewWelcome<'a>>,
    /// The inbox entries, in batch order (each identity's in the order it gets them).
    pub deliveries: Vec<Delivery<'a>>,
    /// The public views to write, in batch order (at most one per group: its handshake
    /// messages are verified one at a time).
    pub views: Vec<NewView<'a>>,
    /// When decided without the stored message ids: the requests refused for their epoch,
    /// whose ids may be stored ones (then their outcome is `Duplicate`: see
    /// [`found_stored`](Self::found_stored)).
    pub unchecked: Vec<usize>,
}

impl<'a> Decision<'a> {
    /// The (group, message id) of each [`unchecked`](Self::unchecked) request.
    pub fn unchecked_ids(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + '_ {
        self.unchecked.iter().filter_map(|&i| {
            let req = self.batch.get(i)?;
            Some((req.group_id.as_bytes(), req.message_id.as_slice()))
        })
    }

    /// The store holds `message_id` in `group` at `seq` (from before the batch): the unchecked
    /// requests repeating it are duplicates, not stale. Their refusal wrote nothing, and
    /// neither does a duplicate, so no other outcome or write changes.
    pub fn found_stored(&mut self, group: &[u8], message_id: &[u8], seq: u64) {
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
pub fn decide<'a>(
    batch: &'a [AppendRequest],
    mut state: State<'a>,
) -> Result<Decision<'a>, ModelError> {
    let mut decision = Decision {
        batch,
        outcomes: Vec::with_capacity(batch.len()),
        entries: Vec::new(),
        heads: Vec::new(),
        members: Vec::new(),
        welcomes: Vec::new(),
        deliveries: Vec::new(),
        views: Vec::new(),
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
mod tests;
