//! A store-level check both stores run in their unit tests (unit tests, so that the Postgres
//! store can also assert that it decided the case without reading its stored ids): a request
//! repeating a stored message id and refused for its epoch.

use anyhow::{Result, ensure};
use quicproquo_core::{IdentityKey, IdentityKeypair};

use crate::model::group::{AppendOutcome, AppendRequest, CommitChange, EntryKind, GroupId};
use crate::store::Store;
use crate::store::log::LogStore;

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
        view: None,
    }
}

/// A commit retried after it moved the group (its answer was lost) is a `Duplicate` with
/// its seq, not `StaleEpoch`; a new request refused for its epoch stays refused even when
/// a later request of the batch appends its id.
pub(super) async fn a_repeat_refused_for_its_epoch_is_a_duplicate<S>(store: &S) -> Result<()>
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
