//! The Delivery Service's public view of a group: openmls's [`PublicGroup`] (ratchet tree, group
//! context, transcript hash, confirmation tag and the proposals of the current epoch; no
//! secrets), with which the server verifies every handshake message before it appends it.
//!
//! The view is built once, from the creator's GroupInfo and ratchet tree at group creation
//! ([`PublicView::create`]), and then only moves by verified commits: it is never rebuilt from
//! a GroupInfo later (a member's leaf lifetime may have expired by then, and openmls refuses a
//! tree holding an expired leaf). Its durable form is a snapshot plus the verified handshake
//! messages after it (ADR 0018): every [`SNAPSHOT_EVERY`]th commit's merge returns the whole
//! state in a compact binary encoding (postcard of openmls's own types), which a store writes
//! with that commit; other merges write nothing tree-sized, and the store keeps the verified
//! message instead. [`PublicView::load`] decodes a snapshot and [`PublicView::replay`] applies
//! the messages after it.
//!
//! What it verifies ([`PublicView::stage`] and [`PublicView::merge`]): the message is a
//! PublicMessage of this group and epoch, from a current member whose leaf credential names the
//! caller's bound identity and signed by that leaf's key; proposals are of the accepted types
//! (Add, Update, Remove), valid for openmls (an Add's KeyPackage is of the group's suite, well
//! signed and not expired; a Remove names an existing leaf; the update path is well formed);
//! every new or changed leaf is bound to its own signature key, and a member never changes
//! identity; the Welcome is exactly for the added KeyPackages; the new epoch's GroupInfo is the
//! committer's signed view of the new state, without the ratchet tree (the server has it). What it cannot verify: the membership tag, the
//! confirmation tag and the encrypted path secrets (they need the epoch's secrets), nor any
//! application message's content.

use std::cell::RefCell;
use std::collections::HashSet;

use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    ConfirmationTag, GroupId, LeafNodeIndex, MlsMessageBodyIn, MlsMessageIn,
    ProcessedMessageContent, Proposal, ProposalStore, ProtocolMessage, PublicGroup,
    PublicProcessMessageError, QueuedProposal, Sender, SignContent, StagedCommit,
};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto as _;
use openmls_traits::public_storage::PublicStorageProvider;
use openmls_traits::storage::{CURRENT_VERSION, traits};
use openmls_traits::types::SignatureScheme;

use super::lifetime as framing;
use super::policy::{bound_identity, check_proposal, identity_of, leaf_identity};
use crate::identity::IdentityKey;
use crate::mls::Suite;

mod group_info;
mod storage;

pub use storage::ViewStorageError;
use storage::{Encoded, ViewStorage, encode_proposals};

/// Why the public view refused a message or a GroupInfo. Each variant names the rule that
/// failed; none carries message content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// Not exactly one well-formed MLSMessage.
    #[error("malformed: not one well-formed MLS message")]
    Malformed,
    /// A handshake message must be a PublicMessage (the server reads and verifies it).
    #[error("wire_format: a commit or proposal must be a PublicMessage")]
    NotPublic,
    /// The message names another group.
    #[error("group: the message is for another group")]
    WrongGroup,
    /// The message is not for the group's current epoch.
    #[error("epoch: the message is for epoch {got}, the group is at {current}")]
    WrongEpoch {
        /// The group's epoch.
        current: u64,
        /// The message's.
        got: u64,
    },
    /// The sender is not a current member (or is an external or new-member sender).
    #[error("sender: the sender is not a member of the group")]
    NotMember,
    /// The sender's leaf is not the caller's bound identity.
    #[error("sender: the message is signed by another member's leaf than the caller's")]
    NotCaller,
    /// openmls refused the message (signature, proposals, update path, ...).
    #[error("mls: {0}")]
    Invalid(String),
    /// A proposal type, credential or identity change our rules do not accept.
    #[error("policy: {0}")]
    Policy(String),
    /// The Welcome is missing, unexpected, or not for exactly the added KeyPackages.
    #[error("welcome: {0}")]
    Welcome(&'static str),
    /// The GroupInfo is missing or does not describe the new epoch as the view sees it.
    #[error("group_info: {0}")]
    GroupInfo(&'static str),
    /// The message is not a commit or proposal (the view verifies only those).
    #[error("kind: only commits and proposals are verified by the group view")]
    NotHandshake,
    /// A stored view does not decode.
    #[error("corrupt group view: {0}")]
    Corrupt(&'static str),
    /// openmls failed internally.
    #[error("library: {0}")]
    Library(String),
}

impl ViewError {
    /// A short, stable name of the rule that failed (for logs and metrics).
    pub fn rule(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::NotPublic => "wire_format",
            Self::WrongGroup => "group",
            Self::WrongEpoch { .. } => "epoch",
            Self::NotMember | Self::NotCaller => "sender",
            Self::Invalid(_) => "mls",
            Self::Policy(_) => "policy",
            Self::Welcome(_) => "welcome",
            Self::GroupInfo(_) => "group_info",
            Self::NotHandshake => "kind",
            Self::Corrupt(_) => "corrupt",
            Self::Library(_) => "library",
        }
    }
}

fn library(e: impl std::fmt::Display) -> ViewError {
    ViewError::Library(e.to_string())
}

fn policy(e: impl std::fmt::Display) -> ViewError {
    ViewError::Policy(e.to_string())
}

/// A commit that verified against the view, staged but not merged.
pub struct StagedView {
    staged: StagedCommit,
    committer: LeafNodeIndex,
    confirmation_tag: ConfirmationTag,
    /// The identities the commit adds, in proposal order.
    pub added: Vec<IdentityKey>,
    /// The identities the commit removes (distinct), in proposal order.
    pub removed: Vec<IdentityKey>,
    key_packages: HashSet<Vec<u8>>,
}

impl std::fmt::Debug for StagedView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedView")
            .field("added", &self.added)
            .field("removed", &self.removed)
            .finish_non_exhaustive()
    }
}

