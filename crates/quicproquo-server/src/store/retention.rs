//! Retention: what the background job on each group's owner deletes (ADR 0016), as store
//! operations both stores implement the same way.
//!
//! - A group's log loses, oldest first, the entries every current member has acknowledged
//!   (its cursor, or the commit that added it) that are older than `log_retention`, and any
//!   entry older than `log_max_age` whoever has read it. What is gone is a prefix: the group's
//!   *pruned seq* (raised before the entries go) tells a reader asking for an entry at or
//!   below it that the history is gone ([`StoreError::HistoryGone`]).
//! - An inbox entry goes once its Welcome is consumed (the recipient acknowledged the group at
//!   or past the commit that added it, or is no longer the member that commit added) or is
//!   older than `log_max_age`; a Welcome goes with its last inbox entry.
//! - A KeyPackage goes once its lifetime is over (it is never handed out after that anyway).
//!
//! Every operation deletes at most one batch and says how many rows it deleted, so the job
//! bounds each transaction and can stop between batches.

use std::time::Duration;

use super::{AnyStore, StoreError};
use crate::model::group::GroupId;

/// What may be deleted, and how much per transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Entries every member acknowledged are kept this long.
    pub log_retention: Duration,
    /// Entries, Welcomes and inbox entries older than this are deleted whoever has read them.
    pub log_max_age: Duration,
    /// Most rows deleted by one operation (one transaction).
    pub batch: usize,
}

impl RetentionPolicy {
    /// The age past which some entry of a log may be deleted: the shorter of the two.
    pub fn first_cutoff(&self) -> Duration {
        self.log_retention.min(self.log_max_age)
    }
}

/// One page of the groups whose logs may hold something to delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CandidatePage {
    /// Groups whose oldest kept entry is older than [`RetentionPolicy::first_cutoff`].
    pub groups: Vec<GroupId>,
    /// The last group looked at: pass it back for the next page (`None`: no more groups).
    pub next: Option<GroupId>,
}

/// What the store holds, in bytes, by kind (gauges; no per-user or per-group labels).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredBytes {
    /// Group logs (with their message-id index).
    pub group_log: u64,
    /// Welcomes and inbox entries.
    pub welcomes: u64,
    /// Pooled and last-resort KeyPackages.
    pub key_packages: u64,
    /// The groups' public views.
    pub group_views: u64,
}

/// Microseconds in `d`, as the stores compare times.
pub(super) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The retention operations.
pub trait RetentionStore: Send + Sync + 'static {
    /// Up to `limit` groups after `after` (in id order) and which of them may have entries to
    /// delete under `policy`.
    fn retention_candidates(
        &self,
        after: Option<&GroupId>,
        limit: usize,
        policy: &RetentionPolicy,
    ) -> impl Future<Output = Result<CandidatePage, StoreError>> + Send;

    /// Deletes the next batch of `group`'s log that `policy` lets go (raising its pruned seq
    /// first); returns how many entries it deleted (fewer than the batch: nothing is left).
    fn prune_group_log(
        &self,
        group: &GroupId,
        policy: &RetentionPolicy,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Deletes one batch of consumed or too old inbox entries, and of Welcomes no inbox entry
    /// uses any more; returns how many rows it deleted.
    fn prune_welcomes(
        &self,
        policy: &RetentionPolicy,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Deletes one batch (at most `batch`) of expired KeyPackages, pooled and last-resort;
    /// returns how many it deleted.
    fn prune_key_packages(
        &self,
        batch: usize,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// The bytes the store holds, by kind.
    fn stored_bytes(&self) -> impl Future<Output = Result<StoredBytes, StoreError>> + Send;

    /// `group`'s pruned seq: entries up to it may be gone (0: nothing was ever deleted).
    fn pruned_seq(&self, group: &GroupId) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Runs `$e` on whichever store this is. Unlike the other store calls, without a span: the job
/// runs in the background, not on behalf of a traced request, and its progress is in metrics.
macro_rules! direct {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Embedded($s) => $e.await,
            AnyStore::Postgres($s) => $e.await,
        }
    };
}

impl RetentionStore for AnyStore {
    async fn retention_candidates(
        &self,
        after: Option<&GroupId>,
        limit: usize,
        policy: &RetentionPolicy,
    ) -> Result<CandidatePage, StoreError> {
        direct!(self, s => s.retention_candidates(after, limit, policy))
    }

    async fn prune_group_log(
        &self,
        group: &GroupId,
        policy: &RetentionPolicy,
    ) -> Result<usize, StoreError> {
        direct!(self, s => s.prune_group_log(group, policy))
    }

    async fn prune_welcomes(&self, policy: &RetentionPolicy) -> Result<usize, StoreError> {
        direct!(self, s => s.prune_welcomes(policy))
    }

    async fn prune_key_packages(&self, batch: usize) -> Result<usize, StoreError> {
        direct!(self, s => s.prune_key_packages(batch))
    }

    async fn stored_bytes(&self) -> Result<StoredBytes, StoreError> {
        direct!(self, s => s.stored_bytes())
    }

    async fn pruned_seq(&self, group: &GroupId) -> Result<u64, StoreError> {
        direct!(self, s => s.pruned_seq(group))
    }
}
