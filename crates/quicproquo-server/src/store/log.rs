//! What the Delivery Service stores: groups, their ordered logs, membership, Welcomes in
//! per-identity inboxes, and per-member cursors.
//!
//! The rules of [`crate::model::group`] (gap-free sequence numbers, one commit per epoch, the
//! epoch window of application messages, idempotent message ids) are applied inside one store
//! transaction, under the groups' row locks, so they hold however many shards believe they own
//! a group.
//!
//! A member may read the entries between joining and leaving: the creator from the start,
//! an added member after the commit that added it, a removed member up to and including the
//! commit that removed it.

use quicproquo_core::IdentityKey;

use super::StoreError;
use crate::model::group::{
    AppendOutcome, AppendRequest, GroupId, GroupSummary, InboxEntry, LogEntry, StoredView,
};
use crate::model::page::Page;
use crate::model::revert::{RevertOutcome, RevertRequest};

/// The Delivery Service's storage operations.
pub trait LogStore: Send + Sync + 'static {
    /// Creates `group_id` at epoch 0 with `creator` as its only member and no public view
    /// (the store's own tests; the Delivery Service creates groups with
    /// [`create_group_with_view`](Self::create_group_with_view)).
    fn create_group(
        &self,
        group_id: &GroupId,
        creator: &IdentityKey,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.create_group_with_view(group_id, creator, None)
    }

    /// Creates `group_id` at epoch 0 with `creator` as its only member and, if given, its
    /// public view, in one transaction.
    fn create_group_with_view(
        &self,
        group_id: &GroupId,
        creator: &IdentityKey,
        view: Option<&StoredView>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The group's public view as last written (`None`: the group has none).
    fn load_view(
        &self,
        group_id: &GroupId,
    ) -> impl Future<Output = Result<Option<StoredView>, StoreError>> + Send;

    /// The group's latest GroupInfo and its epoch, without the view's state (`None`: the
    /// group has no view).
    fn group_info(
        &self,
        group_id: &GroupId,
    ) -> impl Future<Output = Result<Option<(Vec<u8>, u64)>, StoreError>> + Send;

    /// Reverts the group's latest commit at `req.seq` if the rules of
    /// [`crate::model::revert`] allow it, in one transaction under the group's lock: appends
    /// the marker, moves the group back to the epoch before the commit, undoes its membership
    /// change, withdraws its Welcome from the inboxes and restores the view before it.
    fn revert(
        &self,
        req: &RevertRequest,
    ) -> impl Future<Output = Result<RevertOutcome, StoreError>> + Send;

    /// Appends a batch in one transaction (group commit); one outcome per request, in order.
    /// Requests for the same group are applied in batch order.
    fn append(
        &self,
        batch: &[AppendRequest],
    ) -> impl Future<Output = Result<Vec<AppendOutcome>, StoreError>> + Send;

    /// The entries after `after_seq` that `reader` may read, one [`Page`] of them (a bare
    /// count means that many under the default byte budget).
    fn read_log(
        &self,
        group_id: &GroupId,
        reader: &IdentityKey,
        after_seq: u64,
        page: impl Into<Page> + Send,
    ) -> impl Future<Output = Result<Vec<LogEntry>, StoreError>> + Send;

    /// Whether `reader` is a current member of the group: `Ok` if so, [`StoreError::NotMember`]
    /// if not, [`StoreError::UnknownGroup`] for no such group. One lookup, whatever the group's
    /// size (where [`group_summary`](Self::group_summary) reads and checks every member).
    fn check_member(
        &self,
        group_id: &GroupId,
        reader: &IdentityKey,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The group as `reader` (a current member) sees it.
    fn group_summary(
        &self,
        group_id: &GroupId,
        reader: &IdentityKey,
    ) -> impl Future<Output = Result<GroupSummary, StoreError>> + Send;

    /// The groups `identity` is a current member of.
    fn groups_of(
        &self,
        identity: &IdentityKey,
    ) -> impl Future<Output = Result<Vec<GroupId>, StoreError>> + Send;

    /// The Welcomes in `identity`'s inbox after `after_seq`, one [`Page`] of them.
    fn read_inbox(
        &self,
        identity: &IdentityKey,
        after_seq: u64,
        page: impl Into<Page> + Send,
    ) -> impl Future<Output = Result<Vec<InboxEntry>, StoreError>> + Send;

    /// Records that `identity` has processed `group_id` up to `seq` (never moves backwards).
    fn set_cursor(
        &self,
        identity: &IdentityKey,
        group_id: &GroupId,
        seq: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The stored cursor (0 when none).
    fn cursor(
        &self,
        identity: &IdentityKey,
        group_id: &GroupId,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}