/// What a verified handshake message does to the view.
#[derive(Debug)]
pub enum Verified {
    /// A commit: merge it with [`PublicView::merge`] once the server accepts it.
    Commit(Box<StagedView>),
    /// A proposal: queue it with [`PublicView::queue`] once the server accepts it.
    Proposal(Box<QueuedProposal>),
}

/// A snapshot of the whole state is taken at every this many commits (ADR 0018): a view is
/// restored from its latest snapshot and at most this many commits after it (plus the
/// proposals among them), and the snapshot's encoding, about the tree's size, is written once
/// per this many commits instead of with each.
pub const SNAPSHOT_EVERY: u32 = 16;

/// Most proposals queued in one epoch: past it a proposal is refused until a commit.
pub const MAX_QUEUED_PROPOSALS: usize = 64;

/// The public state of one group, as the Delivery Service keeps it.
pub struct PublicView {
    group: PublicGroup,
    /// The proposals of the current epoch, encoded as [`PublicView::proposals`] returns them.
    queued: Vec<Encoded>,
    /// Commits merged since the state was last encoded (at creation, a load or a snapshot).
    since_snapshot: u32,
}

/// What merging a commit into the view wrote.
#[derive(Debug)]
pub struct Merged {
    /// The whole new state, encoded, when this commit is a snapshot; `None`: the store keeps
    /// the commit itself after its latest snapshot.
    pub state: Option<Vec<u8>>,
}

impl std::fmt::Debug for PublicView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicView")
            .field("group_id", &hex::encode(self.group.group_id().as_slice()))
            .field("epoch", &self.epoch())
            .finish_non_exhaustive()
    }
}

impl PublicView {
    /// Builds the view of a new group from its creator's GroupInfo (an MLSMessage carrying the
    /// ratchet tree extension), checking that it is group `group_id` at epoch 0, of one of our
    /// suites, with `creator` as its only member, bound to its signature key. Returns the view
    /// and its encoded state.
    pub fn create(
        group_info: &[u8],
        group_id: &[u8],
        creator: &IdentityKey,
    ) -> Result<(Self, Vec<u8>), ViewError> {
        let info = parse_group_info(group_info)?;
        if info.group_id().as_slice() != group_id {
            return Err(ViewError::GroupInfo("it is for another group"));
        }
        if info.epoch().as_u64() != 0 {
            return Err(ViewError::GroupInfo("a new group starts at epoch 0"));
        }
        if Suite::from_ciphersuite(info.ciphersuite()).is_none() {
            return Err(ViewError::GroupInfo("the ciphersuite is not one of ours"));
        }
        let tree = info
            .extensions()
            .ratchet_tree()
            .ok_or(ViewError::GroupInfo("it carries no ratchet tree"))?
            .ratchet_tree()
            .clone();
        let storage = ViewStorage::default();
        let (group, _) = PublicGroup::from_external(
            &RustCrypto::default(),
            &storage,
            tree,
            info,
            ProposalStore::new(),
        )
        .map_err(|e| ViewError::Invalid(e.to_string()))?;
        let members: Vec<_> = group.members().collect();
        let [only] = members.as_slice() else {
            return Err(ViewError::GroupInfo("a new group has only its creator"));
        };
        let identity = bound_identity(&only.credential, &only.signature_key).map_err(policy)?;
        if identity != *creator {
            return Err(ViewError::NotCaller);
        }
        let state = storage.encode()?;
        Ok((
            Self {
                group,
                queued: Vec::new(),
                since_snapshot: 0,
            },
            state,
        ))
    }

