//! Groups and their logs as the Delivery Service orders them: group and message ids, append
//! requests and their outcomes, stored entries and Welcomes, and the epoch rule.
//!
//! The rules every store keeps (see [`crate::store::log`] for how):
//! - a group's entries are numbered 1, 2, 3 … with no gap, and an entry becomes visible only
//!   with every entry before it;
//! - a handshake message (commit or proposal) for epoch E is appended only while the group is
//!   at epoch E; a commit moves the group to E + 1 and applies its membership change and stores
//!   its Welcome at once;
//! - an application message is appended only if its epoch is the group's or one of the
//!   [`APPLICATION_EPOCH_LAG`] before it: the members keep that many past epochs' secrets, so
//!   every member reading the log in order can still decrypt it (an older one would be
//!   unreadable to all of them; its sender is told to catch up and encrypt it again);
//! - a message id already appended to the group returns the original sequence number.

use quicproquo_core::IdentityKey;

use super::ModelError;

/// How many epochs an application message may lag behind its group: the past epochs whose
/// secrets members keep (`quicproquo_core::group::MAX_PAST_EPOCHS`).
pub const APPLICATION_EPOCH_LAG: u64 = quicproquo_core::group::MAX_PAST_EPOCHS as u64;

/// Whether a message of `kind` for `epoch` may be appended to a group at `group_epoch`: a
/// handshake message only for the group's epoch, an application message for it or one of the
/// [`APPLICATION_EPOCH_LAG`] before it.
pub fn epoch_accepted(kind: EntryKind, epoch: u64, group_epoch: u64) -> bool {
    match kind {
        EntryKind::Commit | EntryKind::Proposal => epoch == group_epoch,
        EntryKind::Application => {
            epoch <= group_epoch && group_epoch - epoch <= APPLICATION_EPOCH_LAG
        }
        // Written by the server's revert (ADR 0015), never appended as a message.
        EntryKind::Revert => false,
    }
}

/// Longest group id accepted.
pub const MAX_GROUP_ID: usize = 256;
/// Most members one commit may add or remove.
pub const MAX_CHANGE: usize = 1000;
/// Longest message id accepted.
pub const MAX_MESSAGE_ID: usize = 64;

/// An opaque MLS group id (1 to 256 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(Vec<u8>);

impl GroupId {
    /// Checks the length.
    pub fn new(bytes: &[u8]) -> Result<Self, ModelError> {
        if bytes.is_empty() || bytes.len() > MAX_GROUP_ID {
            return Err(ModelError::InvalidArgument(
                "group id must be 1 to 256 bytes",
            ));
        }
        Ok(Self(bytes.to_vec()))
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// What kind of MLS message an entry is, as read from its public framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// An application message (any epoch up to the current one).
    Application,
    /// A commit: moves the group to the next epoch.
    Commit,
    /// A proposal: only for the current epoch.
    Proposal,
    /// A revert marker (ADR 0015), written by the server: the group went back to the epoch
    /// before a reported commit. Its payload is the member's signed report.
    Revert,
}

impl EntryKind {
    /// Stable numeric code used by the stores.
    pub fn code(self) -> u8 {
        match self {
            Self::Application => 0,
            Self::Commit => 1,
            Self::Proposal => 2,
            Self::Revert => 3,
        }
    }

    /// The kind of a stored code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Application),
            1 => Some(Self::Commit),
            2 => Some(Self::Proposal),
            3 => Some(Self::Revert),
            _ => None,
        }
    }
}

/// The membership change and Welcome that travel with a commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitChange {
    /// Identities the commit adds.
    pub added: Vec<IdentityKey>,
    /// Identities the commit removes.
    pub removed: Vec<IdentityKey>,
    /// The Welcome for the added members (stored once, delivered to each added inbox).
    pub welcome: Option<Vec<u8>>,
    /// The new epoch's GroupInfo as the committer uploaded it (checked against the group's
    /// public view, then kept with it).
    pub group_info: Option<Vec<u8>>,
}

/// The group's public view after a verified handshake message, written with it (ADR 0018):
/// the new epoch and latest GroupInfo, and either a snapshot of the whole state (every 16th
/// commit) or, kept after the latest snapshot, the message itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewWrite {
    /// The group's epoch once the message is appended.
    pub epoch: u64,
    /// A snapshot: the new encoded state; `None`: the store keeps the message after the
    /// latest snapshot instead.
    pub state: Option<Vec<u8>>,
    /// With a snapshot: the encoded proposals of the epoch.
    pub proposals: Vec<u8>,
    /// The new epoch's GroupInfo; `None`: unchanged.
    pub group_info: Option<Vec<u8>>,
    /// The message was not verified: it is for an epoch before the group's stored view, so
    /// the store may only answer `Duplicate` or `StaleEpoch`, never append it (even if a
    /// revert on another node moved the group back to its epoch meanwhile: ADR 0015).
    pub unverified: bool,
}

