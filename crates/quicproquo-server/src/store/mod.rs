//! The durable store behind the Authentication Service ([`Store`]) and the Delivery Service
//! ([`log::LogStore`]).
//!
//! [`postgres::PgStore`] (tokio-postgres + deadpool) serves a cluster,
//! [`embedded::EmbeddedStore`] (one file, `qpq.db` in the data directory) serves a standalone
//! node without Postgres; [`AnyStore`] is whichever a server opened. Both implement both
//! traits and pass the same conformance suites (`quicproquo-testkit::conformance` and
//! `log_conformance`), which are the specification of the semantics below and in [`log`].
//!
//! Semantics every implementation keeps:
//! - every write is durable when its future resolves `Ok`;
//! - a pooled KeyPackage is handed out at most once, even to concurrent fetchers; when an
//!   identity's pool is empty its last-resort KeyPackage (if any) is returned and kept;
//! - a user name belongs to at most one identity and an identity has at most one name.

#[cfg(test)]
mod checks;
pub mod embedded;
mod embedded_log;
mod embedded_retention;
mod embedded_revert;
mod embedded_views;
pub mod log;

use quicproquo_core::IdentityKey;

use crate::model::group;
use crate::model::page::Page;
use crate::model::{ModelError, UserName};

pub mod postgres;
pub mod postgres_access;
pub mod postgres_cluster;
mod postgres_copy;
mod postgres_io;
mod postgres_log;
mod postgres_pipeline;
mod postgres_plan;
mod postgres_retention;
mod postgres_revert;
pub mod retention;

/// A validated KeyPackage ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPackageRecord {
    /// The KeyPackage's hash reference (unique per KeyPackage).
    pub hash_ref: Vec<u8>,
    /// The TLS-serialised KeyPackage.
    pub data: Vec<u8>,
    /// The end of its lifetime (Unix seconds); past it the KeyPackage is never handed out and
    /// the retention job deletes it. `None`: no known end (kept until fetched).
    pub not_after: Option<u64>,
}

/// A KeyPackage handed out by a fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedKeyPackage {
    /// Whose it is.
    pub identity: IdentityKey,
    /// The TLS-serialised KeyPackage.
    pub data: Vec<u8>,
    /// True when the pool was empty and this is the identity's last-resort KeyPackage.
    pub last_resort: bool,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The user name is already claimed by another identity.
    #[error("user name is taken")]
    NameTaken,
    /// The identity already has a different user name.
    #[error("identity already has a user name")]
    AlreadyNamed,
    /// A stored or given user name breaks the rules of [`UserName::parse`].
    #[error("invalid user name: use 3-32 characters a-z, 0-9, '_', '-', '.'")]
    InvalidName,
    /// The identity is not registered.
    #[error("unknown identity")]
    UnknownIdentity,
    /// The store could not be reached or a query failed; the operation had no effect.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data is inconsistent (a bug or corruption).
    #[error("store corrupt: {0}")]
    Corrupt(String),
    /// The group already exists.
    #[error("group already exists")]
    GroupExists,
    /// No such group.
    #[error("unknown group")]
    UnknownGroup,
    /// The identity is not (or no longer) allowed to read or write the group.
    #[error("not a member of the group")]
    NotMember,
    /// A parameter is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The entries asked for were deleted by retention: the log is kept from `retained_from`.
    #[error("the group's history before entry {retained_from} was deleted (retention)")]
    HistoryGone {
        /// The oldest entry that may still be read.
        retained_from: u64,
    },
}

impl From<ModelError> for StoreError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::InvalidName => Self::InvalidName,
            ModelError::InvalidArgument(m) => Self::InvalidArgument(m),
            ModelError::TooLarge { .. } => Self::InvalidArgument("message too large"),
            ModelError::Inconsistent(m) => Self::Corrupt(m.to_owned()),
        }
    }
}

