//! The commit driver's I/O: performs the [`CommitDriver`]'s actions against the Delivery
//! Service and the device's group, and reads a group's log in batches for whoever processes
//! it (the messenger, the load test's members).

use quicproquo_core::group::{CommitOutput, Group, GroupError};
use quicproquo_core::mls::MlsProvider;
use quicproquo_proto::errors::ErrorCode;

use super::machine::{
    Action, Answer, CommitDriver, CommitError, Committed, Event, PendingCommit, ReadReport, Start,
};
use crate::ClientError;
use crate::delivery::{CommitParts, DeliveryClient, Envelope, EnvelopeKind};

/// Entries read per fetch (the server serves up to 1000).
pub const FETCH_BATCH: u32 = 500;

/// Errors of a drive, or of a read of the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriveError<E> {
    /// A step of the caller failed (building, processing entries, saving).
    #[error(transparent)]
    Host(E),
    /// The group refused to merge or discard the pending commit.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// Sending the commit failed: after a definite refusal it was discarded; after no answer it
    /// stays pending, to be merged when it comes back through the log.
    #[error(transparent)]
    Send(ClientError),
    /// Fetching the log failed.
    #[error(transparent)]
    Fetch(ClientError),
    /// The driver gave up for a reason of its own.
    #[error(transparent)]
    GaveUp(CommitError),
}

/// Something that processes a group's log entries in order.
// capnp-rpc is single-threaded (everything runs in a `LocalSet`): no `Send` bound is wanted.
#[allow(async_fn_in_trait)]
pub trait LogReader {
    /// The caller's error.
    type Error;

    /// The last log entry processed.
    fn cursor(&self) -> u64;

    /// Processes these entries (in log order, after the cursor) and moves the cursor past
    /// them. An own commit still pending that comes back here is merged (see
    /// [`is_pending_own_commit`]). Returns false to stop reading (e.g. we were removed).
    async fn apply(&mut self, entries: &[Envelope]) -> Result<bool, Self::Error>;
}

/// The device side of a commit: its group, how it recognises its own messages, and how it
/// builds and remembers the commit.
pub trait CommitHost: LogReader {
    /// The group committed to, and the provider holding its state. Entries read while driving
    /// are processed on this same group.
    fn group(&mut self) -> Result<(&mut Group, &MlsProvider), Self::Error>;

    /// Whether a log entry is one of ours (by its message id).
    fn is_own(&self, entry: &Envelope) -> bool;

    /// Stages the commit for the group's current epoch (it stays pending).
    fn build(&mut self) -> Result<CommitOutput, Self::Error>;

    /// A fresh message id for the staged commit, remembered as ours (and the state saved,
    /// pending commit included) before it is sent.
    fn own_message_id(&mut self) -> Result<Vec<u8>, Self::Error>;

