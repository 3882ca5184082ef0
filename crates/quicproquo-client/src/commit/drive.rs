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

/// Reads group `group_id`'s log after `after` up to and including `up_to` (`None`: to its
/// end) in batches of [`FETCH_BATCH`], handing each batch to `reader`. `stop_before` may name
/// an entry of a batch to stop in front of: the entries before it are applied and its sequence
/// number is returned. A member the server no longer counts as one reads nothing more.
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
        if !batch.is_empty() && !reader.apply(batch).await.map_err(DriveError::Host)? {
            return Ok(None);
        }
        if let Some(i) = stop {
            return Ok(entries.get(i).map(|e| e.seq));
        }
        let Some(end) = entries.last() else {
            break;
        };
        cursor = end.seq;
        if entries.len() < limit as usize {
            break;
        }
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
            added: out.added,
            removed: out.removed,
            welcome: out.welcome,
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
