//! Unit tests of the append decision: no database, only the pure function.

use super::*;
use crate::model::group::{APPLICATION_EPOCH_LAG, GroupId};
use anyhow::{Result, ensure};
use quicproquo_core::IdentityKeypair;

fn who() -> Result<IdentityKey> {
    Ok(IdentityKeypair::generate()?.public())
}

fn req(group: &str, sender: IdentityKey, kind: EntryKind, epoch: u64, mid: &str) -> AppendRequest {
    AppendRequest {
        group_id: GroupId::new(group.as_bytes()).unwrap_or_else(|e| panic!("{e}")),
        sender,
        message_id: mid.as_bytes().to_vec(),
        kind,
        epoch,
        payload: format!("payload {mid}").into_bytes(),
        commit: None,
        view: None,
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
            group_info: None,
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
        group_info: None,
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
        group_info: None,
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
    ensure!(matches!(
        decide(&batch, state),
        Err(ModelError::Inconsistent(_))
    ));
    let full = head(0, u64::MAX, 0);
    let overflow = decide_on(&batch, full, &[(alice, member(0, None))], &[], true);
    ensure!(overflow.is_err(), "a full log takes no more entries");
    let mut state = State::new(&Reads::of(&batch, true));
    ensure!(state.set_member(b"g", b"short", member(0, None)).is_err());
    Ok(())
}

#[test]
fn an_unverified_handshake_message_is_never_appended() -> Result<()> {
    let alice = who()?;
    // A commit for the group's epoch that the owner could not verify (its view was at a later
    // epoch, and a revert moved the group back meanwhile): stale, or its first seq if a retry.
    let mut c = commit(alice, 3, "c", &[], &[]);
    c.view = Some(crate::model::group::ViewWrite {
        unverified: true,
        ..Default::default()
    });
    let batch = vec![c];
    let members = [(alice, member(0, None))];
    let d = decide_on(&batch, head(3, 9, 7), &members, &[], true)?;
    ensure!(d.outcomes == vec![stale(3, 7)], "{:?}", d.outcomes);
    ensure!(d.entries.is_empty() && d.views.is_empty());
    let d = decide_on(&batch, head(3, 9, 7), &members, &[("c", 8)], true)?;
    ensure!(d.outcomes == vec![AppendOutcome::Duplicate { seq: 8 }]);
    Ok(())
}
