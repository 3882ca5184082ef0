//! Ordering: the appender that writes each node's appends in batches (group commit), the
//! groups' public views every commit and proposal is verified against first ([`views`]), and
//! members' reports of commits they cannot process and the reverts they cause ([`revert`]),
//! the in-memory live feeds ([`hub`]) that fan new entries out to subscriptions.
//!
//! What it is not: an RPC face. Callers hand it model values and get model outcomes or an
//! [`OrderingError`]; the RPC layer turns those into wire answers. A standalone node and a
//! shard both run an [`Appender`]; an edge runs a [`hub::Hub`] fed by the shards it follows.

pub mod appender;
pub mod hub;
pub mod retention;
pub mod revert;
pub mod views;

pub use appender::Appender;

use crate::model::ModelError;
use crate::store::StoreError;

/// Why an append or group creation was not decided.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrderingError {
    /// The request breaks a rule of the model (e.g. it is too large).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The store refused or failed the operation.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No node that orders this group can be reached now (shutting down, no live shard); the
    /// operation had no effect that the caller can rely on, and may be retried.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The group's public view refused a commit or proposal (or a new group's GroupInfo): the
    /// error names the rule. Nothing changed.
    #[error("{0}")]
    BadCommit(quicproquo_core::group::public::ViewError),
    /// The group's owner shard refused the call with a typed reason (an edge forwarding).
    #[error("[{code}] {message}")]
    Refused {
        /// The stable reason.
        code: quicproquo_proto::errors::ErrorCode,
        /// The shard's explanation.
        message: String,
    },
}
