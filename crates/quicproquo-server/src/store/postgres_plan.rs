//! The Postgres side of an append batch (see `postgres_log` for the transaction): the keys its
//! decision reads ([`Reads`]) and the writes it decided ([`Decision`]) as column arrays (for
//! `unnest`, and the log rows for `COPY`: `postgres_copy`), and the statements that take them.
//! `postgres_pipeline` sends them in two round trips.

use super::StoreError;
use crate::model::decide::{Decision, Reads};

/// What a batch must read, as `unnest` parameter arrays: its distinct groups, the memberships
/// its requests depend on and, when it probes for them, its message ids.
pub(super) struct BatchKeys<'a> {
    /// Distinct group ids, in first-use order.
    pub(super) groups: Vec<&'a [u8]>,
    pub(super) member_groups: Vec<&'a [u8]>,
    pub(super) member_identities: Vec<&'a [u8]>,
    pub(super) id_groups: Vec<&'a [u8]>,
    pub(super) message_ids: Vec<&'a [u8]>,
}

impl<'a> BatchKeys<'a> {
    /// The arrays of `reads`.
    pub(super) fn of(reads: &Reads<'a>) -> Self {
        let (member_groups, member_identities) = reads
            .members
            .iter()
            .map(|&(group, identity)| (group, identity.as_bytes().as_slice()))
            .unzip();
        let (id_groups, message_ids) = reads.message_ids.iter().copied().unzip();
        Self {
            groups: reads.groups.clone(),
            member_groups,
            member_identities,
            id_groups,
            message_ids,
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

/// Public views to write (a `NULL` state: no snapshot; a `NULL` GroupInfo keeps the stored
/// one).
#[derive(Default)]
pub(super) struct ViewRows<'a> {
    pub(super) groups: Vec<&'a [u8]>,
    pub(super) epochs: Vec<i64>,
    pub(super) states: Vec<Option<&'a [u8]>>,
    pub(super) proposals: Vec<&'a [u8]>,
    pub(super) group_infos: Vec<Option<&'a [u8]>>,
    /// With a commit: its seq (`NULL`: a proposal, the kept earlier view stays).
    pub(super) commit_seqs: Vec<Option<i64>>,
    pub(super) committers: Vec<Option<&'a [u8]>>,
    pub(super) previous_commits: Vec<Option<i64>>,
    /// The verified message's seq (kept after the snapshot unless it is one).
    pub(super) seqs: Vec<i64>,
}

/// The (group, message id) pairs of the requests a decision refused for their epoch without
/// knowing whether their ids are stored ([`Decision::unchecked`]).
#[derive(Default)]
pub(super) struct UncheckedIds<'a> {
    pub(super) groups: Vec<&'a [u8]>,
    pub(super) message_ids: Vec<&'a [u8]>,
}

/// A decided batch's writes as column arrays.
#[derive(Default)]
pub(super) struct Plan<'a> {
    pub(super) log: LogRows<'a>,
    pub(super) groups: GroupRows<'a>,
    pub(super) members: MemberRows<'a>,
    pub(super) welcomes: WelcomeRows<'a>,
    pub(super) inbox: InboxRows<'a>,
    pub(super) views: ViewRows<'a>,
    pub(super) unchecked: UncheckedIds<'a>,
}

/// A sequence number or epoch as a `BIGINT`.
fn bigint(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n)
        .map_err(|_| StoreError::Corrupt("a sequence number or epoch overflowed".into()))
}

