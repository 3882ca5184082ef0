//! The client's MLS group: create, join, commit, encrypt and process; and [`inspect`] for the
//! server. Pure logic over bytes: no I/O, no async.
//!
//! # The server-ordered log
//!
//! The server keeps, per group, one totally ordered log of MLS messages and accepts at most one
//! commit per epoch: the first commit for epoch `n` it receives wins, later commits for `n` are
//! refused. It learns kind, group id and epoch from the public framing with [`inspect`]; to keep
//! that possible our groups send handshake messages (commits, proposals) as PublicMessage,
//! while application messages are always PrivateMessage (openmls encrypts every application
//! message whatever the wire-format policy). Every member processes the log in order with
//! [`Group::process`]; a commit is merged as soon as it is processed, because the log, not the
//! member, decides which commit an epoch ends with.
//!
//! # Pending commits
//!
//! [`Group::add_members`], [`Group::remove_members`] and [`Group::self_update`] do not change
//! the epoch: they stage a commit and return it ([`CommitOutput`]) for the caller to submit
//! for [`CommitOutput::epoch`]. The commit stays *pending* (and is persisted with the group)
//! until the caller learns the server's answer:
//!
//! - **accepted**: either call [`Group::merge_pending_commit`] at once, or simply keep
//!   processing the log: when the commit comes back, [`Group::process`] recognises it as ours
//!   (openmls compares its confirmation tag with the pending one), merges the pending commit and
//!   returns the same [`Event::Commit`] everyone else gets. Only then may the Welcome be
//!   delivered to the new members.
//! - **refused** (another commit won the epoch): [`Group::discard_pending_commit`], process the
//!   log up to and including the winner, then build the commit again if it is still wanted
//!   (KeyPackages whose Welcome was never delivered can be used again). Processing the winner
//!   without discarding first also drops the pending commit.
//!
//! Discard only on a definite refusal: if a discarded commit turns out to be in the log,
//! processing it fails with [`GroupError::OwnCommitLost`] and this device has to be re-added.
//!
//! # Own messages and stale messages
//!
//! The log returns our own messages too. [`Group::process`] handles them: an own application
//! message gives [`Event::Own`] (skip it, the caller already has the plaintext); an own commit
//! that is still pending is merged (above). An own commit already merged with
//! [`Group::merge_pending_commit`] is, like anything else from an epoch we have left, refused
//! with [`GroupError::WrongEpoch`] where [`GroupError::is_stale`] holds: skip those too. The same
//! goes for the log before a member joined: a member starts processing after the commit that
//! added it (the commit's epoch is below the Welcome's). Application messages up to
//! [`MAX_PAST_EPOCHS`] epochs old still decrypt, so a message sent just before a commit but
//! logged after it is not lost.
//!
//! # Identities
//!
//! Every leaf's credential must be a basic credential naming the leaf's own Ed25519 signature
//! key (as [`check_key_package`](crate::mls::check_key_package) demands of KeyPackages). This
//! is checked on join for the whole tree and for every leaf a commit adds or changes, so the
//! [`IdentityKey`]s reported in [`Event`]s are the keys that signed. Only Add, Update and
//! Remove proposals are accepted.
//!
//! # Persistence
//!
//! openmls writes every state change (including pending commits and each sender-ratchet step)
//! to the provider's storage. Persist the provider ([`MlsProvider::export_storage`]) after every
//! call that takes `&mut self`, and before sending what it returned, so a crash never reuses a
//! ratchet generation. [`Group::load`] restores the group from storage.

mod error;
mod event;
mod info;
mod inspect;
mod lifetime;
mod policy;
pub mod public;
#[cfg(test)]
mod tests;

use std::collections::HashSet;

pub use error::GroupError;
pub use event::{CommitOutput, Event};
pub use inspect::{MessageInfo, MessageKind, inspect};

