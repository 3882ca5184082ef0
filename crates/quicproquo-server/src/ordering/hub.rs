//! In-memory live feeds: the entries appended to each group and the inboxes that received a
//! Welcome, fanned out to the subscription tasks of one process.
//!
//! On a shard (or a standalone node) the appender publishes here. On an edge, the router
//! publishes what the owner shards push, so one upstream subscription per group serves every
//! local subscriber of that group. Feeds are hints: a subscriber that misses something (a
//! lagging receiver, a [`FeedEvent::Resync`]) reads the log, which stays the only truth.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use quicproquo_core::IdentityKey;
use quicproquo_telemetry::propagation::LinkContext;
use tokio::sync::broadcast;

use crate::model::group::{GroupId, LogEntry};

/// Entries a subscriber may fall behind the live feed before it catches up from the store.
const FEED_CAPACITY: usize = 1024;
/// Bytes of entries (payload and message id) a group's feed holds for subscribers that have
/// not taken them yet: an entry that would go past it is not carried (the subscribers are told
/// to read the log instead), so a slow subscriber holds at most this much for its group
/// however large the messages.
pub const FEED_BYTES: usize = 32 * 1024 * 1024;
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
    /// The entry's bytes, counted against its feed's [`FEED_BYTES`] until every subscriber has
    /// taken it (or the feed overwrote it): only its `Drop` matters.
    _charge: Charge,
    /// The entry as its subscribers' push frame, encoded by the first that needs it and shared
    /// by the others (about the entry's size again, for as long as the entry is held).
    encoded: OnceLock<Arc<[u8]>>,
}

impl Published {
    /// The entry encoded by `encode`, once for every subscriber on this node.
    pub fn encoded(&self, encode: impl FnOnce(&LogEntry) -> Arc<[u8]>) -> Arc<[u8]> {
        Arc::clone(self.encoded.get_or_init(|| encode(&self.entry)))
    }
}

/// Bytes counted against a feed's budget while the entry carrying them lives.
#[derive(Debug)]
struct Charge {
    bytes: usize,
    budget: Arc<AtomicUsize>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::AcqRel);
    }
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

/// A group's feed, and the bytes of the entries it holds that not every subscriber took yet.
#[derive(Debug)]
struct Feed {
    tx: broadcast::Sender<FeedEvent>,
    held: Arc<AtomicUsize>,
}

/// Live feeds keyed by group (entries) and by identity (inbox notifications).
#[derive(Debug)]
pub struct Hub {
    groups: Mutex<HashMap<GroupId, Feed>>,
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
        if let Some(feed) = groups.get(group) {
            return (feed.tx.subscribe(), false);
        }
        let (tx, rx) = broadcast::channel(FEED_CAPACITY);
        let held = Arc::default();
        groups.insert(group.clone(), Feed { tx, held });
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

    /// Sends what `make` builds from the feed's byte budget to `group`'s feed, if it has one.
    fn send_group(&self, group: &GroupId, make: impl FnOnce(&Arc<AtomicUsize>) -> FeedEvent) {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(feed) = groups.get(group)
            && feed.tx.send(make(&feed.held)).is_err()
        {
            // Nobody listens any more.
            groups.remove(group);
        }
    }

    /// Publishes a new entry of `group`, appended by a call with span context `origin`; for a
    /// commit, `removed` is who it removed (when known). An entry that would take the bytes the
    /// feed holds past [`FEED_BYTES`] is not carried: the subscribers are told to read the log.
    pub fn publish(
        &self,
        group: &GroupId,
        entry: LogEntry,
        origin: Option<LinkContext>,
        removed: Option<Arc<[IdentityKey]>>,
    ) {
        let bytes = entry.payload.len() + entry.message_id.len();
        self.send_group(group, move |held| {
            let taken = held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                now.checked_add(bytes).filter(|&total| total <= FEED_BYTES)
            });
            if taken.is_err() {
                return FeedEvent::Resync;
            }
            let charge = Charge {
                bytes,
                budget: Arc::clone(held),
            };
            FeedEvent::Entry(Arc::new(Published {
                entry,
                origin,
                removed,
                _charge: charge,
                encoded: OnceLock::new(),
            }))
        });
    }

    /// The bytes `group`'s feed holds for subscribers that have not taken them yet.
    pub fn held_bytes(&self, group: &GroupId) -> usize {
        let groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups
            .get(group)
            .map_or(0, |feed| feed.held.load(Ordering::Acquire))
    }

    /// Tells `group`'s subscribers to check the log.
    pub fn resync(&self, group: &GroupId) {
        self.send_group(group, |_| FeedEvent::Resync);
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
            .filter(|(_, feed)| feed.tx.receiver_count() == 0)
            .map(|(g, _)| g.clone())
            .collect();
        for g in &unused {
            groups.remove(g);
        }
        unused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::group::EntryKind;

    fn entry(seq: u64, bytes: usize) -> LogEntry {
        LogEntry {
            seq,
            epoch: 0,
            kind: EntryKind::Application,
            message_id: vec![1; 16],
            payload: vec![0; bytes],
            appended_at_micros: 0,
        }
    }

    /// A subscriber that takes nothing holds at most `FEED_BYTES` of its group's entries: past
    /// it the feed carries a resync instead; taking the entries releases them.
    #[test]
    fn a_feed_holds_at_most_its_byte_budget() -> Result<(), Box<dyn std::error::Error>> {
        let hub = Hub::default();
        let group = GroupId::new(b"g")?;
        let (mut slow, created) = hub.group_feed(&group);
        assert!(created);
        let size = 1024 * 1024 - 16;
        let fits = FEED_BYTES / (size + 16);
        for seq in 1..=fits as u64 + 3 {
            hub.publish(&group, entry(seq, size), None, None);
        }
        assert_eq!(hub.held_bytes(&group), fits * (size + 16));
        let mut carried = 0;
        let mut resyncs = 0;
        while let Ok(event) = slow.try_recv() {
            match event {
                FeedEvent::Entry(_) => carried += 1,
                FeedEvent::Resync => resyncs += 1,
            }
        }
        assert_eq!((carried, resyncs), (fits, 3));
        // Everything taken: nothing is held, and entries are carried again.
        assert_eq!(hub.held_bytes(&group), 0);
        hub.publish(&group, entry(99, size), None, None);
        assert!(matches!(slow.try_recv(), Ok(FeedEvent::Entry(_))));
        // A subscriber that leaves releases what it had not taken.
        hub.publish(&group, entry(100, size), None, None);
        let (other, _) = hub.group_feed(&group);
        hub.publish(&group, entry(101, size), None, None);
        assert_eq!(hub.held_bytes(&group), 2 * (size + 16));
        drop(slow);
        drop(other);
        assert_eq!(hub.held_bytes(&group), 0);
        Ok(())
    }
}