/// A group's public view as stored (ADR 0018): its latest snapshot and the verified handshake
/// messages appended after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredView {
    /// The group's epoch (after the messages of `tail`).
    pub epoch: u64,
    /// The latest snapshot's encoded state (`quicproquo_core::group::public`).
    pub state: Vec<u8>,
    /// The snapshot's encoded proposals.
    pub proposals: Vec<u8>,
    /// The latest GroupInfo (the creator's, then each committer's).
    pub group_info: Vec<u8>,
    /// The verified commits and proposals appended after the snapshot, in log order.
    pub tail: Vec<Vec<u8>>,
}

/// One message to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    /// The group.
    pub group_id: GroupId,
    /// The bound identity that sends it (must be a current member).
    pub sender: IdentityKey,
    /// Client-chosen id; a repeat returns the first append's sequence number.
    pub message_id: Vec<u8>,
    /// From the public framing.
    pub kind: EntryKind,
    /// From the public framing.
    pub epoch: u64,
    /// The serialized MLS message.
    pub payload: Vec<u8>,
    /// With a commit: its membership change and Welcome.
    pub commit: Option<CommitChange>,
    /// With a verified commit or proposal: the group's public view to write with it.
    pub view: Option<ViewWrite>,
}

impl AppendRequest {
    /// The bytes the request asks a node to store: its message, its Welcome and its GroupInfo.
    pub fn size(&self) -> usize {
        let (welcome, group_info) = self.commit.as_ref().map_or((0, 0), |c| {
            (
                c.welcome.as_ref().map_or(0, Vec::len),
                c.group_info.as_ref().map_or(0, Vec::len),
            )
        });
        self.payload.len() + welcome + group_info
    }

    /// Refuses a request larger than `max` bytes ([`AppendRequest::size`]): the one size rule,
    /// applied where a client's send enters and again by the appender.
    pub fn check_size(&self, max: usize) -> Result<(), ModelError> {
        let size = self.size();
        if size > max {
            return Err(ModelError::TooLarge { size, max });
        }
        Ok(())
    }
}

/// What became of one [`AppendRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Appended at `seq`; the group is now at `epoch`.
    Appended {
        /// The entry's sequence number.
        seq: u64,
        /// The group's epoch after the append.
        epoch: u64,
    },
    /// The message id was appended before, at `seq`; nothing changed.
    Duplicate {
        /// The first append's sequence number.
        seq: u64,
    },
    /// A handshake message for another epoch than the group's, or an application message
    /// from a future epoch or more than [`APPLICATION_EPOCH_LAG`] epochs old: nothing
    /// changed. The sender catches up from the winning commit at `winner_seq` and retries.
    StaleEpoch {
        /// The group's epoch.
        current_epoch: u64,
        /// Sequence number of the commit that started `current_epoch` (0 for epoch 0).
        winner_seq: u64,
    },
    /// The sender is not a current member; nothing changed.
    NotMember,
    /// No such group; nothing changed.
    UnknownGroup,
}

/// A stored log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in the group's log.
    pub seq: u64,
    /// The epoch from the message's framing.
    pub epoch: u64,
    /// The kind of message.
    pub kind: EntryKind,
    /// The sender's message id.
    pub message_id: Vec<u8>,
    /// The serialized MLS message.
    pub payload: Vec<u8>,
    /// When the append became durable (Unix microseconds).
    pub appended_at_micros: u64,
}

/// A group as a member sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// The group.
    pub group_id: GroupId,
    /// Its current epoch.
    pub epoch: u64,
    /// The last sequence number appended.
    pub last_seq: u64,
    /// The current members.
    pub members: Vec<IdentityKey>,
}

/// A Welcome waiting in an identity's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    /// Position in the identity's inbox (1, 2, 3 …).
    pub seq: u64,
    /// The group the Welcome is for.
    pub group_id: GroupId,
    /// Sequence number of the commit that added this identity (read the log after it).
    pub commit_seq: u64,
    /// The serialized Welcome.
    pub welcome: Vec<u8>,
}
