//! Errors of the MLS group layer.

use openmls::prelude::{
    MlsGroupStateError, ProcessMessageError, StageCommitError, ValidationError, WelcomeError,
};

use crate::identity::IdentityKey;
use crate::mls::MlsError;

use super::MessageKind;

/// Why a group operation failed.
///
/// No variant carries key material or plaintext; the `String`s hold openmls' own error texts,
/// which name the failed check, never secrets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// The bytes are not a (complete) serialized MLS message.
    #[error("malformed MLS message")]
    Malformed,
    /// A well-formed MLS message of a kind this operation does not take (e.g. a Welcome given
    /// to [`Group::process`](super::Group::process)).
    #[error("unexpected MLS message kind {0:?}")]
    UnexpectedKind(MessageKind),
    /// The `index`-th KeyPackage given to
    /// [`Group::add_members`](super::Group::add_members) was refused.
    #[error("KeyPackage {index} refused: {source}")]
    InvalidKeyPackage {
        /// Its position in the list.
        index: usize,
        /// Why it was refused.
        #[source]
        source: MlsError,
    },
    /// The group's or Welcome's ciphersuite is not one of ours.
    #[error("ciphersuite not supported")]
    UnsupportedSuite,
    /// The Welcome is not for this device: none of its KeyPackages' secrets are in our storage
    /// (never ours, or already used).
    #[error("welcome is not for us (no matching KeyPackage)")]
    NotForUs,
    /// An active group with this id already exists in this storage.
    #[error("group already exists")]
    GroupExists,
    /// The identity is already a member of the group, or is listed twice.
    #[error("{0:?} is already a member or listed twice")]
    DuplicateMember(IdentityKey),
    /// The identity is not a member of the group.
    #[error("{0:?} is not a member")]
    UnknownMember(IdentityKey),
    /// A device cannot remove itself with a commit.
    #[error("cannot remove ourselves")]
    CannotRemoveSelf,
    /// Nothing to add or remove.
    #[error("empty input")]
    EmptyInput,
    /// The `MlsIdentity` passed in is not the one of our leaf in this group.
    #[error("identity does not match our leaf in the group")]
    WrongIdentity,
    /// The message belongs to another group.
    #[error("message is for another group")]
    WrongGroup,
    /// The message is for an epoch we cannot process now: a handshake message not for the
    /// current epoch, an application message from the future, or one older than
    /// [`MAX_PAST_EPOCHS`](super::MAX_PAST_EPOCHS). See [`GroupError::is_stale`].
    #[error("message for epoch {got}, group is at epoch {expected}")]
    WrongEpoch {
        /// Our current epoch.
        expected: u64,
        /// The message's epoch.
        got: u64,
    },
    /// We are no longer a member of this group (we were removed).
    #[error("not a member of the group any more")]
    NotMember,
    /// A commit of ours is pending: merge or discard it first.
    #[error("a commit is pending")]
    PendingCommit,
    /// There is no pending commit to merge.
    #[error("no pending commit")]
    NoPendingCommit,
    /// Proposals received from the log are pending: a commit (e.g.
    /// [`Group::self_update`](super::Group::self_update)) must cover them before we can send.
    #[error("proposals are pending; commit them first")]
    PendingProposals,
    /// A credential in the group (a new member's, or an updated leaf's) is not a basic
    /// credential naming its leaf's own Ed25519 signature key. The message is refused.
    #[error("member credential does not match its signature key")]
    BadCredential,
    /// The message cannot be decrypted: its epoch's keys are gone or it was not encrypted for
    /// this group state.
    #[error("message cannot be decrypted")]
    Undecryptable,
    /// Our own commit came back from the log, but it is not our pending commit (it was
    /// discarded, or the state that made it is lost): this device can no longer follow the
    /// group and must be re-added.
    #[error("own commit accepted by the log but no longer pending here")]
    OwnCommitLost,
    /// A commit the server's public view let through but this member refuses with what only
    /// members can check: its membership tag, its confirmation tag or its encrypted path
    /// secrets. Every member refuses it the same way: report it (`crate::report`, ADR 0015)
    /// and stay at the current epoch.
    #[error("commit refused by members (the server could not check it): {0}")]
    InvalidCommit(String),
    /// The message is invalid (signature, membership tag, commit contents, a proposal type we
    /// do not accept, ...).
    #[error("message rejected: {0}")]
    Rejected(String),
    /// The MLS storage failed.
    #[error("MLS storage error: {0}")]
    Storage(String),
    /// openmls failed internally.
    #[error("mls library error: {0}")]
    Library(String),
}

