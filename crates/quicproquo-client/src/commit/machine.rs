//! The commit protocol as a pure state machine: no I/O, no async, no MLS. It is told what
//! happened ([`Event`]) and answers what to do next ([`Action`]); [`super::drive`] performs the
//! actions against the server and the group, and the unit tests play the server in memory.

use quicproquo_proto::errors::ErrorCode;

use crate::ClientError;
use crate::delivery::{CommitParts, SendOutcome};

/// A staged commit on its way into the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCommit {
    /// The message id it is appended under. Appending it again reuses the id, so a server that
    /// already holds it answers [`Answer::Duplicate`] instead of appending it twice.
    pub message_id: Vec<u8>,
    /// The epoch it is for (the group's epoch when it was staged).
    pub epoch: u64,
    /// The serialized commit.
    pub commit: Vec<u8>,
    /// Its membership change and Welcome.
    pub parts: CommitParts,
}

/// How the server answered an append, or that no answer came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Appended at `seq`.
    Appended {
        /// Its position in the log.
        seq: u64,
    },
    /// Our message id was appended before, at `seq` (an earlier append whose answer was lost).
    Duplicate {
        /// Its position in the log.
        seq: u64,
    },
    /// Another commit won the epoch; ours is not in the log and never will be.
    StaleEpoch {
        /// The group's epoch.
        current_epoch: u64,
        /// Where the winning commit is.
        winner_seq: u64,
    },
    /// The server refused the call with this code.
    Refused(ErrorCode),
    /// No answer (the connection broke, or the deadline passed): the commit may be in the log.
    Lost,
}

impl Answer {
    /// The answer a send's outcome gives.
    pub fn from_outcome(outcome: SendOutcome) -> Self {
        match outcome {
            SendOutcome::Appended { seq, .. } => Self::Appended { seq },
            SendOutcome::Duplicate { seq } => Self::Duplicate { seq },
            SendOutcome::StaleEpoch {
                current_epoch,
                winner_seq,
            } => Self::StaleEpoch {
                current_epoch,
                winner_seq,
            },
        }
    }

    /// The answer a failed send gives: the server's refusal when it sent a code, else lost.
    pub fn from_error(error: &ClientError) -> Self {
        error.code().map_or(Self::Lost, Self::Refused)
    }
}

/// Whether a refusal with this code leaves the commit's fate unknown. `unavailable` may come
/// from an edge whose shard connection broke after the shard appended; `internal` is a server
/// bug, of which nothing is promised. Every other code is a decision not to append.
fn fate_unknown(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::Unavailable | ErrorCode::Internal)
}

/// What a read of the log came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadReport {
    /// The last log entry processed.
    pub cursor: u64,
    /// The group's epoch after the read.
    pub epoch: u64,
    /// Whether a commit of ours is still pending.
    pub pending: bool,
    /// Where our pending commit came back, when the read met it: the read stops just before it,
    /// unprocessed and unmerged.
    pub own_commit: Option<u64>,
}

/// Something that happened, reported to [`CommitDriver::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A [`Action::Read`] ended.
    Read(ReadReport),
    /// A [`Action::Read`] failed (the log could not be fetched, or processing failed).
    ReadFailed,
    /// [`Action::Build`] staged this commit, and its message id was saved as ours.
    Built(PendingCommit),
    /// [`Action::Append`] got this answer.
    Answered(Answer),
    /// [`Action::Merge`] merged our commit; the group is at `epoch`.
    Merged {
        /// The group's new epoch.
        epoch: u64,
    },
    /// [`Action::Discard`] dropped our commit.
    Discarded,
}

/// What to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Read and process the log after `after` up to and including `up_to` (`None`: to its
    /// end), stopping before our pending commit if it comes by; report [`Event::Read`] or
    /// [`Event::ReadFailed`].
    Read {
        /// The last entry already processed.
        after: u64,
        /// The last entry to read.
        up_to: Option<u64>,
    },
    /// Stage a commit for the group's current epoch and save its message id as ours before it
    /// is sent; report [`Event::Built`].
    Build,
    /// Append this commit; report [`Event::Answered`].
    Append(&'a PendingCommit),
    /// The log holds our commit at `seq`: merge it; report [`Event::Merged`].
    Merge {
        /// Where the log holds it.
        seq: u64,
    },
    /// The server refused this commit for good: discard it (and forget its message id); report
    /// [`Event::Discarded`].
    Discard(&'a PendingCommit),
    /// Finished: our commit is merged.
    Done {
        /// Where it is and the epoch it began.
        committed: Committed,
        /// The entries ahead of it could not all be read before the merge (the log holds the
        /// commit, so it was merged anyway): report that read's failure.
        read_ahead_failed: bool,
    },
    /// Stop, for this reason.
    GiveUp(CommitError),
}

/// A commit that made it into the log and was merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The epoch it began.
    pub epoch: u64,
    /// Its position in the log.
    pub seq: u64,
}