use error::{process_error, welcome_error};
use policy::{bound_identity, check_proposal, identity_of, leaf_identity};

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    ContentType, CreateMessageError, GroupId, LeafNodeParameters,
    MIXED_PLAINTEXT_WIRE_FORMAT_POLICY, MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig,
    MlsGroupStateError, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, NewGroupError,
    OpenMlsProvider, ProcessedMessageContent, Proposal, ProtocolMessage,
    SenderRatchetConfiguration, StagedCommit, StagedWelcome,
};
use zeroize::Zeroizing;

use crate::identity::IdentityKey;
use crate::mls::{MlsIdentity, MlsProvider, Suite, leaf_capabilities, validate_key_package};

/// How many past epochs' application-message secrets a member keeps, so that a message sent
/// in epoch `n` and logged after the commit ending `n` still decrypts. Older messages are
/// refused with [`GroupError::WrongEpoch`]. Small on purpose: kept secrets weaken forward
/// secrecy.
pub const MAX_PAST_EPOCHS: usize = 2;

/// How many generations of one sender's ratchet may arrive out of order within an epoch. The
/// log orders messages, so this only covers a client whose concurrent sends were logged in
/// another order.
pub const OUT_OF_ORDER_TOLERANCE: u32 = 16;

/// How many generations of one sender may be skipped (messages encrypted but never logged).
pub const MAXIMUM_FORWARD_DISTANCE: u32 = 1000;

/// The runtime configuration every member of our groups uses (public for benchmarks that drive
/// bare openmls the way [`Group`] does).
pub fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAXIMUM_FORWARD_DISTANCE,
        ))
        .use_ratchet_tree_extension(true)
        .build()
}

fn create_config(suite: Suite) -> MlsGroupCreateConfig {
    let join = join_config();
    MlsGroupCreateConfig::builder()
        .ciphersuite(suite.ciphersuite())
        .capabilities(leaf_capabilities())
        .wire_format_policy(join.wire_format_policy())
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(*join.sender_ratchet_configuration())
        .use_ratchet_tree_extension(true)
        .build()
}

/// Membership changes of a staged commit.
struct Changes {
    added: Vec<IdentityKey>,
    removed: Vec<IdentityKey>,
}

/// An MLS group as one device sees it. Its state lives in the [`MlsProvider`]'s storage; every
/// method takes the provider the group was created, joined or loaded with.
pub struct Group {
    mls: MlsGroup,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("group_id", &hex::encode(self.mls.group_id().as_slice()))
            .field("epoch", &self.epoch())
            .field("members", &self.mls.members().count())
            .field("active", &self.mls.is_active())
            .field("pending_commit", &self.has_pending_commit())
            .finish_non_exhaustive()
    }
}

impl Group {
    /// Creates a group with the given id and us as its only member, at epoch 0.
    pub fn create(
        provider: &MlsProvider,
        me: &MlsIdentity,
        suite: Suite,
        group_id: &[u8],
    ) -> Result<Self, GroupError> {
        let mls = MlsGroup::new_with_group_id(
            provider,
            me.signer(),
            &create_config(suite),
            GroupId::from_slice(group_id),
            me.credential().clone(),
        )
        .map_err(|e| match e {
            NewGroupError::GroupAlreadyExists => GroupError::GroupExists,
            NewGroupError::StorageError(e) => GroupError::storage(e),
            other => GroupError::library(other),
        })?;
        Ok(Self { mls })
    }

    /// Loads the group with this id from the provider's storage, if it is there.
    pub fn load(provider: &MlsProvider, group_id: &[u8]) -> Result<Option<Self>, GroupError> {
        let mls = MlsGroup::load(provider.storage(), &GroupId::from_slice(group_id))
            .map_err(GroupError::storage)?;
        Ok(mls.map(|mls| Self { mls }))
    }