/// The operations the Authentication Service needs.
///
/// Futures are `Send` so an implementation may be driven from any runtime.
pub trait Store: Send + Sync + 'static {
    /// Records an identity (idempotent).
    fn register_identity(
        &self,
        identity: &IdentityKey,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Gives `name` to `identity`. Claiming the name the identity already has succeeds.
    fn claim_name(
        &self,
        identity: &IdentityKey,
        name: &UserName,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The identity that owns `name`.
    fn resolve_name(
        &self,
        name: &UserName,
    ) -> impl Future<Output = Result<Option<IdentityKey>, StoreError>> + Send;

    /// The names `identities` claimed, in order (`None` for one with no name), read in one
    /// query whatever their number.
    fn names_of(
        &self,
        identities: &[IdentityKey],
    ) -> impl Future<Output = Result<Vec<Option<UserName>>, StoreError>> + Send;

    /// Adds KeyPackages to `identity`'s pool (ones whose `hash_ref` is already stored are
    /// skipped) and, if given, replaces its last-resort KeyPackage. Returns the pool size after.
    fn add_key_packages(
        &self,
        identity: &IdentityKey,
        packages: &[KeyPackageRecord],
        last_resort: Option<&KeyPackageRecord>,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// Takes one KeyPackage for each target, in order, consuming pooled ones atomically. A
    /// target with an empty pool gets its last-resort KeyPackage, or `None` if it has none.
    fn fetch_key_packages(
        &self,
        targets: &[IdentityKey],
    ) -> impl Future<Output = Result<Vec<Option<FetchedKeyPackage>>, StoreError>> + Send;

    /// How many pooled KeyPackages `identity` has (the last-resort one not counted).
    fn key_package_count(
        &self,
        identity: &IdentityKey,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;
}

/// The store a server runs with, chosen at start.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum AnyStore {
    /// The embedded single-file store, for standalone nodes.
    Embedded(embedded::EmbeddedStore),
    /// The cluster's PostgreSQL database.
    Postgres(postgres::PgStore),
}

/// Runs the store call `$e` on whichever store this is, inside a span named after `$op`.
macro_rules! dispatch {
    ($self:ident, $op:literal, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Embedded($s) => crate::obs::spans::store_call("redb", $op, $e).await,
            AnyStore::Postgres($s) => crate::obs::spans::store_call("postgresql", $op, $e).await,
        }
    };
}

/// How much of the store's connection pool is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUse {
    /// Most connections the pool may open.
    pub max: usize,
    /// Connections it holds.
    pub size: usize,
    /// Of those, the idle ones.
    pub available: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

impl AnyStore {
    /// Checks that the store answers (a round trip to Postgres; the embedded store is local).
    pub async fn check(&self) -> Result<(), StoreError> {
        match self {
            Self::Embedded(_) => Ok(()),
            Self::Postgres(pg) => pg.ping().await,
        }
    }

    /// The connection pool's use (`None` for the embedded store, which has no pool).
    pub fn pool_use(&self) -> Option<PoolUse> {
        match self {
            Self::Embedded(_) => None,
            Self::Postgres(pg) => Some(pg.pool_use()),
        }
    }
}

impl Store for AnyStore {
    async fn register_identity(&self, identity: &IdentityKey) -> Result<(), StoreError> {
        dispatch!(self, "register_identity", s => s.register_identity(identity))
    }

    async fn claim_name(&self, identity: &IdentityKey, name: &UserName) -> Result<(), StoreError> {
        dispatch!(self, "claim_name", s => s.claim_name(identity, name))
    }

    async fn resolve_name(&self, name: &UserName) -> Result<Option<IdentityKey>, StoreError> {
        dispatch!(self, "resolve_name", s => s.resolve_name(name))
    }

    async fn names_of(
        &self,
        identities: &[IdentityKey],
    ) -> Result<Vec<Option<UserName>>, StoreError> {
        dispatch!(self, "names_of", s => s.names_of(identities))
    }

    async fn add_key_packages(
        &self,
        identity: &IdentityKey,
        packages: &[KeyPackageRecord],
        last_resort: Option<&KeyPackageRecord>,
    ) -> Result<u32, StoreError> {
        dispatch!(self, "add_key_packages", s => s.add_key_packages(identity, packages, last_resort))
    }

    async fn fetch_key_packages(
        &self,
        targets: &[IdentityKey],
    ) -> Result<Vec<Option<FetchedKeyPackage>>, StoreError> {
        dispatch!(self, "fetch_key_packages", s => s.fetch_key_packages(targets))
    }

    async fn key_package_count(&self, identity: &IdentityKey) -> Result<u32, StoreError> {
        dispatch!(self, "key_package_count", s => s.key_package_count(identity))
    }
}

impl log::LogStore for AnyStore {
    async fn create_group_with_view(
        &self,
        group_id: &group::GroupId,
        creator: &IdentityKey,
        view: Option<&group::StoredView>,
    ) -> Result<(), StoreError> {
        dispatch!(self, "create_group", s => s.create_group_with_view(group_id, creator, view))
    }

    async fn load_view(
        &self,
        group_id: &group::GroupId,
    ) -> Result<Option<group::StoredView>, StoreError> {
        dispatch!(self, "load_view", s => s.load_view(group_id))
    }

    async fn group_info(
        &self,
        group_id: &group::GroupId,
    ) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        dispatch!(self, "group_info", s => s.group_info(group_id))
    }

    async fn append(
        &self,
        batch: &[group::AppendRequest],
    ) -> Result<Vec<group::AppendOutcome>, StoreError> {
        dispatch!(self, "append", s => s.append(batch))
    }

    async fn revert(
        &self,
        req: &crate::model::revert::RevertRequest,
    ) -> Result<crate::model::revert::RevertOutcome, StoreError> {
        dispatch!(self, "revert", s => s.revert(req))
    }

    async fn read_log(
        &self,
        group_id: &group::GroupId,
        reader: &IdentityKey,
        after_seq: u64,
        page: impl Into<Page> + Send,
    ) -> Result<Vec<group::LogEntry>, StoreError> {
        let page = page.into();
        dispatch!(self, "read_log", s => s.read_log(group_id, reader, after_seq, page))
    }

    async fn check_member(
        &self,
        group_id: &group::GroupId,
        reader: &IdentityKey,
    ) -> Result<(), StoreError> {
        dispatch!(self, "check_member", s => s.check_member(group_id, reader))
    }

    async fn group_summary(
        &self,
        group_id: &group::GroupId,
        reader: &IdentityKey,
    ) -> Result<group::GroupSummary, StoreError> {
        dispatch!(self, "group_summary", s => s.group_summary(group_id, reader))
    }

    async fn groups_of(&self, identity: &IdentityKey) -> Result<Vec<group::GroupId>, StoreError> {
        dispatch!(self, "groups_of", s => s.groups_of(identity))
    }

    async fn read_inbox(
        &self,
        identity: &IdentityKey,
        after_seq: u64,
        page: impl Into<Page> + Send,
    ) -> Result<Vec<group::InboxEntry>, StoreError> {
        let page = page.into();
        dispatch!(self, "read_inbox", s => s.read_inbox(identity, after_seq, page))
    }

    async fn set_cursor(
        &self,
        identity: &IdentityKey,
        group_id: &group::GroupId,
        seq: u64,
    ) -> Result<(), StoreError> {
        dispatch!(self, "set_cursor", s => s.set_cursor(identity, group_id, seq))
    }

    async fn cursor(
        &self,
        identity: &IdentityKey,
        group_id: &group::GroupId,
    ) -> Result<u64, StoreError> {
        dispatch!(self, "cursor", s => s.cursor(identity, group_id))
    }
}