/// Why the driver gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// Every attempt lost the epoch to another member's commit.
    #[error("gave up after {0} attempts: other members keep committing")]
    Contended(usize),
    /// The server refused the commit for good; it was discarded.
    #[error("the server refused the commit: {0}")]
    Refused(ErrorCode),
    /// The commit may be in the log, but no answer or read said so. It stays pending: it is
    /// merged when it comes back through the log, and dropped when another commit ends its
    /// epoch there.
    #[error("the commit's fate is unknown: it stays pending until the log shows it")]
    Unresolved,
    /// The log could not be read before a commit was built.
    #[error("the group's log could not be read")]
    ReadFailed,
    /// The server answered in a way the protocol rules out.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The driver was told something it did not ask about (a bug of its caller).
    #[error("the commit driver got {event} while {phase}")]
    OutOfOrder {
        /// What it was told.
        event: String,
        /// What it was waiting for.
        phase: String,
    },
}

fn nothing_staged(event: &str) -> CommitError {
    CommitError::OutOfOrder {
        event: event.to_owned(),
        phase: "no commit staged".to_owned(),
    }
}

/// How a drive begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Read the log to its end first: a commit must be for the group's current epoch, and an
    /// own commit left pending by an earlier run is resolved there.
    CatchUp,
    /// Build at once: the caller follows the log and knows its group is current.
    Build,
}

/// What happens after a discard.
#[derive(Debug)]
enum AfterDiscard {
    /// Read the winner (and whatever followed it), then build again.
    Retry,
    /// Stop.
    GiveUp(CommitError),
}

#[derive(Debug)]
enum Phase {
    /// Not started, or finished.
    Idle,
    /// Reading the log to its end before building.
    CatchingUp,
    /// Waiting for the commit to be built.
    Building,
    /// Waiting for the server's answer.
    Appending,
    /// Reading the entries ahead of our commit at `seq`.
    ReadingAhead { seq: u64 },
    /// Reading the log to learn whether an append whose answer was lost got through.
    Resolving,
    /// Merging our commit at `seq`; `leftover` when it was left pending by an earlier run.
    Merging {
        seq: u64,
        read_ahead_failed: bool,
        leftover: bool,
    },
    /// Dropping a refused commit.
    Discarding(AfterDiscard),
}

/// The commit protocol: pending → append → read ahead up to the commit → merge.
///
/// - **Appended** or **Duplicate** at `seq`: the log holds the commit. The entries before it
///   belong to the epoch it ends, so they are read first; the commit is merged even if that
///   read fails.
/// - **StaleEpoch**: another commit won; ours is discarded, the log is read past the winner
///   and the commit is built again, up to the attempt limit.
/// - **A definite refusal** (any code but `unavailable`/`internal`): discarded, give up.
/// - **No answer**: the commit may be in the log, so it is never discarded for that. The log
///   is read: if it holds the commit, the commit is merged there; if another commit ended the
///   epoch, ours was dropped with it and is built again; if neither, the same bytes are
///   appended again under the same message id (the server answers Duplicate if the first
///   append got through meanwhile). When the log cannot be read either, the drive gives up
///   with the commit still pending.
/// - **An own commit found pending** when catching up (a run that stopped between append and
///   merge) is merged where the log holds it, and the catch-up goes on after it.
///
/// Every append counts against the attempt limit.
#[derive(Debug)]
pub struct CommitDriver {
    attempts: usize,
    appends: usize,
    cursor: u64,
    pending: Option<PendingCommit>,
    /// An append of `pending` got no answer (or an ambiguous one).
    uncertain: bool,
    phase: Phase,
}

impl CommitDriver {
    /// A driver allowed `attempts` appends, for a group whose log has been processed up to
    /// `cursor`.
    pub fn new(attempts: usize, cursor: u64) -> Self {
        Self {
            attempts,
            appends: 0,
            cursor,
            pending: None,
            uncertain: false,
            phase: Phase::Idle,
        }
    }