    /// Joins a group from a serialized Welcome (MLSMessage), taking the ratchet tree from its
    /// extension. Uses up the KeyPackage it was made for (unless that is the last-resort one),
    /// even if joining then fails.
    ///
    /// Replaces the state of an earlier membership in the same group if we were removed from
    /// it; fails with [`GroupError::GroupExists`] if we are still an active member.
    pub fn join(provider: &MlsProvider, welcome: &[u8]) -> Result<Self, GroupError> {
        let message =
            MlsMessageIn::tls_deserialize_exact(welcome).map_err(|_| GroupError::Malformed)?;
        let welcome = match message.extract() {
            MlsMessageBodyIn::Welcome(welcome) => welcome,
            other => return Err(GroupError::UnexpectedKind(inspect::kind_of(&other))),
        };
        if Suite::from_ciphersuite(welcome.ciphersuite()).is_none() {
            return Err(GroupError::UnsupportedSuite);
        }
        let builder = StagedWelcome::build_from_welcome(provider, &join_config(), welcome)
            .map_err(welcome_error)?;
        let group_id = builder
            .processed_welcome()
            .unverified_group_info()
            .group_id()
            .clone();
        if let Some(mut old) =
            MlsGroup::load(provider.storage(), &group_id).map_err(GroupError::storage)?
        {
            if old.is_active() {
                return Err(GroupError::GroupExists);
            }
            old.delete(provider.storage())
                .map_err(GroupError::storage)?;
        }
        let staged = builder.build().map_err(welcome_error)?;
        for member in staged.members() {
            bound_identity(&member.credential, &member.signature_key)?;
        }
        let mls = staged.into_group(provider).map_err(welcome_error)?;
        Ok(Self { mls })
    }

    /// Removes the group's state from the provider's storage (e.g. after we were removed).
    pub fn delete(mut self, provider: &MlsProvider) -> Result<(), GroupError> {
        self.mls
            .delete(provider.storage())
            .map_err(GroupError::storage)
    }

    /// Stages a commit adding the members of these serialized KeyPackages, all in one commit.
    /// Each KeyPackage is fully validated (signatures, lifetime, the group's suite, credential
    /// naming its signature key) first. See the [module docs](self) for what to do with the
    /// pending commit.
    pub fn add_members(
        &mut self,
        provider: &MlsProvider,
        me: &MlsIdentity,
        key_packages: &[Vec<u8>],
    ) -> Result<CommitOutput, GroupError> {
        self.ready_to_commit(me)?;
        if key_packages.is_empty() {
            return Err(GroupError::EmptyInput);
        }
        let suite = self.suite().ok_or(GroupError::UnsupportedSuite)?;
        let mut present: HashSet<IdentityKey> = self.members().into_iter().collect();
        let mut validated = Vec::with_capacity(key_packages.len());
        for (index, bytes) in key_packages.iter().enumerate() {
            let (kp, checked) = validate_key_package(bytes, provider.crypto(), &[suite])
                .map_err(|source| GroupError::InvalidKeyPackage { index, source })?;
            if !present.insert(checked.identity) {
                return Err(GroupError::DuplicateMember(checked.identity));
            }
            validated.push(kp);
        }
        let epoch = self.epoch();
        let (commit, welcome, info) = self
            .mls
            .add_members(provider, me.signer(), &validated)
            .map_err(GroupError::library)?;
        self.commit_output(
            me,
            epoch,
            &commit,
            Some(&welcome),
            info.map(MlsMessageOut::from),
        )
    }

    /// Stages a commit removing these members (found by the identity in their credential).
    pub fn remove_members(
        &mut self,
        provider: &MlsProvider,
        me: &MlsIdentity,
        identities: &[IdentityKey],
    ) -> Result<CommitOutput, GroupError> {
        self.ready_to_commit(me)?;
        if identities.is_empty() {
            return Err(GroupError::EmptyInput);
        }
        let mut leaves = Vec::with_capacity(identities.len());
        for identity in identities {
            if *identity == me.identity() {
                return Err(GroupError::CannotRemoveSelf);
            }
            let leaf = self
                .mls
                .members()
                .find(|m| identity_of(&m.credential).ok() == Some(*identity))
                .map(|m| m.index)
                .ok_or(GroupError::UnknownMember(*identity))?;
            if !leaves.contains(&leaf) {
                leaves.push(leaf);
            }
        }
        let epoch = self.epoch();
        let (commit, welcome, info) = self
            .mls
            .remove_members(provider, me.signer(), &leaves)
            .map_err(GroupError::library)?;
        self.commit_output(
            me,
            epoch,
            &commit,
            welcome.as_ref(),
            info.map(MlsMessageOut::from),
        )
    }

