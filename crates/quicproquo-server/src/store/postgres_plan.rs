//! Deciding an append batch for the Postgres store, in memory, from the state it read under
//! the groups' row locks: the same checks, in the same order, as the embedded store applies
//! row by row (unknown group, not a member, duplicate message id, stale epoch), each request
//! seeing the effects of the ones before it. The result is the outcomes plus the rows to write,
//! as column arrays for `unnest`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use super::StoreError;
use super::log::{AppendOutcome, AppendRequest, EntryKind, epoch_accepted};

/// What a batch must read: its distinct groups, the memberships its requests depend on (each
/// sender, each member a commit removes) and, when it probes for them, its message ids, as
/// `unnest` parameter arrays.
pub(super) struct BatchKeys<'a> {
    index: HashMap<&'a [u8], usize>,
    /// Distinct group ids, in first-use order (a group's index is its position).
    pub(super) groups: Vec<&'a [u8]>,
    pub(super) member_groups: Vec<&'a [u8]>,
    pub(super) member_identities: Vec<&'a [u8]>,
    pub(super) id_groups: Vec<&'a [u8]>,
    pub(super) message_ids: Vec<&'a [u8]>,
}

impl<'a> BatchKeys<'a> {
    /// The keys of `batch` (its message ids only if `with_message_ids`).
    pub(super) fn of(batch: &'a [AppendRequest], with_message_ids: bool) -> Self {
        let mut keys = Self {
            index: HashMap::new(),
            groups: Vec::new(),
            member_groups: Vec::new(),
            member_identities: Vec::new(),
            id_groups: Vec::new(),
            message_ids: Vec::new(),
        };
        let mut pairs = HashSet::new();
        let mut ids = HashSet::new();
        for req in batch {
            let group = req.group_id.as_bytes();
            let next = keys.groups.len();
            let g = *keys.index.entry(group).or_insert(next);
            if g == next {
                keys.groups.push(group);
            }
            let removed = match (&req.kind, &req.commit) {
                (EntryKind::Commit, Some(change)) => change.removed.as_slice(),
                _ => &[],
            };
            for who in std::iter::once(&req.sender).chain(removed) {
                if pairs.insert((g, *who.as_bytes())) {
                    keys.member_groups.push(group);
                    keys.member_identities.push(who.as_bytes().as_slice());
                }
            }
            if with_message_ids && ids.insert((g, req.message_id.as_slice())) {
                keys.id_groups.push(group);
                keys.message_ids.push(&req.message_id);
            }
        }
        keys
    }
}

#[derive(Debug, Clone, Copy)]
struct GroupState {
    epoch: u64,
    last_seq: u64,
    last_commit_seq: u64,
    changed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Membership {
    joined: u64,
    left: Option<u64>,
    changed: bool,
}

/// An identity's bytes: memberships are keyed by them (no need to re-validate stored keys).
type Identity = [u8; 32];

/// The stored state a batch is decided against.
pub(super) struct State<'a> {
    index: HashMap<&'a [u8], usize>,
    names: Vec<&'a [u8]>,
    /// By group index; `None`: no such group.
    groups: Vec<Option<GroupState>>,
    members: HashMap<(usize, Identity), Membership>,
    /// By group index: message id → seq (stored ones copied, the batch's borrowed).
    message_ids: Vec<HashMap<Cow<'a, [u8]>, u64>>,
}

impl<'a> State<'a> {
    /// Nothing known yet about `keys`' groups.
    pub(super) fn new(keys: &BatchKeys<'a>) -> Self {
        Self {
            index: keys.index.clone(),
            names: keys.groups.clone(),
            groups: vec![None; keys.groups.len()],
            members: HashMap::new(),
            message_ids: vec![HashMap::new(); keys.groups.len()],
        }
    }

    /// Records a stored group (ignored if the batch does not name it).
    pub(super) fn set_group(&mut self, group: &[u8], epoch: u64, last_seq: u64, last_commit: u64) {
        if let Some(&g) = self.index.get(group) {
            self.groups[g] = Some(GroupState {
                epoch,
                last_seq,
                last_commit_seq: last_commit,
                changed: false,
            });
        }
    }

    /// Records a stored membership (`left` is `None` while a member).
    pub(super) fn set_member(
        &mut self,
        group: &[u8],
        identity: &[u8],
        joined: u64,
        left: Option<u64>,
    ) -> Result<(), StoreError> {
        let identity = Identity::try_from(identity)
            .map_err(|_| StoreError::Corrupt("stored identity".into()))?;
        if let Some(&g) = self.index.get(group) {
            self.members.insert(
                (g, identity),
                Membership {
                    joined,
                    left,
                    changed: false,
                },
            );
        }
        Ok(())
    }

    /// Records a stored message id.
    pub(super) fn set_message_id(&mut self, group: &[u8], message_id: &[u8], seq: u64) {
        if let Some(&g) = self.index.get(group) {
            self.message_ids[g].insert(Cow::Owned(message_id.to_vec()), seq);
        }
    }
}