    /// Restores a view from a snapshot: its encoded state and its encoded proposals (as
    /// [`PublicView::merge`] and [`PublicView::proposals`] wrote them). The verified messages
    /// stored after the snapshot are then applied with [`PublicView::replay`].
    pub fn load(state: &[u8], proposals: &[u8]) -> Result<Self, ViewError> {
        let storage = ViewStorage::decode(state, proposals)?;
        let queued = storage.proposals.borrow().clone();
        let group = PublicGroup::load(&storage, &GroupId::from_slice(&[]))
            .map_err(|_| ViewError::Corrupt("state does not decode"))?
            .ok_or(ViewError::Corrupt("state is incomplete"))?;
        Ok(Self {
            group,
            queued,
            since_snapshot: 0,
        })
    }

    /// Applies a handshake message the server verified and appended after the view's snapshot
    /// (a commit or a proposal, in log order), as [`stage`](Self::stage) and
    /// [`merge`](Self::merge) or [`queue`](Self::queue) did then, without the checks that
    /// need the caller or the uploads (they passed when it was appended). A message that no
    /// longer applies means the stored view is corrupt.
    pub fn replay(&mut self, message: &[u8]) -> Result<(), ViewError> {
        let corrupt = |_| ViewError::Corrupt("a stored handshake message does not apply");
        let message = MlsMessageIn::tls_deserialize_exact(message)
            .map_err(|_| ViewError::Corrupt("a stored handshake message does not parse"))?;
        let MlsMessageBodyIn::PublicMessage(public) = message.extract() else {
            return Err(ViewError::Corrupt(
                "a stored handshake message is not public",
            ));
        };
        let processed = self
            .group
            .process_message(&RustCrypto::default(), ProtocolMessage::from(public))
            .map_err(|e| corrupt(ViewError::Invalid(e.to_string())))?;
        match processed.into_content() {
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                self.group
                    .merge_commit(&ViewStorage::discarding(), *staged)
                    .map_err(|e| corrupt(library(e)))?;
                self.queued.clear();
                self.since_snapshot = self.since_snapshot.saturating_add(1);
                Ok(())
            }
            ProcessedMessageContent::ProposalMessage(queued) => self.queue(*queued).map(drop),
            _ => Err(ViewError::Corrupt(
                "a stored handshake message is no commit or proposal",
            )),
        }
    }

    /// Commits merged since the view's state was last encoded.
    pub fn since_snapshot(&self) -> u32 {
        self.since_snapshot
    }

    /// Makes the next merged commit a snapshot, whatever the count since the last one.
    pub fn snapshot_next(&mut self) {
        self.since_snapshot = self.since_snapshot.max(SNAPSHOT_EVERY - 1);
    }

    /// The group's current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.group_context().epoch().as_u64()
    }

    /// The current members' identities, in leaf order.
    pub fn members(&self) -> Vec<IdentityKey> {
        self.group
            .members()
            .filter_map(|m| identity_of(&m.credential).ok())
            .collect()
    }

    /// The encoded proposals of the current epoch, for a store (empty after each commit).
    pub fn proposals(&self) -> Vec<u8> {
        encode_proposals(&self.queued)
    }

    /// Verifies a handshake message `sender` (the caller's bound identity) sends: a commit or
    /// proposal for this group and epoch, as described in the [module docs](self). Changes
    /// nothing: the result is merged or queued once the server accepts the message.
    pub fn stage(&self, sender: &IdentityKey, message: &[u8]) -> Result<Verified, ViewError> {
        let message =
            MlsMessageIn::tls_deserialize_exact(message).map_err(|_| ViewError::Malformed)?;
        let public = match message.extract() {
            MlsMessageBodyIn::PublicMessage(m) => m,
            MlsMessageBodyIn::PrivateMessage(_) => return Err(ViewError::NotPublic),
            _ => return Err(ViewError::NotHandshake),
        };
        if public.group_id() != self.group.group_id() {
            return Err(ViewError::WrongGroup);
        }
        let (current, got) = (self.epoch(), public.epoch().as_u64());
        if current != got {
            return Err(ViewError::WrongEpoch { current, got });
        }
        let confirmation_tag = public.confirmation_tag().cloned();
        let leaf = match public.sender() {
            Sender::Member(leaf) => *leaf,
            _ => return Err(ViewError::NotMember),
        };
        let member = self.group.leaf(leaf).ok_or(ViewError::NotMember)?;
        let identity = leaf_identity(member).map_err(policy)?;
        if identity != *sender {
            return Err(ViewError::NotCaller);
        }
        let crypto = RustCrypto::default();
        let processed = self
            .group
            .process_message(&crypto, ProtocolMessage::from(public))
            .map_err(process_error)?;
        if identity_of(processed.credential()).map_err(policy)? != identity {
            return Err(ViewError::NotCaller);
        }
        match processed.into_content() {
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let tag = confirmation_tag
                    .ok_or(ViewError::Invalid("commit without confirmation tag".into()))?;
                self.check_commit(*staged, leaf, identity, tag, &crypto)
                    .map(|s| Verified::Commit(Box::new(s)))
            }
            ProcessedMessageContent::ProposalMessage(queued) => {
                check_proposal(queued.proposal()).map_err(policy)?;
                if self.queued.len() >= MAX_QUEUED_PROPOSALS {
                    return Err(ViewError::Policy(format!(
                        "at most {MAX_QUEUED_PROPOSALS} proposals wait for a commit"
                    )));
                }
                if let Proposal::Update(update) = queued.proposal()
                    && leaf_identity(update.leaf_node()).map_err(policy)? != identity
                {
                    return Err(ViewError::Policy(
                        "an update may not change the member's identity".into(),
                    ));
                }
                Ok(Verified::Proposal(queued))
            }
            _ => Err(ViewError::NotHandshake),
        }
    }

    /// Our rules on a commit openmls staged: accepted proposal types, bound leaves, no
    /// identity change; lists who it adds and removes.
    fn check_commit(
        &self,
        staged: StagedCommit,
        committer: LeafNodeIndex,
        identity: IdentityKey,
        confirmation_tag: ConfirmationTag,
        crypto: &RustCrypto,
    ) -> Result<StagedView, ViewError> {
        let mut added = Vec::new();
        let mut removed = Vec::new();
        let mut key_packages = HashSet::new();
        for queued in staged.queued_proposals() {
            let proposal = queued.proposal();
            check_proposal(proposal).map_err(policy)?;
            match proposal {
                Proposal::Add(add) => {
                    let kp = add.key_package();
                    added.push(leaf_identity(kp.leaf_node()).map_err(policy)?);
                    let r = kp.hash_ref(crypto).map_err(library)?;
                    key_packages.insert(r.as_slice().to_vec());
                }
                Proposal::Remove(remove) => {
                    let leaf = self
                        .group
                        .leaf(remove.removed())
                        .ok_or(ViewError::Invalid("a Remove names an empty leaf".into()))?;
                    let gone = leaf_identity(leaf).map_err(policy)?;
                    if !removed.contains(&gone) {
                        removed.push(gone);
                    }
                }
                Proposal::Update(update) => {
                    let sender = match queued.sender() {
                        Sender::Member(leaf) => self.group.leaf(*leaf),
                        _ => None,
                    }
                    .ok_or(ViewError::NotMember)?;
                    if leaf_identity(update.leaf_node()).map_err(policy)?
                        != leaf_identity(sender).map_err(policy)?
                    {
                        return Err(ViewError::Policy(
                            "an update may not change a member's identity".into(),
                        ));
                    }
                }
                _ => {}
            }
        }
        if let Some(leaf) = staged.update_path_leaf_node()
            && leaf_identity(leaf).map_err(policy)? != identity
        {
            return Err(ViewError::Policy(
                "the update path may not change the committer's identity".into(),
            ));
        }
        Ok(StagedView {
            staged,
            committer,
            confirmation_tag,
            added,
            removed,
            key_packages,
        })
    }

    /// Checks the Welcome of a staged commit: present exactly when it adds members, of the
    /// group's suite, and encrypted to exactly the added KeyPackages.
    pub fn check_welcome(
        &self,
        staged: &StagedView,
        welcome: Option<&[u8]>,
    ) -> Result<(), ViewError> {
        let Some(bytes) = welcome else {
            return if staged.added.is_empty() {
                Ok(())
            } else {
                Err(ViewError::Welcome(
                    "a commit that adds members must carry their Welcome",
                ))
            };
        };
        if staged.added.is_empty() {
            return Err(ViewError::Welcome(
                "a commit that adds no one carries no Welcome",
            ));
        }
        let message = MlsMessageIn::tls_deserialize_exact(bytes)
            .map_err(|_| ViewError::Welcome("not an MLS message"))?;
        let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
            return Err(ViewError::Welcome("not a Welcome"));
        };
        if welcome.ciphersuite() != self.group.ciphersuite() {
            return Err(ViewError::Welcome("another ciphersuite than the group's"));
        }
        let recipients: HashSet<Vec<u8>> = welcome
            .secrets()
            .iter()
            .map(|s| s.new_member().as_slice().to_vec())
            .collect();
        if recipients.len() != welcome.secrets().len() || recipients != staged.key_packages {
            return Err(ViewError::Welcome(
                "it is not for exactly the added KeyPackages",
            ));
        }
        Ok(())
    }

    /// Merges a staged commit, then checks the committer's GroupInfo for the new epoch against
    /// the merged view: the same group context and confirmation tag, signed by the committer's
    /// leaf, carrying no ratchet tree. Every [`SNAPSHOT_EVERY`]th commit since the last
    /// snapshot returns the new encoded state; the others encode nothing.
    ///
    /// On an error the view has already moved: the caller must drop it (and reload the stored
    /// one), not use it.
    pub fn merge(&mut self, staged: StagedView, group_info: &[u8]) -> Result<Merged, ViewError> {
        let StagedView {
            staged,
            committer,
            confirmation_tag,
            ..
        } = staged;
        let snapshot = self.since_snapshot + 1 >= SNAPSHOT_EVERY;
        let storage = if snapshot {
            ViewStorage::default()
        } else {
            ViewStorage::discarding()
        };
        self.group.merge_commit(&storage, staged).map_err(library)?;
        self.queued.clear();
        self.check_group_info(group_info, committer, &confirmation_tag)?;
        if !snapshot {
            self.since_snapshot += 1;
            return Ok(Merged { state: None });
        }
        let state = storage.encode()?;
        self.since_snapshot = 0;
        Ok(Merged { state: Some(state) })
    }

    /// Queues a verified proposal the server accepted; returns the encoded proposals.
    pub fn queue(&mut self, proposal: QueuedProposal) -> Result<Vec<u8>, ViewError> {
        let storage = ViewStorage::default();
        self.group
            .add_proposal(&storage, proposal)
            .map_err(library)?;
        self.queued
            .extend(storage.proposals.borrow().iter().cloned());
        Ok(self.proposals())
    }

    /// The group id and epoch a serialized GroupInfo names.
    pub fn group_info_epoch(group_info: &[u8]) -> Result<(Vec<u8>, u64), ViewError> {
        let info = parse_group_info(group_info)?;
        Ok((info.group_id().as_slice().to_vec(), info.epoch().as_u64()))
    }
}

fn parse_group_info(bytes: &[u8]) -> Result<VerifiableGroupInfo, ViewError> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|_| ViewError::GroupInfo("not an MLS message"))?;
    match message.extract() {
        MlsMessageBodyIn::GroupInfo(info) => Ok(info),
        _ => Err(ViewError::GroupInfo("not a GroupInfo")),
    }
}

fn process_error(e: PublicProcessMessageError) -> ViewError {
    match e {
        PublicProcessMessageError::IncompatibleWireFormat => ViewError::NotPublic,
        PublicProcessMessageError::UnauthorizedExternalCommitMessage => {
            ViewError::Policy("external commits are not accepted".into())
        }
        other => ViewError::Invalid(other.to_string()),
    }
}