    /// The pending commit was merged: save the state.
    fn merged(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The pending commit with this message id was discarded: forget the id, save the state.
    fn discarded(&mut self, message_id: &[u8]) -> Result<(), Self::Error> {
        let _ = message_id;
        Ok(())
    }
}

/// The one rule for our own commit coming back through the log: while a commit of ours is
/// pending, an own commit (`own`: its message id is ours) for the group's current epoch is that
/// commit. The log holds it, so it ended the epoch: merge it (`Group::merge_pending_commit`)
/// instead of processing it. Anything else of ours is skipped.
pub fn is_pending_own_commit(group: &Group, entry: &Envelope, own: bool) -> bool {
    returns_pending(group.has_pending_commit(), group.epoch(), entry, own)
}

fn returns_pending(pending: bool, epoch: u64, entry: &Envelope, own: bool) -> bool {
    pending && own && entry.kind == EnvelopeKind::Commit && entry.epoch == epoch
}

/// How many of `entries` (read from the log after `asked_after`) may be applied on a reader at
/// `cursor` without skipping anything the log could still hold: entries must follow each
/// other and the cursor, except that the first new entry may lie beyond `cursor + 1` when the
/// read asked for exactly what follows the cursor (the log's own word that nothing readable
/// lies in between, e.g. before we joined). Entries at or below the cursor are repeats.
pub(crate) fn continuing(cursor: u64, asked_after: u64, entries: &[Envelope]) -> usize {
    let mut at = cursor;
    for (i, e) in entries.iter().enumerate() {
        if e.seq <= at {
            continue;
        }
        let jump_allowed = at == cursor && asked_after == cursor;
        if e.seq != at + 1 && !jump_allowed {
            return i;
        }
        at = e.seq;
    }
    entries.len()
}

/// Reads group `group_id`'s log after `after` up to and including `up_to` (`None`: to its
/// end) in batches of [`FETCH_BATCH`], handing each batch to `reader`. `stop_before` may name
/// an entry of a batch to stop in front of: the entries before it are applied and its sequence
/// number is returned. A member the server no longer counts as one reads nothing more.
///
/// Nothing is applied past a gap: a batch that does not continue the reader's cursor is
/// applied up to the gap, and the log is read again from the cursor (see [`continuing`]).
pub async fn read_log<R: LogReader>(
    delivery: &DeliveryClient,
    group_id: &[u8],
    after: u64,
    up_to: Option<u64>,
    reader: &mut R,
    mut stop_before: impl FnMut(&mut R, &[Envelope]) -> Result<Option<usize>, R::Error>,
) -> Result<Option<u64>, DriveError<R::Error>> {
    let last = up_to.unwrap_or(u64::MAX);
    let mut cursor = after;
    while cursor < last {
        let limit = u32::try_from(last - cursor).map_or(FETCH_BATCH, |n| n.min(FETCH_BATCH));
        let entries = match delivery.fetch(group_id, cursor, limit).await {
            Ok(entries) => entries,
            // Removed members can no longer read: nothing more to do.
            Err(e) if e.code() == Some(ErrorCode::NotMember) => return Ok(None),
            Err(e) => return Err(DriveError::Fetch(e)),
        };
        let stop = stop_before(reader, &entries).map_err(DriveError::Host)?;
        let batch = entries.get(..stop.unwrap_or(entries.len())).unwrap_or(&[]);
        let before = reader.cursor();
        let take = continuing(before, cursor, batch);
        if take < batch.len() {
            // A gap: apply what continues the cursor, then read again from where it got to.
            let head = batch.get(..take).unwrap_or(&[]);
            if !head.is_empty() && !reader.apply(head).await.map_err(DriveError::Host)? {
                return Ok(None);
            }
            if reader.cursor() == cursor {
                // Asked from the cursor already and nothing moved it: a reader that does not
                // advance would only loop.
                break;
            }
            cursor = reader.cursor();
            continue;
        }
        if !batch.is_empty() && !reader.apply(batch).await.map_err(DriveError::Host)? {
            return Ok(None);
        }
        if let Some(i) = stop {
            return Ok(entries.get(i).map(|e| e.seq));
        }
        let Some(end) = entries.last() else {
            break;
        };
        // A short page is not the end: the server pages by bytes as well as count. Only an
        // empty page is.
        cursor = end.seq;
    }
    Ok(None)
}

/// Gets a commit built by `host` into group `group_id`'s log and merges it, following
/// `driver` (see [`CommitDriver`] for the protocol). Returns where the commit is and the epoch
/// it began.
///
/// A failed call that ends the drive is returned as itself ([`DriveError::Send`],
/// [`DriveError::Fetch`], [`DriveError::Host`]). When the entries ahead of the commit could not
/// be read, the commit is merged all the same and that read's error is returned.
pub async fn drive<H: CommitHost>(
    delivery: &DeliveryClient,
    group_id: &[u8],
    host: &mut H,
    mut driver: CommitDriver,
    start: Start,
) -> Result<Committed, DriveError<H::Error>> {
    let mut send_error = None;
    let mut read_error = None;
    let mut action = driver.start(start);
    loop {
        let event = match action {
            Action::Read { after, up_to } => {
                match read(delivery, group_id, host, after, up_to).await {
                    Ok(report) => Event::Read(report),
                    Err(e) => {
                        read_error = Some(e);
                        Event::ReadFailed
                    }
                }
            }
            Action::Build => Event::Built(build(host)?),
            Action::Append(p) => {
                let sent = delivery
                    .send(group_id, &p.message_id, &p.commit, Some(&p.parts))
                    .await;
                Event::Answered(match sent {
                    Ok(outcome) => Answer::from_outcome(outcome),
                    Err(e) => {
                        let answer = Answer::from_error(&e);
                        send_error = Some(e);
                        answer
                    }
                })
            }
            Action::Merge { .. } => {
                let (group, provider) = host.group().map_err(DriveError::Host)?;
                let epoch = group.merge_pending_commit(provider)?;
                host.merged().map_err(DriveError::Host)?;
                Event::Merged { epoch }
            }
            Action::Discard(p) => {
                let (group, provider) = host.group().map_err(DriveError::Host)?;
                group.discard_pending_commit(provider)?;
                host.discarded(&p.message_id).map_err(DriveError::Host)?;
                Event::Discarded
            }
            Action::Done {
                committed,
                read_ahead_failed,
            } => {
                return match read_error {
                    Some(e) if read_ahead_failed => Err(e),
                    _ => Ok(committed),
                };
            }
            Action::GiveUp(reason) => return Err(gave_up(reason, send_error, read_error)),
        };
        action = driver.handle(event);
    }
}

/// The error a drive that gave up returns: the failed call that led there, if one did.
fn gave_up<E>(
    reason: CommitError,
    send_error: Option<ClientError>,
    read_error: Option<DriveError<E>>,
) -> DriveError<E> {
    let cause = match reason {
        CommitError::Refused(_) => send_error.map(DriveError::Send),
        CommitError::Unresolved => send_error.map(DriveError::Send).or(read_error),
        CommitError::ReadFailed => read_error,
        _ => None,
    };
    cause.unwrap_or(DriveError::GaveUp(reason))
}

/// Stages the commit and gives it a message id.
fn build<H: CommitHost>(host: &mut H) -> Result<PendingCommit, DriveError<H::Error>> {
    let out = host.build().map_err(DriveError::Host)?;
    let message_id = host.own_message_id().map_err(DriveError::Host)?;
    Ok(PendingCommit {
        message_id,
        epoch: out.epoch,
        commit: out.commit,
        parts: CommitParts {
            welcome: out.welcome,
            group_info: out.group_info,
        },
    })
}

/// Reads the log for the driver, stopping in front of our pending commit.
async fn read<H: CommitHost>(
    delivery: &DeliveryClient,
    group_id: &[u8],
    host: &mut H,
    after: u64,
    up_to: Option<u64>,
) -> Result<ReadReport, DriveError<H::Error>> {
    let own_commit = read_log(delivery, group_id, after, up_to, host, own_commit_index).await?;
    let cursor = host.cursor();
    let (group, _) = host.group().map_err(DriveError::Host)?;
    Ok(ReadReport {
        cursor,
        epoch: group.epoch(),
        pending: group.has_pending_commit(),
        own_commit,
    })
}

/// Where our pending commit is in `entries`, if it is there.
fn own_commit_index<H: CommitHost>(
    host: &mut H,
    entries: &[Envelope],
) -> Result<Option<usize>, H::Error> {
    let (pending, epoch) = {
        let (group, _) = host.group()?;
        (group.has_pending_commit(), group.epoch())
    };
    Ok(entries
        .iter()
        .position(|e| returns_pending(pending, epoch, e, host.is_own(e))))
}

#[cfg(test)]
mod tests {
    use super::continuing;
    use crate::delivery::{Envelope, EnvelopeKind};

