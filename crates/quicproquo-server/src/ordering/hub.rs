//! In-memory live feeds: the entries appended to each group and the inboxes that received a
//! Welcome, fanned out to the subscription tasks of one process.
//!
//! On a shard (or a standalone node) the appender publishes here. On an edge, the router
//! publishes what the owner shards push, so one upstream subscription per group serves every
//! local subscriber of that group. Feeds are hints: a subscriber that misses something (a
//! lagging receiver, a [`FeedEvent::Resync`]) reads the log, which stays the only truth.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use quicproquo_core::IdentityKey;
use quicproquo_telemetry::propagation::LinkContext;
use tokio::sync::broadcast;

use crate::model::group::{GroupId, LogEntry};

/// Entries a subscriber may fall behind the live feed before it catches up from the store.
const FEED_CAPACITY: usize = 1024;
/// Pending inbox notifications per identity (each only says "look at your inbox").
const INBOX_CAPACITY: usize = 16;
/// Batches of inbox notifications kept for the cluster-wide inbox feed.
const ALL_INBOXES_CAPACITY: usize = 1024;

/// A newly appended entry as its group's feed carries it.
#[derive(Debug)]
pub struct Published {
    /// The entry.
    pub entry: LogEntry,
    /// The span context of the call that appended it, when that call was traced: the spans
    /// that push the entry to subscribers link to it. `None` (nothing allocated) otherwise.
    pub origin: Option<LinkContext>,
    /// For a commit, its membership effect: the members it removed, as the owner derived them
    /// from the verified commit (taken once per group, not once per subscriber). `None` when
    /// not known (any other entry, or a commit from a shard that did not send it): a
    /// subscriber then asks the store whether it may read on.
    pub removed: Option<Arc<[IdentityKey]>>,
}

impl std::ops::Deref for Published {
    type Target = LogEntry;

    fn deref(&self) -> &LogEntry {
        &self.entry
    }
}

/// What a group's live feed carries.
#[derive(Debug, Clone)]
pub enum FeedEvent {
    /// A newly appended entry.
    Entry(Arc<Published>),
    /// Entries may have been missed (the upstream changed or fell behind): read the log.
    Resync,
}

/// Live feeds keyed by group (entries) and by identity (inbox notifications).
#[derive(Debug)]
pub struct Hub {
    groups: Mutex<HashMap<GroupId, broadcast::Sender<FeedEvent>>>,
    inboxes: Mutex<HashMap<IdentityKey, broadcast::Sender<()>>>,
    all_inboxes: broadcast::Sender<Arc<Vec<IdentityKey>>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            groups: Mutex::default(),
            inboxes: Mutex::default(),
            all_inboxes: broadcast::channel(ALL_INBOXES_CAPACITY).0,
        }
    }
}

impl Hub {
    /// A receiver of `group`'s feed; `true` when this created the feed (no one was
    /// listening before), which is when an edge starts following the group upstream.
    pub fn group_feed(&self, group: &GroupId) -> (broadcast::Receiver<FeedEvent>, bool) {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = groups.get(group) {
            return (tx.subscribe(), false);
        }
        let (tx, rx) = broadcast::channel(FEED_CAPACITY);
        groups.insert(group.clone(), tx);
        (rx, true)
    }

    /// A receiver that ticks whenever `identity`'s inbox receives a Welcome.
    pub fn inbox_feed(&self, identity: &IdentityKey) -> broadcast::Receiver<()> {
        let mut inboxes = self.inboxes.lock().unwrap_or_else(PoisonError::into_inner);
        inboxes
            .entry(*identity)
            .or_insert_with(|| broadcast::channel(INBOX_CAPACITY).0)
            .subscribe()
    }

    /// A receiver of every inbox notification (a shard pushes these to the edges).
    pub fn all_inboxes(&self) -> broadcast::Receiver<Arc<Vec<IdentityKey>>> {
        self.all_inboxes.subscribe()
    }

    fn send_group(&self, group: &GroupId, event: FeedEvent) {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = groups.get(group)
            && tx.send(event).is_err()
        {
            // Nobody listens any more.
            groups.remove(group);
        }
    }

    /// Publishes a new entry of `group`, appended by a call with span context `origin`; for a
    /// commit, `removed` is who it removed (when known).
    pub fn publish(
        &self,
        group: &GroupId,
        entry: LogEntry,
        origin: Option<LinkContext>,
        removed: Option<Arc<[IdentityKey]>>,
    ) {
        let published = Published {
            entry,
            origin,
            removed,
        };
        self.send_group(group, FeedEvent::Entry(Arc::new(published)));
    }

    /// Tells `group`'s subscribers to check the log.
    pub fn resync(&self, group: &GroupId) {
        self.send_group(group, FeedEvent::Resync);
    }

    /// Tells `identities` their inbox received a Welcome.
    pub fn notify_inboxes(&self, identities: &[IdentityKey]) {
        if identities.is_empty() {
            return;
        }
        {
            let mut inboxes = self.inboxes.lock().unwrap_or_else(PoisonError::into_inner);
            for id in identities {
                if let Some(tx) = inboxes.get(id)
                    && tx.send(()).is_err()
                {
                    inboxes.remove(id);
                }
            }
        }
        let _ = self.all_inboxes.send(Arc::new(identities.to_vec()));
    }

    /// Tells every inbox subscriber to check its inbox (after an upstream reconnect).
    pub fn resync_all_inboxes(&self) {
        let mut inboxes = self.inboxes.lock().unwrap_or_else(PoisonError::into_inner);
        inboxes.retain(|_, tx| tx.send(()).is_ok());
    }

    /// Forgets the groups nobody subscribes to any more and returns them.
    pub fn sweep_unused_groups(&self) -> Vec<GroupId> {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        let unused: Vec<GroupId> = groups
            .iter()
            .filter(|(_, tx)| tx.receiver_count() == 0)
            .map(|(g, _)| g.clone())
            .collect();
        for g in &unused {
            groups.remove(g);
        }
        unused
    }
}
