//! Live subscriptions: push a group's entries (or an inbox's Welcomes) to the subscriber.
//!
//! Each subscription is a local task that first catches up from the store, then follows the
//! shard's live feed. Entries from the feed are delivered directly while they continue the
//! sequence; a gap, a lagging receiver or a commit sends the task back to the store, which
//! enforces the subscriber's read window (a commit may have removed it: the subscription ends
//! after delivering the commit that removed the subscriber). Each batch is delivered with one
//! call, awaited before the next (flow control).

use std::rc::Rc;

use quicproquo_core::IdentityKey;
use quicproquo_proto::delivery_capnp::{inbox_stream, message_stream, subscription};
use quicproquo_proto::errors::{ErrorCode, code_of};
use quicproquo_telemetry::propagation::{LinkContext, WireContext};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument, debug};

use super::backend::Backend;
use crate::model::group::{EntryKind, GroupId, LogEntry};
use crate::obs::calls::InFlight;
use crate::obs::spans::{PushTarget, push_span, record_error};
use crate::ordering::hub::FeedEvent;
use crate::store::StoreError;
use crate::store::log::LogStore;
use crate::wire::codec::{write_envelope, write_welcome};

/// Entries read from the store per catch-up step, and delivered per call at most.
const BATCH: u32 = 256;

/// The capability handed to the subscriber; dropping it (or calling `close`) ends the task.
struct SubscriptionImpl {
    _stop: DropGuard,
    stop: CancellationToken,
    in_flight: Rc<InFlight>,
}

impl subscription::Server for SubscriptionImpl {
    async fn close(
        self: Rc<Self>,
        _: subscription::CloseParams,
        _: subscription::CloseResults,
    ) -> Result<(), capnp::Error> {
        let in_flight = Rc::clone(&self.in_flight);
        in_flight
            .serve(
                "Subscription",
                "close",
                WireContext::default(),
                async move {
                    self.stop.cancel();
                    Ok(())
                },
            )
            .await
    }
}

/// Runs `task` as a local task until it ends or the returned capability is dropped or closed;
/// the capability's own calls are accounted on `in_flight` (the connection that subscribed).
pub(super) fn spawn<F>(
    in_flight: &Rc<InFlight>,
    task: impl FnOnce(CancellationToken) -> F,
) -> subscription::Client
where
    F: Future<Output = ()> + 'static,
{
    let stop = CancellationToken::new();
    let fut = task(stop.clone());
    let stopped = stop.clone();
    tokio::task::spawn_local(async move {
        tokio::select! {
            () = stopped.cancelled() => {}
            () = fut => {}
        }
    });
    capnp_rpc::new_client(SubscriptionImpl {
        _stop: stop.clone().drop_guard(),
        stop,
        in_flight: Rc::clone(in_flight),
    })
}

/// Subscribes `reader` to `group` after `after_seq`.
pub(super) fn group(
    in_flight: &Rc<InFlight>,
    backend: Backend,
    reader: IdentityKey,
    group: GroupId,
    after_seq: u64,
    stream: message_stream::Client,
) -> subscription::Client {
    spawn(in_flight, move |_| async move {
        if let Err(e) = follow_group(&backend, reader, &group, after_seq, &stream).await {
            debug!(error = %e, "group subscription ended");
        }
    })
}

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("subscriber gone: {0}")]
    Rpc(#[from] capnp::Error),
    #[error("the shard's feed closed")]
    FeedClosed,
}

/// Pushes `entries` to the subscriber in one call, inside a push span linked to `origins`
/// (the appends of the entries that were traced; none for entries read from the store).
async fn deliver<'a>(
    stream: &message_stream::Client,
    group: &GroupId,
    entries: impl ExactSizeIterator<Item = &'a LogEntry>,
    origins: impl Iterator<Item = Option<&'a LinkContext>>,
) -> Result<(), capnp::Error> {
    let span = push_span(PushTarget::Client, entries.len(), origins);
    let mut req = stream.deliver_request();
    {
        let mut p = req.get();
        p.set_group_id(group.as_bytes());
        let mut list = p.init_entries(entries.len() as u32);
        for (i, e) in entries.enumerate() {
            write_envelope(list.reborrow().get(i as u32), group, e);
        }
    }
    let result = req.send().promise.instrument(span.clone()).await;
    if let Err(e) = &result {
        record_error(&span, code_of(e).map_or("error", ErrorCode::as_str));
    }
    result.map(drop)
}