    fn entries(seqs: &[u64]) -> Vec<Envelope> {
        seqs.iter()
            .map(|&seq| Envelope {
                group_id: vec![1; 16],
                seq,
                epoch: 0,
                kind: EnvelopeKind::Application,
                message_id: vec![seq as u8],
                payload: Vec::new(),
                appended_at_micros: 0,
            })
            .collect()
    }

    #[test]
    fn a_read_batch_is_applied_only_as_far_as_it_continues_the_cursor() {
        // Following on, with repeats: all of it.
        assert_eq!(continuing(4, 4, &entries(&[5, 6, 7])), 3);
        assert_eq!(continuing(4, 4, &entries(&[4, 5, 5, 6])), 4);
        // A gap inside the batch: up to it.
        assert_eq!(continuing(4, 4, &entries(&[5, 6, 8, 9])), 2);
        // Asked from the cursor, the log's first entry may lie beyond it (before we joined),
        // but what follows must follow on.
        assert_eq!(continuing(4, 4, &entries(&[9, 10])), 2);
        assert_eq!(continuing(4, 4, &entries(&[9, 11])), 1);
        // Asked from beyond the cursor: the entries in between were never read.
        assert_eq!(continuing(4, 6, &entries(&[7, 8])), 0);
        assert_eq!(continuing(4, 6, &entries(&[3, 4, 7])), 2);
        assert_eq!(continuing(4, 6, &[]), 0);
    }
}