    /// Stages a commit that only refreshes our leaf's keys (post-compromise security), also
    /// covering any pending proposals.
    pub fn self_update(
        &mut self,
        provider: &MlsProvider,
        me: &MlsIdentity,
    ) -> Result<CommitOutput, GroupError> {
        self.ready_to_commit(me)?;
        let epoch = self.epoch();
        let bundle = self
            .mls
            .self_update(provider, me.signer(), LeafNodeParameters::default())
            .map_err(GroupError::library)?;
        let (commit, welcome, info) = bundle.into_messages();
        self.commit_output(me, epoch, &commit, welcome.as_ref(), info)
    }

    /// Merges our pending commit (the server accepted it) and returns the new epoch. Its echo
    /// in the log is then stale ([`GroupError::is_stale`]).
    pub fn merge_pending_commit(&mut self, provider: &MlsProvider) -> Result<u64, GroupError> {
        if !self.mls.is_active() {
            return Err(GroupError::NotMember);
        }
        if !self.has_pending_commit() {
            return Err(GroupError::NoPendingCommit);
        }
        self.mls
            .merge_pending_commit(provider)
            .map_err(GroupError::library)?;
        Ok(self.epoch())
    }

    /// Drops our pending commit (the server refused it). Does nothing if there is none.
    pub fn discard_pending_commit(&mut self, provider: &MlsProvider) -> Result<(), GroupError> {
        self.mls
            .clear_pending_commit(provider.storage())
            .map_err(GroupError::storage)
    }

    /// Encrypts an application message (PrivateMessage) for the current epoch.
    pub fn encrypt(
        &mut self,
        provider: &MlsProvider,
        me: &MlsIdentity,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, GroupError> {
        self.check_me(me)?;
        if self.mls.has_pending_proposals() {
            return Err(GroupError::PendingProposals);
        }
        let message = self
            .mls
            .create_message(provider, me.signer(), plaintext)
            .map_err(|e| match e {
                CreateMessageError::GroupStateError(MlsGroupStateError::UseAfterEviction) => {
                    GroupError::NotMember
                }
                other => GroupError::library(other),
            })?;
        serialize(&message)
    }

    /// Processes the next message of the group's log (a serialized MLSMessage): decrypts an
    /// application message, stores a proposal, or validates and merges a commit (ours coming
    /// back included). See the [module docs](self) for own and stale messages.
    ///
    /// A refused message leaves epoch, membership and pending commit as they were.
    pub fn process(&mut self, provider: &MlsProvider, message: &[u8]) -> Result<Event, GroupError> {
        let message =
            MlsMessageIn::tls_deserialize_exact(message).map_err(|_| GroupError::Malformed)?;
        let message: ProtocolMessage = match message.extract() {
            MlsMessageBodyIn::PublicMessage(m) => m.into(),
            MlsMessageBodyIn::PrivateMessage(m) => m.into(),
            other => return Err(GroupError::UnexpectedKind(inspect::kind_of(&other))),
        };
        if message.group_id() != self.mls.group_id() {
            return Err(GroupError::WrongGroup);
        }
        if !self.mls.is_active() {
            return Err(GroupError::NotMember);
        }
        let (expected, got) = (self.epoch(), message.epoch().as_u64());
        let recent_application = message.content_type() == ContentType::Application
            && got < expected
            && expected - got <= MAX_PAST_EPOCHS as u64;
        if got != expected && !recent_application {
            return Err(GroupError::WrongEpoch { expected, got });
        }

        let processed = self
            .mls
            .process_message(provider, message)
            .map_err(|e| process_error(e, expected, got))?;
        let credential = processed.credential().clone();
        let epoch = processed.epoch().as_u64();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(m) => Ok(Event::Application {
                sender: identity_of(&credential)?,
                plaintext: m.into_bytes(),
            }),
            ProcessedMessageContent::ProposalMessage(proposal) => {
                check_proposal(proposal.proposal())?;
                let sender = identity_of(&credential)?;
                self.mls
                    .store_pending_proposal(provider.storage(), *proposal)
                    .map_err(GroupError::storage)?;
                Ok(Event::Proposal { sender })
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(GroupError::Rejected(
                "external proposals are not accepted".into(),
            )),
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let changes = self.changes(&staged)?;
                let committer = identity_of(&credential)?;
                let we_were_removed = staged.self_removed();
                self.mls
                    .merge_staged_commit(provider, *staged)
                    .map_err(GroupError::library)?;
                Ok(self.commit_event(committer, changes, we_were_removed))
            }
            ProcessedMessageContent::OwnPendingCommit => {
                let staged = self.mls.pending_commit().ok_or(GroupError::OwnCommitLost)?;
                let changes = self.changes(staged)?;
                let committer = identity_of(&credential)?;
                self.mls
                    .merge_pending_commit(provider)
                    .map_err(GroupError::library)?;
                Ok(self.commit_event(committer, changes, false))
            }
            ProcessedMessageContent::OwnPrivateMessage => Ok(Event::Own { epoch }),
        }
    }

