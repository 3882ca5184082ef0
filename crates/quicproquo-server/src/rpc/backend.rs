//! Where the client-facing Delivery Service sends the calls that order a group's log.
//!
//! A standalone node orders logs itself ([`Backend::Local`]: its own [`Appender`]); an edge
//! forwards them to the group's owner shard ([`Backend::Routed`]: the [`Router`]). Reads
//! (fetch, catch-up, cursors, inboxes) go to the store either way: the log in the store is the
//! only truth, and a shard holds nothing but its live feeds.

use std::sync::Arc;

use quicproquo_core::IdentityKey;
use tokio::sync::broadcast;

use crate::cluster::router::Router;
use crate::model::group::{AppendOutcome, AppendRequest, GroupId};
use crate::obs::Observer;
use crate::ordering::hub::FeedEvent;
use crate::ordering::revert::RevertMarker;
use crate::ordering::{Appender, OrderingError};
use crate::store::AnyStore;

/// The ordering side behind a client-facing Delivery Service.
#[derive(Debug, Clone)]
pub enum Backend {
    /// This process's own appender (standalone).
    Local(Arc<Appender>),
    /// The owner shards of the cluster, reached through the edge's router.
    Routed(Arc<Router>),
}

impl Backend {
    /// The store holding the logs.
    pub fn store(&self) -> &AnyStore {
        match self {
            Self::Local(s) => s.store(),
            Self::Routed(r) => r.store(),
        }
    }

    /// The metrics and redaction key of this node.
    pub fn observer(&self) -> &Arc<Observer> {
        match self {
            Self::Local(s) => s.observer(),
            Self::Routed(r) => r.observer(),
        }
    }

    /// The largest message (with its Welcome) accepted.
    pub fn max_message_bytes(&self) -> usize {
        match self {
            Self::Local(s) => s.max_message_bytes(),
            Self::Routed(r) => r.max_message_bytes(),
        }
    }

    /// A live feed of `group`'s new entries.
    pub fn group_feed(&self, group: &GroupId) -> broadcast::Receiver<FeedEvent> {
        match self {
            Self::Local(s) => s.hub().group_feed(group).0,
            Self::Routed(r) => r.group_feed(group),
        }
    }

    /// A live feed that ticks when `identity`'s inbox receives a Welcome.
    pub fn inbox_feed(&self, identity: &IdentityKey) -> broadcast::Receiver<()> {
        match self {
            Self::Local(s) => s.hub().inbox_feed(identity),
            Self::Routed(r) => r.hub().inbox_feed(identity),
        }
    }

    /// Appends one message; resolves once it is durable (or refused).
    pub async fn append(&self, req: AppendRequest) -> Result<AppendOutcome, OrderingError> {
        match self {
            Self::Local(s) => s.append(req).await,
            Self::Routed(r) => r.append(req).await,
        }
    }

    /// Handles `reporter`'s signed report of the commit at `seq` in `group` (ADR 0015).
    pub async fn report_commit(
        &self,
        group: &GroupId,
        reporter: &IdentityKey,
        seq: u64,
        report: Vec<u8>,
    ) -> Result<RevertMarker, OrderingError> {
        match self {
            Self::Local(s) => s.report_commit(group, reporter, seq, &report).await,
            Self::Routed(r) => r.report_commit(group.clone(), *reporter, seq, report).await,
        }
    }

    /// Creates `group` with `creator` as its only member, and its public view from the
    /// creator's GroupInfo.
    pub async fn create_group(
        &self,
        group: &GroupId,
        creator: &IdentityKey,
        group_info: Vec<u8>,
    ) -> Result<(), OrderingError> {
        match self {
            Self::Local(s) => s.create_group(group, creator, group_info).await,
            Self::Routed(r) => r.create_group(group.clone(), *creator, group_info).await,
        }
    }
}