/// Log rows to insert.
#[derive(Default)]
pub(super) struct LogRows<'a> {
    pub(super) groups: Vec<&'a [u8]>,
    pub(super) seqs: Vec<i64>,
    pub(super) epochs: Vec<i64>,
    pub(super) kinds: Vec<i16>,
    pub(super) message_ids: Vec<&'a [u8]>,
    pub(super) payloads: Vec<&'a [u8]>,
}

/// Groups rows to update (their final state).
#[derive(Default)]
pub(super) struct GroupRows<'a> {
    pub(super) groups: Vec<&'a [u8]>,
    pub(super) epochs: Vec<i64>,
    pub(super) last_seqs: Vec<i64>,
    pub(super) last_commit_seqs: Vec<i64>,
}

/// Memberships to upsert (their final state, each once).
#[derive(Default)]
pub(super) struct MemberRows<'a> {
    pub(super) groups: Vec<&'a [u8]>,
    pub(super) identities: Vec<Vec<u8>>,
    pub(super) joined: Vec<i64>,
    pub(super) left: Vec<Option<i64>>,
}

/// Welcomes to store, one per commit that adds members.
#[derive(Default)]
pub(super) struct WelcomeRows<'a> {
    pub(super) groups: Vec<&'a [u8]>,
    pub(super) commit_seqs: Vec<i64>,
    pub(super) payloads: Vec<&'a [u8]>,
}

/// Inbox entries in batch order; each names its Welcome by (group, commit seq).
#[derive(Default)]
pub(super) struct InboxRows<'a> {
    pub(super) identities: Vec<&'a [u8]>,
    pub(super) groups: Vec<&'a [u8]>,
    pub(super) commit_seqs: Vec<i64>,
}

/// The decided batch: one outcome per request and the rows that carry them out.
#[derive(Default)]
pub(super) struct Plan<'a> {
    pub(super) outcomes: Vec<AppendOutcome>,
    pub(super) log: LogRows<'a>,
    pub(super) groups: GroupRows<'a>,
    pub(super) members: MemberRows<'a>,
    pub(super) welcomes: WelcomeRows<'a>,
    pub(super) inbox: InboxRows<'a>,
}

/// A sequence number or epoch as a `BIGINT`.
fn bigint(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n)
        .map_err(|_| StoreError::Corrupt("a sequence number or epoch overflowed".into()))
}

impl<'a> Plan<'a> {
    /// Judges each request of `batch` in order against `state` and what the earlier requests
    /// did.
    pub(super) fn decide(
        batch: &'a [AppendRequest],
        mut state: State<'a>,
    ) -> Result<Self, StoreError> {
        let mut plan = Self::default();
        let mut changed_members = Vec::new();
        for req in batch {
            let group = req.group_id.as_bytes();
            let Some(&g) = state.index.get(group) else {
                return Err(StoreError::Corrupt("a batch group was not read".into()));
            };
            let Some(gs) = state.groups[g].as_mut() else {
                plan.outcomes.push(AppendOutcome::UnknownGroup);
                continue;
            };
            let current = state
                .members
                .get(&(g, *req.sender.as_bytes()))
                .is_some_and(|m| m.left.is_none());
            if !current {
                plan.outcomes.push(AppendOutcome::NotMember);
                continue;
            }
            if let Some(&seq) = state.message_ids[g].get(req.message_id.as_slice()) {
                plan.outcomes.push(AppendOutcome::Duplicate { seq });
                continue;
            }
            if !epoch_accepted(req.kind, req.epoch, gs.epoch) {
                plan.outcomes.push(AppendOutcome::StaleEpoch {
                    current_epoch: gs.epoch,
                    winner_seq: gs.last_commit_seq,
                });
                continue;
            }
            let seq = gs.last_seq + 1;
            let seq_i = bigint(seq)?;
            plan.log.groups.push(group);
            plan.log.seqs.push(seq_i);
            plan.log.epochs.push(bigint(req.epoch)?);
            plan.log.kinds.push(i16::from(req.kind.code()));
            plan.log.message_ids.push(&req.message_id);
            plan.log.payloads.push(&req.payload);
            state.message_ids[g].insert(Cow::Borrowed(&req.message_id), seq);
            gs.last_seq = seq;
            gs.changed = true;
            if req.kind == EntryKind::Commit {
                gs.epoch += 1;
                gs.last_commit_seq = seq;
            }
            if let (EntryKind::Commit, Some(change)) = (req.kind, &req.commit) {
                for gone in &change.removed {
                    let key = (g, *gone.as_bytes());
                    if let Some(m) = state.members.get_mut(&key)
                        && m.left.is_none()
                    {
                        m.left = Some(seq);
                        if !m.changed {
                            m.changed = true;
                            changed_members.push(key);
                        }
                    }
                }
                let welcome = change.welcome.as_ref().filter(|_| !change.added.is_empty());
                if let Some(welcome) = welcome {
                    plan.welcomes.groups.push(group);
                    plan.welcomes.commit_seqs.push(seq_i);
                    plan.welcomes.payloads.push(welcome);
                }
                for new in &change.added {
                    let key = (g, *new.as_bytes());
                    let m = state.members.entry(key).or_insert(Membership {
                        joined: seq,
                        left: None,
                        changed: false,
                    });
                    (m.joined, m.left) = (seq, None);
                    if !m.changed {
                        m.changed = true;
                        changed_members.push(key);
                    }
                    if welcome.is_some() {
                        plan.inbox.identities.push(new.as_bytes().as_slice());
                        plan.inbox.groups.push(group);
                        plan.inbox.commit_seqs.push(seq_i);
                    }
                }
            }
            plan.outcomes.push(AppendOutcome::Appended {
                seq,
                epoch: gs.epoch,
            });
        }
        for (g, gs) in state.groups.iter().enumerate() {
            if let Some(gs) = gs.filter(|gs| gs.changed) {
                plan.groups.groups.push(state.names[g]);
                plan.groups.epochs.push(bigint(gs.epoch)?);
                plan.groups.last_seqs.push(bigint(gs.last_seq)?);
                plan.groups
                    .last_commit_seqs
                    .push(bigint(gs.last_commit_seq)?);
            }
        }
        for key in changed_members {
            let Some(m) = state.members.get(&key) else {
                continue;
            };
            plan.members.groups.push(state.names[key.0]);
            plan.members.identities.push(key.1.to_vec());
            plan.members.joined.push(bigint(m.joined)?);
            plan.members.left.push(m.left.map(bigint).transpose()?);
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::log::{CommitChange, GroupId};
    use quicproquo_core::{IdentityKey, IdentityKeypair};

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
            payload: mid.as_bytes().to_vec(),
            commit: None,
        }
    }

