//! The one commit driver: how a device gets an MLS commit into a group's log and merges it.
//!
//! The server's log decides which commit ends each epoch, so a commit stays *pending* (see
//! `quicproquo_core::group`) until the server's answer says what became of it, and it is
//! discarded only on a definite refusal. The protocol lives in one place:
//!
//! - [`CommitDriver`] is a pure state machine (no I/O, no async, no MLS): told what happened
//!   ([`Event`]: an append's [`Answer`], a read's [`ReadReport`], a merge, a discard), it
//!   answers what to do next ([`Action`]). Its unit tests play the server in memory.
//! - [`drive`] performs those actions against the Delivery Service and a device's group,
//!   through a [`CommitHost`]: the messenger (`crate::chat`, whose group lives in the state
//!   file) and the load test's members (whose groups live in memory) each implement one.
//! - [`read_log`] reads a group's log in batches for any [`LogReader`], and
//!   [`is_pending_own_commit`] is the rule every reader applies to its own commit coming back.

mod drive;
mod machine;
#[cfg(test)]
mod tests;

pub use drive::{
    CommitHost, DriveError, FETCH_BATCH, LogReader, drive, is_pending_own_commit, read_log,
};
pub use machine::{
    Action, Answer, CommitDriver, CommitError, Committed, Event, PendingCommit, ReadReport, Start,
};

/// How many appends a commit gets (rebuilt after losing its epoch, or sent again after its
/// answer was lost) before the driver gives up.
pub const COMMIT_ATTEMPTS: usize = 8;