impl GroupError {
    /// Whether this is a [`GroupError::WrongEpoch`] for a message older than our epoch, i.e. a
    /// message the log delivers after we moved on (our own commit we already merged, traffic
    /// from before we joined, application messages older than the kept epochs). Such messages
    /// are to be skipped, not treated as an attack or a fork.
    pub fn is_stale(&self) -> bool {
        matches!(self, Self::WrongEpoch { expected, got } if got < expected)
    }

    /// Whether this is a [`GroupError::InvalidCommit`]: a commit to report (ADR 0015).
    pub fn is_invalid_commit(&self) -> bool {
        matches!(self, Self::InvalidCommit(_))
    }

    pub(super) fn library(e: impl std::fmt::Display) -> Self {
        Self::Library(e.to_string())
    }

    pub(super) fn storage(e: impl std::fmt::Display) -> Self {
        Self::Storage(e.to_string())
    }
}

pub(super) fn welcome_error<E: std::fmt::Display>(e: WelcomeError<E>) -> GroupError {
    match e {
        WelcomeError::NoMatchingKeyPackage | WelcomeError::JoinerSecretNotFound => {
            GroupError::NotForUs
        }
        WelcomeError::UnsupportedCiphersuite(_) | WelcomeError::CiphersuiteMismatch => {
            GroupError::UnsupportedSuite
        }
        WelcomeError::GroupAlreadyExists => GroupError::GroupExists,
        WelcomeError::StorageError(e) => GroupError::storage(e),
        WelcomeError::LibraryError(e) => GroupError::library(e),
        other => GroupError::Rejected(other.to_string()),
    }
}

pub(super) fn process_error<E: std::fmt::Display>(
    e: ProcessMessageError<E>,
    expected: u64,
    got: u64,
) -> GroupError {
    match e {
        ProcessMessageError::StorageError(e) => GroupError::storage(e),
        ProcessMessageError::LibraryError(e) => GroupError::library(e),
        ProcessMessageError::GroupStateError(MlsGroupStateError::UseAfterEviction) => {
            GroupError::NotMember
        }
        ProcessMessageError::ValidationError(ValidationError::WrongEpoch) => {
            GroupError::WrongEpoch { expected, got }
        }
        ProcessMessageError::ValidationError(ValidationError::WrongGroupId) => {
            GroupError::WrongGroup
        }
        ProcessMessageError::ValidationError(
            ValidationError::UnableToDecrypt(_) | ValidationError::NoPastEpochData,
        ) => GroupError::Undecryptable,
        ProcessMessageError::InvalidCommit(StageCommitError::OwnCommitMismatch) => {
            GroupError::OwnCommitLost
        }
        // What the server's public view cannot check (ADR 0012): members alone refuse these.
        e @ (ProcessMessageError::ValidationError(ValidationError::InvalidMembershipTag)
        | ProcessMessageError::InvalidCommit(
            StageCommitError::ConfirmationTagMismatch
            | StageCommitError::UpdatePathError(_)
            | StageCommitError::MissingDecryptionKey,
        )) => GroupError::InvalidCommit(e.to_string()),
        other => GroupError::Rejected(other.to_string()),
    }
}
