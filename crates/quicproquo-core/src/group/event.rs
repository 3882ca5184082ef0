//! What group operations return: staged commits and processed-message events.

#[cfg(doc)]
use super::{Group, GroupError};
use crate::identity::IdentityKey;

/// A commit staged by this device, to submit to the server. It is pending until
/// [`Group::merge_pending_commit`], [`Group::discard_pending_commit`], or its echo in
/// [`Group::process`].
#[derive(Clone, PartialEq, Eq)]
pub struct CommitOutput {
    /// The commit (an MLSMessage, PublicMessage framing).
    pub commit: Vec<u8>,
    /// The Welcome for the added members (an MLSMessage, with the ratchet tree), if any. Deliver
    /// it only once the commit is accepted.
    pub welcome: Option<Vec<u8>>,
    /// The new epoch's GroupInfo (an MLSMessage signed by us, without the ratchet tree: the
    /// server has it): the server checks it against its view of the group and serves it to
    /// members.
    pub group_info: Vec<u8>,
    /// The epoch the commit applies to: the group's epoch now, before merging.
    pub epoch: u64,
    /// Who the commit adds.
    pub added: Vec<IdentityKey>,
    /// Who the commit removes.
    pub removed: Vec<IdentityKey>,
}

impl std::fmt::Debug for CommitOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitOutput")
            .field("commit_len", &self.commit.len())
            .field("welcome_len", &self.welcome.as_ref().map(Vec::len))
            .field("group_info_len", &self.group_info.len())
            .field("epoch", &self.epoch)
            .field("added", &self.added)
            .field("removed", &self.removed)
            .finish()
    }
}

/// What processing a message from the log did.
#[derive(Clone, PartialEq, Eq)]
pub enum Event {
    /// An application message from another member.
    Application {
        /// Its sender.
        sender: IdentityKey,
        /// The plaintext.
        plaintext: Vec<u8>,
    },
    /// A commit was merged: the group is at a new epoch.
    Commit {
        /// The new epoch.
        epoch: u64,
        /// Who committed (ourselves for our own commit coming back).
        committer: IdentityKey,
        /// Who was added.
        added: Vec<IdentityKey>,
        /// Who was removed.
        removed: Vec<IdentityKey>,
        /// Whether we were removed: the group is inactive from now on.
        we_were_removed: bool,
    },
    /// A standalone proposal, stored until a commit covers it. Until then this device cannot
    /// send application messages ([`GroupError::PendingProposals`]); any of our commits
    /// includes it.
    Proposal {
        /// Who proposed.
        sender: IdentityKey,
    },
    /// Our own application message coming back from the log: nothing to do.
    Own {
        /// The epoch it was sent in.
        epoch: u64,
    },
}

impl std::fmt::Debug for Event {
    // The plaintext is left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Application { sender, plaintext } => f
                .debug_struct("Application")
                .field("sender", sender)
                .field("plaintext_len", &plaintext.len())
                .finish(),
            Self::Commit {
                epoch,
                committer,
                added,
                removed,
                we_were_removed,
            } => f
                .debug_struct("Commit")
                .field("epoch", epoch)
                .field("committer", committer)
                .field("added", added)
                .field("removed", removed)
                .field("we_were_removed", we_were_removed)
                .finish(),
            Self::Proposal { sender } => {
                f.debug_struct("Proposal").field("sender", sender).finish()
            }
            Self::Own { epoch } => f.debug_struct("Own").field("epoch", epoch).finish(),
        }
    }
}