    /// The first action.
    pub fn start(&mut self, start: Start) -> Action<'_> {
        match start {
            Start::CatchUp => self.catch_up(),
            Start::Build => self.build(),
        }
    }

    /// The commit being driven, if one is staged.
    pub fn pending(&self) -> Option<&PendingCommit> {
        self.pending.as_ref()
    }

    /// Takes in what happened; returns what to do next.
    pub fn handle(&mut self, event: Event) -> Action<'_> {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        match (phase, event) {
            (Phase::CatchingUp, Event::Read(r)) => self.caught_up(r),
            (Phase::CatchingUp, Event::ReadFailed) => self.give_up(CommitError::ReadFailed),
            (Phase::Building, Event::Built(pending)) => {
                self.pending = Some(pending);
                self.uncertain = false;
                self.append()
            }
            (Phase::Appending, Event::Answered(answer)) => self.answered(answer),
            (Phase::ReadingAhead { seq }, Event::Read(r)) => {
                self.cursor = r.cursor;
                self.merge(seq, false, false)
            }
            (Phase::ReadingAhead { seq }, Event::ReadFailed) => self.merge(seq, true, false),
            (Phase::Resolving, Event::Read(r)) => self.resolved(r),
            (Phase::Resolving, Event::ReadFailed) => self.give_up(CommitError::Unresolved),
            (
                Phase::Merging {
                    seq,
                    read_ahead_failed,
                    leftover,
                },
                Event::Merged { epoch },
            ) => {
                self.pending = None;
                if leftover {
                    return self.catch_up();
                }
                Action::Done {
                    committed: Committed { epoch, seq },
                    read_ahead_failed,
                }
            }
            (Phase::Discarding(after), Event::Discarded) => {
                self.pending = None;
                self.uncertain = false;
                match after {
                    AfterDiscard::Retry => self.catch_up(),
                    AfterDiscard::GiveUp(reason) => self.give_up(reason),
                }
            }
            (phase, event) => self.give_up(CommitError::OutOfOrder {
                event: format!("{event:?}"),
                phase: format!("{phase:?}"),
            }),
        }
    }

    fn catch_up(&mut self) -> Action<'_> {
        self.phase = Phase::CatchingUp;
        Action::Read {
            after: self.cursor,
            up_to: None,
        }
    }

    fn build(&mut self) -> Action<'_> {
        if self.appends >= self.attempts {
            return self.give_up(CommitError::Contended(self.attempts));
        }
        self.phase = Phase::Building;
        Action::Build
    }

    fn append(&mut self) -> Action<'_> {
        if self.pending.is_none() {
            return self.give_up(nothing_staged("a request to append"));
        }
        self.appends += 1;
        self.phase = Phase::Appending;
        self.pending.as_ref().map_or_else(
            || Action::GiveUp(nothing_staged("a request to append")),
            Action::Append,
        )
    }

    fn merge(&mut self, seq: u64, read_ahead_failed: bool, leftover: bool) -> Action<'_> {
        self.phase = Phase::Merging {
            seq,
            read_ahead_failed,
            leftover,
        };
        Action::Merge { seq }
    }

    fn discard(&mut self, after: AfterDiscard) -> Action<'_> {
        if self.pending.is_none() {
            return self.give_up(nothing_staged("a refusal"));
        }
        self.phase = Phase::Discarding(after);
        self.pending.as_ref().map_or_else(
            || Action::GiveUp(nothing_staged("a refusal")),
            Action::Discard,
        )
    }

    fn give_up(&mut self, reason: CommitError) -> Action<'_> {
        self.phase = Phase::Idle;
        Action::GiveUp(reason)
    }

    /// After reading to the end before building.
    fn caught_up(&mut self, r: ReadReport) -> Action<'_> {
        self.cursor = r.cursor;
        match (r.pending, r.own_commit) {
            // A commit an earlier run appended but never merged: the log holds it.
            (true, Some(seq)) => self.merge(seq, false, true),
            // Pending, but not (yet) in the log: its fate is unknown, so it is not ours to drop.
            (true, None) => self.give_up(CommitError::Unresolved),
            (false, _) => self.build(),
        }
    }

    fn answered(&mut self, answer: Answer) -> Action<'_> {
        match answer {
            Answer::Appended { seq } | Answer::Duplicate { seq } => {
                self.uncertain = false;
                if seq > self.cursor.saturating_add(1) {
                    self.phase = Phase::ReadingAhead { seq };
                    Action::Read {
                        after: self.cursor,
                        up_to: Some(seq - 1),
                    }
                } else {
                    self.merge(seq, false, false)
                }
            }
            Answer::StaleEpoch { current_epoch, .. } => {
                let epoch = self.pending.as_ref().map_or(0, |p| p.epoch);
                let after = if current_epoch <= epoch {
                    AfterDiscard::GiveUp(CommitError::Protocol(format!(
                        "a commit for epoch {epoch} refused as stale by a group at epoch \
                         {current_epoch}"
                    )))
                } else if self.appends >= self.attempts {
                    AfterDiscard::GiveUp(CommitError::Contended(self.attempts))
                } else {
                    AfterDiscard::Retry
                };
                self.discard(after)
            }
            // A refusal after an unanswered append says nothing of that append: keep it.
            Answer::Refused(code) if !fate_unknown(code) && self.uncertain => {
                self.give_up(CommitError::Unresolved)
            }
            Answer::Refused(code) if !fate_unknown(code) => {
                self.discard(AfterDiscard::GiveUp(CommitError::Refused(code)))
            }
            Answer::Refused(_) | Answer::Lost => {
                self.uncertain = true;
                self.phase = Phase::Resolving;
                Action::Read {
                    after: self.cursor,
                    up_to: None,
                }
            }
        }
    }

    /// After reading the log to learn what became of an unanswered append.
    fn resolved(&mut self, r: ReadReport) -> Action<'_> {
        self.cursor = r.cursor;
        match (r.pending, r.own_commit) {
            (true, Some(seq)) => self.merge(seq, false, false),
            // Not in the log (yet): append the same bytes again under the same message id.
            (true, None) if self.appends < self.attempts => self.append(),
            (true, None) => self.give_up(CommitError::Unresolved),
            // Another commit ended the epoch, and processing it dropped ours.
            (false, _) => {
                self.pending = None;
                self.uncertain = false;
                self.build()
            }
        }
    }
}