    /// The group's GroupInfo for the current epoch (an MLSMessage), with the ratchet tree and
    /// signed by us: what the server builds its public view of a new group from.
    pub fn group_info(
        &self,
        provider: &MlsProvider,
        me: &MlsIdentity,
    ) -> Result<Vec<u8>, GroupError> {
        self.check_me(me)?;
        let info = self
            .mls
            .export_group_info(provider.crypto(), me.signer(), true)
            .map_err(GroupError::library)?;
        serialize(&info)
    }

    /// The group id.
    pub fn group_id(&self) -> Vec<u8> {
        self.mls.group_id().as_slice().to_vec()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.mls.epoch().as_u64()
    }

    /// The group's suite (`None` only for a group some other software stored).
    pub fn suite(&self) -> Option<Suite> {
        Suite::from_ciphersuite(self.mls.ciphersuite())
    }

    /// The members' identities, in leaf order.
    pub fn members(&self) -> Vec<IdentityKey> {
        self.mls
            .members()
            .filter_map(|m| identity_of(&m.credential).ok())
            .collect()
    }

    /// The epoch authenticator: equal for all members in the same epoch with the same view of
    /// the group; compare it out of band to detect a split view.
    pub fn epoch_authenticator(&self) -> Vec<u8> {
        self.mls.epoch_authenticator().as_slice().to_vec()
    }

    /// Derives `len` bytes from the current epoch's exporter secret (RFC 9420 MLS-Exporter, empty
    /// context). Equal for all members of an epoch, different in every epoch.
    pub fn export_secret(
        &self,
        provider: &MlsProvider,
        label: &str,
        len: usize,
    ) -> Result<Zeroizing<Vec<u8>>, GroupError> {
        if !self.mls.is_active() {
            return Err(GroupError::NotMember);
        }
        self.mls
            .export_secret(provider.crypto(), label, &[], len)
            .map(Zeroizing::new)
            .map_err(GroupError::library)
    }

    /// Whether we are still a member (false once a commit removing us was processed).
    pub fn is_active(&self) -> bool {
        self.mls.is_active()
    }