impl<'a> Plan<'a> {
    /// The column arrays of `decision`'s writes.
    pub(super) fn of(decision: &Decision<'a>) -> Result<Self, StoreError> {
        let mut plan = Self::default();
        for e in &decision.entries {
            plan.log.groups.push(e.group);
            plan.log.seqs.push(bigint(e.seq)?);
            plan.log.epochs.push(bigint(e.epoch)?);
            plan.log.kinds.push(i16::from(e.kind.code()));
            plan.log.message_ids.push(e.message_id);
            plan.log.payloads.push(e.payload);
        }
        for h in &decision.heads {
            plan.groups.groups.push(h.group);
            plan.groups.epochs.push(bigint(h.head.epoch)?);
            plan.groups.last_seqs.push(bigint(h.head.last_seq)?);
            plan.groups
                .last_commit_seqs
                .push(bigint(h.head.last_commit_seq)?);
        }
        for m in &decision.members {
            plan.members.groups.push(m.group);
            plan.members.identities.push(m.identity.to_vec());
            plan.members.joined.push(bigint(m.membership.joined)?);
            let left = m.membership.left.map(bigint).transpose()?;
            plan.members.left.push(left);
        }
        for w in &decision.welcomes {
            plan.welcomes.groups.push(w.group);
            plan.welcomes.commit_seqs.push(bigint(w.commit_seq)?);
            plan.welcomes.payloads.push(w.payload);
        }
        for d in &decision.deliveries {
            plan.inbox.identities.push(d.identity.as_bytes().as_slice());
            plan.inbox.groups.push(d.group);
            plan.inbox.commit_seqs.push(bigint(d.commit_seq)?);
        }
        for v in &decision.views {
            plan.views.groups.push(v.group);
            plan.views.epochs.push(bigint(v.epoch)?);
            plan.views.states.push(v.state);
            plan.views.proposals.push(v.proposals);
            plan.views.group_infos.push(v.group_info);
            let commit = v.commit.map(|c| (c.seq, c.committer, c.previous_commit));
            plan.views
                .commit_seqs
                .push(commit.map(|c| bigint(c.0)).transpose()?);
            plan.views
                .committers
                .push(commit.map(|c| c.1.as_bytes().as_slice()));
            plan.views
                .previous_commits
                .push(commit.map(|c| bigint(c.2)).transpose()?);
            plan.views.seqs.push(bigint(v.seq)?);
        }
        for (group, message_id) in decision.unchecked_ids() {
            plan.unchecked.groups.push(group);
            plan.unchecked.message_ids.push(message_id);
        }
        Ok(plan)
    }
}