async fn follow_group(
    backend: &Backend,
    reader: IdentityKey,
    group: &GroupId,
    after_seq: u64,
    stream: &message_stream::Client,
) -> Result<(), FollowError> {
    let store = backend.store();
    // Subscribe to the live feed before reading the store, so nothing falls in between.
    let mut feed = backend.group_feed(group);
    let mut next = after_seq.saturating_add(1);
    loop {
        // Catch up from the store (it enforces the read window).
        loop {
            let entries = store.read_log(group, &reader, next - 1, BATCH).await?;
            let Some(last) = entries.last() else { break };
            next = last.seq + 1;
            let had_commit = entries.iter().any(|e| e.kind == EntryKind::Commit);
            deliver(stream, group, entries.iter(), std::iter::empty()).await?;
            backend.observer().metrics.fanout(entries.len());
            if had_commit && store.group_summary(group, &reader).await.is_err() {
                // Removed (or the group is gone): everything readable has been delivered.
                return Ok(());
            }
            if entries.len() < BATCH as usize {
                break;
            }
        }
        // Follow the live feed while it continues the sequence.
        'live: loop {
            let first = match feed.recv().await {
                Ok(FeedEvent::Entry(e)) => e,
                Ok(FeedEvent::Resync) | Err(RecvError::Lagged(_)) => break 'live,
                Err(RecvError::Closed) => return Err(FollowError::FeedClosed),
            };
            if first.seq < next {
                continue;
            }
            if first.seq > next || first.kind == EntryKind::Commit {
                break 'live;
            }
            let mut batch = vec![first];
            let mut back_to_store = false;
            while batch.len() < BATCH as usize {
                match feed.try_recv() {
                    Ok(FeedEvent::Entry(e))
                        if e.seq == next + batch.len() as u64 && e.kind != EntryKind::Commit =>
                    {
                        batch.push(e);
                    }
                    Ok(FeedEvent::Entry(e)) if e.seq < next + batch.len() as u64 => {}
                    Ok(_) | Err(TryRecvError::Lagged(_)) => {
                        back_to_store = true;
                        break;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => return Err(FollowError::FeedClosed),
                }
            }
            next += batch.len() as u64;
            let entries = batch.iter().map(|e| &e.entry);
            deliver(
                stream,
                group,
                entries,
                batch.iter().map(|e| e.origin.as_ref()),
            )
            .await?;
            backend.observer().metrics.fanout(batch.len());
            if back_to_store {
                break 'live;
            }
        }
    }
}

/// Subscribes `identity` to its own inbox after `after_seq`.
pub(super) fn inbox(
    in_flight: &Rc<InFlight>,
    backend: Backend,
    identity: IdentityKey,
    after_seq: u64,
    stream: inbox_stream::Client,
) -> subscription::Client {
    spawn(in_flight, move |_| async move {
        if let Err(e) = follow_inbox(&backend, identity, after_seq, &stream).await {
            debug!(error = %e, "inbox subscription ended");
        }
    })
}

async fn follow_inbox(
    backend: &Backend,
    identity: IdentityKey,
    after_seq: u64,
    stream: &inbox_stream::Client,
) -> Result<(), FollowError> {
    let mut feed = backend.inbox_feed(&identity);
    let mut after = after_seq;
    loop {
        loop {
            let welcomes = backend.store().read_inbox(&identity, after, BATCH).await?;
            let Some(last) = welcomes.last() else { break };
            after = last.seq;
            let mut req = stream.deliver_request();
            {
                let mut list = req.get().init_welcomes(welcomes.len() as u32);
                for (i, w) in welcomes.iter().enumerate() {
                    write_welcome(list.reborrow().get(i as u32), w);
                }
            }
            req.send().promise.await?;
        }
        match feed.recv().await {
            Ok(()) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return Err(FollowError::FeedClosed),
        }
    }
}