    /// Our leaf's lifetime (`not_before`, `not_after`, Unix seconds) while it is still the one
    /// from the KeyPackage we joined (or created the group) with; `None` once we updated it (a
    /// leaf from an update or commit has no lifetime) or when we are no member.
    pub fn own_leaf_lifetime(&self) -> Option<(u64, u64)> {
        let leaf = self.mls.own_leaf()?.tls_serialize_detached().ok()?;
        lifetime::of_leaf(&leaf)
    }

    /// Whether our leaf should be renewed (by [`Group::self_update`]) at Unix time `now`: it
    /// still carries its KeyPackage's lifetime and half of it has passed. Once that lifetime
    /// ends, nobody can join the group (openmls refuses a tree with an expired leaf), so
    /// members renew their leaf well before.
    pub fn leaf_renewal_due(&self, now: u64) -> bool {
        self.own_leaf_lifetime()
            .is_some_and(|(not_before, not_after)| {
                now >= not_before.saturating_add(not_after.saturating_sub(not_before) / 2)
            })
    }

    /// Whether a commit of ours is pending.
    pub fn has_pending_commit(&self) -> bool {
        self.mls.pending_commit().is_some()
    }

    fn check_me(&self, me: &MlsIdentity) -> Result<(), GroupError> {
        if !self.mls.is_active() {
            return Err(GroupError::NotMember);
        }
        let own = self.mls.own_leaf().ok_or(GroupError::NotMember)?;
        if own.signature_key().as_slice() != me.identity().as_bytes() {
            return Err(GroupError::WrongIdentity);
        }
        Ok(())
    }

    fn ready_to_commit(&self, me: &MlsIdentity) -> Result<(), GroupError> {
        self.check_me(me)?;
        if self.has_pending_commit() {
            return Err(GroupError::PendingCommit);
        }
        Ok(())
    }

    fn commit_output(
        &self,
        me: &MlsIdentity,
        epoch: u64,
        commit: &MlsMessageOut,
        welcome: Option<&MlsMessageOut>,
        group_info: Option<MlsMessageOut>,
    ) -> Result<CommitOutput, GroupError> {
        let group_info = group_info
            .ok_or_else(|| GroupError::library("the commit came without its GroupInfo"))?;
        let group_info = info::without_ratchet_tree(&serialize(&group_info)?, me.signer())?;
        let staged = self
            .mls
            .pending_commit()
            .ok_or_else(|| GroupError::library("commit staged but not pending"))?;
        let changes = self.changes(staged)?;
        Ok(CommitOutput {
            commit: serialize(commit)?,
            welcome: welcome.map(serialize).transpose()?,
            group_info,
            epoch,
            added: changes.added,
            removed: changes.removed,
        })
    }

    fn commit_event(&self, committer: IdentityKey, changes: Changes, removed_us: bool) -> Event {
        Event::Commit {
            epoch: self.epoch(),
            committer,
            added: changes.added,
            removed: changes.removed,
            we_were_removed: removed_us,
        }
    }

    /// Checks a staged commit against our policy (proposal types, credentials bound to their
    /// signature keys) and lists who it adds and removes. Call before merging.
    fn changes(&self, staged: &StagedCommit) -> Result<Changes, GroupError> {
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for queued in staged.queued_proposals() {
            let proposal = queued.proposal();
            check_proposal(proposal)?;
            match proposal {
                Proposal::Add(add) => added.push(leaf_identity(add.key_package().leaf_node())?),
                Proposal::Remove(remove) => {
                    let member = self.mls.member_at(remove.removed()).ok_or_else(|| {
                        GroupError::Rejected("commit removes an empty leaf".into())
                    })?;
                    removed.push(bound_identity(&member.credential, &member.signature_key)?);
                }
                _ => {}
            }
        }
        if let Some(leaf) = staged.update_path_leaf_node() {
            leaf_identity(leaf)?;
        }
        Ok(Changes { added, removed })
    }
}

fn serialize(message: &MlsMessageOut) -> Result<Vec<u8>, GroupError> {
    message
        .tls_serialize_detached()
        .map_err(GroupError::library)
}