    #[test]
    fn a_batch_sees_its_own_commits() -> anyhow::Result<()> {
        let alice = IdentityKeypair::generate()?.public();
        let bob = IdentityKeypair::generate()?.public();
        let mut add_bob = req("g", alice, EntryKind::Commit, 3, "c1");
        add_bob.commit = Some(CommitChange {
            added: vec![bob, bob],
            removed: vec![],
            welcome: Some(b"w".to_vec()),
        });
        let mut drop_bob = req("g", alice, EntryKind::Commit, 4, "c2");
        drop_bob.commit = Some(CommitChange {
            added: vec![],
            removed: vec![bob],
            welcome: None,
        });
        let batch = vec![
            req("g", bob, EntryKind::Application, 3, "b0"),
            add_bob,
            req("g", bob, EntryKind::Application, 4, "b1"),
            req("g", alice, EntryKind::Proposal, 3, "p"),
            drop_bob,
            req("g", bob, EntryKind::Application, 5, "b2"),
            req("g", alice, EntryKind::Application, 5, "b1"),
            req("nope", alice, EntryKind::Application, 0, "x"),
        ];
        let keys = BatchKeys::of(&batch, true);
        assert_eq!(keys.message_ids.len(), 7, "one per distinct (group, id)");
        assert!(BatchKeys::of(&batch, false).message_ids.is_empty());
        assert_eq!(keys.groups.len(), 2);
        assert_eq!(
            keys.member_groups.len(),
            3,
            "alice and bob in g (each once), alice in nope"
        );
        let mut state = State::new(&keys);
        state.set_group(b"g", 3, 10, 7);
        state.set_member(b"g", alice.as_bytes(), 0, None)?;
        let plan = Plan::decide(&batch, state)?;
        assert_eq!(
            plan.outcomes,
            vec![
                AppendOutcome::NotMember,
                AppendOutcome::Appended { seq: 11, epoch: 4 },
                AppendOutcome::Appended { seq: 12, epoch: 4 },
                AppendOutcome::StaleEpoch {
                    current_epoch: 4,
                    winner_seq: 11
                },
                AppendOutcome::Appended { seq: 13, epoch: 5 },
                AppendOutcome::NotMember,
                AppendOutcome::Duplicate { seq: 12 },
                AppendOutcome::UnknownGroup,
            ]
        );
        assert_eq!(plan.log.seqs, vec![11, 12, 13]);
        assert_eq!(plan.groups.last_seqs, vec![13]);
        assert_eq!(plan.groups.last_commit_seqs, vec![13]);
        assert_eq!(plan.members.joined, vec![11], "bob once, final state");
        assert_eq!(plan.members.left, vec![Some(13)]);
        assert_eq!(plan.welcomes.commit_seqs, vec![11]);
        assert_eq!(plan.inbox.commit_seqs, vec![11, 11], "one entry per add");
        Ok(())
    }
}