/// The statements of an append batch, which take the arrays above.
pub(super) mod append_sql {
    /// Writes the public view of each group a verified handshake message was appended to
    /// (ADR 0018): the epoch and GroupInfo (a `NULL` GroupInfo keeps the stored one), and
    /// either a snapshot (a non-`NULL` state) or the message's seq after the latest one. A
    /// new snapshot keeps the one before it and the messages after that (so the latest commit
    /// can be reverted even when it took the snapshot) and drops anything older. A commit (a
    /// commit seq) also keeps the epoch, GroupInfo and commit seq it replaces, and its
    /// committer, so it can be reverted (ADR 0015); the right-hand sides read the row as it
    /// was before this update. A batch holds at most one view per group.
    pub(in crate::store) const UPDATE_VIEWS: &str = "
        WITH u AS (
            SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bytea[], $4::bytea[],
                                 $5::bytea[], $6::bigint[], $7::bytea[], $8::bigint[],
                                 $9::bigint[])
                AS u (group_id, epoch, state, proposals, group_info, commit_seq, committer,
                      previous_commit, seq)
        ),
        views AS (
            UPDATE group_views v SET
                epoch = u.epoch,
                group_info = COALESCE(u.group_info, v.group_info),
                commit_seq = COALESCE(u.commit_seq, v.commit_seq),
                committer = CASE WHEN u.commit_seq IS NULL THEN v.committer ELSE u.committer END,
                prev_epoch = CASE WHEN u.commit_seq IS NULL THEN v.prev_epoch ELSE v.epoch END,
                prev_group_info =
                    CASE WHEN u.commit_seq IS NULL THEN v.prev_group_info ELSE v.group_info END,
                prev_commit_seq =
                    CASE WHEN u.commit_seq IS NULL THEN v.prev_commit_seq ELSE u.previous_commit END
            FROM u
            WHERE v.group_id = u.group_id
            RETURNING 1
        ),
        latest AS (
            SELECT s.group_id, max(s.seq) AS seq
            FROM view_snapshots AS s JOIN u ON u.group_id = s.group_id
            WHERE u.state IS NOT NULL
            GROUP BY s.group_id
        ),
        snapshots AS (
            INSERT INTO view_snapshots (group_id, seq, state, proposals)
            SELECT group_id, seq, state, proposals FROM u WHERE state IS NOT NULL
            RETURNING 1
        ),
        older AS (
            DELETE FROM view_snapshots AS s USING latest
            WHERE s.group_id = latest.group_id AND s.seq < latest.seq
            RETURNING 1
        ),
        replayed AS (
            DELETE FROM view_tail AS t USING latest
            WHERE t.group_id = latest.group_id AND t.seq <= latest.seq
            RETURNING 1
        ),
        tail AS (
            INSERT INTO view_tail (group_id, seq)
            SELECT group_id, seq FROM u WHERE state IS NULL
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM views), (SELECT count(*) FROM snapshots),
               (SELECT count(*) FROM older), (SELECT count(*) FROM replayed),
               (SELECT count(*) FROM tail)";

    /// Locks the batch's groups in one order (no deadlock between batches) and reads them.
    /// `FOR UPDATE` after a wait returns the row as the previous holder committed it.
    pub(in crate::store) const LOCK_GROUPS: &str = "
        SELECT group_id, epoch, last_seq, last_commit_seq FROM groups
        WHERE group_id = ANY($1::bytea[])
        ORDER BY group_id
        FOR UPDATE";

    /// The memberships named by `($1[i], $2[i])`. The `LIMIT` keeps the planner from turning
    /// the lateral lookup into a join (which, with a plan cached while the table was small,
    /// could become a scan of the whole table): each lookup is one primary-key probe.
    pub(in crate::store) const READ_MEMBERS: &str = "
        SELECT k.group_id, k.identity, m.joined_seq, m.left_seq
        FROM unnest($1::bytea[], $2::bytea[]) AS k (group_id, identity)
        CROSS JOIN LATERAL (
            SELECT joined_seq, left_seq FROM members
            WHERE group_id = k.group_id AND identity = k.identity
            LIMIT 1
        ) AS m";

    /// The message ids among `($1[i], $2[i])` already in the log: one probe of the unique index
    /// each, never a scan of the log (see `READ_MEMBERS`).
    pub(in crate::store) const READ_MESSAGE_IDS: &str = "
        SELECT k.group_id, k.message_id, l.seq
        FROM unnest($1::bytea[], $2::bytea[]) AS k (group_id, message_id)
        CROSS JOIN LATERAL (
            SELECT seq FROM group_log
            WHERE group_id = k.group_id AND message_id = k.message_id
            LIMIT 1
        ) AS l";

    /// The redundant `ANY` gives the groups side an index condition whatever join the
    /// planner picks.
    pub(in crate::store) const UPDATE_GROUPS: &str = "
        UPDATE groups AS g
        SET epoch = u.epoch, last_seq = u.last_seq, last_commit_seq = u.last_commit_seq
        FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bigint[])
            AS u (group_id, epoch, last_seq, last_commit_seq)
        WHERE g.group_id = u.group_id AND g.group_id = ANY($1::bytea[])";

    /// Writes the final state of every membership the batch changed (each key once).
    pub(in crate::store) const UPSERT_MEMBERS: &str = "
        INSERT INTO members (group_id, identity, joined_seq, left_seq)
        SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bigint[], $4::bigint[])
        ON CONFLICT (group_id, identity)
        DO UPDATE SET joined_seq = EXCLUDED.joined_seq, left_seq = EXCLUDED.left_seq";

    /// Stores each Welcome once and appends one inbox row per added member: the n-th entry for
    /// an identity in the batch gets its counter's old value + n, the counters being locked in
    /// identity order.
    pub(in crate::store) const DELIVER_WELCOMES: &str = "
        WITH w AS (
            INSERT INTO welcomes (group_id, commit_seq, payload)
            SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bytea[])
            RETURNING id, group_id, commit_seq
        ),
        e AS (
            SELECT identity, group_id, commit_seq,
                   row_number() OVER (PARTITION BY identity ORDER BY ord) AS nth,
                   count(*) OVER (PARTITION BY identity) AS n
            FROM unnest($4::bytea[], $5::bytea[], $6::bigint[]) WITH ORDINALITY
                AS e (identity, group_id, commit_seq, ord)
        ),
        heads AS (
            INSERT INTO inbox_heads AS h (identity, last_seq)
            SELECT identity, count(*) FROM e GROUP BY identity ORDER BY identity
            ON CONFLICT (identity) DO UPDATE SET last_seq = h.last_seq + EXCLUDED.last_seq
            RETURNING identity, last_seq
        )
        INSERT INTO inbox (identity, seq, group_id, commit_seq, welcome_id)
        SELECT e.identity, heads.last_seq - e.n + e.nth, e.group_id, e.commit_seq, w.id
        FROM e
        JOIN heads ON heads.identity = e.identity
        JOIN w ON w.group_id = e.group_id AND w.commit_seq = e.commit_seq";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decide::{GroupHead, Membership, State, decide};
    use crate::model::group::{AppendRequest, CommitChange, EntryKind, GroupId};
    use anyhow::{Result, ensure};
    use quicproquo_core::{IdentityKey, IdentityKeypair};

    fn req(sender: IdentityKey, kind: EntryKind, epoch: u64, mid: &str) -> Result<AppendRequest> {
        Ok(AppendRequest {
            group_id: GroupId::new(b"g")?,
            sender,
            message_id: mid.as_bytes().to_vec(),
            kind,
            epoch,
            payload: mid.as_bytes().to_vec(),
            commit: None,
            view: None,
        })
    }

    #[test]
    fn a_decision_becomes_one_array_per_column() -> Result<()> {
        let alice = IdentityKeypair::generate()?.public();
        let (bob, carol) = (
            IdentityKeypair::generate()?.public(),
            IdentityKeypair::generate()?.public(),
        );
        let mut add = req(alice, EntryKind::Commit, 3, "c1")?;
        add.commit = Some(CommitChange {
            added: vec![bob, carol],
            removed: vec![alice],
            welcome: Some(b"w".to_vec()),
            group_info: None,
        });
        let batch = vec![
            req(alice, EntryKind::Application, 3, "a")?,
            add,
            req(bob, EntryKind::Commit, 1, "late")?,
        ];
        let reads = Reads::of(&batch, false);
        let keys = BatchKeys::of(&reads);
        ensure!(keys.groups == vec![&b"g"[..]]);
        ensure!(keys.member_identities == vec![&alice.as_bytes()[..], &bob.as_bytes()[..]]);
        ensure!(keys.member_groups.len() == 2 && keys.message_ids.is_empty());
        ensure!(BatchKeys::of(&Reads::of(&batch, true)).id_groups.len() == 3);

        let mut state = State::new(&reads);
        let head = GroupHead {
            epoch: 3,
            last_seq: 10,
            last_commit_seq: 7,
        };
        state.set_group(b"g", head);
        let creator = Membership {
            joined: 0,
            left: None,
        };
        state.set_member(b"g", alice.as_bytes(), creator)?;
        let plan = Plan::of(&decide(&batch, state)?)?;
        ensure!(plan.log.seqs == vec![11, 12] && plan.log.kinds == vec![0, 1]);
        ensure!(plan.log.epochs == vec![3, 3]);
        ensure!(plan.groups.epochs == vec![4] && plan.groups.last_seqs == vec![12]);
        ensure!(plan.groups.last_commit_seqs == vec![12]);
        ensure!(plan.members.joined == vec![0, 12, 12]);
        ensure!(plan.members.left == vec![Some(12), None, None]);
        ensure!(plan.welcomes.commit_seqs == vec![12] && plan.welcomes.payloads == vec![&b"w"[..]]);
        ensure!(plan.inbox.identities == vec![&bob.as_bytes()[..], &carol.as_bytes()[..]]);
        ensure!(plan.inbox.commit_seqs == vec![12, 12]);
        ensure!(plan.unchecked.message_ids == vec![&b"late"[..]]);
        Ok(())
    }
}
